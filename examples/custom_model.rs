//! A model outside the crate's families, made hookable: a small transformer with learned
//! absolute position embeddings (no RoPE family does that here) built from the
//! decoder's public pieces (`sae_ablate::model::layers`), implementing `HookedModel`,
//! with an SAE spliced in at one of its hook points.
//!
//! ```text
//! cargo run --release --example custom_model
//! ```
//! It prints what it checks and exits non-zero if a check fails.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sae_ablate::edit::{Edits, SpliceMode};
use sae_ablate::hooks::{
    ActivationCache, HookContext, HookPoint, Hooks, Phase, Positions, SaeSplice,
};
use sae_ablate::model::layers::{
    causal_mask, Attention, AttentionSpec, Block, KvCache, Linear, Mlp, RmsNorm, Rope,
};
use sae_ablate::model::{Activation, HookedModel, RopeStyle};
use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
use sae_ablate::{Error, FloatDtype, Result};

const D: usize = 32;
const HEADS: usize = 4;
const HEAD_DIM: usize = 8;
const FF: usize = 64;
const VOCAB: usize = 50;
const CTX: usize = 64;

/// Token + learned position embeddings, two pre-norm blocks, final norm, untied head.
struct TinyLm {
    tok: Tensor,
    pos: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: Linear,
    cached: usize,
}

/// Reproducible weights: a fixed-seed xorshift generator, uniform in [-√3, √3)·std
/// (unit variance before scaling).
fn randn(shape: (usize, usize), std: f64, dev: &Device) -> Result<Tensor> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x2602_0694_1000_0001);
    let n = shape.0 * shape.1;
    let mut s = STATE.load(Ordering::Relaxed);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f64 / (1u64 << 24) as f64; // [0, 1)
            ((u * 2.0 - 1.0) * 3f64.sqrt() * std) as f32
        })
        .collect();
    STATE.store(s, Ordering::Relaxed);
    Ok(Tensor::from_vec(v, shape, dev)?)
}

impl TinyLm {
    fn new(dev: &Device) -> Result<Self> {
        // RoPE with every frequency 0 is the identity: positions come from `pos`.
        let rope = Arc::new(Rope::new(&[0.0; HEAD_DIM / 2], CTX, RopeStyle::Half, dev)?);
        let ones = Tensor::ones(D, DType::F32, dev)?;
        let mut blocks = Vec::new();
        for i in 0..2 {
            let spec = AttentionSpec {
                n_heads: HEADS,
                n_kv_heads: HEADS,
                head_dim: HEAD_DIM,
                scale: 1.0 / (HEAD_DIM as f32).sqrt(),
                softcap: None,
                window: None,
            };
            let attn = Attention::new(
                spec,
                Linear::new(randn((3 * HEADS * HEAD_DIM, D), 0.3, dev)?, None)?,
                Linear::new(randn((D, HEADS * HEAD_DIM), 0.3, dev)?, None)?,
                None,
                rope.clone(),
                KvCache::new(FloatDtype::F32, CTX),
            )?;
            let mlp = Mlp::new(
                Linear::new(randn((2 * FF, D), 0.3, dev)?, None)?,
                Linear::new(randn((D, FF), 0.3, dev)?, None)?,
                Activation::Silu,
                FF,
            );
            blocks.push(Block::new(
                i,
                RmsNorm::new(&ones, 1e-5)?,
                attn,
                RmsNorm::new(&ones, 1e-5)?,
                mlp,
                None,
            ));
        }
        Ok(TinyLm {
            tok: randn((VOCAB, D), 1.0, dev)?,
            pos: randn((CTX, D), 0.5, dev)?,
            blocks,
            norm: RmsNorm::new(&ones, 1e-5)?,
            head: Linear::new(randn((VOCAB, D), 0.3, dev)?, None)?,
            cached: 0,
        })
    }
}

