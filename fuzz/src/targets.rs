//! The body of every fuzz target, also run over the saved crash inputs by the CI
//! regression test (`tests/fuzz_regressions.rs` includes this file), so that a fixed
//! crash stays fixed without running the fuzzers.
//!
//! Each target takes the raw input, writes it as the files a loader expects (in a
//! scratch directory: the loaders are path-based, exactly as users call them), loads,
//! and exercises whatever loads. Errors must be non-empty; panics fail.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor};
use sae_ablate::Sae;

/// The targets, by name (`fuzz/fuzz_targets/<name>.rs`, `fuzz/corpus/<name>/`).
pub const TARGETS: [&str; 10] = [
    "saelens",
    "sparsify",
    "llama_scope",
    "gemma_scope",
    "pytorch",
    "npy",
    "gguf",
    "hf_config",
    "tokenizer",
    "rdata",
];

/// Run target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "saelens" => sae_dir(name, data, "cfg.json", "sae_weights.safetensors"),
        "sparsify" => sae_dir(name, data, "cfg.json", "sae.safetensors"),
        "llama_scope" => sae_dir(name, data, "hyperparams.json", "final.safetensors"),
        "gemma_scope" => gemma_scope(data),
        "pytorch" => pytorch(data),
        "npy" => npy(data),
        "gguf" => gguf(data),
        "hf_config" => hf_config(data),
        "tokenizer" => tokenizer(data),
        "rdata" => rdata(data),
        other => panic!("no fuzz target `{other}`"),
    }
}

/// SAELens, sparsify and Llama Scope releases through `Sae::load`: `u16` length, the
/// JSON config, then the safetensors weights (see [`split2`]).
fn sae_dir(name: &str, data: &[u8], cfg_file: &str, weights_file: &str) {
    let (cfg, weights) = split2(data);
    let d = Scratch::new(name);
    d.put(cfg_file, Some(cfg));
    d.put(weights_file, Some(weights));
    load_sae(d.path());
}

/// Gemma Scope through `Sae::load`: first byte even → the rest is `params.npz`; odd →
/// `u16` length, `config.json`, then `params.safetensors` (Gemma Scope 2).
fn gemma_scope(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let d = Scratch::new("gemma_scope");
    if sel & 1 == 0 {
        d.put("params.npz", Some(rest));
    } else {
        let (cfg, weights) = split2(rest);
        d.put("config.json", Some(cfg));
        d.put("params.safetensors", Some(weights));
    }
    load_sae(d.path());
}

/// PyTorch `torch.save` files (zip and legacy forms): the restricted unpickler and
/// storage reader (`PthFile`), every tensor loaded, then the Goodfire and
/// dictionary_learning builders on the same file.
fn pytorch(data: &[u8]) {
    use sae_ablate::io::pickle::PthFile;
    use sae_ablate::sae::{dictionary_learning, goodfire};
    let d = Scratch::new("pytorch");
    let path = d.put("model.pt", Some(data));
    let f = match PthFile::open(&path) {
        Ok(f) => f,
        Err(e) => return check_error(&e),
    };
    let dev = Device::Cpu;
    for name in f.names() {
        let shape = f.shape(name).map(<[usize]>::to_vec);
        match f.load(name, &dev) {
            Ok(t) => assert_eq!(Some(t.dims().to_vec()), shape, "tensor `{name}`"),
            Err(e) => check_error(&e),
        }
    }
    match goodfire::load_from(&f, &dev) {
        Ok(sae) => exercise_sae(&sae),
        Err(e) => check_error(&e),
    }
    match dictionary_learning::load_from(&f, None, &dev) {
        Ok(sae) => exercise_sae(&sae),
        Err(e) => check_error(&e),
    }
}

/// `.npy` arrays, as the CLI's `encode`/`apply` inputs are read (`read_npy` maps the
/// file and calls `parse_npy`), then widened to f32 as the CLI does.
fn npy(data: &[u8]) {
    use sae_ablate::io::npy;
    let header = npy::NpyHeader::parse(data);
    match npy::parse_npy(data, &Device::Cpu) {
        Ok(t) => {
            let h = header.expect("parse_npy accepted a header NpyHeader::parse rejects");
            assert_eq!(t.dims(), &h.shape[..]);
            if let Err(e) = t.to_dtype(candle_core::DType::F32) {
                check_error(&e.into())
            }
        }
        Err(e) => check_error(&e),
    }
}

