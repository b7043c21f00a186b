//! The reference (plain candle) SAE math. The fused kernels are tested against it.

use candle_core::{DType, Tensor, D};

use super::{Architecture, Normalization, Sae};
use crate::{Error, Result};

/// What undoes the SAE's input normalization on its output: `y · scale + shift`.
/// Each part is absent, a scalar, or one value per token (`[N, 1]`).
#[derive(Debug, Clone)]
pub struct Denorm {
    scale: Option<Tensor>,
    shift: Option<Tensor>,
}

impl Denorm {
    /// The identity.
    pub fn identity() -> Self {
        Denorm {
            scale: None,
            shift: None,
        }
    }

    /// Map SAE-space outputs `[N, d_in]` back to the input space.
    pub fn apply(&self, y: &Tensor) -> Result<Tensor> {
        let mut y = y.clone();
        if let Some(s) = &self.scale {
            y = y.broadcast_mul(s)?;
        }
        if let Some(m) = &self.shift {
            y = y.broadcast_add(m)?;
        }
        Ok(y)
    }

    /// Scale only (no shift): maps a *difference* of SAE outputs to the input space.
    pub fn apply_scale(&self, y: &Tensor) -> Result<Tensor> {
        match &self.scale {
            Some(s) => Ok(y.broadcast_mul(s)?),
            None => Ok(y.clone()),
        }
    }
}

impl Sae {
    /// Check `x`'s last dimension and flatten it to `[N, d_in]` f32; returns the leading dims.
    pub(crate) fn flatten_input(&self, x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
        let dims = x.dims();
        match dims.last() {
            Some(&d) if d == self.cfg.d_in => {}
            _ => {
                return Err(Error::InputDim {
                    shape: dims.to_vec(),
                    d_in: self.cfg.d_in,
                })
            }
        }
        let lead = dims[..dims.len() - 1].to_vec();
        let n: usize = lead.iter().product();
        let x = x.to_dtype(DType::F32)?.reshape((n, self.cfg.d_in))?;
        Ok((x, lead))
    }

    fn unflatten(t: &Tensor, lead: &[usize], last: usize) -> Result<Tensor> {
        let mut shape = lead.to_vec();
        shape.push(last);
        Ok(t.reshape(shape)?)
    }

