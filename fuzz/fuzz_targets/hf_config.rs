//! Fuzz target `hf_config`: see `sae_ablate_fuzz::targets` for what it loads and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _bound = sae_ablate_fuzz::AllocBound::new(data.len());
    sae_ablate_fuzz::targets::run("hf_config", data);
});
