//! The Gemma 3 270M test model (Q4_K_M GGUF, fetched by scripts/fetch-assets.sh) and its
//! tokenizer reference ids (tests/fixtures/gemma3-270m/tokens.json, written by
//! scripts/make-tokenizer-fixtures.sh). Tests fail loudly when the asset is missing.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use sae_ablate::model::Tokenizer;

pub const GGUF_NAME: &str = "gemma-3-270m-q4_k_m.gguf";

pub fn gguf_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("assets/gemma-3-270m")
        .join(GGUF_NAME);
    assert!(
        p.is_file(),
        "test asset {} is missing: run scripts/fetch-assets.sh first",
        p.display()
    );
    p
}

/// The tokenizer from the GGUF metadata, loaded once per test binary.
pub fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_gguf_file(gguf_path()).expect("Gemma 3 tokenizer"))
}

pub fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma3-270m/tokens.json")
}

/// The reference fixture, parsed.
pub fn fixture() -> serde_json::Value {
    let p = fixture_path();
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
