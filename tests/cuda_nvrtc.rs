//! The CUDA kernels compiled without a GPU: NVRTC (from the pip wheel that
//! scripts/fetch-cuda-tools.sh installs under assets/cuda) compiles every kernel for
//! sm_80 and sm_90, and ptxas assembles the PTX and reports each kernel's registers,
//! spills and shared memory. A missing toolkit piece fails the test; nothing skips.
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::process::Command;

use sae_ablate::edit::cuda::{compile_ptx, preload_library, KERNEL_NAMES};

fn cuda_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/cuda");
    assert!(
        dir.join("lib/libnvrtc.so.12").is_file() && dir.join("bin/ptxas").is_file(),
        "{} lacks lib/libnvrtc.so.12 or bin/ptxas: run scripts/fetch-cuda-tools.sh",
        dir.display()
    );
    dir
}

fn load_nvrtc() {
    preload_library(cuda_dir().join("lib/libnvrtc.so.12")).expect("loading NVRTC");
}

/// One kernel's resource usage as ptxas reports it.
#[derive(Debug, Default)]
struct Usage {
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    smem: u32,
}

/// Parse `ptxas -v` output into (kernel, usage) pairs.
fn parse_ptxas(log: &str) -> Vec<(String, Usage)> {
    let mut out: Vec<(String, Usage)> = Vec::new();
    let num_before = |line: &str, unit: &str| -> Option<u32> {
        let i = line.find(unit)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push((name, Usage::default()));
        } else if let Some((_, u)) = out.last_mut() {
            if line.contains("spill stores") {
                u.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                u.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            }
            if line.contains("Used") && line.contains("registers") {
                u.registers = num_before(line, "registers").unwrap_or(0);
                u.smem = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_and_fits_without_spills() {
    load_nvrtc();
    let ptxas = cuda_dir().join("bin/ptxas");
    let tmp = std::env::temp_dir().join(format!("sae-ablate-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for arch in [80u32, 90] {
        let ptx = compile_ptx(arch).unwrap_or_else(|e| panic!("sm_{arch}: {e}"));
        for name in KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "sm_{arch}: kernel {name} missing from the PTX"
            );
        }
        let file = tmp.join(format!("splice_sm{arch}.ptx"));
        std::fs::write(&file, &ptx).unwrap();
        let out = Command::new(&ptxas)
            .arg(format!("-arch=sm_{arch}"))
            .arg("-v")
            .arg(&file)
            .arg("-o")
            .arg(tmp.join(format!("splice_sm{arch}.cubin")))
            .output()
            .expect("running ptxas");
        let log = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "ptxas sm_{arch} failed:\n{log}");
        let usage = parse_ptxas(&log);
        assert_eq!(
            usage.len(),
            KERNEL_NAMES.len(),
            "sm_{arch}: ptxas reported {} kernels, expected {}:\n{log}",
            usage.len(),
            KERNEL_NAMES.len()
        );
        for (name, u) in &usage {
            println!(
                "sm_{arch} {name:<20} registers {:>3}  spill stores {:>3} B  spill loads {:>3} B  smem {:>6} B",
                u.registers, u.spill_stores, u.spill_loads, u.smem
            );
            assert!(
                u.registers > 0,
                "sm_{arch} {name}: no register count parsed:\n{log}"
            );
            assert_eq!(
                (u.spill_stores, u.spill_loads),
                (0, 0),
                "sm_{arch} {name}: register spills"
            );
            // 256-thread blocks: at most 255 registers each and 48 KiB of static shared memory.
            assert!(
                u.registers <= 255 && u.smem <= 48 * 1024,
                "sm_{arch} {name}: {u:?}"
            );
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn compile_errors_are_reported_not_panicked() {
    load_nvrtc();
    // An architecture NVRTC 12.8 does not know: the error names it.
    let err = compile_ptx(11).unwrap_err().to_string();
    assert!(err.contains("compute_11"), "{err}");
}

#[test]
fn preload_of_a_missing_library_names_the_path() {
    let err = preload_library("/nonexistent/libnvrtc.so.12")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/libnvrtc.so.12"), "{err}");
}

#[test]
fn opening_a_gpu_without_a_driver_is_an_error_not_a_panic() {
    use sae_ablate::edit::cuda::{driver_available, CudaDevice};
    match CudaDevice::new(0) {
        Ok(dev) => assert!(driver_available() && dev.arch() >= 50),
        Err(e) if !driver_available() => {
            assert!(e.to_string().contains("CUDA driver"), "{e}")
        }
        // A driver without a usable GPU or cuBLAS: the error says which.
        Err(e) => assert!(e.to_string().starts_with("cuda:"), "{e}"),
    }
}
