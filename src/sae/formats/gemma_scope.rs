//! Gemma Scope (Gemma 2) and Gemma Scope 2 (Gemma 3) JumpReLU SAEs.
//!
//! # Gemma Scope: `params.npz`
//! A NumPy archive with `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc [d_sae]`,
//! `b_dec [d_in]` and `threshold [d_sae]` (lower-case `w_enc`/`w_dec` are accepted too,
//! as SAELens' `gemma_2_sae_huggingface_loader` renames `w_*` to `W_*`). The config
//! follows SAELens' `get_gemma_2_config_from_hf`
//! (`sae_lens/loading/pretrained_sae_loaders.py`): architecture `jumprelu`,
//! `apply_b_dec_to_input = false`, no normalization; `d_in` and `d_sae` come from
//! `W_enc`'s shape. A `scaling_factor` member of all ones is ignored; any other
//! value is rejected (SAELens raises too, as `finetuning_scaling_factor` is false).
//!
//! The hook name is derived from the path, which in the Hugging Face repos (and
//! their local snapshots) reads `<repo>/layer_N/width_W/average_l0_L/params.npz`:
//! * `layer_N` → `blocks.N.hook_resid_post`, or `blocks.N.hook_mlp_out` when a
//!   directory above it contains `-mlp` (e.g. `gemma-scope-2b-pt-mlp`), or
//!   `blocks.N.attn.hook_z` when one contains `-att` (as SAELens decides from the repo id;
//!   with no repo name in the path, `resid_post` is assumed);
//! * `embedding` → `hook_embed`. Embedding SAEs were trained on embeddings scaled
//!   by `1/√d_in`; SAELens folds this as `W_enc/√d_in` and `W_dec·√d_in`. We set
//!   [`Normalization::ExpectedAverageOnlyIn`] with `s = 1/√d_in` and store
//!   `b_dec·s` (a `[d_in]` copy, not a matrix): the encoder sees `s·x` and the
//!   decoder gives `(f W_dec + b_dec·s)/s = f W_dec·√d_in + b_dec`, exactly SAELens'
//!   folded SAE (`b_dec` is not subtracted from the input, so it only enters the output).
//! * any other path: no hook name.
//!
//! # Gemma Scope 2: `params.safetensors` + `config.json`
//! Lower-case tensors `w_enc [d_in, d_sae]`, `w_dec [d_sae, d_in]`, `b_enc`, `b_dec`,
//! `threshold`, mapped as SAELens' `gemma_3_sae_huggingface_loader` /
//! `get_gemma_3_config_from_hf` do: JumpReLU, `apply_b_dec_to_input = false`, no
//! normalization or scaling, `d_in`/`d_sae` from `w_enc`. `config.json` (optional, as
//! in SAELens) must say `"architecture": "jump_relu"` if it names one; its
//! `model_name` is kept. The hook comes from the folder, e.g.
//! `resid_post/layer_12_width_16k_l0_medium` (also `resid_post_all`) →
//! `blocks.12.hook_resid_post`, `attn_out` → `blocks.N.hook_attn_out`, `mlp_out` →
//! `blocks.N.hook_mlp_out`.
//!
//! Transcoders and cross-layer transcoders (`transcoder/`, `clt/` folders, an
//! `affine_skip_connection` tensor, an `hf_hook_point_out` in the config, a 3-d
//! `w_dec` or one whose output width differs from `d_in`) map an input to a
//! different output and are rejected with an error saying so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::expect_shape;
use super::{read_json, Format};
use crate::io::{npy, TensorFile};
use crate::sae::{Architecture, Normalization, Sae, SaeConfig, SaeWeights};
use crate::{Error, Result};

/// The Gemma Scope weights file name.
pub const NPZ_FILE: &str = "params.npz";
/// The Gemma Scope 2 weights file name.
pub const ST_FILE: &str = "params.safetensors";
/// The Gemma Scope 2 config file name.
pub const CFG_FILE: &str = "config.json";

