//! The ESR main job (`sae_ablate::esr`): the judge on the real model, and the `--quick`
//! experiment end to end with its output contract checked.

#[path = "common/smollm.rs"]
mod smollm;

use std::path::{Path, PathBuf};

use sae_ablate::esr::judge::{mean_logprobs_after, split_attempts, Judge};
use sae_ablate::esr::{self, EsrConfig};
use sae_ablate::Sae;

const BREAD: &str = "Explain how to bake a loaf of bread.";
const TIRE: &str = "Explain how to change a flat tire on a car.";
const BREAD_ANSWER: &str =
    "Mix flour, water, yeast and a pinch of salt into a dough. Knead it for ten \
    minutes, let it rise until doubled, shape the loaf and bake it at 220 degrees until golden.";
const TIRE_ANSWER: &str =
    "Loosen the lug nuts, lift the car with the jack, remove the flat tire and \
    mount the spare wheel. Tighten the lug nuts in a star pattern and lower the car.";

#[test]
fn judge_prefers_the_answer_to_its_own_prompt() {
    let tok = smollm::tokenizer();
    let mut model = smollm::model();
    let judge = Judge::new(tok, &[BREAD, TIRE], 32, 4).unwrap();
    assert_eq!(judge.other(0), 1);
    let d = judge
        .deltas(
            &mut *model,
            tok,
            &[
                (0, BREAD_ANSWER),
                (0, TIRE_ANSWER),
                (1, TIRE_ANSWER),
                (1, BREAD_ANSWER),
            ],
        )
        .unwrap();
    // Δ(bread answer | bread) = −Δ(bread answer | tire) up to the contrast prompt: the
    // two conditionings are swapped, so the values are exact negatives of each other.
    assert!((d[0] + d[3]).abs() < 1e-4, "{d:?}");
    assert!((d[1] + d[2]).abs() < 1e-4, "{d:?}");
    // An answer is clearly likelier after its own prompt.
    assert!(
        d[0] > 0.2,
        "bread answer after the bread prompt: Δ = {}",
        d[0]
    );
    assert!(
        d[2] > 0.2,
        "tire answer after the tire prompt: Δ = {}",
        d[2]
    );
}

#[test]
fn judge_batches_equal_single_sequences() {
    let tok = smollm::tokenizer();
    let mut model = smollm::model();
    let batched = Judge::new(tok, &[BREAD, TIRE], 32, 4).unwrap();
    let single = Judge::new(tok, &[BREAD, TIRE], 32, 1).unwrap();
    let items = [(0, BREAD_ANSWER), (1, "Short.")];
    let a = batched.deltas(&mut *model, tok, &items).unwrap();
    let b = single.deltas(&mut *model, tok, &items).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() < 2e-3,
            "right-padded batch {a:?} vs one at a time {b:?}"
        );
    }
}

/// The judge's shared-prefix scoring (prefix prefilled once, KV cache forked per batch)
/// against a plain full-sequence forward and log-softmax computed here, row by row.
#[test]
fn shared_prefix_logprobs_equal_full_sequences() {
    use candle_core::{Device, Tensor};
    use sae_ablate::hooks::Hooks;
    use sae_ablate::model::HookedModel;
    let tok = smollm::tokenizer();
    let mut model = smollm::model();
    let prefix = tok.encode(&tok.chat_prompt(BREAD).unwrap()).unwrap();
    let bodies: Vec<Vec<u32>> = [BREAD_ANSWER, "Short.", TIRE_ANSWER]
        .iter()
        .map(|t| tok.encode(t).unwrap())
        .collect();
    let refs: Vec<&[u32]> = bodies.iter().map(Vec::as_slice).collect();
    let got = mean_logprobs_after(&mut *model, &prefix, &refs, 2).unwrap();
    for (body, g) in bodies.iter().zip(&got) {
        let mut all = prefix.clone();
        all.extend_from_slice(body);
        let t = Tensor::from_slice(&all, (1, all.len()), &Device::Cpu).unwrap();
        let logits = model.forward(&t, 0, &mut Hooks::new()).unwrap();
        let rows = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let mut sum = 0f64;
        for (k, &id) in body.iter().enumerate() {
            let row = &rows[prefix.len() - 1 + k];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            sum += row[id as usize] as f64 - lse;
        }
        let want = sum / body.len() as f64;
        assert!(
            (g - want).abs() < 1e-3,
            "shared prefix {g} vs full sequence {want}"
        );
    }
    assert!(
        got[0] > got[2],
        "bread answer after the bread prompt: {got:?}"
    );
}

