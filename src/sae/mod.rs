//! The SAE model: architecture, weights, input normalization, and the
//! reference (plain candle) encode/decode math.
//!
//! The equations follow SAELens v6 exactly (`sae_lens/saes/sae.py`,
//! `standard_sae.py`, `jumprelu_sae.py`, `topk_sae.py`, `gated_sae.py`) and
//! sparsify (`sparsify/sparse_coder.py`) for its TopK variant:
//!
//! * input: `x' = norm(x) − b_dec·[apply_b_dec_to_input]`
//! * `standard`: `f = ReLU(x' W_enc + b_enc)`
//! * `jumprelu`: `pre = x' W_enc + b_enc`, `f = ReLU(pre) · 1[pre > threshold]`
//! * `topk`: `pre = x' W_enc + b_enc` (times `‖W_dec[i]‖` when
//!   `rescale_acts_by_decoder_norm`), `f` = ReLU of the `k` largest
//!   pre-activations, others 0. Ties are broken towards the lower latent id.
//!   The `signed` sparsify variant picks the `k` largest `|pre|` and keeps signs.
//! * `gated`: `f = 1[x' W_enc + b_gate > 0] · ReLU(x' (W_enc ⊙ exp(r_mag)) + b_mag)`
//! * decode: `x̂ = denorm(f W_dec + b_dec)` (`f / ‖W_dec[i]‖` first when rescaled)
//!
//! Weights keep their stored dtype (f32, f16, bf16); all arithmetic runs in f32.

mod formats;
mod math;

pub use formats::{
    dictionary_learning, gemma_scope, goodfire, llama_scope, saelens, sparsify, Format,
};

pub use math::Denorm;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The SAE's activation function family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Architecture {
    /// ReLU SAE (SAELens `standard`).
    Standard,
    /// JumpReLU with a per-latent threshold (also BatchTopK and Matryoshka SAEs saved for inference).
    JumpRelu,
    /// TopK: only the `k` largest pre-activations survive.
    TopK,
    /// Gated SAE (Rajamanoharan et al. 2024) with tied gate/magnitude encoder.
    Gated,
}

names!(
    Architecture,
    "SAE architecture",
    Standard => "standard" | "relu",
    JumpRelu => "jumprelu" | "jump_relu",
    TopK => "topk",
    Gated => "gated",
);

/// How the SAE normalizes its input (SAELens `normalize_activations`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Normalization {
    /// No normalization.
    None,
    /// A constant scaling factor `s`: the SAE sees `s·x`; outputs are divided by `s`.
    /// SAELens folds this into the weights at load (`fold_activation_norm_scaling_factor`);
    /// keeping it separate is mathematically identical and avoids copying the weights.
    ExpectedAverageOnlyIn {
        /// The factor `s` (e.g. `√d_in / mean‖x‖`).
        scaling_factor: f32,
    },
    /// Per token: `x · √d_in / ‖x‖`, undone on output.
    ConstantNormRescale,
    /// Per token: `(x − μ) / (σ + 1e-5)` with the unbiased σ; output `y·σ + μ`.
    LayerNorm,
}

impl Normalization {
    /// The SAELens `normalize_activations` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            Normalization::None => "none",
            Normalization::ExpectedAverageOnlyIn { .. } => "expected_average_only_in",
            Normalization::ConstantNormRescale => "constant_norm_rescale",
            Normalization::LayerNorm => "layer_norm",
        }
    }
}

/// Static description of an SAE, independent of its weights.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SaeConfig {
    /// Activation function family.
    pub architecture: Architecture,
    /// Input (residual) width.
    pub d_in: usize,
    /// Number of latents.
    pub d_sae: usize,
    /// TopK: number of active latents per token (ignored by other architectures).
    pub k: usize,
    /// TopK: scale pre-activations by `‖W_dec[i]‖` before selection (SAELens).
    pub rescale_acts_by_decoder_norm: bool,
    /// TopK: sparsify's legacy `signed` variant (select by `|pre|`, no ReLU).
    pub signed: bool,
    /// Subtract `b_dec` from the (normalized) input before encoding.
    pub apply_b_dec_to_input: bool,
    /// Input normalization.
    pub normalization: Normalization,
    /// TransformerLens hook name the SAE was trained on, e.g. `blocks.12.hook_resid_post`.
    pub hook_name: Option<String>,
    /// Name of the model the SAE was trained on.
    pub model_name: Option<String>,
    /// The first position of each context the SAE was trained on: `0` when it saw every
    /// position; `1` when the first one was left out — the BOS token, or in a model
    /// without one (SmolLM2) the first text token, which the model uses as an attention
    /// sink with a norm far above the others. On such a position the SAE's code is
    /// meaningless (a TopK SAE fires its `k` latents at huge values), so
    /// [`SaeSplice`](crate::edit::SaeSplice) leaves positions below this one unchanged.
    /// SAEs trained by this crate's [`train`](crate::train) set `1` (harvesting skips
    /// the first position); the SAELens `cfg.json` stores it as
    /// `metadata.first_trained_position`; other formats load `0`.
    pub first_trained_position: usize,
}

