//! The one decoder every family runs: embeddings (optionally scaled), [`Block`]s, final
//! norm, LM head (optionally tied, optionally soft-capped), KV caches; loaded from GGUF
//! or an HF directory with dense (dequantized) or block-quantized weights
//! ([`WeightFormat`]).
//!
//! On the CPU every forward call (prefill, batched scoring, decode steps) runs the blocks
//! on plain rows: products on slices (`gemm` in f32, `vdpbf16ps` for bf16 weights, the
//! integer kernels for quantized ones), attention per query over the KV cache and the new
//! positions, a tensor built only at hook points that have hooks ([`super::layers`]).
//! Other devices run the same blocks on candle tensors.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::{LayerKind, ModelConfig};
use super::families::{self, Names, Role};
use super::layers::{
    causal_mask, Attention, AttentionSpec, Block, Emitter, KvCache, Linear, Mlp, RmsNorm, Rope,
    RowActs, Step, TensorActs,
};
use super::linear::Weight;
use super::source::{GgufSource, StSource, WeightSource};
use super::HookedModel;
use crate::hooks::{HookContext, HookPoint, Hooks, Phase};
use crate::kernels::quant::QMatrix;
use crate::{Error, FloatDtype, Result};

/// How the weight matrices are kept in memory. Parses from and prints as `dense` or
/// `quantized`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WeightFormat {
    /// Dense tensors of [`LoadOptions::dtype`]: every GGUF block type candle reads (F32,
    /// F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K…Q6_K, …) is dequantized at load,
    /// exactly as candle dequantizes it. The reference format.
    #[default]
    Dense,
    /// GGUF block formats, CPU only (see `kernels::quant`): `Q4_1` and `Q8_0` matrices stay
    /// as stored and run natively; every other matrix (Q4_0, Q5_0, Q5_1, the K-quants
    /// Q2_K…Q6_K, F16/BF16/F32, safetensors) is dequantized and requantized to `Q8_0` at
    /// load, and so are q, k and v (gate and up), which run as one matrix, when their
    /// types differ. Norms and biases stay f32.
    /// Activations are quantized to 8 bits per block of 32 for each product, as llama.cpp
    /// does: the fastest decode; next-token distributions stay within ~0.01 nats (KL) of
    /// the dense model's. Needs every matrix's input width to be a multiple of 32.
    Quantized,
}

names!(WeightFormat, "weight format", Dense => "dense", Quantized => "quantized");

/// Options for loading a model: [`LoadOptions::default`] and the `with_` methods.
///
/// ```
/// use sae_ablate::model::{LoadOptions, WeightFormat};
/// use sae_ablate::FloatDtype;
/// let opts = LoadOptions::default()
///     .with_weights(WeightFormat::Dense)
///     .with_dtype(FloatDtype::BF16)
///     .with_max_seq_len(4096);
/// assert_eq!(opts.dtype, FloatDtype::BF16);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LoadOptions {
    /// The dtype the weight matrices are kept in with [`WeightFormat::Dense`]; norms stay
    /// f32 and every activation is f32. Default `f32`.
    /// A product with `BF16` weights rounds its input to bf16 first, as a bf16 PyTorch
    /// model does (each product of two bf16 values is exact, the sums are f32): on CPUs
    /// with AVX512-BF16 it then runs as `vdpbf16ps`.
    pub dtype: FloatDtype,
    /// Dense (default) or block-quantized weight matrices.
    pub weights: WeightFormat,
    /// Override the RoPE convention (default: the family's and source's).
    pub rope_style: Option<super::RopeStyle>,
    /// Cap the context length (saves the RoPE tables of 128k-context models).
    pub max_seq_len: Option<usize>,
    /// The dtype the KV cache stores past positions in: `f32` (default: exact), or
    /// `f16`/`bf16` (half the cache memory and half the attention reads of a long or
    /// batched decode, as llama.cpp's default f16 cache). Attention computes in f32 either
    /// way, and a forward pass always uses its own positions' keys and values unrounded,
    /// so a prefill from position 0 is the same in every cache dtype.
    pub kv_cache: FloatDtype,
    /// Device.
    pub device: Device,
}

