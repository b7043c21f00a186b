//! The CUDA kernels against the CPU `EditPlan` (the reference) on a GPU: every
//! architecture, weight dtype, batch size 1/7/64/4096 and |S| = 0/1/26/4096, both splice
//! modes, every normalization, transposed weights, rescaled TopK, the skip term and the
//! dense encode. They need an NVIDIA GPU and are marked ignored; scripts/gpu-check.sh runs
//! them with `--ignored`. Each case prints one JSON line with its largest error.
#![cfg(feature = "cuda")]

#[path = "common/small.rs"]
mod small;

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use sae_ablate::edit::cuda::{CudaDevice, CudaEditPlan, DeviceTensor};
use sae_ablate::edit::EditPlan;
use sae_ablate::edit::{Edits, LatentEdit, SpliceMode};
use sae_ablate::sae::{Architecture, Normalization, Sae, SaeConfig, SaeWeights};
use small::random;

const ARCHS: [Architecture; 4] = [
    Architecture::Standard,
    Architecture::JumpRelu,
    Architecture::TopK,
    Architecture::Gated,
];

fn gpu() -> Arc<CudaDevice> {
    static DEV: OnceLock<Arc<CudaDevice>> = OnceLock::new();
    DEV.get_or_init(|| CudaDevice::new(0).expect("opening GPU 0"))
        .clone()
}

fn input(n: usize, d: usize, seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n * d)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 1.5
        })
        .collect();
    Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
}

/// Edits on `n_s` latents spread over d_sae, cycling through every edit kind, plus a
/// steering entry when `steer`.
fn edits(mode: SpliceMode, d_sae: usize, n_s: usize, steer: bool) -> Edits {
    let mut e = Edits::new(mode);
    let mut used = std::collections::HashSet::new();
    let step = (d_sae / n_s.max(1)).max(1);
    for j in 0..n_s.min(d_sae) {
        let id = ((j * step + j / 3) % d_sae) as u32;
        if !used.insert(id) {
            continue; // each latent is edited once
        }
        let edit = match j % 4 {
            0 => LatentEdit::Zero,
            1 => LatentEdit::Clamp(0.8),
            2 => LatentEdit::Scale(-1.5),
            _ => LatentEdit::Add(0.4),
        };
        e = e.with(id, edit);
    }
    if steer {
        e = e.steer((d_sae / 2) as u32, 2.0);
    }
    e
}

/// Compare the GPU splice with the CPU `EditPlan`; returns the largest error relative to
/// `1 + |reference|` and the share of rows off by more than `tol` (TopK/JumpReLU
/// decisions at the boundary can flip when the full path rounds the encoder input to
/// f16/bf16 for the GEMM; such a row is off by a whole latent).
fn compare(sae: &Sae, e: &Edits, x: &Tensor) -> (f32, f64) {
    let dev = gpu();
    let cpu = EditPlan::new(sae, e).unwrap().apply(x).unwrap();
    let plan = CudaEditPlan::new(&dev, sae, e).unwrap();
    assert_eq!(plan.is_masked(), EditPlan::new(sae, e).unwrap().is_masked());
    let got = plan
        .apply(&DeviceTensor::from_tensor(&dev, x).unwrap())
        .unwrap()
        .to_tensor(&dev)
        .unwrap();
    assert_eq!(got.dims(), cpu.dims());
    let d = sae.d_in();
    let (g, w) = (
        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        cpu.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    let tol = match sae.dtype() {
        DType::F32 => 1e-3,
        _ => 2e-2,
    };
    let mut worst = 0f32;
    let mut bad_rows = 0usize;
    for (gr, wr) in g.chunks(d).zip(w.chunks(d)) {
        let err = gr
            .iter()
            .zip(wr)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0f32, f32::max);
        worst = worst.max(err);
        if err.is_nan() || err > tol {
            bad_rows += 1;
        }
    }
    let rows = (g.len() / d).max(1);
    (worst, bad_rows as f64 / rows as f64)
}

