//! The Endogenous Steering Resistance (ESR) ablation experiment, end to end
//! (McKenzie et al., arXiv 2602.06941), on any hookable model: the crate's main job.
//!
//! [`run`] takes an [`EsrConfig`] (see [`EsrConfig::preset`]: `smollm2` runs on a laptop
//! CPU, `llama-3.3-70b-goodfire` is the paper's setting with user-supplied weights) and
//! goes through these stages, each timed and cached where it can be:
//!
//! 1. **Answers.** The model answers every prompt ([`prompts::PROMPTS`]) unsteered,
//!    `chat_samples` times (temperature as in the trials). Sample 0 is the on-topic
//!    reference for the judge and the OTD search; all samples join the SAE's training text.
//! 2. **SAE.** Either the user's SAE, or one trained by the crate's own
//!    [`harvest`](crate::harvest) → [`train`] path on the Austen novels plus
//!    the chat transcripts of stage 1. Either way it is evaluated
//!    ([`evaluate`]: FVU, L0, dead fraction, CE loss recovered) on
//!    held-out text.
//! 3. **Judge.** [`judge::Judge`] is calibrated on the stage-1 answers (`Δ_ref`), and its
//!    discrimination is reported: mean score of answers under their own prompt vs under
//!    another prompt's answer.
//! 4. **Off-topic detectors.** Each prompt is paired with its own answer (on-topic) and
//!    with the next prompt's answer (off-topic); the SAE's latents are max-pooled over the
//!    answer positions. The paper's rule: an OTD latent is zero on every on-topic answer
//!    and non-zero on at least `otd_min_off_fraction` of the off-topic ones. When no latent
//!    passes, documented fallbacks (`relaxed`, then `contrast`, see `find_otd`) are used
//!    and `otd_rule` says which.
//! 5. **Steering latents.** Alive latents (they fire on the evaluation text) that are
//!    inactive on every prompt (the paper's rule), drawn at random with the seed.
//! 6. **Calibration.** Per steering latent, bisection on the strength `v` (steering adds
//!    `v · W_dec[latent]` at every position) until the mean first-attempt score on the
//!    calibration prompts falls to `target_score`.
//! 7. **Trials.** For every steering latent and prompt, with the same seeds: `baseline`
//!    (steered), `otd_ablated` (steered, OTD latents zero-ablated in error-preserving mode
//!    at the SAE's hook point, all positions) and `random_1..` (same-size random sets of
//!    alive latents, excluding OTD and steering latents, ablated the same way).
//! 8. **Report.** Per condition: n, multi-attempt rate, ESR rate, mean first score with
//!    95% bootstrap intervals; `results.json`, `report.md`, plots, `trials.jsonl`, and the
//!    SAE in SAELens format under `sae/` (see [`report`]).
//!
//! The published off-topic-detector latents of Goodfire's Llama-3.3-70B SAE are
//! [`OTD_LATENTS_LLAMA33_70B_L50`]; [`latent_preset`] gives them as a checked
//! [`LatentSet`] by name (`esr26`), to zero-ablate with
//! [`Edits::zero`](crate::edit::Edits::zero).
//!
//! Needs the `esr` feature (on by default).

pub mod judge;
pub mod prompts;
pub mod report;
pub mod stats;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::edit::{Edits, LatentSet, SpliceMode};
use crate::eval::{evaluate, EvalConfig, EvalReport};
use crate::harvest::{corpus_files, ActivationStore, Contexts, HarvestConfig};
use crate::hooks::{ActivationCache, AddVector, HookPoint, Hooks, Positions, SaeSplice};
use crate::io::atomic::{write_bytes, write_json};
use crate::model::{
    self, generate_batch, HookedModel, LoadOptions, SamplingParams, Tokenizer, WeightFormat,
};
use crate::progress::{Reporter, Step};
use crate::rng::Rng;
use crate::train::{self, ShardSource, TrainConfig};
use crate::{Error, Result, Sae};

use judge::Judge;
use stats::{summarize, ConditionSummary, Trial};

/// How the experiment's SAE is trained when none is supplied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaeTrainSpec {
    /// Folder of `.txt` files (the Austen novels); the chat transcripts are added to it.
    pub corpus: PathBuf,
    /// Tokens per harvested context.
    pub context_len: usize,
    /// Activation rows harvested.
    pub tokens: u64,
    /// Passes over them in training.
    pub epochs: u64,
    /// Latents.
    pub d_sae: usize,
    /// TopK's k.
    pub k: usize,
    /// Training batch (rows).
    pub batch_size: usize,
    /// A latent silent for this many training tokens counts as dead (AuxK).
    pub dead_tokens_threshold: u64,
    /// Contexts at the end of the corpus held out from harvesting (evaluation text).
    pub holdout_contexts: usize,
}

/// The 26 off-topic-detector latents of Goodfire's Llama-3.3-70B-Instruct SAE
/// (layer 50, 65,536 latents) whose zero-ablation reduces endogenous steering
/// resistance (McKenzie et al., "Endogenous Steering Resistance", arXiv 2602.06941;
/// list from the paper's code release, agencyenterprise/endogenous-steering-resistance).
pub const OTD_LATENTS_LLAMA33_70B_L50: [u32; 26] = [
    3675, 7517, 9168, 10304, 11977, 15375, 17481, 17516, 24684, 27331, 28540, 33044, 34002, 34765,
    37536, 40119, 40792, 41038, 45078, 46037, 49897, 54311, 58565, 59483, 61116, 61420,
];

/// A named latent set of the experiment, checked against an SAE of `d_sae` latents:
/// `esr26` = [`OTD_LATENTS_LLAMA33_70B_L50`] (a 65,536-latent SAE). The CLI's
/// `--zero-preset` takes these names.
///
/// ```
/// let otd = sae_ablate::esr::latent_preset("esr26", 65536).unwrap();
/// assert_eq!(otd.len(), 26);
/// assert!(sae_ablate::esr::latent_preset("esr26", 4608).is_err());
/// ```
pub fn latent_preset(name: &str, d_sae: usize) -> Result<LatentSet> {
    match name {
        "esr26" => LatentSet::new(&OTD_LATENTS_LLAMA33_70B_L50, d_sae),
        other => Err(Error::Invalid(format!(
            "unknown latent preset `{other}` (known: esr26)"
        ))),
    }
}

