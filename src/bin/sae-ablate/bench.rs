//! `sae-ablate bench`: SAE throughput, fused vs reference, with the machine's ceilings.

use std::path::PathBuf;

use candle_core::{DType, Device};
use clap::Args;
use sae_ablate::bench::{measure_ceilings, op_work, random_sae, Op, Path, Prepared};
use sae_ablate::{Error, FloatDtype, Result, Sae};

/// Arguments of `sae-ablate bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// SAE release to time (any supported format).
    #[arg(long, conflicts_with = "random")]
    sae: Option<PathBuf>,
    /// A random ReLU SAE `D_INxD_SAE`, e.g. `8192x65536`, with ~75 active latents per token.
    #[arg(long)]
    random: Option<String>,
    /// Weight dtype of the random SAE: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: FloatDtype,
    /// Batch sizes (tokens per call).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    batch: Vec<usize>,
    /// Operations: encode, forward, ablate26, steer.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "encode,forward,ablate26,steer"
    )]
    ops: Vec<Op>,
    /// Also time the reference (unfused candle) path and print the speed-up.
    #[arg(long)]
    compare: bool,
    /// Seconds spent timing each row (at least 3 runs).
    #[arg(long, default_value_t = 2.0)]
    budget: f64,
    /// Print JSON rows instead of a table.
    #[arg(long)]
    json: bool,
    /// Skip measuring the machine's ceilings (about 5 s); "% of ceiling" is then omitted.
    #[arg(long)]
    no_ceilings: bool,
    /// Where the fused kernels run: `cpu`, or `cuda` (experimental: a build with the `cuda`
    /// feature, an NVIDIA driver, NVRTC and cuBLAS 12; rows are always JSON).
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    device: BenchDevice,
}

/// Where `bench` runs the fused kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BenchDevice {
    /// The CPU kernels.
    Cpu,
    /// The experimental CUDA kernels.
    Cuda,
}

fn parse_size(s: &str) -> Result<(usize, usize)> {
    let bad = || {
        Error::Invalid(format!(
            "bad --random `{s}`: expected D_INxD_SAE, e.g. 576x4608"
        ))
    };
    let (a, b) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let (a, b) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a == 0 || b == 0 {
        return Err(bad());
    }
    Ok((a, b))
}

