//! Training TopK and standard (L1) SAEs on activations, with candle autograd (f32, CPU).
//!
//! The recipes follow sparsify (`sparsify/trainer.py`, `sparse_coder.py`) for TopK and
//! SAELens (`standard_sae.py`, `training/`) for the L1 SAE:
//!
//! * encode `pre = (x − b_dec) W_enc + b_enc`, `a = ReLU(pre)`; TopK keeps the `k` largest
//!   `a` per token (the gradient flows through those only), standard keeps all of `a`.
//!   Decode `x̂ = f W_dec + b_dec`. The saved SAE computes exactly this function
//!   (SAELens `apply_b_dec_to_input = true`, no normalization).
//! * TopK loss (sparsify): `FVU + α·AuxK`, `FVU = Σ(x̂ − x)² / Σ‖x − x̄‖²` over the batch.
//!   AuxK: the latents that have not fired for `dead_tokens_threshold` tokens are *dead*;
//!   the `k_aux` (default `d_in / 2`) largest dead activations of each token reconstruct the
//!   residual `e = x − x̂` (detached): `AuxK = min(n_dead / k_aux, 1) · Σ(ê − e)² / Σ‖x − x̄‖²`
//!   with `ê = f_aux W_dec + b_dec`, `α = aux_coefficient` (default 1/32).
//! * Standard loss (SAELens, `lp_norm = 1`): `mean_tokens Σ_d (x̂ − x)² +
//!   λ_t · mean_tokens Σ_i f_i ‖W_dec[i]‖`, with `λ_t` warmed up linearly from `λ/W` to `λ`
//!   over the first `W = l1_warmup_steps` steps.
//! * Dead latents of the standard SAE are *resampled* every `resample_every` steps
//!   (outside the final learning-rate decay), a simplified version of Anthropic's scheme
//!   (Bricken et al. 2023): for each dead latent draw a token of the current batch with
//!   probability ∝ the square of its loss `‖x − x̂‖²`, set `W_dec[i]` to the unit vector of
//!   `x − b_dec`, `W_enc[:, i]` to that vector times 0.2 × the mean encoder-column norm of
//!   the live latents, `b_enc[i] = 0`, and zero the latent's AdamW moments.
//! * Decoder rows are unit-norm: before each step the gradient component parallel to each
//!   row is removed (sparsify's `remove_gradient_parallel_to_decoder_directions`), after it
//!   the rows are renormalised.
//! * AdamW (bias-corrected moments, decoupled weight decay, default 0), fused into one
//!   in-place pass per parameter together with the decoder projection and renormalisation.
//! * Learning-rate schedule, step `s` of `n`: linear warm-up `lr·(s+1)/W` over
//!   `W = lr_warmup_steps`, then constant, then linear decay over the last
//!   `⌊lr_decay_fraction · n⌋` steps (default 20%): `lr·(n − s)/(n − D)` from step `D`,
//!   reaching 0 at the end of training. The factor is the minimum of the two ramps.
//! * Initialisation: `W_dec` rows are random unit vectors (seeded), `W_enc = W_decᵀ`,
//!   `b_enc = 0`; `b_dec` is the geometric median (Weiszfeld), the mean, or zero of
//!   `b_dec_init_samples` tokens drawn from the source before training.
//!
//! # Speed
//! The TopK path never forms a dense `[N, d_sae]` product beyond the encoder's forward
//! `x' W_enc`: the decode, its gradients and `∂/∂W_enc` go through custom ops over the `k`
//! selected latents (see `topk.rs`; each is tested against the dense formulation), and no
//! autograd node computes the unused `∂/∂x`. A step allocates only candle's op outputs
//! (the moments and the batch buffer are allocated once). Training runs on the CPU
//! (the custom ops have no CUDA kernels).
//!
//! Every random choice comes from one seeded generator and every reduction is done in a
//! fixed order, so two runs with the same config and data give bitwise-equal weights.
//!
//! Outputs (with an output directory): the final SAE in SAELens format in the directory,
//! checkpoints in `checkpoints/<step>/` every `checkpoint_every` steps, `train_log.json`
//! (`{"config": …, "steps": [StepLog…]}`), `train_config.json`, and (with the `plot` feature) `train_curve.png`.

