//! Gemma Scope (`params.npz`) and Gemma Scope 2 (`params.safetensors` +
//! `config.json`) releases in Google's layout, checked against hand-computed values.
//!
//! The SAE (d_in = 3, d_sae = 4), JumpReLU without `b_dec` subtraction:
//! * `W_enc [3, 4]` columns (one per latent): [1,0,0], [0,1,0], [0,0,1], [1,1,1]
//! * `b_enc` = [0, 0.5, 0, −1], `threshold` = [1, 1, 0.5, 2]
//! * `W_dec` rows: [1,0,0], [0,1,0], [0,0,2], [1,1,0]; `b_dec` = [0.1, 0.2, 0.3]
//!
//! `pre = x W_enc + b_enc`, `f = pre · 1[pre > threshold]` (ReLU'd), `x̂ = f W_dec + b_dec`.
//! For x = [1, 0.5, 2]: pre = [1, 1, 2, 2.5]; latents 0 and 1 sit exactly at their
//! threshold and are off; f = [0, 0, 2, 2.5]; x̂ = [2.6, 2.7, 4.3].

#[path = "common/checks.rs"]
mod checks;
use checks::err_naming;
#[path = "common/st_writer.rs"]
mod st_writer;

use std::path::Path;

use candle_core::{Device, Tensor};
use sae_ablate::sae::{gemma_scope, Architecture, Format, Normalization, Sae};
use serde_json::json;
use st_writer::{assert_close, npy_f32, npz_bytes, write_json, write_npz, write_st, TempDir, T};

const W_ENC: [f32; 12] = [1., 0., 0., 1., 0., 1., 0., 1., 0., 0., 1., 1.];
const B_ENC: [f32; 4] = [0., 0.5, 0., -1.];
const THR: [f32; 4] = [1., 1., 0.5, 2.];
const W_DEC: [f32; 12] = [1., 0., 0., 0., 1., 0., 0., 0., 2., 1., 1., 0.];
const B_DEC: [f32; 3] = [0.1, 0.2, 0.3];

fn npz_members(w_prefix: &str) -> Vec<(String, Vec<u8>)> {
    vec![
        (format!("{w_prefix}_enc.npy"), npy_f32(&[3, 4], &W_ENC)),
        (format!("{w_prefix}_dec.npy"), npy_f32(&[4, 3], &W_DEC)),
        ("b_enc.npy".into(), npy_f32(&[4], &B_ENC)),
        ("b_dec.npy".into(), npy_f32(&[3], &B_DEC)),
        ("threshold.npy".into(), npy_f32(&[4], &THR)),
    ]
}

