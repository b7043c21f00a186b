//! `.npy` and `.npz` arrays (TODO).
