//! The fused splice on the CPU.
//!
//! [`EditPlan`] gathers, once, what a splice needs; [`EditPlan::apply`] then runs
//! one pass over the tokens:
//!
//! * masked path (error-preserving edits of standard, JumpReLU and gated SAEs):
//!   only the |S| edited latents' encoder columns and decoder rows are touched,
//!   `O(|S|·d_in)` per token and nothing of size `d_sae`;
//! * full path (TopK, reconstruction): dense encode in the weights' stored dtype,
//!   a fused epilogue that yields a sparse (index, value) list per token (TopK by a
//!   bounded heap, never a full sort), and a sparse decode of the active rows only.
//!
//! The reference splice ([`crate::edit::reference`]) is the oracle in the tests.

use std::cmp::Reverse;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::edit::{Edits, SpliceMode};
use crate::kernels::encode::{encode_dense, View2};
use crate::kernels::simd::{axpy, dot, Elem};
use crate::sae::{Architecture, Normalization, Sae};
use crate::topk::{top_k, Cand, TopKHeap};
use crate::{Error, Result};

/// Everything a splice needs, gathered once from an [`Sae`] and [`Edits`]
/// and reused for every call.
///
/// ```
/// # use candle_core::{Device, Tensor, DType};
/// # use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
/// use sae_ablate::edit::{Edits, SpliceMode};
/// use sae_ablate::edit::EditPlan;
/// # fn main() -> sae_ablate::Result<()> {
/// # let dev = Device::Cpu;
/// # let eye = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev)?;
/// # let z = Tensor::zeros(2, DType::F32, &dev)?;
/// # let sae = Sae::new(SaeConfig::new(Architecture::Standard, 2, 2), SaeWeights {
/// #     w_enc: eye.clone(), b_enc: z.clone(), w_dec: eye, b_dec: z,
/// #     threshold: None, r_mag: None, b_mag: None, w_skip: None })?;
/// let plan = EditPlan::new(&sae, &Edits::new(SpliceMode::ErrorPreserving).zero(&[0]))?;
/// let y = plan.apply(&Tensor::new(&[[3f32, 1.]], &dev)?)?;
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![0.0, 1.0]]);
/// # Ok(()) }
/// ```
pub struct EditPlan {
    sae: Sae,
    mode: SpliceMode,
    masked: bool,
    d_in: usize,
    /// Edited latent ids and their affine edits `f' = a·f + b`.
    ids: Vec<u32>,
    a: Vec<f32>,
    b: Vec<f32>,
    /// Masked path: gathered encoder columns `[|S|, d_in]` and per-latent parameters.
    enc: Vec<f32>,
    b_enc_s: Vec<f32>,
    thr_s: Vec<f32>,
    rmag_s: Vec<f32>,
    bmag_s: Vec<f32>,
    /// Decoder rows of the edited latents `[|S|, d_in]` (÷ ‖W_dec[i]‖ for rescaled TopK).
    dec: Vec<f32>,
    b_dec: Vec<f32>,
    /// Σ c_j W_dec[j] over the steering entries.
    steer: Option<Vec<f32>>,
    /// Per-latent vectors over d_sae (f32), for the full path and `encode`.
    full: FullParams,
    /// sparsify skip connection `W_skip [d_in, d_in]` (f32), used by reconstructions.
    skip: Option<Vec<f32>>,
}

struct FullParams {
    b_enc: Vec<f32>,
    thr: Vec<f32>,
    rmag: Vec<f32>,
    bmag: Vec<f32>,
    /// 1/‖W_dec[i]‖ for rescaled TopK, else empty.
    inv_norm: Vec<f32>,
    norm: Vec<f32>,
}

/// `t` flattened to f32 values.
pub(crate) fn vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// [`vec_f32`] of an optional tensor; empty when absent.
pub(crate) fn opt_vec(t: &Option<Tensor>) -> Result<Vec<f32>> {
    t.as_ref()
        .map(vec_f32)
        .transpose()
        .map(Option::unwrap_or_default)
}

