//! Llama 1/2/3.x (SmolLM2 included) and Mistral: pre-norm blocks, SwiGLU, RoPE with
//! optional Llama 3 scaling; Mistral adds a sliding window on every layer.
//!
//! GGUF: llama.cpp stores Mistral as `llama` and permutes Llama's Q/K weights for the
//! interleaved RoPE convention; HF checkpoints use rotate-half.

use super::{kinds, HfConfig, HfDefaults, Meta};
use crate::model::config::{Family, LayerKind, ModelConfig, RopeStyle};
use crate::Result;

/// `LlamaConfig`'s defaults.
const LLAMA: HfDefaults = HfDefaults {
    vocab: 32000,
    hidden: 4096,
    intermediate: 11008,
    layers: 32,
    heads: 32,
    kv_heads: None,
    head_dim: None,
    max_pos: 2048,
    rope_theta: 10_000.0,
    rms_eps: 1e-6,
    tied: false,
};

/// `MistralConfig`'s defaults.
const MISTRAL: HfDefaults = HfDefaults {
    vocab: 32000,
    hidden: 4096,
    intermediate: 14336,
    layers: 32,
    heads: 32,
    kv_heads: Some(8),
    head_dim: None,
    max_pos: 4096 * 32,
    rope_theta: 10_000.0,
    rms_eps: 1e-6,
    tied: false,
};

/// A Llama `config.json`.
pub(super) fn hf(v: &HfConfig) -> Result<ModelConfig> {
    let mut c = v.base(Family::Llama, &LLAMA)?;
    c.activation = v.activation("silu")?;
    c.qkv_bias = v.attention_bias.unwrap_or(false);
    Ok(c)
}

/// A Mistral `config.json`: every layer slides when `sliding_window` is set (default
/// 4096; `null` turns it off).
pub(super) fn hf_mistral(v: &HfConfig) -> Result<ModelConfig> {
    let mut c = v.base(Family::Mistral, &MISTRAL)?;
    c.activation = v.activation("silu")?;
    c.sliding_window = v.sliding_window.unwrap_or(Some(4096));
    let kind = if c.sliding_window.is_some() {
        LayerKind::Sliding
    } else {
        LayerKind::Global
    };
    c.layer_kinds = match v.layer_types(c.n_layers)? {
        Some(k) => k,
        None => kinds(c.n_layers, |_| kind),
    };
    Ok(c)
}

/// A `llama` GGUF (Llama, Mistral, SmolLM2): interleaved RoPE.
pub(super) fn gguf(m: &Meta) -> Result<ModelConfig> {
    let mut c = m.base(Family::Llama)?;
    c.rope_style = RopeStyle::Interleaved;
    if let Some(w) = m.usize_opt("attention.sliding_window")? {
        c.sliding_window = Some(w);
        c.layer_kinds = kinds(c.n_layers, |_| LayerKind::Sliding);
    }
    Ok(c)
}
