//! Where the experiment's SAE acts: only at the positions it was trained on, and with a
//! different splice per sequence of a batch.
//!
//! The crate's SAEs are trained without the first position of each context (see
//! [`SaeConfig::first_trained_position`](crate::sae::SaeConfig::first_trained_position)):
//! in a model without a BOS token (SmolLM2) that position is an attention sink whose
//! residual stream has an outlier norm, where a TopK SAE fires its `k` latents at huge
//! values. An edit there is not an edit of the model's computation but a large
//! perturbation of the sink. [`SaeSplice`] leaves those positions alone (per row in a
//! left-padded batch); the run sets the SAE's first trained position to
//! [`EsrConfig::sae_skip`](super::EsrConfig::sae_skip) and the OTD search encodes from
//! the same position. An arm with `skip = 0` splices every position, to measure what
//! splicing the sink changes.
//!
//! Conditions such as `random` or `steer_ablated` ablate a different latent set in
//! different rows of one generated batch: [`RowSplices`] gives row `b` its own splice.

use candle_core::Tensor;

use crate::hooks::{Hook, HookContext, HookPoint, SaeSplice};
use crate::{Error, Result};

/// Splices chosen per row of a batch: row `b` is spliced by `splices[which[b]]`, each
/// with the positions and the first trained position it was built with.
///
/// ```no_run
/// # use sae_ablate::{Sae, edit::{Edits, SpliceMode}, hooks::{Positions, SaeSplice}};
/// # use sae_ablate::esr::sites::RowSplices;
/// # fn f(sae: &Sae) -> sae_ablate::Result<()> {
/// let a = SaeSplice::new(sae, &Edits::new(SpliceMode::ErrorPreserving).zero(&[3]), Positions::All)?;
/// let b = SaeSplice::new(sae, &Edits::new(SpliceMode::ErrorPreserving).zero(&[7]), Positions::All)?;
/// // Rows 0 and 2 ablate latent 3, row 1 latent 7.
/// let hook = RowSplices::new(vec![a, b], vec![0, 1, 0])?;
/// # let _ = hook; Ok(()) }
/// ```
pub struct RowSplices {
    splices: Vec<SaeSplice>,
    which: Vec<usize>,
}

impl std::fmt::Debug for RowSplices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowSplices")
            .field("splices", &self.splices.len())
            .field("which", &self.which)
            .finish()
    }
}

impl RowSplices {
    /// Row `b` uses `splices[which[b]]`. Errors when `which` names a splice that is not
    /// there.
    pub fn new(splices: Vec<SaeSplice>, which: Vec<usize>) -> Result<Self> {
        if let Some(&k) = which.iter().find(|&&k| k >= splices.len()) {
            return Err(Error::Invalid(format!(
                "RowSplices: a row uses splice {k}, only {} given",
                splices.len()
            )));
        }
        Ok(RowSplices { splices, which })
    }
}

impl Hook for RowSplices {
    fn call(
        &mut self,
        point: &HookPoint,
        act: &Tensor,
        ctx: &HookContext,
    ) -> Result<Option<Tensor>> {
        let rows = act.dim(0)?;
        if rows != self.which.len() {
            return Err(Error::Invalid(format!(
                "RowSplices at {point}: a batch of {rows} rows, the hook was built for {}",
                self.which.len()
            )));
        }
        let pads = ctx.left_pad.as_deref();
        // Every row with the same splice: one call on the whole batch.
        if let Some(&k) = self.which.first() {
            if self.which.iter().all(|&w| w == k) {
                return match self.splices.get(k) {
                    Some(s) => s.apply(act, ctx.start_pos, ctx.prompt_len, pads),
                    None => Ok(None),
                };
            }
        }
        let mut out = Vec::with_capacity(rows);
        let mut changed = false;
        for (b, &k) in self.which.iter().enumerate() {
            let x = act.narrow(0, b, 1)?;
            let pad = pads.and_then(|p| p.get(b..=b));
            let y = match self.splices.get(k) {
                Some(s) => s.apply(&x, ctx.start_pos, ctx.prompt_len, pad)?,
                None => None,
            };
            match y {
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
