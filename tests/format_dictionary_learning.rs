//! dictionary_learning `ae.pt` (+ `config.json`) loading, one test per class,
//! against values computed by hand from the dictionary_learning equations.

#[path = "common/pickle_writer.rs"]
mod pickle_writer;

use candle_core::{DType, Device, Tensor};
use pickle_writer::{Dt, StateDict, TempDir};
use sae_ablate::sae::{dictionary_learning, Architecture, Format, Sae};

// d_in = 3, d_sae = 4. nn.Linear layout: encoder.weight [4, 3], decoder.weight [3, 4].
const W_E: [f64; 12] = [1., 0., -1., 0., 2., 0., -1., 1., 1., 0.5, 0.5, 0.5];
const B_E: [f64; 4] = [0., -1., 0.5, -2.];
const W_D: [f64; 12] = [1., 0., 0., 1., 0., 1., 0., 1., 0., 0., 1., -1.];
/// Subtracted from x = [2, 2, 2], gives x' = [1, 2, 3].
const BIAS: [f64; 3] = [1., 0., -1.];

fn transpose(m: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

fn x() -> Tensor {
    Tensor::new(&[[2f32, 2., 2.]], &Device::Cpu).unwrap()
}

fn assert_row(t: &Tensor, want: &[f32]) {
    let got = t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].len(), want.len());
    for (a, b) in got[0].iter().zip(want) {
        assert!((a - b).abs() <= 1e-5, "got {got:?}, want {want:?}");
    }
}

fn write(dir: &TempDir, sd: &StateDict, config: Option<&str>) {
    sd.write_zip(&dir.join("ae.pt"));
    if let Some(c) = config {
        std::fs::write(dir.join("config.json"), c).unwrap();
    }
}

fn config(class: &str, extra: &str) -> String {
    format!(
        r#"{{"trainer": {{"dict_class": "{class}", "activation_dim": 3, "dict_size": 4,
            "layer": 12, "lm_name": "EleutherAI/pythia-70m-deduped",
            "submodule_name": "resid_post_layer_12"{extra}}}, "buffer": {{}}}}"#
    )
}

fn nn_linear_topk(threshold: f64) -> StateDict {
    let mut sd = StateDict::new();
    sd.f32("encoder.weight", &[4, 3], &W_E)
        .f32("encoder.bias", &[4], &B_E)
        .f32("decoder.weight", &[3, 4], &W_D)
        .f32("b_dec", &[3], &BIAS)
        .tensor("k", Dt::I32, &[], &[2.0])
        .f32("threshold", &[], &[threshold]);
    sd
}

// x' = x − bias = [1, 2, 3]; pre = W_E x' + B_E = [-2, 3, 4.5, 1].

#[test]
fn standard_autoencoder() {
    // f = ReLU(pre) = [0, 3, 4.5, 1]; x̂ = W_D f + bias = [1, 4, 3.5] + [1, 0, -1].
    let dir = TempDir::new("dl-std");
    let mut sd = StateDict::new();
    sd.f32("bias", &[3], &BIAS)
        .f32("encoder.weight", &[4, 3], &W_E)
        .f32("encoder.bias", &[4], &B_E)
        .f32("decoder.weight", &[3, 4], &W_D);
    write(&dir, &sd, None);
    // Auto-detection from the directory (no config.json: class from tensor names).
    let sae = Sae::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(sae.format(), Format::DictionaryLearning);
    assert_eq!(sae.architecture(), Architecture::Standard);
    assert!(sae.config().apply_b_dec_to_input);
    assert_row(&sae.encode(&x()).unwrap(), &[0., 3., 4.5, 1.]);
    assert_row(&sae.forward(&x()).unwrap(), &[2., 4., 2.5]);
}

#[test]
fn standard_autoencoder_legacy_file() {
    let dir = TempDir::new("dl-legacy");
    let mut sd = StateDict::new();
    sd.f32("bias", &[3], &BIAS)
        .f32("encoder.weight", &[4, 3], &W_E)
        .f32("encoder.bias", &[4], &B_E)
        .f32("decoder.weight", &[3, 4], &W_D);
    sd.write_legacy(&dir.join("ae.pt"));
    let sae = dictionary_learning::load(&dir.join("ae.pt"), &Device::Cpu).unwrap();
    assert_row(&sae.forward(&x()).unwrap(), &[2., 4., 2.5]);
}