/// Load a Gemma Scope (`params.npz`) or Gemma Scope 2 (`params.safetensors` +
/// `config.json`) SAE from its directory or weights file.
pub fn load(path: &Path, device: &Device) -> Result<Sae> {
    if path.is_dir() {
        let npz = path.join(NPZ_FILE);
        if npz.is_file() {
            return load_npz(&npz, device);
        }
        let st = path.join(ST_FILE);
        if st.is_file() {
            return load_v2(&st, device);
        }
        return Err(Error::UnknownFormat {
            path: path.display().to_string(),
            why: format!("no {NPZ_FILE} or {ST_FILE}"),
        });
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name == CFG_FILE {
        return load_v2(&super::sibling(path, ST_FILE), device);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("npz") => load_npz(path, device),
        Some("safetensors") => load_v2(path, device),
        _ => Err(Error::UnknownFormat {
            path: path.display().to_string(),
            why: "expected params.npz or params.safetensors".into(),
        }),
    }
}

fn take(m: &mut BTreeMap<String, Tensor>, names: &[&str]) -> Result<Tensor> {
    for n in names {
        if let Some(t) = m.remove(*n) {
            return Ok(t);
        }
    }
    Err(Error::MissingTensor {
        name: names.first().copied().unwrap_or("").to_string(),
    })
}

/// What the directory path says about a Gemma Scope (v1) SAE.
#[derive(Debug, PartialEq)]
enum V1Site {
    Layer(usize, &'static str),
    Embedding,
    Unknown,
}

fn parse_layer(s: &str) -> Option<usize> {
    let n = s.strip_prefix("layer_")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

fn v1_site(weights: &Path) -> V1Site {
    let comps: Vec<String> = weights
        .parent()
        .map(|p| {
            p.components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let n = comps.len();
    if n < 3 || !comps[n - 2].starts_with("width_") || !comps[n - 1].starts_with("average_l0_") {
        return V1Site::Unknown;
    }
    let site = &comps[n - 3];
    if site == "embedding" {
        return V1Site::Embedding;
    }
    let Some(layer) = parse_layer(site) else {
        return V1Site::Unknown;
    };
    let above = &comps[..n - 3];
    let kind = if above.iter().any(|c| c.contains("-mlp")) {
        "hook_mlp_out"
    } else if above.iter().any(|c| c.contains("-att")) {
        "attn.hook_z"
    } else {
        "hook_resid_post"
    };
    V1Site::Layer(layer, kind)
}

/// Load a Gemma Scope `params.npz`.
pub fn load_npz(path: &Path, device: &Device) -> Result<Sae> {
    let mut m = npy::read_npz(path, device)?;
    let site = v1_site(path);
    build_v1(&mut m, site).map_err(|e| e.in_file(path))
}

fn build_v1(m: &mut BTreeMap<String, Tensor>, site: V1Site) -> Result<Sae> {
    let w_enc = take(m, &["W_enc", "w_enc"])?;
    let (d_in, d_sae) = match w_enc.dims() {
        [a, b] => (*a, *b),
        d => {
            return Err(Error::Format {
                format: "gemma-scope",
                msg: format!("`W_enc` must be 2-d [d_in, d_sae], found shape {d:?}"),
            })
        }
    };
    let w_dec = take(m, &["W_dec", "w_dec"])?;
    expect_shape("W_dec", &w_dec, &[d_sae, d_in])?;
    let b_enc = take(m, &["b_enc"])?;
    expect_shape("b_enc", &b_enc, &[d_sae])?;
    let mut b_dec = take(m, &["b_dec"])?;
    expect_shape("b_dec", &b_dec, &[d_in])?;
    let threshold = take(m, &["threshold"])?;
    expect_shape("threshold", &threshold, &[d_sae])?;
    if let Some(s) = m.get("scaling_factor") {
        let v = s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if !v.iter().all(|&x| x == 1.0) {
            return Err(Error::Config(
                "a `scaling_factor` other than all ones is not supported (SAELens rejects it too)"
                    .into(),
            ));
        }
    }
    let mut cfg = SaeConfig::new(Architecture::JumpRelu, d_in, d_sae);
    cfg.apply_b_dec_to_input = false;
    match site {
        V1Site::Layer(n, kind) => cfg.hook_name = Some(format!("blocks.{n}.{kind}")),
        V1Site::Embedding => {
            cfg.hook_name = Some("hook_embed".into());
            let s = 1.0 / (d_in as f64).sqrt();
            cfg.normalization = Normalization::ExpectedAverageOnlyIn {
                scaling_factor: s as f32,
            };
            let dt = b_dec.dtype();
            b_dec = (b_dec.to_dtype(DType::F32)? * s)?.to_dtype(dt)?;
        }
        V1Site::Unknown => {}
    }
    let w = SaeWeights {
        threshold: Some(threshold),
        ..SaeWeights::new(w_enc, b_enc, w_dec, b_dec)
    };
    Sae::with_format(cfg, w, Format::GemmaScope)
}

fn unsupported_transcoder(why: &str) -> Error {
    Error::Config(format!(
        "Gemma Scope 2 transcoders are not supported ({why}): only SAEs that reconstruct \
         their input can be loaded"
    ))
}

/// The folder (last two directory names) and derived hook name of a Gemma Scope 2 SAE.
fn v2_hook(weights: &Path) -> Result<Option<String>> {
    let dir: PathBuf = weights.parent().map(Path::to_path_buf).unwrap_or_default();
    let last = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let site = dir
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let folder = format!("{site}/{last}");
    if folder.contains("transcoder") || folder.contains("clt") {
        return Err(unsupported_transcoder(&format!("folder `{folder}`")));
    }
    let layer = last
        .split('_')
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[0] == "layer" && !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit()))
        .and_then(|w| w[1].parse::<usize>().ok());
    let Some(layer) = layer else {
        return Ok(None);
    };
    let kind = if folder.contains("resid_post") {
        "hook_resid_post"
    } else if folder.contains("attn_out") {
        "hook_attn_out"
    } else if folder.contains("mlp_out") {
        "hook_mlp_out"
    } else {
        return Ok(None);
    };
    Ok(Some(format!("blocks.{layer}.{kind}")))
}

/// Load a Gemma Scope 2 `params.safetensors` (with its sibling `config.json`, if any).
pub fn load_v2(path: &Path, device: &Device) -> Result<Sae> {
    let cfg_path = super::sibling(path, CFG_FILE);
    let mut model_name = None;
    if cfg_path.is_file() {
        let raw = read_json(&cfg_path)?;
        let check = || -> Result<Option<String>> {
            if !raw.is_object() {
                return Err(Error::Config("config.json must be a JSON object".into()));
            }
            match raw.get("architecture") {
                None | Some(Value::Null) => {}
                Some(Value::String(a)) if a == "jump_relu" || a == "jumprelu" => {}
                Some(other) => {
                    return Err(Error::Config(format!(
                        "architecture {other} is not supported (expected \"jump_relu\")"
                    )))
                }
            }
            if raw.get("hf_hook_point_out").is_some_and(|v| !v.is_null()) {
                return Err(unsupported_transcoder("config has `hf_hook_point_out`"));
            }
            Ok(raw
                .get("model_name")
                .and_then(|v| v.as_str())
                .map(String::from))
        };
        model_name = check().map_err(|e| e.in_file(&cfg_path))?;
    }
    let hook = v2_hook(path).map_err(|e| e.in_file(path))?;
    let file = TensorFile::open(path)?;
    build_v2(&file, hook, model_name, device).map_err(|e| e.in_file(path))
}

fn build_v2(
    f: &TensorFile,
    hook: Option<String>,
    model_name: Option<String>,
    dev: &Device,
) -> Result<Sae> {
    if f.contains("affine_skip_connection") {
        return Err(unsupported_transcoder("it has an `affine_skip_connection`"));
    }
    let w_enc = f.load("w_enc", dev)?;
    let (d_in, d_sae) = match w_enc.dims() {
        [a, b] => (*a, *b),
        d => {
            return Err(Error::Format {
                format: "gemma-scope-2",
                msg: format!("`w_enc` must be 2-d [d_in, d_sae], found shape {d:?}"),
            })
        }
    };
    let w_dec = f.load("w_dec", dev)?;
    match w_dec.dims() {
        [a, b] if *a == d_sae && *b != d_in => {
            return Err(unsupported_transcoder(&format!(
                "`w_dec` writes {b} outputs, not d_in = {d_in}"
            )))
        }
        [_, _, _] => return Err(unsupported_transcoder("`w_dec` is 3-d (cross-layer)")),
        _ => expect_shape("w_dec", &w_dec, &[d_sae, d_in])?,
    }
    let b_enc = f.load("b_enc", dev)?;
    expect_shape("b_enc", &b_enc, &[d_sae])?;
    let b_dec = f.load("b_dec", dev)?;
    expect_shape("b_dec", &b_dec, &[d_in])?;
    let threshold = f.load("threshold", dev)?;
    expect_shape("threshold", &threshold, &[d_sae])?;
    let mut cfg = SaeConfig::new(Architecture::JumpRelu, d_in, d_sae);
    cfg.apply_b_dec_to_input = false;
    cfg.hook_name = hook;
    cfg.model_name = model_name;
    let w = SaeWeights {
        threshold: Some(threshold),
        ..SaeWeights::new(w_enc, b_enc, w_dec, b_dec)
    };
    Sae::with_format(cfg, w, Format::GemmaScope2)
}
