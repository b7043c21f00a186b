//! Reused f32 buffers for the CPU forward pass on plain rows.
//!
//! Every op of a block writes a fresh activation buffer (up to `rows × 2·d_ff` floats for
//! the MLP's gate/up product). Taken from the allocator each time, a buffer that large
//! comes as new pages from the kernel: a page fault and a cleared page per 4 KiB on first
//! write, and unmapping them again interrupts the other threads to flush their TLBs. The
//! shapes repeat layer after layer and pass after pass, so finished buffers are kept here
//! and handed out again: [`zeroed`] takes one cleared, [`stale`] one for an output written
//! in full, [`recycle`] gives one back. At most
//! [`MAX_BUFFERS`] buffers of at most [`MAX_BYTES`] bytes in all are kept; the rest go
//! back to the allocator.

use std::sync::Mutex;

/// How many buffers are kept.
pub(crate) const MAX_BUFFERS: usize = 16;
/// How many bytes of buffers are kept, at most.
pub(crate) const MAX_BYTES: usize = 256 << 20;

/// Buffers smaller than this are left to the allocator (it reuses small blocks itself).
const MIN_LEN: usize = 16 << 10;

static FREE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `len` zeros: a kept one whose capacity fits (the smallest such), or a new
/// one.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    if let Some(mut v) = take(len, Vec::capacity) {
        v.clear();
        v.resize(len, 0.0);
        return v;
    }
    vec![0f32; len]
}

/// The kept buffer of the smallest `size` (its capacity, or its length: the values
/// already written) of at least `len`, if any.
fn take(len: usize, size: fn(&Vec<f32>) -> usize) -> Option<Vec<f32>> {
    if len < MIN_LEN {
        return None;
    }
    let mut free = FREE.lock().ok()?;
    let best = free
        .iter()
        .enumerate()
        .filter(|(_, v)| size(v) >= len)
        .min_by_key(|(_, v)| size(v))
        .map(|(i, _)| i)?;
    Some(free.swap_remove(best))
}

/// A buffer of `len` values left from earlier use (zeros where it grew), for an output
/// that is written in full before it is read.
pub(crate) fn stale(len: usize) -> Vec<f32> {
    // One already that long needs no zeros written to reach `len`.
    if let Some(mut v) = take(len, Vec::len).or_else(|| take(len, Vec::capacity)) {
        v.resize(len, 0.0);
        return v;
    }
    vec![0f32; len]
}

/// A copy of `x` in a kept buffer ([`stale`]).
pub(crate) fn copy(x: &[f32]) -> Vec<f32> {
    let mut v = stale(x.len());
    v.copy_from_slice(x);
    v
}

/// Keep `v` for a later [`zeroed`] or [`stale`] (or drop it when the store is full: the smallest
/// buffer goes first).
pub(crate) fn recycle(v: Vec<f32>) {
    if v.capacity() < MIN_LEN || v.capacity() * 4 > MAX_BYTES {
        return;
    }
    let Ok(mut free) = FREE.lock() else {
        return;
    };
    free.push(v);
    let bytes = |f: &[Vec<f32>]| f.iter().map(|v| v.capacity() * 4).sum::<usize>();
    while free.len() > MAX_BUFFERS || bytes(&free) > MAX_BYTES {
        let Some(small) = free
            .iter()
            .enumerate()
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i)
        else {
            break;
        };
        free.swap_remove(small);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recycled buffer comes back zeroed at the asked length, whatever it held; the
    /// store never holds more than its limits. (Other tests share the store, so only
    /// properties that hold under concurrent use are checked.)
    #[test]
    fn buffers_come_back_zeroed_and_the_store_is_bounded() -> crate::TestResult {
        let mut v = zeroed(MIN_LEN * 2);
        assert_eq!(v.len(), MIN_LEN * 2);
        v.iter_mut().for_each(|x| *x = 7.0);
        recycle(v);
        for len in [MIN_LEN, MIN_LEN * 2, 3, 0] {
            let w = zeroed(len);
            assert_eq!(w.len(), len);
            assert!(w.iter().all(|&x| x == 0.0), "len {len}");
            recycle(w);
        }
        for _ in 0..3 * MAX_BUFFERS {
            recycle(vec![1.0; MIN_LEN]);
        }
        let free = FREE.lock().map_err(|_| "the store's lock is poisoned")?;
        assert!(free.len() <= MAX_BUFFERS);
        assert!(free.iter().map(|v| v.capacity() * 4).sum::<usize>() <= MAX_BYTES);
        drop(free);
        assert_eq!(copy(&[1.0, 2.0]), vec![1.0, 2.0]);
        assert_eq!(stale(MIN_LEN + 5).len(), MIN_LEN + 5);
        assert_eq!(stale(7), vec![0.0; 7]);
        Ok(())
    }
}
