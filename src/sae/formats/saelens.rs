//! SAELens: a directory with `cfg.json` and `sae_weights.safetensors`
//! (`W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_in]`, `b_dec`, and
//! `threshold` for JumpReLU or `b_gate`, `b_mag`, `r_mag` for gated).
//!
//! Config keys follow SAELens v6 (`sae_lens/saes/sae.py`, `SAEConfig`): `architecture`,
//! `d_in`, `d_sae`, `apply_b_dec_to_input`, `normalize_activations`, `k`,
//! `rescale_acts_by_decoder_norm`, `metadata.hook_name`. Pre-v6 configs are read as
//! `handle_pre_6_0_config` in `sae_lens/loading/pretrained_sae_loaders.py` does:
//! `hook_point` → hook name, `activation_fn_str = "topk"` with
//! `activation_fn_kwargs.k` → TopK, boolean `normalize_activations`
//! (`true` → `expected_average_only_in`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::{read_json, sibling, Format};
use crate::io::{write_atomic, write_atomic_path, TensorFile};
use crate::sae::{Architecture, Normalization, Sae, SaeConfig, SaeWeights};
use crate::{Error, Result};

/// The weights file name.
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";
/// The config file name.
pub const CFG_FILE: &str = "cfg.json";

/// The `metadata` key holding [`SaeConfig::first_trained_position`] (not a SAELens key:
/// SAELens keeps unknown metadata and ignores it).
const FIRST_TRAINED_POSITION: &str = "first_trained_position";

fn get<'a>(cfg: &'a Value, key: &str) -> Option<&'a Value> {
    cfg.get(key).filter(|v| !v.is_null())
}

pub(crate) fn usize_key(cfg: &Value, key: &str) -> Result<usize> {
    let v = get(cfg, key).ok_or_else(|| Error::Config(format!("missing key `{key}`")))?;
    v.as_u64()
        .or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        })
        .and_then(|u| usize::try_from(u).ok())
        .ok_or_else(|| Error::Config(format!("`{key}` must be a non-negative integer, got {v}")))
}

fn bool_key(cfg: &Value, key: &str, default: bool) -> Result<bool> {
    match get(cfg, key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(Error::Config(format!(
            "`{key}` must be true or false, got {v}"
        ))),
    }
}

fn str_key<'a>(cfg: &'a Value, key: &str) -> Option<&'a str> {
    get(cfg, key).and_then(|v| v.as_str())
}

/// Parse a SAELens `cfg.json` (v6 or earlier) into an [`SaeConfig`].
pub fn parse_config(cfg: &Value) -> Result<SaeConfig> {
    if !cfg.is_object() {
        return Err(Error::Config("cfg.json must be a JSON object".into()));
    }
    let d_in = usize_key(cfg, "d_in")?;
    let d_sae = usize_key(cfg, "d_sae")?;
    let act_fn = str_key(cfg, "activation_fn").or_else(|| str_key(cfg, "activation_fn_str"));
    let kwargs_k = get(cfg, "activation_fn_kwargs").and_then(|kw| get(kw, "k"));
    let architecture: Architecture = match str_key(cfg, "architecture") {
        Some(a) => a.parse()?,
        None if act_fn == Some("topk") && kwargs_k.is_some() => Architecture::TopK,
        None => match act_fn {
            None | Some("relu") => Architecture::Standard,
            Some("topk") => {
                return Err(Error::Config(
                    "activation_fn topk needs activation_fn_kwargs.k".into(),
                ))
            }
            Some(other) => {
                return Err(Error::Config(format!(
                    "activation function `{other}` is not supported (relu, topk)"
                )))
            }
        },
    };
    let mut c = SaeConfig::new(architecture, d_in, d_sae);
    if architecture == Architecture::TopK {
        c.k = match get(cfg, "k") {
            Some(_) => usize_key(cfg, "k")?,
            None => match kwargs_k {
                Some(_) => usize_key(get(cfg, "activation_fn_kwargs").unwrap_or(cfg), "k")?,
                None => return Err(Error::Config("topk SAE without `k`".into())),
            },
        };
        c.rescale_acts_by_decoder_norm = bool_key(cfg, "rescale_acts_by_decoder_norm", false)?;
    }
    c.apply_b_dec_to_input = bool_key(cfg, "apply_b_dec_to_input", true)?;
    c.normalization = match get(cfg, "normalize_activations") {
        None | Some(Value::Bool(false)) => Normalization::None,
        Some(Value::Bool(true)) => expected_average(cfg)?,
        Some(Value::String(s)) => match s.as_str() {
            "none" => Normalization::None,
            "constant_norm_rescale" => Normalization::ConstantNormRescale,
            "layer_norm" => Normalization::LayerNorm,
            "expected_average_only_in" => expected_average(cfg)?,
            other => {
                return Err(Error::Config(format!(
                    "normalize_activations `{other}` is not one of none, expected_average_only_in, \
                     constant_norm_rescale, layer_norm"
                )))
            }
        },
        Some(v) => return Err(Error::Config(format!("bad normalize_activations {v}"))),
    };
    let meta = get(cfg, "metadata");
    let meta_str = |k: &str| meta.and_then(|m| str_key(m, k)).map(String::from);
    c.hook_name = meta_str("hook_name")
        .or_else(|| str_key(cfg, "hook_name").map(String::from))
        .or_else(|| str_key(cfg, "hook_point").map(String::from));
    c.model_name = meta_str("model_name").or_else(|| str_key(cfg, "model_name").map(String::from));
    if let Some(m) = meta.filter(|m| get(m, FIRST_TRAINED_POSITION).is_some()) {
        c.first_trained_position = usize_key(m, FIRST_TRAINED_POSITION)?;
    }
    Ok(c)
}

