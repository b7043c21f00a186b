//! Validated sets of latent ids.

use crate::{Error, Result};

/// A set of distinct latent ids, each below `d_sae`, kept sorted.
///
/// Duplicates are merged (a set has no multiplicity); ids `>= d_sae` are an error.
///
/// ```
/// use sae_ablate::edit::LatentSet;
/// let s = LatentSet::new(&[7, 3, 7], 16).unwrap();
/// assert_eq!(s.ids(), &[3, 7]);
/// assert!(LatentSet::new(&[16], 16).is_err());
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
}
