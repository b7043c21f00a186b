//! Trial outcomes and their per-condition summaries with percentile-bootstrap 95% intervals.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// One steered generation and the judge's verdict on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// Condition name: `baseline`, `otd_ablated`, `random_1`, ….
    pub condition: String,
    /// The steered latent.
    pub latent: u32,
    /// The steering strength (added to the latent: `x += strength · W_dec[latent]`).
    pub strength: f32,
    /// Index of the prompt in [`super::prompts::PROMPTS`].
    pub prompt: usize,
    /// The sampler's seed (the same for every condition).
    pub seed: u64,
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
}

/// A 95% interval `[low, high]` per statistic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ci95 {
    /// Of the multi-attempt rate.
    pub multi_attempt_rate: [f64; 2],
    /// Of the ESR rate.
    pub esr_rate: [f64; 2],
    /// Of the mean first-attempt score.
    pub mean_first_score: [f64; 2],
}

/// One condition's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConditionSummary {
    /// `baseline`, `otd_ablated`, `random_1`, ….
    pub name: String,
    /// Trials.
    pub n: usize,
    /// Fraction of answers with two or more attempts.
    pub multi_attempt_rate: f64,
    /// Fraction of answers that are multi-attempt and end better than they began.
    pub esr_rate: f64,
    /// Mean relevance score of the first attempt.
    pub mean_first_score: f64,
    /// Mean number of attempts.
    pub mean_attempts: f64,
    /// Percentile-bootstrap 95% intervals (trials resampled with replacement).
    pub ci95: Ci95,
}

/// Mean of `v` (0 for an empty slice).
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Percentile-bootstrap 95% interval of the mean of `v`: `reps` resamples of `v.len()`
/// values drawn with replacement, the 2.5th and 97.5th percentiles of their means.
/// `[m, m]` for fewer than two values.
pub fn bootstrap_mean_ci(v: &[f64], reps: usize, rng: &mut Rng) -> [f64; 2] {
    let n = v.len();
    if n < 2 || reps == 0 {
        let m = mean(v);
        return [m, m];
    }
    let mut means: Vec<f64> = (0..reps)
        .map(|_| {
            let s: f64 = (0..n)
                .map(|_| {
                    v.get((rng.next_u64() % n as u64) as usize)
                        .copied()
                        .unwrap_or(0.0)
                })
                .sum();
            s / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((q * (reps - 1) as f64).round() as usize).min(reps - 1);
        means.get(i).copied().unwrap_or(f64::NAN)
    };
    [at(0.025), at(0.975)]
}

/// Summarise the trials of one condition (`reps` bootstrap resamples, seeded).
pub fn summarize(name: &str, trials: &[&Trial], reps: usize, seed: u64) -> ConditionSummary {
    let multi: Vec<f64> = trials
        .iter()
        .map(|t| f64::from(u8::from(t.multi_attempt())))
        .collect();
    let esr: Vec<f64> = trials
        .iter()
        .map(|t| f64::from(u8::from(t.esr())))
        .collect();
    let first: Vec<f64> = trials.iter().map(|t| t.first_score()).collect();
    let attempts: Vec<f64> = trials.iter().map(|t| t.scores.len() as f64).collect();
    let mut rng = Rng::new(seed);
    ConditionSummary {
        name: name.to_string(),
        n: trials.len(),
        multi_attempt_rate: mean(&multi),
        esr_rate: mean(&esr),
        mean_first_score: mean(&first),
        mean_attempts: mean(&attempts),
        ci95: Ci95 {
            multi_attempt_rate: bootstrap_mean_ci(&multi, reps, &mut rng),
            esr_rate: bootstrap_mean_ci(&esr, reps, &mut rng),
            mean_first_score: bootstrap_mean_ci(&first, reps, &mut rng),
        },
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
            seed: 0,
            tokens: 1,
            scores: scores.to_vec(),
            text: String::new(),
        }
    }

    #[test]
    fn rates_by_hand() {
        let ts = [
            trial(&[40.0]),
            trial(&[10.0, 80.0]),
            trial(&[50.0, 20.0]),
            trial(&[0.0, 5.0, 90.0]),
        ];
        let refs: Vec<&Trial> = ts.iter().collect();
        let s = summarize("baseline", &refs, 2000, 7);
        assert_eq!(s.n, 4);
        assert_eq!(s.multi_attempt_rate, 0.75);
        assert_eq!(s.esr_rate, 0.5);
        assert_eq!(s.mean_first_score, 25.0);
        assert_eq!(s.mean_attempts, 2.0);
        let [lo, hi] = s.ci95.multi_attempt_rate;
        assert!(
            lo <= 0.75 && 0.75 <= hi && lo >= 0.0 && hi <= 1.0,
            "{lo} {hi}"
        );
        assert!(lo < hi);
    }

    #[test]
    fn bootstrap_interval_of_a_known_proportion() {
        // 200 trials at p = 0.3: the normal-approximation 95% half-width is
        // 1.96·sqrt(0.3·0.7/200) = 0.0635; the bootstrap's should be close.
        let v: Vec<f64> = (0..200)
            .map(|i| if i % 10 < 3 { 1.0 } else { 0.0 })
            .collect();
        let [lo, hi] = bootstrap_mean_ci(&v, 4000, &mut Rng::new(1));
        let half = (hi - lo) / 2.0;
        assert!((half - 0.0635).abs() < 0.012, "half-width {half}");
        assert!((0.5 * (lo + hi) - 0.3).abs() < 0.015);
    }

    #[test]
    fn constant_data_has_a_point_interval() {
        let v = vec![1.0; 50];
        assert_eq!(bootstrap_mean_ci(&v, 100, &mut Rng::new(3)), [1.0, 1.0]);
    }
}
