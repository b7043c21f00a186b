//! Activation harvesting: run a hooked model over a text corpus and stream the activations
//! at one or more hook points to disk as safetensors shards ([`ActivationStore`]).
//!
//! # Corpus, contexts and the held-out split
//! The corpus is a text file or a folder of `*.txt` files (read in name order; the default
//! is `assets/austen/*.txt`). Each file is tokenized with the model's tokenizer and the
//! token streams are concatenated, then cut into contexts of `context_len` tokens. When the
//! tokenizer adds a BOS token (what [`Tokenizer::encode`] of an empty string returns), every
//! context starts with it and holds `context_len − 1` corpus tokens. The first position of
//! every context (the BOS, or without one the first text token, which then acts as the
//! attention sink) is *not* written to the shards (its activations are outliers with a norm
//! far above the rest, which SAEs are not trained on) and is not spliced in [`crate::eval`]. A trailing partial context is dropped.
//!
//! The **last** `holdout_contexts` contexts of the stream (the end of the last file, for
//! the Austen default the end of *Sense and Sensibility*) are reserved for evaluation:
//! [`Contexts::split`] returns them, harvesting never reads them, and `sae-ablate eval`
//! uses them by default. Harvest and eval must use the same `context_len` and
//! `holdout_contexts` to stay disjoint. A harvest with a token budget tokenizes only the
//! first files that hold its contexts and the held-out count after them
//! ([`Contexts::build_first`]): the same training contexts, without tokenizing the rest.
//!
//! # Output
//! `out_dir/manifest.json` ([`Manifest`]) and, per hook point, `out_dir/<hook>/shard_NNNNN.safetensors`
//! activation shards (below; f16 by default, or f32 or bf16). Every file is written to a temporary
//! name and renamed.
//!
//! # Activation shards
//! A shard is a safetensors file holding one tensor named [`ACTIVATIONS_TENSOR`]
//! (`activations`) of shape `[n, d_in]` (row-major, one token per row) and dtype `F16`,
//! `BF16` or `F32`; other tensors and the `__metadata__` map are ignored. A dataset is any
//! number of shards with the same `d_in` (each `n` may differ, `n ≥ 1`): every
//! `*.safetensors` file of a folder, in name order ([`shard_paths`]). Training reads them
//! with [`crate::train::ShardSource`].
//!
//! # Cache
//! The manifest records the settings (model sha256, hooks, context length, token budget,
//! held-out size, dtype, shard size, corpus sha256) and each shard's sha256. A run whose
//! settings equal a manifest's does no model forward: it checks every shard's sha256 and
//! returns the cached manifest; a shard that is missing or whose hash differs is an error
//! naming the shard (delete the directory to harvest again).
//!
//! # Early stop
//! The forward pass stops right after the last needed hook point (a hook aborts it with a
//! private sentinel error), so the layers above it and the LM head are never run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::hooks::{ActivationCache, HookContext, HookPoint, Hooks};
use crate::io::sha256::{self, Sha256};
use crate::io::write_atomic;
use crate::model::{HookedModel, Tokenizer};
use crate::progress::Reporter;
use crate::{Error, FloatDtype, Result};

/// The tensor every activation shard holds (see "Activation shards" in the module docs).
pub const ACTIVATIONS_TENSOR: &str = "activations";

/// The activation shards of a folder: every `*.safetensors` file directly in `dir`, in
/// name order. Errors when there are none.
pub fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(Error::empty(format!(
            "{}: the folder's list of *.safetensors activation shards",
            dir.display()
        )));
    }
    Ok(paths)
}

/// The name of the manifest file in a harvest directory.
pub const MANIFEST: &str = "manifest.json";

const STOP: &str = "sae-ablate harvest: forward stopped after the last needed hook point";

/// The files of a corpus: `path` itself if it is a file, else the `*.txt` files of the
/// folder in name order. Errors when there are none.
pub fn corpus_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let rd = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    let mut files = Vec::new();
    for e in rd {
        let p = e.map_err(|e| Error::io(path, e))?.path();
        if p.is_file() && p.extension().is_some_and(|x| x == "txt") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::empty(format!(
            "{}: the corpus folder's list of .txt files (run scripts/fetch-assets.sh for the Austen default)",
            path.display()
        )));
    }
    Ok(files)
}

