//! R's serialization format (XDR, versions 2 and 3) and R's lazy-load
//! databases (an `.rdx` index beside an `.rdb` blob file).
//!
//! Only what character vectors, numeric vectors and (pair)lists need is
//! implemented: `NULL`, symbols and the reference table, `CHARSXP`, logical,
//! integer, double and character vectors, generic lists (`VECSXP`),
//! pairlists with attributes and tags. Anything else (environments,
//! closures, ALTREP objects, bytecode, ...) is a clear error naming the
//! `SEXPTYPE` code.
//!
//! Hostile input never panics and never causes an allocation larger than a
//! small multiple of the input: every length is checked against the bytes
//! left before anything is allocated, nesting depth is capped, decompressed
//! sizes are checked against what deflate can possibly produce.
//!
//! ```no_run
//! use sae_ablate::corpus::rdata::LazyLoadDb;
//! # fn main() -> sae_ablate::Result<()> {
//! let db = LazyLoadDb::open("janeaustenr/data/Rdata.rdx".as_ref())?;
//! let emma = db.get("emma")?;
//! let lines = emma.object.as_character().map(|v| v.len());
//! # Ok(()) }
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flate2::read::{MultiGzDecoder, ZlibDecoder};

use crate::{Error, Result};

const SER: &str = "R serialization";
const DB: &str = "R lazy-load database";

/// Deepest nesting of lists/pairlists/attributes accepted.
pub const MAX_DEPTH: usize = 128;

/// deflate cannot expand its input by more than about 1032:1; a declared
/// uncompressed size beyond this bound is a corrupt or hostile file.
const MAX_DEFLATE_RATIO: u64 = 1032;
/// Slack for headers on tiny streams.
const DEFLATE_SLACK: u64 = 1 << 12;

/// `SEXPTYPE` codes used in the serialization stream.
mod code {
    pub const NILSXP: u32 = 0;
    pub const SYMSXP: u32 = 1;
    pub const LISTSXP: u32 = 2;
    pub const CHARSXP: u32 = 9;
    pub const LGLSXP: u32 = 10;
    pub const INTSXP: u32 = 13;
    pub const REALSXP: u32 = 14;
    pub const STRSXP: u32 = 16;
    pub const VECSXP: u32 = 19;
    pub const ALTREP_SXP: u32 = 238;
    pub const ATTRLISTSXP: u32 = 239;
    pub const PERSISTSXP: u32 = 247;
    pub const NILVALUE_SXP: u32 = 254;
    pub const REFSXP: u32 = 255;
}

/// A human-readable name for an R `SEXPTYPE` code, for error messages.
pub fn sexptype_name(code: u32) -> &'static str {
    match code {
        0 => "NILSXP",
        1 => "SYMSXP",
        2 => "LISTSXP",
        3 => "CLOSXP",
        4 => "ENVSXP",
        5 => "PROMSXP",
        6 => "LANGSXP",
        7 => "SPECIALSXP",
        8 => "BUILTINSXP",
        9 => "CHARSXP",
        10 => "LGLSXP",
        13 => "INTSXP",
        14 => "REALSXP",
        15 => "CPLXSXP",
        16 => "STRSXP",
        17 => "DOTSXP",
        18 => "ANYSXP",
        19 => "VECSXP",
        20 => "EXPRSXP",
        21 => "BCODESXP",
        22 => "EXTPTRSXP",
        23 => "WEAKREFSXP",
        24 => "RAWSXP",
        25 => "S4SXP",
        238 => "ALTREP_SXP",
        239 => "ATTRLISTSXP",
        240 => "ATTRLANGSXP",
        241 => "BASEENV_SXP",
        242 => "EMPTYENV_SXP",
        243 => "BCREPREF",
        244 => "BCREPDEF",
        245 => "GENERICREFSXP",
        246 => "CLASSREFSXP",
        247 => "PERSISTSXP",
        248 => "PACKAGESXP",
        249 => "NAMESPACESXP",
        250 => "BASENAMESPACE_SXP",
        251 => "MISSINGARG_SXP",
        252 => "UNBOUNDVALUE_SXP",
        253 => "GLOBALENV_SXP",
        254 => "NILVALUE_SXP",
        255 => "REFSXP",
        _ => "unknown",
    }
}

