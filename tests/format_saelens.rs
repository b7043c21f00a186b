//! SAELens format: files written in SAELens' exact layout, loaded and checked by hand;
//! save → load round trips; bad input.

#[path = "common/small.rs"]
mod small;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sae_ablate::sae::{saelens, Architecture, Format, Normalization, Sae};
use small::*;

fn write_st(path: &Path, tensors: &[(&str, Tensor)]) {
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (*n, t)), None, path).unwrap();
}

fn write_cfg(dir: &Path, cfg: serde_json::Value) {
    std::fs::write(dir.join("cfg.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
}

fn small_tensors() -> Vec<(&'static str, Tensor)> {
    let w = weights();
    vec![
        ("W_enc", w.w_enc),
        ("b_enc", w.b_enc),
        ("W_dec", w.w_dec),
        ("b_dec", w.b_dec),
    ]
}

#[test]
fn v6_jumprelu_release_loads_from_dir_and_file() {
    let dir = tmpdir("saelens-v6");
    let mut t = small_tensors();
    t.push(("threshold", t1(&[1.5, 0.5, 0.1])));
    write_st(&dir.join("sae_weights.safetensors"), &t);
    write_cfg(
        &dir,
        serde_json::json!({
            "architecture": "jumprelu", "d_in": 2, "d_sae": 3, "dtype": "float32",
            "apply_b_dec_to_input": true, "normalize_activations": "none",
            "metadata": {"hook_name": "blocks.5.hook_resid_post", "model_name": "tiny"}
        }),
    );
    for p in [dir.clone(), dir.join("sae_weights.safetensors")] {
        let sae = Sae::load(&p, &Device::Cpu).unwrap();
        assert_eq!(sae.format(), Format::SaeLens);
        assert_eq!(sae.architecture(), Architecture::JumpRelu);
        assert_eq!(sae.hook_name(), Some("blocks.5.hook_resid_post"));
        // pre = [1.5, 1.0, 0.25] vs threshold [1.5, 0.5, 0.1].
        let f = sae.encode(&t2(&[&[2., 1.]])).unwrap();
        assert_close(&rows(&f), &[vec![0., 1., 0.25]], 0.0);
    }
}

#[test]
fn log_threshold_is_exponentiated() {
    let dir = tmpdir("saelens-logthr");
    let mut t = small_tensors();
    t.push(("log_threshold", t1(&[0.0, 0.0, 0.0]))); // threshold = 1 everywhere
    write_st(&dir.join("sae_weights.safetensors"), &t);
    write_cfg(
        &dir,
        serde_json::json!({"architecture": "jumprelu", "d_in": 2, "d_sae": 3}),
    );
    let sae = saelens::load(&dir, &Device::Cpu).unwrap();
    let f = sae.encode(&t2(&[&[2., 1.]])).unwrap();
    assert_close(&rows(&f), &[vec![1.5, 0., 0.]], 0.0);
}

#[test]
fn pre_v6_flat_keys() {
    let dir = tmpdir("saelens-v5");
    write_st(&dir.join("sae_weights.safetensors"), &small_tensors());
    write_cfg(
        &dir,
        serde_json::json!({
            "d_in": 2, "d_sae": 3, "hook_point": "blocks.3.hook_resid_pre",
            "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 1},
            "normalize_activations": false, "sae_lens_training_version": "3.13.0"
        }),
    );
    let sae = Sae::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(sae.architecture(), Architecture::TopK);
    assert_eq!(sae.config().k, 1);
    assert_eq!(sae.hook_name(), Some("blocks.3.hook_resid_pre"));
    assert_eq!(sae.config().normalization, Normalization::None);
    let f = sae.encode(&t2(&[&[2., 1.]])).unwrap();
    assert_close(&rows(&f), &[vec![1.5, 0., 0.]], 0.0);

    // Boolean `true` = expected_average_only_in; with a factor in cfg it is applied.
    write_cfg(
        &dir,
        serde_json::json!({"d_in": 2, "d_sae": 3, "normalize_activations": true,
                           "normalization_scaling_factor": 2.0}),
    );
    let sae = Sae::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(
        sae.config().normalization,
        Normalization::ExpectedAverageOnlyIn {
            scaling_factor: 2.0
        }
    );
    // x = [1, 0.5] -> 2x − b_dec = [1.5, 1.5] -> pre = [1.5, 1.0, 0.25].
    assert_close(
        &rows(&sae.encode(&t2(&[&[1., 0.5]])).unwrap()),
        &[vec![1.5, 1., 0.25]],
        1e-6,
    );
}

#[test]
fn gated_release() {
    let dir = tmpdir("saelens-gated");
    let w = weights();
    write_st(
        &dir.join("sae_weights.safetensors"),
        &[
            ("W_enc", w.w_enc),
            ("b_gate", w.b_enc),
            ("W_dec", w.w_dec),
            ("b_dec", w.b_dec),
            ("r_mag", t1(&[0., std::f32::consts::LN_2, 0.])),
            ("b_mag", t1(&[-1., 0., 0.5])),
        ],
    );
    write_cfg(
        &dir,
        serde_json::json!({"architecture": "gated", "d_in": 2, "d_sae": 3}),
    );
    let sae = Sae::load(&dir, &Device::Cpu).unwrap();
    let f = sae.encode(&t2(&[&[2., 1.]])).unwrap();
    assert_close(&rows(&f), &[vec![0.5, 3., 0.5]], 1e-6);
}

fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous().unwrap();
    match t.dtype() {
        DType::F32 => t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .flatten_all()
            .unwrap()
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        d => panic!("{d:?}"),
    }
}

#[test]
fn save_load_round_trip_is_bitwise() {
    for arch in [
        Architecture::Standard,
        Architecture::JumpRelu,
        Architecture::TopK,
        Architecture::Gated,
    ] {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let sae = random(arch, 8, 32, dt, 3);
            let dir = tmpdir("saelens-rt");
            sae.save_saelens(&dir).unwrap();
            let back = Sae::load(&dir, &Device::Cpu).unwrap();
            assert_eq!(back.config().architecture, arch);
            assert_eq!(back.config().k, sae.config().k);
            assert_eq!(back.dtype(), dt);
            let a = sae.named_tensors();
            let b = back.named_tensors();
            assert_eq!(a.len(), b.len(), "{arch} {dt:?}");
            for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
                assert_eq!(na, nb);
                assert_eq!(ta.dtype(), tb.dtype(), "{na}");
                assert_eq!(bytes(ta), bytes(tb), "{arch} {dt:?} {na}");
            }
            // Written atomically: no temporary files left behind.
            let names: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names.len(), 2, "{names:?}");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(dir.join("sae_weights.safetensors"))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o644, "weights readable by others");
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

