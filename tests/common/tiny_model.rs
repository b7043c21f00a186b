//! Tiny random-weight decoders of every supported family, as GGUF files (written with
//! candle's own `gguf_file::write`, each matrix in a chosen block type) or as HF
//! checkpoints (`config.json` + safetensors tensors). Use with
//! `#[path = "common/tiny_model.rs"] mod tiny_model;`.
#![allow(dead_code)]

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::json;

/// The sizes and block options of a tiny model, with the GGUF architecture name.
#[derive(Debug, Clone)]
pub struct Spec {
    /// GGUF `general.architecture`: llama, qwen2, qwen3, gemma2 or gemma3.
    pub arch: &'static str,
    pub d: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ff: usize,
    pub vocab: usize,
    pub ctx: usize,
    /// Sliding window of the Gemma files' local layers.
    pub window: usize,
}

impl Spec {
    /// `arch` with residual width `d`: 2 layers, 4 query and 2 key/value heads of
    /// `d / 4`, MLP width `2 d`, 64 tokens, context 64, window 4.
    pub fn new(arch: &'static str, d: usize) -> Spec {
        Spec {
            arch,
            d,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: d / 4,
            ff: 2 * d,
            vocab: 64,
            ctx: 64,
            window: 4,
        }
    }

    /// Biases on q, k and v (Qwen 2).
    pub fn qkv_bias(&self) -> bool {
        self.arch == "qwen2"
    }

    /// Per-head q/k RMSNorm (Qwen 3, Gemma 3).
    pub fn qk_norm(&self) -> bool {
        matches!(self.arch, "qwen3" | "gemma3")
    }

    /// Gemma's post-attention and post-MLP norms, and its tied LM head.
    pub fn gemma(&self) -> bool {
        matches!(self.arch, "gemma2" | "gemma3")
    }

    /// An untied LM head (`output.weight` / `lm_head.weight`).
    pub fn untied(&self) -> bool {
        !self.gemma()
    }
}

/// splitmix64: a deterministic stream of 64-bit values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Roughly standard normal: the sum of four uniforms, rescaled to variance 1.
    fn normal(&mut self) -> f32 {
        let s: f64 = (0..4)
            .map(|_| (self.next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
            .sum();
        (s * 3f64.sqrt()) as f32
    }
}

/// Which tensor of a layer, by llama.cpp name, with its shape `[out, in]` (or `[len]`).
fn layer_tensors(s: &Spec) -> Vec<(&'static str, Vec<usize>)> {
    let (d, hd) = (s.d, s.head_dim);
    let mut v = vec![
        ("attn_norm.weight", vec![d]),
        ("attn_q.weight", vec![s.heads * hd, d]),
        ("attn_k.weight", vec![s.kv_heads * hd, d]),
        ("attn_v.weight", vec![s.kv_heads * hd, d]),
        ("attn_output.weight", vec![d, s.heads * hd]),
        ("ffn_norm.weight", vec![d]),
        ("ffn_gate.weight", vec![s.ff, d]),
        ("ffn_up.weight", vec![s.ff, d]),
        ("ffn_down.weight", vec![d, s.ff]),
    ];
    if s.qkv_bias() {
        v.push(("attn_q.bias", vec![s.heads * hd]));
        v.push(("attn_k.bias", vec![s.kv_heads * hd]));
        v.push(("attn_v.bias", vec![s.kv_heads * hd]));
    }
    if s.qk_norm() {
        v.push(("attn_q_norm.weight", vec![hd]));
        v.push(("attn_k_norm.weight", vec![hd]));
    }
    if s.gemma() {
        v.push(("post_attention_norm.weight", vec![d]));
        v.push(("post_ffw_norm.weight", vec![d]));
    }
    v
}

/// The HF name of a llama.cpp layer tensor.
fn hf_layer_name(s: &Spec, n: &str) -> &'static str {
    match n {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "post_attention_norm.weight" => "post_attention_layernorm.weight",
        "ffn_norm.weight" if s.gemma() => "pre_feedforward_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "post_ffw_norm.weight" => "post_feedforward_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        other => panic!("no HF name for {other}"),
    }
}