fn write_members(path: &Path, members: &[(String, Vec<u8>)], deflate: bool) {
    let m: Vec<(&str, Vec<u8>)> = members
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    write_npz(path, &m, deflate);
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn input() -> Tensor {
    Tensor::new(&[[1f32, 0.5, 2.]], &Device::Cpu).unwrap()
}

fn check(sae: &Sae) {
    assert_eq!(sae.architecture(), Architecture::JumpRelu);
    assert_eq!((sae.d_in(), sae.d_sae()), (3, 4));
    assert!(!sae.config().apply_b_dec_to_input);
    assert_eq!(sae.config().normalization, Normalization::None);
    assert_close(&flat(&sae.encode(&input()).unwrap()), &[0., 0., 2., 2.5]);
    assert_close(&flat(&sae.forward(&input()).unwrap()), &[2.6, 2.7, 4.3]);
}

#[test]
fn gemma_scope_npz_deflated_and_stored() {
    let tmp = TempDir::new("gs1");
    for (deflate, release) in [
        (true, "gemma-scope-2b-pt-res"),
        (false, "gemma-scope-9b-pt-res"),
    ] {
        let dir = tmp
            .path()
            .join(release)
            .join("layer_7/width_16k/average_l0_50");
        write_members(&dir.join("params.npz"), &npz_members("W"), deflate);
        for p in [dir.clone(), dir.join("params.npz")] {
            let sae = Sae::load(&p, &Device::Cpu).unwrap();
            assert_eq!(sae.format(), Format::GemmaScope);
            assert_eq!(sae.hook_name(), Some("blocks.7.hook_resid_post"));
            check(&sae);
        }
        let sae = gemma_scope::load(&dir, &Device::Cpu).unwrap();
        check(&sae);
        let sae = gemma_scope::load_npz(&dir.join("params.npz"), &Device::Cpu).unwrap();
        check(&sae);
    }
}

#[test]
fn gemma_scope_lower_case_names_and_hook_kinds() {
    let tmp = TempDir::new("gs1-kinds");
    for (release, hook) in [
        ("gemma-scope-2b-pt-mlp", Some("blocks.3.hook_mlp_out")),
        ("gemma-scope-2b-pt-att", Some("blocks.3.attn.hook_z")),
        ("local-copy", Some("blocks.3.hook_resid_post")),
    ] {
        let dir = tmp
            .path()
            .join(release)
            .join("layer_3/width_65k/average_l0_20");
        write_members(&dir.join("params.npz"), &npz_members("w"), true);
        let sae = Sae::load(&dir, &Device::Cpu).unwrap();
        assert_eq!(sae.hook_name(), hook, "{release}");
        check(&sae);
    }
    // A path that does not follow the layout: no hook name.
    let p = tmp.path().join("flat/params.npz");
    write_members(&p, &npz_members("W"), false);
    let sae = Sae::load(&p, &Device::Cpu).unwrap();
    assert_eq!(sae.hook_name(), None);
    check(&sae);
}

#[test]
fn gemma_scope_embedding_sae_is_rescaled_as_saelens_folds_it() {
    // d_in = 4 (√d_in = 2), d_sae = 2. SAELens: W_enc/2, W_dec·2, b_dec unchanged.
    // W_enc columns [2,0,0,0] and [0,0,0,4]; threshold 0.5; W_dec rows e0, e1; b_dec = 1.
    // x = [1,0,0,0.2]: pre = [2·1/2, 4·0.2/2] = [1, 0.4] → f = [1, 0];
    // x̂ = 1·(2·e0) + b_dec = [3, 1, 1, 1].
    let tmp = TempDir::new("gs1-embed");
    let dir = tmp
        .path()
        .join("gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6");
    let members = vec![
        (
            "W_enc.npy",
            npy_f32(&[4, 2], &[2., 0., 0., 0., 0., 0., 0., 4.]),
        ),
        (
            "W_dec.npy",
            npy_f32(&[2, 4], &[1., 0., 0., 0., 0., 1., 0., 0.]),
        ),
        ("b_enc.npy", npy_f32(&[2], &[0., 0.])),
        ("b_dec.npy", npy_f32(&[4], &[1., 1., 1., 1.])),
        ("threshold.npy", npy_f32(&[2], &[0.5, 0.5])),
    ];
    write_npz(&dir.join("params.npz"), &members, true);
    let sae = Sae::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(sae.hook_name(), Some("hook_embed"));
    assert_eq!(
        sae.config().normalization,
        Normalization::ExpectedAverageOnlyIn {
            scaling_factor: 0.5
        }
    );
    let x = Tensor::new(&[[1f32, 0., 0., 0.2]], &Device::Cpu).unwrap();
    assert_close(&flat(&sae.encode(&x).unwrap()), &[1., 0.]);
    assert_close(&flat(&sae.forward(&x).unwrap()), &[3., 1., 1., 1.]);
}

#[test]
fn gemma_scope_scaling_factor() {
    let tmp = TempDir::new("gs1-sf");
    let mut m = npz_members("W");
    m.push((
        "scaling_factor.npy".into(),
        npy_f32(&[4], &[1., 1., 1., 1.]),
    ));
    let p = tmp.path().join("ones/params.npz");
    write_members(&p, &m, false);
    check(&Sae::load(&p, &Device::Cpu).unwrap());
    m.pop();
    m.push((
        "scaling_factor.npy".into(),
        npy_f32(&[4], &[1., 2., 1., 1.]),
    ));
    let p = tmp.path().join("twos/params.npz");
    write_members(&p, &m, false);
    let msg = Sae::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("scaling_factor"), "{msg}");
}

#[test]
fn gemma_scope_bad_input() {
    let tmp = TempDir::new("gs1-bad");
    // Missing threshold: named.
    let mut m = npz_members("W");
    m.retain(|(n, _)| n != "threshold.npy");
    let p = tmp.path().join("a/params.npz");
    write_members(&p, &m, true);
    let msg = Sae::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(
        msg.contains("missing tensor `threshold`") && msg.contains("params.npz"),
        "{msg}"
    );
    // Wrong shape: b_dec of 4.
    let mut m = npz_members("W");
    m[3] = ("b_dec.npy".into(), npy_f32(&[4], &[0.; 4]));
    let p = tmp.path().join("b/params.npz");
    write_members(&p, &m, true);
    let msg = Sae::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("`b_dec` has shape [4], expected [3]"), "{msg}");
    // Truncated archive.
    let m: Vec<(String, Vec<u8>)> = npz_members("W");
    let m: Vec<(&str, Vec<u8>)> = m.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let bytes = npz_bytes(&m, true);
    let p = tmp.path().join("c/params.npz");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 30]).unwrap();
    let msg = Sae::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("params.npz") && msg.contains("npz"), "{msg}");
    // Corrupted member data (the zip's CRC or the deflate stream fails).
    let mut bad = bytes.clone();
    let at = bad.windows(9).position(|w| w == b"W_dec.npy").unwrap() + 9;
    for b in &mut bad[at + 2..at + 30] {
        *b ^= 0xA5;
    }
    let p = tmp.path().join("d/params.npz");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, &bad).unwrap();
    err_naming(Sae::load(&p, &Device::Cpu).map(|_| ()), &["params.npz"]);
    // No weights at all.
    let d = tmp.path().join("empty");
    std::fs::create_dir_all(&d).unwrap();
    err_naming(
        gemma_scope::load(&d, &Device::Cpu).map(|_| ()),
        &[&d.display().to_string()],
    );
}

// ---------------------------------------------------------------- Gemma Scope 2

