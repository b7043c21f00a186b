//! Hostile model configs, for every family: a tiny valid model (GGUF metadata or HF
//! `config.json` with matching weights) with one size or option replaced by a crafted
//! value (head counts and head widths whose products overflow `usize`, zero heads, query
//! heads not a multiple of key/value heads, 2^40 layers, vocabulary or context, NaN or
//! negative floats). Each must be an error naming the key at fault, returned within a
//! second, with no single allocation over 64 MiB + 64 × the file size (this binary's
//! global allocator is the fuzzers' allocation bound, `fuzz/src/bound.rs`, which aborts
//! the process on a larger one).

#[path = "../fuzz/src/bound.rs"]
mod bound;
#[path = "common/st_writer.rs"]
mod st_writer;
#[path = "common/tiny_model.rs"]
mod tiny_model;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::quantized::{gguf_file::Value as V, GgmlDType};
use sae_ablate::model::{LoadOptions, Model};
use serde_json::{json, Value};
use tiny_model::{gguf_bytes, hf_config, hf_tensors, metadata, quantize, tensors, Spec};

/// One bounded load at a time: the allocation bound is process-wide.
static BOUNDED: Mutex<()> = Mutex::new(());

const SECOND: Duration = Duration::from_secs(1);

/// A fresh temporary directory, removed on drop.
fn dir(tag: &str) -> st_writer::TempDir {
    st_writer::TempDir::new(&format!("hostile-configs-{tag}"))
}

/// Load under the allocation bound for `bytes` of input; the error (or `None` when it
/// loads) and how long it took.
fn bounded(bytes: usize, load: impl FnOnce() -> sae_ablate::Result<Model>) -> Option<String> {
    let _one = BOUNDED.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let r = {
        let _b = bound::AllocBound::new(bytes);
        load()
    };
    let took = t.elapsed();
    assert!(took < SECOND, "took {took:?}");
    r.err().map(|e| e.to_string())
}

/// A GGUF architecture's tiny model with metadata `key` (without the `{arch}.` prefix)
/// set to `value` (`None`: removed); the error.
fn gguf_err(arch: &'static str, edits: &[(&str, Option<V>)]) -> Option<String> {
    let spec = Spec::new(arch, 8);
    let mut md = metadata(&spec);
    for (key, value) in edits {
        let full = format!("{arch}.{key}");
        md.retain(|(k, _)| *k != full);
        if let Some(v) = value {
            md.push((full, v.clone()));
        }
    }
    let ts = quantize(&tensors(&spec, 1), GgmlDType::F32, &[]);
    let bytes = gguf_bytes(&md, &ts);
    let d = dir(&format!("gguf-{arch}"));
    let p = d.path().join("model.gguf");
    std::fs::write(&p, &bytes).unwrap();
    bounded(bytes.len(), || {
        Model::from_gguf(&p, &LoadOptions::default())
    })
}

const GGUF_ARCHS: [&str; 5] = ["llama", "qwen2", "qwen3", "gemma2", "gemma3"];

