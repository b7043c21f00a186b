//! Model families: what each one's files say and what its block looks like.
//!
//! A family file holds three things and nothing else:
//! * `hf(&HfConfig)`: its `config.json` (transformers 4.x and 5.x forms) with the
//!   defaults its HF config class applies to absent fields;
//! * `gguf(&Meta)`: its GGUF metadata keys (`{arch}.…`) and what llama.cpp fixes per
//!   architecture instead of storing it;
//! * its tensor-name differences (in [`Names`]).
//!
//! The decoder in [`super::decoder`] reads only the resulting [`ModelConfig`].

mod gemma;
mod llama;
mod qwen;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use super::config::{Family, KeySource, LayerKind, ModelConfig, RopeScaling, RopeStyle};
use crate::{Error, Result};

/// The supported architectures, for error messages.
pub(crate) fn supported_list() -> String {
    "llama, mistral, qwen2, qwen3, gemma2, gemma3 (HF model_type gemma3_text, or gemma3 with a text_config)"
        .into()
}

/// `config.json`, the fields any supported family reads. Absent fields are `None`; each
/// family applies its HF class's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct HfConfig {
    pub model_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub hidden_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub vocab_size: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    pub rope_local_base_freq: Option<f64>,
    /// Absent: `None`; `null`: `Some(None)`.
    #[serde(default, deserialize_with = "nullable")]
    pub sliding_window: Option<Option<usize>>,
    pub sliding_window_pattern: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub hidden_activation: Option<String>,
    pub query_pre_attn_scalar: Option<f64>,
    /// Absent: `None`; `null`: `Some(None)`.
    #[serde(default, deserialize_with = "nullable")]
    pub attn_logit_softcapping: Option<Option<f64>>,
    /// Absent: `None`; `null`: `Some(None)`.
    #[serde(default, deserialize_with = "nullable")]
    pub final_logit_softcapping: Option<Option<f64>>,
    pub text_config: Option<Box<HfConfig>>,
}

/// A field whose `null` means something else than its absence.
fn nullable<'de, D, T>(d: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Sizes an HF config class defaults when `config.json` leaves them out.
pub(crate) struct HfDefaults {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    /// `None`: as many as `heads`.
    pub kv_heads: Option<usize>,
    /// `None`: `hidden / heads`.
    pub head_dim: Option<usize>,
    pub max_pos: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub tied: bool,
}

impl HfConfig {
    /// The common sizes with the family's defaults; the block options stay Llama's.
    pub(crate) fn base(&self, family: Family, d: &HfDefaults) -> Result<ModelConfig> {
        let hidden = self.hidden_size.unwrap_or(d.hidden);
        let heads = self.num_attention_heads.unwrap_or(d.heads);
        let head_dim = match (self.head_dim, d.head_dim) {
            (Some(h), _) | (None, Some(h)) => h,
            (None, None) => hidden.checked_div(heads).ok_or_else(|| {
                Error::ModelConfig("config.json `num_attention_heads` is 0".into())
            })?,
        };
        let mut c = ModelConfig::llama_like(
            family,
            hidden,
            self.num_hidden_layers.unwrap_or(d.layers),
            heads,
            self.num_key_value_heads.or(d.kv_heads).unwrap_or(heads),
            head_dim,
            self.intermediate_size.unwrap_or(d.intermediate),
            self.vocab_size.unwrap_or(d.vocab),
        );
        c.max_seq_len = self.max_position_embeddings.unwrap_or(d.max_pos);
        c.rms_eps = self.rms_norm_eps.unwrap_or(d.rms_eps);
        c.tied_embeddings = self.tie_word_embeddings.unwrap_or(d.tied);
        c.rope_style = RopeStyle::Half;
        let (theta, scaling) = self.rope(None)?;
        c.rope_theta = theta.unwrap_or(d.rope_theta) as f32;
        c.rope_scaling = scaling;
        if self.mlp_bias == Some(true) {
            return Err(unsupported("mlp_bias", "true"));
        }
        c.layer_kinds = kinds(c.n_layers, |_| LayerKind::Global);
        Ok(c)
    }

