//! The reference splice: plain candle ops, written to mirror the definitions
//! rather than to be fast. The fused kernels must match it.

use candle_core::{DType, Tensor};

use super::{Edits, SpliceMode};
use crate::sae::Sae;
use crate::Result;

/// Apply `edits` to the activation `x [..., d_in]` through `sae`; returns f32 `[..., d_in]`.
///
/// `ErrorPreserving`: `y = x + denorm(decode(f')) − denorm(decode(f))`;
/// `Reconstruction`: `y = denorm(decode(f')) + skip(x)`; then `y += Σ c_j · W_dec[j]`
/// for every steering entry.
pub fn apply(sae: &Sae, x: &Tensor, edits: &Edits) -> Result<Tensor> {
    edits.validate(sae.d_sae())?;
    let (x2, lead) = sae.flatten_input(x)?;
    let (xn, denorm) = sae.normalize(&x2)?;
    let f = sae.encode_normalized(&xn)?;
    let d_sae = sae.d_sae();
    let mut a = vec![1f32; d_sae];
    let mut b = vec![0f32; d_sae];
    for &(id, e) in edits.latent_edits() {
        let (ai, bi) = e.affine();
        a[id as usize] = ai;
        b[id as usize] = bi;
    }
    let dev = x2.device();
    let f_edit = f
        .broadcast_mul(&Tensor::from_vec(a, d_sae, dev)?)?
        .broadcast_add(&Tensor::from_vec(b, d_sae, dev)?)?;
    let recon_edit = denorm.apply(&sae.decode_raw(&f_edit)?)?;
    let mut y = match edits.mode() {
        SpliceMode::ErrorPreserving => {
            let recon = denorm.apply(&sae.decode_raw(&f)?)?;
            ((&x2 + recon_edit)? - recon)?
        }
        SpliceMode::Reconstruction => match sae.skip_term(&x2)? {
            Some(s) => (recon_edit + s)?,
            None => recon_edit,
        },
    };
    for &(id, c) in edits.steers() {
        let dir = sae.decoder_direction(id as usize)?.to_dtype(DType::F32)?;
        y = y.broadcast_add(&(dir * c as f64)?)?;
    }
    let mut shape = lead;
    shape.push(sae.d_in());
    Ok(y.reshape(shape)?)
}