impl LoadOptions {
    /// With the dense weights' dtype.
    pub fn with_dtype(mut self, dtype: FloatDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// With dense or block-quantized weights.
    pub fn with_weights(mut self, weights: WeightFormat) -> Self {
        self.weights = weights;
        self
    }

    /// With a RoPE convention other than the family's and source's.
    pub fn with_rope_style(mut self, style: super::RopeStyle) -> Self {
        self.rope_style = Some(style);
        self
    }

    /// With the context length capped at `max_seq_len` tokens.
    pub fn with_max_seq_len(mut self, max_seq_len: usize) -> Self {
        self.max_seq_len = Some(max_seq_len);
        self
    }

    /// With the KV cache's dtype.
    pub fn with_kv_cache(mut self, dtype: FloatDtype) -> Self {
        self.kv_cache = dtype;
        self
    }

    /// On `device`.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: FloatDtype::F32,
            weights: WeightFormat::Dense,
            rope_style: None,
            max_seq_len: None,
            kv_cache: FloatDtype::F32,
            device: Device::Cpu,
        }
    }
}

/// A decoder-only transformer of any supported family, with TransformerLens hook points.
pub struct Model {
    cfg: ModelConfig,
    embed: Weight,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `None`: tied to the embedding.
    lm_head: Option<Weight>,
    cache_len: usize,
    device: Device,
    /// Run CPU passes through the tensor path too (see [`Model::set_tensor_path`]).
    tensor_path: bool,
    /// Where the model came from (for messages).
    source: String,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("source", &self.source)
            .field("config", &self.cfg)
            .field("dtype", &self.dtype())
            .finish()
    }
}

fn check_shape(name: &str, dims: &[usize], expected: &[usize]) -> Result<()> {
    if dims != expected {
        return Err(Error::Shape {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: dims.to_vec(),
        });
    }
    Ok(())
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

/// Reads a model's tensors with the shapes its config implies.
struct Loader<'a> {
    src: &'a mut dyn WeightSource,
    dtype: DType,
    quant: bool,
    /// Add 1 to norm weights (Gemma from HF).
    plus_one: bool,
    eps: f64,
}

impl Loader<'_> {
    /// A weight matrix of the given shape, dense or block-quantized; `None` if absent.
    fn matrix_opt(&mut self, name: &str, shape: [usize; 2]) -> Result<Option<Weight>> {
        if self.quant {
            let Some(q) = self.src.get_quant(name)? else {
                return Ok(None);
            };
            let (r, c) = q.dims();
            check_shape(name, &[r, c], &shape)?;
            Ok(Some(Weight::Quant(q)))
        } else {
            let Some(t) = self.src.get(name, self.dtype)? else {
                return Ok(None);
            };
            check_shape(name, t.dims(), &shape)?;
            Ok(Some(Weight::Dense(t)))
        }
    }

    fn matrix(&mut self, name: &str, shape: [usize; 2]) -> Result<Weight> {
        self.matrix_opt(name, shape)?
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
            })
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let t = self.src.need(name, DType::F32)?;
        check_shape(name, t.dims(), &[len])?;
        Ok(t)
    }

    fn norm(&mut self, name: &str, len: usize) -> Result<RmsNorm> {
        let t = self.vector(name, len)?;
        let t = if self.plus_one { (t + 1.0)? } else { t };
        RmsNorm::new(&t, self.eps)
    }
}

impl Model {
    /// Load a GGUF (v2/v3) of a supported architecture (`general.architecture`).
    pub fn from_gguf(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        let (ct, reader) = super::gguf::open(path)?;
        let cfg = families::gguf_config(&ct).map_err(|e| e.in_file(path))?;
        let mut src = GgufSource {
            ct: &ct,
            file: reader,
            path: path.to_path_buf(),
            device: opts.device.clone(),
        };
        Self::build(
            cfg,
            &mut src,
            &Names::gguf(),
            opts,
            path.display().to_string(),
        )
        .map_err(|e| e.in_file(path))
    }

    /// Load an HF checkpoint directory: `config.json` and one or more `*.safetensors`
    /// files (memory-mapped; f32, f16 or bf16).
    pub fn from_hf_dir(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let cfg = families::hf_config(&text).map_err(|e| e.in_file(&cfg_path))?;
        let mut src = StSource::open_dir(dir, &opts.device)?;
        // A multimodal checkpoint keeps its text model under another prefix.
        let layouts = [
            ("model.", "lm_head.weight"),
            ("model.language_model.", "lm_head.weight"),
            ("language_model.model.", "language_model.lm_head.weight"),
        ];
        let names = layouts
            .iter()
            .map(|(p, h)| Names::hf(cfg.family, p, h))
            .find(|n| src.has(&n.embed))
            .ok_or_else(|| Error::MissingTensor {
                name: "model.embed_tokens.weight".into(),
            })
            .map_err(|e| e.in_file(dir))?;
        Self::build(cfg, &mut src, &names, opts, dir.display().to_string())
            .map_err(|e| e.in_file(dir))
    }

