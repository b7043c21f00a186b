//! SmolLM2-135M-Instruct (GGUF, Q4_1 dequantized to f32) against independent references:
//! the model's own tokenizer ids, candle-transformers' `quantized_llama` run on the same
//! GGUF with `CANDLE_DEQUANTIZE_ALL=1`, and the known perplexity of the model on Austen.

#[path = "common/smollm.rs"]
mod smollm;

use candle_core::{DType, Device, Tensor, D};
use sae_ablate::hooks::Hooks;
use sae_ablate::model::{
    generate, generate_streaming, HookedModel, LoadOptions, Model, RopeStyle, SamplingParams,
};
use sae_ablate::FloatDtype;
use smollm::{gguf_path, model, tokenizer, AUSTEN};

fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[test]
fn tokenizer_matches_smollm2_ids() {
    let tok = tokenizer();
    // SmolLM2's own tokenizer (HF tokenizer.json): no prefix space, "The" = 504.
    assert_eq!(
        tok.encode("The capital of France is").unwrap(),
        vec![504, 3575, 282, 4649, 314]
    );
    // Digits are split one per token (pre-tokenizer `smollm`).
    let ids = tok.encode("1813").unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(tok.decode(&ids, false).unwrap(), "1813");
    // Stop tokens include <|im_end|>.
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert!(tok.stop_tokens().contains(&im_end));
}

#[test]
fn tokenizer_round_trips_austen_and_chatml() {
    let tok = tokenizer();
    let ids = tok.encode(AUSTEN).unwrap();
    assert!(ids.len() > 300, "{} tokens", ids.len());
    assert_eq!(tok.decode(&ids, false).unwrap(), AUSTEN);
    // Leading spaces, newlines and punctuation survive too.
    for s in [
        "  two spaces",
        "\n\nnewlines\n",
        "Mr. Bennet's \"dear\" — 5,000 a year!",
    ] {
        assert_eq!(tok.decode(&tok.encode(s).unwrap(), false).unwrap(), s);
    }
    let chat = tok.chat_prompt("What is the capital of France?").unwrap();
    assert!(chat.starts_with("<|im_start|>system\n"));
    assert!(chat.ends_with("<|im_start|>assistant\n"));
    let ids = tok.encode(&chat).unwrap();
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    // Special tokens are single ids: system, user, assistant turns.
    assert_eq!(ids.iter().filter(|&&i| i == im_start).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == im_end).count(), 2);
    assert_eq!(ids[0], im_start);
    assert_eq!(tok.decode(&ids, false).unwrap(), chat);
}

#[test]
fn greedy_continuation_is_paris() {
    let tok = tokenizer();
    let mut m = model();
    let prompt = tok.encode("The capital of France is").unwrap();
    let mut streamed = Vec::new();
    let g = generate_streaming(
        &mut *m,
        &prompt,
        &SamplingParams::greedy(6, tok),
        &mut Hooks::new(),
        &mut |id| {
            streamed.push(id);
            Ok(true)
        },
    )
    .unwrap();
    let text = tok.decode(&g.ids, true).unwrap();
    println!("greedy: {text:?}");
    assert!(text.starts_with(" Paris"), "{text:?}");
    assert_eq!(streamed, g.ids);
    assert_eq!(g.prompt_ids, prompt);
}