impl HookedModel for TinyLm {
    fn forward(&mut self, tokens: &Tensor, start_pos: usize, hooks: &mut Hooks) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if start_pos != self.cached && start_pos != 0 {
            return Err(Error::Invalid(format!(
                "start_pos {start_pos}, but {} positions are cached",
                self.cached
            )));
        }
        if start_pos + t > CTX {
            return Err(Error::Invalid(format!(
                "{} positions exceed {CTX}",
                start_pos + t
            )));
        }
        if start_pos == 0 {
            self.reset();
        }
        hooks.validate(self.n_layers())?;
        let ctx = HookContext::new(start_pos, t, hooks.prompt_len(), Phase::Prefill);
        let ids = tokens.flatten_all()?;
        let x = self.tok.index_select(&ids, 0)?.reshape((b, t, D))?;
        let p = self.pos.narrow(0, start_pos, t)?;
        let mut x = hooks.run(HookPoint::Embed, x.broadcast_add(&p)?, &ctx)?;
        let mask = causal_mask(t, start_pos, None, None, tokens.device())?;
        for block in &mut self.blocks {
            x = block.forward(&x, mask.as_ref(), hooks, &ctx)?;
        }
        self.cached = start_pos + t;
        let h = hooks.run(HookPoint::LnFinal, self.norm.forward(&x)?, &ctx)?;
        Ok(self
            .head
            .forward(&h.reshape((b * t, D))?)?
            .reshape((b, t, VOCAB))?)
    }
    fn d_model(&self) -> usize {
        D
    }
    fn n_layers(&self) -> usize {
        self.blocks.len()
    }
    fn vocab_size(&self) -> usize {
        VOCAB
    }
    fn max_seq_len(&self) -> usize {
        CTX
    }
    fn device(&self) -> &Device {
        self.tok.device()
    }
    fn reset(&mut self) {
        for b in &mut self.blocks {
            b.attention_mut().cache_mut().clear();
        }
        self.cached = 0;
    }
}

fn random_sae(dev: &Device) -> Result<Sae> {
    let d_sae = 128;
    let mut cfg = SaeConfig::new(Architecture::Standard, D, d_sae);
    cfg.hook_name = Some("blocks.0.hook_resid_post".into());
    let w = SaeWeights::new(
        randn((D, d_sae), 0.3, dev)?,
        Tensor::zeros(d_sae, DType::F32, dev)?,
        randn((d_sae, D), 0.3, dev)?,
        Tensor::zeros(D, DType::F32, dev)?,
    );
    Sae::new(cfg, w)
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

pub fn main() -> Result<()> {
    let dev = Device::Cpu;
    let mut m = TinyLm::new(&dev)?;
    let tokens = Tensor::new(&[[3u32, 14, 15, 9, 26, 5, 35, 8]], &dev)?;

    // Hook points work as in the crate's own models: read an activation.
    let cache = ActivationCache::new();
    let mut hooks = Hooks::new();
    hooks.add(HookPoint::ResidPost(0), cache.clone());
    hooks.add(HookPoint::AttnZ(1), cache.clone());
    let clean = m.forward(&tokens, 0, &mut hooks)?;
    let resid = cache
        .get(&HookPoint::ResidPost(0))?
        .ok_or_else(|| Error::Invalid("nothing cached".into()))?;
    let z = cache
        .get(&HookPoint::AttnZ(1))?
        .ok_or_else(|| Error::Invalid("nothing cached".into()))?;
    println!(
        "blocks.0.hook_resid_post {:?}, blocks.1.attn.hook_z {:?}",
        resid.dims(),
        z.dims()
    );

    // An error-preserving splice with no edits returns the activation: logits unchanged.
    let sae = random_sae(&dev)?;
    let none = Edits::new(SpliceMode::ErrorPreserving);
    let mut hooks = Hooks::new();
    hooks.add(
        HookPoint::ResidPost(0),
        SaeSplice::new(&sae, &none, Positions::All)?,
    );
    let same = m.forward(&tokens, 0, &mut hooks)?;
    let d0 = max_abs(&same, &clean)?;
    println!("splice without edits: logits move by {d0:.2e}");

    // Zero-ablating the latents active at the last position moves the logits.
    let f = sae.encode(&resid.narrow(1, 7, 1)?.flatten_all()?.unsqueeze(0)?)?;
    let active: Vec<u32> = f
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > 0.0)
        .map(|(i, _)| i as u32)
        .collect();
    let ablate = Edits::new(SpliceMode::ErrorPreserving).zero(&active);
    let mut hooks = Hooks::new();
    hooks.add(
        HookPoint::ResidPost(0),
        SaeSplice::new(&sae, &ablate, Positions::All)?,
    );
    let edited = m.forward(&tokens, 0, &mut hooks)?;
    let d1 = max_abs(&edited, &clean)?;
    println!(
        "zero-ablating the {} latents active at the last position: logits move by {d1:.3}",
        active.len()
    );
    if d0 > 1e-5 || active.is_empty() || d1 < 1e-3 {
        return Err(Error::Invalid(format!(
            "checks failed: no-edit change {d0}, {} active latents, edit change {d1}",
            active.len()
        )));
    }
    println!("ok");
    Ok(())
}
