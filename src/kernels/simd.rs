//! The SIMD inner loops: f32 dot products and axpy over f32, f16 or bf16 rows.
//!
//! Safe entry points pick an AVX2+FMA(+F16C) body at run time when the CPU has
//! it and fall back to the scalar loop otherwise (and on non-x86 targets). Both
//! accumulate in f32; tests compare them with the scalar reference.

use half::{bf16, f16};

/// A weight element the kernels can read: converted to f32 in registers.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Widen to f32.
    fn to_f32(self) -> f32;
}
impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}
impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Whether the AVX2 bodies can run on this CPU (checked once).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    })
}

/// Whether the AVX2 bodies can run on this CPU (never, off x86-64).
#[cfg(not(target_arch = "x86_64"))]
pub fn has_avx2() -> bool {
    false
}

/// Scalar reference: `Σ x[i]·w[i]`.
pub fn dot_scalar<T: Elem>(x: &[f32], w: &[T]) -> f32 {
    x.iter().zip(w).map(|(a, b)| a * b.to_f32()).sum()
}

/// Scalar reference: `y[i] += a·w[i]`.
pub fn axpy_scalar<T: Elem>(y: &mut [f32], a: f32, w: &[T]) {
    for (y, w) in y.iter_mut().zip(w) {
        *y += a * w.to_f32();
    }
}

/// `Σ x[i]·w[i]` over `min(x.len(), w.len())` elements, accumulated in f32.
pub fn dot<T: Elem>(x: &[f32], w: &[T]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports avx2, fma and f16c (checked above).
        return unsafe { avx2::dot(x, w) };
    }
    dot_scalar(x, w)
}

/// `y[i] += a·w[i]` over `min(y.len(), w.len())` elements.
pub fn axpy<T: Elem>(y: &mut [f32], a: f32, w: &[T]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports avx2, fma and f16c (checked above).
        return unsafe { avx2::axpy(y, a, w) };
    }
    axpy_scalar(y, a, w)
}

/// Scalar reference: `y[i] += Σ_r a[r]·w[r][i]` over four rows.
pub fn axpy4_scalar<T: Elem>(y: &mut [f32], a: [f32; 4], w: [&[T]; 4]) {
    for (i, y) in y.iter_mut().enumerate() {
        *y += a[0] * w[0][i].to_f32()
            + a[1] * w[1][i].to_f32()
            + a[2] * w[2][i].to_f32()
            + a[3] * w[3][i].to_f32();
    }
}

/// `y[i] += Σ_r a[r]·w[r][i]` over four rows at once: one load and store of `y`
/// per four weight rows streamed. Every row must be at least `y.len()` long.
pub fn axpy4<T: Elem>(y: &mut [f32], a: [f32; 4], w: [&[T]; 4]) {
    let n = y.len();
    if w.iter().any(|r| r.len() < n) {
        // Keep the contract checkable: fall back to four single-row passes.
        for (ar, wr) in a.iter().zip(w) {
            axpy(y, *ar, wr);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports avx2, fma and f16c; every row has at least n elements.
        return unsafe { avx2::axpy4(y, a, w) };
    }
    axpy4_scalar(y, a, w)
}

/// Scalar reference: `out[j] = x · m[j]` for the rows `m[j] = m[j·d..(j + 1)·d]`,
/// `j < out.len()` (rows past the end of `m` give 0).
pub fn dot_rows_scalar<T: Elem>(x: &[f32], m: &[T], d: usize, out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = m
            .get(j * d..(j + 1) * d)
            .map_or(0.0, |r| dot_scalar(&x[..d.min(x.len())], r));
    }
}

/// `out[j] = x · m[j]` for the rows `m[j] = m[j·d..(j + 1)·d]`, `j < out.len()` (rows
/// past the end of `m` give 0): attention scores against a K cache (f32, f16 or bf16)
/// in one call.
pub fn dot_rows<T: Elem>(x: &[f32], m: &[T], d: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && x.len() >= d && super::holds(m.len(), out.len(), d) {
        // SAFETY: the CPU supports avx2, fma and f16c; x holds d and m holds
        // out.len()·d elements (checked above).
        return unsafe { avx2::dot_rows(x, m, d, out) };
    }
    dot_rows_scalar(x, m, d, out)
}

