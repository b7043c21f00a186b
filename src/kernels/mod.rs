//! The CPU building blocks of the splice and of the model layers: SIMD dot products and
//! row kernels (`simd`), the dense SAE encode (`encode`) and GGUF block-quantized
//! matrices (`quant`). Crate-internal; `quant` is visible (hidden from the docs) for the
//! benches only.

/// Runs `$go!(N)` with `N` the compile-time form of the row count `$n` (1..=8; larger
/// counts run as 8, which the callers never pass): the SIMD kernels keep one accumulator
/// per row in registers only when the count is a constant.
macro_rules! with_rows {
    ($n:expr, $go:ident) => {
        match $n {
            1 => $go!(1),
            2 => $go!(2),
            3 => $go!(3),
            4 => $go!(4),
            5 => $go!(5),
            6 => $go!(6),
            7 => $go!(7),
            _ => $go!(8),
        }
    };
}
pub(crate) use with_rows;

pub(crate) mod encode;
pub(crate) mod gemm_bf16;
#[doc(hidden)]
pub mod quant;
pub(crate) mod simd;
