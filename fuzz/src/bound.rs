//! The allocation bound: a global allocator that aborts on any single allocation over
//! 64 MiB + 64 × the input's length while an [`AllocBound`] is alive. Used by the fuzz
//! targets (`src/lib.rs`) and by the CI regression test (`tests/fuzz_regressions.rs`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

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
