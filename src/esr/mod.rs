//! The Endogenous Steering Resistance (ESR) ablation experiment, end to end
//! (McKenzie et al., arXiv 2602.06941), on any hookable model: the crate's main job.
//!
//! [`run`] takes an [`EsrConfig`] (see [`EsrConfig::preset`]: `smollm2` runs on a laptop
//! CPU, `llama-3.3-70b-goodfire` is the paper's setting with user-supplied weights) and
//! goes through these stages, each timed and cached where it can be:
//!
//! 1. **Answers.** The model answers every prompt ([`prompts::PROMPTS`]) unsteered,
//!    `chat_samples` times (temperature as in the trials). Sample 0 is the on-topic
//!    reference for the judge and the OTD search; all samples join the SAE's training
//!    text, and all of them are the **unsteered baseline** (condition `unsteered`).
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
//! 7. **Trials.** Every prompt × steering latent × sample (`samples` seeds per prompt ×
//!    latent; all conditions share them) under the main conditions:
//!    - `baseline`: steered;
//!    - `otd_ablated`: steered, the OTD latents zero-ablated (error-preserving) at the
//!      SAE's hook point;
//!    - `steer_ablated`: the **positive control**, steered, then the steering latent
//!      itself zero-ablated the same way (after the steering when both act at one hook
//!      point): it must raise the first-attempt score if splices work inside generation;
//!    - `random`: steered, a random set of alive latents of the OTD set's size ablated
//!      (`random_sets` sets, excluding OTD and steering latents; the trial of prompt `p`
//!      and steering latent number `l` uses set `(p + l) mod random_sets`).
//!
//!    Then the paper's sweeps on subsets of the prompts (sample 0):
//!    - **boost sweep**: `boost_x{f}` steers at `f` × the calibrated strength for each
//!      `f` in `boost_factors` (`f = 1` is `baseline`), first `boost_prompts` prompts;
//!    - **meta-prompt**: `meta_prompt` (steered) and `meta_prompt_otd_ablated`, the
//!      prompt followed by `meta_prompt_text`, first `meta_prompts` prompts;
//!    - **splice sites**: `otd_ablated_all_positions` and `steer_ablated_all_positions`
//!      splice every position, the attention sink included, first `sites_prompts`
//!      prompts, to measure what leaving the sink out changes.
//!
//!    Ablations act only where the SAE was trained: from each sequence's position
//!    `sae_skip` on, which becomes the SAE's first trained position (see [`sites`]).
//!    Generation is batched with the hooks live.
//! 8. **Second judge.** A seeded sample of `judge2_attempts` judged attempts (unsteered
//!    and main conditions) is scored again by `judge2_model` (or, without one, by the same
//!    model with the plain `judge2_template`) under the same relative log-prob rule;
//!    `judge_agreement` holds the Spearman correlation of the two judges' Δ.
//! 9. **Report.** See [`report`].
//!
//! ## `results.json`
//!
//! One [`EsrResults`]: `sae_eval`, `sae_source`, `otd_latents`, `otd_rule`, `otd_stats`,
//! `random_sets`, `steering` (latent, strength, calibration probes), `judge`,
//! `unsteered`, `conditions` and `paired` (each main condition vs `baseline`),
//! `boost_sweep`, `meta_prompt`, `sites`, `judge_agreement`, `config`, `command`,
//! `timings`. Every summary is a [`stats::ConditionSummary`]: counts, rates with Wilson
//! (`ci95`) and Clopper–Pearson (`exact95`) 95% intervals, and the mean first-attempt
//! score with a 95% percentile-bootstrap interval that resamples clusters (prompt ×
//! steering latent). Every comparison is a [`stats::Paired`]: pairs matched by latent,
//! prompt and sample, McNemar's exact p on multi-attempt, and the mean paired difference
//! of first-attempt scores with its cluster-bootstrap interval.
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
pub mod sites;
pub mod stats;
mod trials;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::edit::LatentSet;
use crate::eval::{evaluate, EvalConfig, EvalReport};
use crate::harvest::{corpus_files, ActivationStore, Contexts, HarvestConfig};
use crate::hooks::{ActivationCache, HookPoint, Hooks};
use crate::io::atomic::{write_bytes, write_json};
use crate::model::{
    self, generate_batch, HookedModel, LoadOptions, SamplingParams, Tokenizer, WeightFormat,
};
use crate::progress::{Reporter, Step};
use crate::rng::Rng;
use crate::train::{self, ShardSource, TrainConfig};
use crate::{Error, Result, Sae};

