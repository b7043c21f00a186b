//! Block-quantized matrix × activations ([`QMatrix::matmul`]) at SmolLM2's decode shapes:
//! the stacked gate/up projection `[3072, 576]` and the down projection `[576, 1536]`, in
//! Q4_1 and Q8_0, for 1, 8 and 1024 activation rows (batch-1 decode, batched decode, and
//! a batched prefill or harvest pass of 8 × 128 tokens), on every SIMD body this CPU has
//! (AVX2, and AVX-512 VNNI where present).
//!
//! `cargo bench --bench quant_matmul`. Throughput is in weight·row products, so the
//! batched rows compare directly with batch 1: a kernel that streams each block once for
//! all 8 rows at no extra cost would show 8× the batch-1 rate.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sae_ablate::kernels::quant::{Isa, QMatrix, QType};

fn weights(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| {
            let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
            (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

fn quant(c: &mut Criterion) {
    for (name, rows, cols) in [("gate_up", 3072, 576), ("down", 576, 1536)] {
        let w = weights(rows, cols, 7);
        let mut g = c.benchmark_group(format!("qmatmul_{name}_{rows}x{cols}"));
        g.sample_size(20)
            .warm_up_time(std::time::Duration::from_millis(300))
            .measurement_time(std::time::Duration::from_secs(1));
        for ty in [QType::Q4_1, QType::Q8_0] {
            let m = QMatrix::quantize(ty, rows, cols, &w).expect("quantize");
            for n in [1usize, 8, 1024] {
                let x = weights(n, cols, 99);
                g.throughput(Throughput::Elements((rows * cols * n) as u64));
                for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
                    let id = BenchmarkId::new(format!("{ty:?}/{isa:?}"), n);
                    // Timed from a pool worker, as the decode step calls it: from the
                    // outside, each call would also pay for waking the pool (~30 µs).
                    g.bench_with_input(id, &n, |b, &n| {
                        rayon::scope(|_| b.iter(|| m.matmul_on(&x, n, isa).expect("matmul")))
                    });
                }
            }
        }
        g.finish();
    }
}

criterion_group!(benches, quant);
criterion_main!(benches);
