//! SmolLM2-135M-Instruct with block-quantized weights (`WeightFormat::Quantized`: the GGUF's
//! Q4_1 and Q8_0 blocks as stored, 8-bit activations) against independent references:
//! candle-transformers' `quantized_llama` running its own quantized matmuls on the same
//! GGUF (Q4_1 × Q8_1 and Q8_0 × Q8_0 block products, *without* `CANDLE_DEQUANTIZE_ALL`,
//! which is why this is a test binary of its own), the dense f32 model, and single-prompt
//! generation for the batched path.

#[path = "common/smollm.rs"]
mod smollm;

use candle_core::{Device, Tensor};
use sae_ablate::hooks::{HookContext, HookPoint, Hooks};
use sae_ablate::model::{
    generate, generate_batch, HookedModel, LoadOptions, Model, SamplingParams, WeightFormat,
};
use smollm::{gguf_path, model, tokenizer};

fn quantized() -> Model {
    let opts = LoadOptions::default().with_weights(WeightFormat::Quantized);
    Model::from_gguf(gguf_path(), &opts).unwrap()
}

fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn row(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// KL(softmax(p) ‖ softmax(q)) in nats, in f64: invariant to a constant shift of either
/// row of logits, and dominated by the likely tokens.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let lsm = |l: &[f32]| {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        l.iter().map(|&x| x as f64 - z).collect::<Vec<f64>>()
    };
    let (lp, lq) = (lsm(p), lsm(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

#[test]
fn quantized_logits_match_candle_quantized_matmuls() {
    use candle_transformers::models::quantized_llama::ModelWeights;
    assert!(std::env::var_os("CANDLE_DEQUANTIZE_ALL").is_none());
    let path = gguf_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    let tok = tokenizer();
    let mut m = quantized();
    assert_eq!(m.weight_format(), WeightFormat::Quantized);
    // Q4_1 layers (0.625 B/weight) and the Q8_0 embedding row + tied head.
    assert!(m.weight_bytes() < 100_000_000, "{}", m.weight_bytes());
    let mut dense = model();
    let mut worst = (0f64, 0f64);
    for p in [
        "The capital of France is",
        "It is a truth universally acknowledged, that a single man",
        "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
    ] {
        let ids = tok.encode(p).unwrap();
        let want = row(&reference.forward(&ids_tensor(&ids), 0).unwrap());
        let got = row(&m
            .forward_last(&ids_tensor(&ids), 0, &mut Hooks::new())
            .unwrap());
        let exact = row(&dense
            .forward_last(&ids_tensor(&ids), 0, &mut Hooks::new())
            .unwrap());
        // Both quantize activations per block of 32 to 8 bits, but candle rounds the
        // activation scales to f16: a rounding flip in one 8-bit code moves the residual
        // stream by a step of the block's scale, and SmolLM2's outlier dimensions make
        // those steps large. The logits can then move by a near-constant shift (which
        // softmax ignores), so the next-token distributions are compared.
        let (k_ref, k_dense) = (kl(&want, &got), kl(&exact, &got));
        println!(
            "{p:?}: KL vs quantized_llama {k_ref:e}, vs dense f32 {k_dense:e}; max |Δlogit| {} / {}",
            max_diff(&got, &want),
            max_diff(&got, &exact)
        );
        worst = (worst.0.max(k_ref), worst.1.max(k_dense));
        assert!(k_ref < 0.05, "{p:?}: KL vs quantized_llama = {k_ref}");
        assert!(k_dense < 0.05, "{p:?}: KL vs dense = {k_dense}");
        assert_eq!(argmax(&got), argmax(&want), "{p:?}");
        assert_eq!(argmax(&got), argmax(&exact), "{p:?}");
    }
    println!(
        "worst KL: vs quantized_llama {:e}, vs dense f32 {:e}",
        worst.0, worst.1
    );
}

/// The fused decode step (plain slices) against a full forward of the same tokens, and
/// hooks seeing and editing the decode step's activations.
#[test]
fn quantized_decode_step_matches_full_forward_and_runs_hooks() {
    let tok = tokenizer();
    let mut m = quantized();
    let ids = tok.encode("The capital of France is Paris").unwrap();
    let n = ids.len();
    assert_eq!(n, 6, "{ids:?}");
    let full = row(&m.forward(&ids_tensor(&ids), 0, &mut Hooks::new()).unwrap());
    let v = m.vocab_size();
    let last = &full[(n - 1) * v..];
    m.forward(&ids_tensor(&ids[..n - 1]), 0, &mut Hooks::new())
        .unwrap();
    let step = row(&m
        .forward(&ids_tensor(&ids[n - 1..]), n - 1, &mut Hooks::new())
        .unwrap());
    // Same weights and the same per-row block products: only the f32 summation order of
    // the attention and norms differs, which can flip the rounding of an 8-bit
    // activation code (see above); the prediction stays.
    let k = kl(last, &step);
    println!(
        "decode step vs full forward: KL {k:e}, max |Δlogit| {}",
        max_diff(&step, last)
    );
    assert!(k < 0.05, "decode step differs from full forward: KL {k}");
    assert_eq!(argmax(&step), argmax(last));
    // A hook zeroing the residual stream after the last layer: the logits become the
    // head applied to RMSNorm(0) = 0, i.e. all zero.
    m.forward(&ids_tensor(&ids[..n - 1]), 0, &mut Hooks::new())
        .unwrap();
    let last_layer = m.n_layers() - 1;
    let mut hooks = Hooks::new().with(
        HookPoint::ResidPost(last_layer),
        move |_: &HookPoint, x: &Tensor, c: &HookContext| {
            assert_eq!(x.dims(), &[1, 1, 576]);
            assert_eq!(c.start_pos, 5);
            Ok(Some(x.zeros_like()?))
        },
    );
    let z = row(&m
        .forward(&ids_tensor(&ids[n - 1..]), n - 1, &mut hooks)
        .unwrap());
    assert!(z.iter().all(|&x| x == 0.0), "{:?}", &z[..4]);
}

/// Batched decode (one weight pass for all rows) reproduces each prompt's own greedy
/// generation over the first tokens (later ones can part where two candidates are within
/// the 8-bit activation noise).
#[test]
fn quantized_batch_generation_matches_single_prompts() {
    let tok = tokenizer();
    let prompts: Vec<Vec<u32>> = ["The capital of France is", "Water boils at", "1 2 3 4"]
        .iter()
        .map(|p| tok.encode(p).unwrap())
        .collect();
    let params = SamplingParams::greedy_exactly(6);
    let mut m = quantized();
    let batch = generate_batch(&mut m, &prompts, &params, &mut Hooks::new()).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let single = generate(&mut m, p, &params, &mut Hooks::new()).unwrap();
        assert_eq!(batch[i].ids[..4], single.ids[..4], "prompt {i}");
    }
    let text = tok.decode(&batch[0].ids, false).unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
}
