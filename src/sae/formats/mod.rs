//! On-disk SAE formats. A loader's only job is to turn a release into an
//! [`Sae`](super::Sae); all math lives in `sae::math`.

pub mod dictionary_learning;
pub mod gemma_scope;
pub mod goodfire;
pub mod llama_scope;
pub mod saelens;
pub mod sparsify;

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::Sae;
use crate::{Error, Result};

/// The on-disk format an SAE came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// SAELens: `cfg.json` + `sae_weights.safetensors`.
    SaeLens,
    /// EleutherAI sparsify: `cfg.json` + `sae.safetensors`.
    Sparsify,
    /// Goodfire: a PyTorch state dict (`.pt`/`.pth`) with `encoder_linear`/`decoder_linear`.
    Goodfire,
    /// Gemma Scope: `params.npz`.
    GemmaScope,
    /// Gemma Scope 2: `params.safetensors` + `config.json`.
    GemmaScope2,
    /// Llama Scope: `final.safetensors` + `hyperparams.json`.
    LlamaScope,
    /// dictionary_learning: `ae.pt` (+ `config.json`).
    DictionaryLearning,
    /// Built in memory, not loaded from a file.
    Memory,
}

impl Format {
    /// A short name, as printed by `sae-ablate inspect`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Format::SaeLens => "saelens",
            Format::Sparsify => "sparsify",
            Format::Goodfire => "goodfire",
            Format::GemmaScope => "gemma-scope",
            Format::GemmaScope2 => "gemma-scope-2",
            Format::LlamaScope => "llama-scope",
            Format::DictionaryLearning => "dictionary-learning",
            Format::Memory => "memory",
        }
    }

    /// Recognise the format of a release directory or weights file by its file names:
    ///
    /// | found | format |
    /// |---|---|
    /// | `sae_weights.safetensors` (+ `cfg.json`) | SAELens |
    /// | `sae.safetensors` (+ `cfg.json`), or `*/sae.safetensors` one level down | sparsify |
    /// | `params.npz` | Gemma Scope |
    /// | `params.safetensors` (+ `config.json`) | Gemma Scope 2 |
    /// | `final.safetensors` / `checkpoints/final.safetensors` (+ `hyperparams.json`) | Llama Scope |
    /// | `ae.pt` | dictionary_learning |
    /// | another `.pt`/`.pth` | Goodfire |
    pub fn detect(path: &Path) -> Result<(Format, PathBuf)> {
        let unknown = |why: &str| Error::UnknownFormat {
            path: path.display().to_string(),
            why: why.to_string(),
        };
        if path.is_dir() {
            let candidates: [(&str, Format); 7] = [
                ("sae_weights.safetensors", Format::SaeLens),
                ("sae.safetensors", Format::Sparsify),
                ("params.npz", Format::GemmaScope),
                ("params.safetensors", Format::GemmaScope2),
                ("final.safetensors", Format::LlamaScope),
                ("checkpoints/final.safetensors", Format::LlamaScope),
                ("ae.pt", Format::DictionaryLearning),
            ];
            for (name, fmt) in candidates {
                let p = path.join(name);
                if p.is_file() {
                    return Ok((fmt, p));
                }
            }
            let entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            // A multi-layer sparsify release: `layers.N/sae.safetensors` one level down
            // (the sparsify loader picks the single layer or lists the choices).
            if entries.iter().any(|p| p.join("sae.safetensors").is_file()) {
                return Ok((Format::Sparsify, path.to_path_buf()));
            }
            let mut pts: Vec<PathBuf> = entries
                .into_iter()
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("pt" | "pth")))
                .collect();
            pts.sort();
            return match pts.len() {
                1 => Ok((Format::Goodfire, pts.remove(0))),
                0 => Err(unknown(
                    "no sae_weights.safetensors, sae.safetensors, params.npz, params.safetensors, \
                     final.safetensors, ae.pt or .pt/.pth file found",
                )),
                _ => Err(unknown("several .pt/.pth files: pass the one to load")),
            };
        }
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let fmt = match name {
            "sae_weights.safetensors" => Format::SaeLens,
            "sae.safetensors" => Format::Sparsify,
            "params.npz" => Format::GemmaScope,
            "params.safetensors" => Format::GemmaScope2,
            "final.safetensors" => Format::LlamaScope,
            "ae.pt" => Format::DictionaryLearning,
            _ if ext == "npz" => Format::GemmaScope,
            _ if ext == "pt" || ext == "pth" => Format::Goodfire,
            _ => return Err(unknown("unrecognised file name")),
        };
        Ok((fmt, path.to_path_buf()))
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Detect the format of `path` and load it.
pub(crate) fn load(path: &Path, device: &Device) -> Result<Sae> {
    let (fmt, file) = Format::detect(path)?;
    match fmt {
        Format::SaeLens => saelens::load(&file, device),
        Format::Sparsify => sparsify::load(&file, device),
        Format::GemmaScope | Format::GemmaScope2 => gemma_scope::load(&file, device),
        Format::LlamaScope => llama_scope::load(&file, device),
        Format::DictionaryLearning => dictionary_learning::load(&file, device),
        Format::Goodfire => goodfire::load(&file, device),
        Format::Memory => Err(Error::Invalid("nothing to load".into())),
    }
}

/// Check a loaded tensor's shape; the error names the tensor, expected and found shape.
pub(crate) fn expect_shape(name: &str, t: &candle_core::Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::Shape {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// Read and parse a JSON file, naming the file in every error.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format("json", e.to_string()).in_file(path))
}

/// The file's sibling `name` (for a weights file) or `path/name` (for a directory).
pub(crate) fn sibling(path: &Path, name: &str) -> PathBuf {
    if path.is_dir() {
        path.join(name)
    } else {
        path.parent().unwrap_or(Path::new(".")).join(name)
    }
}
