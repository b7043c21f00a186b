//! sparsify releases written in sparsify's layout (`layers.N/cfg.json` +
//! `layers.N/sae.safetensors`), checked against hand-computed activations.
//!
//! The SAE (d_in = 3, d_sae = 4, k = 2):
//! * `encoder.weight` rows (one per latent): e0 = [1,0,0], e1 = [0,1,0],
//!   e2 = [0,0,1], e3 = [1,1,0]; `encoder.bias` = [0, 0, 0, −1]
//! * `W_dec` rows: [1,0,0], [0,2,0], [0,0,1], [1,0,1]; `b_dec` = [0.5, 0, 0]
//!
//! sparsify: `pre = (x − b_dec) encoderᵀ + bias`, keep the k largest of
//! `relu(pre)`, `x̂ = f W_dec + b_dec` (+ `x W_skipᵀ`).

#[path = "common/st_writer.rs"]
mod st_writer;

use std::path::Path;

use candle_core::{Device, Tensor};
use sae_ablate::sae::{sparsify, Architecture, Format, Sae};
use serde_json::json;
use st_writer::{assert_close, write_json, write_st, TempDir, T};

fn enc_w() -> T<'static> {
    (
        "encoder.weight",
        vec![4, 3],
        vec![1., 0., 0., 0., 1., 0., 0., 0., 1., 1., 1., 0.],
    )
}
fn enc_b() -> T<'static> {
    ("encoder.bias", vec![4], vec![0., 0., 0., -1.])
}
fn w_dec() -> T<'static> {
    (
        "W_dec",
        vec![4, 3],
        vec![1., 0., 0., 0., 2., 0., 0., 0., 1., 1., 0., 1.],
    )
}
fn b_dec() -> T<'static> {
    ("b_dec", vec![3], vec![0.5, 0., 0.])
}

fn base_cfg() -> serde_json::Value {
    // As `SparseCoder.save_to_disk` writes it: the config fields plus `d_in`.
    json!({
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": true,
        "num_latents": 4,
        "k": 2,
        "multi_topk": false,
        "skip_connection": false,
        "transcode": false,
        "d_in": 3
    })
}

fn write_layer(dir: &Path, cfg: &serde_json::Value, tensors: &[T]) {
    write_json(&dir.join("cfg.json"), cfg);
    write_st(&dir.join("sae.safetensors"), tensors);
}

fn standard(dir: &Path) {
    write_layer(dir, &base_cfg(), &[enc_w(), enc_b(), w_dec(), b_dec()]);
}

fn rows(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn x(v: &[[f32; 3]]) -> Tensor {
    let flat: Vec<f32> = v.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (v.len(), 3), &Device::Cpu).unwrap()
}

fn check_standard(sae: &Sae) {
    assert_eq!(sae.format(), Format::Sparsify);
    assert_eq!(sae.architecture(), Architecture::TopK);
    assert_eq!((sae.d_in(), sae.d_sae(), sae.config().k), (3, 4, 2));
    assert!(sae.config().apply_b_dec_to_input);
    assert!(!sae.config().signed);
    // Row 0: x' = [2,1,3], pre = [2,1,3,2]: 3 (id 2), then the tie 2 = 2 goes to id 0.
    // Row 1: x' = [1,−1,−2], pre = [1,−1,−2,−1]: one positive value, the rest 0.
    let input = x(&[[2.5, 1., 3.], [1.5, -1., -2.]]);
    let f = sae.encode(&input).unwrap();
    assert_eq!(f.dims(), &[2, 4]);
    assert_close(&rows(&f), &[2., 0., 3., 0., 1., 0., 0., 0.]);
    // x̂ = 2·[1,0,0] + 3·[0,0,1] + b_dec; 1·[1,0,0] + b_dec.
    let y = sae.forward(&input).unwrap();
    assert_close(&rows(&y), &[2.5, 0., 3., 1.5, 0., 0.]);
}

