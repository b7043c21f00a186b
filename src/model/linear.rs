//! `y = x Wᵀ` for the model's projections.
//!
//! Few rows (decode steps, short prompts): a row-parallel loop that streams each weight
//! row once for all rows of `x`, with the crate's AVX2/F16C dot products, reading f32,
//! f16 or bf16 weights in place. Many rows (prefill): candle's `gemm`.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use crate::kernels::simd::{dot, Elem};
use crate::Result;

/// Row counts up to this use the streaming path.
pub(crate) const SMALL_ROWS: usize = 8;

/// Output rows per parallel task.
const BLOCK: usize = 32;

/// `x [n, in]` (f32) times `w [out, in]`ᵀ → `[n, out]` f32.
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
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
                for (i, y) in ys.iter_mut().enumerate() {
                    *y = dot(&x[i * inp..(i + 1) * inp], wr);
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
