//! Shared pieces of the fuzz targets: the allocation guard, the split of one input into
//! several files, a scratch directory for the path-based loaders, and the checks run on
//! whatever a hostile file manages to load.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor};
use sae_ablate::Sae;

/// The largest single allocation allowed while a target runs (`usize::MAX` outside).
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// A global allocator that aborts (a crash libFuzzer records, with the input) when one
/// allocation exceeds [`LIMIT`]: `64 MiB + 64 × input length` while a target runs.
/// Every size a file declares must be checked against the file's length before
/// anything is allocated for it; this turns a missing check into a reproducible crash.
pub struct GuardedAlloc;

fn too_big(size: usize) -> bool {
    size > LIMIT.load(Ordering::Relaxed)
}

#[cold]
fn refuse(size: usize) -> ! {
    // No allocation here: format the number into a stack buffer.
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut n = size;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut e = std::io::stderr().lock();
    let _ = e.write_all(b"\n==fuzz== allocation of ");
    let _ = e.write_all(&buf[i..]);
    let _ = e.write_all(b" bytes exceeds the bound for this input (64 MiB + 64 x input length)\n");
    std::process::abort();
}

// SAFETY: forwards to `System` unchanged; only refuses (aborts on) oversized requests.
unsafe impl GlobalAlloc for GuardedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if too_big(layout.size()) {
            refuse(layout.size())
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if too_big(layout.size()) {
            refuse(layout.size())
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if too_big(new_size) {
            refuse(new_size)
        }
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: GuardedAlloc = GuardedAlloc;

/// While alive, allocations above `64 MiB + 64 × input_len` abort the process.
pub struct AllocBound(());

impl AllocBound {
    /// Arm the bound for an input of `input_len` bytes.
    pub fn new(input_len: usize) -> Self {
        LIMIT.store(
            (64usize << 20).saturating_add(input_len.saturating_mul(64)),
            Ordering::Relaxed,
        );
        AllocBound(())
    }
}

impl Drop for AllocBound {
    fn drop(&mut self) {
        LIMIT.store(usize::MAX, Ordering::Relaxed);
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

/// The inverse of [`split2`] (used by the seed writer).
pub fn join2(first: &[u8], second: &[u8]) -> Vec<u8> {
    let n = u16::try_from(first.len()).expect("first part over 64 KiB");
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

/// A per-process scratch directory (under `/dev/shm` when it exists) where a target
/// writes its input as the files a path-based loader expects. The loaders are the
/// ones users call; only the bytes come from the fuzzer.
pub struct Scratch(PathBuf);

impl Scratch {
    /// `<tmp>/sae-ablate-fuzz-<target>-<pid>/`, created empty on first use.
    pub fn new(target: &str) -> Self {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("sae-ablate-fuzz-{target}-{}", std::process::id()));
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
