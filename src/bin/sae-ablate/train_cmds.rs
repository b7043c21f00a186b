//! `harvest`, `train` and `eval`: from text to a trained, evaluated SAE.

use std::path::{Path, PathBuf};

use candle_core::Device;
use clap::Args;
use sae_ablate::eval::{evaluate, plot_latent_density, EvalConfig};
use sae_ablate::harvest::{corpus_files, ActivationStore, Contexts, HarvestConfig, Manifest};
use sae_ablate::hooks::HookPoint;
use sae_ablate::model::{self, LoadOptions, WeightFormat};
use sae_ablate::sae::Sae;
use sae_ablate::train::{self, ActivationSource, ShardSource, TrainArchitecture, TrainConfig};
use sae_ablate::{Error, FloatDtype, Result};

use crate::model_cmds::{load_opts, load_opts_from, LoadArgs};

const DEFAULT_CORPUS: &str = "assets/austen";

/// Arguments of `sae-ablate harvest`.
#[derive(Args, Debug)]
pub struct HarvestArgs {
    /// GGUF file or HF model directory.
    #[arg(long)]
    model: PathBuf,
    /// Output directory: manifest.json and one folder of shards per hook point.
    #[arg(long)]
    out: PathBuf,
    /// A text file or a folder of .txt files (default: the Austen novels in assets/austen).
    #[arg(long, default_value = DEFAULT_CORPUS)]
    corpus: PathBuf,
    /// Hook points to capture, comma-separated, e.g. `blocks.15.hook_resid_post`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "blocks.15.hook_resid_post"
    )]
    hooks: Vec<String>,
    /// Tokens per context (a BOS, if the tokenizer adds one, counts and is not saved).
    #[arg(long, default_value_t = 128)]
    context_len: usize,
    /// Contexts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Stop after this many activation rows (default: the whole training split).
    #[arg(long)]
    max_tokens: Option<u64>,
    /// Contexts at the end of the corpus held out for `eval` (use the same value there).
    #[arg(long, default_value_t = 64)]
    holdout_contexts: usize,
    /// Shard dtype: f16, f32 or bf16.
    #[arg(long, default_value = "f16")]
    dtype: FloatDtype,
    /// The model's dense weight dtype after loading: f32 (default), f16 or bf16 (bf16
    /// products round their input to bf16, as a bf16 PyTorch model does; with
    /// AVX512-BF16 the fastest dense forward). `--dtype` here is the shards'.
    #[arg(long, default_value = "f32")]
    model_dtype: FloatDtype,
    /// `dense` (dequantized to --model-dtype) or `quantized` (GGUF blocks as stored,
    /// 8-bit activations: the fastest forward at any batch where the CPU has AVX512-VNNI).
    #[arg(long, default_value = "dense")]
    weights: WeightFormat,
    /// Rows per shard.
    #[arg(long, default_value_t = 65536)]
    shard_rows: usize,
    /// No progress reports.
    #[arg(long)]
    quiet: bool,
}

/// Arguments of `sae-ablate train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Harvest directory (with manifest.json) or a folder of activation shards.
    #[arg(long)]
    activations: PathBuf,
    /// Hook point to train on when the harvest has several (default: its first).
    #[arg(long)]
    hook: Option<String>,
    /// Output directory: the SAE in SAELens format (cfg.json, sae_weights.safetensors),
    /// train_log.json, train_config.json, train_curve.png.
    #[arg(long)]
    out: PathBuf,
    /// A JSON TrainConfig (every field optional); the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// `topk` or `standard` (L1).
    #[arg(long)]
    architecture: Option<TrainArchitecture>,
    /// Number of latents.
    #[arg(long)]
    d_sae: Option<usize>,
    /// TopK: active latents per token.
    #[arg(long)]
    k: Option<usize>,
    /// Standard: L1 coefficient.
    #[arg(long)]
    l1_coefficient: Option<f64>,
    /// Peak learning rate (default: 2e-4 / sqrt(d_sae / 16384)).
    #[arg(long)]
    lr: Option<f64>,
    /// Tokens per step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Training tokens (default: every harvested row once).
    #[arg(long)]
    total_tokens: Option<u64>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Tokens without firing after which a latent counts as dead.
    #[arg(long)]
    dead_tokens_threshold: Option<u64>,
    /// Save a checkpoint every N steps (0 = only the final SAE).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Rows in the shuffle buffer.
    #[arg(long, default_value_t = 262144)]
    buffer_rows: usize,
}

/// Arguments of `sae-ablate eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// GGUF file or HF model directory.
    #[arg(long)]
    model: PathBuf,
    /// SAE release directory or weights file.
    #[arg(long)]
    sae: PathBuf,
    /// A text file or folder of .txt files; the held-out contexts are its last ones.
    #[arg(long, default_value = DEFAULT_CORPUS)]
    corpus: PathBuf,
    /// Hook point (default: the SAE's hook_name).
    #[arg(long)]
    hook: Option<HookPoint>,
    /// Tokens per context (as in harvest).
    #[arg(long, default_value_t = 128)]
    context_len: usize,
    /// Held-out contexts at the end of the corpus (as in harvest); all are evaluated
    /// unless --contexts is smaller.
    #[arg(long, default_value_t = 64)]
    holdout_contexts: usize,
    /// Evaluate only the first N held-out contexts.
    #[arg(long)]
    contexts: Option<usize>,
    /// Contexts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Write the latent density histogram to this PNG.
    #[arg(long)]
    histogram: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    load: LoadArgs,
}

