//! Llama Scope (OpenMOSS `lm-saes`): `checkpoints/final.safetensors` (or
//! `final.safetensors`) with `hyperparams.json` in the release directory.
//!
//! Tensors: `encoder.weight [d_sae, d_in]`, `encoder.bias [d_sae]`,
//! `decoder.weight [d_in, d_sae]`, `decoder.bias [d_in]` (both weights are
//! `nn.Linear` layouts; `W_enc` and `W_dec` are transposed *views*, no copy).
//!
//! The mapping does what SAELens' `get_llama_scope_config_from_hf` and
//! `llama_scope_sae_huggingface_loader` (`sae_lens/loading/pretrained_sae_loaders.py`)
//! followed by `SAE.from_pretrained`'s `fold_activation_norm_scaling_factor`
//! (`sae_lens/saes/sae.py`) do:
//!
//! * JumpReLU with `d_in = d_model`, `d_sae` from `hyperparams.json`; the hook name
//!   is `hook_point_in`.
//! * `s = √d_in / dataset_average_activation_norm.in`. SAELens folds `s` into the
//!   weights (`W_enc·s`, `W_dec/s`, `b_dec/s`); we keep it as
//!   [`Normalization::ExpectedAverageOnlyIn`] `{ scaling_factor: s }`, which computes
//!   the same function without copying a matrix: the encoder sees `s·x` and the
//!   output `(f W_dec + b_dec)/s`.
//! * the scalar `jump_relu_threshold` is multiplied by `s` (as SAELens does) and
//!   broadcast to a per-latent `threshold [d_sae]` (f32; SAELens rounds it to bf16).
//! * `apply_b_dec_to_input` = `apply_decoder_bias_to_pre_encoder` (default false).
//!   SAELens hard-codes false; every Llama Scope release stores false, and for a
//!   release that stores true, subtracting `b_dec` from the normalized input is what
//!   `lm-saes` does (and equals SAELens' folded form `x − b_dec/s` before `W_enc·s`).
//!
//! Checks beyond SAELens, each an error rather than a silent mismatch:
//! `act_fn` must be `jumprelu`; `norm_activation` must be `dataset-wise` (the only
//! mode SAELens' formula is right for); a `hook_point_out` different from
//! `hook_point_in` (a transcoder) is rejected.
//!
//! Known differences from the training library, inherited from SAELens and
//! documented here rather than corrected:
//! * **Output normalization.** `dataset_average_activation_norm.out` is ignored:
//!   the reconstruction is divided by the *input* factor `s`. For these SAEs
//!   `hook_point_in == hook_point_out`, so `in` and `out` are norms of the same
//!   activations over the same data and agree (up to the estimate's noise);
//!   transcoders, where they differ, are rejected above.
//! * **`sparsity_include_decoder_norm`.** `lm-saes` can compare
//!   `pre · ‖W_dec[i]‖` against the threshold when this is true; SAELens ignores the
//!   flag (compares `pre` itself), and so do we.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::expect_shape;
use super::{read_json, Format};
use crate::io::TensorFile;
use crate::sae::{Architecture, Normalization, Sae, SaeConfig, SaeWeights};
use crate::{Error, Result};

/// The weights file name.
pub const WEIGHTS_FILE: &str = "final.safetensors";
/// The config file name.
pub const CFG_FILE: &str = "hyperparams.json";

/// Locate the weights file and `hyperparams.json` for a directory, weights file or
/// `hyperparams.json` path.
fn locate(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir_of = |p: &Path| {
        p.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    let release = if path.is_dir() {
        path.to_path_buf()
    } else if path.file_name().is_some_and(|n| n == CFG_FILE) {
        dir_of(path)
    } else {
        // A weights file: its directory, or the release above `checkpoints/`.
        let d = dir_of(path);
        let cfg = d.join(CFG_FILE);
        if !cfg.is_file() && d.file_name().is_some_and(|n| n == "checkpoints") {
            return Ok((path.to_path_buf(), dir_of(&d).join(CFG_FILE)));
        }
        return Ok((path.to_path_buf(), cfg));
    };
    let weights = [
        release.join(WEIGHTS_FILE),
        release.join("checkpoints").join(WEIGHTS_FILE),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or_else(|| Error::UnknownFormat {
        path: release.display().to_string(),
        why: format!("no {WEIGHTS_FILE} or checkpoints/{WEIGHTS_FILE}"),
    })?;
    Ok((weights, release.join(CFG_FILE)))
}

fn f64_key(v: &Value, key: &str) -> Result<f64> {
    let x = v
        .get(key)
        .ok_or_else(|| Error::Config(format!("missing key `{key}`")))?;
    x.as_f64()
        .filter(|f| f.is_finite())
        .ok_or_else(|| Error::Config(format!("`{key}` must be a finite number, got {x}")))
}

fn str_key<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|x| x.as_str())
}

