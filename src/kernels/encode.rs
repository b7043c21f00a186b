//! Dense encode `pre[N, d_sae] = xs[N, d_in] · W_enc + b_enc` in f32, reading the
//! weights in their stored dtype and layout.
//!
//! * Small batches (`N ≤ GEMV_MAX_TOKENS`) are memory-bound: each latent tile of
//!   `W_enc` is streamed once for all tokens, converted to f32 in registers
//!   ([`super::simd`]), tiles spread over threads.
//! * Larger batches are compute-bound: f32 weights go straight to the `gemm`
//!   crate (candle's CPU GEMM) with their strides; f16 weights (no CPU here has a
//!   native f16 dot product) are widened one latent tile at a time into a small f32
//!   buffer, so no f32 copy of the whole encoder ever exists.
//! * bf16 weights on a CPU with AVX512-BF16 take [`super::gemm_bf16`] from
//!   [`BF16_GEMM_MIN_TOKENS`] tokens: the input rounded to bf16 once, products on
//!   `vdpbf16ps`, f32 sums. Elsewhere they take the two paths above (f32 products of the
//!   unrounded input with the widened weights).

use rayon::prelude::*;

use half::bf16;

use super::gemm_bf16::{gemm_bf16, has_dpbf16};
use super::holds;
use super::simd::{axpy, axpy4, dot, Elem};
use crate::{Error, Result};

/// Batches up to this many tokens take the streaming (GEMV-like) path.
pub const GEMV_MAX_TOKENS: usize = 32;
/// bf16 weights take the native bf16 GEMM from this many tokens (where the CPU has it).
/// Below it the encode is memory-bound and the streaming path, which reads each weight
/// row in long runs straight into the products, was measured faster (4096×65536, A/B in
/// one run: 1 token 40 vs 95 ms, 4 tokens 93 vs 103 ms, 16 tokens 348 vs 161 ms).
pub const BF16_GEMM_MIN_TOKENS: usize = 8;
/// Latents per tile of the GEMM path (f16/bf16 widening buffer: `d_in × TILE` f32).
const TILE: usize = 256;
/// Accumulator budget of one streaming tile, in f32 elements (`n × width`): 128 KiB, L2-resident.
const GEMV_ACC: usize = 32 * 1024;

/// Latents per tile of the streaming path: as wide as the accumulator budget allows
/// (long contiguous runs of each weight row), but at least one tile per thread.
fn gemv_tile(n: usize, d_sae: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_cache = (GEMV_ACC / n.max(1)).max(64);
    let by_threads = d_sae.div_ceil(threads).max(64);
    by_cache.min(by_threads).div_ceil(8) * 8
}

/// A 2-D view `[d_in, d_sae]` into a weight buffer: element `(k, i)` is at `off + k·s0 + i·s1`.
#[derive(Clone, Copy, Debug)]
pub struct View2 {
    /// Stride of the input dimension.
    pub s0: usize,
    /// Stride of the latent dimension.
    pub s1: usize,
    /// Offset of element (0, 0).
    pub off: usize,
}

impl View2 {
    /// Whether every element `(k, j)`, `k < d_in`, `j < d_out`, of the view is inside a
    /// buffer of `len` elements (computed without overflow).
    pub fn fits(self, d_in: usize, d_out: usize, len: usize) -> bool {
        if d_in == 0 || d_out == 0 {
            return true;
        }
        let last = (d_in - 1)
            .checked_mul(self.s0)
            .and_then(|a| {
                (d_out - 1)
                    .checked_mul(self.s1)
                    .and_then(|b| a.checked_add(b))
            })
            .and_then(|a| a.checked_add(self.off));
        matches!(last, Some(l) if l < len)
    }
}

