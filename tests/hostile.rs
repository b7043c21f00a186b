//! Hand-made hostile files: each is a clear, one-line error naming the file, never a panic
//! or a huge allocation. (Format-specific cases live beside each format's tests; these are
//! the header-level attacks on the containers themselves.)

#[path = "common/pickle_writer.rs"]
mod pickle_writer;

use sae_ablate::model::{self, LoadOptions};
use sae_ablate::Sae;

fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sae-ablate-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
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

/// A GGUF v3 string: `u64` length, bytes.
fn gguf_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

#[test]
fn gguf_with_zero_alignment() {
    // candle's reader divides by `general.alignment`: 0 must be an error, not a panic.
    for (ty, value) in [(4u32, vec![0u8; 4]), (0, vec![0]), (5, vec![0; 4])] {
        let mut b = gguf_header(0, 2);
        gguf_str(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        gguf_str(&mut b, "llama");
        gguf_str(&mut b, "general.alignment");
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&value);
        let p = tmp("align.gguf", &b);
        let e = load_err(&p);
        assert!(
            e.contains("align.gguf") && e.contains("general.alignment"),
            "{e}"
        );
        let e = sae_ablate::model::Tokenizer::from_gguf_file(&p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("general.alignment"), "{e}");
    }
}

#[test]
fn gguf_with_zero_alignment_behind_a_nul_or_a_duplicate_key() {
    // candle drops a key's trailing NUL bytes and keeps the last of duplicate keys, so
    // `general.alignment\0 = 0`, or `general.alignment = 32` then `= 0`, is still a
    // zero divisor (the first found by the `gguf` fuzz target).
    let align = |b: &mut Vec<u8>, key: &str, ty: u32, value: &[u8]| {
        gguf_str(b, key);
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(value);
    };
    let mut nul = gguf_header(0, 1);
    align(&mut nul, "general.alignment\0\0", 4, &[0; 4]);
    let mut dup = gguf_header(0, 2);
    align(&mut dup, "general.alignment", 4, &32u32.to_le_bytes());
    align(&mut dup, "general.alignment", 0, &[0]);
    // An ignored type (u64) first, then 0.
    let mut ignored = gguf_header(0, 2);
    align(&mut ignored, "general.alignment", 10, &[0; 8]);
    align(&mut ignored, "general.alignment", 5, &[0; 4]);
    for (name, b) in [
        ("nul.gguf", nul),
        ("dup.gguf", dup),
        ("ignored.gguf", ignored),
    ] {
        let p = tmp(name, &b);
        let e = load_err(&p);
        assert!(e.contains(name) && e.contains("general.alignment"), "{e}");
        let e = sae_ablate::model::Tokenizer::from_gguf_file(&p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("general.alignment"), "{e}");
    }
    // The last one non-zero: candle aligns to 32 and reads on (no tensors: an error
    // about the missing architecture, not the alignment).
    let mut ok = gguf_header(0, 2);
    align(&mut ok, "general.alignment", 4, &[0; 4]);
    align(&mut ok, "general.alignment", 4, &32u32.to_le_bytes());
    let e = load_err(&tmp("last-32.gguf", &ok));
    assert!(!e.contains("general.alignment"), "{e}");
}

#[test]
fn gguf_tensor_whose_shape_overflows() {
    // [2^32, 2^32, 2^32] f32: the element count overflows usize; a naive size check
    // wraps to a small number and passes.
    let mut b = gguf_header(1, 0);
    gguf_str(&mut b, "token_embd.weight");
    b.extend_from_slice(&3u32.to_le_bytes());
    for _ in 0..3 {
        b.extend_from_slice(&(1u64 << 32).to_le_bytes());
    }
    b.extend_from_slice(&0u32.to_le_bytes()); // F32
    b.extend_from_slice(&0u64.to_le_bytes()); // offset
    b.extend_from_slice(&[0u8; 64]);
    let e = load_err(&tmp("overflow.gguf", &b));
    assert!(
        e.contains("overflow.gguf") && e.contains("token_embd.weight") && e.contains("overflows"),
        "{e}"
    );
    // A tensor that would end past the end of the file.
    let mut b = gguf_header(1, 0);
    gguf_str(&mut b, "token_embd.weight");
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 20).to_le_bytes());
    b.extend_from_slice(&(1u64 << 20).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    let e = load_err(&tmp("past-end.gguf", &b));
    assert!(
        e.contains("past-end.gguf") && e.contains("does not fit"),
        "{e}"
    );
}

#[test]
fn gguf_claiming_a_huge_context_in_a_tiny_file() {
    // The fuzz seed's tiny Llama (9.8 KB) with llama.context_length = 2^26: the RoPE
    // tables would take 2 GiB. Found by the `gguf` fuzz target's allocation bound.
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz-regressions/gguf/rope-context-2pow26.gguf");
    let e = load_err(&p);
    assert!(
        e.contains("rope-context-2pow26.gguf")
            && e.contains("context length 67108864")
            && e.contains("max_seq_len"),
        "{e}"
    );
    // Capped by the caller, the same file loads.
    let opts = LoadOptions::default().with_max_seq_len(64);
    assert!(model::load(&p, &opts).is_ok());
}

