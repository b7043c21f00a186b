//! Goodfire `.pth` loading, the PyTorch pickle reader behind it, and hostile files.

#[path = "common/checks.rs"]
mod checks;
use checks::err_naming;
#[path = "common/pickle_writer.rs"]
mod pickle_writer;

use candle_core::{DType, Device, Tensor};
use pickle_writer::{zip_raw_pickle, Dt, StateDict, TempDir};
use sae_ablate::io::pickle::{PtDtype, PthFile};
use sae_ablate::sae::{goodfire, Architecture, Format, Sae};

// d_in = 3, d_sae = 4.
// encoder_linear.weight [4, 3]: row i = encoder of latent i.
const W_E: [f64; 12] = [1., 0., -1., 0., 2., 0., -1., 1., 1., 0.5, 0.5, 0.5];
const B_E: [f64; 4] = [0., -1., 0.5, -2.];
// decoder_linear.weight [3, 4]: column i = direction of latent i.
const W_D: [f64; 12] = [1., 0., 0., 1., 0., 1., 0., 1., 0., 0., 1., -1.];
const B_D: [f64; 3] = [0.1, 0.2, 0.3];

fn goodfire_dict(dt: Dt) -> StateDict {
    let mut sd = StateDict::new();
    sd.tensor("encoder_linear.weight", dt, &[4, 3], &W_E)
        .tensor("encoder_linear.bias", dt, &[4], &B_E)
        .tensor("decoder_linear.weight", dt, &[3, 4], &W_D)
        .tensor("decoder_linear.bias", dt, &[3], &B_D);
    sd
}

fn x() -> Tensor {
    Tensor::new(&[[1f32, 2., 3.], [-1., 0., 1.]], &Device::Cpu).unwrap()
}

// Hand-computed: x = [1,2,3]: pre = [1-3, 4-1, -1+2+3+0.5, 3-2] = [-2, 3, 4.5, 1]
// → f = [0, 3, 4.5, 1]; x̂ = [1, 3+1, 4.5-1] + b_dec = [1.1, 4.2, 3.8].
// x = [-1,0,1]: pre = [-2, -1, 2.5, -2] → f = [0, 0, 2.5, 0]; x̂ = [0.1, 0.2, 2.8].
const F: [[f32; 4]; 2] = [[0., 3., 4.5, 1.], [0., 0., 2.5, 0.]];
const XHAT: [[f32; 3]; 2] = [[1.1, 4.2, 3.8], [0.1, 0.2, 2.8]];

fn assert_close(got: &Tensor, want: &[&[f32]], tol: f32) {
    let got = got.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w.iter()) {
            assert!((a - b).abs() <= tol, "got {got:?}, want {want:?}");
        }
    }
}

fn check_math(sae: &Sae, tol: f32) {
    assert_eq!(sae.architecture(), Architecture::Standard);
    assert!(!sae.config().apply_b_dec_to_input);
    assert_eq!((sae.d_in(), sae.d_sae()), (3, 4));
    let f = sae.encode(&x()).unwrap();
    assert_close(&f, &[&F[0], &F[1]], tol);
    let y = sae.forward(&x()).unwrap();
    assert_close(&y, &[&XHAT[0], &XHAT[1]], tol);
}

#[test]
fn goodfire_zip_explicit_loader() {
    let dir = TempDir::new("gf");
    let p = dir.join("Llama-3.1-8B-Instruct-SAE-l19.pth");
    goodfire_dict(Dt::F32).write_zip(&p);
    let sae = goodfire::load(&p, &Device::Cpu).unwrap();
    check_math(&sae, 1e-6);
    assert_eq!(sae.format(), Format::Goodfire);
    assert_eq!(sae.hook_name(), Some("blocks.19.hook_resid_post"));
    assert_eq!(sae.dtype(), DType::F32);
    // W_enc is a transposed view of the stored [d_sae, d_in] matrix: W_enc[2][0] = W_E[0*3+2].
    let w_enc = sae.weights().w_enc.to_vec2::<f32>().unwrap();
    assert_eq!(w_enc[2][0], -1.0);
    assert_eq!(w_enc[0][3], 0.5);
}

