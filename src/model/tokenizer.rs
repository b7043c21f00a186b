//! Tokenizers from GGUF metadata or `tokenizer.json`, stop tokens, and chat templates.
//!
//! Two vocabularies are read from GGUF metadata (`tokenizer.ggml.model`):
//! * `gpt2`, byte-level BPE (SmolLM2, Llama 3): candle's `TokenizerFromGguf` builds the
//!   `tokenizers` BPE but configures the GPT-2 pre-tokenizer with a prefix space, so "The
//!   capital" would start with "ĠThe". The model's own tokenizer (HF `tokenizer.json`) has
//!   `add_prefix_space = false`, and SmolLM2 (`tokenizer.ggml.pre = smollm`) also splits
//!   digits one per token; [`Tokenizer::from_gguf`] installs that pre-tokenizer.
//! * `llama`, SentencePiece (Gemma 3): tokens, scores and token types, encoded as llama.cpp
//!   encodes them (score-ordered merges, byte fallback, special tokens matched whole; see
//!   the `spm` module). `tokenizers` has no model that merges by score, so the crate
//!   implements this one itself.
//!
//! The chat template comes from the file's own template text (GGUF `tokenizer.chat_template`,
//! `tokenizer_config.json`'s `chat_template`), recognised by the markers it writes; a file
//! without one falls back to the ChatML / Llama-3 special tokens of its vocabulary.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;

use super::spm::Spm;
use crate::{Error, Result};

/// GGUF metadata keys of the tokenizer.
mod key {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const BOS: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS: &str = "tokenizer.ggml.eos_token_id";
    pub const EOT: &str = "tokenizer.ggml.eot_token_id";
    pub const UNK: &str = "tokenizer.ggml.unknown_token_id";
    pub const PAD: &str = "tokenizer.ggml.padding_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// A chat prompt format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChatTemplate {
    /// ChatML (`<|im_start|>role\n…<|im_end|>\n`), used by SmolLM2 and Qwen.
    ChatMl,
    /// Llama-3 instruct (`<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>`).
    Llama3,
    /// Gemma instruct (`<start_of_turn>user\n…<end_of_turn>\n<start_of_turn>model\n`).
    Gemma,
}

/// The tokenizer behind a [`Tokenizer`].
#[derive(Clone)]
enum Backend {
    /// Byte-level BPE (GGUF `gpt2`, `tokenizer.json`), run by `tokenizers`.
    Hf(Box<tokenizers::Tokenizer>),
    /// A SentencePiece vocabulary (GGUF `llama`), run by this crate.
    Spm(Box<Spm>),
}

impl Backend {
    fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Backend::Hf(t) => t.token_to_id(token),
            Backend::Spm(v) => v.token_to_id(token),
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            Backend::Hf(t) => t.get_vocab_size(true),
            Backend::Spm(v) => v.len(),
        }
    }
}

/// A tokenizer with the model's stop tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    backend: Backend,
    stop: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    template: Option<ChatTemplate>,
    /// Whether long texts may be encoded in pieces (see [`cut_points`]): only for the
    /// byte-level BPE pipeline this crate builds itself, where that gives the same ids.
    pieces: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field(
                "kind",
                &match self.backend {
                    Backend::Hf(_) => "bpe",
                    Backend::Spm(_) => "sentencepiece",
                },
            )
            .field("vocab", &self.backend.vocab_size())
            .field("stop", &self.stop)
            .field("bos", &self.bos)
            .field("template", &self.template)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::format("tokenizer", e.to_string())
}

fn meta_err(msg: impl Into<String>) -> Error {
    Error::format("gguf", msg)
}

/// The name of a GGUF value's type, for error messages (never the value: arrays are long).
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::U8(_) => "u8",
        Value::I8(_) => "i8",
        Value::U16(_) => "u16",
        Value::I16(_) => "i16",
        Value::U32(_) => "u32",
        Value::I32(_) => "i32",
        Value::U64(_) => "u64",
        Value::I64(_) => "i64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