impl SaeConfig {
    /// A config with SAELens defaults (`apply_b_dec_to_input = true`, no normalization).
    pub fn new(architecture: Architecture, d_in: usize, d_sae: usize) -> Self {
        SaeConfig {
            architecture,
            d_in,
            d_sae,
            k: 0,
            rescale_acts_by_decoder_norm: false,
            signed: false,
            apply_b_dec_to_input: true,
            normalization: Normalization::None,
            hook_name: None,
            model_name: None,
            first_trained_position: 0,
        }
    }
}

/// The weights, in SAELens orientation. `w_enc` may be a transposed view of
/// a `[d_sae, d_in]` matrix (as stored by sparsify, Goodfire, dictionary_learning)
/// and `w_dec` of a `[d_in, d_sae]` one: no copy is made.
#[derive(Debug, Clone)]
pub struct SaeWeights {
    /// `W_enc [d_in, d_sae]`.
    pub w_enc: Tensor,
    /// `b_enc [d_sae]`; for gated SAEs this is `b_gate`.
    pub b_enc: Tensor,
    /// `W_dec [d_sae, d_in]`.
    pub w_dec: Tensor,
    /// `b_dec [d_in]`.
    pub b_dec: Tensor,
    /// JumpReLU `threshold [d_sae]`.
    pub threshold: Option<Tensor>,
    /// Gated `r_mag [d_sae]`.
    pub r_mag: Option<Tensor>,
    /// Gated `b_mag [d_sae]`.
    pub b_mag: Option<Tensor>,
    /// sparsify skip connection `W_skip [d_in, d_in]`: forward adds `x W_skipᵀ`.
    pub w_skip: Option<Tensor>,
}

impl SaeWeights {
    /// The four weights every architecture has; the optional ones start empty
    /// (set them with struct-update syntax: `SaeWeights { threshold: Some(t), ..SaeWeights::new(..) }`).
    pub fn new(w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, b_dec: Tensor) -> Self {
        SaeWeights {
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            threshold: None,
            r_mag: None,
            b_mag: None,
            w_skip: None,
        }
    }
}

/// A sparse autoencoder, loaded from any supported format.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
/// # fn main() -> sae_ablate::Result<()> {
/// let dev = Device::Cpu;
/// // d_in = 2, d_sae = 2: identity encoder and decoder.
/// let eye = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev)?;
/// let zeros = Tensor::zeros(2, candle_core::DType::F32, &dev)?;
/// let sae = Sae::new(
///     SaeConfig::new(Architecture::Standard, 2, 2),
///     SaeWeights { w_enc: eye.clone(), b_enc: zeros.clone(), w_dec: eye, b_dec: zeros,
///                  threshold: None, r_mag: None, b_mag: None, w_skip: None },
/// )?;
/// let f = sae.encode(&Tensor::new(&[[3f32, -1.]], &dev)?)?;
/// assert_eq!(f.to_vec2::<f32>()?, vec![vec![3.0, 0.0]]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Sae {
    cfg: SaeConfig,
    w: SaeWeights,
    format: Format,
}

fn check(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    formats::expect_shape(name, t, expected)?;
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::Dtype {
            name: name.to_string(),
            dtype: format!("{other:?}"),
        }),
    }
}

impl Sae {
    /// Build an SAE from a config and weights, checking every shape and dtype.
    /// This is the one constructor every format loader goes through.
    pub fn new(cfg: SaeConfig, w: SaeWeights) -> Result<Self> {
        Self::with_format(cfg, w, Format::Memory)
    }

