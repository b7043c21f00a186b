//! PyTorch `torch.save` files (zip and legacy forms): the restricted unpickler and
//! storage reader (`PthFile`), every tensor loaded, then the Goodfire and
//! dictionary_learning builders on the same file.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use sae_ablate::io::pickle::PthFile;
use sae_ablate::sae::{dictionary_learning, goodfire};
use sae_ablate_fuzz::{check_error, exercise_sae, AllocBound, Scratch};

thread_local! {
    static DIR: Scratch = Scratch::new("pytorch");
}

fuzz_target!(|data: &[u8]| {
    let _bound = AllocBound::new(data.len());
    DIR.with(|d| {
        let path = d.put("model.pt", Some(data));
        let f = match PthFile::open(&path) {
            Ok(f) => f,
            Err(e) => return check_error(&e),
        };
        let dev = Device::Cpu;
        for name in f.names() {
            let shape = f.shape(name).map(<[usize]>::to_vec);
            match f.load(name, &dev) {
                Ok(t) => assert_eq!(Some(t.dims().to_vec()), shape, "tensor `{name}`"),
                Err(e) => check_error(&e),
            }
        }
        match goodfire::load_from(&f, &dev) {
            Ok(sae) => exercise_sae(&sae),
            Err(e) => check_error(&e),
        }
        match dictionary_learning::load_from(&f, None, &dev) {
            Ok(sae) => exercise_sae(&sae),
            Err(e) => check_error(&e),
        }
    });
});
