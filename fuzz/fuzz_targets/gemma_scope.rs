//! Gemma Scope releases through `Sae::load`: first byte even → the rest is `params.npz`;
//! odd → `u16` length, `config.json`, then `params.safetensors` (Gemma Scope 2).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sae_ablate_fuzz::{load_sae, split2, AllocBound, Scratch};

thread_local! {
    static DIR: Scratch = Scratch::new("gemma_scope");
}

fuzz_target!(|data: &[u8]| {
    let _bound = AllocBound::new(data.len());
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    DIR.with(|d| {
        if sel & 1 == 0 {
            d.put("params.safetensors", None);
            d.put("config.json", None);
            d.put("params.npz", Some(rest));
        } else {
            let (cfg, weights) = split2(rest);
            d.put("params.npz", None);
            d.put("config.json", Some(cfg));
            d.put("params.safetensors", Some(weights));
        }
        load_sae(d.path());
    });
});