    fn f32(t: &Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?)
    }

    /// Normalize `[N, d_in]` f32 input as SAELens' `run_time_activation_norm_fn_in`,
    /// returning the normalized input and what undoes it on the output.
    pub fn normalize(&self, x: &Tensor) -> Result<(Tensor, Denorm)> {
        match self.cfg.normalization {
            Normalization::None => Ok((x.clone(), Denorm::identity())),
            Normalization::ExpectedAverageOnlyIn { scaling_factor } => {
                let s = scaling_factor as f64;
                let inv = Tensor::new(&[1.0 / scaling_factor], x.device())?;
                Ok((
                    (x * s)?,
                    Denorm {
                        scale: Some(inv),
                        shift: None,
                    },
                ))
            }
            Normalization::ConstantNormRescale => {
                // coeff = √d_in / ‖x‖; output divided by coeff.
                let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
                let inv_coeff = (norm / (self.cfg.d_in as f64).sqrt())?;
                Ok((
                    x.broadcast_div(&inv_coeff)?,
                    Denorm {
                        scale: Some(inv_coeff),
                        shift: None,
                    },
                ))
            }
            Normalization::LayerNorm => {
                let d = self.cfg.d_in;
                let mu = x.mean_keepdim(D::Minus1)?;
                let xc = x.broadcast_sub(&mu)?;
                // torch.std default: unbiased (divide by d - 1).
                let denom = if d > 1 { (d - 1) as f64 } else { 1.0 };
                let std = (xc.sqr()?.sum_keepdim(D::Minus1)? / denom)?.sqrt()?;
                let xn = xc.broadcast_div(&(&std + 1e-5)?)?;
                Ok((
                    xn,
                    Denorm {
                        scale: Some(std),
                        shift: Some(mu),
                    },
                ))
            }
        }
    }

    /// The encoder input `x' = xn − b_dec·[apply_b_dec_to_input]` for normalized `xn`.
    fn sae_in(&self, xn: &Tensor) -> Result<Tensor> {
        if self.cfg.apply_b_dec_to_input {
            Ok(xn.broadcast_sub(&Self::f32(&self.w.b_dec)?)?)
        } else {
            Ok(xn.clone())
        }
    }

    /// `‖W_dec[i]‖` for every latent, f32 `[d_sae]`.
    pub(crate) fn decoder_norms(&self) -> Result<Tensor> {
        Ok(Self::f32(&self.w.w_dec)?.sqr()?.sum(D::Minus1)?.sqrt()?)
    }

    /// Pre-activations `x' W_enc + b_enc` of normalized input `[N, d_in]`.
    /// (For gated SAEs: the gate pre-activations, with `b_gate`.)
    pub(crate) fn pre_activations(&self, xn: &Tensor) -> Result<Tensor> {
        let x = self.sae_in(xn)?;
        let pre = x.matmul(&Self::f32(&self.w.w_enc)?)?;
        Ok(pre.broadcast_add(&Self::f32(&self.w.b_enc)?)?)
    }

    /// Latent activations of normalized input `[N, d_in]` → `[N, d_sae]`.
    pub(crate) fn encode_normalized(&self, xn: &Tensor) -> Result<Tensor> {
        let pre = self.pre_activations(xn)?;
        match self.cfg.architecture {
            Architecture::Standard => Ok(pre.relu()?),
            Architecture::JumpRelu => {
                let thr = self
                    .w
                    .threshold
                    .as_ref()
                    .ok_or_else(|| Error::MissingTensor {
                        name: "threshold".into(),
                    })?;
                let mask = pre.broadcast_gt(&Self::f32(thr)?)?.to_dtype(DType::F32)?;
                Ok((pre.relu()? * mask)?)
            }
            Architecture::Gated => {
                let (r_mag, b_mag) = match (&self.w.r_mag, &self.w.b_mag) {
                    (Some(r), Some(b)) => (r, b),
                    _ => {
                        return Err(Error::MissingTensor {
                            name: "r_mag/b_mag".into(),
                        })
                    }
                };
                let gate = pre.gt(0f64)?.to_dtype(DType::F32)?;
                // x' (W_enc ⊙ exp(r_mag)) = (x' W_enc) ⊙ exp(r_mag): same value, no weight copy.
                let xw = pre.broadcast_sub(&Self::f32(&self.w.b_enc)?)?;
                let mag = xw
                    .broadcast_mul(&Self::f32(r_mag)?.exp()?)?
                    .broadcast_add(&Self::f32(b_mag)?)?
                    .relu()?;
                Ok((gate * mag)?)
            }
            Architecture::TopK => {
                let pre = if self.cfg.rescale_acts_by_decoder_norm {
                    pre.broadcast_mul(&self.decoder_norms()?)?
                } else {
                    pre
                };
                self.topk_dense(&pre)
            }
        }
    }

    /// Keep the `k` largest pre-activations per row (ties → lower id), ReLU them,
    /// zero the rest. Signed variant: largest `|pre|`, sign kept.
    fn topk_dense(&self, pre: &Tensor) -> Result<Tensor> {
        let (n, d) = pre.dims2()?;
        let k = self.cfg.k.min(d);
        let rows = pre.to_vec2::<f32>()?;
        let mut out = vec![0f32; n * d];
        let mut idx: Vec<usize> = Vec::with_capacity(d);
        for (r, row) in rows.iter().enumerate() {
            idx.clear();
            idx.extend(0..d);
            let key = |i: usize| {
                if self.cfg.signed {
                    row[i].abs()
                } else {
                    row[i]
                }
            };
            idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
            for &i in &idx[..k] {
                let v = row[i];
                out[r * d + i] = if self.cfg.signed { v } else { v.max(0.0) };
            }
        }
        Ok(Tensor::from_vec(out, (n, d), pre.device())?)
    }

    /// Decoder output in SAE space `f W_dec + b_dec` for `[N, d_sae]` latents
    /// (dividing by `‖W_dec[i]‖` first for rescaled TopK SAEs).
    pub(crate) fn decode_raw(&self, f: &Tensor) -> Result<Tensor> {
        let f = if self.cfg.rescale_acts_by_decoder_norm {
            f.broadcast_div(&self.decoder_norms()?)?
        } else {
            f.clone()
        };
        Ok(f.matmul(&Self::f32(&self.w.w_dec)?)?
            .broadcast_add(&Self::f32(&self.w.b_dec)?)?)
    }

    /// The skip term `x W_skipᵀ` (sparsify), if the SAE has one.
    pub(crate) fn skip_term(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match &self.w.w_skip {
            Some(s) => Ok(Some(x.matmul(&Self::f32(s)?.t()?)?)),
            None => Ok(None),
        }
    }

    /// Latent activations `f`, f32 `[..., d_sae]`, for input `[..., d_in]` of any float dtype.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let (x, lead) = self.flatten_input(x)?;
        let (xn, _) = self.normalize(&x)?;
        let f = self.encode_normalized(&xn)?;
        Self::unflatten(&f, &lead, self.cfg.d_sae)
    }

    /// The `k` strongest latents of each token of `x [..., d_in]`: per token (in row-major
    /// order of the leading dimensions), the non-zero `(latent id, activation)` pairs of
    /// [`Sae::encode`], largest activation first (ties: lower id first), at most `k`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
    /// # fn main() -> sae_ablate::Result<()> {
    /// let dev = Device::Cpu;
    /// let eye = Tensor::new(&[[1f32, 0., 0.], [0., 1., 0.], [0., 0., 1.]], &dev)?;
    /// let zeros = Tensor::zeros(3, candle_core::DType::F32, &dev)?;
    /// let sae = Sae::new(SaeConfig::new(Architecture::Standard, 3, 3),
    ///     SaeWeights::new(eye.clone(), zeros.clone(), eye, zeros))?;
    /// let top = sae.top_latents(&Tensor::new(&[[0.5f32, -1., 2.]], &dev)?, 2)?;
    /// assert_eq!(top, vec![vec![(2, 2.0), (0, 0.5)]]);
    /// # Ok(()) }
    /// ```
    pub fn top_latents(&self, x: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let d_sae = self.cfg.d_sae;
        let f = self.encode(x)?;
        let rows = f.elem_count() / d_sae;
        let f = f.reshape((rows, d_sae))?.to_vec2::<f32>()?;
        Ok(f.iter()
            .map(|row| {
                let mut nz: Vec<(u32, f32)> = (0u32..)
                    .zip(row.iter().copied())
                    .filter(|&(_, v)| v != 0.0)
                    .collect();
                let by_value =
                    |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
                if nz.len() > k {
                    nz.select_nth_unstable_by(k, by_value);
                    nz.truncate(k);
                }
                nz.sort_unstable_by(by_value);
                nz
            })
            .collect())
    }

    /// Decode latents `[..., d_sae]` to `f W_dec + b_dec`, f32 `[..., d_in]`.
    ///
    /// A constant (`expected_average_only_in`) normalization is undone, as SAELens does
    /// after folding it. Per-token normalizations (`constant_norm_rescale`,
    /// `layer_norm`) need the input's statistics: use [`Sae::forward`] or
    /// [`Sae::normalize`] + [`Denorm::apply`] for those; here the output stays in SAE space.
    pub fn decode(&self, f: &Tensor) -> Result<Tensor> {
        let dims = f.dims();
        match dims.last() {
            Some(&d) if d == self.cfg.d_sae => {}
            _ => {
                return Err(Error::Invalid(format!(
                    "latents have shape {dims:?}: the last dimension must equal d_sae = {}",
                    self.cfg.d_sae
                )))
            }
        }
        let lead = dims[..dims.len() - 1].to_vec();
        let n: usize = lead.iter().product();
        let f = f.to_dtype(DType::F32)?.reshape((n, self.cfg.d_sae))?;
        let mut y = self.decode_raw(&f)?;
        if let Normalization::ExpectedAverageOnlyIn { scaling_factor } = self.cfg.normalization {
            y = (y / scaling_factor as f64)?;
        }
        Self::unflatten(&y, &lead, self.cfg.d_in)
    }

    /// Full reconstruction `x̂ = denorm(f W_dec + b_dec)` (+ the skip term), f32 `[..., d_in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x, lead) = self.flatten_input(x)?;
        let (xn, denorm) = self.normalize(&x)?;
        let f = self.encode_normalized(&xn)?;
        let mut y = denorm.apply(&self.decode_raw(&f)?)?;
        if let Some(s) = self.skip_term(&x)? {
            y = (y + s)?;
        }
        Self::unflatten(&y, &lead, self.cfg.d_in)
    }
}
