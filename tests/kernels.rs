//! The fused CPU kernels against the reference splice (the oracle).

#[path = "common/small.rs"]
mod small;

use candle_core::{DType, Device, Tensor};
use sae_ablate::edit::EditPlan;
use sae_ablate::edit::{reference, Edits, LatentEdit, SpliceMode};
use sae_ablate::sae::{Architecture, Normalization, Sae, SaeConfig, SaeWeights};
use small::*;

const ARCHS: [Architecture; 4] = [
    Architecture::Standard,
    Architecture::JumpRelu,
    Architecture::TopK,
    Architecture::Gated,
];

fn edit_sets(mode: SpliceMode) -> Vec<Edits> {
    vec![
        Edits::new(mode),
        Edits::new(mode).zero(&[0, 3, 17, 40, 63]),
        Edits::new(mode)
            .with(5, LatentEdit::Clamp(1.5))
            .with(9, LatentEdit::Scale(-2.0))
            .with(22, LatentEdit::Add(0.75))
            .steer(30, 3.0),
    ]
}

/// Input for `sae`: bf16 weights multiply the input rounded to bf16 (as a bf16 PyTorch
/// SAE does; the reference multiplies the unrounded input by the widened weights), so
/// their tokens are drawn bf16-exact and the two paths differ by f32 summation order
/// only. The rounding itself is bounded per element in the kernels' unit tests.
fn input_for(sae: &Sae, x: &Tensor) -> Tensor {
    if sae.dtype() == DType::BF16 {
        x.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(x.dtype())
            .unwrap()
    } else {
        x.clone()
    }
}

/// [`random`], with bf16 weights encoding the input as given (no `b_dec` subtracted before
/// the encoder): with bf16-exact tokens ([`input_for`]) the encoder's input is then
/// bf16-exact too and no rounding separates the fused path from the reference, not even
/// at a threshold. `b_dec` handling is dtype-independent and covered by the other dtypes.
fn random_exact(arch: Architecture, d_in: usize, d_sae: usize, dt: DType, seed: u64) -> Sae {
    let sae = random(arch, d_in, d_sae, dt, seed);
    if dt != DType::BF16 {
        return sae;
    }
    let mut cfg = sae.config().clone();
    cfg.apply_b_dec_to_input = false;
    Sae::new(cfg, sae.weights().clone()).unwrap()
}

fn check(sae: &Sae, x: &Tensor, tol: f32) {
    let x = &input_for(sae, x);
    for mode in [SpliceMode::ErrorPreserving, SpliceMode::Reconstruction] {
        for e in edit_sets(mode) {
            let want = reference::apply(sae, x, &e).unwrap();
            let plan = EditPlan::new(sae, &e).unwrap();
            assert_eq!(
                plan.is_masked(),
                mode == SpliceMode::ErrorPreserving && sae.architecture() != Architecture::TopK
            );
            let got = plan.apply(x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let n: usize = x.dims()[..x.rank() - 1].iter().product();
            let (g, w) = (
                got.reshape((n, sae.d_in())).unwrap(),
                want.reshape((n, sae.d_in())).unwrap(),
            );
            assert_close(&rows(&g), &rows(&w), tol);
        }
    }
}

#[test]
fn fused_matches_reference_for_every_architecture_dtype_and_batch() {
    for arch in ARCHS {
        for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
            let sae = random_exact(arch, 48, 64, dt, 5);
            for n in [0usize, 1, 7, 64] {
                let x = Tensor::randn(0f32, 1.0, (n, 48), &Device::Cpu).unwrap();
                check(&sae, &x, tol);
            }
        }
    }
}