impl EditPlan {
    /// Validate `edits` against `sae` and gather what the kernels need.
    pub fn new(sae: &Sae, edits: &Edits) -> Result<Self> {
        edits.validate(sae.d_sae())?;
        if !matches!(sae.device(), Device::Cpu) {
            return Err(Error::Invalid(
                "EditPlan: the CPU kernels need CPU weights".into(),
            ));
        }
        let c = sae.config();
        let w = sae.weights();
        let d_in = c.d_in;
        let mode = edits.mode();
        let masked = mode == SpliceMode::ErrorPreserving && c.architecture != Architecture::TopK;
        let ids: Vec<u32> = edits.latent_edits().iter().map(|(i, _)| *i).collect();
        let (a, b): (Vec<f32>, Vec<f32>) =
            edits.latent_edits().iter().map(|(_, e)| e.affine()).unzip();
        // Row `id` of a 2-D weight for each edited latent, whatever the view's strides:
        // |S|·d_in values, nothing of size d_sae.
        let gather_rows = |t: &Tensor| -> Result<Vec<f32>> {
            let mut out = Vec::with_capacity(ids.len() * d_in);
            for &id in &ids {
                out.extend(vec_f32(&t.narrow(0, id as usize, 1)?)?);
            }
            Ok(out)
        };
        let mut dec = gather_rows(&w.w_dec)?;
        let norms = if c.rescale_acts_by_decoder_norm {
            vec_f32(&sae.decoder_norms()?)?
        } else {
            Vec::new()
        };
        if !norms.is_empty() {
            for (row, &id) in dec.chunks_mut(d_in).zip(&ids) {
                let n = norms.get(id as usize).copied().unwrap_or(1.0);
                row.iter_mut().for_each(|v| *v /= n);
            }
        }
        let pick = |v: &[f32]| -> Vec<f32> {
            ids.iter()
                .filter_map(|&i| v.get(i as usize).copied())
                .collect()
        };
        // Per-latent vectors over d_sae, built once (the full path and `encode` use them).
        let full = FullParams {
            b_enc: vec_f32(&w.b_enc)?,
            thr: opt_vec(&w.threshold)?,
            rmag: opt_vec(&w.r_mag)?.iter().map(|v| v.exp()).collect(),
            bmag: opt_vec(&w.b_mag)?,
            inv_norm: norms.iter().map(|n| 1.0 / n).collect(),
            norm: norms,
        };
        // Masked path: the |S| encoder columns and their parameters, gathered compactly.
        let (enc, b_enc_s, thr_s, rmag_s, bmag_s) = if masked {
            (
                gather_rows(&w.w_enc.t()?)?,
                pick(&full.b_enc),
                pick(&full.thr),
                pick(&full.rmag),
                pick(&full.bmag),
            )
        } else {
            Default::default()
        };
        let steer = if edits.steers().is_empty() {
            None
        } else {
            let mut s = vec![0f32; d_in];
            for &(id, coef) in edits.steers() {
                let row = vec_f32(&sae.decoder_direction(id as usize)?)?;
                s.iter_mut().zip(&row).for_each(|(s, r)| *s += coef * r);
            }
            Some(s)
        };
        Ok(EditPlan {
            sae: sae.clone(),
            mode,
            masked,
            d_in,
            ids,
            a,
            b,
            enc,
            b_enc_s,
            thr_s,
            rmag_s,
            bmag_s,
            dec,
            b_dec: vec_f32(&w.b_dec)?,
            steer,
            full,
            skip: match (&w.w_skip, mode) {
                (Some(t), SpliceMode::Reconstruction) => Some(vec_f32(t)?),
                _ => None,
            },
        })
    }

    /// Whether this plan runs the masked (|S|-column) path.
    pub fn is_masked(&self) -> bool {
        self.masked
    }

