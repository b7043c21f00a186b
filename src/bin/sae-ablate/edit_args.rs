//! The latent-edit flags shared by `apply`, `logits` and `generate`.

use clap::Args;
use sae_ablate::edit::{Edits, LatentEdit, SpliceMode};
use sae_ablate::{Error, Result};

/// `--zero`, `--zero-preset`, `--clamp`, `--scale`, `--add`, `--steer`, `--mode`.
#[derive(Args, Debug)]
pub struct EditArgs {
    /// Latents to zero-ablate: `1,2,3`.
    #[arg(long, value_delimiter = ',')]
    pub zero: Vec<u32>,
    /// A named latent set to zero-ablate (`esr26`: the ESR off-topic detectors).
    #[arg(long)]
    pub zero_preset: Option<String>,
    /// Clamp latents to values: `ID=V,ID=V`.
    #[arg(long, value_delimiter = ',')]
    pub clamp: Vec<String>,
    /// Scale latents by factors: `ID=A,ID=A`.
    #[arg(long, value_delimiter = ',')]
    pub scale: Vec<String>,
    /// Add values to latents (latent-space steering): `ID=V,ID=V`.
    #[arg(long, value_delimiter = ',')]
    pub add: Vec<String>,
    /// Steer by decoder directions, y += C·W_dec[ID]: `ID=C,ID=C`.
    #[arg(long, value_delimiter = ',')]
    pub steer: Vec<String>,
    /// Splice mode: `error` (x + decode(f') − decode(f)) or `reconstruct` (decode(f')).
    #[arg(long, default_value = "error")]
    pub mode: SpliceMode,
}

/// Parse `ID=VALUE` entries of flag `--flag`.
fn pairs(flag: &str, items: &[String]) -> Result<Vec<(u32, f32)>> {
    items
        .iter()
        .map(|s| {
            let bad = || Error::Invalid(format!("bad --{flag} entry `{s}`: expected ID=VALUE"));
            let (id, v) = s.split_once('=').ok_or_else(bad)?;
            let id: u32 = id.trim().parse().map_err(|_| bad())?;
            let v: f32 = v.trim().parse().map_err(|_| bad())?;
            if !v.is_finite() {
                return Err(bad());
            }
            Ok((id, v))
        })
        .collect()
}

impl EditArgs {
    /// Whether any edit flag was given (`--mode` alone does not count).
    pub fn any(&self) -> bool {
        !self.zero.is_empty()
            || self.zero_preset.is_some()
            || !self.clamp.is_empty()
            || !self.scale.is_empty()
            || !self.add.is_empty()
            || !self.steer.is_empty()
    }

    /// The edits, validated against an SAE with `d_sae` latents when applied.
    pub fn edits(&self, d_sae: usize) -> Result<Edits> {
        let mut edits = Edits::new(self.mode).zero(&self.zero);
        if let Some(name) = &self.zero_preset {
            edits = edits.zero(sae_ablate::esr::latent_preset(name, d_sae)?.ids());
        }
        for (id, v) in pairs("clamp", &self.clamp)? {
            edits = edits.with(id, LatentEdit::Clamp(v));
        }
        for (id, v) in pairs("scale", &self.scale)? {
            edits = edits.with(id, LatentEdit::Scale(v));
        }
        for (id, v) in pairs("add", &self.add)? {
            edits = edits.with(id, LatentEdit::Add(v));
        }
        for (id, c) in pairs("steer", &self.steer)? {
            edits = edits.steer(id, c);
        }
        Ok(edits)
    }
}