/// The declared encoding of one string (the `levels` bits of a `CHARSXP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Encoding {
    /// No flag: the writer's native encoding (see [`Unserialized::native_encoding`]).
    Native,
    /// Flagged UTF-8.
    Utf8,
    /// Flagged Latin-1.
    Latin1,
    /// Flagged "bytes": no encoding.
    Bytes,
    /// Flagged ASCII.
    Ascii,
}

/// One element of a character vector: its bytes as stored and their encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RString {
    /// The bytes, exactly as stored.
    pub bytes: Vec<u8>,
    /// The declared encoding.
    pub encoding: Encoding,
}

impl RString {
    /// A UTF-8 string with the `Utf8` (or `Ascii`, when it is ASCII) flag.
    pub fn utf8(s: &str) -> Self {
        RString {
            bytes: s.as_bytes().to_vec(),
            encoding: if s.is_ascii() {
                Encoding::Ascii
            } else {
                Encoding::Utf8
            },
        }
    }

    /// The string as UTF-8. Latin-1 strings (flagged, or unflagged when the
    /// writer's `native` encoding is Latin-1) are converted; UTF-8 and ASCII
    /// strings are validated; "bytes" strings are an error.
    pub fn to_utf8(&self, native: &str) -> Result<String> {
        let latin1 = match self.encoding {
            Encoding::Latin1 => true,
            Encoding::Bytes => {
                return Err(Error::format(
                    SER,
                    "a string flagged as \"bytes\" has no encoding to convert to UTF-8",
                ))
            }
            Encoding::Native => is_latin1_name(native),
            Encoding::Utf8 | Encoding::Ascii => false,
        };
        if latin1 {
            return Ok(self.bytes.iter().map(|&b| char::from(b)).collect());
        }
        String::from_utf8(self.bytes.clone()).map_err(|e| {
            Error::format(
                SER,
                format!(
                    "string declared {:?} (native encoding {native}) is not valid UTF-8: {e}",
                    self.encoding
                ),
            )
        })
    }
}

fn is_latin1_name(enc: &str) -> bool {
    let e = enc.to_ascii_lowercase().replace(['-', '_'], "");
    matches!(e.as_str(), "latin1" | "iso88591" | "iso885915" | "cp1252")
}

/// The value of an R object, without its attributes.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum RValue {
    /// `NULL`.
    Null,
    /// A symbol (name).
    Symbol(Arc<str>),
    /// A logical vector; `None` is `NA`.
    Logical(Vec<Option<bool>>),
    /// An integer vector; `None` is `NA`.
    Integer(Vec<Option<i32>>),
    /// A double vector (`NA` is a NaN payload, kept as is).
    Real(Vec<f64>),
    /// A character vector; `None` is `NA`.
    Character(Vec<Option<RString>>),
    /// A generic vector (`list()`).
    List(Vec<RObject>),
    /// A pairlist: optional tag and value per node.
    Pairlist(Vec<(Option<Arc<str>>, RObject)>),
}

/// An R object: a value, its attributes and its "object" (class) bit.
#[derive(Clone, Debug, PartialEq)]
pub struct RObject {
    /// The value.
    pub value: RValue,
    /// Attributes, in stored order (e.g. `names`, `class`).
    pub attributes: Vec<(Arc<str>, RObject)>,
    /// The `OBJECT` bit (set on objects with a class attribute).
    pub is_object: bool,
}

impl RObject {
    /// An object with no attributes.
    pub fn new(value: RValue) -> Self {
        RObject {
            value,
            attributes: Vec::new(),
            is_object: false,
        }
    }

