//! `y = x Wᵀ` for the model's projections.
//!
//! Dense weights: few rows (decode steps, short prompts) go through a row-parallel loop
//! that streams each weight row once for all rows of `x`, reading f32, f16 or bf16
//! weights in place (AVX2/F16C FMAs; bf16 weights as `vdpbf16ps` on `x` rounded to bf16
//! where the CPU has AVX512-BF16); many rows (prefill, harvest, scoring passes) of bf16
//! weights through the native bf16 GEMM ([`crate::kernels::gemm_bf16`]) on such CPUs,
//! other dtypes and CPUs through candle's `gemm`. Block-quantized weights:
//! [`QMatrix::matmul`] for any row count.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::scratch;
use crate::kernels::encode::{gemm_f32, View2};
#[cfg(doc)]
use crate::kernels::gemm_bf16::gemm_bf16_packed;
use crate::kernels::gemm_bf16::{gemm_bf16, has_dpbf16, to_bf16, PackedBf16};
use crate::kernels::quant::{Isa, QMatrix};
use crate::kernels::simd::{dot, dot_scalar, has_avx2, Elem};
#[cfg(target_arch = "x86_64")]
use crate::kernels::{holds, Rows};
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

    /// Contiguous CPU bf16 weights `[out, in]` packed for [`gemm_bf16_packed`] (as the
    /// matrix `W[k, j] = w[j, k]`); `None` for other weights.
    pub(crate) fn pack_bf16(&self) -> Option<PackedBf16> {
        let Weight::Dense(w) = self else {
            return None;
        };
        let (out, inp, range, view) = cpu_matrix(w)?;
        let (st, _) = w.storage_and_layout();
        let Storage::Cpu(CpuStorage::BF16(v)) = &*st else {
            return None;
        };
        PackedBf16::new(v.get(range)?, view, inp, out)
    }

    /// `x [n, in]` (f32, row-major) times the matrix transposed → `[n, out]`.
    pub(crate) fn matmul_vec(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        match self {
            Weight::Quant(q) => {
                // `dims()` is `(rows, cols)`: the output width first.
                let len = n.checked_mul(q.dims().0).ok_or_else(|| {
                    crate::Error::Invalid(format!("{n} rows overflow the output size"))
                })?;
                let mut y = scratch::stale(len);
                q.matmul_into(x, n, Isa::detect(), &mut y)?;
                Ok(y)
            }
            Weight::Dense(w) => {
                if let Some(y) = cpu_dense(x, n, w) {
                    return Ok(y);
                }
                let xt = Tensor::from_slice(x, (n, x.len() / n.max(1)), w.device())?;
                Ok(candle_product(&xt, w)?.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }
}

/// Dense CPU weights on plain slices: few rows through the streaming loop, more through
/// the native bf16 GEMM (bf16 weights on CPUs with AVX512-BF16) or `gemm` in f32 (f32
/// weights as stored, f16/bf16 weights widened one tile at a time; bf16 weights multiply
/// `x` rounded to bf16, as everywhere). `None` when the weights are not a contiguous CPU
/// matrix or the shapes do not fit (the caller then takes candle's path, which reports
/// errors).
fn cpu_dense(x: &[f32], n: usize, w: &Tensor) -> Option<Vec<f32>> {
    let (out, inp, range, view) = cpu_matrix(w)?;
    if Some(x.len()) != n.checked_mul(inp) {
        return None;
    }
    let small = (1..=SMALL_ROWS).contains(&n);
    let (st, _) = w.storage_and_layout();
    match &*st {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let wv = v.get(range)?;
            match small {
                true => Some(run(wv, x, n, inp, out)),
                false => f32_product(x, n, wv, view, out),
            }
        }
        Storage::Cpu(CpuStorage::F16(v)) => {
            let wv = v.get(range)?;
            match small {
                true => Some(run(wv, x, n, inp, out)),
                false => f32_product(x, n, wv, view, out),
            }
        }
        Storage::Cpu(CpuStorage::BF16(v)) => {
            let wv = v.get(range)?;
            if small {
                return Some(run_bf16(wv, x, n, inp, out));
            }
            // The native bf16 GEMM adds to zeros; without it, `x` rounded to bf16 in f32.
            let mut y = scratch::zeroed(n.checked_mul(out)?);
            if gemm_bf16(x, n, inp, wv, view, out, &mut y) {
                return Some(y);
            }
            let xr: Vec<f32> = to_bf16(x).iter().map(|v| v.to_f32()).collect();
            f32_product(&xr, n, wv, view, out)
        }
        _ => None,
    }
}

/// `x [n, in] · W` on `gemm` in f32 (f16/bf16 weights widened one tile at a time), into a
/// kept buffer that it writes in full.
fn f32_product<T: Elem>(x: &[f32], n: usize, w: &[T], view: View2, out: usize) -> Option<Vec<f32>> {
    let inp = x.len() / n.max(1);
    let mut y = scratch::stale(n.checked_mul(out)?);
    gemm_f32(x, n, inp, w, view, out, &mut y, false).then_some(y)
}

/// A contiguous CPU matrix `w [out, in]`: `(out, in)`, the range of its elements in the
/// storage, and the view `W[k, j] = w[j, k]` (the input dimension contiguous) the GEMMs
/// read. `None` for other tensors.
fn cpu_matrix(w: &Tensor) -> Option<(usize, usize, std::ops::Range<usize>, View2)> {
    if !w.is_contiguous() || !w.device().is_cpu() {
        return None;
    }
    let (out, inp) = w.dims2().ok()?;
    let start = w.layout().start_offset();
    let view = View2 {
        s0: 1,
        s1: inp,
        off: 0,
    };
    Some((
        out,
        inp,
        start..start.checked_add(out.checked_mul(inp)?)?,
        view,
    ))
}

/// Row counts up to this use the streaming path.
pub(crate) const SMALL_ROWS: usize = 8;

/// Output rows per parallel task.
const BLOCK: usize = 32;

/// How far ahead of the products the small-batch tiles prefetch their weights, in bytes,
/// into L2 (the `x` rows stay in L1). At 8 rows of `x` the loop is busy long enough per
/// cache line that the hardware prefetcher alone leaves it waiting on memory. Measured
/// in A/B runs of the 8-row decode step at 256 cached positions (2-core AMD EPYC,
/// 2026-11): f16 weights 30 → 24 ms for a 4 KB prefetch into L1 per weight row, then
/// 23.9 → 21.8 ms for one cursor per tile, 8 KB ahead, into L2; bf16 weights 20.5 → 17.5 ms
/// for the same change.
const PREFETCH: usize = 8192;

/// `x [n, in]` (f32) times `w [out, in]`ᵀ → `[n, out]` f32: on the CPU through
/// [`Weight::matmul_vec`], elsewhere candle's `matmul` in the weights' dtype.
pub(crate) fn linear(x: &Tensor, w: &Weight) -> Result<Tensor> {
    let n = x.dim(0)?;
    let dense = match w {
        Weight::Dense(d) if !(d.device().is_cpu() && x.device().is_cpu()) => d,
        _ => {
            let xv = x
                .to_dtype(DType::F32)?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let y = w.matmul_vec(&xv, n)?;
            let out = y.len() / n.max(1);
            return Ok(Tensor::from_vec(y, (n, out), x.device())?);
        }
    };
    candle_product(x, dense)
}

/// candle's `matmul` of `x` (f32) by `w`ᵀ in the weights' dtype, f32 out.
fn candle_product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dtype() == x.dtype() {
        Ok(x.matmul(&w.t()?)?)
    } else {
        Ok(x.to_dtype(w.dtype())?
            .matmul(&w.t()?)?
            .to_dtype(DType::F32)?)
    }
}

