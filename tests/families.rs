//! Every supported HF family against HF transformers: tiny random-weight checkpoints and
//! their reference logits, hidden states and greedy continuations, made by
//! `scripts/make_model_fixtures.py` (tests/fixtures/models/README.md). Sliding windows
//! are shorter than the test sequences, so the windows are exercised. The CPU's plain-row
//! path is checked for a whole prefill, a prefill continued in chunks over the KV cache,
//! decode steps and greedy decoding; the tensor path (the GPU's, forced on the CPU) for
//! the prefill.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sae_ablate::hooks::{ActivationCache, HookPoint, Hooks};
use sae_ablate::model::{HookedModel, LoadOptions, Model};

struct Reference {
    ids: Vec<Vec<u32>>,
    /// `[b][t][vocab]`.
    logits: Vec<Vec<Vec<f32>>>,
    /// `[n_layers + 1][b][t][d]`.
    hidden: Vec<Vec<Vec<Vec<f32>>>>,
    greedy: Vec<u32>,
}

fn fixture(name: &str) -> (PathBuf, Reference) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name);
    let text = std::fs::read_to_string(dir.join("reference.json"))
        .unwrap_or_else(|e| panic!("fixture {}: {e}", dir.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let de = |k: &str| {
        v.get(k)
            .unwrap_or_else(|| panic!("{name}: no `{k}`"))
            .clone()
    };
    let r = Reference {
        ids: serde_json::from_value(de("input_ids")).unwrap(),
        logits: serde_json::from_value(de("logits")).unwrap(),
        hidden: serde_json::from_value(de("hidden_states")).unwrap(),
        greedy: serde_json::from_value(de("greedy")).unwrap(),
    };
    (dir, r)
}

fn max_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

fn ids_tensor(ids: &[Vec<u32>]) -> Tensor {
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (ids.len(), ids[0].len()), &Device::Cpu).unwrap()
}

/// Logits and hidden states of the prefill path, the decode step continuing a prefix,
/// one-token-at-a-time decoding from position 0, and the greedy continuation.
fn check(name: &str) {
    let (dir, r) = fixture(name);
    let mut m =
        Model::from_hf_dir(&dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let n_layers = m.n_layers();
    let (b, t) = (r.ids.len(), r.ids[0].len());
    assert_eq!(r.hidden.len(), n_layers + 1, "{name}");
    let tol = 1e-3;

    // Prefill: every position's logits, the embedding and each block's output.
    let cache = ActivationCache::new();
    let mut hooks = Hooks::new();
    hooks.add(HookPoint::Embed, cache.clone());
    for i in 0..n_layers {
        hooks.add(HookPoint::ResidPost(i), cache.clone());
    }
    let logits = m.forward(&ids_tensor(&r.ids), 0, &mut hooks).unwrap();
    assert_eq!(logits.dims(), &[b, t, r.logits[0][0].len()]);
    let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want: Vec<f32> = r.logits.iter().flatten().flatten().copied().collect();
    let d = max_diff(&got, &want);
    assert!(d < tol, "{name}: prefill logits differ by {d}");
    // HF's last hidden state has the final norm applied; the others are block outputs.
    let mut points = vec![(HookPoint::Embed, 0)];
    points.extend((0..n_layers - 1).map(|i| (HookPoint::ResidPost(i), i + 1)));
    for (p, k) in points {
        let got = cache.get(&p).unwrap().unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = r.hidden[k].iter().flatten().flatten().copied().collect();
        let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
        let d = max_diff(&got, &want);
        assert!(
            d < tol * scale,
            "{name}: {p} differs by {d} (scale {scale})"
        );
    }

    // The tensor path (the GPU's) on the same prefill.
    m.set_tensor_path(true);
    let tl = m
        .forward(&ids_tensor(&r.ids), 0, &mut Hooks::new())
        .unwrap();
    m.set_tensor_path(false);
    let d = max_diff(&tl.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &want);
    assert!(d < tol, "{name}: tensor-path prefill logits differ by {d}");

    // A prefill in two chunks: the second attends to the first through the cache.
    let h = t / 2;
    let first: Vec<Vec<u32>> = r.ids.iter().map(|s| s[..h].to_vec()).collect();
    let rest: Vec<Vec<u32>> = r.ids.iter().map(|s| s[h..].to_vec()).collect();
    m.forward(&ids_tensor(&first), 0, &mut Hooks::new())
        .unwrap();
    let l2 = m.forward(&ids_tensor(&rest), h, &mut Hooks::new()).unwrap();
    for bi in 0..b {
        for i in 0..t - h {
            let got = l2
                .get(bi)
                .unwrap()
                .get(i)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let d = max_diff(&got, &r.logits[bi][h + i]);
            assert!(
                d < tol,
                "{name}: chunked prefill row {bi} position {} differs by {d}",
                h + i
            );
        }
    }

    // The decode step (plain rows) after a prefill of t - 1 positions, both rows.
    let prefix: Vec<Vec<u32>> = r.ids.iter().map(|s| s[..t - 1].to_vec()).collect();
    let last: Vec<Vec<u32>> = r.ids.iter().map(|s| vec![s[t - 1]]).collect();
    m.forward(&ids_tensor(&prefix), 0, &mut Hooks::new())
        .unwrap();
    let step = m
        .forward(&ids_tensor(&last), t - 1, &mut Hooks::new())
        .unwrap();
    for bi in 0..b {
        let got = step
            .get(bi)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let d = max_diff(&got, &r.logits[bi][t - 1]);
        assert!(d < tol, "{name}: decode step row {bi} differs by {d}");
    }

    // One token at a time from position 0 (the window slides inside the decode step).
    let seq = &r.ids[0];
    for (pos, &id) in seq.iter().enumerate() {
        let l = m
            .forward(&ids_tensor(&[vec![id]]), pos, &mut Hooks::new())
            .unwrap();
        let got = l.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = max_diff(&got, &r.logits[0][pos]);
        assert!(
            d < tol,
            "{name}: step-by-step position {pos} differs by {d}"
        );
    }

    // Greedy continuation of sequence 0.
    let mut ids = seq.clone();
    let mut out = Vec::new();
    let mut l = m
        .forward_last(&ids_tensor(&[ids.clone()]), 0, &mut Hooks::new())
        .unwrap();
    for _ in 0..r.greedy.len() {
        let v = l.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let next = v
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |a, (i, &x)| if x > a.1 { (i, x) } else { a },
            )
            .0 as u32;
        out.push(next);
        ids.push(next);
        l = m
            .forward_last(&ids_tensor(&[vec![next]]), ids.len() - 1, &mut Hooks::new())
            .unwrap();
    }
    assert_eq!(out, r.greedy, "{name}: greedy continuation");
}

#[test]
fn llama_transformers_4_config() {
    check("llama");
}

#[test]
fn llama_transformers_5_config() {
    check("llama_tf5");
}

#[test]
fn mistral_sliding_window() {
    check("mistral");
}

#[test]
fn qwen2_qkv_bias() {
    check("qwen2");
}

#[test]
fn qwen3_qk_norm() {
    check("qwen3");
}

#[test]
fn gemma2_softcaps_and_alternating_windows() {
    check("gemma2");
}

#[test]
fn gemma3_text_local_global() {
    check("gemma3_text");
}

#[test]
fn gemma3_text_transformers_5_config() {
    check("gemma3_text_tf5");
}

#[test]
fn gemma3_nested_text_config() {
    check("gemma3");
}