    /// The attribute `name`, if present.
    pub fn attr(&self, name: &str) -> Option<&RObject> {
        self.attributes
            .iter()
            .find(|(k, _)| &**k == name)
            .map(|(_, v)| v)
    }

    /// The elements of a character vector, or `None` for other types.
    pub fn as_character(&self) -> Option<&[Option<RString>]> {
        match &self.value {
            RValue::Character(v) => Some(v),
            _ => None,
        }
    }

    /// The `names` attribute decoded as UTF-8 (`NA` names as `None`), or
    /// `None` when there is no character `names` attribute.
    pub fn names(&self, native: &str) -> Option<Result<Vec<Option<String>>>> {
        let names = self.attr("names")?.as_character()?;
        Some(
            names
                .iter()
                .map(|n| n.as_ref().map(|s| s.to_utf8(native)).transpose())
                .collect(),
        )
    }

    /// The element called `name` of a named list or of a tagged pairlist.
    pub fn get(&self, name: &str, native: &str) -> Option<&RObject> {
        match &self.value {
            RValue::List(items) => {
                let names = self.names(native)?.ok()?;
                let i = names.iter().position(|n| n.as_deref() == Some(name))?;
                items.get(i)
            }
            RValue::Pairlist(nodes) => nodes
                .iter()
                .find(|(t, _)| t.as_deref() == Some(name))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The R type of this object, as R's `typeof()` spells it.
    pub fn type_name(&self) -> &'static str {
        match &self.value {
            RValue::Null => "NULL",
            RValue::Symbol(_) => "symbol",
            RValue::Logical(_) => "logical",
            RValue::Integer(_) => "integer",
            RValue::Real(_) => "double",
            RValue::Character(_) => "character",
            RValue::List(_) => "list",
            RValue::Pairlist(_) => "pairlist",
        }
    }
}

/// A deserialized R object with the stream's header.
#[derive(Clone, Debug, PartialEq)]
pub struct Unserialized {
    /// The serialization format version (2 or 3).
    pub version: i32,
    /// The writer's native encoding (version 3 streams; `"UTF-8"` assumed for version 2).
    pub native_encoding: String,
    /// The object.
    pub object: RObject,
}

/// Deserialize one R object from an XDR (`"X\n"`) stream of format version 2 or 3,
/// as written by `serialize()`/`saveRDS()` (after decompression). The whole
/// input must be consumed.
pub fn unserialize(bytes: &[u8]) -> Result<Unserialized> {
    let mut r = Reader {
        buf: bytes,
        pos: 0,
        refs: Vec::new(),
        native: String::from("UTF-8"),
    };
    let magic = r.take(2, "format header")?;
    match magic {
        b"X\n" => {}
        b"A\n" => {
            return Err(Error::format(
                SER,
                "ASCII format (\"A\\n\") is not supported",
            ))
        }
        b"B\n" => {
            return Err(Error::format(
                SER,
                "native binary format (\"B\\n\") is not supported",
            ))
        }
        _ => {
            return Err(Error::format(
                SER,
                format!("not an XDR stream: header bytes {magic:02x?}, expected \"X\\n\""),
            ))
        }
    }
    let version = r.int("format version")?;
    let _writer_version = r.int("writer version")?;
    let _min_reader = r.int("minimal reader version")?;
    match version {
        2 => {}
        3 => {
            let n = r.int("native encoding length")?;
            if !(0..=63).contains(&n) {
                return Err(r.err(format!(
                    "native encoding name length {n} out of range 0..=63"
                )));
            }
            let name = r.take(n as usize, "native encoding name")?;
            r.native = String::from_utf8_lossy(name).into_owned();
        }
        v => {
            return Err(Error::format(
                SER,
                format!("unsupported format version {v} (supported: 2, 3)"),
            ))
        }
    }
    let object = r.item(0)?;
    if r.remaining() != 0 {
        return Err(r.err(format!("{} trailing bytes after the object", r.remaining())));
    }
    Ok(Unserialized {
        version,
        native_encoding: r.native,
        object,
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The reference table: only symbols are ever added (environments are rejected).
    refs: Vec<RObject>,
    native: String,
}

fn has_attr(flags: u32) -> bool {
    flags & (1 << 9) != 0
}
fn has_tag(flags: u32) -> bool {
    flags & (1 << 10) != 0
}
fn is_obj(flags: u32) -> bool {
    flags & (1 << 8) != 0
}
fn levels(flags: u32) -> u32 {
    flags >> 12
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(SER, format!("at byte {}: {msg}", self.pos))
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: {what} needs {n} bytes, {} left",
                self.remaining()
            )));
        }
        let s = self.buf.get(self.pos..self.pos + n).unwrap_or_default();
        self.pos += n;
        Ok(s)
    }

    fn int(&mut self, what: &str) -> Result<i32> {
        let b = self.take(4, what)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        Ok(i32::from_be_bytes(a))
    }

    fn flags(&mut self) -> Result<u32> {
        Ok(self.int("item flags")? as u32)
    }

    /// A vector length (with R's long-vector encoding), checked so that
    /// `len * min_elem_bytes` fits in the bytes left.
    fn length(&mut self, what: &str, min_elem_bytes: usize) -> Result<usize> {
        let n = self.int(what)?;
        let len: u64 = match n {
            -1 => {
                let hi = self.int(what)? as u32 as u64;
                let lo = self.int(what)? as u32 as u64;
                (hi << 32) | lo
            }
            n if n < 0 => return Err(self.err(format!("negative {what} {n}"))),
            n => n as u64,
        };
        let need = len.saturating_mul(min_elem_bytes as u64);
        if need > self.remaining() as u64 {
            return Err(self.err(format!(
                "{what} {len} needs at least {need} bytes, only {} left",
                self.remaining()
            )));
        }
        usize::try_from(len).map_err(|_| self.err(format!("{what} {len} too large")))
    }

    fn item(&mut self, depth: usize) -> Result<RObject> {
        let flags = self.flags()?;
        self.item_with_flags(flags, depth)
    }

    fn item_with_flags(&mut self, flags: u32, depth: usize) -> Result<RObject> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!("objects nested deeper than {MAX_DEPTH}")));
        }
        let ty = flags & 0xff;
        let value = match ty {
            code::NILVALUE_SXP => return Ok(RObject::new(RValue::Null)),
            code::REFSXP => {
                let mut i = (flags >> 8) as usize;
                if i == 0 {
                    let n = self.int("reference index")?;
                    i = usize::try_from(n)
                        .map_err(|_| self.err(format!("negative reference index {n}")))?;
                }
                return match i.checked_sub(1).and_then(|k| self.refs.get(k)) {
                    Some(o) => Ok(o.clone()),
                    None => Err(self.err(format!(
                        "reference {i} out of range: the reference table holds {}",
                        self.refs.len()
                    ))),
                };
            }
            code::SYMSXP => {
                let cflags = self.flags()?;
                if cflags & 0xff != code::CHARSXP {
                    return Err(self.err(format!(
                        "symbol name has type {} ({}), expected CHARSXP",
                        cflags & 0xff,
                        sexptype_name(cflags & 0xff)
                    )));
                }
                let name = self
                    .charsxp(cflags, depth)?
                    .ok_or_else(|| self.err("symbol with an NA name"))?;
                let name: Arc<str> = name.to_utf8(&self.native)?.into();
                let sym = RObject::new(RValue::Symbol(name));
                self.refs.push(sym.clone());
                return Ok(sym);
            }
            code::LISTSXP | code::ATTRLISTSXP => return self.pairlist(flags, depth),
            code::CHARSXP => {
                return Err(self.err("a bare CHARSXP outside a character vector or symbol"))
            }
            code::LGLSXP => {
                let n = self.length("logical vector length", 4)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(match self.int("logical")? {
                        i32::MIN => None,
                        0 => Some(false),
                        _ => Some(true),
                    });
                }
                RValue::Logical(v)
            }
            code::INTSXP => {
                let n = self.length("integer vector length", 4)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let x = self.int("integer")?;
                    v.push((x != i32::MIN).then_some(x));
                }
                RValue::Integer(v)
            }
            code::REALSXP => {
                let n = self.length("double vector length", 8)?;
                let bytes = self.take(n * 8, "double vector")?;
                let v = bytes
                    .chunks_exact(8)
                    .map(|c| {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(c);
                        f64::from_be_bytes(a)
                    })
                    .collect();
                RValue::Real(v)
            }
            code::STRSXP => {
                let n = self.length("character vector length", 8)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let cflags = self.flags()?;
                    if cflags & 0xff != code::CHARSXP {
                        return Err(self.err(format!(
                            "character vector element has type {} ({}), expected CHARSXP",
                            cflags & 0xff,
                            sexptype_name(cflags & 0xff)
                        )));
                    }
                    v.push(self.charsxp(cflags, depth)?);
                }
                RValue::Character(v)
            }
            code::VECSXP => {
                let n = self.length("list length", 4)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.item(depth + 1)?);
                }
                RValue::List(v)
            }
            code::ALTREP_SXP => {
                return Err(self.err(
                    "unsupported SEXP type 238 (ALTREP_SXP): ALTREP objects are not supported",
                ))
            }
            code::PERSISTSXP => {
                return Err(self.err(
                    "unsupported SEXP type 247 (PERSISTSXP): persistent references (environments in lazy-load databases) are not supported",
                ))
            }
            code::NILSXP => {
                return Err(self.err("unsupported SEXP type 0 (NILSXP written as a full item)"))
            }
            t => {
                return Err(self.err(format!(
                    "unsupported SEXP type {t} ({})",
                    sexptype_name(t)
                )))
            }
        };
        let attributes = if has_attr(flags) {
            self.attributes(depth)?
        } else {
            Vec::new()
        };
        Ok(RObject {
            value,
            attributes,
            is_object: is_obj(flags),
        })
    }

    /// The body of a CHARSXP whose flags have been read: `None` is `NA_STRING`.
    fn charsxp(&mut self, flags: u32, depth: usize) -> Result<Option<RString>> {
        let n = self.int("string length")?;
        let s = if n == -1 {
            None
        } else if n < 0 {
            return Err(self.err(format!("negative string length {n}")));
        } else {
            let bytes = self.take(n as usize, "string")?.to_vec();
            let lv = levels(flags);
            // R's gp bits: BYTES 1<<1, LATIN1 1<<2, UTF8 1<<3, ASCII 1<<6.
            let encoding = if lv & (1 << 1) != 0 {
                Encoding::Bytes
            } else if lv & (1 << 2) != 0 {
                Encoding::Latin1
            } else if lv & (1 << 3) != 0 {
                Encoding::Utf8
            } else if lv & (1 << 6) != 0 {
                Encoding::Ascii
            } else {
                Encoding::Native
            };
            Some(RString { bytes, encoding })
        };
        if has_attr(flags) {
            // Old writers could attach attributes to CHARSXPs; R reads and drops them.
            self.item(depth + 1)?;
        }
        Ok(s)
    }

    /// An attribute pairlist: every node must be tagged.
    fn attributes(&mut self, depth: usize) -> Result<Vec<(Arc<str>, RObject)>> {
        let a = self.item(depth + 1)?;
        match a.value {
            RValue::Pairlist(nodes) => nodes
                .into_iter()
                .map(|(t, v)| match t {
                    Some(t) => Ok((t, v)),
                    None => Err(self.err("attribute without a name tag")),
                })
                .collect(),
            RValue::Null => Ok(Vec::new()),
            _ => Err(self.err(format!(
                "attributes stored as a {}, expected a pairlist",
                a.type_name()
            ))),
        }
    }

    /// A pairlist, read iteratively along its CDR chain (no recursion per node).
    fn pairlist(&mut self, first_flags: u32, depth: usize) -> Result<RObject> {
        let mut nodes = Vec::new();
        let mut attributes = Vec::new();
        let mut flags = first_flags;
        let mut first = true;
        loop {
            match flags & 0xff {
                code::LISTSXP | code::ATTRLISTSXP => {}
                code::NILVALUE_SXP => break,
                t => {
                    return Err(self.err(format!(
                        "pairlist ends in a {} ({t}) instead of NULL",
                        sexptype_name(t)
                    )))
                }
            }
            if has_attr(flags) {
                let a = self.attributes(depth)?;
                if first {
                    attributes = a;
                }
            }
            let tag = if has_tag(flags) {
                let t = self.item(depth + 1)?;
                match t.value {
                    RValue::Symbol(s) => Some(s),
                    RValue::Null => None,
                    _ => {
                        return Err(self.err(format!(
                            "pairlist tag is a {}, expected a symbol",
                            t.type_name()
                        )))
                    }
                }
            } else {
                None
            };
            let car = self.item(depth + 1)?;
            nodes.push((tag, car));
            first = false;
            flags = self.flags()?;
        }
        Ok(RObject {
            value: RValue::Pairlist(nodes),
            attributes,
            is_object: is_obj(first_flags),
        })
    }
}

