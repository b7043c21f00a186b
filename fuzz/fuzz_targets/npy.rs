//! `.npy` arrays, as the CLI's `encode`/`apply` inputs read them (`read_npy` maps the
//! file and calls `parse_npy`).
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use sae_ablate::io::npy;
use sae_ablate_fuzz::{check_error, AllocBound};

fuzz_target!(|data: &[u8]| {
    let _bound = AllocBound::new(data.len());
    let header = npy::NpyHeader::parse(data);
    match npy::parse_npy(data, &Device::Cpu) {
        Ok(t) => {
            let h = header.expect("parse_npy accepted a header NpyHeader::parse rejects");
            assert_eq!(t.dims(), &h.shape[..]);
            // What the CLI does next: widen to f32.
            let _ = t.to_dtype(candle_core::DType::F32);
        }
        Err(e) => check_error(&e),
    }
});
