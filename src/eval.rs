//! Standard SAE evaluations on held-out text ([`evaluate`]).
//!
//! For each batch of contexts the model runs three times:
//! 1. **clean**, capturing the activation `x` at the SAE's hook point; the SAE's
//!    reconstruction `x̂ = Sae::forward(x)` and latents `f = Sae::encode(x)` feed
//!    [`MetricsAccumulator`] (MSE, FVU, mean L0, per-latent fire counts → dead fraction,
//!    i.e. latents that never fired on the whole evaluation set);
//! 2. **spliced**: the SAE in [`SpliceMode::Reconstruction`] through [`SaeSplice`] replaces
//!    the activation by its reconstruction;
//! 3. **zero-ablated**: a hook returns zeros at the hook point.
//!
//! The next-token cross-entropy (mean over every predicted position of every context, in
//! nats) of the three runs gives `CE loss recovered = (CE_zero − CE_spliced)/(CE_zero − CE_clean)`
//! (1 = the splice costs nothing, 0 = as bad as deleting the activation).
//!
//! Leading non-text positions (the BOS, see [`crate::harvest`]) are left out of the
//! reconstruction metrics and are neither spliced nor ablated, matching what the SAE was
//! trained on.

#[cfg(feature = "plot")]
use std::path::Path;

use candle_core::{DType, Tensor};
#[cfg(feature = "plot")]
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::edit::{Edits, SpliceMode};
use crate::hooks::{ActivationCache, HookContext, HookPoint, Hooks, Positions, SaeSplice};
use crate::model::HookedModel;
#[cfg(feature = "plot")]
use crate::plot::{write_png, FONT};
use crate::progress::Reporter;
use crate::train::MetricsAccumulator;
use crate::{Error, Result, Sae};

/// The numbers `sae-ablate eval --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EvalReport {
    /// The hook point the SAE was evaluated at.
    pub hook: String,
    /// Per-element mean squared error of the reconstruction.
    pub mse: f64,
    /// Fraction of variance unexplained.
    pub fvu: f64,
    /// Mean active latents per token.
    pub l0: f64,
    /// Fraction of latents that never fired on the evaluation tokens.
    pub dead_fraction: f64,
    /// Next-token CE loss of the unmodified model.
    pub ce_clean: f64,
    /// CE loss with the SAE's reconstruction spliced in.
    pub ce_spliced: f64,
    /// CE loss with the hook point's activation replaced by zeros.
    pub ce_zero_ablated: f64,
    /// `(ce_zero_ablated − ce_spliced) / (ce_zero_ablated − ce_clean)`.
    pub ce_loss_recovered: f64,
    /// Activation rows in the reconstruction metrics.
    pub tokens: u64,
    /// Predicted positions in the CE losses.
    pub ce_positions: u64,
}

/// Settings of [`evaluate`]: [`EvalConfig::default`], then set the fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EvalConfig {
    /// Contexts per forward pass.
    pub batch_size: usize,
    /// Leading positions of each context that are not text (1 with a BOS).
    pub prefix_len: usize,
    /// Hook point (default: the SAE's `hook_name`).
    pub hook: Option<HookPoint>,
    /// Where progress goes (nothing by default).
    pub progress: Reporter,
}

impl Default for EvalConfig {
    /// Batches of 8 contexts, one BOS position, the SAE's own hook, no progress reports.
    fn default() -> Self {
        EvalConfig {
            batch_size: 8,
            prefix_len: 1,
            hook: None,
            progress: Reporter::none(),
        }
    }
}

/// Sum of next-token CE over `logits [b, t, v]` predicting `tokens [b, t]` shifted by one,
/// and the number of predicted positions.
fn ce_sum(logits: &Tensor, tokens: &Tensor) -> Result<(f64, u64)> {
    let (b, t, v) = logits.dims3()?;
    let lg = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let tg = tokens.narrow(1, 1, t - 1)?.reshape(b * (t - 1))?;
    let lsm = crate::model::log_probs(&lg)?;
    let picked = lsm.gather(&tg.unsqueeze(1)?, 1)?;
    let s = picked.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    Ok((-s, (b * (t - 1)) as u64))
}

