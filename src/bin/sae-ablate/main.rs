//! `sae-ablate`: inspect SAEs, encode activations, apply latent edits.
//!
//! A thin layer over the library: each subcommand is a few calls of public API.
//! Exit code 0 on success, 2 on bad input (one line on stderr).

mod bench;
mod edit_args;
mod model_cmds;
mod progress;
mod train_cmds;

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Device};
use clap::{Parser, Subcommand};
use sae_ablate::edit::EditPlan;
use sae_ablate::io::npy;
use sae_ablate::sae::{Architecture, Sae};
use sae_ablate::Result;

#[derive(Parser)]
#[command(
    name = "sae-ablate",
    version,
    about = "Run sparse autoencoders and edit their latents"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time SAE ops (fused kernels, optionally vs the reference path) and print the machine's ceilings.
    Bench(bench::BenchArgs),
    /// Print an SAE's format, architecture, sizes, dtype, hook and weight statistics.
    Inspect {
        /// SAE release directory or weights file (any supported format).
        sae: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Encode activations: writes dense latent activations [N, d_sae] as f32 .npy.
    Encode {
        /// SAE release directory or weights file.
        #[arg(long)]
        sae: PathBuf,
        /// Input activations, .npy f32/f16/bf16 of shape [N, d_in].
        #[arg(long)]
        input: PathBuf,
        /// Output .npy (f32).
        #[arg(long)]
        output: PathBuf,
    },
    /// Apply latent edits to activations: writes the edited activations [N, d_in] as f32 .npy.
    Apply {
        /// SAE release directory or weights file.
        #[arg(long)]
        sae: PathBuf,
        /// Input activations, .npy f32/f16/bf16 of shape [N, d_in].
        #[arg(long)]
        input: PathBuf,
        /// Output .npy (f32).
        #[arg(long)]
        output: PathBuf,
        #[command(flatten)]
        edit: edit_args::EditArgs,
    },
    /// Run a model on a prompt (optionally with an SAE splice): writes f32 logits [seq, vocab] as .npy.
    Logits(model_cmds::LogitsArgs),
    /// Generate text from a prompt, optionally with an SAE splice and latent edits live.
    Generate(model_cmds::GenerateArgs),
    /// Measure a model's prefill and decode tokens/s, with and without hooks.
    BenchModel(model_cmds::BenchModelArgs),
    /// Run a model over a text corpus and save hook-point activations as safetensors shards
    /// (cached: a second run with the same settings does no forward pass).
    /// Example: sae-ablate harvest --model assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out acts --max-tokens 100000
    Harvest(train_cmds::HarvestArgs),
    /// Train a TopK or L1 SAE on harvested activations; writes it in SAELens format.
    /// Example: sae-ablate train --activations acts --out my-sae --d-sae 4608 --k 32
    Train(train_cmds::TrainArgs),
    /// Evaluate an SAE inside a model on held-out text: FVU, L0, dead latents, CE loss recovered.
    /// Example: sae-ablate eval --model M.gguf --sae my-sae --json
    Eval(train_cmds::EvalArgs),
}

fn stats(t: &candle_core::Tensor) -> Result<serde_json::Value> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let finite: Vec<f32> = v.iter().copied().filter(|x| x.is_finite()).collect();
    let n = finite.len().max(1) as f64;
    let mean = finite.iter().map(|&x| x as f64).sum::<f64>() / n;
    let min = finite.iter().copied().fold(f32::INFINITY, f32::min);
    let max = finite.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    Ok(serde_json::json!({"min": min, "mean": mean, "max": max}))
}

fn inspect(path: &PathBuf, json: bool) -> Result<()> {
    let sae = Sae::load(path, &Device::Cpu)?;
    let c = sae.config();
    let mut info = serde_json::json!({
        "path": path.display().to_string(),
        "format": sae.format().as_str(),
        "architecture": c.architecture.as_str(),
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": format!("{:?}", sae.dtype()).to_lowercase(),
        "hook_name": c.hook_name,
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": c.normalization.as_str(),
    });
    if c.architecture == Architecture::TopK {
        info["k"] = serde_json::json!(c.k);
        info["rescale_acts_by_decoder_norm"] = serde_json::json!(c.rescale_acts_by_decoder_norm);
        info["signed"] = serde_json::json!(c.signed);
    }
    if let Some(t) = &sae.weights().threshold {
        info["threshold"] = stats(t)?;
    }
    let norms = sae
        .weights()
        .w_dec
        .to_dtype(DType::F32)?
        .sqr()?
        .sum(1)?
        .sqrt()?;
    info["decoder_norm"] = stats(&norms)?;
    let bad = sae.non_finite()?;
    info["non_finite"] = serde_json::Value::Object(
        bad.iter()
            .map(|(n, k)| (n.to_string(), serde_json::json!(k)))
            .collect(),
    );
    if json {
        println!("{info}");
        return Ok(());
    }
    if let Some(obj) = info.as_object() {
        for (k, v) in obj {
            println!("{k:>28}: {v}");
        }
    }
    for (name, n) in bad {
        eprintln!("warning: tensor `{name}` has {n} NaN/Inf values");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let dev = Device::Cpu;
    match cli.cmd {
        Cmd::Inspect { sae, json } => inspect(&sae, json),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Encode { sae, input, output } => {
            let sae = Sae::load(&sae, &dev)?;
            let x = npy::read_npy(&input, &dev)?;
            let f = sae.encode(&x).map_err(|e| e.in_file(&input))?;
            npy::write_npy_f32(&output, &f)
        }
        Cmd::Apply {
            sae,
            input,
            output,
            edit,
        } => {
            let sae = Sae::load(&sae, &dev)?;
            let edits = edit.edits(sae.d_sae())?;
            let plan = EditPlan::new(&sae, &edits)?;
            let x = npy::read_npy(&input, &dev)?;
            let y = plan.apply(&x).map_err(|e| e.in_file(&input))?;
            npy::write_npy_f32(&output, &y)
        }
        Cmd::Logits(a) => model_cmds::logits(a),
        Cmd::Generate(a) => model_cmds::generate(a),
        Cmd::BenchModel(a) => model_cmds::bench_model(a),
        Cmd::Harvest(a) => train_cmds::harvest(a),
        Cmd::Train(a) => train_cmds::train(a),
        Cmd::Eval(a) => train_cmds::eval(a),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print as usual, exit 0.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Usage errors: one line, exit 2, like every other bad input.
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "{} (see --help)",
                first.trim_start_matches("error: ").trim()
            );
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.to_string().replace('\n', " "));
            ExitCode::from(2)
        }
    }
}
