//! The shape of a decoder: sizes, and the options that tell one family's block from
//! another's. A family file fills a [`ModelConfig`] from GGUF metadata or `config.json`;
//! `ModelConfig::validate` checks it, with checked arithmetic and upper bounds, before
//! anything is sized from it.

use crate::{Error, Result};

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i+1])`: GGUF's permuted Llama Q/K weights (llama.cpp `rope_norm`).
    Interleaved,
    /// Pairs `(x[i], x[i + d/2])`: HF transformers' `rotate_half` (llama.cpp `rope_neox`).
    Half,
}

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum RopeScaling {
    /// `rope_type = "default"`: plain frequencies.
    #[default]
    None,
    /// `rope_type = "linear"`: every frequency divided by `factor` (Gemma 3 ≥ 4B's global
    /// layers).
    Linear {
        /// `factor`.
        factor: f32,
    },
    /// `rope_type = "llama3"`: Llama 3.1's three-band scaling.
    Llama3 {
        /// `factor`.
        factor: f32,
        /// `low_freq_factor`.
        low_freq_factor: f32,
        /// `high_freq_factor`.
        high_freq_factor: f32,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: usize,
    },
}

/// Which positions a layer's attention sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayerKind {
    /// Every earlier position (`full_attention`).
    Global,
    /// The last [`ModelConfig::sliding_window`] positions, itself included
    /// (`sliding_attention`), with [`ModelConfig::local_rope_theta`] as its RoPE base
    /// where that is set.
    Sliding,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Activation {
    /// SiLU (`silu`): Llama, Mistral, Qwen.
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`): Gemma.
    GeluTanh,
}

/// The model families the crate loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Family {
    /// Llama 1/2/3.x (SmolLM2 included).
    Llama,
    /// Mistral (sliding-window attention).
    Mistral,
    /// Qwen 2 / 2.5 (q/k/v biases).
    Qwen2,
    /// Qwen 3, dense (per-head q/k RMSNorm).
    Qwen3,
    /// Gemma 2 (post-norms, soft-capping, alternating sliding windows).
    Gemma2,
    /// Gemma 3, text (post-norms, q/k norms, five local layers to one global).
    Gemma3,
}

impl Family {
    /// Every family, in the order of the error messages.
    pub const ALL: [Family; 6] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma2,
        Family::Gemma3,
    ];

    /// The family's name as GGUF `general.architecture` spells it.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.gguf_name())
    }
}

/// Hyper-parameters of a decoder-only transformer and its block options.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ModelConfig {
    /// The family the config was read for.
    pub family: Family,
    /// Residual width (`hidden_size`).
    pub d_model: usize,
    /// Number of decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// MLP hidden width (`intermediate_size`).
    pub d_ff: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    pub max_seq_len: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// RoPE base frequency (of the global layers).
    pub rope_theta: f32,
    /// RoPE scaling of the global layers.
    pub rope_scaling: RopeScaling,
    /// RoPE base of the sliding layers (Gemma 3's `rope_local_base_freq`; unscaled);
    /// `None`: the same tables as the global layers.
    pub local_rope_theta: Option<f32>,
    /// RoPE pairing convention.
    pub rope_style: RopeStyle,
    /// Window of the [`LayerKind::Sliding`] layers, in positions.
    pub sliding_window: Option<usize>,
    /// One entry per layer.
    pub layer_kinds: Vec<LayerKind>,
    /// MLP gate activation.
    pub activation: Activation,
    /// Gemma's post-attention and post-feed-forward RMSNorms.
    pub post_norms: bool,
    /// Biases on the q, k and v projections (Qwen 2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen 3, Gemma 3).
    pub qk_norm: bool,
    /// RMSNorm weights are stored as `w` for a `(1 + w)` scale (Gemma in HF
    /// safetensors; GGUF files store `1 + w`). The loader adds the 1.
    pub norm_plus_one: bool,
    /// Multiply the embeddings by `√d_model` (Gemma).
    pub embed_scale: bool,
    /// Attention scores become `c · tanh(s / c)` (Gemma 2 `attn_logit_softcapping`).
    pub attn_softcap: Option<f32>,
    /// Logits become `c · tanh(l / c)` (Gemma 2 `final_logit_softcapping`).
    pub final_softcap: Option<f32>,
    /// Attention scores are `q·k · attn_scale`: `head_dim^-1/2`, or
    /// `query_pre_attn_scalar^-1/2` (Gemma).
    pub attn_scale: f32,
    /// The LM head is the embedding matrix.
    pub tied_embeddings: bool,
}

