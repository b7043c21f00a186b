//! Hook points with TransformerLens names, the [`Hook`] trait, and ready-made hooks.
//!
//! A model calls [`Hooks::run`] at every hook point of its forward pass; each hook
//! registered there sees the activation `[batch, seq, d_model]` and may observe it
//! (return `None`) or replace it (return `Some(tensor)` of the same shape). Hooks never
//! know which model calls them; models never know what the hooks do.
//!
//! ```
//! use sae_ablate::hooks::{ActivationCache, HookPoint, Hooks};
//! let point: HookPoint = "blocks.3.hook_resid_post".parse()?;
//! assert_eq!(point.to_string(), "blocks.3.hook_resid_post");
//! let cache = ActivationCache::new();
//! let mut hooks = Hooks::new();
//! hooks.add(point, cache.clone());
//! assert!(hooks.has(&point));
//! # Ok::<(), sae_ablate::Error>(())
//! ```

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};

use crate::edit::on_positions;
pub use crate::edit::{Positions, SaeSplice};
use crate::{Error, Result};

/// A place in the forward pass where activations can be read or replaced.
///
/// Names follow TransformerLens: `blocks.{i}.hook_resid_post` is the output of
/// decoder layer `i` (0-indexed), which is HF `hidden_states[i + 1]`. Activations are
/// `[batch, seq, width]`: `d_model` wide, except `attn.hook_z` (`n_heads · head_dim`).
/// In post-norm blocks (Gemma 2/3) `hook_attn_out` and `hook_mlp_out` are the outputs
/// after the post-norms, the values added to the residual stream, as in TransformerLens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum HookPoint {
    /// `hook_embed`: token embeddings (the residual stream entering layer 0).
    Embed,
    /// `blocks.{i}.hook_resid_pre`: residual stream entering layer `i`.
    ResidPre(usize),
    /// `blocks.{i}.attn.hook_z`: the attention's per-head outputs concatenated,
    /// `[batch, seq, n_heads · head_dim]`, the input of `o_proj` (what attention-output
    /// SAEs such as Gemma Scope's `att` releases read).
    AttnZ(usize),
    /// `blocks.{i}.hook_attn_out`: output of layer `i`'s attention (after `o_proj`, and
    /// after the post-attention norm where the block has one).
    AttnOut(usize),
    /// `blocks.{i}.hook_resid_mid`: residual stream after the attention add.
    ResidMid(usize),
    /// `blocks.{i}.hook_mlp_in`: the residual stream as the MLP's norm reads it (a
    /// replacement here changes the MLP's input only, not the residual stream).
    MlpIn(usize),
    /// `blocks.{i}.ln2.hook_normalized`: the MLP's normalised input (what transcoders
    /// read).
    Ln2Normalized(usize),
    /// `blocks.{i}.hook_mlp_out`: output of layer `i`'s MLP (after the post-feed-forward
    /// norm where the block has one).
    MlpOut(usize),
    /// `blocks.{i}.hook_resid_post`: residual stream leaving layer `i`.
    ResidPost(usize),
    /// `ln_final.hook_normalized`: the final RMSNorm's output, the LM head's input.
    LnFinal,
}

impl HookPoint {
    /// The layer index of a per-block hook point; `None` for `hook_embed` and `ln_final`.
    pub fn layer(&self) -> Option<usize> {
        match *self {
            HookPoint::Embed | HookPoint::LnFinal => None,
            HookPoint::ResidPre(i)
            | HookPoint::AttnZ(i)
            | HookPoint::AttnOut(i)
            | HookPoint::ResidMid(i)
            | HookPoint::MlpIn(i)
            | HookPoint::Ln2Normalized(i)
            | HookPoint::MlpOut(i)
            | HookPoint::ResidPost(i) => Some(i),
        }
    }

    /// Every hook point of a model with `n_layers` layers, in forward order.
    pub fn all(n_layers: usize) -> Vec<HookPoint> {
        let mut v = vec![HookPoint::Embed];
        for i in 0..n_layers {
            v.extend([
                HookPoint::ResidPre(i),
                HookPoint::AttnZ(i),
                HookPoint::AttnOut(i),
                HookPoint::ResidMid(i),
                HookPoint::MlpIn(i),
                HookPoint::Ln2Normalized(i),
                HookPoint::MlpOut(i),
                HookPoint::ResidPost(i),
            ]);
        }
        v.push(HookPoint::LnFinal);
        v
    }

