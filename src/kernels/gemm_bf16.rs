//! `C += bf16(X) · W` for bf16 weights on the CPU's bf16 dot-product instruction
//! (`vdpbf16ps`, AVX512-BF16): the dense SAE encode and the model's batched products.
//!
//! The contract, per output `(i, j)`: `X` is rounded to bf16 (to nearest even) once,
//! then, for the pairs `p = 0, 1, …` of the input dimension in ascending order,
//! `c += x[2p+1]·w[2p+1]` and then `c += x[2p]·w[2p]` in f32 (each product of two bf16
//! values is exact in f32; a missing last element counts as 0). That is one
//! `vdpbf16ps` lane per output over the whole input dimension, so the result is the
//! same bits whatever the batch, the blocking or the thread count, and
//! [`gemm_bf16_scalar`] reproduces it bit for bit (inputs and sums away from f32's
//! subnormal range, which the instruction flushes to zero).
//!
//! The shape is a classic packed GEMM: `X` is rounded and packed once per call into
//! panels of [`MR`] rows (`[pairs][MR]` dwords, one bf16 pair each); each task owns a
//! block of up to [`NC`] output columns and, per block of [`KCP`] input pairs, packs its
//! weights into micro-panels of [`NR`] columns (`[pairs][NR]` dwords, read in the stored
//! layout: input-major rows, latent-major columns or any strides) and runs the
//! `MR × NR` micro-kernel (24 accumulators of 16 lanes) over every row panel, the
//! micro-panel staying in L2. Weights are read once per call; no f32 copy exists.

use half::bf16;
use rayon::prelude::*;

use super::encode::View2;

/// Rows of `X` per micro-tile.
pub const MR: usize = 8;
/// Output columns per micro-tile: three registers of 16 f32 lanes.
pub const NR: usize = 48;
/// Input pairs (two input elements each) per packed block: a micro-panel of
/// `KCP × NR` dwords is 48 KiB, L2-resident while every row panel runs over it. Longer
/// blocks mean fewer passes over the output block, which cost more than the L1 misses
/// (256 × 8192 × 65,536 at 2 threads: 128 pairs ran 68% of the bf16 peak, 256 pairs 72%).
pub const KCP: usize = 256;
/// Output columns per task (32 micro-panels): fewer, wider column blocks stream the packed
/// input fewer times (its 256 × 8192 bf16 pairs do not fit L2).
pub const NC: usize = 32 * NR;
/// Input pairs per packed block when all rows fit one micro-tile (memory-bound).
pub const KCP_FEW: usize = 16;
/// Output columns per task then: 6 KiB runs of each bf16 weight row, a 192 KiB block.
pub const NC_FEW: usize = 64 * NR;

use super::with_kept;

thread_local! {
    /// Each thread's buffer of packed weights (at most `KCP × NC` dwords, 1.5 MiB).
    static PACK: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The calling thread's buffer of packed input (as large as its largest product's
    /// input in bf16), kept across calls.
    static A_BUF: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether this CPU has AVX512-BF16 with the F, VL and BW parts the kernels use
/// (checked once).
pub fn has_dpbf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            super::simd::has_avx2()
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `x` rounded to bf16 (to nearest even; NaN stays NaN), `vcvtne2ps2bf16` where the CPU
/// has it.
pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; x.len()];
    to_bf16_into(x, &mut out);
    out
}

/// [`to_bf16`] into `out` (over the shorter of the two).
pub fn to_bf16_into(x: &[f32], out: &mut [bf16]) {
    let n = x.len().min(out.len());
    #[cfg(target_arch = "x86_64")]
    if has_dpbf16() {
        // SAFETY: avx512f/vl/bw/bf16 checked; both slices hold n elements.
        unsafe { avx512::convert(&x[..n], &mut out[..n]) };
        return;
    }
    for (o, &v) in out[..n].iter_mut().zip(&x[..n]) {
        *o = bf16::from_f32(v);
    }
}

/// The contract in plain scalar f32 (see the module docs): `c[i·d_out + j] +=` the
/// pairwise chain of `bf16(x_i) · w[:, j]`: the oracle of the tests.
/// Returns `false` (and leaves `c` alone) when the sizes or the view do not fit.
#[cfg(test)]
pub fn gemm_bf16_scalar(
    x: &[f32],
    n: usize,
    d_in: usize,
    w: &[bf16],
    v: View2,
    d_out: usize,
    c: &mut [f32],
) -> bool {
    if !sizes_fit(x, n, d_in, w, v, d_out, c) {
        return false;
    }
    let at = |k: usize, j: usize| w[v.off + k * v.s0 + j * v.s1].to_f32();
    for i in 0..n {
        let xi: Vec<f32> = x[i * d_in..(i + 1) * d_in]
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect();
        for j in 0..d_out {
            let mut acc = c[i * d_out + j];
            for p in 0..d_in.div_ceil(2) {
                let (k0, k1) = (2 * p, 2 * p + 1);
                if k1 < d_in {
                    acc += xi[k1] * at(k1, j);
                } else {
                    acc += 0.0;
                }
                acc += xi[k0] * at(k0, j);
            }
            c[i * d_out + j] = acc;
        }
    }
    true
}

