//! The SentencePiece tokenizer of Gemma 3 270M (GGUF `tokenizer.ggml.model = "llama"`)
//! against reference ids from llama.cpp and HF transformers (which agree on every text),
//! the Gemma chat template, template detection, and bad tokenizer metadata.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use sae_ablate::model::{ChatTemplate, Tokenizer};
use sha2::{Digest, Sha256};

#[path = "common/gemma3.rs"]
mod gemma3;
use gemma3::{fixture, gguf_path, tokenizer};

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// The fixture was made from this very file.
#[test]
fn fixture_matches_the_asset() {
    let fx = fixture();
    let bytes = std::fs::read(gguf_path()).unwrap();
    let sum = format!("{:x}", Sha256::digest(&bytes));
    assert_eq!(fx["sha256"].as_str(), Some(sum.as_str()));
}

/// Every reference text encodes to llama.cpp's ids (BOS included) and decodes back.
#[test]
fn encode_and_decode_match_llama_cpp() {
    let tok = tokenizer();
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let want = ids_of(&case["ids"]);
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "{name}: {text:?}");
        let body = &got[1..];
        assert_eq!(
            tok.decode(body, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            tok.decode(body, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "{name}"
        );
        // Special tokens kept, the text comes back whole.
        assert_eq!(tok.decode(body, false).unwrap(), text, "{name}");
    }
    // Byte fallback happened: U+13000 is spelled as <0xF0><0x93><0x80><0x80>.
    let ids = tok.encode("\u{13000}").unwrap();
    let pieces: Vec<String> = ids[1..]
        .iter()
        .map(|&i| tok.id_to_token(i).unwrap())
        .collect();
    assert_eq!(pieces, ["<0xF0>", "<0x93>", "<0x80>", "<0x80>"]);
    // Special tokens are single ids; skipping them leaves the text around them.
    let chat = "<start_of_turn>user\nHello<end_of_turn>\n";
    let ids = tok.encode(chat).unwrap();
    assert_eq!(ids[1], 105);
    assert!(ids.contains(&106));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHello\n");
    assert_eq!(tok.decode(&ids, false).unwrap(), format!("<bos>{chat}"));
}

/// The whole of Pride and Prejudice: same number of ids, same ids (by SHA-256), and the
/// encode speed, printed (run with `--nocapture` to see it).
#[test]
fn whole_novel_matches_llama_cpp_and_encodes_fast() {
    let t0 = Instant::now();
    let tok = Tokenizer::from_gguf_file(gguf_path()).unwrap();
    println!(
        "load the 262k-token vocabulary: {:.3} s",
        t0.elapsed().as_secs_f64()
    );
    let fx = fixture();
    let novel = &fx["novel"];
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/austen")
        .join(novel["file"].as_str().unwrap());
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/fetch-assets.sh first", path.display()));
    let sum = format!("{:x}", Sha256::digest(text.as_bytes()));
    assert_eq!(novel["sha256"].as_str(), Some(sum.as_str()));
    let t0 = Instant::now();
    let ids = tok.encode(&text).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "encode {}: {} bytes → {} ids in {:.3} s ({:.2} MB/s, {:.0}k ids/s)",
        path.display(),
        text.len(),
        ids.len(),
        secs,
        text.len() as f64 / secs / 1e6,
        ids.len() as f64 / secs / 1e3
    );
    assert_eq!(ids.len() as u64, novel["n_ids"].as_u64().unwrap());
    assert_eq!(&ids[..32], &ids_of(&novel["first_ids"])[..]);
    assert_eq!(&ids[ids.len() - 32..], &ids_of(&novel["last_ids"])[..]);
    let mut h = Sha256::new();
    for id in &ids {
        h.update(id.to_le_bytes());
    }
    let sum = format!("{:x}", h.finalize());
    assert_eq!(novel["ids_sha256_le_u32"].as_str(), Some(sum.as_str()));
    assert_eq!(tok.decode(&ids, true).unwrap(), text);
    // A loose bound (debug builds, a busy 2-core machine): llama.cpp takes ~1.9 s here.
    assert!(secs < 20.0, "encoding took {secs:.1} s");
}

