//! The experiment's outputs, all written atomically into the results folder:
//!
//! - `results.json`: [`EsrResults`] (SAE evaluation, OTD latents, conditions with 95%
//!   bootstrap intervals, every setting and the seed, timings);
//! - `report.md`: the same as tables, with the command, the paper's numbers beside ours
//!   (clearly labelled), and example answers;
//! - `trials.jsonl`: one [`Trial`] per line (every generated answer and its scores);
//! - `conditions.png`: multi-attempt and ESR rates, and mean first-attempt score, per
//!   condition with 95% intervals;
//! - `otd_activation.png`: how often each OTD latent fires on on-topic vs off-topic answers;
//! - `sae_training_curve.png`: the SAE's training curves (when it was trained here);
//! - `sae/`: the SAE in SAELens format (`cfg.json` + `sae_weights.safetensors`).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use plotters::prelude::*;

use super::stats::Trial;
use super::{EsrResults, LatentStats};
use crate::io::atomic::{write_bytes, write_json};
use crate::io::write_atomic;
use crate::plot::{write_png, FONT};
use crate::{Error, Result, Sae};

/// Write every output (see the module docs); finishes `results.timings` first.
/// `clock` is `(start of the report stage, start of the run)`.
pub(super) fn write_outputs(
    results: &mut EsrResults,
    trials: &[Trial],
    sae: &Sae,
    sae_dir: &Path,
    out: &Path,
    clock: (Instant, Instant),
) -> Result<()> {
    let trials_path = out.join("trials.jsonl");
    write_atomic(&trials_path, |w| {
        for t in trials {
            serde_json::to_writer(&mut *w, t)
                .map_err(|e| Error::format("json", e.to_string()).in_file(&trials_path))?;
            std::io::Write::write_all(w, b"\n").map_err(|e| Error::io(&trials_path, e))?;
        }
        Ok(())
    })?;
    sae.save_saelens(out.join("sae"))?;
    let curve = sae_dir.join("train_curve.png");
    let has_curve = curve.is_file();
    if has_curve {
        let dst = out.join("sae_training_curve.png");
        let bytes = std::fs::read(&curve).map_err(|e| Error::io(&curve, e))?;
        write_bytes(&dst, &bytes)?;
    }
    plot_conditions(results, &out.join("conditions.png"))?;
    plot_otd(results, &out.join("otd_activation.png"))?;

    let t = &mut results.timings;
    t.stages
        .insert("report".into(), clock.0.elapsed().as_secs_f64());
    t.total_s = clock.1.elapsed().as_secs_f64();
    t.generation_tokens_per_s = t.generated_tokens as f64 / t.generation_s.max(1e-9);
    t.judge_tokens_per_s = t.judged_tokens as f64 / t.judge_s.max(1e-9);
    write_json(&out.join("results.json"), results)?;
    let md = report_md(results, trials, has_curve);
    let md_path = out.join("report.md");
    write_bytes(&md_path, md.as_bytes())
}