/// The streaming path (`n ≤ SMALL_ROWS` rows of `x [n, in]`, row-major f32) times the
/// matrix `w [out, in]` (f32 or f16) transposed.
fn run<T: Elem>(w: &[T], x: &[f32], n: usize, inp: usize, out: usize) -> Vec<f32> {
    if n == 1 {
        let mut y = vec![0f32; out];
        y.par_chunks_mut(BLOCK).enumerate().for_each(|(bi, ys)| {
            for (r, y) in ys.iter_mut().enumerate() {
                let o = bi * BLOCK + r;
                *y = dot(x, &w[o * inp..(o + 1) * inp]);
            }
        });
        return y;
    }
    let body = Body::detect();
    tiled(w, n, inp, out, |rows, tile| {
        dot_tile(x, rows, inp, tile, body)
    })
}

/// bf16 weights multiply bf16 activations: `x` is rounded to bf16 (to nearest even) once
/// per product, each product of two bf16 values is exact in f32, and the sums are f32,
/// as in a bf16 PyTorch model or candle's bf16 `gemm` (the prefill path, which also
/// rounds `x`). On CPUs with AVX512-BF16 the products run as `vdpbf16ps` ([`dot_tile_bf16`]:
/// twice the products per instruction of an f32 FMA and no widening, which is what makes
/// an 8-row decode step cheap); elsewhere the rounded `x` goes through [`run`], the same
/// products summed in another order.
fn run_bf16(w: &[bf16], x: &[f32], n: usize, inp: usize, out: usize) -> Vec<f32> {
    let xb = to_bf16(x);
    if !has_dpbf16() {
        let xr: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        return run(w, &xr, n, inp, out);
    }
    tiled(w, n, inp, out, |rows, tile| {
        dot_tile_bf16(&xb, rows, inp, tile)
    })
}

