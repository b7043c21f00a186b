//! The SmolLM2-135M-Instruct test model (fetched by scripts/fetch-assets.sh) and inline
//! Austen text. Tests fail loudly when the asset is missing.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use sae_ablate::model::{LoadOptions, Model, Tokenizer};

pub const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn gguf_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("assets/smollm2")
        .join(GGUF_NAME);
    assert!(
        p.is_file(),
        "test asset {} is missing: run scripts/fetch-assets.sh first",
        p.display()
    );
    p
}

/// The f32 model, loaded once per test binary.
pub fn model() -> MutexGuard<'static, Model> {
    static M: OnceLock<Mutex<Model>> = OnceLock::new();
    M.get_or_init(|| {
        Mutex::new(Model::from_gguf(gguf_path(), &LoadOptions::default()).expect("load SmolLM2"))
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

pub fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_gguf_file(gguf_path()).expect("tokenizer"))
}

/// The opening of Pride and Prejudice (Jane Austen, 1813; public domain).
pub const AUSTEN: &str = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or other of their daughters.

\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is let at last?\"

Mr. Bennet replied that he had not.

\"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me all about it.\"

Mr. Bennet made no answer.

\"Do you not want to know who has taken it?\" cried his wife impatiently.

\"You want to tell me, and I have no objection to hearing it.\"

This was invitation enough.

\"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large fortune from the north of England; that he came down on Monday in a chaise and four to see the place, and was so much delighted with it, that he agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, and some of his servants are to be in the house by the end of next week.\"

\"What is his name?\"

\"Bingley.\"

\"Is he married or single?\"

\"Oh! Single, my dear, to be sure! A single man of large fortune; four or five thousand a year. What a fine thing for our girls!\"

\"How so? How can it affect them?\"

\"My dear Mr. Bennet,\" replied his wife, \"how can you be so tiresome! You must know that I am thinking of his marrying one of them.\"";