fn load_model(path: &Path, opts: &LoadOptions) -> Result<(model::Model, model::Tokenizer)> {
    model::load(path, opts)
}

pub fn harvest(a: HarvestArgs) -> Result<()> {
    let opts = load_opts_from(a.model_dtype, a.weights, FloatDtype::F32);
    let (mut m, tok) = load_model(&a.model, &opts)?;
    let mut cfg = HarvestConfig::default();
    cfg.hooks = a.hooks;
    cfg.context_len = a.context_len;
    cfg.batch_size = a.batch_size;
    cfg.max_tokens = a.max_tokens;
    cfg.holdout_contexts = a.holdout_contexts;
    cfg.dtype = a.dtype;
    cfg.shard_rows = a.shard_rows;
    cfg.progress = crate::progress::reporter(a.quiet);
    let r = ActivationStore::new(&a.out).harvest(&mut m, &tok, &a.model, &a.corpus, &cfg)?;
    let shards: usize = r.manifest.outputs.iter().map(|o| o.shards.len()).sum();
    println!(
        "{}",
        serde_json::json!({
            "out": a.out.display().to_string(),
            "cache_hit": r.cache_hit,
            "tokens": r.manifest.tokens,
            "contexts": r.manifest.contexts,
            "shards": shards,
            "forwards": r.forwards,
            "seconds": r.seconds,
            "tokens_per_s": r.tokens_per_s,
            // The forward passes and shard writes alone (no tokenizing, no model hash).
            "loop_seconds": r.loop_seconds,
            "loop_tokens_per_s": if r.loop_seconds > 0.0 {
                r.manifest.tokens as f64 / r.loop_seconds
            } else {
                0.0
            },
        })
    );
    Ok(())
}

pub fn train(a: TrainArgs) -> Result<()> {
    let mut cfg: TrainConfig = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::format("json", e.to_string()).in_file(p))?
        }
        None => TrainConfig::default(),
    };
    let (dir, rows, hook, model_name) = if a.activations.join("manifest.json").is_file() {
        let m = Manifest::read(&a.activations)?;
        let hook = match &a.hook {
            Some(h) => h.clone(),
            None => m.outputs.first().map(|o| o.hook.clone()).ok_or_else(|| {
                Error::empty(format!(
                    "{}: the harvest's list of outputs",
                    a.activations.display()
                ))
            })?,
        };
        let rows = m
            .outputs
            .iter()
            .find(|o| o.hook == hook)
            .map_or(0, |o| o.tokens);
        (
            m.hook_dir(&a.activations, &hook)?,
            rows,
            Some(hook),
            Some(m.model.clone()),
        )
    } else {
        (a.activations.clone(), 0, a.hook.clone(), None)
    };
    let mut src = ShardSource::from_dir(&dir, a.buffer_rows, cfg.seed)?;
    cfg.d_in = src.d_in();
    if let Some(arch) = a.architecture {
        cfg.architecture = arch;
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { cfg.$f = v; } )* };
    }
    set!(
        d_sae,
        k,
        l1_coefficient,
        batch_size,
        total_tokens,
        seed,
        dead_tokens_threshold,
        checkpoint_every
    );
    if a.lr.is_some() {
        cfg.lr = a.lr;
    }
    if cfg.total_tokens == 0 {
        cfg.total_tokens = rows;
    }
    if cfg.hook_name.is_none() {
        cfg.hook_name = hook;
    }
    if cfg.model_name.is_none() {
        cfg.model_name = model_name;
    }
    let t0 = std::time::Instant::now();
    cfg.progress = crate::progress::reporter(false);
    let r = train::train(&cfg, &mut src, Some(&a.out))?;
    let secs = t0.elapsed().as_secs_f64();
    let last = r.log.last();
    println!(
        "{}",
        serde_json::json!({
            "out": a.out.display().to_string(),
            "steps": r.log.len(),
            "tokens": last.map_or(0, |s| s.tokens),
            "seconds": secs,
            "tokens_per_s": last.map_or(0.0, |s| s.tokens as f64 / secs.max(1e-9)),
            "final_fvu": last.map(|s| s.fvu),
            "final_l0": last.map(|s| s.l0),
            "final_dead_fraction": last.map(|s| s.dead_fraction),
        })
    );
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let (mut m, tok) = load_model(&a.model, &load_opts(&a.load))?;
    let sae = Sae::load(&a.sae, &Device::Cpu)?;
    let files = corpus_files(&a.corpus)?;
    let ctx = Contexts::build(&tok, &files, a.context_len)?;
    let (_, held) = ctx.split(a.holdout_contexts)?;
    let held = match a.contexts {
        Some(n) => held.get(..n.min(held.len())).unwrap_or(held),
        None => held,
    };
    let mut cfg = EvalConfig::default();
    cfg.batch_size = a.batch_size;
    cfg.prefix_len = ctx.prefix_len;
    cfg.hook = a.hook;
    cfg.progress = crate::progress::reporter(false);
    let (r, acc) = evaluate(&mut m, &sae, held, &cfg)?;
    if let Some(p) = &a.histogram {
        plot_latent_density(acc.fire_counts(), acc.tokens(), p)?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(|e| Error::format("json", e.to_string()))?
        );
    } else {
        let v = serde_json::to_value(&r).map_err(|e| Error::format("json", e.to_string()))?;
        if let Some(o) = v.as_object() {
            for (k, v) in o {
                println!("{k:>18}: {v}");
            }
        }
    }
    Ok(())
}