/// Every setting of the experiment (all of it is written to `results.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EsrConfig {
    /// Preset name.
    pub preset: String,
    /// Fewer prompts, latents and tokens; the same steps.
    pub quick: bool,
    /// GGUF file or HF directory.
    pub model: PathBuf,
    /// A ready SAE (any format [`Sae::load`] reads); `None` trains one as `train` says.
    pub sae: Option<PathBuf>,
    /// SAE training recipe (its corpus and held-out split also serve the evaluation).
    pub train: SaeTrainSpec,
    /// Held-out contexts in the SAE evaluation.
    pub eval_contexts: usize,
    /// Where the SAE reads and the ablation happens (TransformerLens name).
    pub sae_hook: String,
    /// Where the steering vector `v · W_dec[latent]` is added.
    pub steer_hook: String,
    /// Prompts used (the first `n_prompts` of [`prompts::PROMPTS`]).
    pub n_prompts: usize,
    /// Unsteered samples per prompt (stage 1).
    pub chat_samples: usize,
    /// Generated tokens per answer.
    pub max_new_tokens: usize,
    /// Sampling temperature.
    pub temperature: f32,
    /// Nucleus sampling threshold.
    pub top_p: f32,
    /// HF-style repetition penalty.
    pub repetition_penalty: f32,
    /// Seed of everything random.
    pub seed: u64,
    /// Steering latents.
    pub steer_latents: usize,
    /// Prompts used to calibrate each latent's strength.
    pub calib_prompts: usize,
    /// Tokens generated per calibration answer.
    pub calib_tokens: usize,
    /// Bisection steps.
    pub bisection_steps: usize,
    /// First-attempt score the calibration aims at.
    pub target_score: f64,
    /// Tokens of each attempt the judge reads.
    pub judge_tokens: usize,
    /// OTD rule: minimum fraction of off-topic answers a latent fires on.
    pub otd_min_off_fraction: f64,
    /// At most this many OTD latents (the strongest by off-topic firing).
    pub otd_max: usize,
    /// Use these OTD latents instead of searching (the paper's published set).
    pub otd_fixed: Option<Vec<u32>>,
    /// Random control sets.
    pub random_sets: usize,
    /// Sequences per batch in generation and scoring.
    pub batch_size: usize,
    /// Bootstrap resamples.
    pub bootstrap: usize,
    /// Weight dtype of the model (`f32`, `f16` or `bf16`) when the weights are dense.
    pub model_dtype: String,
    /// `quantized` (GGUF blocks kept as stored, 8-bit activations: the fastest on a CPU)
    /// or `dense`; see [`crate::model::WeightFormat`]. Every stage uses the same model.
    pub model_weights: String,
    /// Cached answers, corpus, activations, SAE and evaluation.
    pub cache_dir: PathBuf,
    /// Where progress goes (nothing by default); not written to `results.json`.
    #[serde(skip)]
    pub progress: Reporter,
}

impl EsrConfig {
    /// A preset: `smollm2` (SmolLM2-135M-Instruct from `assets/`, an SAE trained here) or
    /// `llama-3.3-70b-goodfire` (the paper's setting: steer at layer 33, Goodfire SAE at
    /// layer 50, the 26 published OTD latents, temperature 0.6, 512 tokens; set `model`
    /// and `sae` to your copies). `quick` shrinks prompts, latents and tokens.
    pub fn preset(name: &str, quick: bool) -> Result<Self> {
        let austen = SaeTrainSpec {
            corpus: PathBuf::from("assets/austen"),
            context_len: 128,
            tokens: if quick { 12_000 } else { 150_000 },
            epochs: if quick { 2 } else { 3 },
            d_sae: if quick { 1536 } else { 4608 },
            k: 32,
            batch_size: if quick { 1024 } else { 4096 },
            dead_tokens_threshold: if quick { 8_000 } else { 50_000 },
            holdout_contexts: 64,
        };
        let tag = if quick { "-quick" } else { "" };
        let base = EsrConfig {
            preset: name.to_string(),
            quick,
            model: PathBuf::from("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            sae: None,
            train: austen,
            eval_contexts: if quick { 8 } else { 64 },
            sae_hook: "blocks.15.hook_resid_post".into(),
            steer_hook: "blocks.15.hook_resid_post".into(),
            n_prompts: if quick { 8 } else { 40 },
            chat_samples: if quick { 1 } else { 4 },
            max_new_tokens: if quick { 24 } else { 64 },
            temperature: 0.6,
            top_p: 1.0,
            repetition_penalty: 1.1,
            seed: 2602,
            steer_latents: if quick { 1 } else { 2 },
            calib_prompts: if quick { 4 } else { 8 },
            calib_tokens: if quick { 16 } else { 32 },
            bisection_steps: if quick { 3 } else { 6 },
            target_score: 30.0,
            judge_tokens: 32,
            otd_min_off_fraction: 0.8,
            otd_max: 26,
            otd_fixed: None,
            random_sets: 3,
            batch_size: 8,
            bootstrap: 1000,
            model_dtype: "f32".into(),
            model_weights: "quantized".into(),
            cache_dir: PathBuf::from(format!("assets/cache/esr-{name}{tag}")),
            progress: Reporter::none(),
        };
        match name {
            "smollm2" => Ok(base),
            "llama-3.3-70b-goodfire" => Ok(EsrConfig {
                model: PathBuf::from("models/Llama-3.3-70B-Instruct"),
                sae: Some(PathBuf::from("models/Llama-3.3-70B-Instruct-SAE-l50.pt")),
                sae_hook: "blocks.50.hook_resid_post".into(),
                steer_hook: "blocks.33.hook_resid_post".into(),
                max_new_tokens: if quick { 64 } else { 512 },
                calib_tokens: 64,
                otd_fixed: Some(OTD_LATENTS_LLAMA33_70B_L50.to_vec()),
                model_dtype: "bf16".into(),
                model_weights: "dense".into(),
                ..base
            }),
            _ => Err(Error::Invalid(format!(
                "unknown ESR preset `{name}`: expected smollm2 or llama-3.3-70b-goodfire"
            ))),
        }
    }

    /// Check the settings before any work is done.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Invalid(format!("ESR config: {what}")));
        if self.n_prompts < 2 || self.n_prompts > prompts::PROMPTS.len() {
            return bad(&format!(
                "n_prompts = {} must be in 2..={}",
                self.n_prompts,
                prompts::PROMPTS.len()
            ));
        }
        if self.calib_prompts == 0 || self.calib_prompts > self.n_prompts {
            return bad("calib_prompts must be in 1..=n_prompts");
        }
        if self.chat_samples == 0 || self.max_new_tokens == 0 || self.calib_tokens == 0 {
            return bad("chat_samples, max_new_tokens and calib_tokens must be ≥ 1");
        }
        if self.steer_latents == 0 || self.batch_size == 0 || self.judge_tokens == 0 {
            return bad("steer_latents, batch_size and judge_tokens must be ≥ 1");
        }
        if !(0.0..=100.0).contains(&self.target_score) {
            return bad("target_score must be in [0, 100]");
        }
        if !(0.0..=1.0).contains(&self.otd_min_off_fraction) {
            return bad("otd_min_off_fraction must be in [0, 1]");
        }
        if self.sae.is_some() && self.otd_fixed.is_none() && self.eval_contexts == 0 {
            return bad("eval_contexts must be ≥ 1");
        }
        dtype(&self.model_dtype)?;
        weights(&self.model_weights)?;
        Ok(())
    }
}

