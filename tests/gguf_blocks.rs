//! Every GGUF block type in both weight formats, on tiny random models written with
//! candle's own quantizers and GGUF writer (`llama`, `gemma3`, and the other GGUF
//! architectures; d_model 256 so that one K-quant super-block of 256 fits a row).
//!
//! * `WeightFormat::Dense` must dequantize exactly as candle does: the logits of a file
//!   of each type equal those of the same model written in F32 with every matrix
//!   replaced by candle's dequantization of its quantized form.
//! * `WeightFormat::Quantized` keeps `Q4_1` and `Q8_0` blocks as stored (checked by the
//!   bytes the matrices take) and requantizes every other type to `Q8_0` the way candle's
//!   `Q8_0` quantizer does (checked against a file candle requantized); its logits track
//!   the dense model's within what 8-bit activations and weights allow.
//! * Row widths that are not a multiple of 32 are an error naming the tensor.
//!
//! candle 0.11 writes and reads all of F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and
//! Q2_K…Q6_K; all are covered. (`Q8_1` and `Q8_K` are candle's activation formats, not
//! storage types of GGUF weights, and are left out.)

#[path = "common/tiny_model.rs"]
mod tiny_model;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use sae_ablate::hooks::Hooks;
use sae_ablate::model::{HookedModel, LoadOptions, Model, WeightFormat};
use tiny_model::{gguf_bytes, metadata, quantize, tensors, Spec};

/// Every block type covered.
const TYPES: [GgmlDType; 13] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

const D: usize = 256;
const SEED: u64 = 7;

/// A file in the temp directory, removed on drop.
struct TmpFile(std::path::PathBuf);