    /// The RoPE base and scaling: `rope_parameters` (transformers 5.x; per layer type
    /// when `layer_type` is given and the dict is keyed by layer type) or `rope_theta` +
    /// `rope_scaling` (4.x). Unknown `rope_type`s are errors.
    pub(crate) fn rope(&self, layer_type: Option<&str>) -> Result<(Option<f64>, RopeScaling)> {
        if let Some(p) = &self.rope_parameters {
            let p = match (layer_type, p.get("full_attention")) {
                (_, None) => p,
                (Some(t), Some(_)) => p.get(t).ok_or_else(|| {
                    Error::ModelConfig(format!(
                        "config.json `rope_parameters` has no entry for `{t}`"
                    ))
                })?,
                (None, Some(full)) => full,
            };
            let theta = p
                .get("rope_theta")
                .and_then(|v| v.as_f64())
                .or(self.rope_theta);
            return Ok((theta, rope_scaling(p, "rope_parameters")?));
        }
        let scaling = match &self.rope_scaling {
            Some(s) if s.is_object() => rope_scaling(s, "rope_scaling")?,
            Some(serde_json::Value::Null) | None => RopeScaling::None,
            Some(other) => {
                return Err(Error::ModelConfig(format!(
                    "config.json `rope_scaling` = {other} is not an object"
                )))
            }
        };
        Ok((self.rope_theta, scaling))
    }

    /// Layer kinds from `layer_types` (5.x), or `None` when absent.
    pub(crate) fn layer_types(&self, n_layers: usize) -> Result<Option<Vec<LayerKind>>> {
        let Some(t) = &self.layer_types else {
            return Ok(None);
        };
        if t.len() != n_layers {
            return Err(Error::ModelConfig(format!(
                "config.json `layer_types` has {} entries for `num_hidden_layers` = {n_layers}",
                t.len()
            )));
        }
        t.iter()
            .map(|s| match s.as_str() {
                "full_attention" => Ok(LayerKind::Global),
                "sliding_attention" => Ok(LayerKind::Sliding),
                other => Err(unsupported("layer_types", other)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The MLP activation named by `hidden_act` / `hidden_activation`.
    pub(crate) fn activation(&self, default: &str) -> Result<super::config::Activation> {
        use super::config::Activation;
        let (key, name) = match (&self.hidden_activation, &self.hidden_act) {
            (Some(a), _) => ("hidden_activation", a.as_str()),
            (None, Some(a)) => ("hidden_act", a.as_str()),
            (None, None) => ("hidden_act", default),
        };
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_tanh" => Ok(Activation::GeluTanh),
            other => Err(unsupported(key, other)),
        }
    }
}

fn unsupported(key: &str, value: &str) -> Error {
    Error::ModelConfig(format!("config.json `{key}` = `{value}` is not supported"))
}

/// A `rope_scaling` / `rope_parameters` object.
fn rope_scaling(s: &serde_json::Value, key: &str) -> Result<RopeScaling> {
    let ty = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|x| x.as_str())
        .unwrap_or("default");
    let g = |k: &str| {
        s.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| Error::ModelConfig(format!("config.json `{key}` ({ty}) lacks `{k}`")))
    };
    match ty {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: g("factor")? as f32,
        }),
        "llama3" => {
            let orig = g("original_max_position_embeddings")?;
            if !(orig >= 1.0 && orig <= super::config::limits::CONTEXT as f64) {
                return Err(Error::ModelConfig(format!(
                    "config.json `{key}.original_max_position_embeddings` = {orig} is out of range"
                )));
            }
            Ok(RopeScaling::Llama3 {
                factor: g("factor")? as f32,
                low_freq_factor: g("low_freq_factor")? as f32,
                high_freq_factor: g("high_freq_factor")? as f32,
                original_max_position_embeddings: orig as usize,
            })
        }
        other => Err(Error::ModelConfig(format!(
            "config.json `{key}`: rope_type `{other}` is not supported (supported: default, linear, llama3)"
        ))),
    }
}