fn dtype(s: &str) -> Result<crate::FloatDtype> {
    s.parse().map_err(|e: Error| e.for_setting("model_dtype"))
}

fn weights(s: &str) -> Result<WeightFormat> {
    s.parse().map_err(|e: Error| e.for_setting("model_weights"))
}

/// Seconds per stage and throughput.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Seconds per stage, by name.
    pub stages: BTreeMap<String, f64>,
    /// Wall-clock seconds of the whole run.
    pub total_s: f64,
    /// Tokens generated (answers, calibration, trials).
    pub generated_tokens: u64,
    /// Seconds spent generating.
    pub generation_s: f64,
    /// `generated_tokens / generation_s` (batched, with hooks live).
    pub generation_tokens_per_s: f64,
    /// Attempt tokens the judge scored, each attempt counted twice (after its own prompt
    /// and after the contrast prompt); the shared prompt prefixes are not counted.
    pub judged_tokens: u64,
    /// Seconds spent judging.
    pub judge_s: f64,
    /// `judged_tokens / judge_s`.
    pub judge_tokens_per_s: f64,
    /// Whether the SAE (and its activations and evaluation) came from the cache.
    pub sae_cached: bool,
    /// Whether the unsteered answers came from the cache.
    pub answers_cached: bool,
}

/// A steering latent and its calibration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SteeringLatent {
    /// Latent id.
    pub latent: u32,
    /// The calibrated strength.
    pub strength: f32,
    /// `(strength, mean first-attempt score)` of every calibration probe, in order.
    pub probes: Vec<(f32, f64)>,
}

/// The judge's calibration and a check that it tells on-topic from off-topic text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeSummary {
    /// Median Δ of the unsteered answers (score 100).
    pub delta_ref: f64,
    /// Mean score of the unsteered answers under their own prompts.
    pub on_topic_mean_score: f64,
    /// Mean score of the same answers under the wrong prompt (the next prompt's).
    pub off_topic_mean_score: f64,
}

/// Per-latent firing statistics from the OTD search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentStats {
    /// Latent id.
    pub latent: u32,
    /// Fraction of on-topic answers it fires on (max-pooled > 0).
    pub on_fraction: f64,
    /// Fraction of off-topic answers it fires on.
    pub off_fraction: f64,
    /// Mean max-pooled activation on on-topic answers.
    pub on_mean: f64,
    /// Mean max-pooled activation on off-topic answers.
    pub off_mean: f64,
}

/// Everything `results.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EsrResults {
    /// The SAE's evaluation on held-out text.
    pub sae_eval: EvalReport,
    /// Where the SAE came from (a path, or "trained").
    pub sae_source: String,
    /// The OTD latents ablated in `otd_ablated`.
    pub otd_latents: Vec<u32>,
    /// Which rule picked them: `paper`, `relaxed` or `fixed`.
    pub otd_rule: String,
    /// Statistics of the OTD latents (or, when none, the best candidates).
    pub otd_stats: Vec<LatentStats>,
    /// The random control sets.
    pub random_sets: Vec<Vec<u32>>,
    /// Steering latents and their calibrated strengths.
    pub steering: Vec<SteeringLatent>,
    /// The judge's calibration.
    pub judge: JudgeSummary,
    /// One entry per condition.
    pub conditions: Vec<ConditionSummary>,
    /// Every setting and the seed.
    pub config: EsrConfig,
    /// The command line that produced this.
    pub command: String,
    /// Seconds per stage and throughput.
    pub timings: Timings,
}

struct Ctx<'a> {
    cfg: &'a EsrConfig,
    model: model::Model,
    tok: Tokenizer,
    prompts: Vec<&'static str>,
    prompt_ids: Vec<Vec<u32>>,
    stop: Vec<u32>,
    timings: Timings,
}

fn bar(cfg: &EsrConfig, len: u64, what: &str) -> Step {
    cfg.progress.step(what, "", len)
}

impl Ctx<'_> {
    fn params(&self, max_new_tokens: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            max_new_tokens,
            temperature: self.cfg.temperature,
            top_p: self.cfg.top_p,
            repetition_penalty: self.cfg.repetition_penalty,
            seed,
            stop_tokens: self.stop.clone(),
        }
    }

    /// Generate for prompts `which` in fixed batches; prompt `which[j]` samples with seed
    /// `seed + j` whatever the hooks, so conditions see identical random numbers.
    fn generate(
        &mut self,
        which: &[usize],
        max_new_tokens: usize,
        seed: u64,
        hooks: &mut Hooks,
        pb: &mut Step,
    ) -> Result<Vec<Vec<u32>>> {
        let t0 = Instant::now();
        let mut out = Vec::with_capacity(which.len());
        for (c, chunk) in which.chunks(self.cfg.batch_size).enumerate() {
            let prompts: Vec<Vec<u32>> = chunk
                .iter()
                .map(|&i| self.prompt_ids.get(i).cloned().unwrap_or_default())
                .collect();
            let params = self.params(max_new_tokens, seed + (c * self.cfg.batch_size) as u64);
            let gens = generate_batch(&mut self.model, &prompts, &params, hooks)?;
            for g in gens {
                let mut ids = g.ids;
                if g.stopped {
                    ids.pop();
                }
                self.timings.generated_tokens += ids.len() as u64;
                out.push(ids);
                pb.inc(1);
            }
        }
        self.timings.generation_s += t0.elapsed().as_secs_f64();
        Ok(out)
    }

    fn text(&self, ids: &[u32]) -> Result<String> {
        self.tok.decode(ids, true)
    }

    /// Judge Δ for `(prompt, text)` items, with timing.
    fn deltas(&mut self, judge: &Judge, items: &[(usize, &str)]) -> Result<Vec<f64>> {
        let t0 = Instant::now();
        let d = judge.deltas(&mut self.model, &self.tok, items)?;
        self.timings.judge_s += t0.elapsed().as_secs_f64();
        for &(_, t) in items {
            let n = self.tok.encode(t)?.len().min(judge.max_tokens);
            self.timings.judged_tokens += 2 * n as u64;
        }
        Ok(d)
    }
}