    /// Apply the splice to `x [..., d_in]` (f32, f16 or bf16, any strides); returns f32 of the
    /// same shape. Runs as a candle custom op (`x.apply_op1_no_bwd(plan)`).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        Ok(x.apply_op1_no_bwd(self)?)
    }

    /// Dense latent activations `[..., d_sae]` (f32) through the fused full path:
    /// the same values as [`Sae::encode`], without the edits.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let (x2, lead) = self.sae.flatten_input(x)?;
        let xv = x2.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (d, n_lat) = (self.d_in, self.sae.d_sae());
        let n = xv.len() / d;
        let mut out = vec![0f32; n * n_lat];
        if n > 0 {
            let (mut pre, _) = self.encode_pre(&xv)?;
            pre.par_chunks_mut(n_lat)
                .zip(out.par_chunks_mut(n_lat))
                .for_each_init(Vec::new, |active, (pt, o)| {
                    self.epilogue(pt, &self.full, active);
                    for &(i, v) in active.iter() {
                        o[i as usize] = v;
                    }
                });
        }
        let mut shape = lead;
        shape.push(n_lat);
        Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        match x.dims().last() {
            Some(&d) if d == self.d_in => Ok(()),
            _ => Err(Error::InputDim {
                shape: x.dims().to_vec(),
                d_in: self.d_in,
            }),
        }
    }

    /// The input width the plan expects.
    #[cfg_attr(not(feature = "ndarray"), allow(dead_code))]
    pub(crate) fn d_in(&self) -> usize {
        self.d_in
    }

    /// Run the splice on `n` row-major f32 tokens: `x` and `y` both hold `n·d_in` values
    /// (the caller checks), `y` is overwritten.
    pub(crate) fn run(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        if self.masked {
            self.run_masked(x, y);
            Ok(())
        } else {
            self.run_full(x, y)
        }
    }

    /// Normalize one token into `xs` (the encoder input, `b_dec` subtracted when configured);
    /// returns the denormalization `(scale, shift)`.
    fn prepare(&self, x: &[f32], xs: &mut [f32]) -> (f32, f32) {
        let c = self.sae.config();
        let d = self.d_in as f32;
        let (mul, sub, scale, shift) = match c.normalization {
            Normalization::None => (1.0, 0.0, 1.0, 0.0),
            Normalization::ExpectedAverageOnlyIn { scaling_factor } => {
                (scaling_factor, 0.0, 1.0 / scaling_factor, 0.0)
            }
            Normalization::ConstantNormRescale => {
                let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
                let coeff = d.sqrt() / norm;
                (coeff, 0.0, 1.0 / coeff, 0.0)
            }
            Normalization::LayerNorm => {
                let mu = x.iter().sum::<f32>() / d;
                let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>()
                    / if self.d_in > 1 { d - 1.0 } else { 1.0 };
                let std = var.sqrt();
                (1.0 / (std + 1e-5), mu, std, mu)
            }
        };
        let bd = c.apply_b_dec_to_input;
        for (k, o) in xs.iter_mut().enumerate() {
            let v = (x[k] - sub) * mul;
            *o = if bd { v - self.b_dec[k] } else { v };
        }
        (scale, shift)
    }

    fn act_masked(&self, j: usize, pre: f32) -> f32 {
        match self.sae.architecture() {
            Architecture::Standard | Architecture::TopK => pre.max(0.0),
            Architecture::JumpRelu => {
                if pre > self.thr_s[j] {
                    pre.max(0.0)
                } else {
                    0.0
                }
            }
            Architecture::Gated => {
                if pre > 0.0 {
                    ((pre - self.b_enc_s[j]) * self.rmag_s[j] + self.bmag_s[j]).max(0.0)
                } else {
                    0.0
                }
            }
        }
    }

    fn run_masked(&self, x: &[f32], y: &mut [f32]) {
        let d = self.d_in;
        x.par_chunks(d).zip(y.par_chunks_mut(d)).for_each_init(
            || vec![0f32; d],
            |xs, (xt, yt)| {
                yt.copy_from_slice(xt);
                if !self.ids.is_empty() {
                    let (scale, _) = self.prepare(xt, xs);
                    for j in 0..self.ids.len() {
                        let pre = dot(xs, &self.enc[j * d..(j + 1) * d]) + self.b_enc_s[j];
                        let f = self.act_masked(j, pre);
                        let delta = self.a[j] * f + self.b[j] - f;
                        if delta != 0.0 {
                            axpy(yt, scale * delta, &self.dec[j * d..(j + 1) * d]);
                        }
                    }
                }
                if let Some(s) = &self.steer {
                    yt.iter_mut().zip(s).for_each(|(y, s)| *y += s);
                }
            },
        );
    }

    /// Normalize every token and run the dense encode: returns the pre-activations
    /// `[n, d_sae]` and each token's denormalization `(scale, shift)`.
    fn encode_pre(&self, x: &[f32]) -> Result<(Vec<f32>, Vec<TokenDenorm>)> {
        let (d, n_lat) = (self.d_in, self.sae.d_sae());
        let n = x.len() / d;
        let mut xs = vec![0f32; n * d];
        let mut denorm = vec![(1f32, 0f32); n];
        x.par_chunks(d)
            .zip(xs.par_chunks_mut(d))
            .zip(denorm.par_iter_mut())
            .for_each(|((xt, st), dn)| *dn = self.prepare(xt, st));
        let mut pre = vec![0f32; n * n_lat];
        let w_enc = &self.sae.weights().w_enc;
        let (st, l) = w_enc.storage_and_layout();
        let Storage::Cpu(cpu) = &*st else {
            return Err(Error::Invalid(
                "EditPlan: weights must be on the CPU".into(),
            ));
        };
        let v = View2 {
            s0: l.stride().first().copied().unwrap_or(0),
            s1: l.stride().get(1).copied().unwrap_or(0),
            off: l.start_offset(),
        };
        let b = &self.full.b_enc;
        match w_enc.dtype() {
            DType::F32 => encode_dense(&xs, n, d, cpu.as_slice::<f32>()?, v, b, &mut pre),
            DType::F16 => encode_dense(&xs, n, d, cpu.as_slice::<f16>()?, v, b, &mut pre),
            DType::BF16 => encode_dense(&xs, n, d, cpu.as_slice::<bf16>()?, v, b, &mut pre),
            other => {
                return Err(Error::Dtype {
                    name: "W_enc".into(),
                    dtype: format!("{other:?}"),
                })
            }
        }
        Ok((pre, denorm))
    }

    fn run_full(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (mut pre, denorm) = self.encode_pre(x)?;
        let w_dec = &self.sae.weights().w_dec;
        let (st, l) = w_dec.storage_and_layout();
        let Storage::Cpu(cpu) = &*st else {
            return Err(Error::Invalid(
                "EditPlan: weights must be on the CPU".into(),
            ));
        };
        let ds = Strided::new(l.stride(), l.start_offset());
        match w_dec.dtype() {
            DType::F32 => self.decode_full(x, y, &mut pre, &denorm, cpu.as_slice::<f32>()?, ds),
            DType::F16 => self.decode_full(x, y, &mut pre, &denorm, cpu.as_slice::<f16>()?, ds),
            DType::BF16 => self.decode_full(x, y, &mut pre, &denorm, cpu.as_slice::<bf16>()?, ds),
            other => {
                return Err(Error::Dtype {
                    name: "W_dec".into(),
                    dtype: format!("{other:?}"),
                })
            }
        }
        Ok(())
    }

    /// Per token: fused epilogue (activation → sparse list), edits, sparse decode.
    fn decode_full<TD: Elem>(
        &self,
        x: &[f32],
        y: &mut [f32],
        pre: &mut [f32],
        denorm: &[TokenDenorm],
        dec: &[TD],
        dec_s: Strided,
    ) {
        let (d, n_lat) = (self.d_in, self.sae.d_sae());
        let fp = &self.full;
        let dec_rows = dec_s.s1 == 1 && dec_s.s0 == d;
        let inv = |i: u32| fp.inv_norm.get(i as usize).copied().unwrap_or(1.0);
        pre.par_chunks_mut(n_lat)
            .zip(x.par_chunks(d))
            .zip(y.par_chunks_mut(d))
            .zip(denorm.par_iter())
            .for_each_init(
                || (Vec::<(u32, f32)>::new(), vec![0f32; d]),
                |(active, row), (((pt, xt), yt), &(scale, shift))| {
                    self.epilogue(pt, fp, active);
                    let f_of = |id: u32| {
                        active
                            .binary_search_by_key(&id, |e| e.0)
                            .map(|p| active[p].1)
                            .unwrap_or(0.0)
                    };
                    match self.mode {
                        SpliceMode::ErrorPreserving => {
                            yt.copy_from_slice(xt);
                            for (j, &id) in self.ids.iter().enumerate() {
                                let f = f_of(id);
                                let delta = self.a[j] * f + self.b[j] - f;
                                if delta != 0.0 {
                                    axpy(yt, scale * delta, &self.dec[j * d..(j + 1) * d]);
                                }
                            }
                        }
                        SpliceMode::Reconstruction => {
                            yt.copy_from_slice(&self.b_dec);
                            for &(id, f) in active.iter() {
                                let f2 = match self.ids.iter().position(|&e| e == id) {
                                    Some(j) => self.a[j] * f + self.b[j],
                                    None => f,
                                };
                                if f2 == 0.0 {
                                    continue;
                                }
                                if dec_rows {
                                    let o = dec_s.off + id as usize * d;
                                    axpy(yt, f2 * inv(id), &dec[o..o + d]);
                                } else {
                                    // Strided (transposed-view) row, widened into `row`.
                                    for (k, r) in row.iter_mut().enumerate() {
                                        *r = dec[dec_s.off + id as usize * dec_s.s0 + k * dec_s.s1]
                                            .to_f32();
                                    }
                                    axpy(yt, f2 * inv(id), row);
                                }
                            }
                            // Edited latents that were inactive (clamp/add make them fire).
                            for (j, &id) in self.ids.iter().enumerate() {
                                if self.b[j] != 0.0
                                    && active.binary_search_by_key(&id, |e| e.0).is_err()
                                {
                                    axpy(yt, self.b[j], &self.dec[j * d..(j + 1) * d]);
                                }
                            }
                            yt.iter_mut().for_each(|v| *v = *v * scale + shift);
                            if let Some(skip) = &self.skip {
                                // y += x W_skipᵀ: output k gets W_skip[k] · x.
                                for (k, v) in yt.iter_mut().enumerate() {
                                    *v += dot(xt, &skip[k * d..(k + 1) * d]);
                                }
                            }
                        }
                    }
                    if let Some(s) = &self.steer {
                        yt.iter_mut().zip(s).for_each(|(y, s)| *y += s);
                    }
                },
            );
    }

    /// Activation over the dense pre-activations → sorted sparse list of non-zero latents.
    fn epilogue(&self, pre: &mut [f32], fp: &FullParams, active: &mut Vec<(u32, f32)>) {
        let c = self.sae.config();
        active.clear();
        match c.architecture {
            Architecture::Standard => {
                active.extend(
                    pre.iter()
                        .enumerate()
                        .filter(|(_, &p)| p > 0.0)
                        .map(|(i, &p)| (i as u32, p)),
                );
            }
            Architecture::JumpRelu => active.extend(
                pre.iter()
                    .enumerate()
                    .filter(|(i, &p)| p > 0.0 && p > fp.thr[*i])
                    .map(|(i, &p)| (i as u32, p)),
            ),
            Architecture::Gated => {
                active.extend(pre.iter().enumerate().filter(|(_, &p)| p > 0.0).filter_map(
                    |(i, &p)| {
                        let mag = ((p - fp.b_enc[i]) * fp.rmag[i] + fp.bmag[i]).max(0.0);
                        (mag > 0.0).then_some((i as u32, mag))
                    },
                ))
            }
            Architecture::TopK => {
                if !fp.norm.is_empty() {
                    pre.iter_mut().zip(&fp.norm).for_each(|(p, n)| *p *= n);
                }
                // Bounded min-heap of the k best (value desc, id asc): O(d_sae log k).
                let mut heap = TopKHeap::with_capacity(c.k + 1);
                let cands = pre.iter().enumerate().map(|(i, &p)| Cand {
                    key: if c.signed { p.abs() } else { p },
                    id: i as u32,
                });
                top_k(cands, c.k, &mut heap);
                active.extend(heap.into_iter().filter_map(|Reverse(cd)| {
                    let v = pre[cd.id as usize];
                    let v = if c.signed { v } else { v.max(0.0) };
                    (v != 0.0).then_some((cd.id, v))
                }));
                active.sort_unstable_by_key(|e| e.0);
            }
        }
    }
}

