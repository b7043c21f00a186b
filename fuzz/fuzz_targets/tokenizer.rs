//! Tokenizer metadata: first byte even → the rest is a GGUF file whose
//! `tokenizer.ggml.*` metadata builds the tokenizer (`Tokenizer::from_gguf_file`);
//! odd → an HF `tokenizer.json` (`Tokenizer::from_hf`). A tokenizer that builds must
//! encode, decode and render a chat prompt.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sae_ablate::model::Tokenizer;
use sae_ablate_fuzz::{check_error, AllocBound, Scratch};

thread_local! {
    static DIR: Scratch = Scratch::new("tokenizer");
}

fuzz_target!(|data: &[u8]| {
    let _bound = AllocBound::new(data.len());
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    DIR.with(|d| {
        let tok = if sel & 1 == 0 {
            Tokenizer::from_gguf_file(d.put("model.gguf", Some(rest)))
        } else {
            Tokenizer::from_hf(d.put("tokenizer.json", Some(rest)))
        };
        let tok = match tok {
            Ok(t) => t,
            Err(e) => return check_error(&e),
        };
        match tok.encode("The capital of France is 1234, naïve 🙂") {
            Ok(ids) => {
                if let Err(e) = tok.decode(&ids, false) {
                    check_error(&e)
                }
            }
            Err(e) => check_error(&e),
        }
        if let Err(e) = tok.chat_prompt("hi") {
            check_error(&e)
        }
        let _ = tok.vocab_size();
    });
});