fn pct(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

fn pct_ci(v: f64, ci: [f64; 2]) -> String {
    format!("{} [{}, {}]", pct(v), pct(ci[0]), pct(ci[1]))
}

/// The Markdown report.
fn report_md(r: &EsrResults, trials: &[Trial], has_curve: bool) -> String {
    let c = &r.config;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# ESR ablation: preset `{}`{}\n",
        c.preset,
        if c.quick { " (quick)" } else { "" }
    );
    let _ = writeln!(
        s,
        "Command: `{}`  \nSeed: {}  \nModel: `{}`  \nSAE: {}\n",
        r.command,
        c.seed,
        c.model.display(),
        r.sae_source
    );
    let _ = writeln!(s, "## Measured here\n");
    let _ = writeln!(
        s,
        "Steering adds `v · W_dec[latent]` at `{}` at every prompt and answer position; \
         ablation zeroes a latent set at `{}` with the SAE's error added back. \
         {} prompts × {} steering latent(s), temperature {}, repetition penalty {}, ≤ {} new tokens.\n",
        c.steer_hook, c.sae_hook, c.n_prompts, r.steering.len(), c.temperature, c.repetition_penalty, c.max_new_tokens
    );
    let _ = writeln!(s, "| condition | n | multi-attempt rate [95% CI] | ESR rate [95% CI] | mean first score [95% CI] | mean attempts |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for k in &r.conditions {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} [{:.1}, {:.1}] | {:.2} |",
            k.name,
            k.n,
            pct_ci(k.multi_attempt_rate, k.ci95.multi_attempt_rate),
            pct_ci(k.esr_rate, k.ci95.esr_rate),
            k.mean_first_score,
            k.ci95.mean_first_score[0],
            k.ci95.mean_first_score[1],
            k.mean_attempts
        );
    }
    let _ = writeln!(
        s,
        "\n## The paper's numbers (not measured here)\n\n\
         McKenzie et al. (arXiv 2602.06941), Llama-3.3-70B-Instruct with the Goodfire layer-50 SAE: \
         multi-attempt rate 7.4% steered → 5.5% with the 26 OTD latents zero-ablated; 7.9% with \
         random latent sets of the same size. Smaller models showed ≤ 1.1% multi-attempt responses, \
         so little or no ESR is expected from a 135M-parameter model.\n"
    );
    let e = &r.sae_eval;
    let _ = writeln!(s, "## SAE (held-out text)\n");
    let _ = writeln!(s, "| hook | FVU | L0 | dead | CE clean | CE spliced | CE zero-ablated | CE loss recovered | tokens |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        s,
        "| `{}` | {:.3} | {:.1} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
        e.hook,
        e.fvu,
        e.l0,
        pct(e.dead_fraction),
        e.ce_clean,
        e.ce_spliced,
        e.ce_zero_ablated,
        e.ce_loss_recovered,
        e.tokens
    );
    if has_curve {
        let _ = writeln!(s, "![SAE training curve](sae_training_curve.png)\n");
    }
    let j = &r.judge;
    let _ = writeln!(
        s,
        "## Judge\n\nRelevance score = 100 · clamp(Δ / Δ_ref, 0, 1), Δ = mean log p(attempt | prompt) − \
         mean log p(attempt | another prompt) under the unsteered model, Δ_ref = {:.3} nats (median of the \
         unsteered answers). Check: the unsteered answers score {:.1} under their own prompts and {:.1} \
         when judged against the wrong prompt.\n",
        j.delta_ref, j.on_topic_mean_score, j.off_topic_mean_score
    );
    let _ = writeln!(s, "## Off-topic detector latents\n");
    let rule = match r.otd_rule.as_str() {
        "paper" => format!(
            "the paper's rule (zero on every on-topic answer, firing on ≥ {:.0}% of off-topic answers)",
            100.0 * c.otd_min_off_fraction
        ),
        "relaxed" => "the relaxed rule (no latent met the paper's rule; on-topic firing ≤ 10% and off-topic firing ≥ 20 points higher)".to_string(),
        "contrast" => "the contrast rule (no latent met the paper's rule or the relaxed one, on-topic firing ≤ 10% and off-topic ≥ 20 points higher; these fire on ≥ 20 points more off-topic than on-topic answers)".to_string(),
        _ => "a fixed, published set".to_string(),
    };
    let _ = writeln!(
        s,
        "{} latents, by {rule}: {:?}\n",
        r.otd_latents.len(),
        r.otd_latents
    );
    if r.otd_latents.is_empty() {
        let _ = writeln!(s, "No latent qualified, so `otd_ablated` and the random conditions ablate nothing and equal `baseline`. The best candidates:\n");
    }
    let _ = writeln!(s, "| latent | on-topic firing | off-topic firing | on-topic mean act | off-topic mean act |\n|---|---|---|---|---|");
    for l in &r.otd_stats {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {:.3} |",
            l.latent,
            pct(l.on_fraction),
            pct(l.off_fraction),
            l.on_mean,
            l.off_mean
        );
    }
    let _ = writeln!(s, "\nRandom control sets: {:?}\n", r.random_sets);
    let _ = writeln!(s, "## Steering latents\n\n| latent | strength | calibration probes (strength → mean first score) |\n|---|---|---|");
    for st in &r.steering {
        let probes: Vec<String> = st
            .probes
            .iter()
            .map(|(v, sc)| format!("{v:.1} → {sc:.0}"))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {:.2} | {} |",
            st.latent,
            st.strength,
            probes.join(", ")
        );
    }
    let t = &r.timings;
    let _ = writeln!(s, "\n## Timings\n\n| stage | seconds |\n|---|---|");
    for (k, v) in &t.stages {
        let _ = writeln!(s, "| {k} | {v:.1} |");
    }
    let _ = writeln!(
        s,
        "| **total** | **{:.1}** |\n\nGeneration: {} tokens at {:.1} tok/s (batches of {}, hooks live). \
         Judge: {} attempt tokens scored at {:.1} tok/s. SAE from cache: {}; answers from cache: {}.\n",
        t.total_s, t.generated_tokens, t.generation_tokens_per_s, c.batch_size, t.judged_tokens, t.judge_tokens_per_s, t.sae_cached, t.answers_cached
    );
    let _ = writeln!(
        s,
        "## Plots\n\n![conditions](conditions.png)\n\n![OTD activation](otd_activation.png)\n"
    );
    let _ = writeln!(s, "## Example answers\n");
    let multi: Vec<&Trial> = trials
        .iter()
        .filter(|t| t.multi_attempt())
        .take(3)
        .collect();
    let shown: Vec<&Trial> = if multi.is_empty() {
        trials.iter().take(2).collect()
    } else {
        multi
    };
    if shown.is_empty() {
        let _ = writeln!(s, "(no trials)");
    }
    for t in shown {
        let _ = writeln!(
            s,
            "**{}**, latent {} at {:.1}, prompt “{}”, scores {:?}:\n\n> {}\n",
            t.condition,
            t.latent,
            t.strength,
            super::prompts::PROMPTS
                .get(t.prompt)
                .copied()
                .unwrap_or("?"),
            t.scores.iter().map(|x| x.round()).collect::<Vec<_>>(),
            t.text.replace('\n', "\n> ")
        );
    }
    s
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("ESR plot: {e}"))
}