/// BOS 2 is prepended once; stop tokens; no chat template in this base model.
#[test]
fn bos_stop_tokens_and_no_template() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!(tok.bos(), Some(2));
    assert!(tok.inner().is_none());
    assert_eq!(tok.encode("").unwrap(), [2]);
    let hi = tok.encode("Hello").unwrap();
    assert_eq!(hi, [2, 9259]);
    // A single-token lookup does not count the BOS; SentencePiece spells the space `▁`.
    assert_eq!(tok.single_token("Hello").unwrap(), 9259);
    assert_eq!(
        Some(tok.single_token(" Paris").unwrap()),
        tok.token_to_id("▁Paris")
    );
    // A text that starts with <bos> gets no second one.
    assert_eq!(tok.encode("<bos>Hello").unwrap(), hi);
    assert_eq!(tok.token_to_id("<end_of_turn>"), Some(106));
    assert_eq!(tok.token_to_id("<eos>"), Some(1));
    assert_eq!(tok.id_to_token(106).as_deref(), Some("<end_of_turn>"));
    assert_eq!(tok.id_to_token(300_000), None);
    let stop = tok.stop_tokens();
    assert!(stop.contains(&1) && stop.contains(&106), "{stop:?}");
    assert!(!stop.contains(&2));
    assert_eq!(tok.chat_template(), None);
    let e = tok.chat_prompt("Hi").unwrap_err().to_string();
    assert!(e.contains("no chat template"), "{e}");
    let e = tok.decode(&[262_144], false).unwrap_err().to_string();
    assert!(e.contains("262144"), "{e}");
}

/// Gemma 3's template: system text prefixes the first user turn with a blank line,
/// `assistant` is written `model`, contents are trimmed.
#[test]
fn gemma_template_renders_like_gemma3() {
    let t = ChatTemplate::Gemma;
    assert_eq!(
        t.render(&[("user", "Hello")], true),
        "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
    );
    assert_eq!(
        t.render(
            &[
                ("system", "Be brief."),
                ("user", " Hi \n"),
                ("assistant", "Hello!"),
                ("user", "Bye"),
            ],
            true
        ),
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
         <start_of_turn>model\nHello!<end_of_turn>\n\
         <start_of_turn>user\nBye<end_of_turn>\n\
         <start_of_turn>model\n"
    );
    assert_eq!(
        t.render(&[("user", "Hi"), ("assistant", "Hello")], false),
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    );
    // The rendered prompt tokenizes with its markers as single tokens.
    let ids = tokenizer()
        .encode(&t.render(&[("user", "Hello")], true))
        .unwrap();
    assert_eq!(ids, [2, 105, 2364, 107, 9259, 106, 107, 105, 4368, 107]);
}

/// The format is recognised from a template text by its turn markers.
#[test]
fn template_detected_from_template_text() {
    let gemma3 = "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    \
                  {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n\
                  {%- endif -%}{{ '<start_of_turn>' + role + '\\n' }}{{ '<end_of_turn>\\n' }}";
    assert_eq!(ChatTemplate::detect(gemma3), Some(ChatTemplate::Gemma));
    assert_eq!(
        ChatTemplate::detect("{{'<|im_start|>' + message['role'] + '\\n'}}"),
        Some(ChatTemplate::ChatMl)
    );
    assert_eq!(
        ChatTemplate::detect("<|start_header_id|>{{ role }}<|end_header_id|>"),
        Some(ChatTemplate::Llama3)
    );
    assert_eq!(ChatTemplate::detect("[INST] {{ content }} [/INST]"), None);
}

/// A tiny SentencePiece vocabulary as GGUF metadata.
fn tiny_metadata() -> HashMap<String, Value> {
    let tokens = [
        "<unk>",
        "<s>",
        "</s>",
        "a",
        "b",
        "ab",
        "\u{2581}",
        "<start_of_turn>",
    ];
    let strs = |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    md.insert("tokenizer.ggml.tokens".into(), strs(&tokens));
    md.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(vec![Value::F32(0.0); tokens.len()]),
    );
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(
            [2, 3, 3, 1, 1, 1, 1, 3]
                .into_iter()
                .map(Value::I32)
                .collect(),
        ),
    );
    md
}