    /// Check that the hook point exists in a model with `n_layers` layers.
    /// The error names the valid layer range.
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        match self.layer() {
            Some(i) if i >= n_layers => Err(Error::Invalid(format!(
                "hook point `{self}` is out of range: the model has {n_layers} layers, \
                 valid block indices are 0..={}",
                n_layers.saturating_sub(1)
            ))),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for HookPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            HookPoint::Embed => f.write_str("hook_embed"),
            HookPoint::ResidPre(i) => write!(f, "blocks.{i}.hook_resid_pre"),
            HookPoint::AttnZ(i) => write!(f, "blocks.{i}.attn.hook_z"),
            HookPoint::AttnOut(i) => write!(f, "blocks.{i}.hook_attn_out"),
            HookPoint::MlpIn(i) => write!(f, "blocks.{i}.hook_mlp_in"),
            HookPoint::Ln2Normalized(i) => write!(f, "blocks.{i}.ln2.hook_normalized"),
            HookPoint::ResidMid(i) => write!(f, "blocks.{i}.hook_resid_mid"),
            HookPoint::MlpOut(i) => write!(f, "blocks.{i}.hook_mlp_out"),
            HookPoint::ResidPost(i) => write!(f, "blocks.{i}.hook_resid_post"),
            HookPoint::LnFinal => f.write_str("ln_final.hook_normalized"),
        }
    }
}

impl std::str::FromStr for HookPoint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::unknown_name(
                "hook point",
                s,
                "hook_embed, blocks.{i}.hook_resid_pre, blocks.{i}.attn.hook_z, \
                 blocks.{i}.hook_attn_out, blocks.{i}.hook_resid_mid, blocks.{i}.hook_mlp_in, \
                 blocks.{i}.ln2.hook_normalized, blocks.{i}.hook_mlp_out, \
                 blocks.{i}.hook_resid_post or ln_final.hook_normalized",
            )
        };
        match s {
            "hook_embed" => return Ok(HookPoint::Embed),
            "ln_final.hook_normalized" => return Ok(HookPoint::LnFinal),
            _ => {}
        }
        let rest = s.strip_prefix("blocks.").ok_or_else(bad)?;
        let (idx, name) = rest.split_once('.').ok_or_else(bad)?;
        if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let i: usize = idx.parse().map_err(|_| bad())?;
        Ok(match name {
            "hook_resid_pre" => HookPoint::ResidPre(i),
            "attn.hook_z" => HookPoint::AttnZ(i),
            "hook_attn_out" => HookPoint::AttnOut(i),
            "hook_mlp_in" => HookPoint::MlpIn(i),
            "ln2.hook_normalized" => HookPoint::Ln2Normalized(i),
            "hook_resid_mid" => HookPoint::ResidMid(i),
            "hook_mlp_out" => HookPoint::MlpOut(i),
            "hook_resid_post" => HookPoint::ResidPost(i),
            _ => return Err(bad()),
        })
    }
}

/// Whether a forward call processes prompt tokens or one generation step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// The prompt (or a plain forward pass).
    Prefill,
    /// One decode step of generation.
    Decode,
}

/// What a hook knows about the tokens it sees. Models build it with [`HookContext::new`]
/// (and [`HookContext::with_left_pad`] for left-padded batches).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HookContext {
    /// Absolute position of the first token of `act` along its sequence axis.
    pub start_pos: usize,
    /// Number of positions in `act` (its dimension 1).
    pub seq_len: usize,
    /// Length of the prompt when generating; `None` in a plain forward pass
    /// (then every position counts as prompt).
    pub prompt_len: Option<usize>,
    /// Prefill or decode step.
    pub phase: Phase,
    /// In a left-padded batch ([`generate_batch`](crate::model::generate_batch)), the
    /// number of padding positions before each row's first token (row `b`'s text starts
    /// at absolute position `left_pad[b]`); `None` when no row is padded.
    pub left_pad: Option<Vec<usize>>,
}

