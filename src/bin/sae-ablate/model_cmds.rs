//! `logits` and `generate`: run a hookable model, optionally with an SAE spliced in.

use std::io::Write;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use clap::Args;
use sae_ablate::edit::{Edits, LatentEdit, LatentSet, SpliceMode};
use sae_ablate::hooks::{HookPoint, Hooks, Positions, SaeSplice};
use sae_ablate::io::npy;
use sae_ablate::model::{self, HookedModel, LoadOptions, SamplingParams};
use sae_ablate::sae::Sae;
use sae_ablate::{Error, Result};

/// An SAE splice with latent edits (all optional: no `--sae`, no splice).
#[derive(Args, Debug)]
pub struct SpliceArgs {
    /// SAE release directory or weights file to splice into the model.
    #[arg(long)]
    sae: Option<PathBuf>,
    /// Hook point for the SAE, e.g. `blocks.5.hook_resid_post` (default: the SAE's own hook name).
    #[arg(long)]
    hook: Option<String>,
    /// Latents to zero-ablate: `1,2,3`.
    #[arg(long, value_delimiter = ',')]
    zero: Vec<u32>,
    /// A named latent set to zero-ablate (`esr26`: the ESR off-topic detectors).
    #[arg(long)]
    zero_preset: Option<String>,
    /// Clamp latents to values: `ID=V,ID=V`.
    #[arg(long, value_delimiter = ',')]
    clamp: Vec<String>,
    /// Scale latents by factors: `ID=A,ID=A`.
    #[arg(long, value_delimiter = ',')]
    scale: Vec<String>,
    /// Add values to latents: `ID=V,ID=V`.
    #[arg(long, value_delimiter = ',')]
    add: Vec<String>,
    /// Steer by decoder directions, y += C·W_dec[ID]: `ID=C,ID=C`.
    #[arg(long, value_delimiter = ',')]
    steer: Vec<String>,
    /// Splice mode: `error` (x + decode(f') − decode(f)) or `reconstruct` (decode(f')).
    #[arg(long, default_value = "error")]
    mode: SpliceMode,
    /// Positions the splice acts on: `all`, `prompt`, `generated` or an absolute range `A..B`.
    #[arg(long, default_value = "all")]
    positions: String,
}

/// Arguments of `sae-ablate logits`.
#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// GGUF file or HF model directory (config.json + *.safetensors + tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (ChatML or Llama-3) as a user turn.
    #[arg(long)]
    chat: bool,
    /// Output .npy: f32 logits [seq, vocab] for every prompt position.
    #[arg(long)]
    output: PathBuf,
    /// Print `{"ids": [...]}` (the prompt's token ids) on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    splice: SpliceArgs,
}

/// Arguments of `sae-ablate generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// GGUF file or HF model directory (config.json + *.safetensors + tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (ChatML or Llama-3) as a user turn.
    #[arg(long)]
    chat: bool,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Greedy decoding (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "seed"])]
    greedy: bool,
    /// Sampling temperature (> 0 samples; 0 is greedy).
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long)]
    top_p: Option<f32>,
    /// Sampler seed.
    #[arg(long)]
    seed: Option<u64>,
    /// HF-style repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Print `{"prompt_ids": [...], "ids": [...], "text": "..."}` instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    splice: SpliceArgs,
}