/// Evaluate `sae` inside `model` on `contexts` (token ids, all of one length ≥ 2).
pub fn evaluate(
    model: &mut dyn HookedModel,
    sae: &Sae,
    contexts: &[Vec<u32>],
    cfg: &EvalConfig,
) -> Result<(EvalReport, MetricsAccumulator)> {
    let hook = match cfg.hook {
        Some(h) => h,
        None => sae
            .hook_name()
            .ok_or_else(|| {
                Error::Invalid("the SAE names no hook point: pass one explicitly".into())
            })?
            .parse()?,
    };
    hook.validate(model.n_layers())?;
    if model.d_model() != sae.d_in() {
        return Err(Error::WidthMismatch {
            what: format!("evaluation at {hook}"),
            d_in: sae.d_in(),
            width: model.d_model(),
        });
    }
    if contexts.is_empty() {
        return Err(Error::empty("the list of evaluation contexts"));
    }
    let t = contexts.first().map_or(0, |c| c.len());
    if t < cfg.prefix_len + 2 || contexts.iter().any(|c| c.len() != t) {
        return Err(Error::Invalid(format!(
            "evaluation needs at least one context, all of one length ≥ {} tokens",
            cfg.prefix_len + 2
        )));
    }
    if cfg.batch_size == 0 {
        return Err(Error::Invalid("eval batch size must be ≥ 1".into()));
    }
    let positions = Positions::Range(cfg.prefix_len..usize::MAX);
    let dev = model.device().clone();
    let d = sae.d_in();
    let mut acc = MetricsAccumulator::new(d, sae.d_sae());
    let (mut clean, mut spliced, mut zero, mut n_ce) = (0f64, 0f64, 0f64, 0u64);
    let splice_edits = Edits::new(SpliceMode::Reconstruction);
    let mut pb = cfg.progress.step("eval", "contexts", contexts.len() as u64);
    for batch in contexts.chunks(cfg.batch_size) {
        pb.inc(batch.len() as u64);
        let flat: Vec<u32> = batch.iter().flatten().copied().collect();
        let tokens = Tensor::from_vec(flat, (batch.len(), t), &dev)?;
        // Clean, capturing x.
        let cache = ActivationCache::new();
        let mut hooks = Hooks::new().with(hook, cache.clone());
        let logits = model.forward(&tokens, 0, &mut hooks)?;
        let (c, n) = ce_sum(&logits, &tokens)?;
        clean += c;
        n_ce += n;
        let x = cache
            .get(&hook)?
            .ok_or_else(|| Error::Invalid(format!("hook point {hook} was not reached")))?;
        let x = x
            .narrow(1, cfg.prefix_len, t - cfg.prefix_len)?
            .reshape(((), d))?
            .to_dtype(DType::F32)?;
        let f = sae.encode(&x)?;
        let x_hat = sae.forward(&x)?;
        acc.update(&x, &x_hat, &f)?;
        // Spliced.
        let mut hooks =
            Hooks::new().with(hook, SaeSplice::new(sae, &splice_edits, positions.clone())?);
        spliced += ce_sum(&model.forward(&tokens, 0, &mut hooks)?, &tokens)?.0;
        // Zero-ablated.
        let p = positions.clone();
        let mut hooks = Hooks::new().with(
            hook,
            move |_: &HookPoint, a: &Tensor, ctx: &HookContext| -> Result<Option<Tensor>> {
                let r = p.select(ctx.start_pos, ctx.seq_len, ctx.prompt_len);
                if r.is_empty() {
                    return Ok(None);
                }
                let (b, tt, dd) = a.dims3()?;
                let mut parts = Vec::new();
                if r.start > 0 {
                    parts.push(a.narrow(1, 0, r.start)?);
                }
                parts.push(Tensor::zeros((b, r.len(), dd), a.dtype(), a.device())?);
                if r.end < tt {
                    parts.push(a.narrow(1, r.end, tt - r.end)?);
                }
                Ok(Some(Tensor::cat(&parts, 1)?))
            },
        );
        zero += ce_sum(&model.forward(&tokens, 0, &mut hooks)?, &tokens)?.0;
    }
    let nf = n_ce as f64;
    let (ce_clean, ce_spliced, ce_zero) = (clean / nf, spliced / nf, zero / nf);
    let report = EvalReport {
        hook: hook.to_string(),
        mse: acc.mse()?,
        fvu: acc.fvu()?,
        l0: acc.mean_l0()?,
        dead_fraction: acc.dead_fraction()?,
        ce_clean,
        ce_spliced,
        ce_zero_ablated: ce_zero,
        ce_loss_recovered: (ce_zero - ce_spliced) / (ce_zero - ce_clean),
        tokens: acc.tokens(),
        ce_positions: n_ce,
    };
    pb.finish();
    Ok((report, acc))
}

#[cfg(feature = "plot")]
fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("latent density plot: {e}"))
}

/// Draw the latent density histogram (log10 of each latent's firing frequency over
/// `tokens` tokens; dead latents are counted in the caption) into the PNG `path`
/// (written to a temporary file beside it and renamed).
#[cfg(feature = "plot")]
pub fn plot_latent_density(fire_counts: &[f64], tokens: u64, path: &Path) -> Result<()> {
    write_png(path, |tmp| draw_density(fire_counts, tokens, tmp))
}

#[cfg(feature = "plot")]
fn draw_density(counts: &[f64], tokens: u64, path: &Path) -> Result<()> {
    let n = (tokens as f64).max(1.0);
    let logs: Vec<f64> = counts
        .iter()
        .filter(|&&c| c > 0.0)
        .map(|&c| (c / n).log10())
        .collect();
    let dead = counts.len() - logs.len();
    let lo = logs.iter().copied().fold(0f64, f64::min).min(-1.0).floor();
    const BINS: usize = 60;
    let w = -lo / BINS as f64;
    let mut hist = [0u32; BINS];
    for &v in &logs {
        let i = (((v - lo) / w) as usize).min(BINS - 1);
        if let Some(h) = hist.get_mut(i) {
            *h += 1;
        }
    }
    let top = hist.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.05;
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let caption = format!(
        "latent density ({} latents, {dead} dead, {tokens} tokens)",
        counts.len()
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(lo..0f64, 0f64..top)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("log10(firing frequency)")
        .y_desc("latents")
        .label_style((FONT, 13))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(hist.iter().enumerate().map(|(i, &h)| {
            let x0 = lo + i as f64 * w;
            Rectangle::new([(x0, 0.0), (x0 + w, h as f64)], BLUE.mix(0.6).filled())
        }))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}
