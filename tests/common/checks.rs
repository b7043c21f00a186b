//! Shared checks: seeded random inputs, and errors whose messages name what is at fault.
#![allow(dead_code)]

use candle_core::{Device, Shape, Tensor};
use sae_ablate::rng::Rng;

/// `n` values N(0, std²) from the crate's seeded generator.
pub fn normal_vec(seed: u64, std: f32, n: usize) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.normal() as f32 * std).collect()
}

/// A CPU f32 tensor of `shape` with N(0, std²) entries from `seed`: the same values on
/// every run (a seeded stand-in for `Tensor::randn`).
pub fn randn(seed: u64, std: f32, shape: impl Into<Shape>) -> Tensor {
    let shape = shape.into();
    Tensor::from_vec(
        normal_vec(seed, std, shape.elem_count()),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

/// The error of `r`, which must be one, as a message that contains each of `names` (the
/// file, tensor, id or key at fault). Returns the message for further checks.
#[track_caller]
pub fn err_naming<T: std::fmt::Debug, E: std::fmt::Display>(
    r: Result<T, E>,
    names: &[&str],
) -> String {
    let msg = match r {
        Ok(v) => panic!("expected an error naming {names:?}, got Ok({v:?})"),
        Err(e) => e.to_string(),
    };
    for n in names {
        assert!(msg.contains(n), "the error does not name `{n}`: {msg}");
    }
    msg
}
