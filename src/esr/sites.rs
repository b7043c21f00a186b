//! Where the experiment's SAE acts: only at the positions it was trained on.
//!
//! The crate's SAEs are trained without the first position of each context (see
//! [`harvest`](crate::harvest)): in a model without a BOS token (SmolLM2) that position is
//! an attention sink whose residual stream has an outlier norm, where a TopK SAE fires
//! its `k` latents at huge values. An edit there is not an edit of the model's
//! computation but a large perturbation of the sink. So every ablation, and every encode
//! of the OTD search, starts at each sequence's position [`EsrConfig::sae_skip`]
//! (1 by default; 0 splices everywhere).
//!
//! [`Positions`](crate::hooks::Positions) selects positions of the whole batch, and
//! generation left-pads its prompts: sequence `b` of a batch starts at position
//! `pad[b]`, not 0. [`SequenceSplice`] therefore applies a splice per sequence, from
//! `pad[b] + skip` on.
//!
//! [`EsrConfig::sae_skip`]: super::EsrConfig::sae_skip

use candle_core::Tensor;

use crate::hooks::{Hook, HookContext, HookPoint, SaeSplice};
use crate::{Error, Result};

/// One or more splices applied per sequence of a left-padded batch: row `b` is spliced by
/// `splices[which[b]]` (untouched when `which[b]` is `None`) at its absolute positions
/// `first[b]..`; earlier positions pass through unchanged. Each splice should select
/// every position ([`Positions::All`](crate::hooks::Positions::All)): the rows' ranges
/// are this hook's business.
///
/// ```no_run
/// # use sae_ablate::{Sae, edit::{Edits, SpliceMode}, hooks::{Positions, SaeSplice}};
/// # use sae_ablate::esr::sites::SequenceSplice;
/// # fn f(sae: &Sae) -> sae_ablate::Result<()> {
/// let edits = Edits::new(SpliceMode::ErrorPreserving).zero(&[3, 7])?;
/// let splice = SaeSplice::new(sae, &edits, Positions::All)?;
/// // Two prompts left-padded by 2 and 0: skip each one's first real position.
/// let hook = SequenceSplice::new(vec![splice], vec![Some(0), Some(0)], vec![3, 1])?;
/// # let _ = hook; Ok(()) }
/// ```
pub struct SequenceSplice {
    splices: Vec<SaeSplice>,
    which: Vec<Option<usize>>,
    first: Vec<usize>,
}

impl std::fmt::Debug for SequenceSplice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceSplice")
            .field("splices", &self.splices.len())
            .field("which", &self.which)
            .field("first", &self.first)
            .finish()
    }
}

impl SequenceSplice {
    /// Row `b` uses `splices[which[b]]` from absolute position `first[b]` on. Errors when
    /// `which` and `first` differ in length or `which` names a splice that is not there.
    pub fn new(
        splices: Vec<SaeSplice>,
        which: Vec<Option<usize>>,
        first: Vec<usize>,
    ) -> Result<Self> {
        if which.len() != first.len() {
            return Err(Error::Invalid(format!(
                "SequenceSplice: {} splice choices for {} rows",
                which.len(),
                first.len()
            )));
        }
        if let Some(&Some(k)) = which.iter().find(|w| w.is_some_and(|k| k >= splices.len())) {
            return Err(Error::Invalid(format!(
                "SequenceSplice: row uses splice {k}, only {} given",
                splices.len()
            )));
        }
        Ok(SequenceSplice {
            splices,
            which,
            first,
        })
    }

    /// Splice one row `[1, t, d]` whose first position is `start`.
    fn row(&self, b: usize, x: &Tensor, ctx: &HookContext) -> Result<Option<Tensor>> {
        let (Some(Some(k)), Some(&first)) = (self.which.get(b), self.first.get(b)) else {
            return Ok(None);
        };
        let Some(splice) = self.splices.get(*k) else {
            return Ok(None);
        };
        let t = x.dim(1)?;
        let lo = first.saturating_sub(ctx.start_pos).min(t);
        if lo == t {
            return Ok(None);
        }
        if lo == 0 {
            return splice.apply(x, ctx.start_pos, ctx.prompt_len);
        }
        let tail = splice.apply(
            &x.narrow(1, lo, t - lo)?,
            ctx.start_pos + lo,
            ctx.prompt_len,
        )?;
        match tail {
            None => Ok(None),
            Some(tail) => Ok(Some(Tensor::cat(&[&x.narrow(1, 0, lo)?, &tail], 1)?)),
        }
    }
}

impl Hook for SequenceSplice {
    fn call(
        &mut self,
        point: &HookPoint,
        act: &Tensor,
        ctx: &HookContext,
    ) -> Result<Option<Tensor>> {
        let rows = act.dim(0)?;
        if rows != self.which.len() {
            return Err(Error::Invalid(format!(
                "SequenceSplice at {point}: a batch of {rows} rows, the hook was built for {}",
                self.which.len()
            )));
        }
        // The common case (decode steps; every row past its first spliced position, all
        // with the same splice): one call on the whole batch.
        let same = self.which.first().copied().flatten();
        if let Some(k) = same {
            if self.which.iter().all(|w| *w == Some(k))
                && self.first.iter().all(|&f| f <= ctx.start_pos)
            {
                if let Some(s) = self.splices.get(k) {
                    return s.apply(act, ctx.start_pos, ctx.prompt_len);
                }
            }
        }
        let mut out = Vec::with_capacity(rows);
        let mut changed = false;
        for b in 0..rows {
            let x = act.narrow(0, b, 1)?;
            match self.row(b, &x, ctx)? {
                Some(y) => {
                    changed = true;
                    out.push(y.to_dtype(act.dtype())?);
                }
                None => out.push(x),
            }
        }
        if !changed {
            return Ok(None);
        }
        Ok(Some(Tensor::cat(&out, 0)?))
    }
}