/// The most bytes a deflate stream of `compressed` bytes can expand to.
fn deflate_bound(compressed: usize) -> u64 {
    (compressed as u64)
        .saturating_mul(MAX_DEFLATE_RATIO)
        .saturating_add(DEFLATE_SLACK)
}

fn read_limited(mut r: impl Read, limit: u64, what: &str, cap_hint: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(cap_hint);
    (&mut r)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| Error::format(DB, format!("{what}: {e}")))?;
    if out.len() as u64 > limit {
        return Err(Error::format(
            DB,
            format!("{what} decompresses to more than {limit} bytes"),
        ));
    }
    Ok(out)
}

/// Decode the bytes of an `.rds`-style file (what `saveRDS()` and an `.rdx`
/// index hold): gzip-compressed or plain XDR. bzip2 and xz are recognised
/// and reported as unsupported.
pub fn read_rds_bytes(bytes: &[u8]) -> Result<Unserialized> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let raw = read_limited(
            MultiGzDecoder::new(bytes),
            deflate_bound(bytes.len()),
            "gzip stream",
            bytes.len().saturating_mul(4),
        )?;
        unserialize(&raw)
    } else if bytes.starts_with(&[0x78]) && bytes.len() >= 2 {
        // A bare zlib stream (not written by R, but cheap to accept).
        let raw = read_limited(
            ZlibDecoder::new(bytes),
            deflate_bound(bytes.len()),
            "zlib stream",
            bytes.len().saturating_mul(4),
        )?;
        unserialize(&raw)
    } else if bytes.starts_with(b"BZh") {
        Err(Error::format(
            DB,
            "unsupported compression: bzip2 (recompress with saveRDS(compress = \"gzip\"))",
        ))
    } else if bytes.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Err(Error::format(
            DB,
            "unsupported compression: xz (recompress with saveRDS(compress = \"gzip\"))",
        ))
    } else {
        unserialize(bytes)
    }
}