    fn build(
        mut cfg: ModelConfig,
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
        let dtype = DType::from(opts.dtype);
        let quant = opts.weights == WeightFormat::Quantized;
        if quant && !opts.device.is_cpu() {
            return Err(Error::Unavailable {
                backend: "the quantized weight format".into(),
                why: format!(
                    "runs on the CPU only, not on {:?} (load it on the CPU or use the dense format)",
                    opts.device.location()
                ),
            });
        }
        let c = &cfg;
        // `validate` has checked every product below.
        let (d, hd) = (c.d_model, c.head_dim);
        let mut ld = Loader {
            plus_one: c.norm_plus_one && !src.norms_include_one(),
            src,
            dtype,
            quant,
            eps: c.rms_eps,
        };
        let embed = ld.matrix(&names.embed, [c.vocab_size, d])?;
        let norm = ld.norm(&names.norm, d)?;
        let lm_head = if c.tied_embeddings {
            None
        } else {
            // Some checkpoints declare an untied head and still leave it out.
            ld.matrix_opt(&names.lm_head, [c.vocab_size, d])?
        };
        let ropes = rope_tables(c, &opts.device)?;
        // Not `with_capacity(n_layers)`: that number is a header field; each block pushed
        // below holds tensors that exist in the file.
        let mut blocks = Vec::new();
        for (i, kind) in c.layer_kinds.iter().enumerate() {
            let n = |r: Role| names.layer(i, r);
            let attn_norm = ld.norm(&n(Role::AttnNorm), d)?;
            let q = ld.matrix(&n(Role::Q), [c.n_heads * hd, d])?;
            let k = ld.matrix(&n(Role::K), [c.n_kv_heads * hd, d])?;
            let v = ld.matrix(&n(Role::V), [c.n_kv_heads * hd, d])?;
            let qkv_rows = (c.n_heads + 2 * c.n_kv_heads) * hd;
            let bias = if c.qkv_bias {
                let b = [
                    ld.vector(&n(Role::QBias), c.n_heads * hd)?,
                    ld.vector(&n(Role::KBias), c.n_kv_heads * hd)?,
                    ld.vector(&n(Role::VBias), c.n_kv_heads * hd)?,
                ];
                Some(Tensor::cat(&b, 0)?)
            } else {
                None
            };
            let qkv = Linear::from_weight(cat_rows(&[q, k, v])?, bias, qkv_rows)?;
            let o = ld.matrix(&n(Role::O), [d, c.n_heads * hd])?;
            let o = Linear::from_weight(o, None, d)?;
            let qk_norm = if c.qk_norm {
                Some((ld.norm(&n(Role::QNorm), hd)?, ld.norm(&n(Role::KNorm), hd)?))
            } else {
                None
            };
            let post_attn = if c.post_norms {
                Some(ld.norm(&n(Role::PostAttnNorm), d)?)
            } else {
                None
            };
            let ffn_norm = ld.norm(&n(Role::FfnNorm), d)?;
            let gate = ld.matrix(&n(Role::Gate), [c.d_ff, d])?;
            let up = ld.matrix(&n(Role::Up), [c.d_ff, d])?;
            let down = ld.matrix(&n(Role::Down), [d, c.d_ff])?;
            let post_ffn = if c.post_norms {
                Some(ld.norm(&n(Role::PostFfnNorm), d)?)
            } else {
                None
            };
            let rope = match (kind, &ropes.1) {
                (LayerKind::Sliding, Some(local)) => local.clone(),
                _ => ropes.0.clone(),
            };
            let spec = AttentionSpec {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                scale: c.attn_scale,
                softcap: c.attn_softcap,
                window: c.window(i),
            };
            let attn = Attention::new(
                spec,
                qkv,
                o,
                qk_norm,
                rope,
                KvCache::new(opts.kv_cache, c.max_seq_len),
            )?;
            let mlp = Mlp::new(
                Linear::from_weight(cat_rows(&[gate, up])?, None, 2 * c.d_ff)?,
                Linear::from_weight(down, None, d)?,
                c.activation,
                c.d_ff,
            );
            let post = match (post_attn, post_ffn) {
                (Some(a), Some(f)) => Some((a, f)),
                _ => None,
            };
            blocks.push(Block::new(i, attn_norm, attn, ffn_norm, mlp, post));
        }
        Ok(Model {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            cache_len: 0,
            tensor_path: false,
            device: opts.device.clone(),
            source,
        })
    }