#[test]
fn loads_layer_dir_weights_file_and_release_root() {
    let tmp = TempDir::new("sparsify");
    let layer = tmp.path().join("layers.5");
    standard(&layer);
    for p in [layer.clone(), layer.join("sae.safetensors")] {
        let sae = Sae::load(&p, &Device::Cpu).unwrap();
        check_standard(&sae);
        assert_eq!(sae.hook_name(), Some("blocks.5.hook_resid_post"));
    }
    for p in [
        layer.clone(),
        layer.join("cfg.json"),
        tmp.path().to_path_buf(), // a release directory with exactly one layer
    ] {
        let sae = sparsify::load(&p, &Device::Cpu).unwrap();
        check_standard(&sae);
        assert_eq!(sae.hook_name(), Some("blocks.5.hook_resid_post"));
    }
    // Auto-detection finds the layer one level down too.
    let sae = Sae::load(tmp.path(), &Device::Cpu).unwrap();
    check_standard(&sae);
    // W_enc is a transposed view of encoder.weight, not a copy.
    let sae = sparsify::load(&layer, &Device::Cpu).unwrap();
    assert!(!sae.weights().w_enc.is_contiguous());
}

#[test]
fn embed_tokens_and_unknown_dir_names() {
    let tmp = TempDir::new("sparsify-embed");
    let e = tmp.path().join("embed_tokens");
    standard(&e);
    assert_eq!(
        Sae::load(&e, &Device::Cpu).unwrap().hook_name(),
        Some("hook_embed")
    );
    let o = tmp.path().join("somewhere");
    standard(&o);
    assert_eq!(Sae::load(&o, &Device::Cpu).unwrap().hook_name(), None);
}

#[test]
fn multi_layer_release_root_asks_for_a_layer() {
    let tmp = TempDir::new("sparsify-multi");
    standard(&tmp.path().join("layers.0"));
    standard(&tmp.path().join("layers.1"));
    let msg = sparsify::load(tmp.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("layers.0, layers.1"), "{msg}");
    let msg = Sae::load(tmp.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("layers.0, layers.1"), "{msg}");
    let sae = sparsify::load(&tmp.path().join("layers.1"), &Device::Cpu).unwrap();
    assert_eq!(sae.hook_name(), Some("blocks.1.hook_resid_post"));
}

#[test]
fn d_in_absent_is_taken_from_the_tensors() {
    let tmp = TempDir::new("sparsify-din");
    let mut cfg = base_cfg();
    cfg.as_object_mut().unwrap().remove("d_in");
    write_layer(tmp.path(), &cfg, &[enc_w(), enc_b(), w_dec(), b_dec()]);
    let sae = Sae::load(tmp.path(), &Device::Cpu).unwrap();
    check_standard(&sae);
}

#[test]
fn num_latents_zero_uses_expansion_factor() {
    // num_latents 0 → d_sae = d_in · expansion_factor = 3 · 2 = 6 ≠ the stored 4.
    let tmp = TempDir::new("sparsify-ef");
    let mut cfg = base_cfg();
    cfg["num_latents"] = json!(0);
    cfg["expansion_factor"] = json!(2);
    write_layer(tmp.path(), &cfg, &[enc_w(), enc_b(), w_dec(), b_dec()]);
    let msg = Sae::load(tmp.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("encoder.weight"), "{msg}");
    assert!(msg.contains("[4, 3]") && msg.contains("[6, 3]"), "{msg}");
}

#[test]
fn signed_variant_keeps_the_largest_magnitudes_with_sign() {
    let tmp = TempDir::new("sparsify-signed");
    let mut cfg = base_cfg();
    cfg["signed"] = json!(true);
    write_layer(tmp.path(), &cfg, &[enc_w(), enc_b(), w_dec(), b_dec()]);
    let sae = Sae::load(tmp.path(), &Device::Cpu).unwrap();
    assert!(sae.config().signed);
    // x' = [1,−1,−4], pre = [1,−1,−4,−1]; |pre| = [1,1,4,1]: id 2, then the
    // three-way tie at 1 goes to id 0. Signs are kept, no ReLU.
    let input = x(&[[1.5, -1., -4.]]);
    assert_close(&rows(&sae.encode(&input).unwrap()), &[1., 0., -4., 0.]);
    // 1·[1,0,0] − 4·[0,0,1] + b_dec
    assert_close(&rows(&sae.forward(&input).unwrap()), &[1.5, 0., -4.]);
}

