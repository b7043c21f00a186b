//! The generation runs of the experiment ("arms": a condition over a set of prompts,
//! steering latents and samples) and the judging of their answers.

use crate::edit::{Edits, SpliceMode};
use crate::hooks::{AddVector, HookPoint, Hooks, Positions, SaeSplice};
use crate::progress::Step;
use crate::{Result, Sae};

use super::judge::{self, Judge};
use super::sites::RowSplices;
use super::stats::Trial;
use super::{Ctx, SteeringLatent};

/// What an arm zero-ablates (error-preserving, at the SAE's hook point, after the
/// steering when both act at the same point).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Ablate {
    /// Nothing.
    Nothing,
    /// One fixed latent set (the OTD latents).
    Set(Vec<u32>),
    /// The steering latent of each trial (the positive control).
    SteeringLatent,
    /// Random control sets, one per cluster: the trial of prompt `p` and steering latent
    /// number `l` ablates set `(p + l) mod len`.
    Random(Vec<Vec<u32>>),
}

/// One condition run over the first `prompts` prompts × every steering latent ×
/// `samples` samples.
#[derive(Debug, Clone)]
pub(super) struct Arm {
    /// Condition name of its trials.
    pub name: String,
    /// The prompts carry the self-monitoring meta-prompt.
    pub meta: bool,
    /// Steering strength = `boost` × the latent's calibrated strength.
    pub boost: f32,
    /// What is ablated.
    pub ablate: Ablate,
    /// Splice also the positions the SAE was not trained on (the attention sink).
    pub all_positions: bool,
    /// The first `prompts` prompts.
    pub prompts: usize,
    /// Samples per prompt × latent (sample `s` has its own seed).
    pub samples: usize,
}

impl Arm {
    /// Generations this arm makes with `latents` steering latents.
    pub fn len(&self, latents: usize) -> usize {
        self.prompts * self.samples * latents
    }
}

/// The sampler seed of row `prompt` for steering latent number `latent` and sample
/// `sample`: every condition of the same triple samples with the same seed.
pub(super) fn trial_seed(seed: u64, latent: usize, sample: usize) -> u64 {
    seed.wrapping_add(1_000_000 * (latent as u64 + 1) + 100_000 * sample as u64)
}