use judge::{Judge, JudgeTemplate};
use stats::{paired, summarize, ConditionSummary, Paired, Trial};
use trials::{Ablate, Arm};

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

/// The paper's best self-monitoring meta-prompt (McKenzie et al., Sec. 3.3), appended to
/// each prompt as the paper does.
pub const META_PROMPT: &str =
    "If you notice yourself going off-topic, stop and force yourself to get back on track.";

/// A named latent set of the experiment, checked against an SAE of `d_sae` latents:
/// `esr26` = [`OTD_LATENTS_LLAMA33_70B_L50`] (a 65,536-latent SAE). The CLI's
/// `--zero-preset` takes these names.
///
/// ```
/// let otd = sae_ablate::esr::latent_preset("esr26", 65536)?;
/// assert_eq!(otd.len(), 26);
/// assert!(sae_ablate::esr::latent_preset("esr26", 4608).is_err());
/// # Ok::<(), sae_ablate::Error>(())
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
    /// Positions at the start of every sequence where the SAE is not used (no ablation,
    /// no encoding): the positions it was not trained on. 1 leaves out the first position
    /// (the BOS, or the attention sink of a model without one), as the crate's harvest
    /// does; 0 uses every position. See [`sites`].
    pub sae_skip: usize,
    /// Prompts used (the first `n_prompts` of [`prompts::PROMPTS`]).
    pub n_prompts: usize,
    /// Unsteered samples per prompt (stage 1; the unsteered baseline).
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
    /// Samples (seeds) per prompt × steering latent in each main condition.
    pub samples: usize,
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
    /// Random control sets (pooled in the `random` condition).
    pub random_sets: usize,
    /// Boost sweep: multiples of each latent's calibrated strength (1 = `baseline`).
    pub boost_factors: Vec<f64>,
    /// Boost sweep: the first this many prompts (0: no sweep).
    pub boost_prompts: usize,
    /// The self-monitoring meta-prompt, appended to each prompt after a space.
    pub meta_prompt_text: String,
    /// Meta-prompt conditions: the first this many prompts (0: none).
    pub meta_prompts: usize,
    /// Splice-site side measurement: the first this many prompts (0: none).
    pub sites_prompts: usize,
    /// The second judge's model (GGUF or HF directory); `None`: the experiment's model.
    pub judge2_model: Option<PathBuf>,
    /// How the second judge renders a prompt before the attempt.
    pub judge2_template: JudgeTemplate,
    /// Attempts the second judge scores (a seeded sample; 0: no second judge).
    pub judge2_attempts: usize,
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
    /// A preset: `smollm2` (SmolLM2-135M-Instruct from `assets/`, an SAE trained here,
    /// Gemma 3 270M from `assets/` as the second judge) or `llama-3.3-70b-goodfire` (the
    /// paper's setting: steer at layer 33, Goodfire SAE at layer 50, the 26 published OTD
    /// latents, temperature 0.6, 512 tokens; set `model` and `sae` to your copies).
    /// `quick` shrinks prompts, latents and tokens.
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
            sae_skip: 1,
            n_prompts: if quick { 8 } else { 48 },
            chat_samples: if quick { 1 } else { 8 },
            max_new_tokens: if quick { 24 } else { 64 },
            temperature: 0.6,
            top_p: 1.0,
            repetition_penalty: 1.1,
            seed: 2602,
            steer_latents: if quick { 1 } else { 5 },
            samples: if quick { 1 } else { 2 },
            calib_prompts: if quick { 4 } else { 8 },
            calib_tokens: if quick { 16 } else { 32 },
            bisection_steps: if quick { 3 } else { 6 },
            target_score: 30.0,
            judge_tokens: 32,
            otd_min_off_fraction: 0.8,
            otd_max: 26,
            otd_fixed: None,
            random_sets: 3,
            boost_factors: vec![0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0],
            boost_prompts: if quick { 2 } else { 8 },
            meta_prompt_text: META_PROMPT.into(),
            meta_prompts: if quick { 8 } else { 24 },
            sites_prompts: if quick { 8 } else { 16 },
            judge2_model: Some(PathBuf::from(
                "assets/gemma-3-270m/gemma-3-270m-q4_k_m.gguf",
            )),
            judge2_template: JudgeTemplate::Plain("Question: {prompt}\nAnswer:\n".into()),
            judge2_attempts: if quick { 16 } else { 240 },
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
                judge2_model: None,
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
        if self.samples == 0 {
            return bad("samples must be ≥ 1");
        }
        for (what, v) in [
            ("boost_prompts", self.boost_prompts),
            ("meta_prompts", self.meta_prompts),
            ("sites_prompts", self.sites_prompts),
        ] {
            if v > self.n_prompts {
                return bad(&format!(
                    "{what} = {v} must be at most n_prompts = {}",
                    self.n_prompts
                ));
            }
        }
        if self
            .boost_factors
            .iter()
            .any(|f| !(f.is_finite() && *f >= 0.0))
        {
            return bad("boost_factors must be finite and ≥ 0");
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

    /// The arms of the trials stage, in order: the main conditions, then the boost
    /// sweep, the meta-prompt conditions and the splice-site side measurement.
    fn arms(&self, otd: &[u32], random_sets: &[Vec<u32>]) -> Vec<Arm> {
        let arm = |name: &str, ablate: Ablate, prompts: usize, samples: usize| Arm {
            name: name.to_string(),
            meta: false,
            boost: 1.0,
            ablate,
            all_positions: false,
            prompts,
            samples,
        };
        let (n, s) = (self.n_prompts, self.samples);
        let mut v = vec![
            arm("baseline", Ablate::Nothing, n, s),
            arm("otd_ablated", Ablate::Set(otd.to_vec()), n, s),
            arm("steer_ablated", Ablate::SteeringLatent, n, s),
            arm("random", Ablate::Random(random_sets.to_vec()), n, s),
        ];
        if self.boost_prompts > 0 {
            for &f in &self.boost_factors {
                if f != 1.0 {
                    v.push(Arm {
                        boost: f as f32,
                        ..arm(&boost_name(f), Ablate::Nothing, self.boost_prompts, 1)
                    });
                }
            }
        }
        if self.meta_prompts > 0 {
            let m = self.meta_prompts;
            v.push(Arm {
                meta: true,
                ..arm("meta_prompt", Ablate::Nothing, m, 1)
            });
            v.push(Arm {
                meta: true,
                ..arm("meta_prompt_otd_ablated", Ablate::Set(otd.to_vec()), m, 1)
            });
        }
        if self.sites_prompts > 0 {
            let m = self.sites_prompts;
            v.push(Arm {
                all_positions: true,
                ..arm("otd_ablated_all_positions", Ablate::Set(otd.to_vec()), m, 1)
            });
            v.push(Arm {
                all_positions: true,
                ..arm("steer_ablated_all_positions", Ablate::SteeringLatent, m, 1)
            });
        }
        v
    }
}

