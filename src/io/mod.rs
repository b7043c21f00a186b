//! File input/output shared by every format: memory-mapped safetensors,
//! `.npy`/`.npz` arrays, PyTorch pickles, and atomic writes.

pub mod atomic;
pub mod npy;
pub mod pickle;
pub(crate) mod sha256;
pub mod st;

pub use atomic::{write_atomic, write_atomic_path};
pub use st::TensorFile;

/// The element count of a tensor of `shape`, or `None` when a hostile shape would
/// overflow: the product of the *non-zero* dimensions must fit in `usize`, because
/// candle multiplies dimensions for the strides and element count even of an empty
/// tensor (`(0, 2^40, 2^40)` holds no data but overflows there). Every loader checks a
/// declared shape with this before building a tensor.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    Some(if shape.contains(&0) { 0 } else { nonzero })
}
