//! The pieces of a decoder block — [`RmsNorm`], [`Linear`], [`Attention`] (with its
//! [`KvCache`] and [`Rope`] tables), [`Mlp`] — and the [`Block`] that runs them with its
//! hook points, public so that a model outside the crate's families can be built from
//! them (see `examples/custom_model.rs`).
//!
//! A block is written once, generic over where its activations live (`Acts`): candle
//! tensors (the GPU path) or plain `f32` rows (every forward pass on the CPU, prefill
//! and decode: no candle op between the products, a tensor built only at a hook point
//! that has hooks). Only the attention core differs between the two.
//!
//! Hook points of a block, in order (TransformerLens names; for Gemma's post-norm
//! blocks `hook_attn_out` and `hook_mlp_out` see the outputs *after* the post-norms, as
//! TransformerLens places them, i.e. what is added to the residual stream):
//! `hook_resid_pre`, `attn.hook_z` (`[b, t, n_heads·head_dim]`, the input of W_O),
//! `hook_attn_out`, `hook_resid_mid`, `hook_mlp_in` (the residual stream as the MLP's
//! norm reads it: replacing it changes only the MLP's input), `ln2.hook_normalized`
//! (the MLP's normalised input, what transcoders read), `hook_mlp_out`,
//! `hook_resid_post`.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::Activation;
use super::linear::Weight;
use super::RopeStyle;
use crate::hooks::{HookContext, HookPoint, Hooks};
use crate::kernels::gemm_bf16::{gemm_bf16_packed, has_dpbf16, PackedBf16};
use crate::{Error, FloatDtype, Result};

/// RMSNorm: `x / sqrt(mean(x²) + eps) · w` over the last dimension (candle's formula).
/// Gemma's `(1 + w)` is stored as its sum.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    w: Tensor,
    v: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    /// A norm with weight `w` (`[d]`, any float dtype; kept as f32).
    pub fn new(w: &Tensor, eps: f64) -> Result<Self> {
        let w = w.to_dtype(DType::F32)?;
        if w.rank() != 1 {
            return Err(Error::Invalid(format!(
                "an RMSNorm weight must be a vector, got shape {:?}",
                w.dims()
            )));
        }
        Ok(RmsNorm {
            v: w.to_vec1::<f32>()?,
            w,
            eps: eps as f32,
        })
    }

    /// The width it normalises.
    pub fn dim(&self) -> usize {
        self.v.len()
    }

    /// Normalise the last dimension of `x` (f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.w, self.eps)?)
    }

    /// Each `dim()`-wide row of `x`.
    pub(crate) fn rows(&self, x: &[f32]) -> Vec<f32> {
        rms_norm_rows(x, &self.v, self.eps)
    }

    /// In place, each `dim()`-wide chunk of `x` (the per-head q/k norms).
    fn rows_in_place(&self, x: &mut [f32]) {
        rms_norm_in_place(x, &self.v, self.eps);
    }

    pub(crate) fn bytes(&self) -> usize {
        self.v.len() * 4
    }
}

/// RMSNorm of each `w.len()`-wide row of `x` (candle's formula: `x / sqrt(mean(x²) + eps) · w`).
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    use rayon::prelude::*;
    // Every value is written below (copied, then normalized in place).
    let mut y = super::scratch::stale(x.len());
    // Blocks of 64 rows in parallel (each row's arithmetic is the same either way).
    let block = 64 * w.len().max(1);
    y.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .with_min_len(4)
        .for_each(|(c, x)| {
            c.copy_from_slice(x);
            rms_norm_in_place(c, w, eps)
        });
    y
}

/// [`rms_norm_rows`] in place: each row's sum of squares is taken before the row is
/// overwritten.
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len().max(1);
    // Up to 8 rows at once: each row's sum of squares is still added in column order
    // (the same result as row by row), but the rows' add chains interleave instead of
    // waiting on one another's latency.
    for xc in x.chunks_mut(8 * d) {
        let mut ss = [0f32; 8];
        {
            let mut slots: [&[f32]; 8] = [&[]; 8];
            let mut nr = 0;
            for (slot, r) in slots.iter_mut().zip(xc.chunks_exact(d)) {
                *slot = r;
                nr += 1;
            }
            let rows = &slots[..nr];
            if let [r] = rows {
                ss[0] = r.iter().map(|v| v * v).sum();
            } else {
                for i in 0..d {
                    for (s, r) in ss.iter_mut().zip(rows) {
                        let v = r[i];
                        *s += v * v;
                    }
                }
            }
        }
        for (r, s) in xc.chunks_exact_mut(d).zip(ss) {
            let m = (s / d as f32 + eps).sqrt();
            for (v, &g) in r.iter_mut().zip(w) {
                *v = *v / m * g;
            }
        }
    }
}

/// `y = x Wᵀ + b`: a weight matrix `[out, in]` (dense f32/f16/bf16, or GGUF blocks) and
/// an optional bias. With dense bf16 weights on a CPU with AVX512-BF16, the first product
/// of more than 8 rows packs a copy of the matrix into the bf16 GEMM's panel layout (as
/// many bytes as the weights), which the following batched products read instead of
/// packing per call (the same bits).
#[derive(Debug, Clone)]
pub struct Linear {
    pub(crate) w: Weight,
    bias: Option<(Tensor, Vec<f32>)>,
    packed: std::sync::OnceLock<Option<Arc<PackedBf16>>>,
}

impl Linear {
    /// A dense layer from a weight `[out, in]` (f32, f16 or bf16, kept as given) and an
    /// optional bias `[out]`.
    pub fn new(w: Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (out, _) = w.dims2()?;
        Self::from_weight(Weight::Dense(w), bias.cloned(), out)
    }