#[test]
fn goodfire_autodetect_file_and_dir() {
    let dir = TempDir::new("gf-auto");
    let p = dir.join("sae.pt");
    goodfire_dict(Dt::F32).write_zip(&p);
    let sae = Sae::load(&p, &Device::Cpu).unwrap();
    check_math(&sae, 1e-6);
    assert_eq!(sae.format(), Format::Goodfire);
    assert_eq!(sae.hook_name(), None);
    let sae = Sae::load(dir.path(), &Device::Cpu).unwrap();
    check_math(&sae, 1e-6);
}

#[test]
fn goodfire_f16_and_bf16_keep_their_dtype() {
    let dir = TempDir::new("gf-half");
    for (dt, want, tol) in [(Dt::F16, DType::F16, 2e-3), (Dt::BF16, DType::BF16, 2e-2)] {
        let p = dir.join("sae.pth");
        goodfire_dict(dt).write_zip(&p);
        let f = PthFile::open(&p).unwrap();
        assert_eq!(
            f.dtype("encoder_linear.weight"),
            Some(if dt == Dt::F16 {
                PtDtype::F16
            } else {
                PtDtype::BF16
            })
        );
        let sae = goodfire::load(&p, &Device::Cpu).unwrap();
        assert_eq!(sae.dtype(), want);
        assert_eq!(sae.weights().w_enc.dtype(), want);
        assert_eq!(sae.weights().b_dec.dtype(), want);
        check_math(&sae, tol);
    }
}

#[test]
fn goodfire_legacy_format() {
    let dir = TempDir::new("gf-legacy");
    let p = dir.join("sae.pth");
    goodfire_dict(Dt::F32).write_legacy(&p);
    let f = PthFile::open(&p).unwrap();
    assert!(f.is_legacy());
    let sae = goodfire::load(&p, &Device::Cpu).unwrap();
    check_math(&sae, 1e-6);
}

#[test]
fn deflated_and_big_endian_storages() {
    let dir = TempDir::new("gf-defl");
    let p = dir.join("sae.pth");
    let mut sd = goodfire_dict(Dt::F32);
    sd.deflate = true;
    sd.write_zip(&p);
    check_math(&goodfire::load(&p, &Device::Cpu).unwrap(), 1e-6);

    let mut sd = goodfire_dict(Dt::F32);
    sd.big_endian = true;
    sd.write_zip(&p);
    assert!(PthFile::open(&p).unwrap().is_big_endian());
    check_math(&goodfire::load(&p, &Device::Cpu).unwrap(), 1e-6);
    sd.write_legacy(&p);
    check_math(&goodfire::load(&p, &Device::Cpu).unwrap(), 1e-6);
}

#[test]
fn transposed_and_offset_views_load_correctly() {
    // decoder_linear.weight [3, 4] stored as the transpose of a contiguous [4, 3]
    // storage (stride [1, 3]); encoder_linear.bias a view at offset 2 of a longer storage.
    let dir = TempDir::new("gf-view");
    let p = dir.join("sae.pth");
    let mut sd = StateDict::new();
    sd.f32("encoder_linear.weight", &[4, 3], &W_E);
    let mut b_long = vec![9.0, 9.0];
    b_long.extend_from_slice(&B_E);
    let s = sd.storage(Dt::F32, pickle_writer::encode(Dt::F32, &b_long));
    sd.view("encoder_linear.bias", s, &[4], &[1], 2);
    // storage holds W_Dᵀ row-major: [4, 3].
    let mut wdt = [0.0; 12];
    for r in 0..3 {
        for c in 0..4 {
            wdt[c * 3 + r] = W_D[r * 4 + c];
        }
    }
    let s = sd.storage(Dt::F32, pickle_writer::encode(Dt::F32, &wdt));
    sd.view("decoder_linear.weight", s, &[3, 4], &[1, 3], 0);
    sd.f32("decoder_linear.bias", &[3], &B_D);
    sd.write_zip(&p);
    let f = PthFile::open(&p).unwrap();
    let info = f.info("decoder_linear.weight").unwrap();
    assert_eq!(info.stride, vec![1, 3]);
    let w = f.load("decoder_linear.weight", &Device::Cpu).unwrap();
    assert_eq!(w.dims(), &[3, 4]);
    assert_eq!(
        w.to_vec2::<f32>().unwrap(),
        vec![
            vec![1., 0., 0., 1.],
            vec![0., 1., 0., 1.],
            vec![0., 0., 1., -1.]
        ]
    );
    check_math(&goodfire::load(&p, &Device::Cpu).unwrap(), 1e-6);
}