fn sizes_fit(
    x: &[f32],
    n: usize,
    d_in: usize,
    w: &[bf16],
    v: View2,
    d_out: usize,
    c: &[f32],
) -> bool {
    super::holds(x.len(), n, d_in)
        && super::holds(c.len(), n, d_out)
        && v.fits(d_in, d_out, w.len())
}

/// `c [n, d_out] += bf16(x [n, d_in]) · W` with `W[k, j] = w[v.off + k·v.s0 + j·v.s1]`, on
/// `vdpbf16ps` (see the module docs for the exact sums). Returns `false`, leaving `c`
/// alone, when the CPU lacks AVX512-BF16 or the sizes or the view do not fit the
/// buffers; the caller then takes another path.
pub fn gemm_bf16(
    x: &[f32],
    n: usize,
    d_in: usize,
    w: &[bf16],
    v: View2,
    d_out: usize,
    c: &mut [f32],
) -> bool {
    if !has_dpbf16() || !sizes_fit(x, n, d_in, w, v, d_out, c) {
        return false;
    }
    run(x, n, d_in, Src::View(w, v), d_out, c, true);
    true
}

/// Weights `W [d_in, d_out]` packed once into the micro-panels [`gemm_bf16`] builds per
/// call (`[d_out.div_ceil(NR)][d_in.div_ceil(2)][NR]` dwords, one bf16 pair each): a
/// matrix used by many products skips the packing. As many bytes as the bf16 weights,
/// rounded up to whole panels.
#[derive(Clone)]
pub struct PackedBf16 {
    d_in: usize,
    d_out: usize,
    data: Vec<u32>,
}

impl PackedBf16 {
    /// Pack `W[k, j] = w[v.off + k·v.s0 + j·v.s1]`; `None` when the view does not fit `w`
    /// or the sizes overflow.
    pub fn new(w: &[bf16], v: View2, d_in: usize, d_out: usize) -> Option<Self> {
        if !v.fits(d_in, d_out, w.len()) {
            return None;
        }
        let kp = d_in.div_ceil(2);
        let len = d_out.div_ceil(NR).checked_mul(kp)?.checked_mul(NR)?;
        let mut data = vec![0u32; len];
        // Column blocks in parallel: each packs its panels for every pair.
        let per = 8usize;
        data.par_chunks_mut((per * kp * NR).max(1))
            .enumerate()
            .for_each(|(i, out)| {
                let j0 = i * per * NR;
                let width = (per * NR).min(d_out - j0);
                pack_b(w, v, d_in, j0, width, 0, kp, out);
            });
        Some(PackedBf16 { d_in, d_out, data })
    }

    /// `(d_in, d_out)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedBf16")
            .field("d_in", &self.d_in)
            .field("d_out", &self.d_out)
            .finish()
    }
}

/// [`gemm_bf16`] on prepacked weights: `c [n, d_out] += bf16(x [n, d_in]) · W` (`acc`), or
/// `c =` the same sums started from 0 (not `acc`: the old values of `c` are never read),
/// the same bits. Returns `false`, leaving `c` alone, when the CPU lacks AVX512-BF16 or
/// the sizes do not fit.
pub fn gemm_bf16_packed(x: &[f32], n: usize, w: &PackedBf16, c: &mut [f32], acc: bool) -> bool {
    let (d_in, d_out) = w.dims();
    if !has_dpbf16() || !super::holds(x.len(), n, d_in) || !super::holds(c.len(), n, d_out) {
        return false;
    }
    run(x, n, d_in, Src::Packed(w), d_out, c, acc);
    true
}

