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
//! The blocks are repacked at load so that 8 weight rows sit side by side (see
//! [`QMatrix`]): one 256-bit integer vector then holds 8 rows' partial sums, the scales of
//! 8 rows apply in one FMA, and no horizontal sum is needed: a GEMM micro-kernel of
//! 8 weight rows × up to 8 activation rows, each weight block read once for all of them.
//! The activation rows are quantized in tiles of 8, interleaved block by block, so a
//! kernel reads one sequential stream of them. [`QMatrix::matmul`] splits the row groups
//! over the rayon pool; each task runs one tile at a time through all its groups (the
//! tile stays in L1, the weights stream from L2). The SIMD body is picked
//! at run time ([`Isa::detect`]): AVX2 (`_mm256_maddubs_epi16` + `_mm256_madd_epi16` on
//! unsigned × signed bytes) or, where the CPU has AVX-512 VNNI, the same body on 256-bit
//! registers with the one-instruction `vpdpbusd` instead of that pair. The scalar loop is
//! the reference both are tested against.

use half::f16;
use rayon::prelude::*;

use crate::kernels::simd::has_avx2;
use crate::kernels::with_kept;
#[cfg(target_arch = "x86_64")]
use crate::kernels::{holds, Rows};
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

    /// Whether this CPU can run the body (no allocation: checked on every matmul).
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => Isa::detect() != Isa::Scalar,
            Isa::Avx512Vnni => Isa::detect() == Isa::Avx512Vnni,
        }
    }

    /// Every body this CPU can run, slowest first (the kernels' tests run them all).
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }
}

/// Weights per block.
pub const QK: usize = 32;

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
///
/// The rows are stored in groups of [`GROUP`] (the last group padded with zero blocks),
/// block by block, the codes of a group's 8 rows interleaved four bytes at a time: one
/// 32-byte load holds the same 4 code bytes of all 8 rows. A vector of 8 integer lanes
/// then accumulates one block product per weight row (no horizontal sums), and one FMA
/// applies the 8 rows' scales at once (see the `avx2` kernel).
#[derive(Clone)]
pub struct QMatrix {
    ty: QType,
    rows: usize,
    cols: usize,
    /// Scales `[groups, cols / 32, 8]`.
    d: Vec<f16>,
    /// `Q4_1` minimums `[groups, cols / 32, 8]` (empty for `Q8_0`).
    m: Vec<f16>,
    /// Codes `[groups, cols / 32, code_bytes / 4, 8, 4]`: byte `j` of row `8g + r` in
    /// block `b` sits at `((g·nb + b)·code_bytes + (j / 4)·32 + r·4 + j % 4)`. `Q4_1`: 16
    /// bytes a block, byte `j` holding element `j` (low nibble) and `j + 16` (high
    /// nibble), as GGUF stores them; `Q8_0`: 32 bytes `q + 128` (the signed code offset
    /// to an unsigned byte, which `vpdpbusd` multiplies without a sign fix-up).
    qs: Vec<u8>,
}

/// Weight rows interleaved per group (the lanes of one 256-bit integer vector).
pub const GROUP: usize = 8;

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

/// One block as stored in GGUF: scale, minimum (`Q4_1`) and code bytes.
struct Block<'a> {
    d: f16,
    m: f16,
    codes: &'a [u8],
}

impl QMatrix {
    /// An all-zero matrix in the interleaved layout, filled by [`QMatrix::set_block`].
    fn zeros(ty: QType, rows: usize, cols: usize) -> Self {
        let nb = cols / QK;
        let slots = rows.div_ceil(GROUP) * nb * GROUP;
        QMatrix {
            ty,
            rows,
            cols,
            d: vec![f16::ZERO; slots],
            m: if ty == QType::Q4_1 {
                vec![f16::ZERO; slots]
            } else {
                Vec::new()
            },
            qs: vec![0u8; slots * ty.code_bytes()],
        }
    }

    /// Index of block `(r, b)`'s scale; the codes of its byte `j` are at
    /// [`QMatrix::code_at`].
    fn slot(&self, r: usize, b: usize) -> usize {
        let nb = self.cols / QK;
        ((r / GROUP) * nb + b) * GROUP + r % GROUP
    }

    fn code_at(&self, r: usize, b: usize, j: usize) -> usize {
        let nb = self.cols / QK;
        ((r / GROUP) * nb + b) * GROUP * self.ty.code_bytes()
            + (j / 4) * 32
            + (r % GROUP) * 4
            + j % 4
    }

    /// Store block `(r, b)` (in range: the callers loop over `rows × cols / 32`).
    fn set_block(&mut self, r: usize, b: usize, blk: &Block<'_>) {
        let k = self.slot(r, b);
        self.d[k] = blk.d;
        if self.ty == QType::Q4_1 {
            self.m[k] = blk.m;
        }
        let flip = if self.ty == QType::Q8_0 { 0x80 } else { 0 };
        // Four bytes at a time: bytes 4c.. of the block sit together at `code_at(r, b, 4c)`.
        let at = self.code_at(r, b, 0);
        for (c, four) in blk.codes.chunks_exact(4).enumerate() {
            if let Some(dst) = self.qs.get_mut(at + c * 32..at + c * 32 + 4) {
                for (d, &v) in dst.iter_mut().zip(four) {
                    *d = v ^ flip;
                }
            }
        }
    }

