//! The sparse TopK path of training as candle custom ops.
//!
//! * [`TopKIndices`] (no backward): the ids of the `k` largest entries of each row,
//!   `u32 [N, k]` (ties towards the lower id, as [`crate::Sae::encode`]).
//! * [`SparseDecode`] (with backward): `out[b] = Σ_j acts[b, idx[b, j]] · W_dec[idx[b, j]]`,
//!   i.e. `(acts ⊙ mask) W_dec` without touching the `d_sae − k` unselected rows. Its
//!   backward gives `∂/∂acts` (non-zero only at the selected entries: `g[b] · W_dec[i]`)
//!   and `∂/∂W_dec` (row `i` accumulates `acts[b, i] · g[b]` over the tokens that selected
//!   it, in token order: deterministic). This replaces the dense decode and its two dense
//!   backward products, O(N·k·d_in) instead of O(N·d_sae·d_in).
//! * [`SparseEncGrad`]: adds zeros to the pre-activations in the forward pass; its backward
//!   is `∂/∂W_enc = x'ᵀ g` computed over the non-zero entries of `g` only. With TopK, `g`
//!   has at most `k (+ k_aux)` non-zeros per token, so this replaces a dense product.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        _ => candle_core::bail!("{what}: expected f32"),
    };
    let (a, b) = match l.contiguous_offsets() {
        Some(o) => o,
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    };
    v.get(a..b)
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: bad layout")))
}

fn u32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [u32]> {
    let v = match s {
        CpuStorage::U32(v) => v,
        _ => candle_core::bail!("{what}: expected u32 ids"),
    };
    let (a, b) = match l.contiguous_offsets() {
        Some(o) => o,
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    };
    v.get(a..b)
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: bad layout")))
}

// The scalar kernels: the training results stay bit-identical on every CPU.
use crate::kernels::simd::{axpy_scalar as axpy, dot_scalar as dot};
use crate::topk::{top_k, Cand, TopKHeap};

/// The ids of the `k` largest entries of each row, `u32 [N, k]`.
pub(crate) struct TopKIndices {
    pub(crate) k: usize,
}

impl CustomOp1 for TopKIndices {
    fn name(&self) -> &'static str {
        "topk-indices"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = layout.shape().dims2()?;
        let src = f32s(storage, layout, "topk-indices")?;
        let k = self.k.min(d);
        let mut out = vec![0u32; n * k];
        if k > 0 {
            out.par_chunks_mut(k).zip(src.par_chunks(d)).for_each_init(
                || TopKHeap::with_capacity(k + 1),
                |heap, (o, row)| {
                    let cands = row
                        .iter()
                        .enumerate()
                        .map(|(i, &key)| Cand { key, id: i as u32 });
                    top_k(cands, k, heap);
                    for (slot, c) in o.iter_mut().zip(heap.iter()) {
                        *slot = c.0.id;
                    }
                },
            );
        }
        Ok((CpuStorage::U32(out), Shape::from((n, k))))
    }
}

/// `(acts [N, d_sae], idx u32 [N, k], W_dec [d_sae, d_in]) → [N, d_in]`, see the module docs.
pub(crate) struct SparseDecode;

impl CustomOp3 for SparseDecode {
    fn name(&self) -> &'static str {
        "sparse-decode"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, n) = l1.shape().dims2()?;
        let (_, k) = l2.shape().dims2()?;
        let (_, d) = l3.shape().dims2()?;
        let acts = f32s(s1, l1, "sparse-decode acts")?;
        let idx = u32s(s2, l2, "sparse-decode ids")?;
        let w = f32s(s3, l3, "sparse-decode W_dec")?;
        let mut out = vec![0f32; rows * d];
        if d > 0 && k > 0 && n > 0 {
            out.par_chunks_mut(d)
                .zip(idx.par_chunks(k))
                .zip(acts.par_chunks(n))
                .for_each(|((o, ids), a)| {
                    for &i in ids {
                        let i = i as usize;
                        let (Some(&v), Some(row)) = (a.get(i), w.get(i * d..(i + 1) * d)) else {
                            continue;
                        };
                        if v != 0.0 {
                            axpy(o, v, row);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, d))))
    }

    fn bwd(
        &self,
        acts: &Tensor,
        idx: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let n = acts.dims2()?.1;
        let grad_acts = g.apply_op3_no_bwd(idx, w, &GradActs { n })?;
        let grad_w = g.apply_op3_no_bwd(idx, acts, &GradW { n })?;
        Ok((Some(grad_acts), None, Some(grad_w)))
    }
}

