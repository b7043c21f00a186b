//! Write the seed corpora `fuzz/corpus/<target>/seed-*`: small valid files of every
//! format, built with the same writers the integration tests use (`tests/common/`),
//! packed as each target splits its input (`sae_ablate_fuzz::split2`).
//!
//! `cargo test --test fuzz_seeds -- --ignored` (ignored by default: it writes into
//! the source tree).

#[path = "common/pickle_writer.rs"]
#[allow(dead_code, clippy::all)]
mod pickle_writer;
#[path = "common/r_writer.rs"]
#[allow(dead_code, clippy::all)]
mod r_writer;
#[path = "common/st_writer.rs"]
#[allow(dead_code, clippy::all)]
mod st_writer;
#[path = "common/tiny_model.rs"]
#[allow(dead_code, clippy::all)]
mod tiny_model;

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use pickle_writer::{Dt, StateDict};
use serde_json::json;
use st_writer::{npy_f32, npy_header, npz_bytes, write_st, write_st_bf16, T};

/// `sae_ablate_fuzz::split2`'s layout: `u16` length, first file, second file.
fn join2(first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut out = u16::try_from(first.len()).unwrap().to_le_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

fn corpus(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn seed(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(format!("seed-{name}")), bytes).unwrap();
}

/// The bytes of a safetensors file (written by `st_writer::write_st`).
fn st(tensors: &[T], bf16: bool) -> Vec<u8> {
    let p = std::env::temp_dir().join(format!("sae-ablate-seeds-{}.st", std::process::id()));
    if bf16 {
        write_st_bf16(&p, tensors)
    } else {
        write_st(&p, tensors)
    }
    let b = std::fs::read(&p).unwrap();
    let _ = std::fs::remove_file(&p);
    b
}

fn vals(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
}

fn t<'a>(name: &'a str, shape: &[usize]) -> T<'a> {
    let n = shape.iter().product();
    (name, shape.to_vec(), vals(n, name.len() as f32))
}