/// Random f32 weights by llama.cpp name, in candle's `[out, in]` order: matrices
/// `N(0, 1/in)` (embedding and head `N(0, 9/d)`: logits of a few units), norms
/// `1 + N(0, 0.01)` (GGUF stores Gemma's `1 + w`; Gemma's post-norms 8 times that),
/// biases `N(0, 0.01)`.
pub fn tensors(s: &Spec, seed: u64) -> Vec<(String, Tensor)> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let mut push = |name: String, shape: &[usize], rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if name.contains(".post_") {
            // Gemma's post-norms: block outputs of RMS ~8, larger than the scaled
            // embedding, so that the blocks and not the input token decide the logits.
            (0..n).map(|_| 8.0 * (1.0 + 0.1 * rng.normal())).collect()
        } else if name.ends_with("norm.weight") {
            (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect()
        } else if name.ends_with(".bias") {
            (0..n).map(|_| 0.1 * rng.normal()).collect()
        } else {
            let scale = if name == "token_embd.weight" || name == "output.weight" {
                3.0 / (s.d as f32).sqrt()
            } else {
                1.0 / (shape[1] as f32).sqrt()
            };
            (0..n).map(|_| scale * rng.normal()).collect()
        };
        out.push((name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap()));
    };
    push("token_embd.weight".into(), &[s.vocab, s.d], &mut rng);
    push("output_norm.weight".into(), &[s.d], &mut rng);
    if s.untied() {
        push("output.weight".into(), &[s.vocab, s.d], &mut rng);
    }
    for i in 0..s.layers {
        for (n, shape) in layer_tensors(s) {
            push(format!("blk.{i}.{n}"), &shape, &mut rng);
        }
    }
    out
}

/// The GGUF metadata of `s` (every key the loader reads, under `{arch}.`).
pub fn metadata(s: &Spec) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let a = s.arch;
    let mut md = vec![
        ("general.architecture".to_string(), V::String(a.into())),
        (format!("{a}.embedding_length"), V::U32(s.d as u32)),
        (format!("{a}.block_count"), V::U32(s.layers as u32)),
        (format!("{a}.attention.head_count"), V::U32(s.heads as u32)),
        (
            format!("{a}.attention.head_count_kv"),
            V::U32(s.kv_heads as u32),
        ),
        (
            format!("{a}.attention.key_length"),
            V::U32(s.head_dim as u32),
        ),
        (
            format!("{a}.attention.value_length"),
            V::U32(s.head_dim as u32),
        ),
        (format!("{a}.feed_forward_length"), V::U32(s.ff as u32)),
        (format!("{a}.context_length"), V::U32(s.ctx as u32)),
        (format!("{a}.vocab_size"), V::U32(s.vocab as u32)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            V::F32(1e-6),
        ),
        (format!("{a}.rope.freq_base"), V::F32(10_000.0)),
    ];
    if s.gemma() {
        md.push((
            format!("{a}.attention.sliding_window"),
            V::U32(s.window as u32),
        ));
    }
    if s.arch == "gemma2" {
        md.push((format!("{a}.attn_logit_softcapping"), V::F32(50.0)));
        md.push((format!("{a}.final_logit_softcapping"), V::F32(30.0)));
    }
    if s.arch == "gemma3" {
        md.push((format!("{a}.rope.freq_base_swa"), V::F32(10_000.0)));
    }
    md
}

/// Every tensor as stored in a GGUF file: matrices as `QTensor::quantize(t, matrices)`
/// (`overrides` names tensors stored in another type), vectors (norms, biases) F32 as
/// llama.cpp keeps them.
pub fn quantize(
    tensors: &[(String, Tensor)],
    matrices: GgmlDType,
    overrides: &[(&str, GgmlDType)],
) -> Vec<(String, QTensor)> {
    tensors
        .iter()
        .map(|(n, t)| {
            let dt = match overrides.iter().find(|(o, _)| o == n) {
                Some((_, dt)) => *dt,
                None if t.rank() == 2 => matrices,
                None => GgmlDType::F32,
            };
            let q = QTensor::quantize(t, dt)
                .unwrap_or_else(|e| panic!("candle cannot quantize {n} to {dt:?}: {e}"));
            (n.clone(), q)
        })
        .collect()
}