#[test]
fn restart_language_splits_real_looking_answers() {
    let a = split_attempts(
        "The best way to plant tomatoes is to think about the ocean and its many fish. \
         Wait, that's not right. Let me refocus: dig a hole, set the seedling deep, water it.",
    );
    assert_eq!(a.len(), 2, "{a:?}");
}

fn read_json(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn is_png(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 1000)
}

/// The README's `--quick` main job, through the library call the example makes.
#[test]
fn quick_experiment_writes_the_output_contract() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut cfg = EsrConfig::preset("smollm2", true).unwrap();
    cfg.model = smollm::gguf_path();
    cfg.train.corpus = root.join("assets/austen");
    cfg.cache_dir = root.join("assets/cache/esr-smollm2-quick");
    cfg.progress = Default::default();
    let out = std::env::temp_dir().join(format!("sae-ablate-esr-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let r = esr::run(&cfg, &out, "test").unwrap();

    let j = read_json(&out.join("results.json"));
    for k in [
        "fvu",
        "l0",
        "dead_fraction",
        "ce_clean",
        "ce_spliced",
        "ce_zero_ablated",
        "ce_loss_recovered",
    ] {
        assert!(
            j["sae_eval"][k].is_f64(),
            "sae_eval.{k} missing: {}",
            j["sae_eval"]
        );
    }
    let e = &r.sae_eval;
    assert!(e.fvu > 0.0 && e.fvu < 1.0, "FVU {}", e.fvu);
    assert!(
        e.ce_spliced > e.ce_clean && e.ce_zero_ablated > e.ce_spliced,
        "{e:?}"
    );
    let k = cfg.train.k as f64;
    assert!(
        e.l0 <= k + 1e-9 && e.l0 > 0.5 * k,
        "TopK L0 {} (k = {k})",
        e.l0
    );
    assert!(j["otd_latents"].is_array());
    assert!(j["config"]["seed"].as_u64() == Some(cfg.seed));
    assert!(j["timings"]["stages"]["trials"].is_f64());

    let names: Vec<&str> = r.conditions.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "baseline",
            "otd_ablated",
            "random_1",
            "random_2",
            "random_3"
        ]
    );
    let n = cfg.n_prompts * cfg.steer_latents;
    for c in &r.conditions {
        assert_eq!(c.n, n, "{}", c.name);
        for (v, ci) in [
            (c.multi_attempt_rate, c.ci95.multi_attempt_rate),
            (c.esr_rate, c.ci95.esr_rate),
        ] {
            assert!((0.0..=1.0).contains(&v), "{}: rate {v}", c.name);
            assert!(
                ci[0] <= v + 1e-12 && v <= ci[1] + 1e-12 && ci[0] >= 0.0 && ci[1] <= 1.0,
                "{ci:?}"
            );
        }
        assert!(
            c.esr_rate <= c.multi_attempt_rate,
            "ESR implies multi-attempt"
        );
        assert!((0.0..=100.0).contains(&c.mean_first_score));
    }
    // Same seeds, so the random sets differ from each other and from the OTD set, but all
    // have its size.
    for s in &r.random_sets {
        assert_eq!(s.len(), r.otd_latents.len());
        assert!(s.iter().all(|id| !r.otd_latents.contains(id)));
    }
    // The judge tells the model's own answers from mismatched ones.
    assert!(
        r.judge.on_topic_mean_score > r.judge.off_topic_mean_score + 20.0,
        "{:?}",
        r.judge
    );
    // Steering was calibrated toward the target: the last probe moved the score down
    // from the unsteered level.
    for s in &r.steering {
        assert!(s.strength > 0.0 && !s.probes.is_empty(), "{s:?}");
    }

    let trials = std::fs::read_to_string(out.join("trials.jsonl")).unwrap();
    assert_eq!(trials.lines().count(), n * 5);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| baseline |") && md.contains("not measured here"),
        "{md}"
    );
    for p in [
        "conditions.png",
        "otd_activation.png",
        "sae_training_curve.png",
    ] {
        assert!(is_png(&out.join(p)), "{p} is not a PNG");
    }
    let sae = Sae::load(out.join("sae"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(sae.d_sae(), cfg.train.d_sae);
    assert_eq!(sae.hook_name(), Some(cfg.sae_hook.as_str()));
    let _ = std::fs::remove_dir_all(&out);
}