    pub(crate) fn from_weight(w: Weight, bias: Option<Tensor>, out: usize) -> Result<Self> {
        let bias = match bias {
            None => None,
            Some(b) => {
                let b = b.to_dtype(DType::F32)?;
                if b.dims() != [out] {
                    return Err(Error::Shape {
                        name: "bias".into(),
                        expected: vec![out],
                        found: b.dims().to_vec(),
                    });
                }
                let v = b.to_vec1::<f32>()?;
                Some((b, v))
            }
        };
        Ok(Linear {
            w,
            bias,
            packed: std::sync::OnceLock::new(),
        })
    }

    /// `x [n, in]` (f32) → `[n, out]` f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = super::linear::linear(x, &self.w)?;
        match &self.bias {
            None => Ok(y),
            Some((b, _)) => Ok(y.broadcast_add(b)?),
        }
    }

    /// `x [n, in]` as plain rows.
    pub(crate) fn rows(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let packed = self.packed(n).and_then(|p| {
            let mut y = super::scratch::stale(n.checked_mul(p.dims().1)?);
            gemm_bf16_packed(x, n, p, &mut y, false).then_some(y)
        });
        let mut y = match packed {
            Some(y) => y,
            None => self.w.matmul_vec(x, n)?,
        };
        if let Some((_, b)) = &self.bias {
            for r in y.chunks_exact_mut(b.len().max(1)) {
                for (v, c) in r.iter_mut().zip(b) {
                    *v += c;
                }
            }
        }
        Ok(y)
    }

    /// The packed bf16 matrix for a product of `n` rows, packed at the first call that
    /// needs it; `None` for few rows, other weights or CPUs without AVX512-BF16.
    fn packed(&self, n: usize) -> Option<&PackedBf16> {
        if n <= super::linear::SMALL_ROWS || !has_dpbf16() {
            return None;
        }
        self.packed
            .get_or_init(|| self.w.pack_bf16().map(Arc::new))
            .as_deref()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.w.bytes() + self.bias.as_ref().map_or(0, |(_, v)| v.len() * 4)
    }
}

/// RoPE tables for positions `0..n`: `cos`/`sin` of `p · inv_freq[i]`, `[n, head_dim/2]`.
#[derive(Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    cos_v: Vec<f32>,
    sin_v: Vec<f32>,
    style: RopeStyle,
}

impl Rope {
    /// Tables for `n` positions from the inverse frequencies `inv_freq` (`head_dim / 2`).
    pub fn new(inv_freq: &[f32], n: usize, style: RopeStyle, device: &Device) -> Result<Self> {
        let half = inv_freq.len();
        let len = n.checked_mul(half).ok_or_else(|| {
            Error::Invalid(format!("RoPE tables of {n} × {half} entries overflow"))
        })?;
        let mut cos = Vec::with_capacity(len);
        let mut sin = Vec::with_capacity(len);
        for p in 0..n {
            for &f in inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Rope {
            cos: Tensor::from_slice(&cos, (n, half), device)?,
            sin: Tensor::from_slice(&sin, (n, half), device)?,
            cos_v: cos,
            sin_v: sin,
            style,
        })
    }

    /// Rotate `x [b, h, t, head_dim]` at positions `start..start + t`.
    pub fn forward(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        Ok(match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)?,
            RopeStyle::Half => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?,
        })
    }

    /// Rotate each `head_dim`-wide head of `x` (plain rows) at position `pos`.
    fn rows(&self, x: &mut [f32], hd: usize, pos: usize) -> Result<()> {
        let half = hd / 2;
        let (cos, sin) = match (
            self.cos_v.get(pos * half..(pos + 1) * half),
            self.sin_v.get(pos * half..(pos + 1) * half),
        ) {
            (Some(c), Some(s)) => (c, s),
            _ => {
                return Err(Error::Invalid(format!(
                    "position {pos} beyond the RoPE tables"
                )))
            }
        };
        for head in x.chunks_exact_mut(hd) {
            match self.style {
                RopeStyle::Interleaved => {
                    for i in 0..half {
                        let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = x0 * cos[i] - x1 * sin[i];
                        head[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
                    }
                }
                RopeStyle::Half => {
                    for i in 0..half {
                        let (x0, x1) = (head[i], head[i + half]);
                        head[i] = x0 * cos[i] - x1 * sin[i];
                        head[i + half] = x0 * sin[i] + x1 * cos[i];
                    }
                }
            }
        }
        Ok(())
    }
}

/// The keys and values of past positions, `[batch, n_kv_heads, capacity, head_dim]`
/// buffers filled up to the model's cache length (grown by doubling, never copied whole
/// per step), stored as f32, f16 or bf16.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    dtype: DType,
    max_len: usize,
}

impl KvCache {
    /// An empty cache storing `dtype` for up to `max_len` positions.
    pub fn new(dtype: FloatDtype, max_len: usize) -> Self {
        KvCache {
            k: None,
            v: None,
            dtype: dtype.into(),
            max_len,
        }
    }

    /// Forget every position.
    pub fn clear(&mut self) {
        self.k = None;
        self.v = None;
    }

    /// Keep the first `keep` positions of batch row 0, copied into `batch` rows.
    pub fn fork(&mut self, keep: usize, batch: usize) -> Result<()> {
        for buf in [&mut self.k, &mut self.v] {
            let old = buf
                .as_ref()
                .ok_or_else(|| Error::Invalid("fork_cache: the KV cache is empty".into()))?;
            let (_, h, cap, hd) = old.dims4()?;
            let row = old.narrow(0, 0, 1)?.narrow(2, 0, keep)?;
            let fresh = Tensor::zeros((batch, h, cap, hd), old.dtype(), old.device())?;
            fresh.slice_set(&row.repeat((batch, 1, 1, 1))?.contiguous()?, 2, 0)?;
            *buf = Some(fresh);
        }
        Ok(())
    }

    /// Write `k`, `v` `[b, h, t, hd]` (f32) at positions `start..start + t`.
    fn append(&mut self, k: &Tensor, v: &Tensor, start: usize) -> Result<()> {
        append_kv(&mut self.k, k, start, self.max_len, self.dtype)?;
        append_kv(&mut self.v, v, start, self.max_len, self.dtype)
    }