mod adamw;
mod init;
pub mod metrics;
#[cfg(feature = "plot")]
mod plot;
mod source;
mod topk;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

pub use init::{geometric_median, mean};
pub use metrics::{dead_fraction, fire_counts, fvu, mean_l0, mse, MetricsAccumulator};
#[cfg(feature = "plot")]
pub use plot::plot_training_curves;
pub use source::{ActivationSource, InMemorySource, ShardSource};

use crate::io::atomic::write_json;
use crate::progress::Reporter;
use crate::rng::Rng;
use crate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
use crate::{Error, Result};
use adamw::{Hyper, Moments};
use topk::{SparseDecode, SparseEncGrad, TopKIndices};

/// The SAE architectures the trainer supports. Parses from and prints as `topk` or
/// `standard` (also read: `l1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TrainArchitecture {
    /// TopK with AuxK (sparsify).
    #[serde(rename = "topk")]
    TopK,
    /// ReLU with an L1 penalty (SAELens `standard`).
    #[serde(rename = "standard")]
    Standard,
}

names!(
    TrainArchitecture,
    "training architecture",
    TopK => "topk",
    Standard => "standard" | "l1",
);

/// How `b_dec` is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BDecInit {
    /// Geometric median of a sample (Weiszfeld iterations).
    GeometricMedian,
    /// Mean of a sample.
    Mean,
    /// Zero.
    Zeros,
}

/// Everything a training run needs. Deserialises from JSON with defaults for every
/// field left out (see [`TrainConfig::default`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// `topk` or `standard`.
    pub architecture: TrainArchitecture,
    /// Input width (must match the source).
    pub d_in: usize,
    /// Number of latents.
    pub d_sae: usize,
    /// TopK: active latents per token.
    pub k: usize,
    /// Standard: the L1 coefficient λ.
    pub l1_coefficient: f64,
    /// Standard: steps of linear λ warm-up (0 = none).
    pub l1_warmup_steps: usize,
    /// Peak learning rate; `None` = sparsify's default `2e-4 / √(d_sae / 2¹⁴)`.
    pub lr: Option<f64>,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// AdamW decoupled weight decay (applied to every parameter).
    pub weight_decay: f64,
    /// Steps of linear learning-rate warm-up (0 = none).
    pub lr_warmup_steps: usize,
    /// Fraction of the steps, at the end, over which the learning rate decays linearly to 0.
    pub lr_decay_fraction: f64,
    /// Tokens per step.
    pub batch_size: usize,
    /// Training tokens; the run has `total_tokens / batch_size` steps.
    pub total_tokens: u64,
    /// Seed of the weight initialisation and of resampling.
    pub seed: u64,
    /// TopK: latents in the AuxK reconstruction; `None` = `d_in / 2`.
    pub k_aux: Option<usize>,
    /// TopK: weight α of the AuxK loss.
    pub aux_coefficient: f64,
    /// A latent that has not fired for more than this many tokens is dead.
    pub dead_tokens_threshold: u64,
    /// Standard: resample dead latents every this many steps (0 = never).
    pub resample_every: usize,
    /// `b_dec` initialisation.
    pub b_dec_init: BDecInit,
    /// Tokens drawn from the source for the `b_dec` initialisation.
    pub b_dec_init_samples: usize,
    /// Weiszfeld iterations of the geometric median.
    pub geometric_median_iters: usize,
    /// Keep decoder rows unit-norm (and project out the parallel gradient).
    pub normalize_decoder: bool,
    /// Save a checkpoint every this many steps (0 = only the final SAE).
    pub checkpoint_every: usize,
    /// Hook the activations were read at (saved in the SAE's metadata).
    pub hook_name: Option<String>,
    /// Model the activations came from (saved in the SAE's metadata).
    pub model_name: Option<String>,
    /// The first position of each context the activations come from, saved as the SAE's
    /// [`SaeConfig::first_trained_position`]: `1` for [`harvest`](crate::harvest)'s shards
    /// (it never writes a context's first position); `0` for activations of every position.
    pub first_trained_position: usize,
    /// Where progress goes (nothing by default); not saved.
    #[serde(skip)]
    pub progress: Reporter,
}

