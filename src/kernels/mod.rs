//! Fused splice kernels.
//!
//! [`EditPlan`] gathers, once, what a splice needs; [`EditPlan::apply`] then runs
//! one pass over the tokens:
//!
//! * masked path (error-preserving edits of standard, JumpReLU and gated SAEs):
//!   only the |S| edited latents' encoder columns and decoder rows are touched,
//!   `O(|S|·d_in)` per token and nothing of size `d_sae`;
//! * full path (TopK, reconstruction): dense encode in the weights' stored dtype,
//!   a fused epilogue that yields a sparse (index, value) list per token (TopK by a
//!   bounded heap, never a full sort), and a sparse decode of the active rows only.
//!
//! The reference splice ([`crate::edit::reference`]) is the oracle in the tests.

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

pub mod cpu;
pub mod encode;
pub mod gemm_bf16;
pub mod quant;
pub mod simd;

pub use cpu::EditPlan;