/// Read an `.rds` file (or an `.rdx` index) from disk.
pub fn read_rds(path: &Path) -> Result<Unserialized> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_rds_bytes(&bytes).map_err(|e| e.in_file(path))
}

/// How the blobs of an `.rdb` file are compressed (the index's `compressed` entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// `compressed = FALSE`: each blob is a bare serialization stream.
    None,
    /// `compressed = TRUE` (type 1): 4-byte big-endian length, then a zlib stream.
    Zlib,
    /// `compressed = 2` or `3`: 4-byte length, a type byte (`'0'` stored,
    /// `'1'` zlib, `'2'` bzip2, `'Z'` xz), then the data.
    Typed(u8),
}

/// Decompress one `.rdb` blob into its serialization stream.
pub fn decompress_blob(blob: &[u8], compression: Compression) -> Result<Vec<u8>> {
    let header = |n: usize| -> Result<u64> {
        match blob.get(..4) {
            Some(b) if blob.len() >= n => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64),
            _ => Err(Error::format(
                DB,
                format!(
                    "blob of {} bytes is too short for its {n}-byte header",
                    blob.len()
                ),
            )),
        }
    };
    let zlib = |declared: u64, data: &[u8]| -> Result<Vec<u8>> {
        let bound = deflate_bound(data.len());
        if declared > bound {
            return Err(Error::format(
                DB,
                format!(
                    "blob declares {declared} uncompressed bytes, impossible from a {}-byte zlib stream",
                    data.len()
                ),
            ));
        }
        // Reserve what a typical text ratio needs; more only as real output arrives.
        let hint = declared.min((data.len() as u64).saturating_mul(16)) as usize;
        let out = read_limited(ZlibDecoder::new(data), declared, "zlib stream", hint)?;
        if out.len() as u64 != declared {
            return Err(Error::format(
                DB,
                format!(
                    "zlib stream gives {} bytes, the blob declares {declared} (truncated or corrupt)",
                    out.len()
                ),
            ));
        }
        Ok(out)
    };
    match compression {
        Compression::None => Ok(blob.to_vec()),
        Compression::Zlib => {
            let declared = header(4)?;
            zlib(declared, blob.get(4..).unwrap_or_default())
        }
        Compression::Typed(_) => {
            let declared = header(5)?;
            let ty = blob.get(4).copied().unwrap_or_default();
            let data = blob.get(5..).unwrap_or_default();
            match ty {
                b'0' => {
                    if data.len() as u64 != declared {
                        return Err(Error::format(
                            DB,
                            format!(
                                "stored blob holds {} bytes, declares {declared}",
                                data.len()
                            ),
                        ));
                    }
                    Ok(data.to_vec())
                }
                b'1' => zlib(declared, data),
                b'2' => Err(Error::format(
                    DB,
                    "unsupported compression: bzip2 blob (type '2'); rebuild the database with compress = TRUE",
                )),
                b'Z' => Err(Error::format(
                    DB,
                    "unsupported compression: xz blob (type 'Z'); rebuild the database with compress = TRUE",
                )),
                t => Err(Error::format(
                    DB,
                    format!("unknown blob compression type byte 0x{t:02x}"),
                )),
            }
        }
    }
}