#[test]
fn transcoder_does_not_subtract_b_dec() {
    let tmp = TempDir::new("sparsify-tc");
    let mut cfg = base_cfg();
    cfg["transcode"] = json!(true);
    write_layer(tmp.path(), &cfg, &[enc_w(), enc_b(), w_dec(), b_dec()]);
    let sae = Sae::load(tmp.path(), &Device::Cpu).unwrap();
    assert!(!sae.config().apply_b_dec_to_input);
    // pre = [2.5, 1, 3, 2.5]: id 2, then the tie 2.5 goes to id 0.
    let input = x(&[[2.5, 1., 3.]]);
    assert_close(&rows(&sae.encode(&input).unwrap()), &[2.5, 0., 3., 0.]);
    assert_close(&rows(&sae.forward(&input).unwrap()), &[3., 0., 3.]);
}

#[test]
fn skip_connection_adds_x_w_skip_transposed() {
    let tmp = TempDir::new("sparsify-skip");
    let mut cfg = base_cfg();
    cfg["skip_connection"] = json!(true);
    // W_skip[2][0] = 1: output 2 gains x_0 (x W_skipᵀ); W_skip untransposed would
    // add x_2 to output 0 instead.
    let skip: T = (
        "W_skip",
        vec![3, 3],
        vec![0., 0., 0., 0., 0., 0., 1., 0., 0.],
    );
    write_layer(
        tmp.path(),
        &cfg,
        &[enc_w(), enc_b(), w_dec(), b_dec(), skip],
    );
    let sae = Sae::load(tmp.path(), &Device::Cpu).unwrap();
    let input = x(&[[2.5, 1., 3.]]);
    assert_close(&rows(&sae.encode(&input).unwrap()), &[2., 0., 3., 0.]);
    assert_close(&rows(&sae.forward(&input).unwrap()), &[2.5, 0., 5.5]);
    // skip_connection without W_skip in the file.
    let tmp2 = TempDir::new("sparsify-skip2");
    write_layer(tmp2.path(), &cfg, &[enc_w(), enc_b(), w_dec(), b_dec()]);
    let msg = Sae::load(tmp2.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing tensor `W_skip`"), "{msg}");
}

#[test]
fn bad_input_is_reported() {
    let tmp = TempDir::new("sparsify-bad");
    // Missing tensor: named, with the file.
    let d = tmp.path().join("missing");
    write_layer(&d, &base_cfg(), &[enc_w(), enc_b(), w_dec()]);
    let msg = Sae::load(&d, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("missing tensor `b_dec`"), "{msg}");
    assert!(msg.contains("sae.safetensors"), "{msg}");
    // Wrong shape: W_dec stored [3, 4].
    let d = tmp.path().join("shape");
    let wrong: T = ("W_dec", vec![3, 4], vec![0.; 12]);
    write_layer(&d, &base_cfg(), &[enc_w(), enc_b(), wrong, b_dec()]);
    let msg = Sae::load(&d, &Device::Cpu).unwrap_err().to_string();
    assert!(
        msg.contains("`W_dec` has shape [3, 4], expected [4, 3]"),
        "{msg}"
    );
    // groupmax.
    let d = tmp.path().join("groupmax");
    let mut cfg = base_cfg();
    cfg["activation"] = json!("groupmax");
    write_layer(&d, &cfg, &[enc_w(), enc_b(), w_dec(), b_dec()]);
    let msg = Sae::load(&d, &Device::Cpu).unwrap_err().to_string();
    assert!(
        msg.contains("groupmax") && msg.contains("cfg.json"),
        "{msg}"
    );
    // k larger than d_sae.
    let d = tmp.path().join("bigk");
    let mut cfg = base_cfg();
    cfg["k"] = json!(5);
    write_layer(&d, &cfg, &[enc_w(), enc_b(), w_dec(), b_dec()]);
    let msg = Sae::load(&d, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("k = 5"), "{msg}");
    // Missing config.
    let d = tmp.path().join("nocfg");
    write_st(
        &d.join("sae.safetensors"),
        &[enc_w(), enc_b(), w_dec(), b_dec()],
    );
    let msg = Sae::load(&d, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("cfg.json"), "{msg}");
}
