//! # sae-ablate
//!
//! Run sparse autoencoders (SAEs) inside transformer language models and edit
//! their latents: zero-ablate, clamp, scale, steer.
//!
//! * [`sae`]: the [`Sae`] type and loaders for SAELens, sparsify, Goodfire,
//!   Gemma Scope, Llama Scope and dictionary_learning releases.
//! * [`edit`]: latent sets, per-latent edits, splice modes, and the reference splice.
//! * [`hooks`]: TransformerLens hook points, capture, steering and SAE splices.
//! * [`model`]: hookable decoders of the Llama, Mistral, Qwen 2/3 and Gemma 2/3 families (GGUF, HF safetensors), tokenizers, generation.
//! * [`io`]: memory-mapped safetensors, `.npy`/`.npz`, PyTorch pickles, atomic writes.
//! * [`train`]: training TopK and L1 SAEs on activations (candle autograd), metrics.
//! * [`harvest`]: activations of a model over a corpus, streamed to cached safetensors shards.
//! * [`rng`]: the one seeded random number generator (sampling, training, bootstraps).
//! * [`FloatDtype`]: the f32/f16/bf16 dtype names every option and flag parses.
//! * [`eval`]: FVU, L0, dead latents, CE loss recovered on held-out text.
//! * `ndarray` (feature `ndarray`): encode, decode and splice `ndarray` views
//!   (f32, f16, bf16) into `Array2<f32>`.
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! use sae_ablate::edit::{reference, Edits, LatentSet, SpliceMode};
//! use sae_ablate::sae::Sae;
//! # fn main() -> sae_ablate::Result<()> {
//! let sae = Sae::load("path/to/release", &Device::Cpu)?;
//! let x = Tensor::randn(0f32, 1.0, (4, sae.d_in()), &Device::Cpu)?;
//! let latents = LatentSet::new(&[3, 7, 12], sae.d_sae())?;
//! let edits = Edits::new(SpliceMode::ErrorPreserving).zero(latents.ids());
//! let y = reference::apply(&sae, &x, &edits)?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

#[macro_use]
mod names;

#[doc(hidden)]
pub mod bench;
#[cfg(feature = "corpus")]
pub mod corpus;
mod dtype;
pub mod edit;
mod error;
#[cfg(feature = "esr")]
pub mod esr;
pub mod eval;
pub mod harvest;
pub mod hooks;
pub mod io;
#[doc(hidden)]
pub mod kernels;
pub mod model;
#[cfg(feature = "ndarray")]
pub mod ndarray;
#[cfg(feature = "plot")]
mod plot;
pub mod progress;
pub mod rng;
pub mod sae;
mod topk;
pub mod train;

pub use dtype::FloatDtype;
pub use error::{Error, Result};

/// The README's Rust examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
pub use sae::Sae;

/// What a unit test returns: `?` on the crate's errors, candle's, I/O and `Option`s turned
/// into messages, instead of `unwrap`.
#[cfg(test)]
pub(crate) type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;
