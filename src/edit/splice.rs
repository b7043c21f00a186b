//! An SAE spliced into an activation with latent edits, on selected token positions
//! ([`SaeSplice`], through the fused [`EditPlan`]); [`Positions`] selects the positions.
//! Registered as a hook ([`crate::hooks`]) it runs inside a model's forward pass.

use std::ops::Range;

use candle_core::Tensor;

use super::{EditPlan, Edits};
use crate::sae::Sae;
use crate::{Error, Result};

/// Which token positions a hook acts on. Parses from and prints as `all`, `prompt`,
/// `generated`, an absolute range `A..B` or `A..` (from `A` on).
///
/// Positions are absolute: 0 is the first token of the sequence (in a left-padded batch,
/// the first position of the padded row). The first position is special in most models —
/// the BOS token or, without one, an attention sink with an outlier norm — and an
/// [`SaeSplice`] never changes the positions its SAE was not trained on, whatever the
/// selector (see [`SaeSplice`]). For other hooks, [`Positions::starting_at`]`(1)`
/// (`1..` on the command line) skips the first position.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Positions {
    /// Every position.
    #[default]
    All,
    /// Prompt positions only (all positions in a plain forward pass).
    Prompt,
    /// Generated positions only (none in a plain forward pass).
    Generated,
    /// Absolute positions in this range.
    Range(Range<usize>),
}

impl Positions {
    /// Every position from `first` on: `Positions::Range(first..usize::MAX)`.
    pub fn starting_at(first: usize) -> Self {
        Positions::Range(first..usize::MAX)
    }

    /// The positions this selector covers in an activation of `seq_len` positions
    /// whose first one is the absolute position `start_pos`, relative to `start_pos` (a
    /// sub-range of `0..seq_len`, possibly empty). `prompt_len` is the prompt's length
    /// when generating, `None` in a plain forward pass (then every position is prompt);
    /// a hook passes its [`HookContext`](crate::hooks::HookContext)'s fields.
    pub fn select(
        &self,
        start_pos: usize,
        seq_len: usize,
        prompt_len: Option<usize>,
    ) -> Range<usize> {
        let abs = start_pos..start_pos.saturating_add(seq_len);
        let want = match self {
            Positions::All => abs.clone(),
            Positions::Prompt => match prompt_len {
                None => abs.clone(),
                Some(p) => 0..p,
            },
            Positions::Generated => match prompt_len {
                None => 0..0,
                Some(p) => p..usize::MAX,
            },
            Positions::Range(r) => r.clone(),
        };
        let lo = want.start.max(abs.start);
        let hi = want.end.min(abs.end);
        if lo >= hi {
            0..0
        } else {
            lo - abs.start..hi - abs.start
        }
    }
}

impl std::fmt::Display for Positions {
    /// The form [`FromStr`](std::str::FromStr) reads: `all`, `prompt`, `generated`, `A..B`
    /// or `A..`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Positions::All => f.write_str("all"),
            Positions::Prompt => f.write_str("prompt"),
            Positions::Generated => f.write_str("generated"),
            Positions::Range(r) if r.end == usize::MAX => write!(f, "{}..", r.start),
            Positions::Range(r) => write!(f, "{}..{}", r.start, r.end),
        }
    }
}

impl std::str::FromStr for Positions {
    type Err = Error;
    /// `all`, `prompt`, `generated`, an absolute range `A..B`, or `A..` (from `A` on).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Positions::All),
            "prompt" => Ok(Positions::Prompt),
            "generated" => Ok(Positions::Generated),
            _ => {
                let bad =
                    || Error::unknown_name("positions", s, "all, prompt, generated, A..B or A..");
                let (a, b) = s.split_once("..").ok_or_else(bad)?;
                let a: usize = a.trim().parse().map_err(|_| bad())?;
                let b: usize = match b.trim() {
                    "" => usize::MAX,
                    b => b.parse().map_err(|_| bad())?,
                };
                if a > b {
                    return Err(bad());
                }
                Ok(Positions::Range(a..b))
            }
        }
    }
}

/// An SAE spliced in with latent edits, on the selected positions, through the fused
/// [`EditPlan`]. With no edits in error-preserving mode it returns its input unchanged.
///
/// # Positions the SAE was not trained on
/// An SAE's code is only meaningful on activations like those it was trained on. The
/// first position of a context is not one of them in most models: it is the BOS token,
/// or (SmolLM2, which adds no BOS) the first text token, which the model uses as an
/// attention sink with a norm tens of times the others'. There a ReLU SAE's latents fire
/// in the thousands and a TopK SAE fires its `k` latents at huge values, so an ablation
/// spliced there moves the model through that one position, whatever latents are
/// ablated. The splice therefore leaves every position below the SAE's
/// [`first_trained_position`](crate::sae::SaeConfig::first_trained_position) unchanged —
/// counted from each row's first token in a left-padded batch — whatever
/// [`Positions`] says. SAEs trained by this crate record `1`; a loaded SAE whose format
/// does not say records `0` (set the field with [`Sae::set_first_trained_position`] when
/// you know better), and [`SaeSplice::including_untrained_positions`] splices them anyway.
pub struct SaeSplice {
    plan: EditPlan,
    positions: Positions,
    d_in: usize,
    first_trained_position: usize,
}

