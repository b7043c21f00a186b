//! The main job: the ESR ablation experiment end to end (see `sae_ablate::esr`).
//!
//! ```sh
//! cargo run --release --example esr_ablation -- [--preset smollm2] [--quick] [--out DIR]
//! # the paper's setting with your copies of the weights; the model runs on the CPU
//! # (~150 GB of memory for 70B in bf16; GPU execution is not available yet):
//! cargo run --release --example esr_ablation -- --preset llama-3.3-70b-goodfire \
//!     --model /models/Llama-3.3-70B-Instruct --sae /models/Llama-3.3-70B-Instruct-SAE-l50.pt
//! ```
//!
//! Writes `results.json`, `report.md`, `trials.jsonl`, PNG plots and `sae/` to DIR
//! (default `results/esr/`). Assets come from `scripts/fetch-assets.sh`.

#[path = "../src/bin/sae-ablate/progress.rs"]
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sae_ablate::esr::{self, EsrConfig};

/// Reproduce the ESR ablation (McKenzie et al., arXiv 2602.06941): steer with an SAE
/// latent, find off-topic-detector latents, ablate them vs random controls.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// `smollm2` (runs on a CPU) or `llama-3.3-70b-goodfire` (the paper's setting).
    #[arg(long, default_value = "smollm2")]
    preset: String,
    /// Fewer prompts, latents and tokens; the same steps (about 1-2 minutes on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Results folder.
    #[arg(long, default_value = "results/esr")]
    out: PathBuf,
    /// Model: GGUF file or HF directory (overrides the preset).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A ready SAE in any supported format (overrides the preset; skips training).
    #[arg(long)]
    sae: Option<PathBuf>,
    /// Seed of everything random.
    #[arg(long)]
    seed: Option<u64>,
    /// Number of prompts (at most 48).
    #[arg(long)]
    prompts: Option<usize>,
    /// Number of steering latents.
    #[arg(long)]
    steer_latents: Option<usize>,
    /// Samples (seeds) per prompt × steering latent in each main condition.
    #[arg(long)]
    samples: Option<usize>,
    /// New tokens per answer.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Cache folder for answers, activations, the SAE and its evaluation.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let result = (|| -> sae_ablate::Result<esr::EsrResults> {
        let mut cfg = EsrConfig::preset(&a.preset, a.quick)?;
        if let Some(m) = &a.model {
            cfg.model = m.clone();
        }
        if let Some(s) = &a.sae {
            cfg.sae = Some(s.clone());
        }
        if let Some(v) = a.seed {
            cfg.seed = v;
        }
        if let Some(v) = a.prompts {
            cfg.n_prompts = v;
            cfg.calib_prompts = cfg.calib_prompts.min(v);
            cfg.boost_prompts = cfg.boost_prompts.min(v);
            cfg.meta_prompts = cfg.meta_prompts.min(v);
            cfg.sites_prompts = cfg.sites_prompts.min(v);
        }
        if let Some(v) = a.steer_latents {
            cfg.steer_latents = v;
        }
        if let Some(v) = a.samples {
            cfg.samples = v;
        }
        if let Some(v) = a.max_new_tokens {
            cfg.max_new_tokens = v;
        }
        if let Some(d) = &a.cache_dir {
            cfg.cache_dir = d.clone();
        }
        cfg.progress = progress::reporter(a.quiet);
        let command: Vec<String> = std::env::args().collect();
        let command = format!(
            "cargo run --release --example esr_ablation -- {}",
            command.get(1..).unwrap_or_default().join(" ")
        );
        esr::run(&cfg, &a.out, command.trim_end())
    })();
    match result {
        Ok(r) => {
            println!(
                "{:<14} {:>5} {:>26} {:>7} {:>20}",
                "condition", "n", "multi-attempt [Wilson 95%]", "ESR", "1st score [95% CI]"
            );
            for c in std::iter::once(&r.unsteered).chain(&r.conditions) {
                let [lo, hi] = c.ci95.multi_attempt_rate;
                let [slo, shi] = c.ci95.mean_first_score;
                println!(
                    "{:<14} {:>5} {:>7.1}% [{:>5.2}%, {:>5.2}%] {:>6.1}% {:>6.1} [{:>4.1}, {:>4.1}]",
                    c.name,
                    c.n,
                    100.0 * c.multi_attempt_rate,
                    100.0 * lo,
                    100.0 * hi,
                    100.0 * c.esr_rate,
                    c.mean_first_score,
                    slo,
                    shi
                );
            }
            for p in &r.paired {
                println!(
                    "{} vs {}: McNemar p = {:.3}, first score {:+.1} [{:+.1}, {:+.1}]",
                    p.condition,
                    p.reference,
                    p.multi_mcnemar_p,
                    p.first_score_diff,
                    p.first_score_diff_ci95[0],
                    p.first_score_diff_ci95[1]
                );
            }
            println!(
                "OTD latents ({} rule): {:?}\nresults in {} ({:.0} s)",
                r.otd_rule,
                r.otd_latents,
                a.out.display(),
                r.timings.total_s
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("esr_ablation: {e}");
            ExitCode::from(2)
        }
    }
}