fn v2_tensors() -> Vec<T<'static>> {
    vec![
        ("w_enc", vec![3, 4], W_ENC.to_vec()),
        ("w_dec", vec![4, 3], W_DEC.to_vec()),
        ("b_enc", vec![4], B_ENC.to_vec()),
        ("b_dec", vec![3], B_DEC.to_vec()),
        ("threshold", vec![4], THR.to_vec()),
    ]
}

fn v2_cfg() -> serde_json::Value {
    json!({
        "architecture": "jump_relu",
        "model_name": "gemma-v3-1b-pt",
        "hf_hook_point_in": "model.layers.12.output",
        "width": 4,
        "l0": "medium"
    })
}

fn write_v2(dir: &Path, cfg: Option<&serde_json::Value>, tensors: &[T]) {
    write_st(&dir.join("params.safetensors"), tensors);
    if let Some(c) = cfg {
        write_json(&dir.join("config.json"), c);
    }
}

#[test]
fn gemma_scope_2_safetensors() {
    let tmp = TempDir::new("gs2");
    let dir = tmp.path().join("resid_post/layer_12_width_16k_l0_medium");
    write_v2(&dir, Some(&v2_cfg()), &v2_tensors());
    for p in [dir.clone(), dir.join("params.safetensors")] {
        let sae = Sae::load(&p, &Device::Cpu).unwrap();
        assert_eq!(sae.format(), Format::GemmaScope2);
        assert_eq!(sae.hook_name(), Some("blocks.12.hook_resid_post"));
        assert_eq!(sae.config().model_name.as_deref(), Some("gemma-v3-1b-pt"));
        check(&sae);
    }
    for p in [
        dir.clone(),
        dir.join("config.json"),
        dir.join("params.safetensors"),
    ] {
        check(&gemma_scope::load(&p, &Device::Cpu).unwrap());
    }
    // Other sites, and no config.json at all (SAELens infers it too).
    for (site, hook) in [
        ("resid_post_all", "blocks.4.hook_resid_post"),
        ("attn_out", "blocks.4.hook_attn_out"),
        ("mlp_out", "blocks.4.hook_mlp_out"),
    ] {
        let dir = tmp.path().join(site).join("layer_4_width_262k_l0_small");
        write_v2(&dir, None, &v2_tensors());
        let sae = Sae::load(&dir, &Device::Cpu).unwrap();
        assert_eq!(sae.hook_name(), Some(hook));
        check(&sae);
    }
}

#[test]
fn gemma_scope_2_rejects_transcoders_and_other_architectures() {
    let tmp = TempDir::new("gs2-tc");
    let dir = tmp.path().join("transcoder/layer_3_width_16k_l0_medium");
    write_v2(&dir, Some(&v2_cfg()), &v2_tensors());
    let msg = Sae::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("transcoders are not supported"), "{msg}");
    // An affine skip connection.
    let dir = tmp.path().join("resid_post/layer_3_width_16k_l0_big");
    let mut t = v2_tensors();
    t.push(("affine_skip_connection", vec![3, 3], vec![0.; 9]));
    write_v2(&dir, Some(&v2_cfg()), &t);
    let msg = Sae::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("affine_skip_connection"), "{msg}");
    // A config with an output hook point.
    let dir = tmp.path().join("resid_post/layer_5_width_16k_l0_big");
    let mut c = v2_cfg();
    c["hf_hook_point_out"] = json!("model.layers.5.post_feedforward_layernorm.output");
    write_v2(&dir, Some(&c), &v2_tensors());
    let msg = Sae::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(
        msg.contains("hf_hook_point_out") && msg.contains("config.json"),
        "{msg}"
    );
    // Another architecture.
    let dir = tmp.path().join("resid_post/layer_6_width_16k_l0_big");
    let mut c = v2_cfg();
    c["architecture"] = json!("topk");
    write_v2(&dir, Some(&c), &v2_tensors());
    let msg = Sae::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("\"topk\" is not supported"), "{msg}");
}

#[test]
fn gemma_scope_2_bad_tensors() {
    let tmp = TempDir::new("gs2-bad");
    let dir = tmp.path().join("resid_post/layer_1_width_16k_l0_big");
    let mut t = v2_tensors();
    t.retain(|(n, _, _)| *n != "threshold");
    write_v2(&dir, Some(&v2_cfg()), &t);
    let msg = Sae::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("missing tensor `threshold`"), "{msg}");
    assert!(msg.contains("params.safetensors"), "{msg}");
    let dir = tmp.path().join("resid_post/layer_2_width_16k_l0_big");
    let mut t = v2_tensors();
    t[3] = ("b_dec", vec![4], vec![0.; 4]);
    write_v2(&dir, Some(&v2_cfg()), &t);
    let msg = Sae::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("`b_dec` has shape [4], expected [3]"), "{msg}");
    // A bad config.json.
    let dir = tmp.path().join("resid_post/layer_8_width_16k_l0_big");
    write_v2(&dir, None, &v2_tensors());
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let msg = Sae::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("config.json") && msg.contains("json"), "{msg}");
}