fn saelens() {
    let (d_in, d_sae) = (3, 4);
    let base = |extra: &[(&'static str, Vec<usize>)]| -> Vec<T<'static>> {
        let mut v = vec![
            t("W_enc", &[d_in, d_sae]),
            t("b_enc", &[d_sae]),
            t("W_dec", &[d_sae, d_in]),
            t("b_dec", &[d_in]),
        ];
        for (n, s) in extra {
            v.push(t(n, s));
        }
        v
    };
    let cfgs = [
        (
            "standard",
            json!({"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "metadata": {"hook_name": "blocks.0.hook_resid_post"}}),
            base(&[]),
        ),
        (
            "jumprelu",
            json!({"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "normalize_activations": "expected_average_only_in", "normalization_scaling_factor": 2.0}),
            base(&[("threshold", vec![d_sae])]),
        ),
        (
            "topk",
            json!({"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": 2, "rescale_acts_by_decoder_norm": true}),
            base(&[]),
        ),
        (
            "gated",
            json!({"architecture": "gated", "d_in": d_in, "d_sae": d_sae}),
            vec![
                t("W_enc", &[d_in, d_sae]),
                t("b_gate", &[d_sae]),
                t("W_dec", &[d_sae, d_in]),
                t("b_dec", &[d_in]),
                t("b_mag", &[d_sae]),
                t("r_mag", &[d_sae]),
            ],
        ),
        (
            "pre6-topk",
            json!({"d_in": d_in, "d_sae": d_sae, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 1}, "hook_point": "blocks.1.hook_resid_pre", "normalize_activations": "layer_norm"}),
            base(&[("scaling_factor", vec![d_sae])]),
        ),
    ];
    for (name, cfg, tensors) in cfgs {
        let c = serde_json::to_vec(&cfg).unwrap();
        seed("saelens", name, &join2(&c, &st(&tensors, false)));
        seed(
            "saelens",
            &format!("{name}-bf16"),
            &join2(&c, &st(&tensors, true)),
        );
    }
}

fn sparsify() {
    let (d_in, d_sae) = (3, 4);
    let tensors = vec![
        t("encoder.weight", &[d_sae, d_in]),
        t("encoder.bias", &[d_sae]),
        t("W_dec", &[d_sae, d_in]),
        t("b_dec", &[d_in]),
    ];
    let cfg = json!({"activation": "topk", "k": 2, "num_latents": d_sae, "expansion_factor": 32, "d_in": d_in});
    seed(
        "sparsify",
        "topk",
        &join2(&serde_json::to_vec(&cfg).unwrap(), &st(&tensors, false)),
    );
    let mut skip = tensors.clone();
    skip.push(t("W_skip", &[d_in, d_in]));
    let cfg = json!({"k": 1, "num_latents": 0, "expansion_factor": 1, "signed": true, "transcode": true, "skip_connection": true});
    seed(
        "sparsify",
        "skip-signed",
        &join2(&serde_json::to_vec(&cfg).unwrap(), &st(&skip, true)),
    );
}

fn llama_scope() {
    let (d_in, d_sae) = (4, 3);
    let tensors = vec![
        t("encoder.weight", &[d_sae, d_in]),
        t("encoder.bias", &[d_sae]),
        t("decoder.weight", &[d_in, d_sae]),
        t("decoder.bias", &[d_in]),
    ];
    let hp = json!({
        "d_model": d_in, "d_sae": d_sae, "expansion_factor": 0.75, "act_fn": "jumprelu",
        "jump_relu_threshold": 2.0, "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 4.0, "out": 4.0},
        "hook_point_in": "blocks.15.hook_resid_post", "hook_point_out": "blocks.15.hook_resid_post",
        "apply_decoder_bias_to_pre_encoder": false, "sparsity_include_decoder_norm": true,
        "use_decoder_bias": true
    });
    let h = serde_json::to_vec(&hp).unwrap();
    seed("llama_scope", "bf16", &join2(&h, &st(&tensors, true)));
    seed("llama_scope", "f32", &join2(&h, &st(&tensors, false)));
}

fn gemma_scope() {
    let (d_in, d_sae) = (3, 4);
    let names: [(&str, Vec<usize>); 5] = [
        ("W_enc", vec![d_in, d_sae]),
        ("W_dec", vec![d_sae, d_in]),
        ("b_enc", vec![d_sae]),
        ("b_dec", vec![d_in]),
        ("threshold", vec![d_sae]),
    ];
    let members: Vec<(String, Vec<u8>)> = names
        .iter()
        .map(|(n, s)| {
            let n_el = s.iter().product();
            (format!("{n}.npy"), npy_f32(s, &vals(n_el, 1.0)))
        })
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = members
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    for deflate in [false, true] {
        let mut b = vec![0u8];
        b.extend(npz_bytes(&refs, deflate));
        seed(
            "gemma_scope",
            if deflate {
                "npz-deflated"
            } else {
                "npz-stored"
            },
            &b,
        );
    }
    let tensors: Vec<T> = names
        .iter()
        .map(|(n, s)| {
            let lower: &str = match *n {
                "W_enc" => "w_enc",
                "W_dec" => "w_dec",
                other => other,
            };
            t(lower, s)
        })
        .collect();
    let cfg =
        serde_json::to_vec(&json!({"architecture": "jump_relu", "model_name": "gemma-3-1b-pt"}))
            .unwrap();
    let mut b = vec![1u8];
    b.extend(join2(&cfg, &st(&tensors, true)));
    seed("gemma_scope", "v2", &b);
}

fn npy() {
    seed("npy", "f32-2x3", &npy_f32(&[2, 3], &vals(6, 0.0)));
    seed("npy", "scalar", &npy_f32(&[], &[1.5]));
    let mut be = npy_header(">f4", false, "(2, 2)");
    for v in vals(4, 2.0) {
        be.extend_from_slice(&v.to_be_bytes());
    }
    seed("npy", "f32-big-endian", &be);
    let mut fo = npy_header("<f8", true, "(2, 3)");
    for v in vals(6, 3.0) {
        fo.extend_from_slice(&(v as f64).to_le_bytes());
    }
    seed("npy", "f64-fortran", &fo);
    let mut h = npy_header("<f2", false, "(3,)");
    for v in vals(3, 4.0) {
        h.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
    }
    seed("npy", "f16", &h);
    let mut b = npy_header("<V2", false, "(1, 2)");
    for v in vals(2, 5.0) {
        b.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    }
    seed("npy", "bf16", &b);
    // Format 2.0: 4-byte header length.
    let dict = b"{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }\n";
    let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
    v2.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    v2.extend_from_slice(dict);
    v2.extend_from_slice(&7i64.to_le_bytes());
    v2.extend_from_slice(&(-1i64).to_le_bytes());
    seed("npy", "i8-v2", &v2);
}

fn pytorch() {
    let (d_in, d_sae) = (3, 4);
    let f = |n: usize, s: f32| -> Vec<f64> { vals(n, s).into_iter().map(f64::from).collect() };
    let mut gf = StateDict::new();
    gf.f32("encoder_linear.weight", &[d_sae, d_in], &f(12, 0.0))
        .f32("encoder_linear.bias", &[d_sae], &f(4, 1.0))
        .f32("decoder_linear.weight", &[d_in, d_sae], &f(12, 2.0))
        .f32("decoder_linear.bias", &[d_in], &f(3, 3.0))
        .int("step", 70000);
    seed("pytorch", "goodfire-zip", &gf.zip_bytes());
    seed("pytorch", "goodfire-legacy", &gf.legacy_bytes());
    let mut dl = StateDict::new();
    dl.f32("encoder.weight", &[d_sae, d_in], &f(12, 0.0))
        .f32("encoder.bias", &[d_sae], &f(4, 1.0))
        .f32("decoder.weight", &[d_in, d_sae], &f(12, 2.0))
        .f32("b_dec", &[d_in], &f(3, 3.0))
        .tensor("k", Dt::I32, &[], &[2.0])
        .f32("threshold", &[], &[0.5]);
    seed("pytorch", "dl-topk-zip", &dl.zip_bytes());
    seed("pytorch", "dl-topk-legacy", &dl.legacy_bytes());
    let mut ae = StateDict::new();
    ae.f32("bias", &[d_in], &f(3, 3.0))
        .tensor("encoder.weight", Dt::F16, &[d_sae, d_in], &f(12, 0.0))
        .tensor("encoder.bias", Dt::BF16, &[d_sae], &f(4, 1.0))
        .tensor("decoder.weight", Dt::F64, &[d_in, d_sae], &f(12, 2.0));
    seed("pytorch", "dl-autoencoder-mixed-zip", &ae.zip_bytes());
    // A transposed view into a shared storage.
    let mut v = StateDict::new();
    let s = v.storage(Dt::F32, pickle_writer::encode(Dt::F32, &f(12, 0.0)));
    v.view("encoder_linear.weight", s, &[d_sae, d_in], &[1, d_sae], 0)
        .view("decoder_linear.weight", s, &[d_in, d_sae], &[d_sae, 1], 0)
        .f32("encoder_linear.bias", &[d_sae], &f(4, 1.0))
        .f32("decoder_linear.bias", &[d_in], &f(3, 3.0));
    seed("pytorch", "views-legacy", &v.legacy_bytes());
}

/// A tiny Llama GGUF (d_model 8, one layer, 2 heads) with a byte-level BPE vocabulary.
fn gguf_bytes(with_weights: bool) -> Vec<u8> {
    use gguf_file::Value as V;
    let dev = Device::Cpu;
    let (d, ff, vocab) = (8usize, 16usize, 260usize);
    let mut tokens: Vec<V> = (0u8..=255)
        .map(|b| {
            // GPT-2 byte-to-unicode for printable ASCII, else a private-use char.
            let c = if b.is_ascii_graphic() {
                b as char
            } else {
                char::from_u32(0x100 + b as u32).unwrap()
            };
            V::String(c.to_string())
        })
        .collect();
    for s in ["Th", "Ġt", "he", "<|im_end|>"] {
        tokens.push(V::String(s.into()));
    }
    let merges = vec![
        V::String("T h".into()),
        V::String("Ġ t".into()),
        V::String("h e".into()),
    ];
    let md: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.embedding_length", V::U32(d as u32)),
        ("llama.block_count", V::U32(1)),
        ("llama.attention.head_count", V::U32(2)),
        ("llama.attention.head_count_kv", V::U32(1)),
        ("llama.feed_forward_length", V::U32(ff as u32)),
        ("llama.context_length", V::U32(64)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.vocab_size", V::U32(vocab as u32)),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.pre", V::String("smollm".into())),
        ("tokenizer.ggml.tokens", V::Array(tokens)),
        ("tokenizer.ggml.merges", V::Array(merges)),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(259)),
        ("tokenizer.ggml.add_bos_token", V::Bool(false)),
    ];
    let q = |shape: &[usize], dt: GgmlDType| {
        let n: usize = shape.iter().product();
        let t = Tensor::from_vec(vals(n, 0.5), shape, &dev).unwrap();
        QTensor::quantize(&t, dt).unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    if with_weights {
        tensors.push(("token_embd.weight".into(), q(&[vocab, d], GgmlDType::F16)));
        tensors.push(("output_norm.weight".into(), q(&[d], GgmlDType::F32)));
        let hd = d / 2;
        for (n, s, dt) in [
            ("attn_norm", vec![d], GgmlDType::F32),
            ("attn_q", vec![2 * hd, d], GgmlDType::F16),
            ("attn_k", vec![hd, d], GgmlDType::F32),
            ("attn_v", vec![hd, d], GgmlDType::F16),
            ("attn_output", vec![d, 2 * hd], GgmlDType::F32),
            ("ffn_norm", vec![d], GgmlDType::F32),
            ("ffn_gate", vec![ff, d], GgmlDType::F16),
            ("ffn_up", vec![ff, d], GgmlDType::F16),
            ("ffn_down", vec![d, ff], GgmlDType::F32),
        ] {
            tensors.push((format!("blk.0.{n}.weight"), q(&s, dt)));
        }
    }
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md_refs, &t_refs).unwrap();
    out.into_inner()
}

/// A tiny model of every GGUF architecture (d_model 8, one layer, 16 tokens; F16
/// matrices, F32 norms and biases), and Llama at d_model 32 in block types of 32.
fn gguf_families() {
    for arch in ["llama", "qwen2", "qwen3", "gemma2", "gemma3"] {
        let mut spec = tiny_model::Spec::new(arch, 8);
        spec.layers = 1;
        spec.vocab = 16;
        let ts = tiny_model::quantize(&tiny_model::tensors(&spec, 3), GgmlDType::F16, &[]);
        let b = tiny_model::gguf_bytes(&tiny_model::metadata(&spec), &ts);
        seed("gguf", &format!("family-{arch}"), &b);
    }
    let mut spec = tiny_model::Spec::new("llama", 32);
    spec.layers = 1;
    spec.vocab = 16;
    for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let ts = tiny_model::quantize(&tiny_model::tensors(&spec, 3), dt, &[]);
        let b = tiny_model::gguf_bytes(&tiny_model::metadata(&spec), &ts);
        seed("gguf", &format!("llama-{dt:?}"), &b);
    }
}

/// An HF checkpoint of every family (`config.json` in the transformers 4.x form, and
/// the 5.x `rope_parameters` form where the family has one; a `gemma3` config nesting
/// its `text_config`) with matching tiny weights (d_model 8, two layers, 16 tokens).
fn hf_config() {
    for (model_type, tf5, bf16) in [
        ("llama", false, false),
        ("llama", true, true),
        ("mistral", false, false),
        ("qwen2", false, true),
        ("qwen3", true, false),
        ("gemma2", false, false),
        ("gemma3_text", false, true),
        ("gemma3_text", true, false),
        ("gemma3", false, false),
    ] {
        let arch = match model_type {
            "qwen2" => "qwen2",
            "qwen3" => "qwen3",
            "gemma2" => "gemma2",
            "gemma3" | "gemma3_text" => "gemma3",
            _ => "llama",
        };
        let mut spec = tiny_model::Spec::new(arch, 8);
        spec.vocab = 16;
        let cfg = serde_json::to_vec(&tiny_model::hf_config(&spec, model_type, tf5)).unwrap();
        let prefix = if model_type == "gemma3" {
            "language_model.model."
        } else {
            "model."
        };
        let ts = tiny_model::hf_tensors(&spec, 3, prefix);
        let refs: Vec<T> = ts
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
            .collect();
        let name = format!("{model_type}{}", if tf5 { "-tf5" } else { "" });
        seed("hf_config", &name, &join2(&cfg, &st(&refs, bf16)));
    }
}

fn gguf() {
    seed("gguf", "tiny-llama", &gguf_bytes(true));
    seed("gguf", "metadata-only", &gguf_bytes(false));
    gguf_families();
    let mut b = vec![0u8];
    b.extend(gguf_bytes(false));
    seed("tokenizer", "gguf-gpt2", &b);
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": {"T": 0, "h": 1, "e": 2, "Th": 3, "he": 4, "Ġ": 5}, "merges": ["T h", "h e"]}
    });
    let mut b = vec![1u8];
    b.extend(serde_json::to_vec(&tj).unwrap());
    seed("tokenizer", "hf-json", &b);
}