#[test]
fn saved_cfg_uses_saelens_v6_keys() {
    let mut sae = random(Architecture::TopK, 4, 8, DType::F32, 1);
    let dir = tmpdir("saelens-cfg");
    sae.save_saelens(&dir).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg["architecture"], "topk");
    assert_eq!(cfg["d_in"], 4);
    assert_eq!(cfg["d_sae"], 8);
    assert_eq!(cfg["k"], 2);
    assert_eq!(cfg["dtype"], "float32");
    assert_eq!(cfg["normalize_activations"], "none");
    assert!(cfg["metadata"].is_object());
    sae = identity(Normalization::ExpectedAverageOnlyIn {
        scaling_factor: 4.0,
    });
    // Folded on save: W_enc·4, W_dec/4; the function is unchanged.
    sae.save_saelens(&dir).unwrap();
    let back = Sae::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(back.config().normalization, Normalization::None);
    assert_close(
        &rows(&back.weights().w_enc),
        &[vec![4., 0.], vec![0., 4.]],
        0.0,
    );
    let x = t2(&[&[1., -2.], &[0.5, 3.]]);
    assert_close(
        &rows(&back.forward(&x).unwrap()),
        &rows(&sae.forward(&x).unwrap()),
        1e-6,
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let dev = Device::Cpu;
    let dir = tmpdir("saelens-bad");
    let st = dir.join("sae_weights.safetensors");

    // Missing directory content.
    let err = Sae::load(&dir, &dev).unwrap_err().to_string();
    assert!(err.contains("not a recognised SAE release"), "{err}");
    // Missing path.
    let err = Sae::load(dir.join("nope"), &dev).unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");

    // Missing tensor.
    write_st(&st, &small_tensors()[..3]);
    write_cfg(
        &dir,
        serde_json::json!({"architecture": "standard", "d_in": 2, "d_sae": 3}),
    );
    let err = Sae::load(&dir, &dev).unwrap_err().to_string();
    assert!(
        err.contains("missing tensor `b_dec`") && err.contains("sae_weights.safetensors"),
        "{err}"
    );

    // d_in mismatching the tensors: names tensor, expected and found shape.
    write_st(&st, &small_tensors());
    write_cfg(
        &dir,
        serde_json::json!({"architecture": "standard", "d_in": 4, "d_sae": 3}),
    );
    let err = Sae::load(&dir, &dev).unwrap_err().to_string();
    assert!(
        err.contains("W_enc") && err.contains("[4, 3]") && err.contains("[2, 3]"),
        "{err}"
    );

    // d_sae = 0.
    write_cfg(
        &dir,
        serde_json::json!({"architecture": "standard", "d_in": 2, "d_sae": 0}),
    );
    let err = Sae::load(&dir, &dev).unwrap_err().to_string();
    assert!(err.contains("d_sae = 0"), "{err}");

    // Unknown architecture, named in the message with the file.
    write_cfg(
        &dir,
        serde_json::json!({"architecture": "sparsemax", "d_in": 2, "d_sae": 3}),
    );
    let err = Sae::load(&dir, &dev).unwrap_err().to_string();
    assert!(
        err.contains("`sparsemax`") && err.contains("cfg.json"),
        "{err}"
    );

    // Corrupted JSON.
    std::fs::write(dir.join("cfg.json"), "{\"d_in\": 2,").unwrap();
    let err = Sae::load(&dir, &dev).unwrap_err().to_string();
    assert!(err.contains("cfg.json") && err.contains("json"), "{err}");

    // Truncated safetensors.
    write_cfg(
        &dir,
        serde_json::json!({"architecture": "standard", "d_in": 2, "d_sae": 3}),
    );
    let full = std::fs::read(&st).unwrap();
    for cut in [4, 20, full.len() - 3] {
        std::fs::write(&st, &full[..cut]).unwrap();
        let err = Sae::load(&dir, &dev).unwrap_err().to_string();
        assert!(
            err.contains("sae_weights.safetensors") && err.contains("safetensors"),
            "{err}"
        );
    }
    // A header declaring a 1 TB tensor in a tiny file.
    let header =
        r#"{"W_enc":{"dtype":"F32","shape":[262144,1048576],"data_offsets":[0,1099511627776]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 64]);
    std::fs::write(&st, bytes).unwrap();
    let err = Sae::load(&dir, &dev).unwrap_err().to_string();
    assert!(err.contains("safetensors"), "{err}");
}

#[test]
fn non_finite_weights_are_reported() {
    let mut w = weights();
    w.w_dec = t2(&[&[1., f32::NAN], &[0., 2.], &[f32::INFINITY, 1.]]);
    let sae = Sae::new(
        sae_ablate::sae::SaeConfig::new(Architecture::Standard, 2, 3),
        w,
    )
    .unwrap();
    assert_eq!(sae.non_finite().unwrap(), vec![("W_dec", 2)]);
    assert!(random(Architecture::Gated, 4, 8, DType::BF16, 2)
        .non_finite()
        .unwrap()
        .is_empty());
}
