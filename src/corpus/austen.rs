//! The six Jane Austen novels, extracted from Debian's `r-cran-janeaustenr`
//! package (public-domain text).
//!
//! The package (1.0.0-1 in Debian bookworm) keeps the books in the lazy-load
//! database `usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb}`: one
//! character vector per book (one element per line of the Project Gutenberg
//! text), zlib-compressed, serialization format 3. Each book is written as
//! its lines joined with `"\n"`, `NA` as an empty line, with one final `"\n"`,
//! and checked against the SHA-256 sums in [`AUSTEN_BOOKS`].
//!
//! `scripts/fetch-austen.sh` downloads and unpacks the package and runs
//! `examples/extract_austen.rs`, which calls [`extract_austen`].

use std::path::{Path, PathBuf};

use super::rdata::LazyLoadDb;
use crate::{Error, Result};

/// The Debian package holding the corpus.
pub const DEBIAN_PACKAGE: &str = "r-cran-janeaustenr";

/// Where the books' lazy-load index lies inside the unpacked package.
pub const RDATA_INDEX_IN_PACKAGE: &str = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx";

/// Each book's variable name in the package and the SHA-256 of its text
/// file `<name>.txt`.
pub const AUSTEN_BOOKS: [(&str, &str); 6] = [
    (
        "emma",
        "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe",
    ),
    (
        "mansfieldpark",
        "98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9",
    ),
    (
        "northangerabbey",
        "51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed",
    ),
    (
        "persuasion",
        "8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a",
    ),
    (
        "prideprejudice",
        "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d",
    ),
    (
        "sensesensibility",
        "105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09",
    ),
];

/// Find the books' `Rdata.rdx` given an unpacked package root, the
/// `janeaustenr` library folder, its `data/` folder, or the `.rdx` file itself.
/// A `.deb` file is reported with the command that unpacks it (the package's
/// `data.tar.xz` needs an xz decoder this crate does not carry).
pub fn find_rdata_index(deb_or_dir: &Path) -> Result<PathBuf> {
    if deb_or_dir.is_file() {
        let mut magic = [0u8; 8];
        let is_ar = std::fs::File::open(deb_or_dir)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && &magic == b"!<arch>\n";
        if is_ar {
            return Err(Error::Invalid(format!(
                "{}: a Debian package; unpack it first with `dpkg-deb -x {} DIR` \
                 (scripts/fetch-austen.sh does this) and pass DIR",
                deb_or_dir.display(),
                deb_or_dir.display()
            )));
        }
        return Ok(deb_or_dir.to_path_buf());
    }
    if !deb_or_dir.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: no such file or directory (expected the unpacked {DEBIAN_PACKAGE} package)",
            deb_or_dir.display()
        )));
    }
    let candidates = [
        RDATA_INDEX_IN_PACKAGE,
        "janeaustenr/data/Rdata.rdx",
        "data/Rdata.rdx",
        "Rdata.rdx",
    ];
    candidates
        .iter()
        .map(|c| deb_or_dir.join(c))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no {RDATA_INDEX_IN_PACKAGE} (or data/Rdata.rdx) inside; \
                 is this the unpacked {DEBIAN_PACKAGE} package?",
                deb_or_dir.display()
            ))
        })
}

/// One book's text: the character vector `name` joined with `"\n"`, `NA` as
/// an empty line, with a final `"\n"` (an empty vector gives an empty text).
/// Strings are converted to UTF-8 from their declared encoding.
pub fn book_text(db: &LazyLoadDb, name: &str) -> Result<Vec<u8>> {
    let obj = db.get(name)?;
    let lines = obj.object.as_character().ok_or_else(|| {
        Error::format(
            "R lazy-load database",
            format!(
                "variable `{name}` is a {}, expected a character vector",
                obj.object.type_name()
            ),
        )
    })?;
    let total: usize = lines
        .iter()
        .map(|l| l.as_ref().map_or(0, |s| s.bytes.len()) + 1)
        .sum();
    let mut out = Vec::with_capacity(total);
    for line in lines {
        if let Some(s) = line {
            out.extend_from_slice(s.to_utf8(&obj.native_encoding)?.as_bytes());
        }
        out.push(b'\n');
    }
    Ok(out)
}

/// Extract the six novels from the unpacked `r-cran-janeaustenr` package (see
/// [`find_rdata_index`] for what `deb_or_dir` may be) into `out_dir/<book>.txt`,
/// each written atomically after its SHA-256 matched [`AUSTEN_BOOKS`].
/// Returns the written paths in [`AUSTEN_BOOKS`] order.
pub fn extract_austen(deb_or_dir: &Path, out_dir: &Path) -> Result<Vec<PathBuf>> {
    let rdx = find_rdata_index(deb_or_dir)?;
    let db = LazyLoadDb::open(&rdx)?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut written = Vec::with_capacity(AUSTEN_BOOKS.len());
    for (name, want) in AUSTEN_BOOKS {
        let text = book_text(&db, name).map_err(|e| e.in_file(&rdx))?;
        let got = crate::io::sha256::hex_digest(&text);
        if got != want {
            return Err(Error::Checksum {
                what: format!(
                    "{}: book `{name}` ({} bytes extracted)",
                    rdx.display(),
                    text.len()
                ),
                got,
                want: want.to_string(),
            });
        }
        let path = out_dir.join(format!("{name}.txt"));
        crate::io::atomic::write_bytes(&path, &text)?;
        written.push(path);
    }
    Ok(written)
}

/// Check that `dir` holds the six `<book>.txt` files with the expected
/// SHA-256 sums; returns their paths in [`AUSTEN_BOOKS`] order.
pub fn verify_austen(dir: &Path) -> Result<Vec<PathBuf>> {
    AUSTEN_BOOKS
        .iter()
        .map(|(name, want)| {
            let path = dir.join(format!("{name}.txt"));
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let got = crate::io::sha256::hex_digest(&bytes);
            if &got != want {
                return Err(Error::Checksum {
                    what: path.display().to_string(),
                    got,
                    want: want.to_string(),
                });
            }
            Ok(path)
        })
        .collect()
}