    /// [`KvCache::append`], returning every position `[b, h, start + t, hd]` in f32: the
    /// cached past as stored, `k`/`v` themselves unrounded.
    fn append_all(&mut self, k: &Tensor, v: &Tensor, start: usize) -> Result<(Tensor, Tensor)> {
        self.append(k, v, start)?;
        let all = |buf: &Option<Tensor>, new: &Tensor| -> Result<Tensor> {
            let x = buf
                .as_ref()
                .ok_or_else(|| Error::Invalid("KV cache buffer missing".into()))?;
            if self.dtype == new.dtype() {
                Ok(x.narrow(2, 0, start + new.dim(2)?)?)
            } else if start == 0 {
                Ok(new.clone())
            } else {
                let past = x.narrow(2, 0, start)?.to_dtype(new.dtype())?;
                Ok(Tensor::cat(&[&past, new], 2)?)
            }
        };
        Ok((all(&self.k, k)?, all(&self.v, v)?))
    }
}

/// Write `new [b, h, t, hd]` (f32) at positions `start..start + t` of the cache buffer
/// (stored as `kv`; growing it by doubling, or starting a fresh one at `start = 0`).
fn append_kv(
    buf: &mut Option<Tensor>,
    new: &Tensor,
    start: usize,
    max_len: usize,
    kv: DType,
) -> Result<()> {
    let (b, h, t, hd) = new.dims4()?;
    let stored;
    let new = if new.dtype() == kv {
        new
    } else {
        stored = to_cache_dtype(new, kv)?;
        &stored
    };
    let total = start + t;
    if start == 0 {
        // A fresh buffer holding exactly the new positions (no zeroed capacity to fill
        // and copy into); the next append grows it by doubling. When `new` is already
        // contiguous in the cache's dtype the buffer is `new` itself: both callers hand
        // over a tensor of their own that they only read afterwards.
        *buf = Some(new.contiguous()?);
        return Ok(());
    }
    let cap = match buf {
        Some(x) => x.dim(2)?,
        None => 0,
    };
    if total > cap {
        let want = (cap * 2).max(256).max(total).min(max_len.max(total));
        let fresh = Tensor::zeros((b, h, want, hd), new.dtype(), new.device())?;
        if let (Some(old), true) = (buf.as_ref(), start > 0) {
            fresh.slice_set(&old.narrow(2, 0, start)?.contiguous()?, 2, 0)?;
        }
        *buf = Some(fresh);
    }
    match buf {
        Some(x) => Ok(x.slice_set(&new.contiguous()?, 2, start)?),
        None => Err(Error::Invalid("KV cache buffer missing".into())),
    }
}

/// `x` in the cache's dtype. An f32 tensor on the CPU goes through half's slice
/// conversion (F16C where the CPU has it; candle's `to_dtype` converts one value at a
/// time); both round to nearest even.
fn to_cache_dtype(x: &Tensor, kv: DType) -> Result<Tensor> {
    use half::slice::HalfFloatSliceExt;
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Ok(x.to_dtype(kv)?);
    }
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(match kv {
        DType::F16 => {
            let mut h = vec![half::f16::ZERO; v.len()];
            h.convert_from_f32_slice(&v);
            Tensor::from_vec(h, x.shape(), x.device())?
        }
        DType::BF16 => {
            let mut h = vec![half::bf16::ZERO; v.len()];
            h.convert_from_f32_slice(&v);
            Tensor::from_vec(h, x.shape(), x.device())?
        }
        _ => x.to_dtype(kv)?,
    })
}

/// The shape and options of an [`Attention`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    /// Width of a head (even).
    pub head_dim: usize,
    /// Scores are `q·k · scale`.
    pub scale: f32,
    /// Scores become `c · tanh(s / c)` (Gemma 2).
    pub softcap: Option<f32>,
    /// Attend to the last `window` positions only (itself included).
    pub window: Option<usize>,
}

/// Grouped-query attention: fused q/k/v projection (optional biases), optional per-head
/// q/k RMSNorm, RoPE, causal (optionally sliding-window) softmax attention over a
/// [`KvCache`], output projection. K/V heads are never copied per query head.
#[derive(Debug)]
pub struct Attention {
    spec: AttentionSpec,
    /// `[(n_heads + 2 n_kv_heads) · head_dim, d_model]`: q, k, v stacked.
    qkv: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    rope: Arc<Rope>,
    cache: KvCache,
}