#[test]
fn topk_autoencoder() {
    // k = 2: keep 4.5 and 3 → f = [0, 3, 4.5, 0]; x̂ = [0, 3, 4.5] + [1, 0, -1].
    let dir = TempDir::new("dl-topk");
    write(
        &dir,
        &nn_linear_topk(-1.0),
        Some(&config("AutoEncoderTopK", r#", "k": 2"#)),
    );
    let sae = dictionary_learning::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(sae.architecture(), Architecture::TopK);
    assert_eq!(sae.config().k, 2);
    assert_eq!(sae.hook_name(), Some("blocks.12.hook_resid_post"));
    assert_eq!(
        sae.config().model_name.as_deref(),
        Some("EleutherAI/pythia-70m-deduped")
    );
    assert_row(&sae.encode(&x()).unwrap(), &[0., 3., 4.5, 0.]);
    assert_row(&sae.forward(&x()).unwrap(), &[1., 3., 3.5]);
    // Without config.json the same tensors read as AutoEncoderTopK, k from the buffer.
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let sae = Sae::load(dir.join("ae.pt"), &Device::Cpu).unwrap();
    assert_eq!(sae.architecture(), Architecture::TopK);
    assert_eq!(sae.config().k, 2);
}

#[test]
fn batch_topk_uses_learned_threshold() {
    // threshold 3.5: post_relu [0, 3, 4.5, 1] > 3.5 → f = [0, 0, 4.5, 0];
    // x̂ = [0, 0, 4.5] + [1, 0, -1] = [1, 0, 3.5].
    let dir = TempDir::new("dl-btk");
    write(
        &dir,
        &nn_linear_topk(3.5),
        Some(&config("BatchTopKSAE", r#", "k": 2"#)),
    );
    let sae = Sae::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(sae.architecture(), Architecture::JumpRelu);
    assert!(sae.config().apply_b_dec_to_input);
    assert_row(&sae.encode(&x()).unwrap(), &[0., 0., 4.5, 0.]);
    assert_row(&sae.forward(&x()).unwrap(), &[1., 0., 3.5]);
}

#[test]
fn matryoshka_batch_topk() {
    // Parameter layout: W_enc [3, 4], W_dec [4, 3]. threshold 2: [0, 3, 4.5, 0].
    // x̂ = [0, 3, 4.5] + [1, 0, -1] = [1, 3, 3.5].
    let dir = TempDir::new("dl-mat");
    let mut sd = StateDict::new();
    sd.f32("W_enc", &[3, 4], &transpose(&W_E, 4, 3))
        .f32("b_enc", &[4], &B_E)
        .f32("W_dec", &[4, 3], &transpose(&W_D, 3, 4))
        .f32("b_dec", &[3], &BIAS)
        .tensor("k", Dt::I32, &[], &[2.0])
        .f32("threshold", &[], &[2.0])
        .tensor("group_sizes", Dt::I64, &[2], &[1.0, 3.0]);
    write(&dir, &sd, None);
    let sae = dictionary_learning::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(sae.architecture(), Architecture::JumpRelu);
    assert_row(&sae.encode(&x()).unwrap(), &[0., 3., 4.5, 0.]);
    assert_row(&sae.forward(&x()).unwrap(), &[1., 3., 3.5]);
}

#[test]
fn jumprelu_autoencoder() {
    // apply_b_dec_to_input defaults to False: pre = W_E x + B_E with x = [1, 2, 3]
    // (b_dec not subtracted) = [-2, 3, 4.5, 1]; threshold [0, 3.5, 1, 0.5]
    // → f = [0, 0, 4.5, 1]; x̂ = W_D f + b_dec = [1, 1, 3.5] + [0.1, 0.2, 0.3].
    let dir = TempDir::new("dl-jr");
    let mut sd = StateDict::new();
    sd.f32("W_enc", &[3, 4], &transpose(&W_E, 4, 3))
        .f32("b_enc", &[4], &B_E)
        .f32("W_dec", &[4, 3], &transpose(&W_D, 3, 4))
        .f32("b_dec", &[3], &[0.1, 0.2, 0.3])
        .f32("threshold", &[4], &[0., 3.5, 1., 0.5]);
    write(&dir, &sd, Some(&config("JumpReluAutoEncoder", "")));
    let sae = Sae::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(sae.architecture(), Architecture::JumpRelu);
    assert!(!sae.config().apply_b_dec_to_input);
    let x = Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu).unwrap();
    assert_row(&sae.encode(&x).unwrap(), &[0., 0., 4.5, 1.]);
    assert_row(&sae.forward(&x).unwrap(), &[1.1, 1.2, 3.8]);
}

#[test]
fn gated_autoencoder() {
    // x_enc = W_E (x − decoder_bias) = [-2, 4, 4, 3] (no encoder bias);
    // pi_gate = x_enc + gate_bias [5, -5, 0, -1] = [3, -1, 4, 2] → gate [1, 0, 1, 1];
    // pi_mag = exp(r_mag) x_enc + mag_bias, r_mag = [0, 0, ln 2, 0], mag_bias [1, 0, -1, -4]
    //        = [-1, 4, 7, -1] → ReLU [0, 4, 7, 0]; f = [0, 0, 7, 0];
    // x̂ = W_D f + decoder_bias = [0, 0, 7] + [1, 0, -1] = [1, 0, 6].
    let dir = TempDir::new("dl-gated");
    let mut sd = StateDict::new();
    sd.f32("decoder_bias", &[3], &BIAS)
        .f32("r_mag", &[4], &[0., 0., std::f64::consts::LN_2, 0.])
        .f32("gate_bias", &[4], &[5., -5., 0., -1.])
        .f32("mag_bias", &[4], &[1., 0., -1., -4.])
        .f32("encoder.weight", &[4, 3], &W_E)
        .f32("decoder.weight", &[3, 4], &W_D);
    write(&dir, &sd, None);
    let sae = Sae::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(sae.architecture(), Architecture::Gated);
    assert_row(&sae.encode(&x()).unwrap(), &[0., 0., 7., 0.]);
    assert_row(&sae.forward(&x()).unwrap(), &[1., 0., 6.]);
}

#[test]
fn bf16_weights_keep_their_dtype() {
    let dir = TempDir::new("dl-bf16");
    let mut sd = StateDict::new();
    sd.tensor("bias", Dt::BF16, &[3], &BIAS)
        .tensor("encoder.weight", Dt::BF16, &[4, 3], &W_E)
        .tensor("encoder.bias", Dt::BF16, &[4], &B_E)
        .tensor("decoder.weight", Dt::BF16, &[3, 4], &W_D);
    write(&dir, &sd, None);
    let sae = Sae::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(sae.dtype(), DType::BF16);
    // Every value above is exact in bf16.
    assert_row(&sae.forward(&x()).unwrap(), &[2., 4., 2.5]);
}

#[test]
fn errors_name_the_tensor() {
    let dir = TempDir::new("dl-err");
    // Gated without r_mag (detected as gated from the config).
    let mut sd = StateDict::new();
    sd.f32("decoder_bias", &[3], &BIAS)
        .f32("gate_bias", &[4], &[0.; 4])
        .f32("mag_bias", &[4], &[0.; 4])
        .f32("encoder.weight", &[4, 3], &W_E)
        .f32("decoder.weight", &[3, 4], &W_D);
    write(&dir, &sd, Some(&config("GatedAutoEncoder", "")));
    let e = Sae::load(dir.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("r_mag"), "{e}");

    // Wrong decoder shape: names the stored tensor, expected and found.
    let dir = TempDir::new("dl-err2");
    let mut sd = StateDict::new();
    sd.f32("bias", &[3], &BIAS)
        .f32("encoder.weight", &[4, 3], &W_E)
        .f32("encoder.bias", &[4], &B_E)
        .f32("decoder.weight", &[4, 3], &W_E);
    write(&dir, &sd, None);
    let e = Sae::load(dir.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("decoder.weight"), "{e}");
    assert!(e.contains("[3, 4]") && e.contains("[4, 3]"), "{e}");

    // Unknown dict_class.
    std::fs::write(dir.join("config.json"), config("AutoEncoderNew", "")).unwrap();
    let e = Sae::load(dir.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("AutoEncoderNew"), "{e}");
}