#[test]
fn empty_tensors_with_overflowing_dimensions() {
    // Shape (0, 2^40, 2^40) declares no data, so a byte-count check passes, but candle
    // multiplies the other dimensions for the strides: found by the `npy` fuzz target.
    let big = 1usize << 40;
    let dev = candle_core::Device::Cpu;

    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': (0, {big}, {big}), }}");
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend_from_slice(&(dict.len() as u16 + 1).to_le_bytes());
    npy.extend_from_slice(dict.as_bytes());
    npy.push(b'\n');
    let e = sae_ablate::io::npy::parse_npy(&npy, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("overflows"), "{e}");

    let dir = std::env::temp_dir().join(format!("sae-ablate-hostile-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let header =
        format!(r#"{{"W_enc":{{"dtype":"F32","shape":[0,{big},{big}],"data_offsets":[0,0]}}}}"#);
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    std::fs::write(dir.join("sae_weights.safetensors"), b).unwrap();
    std::fs::write(
        dir.join("cfg.json"),
        r#"{"architecture":"standard","d_in":2,"d_sae":3}"#,
    )
    .unwrap();
    let e = Sae::load(&dir, &dev).unwrap_err().to_string();
    assert!(
        e.contains("sae_weights.safetensors") && e.contains("W_enc") && e.contains("overflows"),
        "{e}"
    );

    let mut sd = pickle_writer::StateDict::new();
    let s = sd.storage(pickle_writer::Dt::F32, Vec::new());
    sd.view("encoder_linear.weight", s, &[0, big, big], &[1, 1, 1], 0);
    let p = tmp("empty.pth", &sd.zip_bytes());
    let e = sae_ablate::io::pickle::PthFile::open(&p)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("empty.pth") && e.contains("encoder_linear.weight"),
        "{e}"
    );
}

#[test]
fn tokenizer_json_with_malformed_decoder() {
    // tokenizers 0.23 panics on a syntax error inside `decoder` (found by the
    // `tokenizer` fuzz target); the file is checked as JSON first.
    let p = tmp(
        "tokenizer.json",
        br#"{"added_tokens":[],"decoder":{"type":"ByteLevel",\xff:1},"model":{"type":"BPE","vocab":{},"merges":[]}}"#,
    );
    let e = model::Tokenizer::from_hf(&p).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("json"), "{e}");
    // Invalid UTF-8 inside a string of `decoder`: a JSON error too (a syntax-only
    // check that skips strings would let it through to the panic).
    let mut b = br#"{"added_tokens":[],"decoder":{"type":"ByteLevel","x"#.to_vec();
    b.extend_from_slice(b"\xd2\x79");
    b.extend_from_slice(br#"":1},"model":{"type":"BPE","vocab":{},"merges":[]}}"#);
    let p = tmp("utf8/tokenizer.json", &b);
    let e = model::Tokenizer::from_hf(&p).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("json"), "{e}");
}

#[test]
fn gguf_with_an_empty_tensor() {
    // candle reads a zero-element tensor through an unaligned `&[f32]` (found by the
    // `gguf` fuzz target as a failed debug precondition).
    let mut b = gguf_header(1, 0);
    gguf_str(&mut b, "token_embd.weight");
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&8u64.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // F32
    b.extend_from_slice(&0u64.to_le_bytes());
    let e = load_err(&tmp("empty-tensor.gguf", &b));
    assert!(
        e.contains("empty-tensor.gguf")
            && e.contains("token_embd.weight")
            && e.contains("no elements"),
        "{e}"
    );
}

#[test]
fn negative_dimensions() {
    let dev = candle_core::Device::Cpu;
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 3), }";
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend_from_slice(&(dict.len() as u16 + 1).to_le_bytes());
    npy.extend_from_slice(dict.as_bytes());
    npy.push(b'\n');
    npy.extend_from_slice(&[0u8; 12]);
    let e = sae_ablate::io::npy::parse_npy(&npy, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("npy"), "{e}");

    let dir = std::env::temp_dir().join(format!("sae-ablate-hostile-neg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let header = r#"{"W_enc":{"dtype":"F32","shape":[-1,3],"data_offsets":[0,12]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(&[0u8; 12]);
    std::fs::write(dir.join("sae_weights.safetensors"), b).unwrap();
    std::fs::write(
        dir.join("cfg.json"),
        r#"{"architecture":"standard","d_in":3,"d_sae":1}"#,
    )
    .unwrap();
    let e = Sae::load(&dir, &dev).unwrap_err().to_string();
    assert!(
        e.contains("sae_weights.safetensors") && e.contains("safetensors"),
        "{e}"
    );
}