/// Scalar reference: `y += Σ_j a[j]·m[j]` for the rows `m[j] = m[j·d..(j + 1)·d]`,
/// `j < a.len()`, `d = y.len()`.
pub fn axpy_rows_scalar<T: Elem>(y: &mut [f32], a: &[f32], m: &[T]) {
    let d = y.len();
    for (j, &aj) in a.iter().enumerate() {
        if let Some(r) = m.get(j * d..(j + 1) * d) {
            axpy_scalar(y, aj, r);
        }
    }
}

/// `y += Σ_j a[j]·m[j]` for the rows `m[j] = m[j·d..(j + 1)·d]`, `j < a.len()`,
/// `d = y.len()`: an attention head's weighted sum of V rows in one call (`y` stays in
/// registers across the rows). `m` is f32, f16 or bf16.
pub fn axpy_rows<T: Elem>(y: &mut [f32], a: &[f32], m: &[T]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && super::holds(m.len(), a.len(), y.len()) {
        // SAFETY: the CPU supports avx2, fma and f16c; m holds a.len()·y.len() elements
        // (checked above).
        return unsafe { avx2::axpy_rows(y, a, m) };
    }
    axpy_rows_scalar(y, a, m)
}

/// Softmax numerators below `e^-80` (relative to the largest) are dropped: their exp is
/// within a few powers of two of f32's subnormal range, where arithmetic takes microcode
/// assists, and their share of the sum is below 1e-34.
pub const SOFTMAX_CUTOFF: f32 = -80.0;

/// Scalar reference: `s[i] *= scale`; returns the largest product (NaNs ignored, `-∞` for
/// an empty slice).
pub fn scale_max_scalar(s: &mut [f32], scale: f32) -> f32 {
    let mut max = f32::NEG_INFINITY;
    for v in s {
        *v *= scale;
        max = max.max(*v);
    }
    max
}

/// `s[i] *= scale`; returns the largest product (NaNs ignored, `-∞` for an empty slice):
/// the first pass of an attention softmax. The same products and maximum as
/// [`scale_max_scalar`].
pub fn scale_max(s: &mut [f32], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports avx2, fma and f16c (checked above).
        return unsafe { avx2::scale_max(s, scale) };
    }
    scale_max_scalar(s, scale)
}

/// Scalar reference: `s[i] = exp(s[i] − max)` (0 at or below [`SOFTMAX_CUTOFF`]); returns
/// the sum.
pub fn softmax_exp_scalar(s: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for v in s {
        let e = *v - max;
        *v = if e > SOFTMAX_CUTOFF { e.exp() } else { 0.0 };
        sum += *v;
    }
    sum
}

/// `s[i] = exp(s[i] − max)` (0 at or below [`SOFTMAX_CUTOFF`]); returns the sum. The
/// AVX2 body's exp is within 2e-7 relative error of `f32::exp`.
pub fn softmax_exp(s: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports avx2, fma and f16c (checked above).
        return unsafe { avx2::softmax_exp(s, max) };
    }
    softmax_exp_scalar(s, max)
}

/// Scalar reference: `out[i] = g[i]·σ(g[i])·u[i]` (SwiGLU), over the shortest length.
pub fn silu_mul_scalar(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `out[i] = g[i]·σ(g[i])·u[i]` (SwiGLU), over the shortest length.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports avx2, fma and f16c (checked above).
        return unsafe { avx2::silu_mul(g, u, out) };
    }
    silu_mul_scalar(g, u, out)
}

