//! Hand-made hostile files: each is a clear, one-line error naming the file, never a panic
//! or a huge allocation. (Format-specific cases live beside each format's tests; these are
//! the header-level attacks on the containers themselves.)

use sae_ablate::model::{self, LoadOptions};
use sae_ablate::Sae;

fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sae-ablate-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn gguf_header(tensors: u64, kvs: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&tensors.to_le_bytes());
    b.extend_from_slice(&kvs.to_le_bytes());
    b
}

fn load_err(p: &std::path::Path) -> String {
    match model::load(p, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn gguf_declaring_2_pow_40_tensors_or_keys() {
    let mut b = gguf_header(1 << 40, 0);
    b.extend_from_slice(&[0u8; 64]);
    let p = tmp("tensors.gguf", &b);
    let e = load_err(&p);
    assert!(
        e.contains("tensors.gguf") && e.contains("tensor_count"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "one line, no backtrace: {e}");

    let mut b = gguf_header(0, 1 << 40);
    b.extend_from_slice(&[0u8; 64]);
    let e = load_err(&tmp("kvs.gguf", &b));
    assert!(
        e.contains("kvs.gguf") && e.contains("metadata_kv_count"),
        "{e}"
    );
}

#[test]
fn gguf_with_a_2_pow_50_byte_string() {
    let mut b = gguf_header(0, 1);
    b.extend_from_slice(&(1u64 << 50).to_le_bytes());
    b.extend_from_slice(b"ab");
    b.extend_from_slice(&[0u8; 64]);
    let e = load_err(&tmp("string.gguf", &b));
    assert!(
        e.contains("string.gguf") && e.contains("string length"),
        "{e}"
    );
}

#[test]
fn truncated_and_empty_gguf() {
    let e = load_err(&tmp("empty.gguf", b""));
    assert!(e.contains("empty.gguf"), "{e}");
    let e = load_err(&tmp("magic.gguf", b"GGUF\x03\x00"));
    assert!(e.contains("magic.gguf"), "{e}");
}

#[test]
fn safetensors_with_an_overflowing_shape_product() {
    // 2^32 · 2^32 · 4 bytes overflows u64 arithmetic in a naive reader.
    let dir = std::env::temp_dir().join(format!("sae-ablate-hostile-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let header =
        r#"{"W_enc":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(&[0u8; 16]);
    std::fs::write(dir.join("sae_weights.safetensors"), b).unwrap();
    std::fs::write(
        dir.join("cfg.json"),
        r#"{"architecture":"standard","d_in":2,"d_sae":3}"#,
    )
    .unwrap();
    let e = Sae::load(&dir, &candle_core::Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sae_weights.safetensors") && e.contains("safetensors"),
        "{e}"
    );
}