/// One context's token ids.
pub type Context = Vec<u32>;

/// A corpus tokenized into fixed-length contexts (see the module docs).
#[derive(Debug, Clone)]
pub struct Contexts {
    /// Every context, `context_len` tokens each, in corpus order.
    pub contexts: Vec<Vec<u32>>,
    /// Leading positions of each context left out of the activations (the BOS or the
    /// first token: always ≥ 1).
    pub prefix_len: usize,
    /// SHA-256 over the corpus files' names and bytes.
    pub corpus_sha256: String,
}

impl Contexts {
    /// Tokenize `files` with `tok` and cut the stream into contexts of `context_len` tokens.
    pub fn build(tok: &Tokenizer, files: &[PathBuf], context_len: usize) -> Result<Self> {
        Self::build_impl(tok, files, context_len, None)
    }

    /// The first contexts of the corpus, as [`Contexts::build`] cuts them: only as many
    /// files (in name order) as hold the contexts of the first `rows` activation rows
    /// plus `more` contexts after them, or all when the corpus is shorter. Every file
    /// still enters [`Contexts::corpus_sha256`]. A harvest with a token budget reads
    /// these: with `more` = the held-out count, [`Contexts::split`] gives it the same
    /// training contexts as the whole corpus would.
    pub fn build_first(
        tok: &Tokenizer,
        files: &[PathBuf],
        context_len: usize,
        rows: u64,
        more: usize,
    ) -> Result<Self> {
        Self::build_impl(tok, files, context_len, Some((rows, more)))
    }

    fn build_impl(
        tok: &Tokenizer,
        files: &[PathBuf],
        context_len: usize,
        need: Option<(u64, usize)>,
    ) -> Result<Self> {
        let prefix = tok.encode("")?;
        if context_len <= prefix.len() + 1 {
            return Err(Error::Invalid(format!(
                "context length {context_len} is too short (needs at least {} tokens)",
                prefix.len() + 2
            )));
        }
        let body = context_len - prefix.len();
        // Rows per context: what follows the prefix (at least the first token).
        let per_ctx = (context_len - prefix.len().max(1)) as u64;
        let want = need.map(|(rows, more)| {
            (rows.div_ceil(per_ctx) as usize)
                .saturating_add(more)
                .saturating_mul(body)
        });
        let mut h = Sha256::new();
        let mut texts = Vec::with_capacity(files.len());
        for f in files {
            let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            h.update(name.unwrap_or_default().as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
            texts.push(bytes);
        }
        // Files are tokenized in parallel (and a long file in pieces where the tokenizer
        // allows it, see `Tokenizer::encode`): all at once, or, for the first contexts
        // only, in rounds of as many files as should hold the tokens still missing (at
        // 8 bytes per token, about twice the usual) until the stream is long enough.
        let encode = |f: &PathBuf, bytes: &Vec<u8>| -> Result<Vec<u32>> {
            tok.encode(&String::from_utf8_lossy(bytes))
                .map_err(|e| e.in_file(f))
        };
        let mut stream: Vec<u32> = Vec::new();
        let mut next = 0;
        while next < files.len() {
            let round = match want {
                Some(w) if stream.len() >= w => break,
                Some(w) => {
                    let missing = (w - stream.len()).saturating_mul(8);
                    let mut bytes = 0;
                    let mut k = next;
                    while k < texts.len() && bytes < missing {
                        bytes += texts[k].len();
                        k += 1;
                    }
                    (k - next).max(1)
                }
                None => files.len() - next,
            };
            let end = (next + round).min(files.len());
            let ids: Vec<Vec<u32>> = files[next..end]
                .par_iter()
                .zip(&texts[next..end])
                .map(|(f, t)| encode(f, t))
                .collect::<Result<_>>()?;
            for ids in &ids {
                stream.extend_from_slice(ids.strip_prefix(prefix.as_slice()).unwrap_or(ids));
            }
            next = end;
        }
        let contexts = stream
            .chunks_exact(body)
            .map(|c| {
                let mut v = prefix.clone();
                v.extend_from_slice(c);
                v
            })
            .collect();
        Ok(Contexts {
            contexts,
            // Without a BOS the first token is the attention sink: its residual stream has a
            // norm far above every other position's, so it is left out just like a BOS.
            prefix_len: prefix.len().max(1),
            corpus_sha256: h.finalize_hex(),
        })
    }

    /// `(training, held_out)`: the held-out part is the last `holdout` contexts. Errors when
    /// the corpus has no more than `holdout` contexts.
    pub fn split(&self, holdout: usize) -> Result<(&[Context], &[Context])> {
        let n = self.contexts.len();
        if n <= holdout {
            return Err(Error::Invalid(format!(
                "the corpus has {n} contexts, not more than the {holdout} held out for evaluation"
            )));
        }
        Ok(self.contexts.split_at(n - holdout))
    }
}

/// What to harvest and where: [`HarvestConfig::default`], then set the fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HarvestConfig {
    /// Hook points to capture (TransformerLens names).
    pub hooks: Vec<String>,
    /// Tokens per context (BOS included).
    pub context_len: usize,
    /// Contexts per forward pass.
    pub batch_size: usize,
    /// Stop after this many activation rows per hook point (`None`: the whole training split).
    pub max_tokens: Option<u64>,
    /// Contexts at the end of the corpus reserved for evaluation.
    pub holdout_contexts: usize,
    /// The shards' dtype.
    pub dtype: FloatDtype,
    /// Rows per shard.
    pub shard_rows: usize,
    /// Where progress goes (nothing by default); not part of the cached settings.
    #[serde(skip)]
    pub progress: Reporter,
}