fn report(
    check: &str,
    sae: &Sae,
    mode: SpliceMode,
    (batch, n_s): (usize, usize),
    (worst, bad, ok): (f32, f64, bool),
) {
    println!(
        "{}",
        serde_json::json!({"check": check, "arch": sae.architecture().as_str(),
            "dtype": format!("{:?}", sae.dtype()).to_lowercase(), "mode": format!("{mode:?}"),
            "batch": batch, "s": n_s, "max_rel_err": worst, "rows_off": bad, "ok": ok})
    );
}

/// The masked path is exact up to f32 rounding; the full path may flip boundary
/// decisions in a few rows with half-precision weights.
fn acceptable(sae: &Sae, mode: SpliceMode, worst: f32, bad: f64) -> bool {
    let masked = mode == SpliceMode::ErrorPreserving && sae.architecture() != Architecture::TopK;
    match (masked, sae.dtype()) {
        (true, _) | (false, DType::F32) => {
            worst
                <= if sae.dtype() == DType::F32 {
                    1e-3
                } else {
                    2e-2
                }
        }
        (false, _) => bad <= 0.02,
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with driver and cuBLAS: scripts/gpu-check.sh runs it"]
fn every_architecture_dtype_batch_and_edit_count_matches_the_cpu_plan() {
    let mut failures = Vec::new();
    for arch in ARCHS {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let sae = random(arch, 128, 4096, dt, 3);
            for batch in [1usize, 7, 64, 4096] {
                let x = input(batch, 128, batch as u64);
                for n_s in [0usize, 1, 26, 4096] {
                    for mode in [SpliceMode::ErrorPreserving, SpliceMode::Reconstruction] {
                        let e = edits(mode, 4096, n_s, n_s == 26);
                        let (worst, bad) = compare(&sae, &e, &x);
                        let ok = acceptable(&sae, mode, worst, bad);
                        report("splice", &sae, mode, (batch, n_s), (worst, bad, ok));
                        if !ok {
                            failures.push(format!(
                                "{arch} {dt:?} batch {batch} |S| {n_s} {mode:?}: {worst} ({bad})"
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
#[ignore = "needs an NVIDIA GPU with driver and cuBLAS: scripts/gpu-check.sh runs it"]
fn every_normalization_and_b_dec_setting() {
    let norms = [
        Normalization::None,
        Normalization::ExpectedAverageOnlyIn {
            scaling_factor: 2.5,
        },
        Normalization::ConstantNormRescale,
        Normalization::LayerNorm,
    ];
    for arch in ARCHS {
        for norm in norms {
            for bd in [true, false] {
                let s = random(arch, 96, 512, DType::F32, 13);
                let mut c = s.config().clone();
                c.normalization = norm;
                c.apply_b_dec_to_input = bd;
                let sae = Sae::new(c, s.weights().clone()).unwrap();
                let x = input(33, 96, 5);
                for mode in [SpliceMode::ErrorPreserving, SpliceMode::Reconstruction] {
                    let e = edits(mode, 512, 26, true);
                    let (worst, bad) = compare(&sae, &e, &x);
                    let ok = acceptable(&sae, mode, worst, bad);
                    report(norm.as_str(), &sae, mode, (33, 26), (worst, bad, ok));
                    assert!(ok, "{arch} {norm:?} b_dec {bd} {mode:?}: {worst}");
                }
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with driver and cuBLAS: scripts/gpu-check.sh runs it"]
fn transposed_weights_rescaled_and_signed_topk_and_skip() {
    for dt in [DType::F32, DType::BF16] {
        let s = random(Architecture::TopK, 64, 1024, dt, 17);
        let w = s.weights();
        // W_enc as a transposed view of [d_sae, d_in], W_dec of [d_in, d_sae].
        let w2 = SaeWeights {
            w_enc: w.w_enc.t().unwrap().contiguous().unwrap().t().unwrap(),
            w_dec: w.w_dec.t().unwrap().contiguous().unwrap().t().unwrap(),
            w_skip: Some(
                input(64, 64, 3)
                    .affine(0.1, 0.0)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap(),
            ),
            ..w.clone()
        };
        for (rescale, signed) in [(true, false), (false, true)] {
            let mut c: SaeConfig = s.config().clone();
            c.rescale_acts_by_decoder_norm = rescale;
            c.signed = signed;
            let sae = Sae::new(c, w2.clone()).unwrap();
            let x = input(65, 64, 9);
            for mode in [SpliceMode::ErrorPreserving, SpliceMode::Reconstruction] {
                let e = edits(mode, 1024, 26, true);
                let (worst, bad) = compare(&sae, &e, &x);
                let ok = acceptable(&sae, mode, worst, bad);
                report("topk-variants", &sae, mode, (65, 26), (worst, bad, ok));
                assert!(
                    ok,
                    "{dt:?} rescale {rescale} signed {signed} {mode:?}: {worst}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with driver and cuBLAS: scripts/gpu-check.sh runs it"]
fn dense_encode_matches_the_cpu_plan() {
    let dev = gpu();
    for arch in ARCHS {
        for dt in [DType::F32, DType::BF16] {
            let sae = random(arch, 96, 3000, dt, 29);
            let e = Edits::new(SpliceMode::Reconstruction);
            let x = input(19, 96, 2);
            let want = EditPlan::new(&sae, &e).unwrap().encode(&x).unwrap();
            let plan = CudaEditPlan::new(&dev, &sae, &e).unwrap();
            let got = plan
                .encode(&DeviceTensor::from_tensor(&dev, &x).unwrap())
                .unwrap()
                .to_tensor(&dev)
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let (g, w) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let tol = if dt == DType::F32 { 1e-3 } else { 3e-2 };
            let off = g
                .iter()
                .zip(&w)
                .filter(|(a, b)| (*a - *b).abs() > tol * (1.0 + b.abs()))
                .count();
            let share = off as f64 / g.len() as f64;
            println!(
                "{}",
                serde_json::json!({"check": "encode", "arch": arch.as_str(),
                    "dtype": format!("{dt:?}").to_lowercase(), "values_off": share, "ok": share <= 0.002})
            );
            assert!(
                share <= 0.002,
                "{arch} {dt:?}: {off} of {} values differ",
                g.len()
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with driver and cuBLAS: scripts/gpu-check.sh runs it"]
fn same_validation_as_the_cpu_plan_and_half_inputs() {
    let dev = gpu();
    let sae = random(Architecture::JumpRelu, 48, 64, DType::F32, 31);
    let bad = Edits::new(SpliceMode::ErrorPreserving).zero(&[64]);
    let cpu_err = EditPlan::new(&sae, &bad).err().map(|e| e.to_string());
    let gpu_err = CudaEditPlan::new(&dev, &sae, &bad)
        .err()
        .map(|e| e.to_string());
    assert!(cpu_err.is_some());
    assert_eq!(cpu_err, gpu_err);
    let plan = CudaEditPlan::new(
        &dev,
        &sae,
        &edits(SpliceMode::ErrorPreserving, 64, 5, false),
    )
    .unwrap();
    let wrong = DeviceTensor::from_tensor(&dev, &input(3, 47, 1)).unwrap();
    let err = plan.apply(&wrong).unwrap_err().to_string();
    assert!(err.contains("d_in = 48"), "{err}");
    // f16 / bf16 inputs with leading dimensions: same as the CPU plan on the same input.
    let x = input(10, 48, 4).reshape((2, 5, 48)).unwrap();
    for dt in [DType::F16, DType::BF16] {
        let xh = x.to_dtype(dt).unwrap();
        let e = edits(SpliceMode::ErrorPreserving, 64, 5, true);
        let want = EditPlan::new(&sae, &e).unwrap().apply(&xh).unwrap();
        let got = CudaEditPlan::new(&dev, &sae, &e)
            .unwrap()
            .apply(&DeviceTensor::from_tensor(&dev, &xh).unwrap())
            .unwrap()
            .to_tensor(&dev)
            .unwrap();
        assert_eq!(got.dims(), &[2, 5, 48]);
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-3);
    }
    // An empty batch.
    let empty = DeviceTensor::from_tensor(
        &dev,
        &Tensor::zeros((0, 48), DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    assert_eq!(plan.apply(&empty).unwrap().dims(), &[0, 48]);
}