/// Upper bounds of `ModelConfig::validate`: far above any released model, low enough
/// that nothing sized from them overflows or allocates absurdly before the weights are
/// checked against them.
pub mod limits {
    /// Layers.
    pub const LAYERS: usize = 1024;
    /// Query or key/value heads.
    pub const HEADS: usize = 1024;
    /// Width of one head.
    pub const HEAD_DIM: usize = 1024;
    /// Residual width.
    pub const D_MODEL: usize = 1 << 17;
    /// MLP width.
    pub const D_FF: usize = 1 << 20;
    /// Vocabulary.
    pub const VOCAB: usize = 1 << 22;
    /// Context length. Nothing is sized from it before the RoPE tables, which the loader
    /// bounds by the embedding's size (a larger context is an error that names
    /// `LoadOptions::max_seq_len`, the cap that makes such a file load).
    pub const CONTEXT: usize = 1 << 31;
}

/// Where a config was read from, to name the key at fault in an error.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeySource<'a> {
    /// `config.json`.
    Hf,
    /// GGUF metadata with the architecture prefix.
    Gguf(&'a str),
}

impl KeySource<'_> {
    /// The key that holds `field`.
    pub(crate) fn key(&self, field: &str) -> String {
        let (hf, gguf) = match field {
            "d_model" => ("hidden_size", "embedding_length"),
            "n_layers" => ("num_hidden_layers", "block_count"),
            "n_heads" => ("num_attention_heads", "attention.head_count"),
            "n_kv_heads" => ("num_key_value_heads", "attention.head_count_kv"),
            "head_dim" => ("head_dim", "attention.key_length"),
            "d_ff" => ("intermediate_size", "feed_forward_length"),
            "vocab_size" => ("vocab_size", "vocab_size"),
            "max_seq_len" => ("max_position_embeddings", "context_length"),
            "rms_eps" => ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
            "rope_theta" => ("rope_theta", "rope.freq_base"),
            "local_rope_theta" => ("rope_local_base_freq", "rope.freq_base_swa"),
            "sliding_window" => ("sliding_window", "attention.sliding_window"),
            "layer_kinds" => ("layer_types", "attention.sliding_window_pattern"),
            "attn_softcap" => ("attn_logit_softcapping", "attn_logit_softcapping"),
            "final_softcap" => ("final_logit_softcapping", "final_logit_softcapping"),
            "attn_scale" => ("query_pre_attn_scalar", "attention.key_length"),
            "rope_scaling" => ("rope_scaling", "rope.scaling.factor"),
            other => (other, other),
        };
        match self {
            KeySource::Hf => format!("config.json `{hf}`"),
            KeySource::Gguf(arch) => format!("metadata `{arch}.{gguf}`"),
        }
    }
}

