//! The ESR main job (`sae_ablate::esr`): the judge on the real model, and the `--quick`
//! experiment end to end with its output contract checked.

#[path = "common/small.rs"]
mod small;
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
    // One cut, before "Wait" ("Let me refocus" is within 40 bytes of it and joins it).
    assert_eq!(
        a,
        [
            "The best way to plant tomatoes is to think about the ocean and its many fish.",
            "Wait, that's not right. Let me refocus: dig a hole, set the seedling deep, water it."
        ]
    );
    let b = split_attempts(
        "Tomatoes like sun. I was thinking about sailing boats across the sea all day. \
         Oops, back to the question: water them daily.\nSorry, I got distracted. Let me \
         start over: plant them deep.",
    );
    // Cuts before "Oops" and "Sorry, I"; "back to the question" does not open a sentence,
    // and "Let me start over" (25 bytes after "Sorry") joins the cut before it.
    assert_eq!(
        b,
        [
            "Tomatoes like sun. I was thinking about sailing boats across the sea all day.",
            "Oops, back to the question: water them daily.",
            "Sorry, I got distracted. Let me start over: plant them deep."
        ]
    );
    // Answers SmolLM2 gave in the ESR run whose instructions contain restart words: one
    // attempt each.
    for t in [
        "To perform the push-up properly:\n\n1. Stand up straight with both feet \
         shoulder-width apart and hold onto your chosen grip for balance.\n2. Start with \
         your palms facing downwards, making sure they're at 90 degrees.",
        "A flat tire can be a nightmare on the road. To get back on track with your vehicle, \
         it's essential to address the issue of getting rid of the fallen fuel drains.",
        "To tie a bowstring using a knotty loop:\n\n1. Hold one end of the string in each of \
         your two hands.\n  2. Bring both ends of the string around yourself.",
    ] {
        assert_eq!(split_attempts(t), [t], "{t}");
    }
}

