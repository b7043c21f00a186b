//! Text generation with hooks live at prefill and at every decode step.
//!
//! During generation [`Hooks::prompt_len`] is set to the prompt length, so hooks
//! (e.g. an [`SaeSplice`](crate::hooks::SaeSplice) with
//! [`Positions::Generated`](crate::hooks::Positions)) can tell prompt positions from
//! generated ones.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::{HookedModel, Tokenizer};
use crate::hooks::Hooks;
use crate::rng::Rng;
use crate::{Error, Result};

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0` (or less) means greedy (argmax, lowest id on ties).
    pub temperature: f32,
    /// Nucleus sampling: sample from the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// HF-style repetition penalty over prompt and generated tokens (`1` = off).
    pub repetition_penalty: f32,
    /// Seed of the sampler's random numbers.
    pub seed: u64,
    /// Tokens that end generation (kept as the last generated id).
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 42,
            stop_tokens: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_new_tokens` tokens, stopping at the tokenizer's
    /// stop tokens ([`Tokenizer::stop_tokens`]: EOS, end of turn).
    pub fn greedy(max_new_tokens: usize, tokenizer: &Tokenizer) -> Self {
        SamplingParams {
            stop_tokens: tokenizer.stop_tokens().to_vec(),
            ..Self::greedy_exactly(max_new_tokens)
        }
    }

    /// Greedy decoding of exactly `max_new_tokens` tokens: no stop token ends it early
    /// (timings, comparisons of fixed-length continuations).
    pub fn greedy_exactly(max_new_tokens: usize) -> Self {
        SamplingParams {
            max_new_tokens,
            ..Default::default()
        }
    }

    fn check(&self) -> Result<()> {
        let ok = self.temperature.is_finite()
            && self.top_p > 0.0
            && self.top_p <= 1.0
            && self.repetition_penalty.is_finite()
            && self.repetition_penalty > 0.0;
        if !ok {
            return Err(Error::Invalid(format!(
                "bad sampling parameters: temperature = {} (finite), top_p = {} (in (0, 1]), \
                 repetition_penalty = {} (> 0)",
                self.temperature, self.top_p, self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Generation {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// The generated ids (a stop token, when hit, is the last one).
    pub ids: Vec<u32>,
    /// Whether generation ended on a stop token.
    pub stopped: bool,
}

/// Pick the next token from `logits` (one row) given the tokens so far.
pub fn sample(logits: &[f32], history: &[u32], p: &SamplingParams, rng: &mut Rng) -> Result<u32> {
    if logits.is_empty() {
        return Err(Error::empty("the logits row to sample from"));
    }
    let mut l = logits.to_vec();
    if p.repetition_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(x) = l.get_mut(t as usize) {
                *x = if *x > 0.0 {
                    *x / p.repetition_penalty
                } else {
                    *x * p.repetition_penalty
                };
            }
        }
    }
    let argmax = |l: &[f32]| {
        let mut best = 0usize;
        for (i, &x) in l.iter().enumerate() {
            if x > l[best] || (l[best].is_nan() && !x.is_nan()) {
                best = i;
            }
        }
        best as u32
    };
    if p.temperature <= 0.0 {
        return Ok(argmax(&l));
    }
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = l
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, (((x - max) / p.temperature) as f64).exp()))
        .filter(|(_, q)| *q > 0.0 && q.is_finite())
        .collect();
    if probs.is_empty() {
        return Ok(argmax(&l));
    }
    let z: f64 = probs.iter().map(|x| x.1).sum();
    // Descending probability, ties by id: a total order over distinct ids, so the
    // unstable sort gives the one order a stable sort would.
    probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        for (i, (_, q)) in probs.iter().enumerate() {
            cum += q / z;
            if cum >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    probs.truncate(keep);
    let zk: f64 = probs.iter().map(|x| x.1).sum();
    let mut r = rng.uniform() * zk;
    for &(id, q) in &probs {
        if r < q {
            return Ok(id);
        }
        r -= q;
    }
    Ok(probs.last().map(|x| x.0).unwrap_or(0))
}

/// Generate from `prompt` with `hooks` active at prefill and every decode step, until
/// `params.max_new_tokens` or a stop token (see [`generate_streaming`] to see each token
/// as it is chosen).
///
/// ```no_run
/// use sae_ablate::hooks::Hooks;
/// use sae_ablate::model::{self, generate, SamplingParams};
/// # fn main() -> sae_ablate::Result<()> {
/// let (mut m, tok) = model::load("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
///     &Default::default())?;
/// let prompt = tok.encode(&tok.chat_prompt("Tell me about Paris.")?)?;
/// let out = generate(&mut m, &prompt, &SamplingParams::greedy(64, &tok), &mut Hooks::new())?;
/// println!("{}", tok.decode(&out.ids, true)?);
/// # Ok(()) }
/// ```
pub fn generate<M: HookedModel + ?Sized>(
    model: &mut M,
    prompt: &[u32],
    params: &SamplingParams,
    hooks: &mut Hooks,
) -> Result<Generation> {
    generate_streaming(model, prompt, params, hooks, &mut |_| Ok(true))
}

/// [`generate`], calling `on_token` with each new id as soon as it is chosen; returning
/// `false` stops generation.
pub fn generate_streaming<M: HookedModel + ?Sized>(
    model: &mut M,
    prompt: &[u32],
    params: &SamplingParams,
    hooks: &mut Hooks,
    on_token: &mut dyn FnMut(u32) -> Result<bool>,
) -> Result<Generation> {
    params.check()?;
    if prompt.is_empty() {
        return Err(Error::empty("the prompt to generate from"));
    }
    if prompt.len() + params.max_new_tokens > model.max_seq_len() {
        return Err(Error::ContextLength {
            what: format!(
                "prompt of {} tokens + {} new tokens",
                prompt.len(),
                params.max_new_tokens
            ),
            tokens: prompt.len() + params.max_new_tokens,
            max: model.max_seq_len(),
        });
    }
    let dev = model.device().clone();
    let saved = hooks.prompt_len();
    hooks.set_prompt_len(Some(prompt.len()));
    let result: Result<(Vec<u32>, bool)> = (|| {
        let mut rng = Rng::new(params.seed);
        let mut history = prompt.to_vec();
        let mut out = Vec::new();
        let mut stopped = false;
        if params.max_new_tokens == 0 {
            return Ok((out, stopped));
        }
        let toks = Tensor::new(prompt, &dev)?.unsqueeze(0)?;
        let mut logits = model.forward_last(&toks, 0, hooks)?;
        loop {
            let row = logits
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let next = sample(&row, &history, params, &mut rng)?;
            out.push(next);
            history.push(next);
            let go_on = on_token(next)?;
            if params.stop_tokens.contains(&next) {
                stopped = true;
                break;
            }
            if !go_on || out.len() >= params.max_new_tokens {
                break;
            }
            let pos = history.len() - 1;
            let t = Tensor::new(&[next], &dev)?.unsqueeze(0)?;
            logits = model.forward_last(&t, pos, hooks)?;
        }
        Ok((out, stopped))
    })();
    hooks.set_prompt_len(saved);
    let (ids, stopped) = result?;
    Ok(Generation {
        prompt_ids: prompt.to_vec(),
        ids,
        stopped,
    })
}

/// Generate from several prompts at once: the prompts are left-padded to a common length
/// and decoded as one batch (each weight matrix is read once per step for all rows).
/// Hooks see `[batch, seq, d_model]` with the prompts ending at the same position
/// (`prompt_len` = the longest prompt). Row `b` samples with seed `params.seed + b`.
/// [`generate_batch_streaming`] streams the new ids as they are chosen.
pub fn generate_batch<M: HookedModel + ?Sized>(
    model: &mut M,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    hooks: &mut Hooks,
) -> Result<Vec<Generation>> {
    generate_batch_streaming(model, prompts, params, hooks, &mut |_, _| Ok(true))
}

/// [`generate_batch`], calling `on_token(row, id)` with each row's new ids as they are
/// chosen; returning `false` stops that row.
pub fn generate_batch_streaming<M: HookedModel + ?Sized>(
    model: &mut M,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    hooks: &mut Hooks,
    on_token: &mut dyn FnMut(usize, u32) -> Result<bool>,
) -> Result<Vec<Generation>> {
    params.check()?;
    if prompts.is_empty() {
        return Err(Error::empty("generate_batch's list of prompts"));
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::empty(format!("generate_batch's prompt {i}")));
    }
    let max_len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    if max_len + params.max_new_tokens > model.max_seq_len() {
        return Err(Error::ContextLength {
            what: format!(
                "longest prompt of {max_len} tokens + {} new tokens",
                params.max_new_tokens
            ),
            tokens: max_len + params.max_new_tokens,
            max: model.max_seq_len(),
        });
    }
    let b = prompts.len();
    let pads: Vec<usize> = prompts.iter().map(|p| max_len - p.len()).collect();
    let mut flat = Vec::with_capacity(b * max_len);
    for (p, &pad) in prompts.iter().zip(&pads) {
        // Padding repeats the first token: any valid id works, it is masked out.
        flat.extend(std::iter::repeat_n(p[0], pad));
        flat.extend_from_slice(p);
    }
    let dev = model.device().clone();
    let saved = hooks.prompt_len();
    hooks.set_prompt_len(Some(max_len));
    let result: Result<Vec<(Vec<u32>, bool)>> = (|| {
        let mut rngs: Vec<Rng> = (0..b)
            .map(|i| Rng::new(params.seed.wrapping_add(i as u64)))
            .collect();
        let mut history: Vec<Vec<u32>> = prompts.to_vec();
        let mut out: Vec<(Vec<u32>, bool)> = vec![(Vec::new(), false); b];
        let mut done = vec![params.max_new_tokens == 0; b];
        if done.iter().all(|&d| d) {
            return Ok(out);
        }
        let toks = Tensor::from_vec(flat, (b, max_len), &dev)?;
        let mut logits = model.forward_last_padded(&toks, 0, &pads, hooks)?;
        let mut pos = max_len;
        loop {
            let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            // Every row has its own generator, so sampling the rows in parallel picks
            // what sampling them in order would.
            let picks: Vec<Option<u32>> = rows
                .par_iter()
                .zip(rngs.par_iter_mut())
                .zip(history.par_iter().zip(done.par_iter()))
                .map(|((row, rng), (hist, &d))| {
                    if d {
                        Ok(None)
                    } else {
                        sample(row, hist, params, rng).map(Some)
                    }
                })
                .collect::<Result<_>>()?;
            let mut step = Vec::with_capacity(b);
            for (i, pick) in picks.into_iter().enumerate() {
                let Some(next) = pick else {
                    step.push(history[i].last().copied().unwrap_or(0));
                    continue;
                };
                history[i].push(next);
                out[i].0.push(next);
                step.push(next);
                let go_on = on_token(i, next)?;
                if params.stop_tokens.contains(&next) {
                    out[i].1 = true;
                    done[i] = true;
                } else if !go_on || out[i].0.len() >= params.max_new_tokens {
                    done[i] = true;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            let t = Tensor::from_vec(step, (b, 1), &dev)?;
            logits = model.forward_last_padded(&t, pos, &pads, hooks)?;
            pos += 1;
        }
        Ok(out)
    })();
    hooks.set_prompt_len(saved);
    Ok(result?
        .into_iter()
        .zip(prompts)
        .map(|((ids, stopped), p)| Generation {
            prompt_ids: p.clone(),
            ids,
            stopped,
        })
        .collect())
}