impl Default for TrainConfig {
    /// TopK, k = 32, batch 4096, AdamW (0.9, 0.999, 1e-8, no weight decay), 50 warm-up
    /// steps, 20% final decay, AuxK α = 1/32 and a 10M-token dead threshold (sparsify),
    /// λ = 5, geometric-median `b_dec` from 4096 tokens, unit-norm decoder rows.
    /// `d_in`, `d_sae` and `total_tokens` are 0 and must be set.
    fn default() -> Self {
        TrainConfig {
            architecture: TrainArchitecture::TopK,
            d_in: 0,
            d_sae: 0,
            k: 32,
            l1_coefficient: 5.0,
            l1_warmup_steps: 0,
            lr: None,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            lr_warmup_steps: 50,
            lr_decay_fraction: 0.2,
            batch_size: 4096,
            total_tokens: 0,
            seed: 0,
            k_aux: None,
            aux_coefficient: 1.0 / 32.0,
            dead_tokens_threshold: 10_000_000,
            resample_every: 0,
            b_dec_init: BDecInit::GeometricMedian,
            b_dec_init_samples: 4096,
            geometric_median_iters: 50,
            normalize_decoder: true,
            checkpoint_every: 0,
            hook_name: None,
            model_name: None,
            first_trained_position: 1,
            progress: Reporter::none(),
        }
    }
}

impl TrainConfig {
    /// A TopK config with defaults for everything else.
    pub fn topk(d_in: usize, d_sae: usize, k: usize, total_tokens: u64) -> Self {
        TrainConfig {
            d_in,
            d_sae,
            k,
            total_tokens,
            ..Default::default()
        }
    }

    /// A standard (L1) config with defaults for everything else.
    pub fn standard(d_in: usize, d_sae: usize, l1_coefficient: f64, total_tokens: u64) -> Self {
        TrainConfig {
            architecture: TrainArchitecture::Standard,
            d_in,
            d_sae,
            l1_coefficient,
            total_tokens,
            ..Default::default()
        }
    }

    /// Number of optimizer steps: `total_tokens / batch_size`.
    pub fn steps(&self) -> usize {
        if self.batch_size == 0 {
            0
        } else {
            usize::try_from(self.total_tokens / self.batch_size as u64).unwrap_or(usize::MAX)
        }
    }

    /// The peak learning rate (the configured one or sparsify's default).
    pub fn peak_lr(&self) -> f64 {
        self.lr
            .unwrap_or_else(|| 2e-4 / (self.d_sae.max(1) as f64 / 16384.0).sqrt())
    }

    /// The learning rate at step `s` (0-based); see the module docs for the schedule.
    pub fn lr_at(&self, s: usize) -> f64 {
        let n = self.steps();
        let warm = if self.lr_warmup_steps > 0 {
            ((s + 1) as f64 / self.lr_warmup_steps as f64).min(1.0)
        } else {
            1.0
        };
        let decay_steps = (self.lr_decay_fraction * n as f64).floor() as usize;
        let start = n.saturating_sub(decay_steps);
        let decay = if decay_steps > 0 && s >= start {
            n.saturating_sub(s) as f64 / decay_steps as f64
        } else {
            1.0
        };
        self.peak_lr() * warm.min(decay)
    }

    /// The L1 coefficient at step `s` (linear warm-up).
    pub fn l1_at(&self, s: usize) -> f64 {
        if self.l1_warmup_steps > 0 {
            self.l1_coefficient * ((s + 1) as f64 / self.l1_warmup_steps as f64).min(1.0)
        } else {
            self.l1_coefficient
        }
    }

    fn k_aux(&self) -> usize {
        self.k_aux.unwrap_or(self.d_in / 2).max(1)
    }