impl std::fmt::Debug for SaeSplice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaeSplice")
            .field("d_in", &self.d_in)
            .field("positions", &self.positions)
            .field("first_trained_position", &self.first_trained_position)
            .finish()
    }
}

impl SaeSplice {
    /// Build the splice (validates the edits against the SAE once).
    pub fn new(sae: &Sae, edits: &Edits, positions: Positions) -> Result<Self> {
        Ok(SaeSplice {
            plan: EditPlan::new(sae, edits)?,
            positions,
            d_in: sae.d_in(),
            first_trained_position: sae.config().first_trained_position,
        })
    }

    /// Splice also the leading positions the SAE was not trained on (see the type's docs).
    pub fn including_untrained_positions(mut self) -> Self {
        self.first_trained_position = 0;
        self
    }

    /// The position selector.
    pub fn positions(&self) -> &Positions {
        &self.positions
    }

    /// The first position of each row the splice may change (0: any).
    pub fn first_trained_position(&self) -> usize {
        self.first_trained_position
    }

    /// The SAE's input width.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Splice into `act [batch, seq, d_in]`, whose first position is the absolute position
    /// `start_pos`, at the positions [`Positions::select`] picks that the SAE was trained
    /// on. `prompt_len` is the prompt's length when generating (`None` in a plain forward
    /// pass); `left_pad[b]` is the number of padding positions before row `b`'s first token
    /// in a left-padded batch (`None`: no padding). Returns `None` when no position is
    /// selected, else the activation with the selected positions replaced (in `act`'s
    /// dtype and on its device). As a hook (registered with
    /// [`Hooks::add`](crate::hooks::Hooks::add)) these come from the hook's
    /// [`HookContext`](crate::hooks::HookContext).
    pub fn apply(
        &self,
        act: &Tensor,
        start_pos: usize,
        prompt_len: Option<usize>,
        left_pad: Option<&[usize]>,
    ) -> Result<Option<Tensor>> {
        let d = act.dim(candle_core::D::Minus1)?;
        if d != self.d_in {
            return Err(Error::WidthMismatch {
                what: "SAE splice".into(),
                d_in: self.d_in,
                width: d,
            });
        }
        let (b, t) = (act.dim(0)?, act.dim(1)?);
        let dev = act.device().clone();
        let f = |x: &Tensor| Ok(self.plan.apply(x)?.to_device(&dev)?);
        let r = self.positions.select(start_pos, t, prompt_len);
        if self.first_trained_position == 0 {
            return on_positions(act, r, f);
        }
        // Per row, the first relative position the SAE was trained on.
        let first: Vec<usize> = (0..b)
            .map(|row| {
                let pad = left_pad.and_then(|p| p.get(row).copied()).unwrap_or(0);
                (pad + self.first_trained_position).saturating_sub(start_pos)
            })
            .collect();
        let lo = first.iter().copied().min().unwrap_or(0);
        let hi = first.iter().copied().max().unwrap_or(0);
        let r = r.start.max(lo)..r.end;
        if r.start >= r.end || lo == hi {
            return on_positions(act, r.start.max(hi)..r.end, f);
        }
        // Rows start at different positions (left padding): splice the union, then put
        // back each row's positions below its own first trained one.
        let Some(spliced) = on_positions(act, r, f)? else {
            return Ok(None);
        };
        let mut keep = vec![0u8; b * t];
        for (row, &fp) in first.iter().enumerate() {
            for p in fp.min(t)..t {
                keep[row * t + p] = 1;
            }
        }
        let mask = Tensor::from_vec(keep, (b, t, 1), &dev)?.broadcast_as(act.shape())?;
        Ok(Some(mask.where_cond(&spliced, act)?))
    }
}

/// Replace positions `r` (relative, along dim 1) of `act` by `f(selected)`.
pub(crate) fn on_positions(
    act: &Tensor,
    r: Range<usize>,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    let t = act.dim(1)?;
    if r.is_empty() {
        return Ok(None);
    }
    if r.start == 0 && r.end == t {
        return Ok(Some(f(act)?.to_dtype(act.dtype())?));
    }
    let mid = f(&act.narrow(1, r.start, r.len())?)?.to_dtype(act.dtype())?;
    let mut parts = Vec::with_capacity(3);
    if r.start > 0 {
        parts.push(act.narrow(1, 0, r.start)?);
    }
    parts.push(mid);
    if r.end < t {
        parts.push(act.narrow(1, r.end, t - r.end)?);
    }
    Ok(Some(Tensor::cat(&parts, 1)?))
}