/// `config.json` as [`HfConfig`]. A value of the wrong type (a size past `u64`, negative
/// or fractional) is an error naming its key, which serde's message does not.
fn parse_hf(text: &str) -> Result<HfConfig> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::format("json", e.to_string()))?;
    HfConfig::deserialize(&v).map_err(|e| match bad_key(&v) {
        Some(key) => Error::ModelConfig(format!("config.json `{key}`: {e}")),
        None => Error::format("json", e.to_string()),
    })
}

/// The first key of a config object that [`HfConfig`] rejects on its own (`text_config.…`
/// inside the nested one).
fn bad_key(v: &serde_json::Value) -> Option<String> {
    let obj = v.as_object()?;
    for (k, val) in obj {
        let one = serde_json::Value::Object([(k.clone(), val.clone())].into_iter().collect());
        if HfConfig::deserialize(&one).is_err() {
            return Some(match (k.as_str(), bad_key(val)) {
                ("text_config", Some(inner)) => format!("text_config.{inner}"),
                _ => k.clone(),
            });
        }
    }
    None
}

/// The family of an HF `config.json`, and the config of its text model (a `gemma3`
/// checkpoint nests it in `text_config`).
pub(crate) fn hf_config(text: &str) -> Result<ModelConfig> {
    let v = parse_hf(text)?;
    let model_type = v.model_type.clone().unwrap_or_default();
    let arch0 = v
        .architectures
        .as_ref()
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or_default();
    let family = match (model_type.as_str(), arch0.as_str()) {
        ("llama", _) | ("", "LlamaForCausalLM") => Family::Llama,
        ("mistral", _) | ("", "MistralForCausalLM") => Family::Mistral,
        ("qwen2", _) | ("", "Qwen2ForCausalLM") => Family::Qwen2,
        ("qwen3", _) | ("", "Qwen3ForCausalLM") => Family::Qwen3,
        ("gemma2", _) | ("", "Gemma2ForCausalLM") => Family::Gemma2,
        ("gemma3_text", _) | ("", "Gemma3ForCausalLM") => Family::Gemma3,
        ("gemma3", _) => {
            let text = v.text_config.as_deref().ok_or_else(|| {
                Error::ModelConfig("config.json: a `gemma3` config without `text_config`".into())
            })?;
            let c = gemma::hf3(text)?;
            c.validate(KeySource::Hf)?;
            return Ok(c);
        }
        _ => {
            return Err(Error::UnsupportedModel {
                arch: if model_type.is_empty() {
                    arch0
                } else {
                    model_type
                },
                supported: supported_list(),
            })
        }
    };
    let c = match family {
        Family::Llama => llama::hf(&v)?,
        Family::Mistral => llama::hf_mistral(&v)?,
        Family::Qwen2 => qwen::hf2(&v)?,
        Family::Qwen3 => qwen::hf3(&v)?,
        Family::Gemma2 => gemma::hf2(&v)?,
        Family::Gemma3 => gemma::hf3(&v)?,
    };
    c.validate(KeySource::Hf)?;
    Ok(c)
}

