//! Test helpers that write releases in each library's exact on-disk layout:
//! safetensors files (through the `safetensors` crate), byte-built `.npy` arrays,
//! `.npz` archives (through the `zip` crate) and JSON configs. Use with
//! `#[path = "common/st_writer.rs"] mod st_writer;`.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::tensor::{Dtype, TensorView};

/// A temporary directory, removed on drop.
pub struct TempDir(PathBuf);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TempDir {
    /// A fresh, empty directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p =
            std::env::temp_dir().join(format!("sae-ablate-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `self/rel`, with its parent directories created.
    pub fn sub(&self, rel: &str) -> PathBuf {
        let p = self.0.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tensor to write: name, shape, f32 values (row-major).
pub type T<'a> = (&'a str, Vec<usize>, Vec<f32>);

/// Write `tensors` to a safetensors file at `path` as F32.
pub fn write_st(path: &Path, tensors: &[T]) {
    write_st_dtype(path, tensors, Dtype::F32)
}

/// Write `tensors` to a safetensors file at `path` as BF16.
pub fn write_st_bf16(path: &Path, tensors: &[T]) {
    write_st_dtype(path, tensors, Dtype::BF16)
}

fn write_st_dtype(path: &Path, tensors: &[T], dtype: Dtype) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, shape, v)| {
            assert_eq!(shape.iter().product::<usize>(), v.len(), "test data shape");
            match dtype {
                Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::BF16 => v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
                _ => unreachable!(),
            }
        })
        .collect();
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, shape, _), b)| (*n, TensorView::new(dtype, shape.clone(), b).unwrap()))
        .collect();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Write a JSON value to `path`.
pub fn write_json(path: &Path, v: &serde_json::Value) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// The preamble and header of a version 1.0 `.npy` file: magic, version, header
/// length, the dict literal, space padding to a multiple of 64 bytes, and `\n`.
pub fn npy_header(descr: &str, fortran: bool, shape: &str) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
        if fortran { "True" } else { "False" }
    );
    let unpadded = 10 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let hlen = (dict.len() + pad + 1) as u16;
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&hlen.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    out
}

/// The Python tuple literal for a shape: `()`, `(3,)`, `(2, 3)`.
pub fn shape_str(shape: &[usize]) -> String {
    match shape {
        [] => "()".into(),
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A complete `<f4` C-order `.npy` file.
pub fn npy_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let mut out = npy_header("<f4", false, &shape_str(shape));
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Write a `.npz` archive of `(member name, bytes)`; `deflate` as
/// `np.savez_compressed`, else stored as `np.savez`.
pub fn write_npz(path: &Path, members: &[(&str, Vec<u8>)], deflate: bool) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, npz_bytes(members, deflate)).unwrap();
}

/// The bytes of a `.npz` archive (see [`write_npz`]).
pub fn npz_bytes(members: &[(&str, Vec<u8>)], deflate: bool) -> Vec<u8> {
    let mut zw = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in members {
        zw.start_file(*name, opts).unwrap();
        zw.write_all(bytes).unwrap();
    }
    zw.finish().unwrap().into_inner()
}

/// `(a - b).abs() <= 1e-5` for every element, with a readable failure.
pub fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5,
            "element {i}: got {g}, want {w} (got {got:?}, want {want:?})"
        );
    }
}