    /// Check the config; every message names the field and its value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.d_in == 0 || self.d_sae == 0 {
            return bad(format!(
                "d_in = {} and d_sae = {} must both be positive",
                self.d_in, self.d_sae
            ));
        }
        if self.architecture == TrainArchitecture::TopK {
            if self.k == 0 || self.k > self.d_sae {
                return bad(format!(
                    "topk needs 1 <= k <= d_sae = {}, got k = {}",
                    self.d_sae, self.k
                ));
            }
            if self.k_aux() > self.d_sae {
                return bad(format!(
                    "k_aux = {} exceeds d_sae = {}",
                    self.k_aux(),
                    self.d_sae
                ));
            }
        }
        if self.batch_size == 0 {
            return bad("batch_size must be positive".into());
        }
        if self.steps() == 0 {
            return bad(format!(
                "total_tokens = {} is less than one batch of {} tokens",
                self.total_tokens, self.batch_size
            ));
        }
        let lr = self.peak_lr();
        if !(lr.is_finite() && lr > 0.0) {
            return bad(format!("lr must be positive and finite, got {lr}"));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("eps must be positive, got {}", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if !(0.0..=1.0).contains(&self.lr_decay_fraction) {
            return bad(format!(
                "lr_decay_fraction must be in [0, 1], got {}",
                self.lr_decay_fraction
            ));
        }
        for (name, v) in [
            ("l1_coefficient", self.l1_coefficient),
            ("aux_coefficient", self.aux_coefficient),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} must be >= 0 and finite, got {v}"));
            }
        }
        if self.b_dec_init != BDecInit::Zeros && self.b_dec_init_samples == 0 {
            return bad("b_dec_init_samples must be positive".into());
        }
        Ok(())
    }
}

/// One step's numbers, as written to `train_log.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StepLog {
    /// Step number, starting at 1.
    pub step: usize,
    /// Training tokens seen after this step.
    pub tokens: u64,
    /// The minimised loss.
    pub loss: f64,
    /// Per-element mean squared error of the batch.
    pub mse: f64,
    /// Fraction of variance unexplained on the batch.
    pub fvu: f64,
    /// Mean active latents per token.
    pub l0: f64,
    /// Fraction of latents that have not fired for `dead_tokens_threshold` tokens.
    pub dead_fraction: f64,
    /// TopK: the AuxK loss (before α); 0 otherwise or without dead latents.
    pub aux_loss: f64,
    /// Standard: the L1 term (before λ); 0 for TopK.
    pub l1_loss: f64,
    /// Learning rate used by this step.
    pub lr: f64,
    /// Throughput of this step (batch fetch included).
    pub tokens_per_s: f64,
}

/// The result of [`train`]: the SAE and the per-step log.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TrainedSae {
    /// The trained SAE (f32, CPU).
    pub sae: Sae,
    /// One entry per step.
    pub log: Vec<StepLog>,
}

/// A training run in progress. [`train`] is the one-call entry point; `Trainer` exposes
/// single steps for callers that want their own loop.
pub struct Trainer<'a> {
    cfg: TrainConfig,
    source: &'a mut dyn ActivationSource,
    w_enc: Var,
    b_enc: Var,
    w_dec: Var,
    b_dec: Var,
    moments: Vec<Moments>,
    /// Tokens since each latent last fired, f32 `[d_sae]`.
    since_fired: Tensor,
    buf: Vec<f32>,
    step: usize,
    tokens: u64,
    rng: Rng,
    log: Vec<StepLog>,
}

fn param(v: Vec<f32>, shape: &[usize]) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::from_vec(
        v,
        shape,
        &Device::Cpu,
    )?)?)
}

