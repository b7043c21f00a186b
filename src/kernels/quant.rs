//! Block-quantized weight matrices and their products with f32 activations, the way
//! llama.cpp runs GGUF models on a CPU.
//!
//! Weights stay in GGUF's blocks of 32: `Q4_1` (an f16 scale `d`, an f16 minimum `m` and
//! 32 four-bit codes: `w = d·q + m`, 0.625 bytes per weight) or `Q8_0` (an f16 scale and
//! 32 signed bytes: `w = d·q`, 1.06 bytes per weight). The activation rows are quantized
//! to signed bytes per block of 32 (`x ≈ dx·qx`, round to nearest) and every block product
//! is an exact integer sum, so a matrix-vector product reads 0.6–1.1 bytes per weight
//! instead of 2 (f16) or 4 (f32):
//!
//! `Σ_j w_j x_j ≈ Σ_blocks d·dx·Σ_j q_j qx_j (+ m·dx·Σ_j qx_j for Q4_1)`.
//!
//! [`QMatrix::matmul`] splits the output rows over the rayon pool and streams each weight
//! block once for up to 8 activation rows (batched decode and prefill). The SIMD body is
//! picked at run time ([`Isa::detect`]): AVX2 (`_mm256_maddubs_epi16` + `_mm256_madd_epi16`
//! on unsigned × signed bytes) or, where the CPU has AVX-512 VNNI, the same body on 256-bit
//! registers with the one-instruction `vpdpbusd` instead of that pair. The scalar loop is
//! the reference both are tested against.

use half::f16;
use rayon::prelude::*;

use crate::kernels::simd::has_avx2;
use crate::{Error, Result};

/// The instruction set a block product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// The portable reference loop.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 + FMA + F16C with AVX-512 VNNI (`vpdpbusd`) on 256-bit registers.
    Avx512Vnni,
}

impl Isa {
    /// The fastest body this CPU supports (checked once).
    pub fn detect() -> Isa {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if !has_avx2() {
                return Isa::Scalar;
            }
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vl")
            {
                return Isa::Avx512Vnni;
            }
            Isa::Avx2
        })
    }

    /// Every body this CPU can run, slowest first (the kernels' tests run them all).
    pub fn available() -> Vec<Isa> {
        match Isa::detect() {
            Isa::Scalar => vec![Isa::Scalar],
            Isa::Avx2 => vec![Isa::Scalar, Isa::Avx2],
            Isa::Avx512Vnni => vec![Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni],
        }
    }
}

/// Weights per block.
pub const QK: usize = 32;

/// Activation rows that share one pass over the weights.
const TILE: usize = 8;

/// A block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    /// GGUF `Q4_1`: `w = d·q + m`, `q` in `0..16`.
    Q4_1,
    /// GGUF `Q8_0`: `w = d·q`, `q` in `-127..=127`.
    Q8_0,
}

impl QType {
    /// Bytes of one block in GGUF's layout.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_1 => 20,
            QType::Q8_0 => 34,
        }
    }

    fn code_bytes(self) -> usize {
        match self {
            QType::Q4_1 => QK / 2,
            QType::Q8_0 => QK,
        }
    }
}

/// A `[rows, cols]` weight matrix in blocks of 32 along each row (`cols % 32 == 0`).
#[derive(Clone)]
pub struct QMatrix {
    ty: QType,
    rows: usize,
    cols: usize,
    /// Scale of each block, row-major `[rows, cols / 32]`.
    d: Vec<f16>,
    /// Minimum of each block (`Q4_1` only; empty for `Q8_0`).
    m: Vec<f16>,
    /// Codes: `Q4_1` 16 bytes a block (byte `j` holds element `j` in its low nibble and
    /// element `j + 16` in its high nibble, as GGUF stores them); `Q8_0` 32 signed bytes.
    qs: Vec<u8>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("ty", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]]))
}

