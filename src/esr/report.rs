//! The experiment's outputs, all written atomically into the results folder:
//!
//! - `results.json`: [`EsrResults`] (its contract is in the [module docs](super));
//! - `report.md`: what was measured and how it compares with the paper, as tables with
//!   their intervals, the paired comparisons, the sweeps, the judges' check, the command,
//!   and example answers;
//! - `trials.jsonl`: one [`Trial`] per line (every generated answer and its scores,
//!   the unsteered answers included);
//! - `conditions.png`: multi-attempt and ESR rates (Wilson 95% intervals) and the mean
//!   first-attempt score (cluster-bootstrap 95% intervals) of the unsteered answers and
//!   the main conditions;
//! - `boost_sweep.png`: first-attempt score per latent and multi-attempt rate over the
//!   steering strengths of the boost sweep;
//! - `meta_prompt.png`: the meta-prompt conditions next to `baseline` on the same trials;
//! - `otd_activation.png`: how often each OTD latent fires on on-topic vs off-topic answers;
//! - `sae_training_curve.png`: the SAE's training curves (when it was trained here);
//! - `sae/`: the SAE in SAELens format (`cfg.json` + `sae_weights.safetensors`).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use plotters::prelude::*;

use super::stats::{ConditionSummary, Paired, Trial};
use super::{BoostPoint, EsrResults, LatentStats, SubsetResults};
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
    if !results.boost_sweep.is_empty() {
        plot_boost(results, &out.join("boost_sweep.png"))?;
    }
    if let Some(m) = &results.meta_prompt {
        plot_subset(m, "Meta-prompt", &out.join("meta_prompt.png"))?;
    }

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

/// A percentage with two decimals where it matters (interval bounds near 0).
fn pct2(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}

fn pct_ci(v: f64, ci: [f64; 2]) -> String {
    format!("{} [{}, {}]", pct(v), pct2(ci[0]), pct2(ci[1]))
}

fn score_ci(v: f64, ci: [f64; 2]) -> String {
    format!("{v:.1} [{:.1}, {:.1}]", ci[0], ci[1])
}

fn signed_ci(v: f64, ci: [f64; 2]) -> String {
    format!("{v:+.1} [{:+.1}, {:+.1}]", ci[0], ci[1])
}

/// A p-value as text.
fn pval(p: f64) -> String {
    if p >= 0.001 {
        format!("{p:.3}")
    } else {
        format!("{p:.1e}")
    }
}

/// The table of condition summaries.
fn summary_table(s: &mut String, rows: &[&ConditionSummary]) {
    let _ = writeln!(
        s,
        "| condition | n (clusters) | multi-attempt [Wilson 95%] | exact 95% (Clopper–Pearson) | ESR rate [Wilson 95%] | mean first score [95% CI] | mean attempts |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for k in rows {
        let _ = writeln!(
            s,
            "| {} | {} ({}) | {} of {}: {} | [{}, {}] | {} | {} | {:.2} |",
            k.name,
            k.n,
            k.clusters,
            k.multi_attempts,
            k.n,
            pct_ci(k.multi_attempt_rate, k.ci95.multi_attempt_rate),
            pct2(k.exact95.multi_attempt_rate[0]),
            pct2(k.exact95.multi_attempt_rate[1]),
            pct_ci(k.esr_rate, k.ci95.esr_rate),
            score_ci(k.mean_first_score, k.ci95.mean_first_score),
            k.mean_attempts
        );
    }
    let _ = writeln!(s);
}

/// The table of paired comparisons.
fn paired_table(s: &mut String, rows: &[Paired]) {
    let _ = writeln!(
        s,
        "| condition vs reference | pairs | multi-attempt: both / only condition / only reference | McNemar exact p | Δ first score [95% CI] | expected |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for p in rows {
        let _ = writeln!(
            s,
            "| {} vs {} | {} | {} / {} / {} | {} | {} | {} |",
            p.condition,
            p.reference,
            p.pairs,
            p.multi_both,
            p.multi_only_condition,
            p.multi_only_reference,
            pval(p.multi_mcnemar_p),
            signed_ci(p.first_score_diff, p.first_score_diff_ci95),
            p.expected
        );
    }
    let _ = writeln!(s);
}

