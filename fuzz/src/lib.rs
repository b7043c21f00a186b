//! The fuzz harness: the allocation guard (a global allocator, [`bound`]) and the
//! target bodies ([`targets`]), both shared with the CI regression test
//! `tests/fuzz_regressions.rs`.

pub mod bound;
pub mod targets;

pub use bound::AllocBound;