/// Max |a − b| over two equal-shape tensors.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn logits_match_candle_quantized_llama() {
    use candle_transformers::models::quantized_llama::ModelWeights;
    // Read once by candle when the first QMatMul is built: set before loading.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let path = gguf_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    let tok = tokenizer();
    let mut m = model();
    let prompts = [
        "The capital of France is",
        "It is a truth universally acknowledged, that a single man",
        "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
        "1 2 3 4 5",
    ];
    let mut worst = 0f32;
    for p in prompts {
        let ids = tok.encode(p).unwrap();
        let x = ids_tensor(&ids);
        let want = reference.forward(&x, 0).unwrap().squeeze(0).unwrap();
        let all = m.forward(&x, 0, &mut Hooks::new()).unwrap();
        assert_eq!(all.dims(), &[1, ids.len(), m.vocab_size()]);
        let got = all.get(0).unwrap().get(ids.len() - 1).unwrap();
        let d = max_diff(&got, &want);
        worst = worst.max(d);
        assert!(d < 1e-3, "{p:?}: max |Δlogit| = {d}");
        // The same argmax as the reference.
        assert_eq!(
            got.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
            want.argmax(0).unwrap().to_scalar::<u32>().unwrap()
        );
        // forward_last agrees with the last row of forward.
        let last = m
            .forward_last(&x, 0, &mut Hooks::new())
            .unwrap()
            .squeeze(0)
            .unwrap();
        // (a one-row LM-head matmul accumulates in a different order than the full one)
        let dl = max_diff(&last, &got);
        assert!(dl < 1e-3, "forward_last differs from forward by {dl}");
    }
    println!("max |logit − quantized_llama| over prompts: {worst:e}");
    // KV cache: prefill then one decode step equals a full forward of both.
    let ids = tok.encode("The capital of France is Paris").unwrap();
    let n = ids.len();
    let full = m.forward(&ids_tensor(&ids), 0, &mut Hooks::new()).unwrap();
    m.forward(&ids_tensor(&ids[..n - 1]), 0, &mut Hooks::new())
        .unwrap();
    let step = m
        .forward(&ids_tensor(&ids[n - 1..]), n - 1, &mut Hooks::new())
        .unwrap();
    let d = max_diff(
        &step.get(0).unwrap().get(0).unwrap(),
        &full.get(0).unwrap().get(n - 1).unwrap(),
    );
    assert!(d < 1e-3, "KV-cache step differs from full forward by {d}");
}

