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

pub mod cpu;
pub mod encode;
pub mod quant;
pub mod simd;

pub use cpu::EditPlan;