impl Attention {
    /// Attention from its parts: `qkv` is q, k and v stacked by rows
    /// (`[(n_heads + 2·n_kv_heads)·head_dim, d_model]`), `o` is `[d_model, n_heads·head_dim]`;
    /// `qk_norm` are the per-head norms of q and k (`[head_dim]`).
    pub fn new(
        spec: AttentionSpec,
        qkv: Linear,
        o: Linear,
        qk_norm: Option<(RmsNorm, RmsNorm)>,
        rope: Arc<Rope>,
        cache: KvCache,
    ) -> Result<Self> {
        let s = &spec;
        let bad = |why: String| Error::Invalid(format!("attention: {why}"));
        if s.n_heads == 0 || s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
            return Err(bad(format!(
                "{} query heads are not a positive multiple of {} key/value heads",
                s.n_heads, s.n_kv_heads
            )));
        }
        if s.head_dim == 0 || !s.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {} must be even and positive",
                s.head_dim
            )));
        }
        if s.window == Some(0) {
            return Err(bad("a window of 0 positions".into()));
        }
        if let Some((q, k)) = &qk_norm {
            if q.dim() != s.head_dim || k.dim() != s.head_dim {
                return Err(bad(format!(
                    "q/k norms of width {}/{} for head_dim {}",
                    q.dim(),
                    k.dim(),
                    s.head_dim
                )));
            }
        }
        let (q_norm, k_norm) = match qk_norm {
            Some((q, k)) => (Some(q), Some(k)),
            None => (None, None),
        };
        Ok(Attention {
            spec,
            qkv,
            o,
            q_norm,
            k_norm,
            rope,
            cache,
        })
    }

    /// The attention's shape and options.
    pub fn spec(&self) -> &AttentionSpec {
        &self.spec
    }

    /// The KV cache.
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// `z [b, t, n_heads·head_dim]` (the input of W_O) for the normalised input
    /// `x [b, t, d_model]` at positions `start..start + t`, appending to the cache.
    /// `mask` is added to the scores (`[b or 1, 1, 1, t, start + t]`); see [`causal_mask`].
    pub fn forward_z(&mut self, x: &Tensor, start: usize, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let qkv = self.qkv.forward(&x.reshape((b * t, d))?)?;
        self.core_tensor(qkv, b, t, start, mask)
    }

    /// The output projection of `z [n, n_heads·head_dim]`.
    pub fn project(&self, z: &Tensor) -> Result<Tensor> {
        self.o.forward(z)
    }

    /// The attention core on tensors: `qkv [b·t, (nh + 2 kvh)·hd]` → `z [b·t, nh·hd]`.
    fn core_tensor(
        &mut self,
        qkv: Tensor,
        b: usize,
        t: usize,
        start: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let s = self.spec;
        let (nh, kvh, hd) = (s.n_heads, s.n_kv_heads, s.head_dim);
        let heads = |off: usize, h: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(1, off * hd, h * hd)?
                .reshape((b, t, h, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let mut q = heads(0, nh)?;
        let mut k = heads(nh, kvh)?;
        let v = heads(nh + kvh, kvh)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q = self.rope.forward(&q, start)?;
        let k = self.rope.forward(&k, start)?;
        let (k, v) = self.cache.append_all(&k, &v, start)?;
        let total = start + t;
        // The `rep` query heads sharing a K/V head are stacked along the row axis.
        let rep = nh / kvh;
        let q = q.reshape((b, kvh, rep * t, hd))?;
        let mut att = (q.matmul(&k.t()?)? * s.scale as f64)?;
        if let Some(c) = s.softcap {
            att = ((att / c as f64)?.tanh()? * c as f64)?;
        }
        if let Some(m) = mask {
            att = att
                .reshape((b, kvh, rep, t, total))?
                .broadcast_add(m)?
                .reshape((b, kvh, rep * t, total))?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        Ok(att
            .matmul(&v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b * t, nh * hd))?)
    }

    /// The attention core on plain rows (CPU): `qkv [b·t, (nh + 2 kvh)·hd]`, row `bi·t + i`
    /// at position `start + i` of sequence `bi` (modified in place: norms, RoPE) →
    /// `z [b·t, nh·hd]`. Past positions come from the cache; the `t` new ones are
    /// appended to it and attended to unrounded. Per query, the scores, softmax and
    /// weighted sum of values run in one pass, queries and heads in parallel.
    fn core_rows(
        &mut self,
        qkv: &mut [f32],
        b: usize,
        t: usize,
        start: usize,
        pads: Option<&[usize]>,
    ) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        let s = self.spec;
        let (nh, kvh, hd) = (s.n_heads, s.n_kv_heads, s.head_dim);
        let w = (nh + 2 * kvh) * hd;
        if Some(qkv.len()) != b.checked_mul(t).and_then(|n| n.checked_mul(w)) {
            return Err(Error::Invalid(format!(
                "attention: {} q/k/v values for {b} sequences of {t} positions",
                qkv.len()
            )));
        }
        let (qn, kn) = (self.q_norm.as_ref(), self.k_norm.as_ref());
        let rope = &self.rope;
        qkv.par_chunks_mut(w)
            .with_min_len(16)
            .enumerate()
            .try_for_each(|(r, row)| -> Result<()> {
                let (q, rest) = row.split_at_mut(nh * hd);
                let k = &mut rest[..kvh * hd];
                if let (Some(qn), Some(kn)) = (qn, kn) {
                    qn.rows_in_place(q);
                    kn.rows_in_place(k);
                }
                rope.rows(q, hd, start + r % t)?;
                rope.rows(k, hd, start + r % t)
            })?;
        let qkv: &[f32] = qkv;
        // The new keys and values as `[b, kvh, t, hd]`: the cache's layout.
        // Tasks of whole (sequence, KV head) blocks, t rows of hd values each, at least
        // 16 Ki values a task (a decode step's few heads stay on this thread).
        let block = (t * hd).max(1);
        let gather = |off: usize| -> Vec<f32> {
            // Every element is written below.
            let mut out = super::scratch::stale(b * kvh * t * hd);
            out.par_chunks_mut(block)
                .with_min_len(((1 << 14) / block).max(1))
                .enumerate()
                .for_each(|(bg, head)| {
                    let (bi, g) = (bg / kvh.max(1), bg % kvh.max(1));
                    let src = qkv.chunks_exact(w).skip(bi * t);
                    for (dst, row) in head.chunks_exact_mut(hd.max(1)).zip(src) {
                        dst.copy_from_slice(&row[off + g * hd..off + (g + 1) * hd]);
                    }
                });
            out
        };
        let dev = Device::Cpu;
        let k_new = gather(nh * hd);
        let v_new = gather((nh + kvh) * hd);
        self.cache.append(
            &Tensor::from_slice(&k_new, (b, kvh, t, hd), &dev)?,
            &Tensor::from_slice(&v_new, (b, kvh, t, hd), &dev)?,
            start,
        )?;
        let (Some(kt), Some(vt)) = (&self.cache.k, &self.cache.v) else {
            return Err(Error::Invalid("KV cache buffer missing".into()));
        };
        let cap = kt.dim(2)?;
        let mut y = super::scratch::zeroed(b * t * nh * hd);
        use candle_core::{CpuStorage as C, Storage as S};
        let (ks, kl) = kt.storage_and_layout();
        let (vs, vl) = vt.storage_and_layout();
        let (ko, vo) = (kl.start_offset(), vl.start_offset());
        let at = Attend {
            s,
            qkv,
            k_new: &k_new,
            v_new: &v_new,
            b,
            t,
            start,
            cap,
            pads,
        };
        match (&*ks, &*vs) {
            (S::Cpu(C::F32(k)), S::Cpu(C::F32(v))) => at.run(&k[ko..], &v[vo..], &mut y)?,
            (S::Cpu(C::F16(k)), S::Cpu(C::F16(v))) => at.run(&k[ko..], &v[vo..], &mut y)?,
            (S::Cpu(C::BF16(k)), S::Cpu(C::BF16(v))) => at.run(&k[ko..], &v[vo..], &mut y)?,
            _ => return Err(Error::Invalid("KV cache is not on the CPU".into())),
        }
        super::scratch::recycle(k_new);
        super::scratch::recycle(v_new);
        Ok(y)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.qkv.bytes()
            + self.o.bytes()
            + self.q_norm.as_ref().map_or(0, |n| n.bytes())
            + self.k_norm.as_ref().map_or(0, |n| n.bytes())
    }
}