/// GGUF model files of every supported architecture: header, metadata, tensor table and
/// tensor data, through `Model::from_gguf` (what `model::load` and the CLI call); a model
/// that loads runs (see [`exercise_model`]).
fn gguf(data: &[u8]) {
    use sae_ablate::model::{LoadOptions, Model};
    let d = Scratch::new("gguf");
    let path = d.put("model.gguf", Some(data));
    match Model::from_gguf(&path, &LoadOptions::default()) {
        Ok(mut m) => exercise_model(&mut m),
        Err(e) => check_error(&e),
    }
}

/// HF checkpoints: `u16` length, `config.json` (any family's, transformers 4.x or 5.x
/// form, nested `text_config` included), then `model.safetensors`, through
/// `Model::from_hf_dir`; a model that loads runs (see [`exercise_model`]).
fn hf_config(data: &[u8]) {
    use sae_ablate::model::{LoadOptions, Model};
    let (cfg, weights) = split2(data);
    let d = Scratch::new("hf_config");
    d.put("config.json", Some(cfg));
    d.put("model.safetensors", Some(weights));
    match Model::from_hf_dir(d.path(), &LoadOptions::default()) {
        Ok(mut m) => exercise_model(&mut m),
        Err(e) => check_error(&e),
    }
}

/// Whatever model loads must run: a prefill of up to 3 tokens, then one decode step
/// (the two code paths), each giving logits of the right shape or an error. The
/// weights are bounded by the file, so this is cheap.
pub fn exercise_model(m: &mut sae_ablate::model::Model) {
    use sae_ablate::hooks::Hooks;
    use sae_ablate::model::HookedModel;
    let (d, vocab) = (m.config().d_model, m.vocab_size());
    if std::env::var_os("SAE_ABLATE_FUZZ_VERBOSE").is_some() {
        eprintln!(
            "loaded: {} d_model {d} layers {} vocab {vocab}",
            m.family(),
            m.n_layers()
        );
    }
    assert!(d > 0 && vocab > 0, "loaded a model with a zero dimension");
    let n = m.max_seq_len().min(3);
    let ids: Vec<u32> = (0..n).map(|i| (i % vocab) as u32).collect();
    let Ok(x) = Tensor::from_vec(ids, (1, n), &Device::Cpu) else {
        return;
    };
    match m.forward(&x, 0, &mut Hooks::new()) {
        Ok(l) => assert_eq!(l.dims(), &[1, n, vocab], "prefill logits"),
        Err(e) => return check_error(&e),
    }
    if n < m.max_seq_len() {
        let Ok(x) = Tensor::from_vec(vec![0u32], (1, 1), &Device::Cpu) else {
            return;
        };
        match m.forward(&x, n, &mut Hooks::new()) {
            Ok(l) => assert_eq!(l.dims(), &[1, 1, vocab], "decode logits"),
            Err(e) => check_error(&e),
        }
    }
}

/// Tokenizer metadata: first byte even → the rest is a GGUF file whose
/// `tokenizer.ggml.*` metadata builds the tokenizer (`Tokenizer::from_gguf_file`);
/// odd → an HF `tokenizer.json` (`Tokenizer::from_hf`). A tokenizer that builds must
/// encode, decode and render a chat prompt (or say why not).
fn tokenizer(data: &[u8]) {
    use sae_ablate::model::Tokenizer;
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let d = Scratch::new("tokenizer");
    let tok = if sel & 1 == 0 {
        Tokenizer::from_gguf_file(d.put("model.gguf", Some(rest)))
    } else {
        Tokenizer::from_hf(d.put("tokenizer.json", Some(rest)))
    };
    let tok = match tok {
        Ok(t) => t,
        Err(e) => return check_error(&e),
    };
    match tok.encode("The capital of France is 1234, naïve 🙂") {
        Ok(ids) => {
            if let Err(e) = tok.decode(&ids, false) {
                check_error(&e)
            }
        }
        Err(e) => check_error(&e),
    }
    if let Err(e) = tok.chat_prompt("hi") {
        check_error(&e)
    }
    let _ = tok.vocab_size();
}

