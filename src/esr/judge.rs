//! The local judge: split an answer into attempts at explicit restart language, and score
//! each attempt's relevance to its prompt with the unsteered model itself.
//!
//! The ESR paper used an LLM judge (Claude) for both. This judge needs no network:
//!
//! - **Attempts.** An answer is cut before every restart phrase ([`RESTART_PHRASES`],
//!   matched case-insensitively as whole words opening a sentence), e.g. "Wait, that's
//!   not right" or "Let me try again"; the same words inside a sentence ("hold onto the
//!   mat", "then wait, covered, for an hour") are instructions, not restarts. Cuts closer
//!   than [`MIN_ATTEMPT_CHARS`] to the previous cut are merged (one restart sentence
//!   often holds two phrases; a restart in the first [`MIN_ATTEMPT_CHARS`] bytes is part
//!   of the first attempt), and empty pieces are dropped.
//! - **Relevance.** For an attempt `a` answering prompt `p`, with `q` a different prompt
//!   of the set (the one half the list away), the judge computes
//!   `Δ = mean log p(a | p) − mean log p(a | q)` over the attempt's first
//!   [`Judge::max_tokens`] tokens, each prompt rendered with the model's chat template and
//!   `a` as the assistant's reply. An answer about its own prompt is much likelier after
//!   that prompt (Δ > 0); text about something else is about as likely after any prompt
//!   (Δ ≈ 0). The score is `100 · clamp(Δ / Δ_ref, 0, 1)`, where `Δ_ref` is the median Δ
//!   of the model's own unsteered answers: a typical on-topic answer scores about 100 and
//!   an answer that ignores its prompt scores about 0.
//!
//! A second judge can apply the same rule with another model or another prompt rendering
//! ([`Judge::with_template`], [`JudgeTemplate::Plain`] for base models without a chat
//! template): the experiment reports how well the two rank the same attempts.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::hooks::Hooks;
use crate::model::{HookedModel, Tokenizer};
use crate::{Error, Result};

/// Restart phrases that start a new attempt (lower case; matched as whole words at the
/// start of a sentence, see [`split_attempts`]).
pub const RESTART_PHRASES: &[&str] = &[
    "wait,",
    "wait.",
    "wait!",
    "wait -",
    "hold on,",
    "hold on.",
    "hold on!",
    "that's not right",
    "that is not right",
    "that's not correct",
    "that is not correct",
    "that's wrong",
    "i made a mistake",
    "i apologize",
    "sorry, i",
    "sorry, that",
    "oops",
    "scratch that",
    "let me try again",
    "let me start over",
    "let me start again",
    "let me rephrase",
    "let me correct",
    "let me refocus",
    "let me get back",
    "let me go back",
    "let's get back",
    "let's start over",
    "let's try again",
    "actually, let me",
    "i got off track",
    "back to the question",
    "back to the topic",
    "getting back to",
];

/// Restart phrases closer than this many bytes to the previous cut join that cut.
pub const MIN_ATTEMPT_CHARS: usize = 40;

/// Whether byte `i` of `text` starts a sentence: only spaces, tabs and opening quotes or
/// emphasis marks (`"`, `'`, `*`, `_`, `(`) lie between it and a sentence end (`.`, `!`,
/// `?`, `:`, `;`, `…`, a dash) or a line break. The text's own start does not count.
fn sentence_start(text: &str, i: usize) -> bool {
    let before = text.get(..i).unwrap_or_default();
    let mut rest = before.chars().rev().skip_while(|c| {
        matches!(
            c,
            ' ' | '\t' | '"' | '\'' | '*' | '_' | '(' | '\u{201c}' | '\u{2018}'
        )
    });
    matches!(
        rest.next(),
        Some(
            '.' | '!' | '?' | ':' | ';' | '\n' | '\r' | '\u{2026}' | '\u{2014}' | '\u{2013}' | '-'
        )
    )
}