/// The scores, softmax and weighted sum of `t` new positions per sequence over a KV
/// cache of element type `T` (see [`Attention::core_rows`]).
struct Attend<'a> {
    s: AttentionSpec,
    /// `[b·t, (n_heads + 2 n_kv_heads)·hd]`, after RoPE (the queries).
    qkv: &'a [f32],
    /// The new keys and values, `[b, kvh, t, hd]`, unrounded.
    k_new: &'a [f32],
    v_new: &'a [f32],
    b: usize,
    t: usize,
    /// Position of the first new row.
    start: usize,
    /// The cache buffers' capacity (positions per row and head).
    cap: usize,
    pads: Option<&'a [usize]>,
}

impl Attend<'_> {
    /// `y [b·t, n_heads·hd]`. The query at position `q` attends to the positions
    /// `lo..=q`: those before `start` from the cache buffers `[b, kvh, cap, hd]` (as
    /// stored), the rest from the new keys and values. `lo` skips the row's left padding
    /// and what is outside the window; a padding position attends to itself only (the
    /// rule of [`causal_mask`]).
    fn run<T: crate::kernels::simd::Elem>(
        &self,
        kbuf: &[T],
        vbuf: &[T],
        y: &mut [f32],
    ) -> Result<()> {
        use crate::kernels::simd::{axpy_rows, dot_rows, scale_max, softmax_exp};
        use rayon::prelude::*;
        let s = self.s;
        let (nh, kvh, hd) = (s.n_heads, s.n_kv_heads, s.head_dim);
        let (b, t, start, cap) = (self.b, self.t, self.start, self.cap);
        let w = (nh + 2 * kvh) * hd;
        let total = start + t;
        let rep = nh / kvh;
        if kbuf.len() < b * kvh * cap * hd || vbuf.len() < b * kvh * cap * hd || cap < total {
            return Err(Error::Invalid("KV cache buffer too small".into()));
        }
        if self.qkv.len() < b * t * w
            || y.len() < b * t * nh * hd
            || self.k_new.len() < b * kvh * t * hd
            || self.v_new.len() < b * kvh * t * hd
        {
            return Err(Error::Invalid("attention: buffer sizes".into()));
        }
        let qkv = self.qkv;
        // The first position the query at position `q` of row `bi` attends to.
        let first = |bi: usize, q: usize| -> usize {
            let pad = self.pads.and_then(|p| p.get(bi).copied()).unwrap_or(0);
            if q < pad {
                return q;
            }
            match s.window {
                Some(win) => pad.max((q + 1).saturating_sub(win)),
                None => pad,
            }
        };
        // Output heads `h0..h0 + outs.len() / hd` of query row `r`, all in one KV group:
        // they read the same K and V rows one after another, while those are in cache.
        let heads = |r: usize, h0: usize, outs: &mut [f32]| {
            let (bi, i) = (r / t, r % t);
            let g = h0 / rep;
            let q_pos = start + i;
            let lo = first(bi, q_pos);
            // Cached past positions lo..start, then new positions j0..=i.
            let past = lo.min(start);
            let j0 = lo.saturating_sub(start);
            let base = (bi * kvh + g) * cap * hd;
            let kh = &kbuf[base + past * hd..base + start * hd];
            let vh = &vbuf[base + past * hd..base + start * hd];
            let nb = ((bi * kvh + g) * t) * hd;
            let kn = &self.k_new[nb + j0 * hd..nb + (i + 1) * hd];
            let vn = &self.v_new[nb + j0 * hd..nb + (i + 1) * hd];
            let row = &qkv[r * w..(r + 1) * w];
            let n = start - past;
            // Up to 256 positions on the stack (a harvest's contexts), more on the heap.
            let len = n + i + 1 - j0;
            let (mut stack, mut heap) = ([0f32; 256], Vec::new());
            let scores: &mut [f32] = match stack.get_mut(..len) {
                Some(s) => s,
                None => {
                    heap.resize(len, 0.0);
                    &mut heap
                }
            };
            for (o, out) in outs.chunks_exact_mut(hd).enumerate() {
                let h = h0 + o;
                let q = &row[h * hd..(h + 1) * hd];
                dot_rows(q, kh, hd, &mut scores[..n]);
                dot_rows(q, kn, hd, &mut scores[n..]);
                let mut max = scale_max(scores, s.scale);
                if let Some(c) = s.softcap {
                    for v in scores.iter_mut() {
                        *v = c * (*v / c).tanh();
                    }
                    max = c * (max / c).tanh();
                }
                // Weights below e^-80 (relative to the largest) are dropped (see
                // `SOFTMAX_CUTOFF`).
                let sum = softmax_exp(scores, max);
                for v in scores.iter_mut() {
                    *v /= sum;
                }
                axpy_rows(out, &scores[..n], vh);
                axpy_rows(out, &scores[n..], vn);
            }
        };
        // One task per (query row, KV head); when that gives too few tasks to keep every
        // thread busy (one decode step of one prompt: 3 KV heads on 2 threads), one per
        // query head. Each head's arithmetic is the same either way. Short attention
        // spans are not worth a hop per task.
        let threads = rayon::current_num_threads();
        let rows = b * t;
        if total < 64 || t > 1 || rows * kvh >= 2 * threads {
            let min = if total < 64 || t > 1 { kvh } else { 1 };
            y.par_chunks_mut(rep * hd)
                .take(rows * kvh)
                .with_min_len(min)
                .enumerate()
                .for_each(|(idx, outs)| heads(idx / kvh, (idx % kvh) * rep, outs));
        } else {
            y.par_chunks_mut(hd)
                .take(rows * nh)
                .enumerate()
                .for_each(|(idx, out)| heads(idx / nh, idx % nh, out));
        }
        Ok(())
    }
}

