//! Opening GGUF files: candle's reader, plus the checks it leaves out.
//!
//! `gguf_file::Content::read` bounds every count and string by the file size, but
//! two fields of a hostile header still reach arithmetic unchecked:
//! * `general.alignment = 0` is used as a divisor (a panic), and
//! * a tensor whose dimensions multiply past `usize` overflows when the tensor is
//!   read (a panic with overflow checks, a wrapped, too-small size without).
//!
//! [`open`] rejects both with an error naming the file, before anything is read or
//! allocated for a tensor; every tensor's byte range is also checked against the file,
//! and empty tensors are refused (candle reads them through an unaligned slice).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::{Error, Result};

fn gguf_err(msg: impl Into<String>) -> Error {
    Error::format("gguf", msg)
}

/// Open `path` and read its header, metadata and tensor table; errors name the file.
pub(crate) fn open(path: &Path) -> Result<(gguf_file::Content, BufReader<File>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    // A structural problem ends the scan silently: candle's reader reports it below.
    if let Ok(true) = zero_alignment(&mut reader) {
        return Err(gguf_err("metadata `general.alignment` is 0").in_file(path));
    }
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    let ct = gguf_file::Content::read(&mut reader)
        .map_err(|e| Error::format_candle("gguf", e).in_file(path))?;
    check_tensors(&ct, file_len).map_err(|e| e.in_file(path))?;
    Ok((ct, reader))
}

/// Every tensor's element count and byte size fit in `usize`, and its data lies
/// inside the file.
fn check_tensors(ct: &gguf_file::Content, file_len: u64) -> Result<()> {
    for (name, info) in &ct.tensor_infos {
        let dims = info.shape.dims();
        let elems = crate::io::checked_numel(dims)
            .ok_or_else(|| gguf_err(format!("tensor `{name}`: shape {dims:?} overflows")))?;
        // candle views an empty tensor's (dangling, byte-aligned) buffer as `&[f32]`
        // etc., an unaligned slice; no model weight is empty anyway.
        if elems == 0 {
            return Err(gguf_err(format!(
                "tensor `{name}` has no elements (shape {dims:?})"
            )));
        }
        let dt = info.ggml_dtype;
        let bytes = (elems / dt.block_size())
            .checked_mul(dt.type_size())
            .and_then(|b| u64::try_from(b).ok());
        let end = bytes
            .and_then(|b| {
                ct.tensor_data_offset
                    .checked_add(info.offset)?
                    .checked_add(b)
            })
            .filter(|&end| end <= file_len);
        if end.is_none() {
            return Err(gguf_err(format!(
                "tensor `{name}` ({dt:?}, shape {dims:?}) at offset {} does not fit in the \
                 {file_len}-byte file",
                info.offset
            )));
        }
    }
    Ok(())
}

/// Walk the header and metadata (as candle will) and say whether `general.alignment`
/// is an integer 0, as candle reads it: keys lose their trailing NUL bytes, and the last
/// of duplicate keys wins. Reading stops at the end of the file, so hostile counts and
/// lengths cost at most one pass over the file.
fn zero_alignment(r: &mut impl Read) -> std::io::Result<bool> {
    let magic = u32_le(r)?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Ok(false);
    }
    let v1 = match u32_le(r)? {
        1 => true,
        2 | 3 => false,
        _ => return Ok(false),
    };
    let len = |r: &mut dyn Read| -> std::io::Result<u64> {
        if v1 {
            u32_le(r).map(u64::from)
        } else {
            u64_le(r)
        }
    };
    let _tensors = len(r)?;
    let kvs = len(r)?;
    let mut zero = false;
    for _ in 0..kvs {
        let key_len = len(r)?;
        let mut key = Vec::new();
        r.by_ref().take(key_len).read_to_end(&mut key)?;
        if (key.len() as u64) < key_len {
            return Ok(false);
        }
        while key.last() == Some(&0) {
            key.pop();
        }
        let ty = u32_le(r)?;
        if key == b"general.alignment" {
            // candle honours U8, I8, U16, I16, U32, I32 (types 0..=5); others are ignored.
            let size = match ty {
                0 | 1 => 1,
                2 | 3 => 2,
                4 | 5 => 4,
                _ => 0,
            };
            if size > 0 {
                let mut b = [0u8; 4];
                r.read_exact(&mut b[..size])?;
                zero = b == [0; 4];
                continue;
            }
            zero = false;
        }
        skip_value(r, ty, v1, 0)?;
    }
    Ok(zero)
}

/// Skip one metadata value of type `ty` (arrays recursively, to candle's depth limit).
fn skip_value(r: &mut dyn Read, ty: u32, v1: bool, depth: usize) -> std::io::Result<()> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad gguf value");
    let len = |r: &mut dyn Read| -> std::io::Result<u64> {
        if v1 {
            u32_le(r).map(u64::from)
        } else {
            u64_le(r)
        }
    };
    let skip = |r: &mut dyn Read, n: u64| -> std::io::Result<()> {
        if std::io::copy(&mut r.take(n), &mut std::io::sink())? == n {
            Ok(())
        } else {
            Err(bad())
        }
    };
    match ty {
        0 | 1 | 7 => skip(r, 1),
        2 | 3 => skip(r, 2),
        4..=6 => skip(r, 4),
        10..=12 => skip(r, 8),
        8 => {
            let n = len(r)?;
            skip(r, n)
        }
        9 if depth < 64 => {
            let elem = u32_le(r)?;
            let n = len(r)?;
            for _ in 0..n {
                skip_value(r, elem, v1, depth + 1)?;
            }
            Ok(())
        }
        _ => Err(bad()),
    }
}

fn u32_le(r: &mut (impl Read + ?Sized)) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn u64_le(r: &mut (impl Read + ?Sized)) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}