/// The AVX2 bodies; `load8` and `hsum` are shared with the model's small-matmul loop.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::Elem;
    use half::{bf16, f16};
    use std::any::TypeId;
    use std::arch::x86_64::*;

    /// Load 8 elements starting at `p` as f32 lanes.
    ///
    /// # Safety
    /// `p` must point to 8 readable `T`s; the CPU must support avx2 + f16c.
    #[inline(always)]
    pub(crate) unsafe fn load8<T: Elem>(p: *const T) -> __m256 {
        // SAFETY: `p` points to 8 readable `T`s and the caller has avx2/f16c (the contract); each
        // branch reads them as the type `TypeId` says `T` is.
        unsafe {
            if TypeId::of::<T>() == TypeId::of::<f32>() {
                _mm256_loadu_ps(p as *const f32)
            } else if TypeId::of::<T>() == TypeId::of::<f16>() {
                // 8 halves → 8 floats (F16C).
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
            } else if TypeId::of::<T>() == TypeId::of::<bf16>() {
                // bf16 is the top half of an f32: widen u16 → u32 and shift left 16.
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            } else {
                let mut tmp = [0f32; 8];
                for (i, t) in tmp.iter_mut().enumerate() {
                    *t = (*p.add(i)).to_f32();
                }
                _mm256_loadu_ps(tmp.as_ptr())
            }
        }
    }

    /// Horizontal sum of 8 lanes.
    ///
    /// # Safety
    /// The CPU must support avx2.
    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: the caller has avx2; registers only.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }

    /// `e^x` for 8 lanes (Cephes' `expf` scheme): `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`,
    /// `e^r` by a degree-7 polynomial (a degree-5 one times `r²` plus `1 + r`), `2^n` added
    /// to the exponent bits. `x` is clamped to `[−87.3, 88.7]`, where `2^n` is a normal
    /// f32 (so `e^x` of smaller `x` is `~1e-38`, not 0: callers cut off below).
    ///
    /// # Safety
    /// The CPU must support avx2 and fma.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        // SAFETY: the caller has avx2 and fma; registers only.
        unsafe {
            let x = _mm256_min_ps(
                _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
                _mm256_set1_ps(88.7),
            );
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            // ln 2 in two parts: n·LN2_HI is exact in f32 for |n| ≤ 128.
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm256_set1_ps(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                0.166_666_65,
                0.5,
            ] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let e = _mm256_fmadd_ps(
                p,
                _mm256_mul_ps(r, r),
                _mm256_add_ps(r, _mm256_set1_ps(1.0)),
            );
            let pow2n = _mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            );
            _mm256_mul_ps(e, _mm256_castsi256_ps(pow2n))
        }
    }

    /// # Safety
    /// The CPU has avx2, fma and f16c; `x.len() >= d`; `m.len() >= out.len()·d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows<T: Elem>(x: &[f32], m: &[T], d: usize, out: &mut [f32]) {
        // SAFETY: row j < out.len() of `m` is `m[j·d..(j + 1)·d]`, inside `m`
        // (`m.len() >= out.len()·d`), every read of it and of `x` is below column `d`
        // (`x.len() >= d`), and every store into `out` below `out.len()`.
        unsafe {
            let d8 = d - d % 8;
            // Rows of a multiple of 16 columns, four at a time: the same FMAs per row as the
            // loop below, and the four horizontal sums done together (a 4×4 transpose) in the
            // order `hsum` adds, so the result is bit-identical to one row at a time.
            let mut j0 = 0;
            if d.is_multiple_of(16) {
                let zero = super::dot_scalar::<f32>(&[], &[]);
                while j0 + 4 <= out.len() {
                    let r = m.as_ptr().add(j0 * d);
                    let mut a0 = [_mm256_setzero_ps(); 4];
                    let mut a1 = [_mm256_setzero_ps(); 4];
                    let mut i = 0;
                    while i < d {
                        let (x0, x1) = (
                            _mm256_loadu_ps(x.as_ptr().add(i)),
                            _mm256_loadu_ps(x.as_ptr().add(i + 8)),
                        );
                        for p in 0..4 {
                            let rp = r.add(p * d + i);
                            a0[p] = _mm256_fmadd_ps(x0, load8(rp), a0[p]);
                            a1[p] = _mm256_fmadd_ps(x1, load8(rp.add(8)), a1[p]);
                        }
                        i += 16;
                    }
                    // t[p] = low half + high half of a0[p] + a1[p] (hsum's first step).
                    let t = [0, 1, 2, 3].map(|p| {
                        let u = _mm256_add_ps(a0[p], a1[p]);
                        _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1))
                    });
                    // Transpose: c[k] holds lane k of every t[p].
                    let lo01 = _mm_unpacklo_ps(t[0], t[1]);
                    let hi01 = _mm_unpackhi_ps(t[0], t[1]);
                    let lo23 = _mm_unpacklo_ps(t[2], t[3]);
                    let hi23 = _mm_unpackhi_ps(t[2], t[3]);
                    let c0 = _mm_movelh_ps(lo01, lo23);
                    let c1 = _mm_movehl_ps(lo23, lo01);
                    let c2 = _mm_movelh_ps(hi01, hi23);
                    let c3 = _mm_movehl_ps(hi23, hi01);
                    // hsum: (t0 + t2) + (t1 + t3), then the (empty) scalar tail.
                    let v = _mm_add_ps(_mm_add_ps(c0, c2), _mm_add_ps(c1, c3));
                    let v = _mm_add_ps(v, _mm_set1_ps(zero));
                    _mm_storeu_ps(out.as_mut_ptr().add(j0), v);
                    j0 += 4;
                }
            }
            for (j, o) in out.iter_mut().enumerate().skip(j0) {
                let r = m.as_ptr().add(j * d);
                // Two accumulators: two FMA chains in flight.
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut i = 0;
                while i + 16 <= d8 {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), load8(r.add(i)), a0);
                    a1 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(x.as_ptr().add(i + 8)),
                        load8(r.add(i + 8)),
                        a1,
                    );
                    i += 16;
                }
                if i < d8 {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), load8(r.add(i)), a0);
                }
                let tail = std::slice::from_raw_parts(r.add(d8), d - d8);
                *o = hsum(_mm256_add_ps(a0, a1)) + super::dot_scalar(&x[d8..d], tail);
            }
        }
    }

    /// # Safety
    /// The CPU has avx2, fma and f16c; `m.len() >= a.len()·y.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_rows<T: Elem>(y: &mut [f32], a: &[f32], m: &[T]) {
        // SAFETY: chunks `c0..c0 + 64 <= d` of `y` and of rows j < a.len() of `m`,
        // inside `m` (`m.len() >= a.len()·d`).
        unsafe {
            let d = y.len();
            // Columns in chunks of 64: 8 accumulators stay in registers over all rows.
            let mut c0 = 0;
            while c0 + 64 <= d {
                let yp = y.as_mut_ptr().add(c0);
                let mut acc = [0, 8, 16, 24, 32, 40, 48, 56].map(|o| _mm256_loadu_ps(yp.add(o)));
                for (j, &aj) in a.iter().enumerate() {
                    if aj == 0.0 {
                        continue;
                    }
                    let s = _mm256_set1_ps(aj);
                    let r = m.as_ptr().add(j * d + c0);
                    for (k, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(s, load8(r.add(8 * k)), *acc);
                    }
                }
                for (k, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(yp.add(8 * k), *acc);
                }
                c0 += 64;
            }
            if c0 < d {
                for (j, &aj) in a.iter().enumerate() {
                    for k in c0..d {
                        y[k] += aj * m[j * d + k].to_f32();
                    }
                }
            }
        }
    }

    /// # Safety
    /// The caller guarantees avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scale_max(s: &mut [f32], scale: f32) -> f32 {
        // SAFETY: every access is below `n = s.len()`.
        unsafe {
            let n = s.len();
            let p = s.as_mut_ptr();
            let sc = _mm256_set1_ps(scale);
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i + 8 <= n {
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), sc);
                _mm256_storeu_ps(p.add(i), v);
                // maxps returns its second operand when either is NaN: a NaN product leaves
                // the running maximum as it is, as `f32::max` does.
                m = _mm256_max_ps(v, m);
                i += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            let mut max = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            while i < n {
                *p.add(i) *= scale;
                max = max.max(*p.add(i));
                i += 1;
            }
            max
        }
    }

    /// # Safety
    /// The caller guarantees avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn softmax_exp(s: &mut [f32], max: f32) -> f32 {
        // SAFETY: every access is below `n = s.len()`.
        unsafe {
            let n = s.len();
            let p = s.as_mut_ptr();
            let (m, cut) = (_mm256_set1_ps(max), _mm256_set1_ps(super::SOFTMAX_CUTOFF));
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i + 8 <= n {
                let e = _mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m);
                let keep = _mm256_cmp_ps(e, cut, _CMP_GT_OQ);
                let v = _mm256_and_ps(exp8(e), keep);
                _mm256_storeu_ps(p.add(i), v);
                acc = _mm256_add_ps(acc, v);
                i += 8;
            }
            hsum(acc) + super::softmax_exp_scalar(&mut s[i..], max)
        }
    }

    /// # Safety
    /// The caller guarantees avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        // SAFETY: every access is below `n`, the shortest length.
        unsafe {
            let n = g.len().min(u.len()).min(out.len());
            let (gp, up, op) = (g.as_ptr(), u.as_ptr(), out.as_mut_ptr());
            let one = _mm256_set1_ps(1.0);
            let mut i = 0;
            while i + 8 <= n {
                let gv = _mm256_loadu_ps(gp.add(i));
                // σ(g) = 1 / (1 + e^−g); e^−g saturates at e^88.7 for very negative g (σ → 0).
                let den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
                let v = _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(up.add(i)));
                _mm256_storeu_ps(op.add(i), v);
                i += 8;
            }
            super::silu_mul_scalar(&g[i..n], &u[i..n], &mut out[i..n]);
        }
    }

    /// # Safety
    /// The caller guarantees avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot<T: Elem>(x: &[f32], w: &[T]) -> f32 {
        // SAFETY: every access is below `n`, the shorter length.
        unsafe {
            let n = x.len().min(w.len());
            let (xp, wp) = (x.as_ptr(), w.as_ptr());
            // Four independent accumulators hide the FMA latency.
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (j, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * j;
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(o)), load8(wp.add(o)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), load8(wp.add(i)), acc[0]);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ));
            while i < n {
                s += *xp.add(i) * (*wp.add(i)).to_f32();
                i += 1;
            }
            s
        }
    }

    /// # Safety
    /// The caller guarantees avx2, fma and f16c, and `w[r].len() >= y.len()` for all r.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy4<T: Elem>(y: &mut [f32], a: [f32; 4], w: [&[T]; 4]) {
        // SAFETY: every access is below `n = y.len()`, and every row is at least
        // that long (the contract).
        unsafe {
            let n = y.len();
            let yp = y.as_mut_ptr();
            let wp = [w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr()];
            let av = [
                _mm256_set1_ps(a[0]),
                _mm256_set1_ps(a[1]),
                _mm256_set1_ps(a[2]),
                _mm256_set1_ps(a[3]),
            ];
            let mut i = 0;
            while i + 8 <= n {
                let mut v = _mm256_loadu_ps(yp.add(i));
                v = _mm256_fmadd_ps(av[0], load8(wp[0].add(i)), v);
                v = _mm256_fmadd_ps(av[1], load8(wp[1].add(i)), v);
                v = _mm256_fmadd_ps(av[2], load8(wp[2].add(i)), v);
                v = _mm256_fmadd_ps(av[3], load8(wp[3].add(i)), v);
                _mm256_storeu_ps(yp.add(i), v);
                i += 8;
            }
            while i < n {
                *yp.add(i) += a[0] * (*wp[0].add(i)).to_f32()
                    + a[1] * (*wp[1].add(i)).to_f32()
                    + a[2] * (*wp[2].add(i)).to_f32()
                    + a[3] * (*wp[3].add(i)).to_f32();
                i += 1;
            }
        }
    }

    /// # Safety
    /// The caller guarantees avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy<T: Elem>(y: &mut [f32], a: f32, w: &[T]) {
        // SAFETY: every access is below `n`, the shorter length.
        unsafe {
            let n = y.len().min(w.len());
            let (yp, wp) = (y.as_mut_ptr(), w.as_ptr());
            let av = _mm256_set1_ps(a);
            let mut i = 0;
            while i + 8 <= n {
                let v = _mm256_fmadd_ps(av, load8(wp.add(i)), _mm256_loadu_ps(yp.add(i)));
                _mm256_storeu_ps(yp.add(i), v);
                i += 8;
            }
            while i < n {
                *yp.add(i) += a * (*wp.add(i)).to_f32();
                i += 1;
            }
        }
    }
}

