//! [`FloatDtype`]: the floating-point dtypes weights, caches and activation shards are
//! kept in, with the one parser of their names (`f32`, `f16`, `bf16`).

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A floating-point dtype this crate stores tensors in: `f32`, `f16` or `bf16`.
///
/// Parses from and prints as its name; converts to and from candle's [`DType`].
///
/// ```
/// use sae_ablate::FloatDtype;
/// let d: FloatDtype = "bf16".parse()?;
/// assert_eq!(candle_core::DType::from(d), candle_core::DType::BF16);
/// assert_eq!(d.to_string(), "bf16");
/// assert!("f8".parse::<FloatDtype>().is_err());
/// # Ok::<(), sae_ablate::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FloatDtype {
    /// 32-bit IEEE float.
    #[default]
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
}

names!(FloatDtype, "dtype", F32 => "f32", F16 => "f16", BF16 => "bf16");

impl FloatDtype {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::F16 | FloatDtype::BF16 => 2,
        }
    }
}

impl From<FloatDtype> for DType {
    fn from(d: FloatDtype) -> DType {
        match d {
            FloatDtype::F32 => DType::F32,
            FloatDtype::F16 => DType::F16,
            FloatDtype::BF16 => DType::BF16,
        }
    }
}

impl TryFrom<DType> for FloatDtype {
    type Error = Error;
    /// F32, F16 and BF16; any other dtype is an [`Error::UnknownName`].
    fn try_from(d: DType) -> Result<Self> {
        match d {
            DType::F32 => Ok(FloatDtype::F32),
            DType::F16 => Ok(FloatDtype::F16),
            DType::BF16 => Ok(FloatDtype::BF16),
            other => Err(Error::unknown_name(
                "float dtype",
                format!("{other:?}"),
                Self::NAMES.join(", "),
            )),
        }
    }
}