/// The condition name of boost factor `f` (`boost_x0.50`).
fn boost_name(f: f64) -> String {
    format!("boost_x{f:.2}")
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

/// How well a second, independent judge ranks the same attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeAgreement {
    /// The second judge's model file.
    pub model: String,
    /// Its prompt rendering.
    pub template: JudgeTemplate,
    /// Attempts scored by both.
    pub attempts: usize,
    /// Spearman rank correlation of the two judges' Δ over those attempts.
    pub spearman_delta: f64,
    /// Spearman rank correlation of the first judge's 0–100 score with the second
    /// judge's Δ (the score clamps Δ, so ties at 0 and 100 lower it).
    pub spearman_score: f64,
    /// Seconds the second judge took (loading included).
    pub seconds: f64,
}

/// One point of the boost sweep: a factor, pooled over latents (`latent: None`) or for
/// one latent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoostPoint {
    /// Multiple of the calibrated strength.
    pub factor: f64,
    /// The steering latent, or `None` for all of them pooled.
    pub latent: Option<u32>,
    /// Mean steering strength of the trials.
    pub mean_strength: f64,
    /// The trials' summary.
    pub summary: ConditionSummary,
}

/// A group of conditions on a subset of the prompts and its paired comparisons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubsetResults {
    /// The first this many prompts (sample 0 of each prompt × latent).
    pub prompts: usize,
    /// The conditions, the reference first (restricted to the same trials).
    pub conditions: Vec<ConditionSummary>,
    /// Paired comparisons.
    pub paired: Vec<Paired>,
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