/// Where the micro-panels come from.
#[derive(Clone, Copy)]
enum Src<'a> {
    /// Packed per call from a strided view (checked by the caller).
    View(&'a [bf16], View2),
    /// Packed once.
    Packed(&'a PackedBf16),
}

/// The GEMM of [`gemm_bf16`] and [`gemm_bf16_packed`] (`acc`: add to `c`, else overwrite
/// it); the caller has checked the CPU and the sizes.
fn run(x: &[f32], n: usize, d_in: usize, src: Src, d_out: usize, c: &mut [f32], acc: bool) {
    if n == 0 || d_out == 0 || d_in == 0 {
        // An empty sum: c stays as it is, or becomes 0.
        if !acc {
            c[..n * d_out].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let kp = d_in.div_ceil(2);
        // The packed input, in this thread's buffer (a fresh one when it is in use: a
        // product started from inside another's parallel loop).
        with_kept(&A_BUF, |a| {
            pack_a(x, n, d_in, a);
            let a: &[u32] = a;
            // Blocking. One row panel (memory-bound): short blocks of input pairs and wide
            // column runs, so each weight row is read in long contiguous runs. More rows
            // (compute-bound): KCP pairs × up to NC columns, the micro-panel in L2.
            let (kcp, max_panels) = if n <= MR {
                (KCP_FEW, NC_FEW / NR)
            } else {
                (KCP, NC / NR)
            };
            // Column blocks of whole micro-panels, as many per thread, as even as they go.
            let threads = rayon::current_num_threads().max(1);
            let panels = d_out.div_ceil(NR);
            let blocks = (threads * panels.div_ceil(threads * max_panels)).min(panels);
            let bounds: Vec<usize> = (0..=blocks)
                .map(|b| (b * panels / blocks * NR).min(d_out))
                .collect();
            // Each task gets its columns of every row of c: disjoint &mut slices.
            let mut parts: Vec<Vec<&mut [f32]>> =
                (0..blocks).map(|_| Vec::with_capacity(n)).collect();
            for row in c[..n * d_out].chunks_mut(d_out) {
                let mut rest = row;
                for (b, part) in parts.iter_mut().enumerate() {
                    let (cols, tail) = rest.split_at_mut(bounds[b + 1] - bounds[b]);
                    part.push(cols);
                    rest = tail;
                }
            }
            let buf_len = match src {
                Src::View(..) => kcp * max_panels.max(panels.div_ceil(blocks)) * NR,
                Src::Packed(_) => 0,
            };
            parts
                .into_par_iter()
                .enumerate()
                .for_each(|(bi, mut rows)| {
                    // One packing buffer per thread, kept across calls (no page faults per call).
                    with_kept(&PACK, |buf| {
                        if buf.len() < buf_len {
                            buf.resize(buf_len, 0);
                        }
                        // Block starts are whole panels: j0 = q0·NR.
                        let j0 = bounds[bi];
                        let q0 = j0 / NR;
                        let width = rows.first().map_or(0, |r| r.len());
                        for p0 in (0..kp).step_by(kcp) {
                            let kpb = kcp.min(kp - p0);
                            let panels = width.div_ceil(NR);
                            if let Src::View(w, v) = src {
                                pack_b(
                                    w,
                                    v,
                                    d_in,
                                    j0,
                                    width,
                                    p0,
                                    kpb,
                                    &mut buf[..panels * kpb * NR],
                                );
                            }
                            for q in 0..panels {
                                let cols = NR.min(width - q * NR);
                                let bp = match src {
                                    Src::View(..) => &buf[q * kpb * NR..(q + 1) * kpb * NR],
                                    Src::Packed(pw) => {
                                        let o = ((q0 + q) * kp + p0) * NR;
                                        &pw.data[o..o + kpb * NR]
                                    }
                                };
                                for (ip, rs) in rows.chunks_mut(MR).enumerate() {
                                    let ap = &a[(ip * kp + p0) * MR..(ip * kp + p0 + kpb) * MR];
                                    // The first block of pairs starts from c or from 0.
                                    let load = acc || p0 > 0;
                                    // SAFETY: avx512f/vl/bw/bf16 checked by the caller; `ap` holds
                                    // kpb·MR dwords, `bp` kpb·NR, every row slice of `rs` has at
                                    // least q·NR + cols elements (its block is `width` wide).
                                    unsafe { avx512::micro(ap, bp, kpb, rs, q * NR, cols, load) };
                                }
                            }
                        }
                    })
                });
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("has_dpbf16 is false off x86-64")
}

/// The instruction's peak on this machine, GFLOP/s (one `vdpbf16ps` on 16 lanes is 32
/// multiply-adds, 64 FLOPs): every rayon thread runs 24 independent register chains of
/// `iters` instructions at once, the best of three runs. `None` without AVX512-BF16.
/// A ceiling for the benchmarks, not a kernel.
pub fn peak_gflops(iters: usize) -> Option<f64> {
    if !has_dpbf16() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let threads = rayon::current_num_threads().max(1);
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let s: f32 = (0..threads)
                .into_par_iter()
                // SAFETY: avx512f/vl/bw/bf16 checked above.
                .map(|i| unsafe { avx512::chains(iters, i as f32) })
                .sum();
            std::hint::black_box(s);
            best = best.min(t.elapsed().as_secs_f64());
        }
        Some((threads * iters * 24 * 64) as f64 / best / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// `x [n, d_in]` rounded to bf16 and packed into `a` as
/// `[n.div_ceil(MR)][d_in.div_ceil(2)][MR]` dwords, each the pair `(x[2p], x[2p+1])`
/// (low half first, as `vdpbf16ps` reads it; a missing last element is 0). The rows past
/// `n` in the last panel keep whatever `a` held: the micro-kernel never reads them.
fn pack_a(x: &[f32], n: usize, d_in: usize, a: &mut Vec<u32>) {
    let kp = d_in.div_ceil(2);
    a.resize(n.div_ceil(MR) * kp * MR, 0);
    a.par_chunks_mut(kp * MR)
        .enumerate()
        .for_each(|(ip, panel)| {
            let mut xb = vec![bf16::ZERO; d_in];
            for r in 0..MR.min(n - ip * MR) {
                to_bf16_into(&x[(ip * MR + r) * d_in..(ip * MR + r + 1) * d_in], &mut xb);
                for (p, pair) in xb.chunks(2).enumerate() {
                    let hi = pair.get(1).map_or(0, |v| v.to_bits() as u32);
                    panel[p * MR + r] = pair[0].to_bits() as u32 | hi << 16;
                }
            }
        });
}

/// Pack the weights of columns `j0 .. j0 + width` and input pairs `p0 .. p0 + kpb` into
/// `width.div_ceil(NR)` micro-panels `out [panel][kpb][NR]` of dwords (pair
/// `(W[2p, j], W[2p+1, j])`; columns past `width` and a missing last input row are 0).
/// Reads follow the storage: whole row runs of the block for input-major weights (long
/// contiguous reads the prefetcher follows), whole column runs for latent-major ones.
/// The caller has checked the view.
#[allow(clippy::too_many_arguments)]
fn pack_b(
    w: &[bf16],
    v: View2,
    d_in: usize,
    j0: usize,
    width: usize,
    p0: usize,
    kpb: usize,
    out: &mut [u32],
) {
    let panel = kpb * NR;
    let bits = |k: usize, j: usize| w[v.off + k * v.s0 + j * v.s1].to_bits() as u32;
    if v.s1 == 1 {
        // Input-major rows: the block's run of two rows, interleaved into every panel.
        for p in 0..kpb {
            let k = 2 * (p0 + p);
            let r0 = &w[v.off + k * v.s0 + j0..][..width];
            let r1 = (k + 1 < d_in).then(|| &w[v.off + (k + 1) * v.s0 + j0..][..width]);
            #[cfg(target_arch = "x86_64")]
            if has_dpbf16() && super::holds(out.len(), width.div_ceil(NR), panel) {
                // SAFETY: avx512f/bw checked; r0 (and r1) hold `width` values; `out`
                // holds every panel the `width` columns touch, each `panel` long, and
                // p < kpb, so row p of each panel is inside it.
                // The next pair of rows (in this block or the next) is prefetched
                // while this one is packed: `2·s0` elements further on.
                unsafe { avx512::interleave_rows(r0, r1, 2 * v.s0, out, panel, p) };
                continue;
            }
            for (q, c0) in (0..width).step_by(NR).enumerate() {
                let c1 = (c0 + NR).min(width);
                let o = &mut out[q * panel + p * NR..q * panel + (p + 1) * NR];
                interleave(&r0[c0..c1], r1.map(|r| &r[c0..c1]), o);
            }
        }
    } else if v.s0 == 1 {
        // Latent-major columns: a pair is two adjacent values of one column.
        let k1 = d_in.min(2 * (p0 + kpb));
        // Pairs with both values present (all but a lone last input when d_in is odd).
        let whole = (k1 - 2 * p0) / 2;
        // Columns (a multiple of 16) whose first `done` pairs (a multiple of 16) the
        // in-register transposes packed.
        #[allow(unused_mut)]
        let (mut cols16, mut done) = (0, 0);
        #[cfg(target_arch = "x86_64")]
        if has_dpbf16() {
            (cols16, done) = (width / 16 * 16, whole / 16 * 16);
            for c0 in (0..cols16).step_by(16) {
                let (q, cc) = (c0 / NR, c0 % NR);
                for pp in (0..done).step_by(16) {
                    let base = v.off + (j0 + c0) * v.s1 + 2 * (p0 + pp);
                    let o = &mut out[q * panel + pp * NR + cc..(q + 1) * panel];
                    // SAFETY: avx512f checked. The loads read w[base + l·s1 .. + 32] for
                    // l < 16: column j0 + c0 + l < j0 + width ≤ d_out, inputs
                    // 2·(p0 + pp) .. 2·(p0 + pp + 16) ≤ 2·(p0 + whole) ≤ k1 ≤ d_in, inside
                    // `w` (the caller checked the view). The stores write o[p·NR ..
                    // p·NR + 16] for p < 16: pp + 16 ≤ kpb and cc + 16 ≤ NR (NR is a
                    // multiple of 16), inside the panel.
                    unsafe { avx512::transpose16(w.as_ptr().add(base), v.s1, o) };
                }
            }
        }
        for c in 0..width.div_ceil(NR) * NR {
            let (q, cc) = (c / NR, c % NR);
            let o = &mut out[q * panel..(q + 1) * panel];
            if c >= width {
                for p in 0..kpb {
                    o[p * NR + cc] = 0;
                }
                continue;
            }
            let from = if c < cols16 { done } else { 0 };
            let base = v.off + (j0 + c) * v.s1;
            for (p, pair) in w[base + 2 * (p0 + from)..base + k1].chunks(2).enumerate() {
                let hi = pair.get(1).map_or(0, |v| v.to_bits() as u32);
                o[(from + p) * NR + cc] = pair[0].to_bits() as u32 | hi << 16;
            }
        }
    } else {
        for c in 0..width.div_ceil(NR) * NR {
            let (q, cc) = (c / NR, c % NR);
            for p in 0..kpb {
                let k = 2 * (p0 + p);
                out[q * panel + p * NR + cc] = if c >= width {
                    0
                } else {
                    let hi = if k + 1 < d_in { bits(k + 1, j0 + c) } else { 0 };
                    bits(k, j0 + c) | hi << 16
                };
            }
        }
    }
}

/// `o[c] = (r0[c], r1[c])` as dwords (`r1` absent: 0), zero past `r0.len()`.
fn interleave(r0: &[bf16], r1: Option<&[bf16]>, o: &mut [u32]) {
    for (c, o) in o.iter_mut().enumerate() {
        *o = match (r0.get(c), r1.and_then(|r| r.get(c))) {
            (Some(a), Some(b)) => a.to_bits() as u32 | (b.to_bits() as u32) << 16,
            (Some(a), None) => a.to_bits() as u32,
            _ => 0,
        };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use crate::kernels::Rows;
    use half::bf16;
    use std::arch::x86_64::*;

    /// `out[i] = bf16(x[i])`, to nearest even (`vcvtne2ps2bf16`, 16 at a time).
    ///
    /// # Safety
    /// The CPU has avx512f, avx512vl, avx512bw, avx512bf16; `out.len() >= x.len()`.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert(x: &[f32], out: &mut [bf16]) {
        // SAFETY: each chunk of `x` and `out` holds 16 elements (`chunks_exact`); `__m256bh` and
        // `__m256i` are the same 256 bits.
        unsafe {
            let mut xs = x.chunks_exact(16);
            let mut os = out.chunks_exact_mut(16);
            for (xc, oc) in (&mut xs).zip(&mut os) {
                let (lo, hi) = (
                    _mm256_loadu_ps(xc.as_ptr()),
                    _mm256_loadu_ps(xc.as_ptr().add(8)),
                );
                // The second operand fills the low half.
                let v: __m256i = std::mem::transmute(_mm256_cvtne2ps_pbh(hi, lo));
                _mm256_storeu_si256(oc.as_mut_ptr() as *mut __m256i, v);
            }
            for (o, &v) in os.into_remainder().iter_mut().zip(xs.remainder()) {
                *o = bf16::from_f32(v);
            }
        }
    }

    /// 24 independent `vdpbf16ps` chains of `iters` steps on registers; returns a sum
    /// so the work is not optimized away.
    ///
    /// # Safety
    /// The CPU has avx512f/vl/bw/bf16.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512bf16")]
    pub(super) unsafe fn chains(iters: usize, seed: f32) -> f32 {
        let a: __m512bh = _mm512_cvtne2ps_pbh(_mm512_set1_ps(seed), _mm512_set1_ps(1e-3));
        let b: __m512bh = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(seed));
        let mut acc = [_mm512_setzero_ps(); 24];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        let s = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v));
        _mm512_reduce_add_ps(s)
    }

    /// Sixteen latent-major columns `l`, `s1` elements apart from `col0`, sixteen pairs
    /// `p` each: `out[p·NR + l]` = the two bf16 values at `col0 + l·s1 + 2p` (low half
    /// first). Sixteen loads of one column's 16 pairs, a 16 × 16 dword transpose in
    /// registers (two unpack stages within 128-bit lanes, two lane shuffles), sixteen
    /// stores.
    ///
    /// # Safety
    /// The CPU has avx512f; `col0 + l·s1 .. + 32` is inside the weights `col0` points
    /// into for every `l < 16`; `out` holds `15·NR + 16` dwords.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16(col0: *const bf16, s1: usize, out: &mut [u32]) {
        // SAFETY: loads and stores stay inside the ranges of the contract.
        unsafe {
            let r: [__m512i; 16] =
                std::array::from_fn(|l| _mm512_loadu_si512(col0.add(l * s1) as *const __m512i));
            // t[2k] / t[2k+1]: rows 2k and 2k+1 interleaved, elements 4j, 4j+1 / 4j+2, 4j+3
            // of each 128-bit lane j.
            let t: [__m512i; 16] = std::array::from_fn(|i| {
                let (a, b) = (r[i & !1], r[i | 1]);
                if i % 2 == 0 {
                    _mm512_unpacklo_epi32(a, b)
                } else {
                    _mm512_unpackhi_epi32(a, b)
                }
            });
            // s[4m + e], lane j: rows 4m .. 4m + 3 at element 4j + e.
            let s: [__m512i; 16] = std::array::from_fn(|i| {
                let (m, e) = (i / 4, i % 4);
                let (a, b) = (t[4 * m + e / 2], t[4 * m + 2 + e / 2]);
                if e % 2 == 0 {
                    _mm512_unpacklo_epi64(a, b)
                } else {
                    _mm512_unpackhi_epi64(a, b)
                }
            });
            // Element p = 4j + e of every row: lane L of it is lane j of s[4L + e].
            let o = out.as_mut_ptr();
            for e in 0..4 {
                let [a0, a1, a2, a3] = [s[e], s[4 + e], s[8 + e], s[12 + e]];
                let u0 = _mm512_shuffle_i32x4::<0x44>(a0, a1);
                let u1 = _mm512_shuffle_i32x4::<0xEE>(a0, a1);
                let u2 = _mm512_shuffle_i32x4::<0x44>(a2, a3);
                let u3 = _mm512_shuffle_i32x4::<0xEE>(a2, a3);
                let rows = [
                    _mm512_shuffle_i32x4::<0x88>(u0, u2),
                    _mm512_shuffle_i32x4::<0xDD>(u0, u2),
                    _mm512_shuffle_i32x4::<0x88>(u1, u3),
                    _mm512_shuffle_i32x4::<0xDD>(u1, u3),
                ];
                for (j, v) in rows.into_iter().enumerate() {
                    _mm512_storeu_si512(o.add((4 * j + e) * NR) as *mut __m512i, v);
                }
            }
        }
    }

    /// Row `p` of every micro-panel of a block (panels `panel` dwords apart in `out`):
    /// `(r0[c], r1[c])` for the `r0.len()` columns (`r1` absent: 0), 16 at a time by
    /// zero-extending to dwords, and zeros up to the end of the last panel; the same
    /// columns `ahead` elements further on (the next pair of rows) are prefetched.
    ///
    /// # Safety
    /// The CPU has avx512f, avx512vl, avx512bw; `r1`, when present, as long as `r0`;
    /// `out` holds `r0.len().div_ceil(NR)` panels of `panel ≥ (p + 1)·NR` dwords.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw")]
    pub(super) unsafe fn interleave_rows(
        r0: &[bf16],
        r1: Option<&[bf16]>,
        ahead: usize,
        out: &mut [u32],
        panel: usize,
        p: usize,
    ) {
        // SAFETY: loads are masked to the columns of `r0` (and `r1`, as long) left from `c`; the
        // store is row `p` of panel `c / NR`, inside `out` (the contract); prefetches are hints.
        unsafe {
            let width = r0.len();
            let o = out.as_mut_ptr();
            let mut c = 0;
            while c < width.div_ceil(NR) * NR {
                if c % 32 == 0 && c < width {
                    // A hint only: an address past the weights is never dereferenced.
                    let n0 = (r0.as_ptr().add(c) as *const i8).wrapping_add(2 * ahead);
                    _mm_prefetch::<_MM_HINT_T0>(n0);
                    if let Some(r1) = r1 {
                        _mm_prefetch::<_MM_HINT_T0>(
                            (r1.as_ptr().add(c) as *const i8).wrapping_add(2 * ahead),
                        );
                    }
                }
                // NR is a multiple of 16: a chunk never straddles two panels.
                let dst = o.add((c / NR) * panel + p * NR + c % NR) as *mut __m512i;
                let count = width.saturating_sub(c).min(16);
                let m = ((1u32 << count) - 1) as __mmask16;
                let a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                    m,
                    r0.as_ptr().add(c) as *const i16,
                ));
                let v = match r1 {
                    Some(r1) => {
                        let b = _mm256_maskz_loadu_epi16(m, r1.as_ptr().add(c) as *const i16);
                        _mm512_or_si512(a, _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b)))
                    }
                    None => a,
                };
                _mm512_storeu_si512(dst, v);
                c += 16;
            }
        }
    }

    /// The `MR × NR` micro-tile: `rows[r][c0 + c] += Σ_p a[p][r] · b[p][c]` pairwise for
    /// `r < rows.len()` (1 to MR; other counts do nothing), `c < cols` (≤ NR); without
    /// `load`, the sums start from 0 instead of the rows' values. `a` is `[kpb][MR]` and
    /// `b` `[kpb][NR]` packed dwords (bf16 pairs).
    ///
    /// # Safety
    /// The CPU has avx512f/vl/bw/bf16; `a.len() >= kpb·MR`, `b.len() >= kpb·NR`, every
    /// row of `rows` holds at least `c0 + cols` elements, `cols <= NR`.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512bf16")]
    pub(super) unsafe fn micro(
        a: &[u32],
        b: &[u32],
        kpb: usize,
        rows: &mut [&mut [f32]],
        c0: usize,
        cols: usize,
        load: bool,
    ) {
        const { assert!(MR == 8) };
        let Some(m) = Rows::new(rows.len()) else {
            return;
        };
        // Rows past `m` are never read (`tile::<M>` reads `c[..M]`).
        let cp: [*mut f32; MR] = std::array::from_fn(|r| {
            rows.get_mut(r).map_or(std::ptr::null_mut(), |s| {
                // SAFETY: `c0 + cols <= s.len()` (the contract): in bounds or one past.
                unsafe { s.as_mut_ptr().add(c0) }
            })
        });
        macro_rules! go {
            ($m:literal) => {
                // SAFETY: the features are enabled here; `cp[..$m]` are the rows, each
                // valid for `cols` floats; `a` and `b` hold kpb·MR and kpb·NR dwords.
                unsafe { tile::<$m>(a.as_ptr(), b.as_ptr(), kpb, cp, cols, load) }
            };
        }
        crate::kernels::with_rows!(m, go);
    }

    /// The register tile of [`micro`] for a compile-time row count `M`.
    ///
    /// # Safety
    /// As [`micro`]; `c[r]` valid for `cols` floats, `r < M`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const M: usize>(
        a: *const u32,
        b: *const u32,
        kpb: usize,
        c: [*mut f32; MR],
        cols: usize,
        load: bool,
    ) {
        // SAFETY: inlined into `micro` (its features); reads of `a` and `b` stay below kpb·MR and
        // kpb·NR dwords, rows `c[..M]` are valid for `cols` floats and the masks cover no
        // more; `__m512bh` and `__m512i` are the same 512 bits.
        unsafe {
            let mask = |q: usize| -> __mmask16 {
                let n = cols.saturating_sub(16 * q).min(16);
                ((1u32 << n) - 1) as __mmask16
            };
            let masks = [mask(0), mask(1), mask(2)];
            let mut acc = [[_mm512_setzero_ps(); 3]; M];
            if load {
                for r in 0..M {
                    for q in 0..3 {
                        acc[r][q] = _mm512_maskz_loadu_ps(masks[q], c[r].add(16 * q));
                    }
                }
            }
            for p in 0..kpb {
                let bp = b.add(p * NR);
                let bv: [__m512bh; 3] = std::array::from_fn(|q| {
                    std::mem::transmute(_mm512_loadu_si512(bp.add(16 * q) as *const __m512i))
                });
                for r in 0..M {
                    let av: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add(p * MR + r) as i32));
                    for q in 0..3 {
                        acc[r][q] = _mm512_dpbf16_ps(acc[r][q], av, bv[q]);
                    }
                }
            }
            for r in 0..M {
                for q in 0..3 {
                    _mm512_mask_storeu_ps(c[r].add(16 * q), masks[q], acc[r][q]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::test_data as data;

    /// bf16's unit roundoff (8 significant bits) and f32's.
    const U_BF16: f64 = 1.0 / 256.0;
    const U_F32: f64 = 1.0 / 16_777_216.0;

    /// Views of a `[d_in, d_out]` matrix: input-major rows, latent-major columns, and a
    /// strided view with an offset (every other element of a wider buffer). Returns the
    /// buffer and the view.
    fn layouts(d_in: usize, d_out: usize, seed: u32) -> Vec<(Vec<bf16>, View2, &'static str)> {
        let vals =
            |len: usize| -> Vec<bf16> { data(len, seed).into_iter().map(bf16::from_f32).collect() };
        vec![
            (
                vals(d_in * d_out),
                View2 {
                    s0: d_out,
                    s1: 1,
                    off: 0,
                },
                "input-major",
            ),
            (
                vals(d_in * d_out),
                View2 {
                    s0: 1,
                    s1: d_in,
                    off: 0,
                },
                "latent-major",
            ),
            (
                // Odd offset and row stride: unaligned pairs.
                vals(1 + (d_in + 1) * d_out),
                View2 {
                    s0: 1,
                    s1: d_in + 1,
                    off: 1,
                },
                "latent-major, padded",
            ),
            (
                vals(3 + 2 * d_in * d_out),
                View2 {
                    s0: 2,
                    s1: 2 * d_in,
                    off: 3,
                },
                "strided",
            ),
        ]
    }

    /// The native GEMM gives the documented pairwise `vdpbf16ps` chain bit for bit, for
    /// row counts below, at and past one micro-tile, input widths odd and past one packed
    /// block, output widths ragged and past one task's block, in every layout, on top of
    /// non-zero initial values. On a CPU without AVX512-BF16 it declines (returns false).
    #[test]
    fn native_gemm_matches_the_instruction_bit_for_bit() -> crate::TestResult {
        let native = has_dpbf16();
        println!("AVX512-BF16 on this CPU: {native}");
        for n in [1usize, 3, 8, 9, 17] {
            // 1100 inputs: 550 pairs, three KCP blocks (the last one short).
            for d_in in [1usize, 2, 33, 300, 1100] {
                for d_out in [1usize, 47, 48, 100, 500] {
                    let x = data(n * d_in, 5 + n as u32);
                    let c0 = data(n * d_out, 9);
                    for (w, v, name) in layouts(d_in, d_out, 3) {
                        let mut want = c0.clone();
                        assert!(gemm_bf16_scalar(&x, n, d_in, &w, v, d_out, &mut want));
                        let mut got = c0.clone();
                        let ran = gemm_bf16(&x, n, d_in, &w, v, d_out, &mut got);
                        assert_eq!(ran, native);
                        if !ran {
                            assert_eq!(got, c0, "declined calls leave c alone");
                            continue;
                        }
                        for (k, (g, s)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                s.to_bits(),
                                "{name} n={n} d_in={d_in} d_out={d_out} at {k}: {g} vs {s}"
                            );
                        }
                        // The same weights packed once: the same bits.
                        let p = PackedBf16::new(&w, v, d_in, d_out).ok_or("the view fits")?;
                        let mut packed = c0.clone();
                        assert!(gemm_bf16_packed(&x, n, &p, &mut packed, true));
                        let bits = |s: &[f32]| s.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&packed),
                            bits(&want),
                            "{name} packed n={n} d_in={d_in} d_out={d_out}"
                        );
                        // Overwriting: the sums from 0, whatever c held (NaN here).
                        let mut zero = vec![0f32; n * d_out];
                        assert!(gemm_bf16_scalar(&x, n, d_in, &w, v, d_out, &mut zero));
                        let mut over = vec![f32::NAN; n * d_out];
                        assert!(gemm_bf16_packed(&x, n, &p, &mut over, false));
                        assert_eq!(
                            bits(&over),
                            bits(&zero),
                            "{name} overwritten n={n} d_in={d_in} d_out={d_out}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Every output within the bound bf16 rounding of the input gives against the f64
    /// sum of the unrounded input times the (exact) bf16 weights: per element,
    /// `(u_bf16 + (d_in + 2)·u_f32) · (|c0| + Σ_k |x_k w_k|)`.
    #[test]
    fn native_gemm_is_within_bf16_rounding_of_f32() {
        let (n, d_in, d_out) = (13usize, 777usize, 130usize);
        let x: Vec<f32> = data(n * d_in, 2).iter().map(|v| v * 3.0).collect();
        let c0 = data(n * d_out, 4);
        for (w, v, name) in layouts(d_in, d_out, 6) {
            let mut got = c0.clone();
            if !gemm_bf16(&x, n, d_in, &w, v, d_out, &mut got) {
                assert!(gemm_bf16_scalar(&x, n, d_in, &w, v, d_out, &mut got));
            }
            for i in 0..n {
                for j in 0..d_out {
                    let terms = (0..d_in)
                        .map(|k| x[i * d_in + k] as f64 * w[v.off + k * v.s0 + j * v.s1].to_f64());
                    let c = c0[i * d_out + j] as f64;
                    let want = c + terms.clone().sum::<f64>();
                    let mag = c.abs() + terms.map(f64::abs).sum::<f64>();
                    let tol = (U_BF16 + (d_in + 2) as f64 * U_F32) * mag;
                    let g = got[i * d_out + j] as f64;
                    assert!(
                        (g - want).abs() <= tol,
                        "{name} ({i},{j}): {g} vs {want} ± {tol}"
                    );
                }
            }
        }
    }

    /// Sizes or views that do not fit the buffers are declined, never read out of bounds.
    #[test]
    fn mismatched_sizes_are_declined() -> crate::TestResult {
        let w = vec![bf16::ONE; 12];
        let v = View2 {
            s0: 4,
            s1: 1,
            off: 0,
        };
        let mut c = vec![0f32; 8];
        // x too short, c too short, the view past the buffer, overflowing strides.
        assert!(!gemm_bf16(&[1.0; 5], 2, 3, &w, v, 4, &mut c));
        assert!(!gemm_bf16(&[1.0; 6], 2, 3, &w, v, 4, &mut c[..7]));
        assert!(!gemm_bf16(&[1.0; 8], 2, 4, &w, v, 4, &mut c));
        let huge = View2 {
            s0: usize::MAX / 2,
            s1: 1,
            off: 0,
        };
        assert!(!gemm_bf16(&[1.0; 6], 2, 3, &w, huge, 4, &mut c));
        assert!(!gemm_bf16_scalar(&[1.0; 8], 2, 4, &w, v, 4, &mut c));
        assert!(PackedBf16::new(&w, v, 4, 4).is_none());
        assert!(PackedBf16::new(&w, huge, 3, 4).is_none());
        let p = PackedBf16::new(&w, v, 3, 4).ok_or("the view fits")?;
        assert!(!gemm_bf16_packed(&[1.0; 5], 2, &p, &mut c, true));
        assert!(!gemm_bf16_packed(&[1.0; 6], 2, &p, &mut c[..7], false));
        assert_eq!(c, vec![0f32; 8]);
        // Empty products are fine; an empty sum over d_in = 0 overwrites with 0.
        assert_eq!(gemm_bf16(&[], 0, 3, &w, v, 4, &mut c), has_dpbf16());
        let p0 = PackedBf16::new(&[], v, 0, 4).ok_or("an empty view fits")?;
        let mut over = vec![f32::NAN; 8];
        assert_eq!(
            gemm_bf16_packed(&[], 2, &p0, &mut over, false),
            has_dpbf16()
        );
        if has_dpbf16() {
            assert_eq!(over, vec![0f32; 8]);
        }
        Ok(())
    }

    /// The rounding of `x` to bf16 is half's (to nearest, ties to even) bit for bit,
    /// ties included, also past the last 16-wide chunk.
    #[test]
    fn bf16_rounding_is_nearest_even() {
        let mut x: Vec<f32> = data(37, 5);
        // Exact ties between two bf16 values: the lower 16 bits are 0x8000.
        for (i, hi) in [0x3f80u32, 0x3f81, 0xbf80, 0xbf81, 0x4000, 0x4001]
            .iter()
            .enumerate()
        {
            x[i * 5] = f32::from_bits((hi << 16) | 0x8000);
        }
        let got = to_bf16(&x);
        for (g, v) in got.iter().zip(&x) {
            assert_eq!(g.to_bits(), bf16::from_f32(*v).to_bits(), "{v}");
        }
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even (1.0) wins; 1 + 3·2^-8 rounds up.
        let t = to_bf16(&[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0]);
        assert_eq!((t[0].to_f32(), t[1].to_f32()), (1.0, 1.0 + 4.0 / 256.0));
    }
}
