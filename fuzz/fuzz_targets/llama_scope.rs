//! Llama Scope release: `hyperparams.json` + `final.safetensors`, through `Sae::load`.
//! Input: `u16` length, `hyperparams.json`, then `final.safetensors` (see `split2`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sae_ablate_fuzz::{load_sae, split2, AllocBound, Scratch};

thread_local! {
    static DIR: Scratch = Scratch::new("llama_scope");
}

fuzz_target!(|data: &[u8]| {
    let _bound = AllocBound::new(data.len());
    let (cfg, weights) = split2(data);
    DIR.with(|d| {
        d.put("hyperparams.json", Some(cfg));
        d.put("final.safetensors", Some(weights));
        load_sae(d.path());
    });
});