#[test]
fn non_contiguous_inputs_and_leading_dims() {
    let sae = random(Architecture::JumpRelu, 48, 64, DType::F32, 9);
    // [48, 6] transposed to [6, 48]: not contiguous.
    let x = Tensor::randn(0f32, 1.0, (48, 6), &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    assert!(!x.is_contiguous());
    check(&sae, &x, 1e-5);
    let x3 = Tensor::randn(0f32, 1.0, (2, 3, 48), &Device::Cpu).unwrap();
    check(&sae, &x3, 1e-5);
}

#[test]
fn every_normalization() {
    for norm in [
        Normalization::ExpectedAverageOnlyIn {
            scaling_factor: 0.7,
        },
        Normalization::ConstantNormRescale,
        Normalization::LayerNorm,
    ] {
        for arch in ARCHS {
            let s = random(arch, 48, 64, DType::F32, 13);
            let mut c = s.config().clone();
            c.normalization = norm;
            let sae = Sae::new(c, s.weights().clone()).unwrap();
            let x = (Tensor::randn(0f32, 1.0, (7, 48), &Device::Cpu).unwrap() * 3.0).unwrap();
            check(&sae, &x, 1e-4);
        }
    }
}

#[test]
fn transposed_weight_views_and_rescaled_topk() {
    // Encoder stored [d_sae, d_in] and decoder [d_in, d_sae] (sparsify / Goodfire layout).
    let s = random(Architecture::TopK, 48, 64, DType::F32, 17);
    let w = s.weights();
    let enc_t = w.w_enc.t().unwrap().contiguous().unwrap().t().unwrap();
    let dec_t = w.w_dec.t().unwrap().contiguous().unwrap().t().unwrap();
    let mut c = s.config().clone();
    c.rescale_acts_by_decoder_norm = true;
    let sae = Sae::new(
        c,
        SaeWeights {
            w_enc: enc_t,
            w_dec: dec_t,
            ..w.clone()
        },
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (7, 48), &Device::Cpu).unwrap();
    check(&sae, &x, 1e-5);
    let mut c = SaeConfig::new(Architecture::TopK, 48, 64);
    c.k = 5;
    c.signed = true;
    let signed = Sae::new(c, s.weights().clone()).unwrap();
    check(&signed, &x, 1e-5);
}

#[test]
fn edits_on_inactive_latents_and_hand_values() {
    // Small SAE, x = [-1, 0]: every latent inactive; x = [2,1]: f = [1.5, 1, 0.25].
    let sae = sae(Architecture::Standard);
    let x = t2(&[&[2., 1.], &[-1., 0.]]);
    let e = Edits::new(SpliceMode::ErrorPreserving).zero(&[1]);
    let y = EditPlan::new(&sae, &e).unwrap().apply(&x).unwrap();
    assert_close(&rows(&y), &[vec![2., -1.], vec![-1., 0.]], 1e-6);
    let e = Edits::new(SpliceMode::Reconstruction).with(2, LatentEdit::Clamp(1.25));
    // f' = [1.5, 1, 1.25] -> [2.75, 3.25] + b_dec = [3.25, 2.75]; row 2: [1.25, 1.25] + b_dec.
    let y = EditPlan::new(&sae, &e).unwrap().apply(&x).unwrap();
    assert_close(&rows(&y), &[vec![3.25, 2.75], vec![1.75, 0.75]], 1e-6);
    let err = EditPlan::new(&sae, &Edits::new(SpliceMode::ErrorPreserving).zero(&[3]));
    assert!(err.is_err());
}

#[test]
fn skip_connection_in_reconstructions() {
    let s = random(Architecture::TopK, 48, 64, DType::F32, 21);
    let skip = Tensor::randn(0f32, 0.1, (48, 48), &Device::Cpu).unwrap();
    let sae = Sae::new(
        s.config().clone(),
        SaeWeights {
            w_skip: Some(skip),
            ..s.weights().clone()
        },
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (7, 48), &Device::Cpu).unwrap();
    check(&sae, &x, 1e-5);
}

#[test]
fn latent_tiles_that_do_not_divide_d_sae() {
    // d_sae = 600 spans several 256-latent tiles with a ragged last one, in both encode paths.
    for (arch, dt, tol) in [
        (Architecture::TopK, DType::F32, 1e-5),
        (Architecture::JumpRelu, DType::BF16, 1e-2),
        (Architecture::Standard, DType::F16, 2e-3),
    ] {
        let sae = random_exact(arch, 40, 600, dt, 23);
        for n in [3, 33] {
            let x = Tensor::randn(0f32, 1.0, (n, 40), &Device::Cpu).unwrap();
            check(&sae, &x, tol);
        }
    }
}

#[test]
fn fused_encode_matches_reference_encode() {
    for arch in ARCHS {
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let sae = random_exact(arch, 48, 300, dt, 29);
            let plan = EditPlan::new(&sae, &Edits::new(SpliceMode::ErrorPreserving)).unwrap();
            for n in [0usize, 1, 7, 40] {
                let x = input_for(
                    &sae,
                    &Tensor::randn(0f32, 1.0, (n, 48), &Device::Cpu).unwrap(),
                );
                let got = plan.encode(&x).unwrap();
                assert_eq!(got.dims(), &[n, 300]);
                assert_close(&rows(&got), &rows(&sae.encode(&x).unwrap()), tol);
            }
        }
    }
}

#[test]
fn half_precision_inputs_and_custom_op() {
    let sae = random(Architecture::Gated, 48, 64, DType::F32, 31);
    let e = Edits::new(SpliceMode::ErrorPreserving).zero(&[1, 2, 3]);
    let plan = EditPlan::new(&sae, &e).unwrap();
    let x = Tensor::randn(0f32, 1.0, (5, 48), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let via_op = x.apply_op1_no_bwd(&plan).unwrap();
    assert_eq!(via_op.dtype(), DType::F32);
    let want = reference::apply(&sae, &x, &e).unwrap();
    assert_close(&rows(&via_op), &rows(&want), 1e-5);
    let err = plan
        .apply(&Tensor::zeros((2, 47), DType::F32, &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("d_in = 48"), "{err}");
}
