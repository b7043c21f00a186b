//! Where a model's tensors come from: a GGUF file or HF safetensors shards, read by name
//! in candle's `[out, in]` order.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use crate::io::TensorFile;
use crate::kernels::quant::{QMatrix, QType};
use crate::{Error, Result};

/// Source of named weight tensors.
pub(crate) trait WeightSource {
    /// The tensor `name` as `dtype`, `None` when the source lacks it.
    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>>;
    /// The matrix in a block format the quantized kernel runs: as stored where it can,
    /// else quantized to `Q8_0`.
    fn get_quant(&mut self, name: &str) -> Result<Option<QMatrix>> {
        let Some(t) = self.get(name, DType::F32)? else {
            return Ok(None);
        };
        quantize_tensor(name, &t, QType::Q8_0).map(Some)
    }
    /// Whether the source holds `name`.
    fn has(&self, name: &str) -> bool;
    /// Whether norm weights are stored as `1 + w` where the family scales by `(1 + w)`
    /// (GGUF), rather than as `w` (HF).
    fn norms_include_one(&self) -> bool;
    /// The tensor `name`, an error naming it when absent.
    fn need(&mut self, name: &str, dtype: DType) -> Result<Tensor> {
        self.get(name, dtype)?.ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })
    }
}

/// `t [rows, cols]` quantized to `ty`; errors name the tensor.
pub(crate) fn quantize_tensor(name: &str, t: &Tensor, ty: QType) -> Result<QMatrix> {
    let (r, c) = t.dims2()?;
    if c % crate::kernels::quant::QK != 0 {
        return Err(Error::Invalid(format!(
            "tensor `{name}` [{r}, {c}]: the quantized weight format needs rows of a multiple of 32 (use the dense format)"
        )));
    }
    QMatrix::quantize(
        ty,
        r,
        c,
        &t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
    )
}

fn gguf_err(path: &std::path::Path, e: candle_core::Error) -> Error {
    Error::format_candle("gguf", e).in_file(path)
}

/// A GGUF file: any block type candle reads (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
/// Q8_0, Q2_K…Q8_K).
pub(crate) struct GgufSource<'a> {
    pub ct: &'a gguf_file::Content,
    pub file: std::io::BufReader<std::fs::File>,
    pub path: PathBuf,
    pub device: Device,
}

impl WeightSource for GgufSource<'_> {
    fn has(&self, name: &str) -> bool {
        self.ct.tensor_infos.contains_key(name)
    }

    fn norms_include_one(&self) -> bool {
        true
    }

    /// `Q4_1` and `Q8_0` as stored; every other type dequantized and requantized to
    /// `Q8_0` (8.5 bits per weight: at least the precision of Q4_K/Q5_0/Q6_K).
    fn get_quant(&mut self, name: &str) -> Result<Option<QMatrix>> {
        if !self.has(name) {
            return Ok(None);
        }
        let q = self
            .ct
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| gguf_err(&self.path, e))?;
        use candle_core::quantized::GgmlDType as G;
        let ty = match q.dtype() {
            G::Q4_1 => QType::Q4_1,
            G::Q8_0 => QType::Q8_0,
            _ => {
                let t = q
                    .dequantize(&Device::Cpu)
                    .map_err(|e| gguf_err(&self.path, e))?;
                return quantize_tensor(name, &t, QType::Q8_0).map(Some);
            }
        };
        let (rows, cols) = q.shape().dims2()?;
        let data = q.data().map_err(|e| gguf_err(&self.path, e))?;
        QMatrix::from_gguf(ty, rows, cols, &data, name).map(Some)
    }

    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        if !self.has(name) {
            return Ok(None);
        }
        let q = self
            .ct
            .tensor(&mut self.file, name, &self.device)
            .map_err(|e| gguf_err(&self.path, e))?;
        let t = match dtype {
            DType::F16 => q.dequantize_f16(&self.device),
            _ => q.dequantize(&self.device),
        }
        .map_err(|e| gguf_err(&self.path, e))?;
        Ok(Some(if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        }))
    }
}

/// HF safetensors shards (memory-mapped; f32, f16 or bf16 tensors).
pub(crate) struct StSource {
    files: Vec<TensorFile>,
    index: HashMap<String, usize>,
    device: Device,
}

impl StSource {
    /// Every `*.safetensors` file of `dir`, in name order.
    pub(crate) fn open_dir(dir: &std::path::Path, device: &Device) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(Error::UnknownFormat {
                path: dir.display().to_string(),
                why: "no *.safetensors file next to config.json".into(),
            });
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = TensorFile::open(p)?;
            for n in f.names() {
                index.insert(n.to_string(), i);
            }
            files.push(f);
        }
        Ok(StSource {
            files,
            index,
            device: device.clone(),
        })
    }
}

impl WeightSource for StSource {
    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn norms_include_one(&self) -> bool {
        false
    }

    fn get(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        let Some(f) = self.index.get(name).and_then(|&i| self.files.get(i)) else {
            return Ok(None);
        };
        let t = f
            .load(name, &self.device)
            .map_err(|e| e.in_file(f.path()))?;
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => {}
            other => {
                return Err(Error::Dtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                }
                .in_file(f.path()))
            }
        }
        Ok(Some(if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        }))
    }
}
