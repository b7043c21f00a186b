//! SAE training: recovery of known sparse directions, the L1 SAE, unit-norm decoders,
//! determinism, SAELens round trip of the outputs, geometric median, metrics, sources,
//! and config errors.

#[path = "common/st_writer.rs"]
mod st_writer;

use candle_core::{DType, Device, Tensor};
use sae_ablate::sae::Sae;
use sae_ablate::train::{
    self, geometric_median, ActivationSource, BDecInit, InMemorySource, MetricsAccumulator,
    ShardSource, TrainArchitecture, TrainConfig, TrainedSae,
};
use sae_ablate::Error;
use st_writer::{write_st, TempDir};

/// SplitMix64 for test data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

const D_IN: usize = 32;
const N_TRUE: usize = 64;

/// 64 random unit directions in R^32 and `n` samples, each a non-negative combination
/// (coefficients in [0.5, 1.5]) of 3–5 distinct directions.
fn synthetic(n: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<f32>) {
    let mut rng = Rng(seed);
    let dirs: Vec<Vec<f32>> = (0..N_TRUE)
        .map(|_| {
            let v: Vec<f32> = (0..D_IN).map(|_| rng.normal()).collect();
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            v.into_iter().map(|a| a / norm).collect()
        })
        .collect();
    let mut data = vec![0f32; n * D_IN];
    for row in data.chunks_exact_mut(D_IN) {
        let m = 3 + (rng.next() % 3) as usize;
        let mut picked: Vec<usize> = Vec::new();
        while picked.len() < m {
            let j = (rng.next() % N_TRUE as u64) as usize;
            if !picked.contains(&j) {
                picked.push(j);
            }
        }
        for &j in &picked {
            let c = 0.5 + rng.uniform();
            row.iter_mut().zip(&dirs[j]).for_each(|(r, d)| *r += c * d);
        }
    }
    (dirs, data)
}

fn topk_config(total_tokens: u64) -> TrainConfig {
    TrainConfig {
        batch_size: 256,
        lr: Some(4e-3),
        lr_warmup_steps: 20,
        dead_tokens_threshold: 256 * 40,
        b_dec_init_samples: 1024,
        seed: 7,
        ..TrainConfig::topk(D_IN, 128, 4, total_tokens)
    }
}

fn decoder_rows(sae: &Sae) -> Vec<Vec<f32>> {
    sae.weights().w_dec.to_vec2::<f32>().unwrap()
}

/// Fraction of the true directions matched by some decoder row with cosine ≥ 0.9.
fn recovered(sae: &Sae, dirs: &[Vec<f32>]) -> f64 {
    let rows = decoder_rows(sae);
    let hits = dirs
        .iter()
        .filter(|d| {
            rows.iter().any(|r| {
                let dot: f32 = r.iter().zip(d.iter()).map(|(a, b)| a * b).sum();
                let nr = r.iter().map(|a| a * a).sum::<f32>().sqrt();
                dot / nr >= 0.9
            })
        })
        .count();
    hits as f64 / dirs.len() as f64
}

fn eval(sae: &Sae, data: &[f32]) -> (f64, f64) {
    let x = Tensor::from_slice(data, (data.len() / D_IN, D_IN), &Device::Cpu).unwrap();
    let x_hat = sae.forward(&x).unwrap();
    let f = sae.encode(&x).unwrap();
    (train::fvu(&x, &x_hat).unwrap(), train::mean_l0(&f).unwrap())
}

fn max_norm_dev(sae: &Sae) -> f32 {
    decoder_rows(sae)
        .iter()
        .map(|r| (r.iter().map(|a| a * a).sum::<f32>().sqrt() - 1.0).abs())
        .fold(0.0, f32::max)
}

fn run(cfg: &TrainConfig, data: &[f32], out: Option<&std::path::Path>) -> TrainedSae {
    let mut src = InMemorySource::new(data.to_vec(), D_IN, 1).unwrap();
    train::train(cfg, &mut src, out).unwrap()
}