    /// The model's hyper-parameters and block options.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The model's family.
    pub fn family(&self) -> super::Family {
        self.cfg.family
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

    /// Bytes of weights read per decode step (every matrix and norm once, one embedding
    /// row; a tied head counted once).
    pub fn weight_bytes(&self) -> usize {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let blocks: usize = self.blocks.iter().map(|b| b.bytes()).sum();
        self.norm.bytes() + head.bytes() + blocks + self.embed.bytes() / self.cfg.vocab_size.max(1)
    }

    /// Number of positions in the KV cache.
    pub fn cache_len(&self) -> usize {
        self.cache_len
    }

    /// The decoder blocks.
    pub fn blocks_mut(&mut self) -> &mut [Block] {
        &mut self.blocks
    }

    /// Embedding rows of `ids` (u32, already checked against the vocabulary) → `[n, d]`
    /// f32, scaled by √d_model where the family does.
    fn embed_rows(&self, ids: &Tensor) -> Result<Tensor> {
        let x = match &self.embed {
            Weight::Dense(e) => e.index_select(ids, 0)?.to_dtype(DType::F32)?,
            Weight::Quant(q) => {
                let ids = ids.to_vec1::<u32>()?;
                let d = self.cfg.d_model;
                let mut x = vec![0f32; ids.len() * d];
                for (row, &id) in x.chunks_exact_mut(d).zip(&ids) {
                    q.dequantize_row(id as usize, row)
                        .ok_or(Error::TokenOutOfRange {
                            id: id.into(),
                            vocab: self.cfg.vocab_size,
                        })?;
                }
                Tensor::from_vec(x, (ids.len(), d), &self.device)?
            }
        };
        if self.cfg.embed_scale {
            // HF computes the factor in the activations' dtype: √d rounded to f32.
            Ok((x * ((self.cfg.d_model as f64).sqrt() as f32) as f64)?)
        } else {
            Ok(x)
        }
    }

    /// Run forward passes on the CPU through the tensor path as well: the one the GPU
    /// takes (candle ops, a mask tensor per window) instead of the CPU's plain rows. For
    /// tests and A/B measurements: the two paths compute the same function.
    #[doc(hidden)]
    pub fn set_tensor_path(&mut self, on: bool) {
        self.tensor_path = on;
    }

    /// The LM head of `h [n, d]` (f32), soft-capped where the family does.
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let l = super::linear::linear(h, head)?;
        match self.cfg.final_softcap {
            None => Ok(l),
            Some(c) => Ok(((l / c as f64)?.tanh()? * c as f64)?),
        }
    }