/// The ESR layer's per-row splices in a left-padded batch compute what each sequence
/// computes alone with its own edit and `Positions::Range(1..)`: the attention sink (each
/// sequence's first real position) is left out, wherever the padding puts it.
#[test]
fn padded_batch_splices_each_row_with_its_own_edit_from_its_second_position() {
    use candle_core::{DType, Device, Tensor};
    use sae_ablate::edit::{Edits, LatentEdit, SpliceMode};
    use sae_ablate::esr::sites::RowSplices;
    use sae_ablate::hooks::{HookPoint, Hooks, Positions, SaeSplice};
    use sae_ablate::model::HookedModel;
    use sae_ablate::sae::Architecture;

    let tok = smollm::tokenizer();
    let mut model = smollm::model();
    let point: HookPoint = "blocks.15.hook_resid_post".parse().unwrap();
    let mut sae = small::random(Architecture::TopK, model.d_model(), 64, DType::F32, 11);
    sae.set_first_trained_position(1);
    let all: Vec<u32> = (0..64).collect();
    let edits = [
        Edits::new(SpliceMode::ErrorPreserving).zero(&all),
        all.iter()
            .fold(Edits::new(SpliceMode::ErrorPreserving), |e, &i| {
                e.with(i, LatentEdit::Scale(3.0))
            }),
    ];
    let splice = |k: usize, pos: Positions| SaeSplice::new(&sae, &edits[k], pos).unwrap();
    let long = tok.encode(&tok.chat_prompt(TIRE).unwrap()).unwrap();
    let short = tok.encode("Bread:").unwrap();
    assert!(long.len() > short.len() + 2);
    let pad = long.len() - short.len();
    let dev = Device::Cpu;
    // Reference: each sequence alone, the range given explicitly, no first-position rule.
    let alone = |model: &mut sae_ablate::model::Model, ids: &[u32], k: usize, pos: Positions| {
        let t = Tensor::from_slice(ids, (1, ids.len()), &dev).unwrap();
        let mut h = Hooks::new().with(point, splice(k, pos).including_untrained_positions());
        let l = model.forward_last(&t, 0, &mut h).unwrap();
        l.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
    };
    let want_long = alone(&mut model, &long, 0, Positions::Range(1..usize::MAX));
    let want_short = alone(&mut model, &short, 1, Positions::Range(1..usize::MAX));
    let sink_too = alone(&mut model, &short, 1, Positions::All);
    let other_edit = alone(&mut model, &short, 0, Positions::Range(1..usize::MAX));

    let mut flat = long.clone();
    flat.extend(std::iter::repeat_n(short[0], pad));
    flat.extend_from_slice(&short);
    let toks = Tensor::from_vec(flat, (2, long.len()), &dev).unwrap();
    let hook = RowSplices::new(
        vec![splice(0, Positions::All), splice(1, Positions::All)],
        vec![0, 1],
    )
    .unwrap();
    let mut h = Hooks::new().with(point, hook);
    let got = model
        .forward_last_padded(&toks, 0, &[0, pad], &mut h)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let (d_long, d_short) = (
        max_diff(&got[0], &want_long),
        max_diff(&got[1], &want_short),
    );
    assert!(
        d_long < 2e-2 && d_short < 2e-2,
        "batched vs alone: {d_long} {d_short}"
    );
    // Splicing the sink as well, or the other row's edit, changes the logits far beyond
    // that tolerance, so the comparison above can tell where the splice starts and which
    // edit each row got.
    let d_sink = max_diff(&sink_too, &want_short);
    assert!(
        d_sink > 0.5,
        "splicing the sink moved the logits by only {d_sink}"
    );
    let d_edit = max_diff(&other_edit, &want_short);
    assert!(d_edit > 0.5, "the two edits differ by only {d_edit}");
    let err = RowSplices::new(vec![splice(0, Positions::All)], vec![0, 1]).unwrap_err();
    assert!(err.to_string().contains("splice 1"), "{err}");
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
    cfg.judge2_model = Some(root.join("assets/gemma-3-270m/gemma-3-270m-q4_k_m.gguf"));
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
    assert!(j["timings"]["stages"]["trials_generate"].is_f64());

    let names: Vec<&str> = r.conditions.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["baseline", "otd_ablated", "steer_ablated", "random"]
    );
    let latents = r.steering.len();
    assert_eq!(latents, cfg.steer_latents);
    let n = cfg.n_prompts * latents * cfg.samples;
    // Wilson's upper bound at 0 events, z²/(n + z²) with z = 1.959964.
    let z2 = 1.959964f64 * 1.959964;
    let check_rates = |c: &esr::stats::ConditionSummary| {
        for (x, v, ci) in [
            (
                c.multi_attempts,
                c.multi_attempt_rate,
                c.ci95.multi_attempt_rate,
            ),
            (c.esr_count, c.esr_rate, c.ci95.esr_rate),
        ] {
            assert_eq!(v, x as f64 / c.n as f64, "{}", c.name);
            assert!(
                ci[0] <= v + 1e-12 && v <= ci[1] + 1e-12 && ci[0] >= 0.0 && ci[1] <= 1.0,
                "{}: {ci:?}",
                c.name
            );
            if x == 0 {
                let hi = z2 / (c.n as f64 + z2);
                assert!((ci[1] - hi).abs() < 1e-6, "{}: {ci:?} vs {hi}", c.name);
            }
        }
        let [lo, hi] = c.ci95.mean_first_score;
        assert!(lo <= c.mean_first_score + 1e-9 && c.mean_first_score <= hi + 1e-9);
        assert!(c.esr_count <= c.multi_attempts, "ESR implies multi-attempt");
        assert!((0.0..=100.0).contains(&c.mean_first_score));
    };
    for c in &r.conditions {
        assert_eq!(c.n, n, "{}", c.name);
        assert_eq!(c.clusters, cfg.n_prompts * latents, "{}", c.name);
        check_rates(c);
    }
    assert_eq!(r.unsteered.n, cfg.n_prompts * cfg.chat_samples);
    check_rates(&r.unsteered);
    // Paired comparisons: every trial of a condition has its baseline partner.
    let pairs: Vec<&str> = r.paired.iter().map(|p| p.condition.as_str()).collect();
    assert_eq!(pairs, ["otd_ablated", "steer_ablated", "random"]);
    for p in &r.paired {
        assert_eq!((p.reference.as_str(), p.pairs), ("baseline", n), "{p:?}");
        assert!((0.0..=1.0).contains(&p.multi_mcnemar_p));
        if p.multi_only_condition + p.multi_only_reference == 0 {
            assert_eq!(p.multi_mcnemar_p, 1.0);
        }
    }
    let pd = |name: &str| r.paired.iter().find(|p| p.condition == name).unwrap();
    let base = &r.conditions[0];
    for (name, p) in [("otd_ablated", pd("otd_ablated")), ("random", pd("random"))] {
        let c = r.conditions.iter().find(|c| c.name == name).unwrap();
        assert!(
            (p.first_score_diff - (c.mean_first_score - base.mean_first_score)).abs() < 1e-9,
            "with every trial paired, the mean difference is the difference of means"
        );
    }
    // The positive control: zero-ablating the steering latent undoes the steering, so it
    // moves the first-attempt score up by far more than the random sets do.
    let (pos, rnd) = (pd("steer_ablated"), pd("random"));
    assert!(
        pos.first_score_diff > 20.0 && pos.first_score_diff > 2.0 * rnd.first_score_diff.abs(),
        "positive control {pos:?} vs random {rnd:?}"
    );
    assert!(
        pos.first_score_diff_ci95[0] > rnd.first_score_diff_ci95[1],
        "positive control {pos:?} vs random {rnd:?}"
    );
    // Same seeds, so the random sets differ from each other and from the OTD set, but all
    // have its size.
    assert_eq!(r.random_sets.len(), cfg.random_sets);
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
    // Calibration moved the score down: the bisection bracketed the target (a probe at or
    // above the calibrated strength scores at most the target) and the steered baseline
    // scores far below the unsteered answers.
    for s in &r.steering {
        assert!(s.strength > 0.0, "{s:?}");
        assert!(
            s.probes
                .iter()
                .any(|&(v, sc)| v >= s.strength && sc <= cfg.target_score),
            "no probe at or above the calibrated strength reached the target: {s:?}"
        );
        assert!(
            s.probes
                .iter()
                .filter(|&&(v, _)| v < s.strength)
                .all(|&(_, sc)| sc > cfg.target_score - 1e-9)
                || s.probes.iter().all(|&(v, _)| v >= s.strength),
            "a probe below the calibrated strength already reached the target: {s:?}"
        );
    }
    assert!(
        base.mean_first_score < r.unsteered.mean_first_score - 20.0,
        "steered {} vs unsteered {}",
        base.mean_first_score,
        r.unsteered.mean_first_score
    );

    // The boost sweep: every factor pooled, then per latent; ×1 is the baseline's trials.
    let pooled: Vec<_> = r
        .boost_sweep
        .iter()
        .filter(|p| p.latent.is_none())
        .collect();
    let factors: Vec<f64> = pooled.iter().map(|p| p.factor).collect();
    assert_eq!(factors, cfg.boost_factors);
    assert_eq!(r.boost_sweep.len(), factors.len() * (1 + latents));
    for p in &pooled {
        assert_eq!(p.summary.n, cfg.boost_prompts * latents, "{p:?}");
        check_rates(&p.summary);
    }
    let at = |f: f64| pooled.iter().find(|p| p.factor == f).unwrap();
    let first = |f: f64| at(f).summary.mean_first_score;
    let calibrated = r.steering.iter().map(|s| s.strength as f64).sum::<f64>() / latents as f64;
    for p in &pooled {
        assert!(
            (p.mean_strength - p.factor * calibrated).abs() < 1e-3 * calibrated,
            "factor {} steers at {} (calibrated {calibrated})",
            p.factor,
            p.mean_strength
        );
    }
    assert!(
        first(0.25) > first(3.0) + 20.0,
        "a quarter of the strength keeps answers on topic: {} vs {}",
        first(0.25),
        first(3.0)
    );
    // The meta-prompt and splice-site subsets, with their pairs.
    let m = r.meta_prompt.as_ref().unwrap();
    let mn: Vec<&str> = m.conditions.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(mn, ["baseline", "meta_prompt", "meta_prompt_otd_ablated"]);
    for c in &m.conditions {
        assert_eq!(c.n, cfg.meta_prompts * latents, "{}", c.name);
    }
    assert_eq!(m.paired.len(), 2);
    assert!(m
        .paired
        .iter()
        .all(|p| p.pairs == cfg.meta_prompts * latents));
    let st = r.sites.as_ref().unwrap();
    assert_eq!(st.conditions.len(), 4);
    assert!(st
        .paired
        .iter()
        .all(|p| p.pairs == cfg.sites_prompts * latents));
    // The second judge ranks the same attempts much like the first.
    let a = r.judge_agreement.as_ref().unwrap();
    assert_eq!(a.attempts, cfg.judge2_attempts);
    assert!(a.spearman_delta > 0.3 && a.spearman_delta <= 1.0, "{a:?}");
    assert!(j["judge_agreement"]["spearman_delta"].is_f64());
    assert!(j["paired"][0]["multi_mcnemar_p"].is_f64());

    let trials = std::fs::read_to_string(out.join("trials.jsonl")).unwrap();
    let extra = (cfg.boost_factors.len() - 1) * cfg.boost_prompts
        + 2 * cfg.meta_prompts
        + 2 * cfg.sites_prompts;
    assert_eq!(
        trials.lines().count(),
        4 * n + extra * latents + cfg.n_prompts * cfg.chat_samples
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for section in [
        "| baseline |",
        "not measured here",
        "## Summary",
        "McNemar",
        "Positive control",
        "## Boost sweep",
        "## Self-monitoring meta-prompt",
        "## Splice sites",
        "Second judge",
        "## This run next to the paper",
    ] {
        assert!(md.contains(section), "report.md lacks `{section}`:\n{md}");
    }
    for p in [
        "conditions.png",
        "otd_activation.png",
        "sae_training_curve.png",
        "boost_sweep.png",
        "meta_prompt.png",
    ] {
        assert!(is_png(&out.join(p)), "{p} is not a PNG");
    }
    let sae = Sae::load(out.join("sae"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(sae.d_sae(), cfg.train.d_sae);
    assert_eq!(sae.hook_name(), Some(cfg.sae_hook.as_str()));
    let _ = std::fs::remove_dir_all(&out);
}
