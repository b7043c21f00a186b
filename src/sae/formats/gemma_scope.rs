//! gemma_scope loader (TODO).

use std::path::Path;

use candle_core::Device;

use crate::sae::Sae;
use crate::{Error, Result};

/// Load a gemma_scope release from a directory or weights file.
pub fn load(path: &Path, _device: &Device) -> Result<Sae> {
    Err(Error::Invalid(format!(
        "{}: gemma_scope not yet supported",
        path.display()
    )))
}