/// Run the benchmark and print the results.
pub fn run(args: BenchArgs) -> Result<()> {
    let sae = match (&args.sae, &args.random) {
        (Some(p), None) => Sae::load(p, &Device::Cpu)?,
        (None, Some(s)) => {
            let (d_in, d_sae) = parse_size(s)?;
            random_sae(d_in, d_sae, args.dtype.into(), 75.0, 42)?
        }
        _ => {
            return Err(Error::Invalid(
                "give exactly one of --sae PATH or --random DxN".into(),
            ))
        }
    };
    if args.device == BenchDevice::Cuda {
        return run_cuda(&args, &sae);
    }
    let size = format!("{}x{}", sae.d_in(), sae.d_sae());
    let dtype = format!("{:?}", sae.dtype()).to_lowercase();
    let ceil = if args.no_ceilings {
        None
    } else {
        Some(measure_ceilings())
    };
    if let Some(ceil) = ceil.filter(|_| args.json) {
        println!(
            "{}",
            serde_json::json!({"ceilings": {"read_gbs": ceil.read_gbs, "copy_gbs": ceil.copy_gbs,
                "gemm_f32_gflops": ceil.gemm_gflops, "bf16_peak_gflops": ceil.bf16_peak_gflops,
                "gemm_bf16_gflops": ceil.gemm_bf16_gflops, "threads": rayon::current_num_threads()}})
        );
    } else if let Some(ceil) = ceil {
        println!(
            "ceilings: read {:.1} GB/s, copy {:.1} GB/s, f32 GEMM {:.1} GFLOP/s ({} threads)",
            ceil.read_gbs,
            ceil.copy_gbs,
            ceil.gemm_gflops,
            rayon::current_num_threads()
        );
        match (ceil.bf16_peak_gflops, ceil.gemm_bf16_gflops) {
            (Some(p), Some(g)) => println!(
                "          bf16 dot-product peak {p:.1} GFLOP/s, bf16 GEMM (256x8192x4096) {g:.1} GFLOP/s ({:.0}% of peak)",
                g / p * 100.0
            ),
            _ => println!("          no native bf16 dot product on this CPU: bf16 rows compare with f32 GEMM"),
        }
    }
    if !args.json {
        println!(
            "{:>12} {:>5} {:>6} {:>9} {:>10} {:>12} {:>9} {:>10} {:>10}",
            "size", "dtype", "batch", "op", "path", "ms", "tok/s", "% ceiling", "speed-up"
        );
    }
    for &batch in &args.batch {
        for &op in &args.ops {
            let prep = Prepared::new(&sae, op, batch)?;
            let mut paths = vec![Path::Fused];
            if args.compare {
                paths.push(Path::Reference);
            }
            let mut fused_ms = f64::NAN;
            for path in paths {
                let ms = prep.time(path, args.budget)?;
                if path == Path::Fused {
                    fused_ms = ms;
                }
                let tok_s = batch as f64 / (ms / 1e3);
                let (bytes, flops) = op_work(&sae, op, batch);
                // Memory-bound rows are compared with bandwidth, compute-bound ones with the
                // GEMM ceiling of their dtype (bf16 weights: the bf16 instruction's peak,
                // where the CPU has it). ablate26 and steer touch a few cached rows: no
                // meaningful ceiling.
                let bf16_peak = ceil
                    .and_then(|c| c.bf16_peak_gflops)
                    .filter(|_| sae.dtype() == DType::BF16);
                let (pct, what) = match (op, ceil, bf16_peak) {
                    (Op::Ablate26 | Op::Steer, _, _) | (_, None, _) => (None, "none"),
                    (_, Some(c), _) if batch <= 8 => (
                        Some(bytes / (ms / 1e3) / 1e9 / c.read_gbs * 100.0),
                        "read_bw",
                    ),
                    (_, _, Some(p)) => (Some(flops / (ms / 1e3) / 1e9 / p * 100.0), "bf16_peak"),
                    (_, Some(c), None) => (
                        Some(flops / (ms / 1e3) / 1e9 / c.gemm_gflops * 100.0),
                        "gemm_f32",
                    ),
                };
                let speedup = (path == Path::Reference).then(|| ms / fused_ms);
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"size": size, "dtype": dtype, "batch": batch, "op": op.as_str(),
                            "path": path.as_str(), "ms": ms, "tok_s": tok_s, "pct_of_ceiling": pct,
                            "ceiling": what, "speedup": speedup})
                    );
                } else {
                    println!(
                        "{:>12} {:>5} {:>6} {:>9} {:>10} {:>12.4} {:>9.0} {:>7} {:>3} {:>10}",
                        size,
                        dtype,
                        batch,
                        op.as_str(),
                        path.as_str(),
                        ms,
                        tok_s,
                        pct.map(|p| format!("{p:.1}%"))
                            .unwrap_or_else(|| "-".into()),
                        match what {
                            "read_bw" => "bw",
                            "gemm_f32" => "mm",
                            "bf16_peak" => "pk",
                            _ => "",
                        },
                        speedup.map(|s| format!("{s:.0}x")).unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

/// `--device cuda`: the GPU kernels with the GPU's own ceilings, as JSON rows.
#[cfg(feature = "cuda")]
fn run_cuda(args: &BenchArgs, sae: &Sae) -> Result<()> {
    use sae_ablate::edit::cuda::{bench, CudaDevice};
    let dev = CudaDevice::new(0)?;
    if args.compare {
        println!(
            "{}",
            serde_json::json!({"note": "--compare on cuda: this build has no unfused GPU reference \
                (candle's CUDA backend is not built); rows report the fused kernels and the ceilings"})
        );
    }
    bench::run(
        &dev,
        sae,
        &args.ops,
        &args.batch,
        args.budget,
        !args.no_ceilings,
        &mut |row| println!("{row}"),
    )
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &BenchArgs, _: &Sae) -> Result<()> {
    Err(Error::Unavailable {
        backend: "--device cuda".into(),
        why: "this binary was built without the `cuda` feature (cargo build --release --features cuda)"
            .into(),
    })
}