/// Split `text` into attempts (see the module docs): cut before every restart phrase that
/// opens a sentence and ends at a word boundary ("Hold on, …" cuts, "hold onto the mat"
/// and "then wait, …" do not). Always returns at least one attempt for non-blank text,
/// none for blank text.
pub fn split_attempts(text: &str) -> Vec<String> {
    // ASCII lower-casing keeps byte offsets, so cuts found in `lower` are valid in `text`.
    let lower = text.to_ascii_lowercase();
    let mut cuts: Vec<usize> = Vec::new();
    for (i, _) in lower.char_indices() {
        if i == 0 || !sentence_start(&lower, i) {
            continue;
        }
        let rest = lower.get(i..).unwrap_or_default();
        let whole_word = |p: &&str| {
            rest.starts_with(*p)
                && !rest
                    .get(p.len()..)
                    .and_then(|r| r.chars().next())
                    .is_some_and(char::is_alphanumeric)
        };
        if RESTART_PHRASES.iter().any(whole_word) {
            let last = cuts.last().copied().unwrap_or(0);
            if i - last >= MIN_ATTEMPT_CHARS {
                cuts.push(i);
            }
        }
    }
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &c in cuts.iter().chain(std::iter::once(&text.len())) {
        if let Some(piece) = text.get(start..c) {
            if !piece.trim().is_empty() {
                out.push(piece.trim().to_string());
            }
        }
        start = c;
    }
    out
}

/// How the judge renders a prompt before the attempt it scores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JudgeTemplate {
    /// The model's chat template, the attempt as the assistant's reply.
    Chat,
    /// Plain text: every `{prompt}` in the string is replaced by the prompt and the
    /// attempt follows directly (e.g. `"Question: {prompt}\nAnswer:\n"`).
    Plain(String),
}

impl JudgeTemplate {
    /// The text before the attempt for `prompt`.
    pub fn render(&self, tok: &Tokenizer, prompt: &str) -> Result<String> {
        match self {
            JudgeTemplate::Chat => tok.chat_prompt(prompt),
            JudgeTemplate::Plain(t) => Ok(t.replace("{prompt}", prompt)),
        }
    }
}

/// The relevance judge (see the module docs).
#[derive(Debug, Clone)]
pub struct Judge {
    /// Chat-rendered token ids of each prompt (the attempt is appended as the reply).
    prompts: Vec<Vec<u32>>,
    /// Token ids the tokenizer prepends to any text (a BOS), stripped from attempts.
    prefix: Vec<u32>,
    /// Attempts are scored on at most this many leading tokens.
    pub max_tokens: usize,
    /// `Δ` of a typical on-topic answer (the median over the unsteered answers).
    pub delta_ref: f64,
    /// Sequences per forward pass.
    pub batch_size: usize,
}

impl Judge {
    /// A judge over the chat-rendered `prompts` (at least two); `delta_ref` starts at 1
    /// until [`Judge::calibrate`] sets it.
    pub fn new(
        tok: &Tokenizer,
        prompts: &[&str],
        max_tokens: usize,
        batch_size: usize,
    ) -> Result<Self> {
        Self::with_template(tok, prompts, &JudgeTemplate::Chat, max_tokens, batch_size)
    }