impl Default for HarvestConfig {
    /// `blocks.15.hook_resid_post`, 128-token contexts, batches of 8, the whole corpus,
    /// 64 held-out contexts, f16, 65536 rows per shard, no progress reports.
    fn default() -> Self {
        HarvestConfig {
            hooks: vec!["blocks.15.hook_resid_post".into()],
            context_len: 128,
            batch_size: 8,
            max_tokens: None,
            holdout_contexts: 64,
            dtype: FloatDtype::F16,
            shard_rows: 65536,
            progress: Reporter::none(),
        }
    }
}

/// The shards of one hook point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ShardEntry {
    /// File name inside the hook's folder.
    pub name: String,
    /// Rows in the shard.
    pub rows: u64,
    /// SHA-256 of the file.
    pub sha256: String,
}

/// One hook point's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HookEntry {
    /// The hook point's name.
    pub hook: String,
    /// The folder (relative to the harvest directory) holding its shards.
    pub dir: String,
    /// Activation width.
    pub d_in: usize,
    /// Total rows (= tokens) over its shards.
    pub tokens: u64,
    /// Its shards in order.
    pub shards: Vec<ShardEntry>,
}

/// `manifest.json`: the settings of a harvest and what it wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Manifest {
    /// The model file or directory as given.
    pub model: String,
    /// SHA-256 of the model file (of its files' hashes for a directory).
    pub model_sha256: String,
    /// SHA-256 of the corpus (see [`Contexts::corpus_sha256`]).
    pub corpus_sha256: String,
    /// The settings.
    pub config: HarvestConfig,
    /// Contexts run through the model.
    pub contexts: u64,
    /// Leading positions per context left out (BOS).
    pub prefix_len: usize,
    /// Activation rows per hook point.
    pub tokens: u64,
    /// Per hook point: its shards.
    pub outputs: Vec<HookEntry>,
}

impl Manifest {
    /// Read `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format("json", e.to_string()).in_file(&p))
    }

    /// The shard folder of `hook` inside the harvest directory `dir`.
    pub fn hook_dir(&self, dir: &Path, hook: &str) -> Result<PathBuf> {
        self.outputs
            .iter()
            .find(|o| o.hook == hook)
            .map(|o| dir.join(&o.dir))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: no activations for hook `{hook}` in the manifest",
                    dir.display()
                ))
            })
    }

    /// Check every shard's sha256 against the manifest; the error names the first bad shard.
    pub fn verify(&self, dir: &Path) -> Result<()> {
        for o in &self.outputs {
            for s in &o.shards {
                let p = dir.join(&o.dir).join(&s.name);
                if !p.is_file() {
                    return Err(Error::Invalid(format!(
                        "cached shard {} listed in {} is missing; delete {} to harvest again",
                        p.display(),
                        MANIFEST,
                        dir.display()
                    )));
                }
                let got = sha256::file_hex(&p)?;
                if got != s.sha256 {
                    return Err(Error::Checksum {
                        what: format!(
                            "cached shard {} is corrupted (delete {} to harvest again)",
                            p.display(),
                            dir.display()
                        ),
                        got,
                        want: format!("{} in {MANIFEST}", s.sha256),
                    });
                }
            }
        }
        Ok(())
    }
}