/// What a 0-event (or few-event) result says, in words.
fn null_sentence(k: &ConditionSummary) -> String {
    let w = k.ci95.multi_attempt_rate[1];
    let cp = k.exact95.multi_attempt_rate[1];
    if k.multi_attempts == 0 {
        format!(
            "No multi-attempt answer in {} `{}` trials: at 95% confidence the rate is below {} \
             (Wilson; exact Clopper–Pearson: below {}).",
            k.n,
            k.name,
            pct2(w),
            pct2(cp)
        )
    } else {
        format!(
            "{} multi-attempt answers in {} `{}` trials: {} (Wilson 95%), exact [{}, {}].",
            k.multi_attempts,
            k.n,
            k.name,
            pct_ci(k.multi_attempt_rate, k.ci95.multi_attempt_rate),
            pct2(k.exact95.multi_attempt_rate[0]),
            pct2(cp)
        )
    }
}

/// How many trials of `condition` have the same text as their partner (the same
/// [`Trial::pair_key`]) in `reference`, and how many have a partner.
fn same_answers(trials: &[Trial], condition: &str, reference: &str) -> (usize, usize) {
    let refs: std::collections::HashMap<_, &str> = trials
        .iter()
        .filter(|t| t.condition == reference)
        .map(|t| (t.pair_key(), t.text.as_str()))
        .collect();
    let mut same = 0;
    let mut pairs = 0;
    for t in trials.iter().filter(|t| t.condition == condition) {
        if let Some(&text) = refs.get(&t.pair_key()) {
            pairs += 1;
            same += usize::from(text == t.text);
        }
    }
    (same, pairs)
}

fn find<'a>(v: &'a [ConditionSummary], name: &str) -> Option<&'a ConditionSummary> {
    v.iter().find(|c| c.name == name)
}

