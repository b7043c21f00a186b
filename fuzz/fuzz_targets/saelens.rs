//! SAELens release directory: `cfg.json` + `sae_weights.safetensors`, through `Sae::load`.
//! Input: `u16` length, `cfg.json`, then `sae_weights.safetensors` (see `split2`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sae_ablate_fuzz::{load_sae, split2, AllocBound, Scratch};

thread_local! {
    static DIR: Scratch = Scratch::new("saelens");
}

fuzz_target!(|data: &[u8]| {
    let _bound = AllocBound::new(data.len());
    let (cfg, weights) = split2(data);
    DIR.with(|d| {
        d.put("cfg.json", Some(cfg));
        d.put("sae_weights.safetensors", Some(weights));
        load_sae(d.path());
    });
});
