//! Text corpora: R's serialization format and lazy-load databases
//! ([`rdata`]), and the Jane Austen novels from Debian's `r-cran-janeaustenr`
//! ([`austen`]).

pub mod austen;
pub mod rdata;

pub use austen::{extract_austen, verify_austen, AUSTEN_BOOKS};