impl HookContext {
    /// The context of a forward call over `seq_len` positions starting at `start_pos`,
    /// with no left padding.
    pub fn new(start_pos: usize, seq_len: usize, prompt_len: Option<usize>, phase: Phase) -> Self {
        HookContext {
            start_pos,
            seq_len,
            prompt_len,
            phase,
            left_pad: None,
        }
    }

    /// The same context for a batch whose row `b` starts with `left_pad[b]` padding
    /// positions (an all-zero list is stored as `None`).
    pub fn with_left_pad(mut self, left_pad: &[usize]) -> Self {
        self.left_pad = left_pad.iter().any(|&p| p > 0).then(|| left_pad.to_vec());
        self
    }

    /// The absolute positions covered by the activation.
    pub fn positions(&self) -> Range<usize> {
        self.start_pos..self.start_pos + self.seq_len
    }

    /// Whether absolute position `pos` belongs to the prompt.
    pub fn is_prompt(&self, pos: usize) -> bool {
        self.prompt_len.is_none_or(|p| pos < p)
    }
}

/// Something called at a hook point.
pub trait Hook: Send {
    /// Observe `act [batch, seq, d_model]` at `point`; return `Some(replacement)` of the
    /// same shape to change the forward pass, or `None` to leave it as it is.
    fn call(
        &mut self,
        point: &HookPoint,
        act: &Tensor,
        ctx: &HookContext,
    ) -> Result<Option<Tensor>>;
}

impl<F> Hook for F
where
    F: FnMut(&HookPoint, &Tensor, &HookContext) -> Result<Option<Tensor>> + Send,
{
    fn call(
        &mut self,
        point: &HookPoint,
        act: &Tensor,
        ctx: &HookContext,
    ) -> Result<Option<Tensor>> {
        self(point, act, ctx)
    }
}

/// The hooks of one forward pass (or generation): hook point → hooks, called in
/// the order they were added.
#[derive(Default)]
pub struct Hooks {
    entries: Vec<(HookPoint, Box<dyn Hook>)>,
    prompt_len: Option<usize>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field(
                "points",
                &self
                    .entries
                    .iter()
                    .map(|(p, _)| p.to_string())
                    .collect::<Vec<_>>(),
            )
            .field("prompt_len", &self.prompt_len)
            .finish()
    }
}

impl Hooks {
    /// No hooks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `hook` at `point` (after any hooks already there).
    pub fn add(&mut self, point: HookPoint, hook: impl Hook + 'static) -> &mut Self {
        self.entries.push((point, Box::new(hook)));
        self
    }

    /// Builder form of [`Hooks::add`].
    pub fn with(mut self, point: HookPoint, hook: impl Hook + 'static) -> Self {
        self.add(point, hook);
        self
    }

    /// Whether no hook is registered anywhere.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a hook is registered at `point`.
    #[inline]
    pub fn has(&self, point: &HookPoint) -> bool {
        self.entries.iter().any(|(p, _)| p == point)
    }

    /// The hook points that have hooks, sorted and deduplicated.
    pub fn points(&self) -> Vec<HookPoint> {
        let mut v: Vec<HookPoint> = self.entries.iter().map(|(p, _)| *p).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Remove every hook.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The prompt length reported to hooks (set by generation; `None` for a plain forward).
    pub fn prompt_len(&self) -> Option<usize> {
        self.prompt_len
    }

    /// Set the prompt length reported to hooks.
    pub fn set_prompt_len(&mut self, prompt_len: Option<usize>) {
        self.prompt_len = prompt_len;
    }

    /// Check every registered hook point against a model with `n_layers` layers.
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        self.entries
            .iter()
            .try_for_each(|(p, _)| p.validate(n_layers))
    }

    /// Run the hooks registered at `point` on `act`, in order; each sees the previous
    /// one's output. Returns `act` itself when nothing replaced it.
    pub fn run(&mut self, point: HookPoint, act: Tensor, ctx: &HookContext) -> Result<Tensor> {
        if self.entries.is_empty() {
            return Ok(act);
        }
        let mut act = act;
        for (p, hook) in self.entries.iter_mut() {
            if *p != point {
                continue;
            }
            if let Some(new) = hook.call(&point, &act, ctx)? {
                if new.dims() != act.dims() {
                    return Err(Error::Shape {
                        name: format!("replacement at {point}"),
                        expected: act.dims().to_vec(),
                        found: new.dims().to_vec(),
                    });
                }
                act = if new.dtype() == act.dtype() {
                    new
                } else {
                    new.to_dtype(act.dtype())?
                };
            }
        }
        Ok(act)
    }
}

