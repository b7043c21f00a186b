//! Generate with an SAE latent steered (`x += strength · W_dec[latent]` at every
//! position), next to the unsteered answer with the same seed.
//!
//! ```sh
//! cargo run --release --example steer -- --sae assets/saes/smollm2 --latent 123 \
//!     --strength 40 --prompt "Explain how to bake a loaf of bread."
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::Device;
use clap::Parser;
use sae_ablate::hooks::{AddVector, HookPoint, Hooks, Positions};
use sae_ablate::model::{self, generate, LoadOptions, SamplingParams};
use sae_ablate::{Error, Result, Sae};

/// Generate with one SAE latent steered.
#[derive(Parser, Debug)]
struct Args {
    /// GGUF file or HF directory.
    #[arg(long, default_value = "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// The SAE whose decoder direction is added.
    #[arg(long)]
    sae: PathBuf,
    /// Latent id.
    #[arg(long)]
    latent: u32,
    /// Steering strength (in residual-stream units; decoder rows are usually unit norm).
    #[arg(long)]
    strength: f32,
    /// User message (rendered with the model's chat template).
    #[arg(long)]
    prompt: String,
    /// Hook point (default: the SAE's own).
    #[arg(long)]
    hook: Option<String>,
    /// New tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.6)]
    temperature: f32,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn run(a: Args) -> Result<()> {
    let (mut m, tok) = model::load(&a.model, &LoadOptions::default())?;
    let sae = Sae::load(&a.sae, &Device::Cpu)?;
    let hook: HookPoint = match a.hook.as_deref().or(sae.hook_name()) {
        Some(h) => h.parse()?,
        None => {
            return Err(Error::Invalid(
                "the SAE names no hook point: pass --hook".into(),
            ))
        }
    };
    let prompt = tok.encode(&tok.chat_prompt(&a.prompt)?)?;
    let params = SamplingParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        repetition_penalty: 1.1,
        seed: a.seed,
        stop_tokens: tok.stop_tokens().to_vec(),
        ..Default::default()
    };
    let dir = sae.decoder_direction(a.latent as usize)?;
    for (label, strength) in [("unsteered", 0.0), ("steered", a.strength)] {
        let mut hooks = Hooks::new();
        if strength != 0.0 {
            hooks.add(hook, AddVector::new(&dir, strength, Positions::All)?);
        }
        let g = generate(&mut m, &prompt, &params, &mut hooks)?;
        println!(
            "--- {label} (latent {} × {strength} at {hook})\n{}\n",
            a.latent,
            tok.decode(&g.ids, true)?
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("steer: {e}");
            ExitCode::from(2)
        }
    }
}