/// What [`ActivationStore::harvest`] did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HarvestReport {
    /// The manifest (read from the cache or just written).
    pub manifest: Manifest,
    /// Whether the cache was used (then no forward pass ran).
    pub cache_hit: bool,
    /// Forward passes run.
    pub forwards: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Activation rows per second (per hook point); 0 on a cache hit.
    pub tokens_per_s: f64,
    /// Seconds of the forward passes and shard writes alone (without tokenizing the
    /// corpus and hashing the model); 0 on a cache hit.
    pub loop_seconds: f64,
}

/// A harvest directory: activations of a model over a corpus, written once and then cached.
#[derive(Debug, Clone)]
pub struct ActivationStore {
    dir: PathBuf,
}

/// The safetensors dtype of shards of `d`.
fn st_dtype(d: FloatDtype) -> safetensors::Dtype {
    match d {
        FloatDtype::F32 => safetensors::Dtype::F32,
        FloatDtype::F16 => safetensors::Dtype::F16,
        FloatDtype::BF16 => safetensors::Dtype::BF16,
    }
}

/// Serialize `rows [n, d]` (already in the output dtype) to a safetensors shard, write it
/// atomically and return its sha256.
fn write_shard(
    path: &Path,
    bytes: &[u8],
    dt: safetensors::Dtype,
    n: usize,
    d: usize,
) -> Result<String> {
    let view = safetensors::tensor::TensorView::new(dt, vec![n, d], bytes)
        .map_err(|e| Error::format("safetensors", e.to_string()).in_file(path))?;
    let data = safetensors::tensor::serialize([(ACTIVATIONS_TENSOR, view)], None)
        .map_err(|e| Error::format("safetensors", e.to_string()).in_file(path))?;
    write_atomic(path, |w| w.write_all(&data).map_err(|e| Error::io(path, e)))?;
    Ok(sha256::hex_digest(&data))
}

struct ShardJob {
    hook: usize,
    path: PathBuf,
    name: String,
    bytes: Vec<u8>,
    rows: usize,
    /// Row width.
    d: usize,
}