/// Metadata edits (key without the `{arch}.` prefix, new value or `None` to remove) and
/// the key the error must name.
type GgufCase = (Vec<(&'static str, Option<V>)>, &'static str);

/// Crafted sizes every architecture reads under the same keys.
fn gguf_size_cases() -> Vec<GgufCase> {
    let big = 1u64 << 40;
    vec![
        // Products past usize: 2^33 heads of 2^33.
        (
            vec![
                ("attention.head_count", Some(V::U64(1 << 33))),
                ("attention.key_length", Some(V::U64(1 << 33))),
            ],
            "attention.head_count",
        ),
        (
            vec![("attention.key_length", Some(V::U64(1 << 62)))],
            "attention.key_length",
        ),
        (
            vec![("attention.head_count_kv", Some(V::U64(u64::MAX)))],
            "attention.head_count_kv",
        ),
        (
            vec![("attention.head_count", Some(V::U32(0)))],
            "attention.head_count",
        ),
        // Zero heads and no key_length: the head width would divide by it.
        (
            vec![
                ("attention.head_count", Some(V::U32(0))),
                ("attention.key_length", None),
            ],
            "attention.head_count",
        ),
        (
            vec![("attention.head_count_kv", Some(V::U32(0)))],
            "attention.head_count_kv",
        ),
        // 4 query heads over 3 key/value heads.
        (
            vec![("attention.head_count_kv", Some(V::U32(3)))],
            "attention.head_count_kv",
        ),
        (
            vec![("attention.head_count", Some(V::I32(-4)))],
            "attention.head_count",
        ),
        (vec![("block_count", Some(V::U64(big)))], "block_count"),
        (vec![("vocab_size", Some(V::U64(big)))], "vocab_size"),
        (
            vec![("context_length", Some(V::U64(big)))],
            "context_length",
        ),
        (
            vec![("embedding_length", Some(V::U64(big)))],
            "embedding_length",
        ),
        (
            vec![("feed_forward_length", Some(V::U64(big)))],
            "feed_forward_length",
        ),
        (vec![("block_count", None)], "block_count"),
        (
            vec![("rope.freq_base", Some(V::F32(f32::NAN)))],
            "rope.freq_base",
        ),
        (
            vec![("attention.layer_norm_rms_epsilon", Some(V::F32(-1.0)))],
            "attention.layer_norm_rms_epsilon",
        ),
        (
            vec![("rope.scaling.type", Some(V::String("yarn".into())))],
            "rope.scaling.type",
        ),
        (
            vec![
                ("rope.scaling.type", Some(V::String("linear".into()))),
                ("rope.scaling.factor", Some(V::F32(0.0))),
            ],
            "rope.scaling.factor",
        ),
    ]
}

#[test]
fn gguf_hostile_sizes_name_the_key() {
    for arch in GGUF_ARCHS {
        assert_eq!(
            gguf_err(arch, &[]),
            None,
            "{arch}: the unedited model loads"
        );
        for (edits, key) in gguf_size_cases() {
            let e = gguf_err(arch, &edits).unwrap_or_else(|| panic!("{arch} {edits:?}: loaded"));
            let key = format!("`{arch}.{key}`");
            assert!(
                e.contains(&key) && e.contains("model.gguf"),
                "{arch} {edits:?}: {e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}

/// The keys only some architectures read.
#[test]
fn gguf_hostile_family_options_name_the_key() {
    let cases: Vec<(&str, &str, V)> = vec![
        ("llama", "attention.sliding_window", V::U32(0)),
        ("gemma2", "attention.sliding_window", V::U32(0)),
        ("gemma3", "attention.sliding_window", V::U32(0)),
        ("gemma2", "attn_logit_softcapping", V::F32(f32::NAN)),
        ("gemma2", "final_logit_softcapping", V::F32(-30.0)),
        ("gemma2", "final_logit_softcapping", V::U32(30)),
        ("gemma3", "rope.freq_base_swa", V::F32(f32::INFINITY)),
        ("gemma3", "attention.sliding_window", V::I64(-1)),
    ];
    for (arch, key, value) in cases {
        let e = gguf_err(arch, &[(key, Some(value.clone()))])
            .unwrap_or_else(|| panic!("{arch} {key} = {value:?}: loaded"));
        assert!(e.contains(&format!("`{arch}.{key}`")), "{arch} {key}: {e}");
    }
}

/// An HF checkpoint of `model_type` (tiny weights matching the unedited config) whose
/// `config.json` has `edits` applied (to `text_config` for a nested `gemma3`); the
/// error.
fn hf_err(model_type: &str, tf5: bool, edits: &[(&str, Value)]) -> Option<String> {
    let arch = match model_type {
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "gemma2" => "gemma2",
        "gemma3" | "gemma3_text" => "gemma3",
        _ => "llama",
    };
    let spec = Spec::new(arch, 8);
    let mut cfg = hf_config(&spec, model_type, tf5);
    {
        let o = if model_type == "gemma3" {
            cfg["text_config"].as_object_mut().unwrap()
        } else {
            cfg.as_object_mut().unwrap()
        };
        for (k, v) in edits {
            if v.is_null() {
                o.remove(*k);
            } else {
                o.insert(k.to_string(), v.clone());
            }
        }
    }
    let prefix = if model_type == "gemma3" {
        "language_model.model."
    } else {
        "model."
    };
    let ts = hf_tensors(&spec, 1, prefix);
    let refs: Vec<st_writer::T> = ts
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
        .collect();
    let d = dir(&format!("hf-{model_type}"));
    st_writer::write_st(&d.path().join("model.safetensors"), &refs);
    // A string `"__raw__N"` stands for the JSON number N (past what serde_json holds).
    let mut text = serde_json::to_string(&cfg).unwrap();
    while let Some(i) = text.find("\"__raw__") {
        let end = i + 1 + text[i + 1..].find('"').unwrap();
        let raw = text[i + 8..end].to_string();
        text.replace_range(i..=end, &raw);
    }
    std::fs::write(d.path().join("config.json"), &text).unwrap();
    let size = text.len()
        + std::fs::metadata(d.path().join("model.safetensors"))
            .unwrap()
            .len() as usize;
    bounded(size, || {
        Model::from_hf_dir(d.path(), &LoadOptions::default())
    })
}

const HF_TYPES: [(&str, bool); 9] = [
    ("llama", false),
    ("llama", true),
    ("mistral", false),
    ("qwen2", false),
    ("qwen3", true),
    ("gemma2", false),
    ("gemma3_text", false),
    ("gemma3_text", true),
    ("gemma3", false),
];

#[test]
fn hf_hostile_sizes_name_the_key() {
    let big = json!(1u64 << 40);
    let cases: Vec<(Vec<(&str, Value)>, &str)> = vec![
        (
            vec![
                ("num_attention_heads", json!(1u64 << 33)),
                ("head_dim", json!(1u64 << 33)),
            ],
            "num_attention_heads",
        ),
        (vec![("head_dim", json!(1u64 << 62))], "head_dim"),
        (
            vec![("num_attention_heads", json!(0))],
            "num_attention_heads",
        ),
        (
            vec![("num_attention_heads", json!(0)), ("head_dim", Value::Null)],
            "num_attention_heads",
        ),
        (
            vec![("num_key_value_heads", json!(0))],
            "num_key_value_heads",
        ),
        (
            vec![("num_key_value_heads", json!(3))],
            "num_key_value_heads",
        ),
        (
            vec![("num_hidden_layers", big.clone())],
            "num_hidden_layers",
        ),
        // With a (valid) list of layer types for 2 layers.
        (
            vec![
                (
                    "layer_types",
                    json!(["sliding_attention", "full_attention"]),
                ),
                ("num_hidden_layers", big.clone()),
            ],
            "num_hidden_layers",
        ),
        (vec![("vocab_size", big.clone())], "vocab_size"),
        (
            vec![("max_position_embeddings", big.clone())],
            "max_position_embeddings",
        ),
        (vec![("hidden_size", big.clone())], "hidden_size"),
        (
            vec![("intermediate_size", big.clone())],
            "intermediate_size",
        ),
        // Past u64 / negative: not a size at all.
        (
            vec![("num_hidden_layers", json!(1e30))],
            "num_hidden_layers",
        ),
        (
            vec![("num_attention_heads", json!(-4))],
            "num_attention_heads",
        ),
        (
            vec![("vocab_size", json!("__raw__18446744073709551616"))],
            "vocab_size",
        ),
        (vec![("rms_norm_eps", json!(-1.0))], "rms_norm_eps"),
        (vec![("sliding_window", json!(0))], "sliding_window"),
    ];
    for (model_type, tf5) in HF_TYPES {
        assert_eq!(
            hf_err(model_type, tf5, &[]),
            None,
            "{model_type}: the unedited model loads"
        );
        for (edits, key) in &cases {
            if *key == "sliding_window" && matches!(model_type, "llama") {
                continue; // Llama has no window.
            }
            let e = hf_err(model_type, tf5, edits)
                .unwrap_or_else(|| panic!("{model_type} {edits:?}: loaded"));
            assert!(
                e.contains(&format!("{key}`")) && e.contains("config.json"),
                "{model_type} (tf5 {tf5}) {edits:?}: {e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}

/// RoPE, scale and soft-cap values.
#[test]
fn hf_hostile_options_name_the_key() {
    let cases: Vec<(&str, bool, (&str, Value), &str)> = vec![
        ("llama", false, ("rope_theta", json!(0.0)), "rope_theta"),
        (
            "llama",
            true,
            (
                "rope_parameters",
                json!({"rope_type": "default", "rope_theta": -1.0}),
            ),
            "rope_theta",
        ),
        (
            "llama",
            false,
            (
                "rope_scaling",
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 1e30}),
            ),
            "original_max_position_embeddings",
        ),
        (
            "llama",
            false,
            (
                "rope_scaling",
                json!({"rope_type": "linear", "factor": 0.0}),
            ),
            "rope_scaling",
        ),
        (
            "llama",
            false,
            ("rope_scaling", json!({"rope_type": "linear"})),
            "factor",
        ),
        (
            "llama",
            false,
            ("rope_scaling", json!([1, 2])),
            "rope_scaling",
        ),
        (
            "gemma2",
            false,
            ("query_pre_attn_scalar", json!(0)),
            "query_pre_attn_scalar",
        ),
        (
            "gemma3_text",
            false,
            ("query_pre_attn_scalar", json!(-24)),
            "query_pre_attn_scalar",
        ),
        (
            "gemma2",
            false,
            ("attn_logit_softcapping", json!(0.0)),
            "attn_logit_softcapping",
        ),
        (
            "gemma2",
            false,
            ("final_logit_softcapping", json!(-3.0)),
            "final_logit_softcapping",
        ),
        (
            "gemma3_text",
            false,
            ("rope_local_base_freq", json!(0.0)),
            "rope_local_base_freq",
        ),
        (
            "gemma3_text",
            false,
            ("layer_types", json!(["full_attention"])),
            "layer_types",
        ),
        (
            "gemma3_text",
            false,
            (
                "layer_types",
                json!(["chunked_attention", "full_attention"]),
            ),
            "layer_types",
        ),
        ("qwen2", false, ("hidden_act", json!("relu")), "hidden_act"),
        (
            "gemma2",
            false,
            ("hidden_activation", json!("gelu")),
            "hidden_activation",
        ),
        ("llama", false, ("mlp_bias", json!(true)), "mlp_bias"),
        (
            "gemma3",
            false,
            ("rope_scaling", json!({"rope_type": "yarn", "factor": 8.0})),
            "rope_scaling",
        ),
    ];
    for (model_type, tf5, edit, key) in cases {
        let e = hf_err(model_type, tf5, std::slice::from_ref(&edit))
            .unwrap_or_else(|| panic!("{model_type} {edit:?}: loaded"));
        assert!(
            e.contains(key) && e.contains("config.json"),
            "{model_type} {edit:?}: {e}"
        );
    }
    // A nested gemma3 config without its text_config.
    let d = dir("hf-no-text-config");
    std::fs::write(d.path().join("config.json"), r#"{"model_type": "gemma3"}"#).unwrap();
    let e = bounded(64, || Model::from_hf_dir(d.path(), &LoadOptions::default())).unwrap();
    assert!(e.contains("text_config"), "{e}");
}