/// Run the whole experiment as `cfg` says, writing the outputs to `out`
/// (see [`report`]); `command` is recorded in the report.
pub fn run(cfg: &EsrConfig, out: &Path, command: &str) -> Result<EsrResults> {
    cfg.validate()?;
    let t_all = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    std::fs::create_dir_all(&cfg.cache_dir).map_err(|e| Error::io(&cfg.cache_dir, e))?;

    let t0 = Instant::now();
    let opts = LoadOptions {
        dtype: dtype(&cfg.model_dtype)?,
        weights: weights(&cfg.model_weights)?,
        ..LoadOptions::default()
    };
    let (m, tok) = model::load(&cfg.model, &opts)?;
    let sae_point: HookPoint = cfg.sae_hook.parse()?;
    let steer_point: HookPoint = cfg.steer_hook.parse()?;
    sae_point.validate(m.n_layers())?;
    steer_point.validate(m.n_layers())?;
    let prompts: Vec<&'static str> = prompts::PROMPTS
        .iter()
        .take(cfg.n_prompts)
        .copied()
        .collect();
    let prompt_ids = prompts
        .iter()
        .map(|p| tok.encode(&tok.chat_prompt(p)?))
        .collect::<Result<Vec<_>>>()?;
    let stop = tok.stop_tokens().to_vec();
    let mut cx = Ctx {
        cfg,
        model: m,
        tok,
        prompts,
        prompt_ids,
        stop,
        timings: Timings::default(),
    };
    stage(&mut cx.timings, "load_model", t0);

    // 1. Unsteered answers.
    let t0 = Instant::now();
    let answers = unsteered_answers(&mut cx)?;
    stage(&mut cx.timings, "answers", t0);

    // 2. The SAE.
    let t0 = Instant::now();
    let (sae, sae_eval, fire_counts, sae_dir) = prepare_sae(&mut cx, &answers, &sae_point)?;
    stage(&mut cx.timings, "sae", t0);
    let d_sae = sae.d_sae();

    // 3. Judge.
    let t0 = Instant::now();
    let n = cx.prompts.len();
    let mut judge = Judge::new(&cx.tok, &cx.prompts, cfg.judge_tokens, cfg.batch_size)?;
    let on_texts: Vec<String> = answers
        .first()
        .map(|a| a.iter().map(|ids| cx.text(ids)).collect::<Result<Vec<_>>>())
        .transpose()?
        .unwrap_or_default();
    let on_items: Vec<(usize, &str)> = on_texts
        .iter()
        .enumerate()
        .map(|(i, t)| (i, t.as_str()))
        .collect();
    let on_d = cx.deltas(&judge, &on_items)?;
    let delta_ref = judge.calibrate(&on_d)?;
    let off_items: Vec<(usize, &str)> = on_texts
        .iter()
        .enumerate()
        .map(|(i, t)| ((i + n - 1) % n, t.as_str()))
        .collect();
    let off_d = cx.deltas(&judge, &off_items)?;
    let judge_summary = JudgeSummary {
        delta_ref,
        on_topic_mean_score: stats::mean(&on_d.iter().map(|&d| judge.score(d)).collect::<Vec<_>>()),
        off_topic_mean_score: stats::mean(
            &off_d.iter().map(|&d| judge.score(d)).collect::<Vec<_>>(),
        ),
    };
    stage(&mut cx.timings, "judge_calibration", t0);

    // 4. Off-topic detectors.
    let t0 = Instant::now();
    let first: &[Vec<u32>] = answers.first().map(Vec::as_slice).unwrap_or_default();
    let (on_pool, off_pool, median_norm) = otd_activations(&mut cx, &sae, &sae_point, first)?;
    let all_stats = latent_stats(&on_pool, &off_pool, d_sae);
    let (otd, otd_rule) = match &cfg.otd_fixed {
        Some(ids) => (
            LatentSet::new(ids, d_sae)?.ids().to_vec(),
            "fixed".to_string(),
        ),
        None => find_otd(&all_stats, cfg),
    };
    let otd_stats: Vec<LatentStats> = if otd.is_empty() {
        let mut c = all_stats.clone();
        c.sort_by(|a, b| {
            (b.off_fraction - b.on_fraction).total_cmp(&(a.off_fraction - a.on_fraction))
        });
        c.truncate(10);
        c
    } else {
        otd.iter()
            .filter_map(|&i| all_stats.get(i as usize).cloned())
            .collect()
    };
    stage(&mut cx.timings, "otd_search", t0);

    // 5. Steering latents: alive, inactive on every prompt, not an OTD.
    let t0 = Instant::now();
    let prompt_max = prompt_activations(&mut cx, &sae, &sae_point)?;
    let mut rng = Rng::new(cfg.seed);
    let candidates: Vec<u32> = (0..d_sae as u32)
        .filter(|&i| {
            fire_counts.get(i as usize).is_some_and(|&c| c > 0.0)
                && prompt_max
                    .iter()
                    .all(|row| row.get(i as usize).is_some_and(|&v| v <= 0.0))
                && !otd.contains(&i)
        })
        .collect();
    let steer_ids = draw(&candidates, cfg.steer_latents, &mut rng);
    if steer_ids.is_empty() {
        return Err(Error::Invalid(format!(
            "no steering latent: none of the {d_sae} latents is alive on the evaluation text \
             and inactive on every prompt"
        )));
    }
    // Random control sets: alive latents that are neither OTD nor steering latents.
    let pool: Vec<u32> = (0..d_sae as u32)
        .filter(|&i| {
            fire_counts.get(i as usize).is_some_and(|&c| c > 0.0)
                && !otd.contains(&i)
                && !steer_ids.contains(&i)
        })
        .collect();
    let random_sets: Vec<Vec<u32>> = (0..cfg.random_sets)
        .map(|_| {
            let mut s = draw(&pool, otd.len(), &mut rng);
            s.sort_unstable();
            s
        })
        .collect();
    stage(&mut cx.timings, "latent_selection", t0);

    // 6. Calibration.
    let t0 = Instant::now();
    let mut steering = Vec::with_capacity(steer_ids.len());
    let max_probes = cfg.bisection_steps + 4;
    let mut pb = bar(cfg, (steer_ids.len() * max_probes) as u64, "calibrate");
    for &latent in &steer_ids {
        steering.push(calibrate(
            &mut cx,
            &judge,
            &sae,
            &steer_point,
            latent,
            median_norm,
            &mut pb,
        )?);
    }
    pb.finish();
    stage(&mut cx.timings, "calibration", t0);

    // 7. Trials.
    let t0 = Instant::now();
    let mut conditions: Vec<(String, Vec<u32>)> = vec![
        ("baseline".into(), Vec::new()),
        ("otd_ablated".into(), otd.clone()),
    ];
    for (i, s) in random_sets.iter().enumerate() {
        conditions.push((format!("random_{}", i + 1), s.clone()));
    }
    let which: Vec<usize> = (0..n).collect();
    // Generate every condition first, then judge all answers together: the judge shares
    // each prompt's cached prefix among all attempts scored after that prompt.
    let mut pb = bar(
        cfg,
        (steering.len() * conditions.len() * n + n) as u64,
        "trials",
    );
    let mut trials: Vec<Trial> = Vec::new();
    let mut attempts: Vec<Vec<String>> = Vec::new();
    for (li, st) in steering.iter().enumerate() {
        let seed = cfg.seed.wrapping_add(1_000_000 * (li as u64 + 1));
        for (name, set) in &conditions {
            let mut hooks = steer_hooks(&sae, &steer_point, st.latent, st.strength)?;
            if !set.is_empty() {
                let edits = Edits::new(SpliceMode::ErrorPreserving).zero(set);
                hooks.add(sae_point, SaeSplice::new(&sae, &edits, Positions::All)?);
            }
            let gens = cx.generate(&which, cfg.max_new_tokens, seed, &mut hooks, &mut pb)?;
            for (i, g) in gens.into_iter().enumerate() {
                let text = cx.text(&g)?;
                attempts.push(judge::split_attempts(&text));
                trials.push(Trial {
                    condition: name.clone(),
                    latent: st.latent,
                    strength: st.strength,
                    prompt: i,
                    seed: seed + i as u64,
                    tokens: g.len(),
                    scores: Vec::new(),
                    text,
                });
            }
        }
    }
    // (trial, prompt, attempt) for every attempt, judged in blocks of prompts so that a
    // block's prompts (and their contrast prompts) are prefilled once per block.
    let mut items: Vec<(usize, usize, &str)> = trials
        .iter()
        .zip(&attempts)
        .enumerate()
        .flat_map(|(k, (t, a))| a.iter().map(move |s| (k, t.prompt, s.as_str())))
        .collect();
    items.sort_by_key(|&(k, p, _)| (p, k));
    let block = cfg.batch_size.max(1);
    let mut scores: Vec<Vec<f64>> = vec![Vec::new(); trials.len()];
    let mut rest = items.as_slice();
    while let Some(&(_, first, _)) = rest.first() {
        let cut = rest
            .iter()
            .position(|&(_, p, _)| p >= first + block)
            .unwrap_or(rest.len());
        let (now, later) = rest.split_at(cut);
        let pairs: Vec<(usize, &str)> = now.iter().map(|&(_, p, s)| (p, s)).collect();
        let d = cx.deltas(&judge, &pairs)?;
        for (&(k, _, _), x) in now.iter().zip(d) {
            if let Some(v) = scores.get_mut(k) {
                v.push(judge.score(x));
            }
        }
        pb.inc(block.min(n) as u64);
        rest = later;
    }
    for (t, s) in trials.iter_mut().zip(scores) {
        t.scores = s;
    }
    pb.finish();
    stage(&mut cx.timings, "trials", t0);

    // 8. Report.
    let t0 = Instant::now();
    let summaries: Vec<ConditionSummary> = conditions
        .iter()
        .enumerate()
        .map(|(ci, (name, _))| {
            let ts: Vec<&Trial> = trials.iter().filter(|t| &t.condition == name).collect();
            summarize(name, &ts, cfg.bootstrap, cfg.seed.wrapping_add(ci as u64))
        })
        .collect();
    let mut results = EsrResults {
        sae_eval,
        sae_source: match &cfg.sae {
            Some(p) => p.display().to_string(),
            None => format!("trained ({})", sae_dir.display()),
        },
        otd_latents: otd,
        otd_rule,
        otd_stats,
        random_sets,
        steering,
        judge: judge_summary,
        conditions: summaries,
        config: cfg.clone(),
        command: command.to_string(),
        timings: cx.timings.clone(),
    };
    report::write_outputs(&mut results, &trials, &sae, &sae_dir, out, (t0, t_all))?;
    Ok(results)
}

