//! sparsify loader (TODO).

use std::path::Path;

use candle_core::Device;

use crate::sae::Sae;
use crate::{Error, Result};

/// Load a sparsify release from a directory or weights file.
pub fn load(path: &Path, _device: &Device) -> Result<Sae> {
    Err(Error::Invalid(format!(
        "{}: sparsify not yet supported",
        path.display()
    )))
}
