//! The CPU building blocks of the splice and of the model layers: SIMD dot products and
//! row kernels (`simd`), the dense SAE encode (`encode`) and GGUF block-quantized
//! matrices (`quant`). Crate-internal; `quant` is visible (hidden from the docs) for the
//! benches only.

/// A row count the SIMD micro-kernels take as a compile-time constant: 1 to 8, the
/// accumulators of one row each staying in registers. Only [`Rows::new`] makes one, so a
/// kernel given a `Rows` never sees a count outside that range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rows {
    R1 = 1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R8,
}

impl Rows {
    /// `n` as a row count, `None` outside `1..=8`.
    pub(crate) fn new(n: usize) -> Option<Rows> {
        Some(match n {
            1 => Rows::R1,
            2 => Rows::R2,
            3 => Rows::R3,
            4 => Rows::R4,
            5 => Rows::R5,
            6 => Rows::R6,
            7 => Rows::R7,
            8 => Rows::R8,
            _ => return None,
        })
    }
}

/// Runs `$go!(N)` with `N` the compile-time form of the [`Rows`] value `$n`: the SIMD
/// kernels keep one accumulator per row in registers only when the count is a constant.
macro_rules! with_rows {
    ($n:expr, $go:ident) => {
        match $n {
            $crate::kernels::Rows::R1 => $go!(1),
            $crate::kernels::Rows::R2 => $go!(2),
            $crate::kernels::Rows::R3 => $go!(3),
            $crate::kernels::Rows::R4 => $go!(4),
            $crate::kernels::Rows::R5 => $go!(5),
            $crate::kernels::Rows::R6 => $go!(6),
            $crate::kernels::Rows::R7 => $go!(7),
            $crate::kernels::Rows::R8 => $go!(8),
        }
    };
}
pub(crate) use with_rows;

/// Whether a buffer of `len` elements holds `rows` rows of `width` (no overflow).
pub(crate) fn holds(len: usize, rows: usize, width: usize) -> bool {
    rows.checked_mul(width).is_some_and(|need| len >= need)
}

/// `f` on this thread's kept value `key` (a buffer reused across calls), or on a fresh
/// default one while that is in use (a product started from inside another's parallel
/// loop on the same thread).
pub(crate) fn with_kept<T: Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    match key.with(|b| b.try_borrow_mut().ok().map(|mut v| std::mem::take(&mut *v))) {
        Some(mut kept) => {
            let r = f(&mut kept);
            key.with(|b| {
                if let Ok(mut b) = b.try_borrow_mut() {
                    *b = kept;
                }
            });
            r
        }
        None => f(&mut T::default()),
    }
}

pub(crate) mod encode;
pub(crate) mod gemm_bf16;
#[doc(hidden)]
pub mod quant;
pub(crate) mod simd;
