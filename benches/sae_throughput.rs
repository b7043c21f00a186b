//! SAE throughput (tokens/s) of the fused kernels at real sizes:
//! S = SmolLM2 576×4608, M = Goodfire Llama-3.1-8B 4096×65536, L = Goodfire Llama-3.3-70B 8192×65536,
//! random ReLU weights with ~75 active latents per token, in f32 and bf16; batches 1, 16,
//! 256; ops encode, forward (reconstruct), ablate26 (error-preserving zero of 26 latents),
//! steer.
//!
//! `cargo bench --bench sae_throughput` (several minutes on 2 cores; the L rows dominate);
//! `SAE_BENCH_SIZES=S` to run only some sizes, `SAE_BENCH_DTYPES=bf16` only some dtypes. The reference path is timed by
//! `sae-ablate bench --compare`, not here (it takes seconds per call at M and L).

use candle_core::DType;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sae_ablate::bench::{random_sae, Op, Path, Prepared};

fn sizes() -> Vec<(&'static str, usize, usize)> {
    let all = [("S", 576, 4608), ("M", 4096, 65536), ("L", 8192, 65536)];
    let pick = std::env::var("SAE_BENCH_SIZES").unwrap_or_else(|_| "S,M,L".into());
    all.into_iter()
        .filter(|(n, _, _)| pick.split(',').any(|p| p.trim() == *n))
        .collect()
}

fn dtypes() -> Vec<(&'static str, DType)> {
    let pick = std::env::var("SAE_BENCH_DTYPES").unwrap_or_else(|_| "f32,bf16".into());
    [("f32", DType::F32), ("bf16", DType::BF16)]
        .into_iter()
        .filter(|(n, _)| pick.split(',').any(|p| p.trim() == *n))
        .collect()
}

fn throughput(c: &mut Criterion) {
    for ((name, d_in, d_sae), (dt_name, dt)) in sizes()
        .into_iter()
        .flat_map(|s| dtypes().into_iter().map(move |d| (s, d)))
    {
        let sae = random_sae(d_in, d_sae, dt, 75.0, 42).expect("random SAE");
        let mut g = c.benchmark_group(format!("sae_{name}_{d_in}x{d_sae}_{dt_name}"));
        g.sample_size(10)
            .warm_up_time(std::time::Duration::from_millis(300))
            .measurement_time(std::time::Duration::from_secs(1));
        for batch in [1usize, 16, 256] {
            g.throughput(Throughput::Elements(batch as u64));
            for op in [Op::Encode, Op::Forward, Op::Ablate26, Op::Steer] {
                let prep = Prepared::new(&sae, op, batch).expect("prepare");
                g.bench_with_input(BenchmarkId::new(op.as_str(), batch), &batch, |b, _| {
                    b.iter(|| prep.run(Path::Fused).expect("run"))
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, throughput);
criterion_main!(benches);
