//! Llama Scope releases in their Hugging Face layout
//! (`<release>/hyperparams.json` + `<release>/checkpoints/final.safetensors`),
//! checked against values computed by hand from SAELens' mapping.
//!
//! The SAE (d_model = 4, d_sae = 3), stored as bf16 like the real releases
//! (every value below is exact in bf16):
//! * `encoder.weight [3, 4]` rows: [1,0,0,0], [0,1,0,0], [1,1,1,1];
//!   `encoder.bias` = [0, 0, −1]
//! * `decoder.weight [4, 3]` (columns are latent directions): latent 0 → [1,0,0,0],
//!   latent 1 → [0,2,0,0], latent 2 → [0,0,0,1]; `decoder.bias` = [0.5, 0, 0, 0]
//! * `dataset_average_activation_norm.in` = 4 → s = √4 / 4 = 0.5;
//!   `jump_relu_threshold` = 2 → threshold 2·s = 1.
//!
//! For x = [4, 2, 2, 2]: s·x = [2, 1, 1, 1]; pre = [2, 1, 4]; latent 1 sits at the
//! threshold and is off: f = [2, 0, 4]; SAE-space output
//! 2·[1,0,0,0] + 4·[0,0,0,1] + [0.5,0,0,0] = [2.5, 0, 0, 4], divided by s: [5, 0, 0, 8].

#[path = "common/st_writer.rs"]
mod st_writer;

use std::path::Path;

use candle_core::{Device, Tensor};
use sae_ablate::sae::{llama_scope, Architecture, Format, Normalization, Sae};
use serde_json::json;
use st_writer::{assert_close, write_json, write_st, write_st_bf16, TempDir, T};

fn tensors() -> Vec<T<'static>> {
    vec![
        (
            "encoder.weight",
            vec![3, 4],
            vec![1., 0., 0., 0., 0., 1., 0., 0., 1., 1., 1., 1.],
        ),
        ("encoder.bias", vec![3], vec![0., 0., -1.]),
        (
            "decoder.weight",
            vec![4, 3],
            vec![1., 0., 0., 0., 2., 0., 0., 0., 0., 0., 0., 1.],
        ),
        ("decoder.bias", vec![4], vec![0.5, 0., 0., 0.]),
    ]
}

fn hyperparams() -> serde_json::Value {
    json!({
        "d_model": 4,
        "d_sae": 3,
        "expansion_factor": 0.75,
        "act_fn": "jumprelu",
        "jump_relu_threshold": 2.0,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 4.0, "out": 4.0},
        "hook_point_in": "blocks.15.hook_resid_post",
        "hook_point_out": "blocks.15.hook_resid_post",
        "apply_decoder_bias_to_pre_encoder": false,
        "sparsity_include_decoder_norm": true,
        "use_decoder_bias": true,
        "top_k": 50
    })
}