/// One token's denormalization `(scale, shift)`: SAE space → input space. The scalar
/// form of [`crate::sae::Denorm`] (tensors, for the reference path), computed here from
/// the token's own row so that the fused kernels stay independent of the oracle they are
/// tested against.
type TokenDenorm = (f32, f32);

/// Strides and offset of a 2-D weight view.
#[derive(Clone, Copy)]
struct Strided {
    s0: usize,
    s1: usize,
    off: usize,
}
impl Strided {
    fn new(stride: &[usize], off: usize) -> Self {
        Strided {
            s0: stride.first().copied().unwrap_or(0),
            s1: stride.get(1).copied().unwrap_or(0),
            off,
        }
    }
}

/// Copy a strided f32/f16/bf16 CPU storage into a row-major f32 vector.
fn strided_to_f32(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Vec<f32>> {
    fn gather<T: Elem>(data: &[T], layout: &Layout) -> Vec<f32> {
        if let Some((a, b)) = layout.contiguous_offsets() {
            return data[a..b].iter().map(|v| v.to_f32()).collect();
        }
        let dims = layout.dims();
        let stride = layout.stride();
        let n: usize = dims.iter().product();
        let mut out = Vec::with_capacity(n);
        let mut idx = vec![0usize; dims.len()];
        let mut off = layout.start_offset();
        for _ in 0..n {
            out.push(data[off].to_f32());
            // Odometer increment over the dimensions, last fastest.
            for ax in (0..dims.len()).rev() {
                idx[ax] += 1;
                off += stride[ax];
                if idx[ax] < dims[ax] {
                    break;
                }
                off -= stride[ax] * dims[ax];
                idx[ax] = 0;
            }
        }
        out
    }
    match storage {
        CpuStorage::F32(v) => Ok(gather(v, layout)),
        CpuStorage::F16(v) => Ok(gather(v, layout)),
        CpuStorage::BF16(v) => Ok(gather(v, layout)),
        _ => Err(candle_core::Error::Msg(
            "sae splice: input must be f32, f16 or bf16".into(),
        )),
    }
}

impl CustomOp1 for EditPlan {
    fn name(&self) -> &'static str {
        "sae-splice"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // Contiguous f32 input is read in place: no copy (and no fresh pages) per call.
        let copied;
        let x: &[f32] = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => {
                copied = strided_to_f32(storage, layout)?;
                &copied
            }
        };
        let mut y = vec![0f32; x.len()];
        self.run(x, &mut y).map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }
}