/// Everything `results.json` holds (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EsrResults {
    /// The SAE's evaluation on held-out text.
    pub sae_eval: EvalReport,
    /// Where the SAE came from (a path, or "trained").
    pub sae_source: String,
    /// The OTD latents ablated in `otd_ablated`.
    pub otd_latents: Vec<u32>,
    /// Which rule picked them: `paper`, `relaxed`, `contrast` or `fixed`.
    pub otd_rule: String,
    /// Statistics of the OTD latents (or, when none, the best candidates).
    pub otd_stats: Vec<LatentStats>,
    /// The random control sets.
    pub random_sets: Vec<Vec<u32>>,
    /// Steering latents and their calibrated strengths.
    pub steering: Vec<SteeringLatent>,
    /// The judge's calibration.
    pub judge: JudgeSummary,
    /// The unsteered answers (every prompt × `chat_samples`).
    pub unsteered: ConditionSummary,
    /// The main conditions: `baseline`, `otd_ablated`, `steer_ablated`, `random`.
    pub conditions: Vec<ConditionSummary>,
    /// Each main condition but `baseline` against `baseline`, paired.
    pub paired: Vec<Paired>,
    /// The boost sweep: per factor pooled, then per factor and latent.
    pub boost_sweep: Vec<BoostPoint>,
    /// `baseline`, `meta_prompt`, `meta_prompt_otd_ablated` on the meta-prompt subset;
    /// `meta_prompt` vs `baseline` and `meta_prompt_otd_ablated` vs `meta_prompt`.
    pub meta_prompt: Option<SubsetResults>,
    /// `otd_ablated`, `steer_ablated` and their `_all_positions` variants on the subset;
    /// each variant vs its trained-positions condition.
    pub sites: Option<SubsetResults>,
    /// The second judge's agreement with the first.
    pub judge_agreement: Option<JudgeAgreement>,
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
    /// The prompts with the meta-prompt appended.
    meta_ids: Vec<Vec<u32>>,
    stop: Vec<u32>,
    timings: Timings,
}

fn bar(cfg: &EsrConfig, len: u64, what: &str) -> Step {
    cfg.progress.step(what, "", len)
}