/// `y [n, out]` (zeroed, then filled) from parallel tasks of [`BLOCK`] weight rows:
/// `tile(rows, t)` fills `t[r·n + i] = x_i · w_r` for the task's weight rows; each task
/// copies its tile straight into its columns of every row of `y` (no serial transpose).
fn tiled<T: Elem>(
    w: &[T],
    n: usize,
    inp: usize,
    out: usize,
    tile: impl Fn(&[T], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut y = vec![0f32; n * out];
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
            // rows ≤ BLOCK and n ≤ SMALL_ROWS (`cpu_dense` checks it).
            let mut buf = [0f32; BLOCK * SMALL_ROWS];
            let t = &mut buf[..rows * n];
            tile(&w[o0 * inp..(o0 + rows) * inp], t);
            for (i, c) in cols.iter_mut().enumerate() {
                for (r, v) in c.iter_mut().enumerate() {
                    *v = t[r * n + i];
                }
            }
        });
    y
}

/// `ys[o·n + i] = x_i · w_o` with `x` already bf16 (`n = ys.len() / rows ≤ 8` rows of
/// `inp`). With 2 to 8 rows, one `vdpbf16ps` chain per output over 16-wide chunks of k
/// (each lane adds its odd then its even product; a short last chunk is zero-filled),
/// then the lanes' sum as in [`dot_tile`]: the same bits whatever the row count. One row
/// spreads its chunks over four chains (as [`dot`] does for f32 weights), which a lone
/// row needs to hide the instruction's latency. Falls back to widening both sides and
/// the f32 tile on CPUs without AVX512-BF16.
fn dot_tile_bf16(x: &[bf16], w: &[bf16], inp: usize, ys: &mut [f32]) {
    let rows = w.len() / inp.max(1);
    let n = ys.len() / rows.max(1);
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(nr)) = (
        has_dpbf16() && holds(x.len(), n, inp) && Some(ys.len()) == rows.checked_mul(n),
        Rows::new(n),
    ) {
        // SAFETY: avx512f/vl/bw/bf16 checked; x holds n rows of inp, w `rows` rows of
        // inp, ys rows·n outputs (checked above).
        unsafe { avx512bf16::tiles(x, w, inp, nr, ys) };
        return;
    }
    let xr: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    dot_tile(&xr, w, inp, ys, Body::detect());
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
    if let (true, Some(nr)) = (
        (body == Body::Avx2 || body == Body::Avx512)
            && Body::detect() != Body::Scalar
            && holds(x.len(), n, inp)
            && Some(ys.len()) == rows.checked_mul(n),
        Rows::new(n),
    ) {
        if body == Body::Avx512 && Body::detect() == Body::Avx512 {
            // SAFETY: avx2/fma/f16c/avx512f/avx512vl checked; x holds n rows of inp
            // floats, w `rows` rows of inp, ys rows·n outputs (checked above).
            unsafe { avx2::tiles_avx512(x, w, inp, nr, ys) };
        } else {
            // SAFETY: avx2/fma/f16c checked; sizes as above.
            unsafe { avx2::tiles_avx2(x, w, inp, nr, ys) };
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
    use crate::kernels::Rows;
    use std::arch::x86_64::*;

    use super::PREFETCH;

    /// [`tiles`] one weight row at a time.
    ///
    /// # Safety
    /// The CPU has avx2, fma and f16c; `x.len() >= n·inp`; `w` holds `ys.len() / n`
    /// rows of `inp`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tiles_avx2<T: Elem>(
        x: &[f32],
        w: &[T],
        inp: usize,
        n: Rows,
        ys: &mut [f32],
    ) {
        // SAFETY: the features are enabled here; the sizes are this function's contract.
        unsafe { tiles::<T, 1>(x, w, inp, n, ys) }
    }

    /// [`tiles`] two weight rows at a time (16 accumulators need AVX-512VL's registers).
    ///
    /// # Safety
    /// As [`tiles_avx2`], and the CPU has avx512f and avx512vl.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    pub(super) unsafe fn tiles_avx512<T: Elem>(
        x: &[f32],
        w: &[T],
        inp: usize,
        n: Rows,
        ys: &mut [f32],
    ) {
        // SAFETY: the features are enabled here; the sizes are this function's contract.
        unsafe { tiles::<T, 2>(x, w, inp, n, ys) }
    }

    /// All weight rows, R at a time (the rest one at a time), times the n rows of `x`.
    ///
    /// # Safety
    /// As [`tiles_avx2`]; inlined only into a function with those features (and
    /// avx512f/vl when `R = 2`).
    #[inline(always)]
    unsafe fn tiles<T: Elem, const R: usize>(
        x: &[f32],
        w: &[T],
        inp: usize,
        n: Rows,
        ys: &mut [f32],
    ) {
        // A compile-time row count keeps the accumulators in registers.
        macro_rules! go {
            ($n:literal) => {{
                let rows = ys.len() / $n;
                let (wp, yp) = (w.as_ptr(), ys.as_mut_ptr());
                let mut o = 0;
                // SAFETY: `o + R <= rows` (then `o < rows`): weight rows `o..o + R` lie
                // inside `w` (it holds `rows` of them) and outputs `o·N..(o + R)·N`
                // inside `ys`; `x` holds N rows (the contract).
                unsafe {
                    while o + R <= rows {
                        tile::<T, R, $n>(x, wp.add(o * inp), inp, yp.add(o * $n));
                        o += R;
                    }
                    while o < rows {
                        tile::<T, 1, $n>(x, wp.add(o * inp), inp, yp.add(o * $n));
                        o += 1;
                    }
                }
            }};
        }
        crate::kernels::with_rows!(n, go);
    }

    /// R weight rows (at `w`, `inp` apart) × N rows of `x` into `ys[r·N + i]`: each
    /// 8-wide chunk of a weight row is loaded and widened once for the N rows, each chunk
    /// of `x` once for the R weight rows.
    ///
    /// # Safety
    /// As [`tiles`], for the weight rows `w .. w + R·inp` and outputs
    /// `ys .. ys + R·N`.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<T: Elem, const R: usize, const N: usize>(
        x: &[f32],
        w: *const T,
        inp: usize,
        ys: *mut f32,
    ) {
        // SAFETY: inlined into a function with avx2/fma/f16c; k + 8 <= inp (then
        // j < inp) keeps every load inside weight row r < R and row i < N of `x`, and
        // `ys .. ys + R·N` is ours (the contract); prefetches are hints.
        unsafe {
            let xp = x.as_ptr();
            let line = 64 / std::mem::size_of::<T>();
            let mut acc = [[_mm256_setzero_ps(); N]; R];
            let mut k = 0;
            while k + 8 <= inp {
                if k % line == 0 {
                    // R cache lines per line of each row, one cursor through the adjacent
                    // rows; a hint only: an address past the matrix is never dereferenced.
                    let p =
                        (w as *const i8).wrapping_add(R * k * std::mem::size_of::<T>() + PREFETCH);
                    for r in 0..R {
                        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64 * r));
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
}

#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use crate::kernels::simd::avx2::hsum;
    use crate::kernels::Rows;
    use half::bf16;
    use std::arch::x86_64::*;

    use super::PREFETCH;

    /// All weight rows times the n rows of `x`: one row at a time with four accumulators
    /// ([`dot4`]) for a single row of `x`, else two weight rows at a time ([`tile`]; an
    /// odd last row alone).
    ///
    /// # Safety
    /// The CPU has avx512f/vl/bw/bf16 (and avx2 for the final sums); `x.len() >= n·inp`;
    /// `w` holds `ys.len() / n` rows of `inp`.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512bf16,avx2,fma")]
    pub(super) unsafe fn tiles(x: &[bf16], w: &[bf16], inp: usize, n: Rows, ys: &mut [f32]) {
        let (xp, wp, yp) = (x.as_ptr(), w.as_ptr(), ys.as_mut_ptr());
        if n == Rows::R1 {
            for o in 0..ys.len() {
                // SAFETY: `w` holds `ys.len()` rows of `inp`, `x` one (the contract).
                unsafe { *yp.add(o) = dot4(xp, wp.add(o * inp), inp) };
            }
            return;
        }
        macro_rules! go {
            ($n:literal) => {{
                let rows = ys.len() / $n;
                let mut o = 0;
                // SAFETY: weight rows `o..o + 2` (then `o`) lie inside `w`, which holds
                // `rows` of them, outputs `o·N..` inside `ys`; `x` holds N rows.
                unsafe {
                    while o + 2 <= rows {
                        tile::<2, $n>(xp, wp.add(o * inp), inp, yp.add(o * $n));
                        o += 2;
                    }
                    if o < rows {
                        tile::<1, $n>(xp, wp.add(o * inp), inp, yp.add(o * $n));
                    }
                }
            }};
        }
        crate::kernels::with_rows!(n, go);
    }

    /// 16 bf16 values from `p`: `count` of them (≤ 16) read, the rest zero.
    ///
    /// # Safety
    /// The CPU has avx512bw and avx512vl; `p .. p + count` is readable.
    #[inline(always)]
    unsafe fn load16(p: *const bf16, count: usize) -> __m256bh {
        // SAFETY: the caller has avx512bw/vl; `p .. p + count` is readable and the
        // masked load reads no more; `__m256bh` is the 256 bits of a `__m256i`.
        unsafe {
            let v = if count >= 16 {
                _mm256_loadu_si256(p as *const __m256i)
            } else {
                _mm256_maskz_loadu_epi16(((1u32 << count) - 1) as __mmask16, p as *const i16)
            };
            std::mem::transmute::<__m256i, __m256bh>(v)
        }
    }

    /// `x · w` for one row: four accumulators, each taking every fourth 16-wide chunk
    /// while four remain, the rest (the last chunk zero-filled) into the first; then
    /// `(a0 + a1) + (a2 + a3)` and the lane sum. A single weight stream, which the
    /// hardware prefetcher follows best, and enough independent chains to hide the
    /// `vdpbf16ps` latency.
    ///
    /// # Safety
    /// As [`tiles`], for `x .. x + inp` and `w .. w + inp`.
    #[inline(always)]
    unsafe fn dot4(x: *const bf16, w: *const bf16, inp: usize) -> f32 {
        // SAFETY: the caller has the features; every chunk read starts below `inp`
        // and `load16` reads at most the `count` values left of both rows.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut k = 0;
            while k + 64 <= inp {
                for (j, a) in acc.iter_mut().enumerate() {
                    let o = k + 16 * j;
                    *a = _mm256_dpbf16_ps(*a, load16(w.add(o), 16), load16(x.add(o), 16));
                }
                k += 64;
            }
            while k < inp {
                let count = (inp - k).min(16);
                acc[0] = _mm256_dpbf16_ps(acc[0], load16(w.add(k), count), load16(x.add(k), count));
                k += 16;
            }
            hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ))
        }
    }

    /// R weight rows (at `w`, `inp` apart) × N rows of `x` (at `x`, `inp` apart) into
    /// `ys[r·N + i]`, one accumulator per output over 16-wide chunks (the last one
    /// zero-filled), then the lane sum. The R rows are adjacent in memory, so the
    /// prefetch runs one cursor through them at the rate they are consumed (per-row
    /// cursors, two interleaved streams, halved the streaming rate in a
    /// microbenchmark).
    ///
    /// # Safety
    /// As [`tiles`], for the weight rows `w .. w + R·inp` and outputs
    /// `ys .. ys + R·N`.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<const R: usize, const N: usize>(
        x: *const bf16,
        w: *const bf16,
        inp: usize,
        ys: *mut f32,
    ) {
        // SAFETY: the caller has the features; chunk reads stay below `inp` in weight
        // rows r < R and rows i < N of `x`, outputs `ys .. ys + R·N` are ours;
        // prefetches are hints.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); N]; R];
            let mut k = 0;
            while k < inp {
                let count = (inp - k).min(16);
                if k % 32 == 0 {
                    // R cache lines per 32 values of each row; a hint only: an address past
                    // the matrix is never dereferenced.
                    let p = (w as *const i8).wrapping_add(R * k * 2 + PREFETCH);
                    for r in 0..R {
                        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64 * r));
                    }
                }
                let wv: [__m256bh; R] = std::array::from_fn(|r| load16(w.add(r * inp + k), count));
                for i in 0..N {
                    let xv = load16(x.add(i * inp + k), count);
                    for r in 0..R {
                        acc[r][i] = _mm256_dpbf16_ps(acc[r][i], wv[r], xv);
                    }
                }
                k += 16;
            }
            for r in 0..R {
                for i in 0..N {
                    *ys.add(r * N + i) = hsum(acc[r][i]);
                }
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
    fn small_linear_matches_f64_reference() -> crate::TestResult {
        for (out, inp) in [(70, 43), (37, 1100)] {
            small_linear_case(out, inp)?;
        }
        Ok(())
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

    /// The `vdpbf16ps` chain as Intel documents it, in scalar f32: each of the 8 lanes
    /// adds, per 16-wide chunk at `k`, the product of its odd element `k + 2l + 1` and then
    /// of its even one `k + 2l` (products of two bf16 values are exact in f32; elements
    /// past the row count as 0).
    fn dpbf16_chunk(acc: &mut [f32; 8], x: &[bf16], w: &[bf16], k: usize) {
        let p = |j: usize| match (x.get(j), w.get(j)) {
            (Some(a), Some(b)) => a.to_f32() * b.to_f32(),
            _ => 0.0,
        };
        for (l, a) in acc.iter_mut().enumerate() {
            *a += p(k + 2 * l + 1);
            *a += p(k + 2 * l);
        }
    }

    /// `hsum`'s order: lanes i + (i + 4), then (0 + 2) + (1 + 3).
    fn lane_sum(v: [f32; 8]) -> f32 {
        let s: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
        (s[0] + s[2]) + (s[1] + s[3])
    }

    /// One output as the bf16 kernel documents it: one chain for 2 to 8 rows of `x`;
    /// four for a single row (chunk c of the first `inp / 64 · 4` into chain c mod 4, the
    /// rest into chain 0, then `(a0 + a1) + (a2 + a3)`).
    fn dpbf16_reference(x: &[bf16], w: &[bf16], one_row: bool) -> f32 {
        let inp = x.len();
        let mut acc = [[0f32; 8]; 4];
        let full = if one_row { inp / 64 * 4 } else { 0 };
        for c in 0..inp.div_ceil(16) {
            let chain = if c < full { c % 4 } else { 0 };
            dpbf16_chunk(&mut acc[chain], x, w, 16 * c);
        }
        lane_sum(std::array::from_fn(|l| {
            (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l])
        }))
    }

    /// bf16 weights: the products equal the documented instruction's chain bit for bit
    /// on CPUs with AVX512-BF16, widths below and above one 64-wide step and not a
    /// multiple of 16, every row count; everywhere, the f64 sum of the bf16-rounded
    /// inputs within rounding.
    #[test]
    fn bf16_products_follow_the_documented_instruction() {
        let exact = has_dpbf16();
        println!("AVX512-BF16 on this CPU: {exact} (bit-exact comparison {exact})");
        for (rows, inp) in [(5usize, 43usize), (4, 200), (3, 1100), (2, 16)] {
            let w: Vec<bf16> = data(rows * inp, 21)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            for n in 1..=8 {
                let xf = data(n * inp, 22 + n as u32);
                let x = to_bf16(&xf);
                let mut ys = vec![0f32; rows * n];
                dot_tile_bf16(&x, &w, inp, &mut ys);
                for o in 0..rows {
                    let wo = &w[o * inp..(o + 1) * inp];
                    for i in 0..n {
                        let xi = &x[i * inp..(i + 1) * inp];
                        let got = ys[o * n + i];
                        let want: f64 = xi
                            .iter()
                            .zip(wo)
                            .map(|(a, b)| a.to_f64() * b.to_f64())
                            .sum();
                        let tol = 1e-4 * (1.0 + want.abs());
                        assert!(
                            (got as f64 - want).abs() < tol,
                            "{rows}x{inp} n={n} ({o},{i})"
                        );
                        if exact {
                            let r = dpbf16_reference(xi, wo, n == 1);
                            assert_eq!(
                                got.to_bits(),
                                r.to_bits(),
                                "{rows}x{inp} n={n} ({o},{i}): {got} vs {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Many rows times bf16 weights (prefill, harvest): on CPUs with AVX512-BF16 the
    /// native bf16 GEMM, the documented instruction chain bit for bit with f32 outputs;
    /// everywhere within bf16 rounding of the f64 sum of the bf16-rounded input (candle's
    /// path also rounds its outputs to bf16: `2^-8` of the magnitude more).
    #[test]
    fn batched_bf16_products_follow_the_contract() -> crate::TestResult {
        use crate::kernels::gemm_bf16::gemm_bf16_scalar;
        for (n, out, inp) in [(9usize, 70usize, 43usize), (40, 37, 1100)] {
            let xf = data(n * inp, 31);
            let wf: Vec<bf16> = data(out * inp, 32)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let x = Tensor::from_vec(xf.clone(), (n, inp), &candle_core::Device::Cpu)?;
            let w = Tensor::from_vec(wf.clone(), (out, inp), &candle_core::Device::Cpu)?;
            let y: Vec<f32> = linear(&x, &Weight::Dense(w))?.flatten_all()?.to_vec1()?;
            let view = View2 {
                s0: 1,
                s1: inp,
                off: 0,
            };
            let mut want = vec![0f32; n * out];
            assert!(gemm_bf16_scalar(&xf, n, inp, &wf, view, out, &mut want));
            if has_dpbf16() {
                let bits = |s: &[f32]| s.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&want), "n={n} out={out} inp={inp}");
            }
            for i in 0..n {
                for o in 0..out {
                    let terms = (0..inp).map(|k| {
                        bf16::from_f32(xf[i * inp + k]).to_f64() * wf[o * inp + k].to_f64()
                    });
                    let want = terms.clone().sum::<f64>();
                    let mag = terms.map(f64::abs).sum::<f64>();
                    let tol = (1.0 / 256.0 + (inp + 2) as f64 / 16_777_216.0) * mag;
                    let g = y[i * out + o] as f64;
                    assert!((g - want).abs() <= tol, "({i},{o}): {g} vs {want} ± {tol}");
                }
            }
        }
        Ok(())
    }

    fn small_linear_case(out: usize, inp: usize) -> crate::TestResult {
        let wf = data(out * inp, 7);
        // Rows 0 and 1 of each dtype's 2-row product: the 8-row product must repeat them
        // bit for bit (the same FMA chain per output whatever the batch).
        let mut two: Vec<Vec<Vec<f32>>> = Vec::new();
        for n in [1usize, 2, 3, 8] {
            let mut xf = data(n * inp, 3);
            if let Some(first) = two.first().map(|_| data(2 * inp, 3)) {
                xf[..2 * inp].copy_from_slice(&first);
            }
            let x = Tensor::from_vec(xf.clone(), (n, inp), &candle_core::Device::Cpu)?;
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let w = Tensor::from_vec(wf.clone(), (out, inp), &candle_core::Device::Cpu)?
                    .to_dtype(dt)?;
                let wr: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let y = linear(&x, &Weight::Dense(w.clone()))?.to_vec2::<f32>()?;
                match n {
                    2 => two.push(y.clone()),
                    8 => {
                        let k = [DType::F32, DType::F16, DType::BF16]
                            .iter()
                            .position(|&d| d == dt)
                            .ok_or("a listed dtype")?;
                        for i in 0..2 {
                            let (a, b) = (&y[i], &two[k][i]);
                            assert!(a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()));
                        }
                    }
                    _ => {}
                }
                // bf16 weights multiply x rounded to bf16.
                let xr: Vec<f32> = match dt {
                    DType::BF16 => xf.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                    _ => xf.clone(),
                };
                for i in 0..n {
                    for o in 0..out {
                        let want: f64 = (0..inp)
                            .map(|k| xr[i * inp + k] as f64 * wr[o * inp + k] as f64)
                            .sum();
                        let tol = 1e-4 * (1.0 + want.abs());
                        assert!((y[i][o] as f64 - want).abs() < tol, "{dt:?} n={n} {i},{o}");
                    }
                }
            }
        }
        Ok(())
    }
}