/// Label for integer `x` positions, blank elsewhere.
fn label(names: &[String], x: f64) -> String {
    if (x - x.round()).abs() > 1e-6 || x < -0.5 {
        return String::new();
    }
    names.get(x.round() as usize).cloned().unwrap_or_default()
}

/// Bars with 95% error bars: `series[k] = (legend, color, values, intervals)`.
type Series<'a> = (&'a str, RGBColor, Vec<f64>, Vec<[f64; 2]>);

fn bars(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    names: &[String],
    series: &[Series<'_>],
    y_max: f64,
) -> Result<()> {
    let n = names.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 18))
        .margin(10)
        .x_label_area_size(50)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&|x| label(names, *x))
        .label_style((FONT, 13))
        .draw()
        .map_err(plot_err)?;
    let k = series.len().max(1) as f64;
    let w = 0.8 / k;
    for (j, (legend, color, vals, cis)) in series.iter().enumerate() {
        let off = -0.4 + w * (j as f64 + 0.5);
        let color = *color;
        chart
            .draw_series(vals.iter().enumerate().map(|(i, &v)| {
                let x = i as f64 + off;
                Rectangle::new([(x - 0.45 * w, 0.0), (x + 0.45 * w, v)], color.filled())
            }))
            .map_err(plot_err)?
            .label(*legend)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        chart
            .draw_series(
                cis.iter()
                    .enumerate()
                    .filter(|(_, ci)| ci[0] < ci[1])
                    .map(|(i, ci)| {
                        let x = i as f64 + off;
                        PathElement::new(
                            vec![
                                (x - 0.15 * w, ci[0]),
                                (x + 0.15 * w, ci[0]),
                                (x, ci[0]),
                                (x, ci[1]),
                                (x - 0.15 * w, ci[1]),
                                (x + 0.15 * w, ci[1]),
                            ],
                            BLACK.stroke_width(1),
                        )
                    }),
            )
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

fn plot_conditions(r: &EsrResults, path: &Path) -> Result<()> {
    let names: Vec<String> = r.conditions.iter().map(|c| c.name.clone()).collect();
    let rates: Vec<Series<'_>> = vec![
        (
            "multi-attempt rate (%)",
            RGBColor(70, 110, 190),
            r.conditions
                .iter()
                .map(|c| 100.0 * c.multi_attempt_rate)
                .collect(),
            r.conditions
                .iter()
                .map(|c| c.ci95.multi_attempt_rate.map(|v| 100.0 * v))
                .collect(),
        ),
        (
            "ESR rate (%)",
            RGBColor(220, 130, 50),
            r.conditions.iter().map(|c| 100.0 * c.esr_rate).collect(),
            r.conditions
                .iter()
                .map(|c| c.ci95.esr_rate.map(|v| 100.0 * v))
                .collect(),
        ),
    ];
    let top = rates
        .iter()
        .flat_map(|s| s.3.iter().map(|ci| ci[1]))
        .fold(1.0f64, f64::max);
    let score: Vec<Series<'_>> = vec![(
        "mean first-attempt score",
        RGBColor(90, 160, 90),
        r.conditions.iter().map(|c| c.mean_first_score).collect(),
        r.conditions
            .iter()
            .map(|c| c.ci95.mean_first_score)
            .collect(),
    )];
    write_png(path, |tmp| {
        let root = BitMapBackend::new(tmp, (1100, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (a, b) = root.split_horizontally(600);
        bars(
            &a,
            "Restart rates by condition (95% bootstrap CI)",
            &names,
            &rates,
            (top * 1.25).max(5.0),
        )?;
        bars(&b, "First-attempt relevance (0-100)", &names, &score, 100.0)?;
        root.present().map_err(plot_err)
    })
}

fn plot_otd(r: &EsrResults, path: &Path) -> Result<()> {
    let stats: &[LatentStats] = &r.otd_stats;
    let names: Vec<String> = stats.iter().map(|s| s.latent.to_string()).collect();
    let series: Vec<Series<'_>> = vec![
        (
            "on-topic answers",
            RGBColor(70, 110, 190),
            stats.iter().map(|s| 100.0 * s.on_fraction).collect(),
            stats.iter().map(|s| [100.0 * s.on_fraction; 2]).collect(),
        ),
        (
            "off-topic answers",
            RGBColor(200, 70, 70),
            stats.iter().map(|s| 100.0 * s.off_fraction).collect(),
            stats.iter().map(|s| [100.0 * s.off_fraction; 2]).collect(),
        ),
    ];
    let title = if r.otd_latents.is_empty() {
        "No OTD latent qualified: best candidates, % of answers firing".to_string()
    } else {
        format!(
            "OTD latents ({} rule): % of answers where the latent fires",
            r.otd_rule
        )
    };
    write_png(path, |tmp| {
        let root = BitMapBackend::new(tmp, (1100, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        bars(&root, &title, &names, &series, 110.0)?;
        root.present().map_err(plot_err)
    })
}