/// Builds the hooks of one batch from its rows' prompt indices and left paddings.
type BatchHooks<'h> = dyn FnMut(&[usize]) -> Result<Hooks> + 'h;

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

    /// Generate for prompts `which` (with the meta-prompt when `meta`) in fixed batches;
    /// prompt `which[j]` samples with seed `seed + j` whatever the hooks, so conditions
    /// see identical random numbers. `hooks(rows)` builds each batch's hooks from its
    /// prompt indices.
    fn generate(
        &mut self,
        meta: bool,
        which: &[usize],
        max_new_tokens: usize,
        seed: u64,
        hooks: &mut BatchHooks<'_>,
        pb: &mut Step,
    ) -> Result<Vec<Vec<u32>>> {
        let t0 = Instant::now();
        let mut out = Vec::with_capacity(which.len());
        for (c, chunk) in which.chunks(self.cfg.batch_size).enumerate() {
            let table = if meta {
                &self.meta_ids
            } else {
                &self.prompt_ids
            };
            let prompts: Vec<Vec<u32>> = chunk
                .iter()
                .map(|&i| table.get(i).cloned().unwrap_or_default())
                .collect();
            let mut h = hooks(chunk)?;
            let params = self.params(max_new_tokens, seed + (c * self.cfg.batch_size) as u64);
            let gens = generate_batch(&mut self.model, &prompts, &params, &mut h)?;
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
    let meta_ids = prompts
        .iter()
        .map(|p| tok.encode(&tok.chat_prompt(&format!("{p} {}", cfg.meta_prompt_text))?))
        .collect::<Result<Vec<_>>>()?;
    let stop = tok.stop_tokens().to_vec();
    let mut cx = Ctx {
        cfg,
        model: m,
        tok,
        prompts,
        prompt_ids,
        meta_ids,
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
    let (mut sae, sae_eval, fire_counts, sae_dir) = prepare_sae(&mut cx, &answers, &sae_point)?;
    // Splices leave the positions before `sae_skip` alone (see `sites`).
    sae.set_first_trained_position(cfg.sae_skip);
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
    let steer_ids = rng.choose(&candidates, cfg.steer_latents);
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
            let mut s = rng.choose(&pool, otd.len());
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

    // 7. Trials: generate every arm, then judge all answers together (the judge shares
    // each prompt's cached prefix among all attempts scored after that prompt).
    let t0 = Instant::now();
    let arms = cfg.arms(&otd, &random_sets);
    let total: usize = arms.iter().map(|a| a.len(steering.len())).sum();
    let mut pb = bar(cfg, total as u64, "trials");
    let mut all: Vec<Trial> = Vec::with_capacity(total + n * cfg.chat_samples);
    for arm in &arms {
        let t_arm = Instant::now();
        all.extend(trials::generate_arm(
            &mut cx,
            &sae,
            (&steer_point, &sae_point),
            arm,
            &steering,
            &mut pb,
        )?);
        *cx.timings
            .stages
            .entry(format!("trials_generate_{}", arm_group(&arm.name)))
            .or_insert(0.0) += t_arm.elapsed().as_secs_f64();
    }
    pb.finish();
    // The unsteered answers are judged with the rest.
    for (s, sample) in answers.iter().enumerate() {
        let seed = unsteered_seed(cfg.seed, s);
        for (p, ids) in sample.iter().enumerate() {
            all.push(Trial {
                condition: "unsteered".into(),
                latent: u32::MAX,
                strength: 0.0,
                prompt: p,
                sample: s,
                seed: seed + p as u64,
                random_set: None,
                tokens: ids.len(),
                scores: Vec::new(),
                text: cx.text(ids)?,
            });
        }
    }
    stage(&mut cx.timings, "trials_generate", t0);
    let t0 = Instant::now();
    let deltas = trials::judge_all(&mut cx, &judge, &mut all)?;
    stage(&mut cx.timings, "trials_judge", t0);

    // 8. The second judge.
    let t0 = Instant::now();
    let judge_agreement = if cfg.judge2_attempts > 0 {
        Some(second_judge(&mut cx, &all, &deltas, &judge)?)
    } else {
        None
    };
    stage(&mut cx.timings, "judge2", t0);

    // 9. Report.
    let t0 = Instant::now();
    let results = summarize_all(
        &cx,
        &all,
        Summaries {
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
            judge_agreement,
            command: command.to_string(),
        },
    );
    let mut results = results;
    report::write_outputs(&mut results, &all, &sae, &sae_dir, out, (t0, t_all))?;
    Ok(results)
}

/// The group an arm's generation time is booked under.
fn arm_group(name: &str) -> &'static str {
    if name.starts_with("boost_") {
        "boost_sweep"
    } else if name.starts_with("meta_prompt") {
        "meta_prompt"
    } else if name.ends_with("_all_positions") {
        "sites"
    } else {
        "main"
    }
}

/// The seed of unsteered sample `s` (its row for prompt `p` samples with `+ p`).
fn unsteered_seed(seed: u64, s: usize) -> u64 {
    seed.wrapping_add(10_000 * s as u64)
}

/// What the results hold besides the trial summaries.
struct Summaries {
    sae_eval: EvalReport,
    sae_source: String,
    otd_latents: Vec<u32>,
    otd_rule: String,
    otd_stats: Vec<LatentStats>,
    random_sets: Vec<Vec<u32>>,
    steering: Vec<SteeringLatent>,
    judge: JudgeSummary,
    judge_agreement: Option<JudgeAgreement>,
    command: String,
}

/// The expected direction of each comparison, in words.
fn expected(condition: &str) -> &'static str {
    match condition {
        "otd_ablated" => {
            "fewer multi-attempt answers if the OTD latents support self-correction \
             (paper: 7.4% → 5.5%), first-attempt score about unchanged (paper: 26.3 → 27.4)"
        }
        "steer_ablated" => {
            "first-attempt score up, toward the unsteered level: the steering is undone \
             (positive control)"
        }
        "random" => "no change (paper: ESR rate 3.8% → 4.2%, within the intervals)",
        "meta_prompt" => "more multi-attempt answers (paper: 7.4% → 31.7%, 4.3×)",
        "meta_prompt_otd_ablated" => {
            "fewer multi-attempt answers than meta_prompt if the OTD latents support \
             self-correction"
        }
        _ => "no change if leaving out the attention sink does not matter",
    }
}