/// A non-negative integer of any GGUF integer type.
fn as_index(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// Typed reads of GGUF metadata; every error names the key.
struct Meta<'a>(&'a std::collections::HashMap<String, Value>);

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(meta_err(format!(
                "`{key}` is a {}, expected a string",
                type_name(v)
            ))),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(meta_err(format!(
                "`{key}` is a {}, expected a bool",
                type_name(v)
            ))),
        }
    }

    /// A token id, which must be below `n_vocab`.
    fn id(&self, key: &str, n_vocab: usize) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let id = as_index(v).ok_or_else(|| {
            meta_err(format!(
                "`{key}` is a {} {}, expected a token id",
                type_name(v),
                if matches!(v, Value::Array(_) | Value::String(_)) {
                    String::new()
                } else {
                    format!("({v:?})")
                }
            ))
        })?;
        match u32::try_from(id) {
            Ok(id) if (id as usize) < n_vocab => Ok(Some(id)),
            _ => Err(meta_err(format!(
                "`{key}` = {id} is not below the vocabulary size {n_vocab}"
            ))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(meta_err(format!(
                "`{key}` is a {}, expected an array",
                type_name(v)
            ))),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                v => Err(meta_err(format!(
                    "`{key}[{i}]` is a {}, expected a string",
                    type_name(v)
                ))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Scores: f32 or i32 entries (llama.cpp accepts both).
    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match *v {
                Value::F32(x) => Ok(x),
                Value::I32(x) => Ok(x as f32),
                ref v => Err(meta_err(format!(
                    "`{key}[{i}]` is a {}, expected an f32",
                    type_name(v)
                ))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i32>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match *v {
                Value::I32(x) => Ok(x),
                ref v => Err(meta_err(format!(
                    "`{key}[{i}]` is a {}, expected an i32",
                    type_name(v)
                ))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// Check that an array read for `key` has one entry per token.
fn same_len<T>(key: &str, v: &[T], n_tokens: usize) -> Result<()> {
    if v.len() == n_tokens {
        Ok(())
    } else {
        Err(meta_err(format!(
            "`{key}` has {} entries but `{}` has {n_tokens}",
            v.len(),
            key::TOKENS
        )))
    }
}

/// Pieces of a long text are about this many bytes.
const PIECE_BYTES: usize = 32 << 10;

/// Byte offsets that cut `text` into pieces of about `every` bytes: `0`, then the first
/// position at or after each `every` bytes past the last cut where an ASCII space follows
/// a printable ASCII character and precedes an ASCII letter, then `text.len()`.
///
/// Encoding the pieces one by one gives the ids of the whole text for the pipeline built
/// by [`Tokenizer::from_gguf`] for byte-level BPE (no normalizer; GPT-2's pre-tokenizer
/// regex, after single-digit splitting for SmolLM2; added tokens without whitespace that
/// do not start with a letter; nothing added around a text). Every alternative of that
/// regex can hold a space only as its first character, so the match holding the
/// character before the cut ends at the cut, and the next one, ` letters`, starts there;
/// matches read at most one character past their end, which the end of a piece stands in
/// for exactly; BPE merges stay within a match; and no added token can cross a space or
/// start at a letter.
fn cut_points(text: &str, every: usize) -> Vec<usize> {
    let b = text.as_bytes();
    let mut cuts = vec![0];
    let mut i = every.max(1);
    while i + 1 < b.len() {
        if b[i] == b' ' && b[i - 1].is_ascii_graphic() && b[i + 1].is_ascii_alphabetic() {
            cuts.push(i);
            i += every.max(1);
        } else {
            i += 1;
        }
    }
    cuts.push(b.len());
    cuts
}

/// Whether [`cut_points`]' pieces give a byte-level BPE tokenizer's ids exactly (its
/// conditions besides the pre-tokenizer, which the caller sets).
fn pieces_are_exact(t: &tokenizers::Tokenizer) -> bool {
    t.get_normalizer().is_none()
        && t.get_added_tokens_decoder().values().all(|a| {
            !a.content.chars().any(char::is_whitespace)
                && !a.content.chars().next().is_some_and(char::is_alphabetic)
        })
        && t.encode("", true).is_ok_and(|e| e.get_ids().is_empty())
}

impl Tokenizer {
    /// Build the tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.model` `gpt2`
    /// or `llama`); errors name the file and the metadata key at fault.
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (ct, _) = super::gguf::open(path)?;
        Self::from_gguf(&ct).map_err(|e| e.in_file(path))
    }

    /// Build the tokenizer from parsed GGUF content.
    ///
    /// * `gpt2`: byte-level BPE; a BOS is added when `tokenizer.ggml.add_bos_token` says so
    ///   (SmolLM2: no).
    /// * `llama`: SentencePiece; `add_bos_token` defaults to true and `add_space_prefix` to
    ///   true, `add_eos_token` to false, and the BOS / EOS / unknown ids to 1 / 2 / 0, as in
    ///   llama.cpp. Gemma 3 sets BOS 2, no space prefix.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let meta = Meta(&ct.metadata);
        let model = meta
            .string(key::MODEL)?
            .ok_or_else(|| meta_err(format!("missing `{}`", key::MODEL)))?;
        let template = meta
            .string(key::CHAT_TEMPLATE)?
            .and_then(ChatTemplate::detect);
        match model {
            "gpt2" => Self::bpe_from_gguf(ct, &meta, template),
            "llama" => Self::spm_from_gguf(&meta, template),
            other => Err(meta_err(format!(
                "`{}` = `{other}` is not supported (supported: gpt2, llama)",
                key::MODEL
            ))),
        }
    }

    fn bpe_from_gguf(
        ct: &gguf_file::Content,
        meta: &Meta,
        template: Option<ChatTemplate>,
    ) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_gguf(ct).map_err(tok_err)?;
        let pre = meta.string(key::PRE)?.unwrap_or("gpt2");
        // candle leaves the GPT-2 default (prefix space) for every `pre` it does not
        // special-case; HF's byte-level tokenizers for these models add no prefix space.
        let own_pre = !matches!(pre, "qwen2" | "smaug-bpe" | "lfm2" | "llama3");
        if own_pre {
            let bl = ByteLevel::new(false, true, true);
            let pt: PreTokenizerWrapper = if pre == "smollm" {
                Sequence::new(vec![Digits::new(true).into(), bl.into()]).into()
            } else {
                bl.into()
            };
            inner.with_pre_tokenizer(Some(pt));
        }
        let pieces = own_pre && pieces_are_exact(&inner);
        let n = inner.get_vocab_size(true);
        let mut stop: Vec<u32> = meta.id(key::EOS, n)?.into_iter().collect();
        stop.extend(meta.id(key::EOT, n)?);
        let bos = if meta.bool(key::ADD_BOS)?.unwrap_or(false) {
            meta.id(key::BOS, n)?
        } else {
            None
        };
        let mut tok = Self::finish(Backend::Hf(Box::new(inner)), stop, bos, None, template);
        tok.pieces = pieces;
        Ok(tok)
    }

    fn spm_from_gguf(meta: &Meta, template: Option<ChatTemplate>) -> Result<Self> {
        let tokens = meta
            .strings(key::TOKENS)?
            .ok_or_else(|| meta_err(format!("missing `{}`", key::TOKENS)))?;
        let n = tokens.len();
        let scores = meta.floats(key::SCORES)?.unwrap_or_else(|| vec![0.0; n]);
        same_len(key::SCORES, &scores, n)?;
        let types = meta.ints(key::TOKEN_TYPE)?.unwrap_or_else(|| vec![1; n]);
        same_len(key::TOKEN_TYPE, &types, n)?;
        let add_space_prefix = meta.bool(key::ADD_SPACE_PREFIX)?.unwrap_or(true);
        let mut spm = Spm::new(tokens, scores, types, add_space_prefix)?;
        // llama.cpp's defaults for SentencePiece vocabularies, where in range.
        let default = |id: u32| ((id as usize) < n).then_some(id);
        let bos = meta.id(key::BOS, n)?.or(default(1));
        let eos = meta.id(key::EOS, n)?.or(default(2));
        spm.set_unknown(meta.id(key::UNK, n)?.or(default(0)));
        meta.id(key::PAD, n)?;
        let add_bos = meta.bool(key::ADD_BOS)?.unwrap_or(true);
        let add_eos = meta.bool(key::ADD_EOS)?.unwrap_or(false);
        let mut stop: Vec<u32> = eos.into_iter().collect();
        stop.extend(meta.id(key::EOT, n)?);
        Ok(Self::finish(
            Backend::Spm(Box::new(spm)),
            stop,
            if add_bos { bos } else { None },
            if add_eos { eos } else { None },
            template,
        ))
    }

    /// Load `tokenizer.json` from a file or an HF model directory; stop tokens come from
    /// the directory's `generation_config.json` / `config.json` `eos_token_id` when present,
    /// the chat template from its `tokenizer_config.json` `chat_template`.
    pub fn from_hf(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (file, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), Some(path.to_path_buf()))
        } else {
            (path.to_path_buf(), path.parent().map(|p| p.to_path_buf()))
        };
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        // tokenizers 0.23 panics (its own `Helper` assertion) on malformed JSON inside
        // `decoder`; parsing the file as JSON first makes every such file an error.
        // (A full parse: `IgnoredAny` skips strings without checking their escapes.)
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| Error::format("json", e.to_string()).in_file(&file))?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(e).in_file(&file))?;
        let mut stop = Vec::new();
        let mut template = None;
        if let Some(dir) = dir {
            for name in ["generation_config.json", "config.json"] {
                let Some(v) = read_json(&dir.join(name))? else {
                    continue;
                };
                match v.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => stop.extend(n.as_u64().map(|x| x as u32)),
                    Some(serde_json::Value::Array(a)) => {
                        stop.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                    }
                    _ => {}
                }
            }
            if let Some(v) = read_json(&dir.join("tokenizer_config.json"))? {
                template = hf_chat_template(&v).and_then(ChatTemplate::detect);
            }
        }
        // BOS is added by tokenizer.json's own post-processor where the model wants it.
        Ok(Self::finish(
            Backend::Hf(Box::new(inner)),
            stop,
            None,
            None,
            template,
        ))
    }

    fn finish(
        backend: Backend,
        mut stop: Vec<u32>,
        bos: Option<u32>,
        eos: Option<u32>,
        template: Option<ChatTemplate>,
    ) -> Self {
        for t in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_text|>",
            "<|endoftext|>",
            "</s>",
            "<end_of_turn>",
        ] {
            if let Some(id) = backend.token_to_id(t) {
                stop.push(id);
            }
        }
        stop.sort_unstable();
        stop.dedup();
        // Without a template text in the file, the ChatML / Llama-3 markers in the
        // vocabulary decide. Gemma's `<start_of_turn>` is in every Gemma vocabulary,
        // base models' included, so only a template text selects Gemma.
        let template = template.or_else(|| {
            if backend.token_to_id("<|im_start|>").is_some() {
                Some(ChatTemplate::ChatMl)
            } else if backend.token_to_id("<|start_header_id|>").is_some() {
                Some(ChatTemplate::Llama3)
            } else {
                None
            }
        });
        Tokenizer {
            backend,
            stop,
            bos,
            eos,
            template,
            pieces: false,
        }
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`,
    /// `<start_of_turn>`) map to their ids. A BOS is prepended only when the model's
    /// tokenizer adds one (Gemma: yes, SmolLM2: no), and not twice when the text already
    /// starts with it; an EOS is appended only when a SentencePiece vocabulary asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = match &self.backend {
            Backend::Hf(t) if self.pieces && text.len() >= 2 * PIECE_BYTES => {
                use rayon::prelude::*;
                let cuts = cut_points(text, PIECE_BYTES);
                let parts: Vec<Vec<u32>> = cuts
                    .par_windows(2)
                    .map(|w| {
                        let piece = text.get(w[0]..w[1]).unwrap_or_default();
                        Ok(t.encode(piece, true).map_err(tok_err)?.get_ids().to_vec())
                    })
                    .collect::<Result<_>>()?;
                parts.concat()
            }
            Backend::Hf(t) => t.encode(text, true).map_err(tok_err)?.get_ids().to_vec(),
            Backend::Spm(v) => {
                let mut ids = Vec::with_capacity(text.len() / 3 + 2);
                v.encode(text, &mut ids)?;
                ids
            }
        };
        if let Some(b) = self.bos {
            if ids.first() != Some(&b) {
                ids.insert(0, b);
            }
        }
        ids.extend(self.eos);
        Ok(ids)
    }

    /// Text of `ids` (special tokens kept unless `skip_special`). For a SentencePiece
    /// vocabulary an id outside the vocabulary is an error naming it; byte-level BPE
    /// vocabularies skip such ids, as `tokenizers` does (models may have more embedding rows
    /// than tokens).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.backend {
            Backend::Hf(t) => t.decode(ids, skip_special).map_err(tok_err),
            Backend::Spm(v) => v.decode(ids, skip_special),
        }
    }

    /// The id of a token string as the vocabulary spells it, if it is in the vocabulary:
    /// byte-level BPE vocabularies (SmolLM2, Llama 3) write a leading space as `Ġ`
    /// (`"ĠParis"`), SentencePiece ones (Gemma) as `▁`. To look up a piece of text, use
    /// [`Tokenizer::single_token`].
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.backend.token_to_id(token)
    }

    /// The id of `text` when it is exactly one token (`" Paris"`, with its leading space as
    /// it follows another word), e.g. to read `log p(" Paris")` from the logits. The BOS and
    /// EOS that [`Tokenizer::encode`] adds are not counted. When `text` is several tokens
    /// (or none) the error lists them, so the caller can pick one or change the text.
    ///
    /// ```no_run
    /// # fn main() -> sae_ablate::Result<()> {
    /// let (_, tok) = sae_ablate::model::load("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ///     &Default::default())?;
    /// let paris = tok.single_token(" Paris")?;
    /// assert_eq!(tok.id_to_token(paris).as_deref(), Some("ĠParis"));
    /// # Ok(()) }
    /// ```
    pub fn single_token(&self, text: &str) -> Result<u32> {
        let mut ids = self.encode(text)?;
        if self.eos.is_some() && ids.last() == self.eos.as_ref() {
            ids.pop();
        }
        if self.bos.is_some() && ids.first() == self.bos.as_ref() {
            ids.remove(0);
        }
        match ids.as_slice() {
            [id] => Ok(*id),
            _ => {
                let pieces: Vec<String> = ids
                    .iter()
                    .map(|&i| format!("{i} {:?}", self.id_to_token(i).unwrap_or_default()))
                    .collect();
                Err(Error::Invalid(format!(
                    "{text:?} is not a single token: it encodes to {} token(s) [{}] \
                     (a word after a space needs its leading space, e.g. \" Paris\")",
                    ids.len(),
                    pieces.join(", ")
                )))
            }
        }
    }

    /// `text`'s token ids (as [`Tokenizer::encode`]) as a `[1, n]` `u32` tensor on
    /// `device`: the input of [`HookedModel::forward`](crate::model::HookedModel::forward).
    pub fn encode_tensor(
        &self,
        text: &str,
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        let ids = self.encode(text)?;
        Ok(candle_core::Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?)
    }

    /// The string of a token id as the vocabulary stores it (`▁the`, `<0x0A>`), if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Hf(t) => t.id_to_token(id),
            Backend::Spm(v) => v.id_to_token(id).map(str::to_string),
        }
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.backend.vocab_size()
    }

    /// The BOS id that [`Tokenizer::encode`] prepends, if it prepends one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Token ids that end generation (EOS, `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, …).
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop
    }

    /// The chat template of the model, if it has one: from the template text in the file,
    /// else from the ChatML / Llama-3 special tokens of its vocabulary.
    pub fn chat_template(&self) -> Option<ChatTemplate> {
        self.template
    }

    /// The underlying `tokenizers` tokenizer of a byte-level BPE vocabulary (GGUF `gpt2`,
    /// `tokenizer.json`); `None` for a SentencePiece vocabulary, which the crate runs itself.
    pub fn inner(&self) -> Option<&tokenizers::Tokenizer> {
        match &self.backend {
            Backend::Hf(t) => Some(t),
            Backend::Spm(_) => None,
        }
    }

    /// Format a single user message with the model's chat template, ready for generation.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        let t = self.template.ok_or_else(|| {
            Error::Invalid(
                "this model has no chat template: its file has no template text \
                 (`tokenizer.chat_template` / `chat_template`) and its vocabulary has no \
                 ChatML or Llama-3 markers (a base model, such as Gemma 3 270M, has none)"
                    .into(),
            )
        })?;
        Ok(t.render(&[("user", user)], true))
    }
}

