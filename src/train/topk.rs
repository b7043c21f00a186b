//! The TopK selection as a candle custom op without backward: it returns a 0/1 mask
//! `[N, d]` of the `k` largest entries of each row (ties towards the lower index, as
//! [`crate::Sae::encode`]). The trainer multiplies the activations by the mask, so the
//! gradient flows through the selected entries only, exactly as a gather would.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

/// `k` of the TopK mask.
pub(crate) struct TopKMask {
    pub(crate) k: usize,
}

#[derive(Clone, Copy)]
struct Cand(f32, u32);

impl Ord for Cand {
    /// Greater = better: larger value, then lower index.
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
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

impl CustomOp1 for TopKMask {
    fn name(&self) -> &'static str {
        "topk-mask"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = layout.shape().dims2()?;
        let data = match storage {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("topk-mask: expected f32 input"),
        };
        let (start, end) = match layout.contiguous_offsets() {
            Some(o) => o,
            None => candle_core::bail!("topk-mask: expected a contiguous input"),
        };
        let src = data
            .get(start..end)
            .ok_or_else(|| candle_core::Error::Msg("topk-mask: bad layout".into()))?;
        let k = self.k.min(d);
        let mut out = vec![0f32; n * d];
        if k > 0 && d > 0 {
            out.par_chunks_mut(d).zip(src.par_chunks(d)).for_each_init(
                || BinaryHeap::<Reverse<Cand>>::with_capacity(k + 1),
                |heap, (o, row)| {
                    heap.clear();
                    for (i, &v) in row.iter().enumerate() {
                        let c = Cand(v, i as u32);
                        if heap.len() < k {
                            heap.push(Reverse(c));
                        } else if let Some(mut worst) = heap.peek_mut() {
                            if c > worst.0 {
                                *worst = Reverse(c);
                            }
                        }
                    }
                    for Reverse(c) in heap.iter() {
                        if let Some(slot) = o.get_mut(c.1 as usize) {
                            *slot = 1.0;
                        }
                    }
                },
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((n, d))))
    }
}
