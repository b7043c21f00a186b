//! Hookable transformer language models.
//!
//! * [`HookedModel`]: the interface every model implements: a forward pass that calls
//!   [`Hooks`] at TransformerLens hook points and returns logits for every position.
//! * [`load`] / [`Model`]: one decoder for every supported family — Llama 1/2/3.x
//!   (SmolLM2), Mistral, Qwen 2/2.5, Qwen 3, Gemma 2, Gemma 3 — from GGUF or an HF
//!   directory; [`ModelConfig`] says what the family's block looks like.
//! * [`layers`]: the decoder's pieces (norms, attention, MLP, KV cache, block), public so
//!   that other models can be built from them and hooked.
//! * [`tokenizer`]: tokenizers from GGUF metadata or `tokenizer.json`, chat templates.
//! * [`generate`] / [`generate_batch`] (module [`sampling`]): generation with hooks live at
//!   every step; [`SamplingParams`], the sampler.
//!
//! # Adding a family
//! A family is one file under `src/model/families/` (see `gemma.rs` or `qwen.rs`):
//! 1. `hf(&HfConfig) -> ModelConfig`: start from `HfConfig::base` with the defaults of its
//!    HF config class (`HfDefaults`), then set the block options it needs
//!    ([`ModelConfig`]: norms, post-norms, activation, biases, q/k norms, embedding scale,
//!    soft-caps, attention scale, sliding layers, RoPE bases); read both the
//!    transformers 4.x and 5.x keys; unknown values are errors, never defaults.
//! 2. `gguf(&Meta) -> ModelConfig`: from `Meta::base`, its `{arch}.…` keys plus what
//!    llama.cpp fixes per architecture (layer patterns, scales), and its RoPE convention.
//! 3. Register it in `families/mod.rs` (`hf_config`, `gguf_config`, `Family`,
//!    `supported_list`); add tensor names to `Names` only if they differ.
//! 4. Test: a tiny random checkpoint made by transformers
//!    (`scripts/make_model_fixtures.py`), logits within 1e-3, windows shorter than the
//!    test prompt; hostile configs fail with the key named.
//!
//! If the block needs an option that [`ModelConfig`] lacks, add the option to the
//! config and to `layers::Block` once, not a copy of the block.

pub mod config;
pub mod decoder;
mod families;
mod gguf;
mod identity;
pub mod layers;
mod linear;
pub mod sampling;
pub(crate) mod scratch;
mod source;
mod spm;
pub mod tokenizer;

use candle_core::{Device, Tensor};

use crate::hooks::{HookPoint, Hooks};
use crate::Result;

pub use config::{Activation, Family, LayerKind, ModelConfig, RopeScaling, RopeStyle};
pub use decoder::{LoadOptions, Model, WeightFormat};
pub use identity::model_sha256;
pub use sampling::{
    generate, generate_batch, generate_batch_streaming, generate_streaming, Generation,
    SamplingParams,
};
pub use tokenizer::{ChatTemplate, Tokenizer};

/// Log-probabilities `log softmax(logits)` over the last dimension, in f32 (any float
/// input dtype; the shape is kept): e.g. `[batch, seq, vocab]` from
/// [`HookedModel::forward`].
pub fn log_probs(logits: &Tensor) -> Result<Tensor> {
    let last = logits.rank().checked_sub(1).ok_or_else(|| {
        crate::Error::Invalid("log_probs: the logits are a scalar, not a vector".into())
    })?;
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(candle_core::DType::F32)?,
        last,
    )?)
}

/// `log p(token)` at `position` of row `row` of `logits [batch, seq, vocab]`: the natural
/// log of the softmax probability the model gives `token` as the next token after that
/// position.
///
/// ```no_run
/// use sae_ablate::hooks::Hooks;
/// use sae_ablate::model::{self, HookedModel};
/// # fn main() -> sae_ablate::Result<()> {
/// let (mut m, tok) = model::load("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
///     &Default::default())?;
/// let x = tok.encode_tensor("The capital of France is", m.device())?;
/// let logits = m.forward(&x, 0, &mut Hooks::new())?;
/// let last = x.dim(1)? - 1;
/// let lp = model::token_log_prob(&logits, 0, last, tok.single_token(" Paris")?)?;
/// assert!(lp < 0.0);
/// # Ok(()) }
/// ```
pub fn token_log_prob(logits: &Tensor, row: usize, position: usize, token: u32) -> Result<f32> {
    let (b, t, v) = logits.dims3().map_err(|_| {
        crate::Error::Invalid(format!(
            "token_log_prob: logits must be [batch, seq, vocab], got {:?}",
            logits.dims()
        ))
    })?;
    if row >= b || position >= t || token as usize >= v {
        return Err(crate::Error::Invalid(format!(
            "token_log_prob: row {row}, position {position}, token {token} outside logits \
             of shape [{b}, {t}, {v}]"
        )));
    }
    let l = logits.get(row)?.get(position)?;
    Ok(log_probs(&l)?.get(token as usize)?.to_scalar::<f32>()?)
}

