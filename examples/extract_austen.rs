//! Extract the six Jane Austen novels from the unpacked `r-cran-janeaustenr`
//! Debian package and check their SHA-256 sums.
//!
//! ```text
//! cargo run --example extract_austen -- PACKAGE_DIR OUT_DIR   # extract + verify
//! cargo run --example extract_austen -- --verify OUT_DIR      # verify only
//! ```
//! `PACKAGE_DIR` is what `dpkg-deb -x r-cran-janeaustenr_*.deb PACKAGE_DIR` made;
//! `scripts/fetch-austen.sh` does all of it.

use std::path::Path;
use std::process::ExitCode;

use sae_ablate::corpus::{extract_austen, verify_austen};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [flag, dir] if flag == "--verify" => verify_austen(Path::new(dir)),
        [pkg, out] => extract_austen(Path::new(pkg), Path::new(out)),
        _ => {
            eprintln!(
                "usage: extract_austen PACKAGE_DIR OUT_DIR | extract_austen --verify OUT_DIR"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(paths) => {
            for p in paths {
                println!("ok {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
