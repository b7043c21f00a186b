//! **Experimental** CUDA kernels for the fused splice (feature `cuda`).
//!
//! The kernels ([`KERNEL_SOURCE`], CUDA C) are compiled at run time by NVRTC for the
//! GPU at hand; the CUDA driver, NVRTC and cuBLAS are loaded with `dlopen` when first
//! used (cudarc's dynamic loading), so building with the feature needs no CUDA toolkit
//! and a CPU-only machine never needs a driver. The kernels mirror the CPU
//! [`EditPlan`](super::EditPlan), which stays the reference:
//!
//! * masked path (error-preserving edits of standard, JumpReLU and gated SAEs): one
//!   block per tile of tokens; the |S| edited latents' encoder columns are staged in
//!   shared memory chunk by chunk and shared by the tile's tokens; only |S| encoder
//!   columns and |S| decoder rows are read;
//! * full path (TopK, reconstruction): dense encode through cuBLAS in the weights'
//!   stored dtype (f32 accumulation), an epilogue that turns each token's
//!   pre-activations into a sorted (id, value) list (JumpReLU thresholds, gates, or TopK
//!   by a per-row radix select: never a sort), and a sparse decode of the active rows.
//!
//! Data lives in the crate's own device buffers ([`DeviceTensor`]), not candle tensors:
//! candle's CUDA backend needs `nvcc` at build time, this feature does not.
//!
//! Status: the kernels compile with NVRTC for sm_80 and sm_90 and pass `ptxas` (checked
//! in the tests without a GPU); they have **not yet run on a GPU**. Until a GPU run is
//! recorded, treat every result as unverified and compare against the CPU `EditPlan`.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use half::{bf16, f16};

use crate::edit::plan::{opt_vec, vec_f32};
use crate::edit::{Edits, SpliceMode};
use crate::sae::{Architecture, Normalization, Sae};
use crate::{Error, Result};

pub mod bench;

/// The CUDA C source of every kernel (compiled by NVRTC; no headers needed).
pub const KERNEL_SOURCE: &str = include_str!("splice.cu");

/// Every `extern "C"` kernel in [`KERNEL_SOURCE`].
pub const KERNEL_NAMES: &[&str] = &[
    "to_f32_f16",
    "to_f32_bf16",
    "masked_splice_f32",
    "masked_splice_f16",
    "masked_splice_bf16",
    "prepare_f32",
    "prepare_f16",
    "prepare_bf16",
    "epilogue",
    "scatter_dense",
    "sparse_decode_f32",
    "sparse_decode_f16",
    "sparse_decode_bf16",
];

/// Pre-activation rows held at once by the full path: chunks of tokens keep the dense
/// `[rows, d_sae]` f32 buffer and the lists under about 256 MiB each.
const FULL_CHUNK_BYTES: usize = 256 << 20;

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Invalid(format!("cuda: {what}: {e:?}"))
}

fn blas_err(what: &str) -> impl Fn(cudarc::cublas::result::CublasError) -> Error + '_ {
    move |e| Error::Invalid(format!("cuda: cuBLAS {what}: {e:?}"))
}

/// Load a shared library by path and keep it loaded for the life of the process, so that
/// the by-name lookup of the CUDA bindings finds it (the dynamic loader matches an
/// already-loaded library by its soname). Use it for a `libnvrtc.so.12` or
/// `libcublas.so.12` outside the loader's search path, e.g. from a pip wheel.
pub fn preload_library(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    if !path.is_file() {
        return Err(Error::Unavailable {
            backend: "cuda".into(),
            why: format!(
                "{} does not exist (scripts/fetch-cuda-tools.sh installs NVRTC under assets/cuda/lib)",
                path.display()
            ),
        });
    }
    // SAFETY: loading a library runs its initializers; the CUDA libraries named here are
    // plain C libraries whose initializers have no preconditions. The handle is leaked on
    // purpose: the library must stay loaded while the bindings hold its symbols.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| Error::Unavailable {
        backend: "cuda".into(),
        why: format!("cannot load {}: {e}", path.display()),
    })?;
    std::mem::forget(lib);
    Ok(())
}

