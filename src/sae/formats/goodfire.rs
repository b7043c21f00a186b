//! Goodfire SAEs (`Goodfire/Llama-3.1-8B-Instruct-SAE-l19`,
//! `Goodfire/Llama-3.3-70B-Instruct-SAE-l50`): one PyTorch state dict (`.pt`/`.pth`)
//! holding two `nn.Linear` layers:
//!
//! | tensor | shape |
//! |---|---|
//! | `encoder_linear.weight` | `[d_sae, d_in]` |
//! | `encoder_linear.bias` | `[d_sae]` |
//! | `decoder_linear.weight` | `[d_in, d_sae]` |
//! | `decoder_linear.bias` | `[d_in]` |
//!
//! The model is a plain ReLU SAE with no `b_dec` subtraction on the input, as in the
//! `SparseAutoEncoder` class of Goodfire's release notebook ("Goodfire -- Open Source
//! SAE Demo.ipynb", linked from the Hugging Face model cards):
//! `encode(x) = relu(encoder_linear(x))`, `decode(f) = decoder_linear(f)`, i.e.
//! `f = ReLU(x W_encᵀ + b_enc)`, `x̂ = f W_decᵀ + b_dec`. The ESR experiments
//! (agencyenterprise/endogenous-steering-resistance, `experiment_01_esr/__init__.py`,
//! configs `8b`/`70b` with `data/llama-8b-goodfire-l19.csv` and
//! `data/llama-70b-goodfire-l50.csv`) use these two releases.
//!
//! This maps onto [`Architecture::Standard`] with `apply_b_dec_to_input = false`,
//! `W_enc = encoder_linear.weightᵀ` and `W_dec = decoder_linear.weightᵀ` as transposed
//! *views* (no copy), `b_dec = decoder_linear.bias`.
//!
//! The files record no hook point. When the file name contains `l<N>` as a separate
//! token (e.g. `Llama-3.1-8B-Instruct-SAE-l19.pth`), the hook name is set to
//! `blocks.<N>.hook_resid_post`: Goodfire trained on the output of decoder layer `N`
//! (`model.layers[N]`), which is TransformerLens' `blocks.N.hook_resid_post`.
//! Otherwise it is left `None`.

use std::path::Path;

use candle_core::Device;

use super::expect_shape;
use super::Format;
use crate::io::pickle::PthFile;
use crate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
use crate::{Error, Result};

/// Encoder weight, `[d_sae, d_in]`.
pub const ENCODER_WEIGHT: &str = "encoder_linear.weight";
/// Encoder bias, `[d_sae]`.
pub const ENCODER_BIAS: &str = "encoder_linear.bias";
/// Decoder weight, `[d_in, d_sae]`.
pub const DECODER_WEIGHT: &str = "decoder_linear.weight";
/// Decoder bias, `[d_in]`.
pub const DECODER_BIAS: &str = "decoder_linear.bias";

/// Load a Goodfire SAE from its `.pt`/`.pth` file (or a directory holding exactly one).
pub fn load(path: &Path, device: &Device) -> Result<Sae> {
    let file = if path.is_dir() {
        Format::detect(path)?.1
    } else {
        path.to_path_buf()
    };
    let pth = PthFile::open(&file)?;
    load_from(&pth, device).map_err(|e| e.in_file(&file))
}

fn require<'a>(f: &'a PthFile, name: &str) -> Result<&'a [usize]> {
    f.shape(name).ok_or_else(|| Error::MissingTensor {
        name: name.to_string(),
    })
}

/// Build the SAE from an open state dict (shapes are checked before anything is read).
pub fn load_from(f: &PthFile, device: &Device) -> Result<Sae> {
    let enc_shape = require(f, ENCODER_WEIGHT)?;
    let (d_sae, d_in) = match enc_shape {
        [a, b] => (*a, *b),
        other => {
            return Err(Error::Invalid(format!(
                "tensor `{ENCODER_WEIGHT}` has shape {other:?}, expected a 2-D matrix [d_sae, d_in]"
            )))
        }
    };
    for (name, expected) in [
        (ENCODER_BIAS, vec![d_sae]),
        (DECODER_WEIGHT, vec![d_in, d_sae]),
        (DECODER_BIAS, vec![d_in]),
    ] {
        let found = require(f, name)?;
        if found != expected.as_slice() {
            return Err(Error::Shape {
                name: name.into(),
                expected,
                found: found.to_vec(),
            });
        }
    }
    let w_enc = f.load(ENCODER_WEIGHT, device)?;
    let b_enc = f.load(ENCODER_BIAS, device)?;
    let w_dec = f.load(DECODER_WEIGHT, device)?;
    let b_dec = f.load(DECODER_BIAS, device)?;
    expect_shape(ENCODER_WEIGHT, &w_enc, &[d_sae, d_in])?;
    expect_shape(DECODER_WEIGHT, &w_dec, &[d_in, d_sae])?;
    let mut cfg = SaeConfig::new(Architecture::Standard, d_in, d_sae);
    cfg.apply_b_dec_to_input = false;
    cfg.hook_name = hook_from_file_name(f.path());
    let w = SaeWeights::new(w_enc.t()?, b_enc, w_dec.t()?, b_dec);
    Sae::with_format(cfg, w, Format::Goodfire)
}

/// `blocks.N.hook_resid_post` when the file name has an `l<N>` token (`…-SAE-l19.pth`).
fn hook_from_file_name(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?;
    stem.split(['-', '_', '.'])
        .filter_map(|tok| tok.strip_prefix('l').or_else(|| tok.strip_prefix('L')))
        .filter(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|n| n.parse::<usize>().ok())
        .next_back()
        .map(|n| format!("blocks.{n}.hook_resid_post"))
}

#[cfg(test)]
mod tests {
    use super::hook_from_file_name;
    use std::path::Path;

    #[test]
    fn hook_names_from_release_file_names() {
        assert_eq!(
            hook_from_file_name(Path::new("Llama-3.1-8B-Instruct-SAE-l19.pth")).as_deref(),
            Some("blocks.19.hook_resid_post")
        );
        assert_eq!(
            hook_from_file_name(Path::new("/x/Llama-3.3-70B-Instruct-SAE-l50.pt")).as_deref(),
            Some("blocks.50.hook_resid_post")
        );
        assert_eq!(hook_from_file_name(Path::new("sae.pth")), None);
        assert_eq!(hook_from_file_name(Path::new("llama.pth")), None);
    }
}