fn find_pair<'a>(v: &'a [Paired], name: &str) -> Option<&'a Paired> {
    v.iter().find(|p| p.condition == name)
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

    // What was measured.
    let base = find(&r.conditions, "baseline");
    let steered: usize = r.conditions.iter().map(|k| k.n).sum();
    let restarts: usize = r.conditions.iter().map(|k| k.multi_attempts).sum();
    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(
        s,
        "The model answered {} how-to prompts while an SAE latent was added to its residual \
         stream (steering, calibrated per latent to pull the first attempt's relevance down \
         to {:.0}/100), under four conditions with the same prompts, latents and sampler seeds \
         ({} steering latents × {} prompts × {} samples = {} trials each): `baseline` \
         (steered), `otd_ablated` (off-topic-detector latents zero-ablated), `steer_ablated` \
         (the steering latent itself zero-ablated: a positive control that must undo the \
         steering) and `random` (random latent sets of the OTD set's size ablated). The \
         judge splits each answer into attempts at restart phrases; a multi-attempt answer \
         restarts at least once, an ESR answer restarts and ends more on topic than it began.\n",
        c.n_prompts,
        c.target_score,
        r.steering.len(),
        c.n_prompts,
        c.samples,
        base.map_or(0, |b| b.n)
    );
    let _ = writeln!(
        s,
        "**{restarts} of {steered} steered answers** in the main conditions and **{} of {} \
         unsteered answers** restart. {} {}\n",
        r.unsteered.multi_attempts,
        r.unsteered.n,
        base.map(null_sentence).unwrap_or_default(),
        null_sentence(&r.unsteered)
    );
    if let Some(b) = base {
        let hi = b.ci95.multi_attempt_rate[1];
        let _ = writeln!(
            s,
            "Against the paper (McKenzie et al., arXiv 2602.06941; not measured here): \
             Llama-3.3-70B restarts in 7.4% of steered answers, {} here; smaller models in \
             the paper restart in ≤ 1.1%, {} here. An OTD-ablation effect of the paper's \
             size (7.4% → 5.5%) needs restarts to remove: {}\n",
            if hi < 0.074 {
                "a rate this interval excludes"
            } else {
                "a rate this interval does not exclude"
            },
            if hi < 0.011 {
                "a rate this interval excludes too"
            } else {
                "which this interval does not exclude"
            },
            if b.multi_attempts == 0 {
                "with none in `baseline`, the ablation has nothing to act on, so the null \
                 comparison of `otd_ablated` with `baseline` is uninformative about the OTD \
                 latents, not evidence against them."
            } else {
                "see the paired comparison below."
            }
        );
    }

    let _ = writeln!(s, "## Method\n");
    let _ = writeln!(
        s,
        "Steering adds `v · W_dec[latent]` at `{}` at every prompt and answer position. \
         Ablations zero a latent set at `{}` with the SAE's error added back \
         (error-preserving), only at the positions the SAE was trained on: from each \
         sequence's position {} on (left-padded batches are handled per sequence), so the \
         attention sink at position 0 is never edited. Temperature {}, repetition penalty \
         {}, ≤ {} new tokens; every condition of a prompt × latent × sample uses the same \
         sampler seed.\n",
        c.steer_hook, c.sae_hook, c.sae_skip, c.temperature, c.repetition_penalty, c.max_new_tokens
    );
    let _ = writeln!(
        s,
        "Statistics: rates get Wilson score 95% intervals, with exact Clopper–Pearson \
         intervals beside them (both stay informative at 0 events). Mean first-attempt \
         scores get a 95% percentile bootstrap ({} resamples) that resamples **clusters** \
         (prompt × steering latent, with all their samples), not single trials. Each \
         condition is compared with `baseline` as a paired design: McNemar's exact test on \
         the pairs where exactly one answer is multi-attempt, and the mean paired \
         difference of first-attempt scores with a cluster-bootstrap interval.\n",
        c.bootstrap
    );

    let _ = writeln!(s, "## Conditions\n");
    let mut rows: Vec<&ConditionSummary> = vec![&r.unsteered];
    rows.extend(r.conditions.iter());
    summary_table(&mut s, &rows);
    let _ = writeln!(
        s,
        "`unsteered`: the model's own answers ({} samples per prompt, no steering, no \
         ablation; the paper found 0% multi-attempt answers in 7,892 unsteered trials). \
         `random` pools {} random sets: the trial of prompt `p` and steering latent number \
         `l` ablates set `(p + l) mod {}`.\n",
        c.chat_samples,
        r.random_sets.len(),
        r.random_sets.len().max(1)
    );
    let _ = writeln!(s, "### Paired comparisons with `baseline`\n");
    paired_table(&mut s, &r.paired);
    if let (Some(pos), Some(rnd)) = (
        find_pair(&r.paired, "steer_ablated"),
        find_pair(&r.paired, "random"),
    ) {
        let _ = writeln!(
            s,
            "**Positive control.** Zero-ablating the steering latent after the steering moves \
             the first-attempt score by {} points against {} for the random sets: {}\n",
            signed_ci(pos.first_score_diff, pos.first_score_diff_ci95),
            signed_ci(rnd.first_score_diff, rnd.first_score_diff_ci95),
            if pos.first_score_diff_ci95[0] > rnd.first_score_diff_ci95[1] {
                "the intervals do not overlap, so the splice acts inside generation and an \
                 ablation of this kind can move the outcome."
            } else {
                "the intervals overlap, so this run cannot show that the splice acts inside \
                 generation."
            }
        );
    }

    boost_md(&mut s, r);
    if let Some(m) = &r.meta_prompt {
        let _ = writeln!(s, "## Self-monitoring meta-prompt\n");
        let _ = writeln!(
            s,
            "Each prompt followed by “{}” (the paper's best variant, appended to the prompt as \
             the paper does), steered, with and without the OTD ablation; the first {} prompts, \
             sample 0, every steering latent. `baseline` is restricted to the same trials.\n",
            c.meta_prompt_text, m.prompts
        );
        summary_table(&mut s, &m.conditions.iter().collect::<Vec<_>>());
        paired_table(&mut s, &m.paired);
        let _ = writeln!(
            s,
            "The paper: 7.4% → 31.7% multi-attempt (4.3×) for Llama-3.3-70B with this \
             meta-prompt, with smaller gains in smaller models.\n\n![meta-prompt](meta_prompt.png)\n"
        );
    }
    if let Some(m) = &r.sites {
        let _ = writeln!(s, "## Splice sites: leaving out the attention sink\n");
        let _ = writeln!(
            s,
            "The SAE was trained without each context's first position (the attention sink of \
             a model without a BOS, whose residual norm is an outlier). The conditions above \
             ablate from position {} on; the `_all_positions` variants splice every position, \
             the sink included, on the first {} prompts (sample 0): a side measurement of what \
             the restriction changes.\n",
            c.sae_skip, m.prompts
        );
        summary_table(&mut s, &m.conditions.iter().collect::<Vec<_>>());
        paired_table(&mut s, &m.paired);
        for p in &m.paired {
            let (same, pairs) = same_answers(trials, &p.condition, &p.reference);
            let _ = writeln!(
                s,
                "`{}` and `{}`: {same} of {pairs} paired answers are identical, token for token.",
                p.condition, p.reference
            );
        }
        let _ = writeln!(
            s,
            "\nAn error-preserving zero-ablation changes a position only where an ablated \
             latent is active, so identical answers mean that at the sink the ablated latents \
             were inactive or their removal there changed no sampled token.\n"
        );
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
    if let Some(a) = &r.judge_agreement {
        let tmpl = match &a.template {
            super::judge::JudgeTemplate::Chat => "its chat template".to_string(),
            super::judge::JudgeTemplate::Plain(t) => {
                format!("the plain template `{}`", t.replace('\n', "\\n"))
            }
        };
        let _ = writeln!(
            s,
            "**Second judge.** `{}` scored {} randomly drawn attempts (unsteered and main \
             conditions) with the same relative log-prob rule and {tmpl}. Spearman rank \
             correlation with the first judge: **ρ = {:.3}** on Δ ({:.3} against the first \
             judge's clamped 0–100 score), {:.0} s.\n",
            a.model, a.attempts, a.spearman_delta, a.spearman_score, a.seconds
        );
    }

    paper_md(&mut s, r);
    sae_md(&mut s, r, has_curve);
    timings_md(&mut s, r);
    examples_md(&mut s, trials);
    s
}