/// Whether NVRTC (`libnvrtc.so`) can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver (`libcuda.so`) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Compile [`KERNEL_SOURCE`] with NVRTC to PTX for compute capability `arch`
/// (e.g. 80 for A100, 90 for H100). Needs NVRTC only: no driver, no GPU.
pub fn compile_ptx(arch: u32) -> Result<String> {
    if !nvrtc_available() {
        return Err(Error::Unavailable {
            backend: "cuda".into(),
            why: "NVRTC (libnvrtc.so.12) cannot be loaded: put it on LD_LIBRARY_PATH, call \
                  edit::cuda::preload_library, or run scripts/fetch-cuda-tools.sh"
                .into(),
        });
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{arch}"),
            "--std=c++17".into(),
        ],
        name: Some("splice.cu".into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SOURCE, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => Error::Invalid(format!(
            "cuda: NVRTC failed to compile the kernels for compute_{arch}:\n{}",
            log.to_string_lossy()
        )),
        other => Error::Invalid(format!("cuda: NVRTC (compute_{arch}): {other:?}")),
    })?;
    Ok(ptx.to_src())
}

/// A GPU with the kernels loaded: context, stream, cuBLAS handle.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    blas: CudaBlas,
    arch: u32,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .finish()
    }
}

impl CudaDevice {
    /// Open GPU `ordinal` and compile the kernels for its compute capability.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        if !driver_available() {
            return Err(Error::Unavailable {
                backend: "cuda".into(),
                why: "the CUDA driver (libcuda.so) cannot be loaded: no NVIDIA driver on this machine"
                    .into(),
            });
        }
        // SAFETY: only tries to dlopen the library by its candidate names.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Unavailable {
                backend: "cuda".into(),
                why: "cuBLAS (libcublas.so.12) cannot be loaded: install the CUDA 12 runtime \
                      libraries (e.g. pip install nvidia-cublas-cu12) and put them on LD_LIBRARY_PATH"
                    .into(),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("opening the device"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda_err("compute capability"))?;
        let arch = (major * 10 + minor) as u32;
        let ptx = compile_ptx(arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(cuda_err("loading the kernels"))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(blas_err("handle"))?;
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            module,
            blas,
            arch,
        }))
    }

    /// The device's compute capability as `major·10 + minor` (80 for A100, 90 for H100).
    pub fn arch(&self) -> u32 {
        self.arch
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(cuda_err("device name"))
    }

    /// Wait for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }

    /// The stream every kernel of this crate runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn func(&self, name: &str) -> Result<CudaFunction> {
        self.module
            .load_function(name)
            .map_err(cuda_err("kernel lookup"))
    }

    fn upload<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(v)
            .map_err(cuda_err("host to device copy"))
    }

    /// A device copy of `v`, padded to one element so that empty parameter lists still
    /// have a valid pointer.
    fn upload_f32(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        if v.is_empty() {
            self.upload(&[0f32])
        } else {
            self.upload(v)
        }
    }

    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(cuda_err("device allocation"))
    }
}

/// The element storage of a [`DeviceTensor`]: f32, or f16/bf16 as raw 16-bit words.
#[derive(Debug)]
pub enum DeviceBuf {
    /// f32 values.
    F32(CudaSlice<f32>),
    /// IEEE half-precision words.
    F16(CudaSlice<u16>),
    /// bfloat16 words.
    BF16(CudaSlice<u16>),
}

impl DeviceBuf {
    fn dtype(&self) -> DType {
        match self {
            DeviceBuf::F32(_) => DType::F32,
            DeviceBuf::F16(_) => DType::F16,
            DeviceBuf::BF16(_) => DType::BF16,
        }
    }
}

/// A dense row-major tensor in GPU memory (f32, f16 or bf16): the inputs and outputs of
/// [`CudaEditPlan`].
#[derive(Debug)]
pub struct DeviceTensor {
    buf: DeviceBuf,
    shape: Vec<usize>,
}