impl QMatrix {
    /// Wrap GGUF block data (`rows · cols / 32` blocks in GGUF's layout). Errors name
    /// `name` when the sizes disagree.
    pub fn from_gguf(
        ty: QType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        name: &str,
    ) -> Result<Self> {
        if cols % QK != 0 {
            return Err(Error::Invalid(format!(
                "tensor `{name}`: {cols} columns are not a multiple of the block size {QK}"
            )));
        }
        let nblocks = rows * (cols / QK);
        if bytes.len() != nblocks * ty.block_bytes() {
            return Err(Error::Invalid(format!(
                "tensor `{name}`: {} bytes of {ty:?} data for shape [{rows}, {cols}] (expected {})",
                bytes.len(),
                nblocks * ty.block_bytes()
            )));
        }
        let cb = ty.code_bytes();
        let mut d = Vec::with_capacity(nblocks);
        let mut m = Vec::new();
        let mut qs = Vec::with_capacity(nblocks * cb);
        for blk in bytes.chunks_exact(ty.block_bytes()) {
            d.push(f16_at(blk, 0));
            match ty {
                QType::Q4_1 => {
                    m.push(f16_at(blk, 2));
                    qs.extend_from_slice(&blk[4..]);
                }
                QType::Q8_0 => qs.extend_from_slice(&blk[2..]),
            }
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            d,
            m,
            qs,
        })
    }

    /// Quantize a row-major f32 matrix (llama.cpp's reference quantizers: `Q8_0` scale
    /// `max|w|/127`; `Q4_1` scale `(max − min)/15` and minimum `min`).
    pub fn quantize(ty: QType, rows: usize, cols: usize, w: &[f32]) -> Result<Self> {
        if cols % QK != 0 || w.len() != rows * cols {
            return Err(Error::Invalid(format!(
                "cannot quantize {} values as [{rows}, {cols}] in blocks of {QK}",
                w.len()
            )));
        }
        let nblocks = rows * (cols / QK);
        let mut d = Vec::with_capacity(nblocks);
        let mut m = Vec::new();
        let mut qs = Vec::with_capacity(nblocks * ty.code_bytes());
        for blk in w.chunks_exact(QK) {
            match ty {
                QType::Q8_0 => {
                    let amax = blk.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let s = amax / 127.0;
                    let id = if s > 0.0 { 1.0 / s } else { 0.0 };
                    d.push(f16::from_f32(s));
                    qs.extend(blk.iter().map(|x| (x * id).round() as i8 as u8));
                }
                QType::Q4_1 => {
                    let lo = blk.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let s = (hi - lo) / 15.0;
                    let id = if s > 0.0 { 1.0 / s } else { 0.0 };
                    d.push(f16::from_f32(s));
                    m.push(f16::from_f32(lo));
                    let q = |x: f32| (((x - lo) * id + 0.5) as u8).min(15);
                    for j in 0..QK / 2 {
                        qs.push(q(blk[j]) | (q(blk[j + QK / 2]) << 4));
                    }
                }
            }
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            d,
            m,
            qs,
        })
    }

    /// Stack matrices of equal width along the rows (`Q8_0` unless all share one format).
    pub fn cat_rows(parts: &[&QMatrix]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Err(Error::Invalid("nothing to stack".into()));
        };
        let cols = first.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return Err(Error::Invalid(format!(
                "cannot stack matrices of widths {:?}",
                parts.iter().map(|p| p.cols).collect::<Vec<_>>()
            )));
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        if parts.iter().any(|p| p.ty != first.ty) {
            let w: Vec<f32> = parts.iter().flat_map(|p| p.dequantize()).collect();
            return QMatrix::quantize(QType::Q8_0, rows, cols, &w);
        }
        Ok(QMatrix {
            ty: first.ty,
            rows,
            cols,
            d: parts.iter().flat_map(|p| p.d.iter().copied()).collect(),
            m: parts.iter().flat_map(|p| p.m.iter().copied()).collect(),
            qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
        })
    }

    /// The block format.
    pub fn qtype(&self) -> QType {
        self.ty
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes a full pass over the matrix reads.
    pub fn bytes(&self) -> usize {
        self.rows * (self.cols / QK) * self.ty.block_bytes()
    }

    /// Row `r` as f32 into `out` (`cols` long); `None` when `r` is out of range.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Option<()> {
        if r >= self.rows || out.len() != self.cols {
            return None;
        }
        let nb = self.cols / QK;
        let cb = self.ty.code_bytes();
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let k = r * nb + b;
            let d = self.d[k].to_f32();
            let q = &self.qs[k * cb..(k + 1) * cb];
            match self.ty {
                QType::Q4_1 => {
                    let m = self.m[k].to_f32();
                    for j in 0..QK / 2 {
                        o[j] = d * (q[j] & 15) as f32 + m;
                        o[j + QK / 2] = d * (q[j] >> 4) as f32 + m;
                    }
                }
                QType::Q8_0 => {
                    for (o, &q) in o.iter_mut().zip(q) {
                        *o = d * q as i8 as f32;
                    }
                }
            }
        }
        Some(())
    }

    /// The whole matrix as row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            let _ = self.dequantize_row(r, row);
        }
        out
    }

    /// `y [n, rows] = x [n, cols] · selfᵀ` with `x` quantized to 8 bits per block.
    pub fn matmul(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        self.matmul_on(x, n, Isa::detect())
    }

    /// [`QMatrix::matmul`] on a chosen body; one this CPU lacks falls back to the best it
    /// has, never to an instruction it cannot run.
    pub fn matmul_on(&self, x: &[f32], n: usize, isa: Isa) -> Result<Vec<f32>> {
        let isa = if Isa::available().contains(&isa) {
            isa
        } else {
            Isa::detect()
        };
        if x.len() != n * self.cols {
            return Err(Error::Invalid(format!(
                "quantized matmul: {} inputs for {n} rows of {}",
                x.len(),
                self.cols
            )));
        }
        let a = QActs::new(x, n, self.cols);
        let rows = self.rows;
        let mut y = vec![0f32; n * rows];
        if rows == 0 || n == 0 {
            return Ok(y);
        }
        // A few tasks per thread: the machine is shared, so equal halves would wait on
        // the slower core.
        let tasks = 4 * rayon::current_num_threads();
        let chunk = rows.div_ceil(tasks).max(16);
        if n == 1 {
            y.par_chunks_mut(chunk).enumerate().for_each(|(ci, ys)| {
                for (rr, o) in ys.iter_mut().enumerate() {
                    self.dot_rows(ci * chunk + rr, &a, 0, std::slice::from_mut(o), isa);
                }
            });
            return Ok(y);
        }
        // Each task fills `[n, nr]` for its `nr` weight rows in a small buffer, then the
        // rows are copied into place (scattered single stores into `y` were slower than
        // the kernel on wide outputs such as the LM head).
        let parts: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(chunk))
            .into_par_iter()
            .map(|ci| {
                let r0 = ci * chunk;
                let nr = chunk.min(rows - r0);
                let mut local = vec![0f32; n * nr];
                let mut tmp = [0f32; TILE];
                let mut i0 = 0;
                while i0 < n {
                    let t = (n - i0).min(TILE);
                    for rr in 0..nr {
                        self.dot_rows(r0 + rr, &a, i0, &mut tmp[..t], isa);
                        for (k, &v) in tmp[..t].iter().enumerate() {
                            local[(i0 + k) * nr + rr] = v;
                        }
                    }
                    i0 += t;
                }
                (r0, local)
            })
            .collect();
        for (r0, local) in parts {
            let nr = local.len() / n;
            for (i, src) in local.chunks_exact(nr).enumerate() {
                y[i * rows + r0..i * rows + r0 + nr].copy_from_slice(src);
            }
        }
        Ok(y)
    }

    /// `out[k] = row r · activation row i0 + k` for `k < out.len() ≤ 8`.
    fn dot_rows(&self, r: usize, a: &QActs, i0: usize, out: &mut [f32], isa: Isa) {
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar && r < self.rows && (i0 + out.len()) <= a.n && out.len() <= TILE {
            // SAFETY: the CPU has the features of `isa` (the caller passes only what
            // `Isa::available` lists); row r and activation rows i0..i0 + out.len() are in
            // range (checked above).
            unsafe {
                match isa {
                    Isa::Avx512Vnni => avx2::dot_rows_vnni(self, r, a, i0, out),
                    _ => avx2::dot_rows(self, r, a, i0, out),
                }
            };
            return;
        }
        let _ = isa;
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.dot_scalar(r, a, i0 + k);
        }
    }

    /// Scalar reference: row `r` of the weights · quantized activation row `i`.
    fn dot_scalar(&self, r: usize, a: &QActs, i: usize) -> f32 {
        let nb = self.cols / QK;
        let cb = self.ty.code_bytes();
        let mut sum = 0f32;
        for b in 0..nb {
            let k = r * nb + b;
            let q = &self.qs[k * cb..(k + 1) * cb];
            let xq = &a.q[(i * nb + b) * QK..(i * nb + b + 1) * QK];
            let (dx, sx) = (a.d[i * nb + b], a.s[i * nb + b]);
            let dw = self.d[k].to_f32();
            match self.ty {
                QType::Q4_1 => {
                    let mut s = 0i32;
                    for j in 0..QK / 2 {
                        s += (q[j] & 15) as i32 * xq[j] as i32
                            + (q[j] >> 4) as i32 * xq[j + QK / 2] as i32;
                    }
                    sum += dw * dx * s as f32 + self.m[k].to_f32() * sx;
                }
                QType::Q8_0 => {
                    let s: i32 = q
                        .iter()
                        .zip(xq)
                        .map(|(&w, &x)| w as i8 as i32 * x as i32)
                        .sum();
                    sum += dw * dx * s as f32;
                }
            }
        }
        sum
    }
}

