//! dictionary_learning loader (TODO).

use std::path::Path;

use candle_core::Device;

use crate::sae::Sae;
use crate::{Error, Result};

/// Load a dictionary_learning release from a directory or weights file.
pub fn load(path: &Path, _device: &Device) -> Result<Sae> {
    Err(Error::Invalid(format!(
        "{}: dictionary_learning not yet supported",
        path.display()
    )))
}