    /// [`Judge::new`] with the prompts rendered by `template`.
    pub fn with_template(
        tok: &Tokenizer,
        prompts: &[&str],
        template: &JudgeTemplate,
        max_tokens: usize,
        batch_size: usize,
    ) -> Result<Self> {
        if prompts.len() < 2 || max_tokens == 0 || batch_size == 0 {
            return Err(Error::Invalid(format!(
                "the judge needs at least 2 prompts (got {}), max_tokens ≥ 1 and batch_size ≥ 1",
                prompts.len()
            )));
        }
        let ids = prompts
            .iter()
            .map(|p| tok.encode(&template.render(tok, p)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Judge {
            prompts: ids,
            prefix: tok.encode("")?,
            max_tokens,
            delta_ref: 1.0,
            batch_size,
        })
    }

    /// The prompt an attempt at prompt `i` is contrasted with.
    pub fn other(&self, i: usize) -> usize {
        (i + self.prompts.len() / 2) % self.prompts.len()
    }

    /// Set `delta_ref` to the median of `deltas` (the unsteered answers' Δ). Errors when
    /// it is not positive: the model's own answers would then not be about their prompts,
    /// and no score could be trusted.
    pub fn calibrate(&mut self, deltas: &[f64]) -> Result<f64> {
        let m = median(deltas);
        if !(m.is_finite() && m > 0.0) {
            return Err(Error::Invalid(format!(
                "judge calibration: the unsteered answers' median Δ is {m}; it must be > 0 \
                 (the answers are not more likely after their own prompt than after another)"
            )));
        }
        self.delta_ref = m;
        Ok(m)
    }

    /// Map a Δ to a 0–100 relevance score.
    pub fn score(&self, delta: f64) -> f64 {
        (100.0 * delta / self.delta_ref).clamp(0.0, 100.0)
    }

    /// `Δ` for each `(prompt index, attempt text)` (see the module docs).
    ///
    /// Every attempt scored after the same prompt shares that prompt's cached prefix: it
    /// is prefilled once per prompt and [forked](HookedModel::fork_cache) into each batch,
    /// so only the attempts' own tokens go through the model again.
    pub fn deltas(
        &self,
        model: &mut dyn HookedModel,
        tok: &Tokenizer,
        items: &[(usize, &str)],
    ) -> Result<Vec<f64>> {
        // by_prompt[p] = (slot in the output [2 per item: own, other], attempt ids).
        let mut by_prompt: Vec<Vec<(usize, Vec<u32>)>> = vec![Vec::new(); self.prompts.len()];
        for (k, &(i, text)) in items.iter().enumerate() {
            let ids = tok.encode(text)?;
            let body = ids.strip_prefix(self.prefix.as_slice()).unwrap_or(&ids);
            let body = body.get(..self.max_tokens.min(body.len())).unwrap_or(body);
            for (j, p) in [i, self.other(i)].into_iter().enumerate() {
                by_prompt
                    .get_mut(p)
                    .ok_or_else(|| Error::Invalid(format!("judge: prompt index {p} out of range")))?
                    .push((2 * k + j, body.to_vec()));
            }
        }
        let mut lp = vec![0f64; 2 * items.len()];
        for (ctx, group) in self.prompts.iter().zip(&by_prompt) {
            if group.is_empty() {
                continue;
            }
            let bodies: Vec<&[u32]> = group.iter().map(|(_, b)| b.as_slice()).collect();
            let vals = mean_logprobs_after(model, ctx, &bodies, self.batch_size)?;
            for ((slot, _), v) in group.iter().zip(vals) {
                if let Some(x) = lp.get_mut(*slot) {
                    *x = v;
                }
            }
        }
        Ok(lp.chunks_exact(2).map(|c| c[0] - c[1]).collect())
    }
}

/// Median of `v` (NaN for an empty slice).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// Right-pad `seqs` (repeating each row's first token; causal attention keeps the padding
/// out of every real position) into one `[rows, t]` batch; `t` is the longest length.
pub(crate) fn right_padded<'a>(
    seqs: impl ExactSizeIterator<Item = &'a [u32]> + Clone,
    dev: &candle_core::Device,
) -> Result<(Tensor, usize)> {
    let b = seqs.len();
    let t = seqs.clone().map(<[u32]>::len).max().unwrap_or(0).max(1);
    let mut flat = Vec::with_capacity(b * t);
    for s in seqs {
        flat.extend_from_slice(s);
        flat.extend(std::iter::repeat_n(
            s.first().copied().unwrap_or(0),
            t - s.len(),
        ));
    }
    Ok((Tensor::from_vec(flat, (b, t), dev)?, t))
}

