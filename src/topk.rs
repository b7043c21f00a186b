//! The bounded TopK selection shared by the fused splice and the trainer: the `k` best
//! of a row, best = larger key, ties towards the lower id (as [`crate::Sae::encode`]).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// A TopK candidate; "greater" is better: larger key, then lower id.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cand {
    /// What is ranked (a pre-activation, or its magnitude).
    pub(crate) key: f32,
    /// The latent id.
    pub(crate) id: u32,
}

impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        self.key.total_cmp(&o.key).then(o.id.cmp(&self.id))
    }
}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Cand {}

/// A min-heap of candidates: its top is the worst one kept.
pub(crate) type TopKHeap = BinaryHeap<Reverse<Cand>>;

/// Fill `heap` (cleared first) with the `k` best of `cands`, in O(n log k); the kept
/// candidates come out of `heap.iter()` in no particular order.
pub(crate) fn top_k(cands: impl IntoIterator<Item = Cand>, k: usize, heap: &mut TopKHeap) {
    heap.clear();
    if k == 0 {
        return;
    }
    for c in cands {
        if heap.len() < k {
            heap.push(Reverse(c));
        } else if let Some(mut worst) = heap.peek_mut() {
            if c > worst.0 {
                *worst = Reverse(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_k_largest_ties_to_the_lower_id() {
        let row = [1.0f32, 3.0, 3.0, -1.0, 2.0];
        let mut heap = TopKHeap::new();
        let cands = row
            .iter()
            .enumerate()
            .map(|(i, &key)| Cand { key, id: i as u32 });
        top_k(cands, 2, &mut heap);
        let mut ids: Vec<u32> = heap.iter().map(|c| c.0.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2]);
        top_k(
            row.iter()
                .enumerate()
                .map(|(i, &key)| Cand { key, id: i as u32 }),
            3,
            &mut heap,
        );
        let mut ids: Vec<u32> = heap.iter().map(|c| c.0.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2, 4]);
        top_k(std::iter::empty(), 0, &mut heap);
        assert!(heap.is_empty());
    }
}
