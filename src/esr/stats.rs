//! Trial outcomes, their per-condition summaries, and the statistics behind them.
//!
//! - **Rates** (multi-attempt, ESR) get Wilson score 95% intervals, and exact
//!   Clopper–Pearson intervals beside them ([`wilson`], [`clopper_pearson`]). Both hold at
//!   0 events: 0 of `n` gives `[0, z²/(n + z²)]` (Wilson) and `[0, 1 − 0.025^(1/n)]`
//!   (Clopper–Pearson), so a null result says how small the rate can still be.
//! - **Means** (first-attempt score) get a percentile bootstrap that resamples whole
//!   clusters ([`cluster_bootstrap_mean_ci`]): a cluster is one prompt × steering latent,
//!   and every trial of a resampled cluster comes along, because trials that share a
//!   prompt and a steering vector are not independent.
//! - **Conditions vs `baseline`** are paired (same prompt, steering latent, strength and
//!   sampler seed): McNemar's exact test on the discordant multi-attempt pairs
//!   ([`mcnemar_exact`]) and the mean paired difference of first-attempt scores with its
//!   cluster-bootstrap interval ([`paired`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// The standard normal quantile of 0.975 (two-sided 95%).
pub const Z95: f64 = 1.959_963_984_540_054;

/// One generation and the judge's verdict on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// Condition name: `baseline`, `otd_ablated`, `steer_ablated`, `random`, `unsteered`,
    /// `boost_x0.50`, `meta_prompt`, … (see the module docs of [`crate::esr`]).
    pub condition: String,
    /// The steered latent (`u32::MAX` for unsteered answers).
    pub latent: u32,
    /// The steering strength (added to the latent: `x += strength · W_dec[latent]`).
    pub strength: f32,
    /// Index of the prompt in [`super::prompts::PROMPTS`].
    pub prompt: usize,
    /// Which of the samples of this prompt × latent (0-based; each has its own seed).
    #[serde(default)]
    pub sample: usize,
    /// The sampler's seed (the same for every condition of a prompt × latent × sample).
    pub seed: u64,
    /// Which random control set was ablated (index into `random_sets`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_set: Option<usize>,
    /// Generated tokens.
    pub tokens: usize,
    /// Relevance score (0–100) of each attempt, in order.
    pub scores: Vec<f64>,
    /// The generated text.
    pub text: String,
}

impl Trial {
    /// Two or more attempts.
    pub fn multi_attempt(&self) -> bool {
        self.scores.len() >= 2
    }

    /// Multi-attempt and the last attempt scores higher than the first.
    pub fn esr(&self) -> bool {
        match (self.scores.first(), self.scores.last()) {
            (Some(f), Some(l)) => self.multi_attempt() && l > f,
            _ => false,
        }
    }

    /// The first attempt's score (0 for an empty answer).
    pub fn first_score(&self) -> f64 {
        self.scores.first().copied().unwrap_or(0.0)
    }

    /// The cluster the trial belongs to: its steering latent and prompt.
    pub fn cluster(&self) -> (u32, usize) {
        (self.latent, self.prompt)
    }

    /// What pairs it with a trial of another condition: latent, prompt and sample.
    pub fn pair_key(&self) -> (u32, usize, usize) {
        (self.latent, self.prompt, self.sample)
    }
}

/// A 95% interval `[low, high]` per statistic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ci95 {
    /// Of the multi-attempt rate (Wilson score interval).
    pub multi_attempt_rate: [f64; 2],
    /// Of the ESR rate (Wilson score interval).
    pub esr_rate: [f64; 2],
    /// Of the mean first-attempt score (percentile bootstrap over clusters).
    pub mean_first_score: [f64; 2],
}

/// Exact (Clopper–Pearson) 95% intervals of the rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exact95 {
    /// Of the multi-attempt rate.
    pub multi_attempt_rate: [f64; 2],
    /// Of the ESR rate.
    pub esr_rate: [f64; 2],
}