    /// Block `(r, b)` as GGUF stores it (codes in `buf`).
    fn block<'a>(&self, r: usize, b: usize, buf: &'a mut [u8; QK]) -> Block<'a> {
        let k = self.slot(r, b);
        let cb = self.ty.code_bytes();
        let flip = if self.ty == QType::Q8_0 { 0x80 } else { 0 };
        for (j, c) in buf.iter_mut().take(cb).enumerate() {
            *c = self.qs[self.code_at(r, b, j)] ^ flip;
        }
        Block {
            d: self.d[k],
            m: self.m.get(k).copied().unwrap_or(f16::ZERO),
            codes: &buf[..cb],
        }
    }

    /// Wrap GGUF block data (`rows · cols / 32` blocks in GGUF's layout). Errors name
    /// `name` when the sizes disagree.
    pub fn from_gguf(
        ty: QType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        name: &str,
    ) -> Result<Self> {
        if !cols.is_multiple_of(QK) {
            return Err(Error::Invalid(format!(
                "tensor `{name}`: {cols} columns are not a multiple of the block size {QK}"
            )));
        }
        let nb = cols / QK;
        let want = rows
            .checked_mul(nb)
            .and_then(|n| n.checked_mul(ty.block_bytes()));
        if want != Some(bytes.len()) {
            let want = rows.saturating_mul(nb).saturating_mul(ty.block_bytes());
            return Err(Error::Invalid(format!(
                "tensor `{name}`: {} bytes of {ty:?} data for shape [{rows}, {cols}] (expected {want})",
                bytes.len()
            )));
        }
        let mut q = QMatrix::zeros(ty, rows, cols);
        for (k, blk) in bytes.chunks_exact(ty.block_bytes()).enumerate() {
            let (d, m, codes) = match ty {
                QType::Q4_1 => (f16_at(blk, 0), f16_at(blk, 2), &blk[4..]),
                QType::Q8_0 => (f16_at(blk, 0), f16::ZERO, &blk[2..]),
            };
            q.set_block(k / nb, k % nb, &Block { d, m, codes });
        }
        Ok(q)
    }

    /// Quantize a row-major f32 matrix (llama.cpp's reference quantizers: `Q8_0` scale
    /// `max|w|/127`; `Q4_1` scale `(max − min)/15` and minimum `min`).
    pub fn quantize(ty: QType, rows: usize, cols: usize, w: &[f32]) -> Result<Self> {
        if !cols.is_multiple_of(QK) || Some(w.len()) != rows.checked_mul(cols) {
            return Err(Error::Invalid(format!(
                "cannot quantize {} values as [{rows}, {cols}] in blocks of {QK}",
                w.len()
            )));
        }
        let nb = cols / QK;
        let mut q = QMatrix::zeros(ty, rows, cols);
        let mut codes = [0u8; QK];
        for (k, blk) in w.chunks_exact(QK).enumerate() {
            let (d, m, cb) = match ty {
                QType::Q8_0 => {
                    let amax = blk.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let s = amax / 127.0;
                    let id = if s > 0.0 { 1.0 / s } else { 0.0 };
                    for (c, x) in codes.iter_mut().zip(blk) {
                        *c = (x * id).round() as i8 as u8;
                    }
                    (f16::from_f32(s), f16::ZERO, QK)
                }
                QType::Q4_1 => {
                    let lo = blk.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let s = (hi - lo) / 15.0;
                    let id = if s > 0.0 { 1.0 / s } else { 0.0 };
                    let qz = |x: f32| (((x - lo) * id + 0.5) as u8).min(15);
                    for j in 0..QK / 2 {
                        codes[j] = qz(blk[j]) | (qz(blk[j + QK / 2]) << 4);
                    }
                    (f16::from_f32(s), f16::from_f32(lo), QK / 2)
                }
            };
            q.set_block(
                k / nb,
                k % nb,
                &Block {
                    d,
                    m,
                    codes: &codes[..cb],
                },
            );
        }
        Ok(q)
    }

    /// Stack matrices of equal width along the rows (`Q8_0` unless all share one format).
    pub fn cat_rows(parts: &[&QMatrix]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Err(Error::empty("the list of matrices to stack"));
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
        // Parts of whole groups (all but the last, whose padding rows are zero): the
        // stack's groups are theirs, one after the other.
        let (_, init) = parts.split_at(parts.len() - 1);
        if init.iter().all(|p| p.rows.is_multiple_of(GROUP)) {
            return Ok(QMatrix {
                ty: first.ty,
                rows,
                cols,
                d: parts.iter().flat_map(|p| p.d.iter().copied()).collect(),
                m: parts.iter().flat_map(|p| p.m.iter().copied()).collect(),
                qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
            });
        }
        // Otherwise the blocks move as they are (exact); only their places in the groups
        // change.
        let mut q = QMatrix::zeros(first.ty, rows, cols);
        let mut r0 = 0;
        let mut buf = [0u8; QK];
        for p in parts {
            for r in 0..p.rows {
                for b in 0..cols / QK {
                    let blk = p.block(r, b, &mut buf);
                    q.set_block(r0 + r, b, &blk);
                }
            }
            r0 += p.rows;
        }
        Ok(q)
    }

    /// The block format.
    pub fn qtype(&self) -> QType {
        self.ty
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes a full pass over the matrix reads (GGUF's block size; the padding rows of
    /// the last group are not counted).
    pub fn bytes(&self) -> usize {
        self.rows * (self.cols / QK) * self.ty.block_bytes()
    }

    /// Row `r` as f32 into `out` (`cols` long); `None` when `r` is out of range.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Option<()> {
        if r >= self.rows || out.len() != self.cols {
            return None;
        }
        let mut buf = [0u8; QK];
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let blk = self.block(r, b, &mut buf);
            let d = blk.d.to_f32();
            let q = blk.codes;
            match self.ty {
                QType::Q4_1 => {
                    let m = blk.m.to_f32();
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
        let len = n.checked_mul(self.rows).ok_or_else(|| {
            Error::Invalid(format!(
                "quantized matmul: {n} rows overflow the output size"
            ))
        })?;
        let mut y = vec![0f32; len];
        self.matmul_into(x, n, isa, &mut y)?;
        Ok(y)
    }

    /// [`QMatrix::matmul_on`] into `y` (`[n, rows]`, every element written; its old
    /// values are never read).
    pub fn matmul_into(&self, x: &[f32], n: usize, isa: Isa, y: &mut [f32]) -> Result<()> {
        let isa = if isa.supported() { isa } else { Isa::detect() };
        if Some(x.len()) != n.checked_mul(self.cols) {
            return Err(Error::Invalid(format!(
                "quantized matmul: {} inputs for {n} rows of {}",
                x.len(),
                self.cols
            )));
        }
        let rows = self.rows;
        if Some(y.len()) != n.checked_mul(rows) {
            return Err(Error::Invalid(format!(
                "quantized matmul: an output of {} values for {n} rows of {rows}",
                y.len()
            )));
        }
        let groups = rows.div_ceil(GROUP);
        if groups == 0 || n == 0 {
            return Ok(());
        }
        // The quantized rows go into this thread's kept buffers (no allocation and no
        // zeroing per product once they have grown).
        with_kept(&KEPT_ACTS, |a| {
            a.fill(x, n, self.cols, isa);
            self.groups_into(a, y, isa)
        });
        Ok(())
    }

    /// `y [a.n, rows]` = the quantized rows `a` times `selfᵀ`, the row groups split over
    /// the pool.
    fn groups_into(&self, a: &QActs, y: &mut [f32], isa: Isa) {
        let (rows, n) = (self.rows, a.n);
        let groups = rows.div_ceil(GROUP);
        // A few tasks per thread (the machine is shared: equal halves would wait on the
        // slower core). Each task owns a range of output columns in every row of `y`,
        // written in place.
        let tasks = 4 * rayon::current_num_threads();
        let per = groups.div_ceil(tasks).max(4);
        let width = per * GROUP;
        let mut parts: Vec<(usize, Vec<&mut [f32]>)> = (0..groups.div_ceil(per))
            .map(|t| (t * per, Vec::with_capacity(n)))
            .collect();
        for row in y.chunks_mut(rows) {
            for (part, cols) in parts.iter_mut().zip(row.chunks_mut(width)) {
                part.1.push(cols);
            }
        }
        parts.into_par_iter().for_each(|(g0, mut cols)| {
            let ng = per.min(groups - g0);
            self.groups_times(a, g0, ng, &mut cols, isa);
        });
    }

    /// Groups `g0..g0 + ng` times every activation row: `out[i]` holds row i's outputs
    /// for weight rows `8·g0..` (the last group may be cut short at `rows`).
    fn groups_times(&self, a: &QActs, g0: usize, ng: usize, out: &mut [&mut [f32]], isa: Isa) {
        let tile = if isa == Isa::Avx512Vnni {
            TILE
        } else {
            TILE / 2
        };
        // One tile of activation rows at a time, times every group of the range: the
        // tile's codes (8 rows × cols bytes) stay in L1 while the range's weights stream
        // through, one sequential read each. `tmp[(g - g0)·t + k]` holds group g's outputs
        // for row i0 + k until the tile is done and its rows are copied out.
        let mut tmp = vec![[0f32; GROUP]; ng * tile];
        let mut i0 = 0;
        while i0 < a.n {
            let t = (a.n - i0).min(tile);
            for (g, slot) in (g0..g0 + ng).zip(tmp.chunks_exact_mut(t)) {
                self.group_tile(g, a, i0, slot, isa);
                // The next tile's outputs of this group, fetched while this tile computes:
                // its rows are written once, far apart, and a write that misses the cache
                // waits for the line (measured: ~14% of a 1024-row product otherwise).
                #[cfg(target_arch = "x86_64")]
                for row in out.iter().skip(i0 + t).take(tile) {
                    if let Some(v) = row.get((g - g0) * GROUP) {
                        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                        // SAFETY: SSE is part of x86-64; a prefetch is a hint and reads
                        // nothing.
                        unsafe { _mm_prefetch::<_MM_HINT_T0>((v as *const f32).cast()) };
                    }
                }
            }
            for (k, row) in out.iter_mut().skip(i0).take(t).enumerate() {
                // Whole groups as fixed-size copies; the matrix's last group may be cut
                // short at `rows`.
                let (full, rest) = row.as_chunks_mut::<GROUP>();
                let mut from = tmp.chunks_exact(t).filter_map(|g| g.get(k));
                for (d8, v) in full.iter_mut().zip(&mut from) {
                    *d8 = *v;
                }
                if let Some(v) = from.next() {
                    for (d, x) in rest.iter_mut().zip(v) {
                        *d = *x;
                    }
                }
            }
            i0 += t;
        }
    }

    /// `out[k][r]` = weight row `8g + r` · activation row `i0 + k`, `k < out.len() ≤ 8`.
    fn group_tile(&self, g: usize, a: &QActs, i0: usize, out: &mut [[f32; GROUP]], isa: Isa) {
        #[cfg(target_arch = "x86_64")]
        if let (true, Some(rows)) = (
            isa != Isa::Scalar
                && isa.supported()
                && g < self.rows.div_ceil(GROUP)
                && i0.checked_add(out.len()).is_some_and(|end| end <= a.n)
                && i0 % TILE + out.len() <= TILE
                && a.fits(self.cols),
            Rows::new(out.len()),
        ) {
            // SAFETY: the CPU has the features of `isa`; group g and activation rows
            // i0..i0 + rows are in range, `a` holds all its rows and `out` holds `rows`
            // outputs (all checked above).
            unsafe {
                match isa {
                    Isa::Avx512Vnni => avx2::group_tile_vnni(self, g, a, i0, rows, out),
                    _ => avx2::group_tile(self, g, a, i0, rows, out),
                }
            };
            return;
        }
        let _ = isa;
        for (k, o) in out.iter_mut().enumerate() {
            for (r, v) in o.iter_mut().enumerate() {
                let row = g * GROUP + r;
                *v = if row < self.rows {
                    self.dot_scalar(row, a, i0 + k)
                } else {
                    0.0
                };
            }
        }
    }

    /// Scalar reference: row `r` of the weights · quantized activation row `i`.
    fn dot_scalar(&self, r: usize, a: &QActs, i: usize) -> f32 {
        let nb = self.cols / QK;
        let mut sum = 0f32;
        let mut buf = [0u8; QK];
        for b in 0..nb {
            let blk = self.block(r, b, &mut buf);
            let q = blk.codes;
            let Some((xq, dx, sx)) = a.block(i, b) else {
                return f32::NAN;
            };
            let dw = blk.d.to_f32();
            match self.ty {
                QType::Q4_1 => {
                    let mut s = 0i32;
                    for j in 0..QK / 2 {
                        s += (q[j] & 15) as i32 * xq[j] as i32
                            + (q[j] >> 4) as i32 * xq[j + QK / 2] as i32;
                    }
                    sum += dw * dx * s as f32 + blk.m.to_f32() * sx;
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

/// Activation rows per tile of [`QActs`]' interleaved layout: the most rows one kernel
/// call multiplies.
const TILE: usize = 8;

/// At least this many input values per quantizing task: a large input is quantized on
/// the pool, a small one (a decode step's single row) on the calling thread.
const PAR_QUANTIZE: usize = 1 << 15;

thread_local! {
    /// The calling thread's quantized activations, kept across products.
    static KEPT_ACTS: std::cell::RefCell<QActs> = std::cell::RefCell::new(QActs::default());
}

/// One tile's inputs, codes, scales and sums, as [`QActs::fill`] zips them.
type TileParts<'a> = (((&'a [f32], &'a mut [i8]), &'a mut [f32]), &'a mut [f32]);

/// Activation rows quantized to signed bytes per block of 32, in tiles of [`TILE`] rows
/// interleaved block by block: block `b` of row `i` is slot `(i / 8 · nb + b) · 8 + i % 8`
/// (see [`QActs::slot`]). A kernel multiplying up to 8 rows of one tile then reads one
/// sequential stream (the rows' codes of a block side by side, their scales next to each
/// other) instead of one stream per row. The last tile is padded with zero rows, which
/// no kernel reads.
#[derive(Default)]
struct QActs {
    n: usize,
    /// Blocks per row.
    nb: usize,
    /// Scale of each block, by slot.
    d: Vec<f32>,
    /// `d · Σ q` of each block (the Q4_1 minimum's term), by slot.
    s: Vec<f32>,
    /// Codes, 32 per slot.
    q: Vec<i8>,
}

impl QActs {
    /// `x [n, cols]`, `cols % 32 == 0`, on the body `isa` picks (the AVX2 quantizer for
    /// both SIMD bodies; one this CPU lacks runs the scalar loop). Every body gives
    /// [`quantize_block_scalar`]'s bits for every input: the same operations, the same
    /// rounding, the same saturation. Large inputs are quantized a tile per task.
    #[cfg(test)]
    fn new(x: &[f32], n: usize, cols: usize, isa: Isa) -> Self {
        let mut a = QActs::default();
        a.fill(x, n, cols, isa);
        a
    }

    /// [`QActs::new`] into these buffers, grown as needed. The slots of the last tile's
    /// padding rows keep what they held (no kernel reads them).
    fn fill(&mut self, x: &[f32], n: usize, cols: usize, isa: Isa) {
        let nb = cols / QK;
        let tiles = n.div_ceil(TILE);
        let per = (TILE * nb).max(1);
        let a = self;
        (a.n, a.nb) = (n, nb);
        a.d.resize(tiles * TILE * nb, 0.0);
        a.s.resize(tiles * TILE * nb, 0.0);
        a.q.resize(tiles * TILE * cols, 0);
        let simd = isa != Isa::Scalar && isa.supported();
        // One tile: its rows' blocks into their slots.
        let fill = |(((xt, q), d), s): TileParts<'_>| {
            let q = q.as_chunks_mut::<QK>().0;
            for (r, row) in xt.chunks_exact(cols.max(1)).enumerate() {
                quantize_row(row, r, q, d, s, simd);
            }
        };
        let tile_values = (TILE * cols).max(1);
        x.par_chunks(tile_values)
            .zip(a.q.par_chunks_mut(per * QK))
            .zip(a.d.par_chunks_mut(per))
            .zip(a.s.par_chunks_mut(per))
            .with_min_len((PAR_QUANTIZE / tile_values).max(1))
            .for_each(fill);
    }

    /// The slot of row `i`'s block `b`: its scale and sum sit at this index, its codes
    /// at 32 times it.
    fn slot(&self, i: usize, b: usize) -> usize {
        ((i / TILE) * self.nb + b) * TILE + i % TILE
    }

    /// Row `i`'s block `b`: codes, scale and `d · Σ q` (`None` out of range).
    fn block(&self, i: usize, b: usize) -> Option<(&[i8], f32, f32)> {
        if i >= self.n || b >= self.nb {
            return None;
        }
        let k = self.slot(i, b);
        Some((
            self.q.get(k * QK..(k + 1) * QK)?,
            *self.d.get(k)?,
            *self.s.get(k)?,
        ))
    }

    /// Whether the codes, scales and sums hold `n` rows of `cols` in whole tiles (what
    /// the kernels read).
    #[cfg(target_arch = "x86_64")]
    fn fits(&self, cols: usize) -> bool {
        let rows = self.n.div_ceil(TILE) * TILE;
        self.nb * QK == cols
            && holds(self.q.len(), rows, cols)
            && holds(self.d.len(), rows, self.nb)
            && holds(self.s.len(), rows, self.nb)
    }
}

/// Row `row`'s blocks into the slots `r, r + TILE, …` of one tile's codes, scales and
/// sums, on the SIMD quantizer where `simd` (the caller checked the CPU), else
/// [`quantize_block_scalar`]; the same bits either way.
fn quantize_row(
    row: &[f32],
    r: usize,
    q: &mut [[i8; QK]],
    d: &mut [f32],
    s: &mut [f32],
    simd: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: avx2/fma/f16c present (both SIMD bodies have them; the caller checked).
        return unsafe { avx2::quantize_row(row, r, q, d, s) };
    }
    let _ = simd;
    for (x, q, d, s) in row_slots(row, r, q, d, s) {
        let (bd, sum) = quantize_block_scalar(x, q);
        *d = bd;
        *s = bd * sum as f32;
    }
}

/// Each block of `row` with its slot (codes, scale, `d · Σ q`) among those of row `r` of
/// a tile: [`quantize_row`]'s loop.
fn row_slots<'a>(
    row: &'a [f32],
    r: usize,
    q: &'a mut [[i8; QK]],
    d: &'a mut [f32],
    s: &'a mut [f32],
) -> impl Iterator<Item = (&'a [f32; QK], &'a mut [i8; QK], &'a mut f32, &'a mut f32)> {
    // Block b's slots of the tile's 8 rows are together: chunks of TILE, entry r.
    row.as_chunks::<QK>()
        .0
        .iter()
        .zip(q.chunks_exact_mut(TILE))
        .zip(d.chunks_exact_mut(TILE).zip(s.chunks_exact_mut(TILE)))
        .filter_map(move |((x, q), (d, s))| Some((x, q.get_mut(r)?, d.get_mut(r)?, s.get_mut(r)?)))
}

/// Scalar reference of the activation quantizer: `d = max|x| / 127` (NaNs ignored),
/// `q = x·(1/d)` rounded half away from zero, then Rust's `as i8` (saturating to
/// `-128..=127`, NaN to 0); returns `(d, Σ q)`. Finite blocks of normal scale give
/// `|q| ≤ 127`. Every other input is defined too: NaN inputs give code 0; an infinite
/// max gives `d = ∞`, every code 0 and `d·Σq` NaN (so the block's products are NaN); a
/// subnormal `d` has too few bits for `x·(1/d)` to stay within ±127.5, or its reciprocal
/// overflows to ∞, and the codes saturate; a `d` that rounds to 0 gives codes 0.
fn quantize_block_scalar(x: &[f32; QK], q: &mut [i8; QK]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut s = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        // Round half away from zero (`roundf`) without a libm call, then the saturating
        // cast.
        let r = v * id;
        *q = (r + 0.5f32.copysign(r)) as i8;
        s += *q as i32;
    }
    (d, s)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QActs, QMatrix, QType, GROUP, QK, TILE};
    use crate::kernels::Rows;
    use std::arch::x86_64::*;

    /// Weight group `g` times activation rows `i0..i0 + rows`.
    ///
    /// # Safety
    /// The CPU has avx2, fma and f16c; group `g` exists; `i0 + rows <= a.n` and the
    /// rows lie in one tile (`i0 % TILE + rows <= TILE`); `a` fits the matrix's
    /// columns; `out.len() >= rows`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group_tile(
        m: &QMatrix,
        g: usize,
        a: &QActs,
        i0: usize,
        rows: Rows,
        out: &mut [[f32; GROUP]],
    ) {
        // SAFETY: the features are enabled here; the rest is this function's contract.
        unsafe { dispatch::<false>(m, g, a, i0, rows, out) }
    }

    /// [`group_tile`] with `vpdpbusd` for the integer products.
    ///
    /// # Safety
    /// As [`group_tile`], and the CPU has avx512vnni and avx512vl.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn group_tile_vnni(
        m: &QMatrix,
        g: usize,
        a: &QActs,
        i0: usize,
        rows: Rows,
        out: &mut [[f32; GROUP]],
    ) {
        // SAFETY: the features are enabled here; the rest is this function's contract.
        unsafe { dispatch::<true>(m, g, a, i0, rows, out) }
    }

    /// # Safety
    /// As [`group_tile`]; `VNNI` only inside [`group_tile_vnni`].
    #[inline(always)]
    unsafe fn dispatch<const VNNI: bool>(
        m: &QMatrix,
        g: usize,
        a: &QActs,
        i0: usize,
        rows: Rows,
        out: &mut [[f32; GROUP]],
    ) {
        // Compile-time row counts keep the accumulators in registers.
        macro_rules! go {
            ($n:literal) => {
                // SAFETY: `$n` is `rows`: this function's contract is the kernel's.
                unsafe {
                    match m.ty {
                        QType::Q4_1 => kernel::<true, VNNI, $n>(m, g, a, i0, out),
                        QType::Q8_0 => kernel::<false, VNNI, $n>(m, g, a, i0, out),
                    }
                }
            };
        }
        crate::kernels::with_rows!(rows, go);
    }

    /// One activation block: `q = round_half_away(x / d)` with `d = max|x| / 127`,
    /// saturated to `-128..=127` and NaN to 0, as `quantize_block_scalar` computes it, bit
    /// for bit for every input; returns `(d, Σ q)`.
    ///
    /// # Safety
    /// The CPU has avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_block(x: &[f32; QK], q: &mut [i8; QK]) -> (f32, i32) {
        // SAFETY: the caller has the features; `x` holds 32 floats (four 8-lane loads at
        // 0, 8, 16 and 24) and `q` 32 bytes (one 32-byte store).
        unsafe {
            let sign = _mm256_set1_ps(-0.0);
            let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(x.as_ptr().add(o)));
            // `maxps` returns its second operand when either is NaN: with |x| first, a NaN
            // leaves the running maximum alone, as `f32::max` does.
            let mut m = _mm256_setzero_ps();
            for x in v {
                m = _mm256_max_ps(_mm256_andnot_ps(sign, x), m);
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            // No NaN and a normal, finite `d`: `|x·(1/d)| ≤ 127·(1 + 3·2^-24)`, so every
            // code is within ±127 and the plain truncation is `as i8`. Otherwise (never in a
            // model's activations) NaN goes to 0 and the rest is clamped to [-128, 127] first.
            let nan = _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_UNORD_Q>(v[0], v[1]),
                _mm256_cmp_ps::<_CMP_UNORD_Q>(v[2], v[3]),
            );
            let plain = _mm256_movemask_ps(nan) == 0 && d.is_finite() && d >= f32::MIN_POSITIVE;
            let (half, lo, hi) = (
                _mm256_set1_ps(0.5),
                _mm256_set1_ps(-128.0),
                _mm256_set1_ps(127.0),
            );
            // r + copysign(0.5, r), then `as i8`: truncated toward zero.
            let rounded = |x| {
                let r = _mm256_mul_ps(x, id);
                _mm256_add_ps(r, _mm256_or_ps(half, _mm256_and_ps(r, sign)))
            };
            let i = if plain {
                v.map(|x| _mm256_cvttps_epi32(rounded(x)))
            } else {
                v.map(|x| {
                    let t = rounded(x);
                    let t = _mm256_and_ps(t, _mm256_cmp_ps::<_CMP_ORD_Q>(t, t));
                    _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(t, lo), hi))
                })
            };
            let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01)));
            // i32 → i16 → i8 (exact: every value is in -128..=127); the packs interleave
            // 128-bit lanes, the permutation restores element order.
            let w = _mm256_packs_epi16(
                _mm256_packs_epi32(i[0], i[1]),
                _mm256_packs_epi32(i[2], i[3]),
            );
            let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, w);
            (d, sum)
        }
    }

    /// [`super::quantize_row`] on [`quantize_block`].
    ///
    /// # Safety
    /// The CPU has avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_row(
        row: &[f32],
        r: usize,
        q: &mut [[i8; QK]],
        d: &mut [f32],
        s: &mut [f32],
    ) {
        for (x, q, d, s) in super::row_slots(row, r, q, d, s) {
            // SAFETY: the features `quantize_block` needs are enabled here.
            let (bd, sum) = unsafe { quantize_block(x, q) };
            *d = bd;
            *s = bd * sum as f32;
        }
    }

    /// How far ahead of the block being multiplied the codes are prefetched, in bytes.
    const PREFETCH: usize = 2048;

    /// `acc + Σ` of the four `u8 × i8` products in each 32-bit lane.
    #[inline(always)]
    unsafe fn dot4<const VNNI: bool>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: the caller has avx2 (and avx512vnni/vl when `VNNI`); registers only.
        unsafe {
            if VNNI {
                _mm256_dpbusd_epi32(acc, w, x)
            } else {
                // u8 × i8 pairs summed to i16, then pairs of those to i32. No saturation:
                // the unsigned side is ≤ 128 (Q4 codes ≤ 15, Q8_0 magnitudes ≤ 128) and the
                // signed side ≤ 127 in magnitude, so a pair is at most 2·128·127 = 32512.
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
                _mm256_add_epi32(acc, p)
            }
        }
    }

    /// `out[k][r]` = weight row `8g + r` · activation row `i0 + k` (`Q4` selects Q4_1,
    /// else Q8_0). Per block, the 8 rows' codes come in 32-byte vectors (4 bytes of each
    /// row); each is multiplied with the same 4 activation bytes broadcast to all lanes,
    /// so lane `r` sums row `r`'s block product. One FMA then applies the 8 scales
    /// `dw[r]·dx` (and one more the `Q4_1` minimums `m[r]·dx·Σqx`).
    ///
    /// # Safety
    /// The CPU has avx2, fma and f16c (and avx512vnni + avx512vl when `VNNI`); group
    /// `g` and activation rows `i0..i0 + N` exist, in one tile of `a`, which fits
    /// `m.cols`; `out.len() >= N`; `m.ty` is Q4_1 exactly when `Q4`.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn kernel<const Q4: bool, const VNNI: bool, const N: usize>(
        m: &QMatrix,
        g: usize,
        a: &QActs,
        i0: usize,
        out: &mut [[f32; GROUP]],
    ) {
        // SAFETY: the caller has the features of `VNNI`; group `g` and activation rows
        // `i0..i0 + N` exist in one tile and `out` holds N rows (the contract), so every code,
        // scale and activation read below is inside `m` and `a` (slot `a.slot(i0, 0) +
        // b·TILE + k` is row `i0 + k`'s block b); prefetches are hints.
        unsafe {
            let nb = m.cols / QK;
            let cb = if Q4 { QK / 2 } else { QK };
            let base = g * nb;
            let wq = m.qs.as_ptr().add(base * GROUP * cb);
            let wd = m.d.as_ptr().add(base * GROUP) as *const __m128i;
            let wm = m.m.as_ptr().add(if Q4 { base * GROUP } else { 0 }) as *const __m128i;
            // The tile's block b holds rows i0.. at slots b·TILE + i0 % TILE + k.
            let first = a.slot(i0, 0);
            let xq = a.q.as_ptr().add(first * QK);
            let xd = a.d.as_ptr().add(first);
            let xs = a.s.as_ptr().add(first);
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..nb {
                let blk = wq.add(b * GROUP * cb);
                // Prefetch ~2 KB ahead in the code stream (and the scales as far ahead):
                // at 8 activation rows a block keeps the core busy long enough that the
                // hardware prefetcher alone leaves it waiting on memory (measured: the 8-row
                // product of cold Q4_1 weights ~10% faster). Hints only: an address past the
                // matrix is never dereferenced.
                let ahead = blk.wrapping_add(PREFETCH) as *const i8;
                for line in 0..GROUP * cb / 64 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
                }
                if b % 4 == 0 {
                    let blocks = PREFETCH / (GROUP * cb);
                    _mm_prefetch::<_MM_HINT_T0>(wd.wrapping_add(b + blocks) as *const i8);
                    if Q4 {
                        _mm_prefetch::<_MM_HINT_T0>(wm.wrapping_add(b + blocks) as *const i8);
                    }
                }
                // Activation row k's 4-byte group c of this block, in every lane.
                let xb = |k: usize, c: usize| {
                    _mm256_set1_epi32(
                        (xq.add((b * TILE + k) * QK) as *const i32)
                            .add(c)
                            .read_unaligned(),
                    )
                };
                // Two integer accumulators per activation row (`p` and `p2`, each taking every
                // other product), all 2N chains advanced together (vector-major): each weight
                // vector is loaded once and its products are independent chains of 4, so the
                // 4-cycle latency of `vpdpbusd` stays hidden while the FMAs below share its
                // pipes. Integer sums: the split is exact.
                let mut p = [_mm256_setzero_si256(); N];
                let mut p2 = [_mm256_setzero_si256(); N];
                if Q4 {
                    // Byte group c holds elements 4c.. (low nibbles) and 16 + 4c.. (high).
                    for c in 0..4 {
                        let raw = _mm256_loadu_si256(blk.add(c * 32) as *const __m256i);
                        let lo = _mm256_and_si256(raw, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                        for k in 0..N {
                            p[k] = dot4::<VNNI>(p[k], lo, xb(k, c));
                            p2[k] = dot4::<VNNI>(p2[k], hi, xb(k, c + 4));
                        }
                    }
                } else {
                    for c in 0..8 {
                        // `q + 128` as stored: unsigned for vpdpbusd. AVX2's maddubs sums
                        // pairs to i16, which `q + 128` (≤ 255) would saturate: there the
                        // signed code's magnitude |q| meets x with q's sign instead.
                        let u = _mm256_loadu_si256(blk.add(c * 32) as *const __m256i);
                        let acc = if c % 2 == 0 { &mut p } else { &mut p2 };
                        if VNNI {
                            for k in 0..N {
                                acc[k] = dot4::<VNNI>(acc[k], u, xb(k, c));
                            }
                        } else {
                            let w = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
                            let wu = _mm256_sign_epi8(w, w);
                            for k in 0..N {
                                acc[k] = dot4::<VNNI>(acc[k], wu, _mm256_sign_epi8(xb(k, c), w));
                            }
                        }
                    }
                }
                for k in 0..N {
                    p[k] = _mm256_add_epi32(p[k], p2[k]);
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(wd.add(b)));
                // The per-block constant term's weight-side factor: Q4_1's minimum `m`, or
                // −128·d for Q8_0's offset codes (`Σ (q + 128)·x = Σ q·x + 128·Σ x`).
                let mw = if Q4 {
                    _mm256_cvtph_ps(_mm_loadu_si128(wm.add(b)))
                } else {
                    _mm256_mul_ps(dw, _mm256_set1_ps(-128.0))
                };
                for k in 0..N {
                    let s = _mm256_mul_ps(dw, _mm256_set1_ps(*xd.add(b * TILE + k)));
                    acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[k]), s, acc[k]);
                    if Q4 || VNNI {
                        let sx = _mm256_set1_ps(*xs.add(b * TILE + k));
                        acc[k] = _mm256_fmadd_ps(mw, sx, acc[k]);
                    }
                }
            }
            for k in 0..N {
                _mm256_storeu_ps(out[k].as_mut_ptr(), acc[k]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::simd::test_data as data;

    /// Dequantization against values worked out by hand from GGUF block bytes.
    #[test]
    fn gguf_blocks_dequantize_by_hand() -> crate::TestResult {
        // Q4_1: d = 0.5, m = -1; byte j = (j % 16) | ((15 - j % 16) << 4).
        let mut blk = Vec::new();
        blk.extend(f16::from_f32(0.5).to_bits().to_le_bytes());
        blk.extend(f16::from_f32(-1.0).to_bits().to_le_bytes());
        blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let m = QMatrix::from_gguf(QType::Q4_1, 1, 32, &blk, "t")?;
        let mut row = vec![0f32; 32];
        m.dequantize_row(0, &mut row).ok_or("row 0 exists")?;
        for j in 0..16 {
            assert_eq!(row[j], 0.5 * j as f32 - 1.0);
            assert_eq!(row[j + 16], 0.5 * (15 - j) as f32 - 1.0);
        }
        // Q8_0: d = 0.25, q_j = j - 16.
        let mut blk = Vec::new();
        blk.extend(f16::from_f32(0.25).to_bits().to_le_bytes());
        blk.extend((0..32i32).map(|j| (j - 16) as i8 as u8));
        let m = QMatrix::from_gguf(QType::Q8_0, 1, 32, &blk, "t")?;
        m.dequantize_row(0, &mut row).ok_or("row 0 exists")?;
        for (j, v) in row.iter().enumerate() {
            assert_eq!(*v, 0.25 * (j as f32 - 16.0));
        }
        let e = QMatrix::from_gguf(QType::Q8_0, 2, 32, &blk, "blk.0.x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("blk.0.x") && e.contains("68"), "{e}");
        Ok(())
    }

    /// The SIMD kernel against the scalar reference (same integer sums, so only the f32
    /// summation order differs) and both against the f64 product of the dequantized
    /// weights with the unquantized inputs (the 8-bit activation error only), for every
    /// row count up to two tiles, a count quantized in several tasks on the pool (123
    /// rows, the last tile short) and both formats.
    #[test]
    fn matmul_matches_scalar_and_f64_reference() -> crate::TestResult {
        // 19 blocks a row: two groups of 8 (the vector scale path) and a tail of 3.
        let (rows, cols) = (37, 19 * 32);
        let w = data(rows * cols, 11);
        for ty in [QType::Q4_1, QType::Q8_0] {
            let qm = QMatrix::quantize(ty, rows, cols, &w)?;
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
            for (n, isa) in [1usize, 2, 5, 8, 11, 16, 123]
                .into_iter()
                .flat_map(|n| Isa::available().into_iter().map(move |i| (n, i)))
            {
                let x = data(n * cols, 5 + n as u32);
                assert_eq!(n * cols >= 2 * PAR_QUANTIZE, n == 123);
                let y = qm.matmul_on(&x, n, isa)?;
                let a = QActs::new(&x, n, cols, isa);
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
        Ok(())
    }

    /// Stacking moves blocks exactly (same format) across the row groups: the stack
    /// dequantizes to the parts' rows, bit for bit, and multiplies like them.
    #[test]
    fn cat_rows_is_exact_across_groups() -> crate::TestResult {
        let cols = 64;
        // Parts across group boundaries (5 + 11), and parts of whole groups (8 + 8, the
        // second cut short: 8 + 5) whose groups move as they are.
        for (ty, (ra, rb)) in [QType::Q4_1, QType::Q8_0]
            .into_iter()
            .flat_map(|t| [(5, 11), (8, 8), (8, 5)].map(|r| (t, r)))
        {
            let a = QMatrix::quantize(ty, ra, cols, &data(ra * cols, 3))?;
            let b = QMatrix::quantize(ty, rb, cols, &data(rb * cols, 4))?;
            let c = QMatrix::cat_rows(&[&a, &b])?;
            let rc = ra + rb;
            assert_eq!(c.dims(), (rc, cols));
            let mut want = a.dequantize();
            want.extend(b.dequantize());
            assert_eq!(c.dequantize(), want, "{ty:?}");
            let x = data(3 * cols, 9);
            let (ya, yb, yc) = (a.matmul(&x, 3)?, b.matmul(&x, 3)?, c.matmul(&x, 3)?);
            for i in 0..3 {
                let row: Vec<f32> = ya[i * ra..(i + 1) * ra]
                    .iter()
                    .chain(&yb[i * rb..(i + 1) * rb])
                    .copied()
                    .collect();
                for (g, w) in yc[i * rc..(i + 1) * rc].iter().zip(&row) {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{ty:?} {g} {w}");
                }
            }
        }
        Ok(())
    }

    /// Blocks of every kind of input: uniform values with ties, zeros, NaNs, ±∞, f32's
    /// extremes, blocks whose scale `d` is subnormal (its reciprocal finite and imprecise,
    /// or overflowing to ∞) or rounds to 0, and random bit patterns (every exponent, NaN
    /// payloads of both signs), seeded.
    fn hostile_activations() -> Vec<f32> {
        let mut blocks: Vec<[f32; QK]> = Vec::new();
        // Exact halves after scaling (max 127 → id = 1): ties round away from zero.
        blocks.push(std::array::from_fn(|i| {
            if i == 0 {
                127.0
            } else {
                (i as f32 - 16.0) + 0.5
            }
        }));
        blocks.push([0.0; QK]);
        blocks.push(std::array::from_fn(|i| if i % 2 == 0 { -0.0 } else { 0.0 }));
        let base = data(QK, 17);
        let with = |specials: &[(usize, f32)], scale: f32| {
            let mut b: [f32; QK] = std::array::from_fn(|i| base[i] * scale);
            for &(i, v) in specials {
                b[i] = v;
            }
            b
        };
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        for scale in [1.0, 1e30, 1e-30] {
            blocks.push(with(&[(0, nan)], scale));
            blocks.push(with(&[(13, nan), (31, -nan)], scale));
            blocks.push(with(&[(5, inf)], scale));
            blocks.push(with(&[(7, -inf)], scale));
            blocks.push(with(&[(1, inf), (2, -inf), (3, nan)], scale));
            blocks.push(with(&[(9, f32::MAX), (10, f32::MIN)], scale));
        }
        blocks.push([nan; QK]);
        blocks.push([inf; QK]);
        blocks.push([f32::MAX; QK]);
        blocks.push(with(&[(4, f32::MAX)], 3e38));
        // Subnormal and tiny scales: max 1e-36 (d subnormal, 1/d finite), 1e-38 and
        // 1e-40 (1/d overflows), the smallest subnormal (d rounds to 0), min positive.
        for amax in [
            1e-36f32,
            1.5e-38,
            1e-38,
            1e-40,
            f32::from_bits(1),
            f32::MIN_POSITIVE,
        ] {
            let m = base.iter().fold(0f32, |a, v| a.max(v.abs()));
            blocks.push(std::array::from_fn(|i| base[i] / m * amax));
            blocks.push(with(&[(6, amax), (8, -amax), (11, nan)], amax));
        }
        let mut rng = crate::rng::Rng::new(0x5eed);
        for _ in 0..512 {
            blocks.push(std::array::from_fn(|_| {
                f32::from_bits(rng.next_u64() as u32)
            }));
        }
        // Random mantissas and signs at every exponent, a few specials sprinkled in.
        for e in 0..=255u32 {
            blocks.push(std::array::from_fn(|i| {
                let r = rng.next_u64() as u32;
                match r % 41 {
                    0 => nan,
                    1 => -inf,
                    _ => f32::from_bits((r & 0x807f_ffff) | (e.min(254) << 23) | (i as u32 & 1)),
                }
            }));
        }
        blocks.concat()
    }

    /// The SIMD activation quantizer (the AVX2 body, which both SIMD bodies use) gives
    /// the scalar loop's codes, scales and sums bit for bit on every body this CPU has,
    /// for every kind of input: ties, NaN, ±∞, f32's extremes, subnormal scales.
    #[test]
    fn activation_quantization_matches_scalar_exactly() -> crate::TestResult {
        let x = hostile_activations();
        let n = x.len() / 96;
        let x = &x[..n * 96];
        // Each block on its own through the scalar reference.
        let mut want = Vec::new();
        for blk in x.as_chunks::<QK>().0 {
            let mut q = [0i8; QK];
            let (d, s) = quantize_block_scalar(blk, &mut q);
            want.push((q, d.to_bits(), (d * s as f32).to_bits()));
        }
        assert_eq!(want[0].0[1], -15, "-14.5 rounds away from zero");
        assert_eq!(want[0].0[17], 2, "1.5 rounds away from zero");
        for isa in Isa::available() {
            let got = QActs::new(x, n, 96, isa);
            for (k, (wq, wd, ws)) in want.iter().enumerate() {
                let (i, b) = (k / 3, k % 3);
                let (q, d, s) = got.block(i, b).ok_or("block in range")?;
                let blk = &x[k * QK..(k + 1) * QK];
                assert_eq!(q, &wq[..], "{isa:?} row {i} block {b}: {blk:?}");
                assert_eq!((d.to_bits(), s.to_bits()), (*wd, *ws), "{isa:?} {i} {b}");
            }
            assert!(got.block(n, 0).is_none() && got.block(0, 3).is_none());
        }
        Ok(())
    }

    /// Products with such inputs agree across the bodies too: NaN exactly where the
    /// scalar body has NaN, the rest within f32 summation order (rows whose finite values
    /// stay below 1e30, so that no sum overflows in one order and not in another).
    #[test]
    fn matmul_of_hostile_activations_agrees_across_bodies() -> crate::TestResult {
        let cols = 96;
        let x: Vec<f32> = hostile_activations()
            .chunks_exact(cols)
            .filter(|r| r.iter().all(|v| !v.is_finite() || v.abs() < 1e30))
            .flatten()
            .copied()
            .collect();
        let n = x.len() / cols;
        assert!(n > 20, "{n} rows");
        let x = &x[..];
        for ty in [QType::Q4_1, QType::Q8_0] {
            let qm = QMatrix::quantize(ty, 11, cols, &data(11 * cols, 19))?;
            let want = qm.matmul_on(x, n, Isa::Scalar)?;
            for isa in Isa::available() {
                let got = qm.matmul_on(x, n, isa)?;
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    let ok = if w.is_finite() {
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs())
                    } else {
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
                    };
                    assert!(ok, "{ty:?} {isa:?} output {k}: {g} vs {w}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> crate::TestResult {
        assert!(QMatrix::quantize(QType::Q8_0, 2, 30, &[0.0; 60]).is_err());
        let qm = QMatrix::quantize(QType::Q8_0, 2, 32, &[0.5; 64])?;
        assert!(qm.matmul(&[0.0; 33], 1).is_err());
        assert!(qm.dequantize_row(2, &mut [0.0; 32]).is_none());
        // An output of the wrong size is an error naming it; the right size is written
        // in full whatever it held: the same values as `matmul` (0.5 · 32 · 0.25 = 4).
        let isa = Isa::detect();
        let e = qm
            .matmul_into(&[0.25; 64], 2, isa, &mut [0.0; 3])
            .unwrap_err();
        assert!(e.to_string().contains("an output of 3 values"), "{e}");
        let mut y = [f32::NAN; 4];
        qm.matmul_into(&[0.25; 64], 2, isa, &mut y)?;
        assert_eq!(y.to_vec(), qm.matmul(&[0.25; 64], 2)?);
        assert!(y.iter().all(|&v| (v - 4.0).abs() < 1e-2), "{y:?}");
        Ok(())
    }
}