fn write_release(dir: &Path, hp: Option<&serde_json::Value>, t: &[T]) {
    write_st_bf16(&dir.join("checkpoints/final.safetensors"), t);
    if let Some(h) = hp {
        write_json(&dir.join("hyperparams.json"), h);
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn input() -> Tensor {
    Tensor::new(&[[4f32, 2., 2., 2.]], &Device::Cpu).unwrap()
}

fn check(sae: &Sae) {
    assert_eq!(sae.format(), Format::LlamaScope);
    assert_eq!(sae.architecture(), Architecture::JumpRelu);
    assert_eq!((sae.d_in(), sae.d_sae()), (4, 3));
    assert_eq!(sae.hook_name(), Some("blocks.15.hook_resid_post"));
    assert!(!sae.config().apply_b_dec_to_input);
    assert_eq!(
        sae.config().normalization,
        Normalization::ExpectedAverageOnlyIn {
            scaling_factor: 0.5
        }
    );
    let thr = sae.weights().threshold.as_ref().unwrap();
    assert_eq!(thr.dims(), &[3]);
    assert_close(&flat(thr), &[1., 1., 1.]);
    assert_close(&flat(&sae.encode(&input()).unwrap()), &[2., 0., 4.]);
    assert_close(&flat(&sae.forward(&input()).unwrap()), &[5., 0., 0., 8.]);
    // decode undoes the constant normalization too.
    let f = Tensor::new(&[[2f32, 0., 4.]], &Device::Cpu).unwrap();
    assert_close(&flat(&sae.decode(&f).unwrap()), &[5., 0., 0., 8.]);
}

#[test]
fn loads_release_dir_weights_file_and_hyperparams() {
    let tmp = TempDir::new("llama-scope");
    let dir = tmp.path().join("Llama3_1-8B-Base-L15R-8x");
    write_release(&dir, Some(&hyperparams()), &tensors());
    for p in [dir.clone(), dir.join("checkpoints/final.safetensors")] {
        check(&Sae::load(&p, &Device::Cpu).unwrap());
    }
    for p in [
        dir.clone(),
        dir.join("hyperparams.json"),
        dir.join("checkpoints/final.safetensors"),
    ] {
        check(&llama_scope::load(&p, &Device::Cpu).unwrap());
    }
    // Weights beside hyperparams.json (no checkpoints/), stored as f32.
    let flat_dir = tmp.path().join("flat");
    write_st(&flat_dir.join("final.safetensors"), &tensors());
    write_json(&flat_dir.join("hyperparams.json"), &hyperparams());
    check(&Sae::load(&flat_dir, &Device::Cpu).unwrap());
    check(&Sae::load(flat_dir.join("final.safetensors"), &Device::Cpu).unwrap());
    // Both weight matrices are transposed views, not copies.
    let sae = Sae::load(&dir, &Device::Cpu).unwrap();
    assert!(!sae.weights().w_enc.is_contiguous());
    assert!(!sae.weights().w_dec.is_contiguous());
}

#[test]
fn scaling_follows_the_input_norm() {
    // in = 1 → s = 2; threshold 0.25 · 2 = 0.5. x = [1, 0.25, 0, 0]:
    // s·x = [2, 0.5, 0, 0], pre = [2, 0.5, 2.5 − 1 = 1.5]; latent 1 at 0.5 is off.
    // SAE-space out: 2·e0 + 1.5·e3 + [0.5,0,0,0] = [2.5, 0, 0, 1.5]; / 2 → [1.25, 0, 0, 0.75].
    let tmp = TempDir::new("llama-scope-s2");
    let mut hp = hyperparams();
    hp["dataset_average_activation_norm"] = json!({"in": 1.0, "out": 1.0});
    hp["jump_relu_threshold"] = json!(0.25);
    write_release(tmp.path(), Some(&hp), &tensors());
    let sae = Sae::load(tmp.path(), &Device::Cpu).unwrap();
    assert_eq!(
        sae.config().normalization,
        Normalization::ExpectedAverageOnlyIn {
            scaling_factor: 2.0
        }
    );
    let x = Tensor::new(&[[1f32, 0.25, 0., 0.]], &Device::Cpu).unwrap();
    assert_close(&flat(&sae.encode(&x).unwrap()), &[2., 0., 1.5]);
    assert_close(&flat(&sae.forward(&x).unwrap()), &[1.25, 0., 0., 0.75]);
}

#[test]
fn decoder_bias_applied_to_pre_encoder_when_asked() {
    // apply_decoder_bias_to_pre_encoder: x' = s·x − b_dec = [1.5, 1, 1, 1];
    // pre = [1.5, 1, 3.5] → f = [1.5, 0, 3.5];
    // out = ([1.5,0,0,0] + [0,0,0,3.5] + [0.5,0,0,0]) / 0.5 = [4, 0, 0, 7].
    let tmp = TempDir::new("llama-scope-bdec");
    let mut hp = hyperparams();
    hp["apply_decoder_bias_to_pre_encoder"] = json!(true);
    write_release(tmp.path(), Some(&hp), &tensors());
    let sae = Sae::load(tmp.path(), &Device::Cpu).unwrap();
    assert!(sae.config().apply_b_dec_to_input);
    assert_close(&flat(&sae.encode(&input()).unwrap()), &[1.5, 0., 3.5]);
    assert_close(&flat(&sae.forward(&input()).unwrap()), &[4., 0., 0., 7.]);
}

#[test]
fn bad_config_is_reported() {
    let tmp = TempDir::new("llama-scope-cfg");
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "topk",
            {
                let mut h = hyperparams();
                h["act_fn"] = json!("topk");
                h
            },
            "act_fn `topk`",
        ),
        (
            "tokenwise",
            {
                let mut h = hyperparams();
                h["norm_activation"] = json!("token-wise");
                h
            },
            "norm_activation `token-wise`",
        ),
        (
            "transcoder",
            {
                let mut h = hyperparams();
                h["hook_point_out"] = json!("blocks.15.hook_mlp_out");
                h
            },
            "transcoders are not supported",
        ),
        (
            "nonorm",
            {
                let mut h = hyperparams();
                h.as_object_mut()
                    .unwrap()
                    .remove("dataset_average_activation_norm");
                h
            },
            "dataset_average_activation_norm",
        ),
        (
            "zeronorm",
            {
                let mut h = hyperparams();
                h["dataset_average_activation_norm"] = json!({"in": 0.0, "out": 0.0});
                h
            },
            "must be positive",
        ),
        (
            "nothr",
            {
                let mut h = hyperparams();
                h.as_object_mut().unwrap().remove("jump_relu_threshold");
                h
            },
            "jump_relu_threshold",
        ),
    ];
    for (name, hp, want) in cases {
        let d = tmp.path().join(name);
        write_release(&d, Some(&hp), &tensors());
        let msg = Sae::load(&d, &Device::Cpu).unwrap_err().to_string();
        assert!(msg.contains(want), "{name}: {msg}");
        assert!(msg.contains("hyperparams.json"), "{name}: {msg}");
    }
    // Missing hyperparams.json.
    let d = tmp.path().join("nocfg");
    write_release(&d, None, &tensors());
    let msg = Sae::load(&d, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("hyperparams.json"), "{msg}");
}

#[test]
fn bad_tensors_are_reported() {
    let tmp = TempDir::new("llama-scope-t");
    let d = tmp.path().join("missing");
    let mut t = tensors();
    t.retain(|(n, _, _)| *n != "decoder.bias");
    write_release(&d, Some(&hyperparams()), &t);
    let msg = Sae::load(&d, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("missing tensor `decoder.bias`"), "{msg}");
    assert!(msg.contains("final.safetensors"), "{msg}");
    // decoder.weight stored in the encoder's orientation.
    let d = tmp.path().join("shape");
    let mut t = tensors();
    t[2] = ("decoder.weight", vec![3, 4], vec![0.; 12]);
    write_release(&d, Some(&hyperparams()), &t);
    let msg = Sae::load(&d, &Device::Cpu).unwrap_err().to_string();
    assert!(
        msg.contains("`decoder.weight` has shape [3, 4], expected [4, 3]"),
        "{msg}"
    );
}