    /// [`Model::head`] on plain rows.
    fn head_rows(&self, h: &[f32], n: usize) -> Result<Vec<f32>> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut l = head.matmul_vec(h, n)?;
        if let Some(c) = self.cfg.final_softcap {
            for v in &mut l {
                *v = c * (*v / c).tanh();
            }
        }
        Ok(l)
    }

    /// A forward pass on the CPU, on plain rows: `ids` holds `t` tokens per row of the
    /// batch (`b·t`, row-major) at positions `start..start + t`; returns logits
    /// `[b, t or 1, vocab]` (`last_only`: the last position of each row).
    #[allow(clippy::too_many_arguments)]
    fn forward_rows(
        &mut self,
        ids: &[u32],
        b: usize,
        t: usize,
        start: usize,
        pads: Option<&[usize]>,
        hooks: &mut Hooks,
        ctx: &HookContext,
        last_only: bool,
    ) -> Result<Tensor> {
        let n = b * t;
        let ids_t = Tensor::from_slice(ids, n, &self.device)?;
        let x = self.embed_rows(&ids_t)?.flatten_all()?.to_vec1::<f32>()?;
        let mut em = Emitter::new(hooks, ctx, b, t);
        let mut x = em.emit(HookPoint::Embed, RowActs { v: x, n })?;
        let step = Step {
            b,
            t,
            start,
            pads,
            mask: None,
        };
        for block in &mut self.blocks {
            x = block.run(x, &step, &mut em)?;
        }
        self.cache_len = start + t;
        let mut h = em.emit(
            HookPoint::LnFinal,
            RowActs {
                v: self.norm.rows(&x.v),
                n,
            },
        )?;
        let d = self.cfg.d_model;
        let (h, tt) = if last_only && t > 1 {
            let last: Vec<f32> =
                h.v.chunks_exact(t * d)
                    .flat_map(|seq| seq[(t - 1) * d..].iter().copied())
                    .collect();
            (last, 1)
        } else {
            (std::mem::take(&mut h.v), t)
        };
        let logits = self.head_rows(&h, b * tt)?;
        Ok(Tensor::from_vec(
            logits,
            (b, tt, self.cfg.vocab_size),
            &self.device,
        )?)
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
            return Err(Error::empty(format!(
                "the token batch of shape {:?}",
                tokens.dims()
            )));
        }
        let ids = tokens.to_dtype(DType::U32)?.flatten_all()?;
        let max_id = ids.to_vec1::<u32>()?.into_iter().max().unwrap_or(0);
        if max_id as usize >= self.cfg.vocab_size {
            return Err(Error::TokenOutOfRange {
                id: max_id.into(),
                vocab: self.cfg.vocab_size,
            });
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
            return Err(Error::ContextLength {
                what: format!("{t} tokens at position {start_pos}"),
                tokens: start_pos + t,
                max: self.cfg.max_seq_len,
            });
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
        let phase = match prompt_len {
            Some(p) if start_pos >= p && start_pos > 0 => Phase::Decode,
            _ => Phase::Prefill,
        };
        let mut ctx = HookContext::new(start_pos, t, prompt_len, phase);
        if let Some(p) = pads {
            ctx = ctx.with_left_pad(p);
        }
        if self.device.is_cpu() && !self.tensor_path {
            let ids = ids.to_vec1::<u32>()?;
            // The whole pass runs on a pool worker: its parallel sections then fork from
            // inside the pool instead of each waking the pool from outside.
            return rayon::scope(|_| {
                self.forward_rows(&ids, b, t, start_pos, pads, hooks, &ctx, last_only)
            });
        }
        let d = self.cfg.d_model;
        let x = self.embed_rows(&ids)?;
        let mut em = Emitter::new(hooks, &ctx, b, t);
        let mut x = em.emit(HookPoint::Embed, TensorActs(x))?;
        // One mask per distinct window (global layers: `None`).
        let mut windows: Vec<Option<usize>> = Vec::new();
        for i in 0..self.cfg.n_layers {
            let w = self.cfg.window(i);
            if !windows.contains(&w) {
                windows.push(w);
            }
        }
        let masks = windows
            .iter()
            .map(|&w| Ok((w, causal_mask(t, start_pos, w, pads, &self.device)?)))
            .collect::<Result<Vec<_>>>()?;
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let w = self.cfg.window(i);
            let mask = masks
                .iter()
                .find(|(mw, _)| *mw == w)
                .and_then(|(_, m)| m.as_ref());
            let step = Step {
                b,
                t,
                start: start_pos,
                pads: None,
                mask,
            };
            x = block.run(x, &step, &mut em)?;
        }
        self.cache_len = start_pos + t;
        let h = em.emit(HookPoint::LnFinal, TensorActs(self.norm.forward(&x.0)?))?;
        let h = h.0.reshape((b, t, d))?;
        let (h, tt) = if last_only {
            (h.narrow(1, t - 1, 1)?, 1)
        } else {
            (h, t)
        };
        let logits = self.head(&h.reshape((b * tt, d))?)?;
        Ok(logits.reshape((b, tt, self.cfg.vocab_size))?)
    }
}

/// The RoPE tables: the global layers', and the sliding layers' where they differ.
fn rope_tables(c: &ModelConfig, device: &Device) -> Result<(Arc<Rope>, Option<Arc<Rope>>)> {
    let n = c.max_seq_len;
    let half = c.head_dim / 2;
    // Bound the tables by the weights actually present (the embedding), so that a tiny
    // file claiming a huge context cannot allocate gigabytes. Real models are far below
    // this (Llama 3.1: 2^23 entries against a 5·10^8-entry embedding).
    let cap = (1usize << 22).max(c.vocab_size.saturating_mul(c.d_model));
    if n.saturating_mul(half) > cap {
        return Err(Error::Invalid(format!(
            "context length {n} is too large for the RoPE tables ({n} × {half} entries, \
             more than the embedding's {}): cap it with LoadOptions::max_seq_len",
            c.vocab_size.saturating_mul(c.d_model)
        )));
    }
    let global = Arc::new(Rope::new(
        &c.inv_freq(LayerKind::Global),
        n,
        c.rope_style,
        device,
    )?);
    let local = if c.has_local_rope() {
        Some(Arc::new(Rope::new(
            &c.inv_freq(LayerKind::Sliding),
            n,
            c.rope_style,
            device,
        )?))
    } else {
        None
    };
    Ok((global, local))
}

impl HookedModel for Model {
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
    fn hook_width(&self, point: &HookPoint) -> usize {
        match point {
            HookPoint::AttnZ(_) => self.cfg.n_heads * self.cfg.head_dim,
            _ => self.cfg.d_model,
        }
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
        for b in &mut self.blocks {
            b.attention_mut().cache_mut().clear();
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
        for b in &mut self.blocks {
            b.attention_mut().cache_mut().fork(keep, batch)?;
        }
        self.cache_len = keep;
        Ok(())
    }
}