    /// Like [`Sae::new`], recording the on-disk format the weights came from.
    pub fn with_format(cfg: SaeConfig, w: SaeWeights, format: Format) -> Result<Self> {
        let (d_in, d_sae) = (cfg.d_in, cfg.d_sae);
        if d_in == 0 || d_sae == 0 {
            return Err(Error::Config(format!(
                "d_in = {d_in} and d_sae = {d_sae} must both be positive"
            )));
        }
        check("W_enc", &w.w_enc, &[d_in, d_sae])?;
        check("W_dec", &w.w_dec, &[d_sae, d_in])?;
        check("b_dec", &w.b_dec, &[d_in])?;
        let b_enc_name = if cfg.architecture == Architecture::Gated {
            "b_gate"
        } else {
            "b_enc"
        };
        check(b_enc_name, &w.b_enc, &[d_sae])?;
        match cfg.architecture {
            Architecture::JumpRelu => match &w.threshold {
                Some(t) => check("threshold", t, &[d_sae])?,
                None => {
                    return Err(Error::MissingTensor {
                        name: "threshold".into(),
                    })
                }
            },
            Architecture::Gated => {
                for (name, t) in [("r_mag", &w.r_mag), ("b_mag", &w.b_mag)] {
                    match t {
                        Some(t) => check(name, t, &[d_sae])?,
                        None => return Err(Error::MissingTensor { name: name.into() }),
                    }
                }
            }
            Architecture::TopK => {
                if cfg.k == 0 || cfg.k > d_sae {
                    return Err(Error::Config(format!(
                        "topk needs 1 <= k <= d_sae = {d_sae}, got k = {}",
                        cfg.k
                    )));
                }
            }
            Architecture::Standard => {}
        }
        if let Some(s) = &w.w_skip {
            check("W_skip", s, &[d_in, d_in])?;
        }
        if let Normalization::ExpectedAverageOnlyIn { scaling_factor } = cfg.normalization {
            if !(scaling_factor.is_finite() && scaling_factor > 0.0) {
                return Err(Error::Config(format!(
                    "normalization scaling factor must be finite and positive, got {scaling_factor}"
                )));
            }
        }
        Ok(Sae { cfg, w, format })
    }

    /// Load an SAE from a release directory or weights file, detecting the format.
    /// See [`Format::detect`] for the rules.
    pub fn load(path: impl AsRef<std::path::Path>, device: &Device) -> Result<Self> {
        formats::load(path.as_ref(), device)
    }

    /// Save in SAELens format (`cfg.json` + `sae_weights.safetensors`) into directory `dir`.
    pub fn save_saelens(&self, dir: impl AsRef<std::path::Path>) -> Result<()> {
        saelens::save(self, dir.as_ref())
    }

    /// The config.
    pub fn config(&self) -> &SaeConfig {
        &self.cfg
    }

    /// Record the first position of each context the SAE was trained on (see
    /// [`SaeConfig::first_trained_position`]), e.g. `1` for a release trained without
    /// the BOS position whose format does not say so.
    pub fn set_first_trained_position(&mut self, position: usize) {
        self.cfg.first_trained_position = position;
    }
    /// The weights.
    pub fn weights(&self) -> &SaeWeights {
        &self.w
    }
    /// The format the SAE was loaded from.
    pub fn format(&self) -> Format {
        self.format
    }
    /// Input width.
    pub fn d_in(&self) -> usize {
        self.cfg.d_in
    }
    /// Number of latents.
    pub fn d_sae(&self) -> usize {
        self.cfg.d_sae
    }
    /// Activation function family.
    pub fn architecture(&self) -> Architecture {
        self.cfg.architecture
    }
    /// TransformerLens hook name, if the release records one.
    pub fn hook_name(&self) -> Option<&str> {
        self.cfg.hook_name.as_deref()
    }
    /// The dtype the weights are stored in.
    pub fn dtype(&self) -> DType {
        self.w.w_dec.dtype()
    }
    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.w.w_dec.device()
    }
    /// Every weight tensor with its SAELens name (`b_gate` for a gated SAE's `b_enc`).
    pub fn named_tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let w = &self.w;
        let b_enc = if self.cfg.architecture == Architecture::Gated {
            "b_gate"
        } else {
            "b_enc"
        };
        let mut v = vec![
            ("W_enc", &w.w_enc),
            (b_enc, &w.b_enc),
            ("W_dec", &w.w_dec),
            ("b_dec", &w.b_dec),
        ];
        let opt = [
            ("threshold", &w.threshold),
            ("r_mag", &w.r_mag),
            ("b_mag", &w.b_mag),
            ("W_skip", &w.w_skip),
        ];
        v.extend(
            opt.into_iter()
                .filter_map(|(n, t)| t.as_ref().map(|t| (n, t))),
        );
        v
    }

    /// Count the NaN and infinite values of every weight tensor; returns
    /// `(tensor name, count)` for each tensor that has any.
    pub fn non_finite(&self) -> Result<Vec<(&'static str, usize)>> {
        let mut out = Vec::new();
        for (name, t) in self.named_tensors() {
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let bad = v.iter().filter(|x| !x.is_finite()).count();
            if bad > 0 {
                out.push((name, bad));
            }
        }
        Ok(out)
    }

    /// `W_dec[i]`, shape `[d_in]`, in the stored dtype: the direction latent `i` writes.
    pub fn decoder_direction(&self, i: usize) -> Result<Tensor> {
        if i >= self.cfg.d_sae {
            return Err(Error::LatentOutOfRange {
                id: i as u64,
                d_sae: self.cfg.d_sae,
            });
        }
        Ok(self.w.w_dec.get(i)?)
    }
}