/// Summaries and paired comparisons of every group of trials.
fn summarize_all(cx: &Ctx<'_>, all: &[Trial], s: Summaries) -> EsrResults {
    let cfg = cx.cfg;
    let reps = cfg.bootstrap;
    let seed = |k: u64| cfg.seed.wrapping_add(k);
    let of = |name: &str, prompts: usize, sample0: bool| -> Vec<&Trial> {
        all.iter()
            .filter(|t| t.condition == name && t.prompt < prompts && (!sample0 || t.sample == 0))
            .collect()
    };
    let n = cfg.n_prompts;
    let main = ["baseline", "otd_ablated", "steer_ablated", "random"];
    let conditions: Vec<ConditionSummary> = main
        .iter()
        .enumerate()
        .map(|(k, name)| summarize(name, &of(name, n, false), reps, seed(k as u64)))
        .collect();
    let base = of("baseline", n, false);
    let paired_main: Vec<Paired> = main
        .iter()
        .skip(1)
        .enumerate()
        .map(|(k, name)| {
            paired(
                &of(name, n, false),
                &base,
                expected(name),
                reps,
                seed(10 + k as u64),
            )
        })
        .collect();
    let unsteered = summarize("unsteered", &of("unsteered", n, false), reps, seed(20));

    // Boost sweep: factor 1 is the baseline's sample 0 on the same prompts.
    let mut boost_sweep = Vec::new();
    if cfg.boost_prompts > 0 {
        for (k, &f) in cfg.boost_factors.iter().enumerate() {
            let name = if f == 1.0 {
                "baseline".to_string()
            } else {
                boost_name(f)
            };
            let ts = of(&name, cfg.boost_prompts, true);
            let point = |latent: Option<u32>, ts: &[&Trial], kk: u64| BoostPoint {
                factor: f,
                latent,
                mean_strength: stats::mean(
                    &ts.iter().map(|t| t.strength as f64).collect::<Vec<_>>(),
                ),
                summary: summarize(&boost_name(f), ts, reps, seed(100 + kk)),
            };
            boost_sweep.push(point(None, &ts, k as u64));
            for st in &s.steering {
                let one: Vec<&Trial> = ts
                    .iter()
                    .copied()
                    .filter(|t| t.latent == st.latent)
                    .collect();
                boost_sweep.push(point(Some(st.latent), &one, 1000 + k as u64));
            }
        }
    }

    let subset = |prompts: usize, names: &[&str], pairs: &[(&str, &str)], k0: u64| {
        let conditions = names
            .iter()
            .enumerate()
            .map(|(k, name)| summarize(name, &of(name, prompts, true), reps, seed(k0 + k as u64)))
            .collect();
        let paired = pairs
            .iter()
            .enumerate()
            .map(|(k, (c, r))| {
                paired(
                    &of(c, prompts, true),
                    &of(r, prompts, true),
                    expected(c),
                    reps,
                    seed(k0 + 50 + k as u64),
                )
            })
            .collect();
        SubsetResults {
            prompts,
            conditions,
            paired,
        }
    };
    let meta_prompt = (cfg.meta_prompts > 0).then(|| {
        subset(
            cfg.meta_prompts,
            &["baseline", "meta_prompt", "meta_prompt_otd_ablated"],
            &[
                ("meta_prompt", "baseline"),
                ("meta_prompt_otd_ablated", "meta_prompt"),
            ],
            200,
        )
    });
    let sites = (cfg.sites_prompts > 0).then(|| {
        subset(
            cfg.sites_prompts,
            &[
                "otd_ablated",
                "otd_ablated_all_positions",
                "steer_ablated",
                "steer_ablated_all_positions",
            ],
            &[
                ("otd_ablated_all_positions", "otd_ablated"),
                ("steer_ablated_all_positions", "steer_ablated"),
            ],
            300,
        )
    });
    EsrResults {
        sae_eval: s.sae_eval,
        sae_source: s.sae_source,
        otd_latents: s.otd_latents,
        otd_rule: s.otd_rule,
        otd_stats: s.otd_stats,
        random_sets: s.random_sets,
        steering: s.steering,
        judge: s.judge,
        unsteered,
        conditions,
        paired: paired_main,
        boost_sweep,
        meta_prompt,
        sites,
        judge_agreement: s.judge_agreement,
        config: cfg.clone(),
        command: s.command,
        timings: cx.timings.clone(),
    }
}

