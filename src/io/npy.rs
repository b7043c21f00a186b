//! NumPy `.npy` and `.npz` arrays.
//!
//! # `.npy`
//! Format versions 1.0, 2.0 and 3.0 are read (v1: 2-byte header length, v2/v3:
//! 4-byte; v3 headers are UTF-8). The header, a Python dict literal such as
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`, is parsed
//! strictly: exactly the three keys `descr`, `fortran_order` and `shape`, each once.
//!
//! Element types (`descr`; `<` little-endian, `>` big-endian, `=` native, `|` not
//! applicable):
//!
//! | descr | tensor dtype |
//! |---|---|
//! | `<f4`, `>f4` | F32 |
//! | `<f2`, `>f2` | F16 |
//! | `<f8`, `>f8` | F32 (narrowed) |
//! | `bfloat16`, `<V2`, `>V2`, `\|V2` | BF16 (see below) |
//! | `<i4`, `>i4` | I32 |
//! | `<i8`, `>i8` | I64 |
//!
//! **bfloat16.** NumPy has no bfloat16; the `ml_dtypes` package (used by JAX) adds
//! one. `np.save` of such an array writes the descr `<V2` (an opaque 2-byte void:
//! NumPy cannot describe the type) and some writers spell it `bfloat16`. Both are
//! read as little-endian bfloat16 bits (`>V2` as big-endian). A genuine opaque
//! 2-byte record would be misread, but no SAE release stores one.
//!
//! `fortran_order: True` arrays are returned as the equivalent C-order tensor
//! (the data is read as the reversed shape and transposed, one copy).
//!
//! Every size is checked before anything is allocated: the element count is a
//! checked product of the shape, and the byte count must equal the data that
//! follows the header (a header declaring more data than the file holds, or
//! trailing bytes, is an error).
//!
//! # `.npz`
//! A zip archive of `.npy` members, as written by `np.savez` (stored) and
//! `np.savez_compressed` (deflated). See [`read_npz`].

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The `.npy` magic string.
const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The largest header accepted for format versions 2.0 and 3.0 (v1 headers are
/// limited to 65535 bytes by the format). NumPy itself refuses headers over
/// 10000 bytes by default.
pub const MAX_HEADER_LEN: usize = 1 << 20;

/// Deflate cannot expand data by more than 1032:1; an npz member that claims a
/// larger ratio is corrupt (or hostile) and is rejected before reading.
const MAX_DEFLATE_RATIO: u64 = 1032;

fn err(msg: impl Into<String>) -> Error {
    Error::format("npy", msg)
}

/// Byte order of the stored elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    Little,
    Big,
}

/// Element type of an `.npy` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F16,
    BF16,
    F32,
    F64,
    I32,
    I64,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::F16 | Elem::BF16 => 2,
            Elem::F32 | Elem::I32 => 4,
            Elem::F64 | Elem::I64 => 8,
        }
    }

    fn dtype(self) -> DType {
        match self {
            Elem::F16 => DType::F16,
            Elem::BF16 => DType::BF16,
            Elem::F32 => DType::F32,
            Elem::F64 => DType::F64,
            Elem::I32 => DType::I32,
            Elem::I64 => DType::I64,
        }
    }
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// The `descr` string, e.g. `<f4`.
    pub descr: String,
    /// Whether the data is stored in Fortran (column-major) order.
    pub fortran_order: bool,
    /// The array's shape (empty for a 0-d scalar).
    pub shape: Vec<usize>,
    /// Offset of the first data byte from the start of the file.
    pub data_offset: usize,
}

impl NpyHeader {
    /// Parse the preamble and header at the start of `bytes` (which need not hold the data).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 10 || &bytes[..6] != MAGIC {
            return Err(err("bad magic: not a .npy file"));
        }
        let major = bytes[6];
        let minor = bytes[7];
        let (header_len, start) = match major {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
            2 | 3 => {
                let b = bytes.get(8..12).ok_or_else(|| err("truncated preamble"))?;
                let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let n = usize::try_from(n).map_err(|_| err("header length overflows"))?;
                (n, 12usize)
            }
            _ => {
                return Err(err(format!(
                    "unsupported format version {major}.{minor} (1.0, 2.0 and 3.0 are read)"
                )))
            }
        };
        if header_len > MAX_HEADER_LEN {
            return Err(err(format!(
                "header of {header_len} bytes exceeds the limit of {MAX_HEADER_LEN}"
            )));
        }
        let end = start
            .checked_add(header_len)
            .ok_or_else(|| err("header length overflows"))?;
        let raw = bytes.get(start..end).ok_or_else(|| {
            err(format!(
                "truncated header: declares {header_len} bytes, {} present",
                bytes.len().saturating_sub(start)
            ))
        })?;
        // v1/v2 headers are latin-1; every character the dict literal needs is ASCII,
        // so a non-ASCII byte can only appear inside a string and is mapped as latin-1.
        let text: String = if major == 3 {
            std::str::from_utf8(raw)
                .map_err(|_| err("header is not valid UTF-8"))?
                .to_string()
        } else {
            raw.iter().map(|&b| b as char).collect()
        };
        let (descr, fortran_order, shape) = parse_dict(&text)?;
        Ok(NpyHeader {
            descr,
            fortran_order,
            shape,
            data_offset: end,
        })
    }

    /// Number of elements (checked product of the shape; see `io::checked_numel`).
    pub fn elem_count(&self) -> Result<usize> {
        super::checked_numel(&self.shape).ok_or_else(|| {
            err(format!(
                "shape {:?} overflows: too many elements",
                self.shape
            ))
        })
    }

    /// Number of data bytes the header declares (checked).
    pub fn data_len(&self) -> Result<usize> {
        let (elem, _) = parse_descr(&self.descr)?;
        self.elem_count()?.checked_mul(elem.size()).ok_or_else(|| {
            err(format!(
                "shape {:?} of {} overflows: too many bytes",
                self.shape, self.descr
            ))
        })
    }
}

fn parse_descr(descr: &str) -> Result<(Elem, Order)> {
    if descr == "bfloat16" {
        return Ok((Elem::BF16, Order::Little));
    }
    let unsupported = || Error::Dtype {
        name: "npy array".into(),
        dtype: format!(
            "{descr} (supported: f2, f4, f8, i4, i8, bfloat16 / V2, little or big endian)"
        ),
    };
    let mut chars = descr.chars();
    let order = match chars.next() {
        Some('<') => Order::Little,
        Some('>') => Order::Big,
        Some('|') => Order::Little,
        Some('=') => {
            if cfg!(target_endian = "big") {
                Order::Big
            } else {
                Order::Little
            }
        }
        _ => return Err(unsupported()),
    };
    let elem = match chars.as_str() {
        "f2" | "e" => Elem::F16,
        "f4" | "f" => Elem::F32,
        "f8" | "d" => Elem::F64,
        "V2" => Elem::BF16,
        "i4" => Elem::I32,
        "i8" => Elem::I64,
        _ => return Err(unsupported()),
    };
    // `|` (byte order not applicable) only makes sense for single-byte or void types.
    if descr.starts_with('|') && elem != Elem::BF16 {
        return Err(unsupported());
    }
    Ok((elem, order))
}

/// A tiny strict parser for the header's Python dict literal.
struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
}

enum Value {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

impl<'a> Lexer<'a> {
    fn skip_ws(&mut self) {
        while let Some(&c) = self.s.get(self.pos) {
            if c == b' ' || c == b'\t' || c == b'\n' || c == b'\r' {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }

    fn consume(&mut self, c: u8) -> Result<()> {
        match self.peek() {
            Some(x) if x == c => {
                self.pos += 1;
                Ok(())
            }
            Some(x) => Err(err(format!(
                "header: expected `{}` at byte {}, found `{}`",
                c as char, self.pos, x as char
            ))),
            None => Err(err(format!(
                "header: expected `{}`, found end of header",
                c as char
            ))),
        }
    }

    fn string(&mut self) -> Result<String> {
        let q = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => {
                return Err(err(format!(
                    "header: expected a string at byte {}",
                    self.pos
                )))
            }
        };
        self.pos += 1;
        let start = self.pos;
        while let Some(&c) = self.s.get(self.pos) {
            if c == b'\\' {
                return Err(err("header: escape sequences in strings are not supported"));
            }
            if c == q {
                let v = String::from_utf8_lossy(&self.s[start..self.pos]).into_owned();
                self.pos += 1;
                return Ok(v);
            }
            self.pos += 1;
        }
        Err(err("header: unterminated string"))
    }

    fn ident(&mut self) -> &'a [u8] {
        self.skip_ws();
        let start = self.pos;
        while let Some(&c) = self.s.get(self.pos) {
            if c.is_ascii_alphanumeric() || c == b'_' {
                self.pos += 1;
            } else {
                break;
            }
        }
        &self.s[start..self.pos]
    }

    fn int(&mut self) -> Result<usize> {
        let tok = self.ident();
        let text = std::str::from_utf8(tok).unwrap_or("");
        // Python 2 era writers append `L` to longs.
        let digits = text.strip_suffix('L').unwrap_or(text);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(format!(
                "header: shape entries must be non-negative integers, found `{text}`"
            )));
        }
        digits
            .parse::<usize>()
            .map_err(|_| err(format!("header: shape entry `{digits}` is too large")))
    }

    fn value(&mut self) -> Result<Value> {
        match self.peek() {
            Some(b'\'' | b'"') => Ok(Value::Str(self.string()?)),
            Some(b'(') => {
                self.pos += 1;
                let mut dims = Vec::new();
                loop {
                    if self.peek() == Some(b')') {
                        self.pos += 1;
                        break;
                    }
                    dims.push(self.int()?);
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b')') => {
                            self.pos += 1;
                            break;
                        }
                        _ => return Err(err("header: malformed shape tuple")),
                    }
                }
                Ok(Value::Tuple(dims))
            }
            Some(b'[') => Err(err(
                "header: list values are not supported (structured dtypes cannot be read)",
            )),
            _ => match self.ident() {
                b"True" => Ok(Value::Bool(true)),
                b"False" => Ok(Value::Bool(false)),
                other => Err(err(format!(
                    "header: unexpected value `{}`",
                    String::from_utf8_lossy(other)
                ))),
            },
        }
    }
}

fn parse_dict(text: &str) -> Result<(String, bool, Vec<usize>)> {
    let mut lx = Lexer {
        s: text.as_bytes(),
        pos: 0,
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    lx.consume(b'{')?;
    loop {
        if lx.peek() == Some(b'}') {
            lx.pos += 1;
            break;
        }
        let key = lx.string()?;
        lx.consume(b':')?;
        let v = lx.value()?;
        let dup = || err(format!("header: duplicate key `{key}`"));
        match (key.as_str(), v) {
            ("descr", Value::Str(s)) => {
                if descr.replace(s).is_some() {
                    return Err(dup());
                }
            }
            ("fortran_order", Value::Bool(b)) => {
                if fortran.replace(b).is_some() {
                    return Err(dup());
                }
            }
            ("shape", Value::Tuple(t)) => {
                if shape.replace(t).is_some() {
                    return Err(dup());
                }
            }
            ("descr" | "fortran_order" | "shape", _) => {
                return Err(err(format!(
                    "header: key `{key}` has a value of the wrong type"
                )))
            }
            _ => return Err(err(format!("header: unexpected key `{key}`"))),
        }
        match lx.peek() {
            Some(b',') => lx.pos += 1,
            Some(b'}') => {
                lx.pos += 1;
                break;
            }
            _ => return Err(err("header: expected `,` or `}`")),
        }
    }
    lx.skip_ws();
    if lx.pos != lx.s.len() {
        return Err(err("header: unexpected text after the dict"));
    }
    match (descr, fortran, shape) {
        (Some(d), Some(f), Some(s)) => Ok((d, f, s)),
        _ => Err(err(
            "header: needs the keys `descr`, `fortran_order` and `shape`",
        )),
    }
}

/// Parse a complete `.npy` file held in memory into a tensor on `device`.
///
/// `f8` arrays are narrowed to f32; every other supported type keeps its width.
pub fn parse_npy(bytes: &[u8], device: &Device) -> Result<Tensor> {
    let h = NpyHeader::parse(bytes)?;
    let (elem, order) = parse_descr(&h.descr)?;
    let nbytes = h.data_len()?;
    let avail = bytes.len().saturating_sub(h.data_offset);
    if nbytes > avail {
        return Err(err(format!(
            "header declares shape {:?} of {} ({nbytes} bytes) but only {avail} data bytes follow",
            h.shape, h.descr
        )));
    }
    if nbytes < avail {
        return Err(err(format!(
            "{} bytes of trailing data after the array of shape {:?}",
            avail - nbytes,
            h.shape
        )));
    }
    let data = &bytes[h.data_offset..];
    let size = elem.size();
    let swapped;
    let data = if order == Order::Big && size > 1 {
        let mut v = data.to_vec();
        for chunk in v.chunks_exact_mut(size) {
            chunk.reverse();
        }
        swapped = v;
        &swapped[..]
    } else {
        data
    };
    let stored_shape: Vec<usize> = if h.fortran_order {
        h.shape.iter().rev().copied().collect()
    } else {
        h.shape.clone()
    };
    let mut t = Tensor::from_raw_buffer(data, elem.dtype(), &stored_shape, device)?;
    if h.fortran_order && h.shape.len() > 1 {
        let perm: Vec<usize> = (0..h.shape.len()).rev().collect();
        t = t.permute(perm)?.contiguous()?;
    }
    if elem == Elem::F64 {
        t = t.to_dtype(DType::F32)?;
    }
    Ok(t)
}

/// Read a `.npy` file into a tensor on `device`. Errors name the file.
pub fn read_npy(path: impl AsRef<Path>, device: &Device) -> Result<Tensor> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Err(err("empty file").in_file(path));
    }
    // SAFETY: read-only mapping; every access below is bounds-checked against the
    // mapping's length, so concurrent modification can only change values read.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    parse_npy(&mmap[..], device).map_err(|e| e.in_file(path))
}

/// Serialize `t` as a `<f4`, C-order, version 1.0 `.npy` byte buffer (any float
/// dtype is converted to f32).
pub fn npy_f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let shape = t.dims();
    let shape_str = match shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // Pad with spaces so that the data starts at a multiple of 64, ending in '\n'.
    let unpadded = 10 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let header_len = dict.len() + pad + 1;
    let header_len = u16::try_from(header_len)
        .map_err(|_| Error::Invalid(format!("shape {shape:?} too long for an npy v1 header")))?;
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(10 + header_len as usize + 4 * values.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(out.len() + pad, b' ');
    out.push(b'\n');
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// Write `t` to `path` as a `<f4`, C-order, version 1.0 `.npy` file, atomically
/// (temporary file + rename). Any float dtype is converted to f32.
pub fn write_npy_f32(path: impl AsRef<Path>, t: &Tensor) -> Result<()> {
    let path = path.as_ref();
    let bytes = npy_f32_bytes(t)?;
    crate::io::write_atomic(path, |w| {
        use std::io::Write;
        w.write_all(&bytes).map_err(|e| Error::io(path, e))
    })
}

/// Read every `.npy` member of a `.npz` archive (`np.savez` stores members,
/// `np.savez_compressed` deflates them) into tensors on `device`, keyed by the
/// member name without its `.npy` suffix.
///
/// Each member is checked before it is read: its declared uncompressed size must
/// equal the npy header plus the data that header declares, a stored member must
/// fit in the file, and a deflated one may not claim more than deflate's maximum
/// ratio (1032:1) of its compressed size. Reading stops at the declared size, and
/// the zip CRC is verified. Errors name the file and member.
pub fn read_npz(path: impl AsRef<Path>, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let path = path.as_ref();
    read_npz_inner(path, device).map_err(|e| e.in_file(path))
}

fn zip_err(e: impl std::fmt::Display) -> Error {
    Error::format("npz", e.to_string())
}

fn read_npz_inner(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(zip_err)?;
    let mut out = BTreeMap::new();
    for i in 0..zip.len() {
        let mut member = zip.by_index(i).map_err(zip_err)?;
        if !member.is_file() {
            continue;
        }
        let name = member.name().map_err(zip_err)?.into_owned();
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        let in_member = |e: Error| Error::format("npz", format!("member `{name}`: {e}"));
        let declared = member.size();
        let compressed = member.compressed_size();
        match member.compression() {
            zip::CompressionMethod::Stored => {
                if declared != compressed || declared > file_len {
                    return Err(in_member(err(format!(
                        "stored member declares {declared} bytes ({compressed} stored) in a \
                         file of {file_len} bytes"
                    ))));
                }
            }
            zip::CompressionMethod::Deflated => {
                if declared > compressed.saturating_mul(MAX_DEFLATE_RATIO) || compressed > file_len
                {
                    return Err(in_member(err(format!(
                        "deflated member declares {declared} bytes from {compressed} compressed \
                         bytes: more than deflate can produce"
                    ))));
                }
            }
            other => {
                return Err(in_member(err(format!(
                    "compression method {other:?} is not supported (stored, deflated)"
                ))))
            }
        }
        let declared_usize = usize::try_from(declared)
            .map_err(|_| in_member(err("member too large for this platform")))?;
        // Read the preamble and header first and check them against the declared size,
        // so that nothing is allocated for data the header does not justify.
        let mut head = Vec::new();
        (&mut member)
            .take(12)
            .read_to_end(&mut head)
            .map_err(|e| in_member(err(format!("read failed: {e}"))))?;
        let header_len: u64 = match head.get(6) {
            Some(1) if head.len() >= 10 => u64::from(u16::from_le_bytes([head[8], head[9]])) + 10,
            Some(2 | 3) if head.len() >= 12 => {
                u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]])) + 12
            }
            _ => {
                return Err(in_member(
                    NpyHeader::parse(&head)
                        .err()
                        .unwrap_or_else(|| err("bad preamble")),
                ))
            }
        };
        if header_len > MAX_HEADER_LEN as u64 + 12 || header_len > declared {
            return Err(in_member(err(format!(
                "header of {header_len} bytes does not fit the member's {declared} bytes"
            ))));
        }
        let rest = header_len.saturating_sub(head.len() as u64);
        (&mut member)
            .take(rest)
            .read_to_end(&mut head)
            .map_err(|e| in_member(err(format!("read failed: {e}"))))?;
        let h = NpyHeader::parse(&head).map_err(in_member)?;
        let total = h
            .data_len()
            .map_err(in_member)?
            .checked_add(h.data_offset)
            .ok_or_else(|| in_member(err("size overflows")))?;
        if total != declared_usize {
            return Err(in_member(err(format!(
                "npy header declares shape {:?} of {} ({total} bytes with header) but the member \
                 holds {declared} bytes",
                h.shape, h.descr
            ))));
        }
        // Grow as data actually arrives (never more than the declared size).
        let remaining = (declared_usize - head.len()) as u64;
        (&mut member)
            .take(remaining)
            .read_to_end(&mut head)
            .map_err(|e| in_member(err(format!("corrupted data: {e}"))))?;
        if head.len() != declared_usize {
            return Err(in_member(err(format!(
                "truncated: {} of {declared} bytes",
                head.len()
            ))));
        }
        // Drain to EOF so the zip reader verifies the CRC.
        let mut extra = [0u8; 1];
        match member.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => return Err(in_member(err("member holds more data than declared"))),
            Err(e) => return Err(in_member(err(format!("corrupted data: {e}")))),
        }
        let t = parse_npy(&head, device).map_err(in_member)?;
        if out.insert(key.clone(), t).is_some() {
            return Err(zip_err(format!("duplicate member `{key}`")));
        }
    }
    Ok(out)
}
