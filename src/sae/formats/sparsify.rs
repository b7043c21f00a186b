//! EleutherAI sparsify: a directory with `cfg.json` and `sae.safetensors`.
//!
//! Multi-layer releases hold one such directory per hook point (`layers.0/`,
//! `layers.1/`, `embed_tokens/`, ...). [`load`] accepts the layer directory itself,
//! its `sae.safetensors` or `cfg.json`, or a release directory that holds exactly
//! one layer directory.
//!
//! Tensors (`sparsify/sparse_coder.py`, `SparseCoder`): `encoder.weight [d_sae, d_in]`
//! (an `nn.Linear`), `encoder.bias [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`,
//! and `W_skip [d_in, d_in]` when `skip_connection` is set. `W_enc` is the
//! transposed *view* of `encoder.weight`: nothing is copied.
//!
//! `cfg.json` keys (`sparsify/config.py`, `SparseCoderConfig`, with its defaults when
//! absent): `activation` (`"topk"`; `"groupmax"` is rejected), `k` (32),
//! `num_latents` (0 = `d_in · expansion_factor`), `expansion_factor` (32), `d_in`
//! (taken from `encoder.weight` when absent), `signed` (legacy, false),
//! `transcode` (false), `skip_connection` (false). `multi_topk` and
//! `normalize_decoder` only affect training and are ignored.
//!
//! The mapping to [`Sae`]:
//! * [`Architecture::TopK`] with `k` from the config.
//! * `apply_b_dec_to_input = !transcode`: `SparseCoder.encode` subtracts `b_dec`
//!   unless the model is a transcoder. (SAELens' `get_sparsify_config_from_disk` uses
//!   `not normalize_decoder` instead; we follow sparsify's own code.)
//! * `signed: true` → [`SaeConfig::signed`]: the `k` largest `|pre|` are kept with
//!   their sign and no ReLU (sparsify commit a48257e, "signed SAEs").
//! * `W_dec` is used as stored: row `i` is latent `i`'s direction, as in
//!   `SparseCoder.decode` (`decoder_impl(top_indices, top_acts, W_dec.mT)`). (SAELens'
//!   `sparsify_disk_loader` transposes it; its tests compare only the state dict.)
//! * `W_skip` → [`SaeWeights::w_skip`]: `forward` adds `x W_skipᵀ`, as
//!   `SparseCoder.forward` does.
//! * hook name: a directory named `layers.N` (or `layers_N`) → `blocks.N.hook_resid_post`,
//!   `embed_tokens` → `hook_embed` (as SAELens' `get_sparsify_config_from_disk`);
//!   other names leave it unset.
//!
//! **Order of ReLU and top-k.** sparsify computes `relu(pre)` and then takes the
//! top `k` (`fused_encoder.py`); this crate (like SAELens) takes the top `k` of
//! `pre` and then applies ReLU. Both give the same activations: ReLU is monotone,
//! so the `k` largest of `relu(pre)` are the `k` largest of `pre` whenever at least
//! `k` entries are positive; when fewer than `k` are positive, sparsify's top-k
//! picks all positive entries plus some zeros, ours all positive entries plus some
//! non-positive ones that ReLU maps to zero, so the dense activations agree (only
//! *which* zero entries are "selected" differs, which changes nothing).

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::Value;

use super::expect_shape;
use super::{read_json, Format};
use crate::io::TensorFile;
use crate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
use crate::{Error, Result};

/// The weights file name.
pub const WEIGHTS_FILE: &str = "sae.safetensors";
/// The config file name.
pub const CFG_FILE: &str = "cfg.json";

fn key<'a>(cfg: &'a Value, k: &str) -> Option<&'a Value> {
    cfg.get(k).filter(|v| !v.is_null())
}

fn usize_or(cfg: &Value, k: &str, default: usize) -> Result<usize> {
    match key(cfg, k) {
        None => Ok(default),
        Some(_) => super::saelens::usize_key(cfg, k),
    }
}

fn bool_or(cfg: &Value, k: &str, default: bool) -> Result<bool> {
    match key(cfg, k) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(Error::Config(format!(
            "`{k}` must be true or false, got {v}"
        ))),
    }
}