/// Parse a JSON file if it exists; a file that exists but does not parse is an error.
fn read_json(p: &Path) -> Result<Option<serde_json::Value>> {
    let Ok(text) = std::fs::read_to_string(p) else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::format("json", e.to_string()).in_file(p))
}

/// `chat_template` of a `tokenizer_config.json`: a string, or a list of named templates
/// (the one named `default`, else the first).
fn hf_chat_template(config: &serde_json::Value) -> Option<&str> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|x| x.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str()),
        _ => None,
    }
}

impl ChatTemplate {
    /// The format a chat template text (GGUF `tokenizer.chat_template`, HF
    /// `chat_template`) writes, recognised by its turn markers: `<|im_start|>` (ChatML),
    /// `<|start_header_id|>` (Llama-3), `<start_of_turn>` (Gemma). `None` for any other.
    pub fn detect(template: &str) -> Option<ChatTemplate> {
        [
            ("<|im_start|>", ChatTemplate::ChatMl),
            ("<|start_header_id|>", ChatTemplate::Llama3),
            ("<start_of_turn>", ChatTemplate::Gemma),
        ]
        .into_iter()
        .find(|(marker, _)| template.contains(marker))
        .map(|(_, t)| t)
    }

    /// Render `(role, content)` messages; `add_generation_prompt` opens the assistant turn.
    ///
    /// * ChatML follows SmolLM2's template, which inserts its default system prompt when
    ///   the first message is not a system message.
    /// * Llama-3 leaves `<|begin_of_text|>` to the tokenizer (its `tokenizer.json` adds it).
    /// * Gemma follows Gemma 3's template: the role `assistant` is written `model`, contents
    ///   are trimmed, and since Gemma has no system role a leading system message becomes
    ///   a prefix of the first turn, followed by a blank line. `<bos>` is left to the
    ///   tokenizer ([`Tokenizer::encode`] adds it). The template's check that roles
    ///   alternate user / model is not repeated here.
    pub fn render(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> String {
        match self {
            ChatTemplate::ChatMl => render_chatml(messages, add_generation_prompt),
            ChatTemplate::Llama3 => render_llama3(messages, add_generation_prompt),
            ChatTemplate::Gemma => render_gemma(messages, add_generation_prompt),
        }
    }
}

fn render_chatml(messages: &[(&str, &str)], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    if messages.first().is_none_or(|m| m.0 != "system") {
        s.push_str("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n");
    }
    for (role, content) in messages {
        s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    if add_generation_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

fn render_llama3(messages: &[(&str, &str)], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    for (role, content) in messages {
        s.push_str(&format!(
            "<|start_header_id|>{role}<|end_header_id|>\n\n{}<|eot_id|>",
            content.trim()
        ));
    }
    if add_generation_prompt {
        s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
    }
    s
}

fn render_gemma(messages: &[(&str, &str)], add_generation_prompt: bool) -> String {
    let (mut prefix, turns) = match messages.split_first() {
        Some((("system", system), rest)) => (format!("{system}\n\n"), rest),
        _ => (String::new(), messages),
    };
    let mut s = String::new();
    for (role, content) in turns {
        let role = if *role == "assistant" { "model" } else { role };
        s.push_str(&format!(
            "<start_of_turn>{role}\n{prefix}{}<end_of_turn>\n",
            content.trim()
        ));
        prefix.clear();
    }
    if add_generation_prompt {
        s.push_str("<start_of_turn>model\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> crate::Result<Tokenizer> {
        let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            p.is_file(),
            "{} is missing: run scripts/fetch-assets.sh",
            p.display()
        );
        Tokenizer::from_gguf_file(&p)
    }

    fn inner(t: &Tokenizer) -> &tokenizers::Tokenizer {
        match &t.backend {
            Backend::Hf(h) => h,
            Backend::Spm(_) => panic!("SmolLM2's tokenizer is byte-level BPE"),
        }
    }

    /// Encoding the pieces between every cut point the rule allows (not one per 32 KiB:
    /// every one) gives the ids of the whole text, on text made to stress GPT-2's regex
    /// and SmolLM2's digit splitting: contractions, runs of spaces, tabs and newlines,
    /// digits, punctuation runs, non-ASCII letters and a special token.
    #[test]
    fn pieces_cut_at_every_allowed_point_give_the_whole_texts_ids() -> crate::TestResult {
        let tok = smollm2()?;
        assert!(tok.pieces, "SmolLM2's tokenizer is encoded in pieces");
        let h = inner(&tok);
        let text = "It's 1813 and they'll say \"yes\"--no... Mr.  Darcy\t walked   in;\n\n  \
            the 42nd time. Élise's café: ßtraße ok!! 3.14159 x  y   z\r\nend <|im_start|>user \
            Über 12 o'clock, wasn't it? (a) [b] {c} a-b a_b a/b 100% $5 #1 @x é é  é";
        let whole = h.encode(text, true)?.get_ids().to_vec();
        let cuts = cut_points(text, 1);
        assert!(cuts.len() > 12, "{} cut points", cuts.len());
        let mut pieces = Vec::new();
        for w in cuts.windows(2) {
            pieces.extend_from_slice(h.encode(&text[w[0]..w[1]], true)?.get_ids());
        }
        assert_eq!(pieces, whole);
        Ok(())
    }

    /// Each of the six novels (up to 883 KB) encodes to the same ids in 32 KiB pieces
    /// (what `encode` does for long texts) as whole.
    #[test]
    fn novels_encode_the_same_in_pieces() -> crate::TestResult {
        let tok = smollm2()?;
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/austen");
        let mut n = 0;
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "txt") {
                let text = std::fs::read_to_string(&p)?;
                assert!(cut_points(&text, PIECE_BYTES).len() > 10, "{}", p.display());
                let whole = inner(&tok).encode(text.as_str(), true)?;
                assert_eq!(tok.encode(&text)?, whole.get_ids(), "{}", p.display());
                n += 1;
            }
        }
        assert_eq!(n, 6, "novels in {}", dir.display());
        Ok(())
    }
}
