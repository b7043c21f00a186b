//! Throughput measurement shared by `sae-ablate bench` and the criterion benches:
//! random SAEs of realistic size, the machine's ceilings (memory bandwidth, GEMM
//! FLOP rate) measured in the same run, and timing of fused vs reference paths.
//!
//! Nothing here asserts a speed; it measures and reports.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::edit::EditPlan;
use crate::edit::{reference, Edits, SpliceMode};
use crate::rng::Rng;
use crate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
use crate::{FloatDtype, Result};

/// The operations `bench` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Dense latent activations `[N, d_sae]`.
    Encode,
    /// Full reconstruction (`Reconstruction` splice, no edits).
    Forward,
    /// Error-preserving zero-ablation of 26 latents (the ESR setting).
    Ablate26,
    /// Steering by one decoder direction.
    Steer,
}

names!(
    Op,
    "bench op",
    Encode => "encode",
    Forward => "forward",
    Ablate26 => "ablate26",
    Steer => "steer",
);

/// Deterministic uniform values in `[-a, a]`, filled in parallel (fast enough for GBs).
fn uniform(n: usize, a: f32, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = Rng::with_stream(seed, c as u64);
            for x in chunk.iter_mut() {
                *x = ((rng.uniform() * 2.0 - 1.0) as f32) * a;
            }
        });
    v
}

fn tensor(v: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let dev = Device::Cpu;
    Ok(match FloatDtype::try_from(dtype)? {
        FloatDtype::F32 => Tensor::from_vec(v, shape, &dev)?,
        FloatDtype::F16 => Tensor::from_vec(
            v.par_iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(),
            shape,
            &dev,
        )?,
        FloatDtype::BF16 => Tensor::from_vec(
            v.par_iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
            shape,
            &dev,
        )?,
    })
}

/// Inverse of the standard normal upper tail, for `p` in (0, 0.5): `z` with `P(Z > z) = p`.
fn normal_upper_quantile(p: f64) -> f64 {
    // Bisection on the complementary error function; plenty for choosing a bias.
    let tail = |z: f64| 0.5 * erfc(z / std::f64::consts::SQRT_2);
    let (mut lo, mut hi) = (0.0, 10.0);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if tail(mid) > p {
            lo = mid
        } else {
            hi = mid
        }
    }
    0.5 * (lo + hi)
}

