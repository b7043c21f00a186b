//! An SAE spliced into an activation with latent edits, on selected token positions
//! ([`SaeSplice`], through the fused [`EditPlan`]); [`Positions`] selects the positions.
//! Registered as a hook ([`crate::hooks`]) it runs inside a model's forward pass.

use std::ops::Range;

use candle_core::Tensor;

use super::{EditPlan, Edits};
use crate::sae::Sae;
use crate::{Error, Result};

/// Which token positions a hook acts on. Parses from and prints as `all`, `prompt`,
/// `generated` or an absolute range `A..B`.
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
    /// The form [`FromStr`](std::str::FromStr) reads: `all`, `prompt`, `generated` or `A..B`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Positions::All => f.write_str("all"),
            Positions::Prompt => f.write_str("prompt"),
            Positions::Generated => f.write_str("generated"),
            Positions::Range(r) => write!(f, "{}..{}", r.start, r.end),
        }
    }
}

impl std::str::FromStr for Positions {
    type Err = Error;
    /// `all`, `prompt`, `generated`, or an absolute range `A..B`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Positions::All),
            "prompt" => Ok(Positions::Prompt),
            "generated" => Ok(Positions::Generated),
            _ => {
                let bad = || Error::unknown_name("positions", s, "all, prompt, generated or A..B");
                let (a, b) = s.split_once("..").ok_or_else(bad)?;
                let a: usize = a.trim().parse().map_err(|_| bad())?;
                let b: usize = b.trim().parse().map_err(|_| bad())?;
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
pub struct SaeSplice {
    plan: EditPlan,
    positions: Positions,
    d_in: usize,
}

impl std::fmt::Debug for SaeSplice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaeSplice")
            .field("d_in", &self.d_in)
            .field("positions", &self.positions)
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
        })
    }

    /// The position selector.
    pub fn positions(&self) -> &Positions {
        &self.positions
    }

    /// The SAE's input width.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Splice into `act [batch, seq, d_in]`, whose first position is the absolute
    /// position `start_pos`, at the selected positions (see [`Positions::select`]).
    /// Returns `None` when no position is selected, else the activation with the selected
    /// positions replaced (in `act`'s dtype and on its device). As a hook (registered
    /// with [`Hooks::add`](crate::hooks::Hooks::add)) the positions come from the hook's
    /// context.
    pub fn apply(
        &self,
        act: &Tensor,
        start_pos: usize,
        prompt_len: Option<usize>,
    ) -> Result<Option<Tensor>> {
        let d = act.dim(candle_core::D::Minus1)?;
        if d != self.d_in {
            return Err(Error::WidthMismatch {
                what: "SAE splice".into(),
                d_in: self.d_in,
                width: d,
            });
        }
        let dev = act.device().clone();
        let r = self.positions.select(start_pos, act.dim(1)?, prompt_len);
        on_positions(act, r, |x| Ok(self.plan.apply(x)?.to_device(&dev)?))
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