/// Compute `pre = xs · W + b` for `n` tokens. `xs` is `[n, d_in]` row-major,
/// `pre` is `[n, d_sae]` row-major (`d_sae = b.len()`), `w` is viewed through `v`.
/// Errors, touching nothing, when `xs` or `pre` is too short or the view reaches past `w`.
pub fn encode_dense<T: Elem>(
    xs: &[f32],
    n: usize,
    d_in: usize,
    w: &[T],
    v: View2,
    b: &[f32],
    pre: &mut [f32],
) -> Result<()> {
    encode_dense_with(xs, n, d_in, w, v, b, pre, true)
}

/// [`encode_dense`], with the native bf16 GEMM allowed or not (`native`): the tests run
/// both paths on one CPU.
#[allow(clippy::too_many_arguments)]
pub fn encode_dense_with<T: Elem>(
    xs: &[f32],
    n: usize,
    d_in: usize,
    w: &[T],
    v: View2,
    b: &[f32],
    pre: &mut [f32],
    native: bool,
) -> Result<()> {
    let d_sae = b.len();
    if !holds(xs.len(), n, d_in) {
        return Err(Error::Invalid(format!(
            "dense encode: {} inputs for {n} tokens of width {d_in}",
            xs.len()
        )));
    }
    if !holds(pre.len(), n, d_sae) {
        return Err(Error::Invalid(format!(
            "dense encode: room for {} pre-activations, {n} tokens of {d_sae} latents needed",
            pre.len()
        )));
    }
    if !v.fits(d_in, d_sae, w.len()) {
        return Err(Error::Invalid(format!(
            "dense encode: W_enc view {v:?} of [{d_in}, {d_sae}] reaches past its {} elements",
            w.len()
        )));
    }
    if n == 0 || d_sae == 0 {
        return Ok(());
    }
    let bf16 = as_bf16_slice(w).filter(|_| native && n >= BF16_GEMM_MIN_TOKENS && has_dpbf16());
    if n <= GEMV_MAX_TOKENS && bf16.is_none() {
        gemv(xs, n, d_in, w, v, b, pre);
        return Ok(());
    }
    // The GEMMs accumulate onto the bias.
    for row in pre[..n * d_sae].chunks_mut(d_sae) {
        row.copy_from_slice(b);
    }
    let done = match bf16 {
        Some(wb) => gemm_bf16(xs, n, d_in, wb, v, d_sae, pre),
        None => gemm_f32(xs, n, d_in, w, v, d_sae, pre, true),
    };
    if done {
        Ok(())
    } else {
        // Unreachable: the sizes and the view were checked above.
        Err(Error::Invalid(format!(
            "dense encode: the GEMM declined [{n}, {d_in}] × [{d_in}, {d_sae}]"
        )))
    }
}