/// `expected_average_only_in` needs the dataset-level factor. SAELens looks it up in its
/// release table and folds it into the weights; a local `cfg.json` can carry it as
/// `normalization_scaling_factor`. Without one SAELens skips the folding, and so do we.
fn expected_average(cfg: &Value) -> Result<Normalization> {
    match get(cfg, "normalization_scaling_factor").or_else(|| get(cfg, "norm_scaling_factor")) {
        Some(v) => {
            let s = v
                .as_f64()
                .ok_or_else(|| Error::Config(format!("bad normalization_scaling_factor {v}")))?;
            Ok(Normalization::ExpectedAverageOnlyIn {
                scaling_factor: s as f32,
            })
        }
        None => Ok(Normalization::None),
    }
}

/// Load a SAELens release from its directory, `sae_weights.safetensors` or `cfg.json`.
pub fn load(path: &Path, device: &Device) -> Result<Sae> {
    let weights = if path.is_dir() || path.file_name().is_some_and(|n| n == CFG_FILE) {
        sibling(path, WEIGHTS_FILE)
    } else {
        path.to_path_buf()
    };
    let cfg_path = sibling(&weights, CFG_FILE);
    let cfg = parse_config(&read_json(&cfg_path)?).map_err(|e| e.in_file(&cfg_path))?;
    let file = TensorFile::open(&weights)?;
    load_weights(cfg, &file, device).map_err(|e| e.in_file(&weights))
}

fn load_weights(cfg: SaeConfig, f: &TensorFile, dev: &Device) -> Result<Sae> {
    let gated = cfg.architecture == Architecture::Gated;
    let mut w_dec = f.load("W_dec", dev)?;
    // Old SAELens releases carry a per-latent `scaling_factor` applied before decoding
    // (`finetuning_scaling_factor`); all ones means none. Fold it into W_dec rows.
    if let Some(s) = f.load_opt("scaling_factor", dev)? {
        let s32 = s.to_dtype(DType::F32)?;
        let all_ones = s32
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|&v| v == 1.0);
        if !all_ones {
            if s.dims() != [cfg.d_sae] {
                return Err(Error::Shape {
                    name: "scaling_factor".into(),
                    expected: vec![cfg.d_sae],
                    found: s.dims().to_vec(),
                });
            }
            let dt = w_dec.dtype();
            w_dec = w_dec
                .to_dtype(DType::F32)?
                .broadcast_mul(&s32.unsqueeze(1)?)?
                .to_dtype(dt)?;
        }
    }
    let threshold = match cfg.architecture {
        Architecture::JumpRelu => Some(match f.load_opt("threshold", dev)? {
            Some(t) => t,
            None => match f.load_opt("log_threshold", dev)? {
                Some(lt) => lt.to_dtype(DType::F32)?.exp()?.to_dtype(lt.dtype())?,
                None => {
                    return Err(Error::MissingTensor {
                        name: "threshold".into(),
                    })
                }
            },
        }),
        _ => None,
    };
    let w = SaeWeights {
        w_enc: f.load("W_enc", dev)?,
        b_enc: f.load(if gated { "b_gate" } else { "b_enc" }, dev)?,
        w_dec,
        b_dec: f.load("b_dec", dev)?,
        threshold,
        r_mag: if gated {
            Some(f.load("r_mag", dev)?)
        } else {
            None
        },
        b_mag: if gated {
            Some(f.load("b_mag", dev)?)
        } else {
            None
        },
        w_skip: None,
    };
    Sae::with_format(cfg, w, Format::SaeLens)
}

fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Save `sae` in SAELens v6 format into directory `dir` (created if missing).
///
/// Tensors keep their dtype; transposed views are written contiguous in SAELens
/// orientation. An `expected_average_only_in` factor is folded into the weights
/// (`W_enc·s`, `W_dec/s`, `b_dec/s`, as SAELens' `fold_activation_norm_scaling_factor`)
/// and written as `none`, so SAELens computes the same function. Both files are
/// written atomically.
pub fn save(sae: &Sae, dir: &Path) -> Result<()> {
    let c = sae.config();
    if sae.weights().w_skip.is_some() {
        return Err(Error::Invalid(
            "SAELens format has no skip connection (W_skip); cannot save this SAE".into(),
        ));
    }
    if c.signed {
        return Err(Error::Invalid(
            "SAELens format has no signed TopK variant; cannot save this SAE".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let w = sae.weights();
    let scale = match c.normalization {
        Normalization::ExpectedAverageOnlyIn { scaling_factor } => Some(scaling_factor as f64),
        _ => None,
    };
    let scaled = |t: &Tensor, by: f64| -> Result<Tensor> {
        Ok((t.to_dtype(DType::F32)? * by)?.to_dtype(t.dtype())?)
    };
    let mut tensors: Vec<(&str, Tensor)> = vec![
        (
            "W_enc",
            match scale {
                Some(s) => scaled(&w.w_enc, s)?,
                None => w.w_enc.clone(),
            },
        ),
        (
            "W_dec",
            match scale {
                Some(s) => scaled(&w.w_dec, 1.0 / s)?,
                None => w.w_dec.clone(),
            },
        ),
        (
            "b_dec",
            match scale {
                Some(s) => scaled(&w.b_dec, 1.0 / s)?,
                None => w.b_dec.clone(),
            },
        ),
    ];
    match c.architecture {
        Architecture::Gated => {
            tensors.push(("b_gate", w.b_enc.clone()));
            for (name, t) in [("r_mag", &w.r_mag), ("b_mag", &w.b_mag)] {
                let t = t
                    .as_ref()
                    .ok_or_else(|| Error::MissingTensor { name: name.into() })?;
                tensors.push((name, t.clone()));
            }
        }
        arch => {
            tensors.push(("b_enc", w.b_enc.clone()));
            if arch == Architecture::JumpRelu {
                let t = w.threshold.as_ref().ok_or_else(|| Error::MissingTensor {
                    name: "threshold".into(),
                })?;
                tensors.push(("threshold", t.clone()));
            }
        }
    }
    let tensors: Vec<(&str, Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.contiguous()?)))
        .collect::<Result<_>>()?;
    let weights_path = dir.join(WEIGHTS_FILE);
    write_atomic_path(&weights_path, |tmp| {
        safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (*n, t)), None, tmp)
            .map_err(|e| Error::format("safetensors", e.to_string()).in_file(tmp))
    })?;

    let mut cfg = json!({
        "architecture": c.architecture.as_str(),
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": dtype_name(sae.dtype()),
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": match c.normalization {
            Normalization::ExpectedAverageOnlyIn { .. } => "none",
            n => n.as_str(),
        },
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.0.0",
            "sae_lens_training_version": "6.0.0",
            "hook_name": c.hook_name,
            "model_name": c.model_name,
            FIRST_TRAINED_POSITION: c.first_trained_position,
        },
    });
    if c.architecture == Architecture::TopK {
        cfg["k"] = json!(c.k);
        cfg["rescale_acts_by_decoder_norm"] = json!(c.rescale_acts_by_decoder_norm);
    }
    let cfg_path = dir.join(CFG_FILE);
    let text =
        serde_json::to_string_pretty(&cfg).map_err(|e| Error::format("json", e.to_string()))?;
    write_atomic(&cfg_path, |w| {
        use std::io::Write;
        w.write_all(text.as_bytes())
            .map_err(|e| Error::io(&cfg_path, e))
    })
}