impl DeviceTensor {
    /// Copy a candle tensor (any device candle can read, f32/f16/bf16, any strides) to the GPU.
    pub fn from_tensor(dev: &CudaDevice, t: &Tensor) -> Result<Self> {
        let shape = t.dims().to_vec();
        let flat = t.flatten_all()?;
        let buf = match t.dtype() {
            DType::F32 => DeviceBuf::F32(dev.upload_f32(&flat.to_vec1::<f32>()?)?),
            DType::F16 => DeviceBuf::F16(dev.upload(&half_bits(&flat)?)?),
            DType::BF16 => DeviceBuf::BF16(dev.upload(&half_bits(&flat)?)?),
            other => {
                return Err(Error::Dtype {
                    name: format!("input {shape:?}"),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(DeviceTensor { buf, shape })
    }

    /// Copy back into a CPU candle tensor of the same dtype and shape.
    pub fn to_tensor(&self, dev: &CudaDevice) -> Result<Tensor> {
        let n = self.len();
        let copy = |e| Error::Invalid(format!("cuda: device to host copy: {e:?}"));
        let t = match &self.buf {
            DeviceBuf::F32(b) => {
                let mut v = dev.stream.clone_dtoh(b).map_err(copy)?;
                v.truncate(n);
                Tensor::from_vec(v, self.shape.clone(), &Device::Cpu)?
            }
            DeviceBuf::F16(b) => {
                let v = dev.stream.clone_dtoh(b).map_err(copy)?;
                let v: Vec<f16> = v[..n].iter().map(|&w| f16::from_bits(w)).collect();
                Tensor::from_vec(v, self.shape.clone(), &Device::Cpu)?
            }
            DeviceBuf::BF16(b) => {
                let v = dev.stream.clone_dtoh(b).map_err(copy)?;
                let v: Vec<bf16> = v[..n].iter().map(|&w| bf16::from_bits(w)).collect();
                Tensor::from_vec(v, self.shape.clone(), &Device::Cpu)?
            }
        };
        Ok(t)
    }

    /// The shape.
    pub fn dims(&self) -> &[usize] {
        &self.shape
    }

    /// The element dtype.
    pub fn dtype(&self) -> DType {
        self.buf.dtype()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The storage.
    pub fn buf(&self) -> &DeviceBuf {
        &self.buf
    }
}

/// The bit patterns of an f16 or bf16 tensor's values, flattened (see [`pad16`]).
fn half_bits(flat: &Tensor) -> Result<Vec<u16>> {
    Ok(pad16(match flat.dtype() {
        DType::F16 => flat.to_vec1::<f16>()?.iter().map(|v| v.to_bits()).collect(),
        _ => flat
            .to_vec1::<bf16>()?
            .iter()
            .map(|v| v.to_bits())
            .collect(),
    }))
}

fn pad16(mut v: Vec<u16>) -> Vec<u16> {
    if v.is_empty() {
        v.push(0);
    }
    v
}

/// A weight in its stored dtype on the device.
enum WBuf {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
}

/// Suffix of the kernel instantiation for a weight dtype.
fn suffix(dt: DType) -> &'static str {
    match dt {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

fn upload_weight(dev: &CudaDevice, t: &Tensor) -> Result<WBuf> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => WBuf::F32(dev.upload_f32(&flat.to_vec1::<f32>()?)?),
        DType::F16 | DType::BF16 => WBuf::Half(dev.upload(&half_bits(&flat)?)?),
        other => {
            return Err(Error::Dtype {
                name: "SAE weight".into(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

/// What the full path needs on the device.
struct FullDev {
    /// `W_enc` in its stored dtype: `[d_in, d_sae]` row-major, or `[d_sae, d_in]` row-major
    /// when `enc_t` (a transposed view on the host, uploaded without transposing).
    w_enc: WBuf,
    enc_t: bool,
    /// `W_dec [d_sae, d_in]` row-major, stored dtype.
    w_dec: WBuf,
    b_enc: CudaSlice<f32>,
    thr: CudaSlice<f32>,
    rmag: CudaSlice<f32>,
    bmag: CudaSlice<f32>,
    /// ‖W_dec[i]‖ and its inverse (rescaled TopK only).
    dnorm: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    /// Edited latents' decoder rows `[|S|, d_in]` f32 (÷ ‖W_dec[j]‖ when rescaled).
    dec_s: CudaSlice<f32>,
    sid: CudaSlice<u32>,
    /// Latent → index in S, or −1.
    edit_of: CudaSlice<i32>,
    /// `W_skip [d_in, d_in]` f32, reconstruction only.
    skip: Option<CudaSlice<f32>>,
}

/// What the masked path needs on the device.
struct MaskedDev {
    enc: WBuf,
    dec: WBuf,
    b_enc: CudaSlice<f32>,
    thr: CudaSlice<f32>,
    rmag: CudaSlice<f32>,
    bmag: CudaSlice<f32>,
}

enum PathDev {
    Masked(Box<MaskedDev>),
    Full(Box<FullDev>),
}

/// **Experimental**: the GPU counterpart of [`EditPlan`](super::EditPlan): built once from
/// an [`Sae`] (weights on any candle device) and [`Edits`], applied to
/// [`DeviceTensor`]s without a host round trip.
pub struct CudaEditPlan {
    dev: Arc<CudaDevice>,
    cfg: crate::sae::SaeConfig,
    wdt: DType,
    mode: SpliceMode,
    n_s: usize,
    ea: CudaSlice<f32>,
    eb: CudaSlice<f32>,
    b_dec: CudaSlice<f32>,
    steer: Option<CudaSlice<f32>>,
    path: PathDev,
}

impl CudaEditPlan {
    /// Validate `edits` against `sae` (as [`EditPlan::new`](super::EditPlan::new) does) and
    /// upload what the kernels need: for the masked path only the |S| encoder columns and
    /// decoder rows, for the full path the whole encoder and decoder in their stored dtype.
    pub fn new(dev: &Arc<CudaDevice>, sae: &Sae, edits: &Edits) -> Result<Self> {
        edits.validate(sae.d_sae())?;
        let c = sae.config().clone();
        let w = sae.weights();
        let (d_in, d_sae) = (c.d_in, c.d_sae);
        if d_in > i32::MAX as usize / 2 || d_sae > i32::MAX as usize / 2 {
            return Err(Error::Invalid(format!(
                "cuda: d_in = {d_in} and d_sae = {d_sae} must each be below 2^30"
            )));
        }
        let wdt = w.w_enc.dtype();
        if w.w_dec.dtype() != wdt {
            return Err(Error::Invalid(format!(
                "cuda: W_enc is {wdt:?} but W_dec is {:?}; the kernels read both in one dtype",
                w.w_dec.dtype()
            )));
        }
        let mode = edits.mode();
        let masked = mode == SpliceMode::ErrorPreserving && c.architecture != Architecture::TopK;
        let ids: Vec<u32> = edits.latent_edits().iter().map(|(i, _)| *i).collect();
        let (a, b): (Vec<f32>, Vec<f32>) =
            edits.latent_edits().iter().map(|(_, e)| e.affine()).unzip();
        // Row `id` of a 2-D weight for each edited latent, whatever the view's strides
        // (as the CPU plan gathers them): |S|·d_in values in the stored dtype.
        let rows_of = |t: &Tensor| -> Result<Tensor> {
            if ids.is_empty() {
                return Ok(Tensor::zeros((1, d_in), t.dtype(), &Device::Cpu)?);
            }
            let rows = ids
                .iter()
                .map(|&id| Ok(t.narrow(0, id as usize, 1)?.contiguous()?))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&rows, 0)?.to_device(&Device::Cpu)?)
        };
        let pick = |v: &[f32]| -> Vec<f32> {
            ids.iter()
                .filter_map(|&i| v.get(i as usize).copied())
                .collect()
        };
        let b_enc = vec_f32(&w.b_enc)?;
        let thr = opt_vec(&w.threshold)?;
        let rmag: Vec<f32> = opt_vec(&w.r_mag)?.iter().map(|v| v.exp()).collect();
        let bmag = opt_vec(&w.b_mag)?;
        let path = if masked {
            PathDev::Masked(Box::new(MaskedDev {
                enc: upload_weight(dev, &rows_of(&w.w_enc.t()?)?)?,
                dec: upload_weight(dev, &rows_of(&w.w_dec)?)?,
                b_enc: dev.upload_f32(&pick(&b_enc))?,
                thr: dev.upload_f32(&pick(&thr))?,
                rmag: dev.upload_f32(&pick(&rmag))?,
                bmag: dev.upload_f32(&pick(&bmag))?,
            }))
        } else {
            let norms = if c.rescale_acts_by_decoder_norm {
                vec_f32(&sae.decoder_norms()?)?
            } else {
                Vec::new()
            };
            let mut dec_s = vec_f32(&rows_of(&w.w_dec)?)?;
            if !norms.is_empty() {
                for (row, &id) in dec_s.chunks_mut(d_in).zip(&ids) {
                    let n = norms.get(id as usize).copied().unwrap_or(1.0);
                    row.iter_mut().for_each(|v| *v /= n);
                }
            }
            let mut edit_of = vec![-1i32; d_sae];
            for (j, &id) in ids.iter().enumerate() {
                edit_of[id as usize] = j as i32;
            }
            // W_enc as stored: a transposed view of a [d_sae, d_in] matrix goes up as is
            // and cuBLAS reads it transposed.
            let enc_t = !w.w_enc.is_contiguous() && w.w_enc.t()?.is_contiguous();
            let w_enc = if enc_t {
                upload_weight(dev, &w.w_enc.t()?)?
            } else {
                upload_weight(dev, &w.w_enc.contiguous()?)?
            };
            let dnorm = if norms.is_empty() {
                None
            } else {
                let inv: Vec<f32> = norms.iter().map(|n| 1.0 / n).collect();
                Some((dev.upload_f32(&norms)?, dev.upload_f32(&inv)?))
            };
            PathDev::Full(Box::new(FullDev {
                w_enc,
                enc_t,
                w_dec: upload_weight(dev, &w.w_dec.contiguous()?)?,
                b_enc: dev.upload_f32(&b_enc)?,
                thr: dev.upload_f32(&thr)?,
                rmag: dev.upload_f32(&rmag)?,
                bmag: dev.upload_f32(&bmag)?,
                dnorm,
                dec_s: dev.upload_f32(&dec_s)?,
                sid: dev.upload(if ids.is_empty() { &[0u32] } else { &ids })?,
                edit_of: dev.upload(&edit_of)?,
                skip: match (&w.w_skip, mode) {
                    (Some(t), SpliceMode::Reconstruction) => Some(dev.upload_f32(&vec_f32(t)?)?),
                    _ => None,
                },
            }))
        };
        let steer = if edits.steers().is_empty() {
            None
        } else {
            let mut s = vec![0f32; d_in];
            for &(id, coef) in edits.steers() {
                let row = vec_f32(&sae.decoder_direction(id as usize)?)?;
                s.iter_mut().zip(&row).for_each(|(s, r)| *s += coef * r);
            }
            Some(dev.upload_f32(&s)?)
        };
        Ok(CudaEditPlan {
            dev: dev.clone(),
            wdt,
            mode,
            n_s: ids.len(),
            ea: dev.upload_f32(&a)?,
            eb: dev.upload_f32(&b)?,
            b_dec: dev.upload_f32(&vec_f32(&w.b_dec)?)?,
            steer,
            path,
            cfg: c,
        })
    }

    /// Whether this plan runs the masked (|S|-column) path.
    pub fn is_masked(&self) -> bool {
        matches!(self.path, PathDev::Masked(_))
    }

    fn check_input(&self, x: &DeviceTensor) -> Result<usize> {
        match x.dims().last() {
            Some(&d) if d == self.cfg.d_in => {
                let n = x.len() / d;
                if n > i32::MAX as usize {
                    return Err(Error::Invalid(format!(
                        "cuda: {n} tokens in one call (max 2^31−1)"
                    )));
                }
                Ok(n)
            }
            _ => Err(Error::InputDim {
                shape: x.dims().to_vec(),
                d_in: self.cfg.d_in,
            }),
        }
    }

    /// `x` as f32 on the device (a copy only when it is f16/bf16).
    fn input_f32(&self, x: &DeviceTensor) -> Result<Option<CudaSlice<f32>>> {
        let n = x.len();
        let (name, src) = match &x.buf {
            DeviceBuf::F32(_) => return Ok(None),
            DeviceBuf::F16(b) => ("to_f32_f16", b),
            DeviceBuf::BF16(b) => ("to_f32_bf16", b),
        };
        let dev = &self.dev;
        let mut out = dev.alloc::<f32>(n)?;
        let f = dev.func(name)?;
        let n64 = n as i64;
        let blocks = (n.div_ceil(256)).clamp(1, 65_535) as u32;
        let mut lb = dev.stream.launch_builder(&f);
        lb.arg(src).arg(&mut out).arg(&n64);
        // SAFETY: the argument list matches the kernel's signature (u16*, float*, long long);
        // both buffers hold at least n elements.
        unsafe { lb.launch(cfg1(blocks, 256)) }.map_err(cuda_err(name))?;
        Ok(Some(out))
    }

    /// Apply the splice to `x [..., d_in]` (f32, f16 or bf16); returns f32 of the same
    /// shape, on the device. Same results as [`EditPlan::apply`](super::EditPlan::apply)
    /// to rounding (the full path rounds the encoder input to the weights' dtype for the
    /// cuBLAS GEMM).
    pub fn apply(&self, x: &DeviceTensor) -> Result<DeviceTensor> {
        let n = self.check_input(x)?;
        let d = self.cfg.d_in;
        let conv = self.input_f32(x)?;
        let xf: &CudaSlice<f32> = match (&conv, &x.buf) {
            (Some(c), _) => c,
            (None, DeviceBuf::F32(b)) => b,
            (None, _) => return Err(Error::Invalid("cuda: input conversion".into())),
        };
        let mut y = self.dev.alloc::<f32>(n * d)?;
        if n > 0 {
            match &self.path {
                PathDev::Masked(m) => self.run_masked(m, xf, &mut y, n)?,
                PathDev::Full(f) => self.run_full(f, xf, Some(&mut y), None, n)?,
            }
        }
        Ok(DeviceTensor {
            buf: DeviceBuf::F32(y),
            shape: x.dims().to_vec(),
        })
    }

    /// Dense latent activations `[..., d_sae]` (f32) through the full path's encode and
    /// epilogue, without the edits: the values of [`Sae::encode`].
    pub fn encode(&self, x: &DeviceTensor) -> Result<DeviceTensor> {
        let n = self.check_input(x)?;
        let f =
            match &self.path {
                PathDev::Full(f) => f.as_ref(),
                PathDev::Masked(_) => return Err(Error::Invalid(
                    "cuda: this plan runs the masked path and holds no full encoder; build one \
                     with reconstruction mode (or a TopK SAE) to encode"
                        .into(),
                )),
            };
        let conv = self.input_f32(x)?;
        let xf: &CudaSlice<f32> = match (&conv, &x.buf) {
            (Some(c), _) => c,
            (None, DeviceBuf::F32(b)) => b,
            (None, _) => return Err(Error::Invalid("cuda: input conversion".into())),
        };
        let mut dense = self.dev.alloc::<f32>(n * self.cfg.d_sae)?;
        if n > 0 {
            self.run_full(f, xf, None, Some(&mut dense), n)?;
        }
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.cfg.d_sae;
        }
        Ok(DeviceTensor {
            buf: DeviceBuf::F32(dense),
            shape,
        })
    }

    fn norm_params(&self) -> (i32, f32) {
        match self.cfg.normalization {
            Normalization::None => (0, 1.0),
            Normalization::ExpectedAverageOnlyIn { scaling_factor } => (1, scaling_factor),
            Normalization::ConstantNormRescale => (2, 1.0),
            Normalization::LayerNorm => (3, 1.0),
        }
    }

    fn arch_code(&self) -> i32 {
        match self.cfg.architecture {
            Architecture::Standard => 0,
            Architecture::JumpRelu => 1,
            Architecture::TopK => 2,
            Architecture::Gated => 3,
        }
    }

    fn run_masked(
        &self,
        m: &MaskedDev,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        let dev = &self.dev;
        let name = format!("masked_splice_{}", suffix(self.wdt));
        let f = dev.func(&name)?;
        let (ni, di, si) = (n as i32, self.cfg.d_in as i32, self.n_s as i32);
        let (norm, sf) = self.norm_params();
        let arch = self.arch_code();
        let bd = self.cfg.apply_b_dec_to_input as i32;
        let null = 0u64;
        let mut lb = dev.stream.launch_builder(&f);
        lb.arg(x).arg(y).arg(&ni).arg(&di);
        match &m.enc {
            WBuf::F32(b) => lb.arg(b),
            WBuf::Half(b) => lb.arg(b),
        };
        match &m.dec {
            WBuf::F32(b) => lb.arg(b),
            WBuf::Half(b) => lb.arg(b),
        };
        lb.arg(&m.b_enc)
            .arg(&m.thr)
            .arg(&m.rmag)
            .arg(&m.bmag)
            .arg(&self.ea)
            .arg(&self.eb)
            .arg(&si)
            .arg(&self.b_dec)
            .arg(&bd)
            .arg(&norm)
            .arg(&sf)
            .arg(&arch);
        match &self.steer {
            Some(s) => lb.arg(s),
            None => lb.arg(&null),
        };
        // SAFETY: the argument list matches `masked_splice_*` in splice.cu; x and y hold
        // n·d_in f32, enc/dec |S|·d_in weights, the per-latent vectors |S| values (padded
        // to one), b_dec and steer d_in. A null steer is checked in the kernel.
        unsafe { lb.launch(cfg1(n.div_ceil(8) as u32, 256)) }.map_err(cuda_err(&name))?;
        Ok(())
    }

    /// The full path over chunks of tokens: prepare, cuBLAS encode, epilogue, then either
    /// the sparse decode into `y` or the dense latents into `dense`.
    fn run_full(
        &self,
        fd: &FullDev,
        x: &CudaSlice<f32>,
        mut y: Option<&mut CudaSlice<f32>>,
        mut dense: Option<&mut CudaSlice<f32>>,
        n: usize,
    ) -> Result<()> {
        let dev = &self.dev;
        let (d, d_sae) = (self.cfg.d_in, self.cfg.d_sae);
        let topk = self.cfg.architecture == Architecture::TopK;
        let cap = if topk { self.cfg.k } else { d_sae };
        let rows = (FULL_CHUNK_BYTES / (d_sae * 4)).clamp(1, n);
        let half = !matches!(self.wdt, DType::F32);
        let mut xs_f = if half {
            None
        } else {
            Some(dev.alloc::<f32>(rows * d)?)
        };
        let mut xs_h = if half {
            Some(dev.alloc::<u16>(rows * d)?)
        } else {
            None
        };
        let mut denorm = dev.alloc::<f32>(rows * 2)?;
        let mut pre = dev.alloc::<f32>(rows * d_sae)?;
        let mut ids = dev.alloc::<u32>(rows * cap)?;
        let mut vals = dev.alloc::<f32>(rows * cap)?;
        let mut count = dev.alloc::<i32>(rows)?;
        let (norm, sf) = self.norm_params();
        let bd = self.cfg.apply_b_dec_to_input as i32;
        let (di, dsi, capi) = (d as i32, d_sae as i32, cap as i32);
        let null = 0u64;
        let sfx = suffix(self.wdt);
        let f_prep = dev.func(&format!("prepare_{sfx}"))?;
        let f_epi = dev.func("epilogue")?;
        let f_dec = dev.func(&format!("sparse_decode_{sfx}"))?;
        let f_scatter = dev.func("scatter_dense")?;
        for r0 in (0..n).step_by(rows) {
            let nr = rows.min(n - r0);
            let nri = nr as i32;
            let xv = x.slice(r0 * d..(r0 + nr) * d);
            // 1. normalize, write the GEMM input in the weights' dtype.
            {
                let mut lb = dev.stream.launch_builder(&f_prep);
                lb.arg(&xv);
                match (&mut xs_f, &mut xs_h) {
                    (Some(b), _) => lb.arg(b),
                    (_, Some(b)) => lb.arg(b),
                    _ => return Err(Error::Invalid("cuda: no GEMM input buffer".into())),
                };
                lb.arg(&mut denorm)
                    .arg(&nri)
                    .arg(&di)
                    .arg(&self.b_dec)
                    .arg(&bd)
                    .arg(&norm)
                    .arg(&sf);
                // SAFETY: matches `prepare_*(const float*, T*, float2*, int, int, const
                // float*, int, int, float)`; one warp per row, 8 rows per block; every
                // buffer holds `rows` rows.
                unsafe { lb.launch(cfg1(nr.div_ceil(8) as u32, 256)) }
                    .map_err(cuda_err("prepare"))?;
            }
            // 2. pre[nr, d_sae] = xs · W_enc (bias added by the epilogue).
            self.encode_gemm(fd, xs_f.as_ref(), xs_h.as_ref(), &mut pre, nr)?;
            // 3. epilogue: sorted (id, value) lists.
            {
                let arch = self.arch_code();
                let k = self.cfg.k as i32;
                let signed = self.cfg.signed as i32;
                let mut lb = dev.stream.launch_builder(&f_epi);
                lb.arg(&pre)
                    .arg(&nri)
                    .arg(&dsi)
                    .arg(&arch)
                    .arg(&k)
                    .arg(&signed)
                    .arg(&fd.b_enc)
                    .arg(&fd.thr)
                    .arg(&fd.rmag)
                    .arg(&fd.bmag);
                match &fd.dnorm {
                    Some((nrm, _)) => lb.arg(nrm),
                    None => lb.arg(&null),
                };
                lb.arg(&mut ids).arg(&mut vals).arg(&mut count).arg(&capi);
                // SAFETY: matches `epilogue` in splice.cu; one block per row; pre holds
                // nr·d_sae values, ids/vals nr·cap, count nr; the per-latent vectors d_sae
                // values where the architecture reads them (threshold for JumpReLU,
                // r_mag/b_mag for gated, the norms for rescaled TopK, null otherwise).
                unsafe { lb.launch(cfg1(nr as u32, 256)) }.map_err(cuda_err("epilogue"))?;
            }
            if let Some(dn) = dense.as_deref_mut() {
                let mut out = dn.slice_mut(r0 * d_sae..(r0 + nr) * d_sae);
                let mut lb = dev.stream.launch_builder(&f_scatter);
                lb.arg(&ids)
                    .arg(&vals)
                    .arg(&count)
                    .arg(&capi)
                    .arg(&dsi)
                    .arg(&mut out);
                // SAFETY: matches `scatter_dense`; ids are < d_sae (written by the epilogue),
                // `out` is the zeroed [nr, d_sae] block of this chunk.
                unsafe { lb.launch(cfg1(nr as u32, 256)) }.map_err(cuda_err("scatter"))?;
            }
            if let Some(yb) = y.as_deref_mut() {
                let mut yv = yb.slice_mut(r0 * d..(r0 + nr) * d);
                let mode = match self.mode {
                    SpliceMode::ErrorPreserving => 0i32,
                    SpliceMode::Reconstruction => 1i32,
                };
                let si = self.n_s as i32;
                let mut lb = dev.stream.launch_builder(&f_dec);
                lb.arg(&xv)
                    .arg(&mut yv)
                    .arg(&nri)
                    .arg(&di)
                    .arg(&mode)
                    .arg(&ids)
                    .arg(&vals)
                    .arg(&count)
                    .arg(&capi)
                    .arg(&denorm);
                match &fd.w_dec {
                    WBuf::F32(b) => lb.arg(b),
                    WBuf::Half(b) => lb.arg(b),
                };
                match &fd.dnorm {
                    Some((_, inv)) => lb.arg(inv),
                    None => lb.arg(&null),
                };
                lb.arg(&fd.dec_s)
                    .arg(&fd.sid)
                    .arg(&self.ea)
                    .arg(&self.eb)
                    .arg(&si)
                    .arg(&fd.edit_of)
                    .arg(&self.b_dec);
                match &self.steer {
                    Some(s) => lb.arg(s),
                    None => lb.arg(&null),
                };
                // SAFETY: matches `sparse_decode_*`; one block per row; x/y views hold
                // nr·d_in values, the lists come from the epilogue (ids < d_sae), w_dec is
                // [d_sae, d_in] row-major, dec_s/sid/ea/eb hold |S| entries (padded to one).
                unsafe { lb.launch(cfg1(nr as u32, 256)) }.map_err(cuda_err("decode"))?;
                drop(lb);
                if let Some(skip) = &fd.skip {
                    // y += x W_skipᵀ (f32 SGEMM): row-major y[nr, d] += x[nr, d] · W_skipᵀ.
                    skip_gemm(dev, skip, &xv, &mut yv, nr, d)?;
                }
            }
        }
        Ok(())
    }

    fn encode_gemm(
        &self,
        fd: &FullDev,
        xs_f: Option<&CudaSlice<f32>>,
        xs_h: Option<&CudaSlice<u16>>,
        pre: &mut CudaSlice<f32>,
        nr: usize,
    ) -> Result<()> {
        let dev = &self.dev;
        let (d, d_sae) = (self.cfg.d_in, self.cfg.d_sae);
        let ty = match self.wdt {
            DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
            _ => blas_sys::cudaDataType::CUDA_R_32F,
        };
        // Column-major view: preᵀ [d_sae, nr] = op(A) [d_sae, d] · xsᵀ [d, nr].
        let (op_a, lda) = if fd.enc_t {
            (blas_sys::cublasOperation_t::CUBLAS_OP_T, d)
        } else {
            (blas_sys::cublasOperation_t::CUBLAS_OP_N, d_sae)
        };
        let s = &dev.stream;
        let (a_ptr, _ga) = match &fd.w_enc {
            WBuf::F32(b) => b.device_ptr(s),
            WBuf::Half(b) => b.device_ptr(s),
        };
        let (b_ptr, _gb) = match (xs_f, xs_h) {
            (Some(b), _) => b.device_ptr(s),
            (_, Some(b)) => b.device_ptr(s),
            _ => return Err(Error::Invalid("cuda: no GEMM input buffer".into())),
        };
        let (c_ptr, _gc) = pre.device_ptr_mut(s);
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: A is W_enc (d·d_sae elements of `ty`), B is the [nr, d] row-major input of
        // `ty`, C the [nr, d_sae] f32 output; the leading dimensions match those layouts and
        // the handle is bound to this stream. alpha/beta are f32 as CUBLAS_COMPUTE_32F needs.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *dev.blas.handle(),
                op_a,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                d_sae as i32,
                nr as i32,
                d as i32,
                (&alpha as *const f32).cast(),
                a_ptr as *const _,
                ty,
                lda as i32,
                b_ptr as *const _,
                ty,
                d as i32,
                (&beta as *const f32).cast(),
                c_ptr as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                d_sae as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(blas_err("encode GEMM"))
    }
}

/// `y[nr, d] += x[nr, d] · W_skipᵀ` (row-major, f32).
fn skip_gemm(
    dev: &CudaDevice,
    skip: &CudaSlice<f32>,
    x: &cudarc::driver::CudaView<'_, f32>,
    y: &mut cudarc::driver::CudaViewMut<'_, f32>,
    nr: usize,
    d: usize,
) -> Result<()> {
    let s = &dev.stream;
    let (w_ptr, _g1) = skip.device_ptr(s);
    let (x_ptr, _g2) = x.device_ptr(s);
    let (y_ptr, _g3) = y.device_ptr_mut(s);
    let (alpha, beta) = (1f32, 1f32);
    // Column-major: yᵀ [d, nr] += W_skip [d, d] (row-major = column-major W_skipᵀ, so op T)
    // · xᵀ [d, nr].
    // SAFETY: W_skip holds d·d f32, x and y nr·d f32 each; leading dimensions are d.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *dev.blas.handle(),
            blas_sys::cublasOperation_t::CUBLAS_OP_T,
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
            d as i32,
            nr as i32,
            d as i32,
            (&alpha as *const f32).cast(),
            w_ptr as *const _,
            blas_sys::cudaDataType::CUDA_R_32F,
            d as i32,
            x_ptr as *const _,
            blas_sys::cudaDataType::CUDA_R_32F,
            d as i32,
            (&beta as *const f32).cast(),
            y_ptr as *mut _,
            blas_sys::cudaDataType::CUDA_R_32F,
            d as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
    }
    .map_err(blas_err("skip GEMM"))
}

fn cfg1(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