/// The real janeaustenr lazy-load index (when `scripts/fetch-assets.sh` has extracted
/// it) with the head of its `.rdb`, and the package's `Meta/*.rds` files as indexes.
fn rdata() {
    // Built with the corpus tests' writer: zlib blobs, integer and real offsets, a
    // character vector (a book), a list, and an index alone as an `.rds` stream.
    let book = |lines: &[Option<&str>]| {
        let mut s = r_writer::Ser::v3();
        s.strsxp(lines, 0);
        s.bytes()
    };
    let mut list = r_writer::Ser::v2();
    list.flags(19 | r_writer::HAS_ATTR)
        .int(2)
        .ints(&[1, i32::MIN], 0)
        .reals(&[0.5, -2.0]);
    list.node_sym("names")
        .strsxp(&[Some("a"), Some("b")], 0)
        .nil();
    let vars = [
        (
            "emma",
            book(&[Some("EMMA"), None, Some("Emma Woodhouse, handsome, clever")]),
        ),
        ("other", list.bytes()),
    ];
    for real in [false, true] {
        let (rdx, rdb) = r_writer::db_pair(&vars, real);
        seed(
            "rdata",
            if real {
                "db-real-offsets"
            } else {
                "db-int-offsets"
            },
            &join2(&rdx, &rdb),
        );
    }
    seed(
        "rdata",
        "rds-only",
        &join2(&r_writer::gzip(&list.bytes()), &[]),
    );
    let pkg = Path::new("/root/.cache/sae-ablate/austen/pkg/usr/lib/R/site-library/janeaustenr");
    let rdx = pkg.join("R/janeaustenr.rdx");
    if let (Ok(idx), Ok(rdb)) = (
        std::fs::read(&rdx),
        std::fs::read(rdx.with_extension("rdb")),
    ) {
        seed(
            "rdata",
            "janeaustenr-head",
            &join2(&idx, &rdb[..rdb.len().min(4096)]),
        );
    }
    if let Ok(rd) = std::fs::read_dir(pkg.join("Meta")) {
        for e in rd.flatten() {
            let b = std::fs::read(e.path()).unwrap();
            if b.len() < 8192 {
                let n = e.file_name().to_string_lossy().into_owned();
                seed("rdata", &format!("meta-{n}"), &join2(&b, &[]));
            }
        }
    }
}

#[test]
#[ignore = "writes the fuzz seed corpora into fuzz/corpus/"]
fn write_fuzz_seeds() {
    saelens();
    sparsify();
    llama_scope();
    gemma_scope();
    npy();
    pytorch();
    gguf();
    hf_config();
    rdata();
    for t in [
        "saelens",
        "sparsify",
        "llama_scope",
        "gemma_scope",
        "npy",
        "pytorch",
        "gguf",
        "hf_config",
        "tokenizer",
        "rdata",
    ] {
        let n = std::fs::read_dir(corpus(t)).unwrap().count();
        println!("{t}: {n} seeds");
    }
}
