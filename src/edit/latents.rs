//! Validated sets of latent ids.

use candle_core::{DType, Tensor};

use crate::rng::Rng;
use crate::{Error, Result};

/// A set of distinct latent ids, each below `d_sae`, kept sorted.
///
/// Duplicates are merged (a set has no multiplicity); ids `>= d_sae` are an error.
///
/// ```
/// use sae_ablate::edit::LatentSet;
/// let s = LatentSet::new(&[7, 3, 7], 16)?;
/// assert_eq!(s.ids(), &[3, 7]);
/// assert!(LatentSet::new(&[16], 16).is_err());
/// # Ok::<(), sae_ablate::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LatentSet {
    ids: Vec<u32>,
}

impl LatentSet {
    /// Validate `ids` against `d_sae`, sort and merge duplicates.
    pub fn new(ids: &[u32], d_sae: usize) -> Result<Self> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= d_sae) {
            return Err(Error::LatentOutOfRange {
                id: bad as u64,
                d_sae,
            });
        }
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        Ok(LatentSet { ids })
    }

    /// The ids, sorted ascending.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Number of latents.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: u32) -> bool {
        self.ids.binary_search(&id).is_ok()
    }

    /// Every latent of an SAE with `d_sae` latents (the pool for [`LatentSet::sample`]).
    pub fn all(d_sae: usize) -> Result<Self> {
        let n = u32::try_from(d_sae).map_err(|_| {
            Error::Invalid(format!("d_sae = {d_sae} does not fit latent ids (u32)"))
        })?;
        Ok(LatentSet {
            ids: (0..n).collect(),
        })
    }

    /// The latents that fire (are non-zero) on at least one token of `latents`, an
    /// encoding `[..., d_sae]` (e.g. [`Sae::encode`](crate::Sae::encode)'s output).
    pub fn active(latents: &Tensor) -> Result<Self> {
        let d_sae = latents.dims().last().copied().unwrap_or(0);
        if d_sae == 0 || latents.elem_count() == 0 {
            return Err(Error::Invalid(format!(
                "active latents: an encoding of shape {:?} has no latents",
                latents.dims()
            )));
        }
        let f = latents
            .to_dtype(DType::F32)?
            .reshape((latents.elem_count() / d_sae, d_sae))?
            .ne(0f32)?
            .max(0)?
            .to_vec1::<u8>()?;
        Ok(LatentSet {
            ids: (0u32..)
                .zip(f)
                .filter(|&(_, on)| on != 0)
                .map(|(i, _)| i)
                .collect(),
        })
    }

    /// The ids of `self` that are not in `other`.
    pub fn difference(&self, other: &LatentSet) -> LatentSet {
        LatentSet {
            ids: self
                .ids
                .iter()
                .copied()
                .filter(|&i| !other.contains(i))
                .collect(),
        }
    }

    /// `n` distinct ids drawn uniformly from this set with `seed` (the same seed gives the
    /// same set on every platform): the random control of an ablation, e.g.
    /// `LatentSet::active(&f)?.difference(&ablated).sample(ablated.len(), seed)`.
    ///
    /// ```
    /// use sae_ablate::edit::LatentSet;
    /// let otd = LatentSet::new(&[1, 5], 16)?;
    /// let control = LatentSet::all(16)?.difference(&otd).sample(2, 42)?;
    /// assert_eq!(control.len(), 2);
    /// assert!(!control.contains(1) && !control.contains(5));
    /// assert_eq!(control, LatentSet::all(16)?.difference(&otd).sample(2, 42)?);
    /// # Ok::<(), sae_ablate::Error>(())
    /// ```
    pub fn sample(&self, n: usize, seed: u64) -> Result<LatentSet> {
        if n > self.ids.len() {
            return Err(Error::Invalid(format!(
                "cannot draw {n} distinct latents from a set of {}",
                self.ids.len()
            )));
        }
        let mut pool = Rng::new(seed).choose(&self.ids, n);
        pool.sort_unstable();
        Ok(LatentSet { ids: pool })
    }
}
