//! `y = x Wᵀ` for the model's projections.
//!
//! Dense weights: few rows (decode steps, short prompts) go through a row-parallel loop
//! that streams each weight row once for all rows of `x`, with the crate's AVX2/F16C dot
//! products, reading f32, f16 or bf16 weights in place; many rows (prefill) through
//! candle's `gemm`. Block-quantized weights: [`QMatrix::matmul`] for any row count.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use crate::kernels::quant::QMatrix;
use crate::kernels::simd::{dot, dot_scalar, has_avx2, Elem};
use crate::Result;

/// A weight matrix `[out, in]`: a dense candle tensor or GGUF-style blocks.
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    /// f32, f16 or bf16.
    Dense(Tensor),
    /// Q4_1 or Q8_0 blocks (CPU only).
    Quant(QMatrix),
}

impl Weight {
    /// Bytes one pass over the matrix reads.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quant(q) => q.bytes(),
        }
    }

    /// `x [n, in]` (f32, row-major) times the matrix transposed → `[n, out]`.
    pub(crate) fn matmul_vec(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        match self {
            Weight::Quant(q) => q.matmul(x, n),
            Weight::Dense(w) => {
                let xt = Tensor::from_slice(x, (n, x.len() / n.max(1)), w.device())?;
                Ok(linear(&xt, self)?.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }
}

/// Row counts up to this use the streaming path.
pub(crate) const SMALL_ROWS: usize = 8;

/// Output rows per parallel task.
const BLOCK: usize = 32;

/// `x [n, in]` (f32) times `w [out, in]`ᵀ → `[n, out]` f32.
pub(crate) fn linear(x: &Tensor, w: &Weight) -> Result<Tensor> {
    let n = x.dim(0)?;
    let w = match w {
        Weight::Dense(w) => w,
        Weight::Quant(q) => {
            let xv = x
                .to_dtype(DType::F32)?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let y = q.matmul(&xv, n)?;
            return Ok(Tensor::from_vec(y, (n, q.dims().0), x.device())?);
        }
    };
    if n <= SMALL_ROWS && w.is_contiguous() && x.device().is_cpu() {
        if let Some(y) = small(x, w)? {
            return Ok(y);
        }
    }
    if w.dtype() == x.dtype() {
        Ok(x.matmul(&w.t()?)?)
    } else {
        Ok(x.to_dtype(w.dtype())?
            .matmul(&w.t()?)?
            .to_dtype(DType::F32)?)
    }
}

fn small(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (out, inp) = w.dims2()?;
    let n = x.dim(0)?;
    if x.dim(1)? != inp {
        return Ok(None); // let candle report the shape error
    }
    let xv = x
        .to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (st, layout) = w.storage_and_layout();
    let off = layout.start_offset();
    let len = out * inp;
    let y = match &*st {
        Storage::Cpu(CpuStorage::F32(v)) => v.get(off..off + len).map(|w| run(w, &xv, n, inp, out)),
        Storage::Cpu(CpuStorage::F16(v)) => v.get(off..off + len).map(|w| run(w, &xv, n, inp, out)),
        Storage::Cpu(CpuStorage::BF16(v)) => {
            v.get(off..off + len).map(|w| run(w, &xv, n, inp, out))
        }
        _ => None,
    };
    drop(st);
    match y {
        Some(y) => Ok(Some(Tensor::from_vec(y, (n, out), x.device())?)),
        None => Ok(None),
    }
}

fn run<T: Elem>(w: &[T], x: &[f32], n: usize, inp: usize, out: usize) -> Vec<f32> {
    // yt [out, n]: each task owns BLOCK output rows.
    let mut yt = vec![0f32; out * n];
    yt.par_chunks_mut(BLOCK * n)
        .enumerate()
        .for_each(|(bi, chunk)| {
            for (r, ys) in chunk.chunks_mut(n).enumerate() {
                let o = bi * BLOCK + r;
                let wr = &w[o * inp..(o + 1) * inp];
                if n == 1 {
                    ys[0] = dot(x, wr);
                } else {
                    dot_rows(x, wr, ys);
                }
            }
        });
    if n == 1 {
        return yt;
    }
    let mut y = vec![0f32; n * out];
    for o in 0..out {
        for i in 0..n {
            y[i * out + o] = yt[o * n + i];
        }
    }
    y
}

/// `ys[i] = x_i · w` for the `ys.len()` rows `x_i` of `x` (each `w.len()` long): each
/// 8-wide chunk of the weight row is loaded and widened once for all rows.
fn dot_rows<T: Elem>(x: &[f32], w: &[T], ys: &mut [f32]) {
    let inp = w.len();
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && ys.len() <= 8 && x.len() >= ys.len() * inp {
        // SAFETY: avx2/fma/f16c checked; x holds ys.len() rows of inp floats.
        unsafe { avx2::dot_rows(x, w, ys) };
        return;
    }
    for (i, y) in ys.iter_mut().enumerate() {
        *y = dot_scalar(&x[i * inp..(i + 1) * inp], w);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Elem;
    use crate::kernels::simd::avx2::{hsum, load8};
    use std::arch::x86_64::*;

    /// SAFETY: avx2, fma, f16c; `ys.len() <= 8`; `x.len() >= ys.len() * w.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows<T: Elem>(x: &[f32], w: &[T], ys: &mut [f32]) {
        // A compile-time row count keeps the accumulators in registers.
        match ys.len() {
            1 => rows_n::<T, 1>(x, w, ys),
            2 => rows_n::<T, 2>(x, w, ys),
            3 => rows_n::<T, 3>(x, w, ys),
            4 => rows_n::<T, 4>(x, w, ys),
            5 => rows_n::<T, 5>(x, w, ys),
            6 => rows_n::<T, 6>(x, w, ys),
            7 => rows_n::<T, 7>(x, w, ys),
            _ => rows_n::<T, 8>(x, w, ys),
        }
    }

    /// SAFETY: as [`dot_rows`], with `ys.len() == N`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_n<T: Elem, const N: usize>(x: &[f32], w: &[T], ys: &mut [f32]) {
        let inp = w.len();
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [_mm256_setzero_ps(); N];
        let mut k = 0;
        while k + 8 <= inp {
            let wv = load8(wp.add(k));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(r * inp + k)), wv, *a);
            }
            k += 8;
        }
        for (r, y) in ys.iter_mut().enumerate().take(N) {
            let mut s = hsum(acc[r]);
            for j in k..inp {
                s += *xp.add(r * inp + j) * (*wp.add(j)).to_f32();
            }
            *y = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::simd::test_data as data;

    /// The streaming path against plain f64 sums, for every dtype and row count, with
    /// input widths that are not a multiple of 8, below and above one column pass.
    #[test]
    fn small_linear_matches_f64_reference() {
        for (out, inp) in [(70, 43), (37, 1100)] {
            small_linear_case(out, inp);
        }
    }

    fn small_linear_case(out: usize, inp: usize) {
        let wf = data(out * inp, 7);
        // Rows 0 and 1 of each dtype's 2-row product: the 8-row product must repeat them
        // bit for bit (the same FMA chain per output whatever the batch).
        let mut two: Vec<Vec<Vec<f32>>> = Vec::new();
        for n in [1usize, 2, 3, 8] {
            let mut xf = data(n * inp, 3);
            if let Some(first) = two.first().map(|_| data(2 * inp, 3)) {
                xf[..2 * inp].copy_from_slice(&first);
            }
            let x = Tensor::from_vec(xf.clone(), (n, inp), &candle_core::Device::Cpu).unwrap();
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let w = Tensor::from_vec(wf.clone(), (out, inp), &candle_core::Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let wr: Vec<f32> = w
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let y = linear(&x, &Weight::Dense(w.clone()))
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                match n {
                    2 => two.push(y.clone()),
                    8 => {
                        let k = [DType::F32, DType::F16, DType::BF16]
                            .iter()
                            .position(|&d| d == dt)
                            .unwrap();
                        for i in 0..2 {
                            let (a, b) = (&y[i], &two[k][i]);
                            assert!(a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()));
                        }
                    }
                    _ => {}
                }
                for i in 0..n {
                    for o in 0..out {
                        let want: f64 = (0..inp)
                            .map(|k| xf[i * inp + k] as f64 * wr[o * inp + k] as f64)
                            .sum();
                        let tol = 1e-4 * (1.0 + want.abs());
                        assert!((y[i][o] as f64 - want).abs() < tol, "{dt:?} n={n} {i},{o}");
                    }
                }
            }
        }
    }
}
