//! Validated sets of latent ids.

use crate::{Error, Result};

/// The 26 off-topic-detector latents of Goodfire's Llama-3.3-70B-Instruct SAE
/// (layer 50, 65,536 latents) whose zero-ablation reduces endogenous steering
/// resistance (McKenzie et al., "Endogenous Steering Resistance", arXiv 2602.06941;
/// list from the paper's code release, agencyenterprise/endogenous-steering-resistance).
pub const ESR_OTD_LATENTS_LLAMA33_70B_L50: [u32; 26] = [
    3675, 7517, 9168, 10304, 11977, 15375, 17481, 17516, 24684, 27331, 28540, 33044, 34002, 34765,
    37536, 40119, 40792, 41038, 45078, 46037, 49897, 54311, 58565, 59483, 61116, 61420,
];

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

    /// A named preset: `esr26` = [`ESR_OTD_LATENTS_LLAMA33_70B_L50`].
    pub fn preset(name: &str, d_sae: usize) -> Result<Self> {
        match name {
            "esr26" => Self::new(&ESR_OTD_LATENTS_LLAMA33_70B_L50, d_sae),
            other => Err(Error::Invalid(format!(
                "unknown latent preset `{other}` (known: esr26)"
            ))),
        }
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