/// The boost sweep's section.
fn boost_md(s: &mut String, r: &EsrResults) {
    let pooled: Vec<&BoostPoint> = r
        .boost_sweep
        .iter()
        .filter(|p| p.latent.is_none())
        .collect();
    if pooled.is_empty() {
        return;
    }
    let _ = writeln!(s, "## Boost sweep\n");
    let _ = writeln!(
        s,
        "Each steering latent at multiples of its calibrated strength (×1 is `baseline`), the \
         first {} prompts, sample 0 (the paper swept 10 levels from −3σ to +3σ around each \
         latent's threshold).\n",
        r.config.boost_prompts
    );
    let _ = writeln!(s, "| × strength | mean strength | n | multi-attempt [Wilson 95%] | ESR rate | mean first score [95% CI] |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for p in &pooled {
        let k = &p.summary;
        let _ = writeln!(
            s,
            "| {:.2} | {:.1} | {} | {} of {}: {} | {} | {} |",
            p.factor,
            p.mean_strength,
            k.n,
            k.multi_attempts,
            k.n,
            pct_ci(k.multi_attempt_rate, k.ci95.multi_attempt_rate),
            pct(k.esr_rate),
            score_ci(k.mean_first_score, k.ci95.mean_first_score)
        );
    }
    let _ = write!(s, "\nMean first-attempt score per latent:\n\n| latent |");
    for p in &pooled {
        let _ = write!(s, " ×{:.2} |", p.factor);
    }
    let _ = write!(s, "\n|---|");
    for _ in &pooled {
        let _ = write!(s, "---|");
    }
    let _ = writeln!(s);
    for st in &r.steering {
        let _ = write!(s, "| {} |", st.latent);
        for p in &pooled {
            let v = r
                .boost_sweep
                .iter()
                .find(|q| q.latent == Some(st.latent) && q.factor == p.factor)
                .map(|q| format!(" {:.0} |", q.summary.mean_first_score))
                .unwrap_or_else(|| " – |".into());
            let _ = write!(s, "{v}");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "\n![boost sweep](boost_sweep.png)\n");
}

/// The side-by-side comparison with the paper.
fn paper_md(s: &mut String, r: &EsrResults) {
    let cond = |name: &str| find(&r.conditions, name);
    let rate = |k: Option<&ConditionSummary>| {
        k.map_or("–".to_string(), |k| {
            format!(
                "{} of {} = {}",
                k.multi_attempts,
                k.n,
                pct_ci(k.multi_attempt_rate, k.ci95.multi_attempt_rate)
            )
        })
    };
    let esr = |k: Option<&ConditionSummary>| {
        k.map_or("–".to_string(), |k| pct_ci(k.esr_rate, k.ci95.esr_rate))
    };
    let first = |k: Option<&ConditionSummary>| {
        k.map_or("–".to_string(), |k| {
            score_ci(k.mean_first_score, k.ci95.mean_first_score)
        })
    };
    let meta = r
        .meta_prompt
        .as_ref()
        .and_then(|m| find(&m.conditions, "meta_prompt"));
    let _ = writeln!(s, "## This run next to the paper\n");
    let _ = writeln!(
        s,
        "| quantity | paper: Llama-3.3-70B, Goodfire SAE (not measured here) | here: {} |",
        r.config.model.display()
    );
    let _ = writeln!(s, "|---|---|---|");
    let rows: Vec<(&str, &str, String)> = vec![
        (
            "multi-attempt, unsteered",
            "0% of 7,892",
            rate(Some(&r.unsteered)),
        ),
        ("multi-attempt, steered", "7.4%", rate(cond("baseline"))),
        (
            "multi-attempt, OTD ablated",
            "5.5%",
            rate(cond("otd_ablated")),
        ),
        ("multi-attempt, meta-prompt", "31.7% (4.3×)", rate(meta)),
        (
            "multi-attempt, smaller models (steered)",
            "≤ 1.1%",
            "–".into(),
        ),
        ("ESR rate, steered", "3.8%", esr(cond("baseline"))),
        ("ESR rate, OTD ablated", "2.8%", esr(cond("otd_ablated"))),
        ("ESR rate, random ablated", "4.2%", esr(cond("random"))),
        ("mean first score, steered", "26.3", first(cond("baseline"))),
        (
            "mean first score, OTD ablated",
            "27.4",
            first(cond("otd_ablated")),
        ),
        (
            "OTD latents",
            "26 (Goodfire SAE, layer 50)",
            format!("{} ({} rule)", r.otd_latents.len(), r.otd_rule),
        ),
        (
            "steered trials per condition",
            "≈ 4,877",
            cond("baseline").map_or("–".into(), |k| k.n.to_string()),
        ),
    ];
    for (q, p, h) in rows {
        let _ = writeln!(s, "| {q} | {p} | {h} |");
    }
    let _ = writeln!(s);
}

/// The SAE, the OTD latents and the steering latents.
fn sae_md(s: &mut String, r: &EsrResults, has_curve: bool) {
    let c = &r.config;
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
        let _ = writeln!(s, "No latent qualified, so `otd_ablated` and `random` ablate nothing and equal `baseline`. The best candidates:\n");
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
    let _ = writeln!(s, "\n![OTD activation](otd_activation.png)\n");
    let _ = writeln!(s, "Random control sets: {:?}\n", r.random_sets);
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
    let _ = writeln!(s, "\n![conditions](conditions.png)\n");
}

fn timings_md(s: &mut String, r: &EsrResults) {
    let t = &r.timings;
    let _ = writeln!(s, "## Timings\n\n| stage | seconds |\n|---|---|");
    for (k, v) in &t.stages {
        let _ = writeln!(s, "| {k} | {v:.1} |");
    }
    let _ = writeln!(
        s,
        "| **total** | **{:.1}** |\n\nGeneration: {} tokens at {:.1} tok/s (batches of {}, hooks live). \
         Judge: {} attempt tokens scored at {:.1} tok/s. SAE from cache: {}; answers from cache: {}.\n",
        t.total_s, t.generated_tokens, t.generation_tokens_per_s, r.config.batch_size, t.judged_tokens, t.judge_tokens_per_s, t.sae_cached, t.answers_cached
    );
}

fn examples_md(s: &mut String, trials: &[Trial]) {
    let _ = writeln!(s, "## Example answers\n");
    let steered = |t: &&Trial| t.condition != "unsteered";
    let multi: Vec<&Trial> = trials
        .iter()
        .filter(steered)
        .filter(|t| t.multi_attempt())
        .take(3)
        .collect();
    let shown: Vec<&Trial> = if multi.is_empty() {
        trials.iter().filter(steered).take(2).collect()
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

/// Rates (Wilson 95% error bars) and mean first-attempt scores (cluster-bootstrap 95%
/// error bars) of `rows`, side by side.
fn plot_rates_and_scores(rows: &[&ConditionSummary], title: &str, path: &Path) -> Result<()> {
    let names: Vec<String> = rows.iter().map(|c| c.name.clone()).collect();
    let rates: Vec<Series<'_>> = vec![
        (
            "multi-attempt rate (%)",
            RGBColor(70, 110, 190),
            rows.iter().map(|c| 100.0 * c.multi_attempt_rate).collect(),
            rows.iter()
                .map(|c| c.ci95.multi_attempt_rate.map(|v| 100.0 * v))
                .collect(),
        ),
        (
            "ESR rate (%)",
            RGBColor(220, 130, 50),
            rows.iter().map(|c| 100.0 * c.esr_rate).collect(),
            rows.iter()
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
        rows.iter().map(|c| c.mean_first_score).collect(),
        rows.iter().map(|c| c.ci95.mean_first_score).collect(),
    )];
    write_png(path, |tmp| {
        let root = BitMapBackend::new(tmp, (1300, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (a, b) = root.split_horizontally(700);
        bars(
            &a,
            &format!("{title}: restart rates (Wilson 95% CI)"),
            &names,
            &rates,
            (top * 1.25).max(5.0),
        )?;
        bars(
            &b,
            "First-attempt relevance (0-100, 95% CI)",
            &names,
            &score,
            100.0,
        )?;
        root.present().map_err(plot_err)
    })
}

fn plot_conditions(r: &EsrResults, path: &Path) -> Result<()> {
    let mut rows: Vec<&ConditionSummary> = vec![&r.unsteered];
    rows.extend(r.conditions.iter());
    plot_rates_and_scores(&rows, "Conditions", path)
}

fn plot_subset(m: &SubsetResults, title: &str, path: &Path) -> Result<()> {
    let rows: Vec<&ConditionSummary> = m.conditions.iter().collect();
    plot_rates_and_scores(&rows, title, path)
}

/// Per-latent colours of the boost sweep's lines.
const PALETTE: [RGBColor; 6] = [
    RGBColor(70, 110, 190),
    RGBColor(220, 130, 50),
    RGBColor(90, 160, 90),
    RGBColor(200, 70, 70),
    RGBColor(140, 100, 180),
    RGBColor(120, 120, 120),
];

/// Vertical 95% error bars at `(x, [lo, hi])`.
fn error_bars(cis: &[(f64, [f64; 2])], w: f64) -> Vec<PathElement<(f64, f64)>> {
    cis.iter()
        .map(|&(x, ci)| {
            PathElement::new(
                vec![
                    (x - w, ci[0]),
                    (x + w, ci[0]),
                    (x, ci[0]),
                    (x, ci[1]),
                    (x - w, ci[1]),
                    (x + w, ci[1]),
                ],
                BLACK.stroke_width(1),
            )
        })
        .collect()
}

fn plot_boost(r: &EsrResults, path: &Path) -> Result<()> {
    let pooled: Vec<&BoostPoint> = r
        .boost_sweep
        .iter()
        .filter(|p| p.latent.is_none())
        .collect();
    let x_max = pooled.iter().map(|p| p.factor).fold(1.0f64, f64::max) * 1.08;
    let rate_top = pooled
        .iter()
        .map(|p| 100.0 * p.summary.ci95.multi_attempt_rate[1])
        .fold(1.0f64, f64::max)
        * 1.25;
    write_png(path, |tmp| {
        let root = BitMapBackend::new(tmp, (1200, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (a, b) = root.split_horizontally(600);
        let mut left = ChartBuilder::on(&a)
            .caption("First-attempt score vs steering strength", (FONT, 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..x_max, 0f64..100f64)
            .map_err(plot_err)?;
        left.configure_mesh()
            .x_desc("multiple of the calibrated strength")
            .y_desc("mean first-attempt score")
            .label_style((FONT, 13))
            .draw()
            .map_err(plot_err)?;
        for (i, st) in r.steering.iter().enumerate() {
            let color = PALETTE.get(i % PALETTE.len()).copied().unwrap_or(BLACK);
            let pts: Vec<(f64, f64)> = r
                .boost_sweep
                .iter()
                .filter(|p| p.latent == Some(st.latent))
                .map(|p| (p.factor, p.summary.mean_first_score))
                .collect();
            left.draw_series(LineSeries::new(pts, color.stroke_width(1)))
                .map_err(plot_err)?
                .label(format!("latent {}", st.latent))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        }
        let mean: Vec<(f64, f64)> = pooled
            .iter()
            .map(|p| (p.factor, p.summary.mean_first_score))
            .collect();
        left.draw_series(LineSeries::new(mean, BLACK.stroke_width(3)))
            .map_err(plot_err)?
            .label("all latents (95% CI)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLACK.stroke_width(3)));
        let cis: Vec<(f64, [f64; 2])> = pooled
            .iter()
            .map(|p| (p.factor, p.summary.ci95.mean_first_score))
            .collect();
        left.draw_series(error_bars(&cis, 0.02 * x_max))
            .map_err(plot_err)?;
        left.configure_series_labels()
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;

        let mut right = ChartBuilder::on(&b)
            .caption("Restart rates vs steering strength", (FONT, 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..x_max, 0f64..rate_top.max(5.0))
            .map_err(plot_err)?;
        right
            .configure_mesh()
            .x_desc("multiple of the calibrated strength")
            .y_desc("% of answers (Wilson 95% CI)")
            .label_style((FONT, 13))
            .draw()
            .map_err(plot_err)?;
        let blue = RGBColor(70, 110, 190);
        let orange = RGBColor(220, 130, 50);
        let multi: Vec<(f64, f64)> = pooled
            .iter()
            .map(|p| (p.factor, 100.0 * p.summary.multi_attempt_rate))
            .collect();
        right
            .draw_series(LineSeries::new(multi, blue.stroke_width(2)))
            .map_err(plot_err)?
            .label("multi-attempt rate")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], blue));
        let esr: Vec<(f64, f64)> = pooled
            .iter()
            .map(|p| (p.factor, 100.0 * p.summary.esr_rate))
            .collect();
        right
            .draw_series(LineSeries::new(esr, orange.stroke_width(2)))
            .map_err(plot_err)?
            .label("ESR rate")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], orange));
        let cis: Vec<(f64, [f64; 2])> = pooled
            .iter()
            .map(|p| {
                (
                    p.factor,
                    p.summary.ci95.multi_attempt_rate.map(|v| 100.0 * v),
                )
            })
            .collect();
        right
            .draw_series(error_bars(&cis, 0.02 * x_max))
            .map_err(plot_err)?;
        right
            .configure_series_labels()
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
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
