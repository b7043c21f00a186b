//! A tiny SAE (d_in = 2, d_sae = 3) whose outputs are computed by hand in the tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use sae_ablate::sae::{Architecture, Normalization, Sae, SaeConfig, SaeWeights};

pub fn t1(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

pub fn t2(rows: &[&[f32]]) -> Tensor {
    let n = rows.len();
    let d = rows.first().map(|r| r.len()).unwrap_or(0);
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (n, d), &Device::Cpu).unwrap()
}

/// W_enc = [[1,0,1],[0,1,-1]], b_enc = [0,-0.5,0.25], W_dec = [[1,0],[0,2],[1,1]], b_dec = [0.5,-0.5].
pub fn weights() -> SaeWeights {
    SaeWeights {
        w_enc: t2(&[&[1., 0., 1.], &[0., 1., -1.]]),
        b_enc: t1(&[0., -0.5, 0.25]),
        w_dec: t2(&[&[1., 0.], &[0., 2.], &[1., 1.]]),
        b_dec: t1(&[0.5, -0.5]),
        threshold: None,
        r_mag: None,
        b_mag: None,
        w_skip: None,
    }
}

pub fn sae(arch: Architecture) -> Sae {
    let mut w = weights();
    let mut c = SaeConfig::new(arch, 2, 3);
    match arch {
        Architecture::JumpRelu => w.threshold = Some(t1(&[1.5, 0.5, 0.1])),
        Architecture::TopK => c.k = 2,
        Architecture::Gated => {
            w.r_mag = Some(t1(&[0., std::f32::consts::LN_2, 0.]));
            w.b_mag = Some(t1(&[-1., 0., 0.5]));
        }
        _ => {}
    }
    Sae::new(c, w).unwrap()
}

/// Identity SAE with d_in = d_sae = 2, zero biases, and the given normalization.
pub fn identity(norm: Normalization) -> Sae {
    let eye = t2(&[&[1., 0.], &[0., 1.]]);
    let z = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let mut c = SaeConfig::new(Architecture::Standard, 2, 2);
    c.normalization = norm;
    Sae::new(
        c,
        SaeWeights {
            w_enc: eye.clone(),
            b_enc: z.clone(),
            w_dec: eye,
            b_dec: z,
            threshold: None,
            r_mag: None,
            b_mag: None,
            w_skip: None,
        },
    )
    .unwrap()
}

/// A random SAE (uniform weights) of the given architecture and dtype.
pub fn random(arch: Architecture, d_in: usize, d_sae: usize, dtype: DType, seed: u64) -> Sae {
    let dev = Device::Cpu;
    let mut rng = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move |n: usize, scale: f32| -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|_| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((rng >> 33) as f64 / (1u64 << 31) as f64) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, n, &dev).unwrap()
    };
    let cast = |t: Tensor| t.to_dtype(dtype).unwrap();
    let mut c = SaeConfig::new(arch, d_in, d_sae);
    let mut w = SaeWeights {
        w_enc: cast(next(d_in * d_sae, 0.5).reshape((d_in, d_sae)).unwrap()),
        b_enc: cast(next(d_sae, 0.1)),
        w_dec: cast(next(d_sae * d_in, 0.5).reshape((d_sae, d_in)).unwrap()),
        b_dec: cast(next(d_in, 0.1)),
        threshold: None,
        r_mag: None,
        b_mag: None,
        w_skip: None,
    };
    match arch {
        Architecture::JumpRelu => w.threshold = Some(cast(next(d_sae, 0.2).abs().unwrap())),
        Architecture::TopK => c.k = (d_sae / 4).max(1),
        Architecture::Gated => {
            w.r_mag = Some(cast(next(d_sae, 0.3)));
            w.b_mag = Some(cast(next(d_sae, 0.1)));
        }
        _ => {}
    }
    Sae::new(c, w).unwrap()
}

pub fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

pub fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], tol: f32) {
    assert_eq!(a.len(), b.len(), "row count");
    for (i, (ra, rb)) in a.iter().zip(b).enumerate() {
        assert_eq!(ra.len(), rb.len(), "row {i} length");
        for (j, (x, y)) in ra.iter().zip(rb).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "[{i}][{j}]: got {x}, expected {y} (tol {tol})\n got: {a:?}\nwant: {b:?}"
            );
        }
    }
}

/// A fresh temporary directory (removed by the caller or left in the OS temp dir).
pub fn tmpdir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let p = std::env::temp_dir().join(format!(
        "sae-ablate-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}