/// Score a seeded sample of the judged attempts (unsteered and main conditions) with the
/// second judge and correlate its Δ with the first judge's.
fn second_judge(
    cx: &mut Ctx<'_>,
    all: &[Trial],
    deltas: &[Vec<f64>],
    judge: &Judge,
) -> Result<JudgeAgreement> {
    let cfg = cx.cfg;
    let t0 = Instant::now();
    let main = [
        "unsteered",
        "baseline",
        "otd_ablated",
        "steer_ablated",
        "random",
    ];
    // (prompt, attempt text, first judge's Δ) of every candidate attempt.
    let mut pool: Vec<(usize, String, f64)> = Vec::new();
    for (t, d) in all.iter().zip(deltas) {
        if !main.contains(&t.condition.as_str()) {
            continue;
        }
        for (a, &x) in judge::split_attempts(&t.text).into_iter().zip(d) {
            pool.push((t.prompt, a, x));
        }
    }
    let mut rng = Rng::new(cfg.seed ^ 0x0001_D6E2);
    let pick: Vec<u32> = rng.choose(
        &(0..pool.len() as u32).collect::<Vec<_>>(),
        cfg.judge2_attempts,
    );
    let chosen: Vec<&(usize, String, f64)> =
        pick.iter().filter_map(|&i| pool.get(i as usize)).collect();
    let items: Vec<(usize, &str)> = chosen.iter().map(|(p, a, _)| (*p, a.as_str())).collect();
    let mut pb = bar(cfg, items.len() as u64, "judge2");
    let block = cfg.batch_size;
    let d2 = match &cfg.judge2_model {
        Some(path) => {
            let opts = LoadOptions {
                dtype: dtype(&cfg.model_dtype)?,
                weights: weights(&cfg.model_weights)?,
                ..LoadOptions::default()
            };
            let (mut m2, tok2) = model::load(path, &opts)?;
            let j2 = Judge::with_template(
                &tok2,
                &cx.prompts,
                &cfg.judge2_template,
                cfg.judge_tokens,
                cfg.batch_size,
            )?;
            let mut f = |part: &[(usize, &str)]| j2.deltas(&mut m2, &tok2, part);
            trials::judge_in_blocks(&items, block, &mut f, &mut pb)?
        }
        None => {
            let j2 = Judge::with_template(
                &cx.tok,
                &cx.prompts,
                &cfg.judge2_template,
                cfg.judge_tokens,
                cfg.batch_size,
            )?;
            let mut f = |part: &[(usize, &str)]| j2.deltas(&mut cx.model, &cx.tok, part);
            trials::judge_in_blocks(&items, block, &mut f, &mut pb)?
        }
    };
    pb.finish();
    let d1: Vec<f64> = chosen.iter().map(|c| c.2).collect();
    let s1: Vec<f64> = d1.iter().map(|&x| judge.score(x)).collect();
    Ok(JudgeAgreement {
        model: cfg
            .judge2_model
            .as_ref()
            .unwrap_or(&cfg.model)
            .display()
            .to_string(),
        template: cfg.judge2_template.clone(),
        attempts: items.len(),
        spearman_delta: stats::spearman(&d1, &d2),
        spearman_score: stats::spearman(&s1, &d2),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn stage(t: &mut Timings, name: &str, t0: Instant) {
    t.stages
        .insert(name.to_string(), t0.elapsed().as_secs_f64());
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
        let seed = unsteered_seed(cfg.seed, s);
        let mut none = |_: &[usize]| Ok(Hooks::new());
        answers.push(cx.generate(false, &which, cfg.max_new_tokens, seed, &mut none, &mut pb)?);
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
/// max-pool the SAE's latents over the given positions, never before position
/// `sae_skip` (where the SAE was not trained; see [`sites`]). Also returns the residual
/// norm of every pooled position. Sequences are right-padded into batches (causal
/// attention keeps padding out of real positions, and each sequence starts at 0).
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
            let r = r.start.max(cx.cfg.sae_skip).min(t)..r.end.min(t);
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

/// Max-pooled latents over each prompt (from position `sae_skip` on: the attention sink
/// is left out).
fn prompt_activations(cx: &mut Ctx<'_>, sae: &Sae, point: &HookPoint) -> Result<Vec<Vec<f32>>> {
    let seqs: Vec<_> = cx
        .prompt_ids
        .iter()
        .map(|p| (p.clone(), 0..p.len()))
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
        let mut hooks = |rows: &[usize]| {
            trials::batch_hooks(sae, point, point, Some((latent, v)), &[], 0, false, rows)
        };
        let gens = cx.generate(
            false,
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
    fn presets_validate() -> crate::TestResult {
        for name in ["smollm2", "llama-3.3-70b-goodfire"] {
            for quick in [false, true] {
                EsrConfig::preset(name, quick)
                    .and_then(|c| c.validate())
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        let g = EsrConfig::preset("llama-3.3-70b-goodfire", false)?;
        assert_eq!(g.otd_fixed.as_ref().map(Vec::len), Some(26));
        assert_eq!(g.sae_hook, "blocks.50.hook_resid_post");
        assert_eq!(g.steer_hook, "blocks.33.hook_resid_post");
        assert_eq!(g.max_new_tokens, 512);
        assert!(EsrConfig::preset("gpt-5", false).is_err());
        Ok(())
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
    fn otd_rules() -> crate::TestResult {
        let cfg = EsrConfig::preset("smollm2", true)?;
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
        Ok(())
    }
}