/// For each body, the mean log-probability the model gives its tokens after `prefix`
/// (each token after the prefix and the body's tokens before it); `0` for an empty body.
///
/// The prefix (all but its last token) is prefilled once at batch 1; each batch of bodies
/// then continues a [forked](HookedModel::fork_cache) copy of that cache, right-padded
/// (causal attention keeps the padding out of every real position).
pub fn mean_logprobs_after(
    model: &mut dyn HookedModel,
    prefix: &[u32],
    bodies: &[&[u32]],
    batch_size: usize,
) -> Result<Vec<f64>> {
    let Some((&last, head)) = prefix.split_last() else {
        return Err(Error::Invalid(
            "mean_logprobs_after: the prefix must hold at least one token".into(),
        ));
    };
    let dev = model.device().clone();
    let hl = head.len();
    if hl > 0 {
        let t = Tensor::from_slice(head, (1, hl), &dev)?;
        model.forward_last(&t, 0, &mut Hooks::new())?;
    }
    let mut out = Vec::with_capacity(bodies.len());
    for chunk in bodies.chunks(batch_size.max(1)) {
        if chunk.iter().all(|b| b.is_empty()) {
            out.extend(std::iter::repeat_n(0.0, chunk.len()));
            continue;
        }
        // Row = the prefix's last token, then the body: position j predicts body[j].
        let rows: Vec<Vec<u32>> = chunk
            .iter()
            .map(|b| std::iter::once(last).chain(b.iter().copied()).collect())
            .collect();
        let b = rows.len();
        let (toks, t) = right_padded(rows.iter().map(Vec::as_slice), &dev)?;
        if hl > 0 {
            model.fork_cache(hl, b)?;
        }
        let mut next = Vec::with_capacity(b * t);
        for body in chunk {
            next.extend_from_slice(body);
            next.extend(std::iter::repeat_n(0, t - body.len()));
        }
        let logits = model.forward(&toks, hl, &mut Hooks::new())?;
        let lsm = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, 2)?;
        let tgt = Tensor::from_vec(next, (b, t), &dev)?.unsqueeze(2)?;
        let picked = lsm.gather(&tgt, 2)?.squeeze(2)?.to_vec2::<f32>()?;
        for (body, row) in chunk.iter().zip(&picked) {
            let vals = row.get(..body.len()).unwrap_or_default();
            out.push(if vals.is_empty() {
                0.0
            } else {
                vals.iter().map(|&v| v as f64).sum::<f64>() / vals.len() as f64
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_restart_language() {
        let a = split_attempts(
            "To bake bread, mix flour and water and knead the dough well. \
             Wait, that's not right! Let me try again. First, heat the oven.",
        );
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(a[0].starts_with("To bake bread"));
        assert!(a[1].starts_with("Wait, that's not right!"), "{a:?}");
    }

    #[test]
    fn no_split_inside_words_or_at_the_start() {
        assert_eq!(
            split_attempts("Await the dough's rise; it rises slowly.").len(),
            1
        );
        assert_eq!(
            split_attempts("Wait, first preheat the oven to 220 degrees.").len(),
            1
        );
        assert!(split_attempts("   ").is_empty());
    }

    #[test]
    fn only_sentence_openings_that_end_at_a_word_boundary_cut() {
        // Instructions that contain restart words: no cut.
        for t in [
            "1. Stand with your feet apart.\n2. Hold onto a wall or a chair as you begin.",
            "A flat tire can be a nightmare on the road. To get back on track with your car, \
             loosen the nuts first.",
            "Knead the dough for ten minutes, then wait, covered, for an hour to let it rise.",
            "Mix the flour and the water in a large bowl until smooth. Hold on tight to it.",
        ] {
            assert_eq!(split_attempts(t).len(), 1, "{t}");
        }
        // The same words opening a sentence, after a line break or a quote: a cut.
        for t in [
            "Mix the flour and the water in a large bowl until smooth.\nHold on, that's for bread.",
            "Mix the flour and the water in a large bowl until smooth. \"Oops, wrong recipe.",
            "Mix the flour and the water in a large bowl until smooth — wait, not that bowl.",
        ] {
            assert_eq!(split_attempts(t).len(), 2, "{t}");
        }
    }

    #[test]
    fn three_attempts() {
        let t = "Tomatoes need sun and a lot of regular watering every day. \
                 Oops, I was talking about something else entirely there. \
                 Let me start over: dig a hole twice as wide as the root ball.";
        let a = split_attempts(t);
        assert_eq!(a.len(), 3, "{a:?}");
        assert!(a[2].starts_with("Let me start over"));
    }

    #[test]
    fn median_is_the_middle() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