fn build_hooks(s: &SpliceArgs, m: &dyn HookedModel) -> Result<Hooks> {
    let mut hooks = Hooks::new();
    let Some(path) = &s.sae else {
        let given = s.hook.is_some()
            || !s.zero.is_empty()
            || s.zero_preset.is_some()
            || !s.clamp.is_empty()
            || !s.scale.is_empty()
            || !s.add.is_empty()
            || !s.steer.is_empty();
        if given {
            return Err(Error::Invalid(
                "--hook and the edit flags need --sae <SAE>".into(),
            ));
        }
        return Ok(hooks);
    };
    let sae = Sae::load(path, &Device::Cpu)?;
    let hook = match (&s.hook, &sae.config().hook_name) {
        (Some(h), _) => h.clone(),
        (None, Some(h)) => h.clone(),
        (None, None) => {
            return Err(Error::Invalid(format!(
                "{}: the SAE names no hook point: pass --hook",
                path.display()
            )))
        }
    };
    let point: HookPoint = hook.parse()?;
    point.validate(m.n_layers())?;
    if sae.d_in() != m.d_model() {
        return Err(Error::Invalid(format!(
            "{}: the SAE has d_in = {} but the model's residual width is {}",
            path.display(),
            sae.d_in(),
            m.d_model()
        )));
    }
    let mut edits = Edits::new(s.mode).zero(&s.zero)?;
    if let Some(name) = &s.zero_preset {
        edits = edits.zero(LatentSet::preset(name, sae.d_sae())?.ids())?;
    }
    for (id, v) in crate::pairs("clamp", &s.clamp)? {
        edits = edits.with(id, LatentEdit::Clamp(v))?;
    }
    for (id, v) in crate::pairs("scale", &s.scale)? {
        edits = edits.with(id, LatentEdit::Scale(v))?;
    }
    for (id, v) in crate::pairs("add", &s.add)? {
        edits = edits.with(id, LatentEdit::Add(v))?;
    }
    for (id, c) in crate::pairs("steer", &s.steer)? {
        edits = edits.steer(id, c)?;
    }
    let positions: Positions = s.positions.parse()?;
    hooks.add(point, SaeSplice::new(&sae, &edits, positions)?);
    Ok(hooks)
}

fn prompt_ids(tok: &model::Tokenizer, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    let text = if chat {
        tok.chat_prompt(prompt)?
    } else {
        prompt.to_string()
    };
    let ids = tok.encode(&text)?;
    if ids.is_empty() {
        return Err(Error::Invalid("the prompt has no tokens".into()));
    }
    Ok(ids)
}

/// `sae-ablate logits`.
pub fn logits(a: LogitsArgs) -> Result<()> {
    let (mut m, tok) = model::load(&a.model, &LoadOptions::default())?;
    let mut hooks = build_hooks(&a.splice, &m)?;
    let ids = prompt_ids(&tok, &a.prompt, a.chat)?;
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let logits = m.forward(&x, 0, &mut hooks)?.squeeze(0)?;
    npy::write_npy_f32(&a.output, &logits)?;
    if a.json {
        println!("{}", serde_json::json!({ "ids": ids }));
    }
    Ok(())
}

/// `sae-ablate generate`.
pub fn generate(a: GenerateArgs) -> Result<()> {
    let (mut m, tok) = model::load(&a.model, &LoadOptions::default())?;
    let mut hooks = build_hooks(&a.splice, &m)?;
    let ids = prompt_ids(&tok, &a.prompt, a.chat)?;
    let params = SamplingParams {
        max_new_tokens: a.max_new_tokens,
        temperature: if a.greedy {
            0.0
        } else {
            a.temperature.unwrap_or(0.0)
        },
        top_p: a.top_p.unwrap_or(1.0),
        repetition_penalty: a.repetition_penalty,
        seed: a.seed.unwrap_or(42),
        stop_tokens: tok.stop_tokens().to_vec(),
    };
    let mut out = Vec::new();
    let mut printed = 0usize;
    let stream = !a.json;
    let stdout = std::io::stdout();
    let g = model::generate(&mut m, &ids, &params, &mut hooks, &mut |id| {
        if stream {
            out.push(id);
            // Decode everything so far and print the new suffix (multi-byte safe).
            let text = tok.decode(&out, true)?;
            if text.len() > printed && text.is_char_boundary(printed) && !text.ends_with('\u{FFFD}')
            {
                let mut lock = stdout.lock();
                let _ = lock.write_all(&text.as_bytes()[printed..]);
                let _ = lock.flush();
                printed = text.len();
            }
        }
        Ok(true)
    })?;
    let text = tok.decode(&g.ids, true)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "prompt_ids": g.prompt_ids, "ids": g.ids, "text": text })
        );
    } else {
        if text.len() > printed && text.is_char_boundary(printed) {
            print!("{}", &text[printed..]);
        }
        println!();
    }
    Ok(())
}