/// The additive attention mask of `t` query positions starting at `start`, over
/// `start + t` keys: `-∞` where a key is in the future, outside `window` (`q − k ≥
/// window`), or left padding of its row (`left_pad[b]` positions; a padding position
/// still attends to itself). `[b or 1, 1, 1, t, start + t]`; `None` when nothing is
/// masked.
pub fn causal_mask(
    t: usize,
    start: usize,
    window: Option<usize>,
    left_pad: Option<&[usize]>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let total = start + t;
    let windowed = window.is_some_and(|w| total > w);
    if t <= 1 && left_pad.is_none() && !windowed {
        return Ok(None);
    }
    let rows = left_pad.map_or(1, |p| p.len().max(1));
    let mut m = vec![0f32; rows * t * total];
    for bi in 0..rows {
        let pad = left_pad.and_then(|p| p.get(bi).copied()).unwrap_or(0);
        for i in 0..t {
            let q = start + i;
            let row = &mut m[(bi * t + i) * total..(bi * t + i + 1) * total];
            for (j, v) in row.iter_mut().enumerate() {
                let outside = window.is_some_and(|w| q - j.min(q) >= w);
                if j > q || (j < pad && j != q) || outside {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (rows, 1, 1, t, total), device)?))
}

/// A gated MLP: `down(act(gate(x)) · up(x))`, with gate and up stacked by rows
/// (`[2·d_ff, d_model]`).
#[derive(Debug)]
pub struct Mlp {
    gate_up: Linear,
    down: Linear,
    act: Activation,
    d_ff: usize,
}

impl Mlp {
    /// An MLP from the stacked gate/up projection `[2·d_ff, d_model]` and `down`
    /// `[d_model, d_ff]`.
    pub fn new(gate_up: Linear, down: Linear, act: Activation, d_ff: usize) -> Self {
        Mlp {
            gate_up,
            down,
            act,
            d_ff,
        }
    }

    /// `x [n, d_model]` (f32) → `[n, d_model]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        let g = gu.narrow(1, 0, self.d_ff)?;
        let u = gu.narrow(1, self.d_ff, self.d_ff)?;
        let a = match self.act {
            Activation::Silu => g.silu()?,
            Activation::GeluTanh => g.gelu()?,
        };
        self.down.forward(&(a * u)?)
    }

    /// `x [n, d_model]` as plain rows.
    fn rows(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        let ff = self.d_ff;
        let gu = self.gate_up.rows(x, n)?;
        // Every row is written below.
        let mut a = super::scratch::stale(n * ff);
        a.par_chunks_exact_mut(ff.max(1))
            .zip(gu.par_chunks_exact(2 * ff.max(1)))
            .with_min_len(16)
            .for_each(|(a, r)| {
                let (g, u) = r.split_at(ff);
                match self.act {
                    Activation::Silu => crate::kernels::simd::silu_mul(g, u, a),
                    Activation::GeluTanh => gelu_tanh_mul(g, u, a),
                }
            });
        super::scratch::recycle(gu);
        let y = self.down.rows(&a, n);
        super::scratch::recycle(a);
        y
    }

    pub(crate) fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }
}

/// `out = gelu_tanh(g) · u`, GELU's tanh approximation as PyTorch's
/// `gelu(approximate="tanh")`: `0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³)))`.
fn gelu_tanh_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    const C: f32 = 0.797_884_6; // √(2/π)
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        let inner = C * (g + 0.044715 * g * g * g);
        *o = 0.5 * g * (1.0 + inner.tanh()) * u;
    }
}

/// A decoder block: pre-norm attention and MLP with residual adds, optional post-norms
/// (Gemma), and its hook points (module docs).
#[derive(Debug)]
pub struct Block {
    index: usize,
    attn_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    mlp: Mlp,
    post_ffn_norm: Option<RmsNorm>,
}

impl Block {
    /// Block `index` (its hook points are `blocks.{index}.…`) from its parts;
    /// `post_norms` are Gemma's post-attention and post-feed-forward norms.
    pub fn new(
        index: usize,
        attn_norm: RmsNorm,
        attn: Attention,
        ffn_norm: RmsNorm,
        mlp: Mlp,
        post_norms: Option<(RmsNorm, RmsNorm)>,
    ) -> Self {
        let (post_attn_norm, post_ffn_norm) = match post_norms {
            Some((a, f)) => (Some(a), Some(f)),
            None => (None, None),
        };
        Block {
            index,
            attn_norm,
            attn,
            post_attn_norm,
            ffn_norm,
            mlp,
            post_ffn_norm,
        }
    }

    /// The block's attention.
    pub fn attention_mut(&mut self) -> &mut Attention {
        &mut self.attn
    }