/// GGUF metadata with its architecture prefix.
pub(crate) struct Meta<'a> {
    pub ct: &'a gguf_file::Content,
    pub arch: &'a str,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&gguf_file::Value> {
        self.ct.metadata.get(&format!("{}.{key}", self.arch))
    }

    /// `{arch}.{key}` as an unsigned integer, `None` when absent.
    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n: Option<u64> = match v {
            gguf_file::Value::U64(n) => Some(*n),
            gguf_file::Value::I64(n) => u64::try_from(*n).ok(),
            gguf_file::Value::U32(n) => Some(u64::from(*n)),
            gguf_file::Value::I32(n) => u64::try_from(*n).ok(),
            gguf_file::Value::U16(n) => Some(u64::from(*n)),
            gguf_file::Value::I16(n) => u64::try_from(*n).ok(),
            gguf_file::Value::U8(n) => Some(u64::from(*n)),
            gguf_file::Value::I8(n) => u64::try_from(*n).ok(),
            _ => None,
        };
        let n = n.ok_or_else(|| {
            Error::ModelConfig(format!(
                "metadata `{}.{key}` is not a non-negative integer: {v:?}",
                self.arch
            ))
        })?;
        usize::try_from(n).map(Some).map_err(|_| {
            Error::ModelConfig(format!("metadata `{}.{key}` = {n} is too large", self.arch))
        })
    }

    /// `{arch}.{key}` as an unsigned integer; an error naming the key when absent.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| {
            Error::ModelConfig(format!("missing metadata key `{}.{key}`", self.arch))
        })
    }

    /// `{arch}.{key}` as a float, `None` when absent.
    pub fn f32_opt(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(gguf_file::Value::F32(x)) => Ok(Some(*x)),
            Some(gguf_file::Value::F64(x)) => Ok(Some(*x as f32)),
            Some(v) => Err(Error::ModelConfig(format!(
                "metadata `{}.{key}` is not a float: {v:?}",
                self.arch
            ))),
        }
    }

    /// `{arch}.{key}` as a string, `None` when absent.
    pub fn str_opt(&self, key: &str) -> Option<&str> {
        self.get(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }

    /// The sizes every family stores under the same keys; block options stay Llama's.
    pub fn base(&self, family: Family) -> Result<ModelConfig> {
        let d = self.usize("embedding_length")?;
        let heads = self.usize("attention.head_count")?;
        let head_dim = match self.usize_opt("attention.key_length")? {
            Some(k) => k,
            None => d.checked_div(heads).ok_or_else(|| {
                Error::ModelConfig(format!(
                    "metadata `{}.attention.head_count` is 0",
                    self.arch
                ))
            })?,
        };
        let vocab = match self.usize_opt("vocab_size")? {
            Some(v) => v,
            // candle reports GGUF shapes in its own order: [vocab, d_model].
            None => self
                .ct
                .tensor_infos
                .get("token_embd.weight")
                .and_then(|t| t.shape.dims().first().copied())
                .ok_or_else(|| Error::MissingTensor {
                    name: "token_embd.weight".into(),
                })?,
        };
        let mut c = ModelConfig::llama_like(
            family,
            d,
            self.usize("block_count")?,
            heads,
            self.usize_opt("attention.head_count_kv")?.unwrap_or(heads),
            head_dim,
            self.usize("feed_forward_length")?,
            vocab,
        );
        c.max_seq_len = self.usize("context_length")?;
        c.rms_eps = self
            .f32_opt("attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-5) as f64;
        c.rope_theta = self.f32_opt("rope.freq_base")?.unwrap_or(10_000.0);
        c.rope_scaling = match self.str_opt("rope.scaling.type") {
            None | Some("none") => RopeScaling::None,
            Some("linear") => match self.f32_opt("rope.scaling.factor")? {
                Some(f) => RopeScaling::Linear { factor: f },
                None => RopeScaling::None,
            },
            Some(other) => {
                return Err(Error::ModelConfig(format!(
                    "metadata `{}.rope.scaling.type` = `{other}` is not supported (supported: none, linear)",
                    self.arch
                )))
            }
        };
        c.rope_style = RopeStyle::Half;
        c.tied_embeddings = !self.ct.tensor_infos.contains_key("output.weight");
        c.layer_kinds = kinds(c.n_layers, |_| LayerKind::Global);
        Ok(c)
    }
}

/// One layer kind per layer, `f(i)` for layer `i`. Never longer than one past
/// [`limits::LAYERS`](super::config::limits::LAYERS): a larger `n_layers` fails
/// validation on its own key first.
pub(crate) fn kinds(n_layers: usize, f: impl Fn(usize) -> LayerKind) -> Vec<LayerKind> {
    (0..n_layers.min(super::config::limits::LAYERS + 1))
        .map(f)
        .collect()
}

/// The config of a GGUF file, by its `general.architecture`.
pub(crate) fn gguf_config(ct: &gguf_file::Content) -> Result<ModelConfig> {
    let arch = ct
        .metadata
        .get("general.architecture")
        .ok_or_else(|| Error::ModelConfig("missing metadata key `general.architecture`".into()))?
        .to_string()
        .map_err(|e| Error::format_candle("gguf", e))?
        .clone();
    let m = Meta { ct, arch: &arch };
    let c = match arch.as_str() {
        "llama" => llama::gguf(&m)?,
        "qwen2" => qwen::gguf2(&m)?,
        "qwen3" => qwen::gguf3(&m)?,
        "gemma2" => gemma::gguf2(&m)?,
        "gemma3" => gemma::gguf3(&m)?,
        _ => {
            return Err(Error::UnsupportedModel {
                arch,
                supported: supported_list(),
            })
        }
    };
    c.validate(KeySource::Gguf(&arch))?;
    Ok(c)
}

/// A tensor's role in the model, for [`Names`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    AttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    QNorm,
    KNorm,
    PostAttnNorm,
    FfnNorm,
    PostFfnNorm,
    Gate,
    Up,
    Down,
}