fn stage(t: &mut Timings, name: &str, t0: Instant) {
    t.stages
        .insert(name.to_string(), t0.elapsed().as_secs_f64());
}

/// `k` distinct items of `pool` drawn uniformly with `rng` (all of them when `k ≥ len`).
fn draw(pool: &[u32], k: usize, rng: &mut Rng) -> Vec<u32> {
    let mut v = pool.to_vec();
    let k = k.min(v.len());
    for i in 0..k {
        let j = i + (rng.next_u64() % (v.len() - i) as u64) as usize;
        v.swap(i, j);
    }
    v.truncate(k);
    v
}

fn steer_hooks(sae: &Sae, point: &HookPoint, latent: u32, strength: f32) -> Result<Hooks> {
    let dir = sae.decoder_direction(latent as usize)?;
    Ok(Hooks::new().with(*point, AddVector::new(&dir, strength, Positions::All)?))
}

#[derive(Serialize, Deserialize)]
struct AnswersCache {
    key: String,
    /// `[sample][prompt]` generated ids (stop token removed).
    answers: Vec<Vec<Vec<u32>>>,
}

fn read_cache<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn unsteered_answers(cx: &mut Ctx<'_>) -> Result<Vec<Vec<Vec<u32>>>> {
    let cfg = cx.cfg;
    let key = serde_json::json!({
        "model": crate::model::model_sha256(&cfg.model)?,
        "weights": [&cfg.model_weights, &cfg.model_dtype],
        "prompts": cx.prompts,
        "samples": cfg.chat_samples,
        "params": [cfg.max_new_tokens as f64, cfg.temperature as f64, cfg.top_p as f64, cfg.repetition_penalty as f64, cfg.seed as f64],
    })
    .to_string();
    let path = cfg.cache_dir.join("answers.json");
    if let Some(c) = read_cache::<AnswersCache>(&path) {
        if c.key == key && c.answers.len() == cfg.chat_samples {
            cx.timings.answers_cached = true;
            return Ok(c.answers);
        }
    }
    let n = cx.prompts.len();
    let which: Vec<usize> = (0..n).collect();
    let mut pb = bar(cfg, (n * cfg.chat_samples) as u64, "answers");
    let mut answers = Vec::with_capacity(cfg.chat_samples);
    for s in 0..cfg.chat_samples {
        let seed = cfg.seed.wrapping_add(10_000 * s as u64);
        answers.push(cx.generate(&which, cfg.max_new_tokens, seed, &mut Hooks::new(), &mut pb)?);
    }
    pb.finish();
    write_json(
        &path,
        &AnswersCache {
            key,
            answers: answers.clone(),
        },
    )?;
    Ok(answers)
}

