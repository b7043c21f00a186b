//! saprmarks/dictionary_learning releases: `ae.pt` (a PyTorch state dict) plus an
//! optional `config.json` beside it whose `trainer` object names the class
//! (`dict_class`) and records `activation_dim`, `dict_size`, `k`, `layer`, `lm_name`,
//! `submodule_name`.
//!
//! Supported classes and how each maps onto [`Sae`] (equations from
//! `dictionary_learning/dictionary.py` and `dictionary_learning/trainers/*.py`):
//!
//! | `dict_class` | stored tensors | maps to |
//! |---|---|---|
//! | `AutoEncoder` (`dictionary.py`) | `encoder.weight [d_sae,d_in]`, `encoder.bias`, `decoder.weight [d_in,d_sae]`, `bias [d_in]` | standard |
//! | `AutoEncoderTopK` (`trainers/top_k.py`) | `encoder.*`, `decoder.weight`, `b_dec`, `k`, `threshold` | topk |
//! | `BatchTopKSAE` (`trainers/batch_top_k.py`) | same as `AutoEncoderTopK` | jumprelu |
//! | `MatryoshkaBatchTopKSAE` (`trainers/matryoshka_batch_top_k.py`) | `W_enc [d_in,d_sae]`, `b_enc`, `W_dec [d_sae,d_in]`, `b_dec`, `k`, `threshold`, `group_sizes` | jumprelu |
//! | `JumpReluAutoEncoder` (`dictionary.py`) | `W_enc`, `b_enc`, `W_dec`, `b_dec`, `threshold [d_sae]` | jumprelu |
//! | `GatedAutoEncoder` (`dictionary.py`) | `encoder.weight` (no bias), `decoder.weight`, `decoder_bias`, `r_mag`, `gate_bias`, `mag_bias` | gated |
//!
//! * `AutoEncoder.encode`: `ReLU(encoder(x − bias))`, `decode`: `decoder(f) + bias`:
//!   standard with `b_dec = bias`, `apply_b_dec_to_input = true`.
//! * `AutoEncoderTopK.encode` (default `use_threshold=False`): `topk` of
//!   `ReLU(encoder(x − b_dec))`, scattered back: the same values as our TopK (ReLU of
//!   the `k` largest pre-activations); `k` is the `k` buffer (or `trainer.k`).
//! * `BatchTopKSAE` / `MatryoshkaBatchTopKSAE` encode at inference with
//!   `use_threshold=True`: `post_relu · (post_relu > threshold)` with a learned scalar
//!   `threshold`. We load that as JumpReLU with the scalar broadcast to every latent.
//!   Our JumpReLU is `ReLU(pre) · 1[pre > θ]`; the two agree for every θ: where
//!   `pre > 0` both test `pre > θ`; where `pre ≤ 0` both give 0. (An untrained θ = −1
//!   keeps every positive latent in both.) Matryoshka's `active_groups` is all groups
//!   in a loaded model, so no latents are cut off.
//! * `JumpReluAutoEncoder.encode`: `ReLU(pre · 1[pre > θ])` with
//!   `pre = x W_enc + b_enc`, equal to ours for every θ by the same argument;
//!   `apply_b_dec_to_input` is `False` unless `config.json` says otherwise.
//! * `GatedAutoEncoder.encode`: `x_enc = encoder(x − decoder_bias)`,
//!   `f = 1[x_enc + gate_bias > 0] · ReLU(exp(r_mag) ⊙ x_enc + mag_bias)`,
//!   `decode = decoder(f) + decoder_bias`: our gated SAE with `b_gate = gate_bias`,
//!   `b_mag = mag_bias`, `b_dec = decoder_bias`.
//!
//! `nn.Linear` weights (`encoder.weight`, `decoder.weight`) are stored transposed
//! relative to SAELens; they are used as transposed views, never copied.
//!
//! Without `config.json` the class is inferred from the tensor names. `AutoEncoderTopK`
//! and `BatchTopKSAE` store the same tensors; without a config such a file is read as
//! `AutoEncoderTopK` (its default `encode`), so pass the `config.json` for BatchTopK.
//!
//! The hook name is `blocks.N.hook_resid_post` when `trainer.submodule_name` is
//! `resid_post_layer_N` (the naming of dictionary_learning's demo), else `None`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::{read_json, sibling, Format};
use crate::io::pickle::PthFile;
use crate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
use crate::{Error, Result};

/// The weights file name.
pub const WEIGHTS_FILE: &str = "ae.pt";
/// The config file name.
pub const CONFIG_FILE: &str = "config.json";

