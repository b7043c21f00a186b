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
                if w.is_contiguous() && w.device().is_cpu() {
                    if let Some(y) = small_vec(x, n, w) {
                        return Ok(y);
                    }
                }
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
    let n = x.dim(0)?;
    let xv = x
        .to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    match small_vec(&xv, n, w) {
        Some(y) => Ok(Some(Tensor::from_vec(y, (n, w.dim(0)?), x.device())?)),
        None => Ok(None),
    }
}

/// The streaming path on plain slices: `x [n, in]` row-major f32 times the contiguous CPU
/// matrix `w [out, in]` (f32, f16 or bf16) transposed; `None` when the shapes or the
/// storage do not fit it (the caller then takes candle's path, which reports errors).
fn small_vec(x: &[f32], n: usize, w: &Tensor) -> Option<Vec<f32>> {
    let (out, inp) = w.dims2().ok()?;
    if n == 0 || n > SMALL_ROWS || Some(x.len()) != n.checked_mul(inp) {
        return None;
    }
    let (st, layout) = w.storage_and_layout();
    let off = layout.start_offset();
    let len = out * inp;
    match &*st {
        Storage::Cpu(CpuStorage::F32(v)) => v.get(off..off + len).map(|w| run(w, x, n, inp, out)),
        Storage::Cpu(CpuStorage::F16(v)) => v.get(off..off + len).map(|w| run(w, x, n, inp, out)),
        Storage::Cpu(CpuStorage::BF16(v)) => v.get(off..off + len).map(|w| run(w, x, n, inp, out)),
        _ => None,
    }
}

fn run<T: Elem>(w: &[T], x: &[f32], n: usize, inp: usize, out: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * out];
    if n == 1 {
        y.par_chunks_mut(BLOCK).enumerate().for_each(|(bi, ys)| {
            for (r, y) in ys.iter_mut().enumerate() {
                let o = bi * BLOCK + r;
                *y = dot(x, &w[o * inp..(o + 1) * inp]);
            }
        });
        return y;
    }
    // Each task owns BLOCK output columns of every row of `y`: it computes them as a
    // [BLOCK, n] tile and copies the tile into place (no serial transpose afterwards).
    let mut parts: Vec<Vec<&mut [f32]>> = (0..out.div_ceil(BLOCK))
        .map(|_| Vec::with_capacity(n))
        .collect();
    for row in y.chunks_mut(out) {
        for (part, cols) in parts.iter_mut().zip(row.chunks_mut(BLOCK)) {
            part.push(cols);
        }
    }
    parts
        .into_par_iter()
        .enumerate()
        .for_each(|(bi, mut cols)| {
            let o0 = bi * BLOCK;
            let rows = cols.first().map_or(0, |c| c.len());
            // rows ≤ BLOCK and n ≤ SMALL_ROWS (`small_vec` checks it).
            let mut buf = [0f32; BLOCK * SMALL_ROWS];
            let tile = &mut buf[..rows * n];
            dot_tile(
                x,
                &w[o0 * inp..(o0 + rows) * inp],
                inp,
                tile,
                Body::detect(),
            );
            for (i, c) in cols.iter_mut().enumerate() {
                for (r, v) in c.iter_mut().enumerate() {
                    *v = tile[r * n + i];
                }
            }
        });
    y
}

/// The SIMD body of [`dot_tile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Plain loops (any CPU).
    Scalar,
    /// AVX2 + FMA + F16C: one weight row × up to 8 rows of `x` (16 registers).
    Avx2,
    /// The same with AVX-512VL's 32 registers: two weight rows at a time.
    Avx512,
}

impl Body {
    fn detect() -> Body {
        use std::sync::OnceLock;
        static BODY: OnceLock<Body> = OnceLock::new();
        *BODY.get_or_init(|| {
            if !has_avx2() {
                return Body::Scalar;
            }
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl")
            {
                return Body::Avx512;
            }
            Body::Avx2
        })
    }
}