#[test]
fn missing_tensor_is_named() {
    let dir = TempDir::new("gf-missing");
    let p = dir.join("sae.pth");
    let mut sd = StateDict::new();
    sd.f32("encoder_linear.weight", &[4, 3], &W_E)
        .f32("encoder_linear.bias", &[4], &B_E)
        .f32("decoder_linear.weight", &[3, 4], &W_D);
    sd.write_zip(&p);
    let e = goodfire::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("decoder_linear.bias"), "{e}");
    assert!(e.contains("sae.pth"), "{e}");
}

#[test]
fn wrong_shape_names_tensor_expected_and_found() {
    let dir = TempDir::new("gf-shape");
    let p = dir.join("sae.pth");
    let mut sd = StateDict::new();
    sd.f32("encoder_linear.weight", &[4, 3], &W_E)
        .f32("encoder_linear.bias", &[5], &[0., 0., 0., 0., 0.])
        .f32("decoder_linear.weight", &[3, 4], &W_D)
        .f32("decoder_linear.bias", &[3], &B_D);
    sd.write_zip(&p);
    let e = goodfire::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("encoder_linear.bias"), "{e}");
    assert!(e.contains("[5]") && e.contains("[4]"), "{e}");
}

fn hostile(pkl: &[u8], global: &str) {
    let dir = TempDir::new("gf-hostile");
    let p = dir.join("evil.pth");
    std::fs::write(&p, zip_raw_pickle(pkl)).unwrap();
    let e = PthFile::open(&p).unwrap_err().to_string();
    assert!(e.contains(global), "error does not name `{global}`: {e}");
    let e = Sae::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains(global), "{e}");
}

#[test]
fn hostile_globals_are_rejected_and_never_run() {
    let marker = TempDir::new("gf-marker");
    let target = marker.join("pwned");
    let cmd = format!("touch {}", target.display());
    let mut arg = vec![b'X'];
    arg.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    arg.extend_from_slice(cmd.as_bytes());

    for (module, name) in [
        ("os", "system"),
        ("posix", "system"),
        ("subprocess", "Popen"),
    ] {
        let mut pkl = vec![0x80, 2, b'c'];
        pkl.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        pkl.extend_from_slice(&[b'q', 0]);
        pkl.extend_from_slice(&arg);
        pkl.extend_from_slice(&[0x85, b'R', b'.']);
        hostile(&pkl, &format!("{module}.{name}"));
    }
    // builtins.eval through STACK_GLOBAL (protocol 4).
    let mut pkl = vec![0x80, 4, 0x8c, 8];
    pkl.extend_from_slice(b"builtins");
    pkl.extend_from_slice(&[0x8c, 4]);
    pkl.extend_from_slice(b"eval");
    pkl.push(0x93);
    pkl.extend_from_slice(&arg);
    pkl.extend_from_slice(&[0x85, b'R', b'.']);
    hostile(&pkl, "builtins.eval");
    assert!(!target.exists(), "a hostile pickle ran a command");
}

#[test]
fn truncated_files_are_errors() {
    let dir = TempDir::new("gf-trunc");
    let p = dir.join("sae.pth");
    let full = goodfire_dict(Dt::F32).zip_bytes();
    for cut in [10, full.len() / 2, full.len() - 30] {
        std::fs::write(&p, &full[..cut]).unwrap();
        err_naming(goodfire::load(&p, &Device::Cpu).map(|_| ()), &["sae.pth"]);
    }
    let full = goodfire_dict(Dt::F32).legacy_bytes();
    for cut in [3, full.len() / 2, full.len() - 4] {
        std::fs::write(&p, &full[..cut]).unwrap();
        let e = goodfire::load(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("truncated"), "cut at {cut}: {e}");
    }
}

#[test]
fn oversized_declared_tensor_is_rejected_before_allocating() {
    let dir = TempDir::new("gf-huge");
    let p = dir.join("sae.pth");
    let mut sd = goodfire_dict(Dt::F32);
    // A 100000 x 100000 f32 tensor (40 GB) over a 12-element storage.
    sd.view("huge", 0, &[100_000, 100_000], &[100_000, 1], 0);
    sd.write_zip(&p);
    let e = PthFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("huge") && e.contains("storage"), "{e}");

    // Legacy: a storage whose 8-byte element count claims 2^60 elements.
    let mut bytes = goodfire_dict(Dt::F32).legacy_bytes();
    let total = bytes.len();
    // The last storage is decoder_linear.bias: 8-byte count then 3 f32.
    let count_at = total - 12 - 8;
    bytes[count_at..count_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let e = PthFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("truncated") || e.contains("overflow"), "{e}");
}

