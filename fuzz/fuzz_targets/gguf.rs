//! GGUF model files: header, metadata, tensor table and tensor data, through
//! `Llama::from_gguf` (what `model::load` and the CLI call).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sae_ablate::model::{Llama, LoadOptions};
use sae_ablate_fuzz::{check_error, AllocBound, Scratch};

thread_local! {
    static DIR: Scratch = Scratch::new("gguf");
}

fuzz_target!(|data: &[u8]| {
    let _bound = AllocBound::new(data.len());
    DIR.with(|d| {
        let path = d.put("model.gguf", Some(data));
        match Llama::from_gguf(&path, &LoadOptions::default()) {
            Ok(m) => {
                let c = m.config();
                assert!(c.d_model > 0 && c.vocab_size > 0);
            }
            Err(e) => check_error(&e),
        }
    });
});
