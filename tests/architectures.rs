//! Every architecture and normalization against values computed by hand.

#[path = "common/small.rs"]
mod small;

use candle_core::{DType, Device, Tensor};
use sae_ablate::sae::{Architecture, Normalization, Sae, SaeConfig};
use small::*;

#[test]
fn standard_relu_by_hand() {
    let sae = sae(Architecture::Standard);
    // x = [2,1]: x' = x - b_dec = [1.5,1.5]; pre = [1.5, 1.0, 0.25].
    // x = [-1,0]: x' = [-1.5,0.5]; pre = [-1.5, 0.0, -1.75] -> all zero.
    let x = t2(&[&[2., 1.], &[-1., 0.]]);
    let f = sae.encode(&x).unwrap();
    assert_close(&rows(&f), &[vec![1.5, 1.0, 0.25], vec![0., 0., 0.]], 1e-6);
    // decode: f W_dec + b_dec = [1.5+0.25, 2.0+0.25] + [0.5,-0.5] = [2.25, 1.75].
    let y = sae.forward(&x).unwrap();
    assert_close(&rows(&y), &[vec![2.25, 1.75], vec![0.5, -0.5]], 1e-6);
    assert_close(&rows(&sae.decode(&f).unwrap()), &rows(&y), 1e-6);
}

#[test]
fn apply_b_dec_to_input_false() {
    let mut c = SaeConfig::new(Architecture::Standard, 2, 3);
    c.apply_b_dec_to_input = false;
    let sae = Sae::new(c, weights()).unwrap();
    // x = [2,1] directly: pre = [2, 0.5, 1.25].
    let f = sae.encode(&t2(&[&[2., 1.]])).unwrap();
    assert_close(&rows(&f), &[vec![2., 0.5, 1.25]], 1e-6);
}

#[test]
fn jumprelu_threshold_boundary() {
    let sae = sae(Architecture::JumpRelu);
    // pre = [1.5, 1.0, 0.25], threshold = [1.5, 0.5, 0.1]: 1.5 > 1.5 is false.
    let f = sae.encode(&t2(&[&[2., 1.]])).unwrap();
    assert_close(&rows(&f), &[vec![0., 1.0, 0.25]], 0.0);
}

#[test]
fn topk_keeps_largest_and_breaks_ties_towards_lower_id() {
    let sae = sae(Architecture::TopK); // k = 2
    let f = sae.encode(&t2(&[&[2., 1.]])).unwrap();
    assert_close(&rows(&f), &[vec![1.5, 1.0, 0.]], 0.0);
    // Fewer than k positive pre-activations: ReLU zeroes the rest.
    let f = sae.encode(&t2(&[&[-1., 0.]])).unwrap();
    assert_close(&rows(&f), &[vec![0., 0., 0.]], 0.0);

    let mut c = SaeConfig::new(Architecture::TopK, 2, 3);
    c.k = 1;
    let sae1 = Sae::new(c, weights()).unwrap();
    // x = [1.5, 1.0]: x' = [1, 1.5], pre = [1, 1, -0.25]: a tie, id 0 wins.
    let f = sae1.encode(&t2(&[&[1.5, 1.0]])).unwrap();
    assert_close(&rows(&f), &[vec![1., 0., 0.]], 0.0);
}

#[test]
fn topk_rescale_by_decoder_norm() {
    let mut c = SaeConfig::new(Architecture::TopK, 2, 3);
    c.k = 1;
    c.rescale_acts_by_decoder_norm = true;
    let sae = Sae::new(c, weights()).unwrap();
    // norms = [1, 2, √2]; pre·norms = [1.5, 2.0, 0.354]: latent 1 with 2.0.
    let x = t2(&[&[2., 1.]]);
    assert_close(&rows(&sae.encode(&x).unwrap()), &[vec![0., 2., 0.]], 1e-6);
    // decode divides by the norm: f = [0,1,0] -> [0,2] + b_dec = [0.5, 1.5].
    assert_close(&rows(&sae.forward(&x).unwrap()), &[vec![0.5, 1.5]], 1e-6);
}

#[test]
fn topk_signed_variant() {
    let mut c = SaeConfig::new(Architecture::TopK, 2, 3);
    c.k = 1;
    c.signed = true;
    let sae = Sae::new(c, weights()).unwrap();
    // pre = [-1.5, 0, -1.75]: largest |pre| is latent 2, sign kept.
    let f = sae.encode(&t2(&[&[-1., 0.]])).unwrap();
    assert_close(&rows(&f), &[vec![0., 0., -1.75]], 1e-6);
}

#[test]
fn gated_by_hand() {
    let sae = sae(Architecture::Gated);
    // x = [2,1]: x'W = [1.5,1.5,0]; gate pre = [1.5,1.0,0.25] > 0;
    // mag = ReLU([1.5·1 − 1, 1.5·2 + 0, 0·1 + 0.5]) = [0.5, 3, 0.5].
    // x = [1.5,1]: x' = [1,1.5]; x'W = [1,1.5,-0.5]; gate pre = [1,1,-0.25];
    // mag = ReLU([0, 3, 0]) -> f = [0, 3, 0].
    let f = sae.encode(&t2(&[&[2., 1.], &[1.5, 1.]])).unwrap();
    assert_close(&rows(&f), &[vec![0.5, 3., 0.5], vec![0., 3., 0.]], 1e-6);
}