/// Streaming path: tiles of latents in parallel; each reads its part of W once.
fn gemv<T: Elem>(xs: &[f32], n: usize, d_in: usize, w: &[T], v: View2, b: &[f32], pre: &mut [f32]) {
    let d_sae = b.len();
    let tile = gemv_tile(n, d_sae);
    let n_tiles = d_sae.div_ceil(tile);
    // Each task fills a [n, tile] block; blocks are copied into `pre` afterwards.
    let blocks: Vec<Vec<f32>> = (0..n_tiles)
        .into_par_iter()
        .map(|t| {
            let (l0, l1) = (t * tile, ((t + 1) * tile).min(d_sae));
            let width = l1 - l0;
            let mut acc = vec![0f32; n * width];
            for r in 0..n {
                acc[r * width..(r + 1) * width].copy_from_slice(&b[l0..l1]);
            }
            if v.s1 == 1 {
                // Input-major rows: acc[r] += xs[r][k] · W[k, l0..l1] for every k.
                // Four rows per pass: one read-modify-write of acc per four rows streamed.
                let seg = |k: usize| {
                    let o = v.off + k * v.s0 + l0;
                    &w[o..o + width]
                };
                let mut k = 0;
                while k + 4 <= d_in {
                    let rows = [seg(k), seg(k + 1), seg(k + 2), seg(k + 3)];
                    for r in 0..n {
                        let x = &xs[r * d_in + k..r * d_in + k + 4];
                        axpy4(
                            &mut acc[r * width..(r + 1) * width],
                            [x[0], x[1], x[2], x[3]],
                            rows,
                        );
                    }
                    k += 4;
                }
                for k in k..d_in {
                    for r in 0..n {
                        axpy(
                            &mut acc[r * width..(r + 1) * width],
                            xs[r * d_in + k],
                            seg(k),
                        );
                    }
                }
            } else if v.s0 == 1 {
                // Latent-major columns: one dot product per (token, latent).
                for i in 0..width {
                    let o = v.off + (l0 + i) * v.s1;
                    let col = &w[o..o + d_in];
                    for r in 0..n {
                        acc[r * width + i] += dot(&xs[r * d_in..(r + 1) * d_in], col);
                    }
                }
            } else {
                for i in 0..width {
                    for r in 0..n {
                        let x = &xs[r * d_in..(r + 1) * d_in];
                        let s: f32 = (0..d_in)
                            .map(|k| x[k] * w[v.off + k * v.s0 + (l0 + i) * v.s1].to_f32())
                            .sum();
                        acc[r * width + i] += s;
                    }
                }
            }
            acc
        })
        .collect();
    for (t, blk) in blocks.iter().enumerate() {
        let l0 = t * tile;
        let width = blk.len() / n;
        for r in 0..n {
            pre[r * d_sae + l0..r * d_sae + l0 + width]
                .copy_from_slice(&blk[r * width..(r + 1) * width]);
        }
    }
}

fn as_f32_slice<T: Elem>(w: &[T]) -> Option<&[f32]> {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: T is f32 (checked by TypeId), so the slice has the same layout.
        Some(unsafe { std::slice::from_raw_parts(w.as_ptr() as *const f32, w.len()) })
    } else {
        None
    }
}

fn as_bf16_slice<T: Elem>(w: &[T]) -> Option<&[bf16]> {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<bf16>() {
        // SAFETY: T is bf16 (checked by TypeId), so the slice has the same layout.
        Some(unsafe { std::slice::from_raw_parts(w.as_ptr() as *const bf16, w.len()) })
    } else {
        None
    }
}