/// The dictionary_learning class a release was saved from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DictClass {
    /// `AutoEncoder`: ReLU SAE.
    AutoEncoder,
    /// `AutoEncoderTopK`.
    TopK,
    /// `BatchTopKSAE`, loaded for inference with its learned threshold.
    BatchTopK,
    /// `MatryoshkaBatchTopKSAE`, loaded for inference with its learned threshold.
    MatryoshkaBatchTopK,
    /// `JumpReluAutoEncoder`.
    JumpRelu,
    /// `GatedAutoEncoder`.
    Gated,
}

impl DictClass {
    /// Parse a `dict_class` string as `config.json` spells it.
    pub fn from_name(s: &str) -> Result<Self> {
        Ok(match s {
            "AutoEncoder" => DictClass::AutoEncoder,
            "AutoEncoderTopK" => DictClass::TopK,
            "BatchTopKSAE" => DictClass::BatchTopK,
            "MatryoshkaBatchTopKSAE" => DictClass::MatryoshkaBatchTopK,
            "JumpReluAutoEncoder" => DictClass::JumpRelu,
            "GatedAutoEncoder" => DictClass::Gated,
            other => {
                return Err(Error::Config(format!(
                    "dictionary_learning dict_class `{other}` is not supported (AutoEncoder, \
                     AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, \
                     JumpReluAutoEncoder, GatedAutoEncoder)"
                )))
            }
        })
    }

    /// Infer the class from the names of the stored tensors.
    pub fn detect(f: &PthFile) -> Result<Self> {
        let has = |n: &str| f.contains(n);
        Ok(if has("r_mag") && has("gate_bias") {
            DictClass::Gated
        } else if has("W_enc") && (has("group_sizes") || has("k")) {
            DictClass::MatryoshkaBatchTopK
        } else if has("W_enc") && has("threshold") {
            DictClass::JumpRelu
        } else if has("encoder.weight") && has("k") {
            DictClass::TopK
        } else if has("encoder.weight") && has("bias") {
            DictClass::AutoEncoder
        } else {
            return Err(Error::Config(format!(
                "cannot tell which dictionary_learning class stored tensors {:?}; \
                 add a config.json with trainer.dict_class",
                f.names()
            )));
        })
    }
}

/// Load a dictionary_learning release from its directory, `ae.pt` or `config.json`.
pub fn load(path: &Path, device: &Device) -> Result<Sae> {
    let weights: PathBuf = if path.is_dir() || path.file_name().is_some_and(|n| n == CONFIG_FILE) {
        sibling(path, WEIGHTS_FILE)
    } else {
        path.to_path_buf()
    };
    let cfg_path = sibling(&weights, CONFIG_FILE);
    let trainer = if cfg_path.is_file() {
        let v = read_json(&cfg_path)?;
        Some(v.get("trainer").cloned().unwrap_or(v))
    } else {
        None
    };
    let f = PthFile::open(&weights)?;
    load_from(&f, trainer.as_ref(), device).map_err(|e| e.in_file(&weights))
}

