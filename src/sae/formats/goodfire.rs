//! goodfire loader (TODO).

use std::path::Path;

use candle_core::Device;

use crate::sae::Sae;
use crate::{Error, Result};

/// Load a goodfire release from a directory or weights file.
pub fn load(path: &Path, _device: &Device) -> Result<Sae> {
    Err(Error::Invalid(format!(
        "{}: goodfire not yet supported",
        path.display()
    )))
}