/// `(g [N, d_in], idx [N, k], W_dec [d_sae, d_in]) → ∂/∂acts [N, d_sae]`.
struct GradActs {
    n: usize,
}

impl CustomOp3 for GradActs {
    fn name(&self) -> &'static str {
        "sparse-decode-grad-acts"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, d) = l1.shape().dims2()?;
        let (_, k) = l2.shape().dims2()?;
        let n = self.n;
        let g = f32s(s1, l1, "sparse-decode grad")?;
        let idx = u32s(s2, l2, "sparse-decode ids")?;
        let w = f32s(s3, l3, "sparse-decode W_dec")?;
        let mut out = vec![0f32; rows * n];
        if d > 0 && k > 0 && n > 0 {
            out.par_chunks_mut(n)
                .zip(idx.par_chunks(k))
                .zip(g.par_chunks(d))
                .for_each(|((o, ids), gr)| {
                    for &i in ids {
                        let i = i as usize;
                        if let (Some(slot), Some(row)) = (o.get_mut(i), w.get(i * d..(i + 1) * d)) {
                            *slot = dot(gr, row);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }
}

/// `(g [N, d_in], idx [N, k], acts [N, d_sae]) → ∂/∂W_dec [d_sae, d_in]`.
struct GradW {
    n: usize,
}

/// Latents per parallel task of [`GradW`].
const GRAD_W_CHUNK: usize = 64;

impl CustomOp3 for GradW {
    fn name(&self) -> &'static str {
        "sparse-decode-grad-w"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, d) = l1.shape().dims2()?;
        let (_, k) = l2.shape().dims2()?;
        let n = self.n;
        let g = f32s(s1, l1, "sparse-decode grad")?;
        let idx = u32s(s2, l2, "sparse-decode ids")?;
        let acts = f32s(s3, l3, "sparse-decode acts")?;
        let mut out = vec![0f32; n * d];
        if d > 0 && k > 0 && n > 0 {
            // Each task owns a range of latents and scans every (token, slot) pair in
            // order: no races, and the same summation order on every run.
            out.par_chunks_mut(GRAD_W_CHUNK * d)
                .enumerate()
                .for_each(|(c, o)| {
                    let lo = c * GRAD_W_CHUNK;
                    let hi = lo + o.len() / d;
                    for ((ids, gr), a) in idx.chunks(k).zip(g.chunks(d)).zip(acts.chunks(n)) {
                        for &i in ids {
                            let i = i as usize;
                            if i < lo || i >= hi {
                                continue;
                            }
                            let v = a.get(i).copied().unwrap_or(0.0);
                            if v != 0.0 {
                                if let Some(row) = o.get_mut((i - lo) * d..(i - lo + 1) * d) {
                                    axpy(row, v, gr);
                                }
                            }
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, d))))
    }
}

/// `(x' [N, d_in], W_enc [d_in, d_sae]) → zeros [N, d_sae]` whose backward gives
/// `∂/∂W_enc = x'ᵀ g` from the non-zeros of `g` (see the module docs).
pub(crate) struct SparseEncGrad;

impl CustomOp2 for SparseEncGrad {
    fn name(&self) -> &'static str {
        "sparse-encoder-grad"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, _) = l1.shape().dims2()?;
        let (_, n) = l2.shape().dims2()?;
        Ok((
            CpuStorage::F32(vec![0f32; rows * n]),
            Shape::from((rows, n)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gw = grad
            .contiguous()?
            .apply_op2_no_bwd(&x.contiguous()?, &EncGradW)?;
        Ok((None, Some(gw)))
    }
}

/// `(g [N, d_sae], x' [N, d_in]) → x'ᵀ g [d_in, d_sae]` over the non-zeros of `g`.
struct EncGradW;

impl CustomOp2 for EncGradW {
    fn name(&self) -> &'static str {
        "sparse-encoder-grad-w"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, n) = l1.shape().dims2()?;
        let (_, d) = l2.shape().dims2()?;
        let g = f32s(s1, l1, "sparse-encoder grad")?;
        let x = f32s(s2, l2, "sparse-encoder input")?;
        let mut out = vec![0f32; d * n];
        if n == 0 || d == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((d, n))));
        }
        // (token, latent, gradient) of every non-zero, in row-major order.
        let nz: Vec<(usize, usize, f32)> = g
            .chunks(n)
            .enumerate()
            .flat_map(|(b, row)| {
                row.iter()
                    .enumerate()
                    .filter(|(_, v)| **v != 0.0)
                    .map(move |(i, &v)| (b, i, v))
            })
            .collect();
        // Row j of the result: Σ over non-zeros of x'[b, j] · g[b, i] into column i.
        out.par_chunks_mut(n).enumerate().for_each(|(j, row)| {
            for &(b, i, v) in &nz {
                if let (Some(slot), Some(&xv)) = (row.get_mut(i), x.get(b * d + j)) {
                    *slot += xv * v;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((d, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The sparse decode and its gradients equal the dense `(acts ⊙ mask) W_dec` ones.
    #[test]
    fn sparse_decode_matches_dense() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (rows, n, d, k) = (5, 12, 7, 3);
        let acts = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, n), &dev)?.relu()?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev)?)?;
        let target = Tensor::randn(0f32, 1.0, (rows, d), &dev)?;
        let idx = acts.as_tensor().apply_op1_no_bwd(&TopKIndices { k })?;
        // Dense oracle: a 0/1 mask from the ids.
        let ids = idx.to_vec2::<u32>()?;
        let mut m = vec![0f32; rows * n];
        for (b, r) in ids.iter().enumerate() {
            for &i in r {
                m[b * n + i as usize] = 1.0;
            }
        }
        let mask = Tensor::from_vec(m, (rows, n), &dev)?;
        let a_vals = acts.as_tensor().to_vec2::<f32>()?;
        for (b, r) in ids.iter().enumerate() {
            let mut sorted = a_vals[b].clone();
            sorted.sort_by(|x, y| y.total_cmp(x));
            let kth = sorted[k - 1];
            assert!(r.iter().all(|&i| a_vals[b][i as usize] >= kth));
        }
        let dense = (acts.as_tensor() * &mask)?.matmul(w.as_tensor())?;
        let sparse = acts
            .as_tensor()
            .apply_op3(&idx, w.as_tensor(), SparseDecode)?;
        let close = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?
                .abs()?
                .max_keepdim(0)?
                .max_keepdim(1)?
                .flatten_all()?
                .to_vec1::<f32>()
                .map(|v| v[0])
        };
        assert!(close(&dense, &sparse)? < 1e-5);
        let gd = (dense - &target)?.sqr()?.sum_all()?.backward()?;
        let gs = (sparse - &target)?.sqr()?.sum_all()?.backward()?;
        for v in [&acts, &w] {
            let missing = || candle_core::Error::Msg("no gradient".into());
            let (a, b) = (
                gd.get(v.as_tensor()).ok_or_else(missing)?,
                gs.get(v.as_tensor()).ok_or_else(missing)?,
            );
            assert_eq!(a.dtype(), DType::F32);
            assert!(close(a, b)? < 1e-4, "gradient mismatch");
        }
        Ok(())
    }

    /// `x W̄ + Z(x, W)` has the value and the W-gradient of `x W` for a sparse upstream grad.
    #[test]
    fn sparse_encoder_grad_matches_dense() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (6, 5), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 9), &dev)?)?;
        // A sparse upstream gradient through relu + a mask.
        let m: Vec<f32> = (0..54)
            .map(|i| if i % 4 == 0 { 1.0 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(m, (6, 9), &dev)?;
        let dense = x.matmul(w.as_tensor())?;
        let sparse =
            (x.matmul(&w.as_tensor().detach())? + x.apply_op2(w.as_tensor(), SparseEncGrad)?)?;
        assert_eq!(dense.to_vec2::<f32>()?, sparse.to_vec2::<f32>()?);
        let gd = (dense.relu()? * &mask)?.sum_all()?.backward()?;
        let gs = (sparse.relu()? * &mask)?.sum_all()?.backward()?;
        let missing = || candle_core::Error::Msg("no gradient".into());
        let (a, b) = (
            gd.get(w.as_tensor()).ok_or_else(missing)?,
            gs.get(w.as_tensor()).ok_or_else(missing)?,
        );
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "gradient mismatch {diff}");
        Ok(())
    }
}
