//! `sae-ablate bench --device cuda`: the GPU kernels timed against the GPU's own
//! ceilings, measured in the same run (device-to-device copy bandwidth, cuBLAS GEMM rate).
//! **Experimental**, like the kernels.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{DevicePtr, DevicePtrMut};
use serde_json::json;

use super::{blas_err, cuda_err, CudaDevice, CudaEditPlan, DeviceTensor};
use crate::bench::{op_edits, op_work, Op};
use crate::edit::{Edits, SpliceMode};
use crate::{Result, Sae};

/// The GPU's measured ceilings.
#[derive(Debug, Clone, Copy)]
pub struct GpuCeilings {
    /// Device-to-device copy, GB/s of bytes read plus bytes written.
    pub copy_gbs: f64,
    /// cuBLAS GEMM (8192³, bf16 inputs, f32 accumulation and output), TFLOP/s.
    pub gemm_bf16_tflops: f64,
    /// cuBLAS GEMM (8192³, f32), TFLOP/s.
    pub gemm_f32_tflops: f64,
}

fn best_ms<F: FnMut() -> Result<()>>(dev: &CudaDevice, budget_s: f64, mut f: F) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut runs = 0;
    while runs < 3 || start.elapsed().as_secs_f64() < budget_s {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        runs += 1;
        if runs >= 1000 {
            break;
        }
    }
    Ok(best)
}

/// Measure the copy bandwidth (1 GiB device-to-device) and the GEMM rates.
pub fn measure_ceilings(dev: &Arc<CudaDevice>) -> Result<GpuCeilings> {
    let n = 1usize << 28; // 1 GiB of f32
    let src = dev.alloc::<f32>(n)?;
    let mut dst = dev.alloc::<f32>(n)?;
    let copy_ms = best_ms(dev, 0.5, || {
        dev.stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(cuda_err("device copy"))
    })?;
    drop((src, dst));
    let m = 8192usize;
    let gemm = |ty: blas_sys::cudaDataType, elt: usize| -> Result<f64> {
        // Small non-zero values (the bit pattern 0x3c00 is 1.0 in f16, ~1.0 in bf16 terms
        // of magnitude); the values do not change the rate.
        let words = vec![0x3c00u16; m * m * elt / 2];
        let a = dev.upload(&words)?;
        let b = dev.upload(&words)?;
        let mut c = dev.alloc::<f32>(m * m)?;
        let (alpha, beta) = (1f32, 0f32);
        let ms = best_ms(dev, 0.5, || {
            let s = &dev.stream;
            let (pa, _g1) = a.device_ptr(s);
            let (pb, _g2) = b.device_ptr(s);
            let (pc, _g3) = c.device_ptr_mut(s);
            // SAFETY: A, B hold m·m elements of `ty` (m·m·elt bytes), C m·m f32; all leading
            // dimensions are m.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *dev.blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    m as i32,
                    m as i32,
                    m as i32,
                    (&alpha as *const f32).cast(),
                    pa as *const _,
                    ty,
                    m as i32,
                    pb as *const _,
                    ty,
                    m as i32,
                    (&beta as *const f32).cast(),
                    pc as *mut _,
                    blas_sys::cudaDataType::CUDA_R_32F,
                    m as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                )
            }
            .map_err(blas_err("ceiling GEMM"))
        })?;
        Ok(2.0 * (m * m * m) as f64 / (ms / 1e3) / 1e12)
    };
    let gemm_bf16_tflops = gemm(blas_sys::cudaDataType::CUDA_R_16BF, 2)?;
    let gemm_f32_tflops = gemm(blas_sys::cudaDataType::CUDA_R_32F, 4)?;
    Ok(GpuCeilings {
        copy_gbs: 2.0 * (n * 4) as f64 / (copy_ms / 1e3) / 1e9,
        gemm_bf16_tflops,
        gemm_f32_tflops,
    })
}

/// The plan an op runs: a reconstruction plan (full encoder) for `encode`, the op's
/// edits otherwise.
pub fn op_plan(dev: &Arc<CudaDevice>, sae: &Sae, op: Op) -> Result<CudaEditPlan> {
    match op {
        Op::Encode => CudaEditPlan::new(dev, sae, &Edits::new(SpliceMode::Reconstruction)),
        _ => CudaEditPlan::new(dev, sae, &op_edits(op, sae.d_sae())?),
    }
}

/// Time `plan` (built by [`op_plan`] for `op`) at one batch size; returns the best wall
/// time in ms (synchronized, output allocation included).
pub fn time_op(
    dev: &Arc<CudaDevice>,
    plan: &CudaEditPlan,
    op: Op,
    d_in: usize,
    batch: usize,
    budget_s: f64,
) -> Result<f64> {
    let x = Tensor::randn(0f32, 1f32, (batch, d_in), &Device::Cpu)?;
    let x = DeviceTensor::from_tensor(dev, &x)?;
    match op {
        Op::Encode => best_ms(dev, budget_s, || plan.encode(&x).map(drop)),
        _ => best_ms(dev, budget_s, || plan.apply(&x).map(drop)),
    }
}

/// Run the benchmark rows (every op at every batch size) and hand each JSON row to `emit`:
/// first the device and its ceilings, then one row per (batch, op) with the share of the
/// relevant ceiling (bandwidth at batch ≤ 8, GEMM rate above; none for ablate26/steer).
pub fn run(
    dev: &Arc<CudaDevice>,
    sae: &Sae,
    ops: &[Op],
    batches: &[usize],
    budget_s: f64,
    ceilings: bool,
    emit: &mut dyn FnMut(serde_json::Value),
) -> Result<()> {
    let ceil = if ceilings {
        Some(measure_ceilings(dev)?)
    } else {
        None
    };
    emit(
        json!({"device": dev.name()?, "arch": dev.arch(), "experimental": true,
        "ceilings": ceil.map(|c| json!({"copy_gbs": c.copy_gbs,
            "gemm_bf16_tflops": c.gemm_bf16_tflops, "gemm_f32_tflops": c.gemm_f32_tflops}))}),
    );
    let size = format!("{}x{}", sae.d_in(), sae.d_sae());
    let dtype = format!("{:?}", sae.dtype()).to_lowercase();
    // One plan per op (the weights go to the GPU once), reused for every batch size.
    let plans = ops
        .iter()
        .map(|&op| op_plan(dev, sae, op))
        .collect::<Result<Vec<_>>>()?;
    for &batch in batches {
        for (&op, plan) in ops.iter().zip(&plans) {
            let ms = time_op(dev, plan, op, sae.d_in(), batch, budget_s)?;
            let (bytes, flops) = op_work(sae, op, batch);
            let gemm_tflops = |c: &GpuCeilings| match sae.dtype() {
                DType::F32 => c.gemm_f32_tflops,
                _ => c.gemm_bf16_tflops,
            };
            let (pct, what) = match (op, ceil) {
                (Op::Ablate26 | Op::Steer, _) | (_, None) => (None, "none"),
                (_, Some(c)) if batch <= 8 => (
                    Some(bytes / (ms / 1e3) / 1e9 / c.copy_gbs * 100.0),
                    "copy_bw",
                ),
                (_, Some(c)) => (
                    Some(flops / (ms / 1e3) / 1e12 / gemm_tflops(&c) * 100.0),
                    "gemm",
                ),
            };
            emit(
                json!({"device": "cuda", "size": size, "dtype": dtype, "batch": batch,
                "op": op.as_str(), "path": "fused", "ms": ms, "tok_s": batch as f64 / (ms / 1e3),
                "pct_of_ceiling": pct, "ceiling": what}),
            );
        }
    }
    Ok(())
}