impl ActivationStore {
    /// A store at `dir` (created on harvest).
    pub fn new(dir: impl AsRef<Path>) -> Self {
        ActivationStore {
            dir: dir.as_ref().to_path_buf(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest of a finished harvest, if any.
    pub fn manifest(&self) -> Result<Option<Manifest>> {
        if self.dir.join(MANIFEST).is_file() {
            Manifest::read(&self.dir).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Harvest the training split of `corpus` (see the module docs) from `model`
    /// (`model_path` identifies it in the manifest), or return the cached result.
    pub fn harvest(
        &self,
        model: &mut dyn HookedModel,
        tok: &Tokenizer,
        model_path: &Path,
        corpus: &Path,
        cfg: &HarvestConfig,
    ) -> Result<HarvestReport> {
        let t0 = Instant::now();
        if cfg.batch_size == 0 || cfg.shard_rows == 0 || cfg.hooks.is_empty() {
            return Err(Error::Invalid(
                "harvest needs at least one hook, batch size ≥ 1 and shard rows ≥ 1".into(),
            ));
        }
        let (dt, st_dt) = (DType::from(cfg.dtype), st_dtype(cfg.dtype));
        let points: Vec<HookPoint> = cfg.hooks.iter().map(|h| h.parse()).collect::<Result<_>>()?;
        for p in &points {
            p.validate(model.n_layers())?;
        }
        let files = corpus_files(corpus)?;
        let ctx = match cfg.max_tokens {
            Some(m) => {
                Contexts::build_first(tok, &files, cfg.context_len, m, cfg.holdout_contexts)?
            }
            None => Contexts::build(tok, &files, cfg.context_len)?,
        };
        let model_sha = crate::model::model_sha256(model_path)?;
        if let Some(m) = self.manifest()? {
            if m.config == *cfg
                && m.model_sha256 == model_sha
                && m.corpus_sha256 == ctx.corpus_sha256
                && m.prefix_len == ctx.prefix_len
            {
                m.verify(&self.dir)?;
                return Ok(HarvestReport {
                    manifest: m,
                    cache_hit: true,
                    forwards: 0,
                    seconds: t0.elapsed().as_secs_f64(),
                    tokens_per_s: 0.0,
                    loop_seconds: 0.0,
                });
            }
        }
        let (train, per_ctx) = harvested_contexts(&ctx, cfg)?;
        let n_ctx = train.len();
        // Stale outputs from other settings must not mix with the new ones.
        if self.dir.join(MANIFEST).is_file() {
            std::fs::remove_file(self.dir.join(MANIFEST))
                .map_err(|e| Error::io(self.dir.join(MANIFEST), e))?;
        }
        let mut outputs = Vec::new();
        for p in &points {
            let name = p.to_string();
            let hd = self.dir.join(&name);
            if hd.is_dir() {
                std::fs::remove_dir_all(&hd).map_err(|e| Error::io(&hd, e))?;
            }
            std::fs::create_dir_all(&hd).map_err(|e| Error::io(&hd, e))?;
            outputs.push(HookEntry {
                hook: name.clone(),
                dir: name,
                d_in: model.hook_width(p),
                tokens: 0,
                shards: Vec::new(),
            });
        }
        let cache = ActivationCache::new();
        let mut hooks = Hooks::new();
        for p in &points {
            hooks.add(*p, cache.clone());
        }
        add_stop_hook(&mut hooks, &points, model.n_layers());
        let mut bar = cfg
            .progress
            .step("harvest", "tokens", train.len() as u64 * per_ctx);
        // A writer thread hashes and writes shards while the model runs.
        let (tx, rx) = std::sync::mpsc::sync_channel::<ShardJob>(2);
        let writer = std::thread::spawn(move || -> Result<Vec<(usize, ShardEntry)>> {
            let mut done = Vec::new();
            for job in rx {
                let sha = write_shard(&job.path, &job.bytes, st_dt, job.rows, job.d)?;
                done.push((
                    job.hook,
                    ShardEntry {
                        name: job.name,
                        rows: job.rows as u64,
                        sha256: sha,
                    },
                ));
            }
            Ok(done)
        });
        let elem = dt.size_in_bytes();
        let row_bytes = |o: &HookEntry| o.d_in * elem;
        let budget = cfg.max_tokens.unwrap_or(u64::MAX);
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); points.len()];
        let mut counts = vec![0usize; points.len()];
        let mut tokens: u64 = 0;
        let mut forwards = 0;
        let dev = model.device().clone();
        let dir = self.dir.clone();
        let send = |i: usize, buf: &mut Vec<u8>, c: &mut usize, rows: usize, o: &HookEntry| {
            let rest = buf.split_off(rows * row_bytes(o));
            let bytes = std::mem::replace(buf, rest);
            let name = format!("shard_{:05}.safetensors", *c);
            *c += 1;
            tx.send(ShardJob {
                hook: i,
                path: dir.join(&o.dir).join(&name),
                name,
                bytes,
                rows,
                d: o.d_in,
            })
            .map_err(|_| Error::Invalid("the shard writer stopped".into()))
        };
        let t_loop = Instant::now();
        let run = (|| -> Result<()> {
            for batch in train.chunks(cfg.batch_size) {
                let flat: Vec<u32> = batch.iter().flatten().copied().collect();
                let t = Tensor::from_vec(flat, (batch.len(), cfg.context_len), &dev)?;
                match model.forward(&t, 0, &mut hooks) {
                    Ok(_) => {}
                    Err(Error::Invalid(m)) if m == STOP => {}
                    Err(e) => return Err(e),
                }
                forwards += 1;
                // The token budget may end mid-batch: keep only the rows within it.
                let keep = (batch.len() as u64 * per_ctx).min(budget - tokens) as usize;
                for (i, p) in points.iter().enumerate() {
                    let a = cache.get(p)?.ok_or_else(|| {
                        Error::Invalid(format!("hook point {p} was not reached by the model"))
                    })?;
                    let a = a.narrow(1, ctx.prefix_len, cfg.context_len - ctx.prefix_len)?;
                    let d = model.hook_width(p);
                    let a = a.reshape(((), d))?.narrow(0, 0, keep)?.to_dtype(dt)?;
                    let (Some(buf), Some(o), Some(c)) =
                        (bufs.get_mut(i), outputs.get(i), counts.get_mut(i))
                    else {
                        continue;
                    };
                    match cfg.dtype {
                        FloatDtype::F16 => buf.extend(
                            a.flatten_all()?
                                .to_vec1::<half::f16>()?
                                .iter()
                                .flat_map(|v| v.to_le_bytes()),
                        ),
                        FloatDtype::BF16 => buf.extend(
                            a.flatten_all()?
                                .to_vec1::<half::bf16>()?
                                .iter()
                                .flat_map(|v| v.to_le_bytes()),
                        ),
                        FloatDtype::F32 => buf.extend(
                            a.flatten_all()?
                                .to_vec1::<f32>()?
                                .iter()
                                .flat_map(|v| v.to_le_bytes()),
                        ),
                    }
                    while buf.len() >= cfg.shard_rows * row_bytes(o) {
                        send(i, buf, c, cfg.shard_rows, o)?;
                    }
                }
                cache.clear();
                tokens += keep as u64;
                bar.inc(keep as u64);
                if tokens >= budget {
                    break;
                }
            }
            for (i, o) in outputs.iter().enumerate() {
                if let (Some(buf), Some(c)) = (bufs.get_mut(i), counts.get_mut(i)) {
                    if !buf.is_empty() {
                        let rows = buf.len() / row_bytes(o);
                        send(i, buf, c, rows, o)?;
                    }
                }
            }
            Ok(())
        })();
        drop(tx);
        let written = writer
            .join()
            .map_err(|_| Error::Invalid("the shard writer thread panicked".into()))?;
        let loop_seconds = t_loop.elapsed().as_secs_f64();
        run?;
        let written = written?;
        bar.finish();
        for (i, s) in written {
            if let Some(o) = outputs.get_mut(i) {
                o.tokens += s.rows;
                o.shards.push(s);
            }
        }
        let rows = outputs.first().map_or(0, |o| o.tokens);
        let manifest = Manifest {
            model: model_path.display().to_string(),
            model_sha256: model_sha,
            corpus_sha256: ctx.corpus_sha256.clone(),
            config: cfg.clone(),
            contexts: n_ctx as u64,
            prefix_len: ctx.prefix_len,
            tokens: rows,
            outputs,
        };
        let mp = self.dir.join(MANIFEST);
        write_atomic(&mp, |w| {
            serde_json::to_writer_pretty(&mut *w, &manifest)
                .map_err(|e| Error::format("json", e.to_string()).in_file(&mp))
        })?;
        let secs = t0.elapsed().as_secs_f64();
        Ok(HarvestReport {
            manifest,
            cache_hit: false,
            forwards,
            seconds: secs,
            tokens_per_s: rows as f64 / secs.max(1e-9),
            loop_seconds,
        })
    }
}

/// The training contexts a harvest with `cfg` reads (the first ones holding
/// `cfg.max_tokens` rows) and the rows each contributes.
fn harvested_contexts<'a>(ctx: &'a Contexts, cfg: &HarvestConfig) -> Result<(&'a [Context], u64)> {
    let (train, _) = ctx.split(cfg.holdout_contexts)?;
    let per_ctx = (cfg.context_len - ctx.prefix_len) as u64;
    let n_ctx = match cfg.max_tokens {
        Some(m) => (m.div_ceil(per_ctx) as usize).min(train.len()),
        None => train.len(),
    };
    let train = train.get(..n_ctx).unwrap_or(train);
    if train.is_empty() {
        return Err(Error::empty("the harvest's training split (zero contexts)"));
    }
    Ok((train, per_ctx))
}

/// Stop the forward pass right after the last of `points` in forward order.
fn add_stop_hook(hooks: &mut Hooks, points: &[HookPoint], n_layers: usize) {
    let order = HookPoint::all(n_layers);
    let last = points
        .iter()
        .copied()
        .max_by_key(|p| order.iter().position(|q| q == p).unwrap_or(usize::MAX))
        .unwrap_or(HookPoint::LnFinal);
    hooks.add(
        last,
        |_: &HookPoint, _: &Tensor, _: &HookContext| -> Result<Option<Tensor>> {
            Err(Error::Invalid(STOP.into()))
        },
    );
}