/// R lazy-load databases (the Austen corpus extractor): `u16` length, the `.rdx`
/// index (an R serialization stream, gzip/zlib-compressed or raw), then the `.rdb`
/// blobs. Every variable is fetched and read as a book's lines.
fn rdata(data: &[u8]) {
    use sae_ablate::corpus::{austen, rdata::LazyLoadDb};
    let (rdx, rdb) = split2(data);
    let db = match LazyLoadDb::from_bytes(rdx, rdb.to_vec()) {
        Ok(db) => db,
        Err(e) => return check_error(&e),
    };
    let _ = db.compression();
    let names: Vec<String> = db.names().map(String::from).collect();
    for name in &names {
        if let Err(e) = db.get(name) {
            check_error(&e)
        }
        if let Err(e) = austen::book_text(&db, name) {
            check_error(&e)
        }
    }
}

/// Split one input into two files: a little-endian `u16` length `n`, then `n` bytes of
/// the first file (a JSON config, an `.rdx` index) and the rest for the second.
pub fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    match data {
        [a, b, rest @ ..] => {
            let n = (u16::from_le_bytes([*a, *b]) as usize).min(rest.len());
            rest.split_at(n)
        }
        _ => (&[], data),
    }
}

/// A per-process scratch directory (under `/dev/shm` when it exists) where a target
/// writes its input as the files a path-based loader expects. The loaders are the
/// ones users call; only the bytes come from the fuzzer.
/// Files not written by the current input are removed, so nothing leaks between inputs.
pub struct Scratch(PathBuf);

impl Scratch {
    /// `<tmp>/sae-ablate-fuzz-<target>-<pid>-<thread>/`, emptied.
    pub fn new(target: &str) -> Self {
        static THREAD: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static ID: usize = THREAD.fetch_add(1, Ordering::Relaxed);
        }
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "sae-ablate-fuzz-{target}-{}-{}",
            std::process::id(),
            ID.with(|i| *i)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Write `bytes` to `name` in the directory (`None` removes the file).
    pub fn put(&self, name: &str, bytes: Option<&[u8]>) -> PathBuf {
        let p = self.0.join(name);
        match bytes {
            Some(b) => std::fs::write(&p, b).expect("scratch write"),
            None => {
                let _ = std::fs::remove_file(&p);
            }
        }
        p
    }
}

/// An error must say something, on one line (it is printed as `error: …` by the CLI).
/// With `SAE_ABLATE_FUZZ_VERBOSE` set, the error is printed (to triage a corpus).
pub fn check_error(e: &sae_ablate::Error) {
    let s = e.to_string();
    if std::env::var_os("SAE_ABLATE_FUZZ_VERBOSE").is_some() {
        eprintln!("error: {s}");
    }
    assert!(!s.trim().is_empty(), "empty error message: {e:?}");
}

/// Whatever loads must work: encode, decode and forward one zero row and one row of
/// ones (weights are bounded by the file, so these are small), and list non-finite
/// weights. Errors are fine; panics and huge allocations are not.
pub fn exercise_sae(sae: &Sae) {
    if std::env::var_os("SAE_ABLATE_FUZZ_VERBOSE").is_some() {
        eprintln!(
            "loaded: {} d_in {} d_sae {} {:?}",
            sae.format(),
            sae.d_in(),
            sae.d_sae(),
            sae.architecture()
        );
    }
    let d = sae.d_in();
    assert!(
        d > 0 && sae.d_sae() > 0,
        "loaded an SAE with a zero dimension"
    );
    let dev = Device::Cpu;
    for x in [
        Tensor::zeros((1, d), candle_core::DType::F32, &dev),
        Tensor::ones((2, d), candle_core::DType::F32, &dev),
    ] {
        let Ok(x) = x else { return };
        match sae.forward(&x) {
            Ok(y) => assert_eq!(y.dims(), x.dims(), "forward changed the shape"),
            Err(e) => check_error(&e),
        }
        match sae.encode(&x) {
            Ok(f) => {
                assert_eq!(f.dims(), &[x.dims()[0], sae.d_sae()]);
                if let Err(e) = sae.decode(&f) {
                    check_error(&e)
                }
            }
            Err(e) => check_error(&e),
        }
    }
    if let Err(e) = sae.non_finite() {
        check_error(&e)
    }
}

/// Load an SAE from `path` with [`Sae::load`] and exercise it.
pub fn load_sae(path: &Path) {
    match Sae::load(path, &Device::Cpu) {
        Ok(sae) => exercise_sae(&sae),
        Err(e) => check_error(&e),
    }
}
