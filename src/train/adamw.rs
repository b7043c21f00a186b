//! AdamW as one fused in-place pass per parameter (a candle `InplaceOp1`): the moments
//! live in plain vectors allocated once, so a step allocates nothing and reads and writes
//! each parameter, gradient and moment exactly once.
//!
//! For the decoder (`unit_rows = Some(d_in)`), each row's gradient first loses its
//! component parallel to the row (sparsify's `remove_gradient_parallel_to_decoder_directions`)
//! and the row is renormalised to unit norm after the update.

use std::sync::Mutex;

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// First and second moments of one parameter.
pub(crate) struct Moments {
    pub(crate) m: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

impl Moments {
    pub(crate) fn zeros(n: usize) -> Self {
        Moments {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

/// Hyper-parameters of one step.
#[derive(Clone, Copy)]
pub(crate) struct Hyper {
    pub(crate) lr: f32,
    pub(crate) beta1: f32,
    pub(crate) beta2: f32,
    pub(crate) eps: f32,
    pub(crate) weight_decay: f32,
    /// 1 − β₁ᵗ and 1 − β₂ᵗ (bias corrections).
    pub(crate) c1: f32,
    pub(crate) c2: f32,
}

struct Step<'a> {
    grad: &'a [f32],
    state: Mutex<&'a mut Moments>,
    h: Hyper,
    unit_rows: Option<usize>,
}

#[inline]
fn adam(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &Hyper) {
    for (((p, &gi), mi), vi) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *mi = h.beta1 * *mi + (1.0 - h.beta1) * gi;
        *vi = h.beta2 * *vi + (1.0 - h.beta2) * gi * gi;
        let upd = (*mi / h.c1) / ((*vi / h.c2).sqrt() + h.eps);
        *p = *p * (1.0 - h.lr * h.weight_decay) - h.lr * upd;
    }
}

impl InplaceOp1 for Step<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let p = match storage {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("adamw: expected an f32 parameter"),
        };
        let (a, b) = match layout.contiguous_offsets() {
            Some(o) => o,
            None => candle_core::bail!("adamw: expected a contiguous parameter"),
        };
        let p = match p.get_mut(a..b) {
            Some(p) => p,
            None => candle_core::bail!("adamw: bad layout"),
        };
        let mut guard = self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("adamw: poisoned state".into()))?;
        let st: &mut Moments = &mut guard;
        if st.m.len() != p.len() || st.v.len() != p.len() || self.grad.len() != p.len() {
            candle_core::bail!("adamw: parameter, gradient and moments differ in size");
        }
        let h = self.h;
        let chunk = self.unit_rows.unwrap_or(1 << 14).max(1);
        p.par_chunks_mut(chunk)
            .zip(self.grad.par_chunks(chunk))
            .zip(st.m.par_chunks_mut(chunk))
            .zip(st.v.par_chunks_mut(chunk))
            .for_each(|(((p, g), m), v)| {
                if self.unit_rows.is_some() {
                    // Project out the component of g parallel to the row p.
                    let gp: f32 = g.iter().zip(p.iter()).map(|(g, w)| g * w).sum();
                    let pp: f32 = p.iter().map(|w| w * w).sum();
                    let shift = if pp > 0.0 { gp / pp } else { 0.0 };
                    // g'_i = g_i − shift·p_i, with p_i read before it is updated.
                    for (((pi, &gi), mi), vi) in
                        p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                    {
                        let gi = gi - shift * *pi;
                        *mi = h.beta1 * *mi + (1.0 - h.beta1) * gi;
                        *vi = h.beta2 * *vi + (1.0 - h.beta2) * gi * gi;
                        let upd = (*mi / h.c1) / ((*vi / h.c2).sqrt() + h.eps);
                        *pi = *pi * (1.0 - h.lr * h.weight_decay) - h.lr * upd;
                    }
                    let norm = p.iter().map(|w| w * w).sum::<f32>().sqrt().max(1e-12);
                    p.iter_mut().for_each(|w| *w /= norm);
                } else {
                    adam(p, g, m, v, &h);
                }
            });
        Ok(())
    }
}

/// Apply one AdamW step to `param` with gradient `grad` (same shape, f32, CPU).
pub(crate) fn step(
    param: &Tensor,
    grad: &Tensor,
    state: &mut Moments,
    h: Hyper,
    unit_rows: Option<usize>,
) -> Result<()> {
    let grad = grad.contiguous()?;
    let (st, layout) = grad.storage_and_layout();
    let g = match &*st {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let (a, b) = layout
                .contiguous_offsets()
                .ok_or_else(|| Error::Invalid("adamw: non-contiguous gradient".into()))?;
            v.get(a..b)
                .ok_or_else(|| Error::Invalid("adamw: bad gradient layout".into()))?
        }
        _ => return Err(Error::Invalid("adamw: expected an f32 CPU gradient".into())),
    };
    param.inplace_op1(&Step {
        grad: g,
        state: Mutex::new(state),
        h,
        unit_rows,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn hyper(lr: f32) -> Hyper {
        Hyper {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            c1: 0.1,
            c2: 1.0 - 0.999,
        }
    }

    /// First step: m̂ = g, v̂ = g², so the update is lr·sign(g) (up to ε).
    #[test]
    fn first_step_moves_by_lr() -> Result<()> {
        let dev = Device::Cpu;
        let p = Tensor::new(&[1f32, -2.0], &dev)?;
        let g = Tensor::new(&[0.5f32, -3.0], &dev)?;
        let mut st = Moments::zeros(2);
        step(&p, &g, &mut st, hyper(0.1), None)?;
        let v = p.to_vec1::<f32>()?;
        assert!(
            (v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6,
            "{v:?}"
        );
        assert!((st.m[0] - 0.05).abs() < 1e-6 && (st.v[1] - 0.009).abs() < 1e-6);
        Ok(())
    }

    /// Decoder rows: the gradient parallel to the row is removed, the row renormalised.
    #[test]
    fn unit_rows_project_and_renormalise() -> Result<()> {
        let dev = Device::Cpu;
        let p = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev)?;
        let g = Tensor::new(&[[1f32, 1.0], [5.0, 0.0]], &dev)?;
        let mut st = Moments::zeros(4);
        step(&p, &g, &mut st, hyper(0.1), Some(2))?;
        let v = p.to_vec2::<f32>()?;
        let s = 1.01f32.sqrt();
        // Row 0: g' = (0, 1) → (1, −0.1)/√1.01. Row 1: g' = (5, 0) → (−0.1, 1)/√1.01.
        let want = [[1.0 / s, -0.1 / s], [-0.1 / s, 1.0 / s]];
        for (r, w) in v.iter().zip(want) {
            for (a, b) in r.iter().zip(w) {
                assert!((a - b).abs() < 1e-6, "{v:?}");
            }
        }
        Ok(())
    }
}