fn mean_nll(m: &mut Model, ids: &[u32]) -> f32 {
    let logits = m
        .forward(&ids_tensor(ids), 0, &mut Hooks::new())
        .unwrap()
        .squeeze(0)
        .unwrap();
    let n = ids.len() - 1;
    let lsm = candle_nn::ops::log_softmax(&logits.narrow(0, 0, n).unwrap(), D::Minus1).unwrap();
    let targets = Tensor::new(&ids[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let picked = lsm
        .gather(&targets, 1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    -picked.mean_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn austen_nll_and_rope_convention() {
    let tok = tokenizer();
    let ids = tok.encode(AUSTEN).unwrap();
    let ids = &ids[..256];
    let nll = {
        let mut m = model();
        mean_nll(&mut m, ids)
    };
    println!(
        "mean next-token NLL over 256 tokens of Pride and Prejudice: {nll:.4} (perplexity {:.2})",
        nll.exp()
    );
    assert!((2.5..3.1).contains(&nll), "NLL {nll}");
    // The same weights with rotate-half RoPE: GGUF Q/K are permuted for interleaved
    // RoPE, so the wrong convention must be far worse.
    let opts = LoadOptions::default()
        .with_rope_style(RopeStyle::Half)
        .with_max_seq_len(512);
    let mut wrong = Model::from_gguf(gguf_path(), &opts).unwrap();
    let bad = mean_nll(&mut wrong, ids);
    println!("the same with rotate-half RoPE: {bad:.4}");
    assert!(
        bad > nll + 1.0,
        "rotate-half NLL {bad} vs interleaved {nll}"
    );
}

#[test]
fn bad_inputs_are_errors() {
    let dir = std::env::temp_dir().join(format!("sae-ablate-llama-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Missing file: names the path.
    let missing = dir.join("nope.gguf");
    let e = Model::from_gguf(&missing, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.gguf"), "{e}");
    // Not a GGUF.
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"this is not a gguf file at all, just text").unwrap();
    let e = Model::from_gguf(&junk, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("junk.gguf") && e.contains("gguf"), "{e}");
    // Truncated GGUF: header and metadata present, tensor data cut off.
    let bytes = std::fs::read(gguf_path()).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let e = Model::from_gguf(&cut, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cut.gguf"), "{e}");
    let cut2 = dir.join("cut2.gguf");
    std::fs::write(&cut2, &bytes[..4096]).unwrap();
    let e = Model::from_gguf(&cut2, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cut2.gguf"), "{e}");
    // HF dir without weights / with an unknown architecture.
    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(
        hf.join("config.json"),
        r#"{"model_type": "gpt_neox", "hidden_size": 8}"#,
    )
    .unwrap();
    let e = Model::from_hf_dir(&hf, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("gpt_neox") && e.contains("config.json"), "{e}");
    // A Llama config with no weights, a corrupt shard, a shard missing tensors.
    std::fs::write(
        hf.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "vocab_size": 10, "max_position_embeddings": 32}"#,
    )
    .unwrap();
    let e = Model::from_hf_dir(&hf, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("safetensors"), "{e}");
    let shard = hf.join("model.safetensors");
    std::fs::write(&shard, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    let e = Model::from_hf_dir(&hf, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let mut ts = std::collections::HashMap::new();
    ts.insert(
        "model.embed_tokens.weight".to_string(),
        Tensor::zeros((10, 8), DType::F32, &Device::Cpu).unwrap(),
    );
    ts.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&ts, &shard).unwrap();
    let e = Model::from_hf_dir(&hf, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers.0.input_layernorm.weight"), "{e}");
    // A tensor of the wrong shape is named with both shapes.
    ts.insert(
        "model.embed_tokens.weight".to_string(),
        Tensor::zeros((10, 7), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&ts, &shard).unwrap();
    let e = Model::from_hf_dir(&hf, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("[10, 7]"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    let mut m = model();
    // Prompt longer than the context: rejected before any compute.
    let too_long = Tensor::zeros((1, m.max_seq_len() + 1), DType::U32, &Device::Cpu).unwrap();
    let e = m
        .forward(&too_long, 0, &mut Hooks::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("context length"), "{e}");
    // Token id out of range.
    let e = m
        .forward(&ids_tensor(&[1, 49152]), 0, &mut Hooks::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("49152"), "{e}");
    // Decode at a position the cache does not hold.
    m.forward(&ids_tensor(&[1, 2, 3]), 0, &mut Hooks::new())
        .unwrap();
    let e = m
        .forward(&ids_tensor(&[4]), 7, &mut Hooks::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("start_pos"), "{e}");
    // Generation that would run past the context.
    let p = SamplingParams::greedy_exactly(m.max_seq_len());
    let e = generate(&mut *m, &[1, 2], &p, &mut Hooks::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("context length"), "{e}");
}

/// An HF-layout checkpoint (rotate-half Q/K, HF tensor names, safetensors) built from the
/// GGUF's first two layers must reproduce the GGUF model's `blocks.1.hook_resid_post`.
#[test]
fn hf_safetensors_matches_gguf() {
    use sae_ablate::hooks::{ActivationCache, HookPoint};
    use std::collections::HashMap;
    let path = gguf_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let dev = Device::Cpu;
    let mut get = |n: &str| {
        ct.tensor(&mut f, n, &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap()
    };
    let (nh, nkv, hd, d) = (9usize, 3usize, 64usize, 576usize);
    // GGUF rows within a head are (pair i, member j); HF rows are (member j, i).
    let unpermute = |w: Tensor, heads: usize| {
        w.reshape((heads, hd / 2, 2, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * hd, d))
            .unwrap()
    };
    let mut ts: HashMap<String, Tensor> = HashMap::new();
    ts.insert("model.embed_tokens.weight".into(), get("token_embd.weight"));
    ts.insert("model.norm.weight".into(), get("output_norm.weight"));
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        let g = |n: &str| format!("blk.{i}.{n}.weight");
        ts.insert(format!("{p}.input_layernorm.weight"), get(&g("attn_norm")));
        ts.insert(
            format!("{p}.self_attn.q_proj.weight"),
            unpermute(get(&g("attn_q")), nh),
        );
        ts.insert(
            format!("{p}.self_attn.k_proj.weight"),
            unpermute(get(&g("attn_k")), nkv),
        );
        ts.insert(format!("{p}.self_attn.v_proj.weight"), get(&g("attn_v")));
        ts.insert(
            format!("{p}.self_attn.o_proj.weight"),
            get(&g("attn_output")),
        );
        ts.insert(
            format!("{p}.post_attention_layernorm.weight"),
            get(&g("ffn_norm")),
        );
        // Stored as bf16 in one shard, f16 in the other: the loader widens both.
        let half = if i == 0 { DType::F16 } else { DType::BF16 };
        for (hf, gg) in [
            ("gate_proj", "ffn_gate"),
            ("up_proj", "ffn_up"),
            ("down_proj", "ffn_down"),
        ] {
            ts.insert(
                format!("{p}.mlp.{hf}.weight"),
                get(&g(gg)).to_dtype(half).unwrap(),
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("sae-ablate-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Two shards.
    let (a, b): (Vec<_>, Vec<_>) = ts.into_iter().partition(|(k, _)| k.contains("layers.1."));
    candle_core::safetensors::save(
        &a.into_iter().collect(),
        dir.join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    candle_core::safetensors::save(
        &b.into_iter().collect(),
        dir.join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 2, "num_attention_heads": 9,
            "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_theta": 100000,
            "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let mut hf = Model::from_hf_dir(&dir, &LoadOptions::default()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(hf.config().rope_style, RopeStyle::Half);
    assert_eq!(hf.n_layers(), 2);

    let ids = tokenizer().encode(AUSTEN).unwrap();
    let x = ids_tensor(&ids[..64]);
    let capture = |m: &mut Model| {
        let c = ActivationCache::new();
        let mut h = sae_ablate::hooks::Hooks::new().with(HookPoint::ResidPost(1), c.clone());
        m.forward(&x, 0, &mut h).unwrap();
        c.get(&HookPoint::ResidPost(1)).unwrap().unwrap()
    };
    let want = capture(&mut model());
    let got = capture(&mut hf);
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = max_diff(&got, &want);
    println!(
        "HF (rotate-half, f16/bf16 MLP) vs GGUF resid_post[1]: max diff {d} (max |x| {scale})"
    );
    // f16/bf16 rounding of the MLP weights only (a wrong RoPE or layout is off by O(scale)).
    assert!(d < 1e-3 * scale, "{d} vs scale {scale}");
    // A decode step (the fused single-token path, rotate-half RoPE) equals the last
    // position of the full forward.
    hf.forward(
        &ids_tensor(&ids[..63]),
        0,
        &mut sae_ablate::hooks::Hooks::new(),
    )
    .unwrap();
    let c = ActivationCache::new();
    let mut h = sae_ablate::hooks::Hooks::new().with(HookPoint::ResidPost(1), c.clone());
    hf.forward(&ids_tensor(&ids[63..64]), 63, &mut h).unwrap();
    let step = c.get(&HookPoint::ResidPost(1)).unwrap().unwrap();
    let d = max_diff(&step, &got.narrow(1, 63, 1).unwrap());
    assert!(d < 1e-4 * scale, "decode step differs by {d}");
}

/// `sae-ablate logits` and `generate` end to end, with and without an SAE splice.
#[cfg(feature = "cli")]
#[test]
fn cli_logits_and_generate() {
    use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
    use std::process::Command;
    let bin = env!("CARGO_BIN_EXE_sae-ablate");
    let gguf = gguf_path();
    let g = gguf.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("sae-ablate-cli-llama-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let prompt = "The capital of France is";
    let npy = dir.join("logits.npy");
    let (code, out, err) = run(&[
        "logits",
        "--model",
        g,
        "--prompt",
        prompt,
        "--output",
        npy.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ids"], serde_json::json!([504, 3575, 282, 4649, 314]));
    let logits = sae_ablate::io::npy::read_npy(&npy, &Device::Cpu).unwrap();
    assert_eq!(logits.dims(), &[5, 49152]);
    let ids = tokenizer().encode(prompt).unwrap();
    let want = model()
        .forward(&ids_tensor(&ids), 0, &mut Hooks::new())
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert!(max_diff(&logits, &want) < 1e-4);

    // `generate` of four tokens, plus `extra` flags.
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", g, "--prompt", prompt];
        args.extend(["--max-new-tokens", "4"]);
        args.extend(extra);
        run(&args)
    };
    let (code, out, err) = gen(&["--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["text"].as_str().unwrap().starts_with(" Paris"), "{v}");
    assert_eq!(
        v["prompt_ids"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    assert_eq!(v["ids"].as_array().unwrap().len(), 4);
    // Plain text output streams the same continuation.
    let (code, out, _) = gen(&[]);
    assert_eq!(code, Some(0));
    assert_eq!(out, format!("{}\n", v["text"].as_str().unwrap()));
    // An f16 KV cache keeps the greedy continuation; a dtype it cannot hold is an error
    // naming the flag.
    let (code, out16, err) = gen(&["--json", "--kv-cache", "f16"]);
    assert_eq!(code, Some(0), "{err}");
    let v16: serde_json::Value = serde_json::from_str(out16.trim()).unwrap();
    assert_eq!(v16["ids"], v["ids"], "{v16}");
    let (code, _, err) = gen(&["--kv-cache", "f8"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--kv-cache") && err.contains("f8"), "{err}");

    // A random SAE at blocks.5.hook_resid_post, saved in SAELens format.
    let d_sae = 256;
    let r =
        |shape: (usize, usize), s: f64| Tensor::randn(0f32, s as f32, shape, &Device::Cpu).unwrap();
    let mut cfg = SaeConfig::new(Architecture::Standard, 576, d_sae);
    cfg.hook_name = Some("blocks.5.hook_resid_post".into());
    let sae = Sae::new(
        cfg,
        SaeWeights {
            w_enc: r((576, d_sae), 0.05),
            b_enc: Tensor::zeros(d_sae, DType::F32, &Device::Cpu).unwrap(),
            w_dec: r((d_sae, 576), 0.05),
            b_dec: Tensor::zeros(576, DType::F32, &Device::Cpu).unwrap(),
            threshold: None,
            r_mag: None,
            b_mag: None,
            w_skip: None,
        },
    )
    .unwrap();
    let sae_dir = dir.join("sae");
    sae.save_saelens(&sae_dir).unwrap();
    let s = sae_dir.to_str().unwrap();
    // Error-preserving splice with no edits: logits unchanged.
    let npy2 = dir.join("logits2.npy");
    let (code, _, err) = run(&[
        "logits",
        "--model",
        g,
        "--prompt",
        prompt,
        "--output",
        npy2.to_str().unwrap(),
        "--sae",
        s,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let l2 = sae_ablate::io::npy::read_npy(&npy2, &Device::Cpu).unwrap();
    assert!(max_diff(&l2, &logits) < 1e-4);
    // Steering on generated positions only: same first token, the prompt logits untouched.
    let (code, out, err) = run(&[
        "generate",
        "--model",
        g,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "6",
        "--json",
        "--sae",
        s,
        "--steer",
        "7=400",
        "--zero",
        "1,2,3",
        "--positions",
        "generated",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let w: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(w["ids"][0], v["ids"][0]);
    // Bad hook point: exit 2, one line naming the valid range.
    let (code, _, err) = run(&[
        "generate",
        "--model",
        g,
        "--prompt",
        prompt,
        "--sae",
        s,
        "--hook",
        "blocks.30.hook_resid_post",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("0..=29"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Edit flags without --sae, and a missing model file.
    let (code, _, err) = run(&["generate", "--model", g, "--prompt", prompt, "--zero", "1"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = run(&[
        "generate",
        "--model",
        "/nonexistent/m.gguf",
        "--prompt",
        prompt,
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/m.gguf"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `generate` with several prompts (repeated --prompt and --prompts-file) prints one JSON
/// line per prompt, in order, each equal to that prompt's own single-prompt run; the
/// quantized weight format continues "The capital of France is" with " Paris" too.
#[cfg(feature = "cli")]
#[test]
fn cli_generate_batch_matches_single_prompts() {
    use std::process::Command;
    let bin = env!("CARGO_BIN_EXE_sae-ablate");
    let gguf = gguf_path();
    let g = gguf.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let prompts = ["The capital of France is", "Water boils at"];
    let common = ["generate", "--model", g, "--max-new-tokens", "5", "--json"];
    let single: Vec<serde_json::Value> = prompts
        .iter()
        .map(|p| {
            let mut args = common.to_vec();
            args.extend(["--prompt", p]);
            serde_json::from_str(run(&args).trim()).unwrap()
        })
        .collect();
    let mut args = common.to_vec();
    args.extend(["--prompt", prompts[0], "--prompt", prompts[1]]);
    let batch = run(&args);
    let dir = std::env::temp_dir().join(format!("sae-ablate-cli-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("prompts.txt");
    std::fs::write(&file, format!("{}\n\n{}\n", prompts[0], prompts[1])).unwrap();
    let mut args = common.to_vec();
    args.extend(["--prompts-file", file.to_str().unwrap()]);
    let from_file = run(&args);
    for out in [&batch, &from_file] {
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        for (i, (l, s)) in lines.iter().zip(&single).enumerate() {
            assert_eq!(l["prompt"], prompts[i]);
            assert_eq!(l["ids"], s["ids"], "prompt {i}");
            assert_eq!(l["prompt_ids"], s["prompt_ids"], "prompt {i}");
            assert_eq!(l["text"], s["text"], "prompt {i}");
        }
    }
    assert!(single[0]["text"].as_str().unwrap().starts_with(" Paris"));
    // The quantized weight format.
    let mut args = common.to_vec();
    args.extend(["--prompt", prompts[0], "--weights", "quantized"]);
    let q: serde_json::Value = serde_json::from_str(run(&args).trim()).unwrap();
    assert!(q["text"].as_str().unwrap().starts_with(" Paris"), "{q}");
    // An empty prompts file is an error naming the file.
    std::fs::write(&file, "\n\n").unwrap();
    let out = Command::new(bin)
        .args([
            "generate",
            "--model",
            g,
            "--prompts-file",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prompts.txt"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Left-padded batch generation reproduces each prompt's own greedy generation.
#[test]
fn batch_generation_matches_single_prompts() {
    use sae_ablate::model::generate_batch_streaming;
    let tok = tokenizer();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "It is a truth universally acknowledged, that a single man in possession of",
        "Water boils at",
    ]
    .iter()
    .map(|p| tok.encode(p).unwrap())
    .collect();
    let params = SamplingParams::greedy_exactly(6);
    let mut m = model();
    let mut streamed = vec![Vec::new(); prompts.len()];
    let batch = generate_batch_streaming(
        &mut *m,
        &prompts,
        &params,
        &mut Hooks::new(),
        &mut |row, id| {
            streamed[row].push(id);
            Ok(true)
        },
    )
    .unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let single = generate(&mut *m, p, &params, &mut Hooks::new()).unwrap();
        println!(
            "{:?} → {:?}",
            tok.decode(p, false).unwrap(),
            tok.decode(&single.ids, false).unwrap()
        );
        assert_eq!(batch[i].ids, single.ids, "prompt {i}");
        assert_eq!(batch[i].prompt_ids, *p);
        assert_eq!(streamed[i], single.ids);
    }
    // Padded prefill logits equal each prompt's own logits.
    let max_len = prompts.iter().map(|p| p.len()).max().unwrap();
    let pads: Vec<usize> = prompts.iter().map(|p| max_len - p.len()).collect();
    let mut flat = Vec::new();
    for (p, &pad) in prompts.iter().zip(&pads) {
        flat.extend(std::iter::repeat_n(0u32, pad));
        flat.extend_from_slice(p);
    }
    let x = Tensor::from_vec(flat, (prompts.len(), max_len), &Device::Cpu).unwrap();
    let last = m
        .forward_last_padded(&x, 0, &pads, &mut Hooks::new())
        .unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let own = m
            .forward_last(&ids_tensor(p), 0, &mut Hooks::new())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let d = max_diff(&last.get(i).unwrap(), &own);
        assert!(d < 1e-3, "prompt {i}: {d}");
    }
}

/// `tokenizer.json` loading (the GGUF tokenizer serialized and read back) and the
/// Llama-3 chat template, against hand-written strings.
#[test]
fn tokenizer_json_and_chat_templates() {
    use sae_ablate::model::{ChatTemplate, Tokenizer};
    let tok = tokenizer();
    let dir = std::env::temp_dir().join(format!("sae-ablate-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        tok.inner().unwrap().to_string(false).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [2, 7]}"#,
    )
    .unwrap();
    let hf = Tokenizer::from_hf(&dir).unwrap();
    let e = Tokenizer::from_hf(dir.join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.json"), "{e}");
    std::fs::write(dir.join("bad.json"), "{ not json").unwrap();
    assert!(Tokenizer::from_hf(dir.join("bad.json")).is_err());
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        hf.encode("The capital of France is").unwrap(),
        vec![504, 3575, 282, 4649, 314]
    );
    assert_eq!(hf.encode(AUSTEN).unwrap(), tok.encode(AUSTEN).unwrap());
    assert!(hf.stop_tokens().contains(&7) && hf.stop_tokens().contains(&2));
    assert_eq!(hf.chat_template(), Some(ChatTemplate::ChatMl));

    assert_eq!(
        ChatTemplate::ChatMl.render(&[("system", "Be brief."), ("user", "Hi")], true),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        ChatTemplate::Llama3.render(&[("system", "Be brief."), ("user", "Hi")], true),
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

/// `fork_cache`: continuing a prefix prefilled once, in several rows at once, gives the
/// logits of the full sequences run from scratch; bad arguments are errors that say why.
#[test]
fn forked_prefix_cache_continues_like_full_sequences() {
    let tok = tokenizer();
    let mut m = model();
    let prefix = tok
        .encode("It is a truth universally acknowledged")
        .unwrap();
    let tails = [
        tok.encode(", that a single man").unwrap(),
        tok.encode(" by all the neighbours").unwrap(),
    ];
    // Before any forward there is nothing to fork.
    m.reset();
    let e = m.fork_cache(1, 2).unwrap_err().to_string();
    assert!(e.contains("fork_cache"), "{e}");
    m.forward(&ids_tensor(&prefix), 0, &mut Hooks::new())
        .unwrap();
    for (keep, batch) in [(0, 2), (prefix.len() + 1, 2), (1, 0)] {
        let e = m.fork_cache(keep, batch).unwrap_err().to_string();
        assert!(
            e.contains("fork_cache") && e.contains("cached positions"),
            "{e}"
        );
    }
    let t = tails[0].len().min(tails[1].len());
    m.fork_cache(prefix.len(), 2).unwrap();
    let rows: Vec<u32> = tails.iter().flat_map(|x| x[..t].iter().copied()).collect();
    let forked = m
        .forward(
            &Tensor::from_vec(rows, (2, t), &Device::Cpu).unwrap(),
            prefix.len(),
            &mut Hooks::new(),
        )
        .unwrap();
    for (r, tail) in tails.iter().enumerate() {
        let mut all = prefix.clone();
        all.extend_from_slice(&tail[..t]);
        let full = m.forward(&ids_tensor(&all), 0, &mut Hooks::new()).unwrap();
        let want = full.narrow(1, prefix.len(), t).unwrap();
        let got = forked.narrow(0, r, 1).unwrap();
        let diff = max_diff(&got, &want);
        assert!(
            diff < 1e-3,
            "row {r}: forked vs full logits differ by {diff}"
        );
    }
}

/// Continuing from the KV cache (one position at a time, and several at once) stays
/// close to the full forward of the whole sequence from position 0, with the same greedy
/// tokens: within 1e-3 for the f32 cache; an f16 or bf16 cache rounds only what it
/// stores, so its forward from position 0 is bitwise the f32 model's.
#[test]
fn kv_cache_continuations_match_full_forward() {
    let tok = tokenizer();
    // Past 64 positions, so the single-prompt decode step also takes its per-query-head
    // attention split.
    let ids = tok.encode(&AUSTEN[..600]).unwrap();
    let (n, p) = (ids.len().min(100), 24);
    assert!(n > 80, "{n} tokens");
    let ids = &ids[..n];
    let full = {
        let mut m = model();
        m.forward(&ids_tensor(ids), 0, &mut Hooks::new()).unwrap()
    };
    let argmax = |t: &Tensor| t.argmax(D::Minus1).unwrap().flatten_all().unwrap();
    for (kv, tol) in [
        (FloatDtype::F32, 1e-3f32),
        (FloatDtype::F16, 0.05),
        (FloatDtype::BF16, 0.4),
    ] {
        let opts = LoadOptions::default()
            .with_kv_cache(kv)
            .with_max_seq_len(256);
        let mut m = Model::from_gguf(gguf_path(), &opts).unwrap();
        let same = m.forward(&ids_tensor(ids), 0, &mut Hooks::new()).unwrap();
        assert_eq!(max_diff(&same, &full), 0.0, "{kv:?}: prefill from 0");
        // One position at a time from the first token on (the fused decode step, with an
        // empty cache at position 0).
        let mut steps = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            steps.push(m.forward(&ids_tensor(&[id]), i, &mut Hooks::new()).unwrap());
        }
        let steps = Tensor::cat(&steps, 1).unwrap();
        // The rest at once (the general path, past read from the cache).
        m.forward(&ids_tensor(&ids[..p]), 0, &mut Hooks::new())
            .unwrap();
        let chunk = m
            .forward(&ids_tensor(&ids[p..]), p, &mut Hooks::new())
            .unwrap();
        let tail = full.narrow(1, p, n - p).unwrap();
        for (what, got, want) in [("steps", &steps, &full), ("chunk", &chunk, &tail)] {
            let d = max_diff(got, want);
            println!("{kv:?} cache, {what}: max |Δ logit| = {d}");
            if kv != FloatDtype::F32 {
                assert!(d > 0.0, "{kv:?} {what}: the cache was not rounded");
            }
            assert!(d < tol, "{kv:?} {what}: logits differ by {d}");
            assert_eq!(
                argmax(got).to_vec1::<u32>().unwrap(),
                argmax(want).to_vec1::<u32>().unwrap(),
                "{kv:?} {what}: greedy tokens"
            );
        }
    }
    let e = FloatDtype::try_from(DType::U8).unwrap_err().to_string();
    assert!(e.contains("dtype") && e.contains("U8"), "{e}");
}

/// Dense f16 and bf16 weights (the GGUF dequantized, then rounded) track the f32 model:
/// the same mean NLL on Austen to within 0.05 nats, close logits, and the greedy " Paris".
/// Their decode-step kernels (one row: four chains; 2–8 rows: the tile; bf16 also rounds
/// `x` to bf16 and runs `vdpbf16ps` where the CPU has it) agree with the prefill path
/// (candle's `gemm`) on the same positions, and the rows of a batch are bitwise alike.
#[test]
fn half_precision_weights_track_f32() {
    let tok = tokenizer();
    let ids = tok.encode(AUSTEN).unwrap();
    let ids = &ids[..64];
    let mut m32 = model();
    let nll32 = mean_nll(&mut m32, ids);
    let full32 = m32.forward(&ids_tensor(ids), 0, &mut Hooks::new()).unwrap();
    let p = 48;
    for (dt, tol) in [(FloatDtype::F16, 0.1f32), (FloatDtype::BF16, 0.5)] {
        let opts = LoadOptions::default().with_dtype(dt).with_max_seq_len(256);
        let mut m = Model::from_gguf(gguf_path(), &opts).unwrap();
        let nll = mean_nll(&mut m, ids);
        let full = m.forward(&ids_tensor(ids), 0, &mut Hooks::new()).unwrap();
        let d32 = max_diff(&full, &full32);
        println!("{dt:?} weights: NLL {nll:.4} (f32 {nll32:.4}), max |Δ logit| vs f32 {d32}");
        assert!((nll - nll32).abs() < 0.05, "{dt:?}: NLL {nll} vs {nll32}");
        assert!(d32 > 0.0 && d32 < 4.0 * tol, "{dt:?}: {d32}");
        // Decode steps past a prefill of p positions: one row, then a batch of two
        // identical rows.
        m.forward(&ids_tensor(&ids[..p]), 0, &mut Hooks::new())
            .unwrap();
        let x2 = Tensor::from_vec([&ids[..p], &ids[..p]].concat(), (2, p), &Device::Cpu).unwrap();
        let mut steps = Vec::new();
        for (i, &id) in ids[p..].iter().enumerate() {
            steps.push(
                m.forward(&ids_tensor(&[id]), p + i, &mut Hooks::new())
                    .unwrap(),
            );
        }
        let steps = Tensor::cat(&steps, 1).unwrap();
        let want = full.narrow(1, p, ids.len() - p).unwrap();
        let d = max_diff(&steps, &want);
        println!("{dt:?} weights: one-row decode steps vs prefill: max |Δ logit| {d}");
        assert!(d < tol, "{dt:?}: one-row steps differ by {d}");
        m.forward_last_padded(&x2, 0, &[0, 0], &mut Hooks::new())
            .unwrap();
        for (i, &id) in ids[p..].iter().enumerate() {
            let y = Tensor::from_vec(vec![id, id], (2, 1), &Device::Cpu).unwrap();
            let l = m
                .forward_last_padded(&y, p + i, &[0, 0], &mut Hooks::new())
                .unwrap();
            let (r0, r1) = (l.get(0).unwrap(), l.get(1).unwrap());
            assert_eq!(max_diff(&r0, &r1), 0.0, "{dt:?}: batch rows differ");
            let w = want.get(0).unwrap().get(i).unwrap();
            let d = max_diff(&r0, &w);
            assert!(d < tol, "{dt:?}: batched step {i} differs by {d}");
        }
        let prompt = tok.encode("The capital of France is").unwrap();
        let g = generate(
            &mut m,
            &prompt,
            &SamplingParams::greedy(4, tok),
            &mut Hooks::new(),
        )
        .unwrap();
        let text = tok.decode(&g.ids, true).unwrap();
        assert!(text.starts_with(" Paris"), "{dt:?}: {text:?}");
    }
}
