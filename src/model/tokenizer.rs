//! Tokenizers from GGUF metadata or `tokenizer.json`, stop tokens, and chat templates.
//!
//! GGUF: candle's `TokenizerFromGguf` builds the byte-level BPE but configures the
//! GPT-2 pre-tokenizer with a prefix space, so "The capital" would start with
//! "ĠThe". The model's own tokenizer (HF `tokenizer.json`) has
//! `add_prefix_space = false`, and SmolLM2 (`tokenizer.ggml.pre = smollm`) also
//! splits digits one per token; [`Tokenizer::from_gguf`] installs that pre-tokenizer.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;

use crate::{Error, Result};

/// A chat prompt format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    /// ChatML (`<|im_start|>role\n…<|im_end|>\n`), used by SmolLM2 and Qwen.
    ChatMl,
    /// Llama-3 instruct (`<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>`).
    Llama3,
}

/// A tokenizer with the model's stop tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    stop: Vec<u32>,
    bos: Option<u32>,
    template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("stop", &self.stop)
            .field("template", &self.template)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::format("tokenizer", e.to_string())
}

impl Tokenizer {
    /// Build the tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.model = gpt2`).
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (ct, _) = super::gguf::open(path)?;
        Self::from_gguf(&ct).map_err(|e| e.in_file(path))
    }

    /// Build the tokenizer from parsed GGUF content.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_gguf(ct).map_err(tok_err)?;
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
            .unwrap_or("gpt2");
        // candle leaves the GPT-2 default (prefix space) for every `pre` it does not
        // special-case; HF's byte-level tokenizers for these models add no prefix space.
        if !matches!(pre, "qwen2" | "smaug-bpe" | "lfm2" | "llama3") {
            let bl = ByteLevel::new(false, true, true);
            let pt: PreTokenizerWrapper = if pre == "smollm" {
                Sequence::new(vec![Digits::new(true).into(), bl.into()]).into()
            } else {
                bl.into()
            };
            inner.with_pre_tokenizer(Some(pt));
        }
        let id = |key: &str| {
            ct.metadata.get(key).and_then(|v| {
                v.to_u32()
                    .ok()
                    .or_else(|| v.to_i32().ok().map(|x| x as u32))
            })
        };
        let add_bos = ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let mut stop: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(e) = id("tokenizer.ggml.eot_token_id") {
            stop.push(e);
        }
        Ok(Self::finish(
            inner,
            stop,
            if add_bos {
                id("tokenizer.ggml.bos_token_id")
            } else {
                None
            },
        ))
    }

    /// Load `tokenizer.json` from a file or an HF model directory; stop tokens come from
    /// the directory's `generation_config.json` / `config.json` `eos_token_id` when present.
    pub fn from_hf(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (file, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), Some(path.to_path_buf()))
        } else {
            (path.to_path_buf(), path.parent().map(|p| p.to_path_buf()))
        };
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        // tokenizers 0.23 panics (`expect("Helper")`) on malformed JSON inside
        // `decoder`; parsing the file as JSON first makes every such file an error.
        // (A full parse: `IgnoredAny` skips strings without checking their escapes.)
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| Error::format("json", e.to_string()).in_file(&file))?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(e).in_file(&file))?;
        let mut stop = Vec::new();
        if let Some(dir) = dir {
            for name in ["generation_config.json", "config.json"] {
                let p = dir.join(name);
                let Ok(text) = std::fs::read_to_string(&p) else {
                    continue;
                };
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::format("json", e.to_string()).in_file(&p))?;
                match v.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => stop.extend(n.as_u64().map(|x| x as u32)),
                    Some(serde_json::Value::Array(a)) => {
                        stop.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                    }
                    _ => {}
                }
            }
        }
        // BOS is added by tokenizer.json's own post-processor where the model wants it.
        Ok(Self::finish(inner, stop, None))
    }

    fn finish(inner: tokenizers::Tokenizer, mut stop: Vec<u32>, bos: Option<u32>) -> Self {
        for t in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_text|>",
            "<|endoftext|>",
            "</s>",
        ] {
            if let Some(id) = inner.token_to_id(t) {
                stop.push(id);
            }
        }
        stop.sort_unstable();
        stop.dedup();
        let template = if inner.token_to_id("<|im_start|>").is_some() {
            Some(ChatTemplate::ChatMl)
        } else if inner.token_to_id("<|start_header_id|>").is_some() {
            Some(ChatTemplate::Llama3)
        } else {
            None
        };
        Tokenizer {
            inner,
            stop,
            bos,
            template,
        }
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) map to
    /// their ids; a BOS is prepended only when the model's tokenizer adds one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(tok_err)?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(b) = self.bos {
            if ids.first() != Some(&b) {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    /// Text of `ids` (special tokens kept unless `skip_special`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids that end generation (EOS, `<|im_end|>`, `<|eot_id|>`, …).
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop
    }

    /// The chat template this vocabulary implies, if any.
    pub fn chat_template(&self) -> Option<ChatTemplate> {
        self.template
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Format a single user message with the model's chat template, ready for generation.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        let t = self.template.ok_or_else(|| {
            Error::Invalid("this tokenizer has no known chat template (ChatML or Llama-3)".into())
        })?;
        Ok(t.render(&[("user", user)], true))
    }
}

impl ChatTemplate {
    /// Render `(role, content)` messages; `add_generation_prompt` opens the assistant turn.
    ///
    /// ChatML follows SmolLM2's template, which inserts its default system prompt when the
    /// first message is not a system message. Llama-3 leaves `<|begin_of_text|>` to the
    /// tokenizer (its `tokenizer.json` adds it).
    pub fn render(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> String {
        let mut s = String::new();
        match self {
            ChatTemplate::ChatMl => {
                if messages.first().is_none_or(|m| m.0 != "system") {
                    s.push_str("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n");
                }
                for (role, content) in messages {
                    s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
                }
                if add_generation_prompt {
                    s.push_str("<|im_start|>assistant\n");
                }
            }
            ChatTemplate::Llama3 => {
                for (role, content) in messages {
                    s.push_str(&format!(
                        "<|start_header_id|>{role}<|end_header_id|>\n\n{}<|eot_id|>",
                        content.trim()
                    ));
                }
                if add_generation_prompt {
                    s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
        }
        s
    }
}