/// Tensor names of one file layout.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub embed: String,
    pub norm: String,
    pub lm_head: String,
    /// `model.layers.` / `blk.` and the like.
    layer_prefix: String,
    gguf: bool,
    /// Gemma's HF names (`pre_feedforward_layernorm`, `post_attention_layernorm` as the
    /// post-attention norm).
    gemma_hf: bool,
}

impl Names {
    /// GGUF (llama.cpp) names: the same for every family.
    pub fn gguf() -> Self {
        Names {
            embed: "token_embd.weight".into(),
            norm: "output_norm.weight".into(),
            lm_head: "output.weight".into(),
            layer_prefix: "blk.".into(),
            gguf: true,
            gemma_hf: false,
        }
    }

    /// HF names under `prefix` (`model.`, or a multimodal checkpoint's
    /// `model.language_model.` / `language_model.model.`), LM head `lm_head`.
    pub fn hf(family: Family, prefix: &str, lm_head: &str) -> Self {
        Names {
            embed: format!("{prefix}embed_tokens.weight"),
            norm: format!("{prefix}norm.weight"),
            lm_head: lm_head.into(),
            layer_prefix: format!("{prefix}layers."),
            gguf: false,
            gemma_hf: matches!(family, Family::Gemma2 | Family::Gemma3),
        }
    }