/// Captures activations. Cloning shares the storage: keep one clone, register another.
/// Each forward call appends one tensor per hook point; [`ActivationCache::get`]
/// concatenates them along the sequence axis (prefill + decode steps = the whole sequence).
#[derive(Debug, Clone, Default)]
pub struct ActivationCache {
    store: Arc<Mutex<BTreeMap<HookPoint, Vec<Tensor>>>>,
}

impl ActivationCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<HookPoint, Vec<Tensor>>> {
        // A poisoned lock only means a hook panicked mid-push; the data is still usable.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The captured activation at `point`, `[batch, total_seq, d_model]`, or `None`.
    pub fn get(&self, point: &HookPoint) -> Result<Option<Tensor>> {
        let store = self.lock();
        match store.get(point) {
            None => Ok(None),
            Some(v) if v.len() == 1 => Ok(Some(v[0].clone())),
            Some(v) => Ok(Some(Tensor::cat(v, 1)?)),
        }
    }

    /// The captured tensors at `point`, one per forward call.
    pub fn calls(&self, point: &HookPoint) -> Vec<Tensor> {
        self.lock().get(point).cloned().unwrap_or_default()
    }

    /// The hook points with captured activations.
    pub fn points(&self) -> Vec<HookPoint> {
        self.lock().keys().copied().collect()
    }

    /// Forget everything captured.
    pub fn clear(&self) {
        self.lock().clear();
    }
}

impl Hook for ActivationCache {
    fn call(&mut self, point: &HookPoint, act: &Tensor, _: &HookContext) -> Result<Option<Tensor>> {
        self.lock().entry(*point).or_default().push(act.clone());
        Ok(None)
    }
}

/// Adds `coeff · vector` to the selected positions (activation steering).
#[derive(Debug, Clone)]
pub struct AddVector {
    vector: Tensor,
    coeff: f32,
    positions: Positions,
}

impl AddVector {
    /// Add `coeff · vector` (`vector [d_model]`) at the selected positions.
    pub fn new(vector: &Tensor, coeff: f32, positions: Positions) -> Result<Self> {
        if vector.rank() != 1 {
            return Err(Error::Shape {
                name: "steering vector".into(),
                expected: vec![vector.elem_count()],
                found: vector.dims().to_vec(),
            });
        }
        Ok(AddVector {
            vector: (vector.to_dtype(DType::F32)? * coeff as f64)?,
            coeff,
            positions,
        })
    }

    /// The coefficient.
    pub fn coeff(&self) -> f32 {
        self.coeff
    }
}

impl Hook for AddVector {
    fn call(
        &mut self,
        point: &HookPoint,
        act: &Tensor,
        ctx: &HookContext,
    ) -> Result<Option<Tensor>> {
        let d = act.dim(candle_core::D::Minus1)?;
        if d != self.vector.elem_count() {
            return Err(Error::Shape {
                name: format!("steering vector at {point}"),
                expected: vec![d],
                found: self.vector.dims().to_vec(),
            });
        }
        let v = self.vector.to_device(act.device())?;
        let r = self
            .positions
            .select(ctx.start_pos, ctx.seq_len, ctx.prompt_len);
        on_positions(act, r, |x| Ok(x.to_dtype(DType::F32)?.broadcast_add(&v)?))
    }
}

impl Hook for SaeSplice {
    fn call(
        &mut self,
        point: &HookPoint,
        act: &Tensor,
        ctx: &HookContext,
    ) -> Result<Option<Tensor>> {
        let d = act.dim(candle_core::D::Minus1)?;
        if d != self.d_in() {
            return Err(Error::WidthMismatch {
                what: format!("SAE splice at {point}"),
                d_in: self.d_in(),
                width: d,
            });
        }
        self.apply(act, ctx.start_pos, ctx.prompt_len, ctx.left_pad.as_deref())
    }
}
