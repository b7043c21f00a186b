//! File input/output shared by every format: memory-mapped safetensors,
//! `.npy`/`.npz` arrays, and atomic writes.

pub mod atomic;
pub mod npy;
pub mod pickle;
pub mod st;

pub use atomic::{write_atomic, write_atomic_path};
pub use st::TensorFile;