#[test]
fn topk_recovers_ground_truth_directions() {
    let (dirs, data) = synthetic(16384, 42);
    let t = run(&topk_config(256 * 3000), &data, None);
    let frac = recovered(&t.sae, &dirs);
    let (fvu, l0) = eval(&t.sae, &data);
    eprintln!("topk: recovered {frac:.3}, fvu {fvu:.4}, l0 {l0:.2}");
    let last = t.log.last().unwrap();
    eprintln!(
        "last step: {last:?}; mean tokens/s {:.0}",
        t.log.iter().map(|s| s.tokens_per_s).sum::<f64>() / t.log.len() as f64
    );
    assert!(frac >= 0.8, "only {frac} of the true directions recovered");
    // A third of the samples have 5 components and k = 4: some error is irreducible.
    assert!(fvu < 0.2, "fvu {fvu}");
    assert!(l0 <= 4.0 + 1e-9, "topk l0 {l0}");
    assert!(max_norm_dev(&t.sae) < 1e-4);
}

#[test]
fn standard_sae_reaches_sensible_l0_and_fvu() {
    let (dirs, data) = synthetic(16384, 43);
    let cfg = TrainConfig {
        batch_size: 256,
        lr: Some(4e-3),
        lr_warmup_steps: 20,
        l1_warmup_steps: 200,
        dead_tokens_threshold: 256 * 100,
        resample_every: 500,
        b_dec_init_samples: 1024,
        seed: 3,
        ..TrainConfig::standard(D_IN, 128, 0.4, 256 * 2500)
    };
    let t = run(&cfg, &data, None);
    let (fvu, l0) = eval(&t.sae, &data);
    let frac = recovered(&t.sae, &dirs);
    eprintln!("standard: fvu {fvu:.4}, l0 {l0:.2}, recovered {frac:.3}");
    eprintln!("last step: {:?}", t.log.last().unwrap());
    assert!(fvu < 0.2, "fvu {fvu}");
    assert!((2.0..=15.0).contains(&l0), "l0 {l0}");
    assert!(frac >= 0.8, "only {frac} of the true directions recovered");
    assert!(max_norm_dev(&t.sae) < 1e-4);
}

