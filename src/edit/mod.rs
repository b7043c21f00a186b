//! Latent sets, per-latent edits and splice modes.
//!
//! An edit maps latent activations `f → f'`; a splice puts the result back into
//! the residual stream:
//!
//! * [`SpliceMode::ErrorPreserving`] (default): `y = x + denorm(decode(f')) − denorm(decode(f))`.
//!   With no edits `y = x` (to rounding), whatever the SAE's reconstruction error.
//! * [`SpliceMode::Reconstruction`]: `y = denorm(decode(f'))` (+ the SAE's skip term).
//!
//! Steering by a decoder direction adds `c·W_dec[i]` to `y` in either mode.
//! [`reference::apply`] implements all of this with plain candle ops; it is the
//! oracle the fused [`EditPlan`] is tested against. [`SaeSplice`] applies an
//! [`EditPlan`] to selected token positions of an activation (a hook inside a model).

#[cfg(feature = "cuda")]
pub mod cuda;
mod latents;
mod plan;
pub mod reference;
mod splice;

pub use latents::LatentSet;
pub use plan::EditPlan;
pub(crate) use splice::on_positions;
pub use splice::{Positions, SaeSplice};

use crate::{Error, Result};

/// What to do to one latent's activation `f_i`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum LatentEdit {
    /// `f'_i = 0` (zero-ablation).
    Zero,
    /// `f'_i = v` (also mean-ablation, with `v` the latent's mean).
    Clamp(f32),
    /// `f'_i = a · f_i`.
    Scale(f32),
    /// `f'_i = f_i + v` (steering in latent space; under `ErrorPreserving` this adds
    /// `v · W_dec[i]`, times the denormalization scale when the SAE normalizes its input).
    Add(f32),
}

impl LatentEdit {
    /// The edit as an affine map `f' = a·f + b`: returns `(a, b)`.
    pub fn affine(&self) -> (f32, f32) {
        match *self {
            LatentEdit::Zero => (0.0, 0.0),
            LatentEdit::Clamp(v) => (0.0, v),
            LatentEdit::Scale(a) => (a, 0.0),
            LatentEdit::Add(v) => (1.0, v),
        }
    }
}

/// How the edited latents are put back into the activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SpliceMode {
    /// `y = x + denorm(decode(f')) − denorm(decode(f))`: the SAE's error is kept.
    #[default]
    ErrorPreserving,
    /// `y = denorm(decode(f'))`: the activation is replaced by the edited reconstruction.
    Reconstruction,
}

names!(
    SpliceMode,
    "splice mode",
    ErrorPreserving => "error" | "error-preserving" | "error_preserving",
    Reconstruction => "reconstruct" | "reconstruction",
);

/// A set of latent edits plus decoder-direction steering, with the splice mode.
///
/// Each latent may carry at most one [`LatentEdit`] and at most one steering
/// coefficient. The builder methods never fail; the edits are checked once, when they
/// are applied ([`Edits::validate`], called by [`EditPlan::new`] and
/// [`SaeSplice::new`]): a second edit of the same latent is an error
/// ([`Error::DuplicateLatent`]) rather than a silent override, and every id must be below
/// the SAE's `d_sae`.
///
/// ```
/// use sae_ablate::edit::{Edits, LatentEdit, SpliceMode};
/// let edits = Edits::new(SpliceMode::ErrorPreserving)
///     .zero(&[3, 7])
///     .with(12, LatentEdit::Clamp(2.5))
///     .steer(40, 8.0);
/// assert_eq!(edits.latent_edits().len(), 3);
/// assert!(edits.validate(64).is_ok());
/// assert!(edits.clone().zero(&[7]).validate(64).is_err()); // 7 is edited twice
/// assert!(edits.validate(32).is_err()); // 40 is not below d_sae = 32
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Edits {
    mode: SpliceMode,
    edits: Vec<(u32, LatentEdit)>,
    steers: Vec<(u32, f32)>,
    /// `mean_ablate` calls whose ids and means differ in length: `(ids, means)`.
    mismatched_means: Option<(usize, usize)>,
}

impl Edits {
    /// No edits yet, in `mode`.
    pub fn new(mode: SpliceMode) -> Self {
        Edits {
            mode,
            ..Default::default()
        }
    }

    /// Add one latent edit.
    pub fn with(mut self, id: u32, edit: LatentEdit) -> Self {
        self.edits.push((id, edit));
        self
    }

    /// Zero-ablate every latent in `ids`.
    pub fn zero(self, ids: &[u32]) -> Self {
        ids.iter().fold(self, |e, &id| e.with(id, LatentEdit::Zero))
    }

    /// Mean-ablate: clamp each latent in `ids` to its given mean (`ids` and `means` must
    /// have the same length, checked by [`Edits::validate`]).
    pub fn mean_ablate(mut self, ids: &[u32], means: &[f32]) -> Self {
        if ids.len() != means.len() && self.mismatched_means.is_none() {
            self.mismatched_means = Some((ids.len(), means.len()));
        }
        ids.iter()
            .zip(means)
            .fold(self, |e, (&id, &m)| e.with(id, LatentEdit::Clamp(m)))
    }

    /// Steer by a decoder direction: `y += c · W_dec[id]`, in the residual stream's own
    /// units. Most SAEs' decoder rows have unit norm (check with
    /// [`Sae::decoder_direction`](crate::Sae::decoder_direction)), so `c` is the length of
    /// the added vector: compare it with the norm of the activations at the hook (SmolLM2's
    /// middle-layer residual has norms of a few tens; the first position, an attention
    /// sink, far more). Steering that visibly changes a generation takes `c` of the order
    /// of that norm.
    pub fn steer(mut self, id: u32, c: f32) -> Self {
        self.steers.push((id, c));
        self
    }

    /// The splice mode.
    pub fn mode(&self) -> SpliceMode {
        self.mode
    }

    /// The latent edits, in the order given.
    pub fn latent_edits(&self) -> &[(u32, LatentEdit)] {
        &self.edits
    }

    /// The decoder-direction steering coefficients, in the order given.
    pub fn steers(&self) -> &[(u32, f32)] {
        &self.steers
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty() && self.steers.is_empty()
    }

    /// Check the edits against an SAE with `d_sae` latents: every id below `d_sae`, no
    /// latent edited or steered twice, `mean_ablate`'s ids and means of one length.
    pub fn validate(&self, d_sae: usize) -> Result<()> {
        if let Some((ids, means)) = self.mismatched_means {
            return Err(Error::Invalid(format!(
                "mean_ablate: {ids} ids but {means} means"
            )));
        }
        for ids in [
            self.edits.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            self.steers.iter().map(|(i, _)| *i).collect(),
        ] {
            let mut sorted = ids;
            sorted.sort_unstable();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(Error::DuplicateLatent(w[0]));
            }
        }
        for id in self
            .edits
            .iter()
            .map(|(i, _)| *i)
            .chain(self.steers.iter().map(|(i, _)| *i))
        {
            if id as usize >= d_sae {
                return Err(Error::LatentOutOfRange {
                    id: id as u64,
                    d_sae,
                });
            }
        }
        Ok(())
    }
}
