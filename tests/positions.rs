//! The positions an SAE was trained on: recorded in its config, saved and loaded with it,
//! and honoured by `SaeSplice` (per row in left-padded batches), on SmolLM2-135M-Instruct.

#[path = "common/smollm.rs"]
mod smollm;

use candle_core::{Device, Tensor};
use sae_ablate::edit::{reference, Edits, SpliceMode};
use sae_ablate::hooks::{HookPoint, Hooks, Positions, SaeSplice};
use sae_ablate::model::{generate, generate_batch, HookedModel, SamplingParams};
use sae_ablate::rng::Rng;
use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
use smollm::{model, tokenizer};

const D: usize = 576;

/// Seeded normal values (Box–Muller on SplitMix64).
fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = 1.0 - rng.uniform();
            let u2 = rng.uniform();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32 * std
        })
        .collect()
}

/// A seeded random ReLU SAE on SmolLM2's residual stream with `first_trained_position`.
fn sae(d_sae: usize, first: usize) -> Sae {
    let dev = Device::Cpu;
    let mut rng = Rng::new(7);
    let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s, &dev).unwrap();
    let mut cfg = SaeConfig::new(Architecture::Standard, D, d_sae);
    cfg.first_trained_position = first;
    Sae::new(
        cfg,
        SaeWeights::new(
            t(randn(&mut rng, D * d_sae, 0.05), &[D, d_sae]),
            t(randn(&mut rng, d_sae, 0.1), &[d_sae]),
            t(randn(&mut rng, d_sae * D, 0.05), &[d_sae, D]),
            t(randn(&mut rng, D, 0.1), &[D]),
        ),
    )
    .unwrap()
}

fn edits() -> Edits {
    Edits::new(SpliceMode::ErrorPreserving).zero(&(0..128).collect::<Vec<u32>>())
}

fn row(t: &Tensor, b: usize, p: usize) -> Vec<f32> {
    t.get(b).unwrap().get(p).unwrap().to_vec1().unwrap()
}

/// On a plain tensor: positions before each row's first trained position (after its left
/// padding) come back bit for bit; the others equal the reference splice of that row.
#[test]
fn splice_leaves_untrained_positions_alone_per_row() {
    let s = sae(256, 1);
    let e = edits();
    let (b, t) = (2, 5);
    let mut rng = Rng::new(11);
    let act = Tensor::from_vec(randn(&mut rng, b * t * D, 1.0), (b, t, D), &Device::Cpu).unwrap();
    let want = reference::apply(&s, &act, &e).unwrap();
    let splice = SaeSplice::new(&s, &e, Positions::All).unwrap();
    assert_eq!(splice.first_trained_position(), 1);
    // Row 0 unpadded (position 0 untouched), row 1 with 2 padding positions (0..3 untouched).
    let out = splice
        .apply(&act, 0, None, Some(&[0, 2]))
        .unwrap()
        .expect("positions selected");
    for (bi, first) in [(0usize, 1usize), (1, 3)] {
        for p in 0..t {
            let (got, orig, reference) = (row(&out, bi, p), row(&act, bi, p), row(&want, bi, p));
            if p < first {
                assert_eq!(got, orig, "row {bi} position {p} must be unchanged");
            } else {
                let diff = got
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 1e-4, "row {bi} position {p}: {diff}");
                assert_ne!(got, orig, "row {bi} position {p} must be edited");
            }
        }
    }
    // Without padding, only position 0 of every row is left alone; a selector that starts
    // later wins; including the untrained positions edits position 0 as well.
    let out = splice.apply(&act, 0, None, None).unwrap().unwrap();
    assert_eq!(row(&out, 1, 0), row(&act, 1, 0));
    assert_ne!(row(&out, 1, 1), row(&act, 1, 1));
    let late = SaeSplice::new(&s, &e, Positions::starting_at(3)).unwrap();
    let out = late.apply(&act, 0, None, None).unwrap().unwrap();
    assert_eq!(row(&out, 0, 2), row(&act, 0, 2));
    assert_ne!(row(&out, 0, 3), row(&act, 0, 3));
    let all = splice.including_untrained_positions();
    let out = all.apply(&act, 0, None, None).unwrap().unwrap();
    assert_ne!(row(&out, 0, 0), row(&act, 0, 0));
    // A decode step past the first position is spliced whole.
    let step = act.narrow(1, 4, 1).unwrap();
    let s1 = SaeSplice::new(&s, &e, Positions::All).unwrap();
    assert!(s1
        .apply(&step, 4, Some(4), Some(&[0, 2]))
        .unwrap()
        .is_some());
    // Only untrained positions selected: nothing to do.
    let first_only = SaeSplice::new(&s, &e, Positions::Range(0..1)).unwrap();
    assert!(first_only.apply(&act, 0, None, None).unwrap().is_none());
}

