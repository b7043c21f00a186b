//! sae-ablate as a dependency (`default-features = false`): write a small SAE in SAELens
//! format and load it back, build latent edits, run them through the fused `EditPlan`
//! (checked against the reference splice), then splice the SAE into a hooked forward
//! pass of a tiny Llama checkpoint and capture an activation.
//!
//! ```sh
//! cargo run --manifest-path examples/as-dependency/Cargo.toml
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor, D};
use sae_ablate::edit::{reference, EditPlan, Edits, LatentEdit, LatentSet, SpliceMode};
use sae_ablate::hooks::{ActivationCache, HookPoint, Hooks, Positions, SaeSplice};
use sae_ablate::model::{HookedModel, LoadOptions, Model};
use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};
use sae_ablate::{Error, Result};

const D_SAE: usize = 256;

/// Deterministic values in [-scale, scale) (a fixed linear congruential sequence).
fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn check(ok: bool, what: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("check failed: {what}")))
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn run() -> Result<()> {
    let dev = Device::Cpu;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut model = Model::from_hf_dir(
        root.join("tests/fixtures/models/llama"),
        &LoadOptions::default(),
    )?;
    let d = model.d_model();

    // A standard SAE over the model's residual stream, written with the crate's SAELens
    // writer and loaded back like any downloaded release.
    let mut cfg = SaeConfig::new(Architecture::Standard, d, D_SAE);
    cfg.hook_name = Some("blocks.0.hook_resid_post".into());
    let weights = SaeWeights::new(
        Tensor::from_vec(values(d * D_SAE, 1, 0.2), (d, D_SAE), &dev)?,
        Tensor::from_vec(values(D_SAE, 2, 0.05), D_SAE, &dev)?,
        Tensor::from_vec(values(D_SAE * d, 3, 0.2), (D_SAE, d), &dev)?,
        Tensor::from_vec(values(d, 4, 0.05), d, &dev)?,
    );
    let dir = std::env::temp_dir().join(format!("sae-ablate-as-dependency-{}", std::process::id()));
    Sae::new(cfg, weights)?.save_saelens(&dir)?;
    let sae = Sae::load(&dir, &dev);
    let _ = std::fs::remove_dir_all(&dir);
    let sae = sae?;
    check(
        sae.d_in() == d && sae.d_sae() == D_SAE,
        "the SAE loads back",
    )?;

    // Edits through the fused plan, against the reference splice.
    let ablate = LatentSet::new(&[3, 17, 99, 200], sae.d_sae())?;
    let edits = Edits::new(SpliceMode::ErrorPreserving)
        .zero(ablate.ids())
        .with(5, LatentEdit::Clamp(1.5))
        .steer(42, 2.0);
    let x = Tensor::from_vec(values(8 * d, 5, 1.0), (8, d), &dev)?;
    let plan = EditPlan::new(&sae, &edits)?;
    let fused = plan.apply(&x)?;
    let oracle = reference::apply(&sae, &x, &edits)?;
    let diff = max_abs_diff(&fused, &oracle)?;
    check(
        diff < 1e-4,
        &format!("EditPlan matches the reference (max diff {diff})"),
    )?;

    // A hooked forward pass: the SAE spliced in at layer 0 (every position but the first),
    // the residual stream captured after layer 1.
    let tokens = Tensor::new(&[[1u32, 15, 27, 3, 8, 42, 11, 5]], &dev)?;
    let point = HookPoint::ResidPost(0);
    let clean = model.forward(&tokens, 0, &mut Hooks::new())?;
    let cache = ActivationCache::new();
    let mut hooks = Hooks::new()
        .with(
            point,
            SaeSplice::new(&sae, &edits, Positions::Range(1..usize::MAX))?,
        )
        .with(HookPoint::ResidPost(1), cache.clone());
    let spliced = model.forward(&tokens, 0, &mut hooks)?;
    let resid = cache
        .get(&HookPoint::ResidPost(1))?
        .ok_or_else(|| Error::Invalid("nothing captured".into()))?;
    check(resid.dims() == [1, 8, d], "captured [1, 8, d_model]")?;
    let clean = clean.to_dtype(DType::F32)?;
    let spliced = spliced.to_dtype(DType::F32)?;
    let first = max_abs_diff(&clean.narrow(1, 0, 1)?, &spliced.narrow(1, 0, 1)?)?;
    let rest = max_abs_diff(&clean.narrow(1, 1, 7)?, &spliced.narrow(1, 1, 7)?)?;
    check(
        first < 1e-5,
        &format!("position 0 is untouched (diff {first})"),
    )?;
    check(
        rest > 1e-4,
        &format!("the edits change the later logits (diff {rest})"),
    )?;
    let top = spliced.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
    println!(
        "sae-ablate as a dependency: SAE {d}→{D_SAE} loaded, EditPlan = reference (max diff {diff:.1e}), \
         splice moved the logits by up to {rest:.3}; next tokens {top:?}"
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