    /// The name of layer `i`'s tensor of `role`.
    pub fn layer(&self, i: usize, role: Role) -> String {
        let n = if self.gguf {
            match role {
                Role::AttnNorm => "attn_norm.weight",
                Role::Q => "attn_q.weight",
                Role::K => "attn_k.weight",
                Role::V => "attn_v.weight",
                Role::O => "attn_output.weight",
                Role::QBias => "attn_q.bias",
                Role::KBias => "attn_k.bias",
                Role::VBias => "attn_v.bias",
                Role::QNorm => "attn_q_norm.weight",
                Role::KNorm => "attn_k_norm.weight",
                Role::PostAttnNorm => "post_attention_norm.weight",
                Role::FfnNorm => "ffn_norm.weight",
                Role::PostFfnNorm => "post_ffw_norm.weight",
                Role::Gate => "ffn_gate.weight",
                Role::Up => "ffn_up.weight",
                Role::Down => "ffn_down.weight",
            }
        } else {
            match role {
                Role::AttnNorm => "input_layernorm.weight",
                Role::Q => "self_attn.q_proj.weight",
                Role::K => "self_attn.k_proj.weight",
                Role::V => "self_attn.v_proj.weight",
                Role::O => "self_attn.o_proj.weight",
                Role::QBias => "self_attn.q_proj.bias",
                Role::KBias => "self_attn.k_proj.bias",
                Role::VBias => "self_attn.v_proj.bias",
                Role::QNorm => "self_attn.q_norm.weight",
                Role::KNorm => "self_attn.k_norm.weight",
                Role::PostAttnNorm => "post_attention_layernorm.weight",
                Role::FfnNorm if self.gemma_hf => "pre_feedforward_layernorm.weight",
                Role::FfnNorm => "post_attention_layernorm.weight",
                Role::PostFfnNorm => "post_feedforward_layernorm.weight",
                Role::Gate => "mlp.gate_proj.weight",
                Role::Up => "mlp.up_proj.weight",
                Role::Down => "mlp.down_proj.weight",
            }
        };
        format!("{}{i}.{n}", self.layer_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architecture_names_the_supported_ones() {
        let e = hf_config(r#"{"model_type": "phi3"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("phi3") && e.contains("gemma2") && e.contains("qwen3"),
            "{e}"
        );
        let e = hf_config("{").unwrap_err().to_string();
        assert!(e.contains("json"), "{e}");
    }

    #[test]
    fn unsupported_rope_types_are_errors() {
        for cfg in [
            r#"{"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
            r#"{"model_type": "llama", "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}"#,
        ] {
            let e = hf_config(cfg).unwrap_err().to_string();
            assert!(e.contains("yarn") || e.contains("dynamic"), "{e}");
        }
        let e = hf_config(r#"{"model_type": "llama", "hidden_act": "relu"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_act") && e.contains("relu"), "{e}");
    }

    /// transformers 5.x keeps the RoPE base in `rope_parameters`: it must be read, not
    /// defaulted.
    #[test]
    fn rope_parameters_are_read() -> crate::TestResult {
        let c = hf_config(
            r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}"#,
        )?;
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        let c = hf_config(
            r#"{"model_type": "llama", "rope_theta": 250000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#,
        )?;
        assert_eq!(c.rope_theta, 250_000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { .. }));
        Ok(())
    }

    /// Fields absent from `config.json` take the HF classes' defaults.
    #[test]
    fn hf_defaults() -> crate::TestResult {
        let c = hf_config(r#"{"model_type": "llama"}"#)?;
        assert_eq!(
            (
                c.d_model,
                c.n_layers,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                c.vocab_size
            ),
            (4096, 32, 32, 32, 128, 32000)
        );
        assert!(!c.tied_embeddings);
        let c = hf_config(r#"{"model_type": "gemma2"}"#)?;
        assert_eq!(
            (c.head_dim, c.attn_softcap, c.final_softcap),
            (256, Some(50.0), Some(30.0))
        );
        assert_eq!(c.layer_kinds[0], LayerKind::Sliding);
        assert_eq!(c.layer_kinds[1], LayerKind::Global);
        assert!(c.tied_embeddings && c.norm_plus_one && c.post_norms && c.embed_scale);
        let c = hf_config(r#"{"model_type": "gemma3_text", "num_hidden_layers": 12}"#)?;
        let global: Vec<usize> = (0..12)
            .filter(|&i| c.layer_kinds[i] == LayerKind::Global)
            .collect();
        assert_eq!(global, vec![5, 11]);
        assert_eq!(c.local_rope_theta, Some(10_000.0));
        assert_eq!(c.rope_theta, 1_000_000.0);
        let c = hf_config(r#"{"model_type": "qwen2"}"#)?;
        assert!(c.qkv_bias && !c.qk_norm);
        assert!(c.layer_kinds.iter().all(|k| *k == LayerKind::Global));
        let c = hf_config(r#"{"model_type": "qwen3"}"#)?;
        assert!(c.qk_norm && !c.qkv_bias && c.head_dim == 128);
        let c = hf_config(r#"{"model_type": "mistral", "sliding_window": null}"#)?;
        assert_eq!(c.sliding_window, None);
        let c = hf_config(r#"{"model_type": "mistral"}"#)?;
        assert_eq!(c.sliding_window, Some(4096));
        assert!(c.layer_kinds.iter().all(|k| *k == LayerKind::Sliding));
        Ok(())
    }

    /// Crafted sizes are errors naming the key, not panics or huge allocations.
    #[test]
    fn hostile_sizes_are_errors() {
        for (cfg, key) in [
            (
                r#"{"model_type": "llama", "head_dim": 4611686018427387904}"#,
                "head_dim",
            ),
            (
                r#"{"model_type": "llama", "num_attention_heads": 0}"#,
                "num_attention_heads",
            ),
            (
                r#"{"model_type": "qwen2", "num_key_value_heads": 3}"#,
                "num_key_value_heads",
            ),
            (
                r#"{"model_type": "gemma2", "num_hidden_layers": 100000}"#,
                "num_hidden_layers",
            ),
            (
                r#"{"model_type": "llama", "vocab_size": 1099511627776}"#,
                "vocab_size",
            ),
        ] {
            let e = hf_config(cfg).unwrap_err().to_string();
            assert!(e.contains(key), "{cfg}: {e}");
        }
    }
}