#[test]
fn constant_norm_rescale() {
    let sae = identity(Normalization::ConstantNormRescale);
    // x = [3,4]: ‖x‖ = 5, x·√2/5 = [0.848528, 1.131371].
    let x = t2(&[&[3., 4.]]);
    assert_close(
        &rows(&sae.encode(&x).unwrap()),
        &[vec![0.848_528_1, 1.131_370_8]],
        1e-6,
    );
    // Identity SAE: the reconstruction undoes the scaling.
    assert_close(&rows(&sae.forward(&x).unwrap()), &[vec![3., 4.]], 1e-6);
}

#[test]
fn layer_norm_uses_unbiased_std() {
    let sae = identity(Normalization::LayerNorm);
    // x = [1,3]: μ = 2, σ (unbiased) = √2; xn = [-1,1]/(√2 + 1e-5) = ±0.70710178.
    let x = t2(&[&[1., 3.]]);
    assert_close(
        &rows(&sae.encode(&x).unwrap()),
        &[vec![0., 0.707_101_8]],
        1e-6,
    );
    // y = f·σ + μ = [2, 2.99999293].
    assert_close(
        &rows(&sae.forward(&x).unwrap()),
        &[vec![2., 2.999_992_9]],
        1e-6,
    );
}

#[test]
fn expected_average_scaling_is_undone_on_output() {
    let sae = identity(Normalization::ExpectedAverageOnlyIn {
        scaling_factor: 2.0,
    });
    let x = t2(&[&[1., -1.]]);
    assert_close(&rows(&sae.encode(&x).unwrap()), &[vec![2., 0.]], 0.0);
    assert_close(&rows(&sae.forward(&x).unwrap()), &[vec![1., 0.]], 0.0);
    assert_close(
        &rows(&sae.decode(&t2(&[&[2., 0.]])).unwrap()),
        &[vec![1., 0.]],
        0.0,
    );
}

#[test]
fn half_precision_weights_accumulate_in_f32() {
    // The small weights are exact in f16 and bf16, so results must equal the f32 ones.
    for dt in [DType::F16, DType::BF16] {
        let mut w = weights();
        for t in [&mut w.w_enc, &mut w.b_enc, &mut w.w_dec, &mut w.b_dec] {
            *t = t.to_dtype(dt).unwrap();
        }
        let sae = Sae::new(SaeConfig::new(Architecture::Standard, 2, 3), w).unwrap();
        assert_eq!(sae.dtype(), dt);
        let x = t2(&[&[2., 1.]]).to_dtype(dt).unwrap();
        let f = sae.encode(&x).unwrap();
        assert_eq!(f.dtype(), DType::F32);
        assert_close(&rows(&f), &[vec![1.5, 1.0, 0.25]], 0.0);
    }
}

#[test]
fn leading_dims_and_empty_batches() {
    let sae = sae(Architecture::Standard);
    let x = Tensor::new(&[[[2f32, 1.]], [[-1., 0.]]], &Device::Cpu).unwrap();
    let f = sae.encode(&x).unwrap();
    assert_eq!(f.dims(), &[2, 1, 3]);
    assert_eq!(
        f.flatten_to(1).unwrap().to_vec2::<f32>().unwrap()[0],
        vec![1.5, 1.0, 0.25]
    );
    assert_eq!(sae.forward(&x).unwrap().dims(), &[2, 1, 2]);
    let empty = Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(sae.encode(&empty).unwrap().dims(), &[0, 3]);
    assert_eq!(sae.forward(&empty).unwrap().dims(), &[0, 2]);
}

#[test]
fn accessors() {
    let sae = sae(Architecture::JumpRelu);
    assert_eq!((sae.d_in(), sae.d_sae()), (2, 3));
    assert_eq!(sae.architecture(), Architecture::JumpRelu);
    assert_eq!(sae.hook_name(), None);
    assert_eq!(
        sae.decoder_direction(1).unwrap().to_vec1::<f32>().unwrap(),
        vec![0., 2.]
    );
    let err = sae.decoder_direction(3).unwrap_err().to_string();
    assert!(
        err.contains("latent id 3") && err.contains("d_sae = 3"),
        "{err}"
    );
}

#[test]
fn bad_shapes_and_configs_are_clear_errors() {
    let x = t2(&[&[1., 2., 3.]]);
    let err = sae(Architecture::Standard)
        .encode(&x)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[1, 3]") && err.contains("d_in = 2"), "{err}");

    let mut w = weights();
    w.w_dec = t2(&[&[1., 0.], &[0., 2.]]);
    let err = Sae::new(SaeConfig::new(Architecture::Standard, 2, 3), w)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("W_dec") && err.contains("[3, 2]") && err.contains("[2, 2]"),
        "{err}"
    );

    let err = Sae::new(SaeConfig::new(Architecture::JumpRelu, 2, 3), weights())
        .unwrap_err()
        .to_string();
    assert!(err.contains("threshold"), "{err}");

    let err = Sae::new(SaeConfig::new(Architecture::TopK, 2, 3), weights())
        .unwrap_err()
        .to_string();
    assert!(err.contains("k = 0"), "{err}");

    let err = Sae::new(SaeConfig::new(Architecture::Standard, 2, 0), weights())
        .unwrap_err()
        .to_string();
    assert!(err.contains("d_sae = 0"), "{err}");

    let err = "sigmoid".parse::<Architecture>().unwrap_err().to_string();
    assert!(err.contains("unknown SAE architecture `sigmoid`"), "{err}");
}