/// One R lazy-load database: the `.rdx` index and the `.rdb` blobs, in memory.
#[derive(Debug)]
pub struct LazyLoadDb {
    rdb: Vec<u8>,
    rdb_path: Option<PathBuf>,
    /// (name, offset, length) per variable, in index order.
    entries: Vec<(String, usize, usize)>,
    compression: Compression,
}

impl LazyLoadDb {
    /// Open `X.rdx` and its sibling `X.rdb`.
    pub fn open(rdx: &Path) -> Result<Self> {
        let rdb_path = rdx.with_extension("rdb");
        let idx = std::fs::read(rdx).map_err(|e| Error::io(rdx, e))?;
        let rdb = std::fs::read(&rdb_path).map_err(|e| Error::io(&rdb_path, e))?;
        let mut db = Self::from_bytes(&idx, rdb).map_err(|e| e.in_file(rdx))?;
        db.rdb_path = Some(rdb_path);
        Ok(db)
    }

    /// Build from the bytes of an `.rdx` index and of its `.rdb` file.
    /// Every variable's range is checked against the `.rdb` size here.
    pub fn from_bytes(rdx: &[u8], rdb: Vec<u8>) -> Result<Self> {
        let index = read_rds_bytes(rdx)?;
        let native = index.native_encoding.as_str();
        let idx = &index.object;
        let variables = idx
            .get("variables", native)
            .ok_or_else(|| Error::format(DB, "index has no `variables` entry"))?;
        let compression = match idx.get("compressed", native).map(|c| &c.value) {
            None => Compression::Zlib,
            Some(v) => {
                let c = match v {
                    RValue::Logical(x) if x.len() == 1 => x[0].map(i64::from),
                    RValue::Integer(x) if x.len() == 1 => x[0].map(i64::from),
                    RValue::Real(x) if x.len() == 1 && x[0].fract() == 0.0 => Some(x[0] as i64),
                    _ => None,
                };
                match c {
                    Some(0) => Compression::None,
                    Some(1) => Compression::Zlib,
                    Some(c @ (2 | 3)) => Compression::Typed(c as u8),
                    _ => {
                        return Err(Error::format(
                            DB,
                            format!("index entry `compressed` is {v:?}, expected 0..=3"),
                        ))
                    }
                }
            }
        };
        let (items, names) = match &variables.value {
            RValue::List(items) => {
                let names = variables
                    .names(native)
                    .transpose()?
                    .ok_or_else(|| Error::format(DB, "`variables` has no names"))?;
                (items, names)
            }
            RValue::Null => (&Vec::new(), Vec::new()),
            _ => {
                return Err(Error::format(
                    DB,
                    format!(
                        "`variables` is a {}, expected a list",
                        variables.type_name()
                    ),
                ))
            }
        };
        if names.len() != items.len() {
            return Err(Error::format(
                DB,
                format!(
                    "`variables` has {} entries but {} names",
                    items.len(),
                    names.len()
                ),
            ));
        }
        let mut entries = Vec::with_capacity(items.len());
        for (name, item) in names.into_iter().zip(items) {
            let name = name.ok_or_else(|| Error::format(DB, "a variable with an NA name"))?;
            let pair: Vec<f64> = match &item.value {
                RValue::Integer(v) => v.iter().map(|x| x.map_or(f64::NAN, f64::from)).collect(),
                RValue::Real(v) => v.clone(),
                _ => Vec::new(),
            };
            let bad = || {
                Error::format(
                    DB,
                    format!("variable `{name}`: position is not c(offset, length) of whole non-negative numbers"),
                )
            };
            let &[off, len] = pair.as_slice() else {
                return Err(bad());
            };
            let ok = |x: f64| x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53);
            if !ok(off) || !ok(len) {
                return Err(bad());
            }
            let (off, len) = (off as u64, len as u64);
            if off.saturating_add(len) > rdb.len() as u64 {
                return Err(Error::format(
                    DB,
                    format!(
                        "variable `{name}` at [{off}, {}) lies outside the {}-byte .rdb",
                        off + len,
                        rdb.len()
                    ),
                ));
            }
            entries.push((name, off as usize, len as usize));
        }
        Ok(LazyLoadDb {
            rdb,
            rdb_path: None,
            entries,
            compression,
        })
    }

    /// The variables' names, in index order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _, _)| n.as_str())
    }

    /// The blob compression the index declares.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Read the variable `name`.
    pub fn get(&self, name: &str) -> Result<Unserialized> {
        let (_, off, len) = self
            .entries
            .iter()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.names().collect();
                Error::format(
                    DB,
                    format!("no variable `{name}` (the index holds {known:?})"),
                )
            })?;
        let blob = self.rdb.get(*off..off + len).unwrap_or_default();
        let r = decompress_blob(blob, self.compression)
            .and_then(|raw| unserialize(&raw))
            .map_err(|e| Error::format(DB, format!("variable `{name}`: {e}")));
        match &self.rdb_path {
            Some(p) => r.map_err(|e| e.in_file(p)),
            None => r,
        }
    }
}
