//! The Llama family (SmolLM2, Llama 2/3.x, …): RMSNorm, RoPE, grouped-query
//! attention, SwiGLU MLP, tied or untied LM head, causal mask, KV cache; loaded
//! from GGUF or an HF directory (`config.json` + memory-mapped `*.safetensors`), with
//! dense (dequantized) or block-quantized weights ([`WeightFormat`]).
//!
//! RoPE: GGUF files store Q/K weights permuted for the interleaved convention
//! (pairs `x[2i], x[2i+1]`, llama.cpp's `rope_norm`); HF safetensors keep the
//! rotate-half convention (pairs `x[i], x[i + d/2]`). The loader picks the right
//! one; [`LoadOptions::rope_style`] overrides it (only useful to show that the
//! other one is wrong).
//!
//! Projections are fused (QKV, gate/up). Prefill runs candle ops (its `gemm` for dense
//! weights); a decode step (`t = 1` on the CPU) runs on plain slices: RMSNorm, the
//! projections, attention over the KV cache (query heads in parallel), SwiGLU and the
//! residual adds, with a tensor built only at hook points that have hooks. Grouped-query
//! attention never copies K/V per query head.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use super::linear::Weight;
use super::HookedModel;
use crate::hooks::{HookContext, HookPoint, Hooks, Phase};
use crate::io::TensorFile;
use crate::kernels::quant::{QMatrix, QType};
use crate::{Error, Result};

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i+1])`: GGUF's permuted Q/K weights (llama.cpp `rope_norm`).
    Interleaved,
    /// Pairs `(x[i], x[i + d/2])`: HF transformers' `rotate_half`.
    Half,
}

/// Llama-3 RoPE frequency scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// `factor`.
    pub factor: f32,
    /// `low_freq_factor`.
    pub low_freq_factor: f32,
    /// `high_freq_factor`.
    pub high_freq_factor: f32,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: usize,
}

/// Hyper-parameters of a Llama model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Residual width (`hidden_size`).
    pub d_model: usize,
    /// Number of decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// MLP hidden width (`intermediate_size`).
    pub d_ff: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Llama-3 RoPE scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Context length.
    pub max_seq_len: usize,
    /// RoPE pairing convention.
    pub rope_style: RopeStyle,
}

impl LlamaConfig {
    fn check(&self) -> Result<()> {
        let c = self;
        if c.d_model == 0
            || c.n_layers == 0
            || c.n_heads == 0
            || c.n_kv_heads == 0
            || c.head_dim == 0
            || c.d_ff == 0
            || c.vocab_size == 0
            || c.max_seq_len == 0
        {
            return Err(Error::Invalid(format!(
                "invalid Llama config: every size must be positive: {c:?}"
            )));
        }
        if !c.n_heads.is_multiple_of(c.n_kv_heads) {
            return Err(Error::Invalid(format!(
                "invalid Llama config: {} query heads are not a multiple of {} key/value heads",
                c.n_heads, c.n_kv_heads
            )));
        }
        if !c.head_dim.is_multiple_of(2) {
            return Err(Error::Invalid(format!(
                "invalid Llama config: head_dim = {} must be even for RoPE",
                c.head_dim
            )));
        }
        Ok(())
    }

    /// RoPE inverse frequencies, with Llama-3 scaling applied.
    fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1f32 / self.rope_theta.powf(i as f32 / d as f32))
            .collect();
        let Some(s) = self.rope_scaling else {
            return base;
        };
        let old = s.original_max_position_embeddings as f32;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }
}

/// How the weight matrices are kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Dense tensors of [`LoadOptions::dtype`] (GGUF blocks are dequantized at load).
    /// The reference format: logits match candle-transformers' dequantized model.
    #[default]
    Dense,
    /// GGUF block formats, CPU only (see [`crate::kernels::quant`]): `Q4_1` and `Q8_0`
    /// tensors stay as stored; any other tensor (other GGUF types, safetensors) is
    /// quantized to `Q8_0` at load. Activations are quantized to 8 bits per block of 32
    /// for each product, as llama.cpp does: the fastest decode; next-token distributions
    /// stay within ~0.01 nats (KL) of the dense model's, single logits within ~1–4.
    /// Needs every matrix's input width to be a multiple of 32.
    Quantized,
}

/// Options for loading a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The dtype the weight matrices are kept in (`F32`, `F16` or `BF16`) with
    /// [`WeightFormat::Dense`]; norms stay f32 and every activation is f32. Default `F32`.
    /// A product with `BF16` weights rounds its input to bf16 first, as a bf16 PyTorch
    /// model does (each product of two bf16 values is exact, the sums are f32): on CPUs
    /// with AVX512-BF16 it then runs as `vdpbf16ps`, which makes a batched decode step
    /// about half as costly as with `F16` weights.
    pub dtype: DType,
    /// Dense (default) or block-quantized weight matrices.
    pub weights: WeightFormat,
    /// Override the RoPE convention (default: interleaved for GGUF, rotate-half for HF).
    pub rope_style: Option<RopeStyle>,
    /// Cap the context length (saves the RoPE tables of 128k-context models).
    pub max_seq_len: Option<usize>,
    /// The dtype the KV cache stores past positions in: `F32` (default: exact, the
    /// reference's numbers), or `F16`/`BF16` (half the cache memory and half the
    /// attention reads of a long or batched decode, as llama.cpp's default f16 cache).
    /// Attention computes in f32 either way, and a forward pass always uses its own
    /// positions' keys and values unrounded, so a prefill from position 0 is the same in
    /// every cache dtype; only later steps see past positions rounded.
    pub kv_cache: DType,
    /// Device.
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            weights: WeightFormat::Dense,
            rope_style: None,
            max_seq_len: None,
            kv_cache: DType::F32,
            device: Device::Cpu,
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    /// The norm weights as vectors (the decode step's slices).
    attn_norm_v: Vec<f32>,
    ffn_norm_v: Vec<f32>,
    /// `[(n_heads + 2 n_kv_heads) · head_dim, d_model]`: q, k, v stacked.
    wqkv: Weight,
    /// `[d_model, n_heads · head_dim]`.
    wo: Weight,
    ffn_norm: Tensor,
    /// `[2 d_ff, d_model]`: gate, up stacked.
    w_gate_up: Weight,
    /// `[d_model, d_ff]`.
    w_down: Weight,
    /// Preallocated `[batch, n_kv_heads, capacity, head_dim]` buffers, filled up to the
    /// model's `cache_len` (no copy of the whole cache per decode step).
    k_cache: Option<Tensor>,
    v_cache: Option<Tensor>,
}

/// One decode step of attention on the CPU (`t = 1`), fused: RoPE on q and k (in place
/// in `qkv`), the K/V append, scores, softmax and the weighted sum of values in one pass
/// over the cache, query heads in parallel. `qkv [b, (n_heads + 2 n_kv_heads)·hd]`;
/// returns `y [b, n_heads·hd]` and the updated cache buffers. Same arithmetic as the
/// general path (f32 throughout).
fn decode_attention(
    c: &LlamaConfig,
    (cos_t, sin_t): (&[f32], &[f32]),
    (kc, vc, kv): (&Option<Tensor>, &Option<Tensor>, DType),
    v: &mut [f32],
    b: usize,
    pos: usize,
    pads: Option<&[usize]>,
) -> Result<(Vec<f32>, Option<Tensor>, Option<Tensor>)> {
    let (nh, kvh, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
    let half = hd / 2;
    let w = (nh + 2 * kvh) * hd;
    if v.len() != b * w {
        return Err(Error::Invalid(format!(
            "decode attention: {} q/k/v values for a batch of {b}",
            v.len()
        )));
    }
    let (cos, sin) = match (
        cos_t.get(pos * half..(pos + 1) * half),
        sin_t.get(pos * half..(pos + 1) * half),
    ) {
        (Some(c), Some(s)) => (c, s),
        _ => {
            return Err(Error::Invalid(format!(
                "position {pos} beyond the RoPE tables"
            )))
        }
    };
    // RoPE on the q and k heads, in place.
    for row in v.chunks_mut(w) {
        for head in row[..(nh + kvh) * hd].chunks_mut(hd) {
            match c.rope_style {
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
    }
    let v: &[f32] = v;
    let gather = |off: usize| -> Vec<f32> {
        v.chunks(w)
            .flat_map(|row| row[off..off + kvh * hd].iter().copied())
            .collect()
    };
    let dev = Device::Cpu;
    let k_new = Tensor::from_vec(gather(nh * hd), (b, kvh, 1, hd), &dev)?;
    let v_new = Tensor::from_vec(gather((nh + kvh) * hd), (b, kvh, 1, hd), &dev)?;
    let (mut kb, mut vb) = (kc.clone(), vc.clone());
    append_kv(&mut kb, &k_new, pos, c.max_seq_len, kv)?;
    append_kv(&mut vb, &v_new, pos, c.max_seq_len, kv)?;
    let (Some(kt), Some(vt)) = (&kb, &vb) else {
        return Err(Error::Invalid("KV cache buffer missing".into()));
    };
    let cap = kt.dim(2)?;
    let mut y = vec![0f32; b * nh * hd];
    {
        use candle_core::{CpuStorage as C, Storage as S};
        let (ks, kl) = kt.storage_and_layout();
        let (vs, vl) = vt.storage_and_layout();
        let (ko, vo) = (kl.start_offset(), vl.start_offset());
        let at = Attend {
            c,
            qkv: v,
            b,
            pos,
            cap,
            pads,
        };
        match (&*ks, &*vs) {
            (S::Cpu(C::F32(k)), S::Cpu(C::F32(v))) => at.run(&k[ko..], &v[vo..], &mut y)?,
            (S::Cpu(C::F16(k)), S::Cpu(C::F16(v))) => at.run(&k[ko..], &v[vo..], &mut y)?,
            (S::Cpu(C::BF16(k)), S::Cpu(C::BF16(v))) => at.run(&k[ko..], &v[vo..], &mut y)?,
            _ => return Err(Error::Invalid("KV cache is not on the CPU".into())),
        }
    }
    Ok((y, kb, vb))
}

/// The scores, softmax and weighted sum of one decode step, over a KV cache of element
/// type `T` (see [`decode_attention`]).
struct Attend<'a> {
    c: &'a LlamaConfig,
    /// `[b, (n_heads + 2 n_kv_heads)·hd]`, after RoPE.
    qkv: &'a [f32],
    b: usize,
    pos: usize,
    /// The cache buffers' capacity (positions per row and head).
    cap: usize,
    pads: Option<&'a [usize]>,
}

impl Attend<'_> {
    /// `y [b, n_heads·hd]`. Positions before `pos` come from the cache buffers
    /// `[b, kvh, cap, hd]`; position `pos` from `qkv`, unrounded (its K and V are already
    /// in the cache too, possibly rounded, for the next steps).
    fn run<T: crate::kernels::simd::Elem>(
        &self,
        kbuf: &[T],
        vbuf: &[T],
        y: &mut [f32],
    ) -> Result<()> {
        use crate::kernels::simd::{axpy_rows, dot_rows, scale_max, softmax_exp};
        use rayon::prelude::*;
        let c = self.c;
        let (nh, kvh, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let (b, pos, cap) = (self.b, self.pos, self.cap);
        let w = (nh + 2 * kvh) * hd;
        let total = pos + 1;
        let rep = nh / kvh;
        let scale = 1.0 / (hd as f32).sqrt();
        if kbuf.len() < b * kvh * cap * hd || vbuf.len() < b * kvh * cap * hd || cap < total {
            return Err(Error::Invalid("KV cache buffer too small".into()));
        }
        if self.qkv.len() < b * w || y.len() < b * nh * hd {
            return Err(Error::Invalid("decode attention: buffer sizes".into()));
        }
        let qkv = self.qkv;
        // Output heads `h0..h0 + outs.len() / hd` of batch row `bi`, all in one KV group:
        // they read the same K and V rows one after another, while those are in cache.
        let heads = |bi: usize, h0: usize, outs: &mut [f32]| {
            let g = h0 / rep;
            let pad = self
                .pads
                .and_then(|p| p.get(bi).copied())
                .unwrap_or(0)
                .min(pos);
            let base = (bi * kvh + g) * cap * hd;
            // The past positions pad..pos, as cached.
            let kh = &kbuf[base + pad * hd..base + pos * hd];
            let vh = &vbuf[base + pad * hd..base + pos * hd];
            let row = &qkv[bi * w..(bi + 1) * w];
            let k_cur = &row[(nh + g) * hd..(nh + g + 1) * hd];
            let v_cur = &row[(nh + kvh + g) * hd..(nh + kvh + g + 1) * hd];
            let n = pos - pad;
            let mut scores = vec![0f32; n + 1];
            for (r, out) in outs.chunks_exact_mut(hd).enumerate() {
                let h = h0 + r;
                let q = &row[h * hd..(h + 1) * hd];
                dot_rows(q, kh, hd, &mut scores[..n]);
                dot_rows(q, k_cur, hd, &mut scores[n..]);
                let max = scale_max(&mut scores, scale);
                // Weights below e^-80 (relative to the largest) are dropped (see
                // `SOFTMAX_CUTOFF`).
                let sum = softmax_exp(&mut scores, max);
                for s in &mut scores {
                    *s /= sum;
                }
                axpy_rows(out, &scores[..n], vh);
                axpy_rows(out, &scores[n..], v_cur);
            }
        };
        // One task per (row, KV head); when that gives too few tasks to keep every
        // thread busy (one prompt: 3 KV heads on 2 threads), one per query head. Each
        // head's arithmetic is the same either way. Short caches are not worth a hop.
        let threads = rayon::current_num_threads();
        if total < 64 || b * kvh >= 2 * threads {
            let min = if total < 64 { kvh } else { 1 };
            y.par_chunks_mut(rep * hd)
                .take(b * kvh)
                .with_min_len(min)
                .enumerate()
                .for_each(|(idx, outs)| heads(idx / kvh, (idx % kvh) * rep, outs));
        } else {
            y.par_chunks_mut(hd)
                .take(b * nh)
                .enumerate()
                .for_each(|(idx, out)| heads(idx / nh, idx % nh, out));
        }
        Ok(())
    }
}

/// RMSNorm of each `w.len()`-wide row of `x` (candle's formula: `x / sqrt(mean(x²) + eps) · w`).
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len().max(1);
    let mut out = vec![0f32; x.len()];
    // Up to 8 rows at once: each row's sum of squares is still added in column order
    // (the same result as row by row), but the rows' add chains interleave instead of
    // waiting on one another's latency.
    for (oc, xc) in out.chunks_mut(8 * d).zip(x.chunks(8 * d)) {
        let mut ss = [0f32; 8];
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
        for ((o, r), s) in oc.chunks_exact_mut(d).zip(rows).zip(ss) {
            let m = (s / d as f32 + eps).sqrt();
            for ((o, &v), &g) in o.iter_mut().zip(*r).zip(w) {
                *o = v / m * g;
            }
        }
    }
    out
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
    let cap = match buf {
        Some(x) if start > 0 => x.dim(2)?,
        _ => 0,
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
/// time, which showed in every decode step); both round to nearest even.
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

/// [`append_kv`] for a forward pass of several positions: also returns every position
/// `[b, h, start + t, hd]` in f32, the cached past as stored and `new` unrounded.
fn append_kv_all(
    buf: &mut Option<Tensor>,
    new: &Tensor,
    start: usize,
    max_len: usize,
    kv: DType,
) -> Result<Tensor> {
    append_kv(buf, new, start, max_len, kv)?;
    let x = buf
        .as_ref()
        .ok_or_else(|| Error::Invalid("KV cache buffer missing".into()))?;
    if kv == new.dtype() {
        Ok(x.narrow(2, 0, start + new.dim(2)?)?)
    } else if start == 0 {
        Ok(new.clone())
    } else {
        let past = x.narrow(2, 0, start)?.to_dtype(new.dtype())?;
        Ok(Tensor::cat(&[&past, new], 2)?)
    }
}

/// A Llama model with TransformerLens hook points.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Weight,
    layers: Vec<Layer>,
    norm: Tensor,
    norm_v: Vec<f32>,
    /// `None`: tied to the embedding.
    lm_head: Option<Weight>,
    cos: Tensor,
    sin: Tensor,
    /// The same tables as flat vectors `[max_seq_len, head_dim / 2]` (fused decode path).
    cos_v: Vec<f32>,
    sin_v: Vec<f32>,
    cache_len: usize,
    /// What the KV cache stores (see [`LoadOptions::kv_cache`]).
    kv_dtype: DType,
    device: Device,
    /// Where the model came from (for messages).
    source: String,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("source", &self.source)
            .field("config", &self.cfg)
            .field("dtype", &self.dtype())
            .finish()
    }
}

fn gguf_err(path: &Path, e: candle_core::Error) -> Error {
    Error::format_candle("gguf", e).in_file(path)
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| Error::format("gguf", format!("missing metadata key `{key}`")))
}

fn md_usize(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = md(ct, key)?;
    let n = match v {
        gguf_file::Value::U64(n) => *n,
        gguf_file::Value::I64(n) if *n >= 0 => *n as u64,
        v => v
            .to_u32()
            .map(u64::from)
            .or_else(|_| v.to_i32().map(|n| n.max(0) as u64))
            .map_err(|_| {
                Error::format("gguf", format!("metadata `{key}` is not an integer: {v:?}"))
            })?,
    };
    usize::try_from(n)
        .map_err(|_| Error::format("gguf", format!("metadata `{key}` = {n} too large")))
}

fn md_f32(ct: &gguf_file::Content, key: &str) -> Result<Option<f32>> {
    match ct.metadata.get(key) {
        None => Ok(None),
        Some(v) => match v {
            gguf_file::Value::F32(x) => Ok(Some(*x)),
            gguf_file::Value::F64(x) => Ok(Some(*x as f32)),
            v => Err(Error::format(
                "gguf",
                format!("metadata `{key}` is not a float: {v:?}"),
            )),
        },
    }
}

fn check_shape(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::Shape {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// Source of named weight tensors (GGUF or safetensors), already in candle order `[out, in]`.
trait WeightSource {
    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>>;
    /// The matrix in a block format: `Q8_0` unless the source stores blocks already.
    fn get_quant(&mut self, name: &str) -> Result<Option<QMatrix>> {
        let Some(t) = self.get(name, DType::F32)? else {
            return Ok(None);
        };
        quantize_tensor(name, &t, QType::Q8_0).map(Some)
    }
    fn need(&mut self, name: &str, dtype: DType) -> Result<Tensor> {
        self.get(name, dtype)?.ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })
    }
}

/// `t [rows, cols]` quantized to `ty`; errors name the tensor.
fn quantize_tensor(name: &str, t: &Tensor, ty: QType) -> Result<QMatrix> {
    let (r, c) = t.dims2()?;
    if c % crate::kernels::quant::QK != 0 {
        return Err(Error::Invalid(format!(
            "tensor `{name}` [{r}, {c}]: the quantized weight format needs rows of a multiple of 32 (use the dense format)"
        )));
    }
    QMatrix::quantize(
        ty,
        r,
        c,
        &t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
    )
}

struct GgufSource<'a> {
    ct: &'a gguf_file::Content,
    file: std::io::BufReader<std::fs::File>,
    path: PathBuf,
    device: Device,
}

impl WeightSource for GgufSource<'_> {
    fn get_quant(&mut self, name: &str) -> Result<Option<QMatrix>> {
        if !self.ct.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let q = self
            .ct
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| gguf_err(&self.path, e))?;
        use candle_core::quantized::GgmlDType as G;
        let ty = match q.dtype() {
            G::Q4_1 => QType::Q4_1,
            G::Q8_0 => QType::Q8_0,
            _ => {
                let t = q
                    .dequantize(&Device::Cpu)
                    .map_err(|e| gguf_err(&self.path, e))?;
                return quantize_tensor(name, &t, QType::Q8_0).map(Some);
            }
        };
        let (rows, cols) = q.shape().dims2()?;
        let data = q.data().map_err(|e| gguf_err(&self.path, e))?;
        QMatrix::from_gguf(ty, rows, cols, &data, name).map(Some)
    }

    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        if !self.ct.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let q = self
            .ct
            .tensor(&mut self.file, name, &self.device)
            .map_err(|e| gguf_err(&self.path, e))?;
        let t = match dtype {
            DType::F16 => q.dequantize_f16(&self.device),
            _ => q.dequantize(&self.device),
        }
        .map_err(|e| gguf_err(&self.path, e))?;
        Ok(Some(if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        }))
    }
}

struct StSource {
    files: Vec<TensorFile>,
    index: HashMap<String, usize>,
    device: Device,
}

impl WeightSource for StSource {
    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let f = &self.files[i];
        let t = f
            .load(name, &self.device)
            .map_err(|e| e.in_file(f.path()))?;
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => {}
            other => {
                return Err(Error::Dtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                }
                .in_file(f.path()))
            }
        }
        Ok(Some(if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        }))
    }
}

impl Llama {
    /// Load from a GGUF file or an HF directory (`config.json` + `*.safetensors`).
    pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            Self::from_hf_dir(path, opts)
        } else {
            Self::from_gguf(path, opts)
        }
    }

    /// Load a Llama GGUF (v2/v3; any quantization candle reads), dequantizing the
    /// weights to `opts.dtype` (f32 or f16).
    pub fn from_gguf(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        let (ct, reader) = super::gguf::open(path)?;
        let wrap = |e: Error| e.in_file(path);
        let arch = md(&ct, "general.architecture")
            .and_then(|v| {
                v.to_string()
                    .map(|s| s.to_string())
                    .map_err(|e| Error::format_candle("gguf", e))
            })
            .map_err(wrap)?;
        if arch != "llama" {
            return Err(Error::Invalid(format!(
                "unsupported model architecture `{arch}` (supported: llama)"
            ))
            .in_file(path));
        }
        let g = |k: &str| md_usize(&ct, &format!("llama.{k}")).map_err(wrap);
        let d_model = g("embedding_length")?;
        let n_heads = g("attention.head_count")?;
        let n_kv_heads = g("attention.head_count_kv")?;
        let head_dim = match md_usize(&ct, "llama.attention.key_length") {
            Ok(k) => k,
            Err(_) => d_model / n_heads.max(1),
        };
        let vocab_size = match md_usize(&ct, "llama.vocab_size") {
            Ok(v) => v,
            Err(_) => ct
                .tensor_infos
                .get("token_embd.weight")
                .and_then(|t| t.shape.dims().first().copied())
                .ok_or_else(|| Error::MissingTensor {
                    name: "token_embd.weight".into(),
                })
                .map_err(wrap)?,
        };
        let cfg = LlamaConfig {
            d_model,
            n_layers: g("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff: g("feed_forward_length")?,
            vocab_size,
            rms_eps: md_f32(&ct, "llama.attention.layer_norm_rms_epsilon")
                .map_err(wrap)?
                .unwrap_or(1e-5) as f64,
            rope_theta: md_f32(&ct, "llama.rope.freq_base")
                .map_err(wrap)?
                .unwrap_or(10000.0),
            rope_scaling: None,
            max_seq_len: g("context_length")?,
            rope_style: RopeStyle::Interleaved,
        };
        let mut src = GgufSource {
            ct: &ct,
            file: reader,
            path: path.to_path_buf(),
            device: opts.device.clone(),
        };
        let names = Names {
            embed: "token_embd.weight".into(),
            norm: "output_norm.weight".into(),
            lm_head: "output.weight".into(),
            layer: |i, w| {
                let n = match w {
                    "attn_norm" => "attn_norm",
                    "q" => "attn_q",
                    "k" => "attn_k",
                    "v" => "attn_v",
                    "o" => "attn_output",
                    "ffn_norm" => "ffn_norm",
                    "gate" => "ffn_gate",
                    "up" => "ffn_up",
                    _ => "ffn_down",
                };
                format!("blk.{i}.{n}.weight")
            },
        };
        Self::build(cfg, &mut src, &names, opts, path.display().to_string()).map_err(wrap)
    }

    /// Load an HF Llama checkpoint directory: `config.json` and one or more
    /// `*.safetensors` files (memory-mapped; f32, f16 or bf16).
    pub fn from_hf_dir(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let cfg = hf_config(&text).map_err(|e| e.in_file(&cfg_path))?;
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(Error::UnknownFormat {
                path: dir.display().to_string(),
                why: "no *.safetensors file next to config.json".into(),
            });
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = TensorFile::open(p)?;
            for n in f.names() {
                index.insert(n.to_string(), i);
            }
            files.push(f);
        }
        let mut src = StSource {
            files,
            index,
            device: opts.device.clone(),
        };
        let names = Names {
            embed: "model.embed_tokens.weight".into(),
            norm: "model.norm.weight".into(),
            lm_head: "lm_head.weight".into(),
            layer: |i, w| {
                let n = match w {
                    "attn_norm" => "input_layernorm",
                    "q" => "self_attn.q_proj",
                    "k" => "self_attn.k_proj",
                    "v" => "self_attn.v_proj",
                    "o" => "self_attn.o_proj",
                    "ffn_norm" => "post_attention_layernorm",
                    "gate" => "mlp.gate_proj",
                    "up" => "mlp.up_proj",
                    _ => "mlp.down_proj",
                };
                format!("model.layers.{i}.{n}.weight")
            },
        };
        Self::build(cfg, &mut src, &names, opts, dir.display().to_string())
            .map_err(|e| e.in_file(dir))
    }

    fn build(
        mut cfg: LlamaConfig,
        src: &mut dyn WeightSource,
        names: &Names,
        opts: &LoadOptions,
        source: String,
    ) -> Result<Self> {
        if let Some(s) = opts.rope_style {
            cfg.rope_style = s;
        }
        if let Some(m) = opts.max_seq_len {
            cfg.max_seq_len = cfg.max_seq_len.min(m.max(1));
        }
        cfg.check()?;
        let dt = match opts.dtype {
            DType::F32 | DType::F16 | DType::BF16 => opts.dtype,
            other => {
                return Err(Error::Invalid(format!(
                    "weight dtype {other:?} not supported (use f32, f16 or bf16)"
                )))
            }
        };
        let kv_dtype = match opts.kv_cache {
            DType::F32 | DType::F16 | DType::BF16 => opts.kv_cache,
            other => {
                return Err(Error::Invalid(format!(
                    "KV cache dtype {other:?} not supported (use f32, f16 or bf16)"
                )))
            }
        };
        let quant = opts.weights == WeightFormat::Quantized;
        if quant && !opts.device.is_cpu() {
            return Err(Error::Invalid(
                "the quantized weight format runs on the CPU only".into(),
            ));
        }
        let c = &cfg;
        let (d, hd) = (c.d_model, c.head_dim);
        // A weight matrix of the given shape, dense or block-quantized.
        let matrix =
            |src: &mut dyn WeightSource, name: &str, shape: [usize; 2]| -> Result<Option<Weight>> {
                if quant {
                    let Some(q) = src.get_quant(name)? else {
                        return Ok(None);
                    };
                    let (r, cols) = q.dims();
                    if [r, cols] != shape {
                        return Err(Error::Shape {
                            name: name.to_string(),
                            expected: shape.to_vec(),
                            found: vec![r, cols],
                        });
                    }
                    Ok(Some(Weight::Quant(q)))
                } else {
                    let Some(t) = src.get(name, dt)? else {
                        return Ok(None);
                    };
                    check_shape(name, &t, &shape)?;
                    Ok(Some(Weight::Dense(t)))
                }
            };
        let need = |w: Option<Weight>, name: &str| {
            w.ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
            })
        };
        let embed = need(matrix(src, &names.embed, [c.vocab_size, d])?, &names.embed)?;
        let norm = src.need(&names.norm, DType::F32)?;
        check_shape(&names.norm, &norm, &[d])?;
        let lm_head = matrix(src, &names.lm_head, [c.vocab_size, d])?;
        // Not `with_capacity(n_layers)`: that number is a header field; each layer pushed
        // below holds tensors that exist in the file.
        let mut layers = Vec::new();
        for i in 0..c.n_layers {
            let n = |k: &str| (names.layer)(i, k);
            let w = |src: &mut dyn WeightSource, k: &str, shape: [usize; 2]| {
                need(matrix(src, &n(k), shape)?, &n(k))
            };
            let attn_norm = src.need(&n("attn_norm"), DType::F32)?;
            check_shape(&n("attn_norm"), &attn_norm, &[d])?;
            let q = w(src, "q", [c.n_heads * hd, d])?;
            let k = w(src, "k", [c.n_kv_heads * hd, d])?;
            let v = w(src, "v", [c.n_kv_heads * hd, d])?;
            let wo = w(src, "o", [d, c.n_heads * hd])?;
            let ffn_norm = src.need(&n("ffn_norm"), DType::F32)?;
            check_shape(&n("ffn_norm"), &ffn_norm, &[d])?;
            let gate = w(src, "gate", [c.d_ff, d])?;
            let up = w(src, "up", [c.d_ff, d])?;
            let w_down = w(src, "down", [d, c.d_ff])?;
            layers.push(Layer {
                attn_norm_v: attn_norm.to_vec1::<f32>()?,
                ffn_norm_v: ffn_norm.to_vec1::<f32>()?,
                attn_norm,
                wqkv: cat_rows(&[q, k, v])?,
                wo,
                ffn_norm,
                w_gate_up: cat_rows(&[gate, up])?,
                w_down,
                k_cache: None,
                v_cache: None,
            });
        }
        let inv = cfg.inv_freq();
        let half = inv.len();
        let n = cfg.max_seq_len;
        // The tables are allocated here, from two header numbers: bound them by the
        // weights actually present (the embedding), so that a tiny file claiming a huge
        // context cannot allocate gigabytes. Real models are far below this (Llama 3.1:
        // 2^23 entries against a 5·10^8-entry embedding).
        let cap = (1usize << 22).max(c.vocab_size.saturating_mul(d));
        if n.saturating_mul(half) > cap {
            return Err(Error::Invalid(format!(
                "context length {n} is too large for the RoPE tables ({n} × {half} entries, \
                 more than the embedding's {}): cap it with LoadOptions::max_seq_len",
                c.vocab_size.saturating_mul(d)
            )));
        }
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let device = opts.device.clone();
        Ok(Llama {
            cos: Tensor::from_vec(cos.clone(), (n, half), &device)?,
            sin: Tensor::from_vec(sin.clone(), (n, half), &device)?,
            cos_v: cos,
            sin_v: sin,
            cfg,
            embed,
            layers,
            norm_v: norm.to_vec1::<f32>()?,
            norm,
            lm_head,
            cache_len: 0,
            kv_dtype,
            device,
            source,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The dtype of the dense weight matrices (`U8` with [`WeightFormat::Quantized`]).
    pub fn dtype(&self) -> DType {
        match &self.embed {
            Weight::Dense(t) => t.dtype(),
            Weight::Quant(_) => DType::U8,
        }
    }

    /// How the weight matrices are kept.
    pub fn weight_format(&self) -> WeightFormat {
        match &self.embed {
            Weight::Dense(_) => WeightFormat::Dense,
            Weight::Quant(_) => WeightFormat::Quantized,
        }
    }

    /// Bytes of weights read per decode step (every matrix and norm once).
    pub fn weight_bytes(&self) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut n = b(&self.norm) + head.bytes();
        for l in &self.layers {
            n += b(&l.attn_norm)
                + l.wqkv.bytes()
                + l.wo.bytes()
                + b(&l.ffn_norm)
                + l.w_gate_up.bytes()
                + l.w_down.bytes();
        }
        // One embedding row per token; the tied head is counted once.
        n + self.embed.bytes() / self.cfg.vocab_size.max(1)
    }

    /// Number of positions in the KV cache.
    pub fn cache_len(&self) -> usize {
        self.cache_len
    }

    /// One decode step (`t = 1`) on the CPU, on plain slices: RMSNorm, the projections,
    /// fused attention over the KV cache, SwiGLU and the residual adds without candle ops;
    /// a tensor is built only at hook points that have hooks. `ids` holds one token per
    /// row; returns logits `[b, 1, vocab]`.
    fn decode_step(
        &mut self,
        ids: &[u32],
        pos: usize,
        pads: Option<&[usize]>,
        hooks: &mut Hooks,
        ctx: &HookContext,
    ) -> Result<Tensor> {
        let b = ids.len();
        let (d, ff) = (self.cfg.d_model, self.cfg.d_ff);
        let eps = self.cfg.rms_eps as f32;
        let dev = self.device.clone();
        let hooked = !hooks.is_empty();
        // A hook point on a `[b, d]` buffer: only built into a tensor when hooked.
        let mut hk = |p: HookPoint, x: Vec<f32>| -> Result<Vec<f32>> {
            if !hooked || !hooks.has(&p) {
                return Ok(x);
            }
            let t = Tensor::from_vec(x, (b, 1, d), &dev)?;
            Ok(hooks
                .run(p, t, ctx)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let ids_t = Tensor::from_slice(ids, b, &dev)?;
        let mut x = self.embed_rows(&ids_t)?.flatten_all()?.to_vec1::<f32>()?;
        x = hk(HookPoint::Embed, x)?;
        for li in 0..self.cfg.n_layers {
            x = hk(HookPoint::ResidPre(li), x)?;
            let layer = &self.layers[li];
            let h = rms_norm_rows(&x, &layer.attn_norm_v, eps);
            let mut qkv = layer.wqkv.matmul_vec(&h, b)?;
            let (y, kb, vb) = decode_attention(
                &self.cfg,
                (&self.cos_v, &self.sin_v),
                (&layer.k_cache, &layer.v_cache, self.kv_dtype),
                &mut qkv,
                b,
                pos,
                pads,
            )?;
            let attn = layer.wo.matmul_vec(&y, b)?;
            let layer = &mut self.layers[li];
            layer.k_cache = kb;
            layer.v_cache = vb;
            let attn = hk(HookPoint::AttnOut(li), attn)?;
            for (x, a) in x.iter_mut().zip(&attn) {
                *x += a;
            }
            x = hk(HookPoint::ResidMid(li), x)?;
            let layer = &self.layers[li];
            let h = rms_norm_rows(&x, &layer.ffn_norm_v, eps);
            let gu = layer.w_gate_up.matmul_vec(&h, b)?;
            let mut a = vec![0f32; b * ff];
            for (a, r) in a.chunks_exact_mut(ff).zip(gu.chunks_exact(2 * ff)) {
                let (g, u) = r.split_at(ff);
                crate::kernels::simd::silu_mul(g, u, a);
            }
            let mlp = layer.w_down.matmul_vec(&a, b)?;
            let mlp = hk(HookPoint::MlpOut(li), mlp)?;
            for (x, m) in x.iter_mut().zip(&mlp) {
                *x += m;
            }
            x = hk(HookPoint::ResidPost(li), x)?;
        }
        self.cache_len = pos + 1;
        let h = rms_norm_rows(&x, &self.norm_v, eps);
        let h = hk(HookPoint::LnFinal, h)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = head.matmul_vec(&h, b)?;
        Ok(Tensor::from_vec(
            logits,
            (b, 1, self.cfg.vocab_size),
            &self.device,
        )?)
    }

    /// Embedding rows of `ids` (u32, already checked against the vocabulary) → `[n, d]` f32.
    fn embed_rows(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.embed {
            Weight::Dense(e) => Ok(e.index_select(ids, 0)?.to_dtype(DType::F32)?),
            Weight::Quant(q) => {
                let ids = ids.to_vec1::<u32>()?;
                let d = self.cfg.d_model;
                let mut x = vec![0f32; ids.len() * d];
                for (row, &id) in x.chunks_exact_mut(d).zip(&ids) {
                    q.dequantize_row(id as usize, row)
                        .ok_or_else(|| Error::Invalid(format!("token id {id} out of range")))?;
                }
                Ok(Tensor::from_vec(x, (ids.len(), d), &self.device)?)
            }
        }
    }

    fn rope(&self, x: &Tensor, start: usize, t: usize) -> Result<Tensor> {
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        Ok(match self.cfg.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, &cos, &sin)?,
            RopeStyle::Half => candle_nn::rotary_emb::rope(x, &cos, &sin)?,
        })
    }

    fn forward_impl(
        &mut self,
        tokens: &Tensor,
        start_pos: usize,
        hooks: &mut Hooks,
        last_only: bool,
        left_pad: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2().map_err(|_| {
            Error::Invalid(format!(
                "tokens must have shape [batch, seq], got {:?}",
                tokens.dims()
            ))
        })?;
        if b == 0 || t == 0 {
            return Err(Error::Invalid(format!(
                "empty token batch of shape {:?}",
                tokens.dims()
            )));
        }
        let ids = tokens.to_dtype(DType::U32)?.flatten_all()?;
        let max_id = ids.to_vec1::<u32>()?.into_iter().max().unwrap_or(0);
        if max_id as usize >= self.cfg.vocab_size {
            return Err(Error::Invalid(format!(
                "token id {max_id} out of range: the vocabulary has {} tokens",
                self.cfg.vocab_size
            )));
        }
        if start_pos == 0 {
            self.reset();
        } else if start_pos != self.cache_len {
            return Err(Error::Invalid(format!(
                "start_pos = {start_pos} but the KV cache holds {} positions",
                self.cache_len
            )));
        }
        if start_pos + t > self.cfg.max_seq_len {
            return Err(Error::Invalid(format!(
                "sequence of {} tokens exceeds the model's context length of {} tokens",
                start_pos + t,
                self.cfg.max_seq_len
            )));
        }
        hooks.validate(self.cfg.n_layers)?;
        if let Some(p) = left_pad {
            if p.len() != b {
                return Err(Error::Invalid(format!(
                    "{} left-padding counts for a batch of {b}",
                    p.len()
                )));
            }
        }
        let pads = left_pad.filter(|p| p.iter().any(|&x| x > 0));
        let prompt_len = hooks.prompt_len();
        let ctx = HookContext {
            start_pos,
            seq_len: t,
            prompt_len,
            phase: match prompt_len {
                Some(p) if start_pos >= p && start_pos > 0 => Phase::Decode,
                _ => Phase::Prefill,
            },
        };
        if t == 1 && self.device.is_cpu() {
            let ids = ids.to_vec1::<u32>()?;
            // The whole step runs on a pool worker: its ~150 parallel sections then fork
            // from inside the pool instead of each waking the pool from outside and
            // parking this thread.
            return rayon::scope(|_| self.decode_step(&ids, start_pos, pads, hooks, &ctx));
        }
        let hooked = !hooks.is_empty();
        let mut hk = |p: HookPoint, x: Tensor| -> Result<Tensor> {
            if hooked && hooks.has(&p) {
                hooks.run(p, x, &ctx)
            } else {
                Ok(x)
            }
        };
        let c = self.cfg.clone();
        let (d, hd) = (c.d_model, c.head_dim);
        let n = b * t;

        let mut x = self.embed_rows(&ids)?.reshape((b, t, d))?;
        x = hk(HookPoint::Embed, x)?;

        let total = start_pos + t;
        // Causal mask, plus (batched prompts) the left padding of each row. A padding query
        // attends to itself only, so no row of the softmax is empty.
        let mask = if t > 1 || pads.is_some() {
            let mb = if pads.is_some() { b } else { 1 };
            let mut m = vec![0f32; mb * t * total];
            for bi in 0..mb {
                let pad = pads.and_then(|p| p.get(bi).copied()).unwrap_or(0);
                for i in 0..t {
                    let q = start_pos + i;
                    let row = &mut m[(bi * t + i) * total..(bi * t + i + 1) * total];
                    for (j, v) in row.iter_mut().enumerate() {
                        if j > q || (j < pad && j != q) {
                            *v = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            Some(Tensor::from_vec(m, (mb, 1, 1, t, total), &self.device)?)
        } else {
            None
        };
        let rep = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / (hd as f64).sqrt();

        for li in 0..c.n_layers {
            x = hk(HookPoint::ResidPre(li), x)?;
            // Attention.
            let (attn, kc, vc) = {
                let layer = &self.layers[li];
                let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps as f32)?;
                let qkv = super::linear::linear(&h.reshape((n, d))?, &layer.wqkv)?;
                let (y, kb, vb) = {
                    let q = qkv
                        .narrow(1, 0, c.n_heads * hd)?
                        .reshape((b, t, c.n_heads, hd))?
                        .transpose(1, 2)?
                        .contiguous()?;
                    let k = qkv
                        .narrow(1, c.n_heads * hd, c.n_kv_heads * hd)?
                        .reshape((b, t, c.n_kv_heads, hd))?
                        .transpose(1, 2)?
                        .contiguous()?;
                    let v = qkv
                        .narrow(1, (c.n_heads + c.n_kv_heads) * hd, c.n_kv_heads * hd)?
                        .reshape((b, t, c.n_kv_heads, hd))?
                        .transpose(1, 2)?
                        .contiguous()?;
                    let q = self.rope(&q, start_pos, t)?;
                    let k = self.rope(&k, start_pos, t)?;
                    let max = c.max_seq_len;
                    let mut kb = layer.k_cache.clone();
                    let mut vb = layer.v_cache.clone();
                    let k = append_kv_all(&mut kb, &k, start_pos, max, self.kv_dtype)?;
                    let v = append_kv_all(&mut vb, &v, start_pos, max, self.kv_dtype)?;
                    // Grouped-query attention without repeating K/V: the `rep` query heads
                    // sharing a K/V head are stacked along the row axis.
                    let q = q.reshape((b, c.n_kv_heads, rep * t, hd))?;
                    let att = (q.matmul(&k.t()?)? * scale)?;
                    let att = match &mask {
                        None => att,
                        Some(m) => att
                            .reshape((b, c.n_kv_heads, rep, t, total))?
                            .broadcast_add(m)?
                            .reshape((b, c.n_kv_heads, rep * t, total))?,
                    };
                    let att = candle_nn::ops::softmax_last_dim(&att)?;
                    let y = att
                        .matmul(&v)?
                        .reshape((b, c.n_heads, t, hd))?
                        .transpose(1, 2)?
                        .reshape((n, c.n_heads * hd))?;
                    (y, kb, vb)
                };
                let o = super::linear::linear(&y, &layer.wo)?.reshape((b, t, d))?;
                (o, kb, vb)
            };
            self.layers[li].k_cache = kc;
            self.layers[li].v_cache = vc;
            let attn = hk(HookPoint::AttnOut(li), attn)?;
            x = (x + attn)?;
            x = hk(HookPoint::ResidMid(li), x)?;
            // MLP.
            let mlp = {
                let layer = &self.layers[li];
                let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps as f32)?;
                let gu = super::linear::linear(&h.reshape((n, d))?, &layer.w_gate_up)?;
                let a = (gu.narrow(1, 0, c.d_ff)?.silu()? * gu.narrow(1, c.d_ff, c.d_ff)?)?;
                super::linear::linear(&a, &layer.w_down)?.reshape((b, t, d))?
            };
            let mlp = hk(HookPoint::MlpOut(li), mlp)?;
            x = (x + mlp)?;
            x = hk(HookPoint::ResidPost(li), x)?;
        }
        self.cache_len = total;
        let h = candle_nn::ops::rms_norm(&x, &self.norm, c.rms_eps as f32)?;
        let h = hk(HookPoint::LnFinal, h)?;
        let (h, tt) = if last_only {
            (h.narrow(1, t - 1, 1)?, 1)
        } else {
            (h, t)
        };
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = super::linear::linear(&h.reshape((b * tt, d))?, head)?;
        Ok(logits.reshape((b, tt, c.vocab_size))?)
    }
}

/// Stack weight matrices along their rows (all dense, or all quantized: mixed block
/// formats become `Q8_0`).
fn cat_rows(ws: &[Weight]) -> Result<Weight> {
    let dense: Vec<&Tensor> = ws
        .iter()
        .filter_map(|w| match w {
            Weight::Dense(t) => Some(t),
            Weight::Quant(_) => None,
        })
        .collect();
    if dense.len() == ws.len() {
        return Ok(Weight::Dense(Tensor::cat(&dense, 0)?));
    }
    let qs: Vec<&QMatrix> = ws
        .iter()
        .filter_map(|w| match w {
            Weight::Quant(q) => Some(q),
            Weight::Dense(_) => None,
        })
        .collect();
    if qs.len() != ws.len() {
        return Err(Error::Invalid(
            "cannot stack dense and quantized weights".into(),
        ));
    }
    Ok(Weight::Quant(QMatrix::cat_rows(&qs)?))
}

struct Names {
    embed: String,
    norm: String,
    lm_head: String,
    layer: fn(usize, &str) -> String,
}

fn hf_config(text: &str) -> Result<LlamaConfig> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::format("json", e.to_string()))?;
    let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
    let archs: Vec<&str> = v
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    if model_type != "llama" && !archs.contains(&"LlamaForCausalLM") {
        return Err(Error::Invalid(format!(
            "unsupported model architecture `{}` (supported: llama)",
            if model_type.is_empty() {
                archs.first().copied().unwrap_or("?")
            } else {
                model_type
            }
        )));
    }
    let u = |k: &str| -> Result<usize> {
        v.get(k)
            .and_then(|x| x.as_u64())
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| Error::Config(format!("config.json: missing integer `{k}`")))
    };
    let f = |k: &str, default: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(default);
    let d_model = u("hidden_size")?;
    let n_heads = u("num_attention_heads")?;
    let n_kv_heads = u("num_key_value_heads").unwrap_or(n_heads);
    let head_dim = u("head_dim").unwrap_or(d_model / n_heads.max(1));
    let rope_scaling = match v.get("rope_scaling") {
        Some(s) if s.is_object() => {
            let ty = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(|x| x.as_str())
                .unwrap_or("");
            match ty {
                "llama3" => {
                    let g = |k: &str| {
                        s.get(k).and_then(|x| x.as_f64()).ok_or_else(|| {
                            Error::Config(format!("config.json: rope_scaling lacks `{k}`"))
                        })
                    };
                    Some(Llama3RopeScaling {
                        factor: g("factor")? as f32,
                        low_freq_factor: g("low_freq_factor")? as f32,
                        high_freq_factor: g("high_freq_factor")? as f32,
                        original_max_position_embeddings: g("original_max_position_embeddings")?
                            as usize,
                    })
                }
                "default" | "" => None,
                other => {
                    return Err(Error::Config(format!(
                    "config.json: rope_scaling type `{other}` is not supported (supported: llama3)"
                )))
                }
            }
        }
        _ => None,
    };
    Ok(LlamaConfig {
        d_model,
        n_layers: u("num_hidden_layers")?,
        n_heads,
        n_kv_heads,
        head_dim,
        d_ff: u("intermediate_size")?,
        vocab_size: u("vocab_size")?,
        rms_eps: f("rms_norm_eps", 1e-6),
        rope_theta: f("rope_theta", 10000.0) as f32,
        rope_scaling,
        max_seq_len: u("max_position_embeddings").unwrap_or(4096),
        rope_style: RopeStyle::Half,
    })
}

impl HookedModel for Llama {
    fn forward(&mut self, tokens: &Tensor, start_pos: usize, hooks: &mut Hooks) -> Result<Tensor> {
        self.forward_impl(tokens, start_pos, hooks, false, None)
    }
    fn forward_last(
        &mut self,
        tokens: &Tensor,
        start_pos: usize,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        // Skips the LM head on all but the last position.
        Ok(self
            .forward_impl(tokens, start_pos, hooks, true, None)?
            .squeeze(1)?)
    }
    fn forward_last_padded(
        &mut self,
        tokens: &Tensor,
        start_pos: usize,
        left_pad: &[usize],
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        Ok(self
            .forward_impl(tokens, start_pos, hooks, true, Some(left_pad))?
            .squeeze(1)?)
    }
    fn d_model(&self) -> usize {
        self.cfg.d_model
    }
    fn n_layers(&self) -> usize {
        self.cfg.n_layers
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    fn max_seq_len(&self) -> usize {
        self.cfg.max_seq_len
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn reset(&mut self) {
        for l in &mut self.layers {
            l.k_cache = None;
            l.v_cache = None;
        }
        self.cache_len = 0;
    }
    fn fork_cache(&mut self, keep: usize, batch: usize) -> Result<()> {
        if batch == 0 || keep == 0 || keep > self.cache_len {
            return Err(Error::Invalid(format!(
                "fork_cache: cannot keep {keep} of {} cached positions in {batch} rows",
                self.cache_len
            )));
        }
        for l in &mut self.layers {
            for buf in [&mut l.k_cache, &mut l.v_cache] {
                let old = buf
                    .as_ref()
                    .ok_or_else(|| Error::Invalid("fork_cache: the KV cache is empty".into()))?;
                let (_, h, cap, hd) = old.dims4()?;
                let row = old.narrow(0, 0, 1)?.narrow(2, 0, keep)?;
                let fresh = Tensor::zeros((batch, h, cap, hd), old.dtype(), old.device())?;
                fresh.slice_set(&row.repeat((batch, 1, 1, 1))?.contiguous()?, 2, 0)?;
                *buf = Some(fresh);
            }
        }
        self.cache_len = keep;
        Ok(())
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

    /// Llama-3.1-8B's `config.json` RoPE settings: the three regimes of the scaling.
    #[test]
    fn llama3_rope_scaling_regimes() {
        let text = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
            "rope_theta": 500000.0, "vocab_size": 128256, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#;
        let cfg = hf_config(text).unwrap();
        assert_eq!(cfg.head_dim, 128);
        assert_eq!(cfg.n_kv_heads, 8);
        assert_eq!(cfg.rope_style, RopeStyle::Half);
        let scaled = cfg.inv_freq();
        let plain = LlamaConfig {
            rope_scaling: None,
            ..cfg.clone()
        }
        .inv_freq();
        assert_eq!(scaled.len(), 64);
        // Wavelength below 8192/4 = 2048 positions: unchanged (i = 0: f = 1).
        assert_eq!(scaled[0], 1.0);
        for i in 0..64 {
            let wavelen = 2.0 * std::f32::consts::PI / plain[i];
            if wavelen < 2048.0 {
                assert_eq!(scaled[i], plain[i], "{i}");
            } else if wavelen > 8192.0 {
                assert!((scaled[i] - plain[i] / 8.0).abs() <= 1e-6 * plain[i], "{i}");
            } else {
                assert!(scaled[i] < plain[i] && scaled[i] > plain[i] / 8.0, "{i}");
            }
        }
        // In the medium band the scaled frequency interpolates smoothly: it is continuous
        // at both band edges (ratio → 1 at 2048, → 1/8 at 8192), so it decreases with i.
        for i in 1..64 {
            assert!(scaled[i] < scaled[i - 1], "{i}");
        }
    }

    #[test]
    fn hf_config_errors() {
        let e = hf_config("{").unwrap_err().to_string();
        assert!(e.contains("json"), "{e}");
        let e = hf_config(r#"{"model_type": "llama"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let e = hf_config(
            r#"{"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
                "num_hidden_layers": 1, "intermediate_size": 4, "vocab_size": 10,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("yarn"), "{e}");
    }
}