#[test]
fn non_tensor_entries_and_names() {
    let dir = TempDir::new("gf-names");
    let p = dir.join("sae.pth");
    let mut sd = goodfire_dict(Dt::F32);
    sd.int("step", 70000);
    sd.write_zip(&p);
    let f = PthFile::open(&p).unwrap();
    assert_eq!(
        f.names(),
        vec![
            "encoder_linear.weight",
            "encoder_linear.bias",
            "decoder_linear.weight",
            "decoder_linear.bias"
        ]
    );
    assert_eq!(
        f.scalar("step"),
        Some(&sae_ablate::io::pickle::Scalar::Int(70000))
    );
    assert_eq!(f.shape("decoder_linear.weight"), Some(&[3usize, 4][..]));
    assert!(f.load_opt("nope", &Device::Cpu).unwrap().is_none());
    let e = f.load("nope", &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
}

// ---------------------------------------------------------------------------
// Peak memory of loading a ~200 MB file, measured in a child process.

const MEM_ENV: &str = "SAE_ABLATE_PICKLE_MEM_FILE";

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Child side: run only when the parent sets the env var.
#[test]
#[ignore = "helper for goodfire_load_peak_memory (runs in a child process)"]
fn mem_child() {
    let Ok(path) = std::env::var(MEM_ENV) else {
        return;
    };
    let before = status_kb("VmRSS:");
    let sae = goodfire::load(std::path::Path::new(&path), &Device::Cpu).unwrap();
    let peak = status_kb("VmHWM:");
    // Spot-check values: w[i] = (i % 1000) / 1000 in storage order.
    let w = sae.weights().w_enc.t().unwrap(); // stored [d_sae, d_in]
    let v = w
        .get(3)
        .unwrap()
        .get(5)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = ((3 * 1024 + 5) % 1000) as f32 / 1000.0;
    assert_eq!(v, want);
    println!("MEMRESULT before_kb={before} peak_kb={peak}");
}

#[cfg(target_os = "linux")]
#[test]
fn goodfire_load_peak_memory() {
    let (d_in, d_sae) = (1024usize, 24576usize);
    let dir = TempDir::new("gf-mem");
    let p = dir.join("big.pth");
    {
        let n = d_in * d_sae;
        let mut bytes = Vec::with_capacity(n * 4);
        for i in 0..n {
            bytes.extend_from_slice(&(((i % 1000) as f32) / 1000.0).to_le_bytes());
        }
        let mut sd = StateDict::new();
        let s = sd.storage(Dt::F32, bytes.clone());
        sd.view("encoder_linear.weight", s, &[d_sae, d_in], &[d_in, 1], 0);
        let s = sd.storage(Dt::F32, bytes);
        sd.view("decoder_linear.weight", s, &[d_in, d_sae], &[d_sae, 1], 0);
        sd.f32("encoder_linear.bias", &[d_sae], &vec![0.0; d_sae]);
        sd.f32("decoder_linear.bias", &[d_in], &vec![0.0; d_in]);
        let mut z = std::fs::File::create(&p).unwrap();
        std::io::Write::write_all(&mut z, &sd.zip_bytes()).unwrap();
    }
    let file_kb = std::fs::metadata(&p).unwrap().len() / 1024;
    assert!(file_kb > 190_000, "file is {file_kb} kB");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "mem_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MEM_ENV, &p)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("MEMRESULT"))
        .unwrap_or_else(|| panic!("no result from child: {stdout}"));
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|t| t.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let (before, peak) = (field("before_kb="), field("peak_kb="));
    let growth = peak.saturating_sub(before);
    println!("file {file_kb} kB, peak RSS growth {growth} kB");
    assert!(
        growth as f64 <= 1.3 * file_kb as f64,
        "loading a {file_kb} kB file raised peak RSS by {growth} kB (> 1.3x)"
    );
    // The weights themselves must be resident: at least the file's tensor bytes.
    assert!(growth as f64 >= 0.9 * file_kb as f64, "growth {growth} kB");
}