/// One condition's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConditionSummary {
    /// `baseline`, `otd_ablated`, `steer_ablated`, `random`, ….
    pub name: String,
    /// Trials.
    pub n: usize,
    /// Clusters (prompt × steering latent) the trials fall in.
    pub clusters: usize,
    /// Trials with two or more attempts.
    pub multi_attempts: usize,
    /// `multi_attempts / n`.
    pub multi_attempt_rate: f64,
    /// Trials that are multi-attempt and end better than they began.
    pub esr_count: usize,
    /// `esr_count / n`.
    pub esr_rate: f64,
    /// Mean relevance score of the first attempt.
    pub mean_first_score: f64,
    /// Mean number of attempts.
    pub mean_attempts: f64,
    /// Wilson intervals of the rates, cluster-bootstrap interval of the mean score.
    pub ci95: Ci95,
    /// Clopper–Pearson intervals of the rates.
    pub exact95: Exact95,
}

/// A condition against its reference on the same prompt × latent × sample triples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    /// The condition.
    pub condition: String,
    /// What it is compared with (`baseline` for the ablations).
    pub reference: String,
    /// Pairs found (trials of both with the same latent, prompt and sample).
    pub pairs: usize,
    /// Pairs where both answers are multi-attempt.
    pub multi_both: usize,
    /// Pairs where only the condition's answer is multi-attempt (McNemar's `c`).
    pub multi_only_condition: usize,
    /// Pairs where only the reference's answer is multi-attempt (McNemar's `b`).
    pub multi_only_reference: usize,
    /// McNemar's exact two-sided p-value on the multi-attempt discordant pairs
    /// (1 when there are none).
    pub multi_mcnemar_p: f64,
    /// Mean of (condition − reference) first-attempt score over the pairs.
    pub first_score_diff: f64,
    /// Its 95% percentile-bootstrap interval, resampling clusters of pairs.
    pub first_score_diff_ci95: [f64; 2],
    /// The direction the comparison is expected to take, in words.
    pub expected: String,
}

/// Mean of `v` (0 for an empty slice).
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Wilson score 95% interval of a proportion of `x` successes in `n` trials:
/// `(p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)` with `z` = [`Z95`].
/// `[0, 1]` for `n = 0`.
pub fn wilson(x: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let (nf, z2) = (n as f64, Z95 * Z95);
    let p = x.min(n) as f64 / nf;
    let denom = 1.0 + z2 / nf;
    let center = (p + z2 / (2.0 * nf)) / denom;
    let half = Z95 * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt() / denom;
    // At x = 0 (x = n) the lower (upper) bound is exactly 0 (1); rounding would miss it.
    let lo = if x == 0 {
        0.0
    } else {
        (center - half).max(0.0)
    };
    let hi = if x >= n {
        1.0
    } else {
        (center + half).min(1.0)
    };
    [lo, hi]
}

/// `P(X ≤ k)` for `X ~ Binomial(n, p)`, summed term by term in log space.
pub fn binom_cdf(k: usize, n: usize, p: f64) -> f64 {
    if k >= n || p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return 0.0;
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    // ln C(n, i), built up as i grows.
    let mut ln_c = 0.0f64;
    let mut sum = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        sum += (ln_c + i as f64 * lp + (n - i) as f64 * lq).exp();
    }
    sum.min(1.0)
}