/// In the model: with the first position excluded, position 0's logits are those of the
/// unhooked model, while an SAE spliced everywhere changes them.
#[test]
fn first_position_logits_are_untouched_in_the_model() {
    let tok = tokenizer();
    let ids = tok.encode("The capital of France is").unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let s = sae(256, 1);
    let e = edits();
    let point = HookPoint::ResidPost(5);
    let mut m = model();
    let clean = m.forward(&x, 0, &mut Hooks::new()).unwrap();
    let skip = SaeSplice::new(&s, &e, Positions::All).unwrap();
    let spliced = m
        .forward(&x, 0, &mut Hooks::new().with(point, skip))
        .unwrap();
    let everywhere = SaeSplice::new(&s, &e, Positions::All)
        .unwrap()
        .including_untrained_positions();
    let sink = m
        .forward(&x, 0, &mut Hooks::new().with(point, everywhere))
        .unwrap();
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(diff(&row(&clean, 0, 0), &row(&spliced, 0, 0)) < 1e-4);
    assert!(diff(&row(&clean, 0, 0), &row(&sink, 0, 0)) > 1e-2);
    assert!(diff(&row(&clean, 0, 2), &row(&spliced, 0, 2)) > 1e-2);
}

/// Left-padded batch generation with such a splice reproduces each prompt's own
/// generation with the same splice (each row skips its own first position).
#[test]
fn padded_batch_generation_skips_each_rows_first_position() {
    let tok = tokenizer();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "It is a truth universally acknowledged, that a single man",
        "Water boils at",
    ]
    .iter()
    .map(|p| tok.encode(p).unwrap())
    .collect();
    assert!(prompts[0].len() != prompts[1].len() && prompts[1].len() != prompts[2].len());
    let s = sae(256, 1);
    let e = Edits::new(SpliceMode::ErrorPreserving)
        .zero(&(0..128).collect::<Vec<u32>>())
        .steer(3, 20.0);
    let point = HookPoint::ResidPost(5);
    let hooks = || Hooks::new().with(point, SaeSplice::new(&s, &e, Positions::All).unwrap());
    let params = SamplingParams::greedy_exactly(5);
    let mut m = model();
    let batch = generate_batch(&mut *m, &prompts, &params, &mut hooks()).unwrap();
    let mut differs = false;
    for (i, p) in prompts.iter().enumerate() {
        let single = generate(&mut *m, p, &params, &mut hooks()).unwrap();
        assert_eq!(batch[i].ids, single.ids, "prompt {i}");
        let plain = generate(&mut *m, p, &params, &mut Hooks::new()).unwrap();
        differs |= plain.ids != single.ids;
    }
    assert!(differs, "the splice changes some continuation");
}

/// The SAELens writer stores the first trained position in `cfg.json`'s metadata and the
/// loader reads it back; a `cfg.json` without it loads as 0.
#[test]
fn first_trained_position_round_trips_through_saelens() {
    let dir = std::env::temp_dir().join(format!("sae-ablate-positions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    sae(64, 1).save_saelens(&dir).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg["metadata"]["first_trained_position"], 1);
    let back = Sae::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(back.config().first_trained_position, 1);
    let mut cfg = cfg;
    cfg["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("first_trained_position");
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
    assert_eq!(
        Sae::load(&dir, &Device::Cpu)
            .unwrap()
            .config()
            .first_trained_position,
        0
    );
    cfg["metadata"]["first_trained_position"] = serde_json::json!(-1);
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
    let err = Sae::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("first_trained_position"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