/// Deterministic test values in [-1, 1) (shared by the kernel tests).
#[cfg(test)]
pub(crate) fn test_data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_data as data;

    /// The SIMD exp against `f64::exp` over the whole softmax range (scores relative to
    /// their max, down past the cutoff) and SwiGLU against the scalar reference.
    #[test]
    fn exp_based_kernels_match_f64() {
        let n = 1003;
        let mut s: Vec<f32> = (0..n).map(|i| -90.0 + 0.09 * i as f32).collect();
        let want: Vec<f64> = s
            .iter()
            .map(|&v| {
                if v > SOFTMAX_CUTOFF {
                    (v as f64).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let sum = softmax_exp(&mut s, 0.0);
        for (g, w) in s.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 3e-7 * w, "{g} vs {w}");
        }
        let ws: f64 = want.iter().sum();
        assert!((sum as f64 - ws).abs() <= 1e-6 * ws, "{sum} vs {ws}");
        // A max shift: exp(s − max) with max = 3.
        let mut t = vec![3.0f32, 2.0, -77.5, -76.9, 1.5, 0.0, -1.0, 2.5, 3.0];
        let mut r = t.clone();
        let (a, b) = (softmax_exp(&mut t, 3.0), softmax_exp_scalar(&mut r, 3.0));
        assert!((a - b).abs() <= 1e-6 * b);
        assert_eq!(t[2], 0.0, "e^-80.5 is below the cutoff");
        assert!(t[3] > 0.0, "e^-79.9 is kept");

        let g: Vec<f32> = (0..n).map(|i| -100.0 + 0.2 * i as f32).collect();
        let u = data(n, 7);
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        silu_mul(&g, &u, &mut a);
        silu_mul_scalar(&g, &u, &mut b);
        for ((x, y), gi) in a.iter().zip(&b).zip(&g) {
            assert!(
                (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                "g = {gi}: {x} vs {y}"
            );
        }
    }

    /// Attention's row-batched dot products and weighted sums against the scalar loops,
    /// for head sizes below, at and above the 64-column register block.
    #[test]
    fn row_batched_kernels_match_scalar() {
        for d in [8usize, 20, 64, 80, 128] {
            let rows = 37;
            let m = data(rows * d, 3);
            let x = data(d, 4);
            let (mut a, mut b) = (vec![0f32; rows], vec![0f32; rows]);
            dot_rows(&x, &m, d, &mut a);
            dot_rows_scalar(&x, &m, d, &mut b);
            for (g, w) in a.iter().zip(&b) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "d={d}: {g} vs {w}");
            }
            let mut p = data(rows, 5);
            p[3] = 0.0;
            let (mut y1, mut y2) = (data(d, 6), data(d, 6));
            axpy_rows(&mut y1, &p, &m);
            axpy_rows_scalar(&mut y2, &p, &m);
            for (g, w) in y1.iter().zip(&y2) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "d={d}: {g} vs {w}");
            }
        }
    }

    /// Half-precision rows (a f16 or bf16 KV cache) are read exactly: the same bits as
    /// the f32 kernels on the widened values, and close to the scalar loop.
    #[test]
    fn row_kernels_read_half_rows_exactly() {
        fn run<T: Elem>(conv: impl Fn(f32) -> T) {
            for d in [16usize, 20, 64] {
                let rows = 29;
                let m: Vec<T> = data(rows * d, 11).into_iter().map(&conv).collect();
                let wide: Vec<f32> = m.iter().map(|v| v.to_f32()).collect();
                let x = data(d, 12);
                let (mut a, mut b, mut c) = (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
                dot_rows(&x, &m, d, &mut a);
                dot_rows(&x, &wide, d, &mut b);
                dot_rows_scalar(&x, &m, d, &mut c);
                for ((g, w), s) in a.iter().zip(&b).zip(&c) {
                    assert_eq!(g.to_bits(), w.to_bits(), "d={d}");
                    assert!((g - s).abs() <= 1e-5 * (1.0 + s.abs()), "d={d}: {g} vs {s}");
                }
                let p = data(rows, 13);
                let (mut y1, mut y2, mut y3) = (data(d, 14), data(d, 14), data(d, 14));
                axpy_rows(&mut y1, &p, &m);
                axpy_rows(&mut y2, &p, &wide);
                axpy_rows_scalar(&mut y3, &p, &m);
                for ((g, w), s) in y1.iter().zip(&y2).zip(&y3) {
                    assert_eq!(g.to_bits(), w.to_bits(), "d={d}");
                    assert!((g - s).abs() <= 1e-5 * (1.0 + s.abs()), "d={d}: {g} vs {s}");
                }
            }
        }
        run(f16::from_f32);
        run(bf16::from_f32);
    }

    /// The vector scale-and-max gives the scalar loop's products and maximum, NaNs and
    /// empty slices included.
    #[test]
    fn scale_max_matches_scalar() {
        for n in [0usize, 1, 7, 8, 9, 33, 300] {
            let mut a = data(n, 31);
            if n > 5 {
                a[5] = f32::NAN;
            }
            let mut b = a.clone();
            let (ma, mb) = (scale_max(&mut a, 0.125), scale_max_scalar(&mut b, 0.125));
            assert_eq!(ma.to_bits(), mb.to_bits(), "n={n}");
            for (x, y) in a.iter().zip(&b) {
                assert!(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()));
            }
            let want = (0..n)
                .filter(|&i| !(n > 5 && i == 5))
                .map(|i| data(n, 31)[i] * 0.125)
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(ma, want, "n={n}");
        }
    }

    /// Four rows at a time give the same bits as one row at a time.
    #[test]
    fn dot_rows_groups_are_bit_identical() {
        for d in [16usize, 48, 64] {
            let rows = 23;
            let m = data(rows * d, 8);
            let x = data(d, 9);
            let mut all = vec![0f32; rows];
            dot_rows(&x, &m, d, &mut all);
            for (j, a) in all.iter().enumerate() {
                let mut one = [0f32];
                dot_rows(&x, &m[j * d..(j + 1) * d], d, &mut one);
                assert_eq!(a.to_bits(), one[0].to_bits(), "d={d} row {j}");
            }
        }
    }

    fn check<T: Elem>(conv: impl Fn(f32) -> T) {
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 100, 577] {
            let x = data(n, 1);
            let w: Vec<T> = data(n, 2).into_iter().map(&conv).collect();
            let (a, b) = (dot(&x, &w), dot_scalar(&x, &w));
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "dot n={n}: {a} vs {b}"
            );
            let mut y1 = data(n, 3);
            let mut y2 = y1.clone();
            axpy(&mut y1, 0.37, &w);
            axpy_scalar(&mut y2, 0.37, &w);
            for (p, q) in y1.iter().zip(&y2) {
                assert!((p - q).abs() <= 1e-6 * (1.0 + q.abs()), "axpy n={n}");
            }
            let rows: Vec<Vec<T>> = (0..4)
                .map(|r| data(n, 10 + r).into_iter().map(&conv).collect())
                .collect();
            let w4 = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
            let a4 = [0.5, -1.25, 2.0, 0.1];
            let mut y1 = data(n, 4);
            let mut y2 = y1.clone();
            axpy4(&mut y1, a4, w4);
            axpy4_scalar(&mut y2, a4, w4);
            for (p, q) in y1.iter().zip(&y2) {
                assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "axpy4 n={n}");
            }
        }
    }

    #[test]
    fn simd_matches_scalar_for_every_dtype() {
        check::<f32>(|v| v);
        check::<f16>(f16::from_f32);
        check::<bf16>(bf16::from_f32);
    }

    #[test]
    fn conversions_are_exact() {
        // Values exact in every dtype: the SIMD widening must reproduce them bit for bit.
        let x = vec![1f32; 16];
        let vals: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 2.0).collect();
        let want: f32 = vals.iter().sum();
        assert_eq!(
            dot(
                &x,
                &vals.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()
            ),
            want
        );
        assert_eq!(
            dot(
                &x,
                &vals.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()
            ),
            want
        );
    }
}