fn tensors_bits(sae: &Sae) -> Vec<(String, Vec<u32>)> {
    sae.named_tensors()
        .into_iter()
        .map(|(n, t)| {
            let v = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n.to_string(), v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

#[test]
fn same_seed_gives_bitwise_equal_weights() {
    let (_, data) = synthetic(4096, 44);
    let cfg = TrainConfig {
        dead_tokens_threshold: 0, // any latent silent for one batch is dead: AuxK runs
        ..topk_config(256 * 60)
    };
    let a = run(&cfg, &data, None);
    let b = run(&cfg, &data, None);
    assert_eq!(tensors_bits(&a.sae), tensors_bits(&b.sae));
    assert!(a.log.iter().any(|s| s.aux_loss > 0.0), "AuxK never ran");
    let c = run(
        &TrainConfig {
            seed: 8,
            ..cfg.clone()
        },
        &data,
        None,
    );
    assert_ne!(tensors_bits(&a.sae), tensors_bits(&c.sae));
    // Standard with resampling is deterministic too.
    let s = TrainConfig {
        architecture: TrainArchitecture::Standard,
        l1_coefficient: 0.5,
        resample_every: 10,
        dead_tokens_threshold: 256 * 3,
        ..cfg
    };
    let a = run(&s, &data, None);
    let b = run(&s, &data, None);
    assert_eq!(tensors_bits(&a.sae), tensors_bits(&b.sae));
    assert!(max_norm_dev(&a.sae) < 1e-4);
}

#[test]
fn outputs_round_trip_through_saelens() {
    let (_, data) = synthetic(2048, 45);
    let dir = TempDir::new("train-out");
    let cfg = TrainConfig {
        checkpoint_every: 10,
        hook_name: Some("blocks.3.hook_resid_post".into()),
        model_name: Some("synthetic".into()),
        ..topk_config(256 * 25)
    };
    let t = run(&cfg, &data, Some(dir.path()));
    let loaded = Sae::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(tensors_bits(&loaded), tensors_bits(&t.sae));
    assert_eq!(loaded.config().k, 4);
    assert_eq!(loaded.hook_name(), Some("blocks.3.hook_resid_post"));
    // Harvested activations never hold a context's first position: the SAE says so.
    assert_eq!(loaded.config().first_trained_position, 1);
    for step in ["10", "20"] {
        let ck = Sae::load(dir.path().join("checkpoints").join(step), &Device::Cpu).unwrap();
        assert_eq!(ck.d_sae(), 128);
    }
    assert!(!dir.path().join("checkpoints/25").exists());
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("train_log.json")).unwrap()).unwrap();
    let steps = log["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 25);
    let nums: Vec<u64> = steps.iter().map(|s| s["step"].as_u64().unwrap()).collect();
    assert!(nums.windows(2).all(|w| w[0] < w[1]));
    for key in [
        "tokens",
        "mse",
        "fvu",
        "l0",
        "dead_fraction",
        "aux_loss",
        "lr",
        "tokens_per_s",
    ] {
        assert!(steps[0][key].is_number(), "missing {key}");
    }
    assert_eq!(log["config"]["k"], 4);
    #[cfg(feature = "plot")]
    {
        let png = std::fs::read(dir.path().join("train_curve.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(
            png.len() > 5000,
            "PNG suspiciously small: {} bytes",
            png.len()
        );
    }
    // The config file parses back into the same config.
    let back: TrainConfig =
        serde_json::from_slice(&std::fs::read(dir.path().join("train_config.json")).unwrap())
            .unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn geometric_median_matches_hand_computed_values() {
    // Right isosceles triangle: the Fermat point (all angles < 120°) is where each side
    // subtends 120°; by symmetry (t, t) with 12t² − 12t + 2 = 0, t = (3 − √3)/6.
    let t = (3.0 - 3f64.sqrt()) / 6.0;
    let m = geometric_median(&[0., 0., 1., 0., 0., 1.], 2, 500).unwrap();
    assert!(
        (m[0] as f64 - t).abs() < 1e-4 && (m[1] as f64 - t).abs() < 1e-4,
        "{m:?}"
    );
    // Square: the centre.
    let m = geometric_median(&[0., 0., 2., 0., 0., 2., 2., 2.], 2, 10).unwrap();
    assert!((m[0] - 1.0).abs() < 1e-6 && (m[1] - 1.0).abs() < 1e-6);
    // Collinear 0, 1, 10: the middle point, not the mean 11/3.
    let m = geometric_median(&[0., 1., 10.], 1, 300).unwrap();
    assert!((m[0] - 1.0).abs() < 1e-2, "{m:?}");
    assert_eq!(train::mean(&[0., 1., 10., 1.], 2).unwrap(), vec![5.0, 1.0]);
    assert!(geometric_median(&[1., 2., 3.], 2, 5).is_err());
    assert!(geometric_median(&[], 2, 5).is_err());
}

#[test]
fn metrics_match_hand_computed_values() {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
    let x_hat = Tensor::new(&[[1f32, 2.], [3., 5.], [5., 4.]], &dev).unwrap();
    // errors: 0, 1, 4 → Σ = 5; mean token (3, 4): variance Σ = 8 + 0 + 8 = 16.
    assert!((train::fvu(&x, &x_hat).unwrap() - 5.0 / 16.0).abs() < 1e-12);
    assert!((train::mse(&x, &x_hat).unwrap() - 5.0 / 6.0).abs() < 1e-12);
    let f = Tensor::new(&[[0f32, 1., 2.], [0., 0., 3.], [0., 0., 0.]], &dev).unwrap();
    assert!((train::mean_l0(&f).unwrap() - 1.0).abs() < 1e-12);
    let counts = train::fire_counts(&f).unwrap();
    assert_eq!(counts, vec![0.0, 1.0, 2.0]);
    assert!((train::dead_fraction(&counts).unwrap() - 1.0 / 3.0).abs() < 1e-12);
    // Streaming over two batches equals the whole-set numbers.
    let mut acc = MetricsAccumulator::new(2, 3);
    acc.update(
        &x.narrow(0, 0, 2).unwrap(),
        &x_hat.narrow(0, 0, 2).unwrap(),
        &f.narrow(0, 0, 2).unwrap(),
    )
    .unwrap();
    acc.update(
        &x.narrow(0, 2, 1).unwrap(),
        &x_hat.narrow(0, 2, 1).unwrap(),
        &f.narrow(0, 2, 1).unwrap(),
    )
    .unwrap();
    assert!((acc.fvu().unwrap() - 5.0 / 16.0).abs() < 1e-12);
    assert!((acc.mse().unwrap() - 5.0 / 6.0).abs() < 1e-12);
    assert!((acc.mean_l0().unwrap() - 1.0).abs() < 1e-12);
    assert!((acc.dead_fraction().unwrap() - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(acc.tokens(), 3);
    // Errors, not panics.
    assert!(train::fvu(&x, &x.narrow(0, 0, 2).unwrap()).is_err());
    let same = Tensor::new(&[[1f32, 1.], [1., 1.]], &dev).unwrap();
    assert!(train::fvu(&same, &same).is_err());
    assert!(train::dead_fraction(&[]).is_err());
    assert!(acc.update(&x, &x_hat, &f.narrow(1, 0, 2).unwrap()).is_err());
}

fn write_f16_shard(path: &std::path::Path, rows: usize, d: usize, data: &[f32]) {
    let bytes: Vec<u8> = data
        .iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![rows, d], &bytes)
        .unwrap();
    safetensors::serialize_to_file(vec![("activations", view)], None, path).unwrap();
}

#[test]
fn shard_source_mixes_shards_and_checks_layout() {
    let dir = TempDir::new("shards");
    // Three shards; row r of the dataset is [r, r, r, r] (exact in f16).
    let d = 4;
    let mut r = 0;
    for (i, rows) in [5usize, 7, 9].into_iter().enumerate() {
        let data: Vec<f32> = (r..r + rows).flat_map(|v| vec![v as f32; d]).collect();
        let p = dir.path().join(format!("shard_{i:03}.safetensors"));
        if i == 1 {
            write_f16_shard(&p, rows, d, &data);
        } else {
            write_st(&p, &[("activations", vec![rows, d], data)]);
        }
        r += rows;
    }
    std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
    let mut src = ShardSource::from_dir(dir.path(), 8, 5).unwrap();
    assert_eq!(src.d_in(), 4);
    let mut seen = vec![0usize; r];
    let mut out = Vec::new();
    for _ in 0..21 {
        src.next_batch(3, &mut out).unwrap();
        assert_eq!(out.len(), 12);
        for row in out.chunks_exact(d) {
            assert!(row.iter().all(|&v| v == row[0]));
            seen[row[0] as usize] += 1;
        }
    }
    // 63 rows drawn from 21 distinct ones, through an 8-row buffer: every row appears.
    assert!(seen.iter().all(|&c| c > 0), "{seen:?}");
    // Training on shards works and rejects a width mismatch.
    let cfg = TrainConfig {
        batch_size: 8,
        b_dec_init_samples: 8,
        ..TrainConfig::topk(4, 8, 2, 32)
    };
    assert_eq!(train::train(&cfg, &mut src, None).unwrap().log.len(), 4);
    let err = train::train(&TrainConfig { d_in: 5, ..cfg }, &mut src, None).unwrap_err();
    assert!(err.to_string().contains("d_in = 4"), "{err}");
    // Bad shards: wrong tensor name, mixed widths, an empty directory.
    let bad = TempDir::new("shards-bad");
    write_st(
        &bad.path().join("a.safetensors"),
        &[("acts", vec![2, 4], vec![0.0; 8])],
    );
    let e = ShardSource::from_dir(bad.path(), 8, 0).unwrap_err();
    assert!(e.to_string().contains("activations"), "{e}");
    let mixed = TempDir::new("shards-mixed");
    write_st(
        &mixed.path().join("a.safetensors"),
        &[("activations", vec![2, 4], vec![0.0; 8])],
    );
    write_st(
        &mixed.path().join("b.safetensors"),
        &[("activations", vec![2, 3], vec![0.0; 6])],
    );
    let e = ShardSource::from_dir(mixed.path(), 8, 0).unwrap_err();
    assert!(e.to_string().contains("b.safetensors"), "{e}");
    let empty = TempDir::new("shards-empty");
    assert!(ShardSource::from_dir(empty.path(), 8, 0).is_err());
}

#[test]
fn bad_configs_are_clear_errors() {
    let (_, data) = synthetic(512, 46);
    let mut src = InMemorySource::new(data, D_IN, 0).unwrap();
    let base = topk_config(256 * 2);
    let cases: Vec<(TrainConfig, &str)> = vec![
        (
            TrainConfig {
                k: 129,
                ..base.clone()
            },
            "k = 129",
        ),
        (
            TrainConfig {
                k: 0,
                ..base.clone()
            },
            "k = 0",
        ),
        (
            TrainConfig {
                d_in: 16,
                ..base.clone()
            },
            "d_in = 32",
        ),
        (
            TrainConfig {
                d_sae: 0,
                ..base.clone()
            },
            "d_sae = 0",
        ),
        (
            TrainConfig {
                total_tokens: 100,
                ..base.clone()
            },
            "total_tokens = 100",
        ),
        (
            TrainConfig {
                batch_size: 0,
                ..base.clone()
            },
            "batch_size",
        ),
        (
            TrainConfig {
                lr: Some(-1.0),
                ..base.clone()
            },
            "lr",
        ),
        (
            TrainConfig {
                beta2: 1.0,
                ..base.clone()
            },
            "beta2",
        ),
        (
            TrainConfig {
                k_aux: Some(500),
                ..base.clone()
            },
            "k_aux = 500",
        ),
        (
            TrainConfig {
                lr_decay_fraction: 1.5,
                ..base.clone()
            },
            "lr_decay_fraction",
        ),
    ];
    for (cfg, needle) in cases {
        let err = train::train(&cfg, &mut src, None).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        assert!(
            err.to_string().contains(needle),
            "`{err}` should mention `{needle}`"
        );
    }
    assert!(InMemorySource::new(vec![1.0; 10], 4, 0).is_err());
    // Non-finite activations stop training with an error, not NaN weights.
    let mut nan = InMemorySource::new(vec![f32::NAN; 256 * D_IN], D_IN, 0).unwrap();
    let err = train::train(&base, &mut nan, None).unwrap_err();
    assert!(err.to_string().contains("diverged at step 1"), "{err}");
    // Unknown JSON fields are rejected, missing ones take defaults.
    assert!(serde_json::from_str::<TrainConfig>(r#"{"d_in": 4, "dsae": 8}"#).is_err());
    let c: TrainConfig =
        serde_json::from_str(r#"{"architecture": "standard", "d_in": 4, "d_sae": 8}"#).unwrap();
    assert_eq!(c.architecture, TrainArchitecture::Standard);
    assert_eq!(c.b_dec_init, BDecInit::GeometricMedian);
}

#[test]
fn lr_schedule_warms_up_and_decays_to_zero() {
    let c = TrainConfig {
        batch_size: 1,
        lr: Some(1.0),
        lr_warmup_steps: 4,
        lr_decay_fraction: 0.2,
        ..TrainConfig::topk(4, 8, 2, 100)
    };
    assert_eq!(c.steps(), 100);
    assert!((c.lr_at(0) - 0.25).abs() < 1e-12);
    assert!((c.lr_at(3) - 1.0).abs() < 1e-12);
    assert!((c.lr_at(50) - 1.0).abs() < 1e-12);
    assert!((c.lr_at(80) - 1.0).abs() < 1e-12); // first decay step: (100 − 80)/20
    assert!((c.lr_at(90) - 0.5).abs() < 1e-12);
    assert!((c.lr_at(99) - 0.05).abs() < 1e-12);
    let l = TrainConfig {
        l1_coefficient: 2.0,
        l1_warmup_steps: 10,
        ..c
    };
    assert!((l.l1_at(4) - 1.0).abs() < 1e-12);
    assert!((l.l1_at(50) - 2.0).abs() < 1e-12);
}