/// Activation rows quantized to signed bytes per block of 32.
struct QActs {
    n: usize,
    /// Scale of each block `[n, cols / 32]`.
    d: Vec<f32>,
    /// `d · Σ q` of each block (the Q4_1 minimum's term).
    s: Vec<f32>,
    /// Codes `[n, cols]`.
    q: Vec<i8>,
}

impl QActs {
    /// `x [n, cols]`, `cols % 32 == 0`.
    fn new(x: &[f32], n: usize, cols: usize) -> Self {
        let nb = n * (cols / QK);
        let mut a = QActs {
            n,
            d: Vec::with_capacity(nb),
            s: Vec::with_capacity(nb),
            q: vec![0i8; n * cols],
        };
        for (blk, q) in x.chunks_exact(QK).zip(a.q.chunks_exact_mut(QK)) {
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut s = 0i32;
            for (q, &v) in q.iter_mut().zip(blk) {
                // Round half away from zero (`roundf`) without a libm call: |v·id| ≤ 127.
                let r = v * id;
                *q = (r + 0.5f32.copysign(r)) as i8;
                s += *q as i32;
            }
            a.d.push(d);
            a.s.push(d * s as f32);
        }
        a
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QActs, QMatrix, QType, QK};
    use crate::kernels::simd::avx2::hsum;
    use std::arch::x86_64::*;