/// The hooks of one batch: steering by `steer = (latent, strength)` at `steer_point`,
/// then, at `sae_point`, row `b` (prompt `rows[b]`, left-padded by `pads[b]`) zero-ablates
/// `sets[(rows[b] + rot) % sets.len()]` at the positions the SAE was trained on (every
/// position when `all_positions`).
#[allow(clippy::too_many_arguments)]
pub(super) fn batch_hooks(
    sae: &Sae,
    steer_point: &HookPoint,
    sae_point: &HookPoint,
    steer: Option<(u32, f32)>,
    sets: &[Vec<u32>],
    rot: usize,
    all_positions: bool,
    rows: &[usize],
) -> Result<Hooks> {
    let mut hooks = Hooks::new();
    if let Some((latent, strength)) = steer {
        let dir = sae.decoder_direction(latent as usize)?;
        hooks.add(
            *steer_point,
            AddVector::new(&dir, strength, Positions::All)?,
        );
    }
    if sets.iter().any(|s| !s.is_empty()) {
        let splices = sets
            .iter()
            .map(|s| {
                let edits = Edits::new(SpliceMode::ErrorPreserving).zero(s);
                let splice = SaeSplice::new(sae, &edits, Positions::All)?;
                Ok(if all_positions {
                    splice.including_untrained_positions()
                } else {
                    splice
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let which = rows.iter().map(|&p| (p + rot) % sets.len()).collect();
        hooks.add(*sae_point, RowSplices::new(splices, which)?);
    }
    Ok(hooks)
}

/// Generate every answer of `arm` (scores left empty for [`judge_all`]).
pub(super) fn generate_arm(
    cx: &mut Ctx<'_>,
    sae: &Sae,
    points: (&HookPoint, &HookPoint),
    arm: &Arm,
    steering: &[SteeringLatent],
    pb: &mut Step,
) -> Result<Vec<Trial>> {
    let (steer_point, sae_point) = points;
    let cfg = cx.cfg;
    let which: Vec<usize> = (0..arm.prompts.min(cx.prompts.len())).collect();
    let mut out = Vec::with_capacity(arm.len(steering.len()));
    for (li, st) in steering.iter().enumerate() {
        let sets: Vec<Vec<u32>> = match &arm.ablate {
            Ablate::Nothing => Vec::new(),
            Ablate::Set(s) => vec![s.clone()],
            Ablate::SteeringLatent => vec![vec![st.latent]],
            Ablate::Random(v) => v.clone(),
        };
        let strength = st.strength * arm.boost;
        for s in 0..arm.samples {
            let seed = trial_seed(cfg.seed, li, s);
            let mut hooks = |rows: &[usize]| {
                batch_hooks(
                    sae,
                    steer_point,
                    sae_point,
                    Some((st.latent, strength)),
                    &sets,
                    li,
                    arm.all_positions,
                    rows,
                )
            };
            let gens = cx.generate(arm.meta, &which, cfg.max_new_tokens, seed, &mut hooks, pb)?;
            for (&p, g) in which.iter().zip(gens) {
                out.push(Trial {
                    condition: arm.name.clone(),
                    latent: st.latent,
                    strength,
                    prompt: p,
                    sample: s,
                    seed: seed + p as u64,
                    random_set: match &arm.ablate {
                        Ablate::Random(v) if !v.is_empty() => Some((p + li) % v.len()),
                        _ => None,
                    },
                    tokens: g.len(),
                    scores: Vec::new(),
                    text: cx.text(&g)?,
                });
            }
        }
    }
    Ok(out)
}

/// Scores a block of `(prompt, attempt)` items: their Δ, in order.
pub(super) type ScoreBlock<'a> = dyn FnMut(&[(usize, &str)]) -> Result<Vec<f64>> + 'a;

/// Δ of every `(prompt, attempt)` item, in the items' order, computed by `deltas` on
/// blocks of items whose prompts lie within `block` consecutive prompts (sorted by
/// prompt: each block's prompts, and their contrast prompts, are prefilled once per
/// block). Reports the items done to `pb`.
pub(super) fn judge_in_blocks(
    items: &[(usize, &str)],
    block: usize,
    deltas: &mut ScoreBlock<'_>,
    pb: &mut Step,
) -> Result<Vec<f64>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&k| (items.get(k).map_or(0, |i| i.0), k));
    let mut out = vec![f64::NAN; items.len()];
    let mut rest = order.as_slice();
    while let Some(&first) = rest.first() {
        let p0 = items.get(first).map_or(0, |i| i.0);
        let cut = rest
            .iter()
            .position(|&k| items.get(k).is_some_and(|i| i.0 >= p0 + block.max(1)))
            .unwrap_or(rest.len());
        let (now, later) = rest.split_at(cut);
        let part: Vec<(usize, &str)> = now.iter().filter_map(|&k| items.get(k).copied()).collect();
        for (&k, x) in now.iter().zip(deltas(&part)?) {
            if let Some(v) = out.get_mut(k) {
                *v = x;
            }
        }
        pb.inc(now.len() as u64);
        rest = later;
    }
    Ok(out)
}

/// Split every trial's answer into attempts and judge them all (see
/// [`judge_in_blocks`]). Sets each trial's `scores` and returns the raw Δ of every
/// attempt, per trial.
pub(super) fn judge_all(
    cx: &mut Ctx<'_>,
    judge: &Judge,
    trials: &mut [Trial],
) -> Result<Vec<Vec<f64>>> {
    let attempts: Vec<Vec<String>> = trials
        .iter()
        .map(|t| judge::split_attempts(&t.text))
        .collect();
    let mut owner = Vec::new();
    let mut items: Vec<(usize, &str)> = Vec::new();
    for (k, (t, a)) in trials.iter().zip(&attempts).enumerate() {
        for s in a {
            owner.push(k);
            items.push((t.prompt, s.as_str()));
        }
    }
    let mut pb = super::bar(cx.cfg, items.len() as u64, "judge");
    let block = cx.cfg.batch_size;
    let flat = judge_in_blocks(&items, block, &mut |part| cx.deltas(judge, part), &mut pb)?;
    pb.finish();
    let mut deltas: Vec<Vec<f64>> = vec![Vec::new(); trials.len()];
    for (&k, x) in owner.iter().zip(flat) {
        if let Some(v) = deltas.get_mut(k) {
            v.push(x);
        }
    }
    for (t, d) in trials.iter_mut().zip(&deltas) {
        t.scores = d.iter().map(|&x| judge.score(x)).collect();
    }
    Ok(deltas)
}