#[derive(Serialize, Deserialize)]
struct EvalCache {
    key: String,
    report: EvalReport,
    fire_counts: Vec<f64>,
}

/// Load or train the SAE, then evaluate it (cached). Returns the SAE, its evaluation,
/// per-latent fire counts on the evaluation text, and the folder it lives in.
fn prepare_sae(
    cx: &mut Ctx<'_>,
    answers: &[Vec<Vec<u32>>],
    point: &HookPoint,
) -> Result<(Sae, EvalReport, Vec<f64>, PathBuf)> {
    let cfg = cx.cfg;
    let spec = &cfg.train;
    let (sae, sae_dir, key, eval_corpus) = match &cfg.sae {
        Some(p) => {
            let sae = Sae::load(p, &Device::Cpu)?;
            let key = format!(
                "{}|{}|{}|{}",
                crate::model::model_sha256(p)?,
                crate::model::model_sha256(&cfg.model)?,
                cfg.model_weights,
                cfg.model_dtype
            );
            (sae, p.clone(), key, spec.corpus.clone())
        }
        None => {
            // The training text: the Austen novels plus the chat transcripts of stage 1.
            let corpus = cfg.cache_dir.join("corpus");
            std::fs::create_dir_all(&corpus).map_err(|e| Error::io(&corpus, e))?;
            for f in corpus_files(&spec.corpus)? {
                let name = f.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                let dst = corpus.join(name);
                let same = std::fs::metadata(&dst).ok().map(|m| m.len())
                    == std::fs::metadata(&f).ok().map(|m| m.len());
                if !same {
                    let bytes = std::fs::read(&f).map_err(|e| Error::io(&f, e))?;
                    write_bytes(&dst, &bytes)?;
                }
            }
            let mut chats = String::new();
            let tmpl = cx.tok.chat_template();
            for sample in answers {
                for (i, ids) in sample.iter().enumerate() {
                    let a = cx.text(ids)?;
                    let q = cx.prompts.get(i).copied().unwrap_or_default();
                    match tmpl {
                        Some(t) => {
                            chats.push_str(&t.render(&[("user", q), ("assistant", &a)], false))
                        }
                        None => chats.push_str(&format!("{q}\n{a}\n\n")),
                    }
                }
            }
            // Named to sort first: the held-out tail of the corpus stays Austen text.
            let chat_file = corpus.join("0-chat-answers.txt");
            let unchanged =
                std::fs::read_to_string(&chat_file).ok().as_deref() == Some(chats.as_str());
            if !unchanged {
                write_bytes(&chat_file, chats.as_bytes())?;
            }
            // Activations depend on the weight format: one cache per format.
            let acts = cfg
                .cache_dir
                .join(format!("acts-{}-{}", cfg.model_weights, cfg.model_dtype));
            let hcfg = HarvestConfig {
                hooks: vec![point.to_string()],
                context_len: spec.context_len,
                batch_size: cfg.batch_size,
                max_tokens: Some(spec.tokens),
                holdout_contexts: spec.holdout_contexts,
                dtype: crate::FloatDtype::F16,
                shard_rows: 65536,
                progress: cfg.progress.clone(),
            };
            let h = ActivationStore::new(&acts).harvest(
                &mut cx.model,
                &cx.tok,
                &cfg.model,
                &corpus,
                &hcfg,
            )?;
            let mut tcfg = TrainConfig::topk(
                cx.model.d_model(),
                spec.d_sae,
                spec.k,
                h.manifest.tokens * spec.epochs,
            );
            tcfg.batch_size = spec.batch_size;
            tcfg.dead_tokens_threshold = spec.dead_tokens_threshold;
            tcfg.seed = cfg.seed;
            tcfg.hook_name = Some(point.to_string());
            tcfg.model_name = Some(h.manifest.model.clone());
            let key = serde_json::json!({
                "model_sha256": h.manifest.model_sha256,
                "corpus_sha256": h.manifest.corpus_sha256,
                "harvest": hcfg.hooks, "tokens": h.manifest.tokens,
                "weights": [&cfg.model_weights, &cfg.model_dtype],
                "train": tcfg,
            })
            .to_string();
            let dir = cfg.cache_dir.join("sae");
            let key_file = dir.join("esr_key.json");
            let cached = std::fs::read_to_string(&key_file).ok().as_deref() == Some(key.as_str())
                && dir.join("sae_weights.safetensors").is_file();
            let sae = if cached {
                cx.timings.sae_cached = h.cache_hit;
                Sae::load(&dir, &Device::Cpu)?
            } else {
                let mut src = ShardSource::from_dir(
                    h.manifest.hook_dir(&acts, &point.to_string())?,
                    262_144,
                    cfg.seed,
                )?;
                let t0 = Instant::now();
                let trained = train::train(&tcfg, &mut src, Some(&dir))?;
                cx.timings
                    .stages
                    .insert("sae_train".into(), t0.elapsed().as_secs_f64());
                write_bytes(&key_file, key.as_bytes())?;
                trained.sae
            };
            cx.timings.stages.insert("sae_harvest".into(), h.seconds);
            (sae, dir, key, corpus)
        }
    };
    if sae.d_in() != cx.model.d_model() {
        return Err(Error::Invalid(format!(
            "{}: the SAE has d_in = {}, the model's residual stream has d_model = {}",
            sae_dir.display(),
            sae.d_in(),
            cx.model.d_model()
        )));
    }
    // Evaluation on held-out text (cached with the SAE).
    let ekey = format!(
        "{key}|{}|{}|{}",
        cfg.eval_contexts, spec.context_len, spec.holdout_contexts
    );
    let epath = cfg.cache_dir.join("eval.json");
    if let Some(c) = read_cache::<EvalCache>(&epath) {
        if c.key == ekey && c.fire_counts.len() == sae.d_sae() {
            return Ok((sae, c.report, c.fire_counts, sae_dir));
        }
    }
    let t0 = Instant::now();
    let files = corpus_files(&eval_corpus)?;
    let ctx = Contexts::build(&cx.tok, &files, spec.context_len)?;
    let (_, held) = ctx.split(spec.holdout_contexts)?;
    let take = cfg.eval_contexts.min(held.len());
    let held = held.get(held.len() - take..).unwrap_or(held);
    let ecfg = EvalConfig {
        batch_size: cfg.batch_size,
        prefix_len: ctx.prefix_len,
        hook: Some(*point),
        progress: cfg.progress.clone(),
    };
    let (report, acc) = evaluate(&mut cx.model, &sae, held, &ecfg)?;
    let fire_counts = acc.fire_counts().to_vec();
    write_json(
        &epath,
        &EvalCache {
            key: ekey,
            report: report.clone(),
            fire_counts: fire_counts.clone(),
        },
    )?;
    cx.timings
        .stages
        .insert("sae_eval".into(), t0.elapsed().as_secs_f64());
    Ok((sae, report, fire_counts, sae_dir))
}