/// Load a model of any supported family and its tokenizer: a GGUF file (family from
/// `general.architecture`, tokenizer from its metadata) or an HF directory (family from
/// `config.json`'s `model_type`; `*.safetensors`; `tokenizer.json`). An unsupported
/// architecture is an error naming it and the supported ones.
pub fn load(path: impl AsRef<std::path::Path>, opts: &LoadOptions) -> Result<(Model, Tokenizer)> {
    let path = path.as_ref();
    if path.is_dir() {
        Ok((Model::from_hf_dir(path, opts)?, Tokenizer::from_hf(path)?))
    } else {
        Ok((
            Model::from_gguf(path, opts)?,
            Tokenizer::from_gguf_file(path)?,
        ))
    }
}

/// A transformer LM whose forward pass can be hooked.
pub trait HookedModel {
    /// Run `tokens [batch, seq]` (u32) at absolute positions `start_pos..start_pos + seq`,
    /// calling `hooks` at every hook point; returns f32 logits `[batch, seq, vocab]`.
    ///
    /// `start_pos = 0` starts a new sequence (clears the KV cache); otherwise
    /// `start_pos` must equal the number of positions already cached.
    fn forward(&mut self, tokens: &Tensor, start_pos: usize, hooks: &mut Hooks) -> Result<Tensor>;
    /// Like [`HookedModel::forward`] but returns logits `[batch, vocab]` for the last
    /// position only (what generation needs).
    fn forward_last(
        &mut self,
        tokens: &Tensor,
        start_pos: usize,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let l = self.forward(tokens, start_pos, hooks)?;
        let t = l.dim(1)?;
        Ok(l.narrow(1, t.saturating_sub(1), 1)?.squeeze(1)?)
    }
    /// [`HookedModel::forward_last`] for a batch of left-padded sequences: row `b`'s first
    /// `left_pad[b]` positions are padding that no other position attends to. RoPE depends
    /// only on relative positions, so a left-padded row computes what it would alone.
    /// The default supports unpadded batches only.
    fn forward_last_padded(
        &mut self,
        tokens: &Tensor,
        start_pos: usize,
        left_pad: &[usize],
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        if left_pad.iter().any(|&p| p > 0) {
            return Err(crate::Error::Invalid(
                "this model does not support padded batches".into(),
            ));
        }
        self.forward_last(tokens, start_pos, hooks)
    }
    /// Residual stream width.
    fn d_model(&self) -> usize;
    /// Number of decoder layers.
    fn n_layers(&self) -> usize;
    /// Vocabulary size (the logits' last dimension).
    fn vocab_size(&self) -> usize;
    /// Maximum number of positions (the context length).
    fn max_seq_len(&self) -> usize;
    /// The device the model runs on.
    fn device(&self) -> &Device;
    /// Forget the KV cache.
    fn reset(&mut self);
    /// Keep the first `keep` cached positions of batch row 0 and copy them into `batch`
    /// rows, so that a prefix prefilled once is continued by `batch` different sequences
    /// (the next forward starts at `start_pos = keep`). The default reports that the model
    /// cannot share a cached prefix.
    fn fork_cache(&mut self, keep: usize, batch: usize) -> Result<()> {
        let _ = (keep, batch);
        Err(crate::Error::Invalid(
            "this model cannot share a cached prefix".into(),
        ))
    }
    /// The width of the activation at `point` (its last dimension): `d_model`, except
    /// `attn.hook_z` (`n_heads · head_dim`). The default reports `d_model` everywhere.
    fn hook_width(&self, point: &HookPoint) -> usize {
        let _ = point;
        self.d_model()
    }
    /// Every hook point of the model, in forward order.
    fn hook_points(&self) -> Vec<HookPoint> {
        HookPoint::all(self.n_layers())
    }
}