fn erfc(x: f64) -> f64 {
    // Numerical Recipes' erfcc (fractional error < 1.2e-7).
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// A random ReLU SAE `d_in × d_sae` in `dtype` whose encoder bias makes about
/// `active` latents fire per token for inputs with i.i.d. N(0, 1) entries.
pub fn random_sae(d_in: usize, d_sae: usize, dtype: DType, active: f64, seed: u64) -> Result<Sae> {
    // Columns uniform with variance 1/d_in, so x·w ≈ N(0, 1) for x ~ N(0, I).
    let a = (3.0 / d_in as f32).sqrt();
    let p = (active / d_sae as f64).clamp(1e-6, 0.49);
    let bias = -normal_upper_quantile(p) as f32;
    let w = SaeWeights {
        w_enc: tensor(uniform(d_in * d_sae, a, seed), &[d_in, d_sae], dtype)?,
        b_enc: tensor(vec![bias; d_sae], &[d_sae], dtype)?,
        w_dec: tensor(
            uniform(d_sae * d_in, a, seed ^ 0xDEC),
            &[d_sae, d_in],
            dtype,
        )?,
        b_dec: tensor(vec![0.0; d_in], &[d_in], dtype)?,
        threshold: None,
        r_mag: None,
        b_mag: None,
        w_skip: None,
    };
    let mut cfg = SaeConfig::new(Architecture::Standard, d_in, d_sae);
    cfg.apply_b_dec_to_input = false;
    Sae::new(cfg, w)
}

/// Machine ceilings measured in this run.
#[derive(Debug, Clone, Copy)]
pub struct Ceilings {
    /// Parallel read bandwidth over a 1 GiB buffer, GB/s.
    pub read_gbs: f64,
    /// Parallel copy bandwidth (bytes read + written), GB/s.
    pub copy_gbs: f64,
    /// f32 GEMM rate of the `gemm` crate on a 256×4096×8192 product, GFLOP/s.
    pub gemm_gflops: f64,
    /// Peak rate of the CPU's bf16 dot-product instruction (`vdpbf16ps`) on all threads,
    /// register-only, GFLOP/s; `None` on CPUs without AVX512-BF16.
    pub bf16_peak_gflops: Option<f64>,
    /// The crate's bf16 GEMM (bf16 weights, input rounded to bf16, f32 sums) on the same
    /// 256×4096×8192 product, GFLOP/s; `None` on CPUs without AVX512-BF16.
    pub gemm_bf16_gflops: Option<f64>,
}

fn best_of<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// Measure read and copy bandwidth, the f32 GEMM rate and, where the CPU has the
/// instruction, the bf16 dot product's peak and the bf16 GEMM rate.
pub fn measure_ceilings() -> Ceilings {
    let n = 1usize << 28; // 1 GiB of f32
    let src = uniform(n, 1.0, 7);
    let mut dst = vec![0f32; n];
    let read = best_of(3, || {
        // XOR-fold the bits: vectorizes fully, so the loop is bound by memory, not by adds.
        let s: u32 = src
            .par_chunks(1 << 20)
            .map(|c| c.iter().fold(0u32, |a, v| a ^ v.to_bits()))
            .reduce(|| 0, |a, b| a ^ b);
        std::hint::black_box(s);
    });
    let copy = best_of(3, || {
        dst.par_chunks_mut(1 << 20)
            .zip(src.par_chunks(1 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s));
        std::hint::black_box(&dst);
    });
    drop(dst);
    drop(src);
    let (m, k, nn) = (256usize, 8192usize, 4096usize);
    let a = uniform(m * k, 1.0, 1);
    let b = uniform(k * nn, 1.0, 2);
    let mut c = vec![0f32; m * nn];
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads().max(1));
    let t = best_of(3, || {
        // SAFETY: a [m,k], b [k,nn], c [m,nn], all row-major and fully allocated.
        unsafe {
            gemm::gemm(
                m,
                nn,
                k,
                c.as_mut_ptr(),
                1,
                nn as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                nn as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
        std::hint::black_box(&c);
    });
    // The same product with bf16 weights in the encoder's [d_in, d_sae] layout.
    let bw: Vec<bf16> = b.par_iter().map(|&v| bf16::from_f32(v)).collect();
    let view = crate::kernels::encode::View2 {
        s0: nn,
        s1: 1,
        off: 0,
    };
    let gemm_bf16 = crate::kernels::gemm_bf16::has_dpbf16().then(|| {
        let t = best_of(3, || {
            crate::kernels::gemm_bf16::gemm_bf16(&a, m, k, &bw, view, nn, &mut c);
            std::hint::black_box(&c);
        });
        2.0 * (m * k * nn) as f64 / t / 1e9
    });
    let bytes = (n * 4) as f64;
    Ceilings {
        read_gbs: bytes / read / 1e9,
        copy_gbs: 2.0 * bytes / copy / 1e9,
        gemm_gflops: 2.0 * (m * k * nn) as f64 / t / 1e9,
        bf16_peak_gflops: crate::kernels::gemm_bf16::peak_gflops(1 << 22),
        gemm_bf16_gflops: gemm_bf16,
    }
}

/// Which implementation a row timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The fused kernels (`EditPlan`).
    Fused,
    /// The plain candle reference (`Sae::encode`, `edit::reference::apply`).
    Reference,
}

names!(Path, "bench path", Fused => "fused", Reference => "reference");

/// The edits an op applies (ids chosen deterministically, spread over the dictionary).
pub fn op_edits(op: Op, d_sae: usize) -> Result<Edits> {
    Ok(match op {
        Op::Encode => Edits::new(SpliceMode::ErrorPreserving),
        Op::Forward => Edits::new(SpliceMode::Reconstruction),
        Op::Ablate26 => {
            let ids: Vec<u32> = (0..26u64)
                .map(|i| ((i * 2521 + 17) % d_sae as u64) as u32)
                .collect();
            let mut ids = ids;
            ids.sort_unstable();
            ids.dedup();
            Edits::new(SpliceMode::ErrorPreserving).zero(&ids)
        }
        Op::Steer => Edits::new(SpliceMode::ErrorPreserving).steer((d_sae / 3) as u32, 8.0),
    })
}

/// A prepared op: plan built once (as a user would), input ready.
pub struct Prepared<'a> {
    sae: &'a Sae,
    op: Op,
    edits: Edits,
    plan: EditPlan,
    x: Tensor,
}

impl<'a> Prepared<'a> {
    /// Build the plan and a random N(0, 1) input of `batch` tokens.
    pub fn new(sae: &'a Sae, op: Op, batch: usize) -> Result<Self> {
        let edits = op_edits(op, sae.d_sae())?;
        let plan = EditPlan::new(sae, &edits)?;
        let x = Tensor::randn(0f32, 1.0, (batch, sae.d_in()), &Device::Cpu)?;
        Ok(Prepared {
            sae,
            op,
            edits,
            plan,
            x,
        })
    }

    /// Run once on `path`.
    pub fn run(&self, path: Path) -> Result<Tensor> {
        match (path, self.op) {
            (Path::Fused, Op::Encode) => self.plan.encode(&self.x),
            (Path::Fused, _) => self.plan.apply(&self.x),
            (Path::Reference, Op::Encode) => self.sae.encode(&self.x),
            (Path::Reference, _) => reference::apply(self.sae, &self.x, &self.edits),
        }
    }

    /// Median wall time in ms over repetitions filling about `budget_s` seconds (at least 3, one warm-up).
    pub fn time(&self, path: Path, budget_s: f64) -> Result<f64> {
        self.run(path)?;
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 3 || (start.elapsed().as_secs_f64() < budget_s && times.len() < 1000) {
            let t = Instant::now();
            std::hint::black_box(self.run(path)?);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}

/// The least work an op must do per call: `(bytes of weights read, FLOPs)`.
pub fn op_work(sae: &Sae, op: Op, batch: usize) -> (f64, f64) {
    let (d, n) = (sae.d_in() as f64, sae.d_sae() as f64);
    let elt = match sae.dtype() {
        DType::F16 | DType::BF16 => 2.0,
        _ => 4.0,
    };
    let b = batch as f64;
    match op {
        Op::Encode | Op::Forward => (d * n * elt, 2.0 * b * d * n),
        Op::Ablate26 => (2.0 * 26.0 * d * 4.0, 4.0 * b * 26.0 * d),
        Op::Steer => (d * 4.0, b * d),
    }
}