impl<'a> Trainer<'a> {
    /// Validate `cfg` against `source`, draw the `b_dec` sample and initialise the weights.
    pub fn new(cfg: TrainConfig, source: &'a mut dyn ActivationSource) -> Result<Self> {
        cfg.validate()?;
        if source.d_in() != cfg.d_in {
            return Err(Error::Config(format!(
                "the activation source yields rows of d_in = {}, the config says d_in = {}",
                source.d_in(),
                cfg.d_in
            )));
        }
        let (d, n) = (cfg.d_in, cfg.d_sae);
        let mut rng = Rng::with_stream(cfg.seed, 1);
        let mut w_dec = vec![0f32; n * d];
        for row in w_dec.chunks_exact_mut(d) {
            row.iter_mut().for_each(|v| *v = rng.normal() as f32);
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        }
        let mut w_enc = vec![0f32; d * n];
        for (i, row) in w_dec.chunks_exact(d).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                if let Some(slot) = w_enc.get_mut(j * n + i) {
                    *slot = v;
                }
            }
        }
        let mut buf = Vec::new();
        let b_dec = match cfg.b_dec_init {
            BDecInit::Zeros => vec![0f32; d],
            init => {
                source.next_batch(cfg.b_dec_init_samples, &mut buf)?;
                check_batch(&buf, cfg.b_dec_init_samples, d)?;
                if init == BDecInit::Mean {
                    mean(&buf, d)?
                } else {
                    geometric_median(&buf, d, cfg.geometric_median_iters)?
                }
            }
        };
        let w_enc = param(w_enc, &[d, n])?;
        let b_enc = param(vec![0f32; n], &[n])?;
        let w_dec = param(w_dec, &[n, d])?;
        let b_dec = param(b_dec, &[d])?;
        let moments = [&w_enc, &b_enc, &w_dec, &b_dec]
            .iter()
            .map(|p| Moments::zeros(p.elem_count()))
            .collect();
        Ok(Trainer {
            since_fired: Tensor::zeros(n, DType::F32, &Device::Cpu)?,
            cfg,
            source,
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            moments,
            buf,
            step: 0,
            tokens: 0,
            rng,
            log: Vec::new(),
        })
    }

    /// The config.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The log so far.
    pub fn log(&self) -> &[StepLog] {
        &self.log
    }

    /// A copy of the current weights as an [`Sae`] (SAELens conventions, f32).
    pub fn sae(&self) -> Result<Sae> {
        let c = &self.cfg;
        let arch = match c.architecture {
            TrainArchitecture::TopK => Architecture::TopK,
            TrainArchitecture::Standard => Architecture::Standard,
        };
        let mut sc = SaeConfig::new(arch, c.d_in, c.d_sae);
        if arch == Architecture::TopK {
            sc.k = c.k;
        }
        sc.hook_name = c.hook_name.clone();
        sc.model_name = c.model_name.clone();
        sc.first_trained_position = c.first_trained_position;
        let snap = |v: &Var| -> Result<Tensor> { Ok(v.as_tensor().copy()?.detach()) };
        Sae::new(
            sc,
            SaeWeights {
                w_enc: snap(&self.w_enc)?,
                b_enc: snap(&self.b_enc)?,
                w_dec: snap(&self.w_dec)?,
                b_dec: snap(&self.b_dec)?,
                threshold: None,
                r_mag: None,
                b_mag: None,
                w_skip: None,
            },
        )
    }

    fn dead_mask(&self) -> Result<(Tensor, usize)> {
        let dead = self
            .since_fired
            .gt(self.cfg.dead_tokens_threshold as f64)?
            .to_dtype(DType::F32)?;
        let n = dead.sum_all()?.to_scalar::<f32>()? as usize;
        Ok((dead, n))
    }

    /// Take one optimizer step on the next batch and return its log entry.
    pub fn step(&mut self) -> Result<StepLog> {
        let t0 = Instant::now();
        let c = &self.cfg;
        let (b, d) = (c.batch_size, c.d_in);
        self.source.next_batch(b, &mut self.buf)?;
        check_batch(&self.buf, b, d)?;
        let x = Tensor::from_slice(&self.buf, (b, d), &Device::Cpu)?;
        let (w_enc, b_enc, w_dec, b_dec) = (
            self.w_enc.as_tensor(),
            self.b_enc.as_tensor(),
            self.w_dec.as_tensor(),
            self.b_dec.as_tensor(),
        );
        let s = self.step;
        let lr = c.lr_at(s);

        // pre = (x − b_dec) W_enc + b_enc, written so that autograd does not form the dense
        // ∂/∂x' = g W_encᵀ ([N, d_in] from [N, d_sae]): the encoder input is detached from
        // b_dec, and the term (b̄_dec − b_dec) W̄_enc (bars: detached) is exactly zero in value
        // but carries ∂/∂b_dec = −(Σ_n g_n) W_encᵀ, one vector-matrix product.
        let b_dec_det = b_dec.detach();
        let zero = (&b_dec_det - b_dec)?
            .unsqueeze(0)?
            .matmul(&w_enc.detach())?;
        let xc = x.broadcast_sub(&b_dec_det)?;
        let pre = match c.architecture {
            // TopK: ∂/∂W_enc has k (+ k_aux) non-zero columns per token; SparseEncGrad
            // computes it from those instead of a dense x'ᵀ g product.
            TrainArchitecture::TopK => {
                (xc.matmul(&w_enc.detach())? + xc.apply_op2(w_enc, SparseEncGrad)?)?
            }
            TrainArchitecture::Standard => xc.matmul(w_enc)?,
        };
        let acts = pre.broadcast_add(b_enc)?.broadcast_add(&zero)?.relu()?;
        // TopK: the ids of the k largest activations, and a sparse decode through them.
        // Standard: the dense decode of all activations.
        let (recon, top) = match c.architecture {
            TrainArchitecture::TopK => {
                let idx = acts.detach().apply_op1_no_bwd(&TopKIndices { k: c.k })?;
                let r = acts.apply_op3(&idx, w_dec, SparseDecode)?;
                (r.broadcast_add(b_dec)?, Some(idx))
            }
            TrainArchitecture::Standard => (acts.matmul(w_dec)?.broadcast_add(b_dec)?, None),
        };
        let sq = (&recon - &x)?.sqr()?.sum_all()?;
        let total_var = x
            .broadcast_sub(&x.mean_keepdim(0)?)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?;
        let inv_var = 1.0 / (total_var as f64).max(1e-30);

        let (dead, n_dead) = self.dead_mask()?;
        let mut aux_value = 0.0;
        let mut l1_value = 0.0;
        let loss = match c.architecture {
            TrainArchitecture::TopK => {
                let mut loss = (&sq * inv_var)?;
                if n_dead > 0 && c.aux_coefficient > 0.0 {
                    let k_aux = c.k_aux();
                    let scale = (n_dead as f64 / k_aux as f64).min(1.0);
                    // 0 for dead latents, −1e30 for live ones: the top k_aux are all dead.
                    let penalty = dead.affine(1e30, -1e30)?;
                    let sel =
                        acts.detach()
                            .broadcast_add(&penalty)?
                            .apply_op1_no_bwd(&TopKIndices {
                                k: k_aux.min(n_dead),
                            })?;
                    let e_hat = acts
                        .apply_op3(&sel, w_dec, SparseDecode)?
                        .broadcast_add(b_dec)?;
                    let e = (&x - &recon)?.detach();
                    let aux = ((e_hat - e)?.sqr()?.sum_all()? * (scale * inv_var))?;
                    aux_value = aux.to_scalar::<f32>()? as f64;
                    loss = (loss + (aux * c.aux_coefficient)?)?;
                }
                loss
            }
            TrainArchitecture::Standard => {
                let norms = w_dec.sqr()?.sum(1)?.sqrt()?;
                let l1 = (acts.broadcast_mul(&norms)?.sum_all()? / b as f64)?;
                l1_value = l1.to_scalar::<f32>()? as f64;
                ((&sq / b as f64)? + (l1 * c.l1_at(s))?)?
            }
        };
        let loss_value = loss.to_scalar::<f32>()? as f64;
        if !loss_value.is_finite() {
            return Err(Error::Invalid(format!(
                "training diverged at step {}: loss = {loss_value} (lower the learning rate, \
                 or check the activations for NaN/inf)",
                s + 1
            )));
        }
        let grads = loss.backward()?;

        // Dead-latent bookkeeping: tokens since each latent last fired; and L0.
        let (fired, active) = match &top {
            Some(idx) => {
                let pos = acts
                    .detach()
                    .gather(idx, 1)?
                    .gt(0f64)?
                    .to_dtype(DType::F32)?;
                let counts = Tensor::zeros(c.d_sae, DType::F32, &Device::Cpu)?.index_add(
                    &idx.flatten_all()?,
                    &pos.flatten_all()?,
                    0,
                )?;
                (counts.gt(0f64)?.to_dtype(DType::F32)?, pos.sum_all()?)
            }
            None => {
                let pos = acts.detach().gt(0f64)?.to_dtype(DType::F32)?;
                (pos.max(0)?, pos.sum_all()?)
            }
        };
        self.since_fired = ((&self.since_fired + b as f64)? * fired.affine(-1.0, 1.0)?)?;

        // AdamW on the four parameters, one fused in-place pass each.
        let t = (s + 1) as i32;
        let h = Hyper {
            lr: lr as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            weight_decay: c.weight_decay as f32,
            c1: (1.0 - c.beta1.powi(t)) as f32,
            c2: (1.0 - c.beta2.powi(t)) as f32,
        };
        let params = [&self.w_enc, &self.b_enc, &self.w_dec, &self.b_dec];
        for (i, (p, mo)) in params.iter().zip(self.moments.iter_mut()).enumerate() {
            let g = grads.get(p.as_tensor()).ok_or_else(|| {
                Error::Invalid("training: a parameter received no gradient".into())
            })?;
            let unit_rows = (i == 2 && c.normalize_decoder).then_some(d);
            adamw::step(p.as_tensor(), g, mo, h, unit_rows)?;
        }

        let n_steps = c.steps();
        let decay_start = n_steps.saturating_sub((c.lr_decay_fraction * n_steps as f64) as usize);
        if c.architecture == TrainArchitecture::Standard
            && c.resample_every > 0
            && (s + 1).is_multiple_of(c.resample_every)
            && s + 1 < decay_start
        {
            let per_token = (&recon - &x)?.sqr()?.sum(1)?.detach();
            self.resample(&x, &per_token)?;
        }

        let sq_v = sq.to_scalar::<f32>()? as f64;
        let l0 = active.to_scalar::<f32>()? as f64 / b as f64;
        let (_, dead_after) = self.dead_mask()?;
        self.step += 1;
        self.tokens += b as u64;
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        let entry = StepLog {
            step: self.step,
            tokens: self.tokens,
            loss: loss_value,
            mse: sq_v / (b * d) as f64,
            fvu: sq_v * inv_var,
            l0,
            dead_fraction: dead_after as f64 / self.cfg.d_sae as f64,
            aux_loss: aux_value,
            l1_loss: l1_value,
            lr,
            tokens_per_s: b as f64 / secs,
        };
        self.log.push(entry.clone());
        Ok(entry)
    }

    /// Resample the dead latents towards high-loss tokens of `x` (see the module docs).
    /// Runs every `resample_every` steps, so its O(d_sae·d_in) copies are not per step.
    fn resample(&mut self, x: &Tensor, per_token_loss: &Tensor) -> Result<()> {
        let (dead, n_dead) = self.dead_mask()?;
        if n_dead == 0 {
            return Ok(());
        }
        let (d, n) = (self.cfg.d_in, self.cfg.d_sae);
        let dead = dead.to_vec1::<f32>()?;
        let losses = per_token_loss.to_vec1::<f32>()?;
        let weights: Vec<f64> = losses.iter().map(|&l| (l as f64).powi(2)).collect();
        let total: f64 = weights.iter().sum();
        let xs = x.broadcast_sub(self.b_dec.as_tensor())?.to_vec2::<f32>()?;
        let mut w_dec = self.w_dec.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let mut w_enc = self.w_enc.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let mut b_enc = self.b_enc.as_tensor().to_vec1::<f32>()?;
        // Mean norm of the live latents' encoder columns.
        let col_norm = |w_enc: &[f32], i: usize| -> f32 {
            (0..d)
                .map(|j| w_enc.get(j * n + i).map_or(0.0, |v| v * v))
                .sum::<f32>()
                .sqrt()
        };
        let live: Vec<usize> = (0..n)
            .filter(|&i| dead.get(i).is_some_and(|&v| v == 0.0))
            .collect();
        let enc_norm = if live.is_empty() {
            1.0
        } else {
            live.iter().map(|&i| col_norm(&w_enc, i)).sum::<f32>() / live.len() as f32
        };
        for i in (0..n).filter(|&i| dead.get(i).is_some_and(|&v| v > 0.0)) {
            // Draw a token with probability ∝ loss² (uniform if every loss is 0).
            let j = if total > 0.0 && total.is_finite() {
                let mut r = self.rng.uniform() * total;
                let mut pick = weights.len().saturating_sub(1);
                for (t, &w) in weights.iter().enumerate() {
                    if r < w {
                        pick = t;
                        break;
                    }
                    r -= w;
                }
                pick
            } else {
                self.rng.below(weights.len())
            };
            let Some(v) = xs.get(j) else { continue };
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            if !(norm > 0.0 && norm.is_finite()) {
                continue;
            }
            for (k, &a) in v.iter().enumerate() {
                let u = a / norm;
                if let Some(slot) = w_dec.get_mut(i * d + k) {
                    *slot = u;
                }
                if let Some(slot) = w_enc.get_mut(k * n + i) {
                    *slot = u * 0.2 * enc_norm;
                }
            }
            if let Some(slot) = b_enc.get_mut(i) {
                *slot = 0.0;
            }
        }
        let dev = Device::Cpu;
        self.w_dec.set(&Tensor::from_vec(w_dec, (n, d), &dev)?)?;
        self.w_enc.set(&Tensor::from_vec(w_enc, (d, n), &dev)?)?;
        self.b_enc.set(&Tensor::from_vec(b_enc, n, &dev)?)?;
        // Zero the moments of resampled latents and restart their dead clocks.
        for i in (0..n).filter(|&i| dead.get(i).is_some_and(|&v| v > 0.0)) {
            let [enc, benc, dec, _] = &mut self.moments[..] else {
                break;
            };
            for j in 0..d {
                for mv in [&mut enc.m, &mut enc.v] {
                    if let Some(x) = mv.get_mut(j * n + i) {
                        *x = 0.0;
                    }
                }
            }
            for mv in [&mut benc.m, &mut benc.v] {
                if let Some(x) = mv.get_mut(i) {
                    *x = 0.0;
                }
            }
            for mv in [&mut dec.m, &mut dec.v] {
                if let Some(row) = mv.get_mut(i * d..(i + 1) * d) {
                    row.iter_mut().for_each(|x| *x = 0.0);
                }
            }
        }
        let keep = Tensor::from_vec(dead, n, &dev)?.affine(-1.0, 1.0)?;
        self.since_fired = (&self.since_fired * &keep)?;
        Ok(())
    }

    /// Run all remaining steps. With `out_dir`, write checkpoints, the final SAE, the log,
    /// the config and the training-curve PNG there (see the module docs).
    pub fn run(mut self, out_dir: Option<&Path>) -> Result<TrainedSae> {
        let n = self.cfg.steps();
        if let Some(dir) = out_dir {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            write_json(&dir.join("train_config.json"), &self.cfg)?;
        }
        let mut pb = self.cfg.progress.step("train", "steps", n as u64);
        pb.set(self.step as u64);
        while self.step < n {
            self.step()?;
            pb.set(self.step as u64);
            let every = self.cfg.checkpoint_every;
            if let Some(dir) = out_dir {
                if every > 0 && self.step.is_multiple_of(every) && self.step < n {
                    let ck: PathBuf = dir.join("checkpoints").join(self.step.to_string());
                    self.sae()?.save_saelens(&ck)?;
                    self.write_log(dir)?;
                }
            }
        }
        pb.finish();
        let sae = self.sae()?;
        if let Some(dir) = out_dir {
            sae.save_saelens(dir)?;
            self.write_log(dir)?;
            #[cfg(feature = "plot")]
            plot_training_curves(&self.log, &dir.join("train_curve.png"))?;
        }
        Ok(TrainedSae { sae, log: self.log })
    }

    fn write_log(&self, dir: &Path) -> Result<()> {
        #[derive(Serialize)]
        struct LogFile<'a> {
            config: &'a TrainConfig,
            steps: &'a [StepLog],
        }
        write_json(
            &dir.join("train_log.json"),
            &LogFile {
                config: &self.cfg,
                steps: &self.log,
            },
        )
    }
}

fn check_batch(buf: &[f32], rows: usize, d: usize) -> Result<()> {
    if buf.len() != rows * d {
        return Err(Error::Invalid(format!(
            "the activation source returned {} values, expected {rows} rows of d_in = {d}",
            buf.len()
        )));
    }
    Ok(())
}

/// Train an SAE as `cfg` says on `source`; see the module docs for the recipe and for
/// what is written to `out_dir`.
pub fn train(
    cfg: &TrainConfig,
    source: &mut dyn ActivationSource,
    out_dir: Option<&Path>,
) -> Result<TrainedSae> {
    Trainer::new(cfg.clone(), source)?.run(out_dir)
}