/// `c [n, d_out] += x [n, d_in] · W` (`acc`) or `c = x · W` (not `acc`: the old values of
/// `c` are never read) with `W[k, j] = w[v.off + k·v.s0 + j·v.s1]`, in f32 on the `gemm`
/// crate: f32 weights directly, f16/bf16 weights widened one [`TILE`]-column block at a
/// time into an f32 buffer. Returns `false`, leaving `c` alone, when the sizes or the
/// view do not fit the buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32<T: Elem>(
    xs: &[f32],
    n: usize,
    d_in: usize,
    w: &[T],
    v: View2,
    d_out: usize,
    c: &mut [f32],
    acc: bool,
) -> bool {
    if !(holds(xs.len(), n, d_in) && holds(c.len(), n, d_out) && v.fits(d_in, d_out, w.len())) {
        return false;
    }
    if n == 0 || d_out == 0 {
        return true;
    }
    if d_in == 0 {
        // An empty sum: c stays as it is, or becomes 0.
        if !acc {
            c[..n * d_out].fill(0.0);
        }
        return true;
    }
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads().max(1));
    if let Some(wf) = as_f32_slice(w) {
        // SAFETY: dst is [n, d_out] row-major inside `c`, lhs [n, d_in] row-major inside
        // `xs`, rhs the [d_in, d_out] view of `wf`, every element inside it (all three
        // checked above). dst = 1·dst + 1·lhs·rhs, or lhs·rhs.
        unsafe {
            gemm::gemm(
                n,
                d_out,
                d_in,
                c.as_mut_ptr(),
                1,
                d_out as isize,
                acc,
                xs.as_ptr(),
                1,
                d_in as isize,
                wf.as_ptr().add(v.off),
                v.s1 as isize,
                v.s0 as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
        return true;
    }
    let mut tile = vec![0f32; d_in * TILE];
    for l0 in (0..d_out).step_by(TILE) {
        let width = TILE.min(d_out - l0);
        // Widen W[:, l0..l0+width] into tile [d_in, width] (row-major).
        tile[..d_in * width]
            .par_chunks_mut(width)
            .enumerate()
            .for_each(|(k, row)| {
                for (i, o) in row.iter_mut().enumerate() {
                    *o = w[v.off + k * v.s0 + (l0 + i) * v.s1].to_f32();
                }
            });
        // SAFETY: dst block [n, width] at column l0 < d_out of `c` (row stride d_out,
        // `c` holds n·d_out), lhs [n, d_in] in `xs` (both checked above), rhs
        // [d_in, width] row-major in `tile`.
        unsafe {
            gemm::gemm(
                n,
                width,
                d_in,
                c.as_mut_ptr().add(l0),
                1,
                d_out as isize,
                acc,
                xs.as_ptr(),
                1,
                d_in as isize,
                tile.as_ptr(),
                1,
                width as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm_bf16::gemm_bf16_scalar;
    use crate::kernels::simd::test_data as data;

    /// bf16's unit roundoff (8 significant bits) and f32's.
    const U_BF16: f64 = 1.0 / 256.0;
    const U_F32: f64 = 1.0 / 16_777_216.0;

    /// The dense encode of bf16 weights on both paths (native bf16 GEMM where the CPU has
    /// it, the f32 stream/GEMM path always), batches below, at and past the switch and
    /// past the stream path, input-major and latent-major weights: every pre-activation
    /// within its own bound of the f64 reference on the unrounded input, per element,
    /// `(u_bf16 [native only] + (d_in + 2)·u_f32) · (|b| + Σ_k |x_k w_k|)`; the native path
    /// is the documented instruction chain bit for bit.
    #[test]
    fn bf16_encode_paths_within_rounding_of_f32() -> crate::TestResult {
        let (d_in, d_sae) = (97usize, 300usize);
        let wv: Vec<bf16> = data(d_in * d_sae, 3)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let b = data(d_sae, 4);
        for v in [
            View2 {
                s0: d_sae,
                s1: 1,
                off: 0,
            },
            View2 {
                s0: 1,
                s1: d_in,
                off: 0,
            },
        ] {
            for n in [1usize, 7, 8, 33, 64] {
                let x: Vec<f32> = data(n * d_in, 5 + n as u32)
                    .iter()
                    .map(|v| 2.0 * v)
                    .collect();
                for native in [true, false] {
                    let mut pre = vec![f32::NAN; n * d_sae];
                    encode_dense_with(&x, n, d_in, &wv, v, &b, &mut pre, native)?;
                    let rounded = native && n >= BF16_GEMM_MIN_TOKENS && has_dpbf16();
                    if rounded {
                        let mut want: Vec<f32> = (0..n).flat_map(|_| b.iter().copied()).collect();
                        assert!(gemm_bf16_scalar(&x, n, d_in, &wv, v, d_sae, &mut want));
                        let bits = |s: &[f32]| s.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&pre), bits(&want), "n={n} {v:?}");
                    }
                    let u = if rounded { U_BF16 } else { 0.0 };
                    for i in 0..n {
                        for j in 0..d_sae {
                            let terms = (0..d_in).map(|k| {
                                x[i * d_in + k] as f64 * wv[v.off + k * v.s0 + j * v.s1].to_f64()
                            });
                            let want = b[j] as f64 + terms.clone().sum::<f64>();
                            let mag = (b[j] as f64).abs() + terms.map(f64::abs).sum::<f64>();
                            let tol = (u + (d_in + 2) as f64 * U_F32) * mag;
                            let g = pre[i * d_sae + j] as f64;
                            assert!(
                                (g - want).abs() <= tol,
                                "n={n} native={native} {v:?} ({i},{j}): {g} vs {want} ± {tol}"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// `b[j] + Σ_k x[i][k]·W[k, j]` in f64 by plain loops over the buffer, and the
    /// magnitude `|b[j]| + Σ_k |x[i][k]·W[k, j]|` that bounds its rounding.
    fn plain_loops<T: Elem>(
        x: &[f32],
        n: usize,
        d_in: usize,
        w: &[T],
        v: View2,
        b: &[f32],
    ) -> Vec<(f64, f64)> {
        let mut out = Vec::with_capacity(n * b.len());
        for i in 0..n {
            for (j, &bj) in b.iter().enumerate() {
                let (mut sum, mut mag) = (bj as f64, (bj as f64).abs());
                for k in 0..d_in {
                    let t = x[i * d_in + k] as f64 * w[v.off + k * v.s0 + j * v.s1].to_f32() as f64;
                    sum += t;
                    mag += t.abs();
                }
                out.push((sum, mag));
            }
        }
        out
    }

    /// Every path of the dense encode against plain loops: f32 weights input-major,
    /// latent-major (the transposed `[d_sae, d_in]` storage) and strided with an offset,
    /// batches on the streaming path (≤ 32 tokens) and past it (`gemm` on the f32 view
    /// through its strides, or on widened f16/bf16 tiles, a ragged last tile of 300
    /// latents); f16 and bf16 weights on the f32 paths too. Each pre-activation within
    /// `(d_in + 2)·u_f32·(|b| + Σ_k |x_k w_k|)` of the f64 sum: the bound of any order of
    /// d_in + 1 f32 additions of exact-to-u_f32 products.
    #[test]
    fn dense_encode_matches_plain_loops_in_every_layout() -> crate::TestResult {
        fn run<T: Elem>(conv: impl Fn(f32) -> T) -> crate::TestResult {
            let (d_in, d_sae) = (97usize, 300usize);
            let b = data(d_sae, 21);
            let layouts = [
                (
                    d_in * d_sae,
                    View2 {
                        s0: d_sae,
                        s1: 1,
                        off: 0,
                    },
                    "input-major",
                ),
                (
                    d_in * d_sae,
                    View2 {
                        s0: 1,
                        s1: d_in,
                        off: 0,
                    },
                    "latent-major",
                ),
                (
                    3 + 2 * d_in * d_sae,
                    View2 {
                        s0: 2,
                        s1: 2 * d_in,
                        off: 3,
                    },
                    "strided",
                ),
            ];
            for (len, v, name) in layouts {
                let w: Vec<T> = data(len, 22).into_iter().map(&conv).collect();
                for n in [1usize, 5, 32, 33, 40, 64] {
                    let x: Vec<f32> = data(n * d_in, 30 + n as u32)
                        .iter()
                        .map(|v| 3.0 * v)
                        .collect();
                    let mut pre = vec![f32::NAN; n * d_sae];
                    encode_dense_with(&x, n, d_in, &w, v, &b, &mut pre, false)?;
                    let want = plain_loops(&x, n, d_in, &w, v, &b);
                    for (e, (g, (sum, mag))) in pre.iter().zip(&want).enumerate() {
                        let tol = (d_in + 2) as f64 * U_F32 * mag;
                        assert!(
                            (*g as f64 - sum).abs() <= tol,
                            "{} {name} n={n} ({}, {}): {g} vs {sum} ± {tol}",
                            std::any::type_name::<T>(),
                            e / d_sae,
                            e % d_sae
                        );
                    }
                }
            }
            Ok(())
        }
        run::<f32>(|v| v)?;
        run(half::f16::from_f32)?;
        run(bf16::from_f32)?;
        Ok(())
    }

    /// Without `acc` the f32 GEMM overwrites its output: the same bits as adding to zeros,
    /// whatever the buffer held (NaN here), for f32 weights and for f16 weights widened
    /// tile by tile (past one tile); an empty sum (d_in = 0) gives zeros.
    #[test]
    fn gemm_f32_overwrites_without_acc() {
        let (n, d_in, d_out) = (37usize, 70usize, TILE + 9);
        let x = data(n * d_in, 3);
        let wf = data(d_in * d_out, 4);
        let wh: Vec<half::f16> = wf.iter().map(|&v| half::f16::from_f32(v)).collect();
        let v = View2 {
            s0: 1,
            s1: d_in,
            off: 0,
        };
        let bits = |s: &[f32]| s.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let mut added = vec![0f32; n * d_out];
        let mut over = vec![f32::NAN; n * d_out];
        assert!(gemm_f32(&x, n, d_in, &wf, v, d_out, &mut added, true));
        assert!(gemm_f32(&x, n, d_in, &wf, v, d_out, &mut over, false));
        assert_eq!(bits(&over), bits(&added));
        let mut added = vec![0f32; n * d_out];
        let mut over = vec![f32::NAN; n * d_out];
        assert!(gemm_f32(&x, n, d_in, &wh, v, d_out, &mut added, true));
        assert!(gemm_f32(&x, n, d_in, &wh, v, d_out, &mut over, false));
        assert_eq!(bits(&over), bits(&added));
        let empty = View2 {
            s0: 1,
            s1: 0,
            off: 0,
        };
        let mut c = vec![f32::NAN; 6];
        assert!(gemm_f32::<f32>(&[], 2, 0, &[], empty, 3, &mut c, false));
        assert_eq!(c, vec![0f32; 6]);
        let mut c = vec![5f32; 6];
        assert!(gemm_f32::<f32>(&[], 2, 0, &[], empty, 3, &mut c, true));
        assert_eq!(c, vec![5f32; 6]);
    }

    /// Inputs, outputs or views that do not fit their buffers are errors naming the
    /// buffer at fault, on every path (streaming, `gemm`, native bf16), and leave `pre`
    /// as it was: the `gemm` path hands raw pointers on only after these checks.
    #[test]
    fn dense_encode_rejects_what_does_not_fit() {
        let (d_in, d_sae) = (4usize, 3usize);
        let w = vec![1f32; d_in * d_sae];
        let wb = vec![bf16::ONE; d_in * d_sae];
        let b = vec![0f32; d_sae];
        let tr = View2 {
            s0: 1,
            s1: d_in,
            off: 0,
        };
        for n in [2usize, 40] {
            let x = vec![1f32; n * d_in];
            let mut pre = vec![7f32; n * d_sae];
            let cases: [(&[f32], View2, usize, &str); 5] = [
                (&x[..n * d_in - 1], tr, n * d_sae, "inputs"),
                (&x, tr, n * d_sae - 1, "pre-activations"),
                (&x, View2 { off: 1, ..tr }, n * d_sae, "reaches past"),
                (&x, View2 { s1: d_in + 1, ..tr }, n * d_sae, "reaches past"),
                (
                    &x,
                    View2 {
                        s0: usize::MAX / 2,
                        ..tr
                    },
                    n * d_sae,
                    "reaches past",
                ),
            ];
            for (xs, v, out, what) in cases {
                for e in [
                    encode_dense(xs, n, d_in, &w, v, &b, &mut pre[..out]),
                    encode_dense(xs, n, d_in, &wb, v, &b, &mut pre[..out]),
                ] {
                    let e = e.unwrap_err().to_string();
                    assert!(e.contains("dense encode") && e.contains(what), "n={n}: {e}");
                }
                assert!(pre.iter().all(|&p| p == 7.0), "n={n} {what}: pre untouched");
            }
            // A token count whose input size overflows.
            let e = encode_dense(&x, usize::MAX / 2, d_in, &w, tr, &b, &mut pre).unwrap_err();
            assert!(e.to_string().contains("inputs"), "{e}");
        }
    }
}
