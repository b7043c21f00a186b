//! R lazy-load databases (the Austen corpus extractor): `u16` length, the `.rdx`
//! index (an R serialization stream, gzip/zlib-compressed or raw), then the `.rdb`
//! blobs. Every variable is fetched and read as a book's lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sae_ablate::corpus::{austen, rdata::LazyLoadDb};
use sae_ablate_fuzz::{check_error, split2, AllocBound};

fuzz_target!(|data: &[u8]| {
    let _bound = AllocBound::new(data.len());
    let (rdx, rdb) = split2(data);
    let db = match LazyLoadDb::from_bytes(rdx, rdb.to_vec()) {
        Ok(db) => db,
        Err(e) => return check_error(&e),
    };
    let _ = db.compression();
    let names: Vec<String> = db.names().map(String::from).collect();
    for name in &names {
        if let Err(e) = db.get(name) {
            check_error(&e)
        }
        if let Err(e) = austen::book_text(&db, name) {
            check_error(&e)
        }
    }
});