/// Run `seqs` (token ids, positions to pool) through the model capturing `point`, and
/// max-pool the SAE's latents over the given positions. Also returns the residual norm of
/// every pooled position. Sequences are right-padded into batches (causal attention keeps
/// padding out of real positions).
fn max_pool(
    cx: &mut Ctx<'_>,
    sae: &Sae,
    point: &HookPoint,
    seqs: &[(Vec<u32>, std::ops::Range<usize>)],
    pb: &mut Step,
) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
    let dev = cx.model.device().clone();
    let mut pooled = Vec::with_capacity(seqs.len());
    let mut norms = Vec::new();
    for chunk in seqs.chunks(cx.cfg.batch_size) {
        if chunk.iter().all(|(s, _)| s.is_empty()) {
            pooled.extend(chunk.iter().map(|_| vec![0f32; sae.d_sae()]));
            continue;
        }
        let (toks, t) = judge::right_padded(chunk.iter().map(|(s, _)| s.as_slice()), &dev)?;
        let cache = ActivationCache::new();
        let mut hooks = Hooks::new().with(*point, cache.clone());
        cx.model.forward(&toks, 0, &mut hooks)?;
        let act = cache
            .get(point)?
            .ok_or_else(|| Error::Invalid(format!("no activation captured at {point}")))?;
        for (b, (_, r)) in chunk.iter().enumerate() {
            let r = r.start.min(t)..r.end.min(t);
            if r.is_empty() {
                pooled.push(vec![0f32; sae.d_sae()]);
                continue;
            }
            let x = act.get(b)?.narrow(0, r.start, r.len())?;
            norms.extend(x.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?);
            let f = sae.encode(&x)?.max(0)?.to_vec1::<f32>()?;
            pooled.push(f);
        }
        pb.inc(chunk.len() as u64);
    }
    Ok((pooled, norms))
}

/// Max-pooled latents, one `[d_sae]` row per sequence.
type Pooled = Vec<Vec<f32>>;

/// Max-pooled latents over each answer under its own prompt and under the previous
/// prompt (so each answer is off-topic for exactly one prompt), and the median residual
/// norm over the on-topic answers.
fn otd_activations(
    cx: &mut Ctx<'_>,
    sae: &Sae,
    point: &HookPoint,
    answers: &[Vec<u32>],
) -> Result<(Pooled, Pooled, f32)> {
    let n = cx.prompts.len();
    let seq = |p: usize, a: usize| -> (Vec<u32>, std::ops::Range<usize>) {
        let mut s = cx.prompt_ids.get(p).cloned().unwrap_or_default();
        let start = s.len();
        s.extend_from_slice(answers.get(a).map(Vec::as_slice).unwrap_or_default());
        let end = s.len();
        (s, start..end)
    };
    let on: Vec<_> = (0..n).map(|i| seq(i, i)).collect();
    let off: Vec<_> = (0..n).map(|i| seq(i, (i + 1) % n)).collect();
    let mut pb = bar(cx.cfg, 2 * n as u64, "otd search");
    let (on_pool, norms) = max_pool(cx, sae, point, &on, &mut pb)?;
    let (off_pool, _) = max_pool(cx, sae, point, &off, &mut pb)?;
    pb.finish();
    let norms: Vec<f64> = norms.iter().map(|&v| v as f64).collect();
    let med = judge::median(&norms);
    Ok((
        on_pool,
        off_pool,
        if med.is_finite() { med as f32 } else { 1.0 },
    ))
}

/// Max-pooled latents over each prompt (its first position, the attention sink, left out).
fn prompt_activations(cx: &mut Ctx<'_>, sae: &Sae, point: &HookPoint) -> Result<Vec<Vec<f32>>> {
    let seqs: Vec<_> = cx
        .prompt_ids
        .iter()
        .map(|p| (p.clone(), 1..p.len()))
        .collect();
    let mut pb = bar(cx.cfg, seqs.len() as u64, "prompts");
    let (pooled, _) = max_pool(cx, sae, point, &seqs, &mut pb)?;
    pb.finish();
    Ok(pooled)
}

fn latent_stats(on: &[Vec<f32>], off: &[Vec<f32>], d_sae: usize) -> Vec<LatentStats> {
    let frac = |rows: &[Vec<f32>], i: usize| {
        rows.iter()
            .filter(|r| r.get(i).is_some_and(|&v| v > 0.0))
            .count() as f64
            / rows.len().max(1) as f64
    };
    let mean = |rows: &[Vec<f32>], i: usize| {
        rows.iter()
            .map(|r| r.get(i).copied().unwrap_or(0.0) as f64)
            .sum::<f64>()
            / rows.len().max(1) as f64
    };
    (0..d_sae)
        .map(|i| LatentStats {
            latent: i as u32,
            on_fraction: frac(on, i),
            off_fraction: frac(off, i),
            on_mean: mean(on, i),
            off_mean: mean(off, i),
        })
        .collect()
}