/// The parts of `hyperparams.json` that define the SAE.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaScopeConfig {
    /// The SAE config (normalization and hook name filled in).
    pub sae: SaeConfig,
    /// The scalar threshold as SAELens uses it: `jump_relu_threshold · s`.
    pub threshold: f32,
}

/// Parse a Llama Scope `hyperparams.json` as SAELens does (see the module docs).
pub fn parse_config(v: &Value) -> Result<LlamaScopeConfig> {
    if !v.is_object() {
        return Err(Error::Config(
            "hyperparams.json must be a JSON object".into(),
        ));
    }
    let d_in = super::saelens::usize_key(v, "d_model")?;
    let d_sae = super::saelens::usize_key(v, "d_sae")?;
    match str_key(v, "act_fn") {
        None | Some("jumprelu") => {}
        Some(other) => {
            return Err(Error::Config(format!(
                "act_fn `{other}` is not supported (Llama Scope SAEs are `jumprelu`)"
            )))
        }
    }
    match str_key(v, "norm_activation") {
        None | Some("dataset-wise") => {}
        Some(other) => {
            return Err(Error::Config(format!(
                "norm_activation `{other}` is not supported (expected `dataset-wise`)"
            )))
        }
    }
    let norms = v
        .get("dataset_average_activation_norm")
        .filter(|n| n.is_object())
        .ok_or_else(|| {
            Error::Config("missing object `dataset_average_activation_norm` {in, out}".into())
        })?;
    let norm_in = f64_key(norms, "in")?;
    if norm_in <= 0.0 {
        return Err(Error::Config(format!(
            "dataset_average_activation_norm.in must be positive, got {norm_in}"
        )));
    }
    let (hin, hout) = (str_key(v, "hook_point_in"), str_key(v, "hook_point_out"));
    if let (Some(a), Some(b)) = (hin, hout) {
        if a != b {
            return Err(Error::Config(format!(
                "hook_point_in `{a}` differs from hook_point_out `{b}`: transcoders are not \
                 supported"
            )));
        }
    }
    let s = (d_in as f64).sqrt() / norm_in;
    let threshold = f64_key(v, "jump_relu_threshold")? * s;
    let mut sae = SaeConfig::new(Architecture::JumpRelu, d_in, d_sae);
    sae.normalization = Normalization::ExpectedAverageOnlyIn {
        scaling_factor: s as f32,
    };
    sae.apply_b_dec_to_input = match v.get("apply_decoder_bias_to_pre_encoder") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(Error::Config(format!(
                "`apply_decoder_bias_to_pre_encoder` must be true or false, got {other}"
            )))
        }
    };
    sae.hook_name = hin.map(String::from);
    sae.model_name = str_key(v, "model_name").map(String::from);
    Ok(LlamaScopeConfig {
        sae,
        threshold: threshold as f32,
    })
}

/// Load a Llama Scope SAE from its release directory, its `final.safetensors`
/// (in `checkpoints/` or beside `hyperparams.json`) or its `hyperparams.json`.
pub fn load(path: &Path, device: &Device) -> Result<Sae> {
    let (weights, cfg_path) = locate(path)?;
    let cfg = parse_config(&read_json(&cfg_path)?).map_err(|e| e.in_file(&cfg_path))?;
    let file = TensorFile::open(&weights)?;
    load_weights(cfg, &file, device).map_err(|e| e.in_file(&weights))
}

fn load_weights(cfg: LlamaScopeConfig, f: &TensorFile, dev: &Device) -> Result<Sae> {
    let (d_in, d_sae) = (cfg.sae.d_in, cfg.sae.d_sae);
    let enc = f.load("encoder.weight", dev)?;
    expect_shape("encoder.weight", &enc, &[d_sae, d_in])?;
    let b_enc = f.load("encoder.bias", dev)?;
    expect_shape("encoder.bias", &b_enc, &[d_sae])?;
    let dec = f.load("decoder.weight", dev)?;
    expect_shape("decoder.weight", &dec, &[d_in, d_sae])?;
    let b_dec = f.load("decoder.bias", dev)?;
    expect_shape("decoder.bias", &b_dec, &[d_in])?;
    let threshold = Tensor::full(cfg.threshold, d_sae, dev)?;
    let w = SaeWeights {
        threshold: Some(threshold),
        ..SaeWeights::new(enc.t()?, b_enc, dec.t()?, b_dec)
    };
    Sae::with_format(cfg.sae, w, Format::LlamaScope)
}