    /// Weight row `r` times activation rows `i0..i0 + out.len()`.
    /// SAFETY: avx2, fma, f16c; `r < m.rows`; `i0 + out.len() <= a.n`; `out.len() <= 8`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows(m: &QMatrix, r: usize, a: &QActs, i0: usize, out: &mut [f32]) {
        dispatch::<false>(m, r, a, i0, out)
    }

    /// [`dot_rows`] with `vpdpbusd` for the integer block sums.
    /// SAFETY: as [`dot_rows`], plus avx512vnni and avx512vl.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn dot_rows_vnni(
        m: &QMatrix,
        r: usize,
        a: &QActs,
        i0: usize,
        out: &mut [f32],
    ) {
        dispatch::<true>(m, r, a, i0, out)
    }

    /// SAFETY: as [`dot_rows`]; `VNNI` only inside [`dot_rows_vnni`].
    #[inline(always)]
    unsafe fn dispatch<const VNNI: bool>(
        m: &QMatrix,
        r: usize,
        a: &QActs,
        i0: usize,
        out: &mut [f32],
    ) {
        // Compile-time row counts keep the accumulators in registers.
        macro_rules! go {
            ($n:literal) => {
                match m.ty {
                    QType::Q4_1 => kernel::<true, VNNI, $n>(m, r, a, i0, out),
                    QType::Q8_0 => kernel::<false, VNNI, $n>(m, r, a, i0, out),
                }
            };
        }
        match out.len() {
            0 => {}
            1 => go!(1),
            2 => go!(2),
            3 => go!(3),
            4 => go!(4),
            5 => go!(5),
            6 => go!(6),
            7 => go!(7),
            _ => go!(8),
        }
    }

    #[inline(always)]
    unsafe fn f16_to_f32(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// `out[k]` = weight row `r` · activation row `i0 + k` (`Q4` selects Q4_1, else Q8_0). Per block: one integer dot product (`maddubs` + `madd`) and one FMA
    /// with the scale `dw·dx`; the scales (and Q4_1's `m·dx·Σqx`) are computed eight
    /// blocks at a time.
    /// With `VNNI`, `vpdpbusd` does the integer dot product in one instruction.
    /// SAFETY: avx2, fma, f16c (and avx512vnni + avx512vl when `VNNI`); row `r` and
    /// activation rows `i0..i0 + N` exist; `out.len() >= N`; `m.ty` is Q4_1 exactly when
    /// `Q4`.
    // Index loops: the block index `t` addresses raw pointers and `sc` alike.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn kernel<const Q4: bool, const VNNI: bool, const N: usize>(
        m: &QMatrix,
        r: usize,
        a: &QActs,
        i0: usize,
        out: &mut [f32],
    ) {
        let nb = m.cols / QK;
        let cb = if Q4 { QK / 2 } else { QK };
        let wq = m.qs.as_ptr().add(r * nb * cb);
        let wd = m.d.as_ptr().add(r * nb) as *const u16;
        let wm = if Q4 {
            m.m.as_ptr().add(r * nb) as *const u16
        } else {
            wd
        };
        let xq = a.q.as_ptr().add(i0 * nb * QK);
        let xd = a.d.as_ptr().add(i0 * nb);
        let xs = a.s.as_ptr().add(i0 * nb);
        let ones = _mm256_set1_epi16(1);
        let low = _mm_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut acc2 = [_mm256_setzero_ps(); N];
        let mut accm = [_mm256_setzero_ps(); N];
        let mut tail = [0f32; N];
        let mut sc = [[0f32; 8]; N];
        let mut b = 0;
        while b < nb {
            let g = (nb - b).min(8);
            if g == 8 {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(wd.add(b) as *const __m128i));
                let mw = _mm256_cvtph_ps(_mm_loadu_si128(wm.add(b) as *const __m128i));
                for k in 0..N {
                    let dx = _mm256_loadu_ps(xd.add(k * nb + b));
                    _mm256_storeu_ps(sc[k].as_mut_ptr(), _mm256_mul_ps(dw, dx));
                    if Q4 {
                        let sx = _mm256_loadu_ps(xs.add(k * nb + b));
                        accm[k] = _mm256_fmadd_ps(mw, sx, accm[k]);
                    }
                }
            } else {
                for t in 0..g {
                    let dw = f16_to_f32(*wd.add(b + t));
                    let mw = f16_to_f32(*wm.add(b + t));
                    for k in 0..N {
                        sc[k][t] = dw * *xd.add(k * nb + b + t);
                        if Q4 {
                            tail[k] += mw * *xs.add(k * nb + b + t);
                        }
                    }
                }
            }
            for t in 0..g {
                let bb = b + t;
                let w = if Q4 {
                    // 16 bytes → 32 unsigned 4-bit codes in element order.
                    let raw = _mm_loadu_si128(wq.add(bb * 16) as *const __m128i);
                    let lo = _mm_and_si128(raw, low);
                    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
                    _mm256_set_m128i(hi, lo)
                } else {
                    _mm256_loadu_si256(wq.add(bb * QK) as *const __m256i)
                };
                // maddubs needs one unsigned side: Q8_0 takes |w| and x with w's sign.
                let wu = if Q4 { w } else { _mm256_sign_epi8(w, w) };
                for k in 0..N {
                    let x = _mm256_loadu_si256(xq.add((k * nb + bb) * QK) as *const __m256i);
                    let x = if Q4 { x } else { _mm256_sign_epi8(x, w) };
                    let p = if VNNI {
                        // u8 × i8 products, four at a time summed straight into i32.
                        _mm256_dpbusd_epi32(_mm256_setzero_si256(), wu, x)
                    } else {
                        // u8 × i8 pairs summed to i16 (≤ 2·128·127, no saturation),
                        // then pairs of those to i32.
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wu, x), ones)
                    };
                    let s = _mm256_broadcast_ss(&sc[k][t]);
                    // Few rows: odd blocks go to a second accumulator so that two FMA
                    // chains overlap (one chain would wait on the FMA latency).
                    if N <= 2 && t % 2 == 1 {
                        acc2[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc2[k]);
                    } else {
                        acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[k]);
                    }
                }
            }
            b += g;
        }
        for k in 0..N {
            out[k] = hsum(_mm256_add_ps(acc[k], acc2[k])) + hsum(accm[k]) + tail[k];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::simd::test_data as data;

    /// Dequantization against values worked out by hand from GGUF block bytes.
    #[test]
    fn gguf_blocks_dequantize_by_hand() {
        // Q4_1: d = 0.5, m = -1; byte j = (j % 16) | ((15 - j % 16) << 4).
        let mut blk = Vec::new();
        blk.extend(f16::from_f32(0.5).to_bits().to_le_bytes());
        blk.extend(f16::from_f32(-1.0).to_bits().to_le_bytes());
        blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let m = QMatrix::from_gguf(QType::Q4_1, 1, 32, &blk, "t").unwrap();
        let mut row = vec![0f32; 32];
        m.dequantize_row(0, &mut row).unwrap();
        for j in 0..16 {
            assert_eq!(row[j], 0.5 * j as f32 - 1.0);
            assert_eq!(row[j + 16], 0.5 * (15 - j) as f32 - 1.0);
        }
        // Q8_0: d = 0.25, q_j = j - 16.
        let mut blk = Vec::new();
        blk.extend(f16::from_f32(0.25).to_bits().to_le_bytes());
        blk.extend((0..32i32).map(|j| (j - 16) as i8 as u8));
        let m = QMatrix::from_gguf(QType::Q8_0, 1, 32, &blk, "t").unwrap();
        m.dequantize_row(0, &mut row).unwrap();
        for (j, v) in row.iter().enumerate() {
            assert_eq!(*v, 0.25 * (j as f32 - 16.0));
        }
        let e = QMatrix::from_gguf(QType::Q8_0, 2, 32, &blk, "blk.0.x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("blk.0.x") && e.contains("68"), "{e}");
    }

    /// The SIMD kernel against the scalar reference (same integer sums, so only the f32
    /// summation order differs) and both against the f64 product of the dequantized
    /// weights with the unquantized inputs (the 8-bit activation error only), for every
    /// row count up to two tiles and both formats.
    #[test]
    fn matmul_matches_scalar_and_f64_reference() {
        // 19 blocks a row: two groups of 8 (the vector scale path) and a tail of 3.
        let (rows, cols) = (37, 19 * 32);
        let w = data(rows * cols, 11);
        for ty in [QType::Q4_1, QType::Q8_0] {
            let qm = QMatrix::quantize(ty, rows, cols, &w).unwrap();
            let wd = qm.dequantize();
            // Quantization itself stays within half a step of the f32 weights.
            let step = if ty == QType::Q4_1 {
                2.0 / 15.0
            } else {
                1.0 / 127.0
            };
            for (a, b) in w.iter().zip(&wd) {
                assert!((a - b).abs() <= 0.5 * step + 2e-3, "{ty:?} {a} {b}");
            }
            for (n, isa) in [1usize, 2, 5, 8, 11, 16]
                .into_iter()
                .flat_map(|n| Isa::available().into_iter().map(move |i| (n, i)))
            {
                let x = data(n * cols, 5 + n as u32);
                let y = qm.matmul_on(&x, n, isa).unwrap();
                let a = QActs::new(&x, n, cols);
                for i in 0..n {
                    for r in 0..rows {
                        let got = y[i * rows + r];
                        let want = qm.dot_scalar(r, &a, i);
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{ty:?} n={n} {isa:?}"
                        );
                        let exact: f64 = (0..cols)
                            .map(|k| x[i * cols + k] as f64 * wd[r * cols + k] as f64)
                            .sum();
                        // 8-bit activations: ≤ half a step (max|x|/127/2) per element.
                        let bound: f64 = (0..cols)
                            .map(|k| wd[r * cols + k].abs() as f64 / 254.0)
                            .sum();
                        assert!(
                            (got as f64 - exact).abs() <= bound + 1e-4,
                            "{ty:?} n={n} {isa:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(QMatrix::quantize(QType::Q8_0, 2, 30, &[0.0; 60]).is_err());
        let qm = QMatrix::quantize(QType::Q8_0, 2, 32, &[0.5; 64]).unwrap();
        assert!(qm.matmul(&[0.0; 33], 1).is_err());
        assert!(qm.dequantize_row(2, &mut [0.0; 32]).is_none());
    }
}