fn content(metadata: HashMap<String, Value>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn load_err(md: HashMap<String, Value>) -> String {
    Tokenizer::from_gguf(&content(md)).unwrap_err().to_string()
}

/// llama.cpp's defaults for a SentencePiece vocabulary that says little: BOS 1 added,
/// EOS 2, a ▁ prefix; the chat template comes from `tokenizer.chat_template`.
#[test]
fn spm_defaults_and_template_from_gguf_metadata() {
    let mut md = tiny_metadata();
    let tok = Tokenizer::from_gguf(&content(md.clone())).unwrap();
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.stop_tokens(), [2]);
    // add_space_prefix defaults to true: "ab b" → ▁ ab ▁ b.
    assert_eq!(tok.encode("ab b").unwrap(), [1, 6, 5, 6, 4]);
    assert_eq!(tok.decode(&[1, 6, 5, 6, 4], true).unwrap(), "ab b");
    // <start_of_turn> is in the vocabulary but no template text says Gemma.
    assert_eq!(tok.chat_template(), None);
    md.insert(
        "tokenizer.chat_template".into(),
        Value::String("{{ '<start_of_turn>' + role + '\\n' }}".into()),
    );
    md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
    md.insert("tokenizer.ggml.add_eos_token".into(), Value::Bool(true));
    md.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
    let tok = Tokenizer::from_gguf(&content(md)).unwrap();
    assert_eq!(tok.chat_template(), Some(ChatTemplate::Gemma));
    assert_eq!(tok.bos(), None);
    assert_eq!(tok.encode("ab b").unwrap(), [5, 6, 4, 2]);
    assert_eq!(
        tok.chat_prompt("Hi").unwrap(),
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
}

/// Bad tokenizer metadata is an error naming the key (and, from a file, the file).
#[test]
fn bad_tokenizer_metadata_names_the_key() {
    let mut md = tiny_metadata();
    md.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(vec![Value::F32(0.0); 3]),
    );
    let e = load_err(md);
    assert!(e.contains("`tokenizer.ggml.scores` has 3 entries"), "{e}");

    let mut md = tiny_metadata();
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(vec![Value::I32(1); 9]),
    );
    let e = load_err(md);
    assert!(e.contains("tokenizer.ggml.token_type"), "{e}");

    let mut md = tiny_metadata();
    md.remove("tokenizer.ggml.tokens");
    let e = load_err(md);
    assert!(e.contains("missing `tokenizer.ggml.tokens`"), "{e}");

    let mut md = tiny_metadata();
    md.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    let e = load_err(md);
    assert!(
        e.contains("tokenizer.ggml.model") && e.contains("bert"),
        "{e}"
    );

    let mut md = tiny_metadata();
    md.remove("tokenizer.ggml.model");
    let e = load_err(md);
    assert!(e.contains("missing `tokenizer.ggml.model`"), "{e}");

    let mut md = tiny_metadata();
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(8));
    let e = load_err(md);
    assert!(e.contains("`tokenizer.ggml.bos_token_id` = 8"), "{e}");

    let mut md = tiny_metadata();
    md.insert(
        "tokenizer.ggml.eos_token_id".into(),
        Value::String("2".into()),
    );
    let e = load_err(md);
    assert!(
        e.contains("`tokenizer.ggml.eos_token_id` is a string"),
        "{e}"
    );

    let mut md = tiny_metadata();
    md.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(vec![Value::String("x".into()); 8]),
    );
    let e = load_err(md);
    assert!(e.contains("`tokenizer.ggml.scores[0]` is a string"), "{e}");

    let mut md = tiny_metadata();
    md.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(
            ["a", "b", "a", "c", "d", "e", "f", "g"]
                .iter()
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
    );
    let e = load_err(md);
    assert!(e.contains("`a` twice"), "{e}");

    let mut md = tiny_metadata();
    md.insert("tokenizer.ggml.add_bos_token".into(), Value::U8(1));
    let e = load_err(md);
    assert!(e.contains("`tokenizer.ggml.add_bos_token` is a u8"), "{e}");

    // From a file, the error also names the file.
    let dir = std::env::temp_dir().join(format!("sae-ablate-spm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad-vocab.gguf");
    let mut md = tiny_metadata();
    md.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(vec![Value::F32(0.0); 2]),
    );
    let pairs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(&path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &pairs, &[]).unwrap();
    drop(f);
    let e = Tokenizer::from_gguf_file(&path).unwrap_err().to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        e.contains("bad-vocab.gguf") && e.contains("tokenizer.ggml.scores"),
        "{e}"
    );
}

/// `tokenizer_config.json`'s `chat_template` decides the format over the vocabulary's
/// markers (the SmolLM2 vocabulary has ChatML's, the template text says Gemma).
#[test]
fn template_from_tokenizer_config_json() {
    let smol = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        smol.is_file(),
        "test asset {} is missing: run scripts/fetch-assets.sh first",
        smol.display()
    );
    let bpe = Tokenizer::from_gguf_file(&smol).unwrap();
    assert_eq!(bpe.chat_template(), Some(ChatTemplate::ChatMl));
    let dir = std::env::temp_dir().join(format!("sae-ablate-tokcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        bpe.inner().unwrap().to_string(false).unwrap(),
    )
    .unwrap();
    let hf = Tokenizer::from_hf(&dir).unwrap();
    assert_eq!(hf.chat_template(), Some(ChatTemplate::ChatMl));
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": "{{ bos_token }}{{ '<start_of_turn>' + role + '\n' }}"}"#,
    )
    .unwrap();
    let hf = Tokenizer::from_hf(&dir).unwrap();
    assert_eq!(hf.chat_template(), Some(ChatTemplate::Gemma));
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "<|start_header_id|>"}]}"#,
    )
    .unwrap();
    let hf = Tokenizer::from_hf(&dir).unwrap();
    assert_eq!(hf.chat_template(), Some(ChatTemplate::Llama3));
    std::fs::write(dir.join("tokenizer_config.json"), "{ not json").unwrap();
    let e = Tokenizer::from_hf(&dir).unwrap_err().to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(e.contains("tokenizer_config.json"), "{e}");
}

use std::path::PathBuf;