/// `ys[o·n + i] = x_i · w_o` for the weight rows `w_o` of `w` (each `inp` long) and the
/// `n = ys.len() / rows` rows `x_i` of `x` (`n ≤ 8`): each 8-wide chunk of a weight row
/// is loaded and widened once for all rows of `x`. Every output is the same FMA chain
/// (ascending k, one accumulator, then `hsum`) in every body but the scalar one, so the
/// results are bit-identical whatever the batch or the body. A body this CPU lacks
/// falls back to the scalar loop.
fn dot_tile<T: Elem>(x: &[f32], w: &[T], inp: usize, ys: &mut [f32], body: Body) {
    let rows = w.len() / inp.max(1);
    let n = ys.len() / rows.max(1);
    #[cfg(target_arch = "x86_64")]
    if (body == Body::Avx2 || body == Body::Avx512)
        && Body::detect() != Body::Scalar
        && (1..=8).contains(&n)
        && x.len() >= n * inp
        && ys.len() == rows * n
    {
        if body == Body::Avx512 && Body::detect() == Body::Avx512 {
            // SAFETY: avx2/fma/f16c/avx512f/avx512vl checked; x holds n rows of inp
            // floats, w `rows` rows of inp, ys rows·n outputs (checked above).
            unsafe { avx2::tiles_avx512(x, w, inp, n, ys) };
        } else {
            // SAFETY: avx2/fma/f16c checked; sizes as above.
            unsafe { avx2::tiles_avx2(x, w, inp, n, ys) };
        }
        return;
    }
    let _ = body;
    for (o, yo) in ys.chunks_mut(n.max(1)).enumerate() {
        for (i, y) in yo.iter_mut().enumerate() {
            *y = dot_scalar(&x[i * inp..(i + 1) * inp], &w[o * inp..(o + 1) * inp]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Elem;
    use crate::kernels::simd::avx2::{hsum, load8};
    use std::arch::x86_64::*;

    /// How far ahead of the FMAs each weight row is prefetched, in bytes. At 8 rows of
    /// `x` the loop is busy with FMAs long enough per cache line that the hardware
    /// prefetcher alone leaves it waiting on memory (measured: f16 weights, 8 rows, the
    /// decode step 30 → 24 ms).
    const PREFETCH: usize = 4096;

    /// [`tiles`] one weight row at a time.
    /// SAFETY: avx2, fma, f16c; `1 <= n <= 8`; `x.len() >= n·inp`; `w` holds
    /// `ys.len() / n` rows of `inp`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tiles_avx2<T: Elem>(
        x: &[f32],
        w: &[T],
        inp: usize,
        n: usize,
        ys: &mut [f32],
    ) {
        tiles::<T, 1>(x, w, inp, n, ys)
    }

    /// [`tiles`] two weight rows at a time (16 accumulators need AVX-512VL's registers).
    /// SAFETY: as [`tiles_avx2`], plus avx512f and avx512vl.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    pub(super) unsafe fn tiles_avx512<T: Elem>(
        x: &[f32],
        w: &[T],
        inp: usize,
        n: usize,
        ys: &mut [f32],
    ) {
        tiles::<T, 2>(x, w, inp, n, ys)
    }

    /// All weight rows, R at a time (the rest one at a time), times the n rows of `x`.
    /// SAFETY: as [`tiles_avx2`], and the CPU runs what the caller was compiled for.
    #[inline(always)]
    unsafe fn tiles<T: Elem, const R: usize>(
        x: &[f32],
        w: &[T],
        inp: usize,
        n: usize,
        ys: &mut [f32],
    ) {
        // A compile-time row count keeps the accumulators in registers.
        macro_rules! go {
            ($n:literal) => {{
                let rows = ys.len() / $n;
                let (wp, yp) = (w.as_ptr(), ys.as_mut_ptr());
                let mut o = 0;
                while o + R <= rows {
                    tile::<T, R, $n>(x, wp.add(o * inp), inp, yp.add(o * $n));
                    o += R;
                }
                while o < rows {
                    tile::<T, 1, $n>(x, wp.add(o * inp), inp, yp.add(o * $n));
                    o += 1;
                }
            }};
        }
        crate::kernels::with_rows!(n, go);
    }

    /// R weight rows (at `w`, `inp` apart) × N rows of `x` into `ys[r·N + i]`: each
    /// 8-wide chunk of a weight row is loaded and widened once for the N rows, each chunk
    /// of `x` once for the R weight rows.
    /// SAFETY: as [`tiles`], for the weight rows `w .. w + R·inp` and outputs
    /// `ys .. ys + R·N`.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<T: Elem, const R: usize, const N: usize>(
        x: &[f32],
        w: *const T,
        inp: usize,
        ys: *mut f32,
    ) {
        let xp = x.as_ptr();
        let line = 64 / std::mem::size_of::<T>();
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        let mut k = 0;
        while k + 8 <= inp {
            if k % line == 0 {
                for r in 0..R {
                    // A hint only: an address past the matrix is never dereferenced.
                    let p = (w.add(r * inp + k) as *const i8).wrapping_add(PREFETCH);
                    _mm_prefetch::<_MM_HINT_T0>(p);
                }
            }
            let wv: [__m256; R] = std::array::from_fn(|r| load8(w.add(r * inp + k)));
            for i in 0..N {
                let xv = _mm256_loadu_ps(xp.add(i * inp + k));
                for r in 0..R {
                    acc[r][i] = _mm256_fmadd_ps(xv, wv[r], acc[r][i]);
                }
            }
            k += 8;
        }
        for r in 0..R {
            for i in 0..N {
                let mut s = hsum(acc[r][i]);
                for j in k..inp {
                    s += *xp.add(i * inp + j) * (*w.add(r * inp + j)).to_f32();
                }
                *ys.add(r * N + i) = s;
            }
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

    /// The AVX2 body (one weight row at a time) and the AVX-512 one (two at a time, odd
    /// row counts end with a single row) give the same bits, and both agree with the
    /// scalar loop to rounding; on a CPU without a body the call runs the scalar loop,
    /// which the comparison then covers trivially.
    #[test]
    fn tile_bodies_agree() {
        for (rows, inp) in [(5usize, 1100usize), (6, 64), (3, 43)] {
            let w: Vec<half::f16> = data(rows * inp, 11)
                .into_iter()
                .map(half::f16::from_f32)
                .collect();
            for n in 1..=8 {
                let x = data(n * inp, 12);
                let run = |body| {
                    let mut ys = vec![0f32; rows * n];
                    dot_tile(&x, &w, inp, &mut ys, body);
                    ys
                };
                let (a2, a5, sc) = (run(Body::Avx2), run(Body::Avx512), run(Body::Scalar));
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a2), bits(&a5), "rows={rows} inp={inp} n={n}");
                for (k, (a, b)) in a2.iter().zip(&sc).enumerate() {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{k}: {a} vs {b}");
                }
                // ys[o·n + i] = x_i · w_o, checked against f64 for one entry.
                let (o, i) = (rows - 1, n - 1);
                let want: f64 = (0..inp)
                    .map(|k| x[i * inp + k] as f64 * w[o * inp + k].to_f64())
                    .sum();
                assert!((a2[o * n + i] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
            }
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