    /// Run the block on the residual stream `x [b, t, d_model]` (f32) at positions
    /// `ctx.start_pos..`, calling `hooks` at its hook points. `mask` is the block's
    /// [`causal_mask`] (its window).
    pub fn forward(
        &mut self,
        x: &Tensor,
        mask: Option<&Tensor>,
        hooks: &mut Hooks,
        ctx: &HookContext,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let mut em = Emitter::new(hooks, ctx, b, t);
        let step = Step {
            b,
            t,
            start: ctx.start_pos,
            pads: None,
            mask,
        };
        let y = self.run(TensorActs(x.reshape((b * t, d))?), &step, &mut em)?;
        Ok(y.0.reshape((b, t, d))?)
    }

    /// The block, written once for both representations of the activations.
    pub(crate) fn run<A: Acts>(&mut self, x: A, step: &Step, em: &mut Emitter) -> Result<A> {
        let i = self.index;
        let mut x = em.emit(HookPoint::ResidPre(i), x)?;
        let h = x.norm(&self.attn_norm)?;
        let qkv = h.linear(&self.attn.qkv)?;
        let z = A::attend(qkv, &mut self.attn, step)?;
        let z = em.emit(HookPoint::AttnZ(i), z)?;
        let mut o = z.linear(&self.attn.o)?;
        if let Some(n) = &self.post_attn_norm {
            o = o.norm(n)?;
        }
        let o = em.emit(HookPoint::AttnOut(i), o)?;
        x.add(&o)?;
        x = em.emit(HookPoint::ResidMid(i), x)?;
        let h = if em.has(HookPoint::MlpIn(i)) {
            em.emit(HookPoint::MlpIn(i), x.duplicate()?)?
                .norm(&self.ffn_norm)?
        } else {
            x.norm(&self.ffn_norm)?
        };
        let h = em.emit(HookPoint::Ln2Normalized(i), h)?;
        let mut m = h.mlp(&self.mlp)?;
        if let Some(n) = &self.post_ffn_norm {
            m = m.norm(n)?;
        }
        let m = em.emit(HookPoint::MlpOut(i), m)?;
        x.add(&m)?;
        em.emit(HookPoint::ResidPost(i), x)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.attn_norm.bytes()
            + self.attn.bytes()
            + self.post_attn_norm.as_ref().map_or(0, |n| n.bytes())
            + self.ffn_norm.bytes()
            + self.mlp.bytes()
            + self.post_ffn_norm.as_ref().map_or(0, |n| n.bytes())
    }
}

/// What the attention core of one forward call needs besides its inputs.
pub(crate) struct Step<'a> {
    pub b: usize,
    pub t: usize,
    pub start: usize,
    /// Left padding per row (the plain-row path).
    pub pads: Option<&'a [usize]>,
    /// The layer's mask (tensor path).
    pub mask: Option<&'a Tensor>,
}

/// Calls the hooks at a hook point, building a tensor only when the point has hooks.
pub(crate) struct Emitter<'a> {
    hooks: &'a mut Hooks,
    ctx: &'a HookContext,
    b: usize,
    t: usize,
    on: bool,
}

impl<'a> Emitter<'a> {
    pub(crate) fn new(hooks: &'a mut Hooks, ctx: &'a HookContext, b: usize, t: usize) -> Self {
        let on = !hooks.is_empty();
        Emitter {
            hooks,
            ctx,
            b,
            t,
            on,
        }
    }

    pub(crate) fn has(&self, p: HookPoint) -> bool {
        self.on && self.hooks.has(&p)
    }

    /// The activation after the hooks at `p` (itself when there are none).
    pub(crate) fn emit<A: Acts>(&mut self, p: HookPoint, x: A) -> Result<A> {
        if !self.has(p) {
            return Ok(x);
        }
        let t = x.into_tensor(self.b, self.t)?;
        let t = self.hooks.run(p, t, self.ctx)?;
        A::from_tensor(t, self.b * self.t)
    }
}

/// Activations of `n = b·t` positions: what a [`Block`] needs of them.
pub(crate) trait Acts: Sized {
    fn norm(&self, n: &RmsNorm) -> Result<Self>;
    fn linear(&self, w: &Linear) -> Result<Self>;
    fn mlp(&self, m: &Mlp) -> Result<Self>;
    fn add(&mut self, o: &Self) -> Result<()>;
    fn duplicate(&self) -> Result<Self>;
    /// The attention core: `qkv` → `z`.
    fn attend(qkv: Self, attn: &mut Attention, step: &Step) -> Result<Self>;
    /// `[b, t, width]`.
    fn into_tensor(self, b: usize, t: usize) -> Result<Tensor>;
    fn from_tensor(t: Tensor, n: usize) -> Result<Self>;
}

/// Activations as a candle tensor `[n, width]` (f32, any device).
pub(crate) struct TensorActs(pub Tensor);

impl Acts for TensorActs {
    fn norm(&self, n: &RmsNorm) -> Result<Self> {
        Ok(TensorActs(n.forward(&self.0)?))
    }
    fn linear(&self, w: &Linear) -> Result<Self> {
        Ok(TensorActs(w.forward(&self.0)?))
    }
    fn mlp(&self, m: &Mlp) -> Result<Self> {
        Ok(TensorActs(m.forward(&self.0)?))
    }
    fn add(&mut self, o: &Self) -> Result<()> {
        self.0 = (&self.0 + &o.0)?;
        Ok(())
    }
    fn duplicate(&self) -> Result<Self> {
        Ok(TensorActs(self.0.clone()))
    }
    fn attend(qkv: Self, attn: &mut Attention, step: &Step) -> Result<Self> {
        Ok(TensorActs(attn.core_tensor(
            qkv.0, step.b, step.t, step.start, step.mask,
        )?))
    }
    fn into_tensor(self, b: usize, t: usize) -> Result<Tensor> {
        let w = self.0.dim(1)?;
        Ok(self.0.reshape((b, t, w))?)
    }
    fn from_tensor(t: Tensor, n: usize) -> Result<Self> {
        let w = t.elem_count() / n.max(1);
        Ok(TensorActs(t.to_dtype(DType::F32)?.reshape((n, w))?))
    }
}

