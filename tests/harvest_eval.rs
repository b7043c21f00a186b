//! Activation harvesting (shards, manifest, cache, corruption) and SAE evaluation
//! (determinism, a perfect SAE, the CLI's JSON) on SmolLM2 and a slice of the Austen corpus.
//! Fails loudly when the assets are missing (run scripts/fetch-assets.sh).

#[path = "common/smollm.rs"]
mod smollm;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sae_ablate::eval::{evaluate, EvalConfig, EvalReport};
use sae_ablate::harvest::{corpus_files, ActivationStore, Contexts, HarvestConfig};
use sae_ablate::hooks::HookPoint;
use sae_ablate::model::HookedModel;
use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
use sae_ablate::train::{ActivationSource, ShardSource};
use sae_ablate::FloatDtype;

const CTX: usize = 32;
const HOLDOUT: usize = 2;

/// A per-test temporary directory, removed on drop.
struct Tmp(PathBuf);
impl Tmp {
    fn new(name: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("sae-ablate-harvest-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The first 4000 bytes of Pride and Prejudice's text from the asset folder, as a one-file corpus.
fn corpus_slice(dir: &Path) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/austen/prideprejudice.txt");
    assert!(
        src.is_file(),
        "test asset {} is missing: run scripts/fetch-assets.sh first",
        src.display()
    );
    let text = std::fs::read_to_string(&src).unwrap();
    let mut end = 4000.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let p = dir.join("slice.txt");
    std::fs::write(&p, &text[..end]).unwrap();
    p
}

fn harvest_cfg() -> HarvestConfig {
    let mut c = HarvestConfig::default();
    c.hooks = vec![
        "blocks.3.hook_resid_post".into(),
        "blocks.1.hook_mlp_out".into(),
    ];
    c.context_len = CTX;
    c.batch_size = 4;
    c.max_tokens = Some(300);
    c.holdout_contexts = HOLDOUT;
    c.dtype = FloatDtype::F16;
    c.shard_rows = 128;
    c
}

#[test]
fn harvest_writes_shards_caches_and_detects_corruption() {
    let tmp = Tmp::new("cache");
    let corpus = corpus_slice(&tmp.0);
    let out = tmp.0.join("acts");
    let gguf = smollm::gguf_path();
    let tok = smollm::tokenizer();
    let cfg = harvest_cfg();
    let store = ActivationStore::new(&out);
    let r = {
        let mut m = smollm::model();
        store.harvest(&mut *m, tok, &gguf, &corpus, &cfg).unwrap()
    };
    assert!(!r.cache_hit);
    assert!(r.forwards > 0);
    let man = &r.manifest;
    assert_eq!(man.tokens, 300, "the token budget is honoured exactly");
    assert_eq!(man.outputs.len(), 2);
    for o in &man.outputs {
        assert_eq!(o.tokens, 300, "{}", o.hook);
        assert_eq!(o.shards.len(), 3, "{}: 128 + 128 + 44 rows", o.hook);
        // The shards hold exactly `tokens` rows of d_model.
        let dir = man.hook_dir(&out, &o.hook).unwrap();
        let mut rows = 0;
        for s in &o.shards {
            let f = sae_ablate::io::TensorFile::open(dir.join(&s.name)).unwrap();
            let t = f.load("activations", &Device::Cpu).unwrap();
            assert_eq!(t.dtype(), DType::F16);
            assert_eq!(t.dim(1).unwrap(), 576);
            rows += t.dim(0).unwrap() as u64;
        }
        assert_eq!(rows, o.tokens);
        let src = ShardSource::from_dir(&dir, 256, 0).unwrap();
        assert_eq!(src.d_in(), 576);
    }
    // The shards equal a plain forward's activations (first context, layer 3).
    let ctx = Contexts::build(tok, &corpus_files(&corpus).unwrap(), CTX).unwrap();
    {
        let mut m = smollm::model();
        let cache = sae_ablate::hooks::ActivationCache::new();
        let point: HookPoint = "blocks.3.hook_resid_post".parse().unwrap();
        let mut hooks = sae_ablate::hooks::Hooks::new().with(point, cache.clone());
        let t = Tensor::new(ctx.contexts[0].as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        m.forward(&t, 0, &mut hooks).unwrap();
        let want = cache.get(&point).unwrap().unwrap().squeeze(0).unwrap();
        let want = want
            .narrow(0, ctx.prefix_len, CTX - ctx.prefix_len)
            .unwrap();
        let dir = man.hook_dir(&out, "blocks.3.hook_resid_post").unwrap();
        let f = sae_ablate::io::TensorFile::open(dir.join("shard_00000.safetensors")).unwrap();
        let got = f.load("activations", &Device::Cpu).unwrap();
        let got = got.narrow(0, 0, CTX - ctx.prefix_len).unwrap();
        let diff = (got.to_dtype(DType::F32).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = f.load("activations", &Device::Cpu).unwrap();
        let scale = scale
            .to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 2e-3 * scale.max(1.0), "diff {diff}, scale {scale}");
    }
    // Second run: cache hit, no forward, manifest untouched.
    let mpath = out.join("manifest.json");
    let mtime = std::fs::metadata(&mpath).unwrap().modified().unwrap();
    let r2 = {
        let mut m = smollm::model();
        store.harvest(&mut *m, tok, &gguf, &corpus, &cfg).unwrap()
    };
    assert!(r2.cache_hit);
    assert_eq!(r2.forwards, 0);
    assert_eq!(r2.manifest, r.manifest);
    assert_eq!(
        std::fs::metadata(&mpath).unwrap().modified().unwrap(),
        mtime
    );
    // A flipped byte in a shard: a clear error naming it, not a silent reuse.
    let shard = out
        .join("blocks.1.hook_mlp_out")
        .join("shard_00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let i = bytes.len() - 7;
    bytes[i] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let e = {
        let mut m = smollm::model();
        store
            .harvest(&mut *m, tok, &gguf, &corpus, &cfg)
            .unwrap_err()
            .to_string()
    };
    assert!(
        e.contains("shard_00001.safetensors") && e.contains("corrupted"),
        "{e}"
    );
    // Different settings re-harvest (no stale cache).
    let mut cfg2 = cfg.clone();
    cfg2.max_tokens = Some(100);
    cfg2.hooks = vec!["blocks.1.hook_mlp_out".into()];
    cfg2.dtype = FloatDtype::F32;
    let r3 = {
        let mut m = smollm::model();
        store.harvest(&mut *m, tok, &gguf, &corpus, &cfg2).unwrap()
    };
    assert!(!r3.cache_hit);
    assert_eq!(r3.manifest.tokens, 100);
}

/// SplitMix64.
fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

const HOOK: &str = "blocks.4.hook_resid_post";

fn random_sae(seed: u64) -> Sae {
    let (d, n) = (576, 256);
    let dev = Device::Cpu;
    let mut cfg = SaeConfig::new(Architecture::TopK, d, n);
    cfg.k = 16;
    cfg.hook_name = Some(HOOK.into());
    let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s, &dev).unwrap();
    Sae::new(
        cfg,
        SaeWeights {
            w_enc: t(rand_vec(d * n, seed, 0.05), &[d, n]),
            b_enc: t(rand_vec(n, seed + 1, 0.01), &[n]),
            w_dec: t(rand_vec(n * d, seed + 2, 0.05), &[n, d]),
            b_dec: t(vec![0.0; d], &[d]),
            threshold: None,
            r_mag: None,
            b_mag: None,
            w_skip: None,
        },
    )
    .unwrap()
}

/// `W_enc = [I, −I]`, `W_dec = [I; −I]`, zero biases: ReLU keeps `x⁺` and `x⁻`, and
/// `f W_dec = x⁺ − x⁻ = x` exactly.
fn perfect_sae() -> Sae {
    let d = 576;
    let dev = Device::Cpu;
    let eye = Tensor::eye(d, DType::F32, &dev).unwrap();
    let w_enc = Tensor::cat(&[&eye, &eye.neg().unwrap()], 1).unwrap();
    let w_dec = Tensor::cat(&[&eye, &eye.neg().unwrap()], 0).unwrap();
    let mut cfg = SaeConfig::new(Architecture::Standard, d, 2 * d);
    cfg.hook_name = Some(HOOK.into());
    Sae::new(
        cfg,
        SaeWeights {
            w_enc,
            b_enc: Tensor::zeros(2 * d, DType::F32, &dev).unwrap(),
            w_dec,
            b_dec: Tensor::zeros(d, DType::F32, &dev).unwrap(),
            threshold: None,
            r_mag: None,
            b_mag: None,
            w_skip: None,
        },
    )
    .unwrap()
}

fn held_out(dir: &Path) -> (Vec<Vec<u32>>, usize) {
    let corpus = corpus_slice(dir);
    let ctx = Contexts::build(smollm::tokenizer(), &corpus_files(&corpus).unwrap(), CTX).unwrap();
    let (_, held) = ctx.split(HOLDOUT).unwrap();
    (held.to_vec(), ctx.prefix_len)
}

fn eval(sae: &Sae, held: &[Vec<u32>], prefix_len: usize) -> EvalReport {
    let mut m = smollm::model();
    let mut cfg = EvalConfig::default();
    cfg.batch_size = 2;
    cfg.prefix_len = prefix_len;
    evaluate(&mut *m, sae, held, &cfg).unwrap().0
}

#[test]
fn eval_random_sae_is_deterministic_and_finite() {
    let tmp = Tmp::new("eval-random");
    let (held, prefix) = held_out(&tmp.0);
    let a = eval(&random_sae(7), &held, prefix);
    let b = eval(&random_sae(7), &held, prefix);
    assert_eq!(a, b, "same seed, same numbers");
    for v in [
        a.mse,
        a.fvu,
        a.l0,
        a.dead_fraction,
        a.ce_clean,
        a.ce_spliced,
        a.ce_zero_ablated,
        a.ce_loss_recovered,
    ] {
        assert!(v.is_finite(), "{a:?}");
    }
    assert!(a.ce_clean < a.ce_zero_ablated, "{a:?}");
    assert!(a.l0 <= 16.0 + 1e-9, "{a:?}");
    assert_eq!(a.tokens, (HOLDOUT * (CTX - prefix)) as u64);
    assert_eq!(a.ce_positions, (HOLDOUT * (CTX - 1)) as u64);
    let c = eval(&random_sae(8), &held, prefix);
    assert_ne!(a, c, "a different SAE gives different numbers");
    // The density histogram renders.
    #[cfg(feature = "plot")]
    {
        let png = tmp.0.join("density.png");
        let counts: Vec<f64> = (0..256).map(|i| (i % 7) as f64).collect();
        sae_ablate::eval::plot_latent_density(&counts, 64, &png).unwrap();
        assert!(std::fs::metadata(&png).unwrap().len() > 1000);
    }
}

#[test]
fn eval_perfect_sae_recovers_everything() {
    let tmp = Tmp::new("eval-perfect");
    let (held, prefix) = held_out(&tmp.0);
    let r = eval(&perfect_sae(), &held, prefix);
    assert!(r.fvu < 1e-9, "{r:?}");
    assert!((r.ce_loss_recovered - 1.0).abs() < 1e-4, "{r:?}");
    assert!((r.ce_spliced - r.ce_clean).abs() < 1e-4, "{r:?}");
    assert!(r.ce_zero_ablated > r.ce_clean + 0.1, "{r:?}");
}

#[cfg(feature = "cli")]
#[test]
fn cli_eval_json_has_every_field() {
    let tmp = Tmp::new("cli");
    let corpus = corpus_slice(&tmp.0);
    let sae_dir = tmp.0.join("sae");
    perfect_sae().save_saelens(&sae_dir).unwrap();
    let png = tmp.0.join("hist.png");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sae-ablate"))
        .args(["eval", "--model"])
        .arg(smollm::gguf_path())
        .arg("--sae")
        .arg(&sae_dir)
        .arg("--corpus")
        .arg(&corpus)
        .args(["--context-len", "32", "--holdout-contexts", "2", "--json"])
        .arg("--histogram")
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "fvu",
        "l0",
        "dead_fraction",
        "ce_clean",
        "ce_spliced",
        "ce_zero_ablated",
        "ce_loss_recovered",
        "tokens",
    ] {
        assert!(v.get(k).is_some_and(|x| x.is_number()), "{k} missing: {v}");
    }
    assert!(png.is_file());
    // --help of each new subcommand explains itself.
    for cmd in ["harvest", "train", "eval"] {
        let h = std::process::Command::new(env!("CARGO_BIN_EXE_sae-ablate"))
            .args([cmd, "--help"])
            .output()
            .unwrap();
        assert!(h.status.success());
        let text = String::from_utf8_lossy(&h.stdout);
        assert!(
            text.contains("--model") || text.contains("--activations"),
            "{text}"
        );
    }
}

/// A harvest with a token budget tokenizes only the first files: their contexts are the
/// first contexts of the whole corpus, the corpus hash is the whole corpus's, and the
/// training contexts of the split are the same; a budget past the corpus reads it all.
#[test]
fn first_contexts_are_the_whole_corpus_prefix() {
    let tmp = Tmp::new("first_contexts");
    let dir = &tmp.0;
    let text = std::fs::read_to_string(corpus_slice(dir)).unwrap();
    // One file more than one round of parallel tokenizing takes.
    let n_files = rayon::current_num_threads().max(1) + 1;
    for i in 0..n_files {
        std::fs::write(dir.join(format!("part{i}.txt")), &text).unwrap();
    }
    std::fs::remove_file(dir.join("slice.txt")).unwrap();
    let files = corpus_files(dir).unwrap();
    assert_eq!(files.len(), n_files);
    let tok = smollm::tokenizer();
    let all = Contexts::build(tok, &files, CTX).unwrap();
    let per_ctx = (CTX - all.prefix_len) as u64;
    let first = Contexts::build_first(tok, &files, CTX, 3 * per_ctx, HOLDOUT).unwrap();
    assert_eq!(first.corpus_sha256, all.corpus_sha256);
    assert_eq!(first.prefix_len, all.prefix_len);
    assert!(
        first.contexts.len() < all.contexts.len(),
        "{} of {} contexts: the last file should not have been read",
        first.contexts.len(),
        all.contexts.len()
    );
    assert!(first.contexts.len() >= 3 + HOLDOUT);
    assert_eq!(first.contexts[..], all.contexts[..first.contexts.len()]);
    let (train, _) = first.split(HOLDOUT).unwrap();
    assert!(train.len() >= 3);
    let huge = Contexts::build_first(tok, &files, CTX, u64::MAX / 2, HOLDOUT).unwrap();
    assert_eq!(huge.contexts, all.contexts);
}
