//! Quick start: build (or load) an SAE, save it in SAELens format, load it back,
//! and zero-ablate a latent set with the error-preserving splice.
//!
//! ```text
//! cargo run --release --example quickstart [-- path/to/sae]
//! ```

use candle_core::{DType, Device, Tensor};
use sae_ablate::edit::{reference, Edits, SpliceMode};
use sae_ablate::sae::{Architecture, Sae, SaeConfig, SaeWeights};

fn random_sae(d_in: usize, d_sae: usize, dev: &Device) -> sae_ablate::Result<Sae> {
    let mut cfg = SaeConfig::new(Architecture::JumpRelu, d_in, d_sae);
    cfg.hook_name = Some("blocks.15.hook_resid_post".into());
    let w = SaeWeights {
        w_enc: (Tensor::randn(0f32, 1.0, (d_in, d_sae), dev)? / (d_in as f64).sqrt())?,
        b_enc: Tensor::zeros(d_sae, DType::F32, dev)?,
        w_dec: (Tensor::randn(0f32, 1.0, (d_sae, d_in), dev)? / (d_in as f64).sqrt())?,
        b_dec: Tensor::zeros(d_in, DType::F32, dev)?,
        threshold: Some(Tensor::full(1.5f32, d_sae, dev)?),
        r_mag: None,
        b_mag: None,
        w_skip: None,
    };
    Sae::new(cfg, w)
}

fn main() -> sae_ablate::Result<()> {
    let dev = Device::Cpu;
    let sae = match std::env::args().nth(1) {
        Some(path) => Sae::load(&path, &dev)?,
        None => {
            let sae = random_sae(576, 4608, &dev)?;
            let dir = std::env::temp_dir().join("sae-ablate-quickstart");
            sae.save_saelens(&dir)?;
            println!("saved a random JumpReLU SAE to {}", dir.display());
            Sae::load(&dir, &dev)?
        }
    };
    println!(
        "{} SAE ({}), d_in = {}, d_sae = {}, hook = {:?}",
        sae.architecture(),
        sae.format(),
        sae.d_in(),
        sae.d_sae(),
        sae.hook_name()
    );
    let x = Tensor::randn(0f32, 1.0, (8, sae.d_in()), &dev)?;
    let f = sae.encode(&x)?;
    let l0 = f
        .gt(0f64)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?
        / 8.0;
    println!("mean L0 over 8 random tokens: {l0:.1}");

    // No edits: the error-preserving splice returns x.
    let same = reference::apply(&sae, &x, &Edits::new(SpliceMode::ErrorPreserving))?;
    let err = (same - &x)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("no-edit splice, max |y - x| = {err:.2e}");

    // Zero-ablate the 26 most active latents of token 0.
    let row = f.get(0)?.to_vec1::<f32>()?;
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    ids.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    ids.truncate(26);
    let y = reference::apply(
        &sae,
        &x,
        &Edits::new(SpliceMode::ErrorPreserving).zero(&ids),
    )?;
    let delta = (y - &x)?.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
    println!(
        "zero-ablating 26 latents moved token 0 by {:.3} (L2)",
        delta[0]
    );
    Ok(())
}
