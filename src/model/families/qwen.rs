//! Qwen 2 / 2.5 (biases on q, k, v) and Qwen 3 dense (per-head q/k RMSNorm, no biases).
//! Sliding windows only where `use_sliding_window` is set, on the layers from
//! `max_window_layers` on (or as `layer_types` says). GGUF: rotate-half RoPE.

use super::{kinds, HfConfig, HfDefaults, Meta};
use crate::model::config::{Family, LayerKind, ModelConfig};
use crate::Result;

/// `Qwen2Config`'s defaults.
const QWEN2: HfDefaults = HfDefaults {
    vocab: 151_936,
    hidden: 4096,
    intermediate: 22016,
    layers: 32,
    heads: 32,
    kv_heads: Some(32),
    head_dim: None,
    max_pos: 32768,
    rope_theta: 10_000.0,
    rms_eps: 1e-6,
    tied: false,
};

/// `Qwen3Config`'s defaults (`head_dim` 128 whatever the width).
const QWEN3: HfDefaults = HfDefaults {
    head_dim: Some(128),
    ..QWEN2
};

fn windows(v: &HfConfig, c: &mut ModelConfig) -> Result<()> {
    if let Some(k) = v.layer_types(c.n_layers)? {
        c.layer_kinds = k;
    } else if v.use_sliding_window.unwrap_or(false) {
        let from = v.max_window_layers.unwrap_or(28);
        c.layer_kinds = kinds(c.n_layers, |i| {
            if i >= from {
                LayerKind::Sliding
            } else {
                LayerKind::Global
            }
        });
    }
    if c.layer_kinds.contains(&LayerKind::Sliding) {
        c.sliding_window = Some(v.sliding_window.flatten().unwrap_or(4096));
    }
    Ok(())
}

/// A Qwen 2 `config.json`.
pub(super) fn hf2(v: &HfConfig) -> Result<ModelConfig> {
    let mut c = v.base(Family::Qwen2, &QWEN2)?;
    c.activation = v.activation("silu")?;
    c.qkv_bias = true;
    windows(v, &mut c)?;
    Ok(c)
}

/// A Qwen 3 `config.json`.
pub(super) fn hf3(v: &HfConfig) -> Result<ModelConfig> {
    let mut c = v.base(Family::Qwen3, &QWEN3)?;
    c.activation = v.activation("silu")?;
    c.qkv_bias = v.attention_bias.unwrap_or(false);
    c.qk_norm = true;
    windows(v, &mut c)?;
    Ok(c)
}

/// A `qwen2` GGUF.
pub(super) fn gguf2(m: &Meta) -> Result<ModelConfig> {
    let mut c = m.base(Family::Qwen2)?;
    c.qkv_bias = true;
    Ok(c)
}

/// A `qwen3` GGUF.
pub(super) fn gguf3(m: &Meta) -> Result<ModelConfig> {
    let mut c = m.base(Family::Qwen3)?;
    c.qk_norm = true;
    Ok(c)
}
