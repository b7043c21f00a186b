//! Gemma 2 and Gemma 3 (text): `(1 + w)` RMSNorms before and after attention and MLP,
//! embeddings scaled by √d_model, tanh-GELU gated MLP, attention scaled by
//! `query_pre_attn_scalar^-1/2`, tied LM head, sliding-window layers.
//! * Gemma 2: even layers slide (window 4096), attention logits capped at 50 and final
//!   logits at 30 (`c · tanh(x / c)`).
//! * Gemma 3: per-head q/k RMSNorm; five sliding layers to one global
//!   (`sliding_window_pattern` 6: layer `i` is global when `(i + 1) % 6 == 0`); sliding
//!   layers use RoPE base `rope_local_base_freq` (10k) unscaled, global ones `rope_theta`
//!   (1M) with the config's scaling.
//!
//! GGUF (llama.cpp): norm weights are stored with the 1 already added, RoPE is
//! rotate-half, and what the metadata leaves out is fixed per architecture as llama.cpp
//! fixes it: the layer pattern, Gemma 3's local base 10k, and the attention scale
//! (`head_dim^-1/2`, or `(d_model / n_heads)^-1/2` for the 27B models).

use super::{kinds, HfConfig, HfDefaults, Meta};
use crate::model::config::{Activation, Family, LayerKind, ModelConfig};
use crate::Result;

/// `Gemma2Config`'s defaults.
const GEMMA2: HfDefaults = HfDefaults {
    vocab: 256_000,
    hidden: 2304,
    intermediate: 9216,
    layers: 26,
    heads: 8,
    kv_heads: Some(4),
    head_dim: Some(256),
    max_pos: 8192,
    rope_theta: 10_000.0,
    rms_eps: 1e-6,
    tied: true,
};

/// `Gemma3TextConfig`'s defaults.
const GEMMA3: HfDefaults = HfDefaults {
    vocab: 262_208,
    max_pos: 131_072,
    rope_theta: 1_000_000.0,
    ..GEMMA2
};

/// The options every Gemma shares.
fn gemma_block(c: &mut ModelConfig) {
    c.activation = Activation::GeluTanh;
    c.post_norms = true;
    c.embed_scale = true;
}

/// `query_pre_attn_scalar^-1/2` (default: `head_dim`).
fn attn_scale(v: &HfConfig, head_dim: usize) -> f32 {
    let s = v.query_pre_attn_scalar.unwrap_or(head_dim as f64);
    (1.0 / s.sqrt()) as f32
}

/// A Gemma 2 `config.json`.
pub(super) fn hf2(v: &HfConfig) -> Result<ModelConfig> {
    let mut c = v.base(Family::Gemma2, &GEMMA2)?;
    gemma_block(&mut c);
    c.activation = v.activation("gelu_pytorch_tanh")?;
    c.norm_plus_one = true;
    c.attn_scale = attn_scale(v, c.head_dim);
    // Absent: the class default; `null`: off.
    c.attn_softcap = v.attn_logit_softcapping.unwrap_or(Some(50.0)).map(|x| x as f32);
    c.final_softcap = v.final_logit_softcapping.unwrap_or(Some(30.0)).map(|x| x as f32);
    c.sliding_window = Some(v.sliding_window.flatten().unwrap_or(4096));
    c.layer_kinds = match v.layer_types(c.n_layers)? {
        Some(k) => k,
        None => kinds(c.n_layers, alternate),
    };
    Ok(c)
}

/// Gemma 2's pattern: even layers slide.
fn alternate(i: usize) -> LayerKind {
    if i.is_multiple_of(2) {
        LayerKind::Sliding
    } else {
        LayerKind::Global
    }
}

/// A Gemma 3 text `config.json` (`gemma3_text`, or the `text_config` of a `gemma3` one).
pub(super) fn hf3(v: &HfConfig) -> Result<ModelConfig> {
    let mut c = v.base(Family::Gemma3, &GEMMA3)?;
    gemma_block(&mut c);
    c.activation = v.activation("gelu_pytorch_tanh")?;
    c.norm_plus_one = true;
    c.qk_norm = true;
    c.attn_scale = attn_scale(v, c.head_dim);
    c.attn_softcap = v.attn_logit_softcapping.flatten().map(|x| x as f32);
    c.final_softcap = v.final_logit_softcapping.flatten().map(|x| x as f32);
    c.sliding_window = Some(v.sliding_window.flatten().unwrap_or(4096));
    c.layer_kinds = match v.layer_types(c.n_layers)? {
        Some(k) => k,
        None => {
            let p = v.sliding_window_pattern.unwrap_or(6).max(1);
            kinds(c.n_layers, |i| six(i, p))
        }
    };
    // Global layers: `rope_parameters.full_attention` (5.x) or rope_theta/rope_scaling.
    let (global, scaling) = v.rope(Some("full_attention"))?;
    c.rope_theta = global.unwrap_or(GEMMA3.rope_theta) as f32;
    c.rope_scaling = scaling;
    let local = if v.rope_parameters.is_some() {
        v.rope(Some("sliding_attention"))?.0
    } else {
        None
    };
    c.local_rope_theta = Some(local.or(v.rope_local_base_freq).unwrap_or(10_000.0) as f32);
    Ok(c)
}

/// Gemma 3's pattern: layer `i` is global when `(i + 1) % p == 0`.
fn six(i: usize, p: usize) -> LayerKind {
    if (i + 1).is_multiple_of(p) {
        LayerKind::Global
    } else {
        LayerKind::Sliding
    }
}

/// llama.cpp's attention scale: `head_dim^-1/2`, except the 27B models (46 layers for
/// Gemma 2, 62 for Gemma 3), whose `query_pre_attn_scalar` is `d_model / n_heads`.
fn gguf_scale(c: &mut ModelConfig, big_layers: usize) {
    let s = if c.n_layers == big_layers {
        c.d_model / c.n_heads.max(1)
    } else {
        c.head_dim
    };
    c.attn_scale = 1.0 / (s.max(1) as f32).sqrt();
}

/// A `gemma2` GGUF.
pub(super) fn gguf2(m: &Meta) -> Result<ModelConfig> {
    let mut c = m.base(Family::Gemma2)?;
    gemma_block(&mut c);
    gguf_scale(&mut c, 46);
    c.attn_softcap = m.f32_opt("attn_logit_softcapping")?.or(Some(50.0));
    c.final_softcap = m.f32_opt("final_logit_softcapping")?.or(Some(30.0));
    c.sliding_window = Some(m.usize_opt("attention.sliding_window")?.unwrap_or(4096));
    c.layer_kinds = kinds(c.n_layers, alternate);
    Ok(c)
}

/// A `gemma3` GGUF.
pub(super) fn gguf3(m: &Meta) -> Result<ModelConfig> {
    let mut c = m.base(Family::Gemma3)?;
    gemma_block(&mut c);
    c.qk_norm = true;
    gguf_scale(&mut c, 62);
    c.sliding_window = Some(m.usize_opt("attention.sliding_window")?.unwrap_or(4096));
    c.layer_kinds = kinds(c.n_layers, |i| six(i, 6));
    c.local_rope_theta = Some(m.f32_opt("rope.freq_base_swa")?.unwrap_or(10_000.0));
    Ok(c)
}