/// Build the SAE from an open `ae.pt` and the `trainer` object of its `config.json`.
pub fn load_from(f: &PthFile, trainer: Option<&Value>, device: &Device) -> Result<Sae> {
    let class = match trainer
        .and_then(|t| t.get("dict_class"))
        .and_then(|v| v.as_str())
    {
        Some(name) => DictClass::from_name(name)?,
        None => DictClass::detect(f)?,
    };
    let nn_linear = matches!(
        class,
        DictClass::AutoEncoder | DictClass::TopK | DictClass::BatchTopK | DictClass::Gated
    );
    // d_in, d_sae from the encoder matrix.
    let (enc_name, dec_name) = if nn_linear {
        ("encoder.weight", "decoder.weight")
    } else {
        ("W_enc", "W_dec")
    };
    let enc_shape = f.shape(enc_name).ok_or_else(|| Error::MissingTensor {
        name: enc_name.into(),
    })?;
    let (d_in, d_sae) = match (enc_shape, nn_linear) {
        ([a, b], true) => (*b, *a),
        ([a, b], false) => (*a, *b),
        (other, _) => {
            return Err(Error::Invalid(format!(
                "tensor `{enc_name}` has shape {other:?}, expected a 2-D matrix"
            )))
        }
    };
    if let Some(t) = trainer {
        for (key, want) in [("activation_dim", d_in), ("dict_size", d_sae)] {
            if let Some(v) = t.get(key).and_then(|v| v.as_u64()) {
                if v != want as u64 {
                    return Err(Error::Config(format!(
                        "config.json says {key} = {v}, but `{enc_name}` implies {want}"
                    )));
                }
            }
        }
    }
    let get = |name: &str, expected: &[usize]| -> Result<Tensor> {
        let found = f.shape(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        if found != expected {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
        f.load(name, device)
    };

    let (w_enc, w_dec) = if nn_linear {
        (
            get(enc_name, &[d_sae, d_in])?.t()?,
            get(dec_name, &[d_in, d_sae])?.t()?,
        )
    } else {
        (
            get(enc_name, &[d_in, d_sae])?,
            get(dec_name, &[d_sae, d_in])?,
        )
    };

    let arch = match class {
        DictClass::AutoEncoder => Architecture::Standard,
        DictClass::TopK => Architecture::TopK,
        DictClass::BatchTopK | DictClass::MatryoshkaBatchTopK | DictClass::JumpRelu => {
            Architecture::JumpRelu
        }
        DictClass::Gated => Architecture::Gated,
    };
    let mut cfg = SaeConfig::new(arch, d_in, d_sae);
    let mut threshold = None;
    let (mut r_mag, mut b_mag) = (None, None);
    let (b_enc, b_dec) = match class {
        DictClass::AutoEncoder => (get("encoder.bias", &[d_sae])?, get("bias", &[d_in])?),
        DictClass::TopK | DictClass::BatchTopK => {
            (get("encoder.bias", &[d_sae])?, get("b_dec", &[d_in])?)
        }
        DictClass::MatryoshkaBatchTopK | DictClass::JumpRelu => {
            (get("b_enc", &[d_sae])?, get("b_dec", &[d_in])?)
        }
        DictClass::Gated => {
            r_mag = Some(get("r_mag", &[d_sae])?);
            b_mag = Some(get("mag_bias", &[d_sae])?);
            (get("gate_bias", &[d_sae])?, get("decoder_bias", &[d_in])?)
        }
    };
    match class {
        DictClass::TopK => {
            cfg.k = match f.load_opt("k", device)? {
                Some(k) => scalar(&k, "k")?,
                None => match trainer.and_then(|t| t.get("k")).and_then(|v| v.as_f64()) {
                    Some(k) => k,
                    None => return Err(Error::MissingTensor { name: "k".into() }),
                },
            }
            .to_usize("k")?;
        }
        DictClass::BatchTopK | DictClass::MatryoshkaBatchTopK => {
            let t = get("threshold", &[])?;
            let v = scalar(&t, "threshold")?;
            if !v.is_finite() {
                return Err(Error::Config(format!("threshold must be finite, got {v}")));
            }
            threshold = Some(Tensor::full(v as f32, d_sae, device)?);
        }
        DictClass::JumpRelu => {
            threshold = Some(get("threshold", &[d_sae])?);
            cfg.apply_b_dec_to_input = trainer
                .and_then(|t| t.get("apply_b_dec_to_input"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
        }
        DictClass::AutoEncoder | DictClass::Gated => {}
    }
    if let Some(t) = trainer {
        cfg.model_name = t.get("lm_name").and_then(|v| v.as_str()).map(String::from);
        cfg.hook_name = t
            .get("submodule_name")
            .and_then(|v| v.as_str())
            .and_then(|s| s.strip_prefix("resid_post_layer_"))
            .and_then(|n| n.parse::<usize>().ok())
            .map(|n| format!("blocks.{n}.hook_resid_post"));
    }
    let w = SaeWeights {
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        threshold,
        r_mag,
        b_mag,
        w_skip: None,
    };
    Sae::with_format(cfg, w, Format::DictionaryLearning)
}

/// The value of a one-element tensor (any dtype) as f64.
fn scalar(t: &Tensor, name: &str) -> Result<f64> {
    if t.elem_count() != 1 {
        return Err(Error::Shape {
            name: name.to_string(),
            expected: vec![],
            found: t.dims().to_vec(),
        });
    }
    t.flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .first()
        .copied()
        .ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })
}

trait ToUsize {
    fn to_usize(self, name: &str) -> Result<usize>;
}

impl ToUsize for f64 {
    fn to_usize(self, name: &str) -> Result<usize> {
        if self.is_finite() && self >= 0.0 && self.fract() == 0.0 && self <= u32::MAX as f64 {
            Ok(self as usize)
        } else {
            Err(Error::Config(format!(
                "`{name}` must be a non-negative integer, got {self}"
            )))
        }
    }
}