/// The bytes of a GGUF file with `md` and `tensors`, written by candle.
pub fn gguf_bytes(md: &[(String, gguf_file::Value)], tensors: &[(String, QTensor)]) -> Vec<u8> {
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts).unwrap();
    out.into_inner()
}

/// `config.json` of `s` for the HF family `model_type` (llama, mistral, qwen2, qwen3,
/// gemma2, gemma3_text, or gemma3 nesting a text_config); `tf5` writes
/// `rope_parameters` (transformers 5.x) instead of `rope_theta` + `rope_scaling`.
pub fn hf_config(s: &Spec, model_type: &str, tf5: bool) -> serde_json::Value {
    let mut c = json!({
        "model_type": if model_type == "gemma3" { "gemma3_text" } else { model_type },
        "hidden_size": s.d,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "intermediate_size": s.ff,
        "vocab_size": s.vocab,
        "max_position_embeddings": s.ctx,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": !s.untied(),
    });
    let o = c.as_object_mut().unwrap();
    if tf5 {
        o.insert(
            "rope_parameters".into(),
            if model_type.starts_with("gemma3") {
                json!({"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
            } else {
                json!({"rope_type": "default", "rope_theta": 5e5})
            },
        );
    } else {
        o.insert("rope_theta".into(), json!(5e5));
        o.insert(
            "rope_scaling".into(),
            if model_type == "llama" {
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
            } else {
                serde_json::Value::Null
            },
        );
    }
    match model_type {
        "mistral" => {
            o.insert("sliding_window".into(), json!(s.window));
        }
        "qwen2" | "qwen3" => {
            o.insert("use_sliding_window".into(), json!(true));
            o.insert("max_window_layers".into(), json!(1));
            o.insert("sliding_window".into(), json!(s.window));
        }
        "gemma2" => {
            o.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            o.insert("query_pre_attn_scalar".into(), json!(24));
            o.insert("attn_logit_softcapping".into(), json!(5.0));
            o.insert("final_logit_softcapping".into(), json!(3.0));
            o.insert("sliding_window".into(), json!(s.window));
        }
        "gemma3_text" | "gemma3" => {
            o.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            o.insert("query_pre_attn_scalar".into(), json!(24));
            o.insert("sliding_window".into(), json!(s.window));
            o.insert("sliding_window_pattern".into(), json!(2));
            o.insert("rope_local_base_freq".into(), json!(1e4));
        }
        _ => {}
    }
    if model_type == "gemma3" {
        json!({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
               "text_config": c, "tie_word_embeddings": true})
    } else {
        c
    }
}

/// The HF tensors of `s` (names under `prefix`: `model.` or a multimodal
/// checkpoint's `language_model.model.`), from [`tensors`]; Gemma's norm weights
/// stored as `w` for a `(1 + w)` scale.
pub fn hf_tensors(s: &Spec, seed: u64, prefix: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let head = if prefix == "model." {
        "lm_head.weight".to_string()
    } else {
        format!("{}lm_head.weight", prefix.trim_end_matches("model."))
    };
    tensors(s, seed)
        .into_iter()
        .map(|(n, t)| {
            let name = match n.as_str() {
                "token_embd.weight" => format!("{prefix}embed_tokens.weight"),
                "output_norm.weight" => format!("{prefix}norm.weight"),
                "output.weight" => head.clone(),
                _ => {
                    let rest = n.strip_prefix("blk.").unwrap();
                    let (i, ln) = rest.split_once('.').unwrap();
                    format!("{prefix}layers.{i}.{}", hf_layer_name(s, ln))
                }
            };
            let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if s.gemma() && n.ends_with("norm.weight") {
                v.iter_mut().for_each(|x| *x -= 1.0);
            }
            (name, t.dims().to_vec(), v)
        })
        .collect()
}