impl std::ops::Deref for TmpFile {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TmpFile {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write(name: &str, bytes: &[u8]) -> TmpFile {
    let dir = std::env::temp_dir().join(format!("sae-ablate-gguf-blocks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    TmpFile(p)
}

fn load(path: &std::path::Path, weights: WeightFormat) -> Model {
    let opts = LoadOptions::default().with_weights(weights);
    Model::from_gguf(path, &opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Two sequences of 12 token ids (longer than the Gemma files' window of 4).
fn ids(vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % vocab as u32).collect();
    Tensor::from_vec(v, (2, 12), &Device::Cpu).unwrap()
}

/// Logits `[position][vocab]` of a prefill over [`ids`].
fn logits(m: &mut Model) -> Vec<Vec<f32>> {
    let l = m
        .forward(&ids(m.vocab_size()), 0, &mut Hooks::new())
        .unwrap();
    let (b, t, v) = l.dims3().unwrap();
    let flat = l.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(flat.iter().all(|x| x.is_finite()));
    flat.chunks(v).map(<[f32]>::to_vec).take(b * t).collect()
}

/// `max |a − b| / max |b|` over every logit.
fn rel_max(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let scale = b.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// `‖a − b‖₂ / ‖b‖₂` over every logit.
fn rel_l2(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den).sqrt()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

/// The file of `spec` with every matrix in `dt`, and its reference: the same model in
/// F32 with each matrix replaced by candle's dequantization of its `dt` form.
fn file_and_reference(spec: &Spec, dt: GgmlDType) -> (TmpFile, TmpFile) {
    let md = metadata(spec);
    let ts = tensors(spec, SEED);
    let q = quantize(&ts, dt, &[]);
    let deq: Vec<(String, QTensor)> = q
        .iter()
        .map(|(n, q)| {
            let t = q.dequantize(&Device::Cpu).unwrap();
            (n.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let tag = format!("{}-{dt:?}", spec.arch);
    (
        write(&format!("{tag}.gguf"), &gguf_bytes(&md, &q)),
        write(&format!("{tag}-ref.gguf"), &gguf_bytes(&md, &deq)),
    )
}

/// Dense: logits equal (to 1e-4 of the largest) the F32 model of candle's dequantized
/// weights, for every type; and the quantized types really change the model (so the
/// comparison could fail): their logits differ from the unquantized F32 model's.
fn dense_matches_candle(arch: &'static str) {
    let spec = Spec::new(arch, D);
    let (orig, _) = file_and_reference(&spec, GgmlDType::F32);
    let original = logits(&mut load(&orig, WeightFormat::Dense));
    for dt in TYPES {
        let (file, reference) = file_and_reference(&spec, dt);
        let mut m = load(&file, WeightFormat::Dense);
        assert_eq!(m.weight_format(), WeightFormat::Dense);
        let got = logits(&mut m);
        let want = logits(&mut load(&reference, WeightFormat::Dense));
        let e = rel_max(&got, &want);
        assert!(
            e <= 1e-4,
            "{arch} {dt:?}: dense logits differ from candle's by {e}"
        );
        let moved = rel_max(&got, &original);
        if !matches!(dt, GgmlDType::F32) {
            // F16/BF16 round each weight by 2^-11 / 2^-8 relative, the block types by more.
            assert!(
                moved > 1e-5,
                "{arch} {dt:?}: no different from f32 ({moved})"
            );
        }
    }
}

#[test]
fn dense_llama_dequantizes_as_candle() {
    dense_matches_candle("llama");
}

#[test]
fn dense_gemma3_dequantizes_as_candle() {
    dense_matches_candle("gemma3");
}

#[test]
fn dense_qwen2_qwen3_gemma2_dequantize_as_candle() {
    for arch in ["qwen2", "qwen3", "gemma2"] {
        dense_matches_candle(arch);
    }
}

/// Quantized against Dense on the same file.
///
/// Bounds. Each product quantizes its activation row to 8 bits per block of 32
/// (`x ≈ dx·q`, `dx = max|x| / 127`, round to nearest), and every type but Q4_1/Q8_0 has
/// its weights requantized the same way. Rounding to a step `δ` leaves an error uniform
/// in `±δ/2`, RMS `δ/√12`; with `δ = max/127` and the max of a block of 32 roughly
/// normal values at 2–2.5 × their RMS, that is 0.5–0.65 % of the RMS per quantization.
/// A logit goes through about 9 such roundings per layer plus 2 for the head (q/k/v and
/// o inputs, gate/up and down inputs, the weights of each), independent, so they add in
/// quadrature: √20 × 0.6 % ≈ 2.7 % for two layers (√11 × 0.6 % ≈ 2 % where the weights
/// stay as stored), before whatever the nonlinearities amplify or damp. Measured: 2.4–2.6 %
/// (1.7 % for Q4_1/Q8_0). We bound the relative L2 error of all logits by 5 %.
/// For small logit errors `ε`, KL(p ‖ q) ≈ ½ Var_p(ε): logits of RMS ~3 with 5 % error
/// give ε of RMS 0.15 and a KL of about ½ · 0.15² ≈ 0.011 nats, the bound on the mean
/// over positions (measured: 0.0005–0.0025); one position can have several times the
/// mean (measured worst/mean: 3–5), so 0.04 per position. Argmax: two logits closer than
/// the error swap, so we require agreement on 80 % of the 24 positions, not all.
fn quantized_tracks_dense(arch: &'static str) {
    let spec = Spec::new(arch, D);
    for dt in TYPES {
        let (file, _) = file_and_reference(&spec, dt);
        let dense = logits(&mut load(&file, WeightFormat::Dense));
        let mut m = load(&file, WeightFormat::Quantized);
        assert_eq!(m.weight_format(), WeightFormat::Quantized, "{arch} {dt:?}");
        let got = logits(&mut m);
        let rel = rel_l2(&got, &dense);
        let kls: Vec<f64> = got.iter().zip(&dense).map(|(q, d)| kl(d, q)).collect();
        let worst_kl = kls.iter().copied().fold(0f64, f64::max);
        let mean_kl = kls.iter().sum::<f64>() / kls.len() as f64;
        let rms = (dense
            .iter()
            .flatten()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            / (dense.len() * dense[0].len()) as f64)
            .sqrt();
        let agree = got
            .iter()
            .zip(&dense)
            .filter(|(q, d)| argmax(q) == argmax(d))
            .count();
        eprintln!("{arch} {dt:?}: rel L2 {rel:.4}, KL mean {mean_kl:.5} worst {worst_kl:.5}, argmax {agree}/24, logit rms {rms:.3}");
        // The KL bound below assumes logits of RMS ~3.
        assert!((2.0..5.0).contains(&rms), "{arch} {dt:?}: logit RMS {rms}");
        assert!(rel < 0.05, "{arch} {dt:?}: relative error {rel}");
        assert!(mean_kl < 0.01, "{arch} {dt:?}: mean KL {mean_kl}");
        assert!(worst_kl < 0.04, "{arch} {dt:?}: KL {worst_kl}");
        assert!(
            agree * 5 >= got.len() * 4,
            "{arch} {dt:?}: argmax agrees on {agree}"
        );
        // Not the dense model itself: the activations are quantized.
        assert!(rel > 1e-5, "{arch} {dt:?}: identical to dense ({rel})");
    }
}

/// KL(softmax(p) ‖ softmax(q)) in nats.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let lsm = |l: &[f32]| {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        l.iter().map(|&x| x as f64 - z).collect::<Vec<f64>>()
    };
    let (lp, lq) = (lsm(p), lsm(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

#[test]
fn quantized_llama_tracks_dense() {
    quantized_tracks_dense("llama");
}

#[test]
fn quantized_gemma3_tracks_dense() {
    quantized_tracks_dense("gemma3");
}

/// Every type but Q4_1 and Q8_0 runs as candle's `Q8_0` quantization of candle's
/// dequantization: the same logits as a file whose matrices candle requantized to Q8_0
/// (candle's and the loader's Q8_0 quantizers are both llama.cpp's reference one:
/// scale `max|w| / 127` rounded to f16, codes `round(w / scale)`).
#[test]
fn quantized_requantizes_to_q8_0_as_candle_does() {
    for arch in ["llama", "gemma3"] {
        let spec = Spec::new(arch, D);
        let md = metadata(&spec);
        let ts = tensors(&spec, SEED);
        for dt in TYPES {
            if matches!(dt, GgmlDType::Q4_1 | GgmlDType::Q8_0) {
                continue;
            }
            let q = quantize(&ts, dt, &[]);
            let requant: Vec<(String, QTensor)> = q
                .iter()
                .map(|(n, q)| {
                    let t = q.dequantize(&Device::Cpu).unwrap();
                    let to = if t.rank() == 2 {
                        GgmlDType::Q8_0
                    } else {
                        GgmlDType::F32
                    };
                    (n.clone(), QTensor::quantize(&t, to).unwrap())
                })
                .collect();
            let tag = format!("{arch}-{dt:?}-requant");
            let file = write(&format!("{tag}.gguf"), &gguf_bytes(&md, &q));
            let reference = write(&format!("{tag}-ref.gguf"), &gguf_bytes(&md, &requant));
            let got = logits(&mut load(&file, WeightFormat::Quantized));
            let want = logits(&mut load(&reference, WeightFormat::Quantized));
            let e = rel_max(&got, &want);
            assert!(
                e <= 1e-6,
                "{arch} {dt:?}: differs from candle's Q8_0 by {e}"
            );
        }
    }
}

/// Bytes the llama model's weights take per decode step (`Model::weight_bytes`: every
/// matrix, every norm, one embedding row), by hand: matrices in blocks of 32 of
/// `block` bytes, f32 norms.
fn llama_bytes(spec: &Spec, qkv_block: usize, block: usize) -> usize {
    let (d, hd, ff, l) = (spec.d, spec.head_dim, spec.ff, spec.layers);
    let qkv = (spec.heads + 2 * spec.kv_heads) * hd * d;
    let rest = d * spec.heads * hd + 3 * ff * d;
    let head = spec.vocab * d + d; // LM head + one embedding row
    let norms = (1 + 2 * l) * d * 4;
    norms + l * qkv / 32 * qkv_block + (l * rest + head) / 32 * block
}

/// Q4_1 and Q8_0 blocks stay as stored (20 and 34 bytes a block); every other type
/// becomes Q8_0 (34). q, k and v run as one fused matrix: where their types differ they
/// are requantized to Q8_0 together.
#[test]
fn quantized_keeps_q4_1_and_q8_0_blocks() {
    let spec = Spec::new("llama", D);
    let md = metadata(&spec);
    let ts = tensors(&spec, SEED);
    for dt in TYPES {
        let file = write(
            &format!("bytes-{dt:?}.gguf"),
            &gguf_bytes(&md, &quantize(&ts, dt, &[])),
        );
        let m = load(&file, WeightFormat::Quantized);
        let block = if dt == GgmlDType::Q4_1 { 20 } else { 34 };
        assert_eq!(m.weight_bytes(), llama_bytes(&spec, block, block), "{dt:?}");
    }
    // Q4_1 with Q8_0 values and one Q8_0 up-projection: q/k/v of both layers and
    // gate/up of layer 0 become Q8_0, the rest stays Q4_1.
    let mixed: Vec<(&str, GgmlDType)> = vec![
        ("blk.0.attn_v.weight", GgmlDType::Q8_0),
        ("blk.1.attn_v.weight", GgmlDType::Q8_0),
        ("blk.0.ffn_up.weight", GgmlDType::Q8_0),
    ];
    let file = write(
        "bytes-mixed.gguf",
        &gguf_bytes(&md, &quantize(&ts, GgmlDType::Q4_1, &mixed)),
    );
    let m = load(&file, WeightFormat::Quantized);
    let gate_up = 2 * spec.ff * spec.d / 32 * (34 - 20);
    assert_eq!(m.weight_bytes(), llama_bytes(&spec, 34, 20) + gate_up);
    // Dense keeps f32 whatever the file's types.
    let dense = load(&file, WeightFormat::Dense);
    assert_eq!(dense.dtype(), candle_core::DType::F32);
}

/// The quantized format needs rows of a multiple of 32: a wider-or-narrower matrix is an
/// error naming it (an F32 file, which any width fits); the dense format loads it.
#[test]
fn quantized_rejects_rows_not_a_multiple_of_32() {
    // MLP width 48: ffn_down is [64, 48].
    let mut spec = Spec::new("llama", 64);
    spec.ff = 48;
    let ts = tensors(&spec, SEED);
    let file = write(
        "ff48.gguf",
        &gguf_bytes(&metadata(&spec), &quantize(&ts, GgmlDType::F32, &[])),
    );
    let opts = LoadOptions::default().with_weights(WeightFormat::Quantized);
    let e = Model::from_gguf(&file, &opts).unwrap_err().to_string();
    assert!(
        e.contains("blk.0.ffn_down.weight")
            && e.contains("multiple of 32")
            && e.contains("ff48.gguf"),
        "{e}"
    );
    let mut m = load(&file, WeightFormat::Dense);
    assert_eq!(logits(&mut m).len(), 24);
    // d_model 40 (heads of 10): the embedding is the first matrix read.
    let mut spec = Spec::new("gemma3", 40);
    spec.head_dim = 10;
    let ts = tensors(&spec, SEED);
    let file = write(
        "d40.gguf",
        &gguf_bytes(&metadata(&spec), &quantize(&ts, GgmlDType::F16, &[])),
    );
    let e = Model::from_gguf(&file, &opts).unwrap_err().to_string();
    assert!(
        e.contains("token_embd.weight") && e.contains("[64, 40]"),
        "{e}"
    );
    assert!(Model::from_gguf(&file, &LoadOptions::default()).is_ok());
}
