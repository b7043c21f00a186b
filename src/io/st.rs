//! Memory-mapped safetensors files.
//!
//! The header is validated once by the `safetensors` crate (offsets inside the
//! file, sizes consistent with shapes and dtypes); each tensor is then copied
//! exactly once, from the mapping into a candle tensor of its stored dtype.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors};

use crate::{Error, Result};

/// Stored dtype, shape and data offsets of one tensor.
type Info = (StDtype, Vec<usize>, (usize, usize));

/// An open, validated, memory-mapped safetensors file.
pub struct TensorFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    header_len: usize,
    infos: HashMap<String, Info>,
    metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Map and validate `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the mapping is read-only; the file may be modified by another
        // process while mapped, which can only change the values we read (every
        // access is bounds-checked against the validated header), as with any
        // memory-mapped safetensors reader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (header_len, meta) = SafeTensors::read_metadata(&mmap[..])
            .map_err(|e| Error::format("safetensors", e.to_string()).in_file(&path))?;
        let infos: HashMap<String, Info> = meta
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, (v.dtype, v.shape.clone(), v.data_offsets)))
            .collect();
        // The crate checks each tensor's bytes against its offsets, but a shape with a
        // zero dimension passes with any other dimensions (see `io::checked_numel`).
        if let Some((name, (_, shape, _))) = infos
            .iter()
            .find(|(_, (_, shape, _))| super::checked_numel(shape).is_none())
        {
            return Err(Error::format(
                "safetensors",
                format!("tensor `{name}`: shape {shape:?} overflows"),
            )
            .in_file(&path));
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(Self {
            path,
            mmap,
            header_len,
            infos,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all tensors in the file.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.infos.keys().map(|s| s.as_str()).collect();
        v.sort_unstable();
        v
    }

    /// The `__metadata__` string map of the header.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Whether the file holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.infos.contains_key(name)
    }

    /// The stored shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.infos.get(name).map(|i| i.1.as_slice())
    }

    /// Load `name` in its stored dtype (f32, f16 or bf16; f64 is narrowed to f32).
    /// Errors name the file and tensor.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.load_inner(name, device)
            .map_err(|e| e.in_file(&self.path))
    }

    /// Load `name` if present.
    pub fn load_opt(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.load(name, device).map(Some)
        } else {
            Ok(None)
        }
    }

    fn load_inner(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (dtype, shape, (start, end)) =
            self.infos.get(name).ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
            })?;
        let base = 8 + self.header_len;
        let data = self.mmap.get(base + start..base + end).ok_or_else(|| {
            Error::format("safetensors", format!("tensor `{name}` data out of bounds"))
        })?;
        let dt = match dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            StDtype::F64 => DType::F64,
            other => {
                return Err(Error::Dtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let t = Tensor::from_raw_buffer(data, dt, shape, device)?;
        Ok(if dt == DType::F64 {
            t.to_dtype(DType::F32)?
        } else {
            t
        })
    }
}