/// Bisection for the `p` in `[0, 1]` where the monotone `f` crosses `target`
/// (`increasing` says which way `f` goes).
fn solve(f: impl Fn(f64) -> f64, target: f64, increasing: bool) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if (f(mid) < target) == increasing {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-15 {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// Exact Clopper–Pearson 95% interval of `x` successes in `n` trials: the `p` where
/// `P(X ≥ x) = 0.025` (lower; 0 when `x = 0`) and where `P(X ≤ x) = 0.025` (upper; 1
/// when `x = n`). `[0, 1]` for `n = 0`.
pub fn clopper_pearson(x: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let x = x.min(n);
    let lo = if x == 0 {
        0.0
    } else {
        solve(|p| 1.0 - binom_cdf(x - 1, n, p), 0.025, true)
    };
    let hi = if x == n {
        1.0
    } else {
        solve(|p| binom_cdf(x, n, p), 0.025, false)
    };
    [lo, hi]
}

/// McNemar's exact test: the two-sided binomial p-value of `b` vs `c` discordant pairs,
/// `min(1, 2 · P(X ≤ min(b, c)))` with `X ~ Binomial(b + c, ½)`; 1 when `b + c = 0`.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let m = b + c;
    if m == 0 {
        return 1.0;
    }
    (2.0 * binom_cdf(b.min(c), m, 0.5)).min(1.0)
}

/// Percentile-bootstrap 95% interval of the mean of `v` when the values come in
/// clusters (`cluster[i]` is value `i`'s cluster): each of `reps` resamples draws as many
/// clusters as there are, with replacement, and takes the mean over all their values;
/// the interval is the 2.5th and 97.5th percentiles of those means. With one value per
/// cluster this is the ordinary bootstrap. `[m, m]` for fewer than two clusters.
pub fn cluster_bootstrap_mean_ci<K: Ord + Clone>(
    v: &[f64],
    cluster: &[K],
    reps: usize,
    rng: &mut Rng,
) -> [f64; 2] {
    let mut groups: BTreeMap<K, (f64, f64)> = BTreeMap::new();
    for (x, k) in v.iter().zip(cluster) {
        let g = groups.entry(k.clone()).or_insert((0.0, 0.0));
        g.0 += x;
        g.1 += 1.0;
    }
    let sums: Vec<(f64, f64)> = groups.into_values().collect();
    let k = sums.len();
    if k < 2 || reps == 0 {
        let m = mean(v);
        return [m, m];
    }
    let mut means: Vec<f64> = (0..reps)
        .map(|_| {
            let (mut s, mut c) = (0.0, 0.0);
            for _ in 0..k {
                let (gs, gc) = sums
                    .get((rng.next_u64() % k as u64) as usize)
                    .copied()
                    .unwrap_or((0.0, 0.0));
                s += gs;
                c += gc;
            }
            s / c.max(1.0)
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((q * (reps - 1) as f64).round() as usize).min(reps - 1);
        means.get(i).copied().unwrap_or(f64::NAN)
    };
    [at(0.025), at(0.975)]
}

/// Average ranks (1-based; ties share the mean of their ranks).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Pearson correlation of `x` and `y` (NaN when either is constant or they differ in
/// length or hold fewer than two values).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    if x.len() != y.len() || x.len() < 2 {
        return f64::NAN;
    }
    let (mx, my) = (mean(x), mean(y));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    sxy / (sxx * syy).sqrt()
}

/// Spearman's rank correlation: the Pearson correlation of the average ranks (NaN as
/// for [`pearson`]; NaN values are not allowed and give NaN).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    if x.iter().chain(y).any(|v| v.is_nan()) {
        return f64::NAN;
    }
    pearson(&ranks(x), &ranks(y))
}

/// Summarise the trials of one condition (`reps` bootstrap resamples, seeded).
pub fn summarize(name: &str, trials: &[&Trial], reps: usize, seed: u64) -> ConditionSummary {
    let n = trials.len();
    let multi = trials.iter().filter(|t| t.multi_attempt()).count();
    let esr = trials.iter().filter(|t| t.esr()).count();
    let first: Vec<f64> = trials.iter().map(|t| t.first_score()).collect();
    let clusters: Vec<(u32, usize)> = trials.iter().map(|t| t.cluster()).collect();
    let attempts: Vec<f64> = trials.iter().map(|t| t.scores.len() as f64).collect();
    let mut distinct = clusters.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let mut rng = Rng::new(seed);
    let rate = |x: usize| if n == 0 { 0.0 } else { x as f64 / n as f64 };
    ConditionSummary {
        name: name.to_string(),
        n,
        clusters: distinct.len(),
        multi_attempts: multi,
        multi_attempt_rate: rate(multi),
        esr_count: esr,
        esr_rate: rate(esr),
        mean_first_score: mean(&first),
        mean_attempts: mean(&attempts),
        ci95: Ci95 {
            multi_attempt_rate: wilson(multi, n),
            esr_rate: wilson(esr, n),
            mean_first_score: cluster_bootstrap_mean_ci(&first, &clusters, reps, &mut rng),
        },
        exact95: Exact95 {
            multi_attempt_rate: clopper_pearson(multi, n),
            esr_rate: clopper_pearson(esr, n),
        },
    }
}