/// The paper's rule (zero on every on-topic answer, firing on ≥ `otd_min_off_fraction` of
/// off-topic ones); when nothing passes, the relaxed rule: on-topic firing ≤ 10% and
/// off-topic firing at least 20 points higher; when still nothing, the contrast rule:
/// off-topic firing at least 20 points above on-topic firing. Strongest first, at most
/// `otd_max`.
fn find_otd(stats: &[LatentStats], cfg: &EsrConfig) -> (Vec<u32>, String) {
    let rank = |mut v: Vec<&LatentStats>| -> Vec<u32> {
        v.sort_by(|a, b| {
            (b.off_fraction - b.on_fraction)
                .total_cmp(&(a.off_fraction - a.on_fraction))
                .then(b.off_mean.total_cmp(&a.off_mean))
                .then(a.latent.cmp(&b.latent))
        });
        v.into_iter().take(cfg.otd_max).map(|s| s.latent).collect()
    };
    let paper: Vec<&LatentStats> = stats
        .iter()
        .filter(|s| s.on_fraction == 0.0 && s.off_fraction >= cfg.otd_min_off_fraction)
        .collect();
    if !paper.is_empty() {
        return (rank(paper), "paper".into());
    }
    let relaxed: Vec<&LatentStats> = stats
        .iter()
        .filter(|s| s.on_fraction <= 0.1 && s.off_fraction >= s.on_fraction + 0.2)
        .collect();
    if !relaxed.is_empty() {
        return (rank(relaxed), "relaxed".into());
    }
    let contrast: Vec<&LatentStats> = stats
        .iter()
        .filter(|s| s.off_fraction >= s.on_fraction + 0.2)
        .collect();
    (rank(contrast), "contrast".into())
}

/// Bisection on the steering strength (see the module docs). The bracket starts at
/// `[0, 2 · median residual norm]` and doubles (at most 3 times) until steering brings the
/// score below the target.
fn calibrate(
    cx: &mut Ctx<'_>,
    judge: &Judge,
    sae: &Sae,
    point: &HookPoint,
    latent: u32,
    median_norm: f32,
    pb: &mut Step,
) -> Result<SteeringLatent> {
    let cfg = cx.cfg;
    let which: Vec<usize> = (0..cfg.calib_prompts).collect();
    let mut hidden = Step::hidden();
    let mut probes: Vec<(f32, f64)> = Vec::new();
    let mut probe = |cx: &mut Ctx<'_>, v: f32| -> Result<f64> {
        let mut hooks = steer_hooks(sae, point, latent, v)?;
        let gens = cx.generate(
            &which,
            cfg.calib_tokens,
            cfg.seed ^ 0xCA1B,
            &mut hooks,
            &mut hidden,
        )?;
        let texts: Vec<String> = gens.iter().map(|g| cx.text(g)).collect::<Result<_>>()?;
        let firsts: Vec<String> = texts
            .iter()
            .map(|t| {
                judge::split_attempts(t)
                    .into_iter()
                    .next()
                    .unwrap_or_default()
            })
            .collect();
        let items: Vec<(usize, &str)> = firsts
            .iter()
            .enumerate()
            .map(|(i, t)| (i, t.as_str()))
            .collect();
        let d = cx.deltas(judge, &items)?;
        let s = stats::mean(&d.iter().map(|&x| judge.score(x)).collect::<Vec<_>>());
        probes.push((v, s));
        pb.inc(1);
        Ok(s)
    };
    let mut lo = 0f32;
    let mut hi = 2.0 * median_norm.max(1e-3);
    for _ in 0..3 {
        if probe(cx, hi)? <= cfg.target_score {
            break;
        }
        lo = hi;
        hi *= 2.0;
    }
    for _ in 0..cfg.bisection_steps {
        let mid = 0.5 * (lo + hi);
        if probe(cx, mid)? > cfg.target_score {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(SteeringLatent {
        latent,
        strength: 0.5 * (lo + hi),
        probes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        for name in ["smollm2", "llama-3.3-70b-goodfire"] {
            for quick in [false, true] {
                EsrConfig::preset(name, quick)
                    .and_then(|c| c.validate())
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        let g = EsrConfig::preset("llama-3.3-70b-goodfire", false).unwrap();
        assert_eq!(g.otd_fixed.as_ref().map(Vec::len), Some(26));
        assert_eq!(g.sae_hook, "blocks.50.hook_resid_post");
        assert_eq!(g.steer_hook, "blocks.33.hook_resid_post");
        assert_eq!(g.max_new_tokens, 512);
        assert!(EsrConfig::preset("gpt-5", false).is_err());
    }

    #[test]
    fn draw_is_distinct_and_seeded() {
        let pool: Vec<u32> = (0..100).collect();
        let a = draw(&pool, 26, &mut Rng::new(5));
        let b = draw(&pool, 26, &mut Rng::new(5));
        assert_eq!(a, b);
        let mut s = a.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), 26);
        assert_eq!(draw(&pool, 500, &mut Rng::new(1)).len(), 100);
    }

    fn st(latent: u32, on: f64, off: f64) -> LatentStats {
        LatentStats {
            latent,
            on_fraction: on,
            off_fraction: off,
            on_mean: 0.0,
            off_mean: off,
        }
    }

    #[test]
    fn otd_rules() {
        let cfg = EsrConfig::preset("smollm2", true).unwrap();
        let stats = vec![
            st(0, 0.0, 0.9),
            st(1, 0.05, 0.95),
            st(2, 0.0, 0.79),
            st(3, 0.0, 1.0),
        ];
        let (ids, rule) = find_otd(&stats, &cfg);
        assert_eq!(rule, "paper");
        assert_eq!(ids, vec![3, 0]);
        let stats = vec![
            st(0, 0.0, 0.5),
            st(1, 0.05, 0.95),
            st(2, 0.2, 0.9),
            st(3, 0.1, 0.25),
        ];
        let (ids, rule) = find_otd(&stats, &cfg);
        assert_eq!(rule, "relaxed");
        assert_eq!(ids, vec![1, 0]);
        let stats = vec![st(0, 0.3, 0.65), st(1, 0.5, 0.6), st(2, 0.2, 0.9)];
        let (ids, rule) = find_otd(&stats, &cfg);
        assert_eq!(rule, "contrast");
        assert_eq!(ids, vec![2, 0]);
    }
}