/// Activations as plain f32 rows `[n, width]`, `n = b·t` (every forward pass on the CPU).
/// A dropped one gives its buffer back to [`super::scratch`].
pub(crate) struct RowActs {
    pub v: Vec<f32>,
    pub n: usize,
}

impl Drop for RowActs {
    fn drop(&mut self) {
        super::scratch::recycle(std::mem::take(&mut self.v));
    }
}

impl Acts for RowActs {
    fn norm(&self, n: &RmsNorm) -> Result<Self> {
        Ok(RowActs {
            v: n.rows(&self.v),
            n: self.n,
        })
    }
    fn linear(&self, w: &Linear) -> Result<Self> {
        Ok(RowActs {
            v: w.rows(&self.v, self.n)?,
            n: self.n,
        })
    }
    fn mlp(&self, m: &Mlp) -> Result<Self> {
        Ok(RowActs {
            v: m.rows(&self.v, self.n)?,
            n: self.n,
        })
    }
    fn add(&mut self, o: &Self) -> Result<()> {
        if o.v.len() != self.v.len() {
            return Err(Error::Invalid("residual add: widths differ".into()));
        }
        use rayon::prelude::*;
        // Blocks of 16 Ki values in parallel (the same sums in any order of blocks); a
        // decode step's row is one block, added on this thread.
        self.v
            .par_chunks_mut(1 << 14)
            .zip(o.v.par_chunks(1 << 14))
            .for_each(|(x, a)| {
                for (x, a) in x.iter_mut().zip(a) {
                    *x += a;
                }
            });
        Ok(())
    }
    fn duplicate(&self) -> Result<Self> {
        Ok(RowActs {
            v: super::scratch::copy(&self.v),
            n: self.n,
        })
    }
    fn attend(mut qkv: Self, attn: &mut Attention, step: &Step) -> Result<Self> {
        let z = attn.core_rows(&mut qkv.v, step.b, step.t, step.start, step.pads)?;
        Ok(RowActs { v: z, n: qkv.n })
    }
    fn into_tensor(mut self, b: usize, t: usize) -> Result<Tensor> {
        let w = self.v.len() / self.n.max(1);
        let v = std::mem::take(&mut self.v);
        Ok(Tensor::from_vec(v, (b, t, w), &Device::Cpu)?)
    }
    fn from_tensor(t: Tensor, n: usize) -> Result<Self> {
        Ok(RowActs {
            v: t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decode step's RMSNorm: against an f64 evaluation of candle's formula, and
    /// several rows at once give the same bits as one row at a time.
    #[test]
    fn rms_norm_rows_matches_formula() {
        let d = 40;
        let rows = 11;
        let x: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
            .collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let eps = 1e-5;
        let all = rms_norm_rows(&x, &w, eps);
        for (r, row) in x.chunks_exact(d).enumerate() {
            let one = rms_norm_rows(row, &w, eps);
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let m = (ms + eps as f64).sqrt();
            for i in 0..d {
                let got = all[r * d + i];
                assert_eq!(got.to_bits(), one[i].to_bits(), "row {r} col {i}");
                let want = row[i] as f64 / m * w[i] as f64;
                assert!(
                    (got as f64 - want).abs() < 1e-5,
                    "row {r} col {i}: {got} vs {want}"
                );
            }
        }
    }

    /// PyTorch's tanh GELU at hand-computed points.
    #[test]
    fn gelu_tanh_values() -> crate::TestResult {
        // gelu_tanh(1) = 0.5·(1 + tanh(0.7978846·1.044715)) = 0.8411920.
        // gelu_tanh(-2) = -2·0.5·(1 + tanh(0.7978846·(-2.35772))) = -0.0454023.
        let g = [1.0f32, -2.0, 0.0];
        let mut out = [0f32; 3];
        gelu_tanh_mul(&g, &[1.0, 1.0, 5.0], &mut out);
        assert!((out[0] - 0.841_192).abs() < 1e-5, "{}", out[0]);
        assert!((out[1] + 0.045_402_3).abs() < 1e-5, "{}", out[1]);
        assert_eq!(out[2], 0.0);
        // candle's `gelu` is the same approximation (the tensor path uses it).
        let t = Tensor::new(&g, &Device::Cpu)?.gelu()?;
        let t = t.to_vec1::<f32>()?;
        assert!((t[0] - out[0]).abs() < 1e-6 && (t[1] - out[1]).abs() < 1e-6);
        Ok(())
    }

    /// The mask: future keys, the window (`q − k ≥ w`) and left padding.
    #[test]
    fn causal_mask_window_and_padding() -> crate::TestResult {
        let m = causal_mask(3, 2, Some(2), Some(&[0, 1]), &Device::Cpu)?
            .ok_or("windowed and padded: a mask")?;
        assert_eq!(m.dims(), &[2, 1, 1, 3, 5]);
        let v = m.flatten_all()?.to_vec1::<f32>()?;
        let ok = |x: f32| if x == 0.0 { 1 } else { 0 };
        let rows: Vec<Vec<i32>> = v
            .chunks(5)
            .map(|r| r.iter().map(|&x| ok(x)).collect())
            .collect();
        // Row 0 (no padding): query 2 sees 1, 2; query 3 sees 2, 3; query 4 sees 3, 4.
        assert_eq!(rows[0], vec![0, 1, 1, 0, 0]);
        assert_eq!(rows[1], vec![0, 0, 1, 1, 0]);
        assert_eq!(rows[2], vec![0, 0, 0, 1, 1]);
        // Row 1 (position 0 is padding): the same here, the window already excludes it.
        assert_eq!(rows[3], vec![0, 1, 1, 0, 0]);
        assert!(causal_mask(1, 5, None, None, &Device::Cpu)?.is_none());
        assert!(causal_mask(1, 5, Some(8), None, &Device::Cpu)?.is_none());
        assert!(causal_mask(1, 8, Some(8), None, &Device::Cpu)?.is_some());
        Ok(())
    }
}