/// Find the layer directory: `path` itself if it holds `sae.safetensors`, or its
/// single sub-directory that does.
fn layer_dir(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf());
    }
    if path.join(WEIGHTS_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    let rd = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    let mut layers: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(WEIGHTS_FILE).is_file())
        .collect();
    layers.sort();
    match layers.len() {
        1 => Ok(layers.remove(0)),
        0 => Err(Error::UnknownFormat {
            path: path.display().to_string(),
            why: format!("no {WEIGHTS_FILE} here or in a layer sub-directory"),
        }),
        _ => Err(Error::Invalid(format!(
            "{}: a multi-layer sparsify release; pass one layer directory: {}",
            path.display(),
            layers
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The TransformerLens hook name for a sparsify layer directory name.
fn hook_name(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?;
    if name == "embed_tokens" {
        return Some("hook_embed".into());
    }
    let n = name
        .strip_prefix("layers.")
        .or_else(|| name.strip_prefix("layers_"))?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = n.parse().ok()?;
    Some(format!("blocks.{layer}.hook_resid_post"))
}

/// Parse a sparsify `cfg.json`, with `d_in_from_weights` (the second dimension of
/// `encoder.weight`) used when the config has no `d_in`.
pub fn parse_config(cfg: &Value, d_in_from_weights: Option<usize>) -> Result<SaeConfig> {
    if !cfg.is_object() {
        return Err(Error::Config("cfg.json must be a JSON object".into()));
    }
    match key(cfg, "activation") {
        None => {}
        Some(Value::String(a)) if a == "topk" => {}
        Some(Value::String(a)) if a == "groupmax" => {
            return Err(Error::Config(
                "sparsify activation `groupmax` is not supported (only `topk`)".into(),
            ))
        }
        Some(other) => {
            return Err(Error::Config(format!(
                "unknown sparsify activation {other} (expected \"topk\")"
            )))
        }
    }
    let d_in = match key(cfg, "d_in") {
        Some(_) => super::saelens::usize_key(cfg, "d_in")?,
        None => d_in_from_weights
            .ok_or_else(|| Error::Config("no `d_in` and no encoder.weight to infer it".into()))?,
    };
    let k = usize_or(cfg, "k", 32)?;
    let num_latents = usize_or(cfg, "num_latents", 0)?;
    let d_sae = if num_latents == 0 {
        let ef = usize_or(cfg, "expansion_factor", 32)?;
        d_in.checked_mul(ef).ok_or_else(|| {
            Error::Config(format!("d_in {d_in} × expansion_factor {ef} overflows"))
        })?
    } else {
        num_latents
    };
    let mut c = SaeConfig::new(Architecture::TopK, d_in, d_sae);
    c.k = k;
    c.signed = bool_or(cfg, "signed", false)?;
    c.apply_b_dec_to_input = !bool_or(cfg, "transcode", false)?;
    // Validated here so a bad value is reported even though training-only.
    bool_or(cfg, "multi_topk", false)?;
    Ok(c)
}

/// Load a sparsify SAE from a layer directory, its `sae.safetensors` or `cfg.json`,
/// or a release directory with exactly one layer directory.
pub fn load(path: &Path, device: &Device) -> Result<Sae> {
    let dir = layer_dir(path)?;
    let weights = if path.is_file() && path.file_name().is_some_and(|n| n != CFG_FILE) {
        path.to_path_buf()
    } else {
        dir.join(WEIGHTS_FILE)
    };
    let cfg_path = dir.join(CFG_FILE);
    let raw = read_json(&cfg_path)?;
    let file = TensorFile::open(&weights)?;
    let d_in_w = file.shape("encoder.weight").and_then(|s| s.get(1).copied());
    let mut cfg = parse_config(&raw, d_in_w).map_err(|e| e.in_file(&cfg_path))?;
    cfg.hook_name = hook_name(&dir);
    let skip = bool_or(&raw, "skip_connection", false).map_err(|e| e.in_file(&cfg_path))?;
    load_weights(cfg, skip, &file, device).map_err(|e| e.in_file(&weights))
}

fn load_weights(cfg: SaeConfig, skip: bool, f: &TensorFile, dev: &Device) -> Result<Sae> {
    let (d_in, d_sae) = (cfg.d_in, cfg.d_sae);
    let enc = f.load("encoder.weight", dev)?;
    expect_shape("encoder.weight", &enc, &[d_sae, d_in])?;
    let b_enc = f.load("encoder.bias", dev)?;
    expect_shape("encoder.bias", &b_enc, &[d_sae])?;
    let w_dec = f.load("W_dec", dev)?;
    expect_shape("W_dec", &w_dec, &[d_sae, d_in])?;
    let b_dec = f.load("b_dec", dev)?;
    expect_shape("b_dec", &b_dec, &[d_in])?;
    let w_skip = if skip {
        let s = f.load("W_skip", dev)?;
        expect_shape("W_skip", &s, &[d_in, d_in])?;
        Some(s)
    } else {
        None
    };
    let w = SaeWeights {
        w_skip,
        ..SaeWeights::new(enc.t()?, b_enc, w_dec, b_dec)
    };
    Sae::with_format(cfg, w, Format::Sparsify)
}
