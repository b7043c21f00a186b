//! Zero-ablate a latent set of any SAE inside the model and see what it does to the text:
//! next-token CE loss with and without the ablation, and the tokens whose logits move most.
//!
//! ```sh
//! cargo run --release --example ablate_latents -- --sae assets/saes/smollm2 \
//!     --latents 12,345,678 --text "It is a truth universally acknowledged, ..."
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor, D};
use clap::Parser;
use sae_ablate::edit::{Edits, LatentSet, SpliceMode};
use sae_ablate::hooks::{HookPoint, Hooks, Positions, SaeSplice};
use sae_ablate::model::{self, HookedModel, LoadOptions};
use sae_ablate::{Error, Result, Sae};

/// CE loss and top logit changes when SAE latents are zero-ablated.
#[derive(Parser, Debug)]
struct Args {
    /// GGUF file or HF directory.
    #[arg(long, default_value = "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// The SAE (any supported format).
    #[arg(long)]
    sae: PathBuf,
    /// Comma-separated latent ids to zero.
    #[arg(long, value_delimiter = ',')]
    latents: Vec<u32>,
    /// A named latent set instead (`esr26`).
    #[arg(long)]
    preset: Option<String>,
    /// The text (or use --text-file).
    #[arg(long)]
    text: Option<String>,
    /// Read the text from a file.
    #[arg(long)]
    text_file: Option<PathBuf>,
    /// Hook point (default: the SAE's own).
    #[arg(long)]
    hook: Option<String>,
    /// `error` (keep the SAE's error: only the ablation changes the activation) or
    /// `reconstruct` (replace the activation by the edited reconstruction).
    #[arg(long, default_value = "error")]
    mode: String,
    /// How many tokens to list.
    #[arg(long, default_value_t = 10)]
    top: usize,
}

fn ce(logits: &Tensor, ids: &Tensor) -> Result<f64> {
    let t = logits.dim(1)?;
    let lsm = candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1)?.squeeze(0)?, D::Minus1)?;
    let tgt = ids.narrow(1, 1, t - 1)?.squeeze(0)?.unsqueeze(1)?;
    let s = lsm
        .gather(&tgt, 1)?
        .to_dtype(DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?;
    Ok(-s)
}

fn run(a: Args) -> Result<()> {
    let text = match (&a.text, &a.text_file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?,
        (None, None) => return Err(Error::Invalid("give --text or --text-file".into())),
    };
    let (mut m, tok) = model::load(&a.model, &LoadOptions::default())?;
    let sae = Sae::load(&a.sae, &Device::Cpu)?;
    let set = match &a.preset {
        Some(p) => sae_ablate::esr::latent_preset(p, sae.d_sae())?,
        None => LatentSet::new(&a.latents, sae.d_sae())?,
    };
    if set.is_empty() {
        return Err(Error::Invalid(
            "no latents given (--latents or --preset)".into(),
        ));
    }
    let hook: HookPoint = match a.hook.as_deref().or(sae.hook_name()) {
        Some(h) => h.parse()?,
        None => {
            return Err(Error::Invalid(
                "the SAE names no hook point: pass --hook".into(),
            ))
        }
    };
    let mode = match a.mode.as_str() {
        "error" => SpliceMode::ErrorPreserving,
        "reconstruct" => SpliceMode::Reconstruction,
        m => {
            return Err(Error::Invalid(format!(
                "--mode `{m}`: expected error or reconstruct"
            )))
        }
    };
    let ids = tok.encode(&text)?;
    if ids.len() < 2 {
        return Err(Error::Invalid("the text needs at least 2 tokens".into()));
    }
    let ids = Tensor::new(ids.as_slice(), m.device())?.unsqueeze(0)?;
    let clean = m.forward(&ids, 0, &mut Hooks::new())?;
    let edits = Edits::new(mode).zero(set.ids());
    let mut hooks = Hooks::new().with(hook, SaeSplice::new(&sae, &edits, Positions::All)?);
    let edited = m.forward(&ids, 0, &mut hooks)?;
    let (c0, c1) = (ce(&clean, &ids)?, ce(&edited, &ids)?);
    println!(
        "{} latents zeroed at {hook} ({} mode), {} tokens",
        set.len(),
        a.mode,
        ids.dim(1)?
    );
    println!(
        "CE loss: clean {c0:.4}, ablated {c1:.4}, change {:+.4} nats/token",
        c1 - c0
    );
    // Mean logit change over positions, per vocabulary entry.
    let diff: Vec<f32> = (edited - clean)?.squeeze(0)?.mean(0)?.to_vec1()?;
    let mut order: Vec<usize> = (0..diff.len()).collect();
    order.sort_by(|&x, &y| diff[y].total_cmp(&diff[x]));
    let show = |i: usize| tok.decode(&[i as u32], false).unwrap_or_default();
    println!("\nmost promoted tokens (mean logit change):");
    for &i in order.iter().take(a.top) {
        println!("  {:+.4}  {:?}", diff[i], show(i));
    }
    println!("most suppressed tokens:");
    for &i in order.iter().rev().take(a.top) {
        println!("  {:+.4}  {:?}", diff[i], show(i));
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ablate_latents: {e}");
            ExitCode::from(2)
        }
    }
}