/// Pair the trials of `cond` with those of `reference` by latent, prompt and sample, and
/// compare them (see [`Paired`]); trials without a partner are left out.
pub fn paired(
    cond: &[&Trial],
    reference: &[&Trial],
    expected: &str,
    reps: usize,
    seed: u64,
) -> Paired {
    let by_key: BTreeMap<(u32, usize, usize), &Trial> =
        reference.iter().map(|t| (t.pair_key(), *t)).collect();
    let mut both = 0;
    let (mut only_c, mut only_r) = (0, 0);
    let mut diffs = Vec::new();
    let mut clusters = Vec::new();
    for t in cond {
        let Some(r) = by_key.get(&t.pair_key()) else {
            continue;
        };
        match (t.multi_attempt(), r.multi_attempt()) {
            (true, true) => both += 1,
            (true, false) => only_c += 1,
            (false, true) => only_r += 1,
            (false, false) => {}
        }
        diffs.push(t.first_score() - r.first_score());
        clusters.push(t.cluster());
    }
    let mut rng = Rng::new(seed);
    Paired {
        condition: cond
            .first()
            .map(|t| t.condition.clone())
            .unwrap_or_default(),
        reference: reference
            .first()
            .map(|t| t.condition.clone())
            .unwrap_or_default(),
        pairs: diffs.len(),
        multi_both: both,
        multi_only_condition: only_c,
        multi_only_reference: only_r,
        multi_mcnemar_p: mcnemar_exact(only_r, only_c),
        first_score_diff: mean(&diffs),
        first_score_diff_ci95: cluster_bootstrap_mean_ci(&diffs, &clusters, reps, &mut rng),
        expected: expected.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(scores: &[f64]) -> Trial {
        Trial {
            condition: "baseline".into(),
            latent: 0,
            strength: 1.0,
            prompt: 0,
            sample: 0,
            seed: 0,
            random_set: None,
            tokens: 1,
            scores: scores.to_vec(),
            text: String::new(),
        }
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn rates_by_hand() {
        let mut ts = [
            trial(&[40.0]),
            trial(&[10.0, 80.0]),
            trial(&[50.0, 20.0]),
            trial(&[0.0, 5.0, 90.0]),
        ];
        for (i, t) in ts.iter_mut().enumerate() {
            t.prompt = i;
        }
        let refs: Vec<&Trial> = ts.iter().collect();
        let s = summarize("baseline", &refs, 2000, 7);
        assert_eq!(
            (s.n, s.clusters, s.multi_attempts, s.esr_count),
            (4, 4, 3, 2)
        );
        assert_eq!(s.multi_attempt_rate, 0.75);
        assert_eq!(s.esr_rate, 0.5);
        assert_eq!(s.mean_first_score, 25.0);
        assert_eq!(s.mean_attempts, 2.0);
        // Wilson for 3/4, by the formula: p = 0.75, z²/n = 0.96036,
        // center = (0.75 + 0.480182)/1.960365 = 0.627527,
        // half = 1.959964·√(0.046875 + 0.060023)/1.960365 = 0.326885.
        let [lo, hi] = s.ci95.multi_attempt_rate;
        assert!(
            close(lo, 0.300642, 1e-5) && close(hi, 0.954413, 1e-5),
            "{lo} {hi}"
        );
    }

    #[test]
    fn wilson_matches_the_textbook_formula() {
        // 0 of n: [0, z²/(n + z²)]; n = 80 → 3.84146/83.84146 = 0.045818.
        let [lo, hi] = wilson(0, 80);
        assert_eq!(lo, 0.0);
        assert!(close(hi, 0.045818, 1e-6), "{hi}");
        // 0 of 400: 3.84146/403.84146 = 0.0095123 (below 1%).
        assert!(close(wilson(0, 400)[1], 0.0095123, 1e-7));
        // 5 of 20 (p = 0.25): center 0.290281, half-width 0.178420 by hand.
        let [lo, hi] = wilson(5, 20);
        assert!(
            close(lo, 0.111862, 1e-5) && close(hi, 0.468701, 1e-5),
            "{lo} {hi}"
        );
        // n of n mirrors 0 of n.
        let [lo, hi] = wilson(80, 80);
        assert!(close(lo, 1.0 - 0.045818, 1e-6) && hi == 1.0);
        assert_eq!(wilson(0, 0), [0.0, 1.0]);
    }

    #[test]
    fn clopper_pearson_matches_closed_forms_and_tables() {
        // 0 of n: upper = 1 − 0.025^(1/n); n = 80 → 0.045064, n = 400 → 0.0091798.
        assert_eq!(clopper_pearson(0, 80)[0], 0.0);
        assert!(close(clopper_pearson(0, 80)[1], 0.045064, 1e-6));
        assert!(close(clopper_pearson(0, 400)[1], 0.0091798, 1e-7));
        // n of n: lower = 0.025^(1/n).
        assert!(close(clopper_pearson(10, 10)[0], 0.691503, 1e-6));
        // 5 of 20: the exact interval tabulated as [0.0866, 0.4910].
        let [lo, hi] = clopper_pearson(5, 20);
        assert!(
            close(lo, 0.0866, 1e-4) && close(hi, 0.4910, 1e-4),
            "{lo} {hi}"
        );
        // 1 of 10: [0.00253, 0.44502] (lower = 1 − 0.975^(1/10) in closed form).
        let [lo, hi] = clopper_pearson(1, 10);
        assert!(close(lo, 1.0 - 0.975f64.powf(0.1), 1e-9), "{lo}");
        assert!(close(hi, 0.44502, 1e-5), "{hi}");
    }

    #[test]
    fn binomial_cdf_by_hand() {
        // Bin(4, ½): P(X ≤ 1) = (1 + 4)/16.
        assert!(close(binom_cdf(1, 4, 0.5), 5.0 / 16.0, 1e-12));
        // Bin(3, 0.2): P(X ≤ 0) = 0.8³ = 0.512, P(X ≤ 1) = 0.512 + 3·0.2·0.64 = 0.896.
        assert!(close(binom_cdf(0, 3, 0.2), 0.512, 1e-12));
        assert!(close(binom_cdf(1, 3, 0.2), 0.896, 1e-12));
        assert_eq!(binom_cdf(3, 3, 0.2), 1.0);
    }

    #[test]
    fn mcnemar_for_small_discordant_counts() {
        // b = 0, c = 5: 2 · ½⁵ = 0.0625.
        assert!(close(mcnemar_exact(0, 5), 0.0625, 1e-12));
        // b = 1, c = 6: 2 · (1 + 7)/128 = 0.125.
        assert!(close(mcnemar_exact(1, 6), 0.125, 1e-12));
        assert!(close(mcnemar_exact(6, 1), 0.125, 1e-12));
        // b = 2, c = 8: 2 · (1 + 10 + 45)/1024 = 0.109375.
        assert!(close(mcnemar_exact(2, 8), 0.109375, 1e-12));
        // Balanced or empty: 1.
        assert_eq!(mcnemar_exact(2, 2), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
    }

    #[test]
    fn spearman_by_hand() {
        // y's ranks with a tie: [1, 2, 3.5, 5, 3.5]; Σdx·dy = 8, Σdx² = 10, Σdy² = 9.5.
        let r = spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[5.0, 6.0, 7.0, 8.0, 7.0]);
        assert!(close(r, 8.0 / 95f64.sqrt(), 1e-12), "{r}");
        // Any monotone map has ρ = 1; reversed, −1.
        let x = [0.3, -1.0, 2.0, 7.5];
        let y: Vec<f64> = x.iter().map(|v: &f64| v.exp()).collect();
        assert!(close(spearman(&x, &y), 1.0, 1e-12));
        let y: Vec<f64> = x.iter().map(|v| -v * v * v).collect();
        assert!(close(spearman(&x, &y), -1.0, 1e-12));
        assert!(spearman(&[1.0, 1.0], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn cluster_bootstrap_resamples_whole_clusters() {
        // Two clusters of three identical values: a resample holds 0, 1 or 2 copies of
        // the "1" cluster (probabilities ¼, ½, ¼), so its mean is 0, ½ or 1 and the 95%
        // interval is [0, 1]. Resampling the six values one by one would be narrower.
        let v = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let c = [0, 0, 0, 1, 1, 1];
        assert_eq!(
            cluster_bootstrap_mean_ci(&v, &c, 2000, &mut Rng::new(3)),
            [0.0, 1.0]
        );
        let each: Vec<usize> = (0..6).collect();
        let [lo, hi] = cluster_bootstrap_mean_ci(&v, &each, 2000, &mut Rng::new(3));
        assert!(lo > 0.0 && hi < 1.0, "{lo} {hi}");
    }

    #[test]
    fn cluster_bootstrap_of_a_known_proportion() {
        // 100 clusters of 4 identical 0/1 values at p = 0.3: the clusters are the
        // independent units, so the half-width is 1.96·√(0.3·0.7/100) = 0.0898 (twice
        // the 0.0449 that treating the 400 values as independent would claim).
        let v: Vec<f64> = (0..400)
            .map(|i| if (i / 4) % 10 < 3 { 1.0 } else { 0.0 })
            .collect();
        let c: Vec<usize> = (0..400).map(|i| i / 4).collect();
        let [lo, hi] = cluster_bootstrap_mean_ci(&v, &c, 4000, &mut Rng::new(1));
        let half = (hi - lo) / 2.0;
        assert!((half - 0.0898).abs() < 0.012, "half-width {half}");
        assert!((0.5 * (lo + hi) - 0.3).abs() < 0.015);
        assert_eq!(
            cluster_bootstrap_mean_ci(&[1.0; 50], &[0; 50], 100, &mut Rng::new(3)),
            [1.0, 1.0]
        );
    }

    #[test]
    fn pairs_match_by_latent_prompt_and_sample() {
        let mk = |cond: &str, prompt: usize, sample: usize, scores: &[f64]| {
            let mut t = trial(scores);
            t.condition = cond.into();
            t.prompt = prompt;
            t.sample = sample;
            t
        };
        let base = [
            mk("baseline", 0, 0, &[10.0]),
            mk("baseline", 0, 1, &[20.0, 50.0]),
            mk("baseline", 1, 0, &[30.0]),
            mk("baseline", 2, 0, &[40.0]),
        ];
        let cond = [
            mk("otd_ablated", 0, 0, &[15.0, 60.0]),
            mk("otd_ablated", 0, 1, &[20.0]),
            mk("otd_ablated", 1, 0, &[50.0]),
            // No baseline partner: left out.
            mk("otd_ablated", 3, 0, &[90.0, 1.0]),
        ];
        let b: Vec<&Trial> = base.iter().collect();
        let c: Vec<&Trial> = cond.iter().collect();
        let p = paired(&c, &b, "fewer restarts", 500, 1);
        assert_eq!((p.pairs, p.multi_both), (3, 0));
        assert_eq!((p.multi_only_condition, p.multi_only_reference), (1, 1));
        assert_eq!(p.multi_mcnemar_p, 1.0);
        // (5 + 0 + 20) / 3.
        assert!(close(p.first_score_diff, 25.0 / 3.0, 1e-12));
        assert_eq!(
            (p.condition.as_str(), p.reference.as_str()),
            ("otd_ablated", "baseline")
        );
    }
}