impl ModelConfig {
    /// A config with Llama's block options and the given sizes; families change the
    /// options they need.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn llama_like(
        family: Family,
        d_model: usize,
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        d_ff: usize,
        vocab_size: usize,
    ) -> ModelConfig {
        ModelConfig {
            family,
            d_model,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff,
            vocab_size,
            max_seq_len: 4096,
            rms_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            local_rope_theta: None,
            rope_style: RopeStyle::Half,
            sliding_window: None,
            layer_kinds: Vec::new(),
            activation: Activation::Silu,
            post_norms: false,
            qkv_bias: false,
            qk_norm: false,
            norm_plus_one: false,
            embed_scale: false,
            attn_softcap: None,
            final_softcap: None,
            attn_scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            tied_embeddings: false,
        }
    }

    /// Check every size and option: positive, within [`limits`], products that fit in
    /// `usize`, heads that divide, finite floats, one layer kind per layer. Errors name
    /// the key the value came from.
    pub(crate) fn validate(&self, src: KeySource<'_>) -> Result<()> {
        let bad =
            |field: &str, why: String| Error::ModelConfig(format!("{}: {why}", src.key(field)));
        let sizes = [
            ("d_model", self.d_model, limits::D_MODEL),
            ("n_layers", self.n_layers, limits::LAYERS),
            ("n_heads", self.n_heads, limits::HEADS),
            ("n_kv_heads", self.n_kv_heads, limits::HEADS),
            ("head_dim", self.head_dim, limits::HEAD_DIM),
            ("d_ff", self.d_ff, limits::D_FF),
            ("vocab_size", self.vocab_size, limits::VOCAB),
            ("max_seq_len", self.max_seq_len, limits::CONTEXT),
        ];
        for (field, v, max) in sizes {
            if v == 0 || v > max {
                return Err(bad(field, format!("{v} is not in 1..={max}")));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(bad(
                "n_kv_heads",
                format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    self.n_heads, self.n_kv_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("{} must be even for RoPE", self.head_dim),
            ));
        }
        // Everything the loader multiplies, checked once here.
        let q = self.n_heads.checked_mul(self.head_dim);
        let qkv = self
            .n_kv_heads
            .checked_mul(2)
            .and_then(|kv| kv.checked_add(self.n_heads))
            .and_then(|h| h.checked_mul(self.head_dim));
        let ff = self.d_ff.checked_mul(2);
        let embed = self.vocab_size.checked_mul(self.d_model);
        for (field, v) in [
            ("n_heads", q),
            ("n_kv_heads", qkv),
            ("d_ff", ff.and_then(|f| f.checked_mul(self.d_model))),
            ("vocab_size", embed),
        ] {
            if v.is_none() {
                return Err(bad(field, "sizes multiply past the address space".into()));
            }
        }
        let floats = [
            ("rms_eps", Some(self.rms_eps as f32)),
            ("rope_theta", Some(self.rope_theta)),
            ("local_rope_theta", self.local_rope_theta),
            ("attn_softcap", self.attn_softcap),
            ("final_softcap", self.final_softcap),
            ("attn_scale", Some(self.attn_scale)),
        ];
        for (field, v) in floats {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(bad(field, format!("{v} must be a positive finite number")));
                }
            }
        }
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(bad(
                        "rope_scaling",
                        format!("factor {factor} must be positive"),
                    ));
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let ok = [factor, low_freq_factor, high_freq_factor]
                    .iter()
                    .all(|v| v.is_finite() && *v > 0.0)
                    && high_freq_factor > low_freq_factor
                    && original_max_position_embeddings > 0;
                if !ok {
                    return Err(bad(
                        "rope_scaling",
                        format!("llama3 scaling {:?} is not valid", self.rope_scaling),
                    ));
                }
            }
        }
        if self.layer_kinds.len() != self.n_layers {
            return Err(bad(
                "layer_kinds",
                format!(
                    "{} layer kinds for {} layers",
                    self.layer_kinds.len(),
                    self.n_layers
                ),
            ));
        }
        let sliding = self.layer_kinds.contains(&LayerKind::Sliding);
        match self.sliding_window {
            Some(0) => return Err(bad("sliding_window", "0 must be positive".into())),
            None if sliding => {
                return Err(bad(
                    "sliding_window",
                    "sliding layers need a window size".into(),
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// RoPE inverse frequencies for a layer of `kind`: the local base unscaled on
    /// sliding layers that have one, else the global base with [`RopeScaling`].
    pub fn inv_freq(&self, kind: LayerKind) -> Vec<f32> {
        let d = self.head_dim;
        let (theta, scaling) = match (kind, self.local_rope_theta) {
            (LayerKind::Sliding, Some(t)) => (t, RopeScaling::None),
            _ => (self.rope_theta, self.rope_scaling),
        };
        let base = (0..d)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / d as f32));
        match scaling {
            RopeScaling::None => base.collect(),
            RopeScaling::Linear { factor } => base.map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
            }
        }
    }

    /// Whether the sliding layers use their own RoPE tables.
    pub(crate) fn has_local_rope(&self) -> bool {
        self.local_rope_theta.is_some() && self.layer_kinds.contains(&LayerKind::Sliding)
    }

    /// The window of layer `i` (`None`: global).
    pub fn window(&self, i: usize) -> Option<usize> {
        match self.layer_kinds.get(i) {
            Some(LayerKind::Sliding) => self.sliding_window,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        let mut c = ModelConfig::llama_like(Family::Llama, 8, 2, 2, 1, 4, 16, 10);
        c.layer_kinds = vec![LayerKind::Global; 2];
        c
    }

    #[test]
    fn validation_names_the_key() {
        assert!(tiny().validate(KeySource::Hf).is_ok());
        let mut c = tiny();
        c.n_heads = 3;
        c.n_kv_heads = 2;
        let e = c
            .validate(KeySource::Gguf("llama"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("llama.attention.head_count_kv"), "{e}");
        let mut c = tiny();
        c.head_dim = usize::MAX / 2;
        let e = c.validate(KeySource::Hf).unwrap_err().to_string();
        assert!(e.contains("`head_dim`") && e.contains("1..=1024"), "{e}");
        let mut c = tiny();
        c.d_model = 0;
        let e = c.validate(KeySource::Hf).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let mut c = tiny();
        c.layer_kinds = vec![LayerKind::Sliding; 2];
        let e = c.validate(KeySource::Hf).unwrap_err().to_string();
        assert!(e.contains("sliding_window"), "{e}");
        let mut c = tiny();
        c.final_softcap = Some(f32::NAN);
        let e = c.validate(KeySource::Hf).unwrap_err().to_string();
        assert!(e.contains("final_logit_softcapping"), "{e}");
    }

    /// Llama-3.1-8B's RoPE settings: the three regimes of the scaling.
    #[test]
    fn llama3_rope_scaling_regimes() {
        let mut cfg = ModelConfig::llama_like(Family::Llama, 4096, 1, 32, 8, 128, 1, 1);
        cfg.rope_theta = 500_000.0;
        let plain = cfg.inv_freq(LayerKind::Global);
        cfg.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let scaled = cfg.inv_freq(LayerKind::Global);
        assert_eq!(scaled.len(), 64);
        assert_eq!(scaled[0], 1.0);
        for i in 0..64 {
            let wavelen = 2.0 * std::f32::consts::PI / plain[i];
            if wavelen < 2048.0 {
                assert_eq!(scaled[i], plain[i], "{i}");
            } else if wavelen > 8192.0 {
                assert!((scaled[i] - plain[i] / 8.0).abs() <= 1e-6 * plain[i], "{i}");
            } else {
                assert!(scaled[i] < plain[i] && scaled[i] > plain[i] / 8.0, "{i}");
            }
        }
        for i in 1..64 {
            assert!(scaled[i] < scaled[i - 1], "{i}");
        }
    }

    /// Gemma 3: sliding layers use the local base unscaled, global ones the scaled base.
    #[test]
    fn local_rope_base_is_unscaled() {
        let mut c = ModelConfig::llama_like(Family::Gemma3, 8, 1, 1, 1, 4, 1, 1);
        c.rope_theta = 1e6;
        c.local_rope_theta = Some(1e4);
        c.rope_scaling = RopeScaling::Linear { factor: 8.0 };
        let g = c.inv_freq(LayerKind::Global);
        let l = c.inv_freq(LayerKind::Sliding);
        // d = 4: frequencies θ^0 and θ^-1/2.
        let close =
            |a: &[f32], b: [f32; 2]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6 * y);
        assert!(close(&g, [1.0 / 8.0, 1e-3 / 8.0]), "{g:?}");
        assert!(close(&l, [1.0, 1e-2]), "{l:?}");
    }
}
