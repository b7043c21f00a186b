//! Gemma 3 270M (GGUF Q4_K_M, fetched by scripts/fetch-assets.sh) against HF
//! transformers 5.25 running the same file dequantized to f32
//! (tests/fixtures/gemma3-270m/reference.json, made by scripts/make-model-fixtures.sh):
//! logits, hidden states, the greedy continuation; the quantized weight format against
//! the dense one; SAE splices at a Gemma 3 hook point.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use candle_core::{DType, Device, Tensor};
use sae_ablate::edit::{reference, Edits, SpliceMode};
use sae_ablate::hooks::{ActivationCache, HookContext, HookPoint, Hooks, Positions, SaeSplice};
use sae_ablate::model::{Family, HookedModel, LoadOptions, Model, WeightFormat};
use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};

#[path = "common/gemma3.rs"]
mod gemma3;

use gemma3::{gguf_path, tokenizer};

fn model() -> MutexGuard<'static, Model> {
    static M: OnceLock<Mutex<Model>> = OnceLock::new();
    M.get_or_init(|| {
        Mutex::new(Model::from_gguf(gguf_path(), &LoadOptions::default()).expect("load Gemma 3"))
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

fn reference() -> serde_json::Value {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma3-270m/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn prompt_ids(r: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(r["prompt"]["ids"].clone()).unwrap()
}

fn row(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |a, (i, &x)| if x > a.1 { (i, x) } else { a },
        )
        .0 as u32
}

#[test]
fn config_from_gguf_metadata() {
    let m = model();
    let c = m.config();
    assert_eq!(m.family(), Family::Gemma3);
    assert_eq!(
        (
            c.d_model,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.d_ff,
            c.vocab_size
        ),
        (640, 18, 4, 1, 256, 2048, 262_144)
    );
    assert_eq!(c.sliding_window, Some(512));
    assert!(c.tied_embeddings && c.qk_norm && c.post_norms && c.embed_scale);
    // transformers' layer_types for this model: every sixth layer global.
    let r = reference();
    let types: Vec<String> = serde_json::from_value(r["config"]["layer_types"].clone()).unwrap();
    for (i, t) in types.iter().enumerate() {
        assert_eq!(
            c.window(i).is_none(),
            t == "full_attention",
            "layer {i}: {t}"
        );
    }
}

/// Logits at every prompt position (a slice of 127 ids), the last position's top 20 and
/// statistics, and the block outputs' first components, against transformers.
#[test]
fn logits_match_transformers() {
    let r = reference();
    let p = &r["prompt"];
    let ids = prompt_ids(&r);
    let mut m = model();
    let cache = ActivationCache::new();
    let mut hooks = Hooks::new();
    for i in 0..18 {
        hooks.add(HookPoint::ResidPost(i), cache.clone());
    }
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = m.forward(&x, 0, &mut hooks).unwrap();
    let slice: Vec<u32> = serde_json::from_value(p["slice_ids"].clone()).unwrap();
    let want: Vec<Vec<f32>> = serde_json::from_value(p["logits_slice"].clone()).unwrap();
    let mut worst = 0f32;
    for (pos, w) in want.iter().enumerate() {
        let l = row(&logits.get(0).unwrap().get(pos).unwrap());
        for (&id, &v) in slice.iter().zip(w) {
            worst = worst.max((l[id as usize] - v).abs());
        }
    }
    assert!(worst < 2e-3, "logits differ by {worst}");
    let last = row(&logits.get(0).unwrap().get(ids.len() - 1).unwrap());
    let top: Vec<(u32, f32)> = serde_json::from_value(p["last_top20"].clone()).unwrap();
    for (id, v) in &top {
        assert!(
            (last[*id as usize] - v).abs() < 2e-3,
            "id {id}: {} vs {v}",
            last[*id as usize]
        );
    }
    assert_eq!(argmax(&last), top[0].0);
    let n = last.len() as f64;
    let mean = last.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (last.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(
        (mean - p["last_mean"].as_f64().unwrap()).abs() < 1e-3,
        "mean {mean}"
    );
    assert!(
        (std - p["last_std"].as_f64().unwrap()).abs() < 1e-3,
        "std {std}"
    );
    // hidden_states[i + 1] = output of block i (the last one is normed by HF).
    let first8: Vec<Vec<Vec<f32>>> =
        serde_json::from_value(p["hidden_states_first8"].clone()).unwrap();
    for i in 0..17 {
        let h = cache.get(&HookPoint::ResidPost(i)).unwrap().unwrap();
        for (pos, w) in first8[i + 1].iter().enumerate() {
            let got = row(&h.get(0).unwrap().get(pos).unwrap().narrow(0, 0, 8).unwrap());
            let scale = w.iter().fold(1f32, |a, v| a.max(v.abs()));
            for (g, v) in got.iter().zip(w) {
                assert!(
                    (g - v).abs() < 1e-3 * scale,
                    "block {i} pos {pos}: {g} vs {v}"
                );
            }
        }
    }
}

/// The 16-token greedy continuation, through the decode step (plain rows, sliding and
/// global layers, the tied 262k head).
#[test]
fn greedy_continuation_matches_transformers() {
    let r = reference();
    let want: Vec<u32> = serde_json::from_value(r["prompt"]["greedy_ids"].clone()).unwrap();
    let mut ids = prompt_ids(&r);
    let mut m = model();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut l = row(&m.forward_last(&x, 0, &mut Hooks::new()).unwrap());
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let next = argmax(&l);
        got.push(next);
        ids.push(next);
        let x = Tensor::new(&[[next]], &Device::Cpu).unwrap();
        l = row(&m
            .forward_last(&x, ids.len() - 1, &mut Hooks::new())
            .unwrap());
    }
    assert_eq!(got, want);
}

/// The quantized weight format (Q8_0 as stored, Q5_0/Q4_K/Q6_K requantized to Q8_0)
/// against the dense model: next-token distributions within 0.02 nats (KL), the same
/// top token.
#[test]
fn quantized_weights_track_dense() {
    let r = reference();
    let ids = prompt_ids(&r);
    let opts = LoadOptions::default().with_weights(WeightFormat::Quantized);
    let mut q = Model::from_gguf(gguf_path(), &opts).unwrap();
    assert_eq!(q.weight_format(), WeightFormat::Quantized);
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let lq = q.forward(&x, 0, &mut Hooks::new()).unwrap();
    let ld = model().forward(&x, 0, &mut Hooks::new()).unwrap();
    let lp = |l: &Tensor| candle_nn::ops::log_softmax(&l.squeeze(0).unwrap(), 1).unwrap();
    let (pq, pd) = (lp(&lq), lp(&ld));
    // KL(dense || quantized) per position.
    let kl = (pd.exp().unwrap() * (&pd - &pq).unwrap())
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (pos, k) in kl.iter().enumerate() {
        assert!(*k < 0.02, "position {pos}: KL {k}");
    }
    let last = ids.len() - 1;
    assert_eq!(
        argmax(&row(&lq.get(0).unwrap().get(last).unwrap())),
        argmax(&row(&ld.get(0).unwrap().get(last).unwrap()))
    );
}

/// A JumpReLU SAE made for `blocks.8.hook_resid_post` (d_in 640): the error-preserving
/// splice with no edits leaves the logits as they are; zero-ablating latents gives the
/// same logits as replacing the activation by the reference splice (plain candle ops);
/// in the decode step too.
#[test]
fn sae_splice_on_a_gemma3_hook_point() {
    let dev = Device::Cpu;
    let (d, d_sae) = (640, 2048);
    let point = HookPoint::ResidPost(8);
    let mut m = model();
    let r = reference();
    let ids = prompt_ids(&r);
    let x = Tensor::new(ids.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let cache = ActivationCache::new();
    let mut hooks = Hooks::new();
    hooks.add(point, cache.clone());
    let clean = m.forward(&x, 0, &mut hooks).unwrap();
    let act = cache.get(&point).unwrap().unwrap();
    // Encoder columns along the activations' own directions, so that latents fire.
    let a = act.squeeze(0).unwrap();
    let norm = a.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    let dirs = a.broadcast_div(&norm).unwrap(); // [t, d]
    let reps = d_sae / ids.len() + 1;
    let w_enc = dirs
        .t()
        .unwrap()
        .repeat((1, reps))
        .unwrap()
        .narrow(1, 0, d_sae)
        .unwrap()
        .contiguous()
        .unwrap();
    let mut cfg = SaeConfig::new(Architecture::JumpRelu, d, d_sae);
    cfg.hook_name = Some(point.to_string());
    let sae = Sae::new(
        cfg,
        SaeWeights {
            w_enc: w_enc.clone(),
            b_enc: Tensor::zeros(d_sae, DType::F32, &dev).unwrap(),
            w_dec: w_enc.t().unwrap().contiguous().unwrap(),
            b_dec: Tensor::zeros(d, DType::F32, &dev).unwrap(),
            threshold: Some(Tensor::full(1.0f32, d_sae, &dev).unwrap()),
            r_mag: None,
            b_mag: None,
            w_skip: None,
        },
    )
    .unwrap();
    let f = sae.encode(&a).unwrap();
    let active = f
        .gt(0f64)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(
        active.to_scalar::<f32>().unwrap() > 10.0,
        "latents must fire"
    );

    // No edits: the same logits.
    let none = Edits::new(SpliceMode::ErrorPreserving);
    let mut hooks = Hooks::new();
    hooks.add(point, SaeSplice::new(&sae, &none, Positions::All).unwrap());
    let same = m.forward(&x, 0, &mut hooks).unwrap();
    let d0 = (&same - &clean).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d0.to_scalar::<f32>().unwrap() < 1e-4);

    // Zero-ablate latents 0..64: fused splice = reference splice fed in by a hook.
    let ids64: Vec<u32> = (0..64).collect();
    let edits = Edits::new(SpliceMode::ErrorPreserving).zero(&ids64);
    let mut hooks = Hooks::new();
    hooks.add(point, SaeSplice::new(&sae, &edits, Positions::All).unwrap());
    let spliced = m.forward(&x, 0, &mut hooks).unwrap();
    let sae2 = sae.clone();
    let edits2 = edits.clone();
    let mut hooks = Hooks::new();
    hooks.add(
        point,
        move |_: &HookPoint, act: &Tensor, _: &HookContext| {
            Ok(Some(reference::apply(&sae2, act, &edits2)?))
        },
    );
    let want = m.forward(&x, 0, &mut hooks).unwrap();
    let dd = (&spliced - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(dd.to_scalar::<f32>().unwrap() < 1e-2, "{dd}");
    let moved = (&spliced - &clean)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        moved.to_scalar::<f32>().unwrap() > 0.1,
        "the edit must move the logits"
    );

    // The decode step (plain rows) with the splice live equals the full forward.
    let n = ids.len();
    let mut hooks = Hooks::new();
    hooks.add(point, SaeSplice::new(&sae, &edits, Positions::All).unwrap());
    m.forward(&x.narrow(1, 0, n - 1).unwrap(), 0, &mut hooks)
        .unwrap();
    let step = m
        .forward(&x.narrow(1, n - 1, 1).unwrap(), n - 1, &mut hooks)
        .unwrap();
    let full_last = spliced.narrow(1, n - 1, 1).unwrap();
    let ds = (&step - &full_last)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(ds.to_scalar::<f32>().unwrap() < 1e-2, "{ds}");
}

/// The CLI on Gemma 3: `logits` tokenizes with BOS and matches transformers' ids and
/// top token; `generate` (greedy) continues as transformers does.
#[test]
fn cli_logits_and_generate_on_gemma3() {
    use std::process::Command;
    let r = reference();
    let bin = env!("CARGO_BIN_EXE_sae-ablate");
    let g = gguf_path();
    let g = g.to_str().unwrap();
    let prompt = r["prompt"]["text"].as_str().unwrap();
    let npy = std::env::temp_dir().join(format!("sae-ablate-gemma3-{}.npy", std::process::id()));
    let out = Command::new(bin)
        .args([
            "logits", "--model", g, "--prompt", prompt, "--json", "--output",
        ])
        .arg(&npy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["ids"], r["prompt"]["ids"]);
    assert_eq!(tokenizer().encode(prompt).unwrap(), prompt_ids(&r));
    let logits = sae_ablate::io::npy::read_npy(&npy, &Device::Cpu).unwrap();
    let _ = std::fs::remove_file(&npy);
    assert_eq!(logits.dims(), &[6, 262_144]);
    let last = row(&logits.get(5).unwrap());
    assert_eq!(argmax(&last), 506, "transformers' top token ` the`");
    let out = Command::new(bin)
        .args([
            "generate",
            "--model",
            g,
            "--prompt",
            prompt,
            "--max-new-tokens",
            "16",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let want = r["prompt"]["greedy_text"].as_str().unwrap();
    assert!(text.contains(want.trim()), "{text:?} vs {want:?}");
    // A base model has no chat template: `--chat` is a clear error (exit 2).
    let out = Command::new(bin)
        .args(["generate", "--model", g, "--prompt", prompt, "--chat"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chat template"), "{err}");
}

/// `sae-ablate harvest` on Gemma 3: the BOS is not saved, and each hook point's shards
/// have its own width (`attn.hook_z`: 4 heads × 256).
#[test]
fn cli_harvest_on_gemma3_keeps_each_hook_width() {
    use std::process::Command;
    let bin = env!("CARGO_BIN_EXE_sae-ablate");
    let out_dir =
        std::env::temp_dir().join(format!("sae-ablate-gemma3-harvest-{}", std::process::id()));
    let corpus = out_dir.with_extension("txt");
    std::fs::write(&corpus, "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. ".repeat(40)).unwrap();
    let out = Command::new(bin)
        .args(["harvest", "--model"])
        .arg(gguf_path())
        .arg("--out")
        .arg(&out_dir)
        .arg("--corpus")
        .arg(&corpus)
        .args([
            "--hooks",
            "blocks.5.hook_resid_post,blocks.5.attn.hook_z",
            "--max-tokens",
            "256",
            "--context-len",
            "64",
            "--batch-size",
            "2",
            "--holdout-contexts",
            "2",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["prefix_len"], 1, "the BOS is not an activation row");
    let widths: Vec<(String, u64, u64)> = m["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["hook"].as_str().unwrap().to_string(),
                o["d_in"].as_u64().unwrap(),
                o["tokens"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        widths,
        vec![
            ("blocks.5.hook_resid_post".to_string(), 640, 256),
            ("blocks.5.attn.hook_z".to_string(), 1024, 256)
        ]
    );
    let _ = std::fs::remove_dir_all(&out_dir);
    let _ = std::fs::remove_file(&corpus);
}
