//! Test-side writer of PyTorch `torch.save` files, byte by byte: the zip form
//! (torch >= 1.6) and the legacy form. The pickle is what torch emits with protocol 2:
//! `collections.OrderedDict` via GLOBAL + EMPTY_TUPLE + REDUCE, BINUNICODE keys,
//! `torch._utils._rebuild_tensor_v2` calls on BINPERSID storages, BINPUT/BINGET
//! memoization of repeated globals and strings, SETITEMS, and the `_metadata` BUILD.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

/// Stored element type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dt {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
}

impl Dt {
    fn storage(&self) -> &'static str {
        match self {
            Dt::F32 => "FloatStorage",
            Dt::F16 => "HalfStorage",
            Dt::BF16 => "BFloat16Storage",
            Dt::F64 => "DoubleStorage",
            Dt::I64 => "LongStorage",
            Dt::I32 => "IntStorage",
        }
    }
    pub fn size(&self) -> usize {
        match self {
            Dt::F64 | Dt::I64 => 8,
            Dt::F32 | Dt::I32 => 4,
            Dt::F16 | Dt::BF16 => 2,
        }
    }
}

/// One tensor entry: a view into storage `storage`.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub storage: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
    pub offset: usize,
}

#[derive(Debug, Clone)]
pub enum Entry {
    Tensor(TensorEntry),
    Int(String, i64),
    Float(String, f64),
}

/// A state dict to be written.
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    pub entries: Vec<Entry>,
    /// (dtype, little-endian bytes, declared element count).
    pub storages: Vec<(Dt, Vec<u8>, usize)>,
    /// Write the data big-endian (and `byteorder` = `big`).
    pub big_endian: bool,
    /// Deflate the storage entries of the zip form.
    pub deflate: bool,
}

fn contiguous_stride(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

pub fn encode(dt: Dt, data: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * dt.size());
    for &v in data {
        match dt {
            Dt::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            Dt::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
            Dt::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            Dt::F64 => out.extend_from_slice(&v.to_le_bytes()),
            Dt::I64 => out.extend_from_slice(&(v as i64).to_le_bytes()),
            Dt::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
        }
    }
    out
}

impl StateDict {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a storage of raw little-endian bytes; returns its index (its key is the index).
    pub fn storage(&mut self, dt: Dt, bytes: Vec<u8>) -> usize {
        let n = bytes.len() / dt.size();
        self.storages.push((dt, bytes, n));
        self.storages.len() - 1
    }

    /// Add a contiguous tensor with its own storage.
    pub fn tensor(&mut self, name: &str, dt: Dt, shape: &[usize], data: &[f64]) -> &mut Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
        let s = self.storage(dt, encode(dt, data));
        self.view(name, s, shape, &contiguous_stride(shape), 0)
    }

    /// f32 shorthand.
    pub fn f32(&mut self, name: &str, shape: &[usize], data: &[f64]) -> &mut Self {
        self.tensor(name, Dt::F32, shape, data)
    }

    /// A tensor that is a view into an existing storage.
    pub fn view(
        &mut self,
        name: &str,
        storage: usize,
        shape: &[usize],
        stride: &[usize],
        offset: usize,
    ) -> &mut Self {
        self.entries.push(Entry::Tensor(TensorEntry {
            name: name.to_string(),
            storage,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
            offset,
        }));
        self
    }

    pub fn int(&mut self, name: &str, v: i64) -> &mut Self {
        self.entries.push(Entry::Int(name.to_string(), v));
        self
    }

    fn key(&self, i: usize, legacy: bool) -> String {
        if legacy {
            // Legacy keys are str(id(storage)): long decimal numbers.
            format!("{}", 94_000_000_000_000u64 + i as u64 * 64)
        } else {
            i.to_string()
        }
    }

    /// The main pickle, protocol 2, as torch.save writes it.
    pub fn pickle(&self, legacy: bool) -> Vec<u8> {
        let mut p = Pickler::default();
        p.out.extend_from_slice(&[0x80, 2]);
        p.global("collections", "OrderedDict");
        p.out.push(b')');
        p.out.push(b'R');
        p.put();
        if !self.entries.is_empty() {
            p.out.push(b'(');
            for e in &self.entries {
                match e {
                    Entry::Int(n, v) => {
                        p.unicode_fresh(n);
                        p.int(*v);
                    }
                    Entry::Float(n, v) => {
                        p.unicode_fresh(n);
                        p.out.push(b'G');
                        p.out.extend_from_slice(&v.to_be_bytes());
                    }
                    Entry::Tensor(t) => {
                        p.unicode_fresh(&t.name);
                        p.global("torch._utils", "_rebuild_tensor_v2");
                        p.out.push(b'(');
                        // persistent id tuple
                        p.out.push(b'(');
                        p.unicode_memo("storage");
                        let (dt, _, numel) = &self.storages[t.storage];
                        p.global("torch", dt.storage());
                        p.unicode_fresh(&self.key(t.storage, legacy));
                        p.unicode_memo("cpu");
                        p.int(*numel as i64);
                        if legacy {
                            p.out.push(b'N');
                        }
                        p.out.push(b't');
                        p.put();
                        p.out.push(b'Q');
                        p.int(t.offset as i64);
                        p.int_tuple(&t.shape);
                        p.int_tuple(&t.stride);
                        p.out.push(0x89); // requires_grad False
                        p.global("collections", "OrderedDict");
                        p.out.push(b')');
                        p.out.push(b'R');
                        p.put();
                        p.out.push(b't');
                        p.put();
                        p.out.push(b'R');
                        p.put();
                    }
                }
            }
            p.out.push(b'u');
        }
        // state: {'_metadata': OrderedDict([('', {'version': 1})])}, then BUILD.
        p.out.push(b'}');
        p.put();
        p.unicode_fresh("_metadata");
        p.global("collections", "OrderedDict");
        p.out.push(b')');
        p.out.push(b'R');
        p.put();
        p.unicode_fresh("");
        p.out.push(b'}');
        p.put();
        p.unicode_fresh("version");
        p.int(1);
        p.out.push(b's');
        p.out.push(b's');
        p.out.push(b's');
        p.out.push(b'b');
        p.out.push(b'.');
        p.out
    }

    fn data_bytes(&self, i: usize) -> Vec<u8> {
        let (dt, bytes, _) = &self.storages[i];
        let mut b = bytes.clone();
        if self.big_endian {
            for c in b.chunks_exact_mut(dt.size()) {
                c.reverse();
            }
        }
        b
    }

    /// The zip form, as bytes (entries stored uncompressed unless `deflate`).
    pub fn zip_bytes(&self) -> Vec<u8> {
        zip_with(
            &self.pickle(false),
            |z, stored, deflated| {
                let opts = if self.deflate { deflated } else { stored };
                for i in 0..self.storages.len() {
                    z.start_file(format!("archive/data/{i}"), opts).unwrap();
                    z.write_all(&self.data_bytes(i)).unwrap();
                }
            },
            if self.big_endian { "big" } else { "little" },
        )
    }

    /// The legacy (non-zip) form, as bytes.
    pub fn legacy_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // magic number 0x1950a86a20f9469cfc6c as LONG1
        out.extend_from_slice(&[0x80, 2, 0x8a, 10]);
        out.extend_from_slice(&0x1950a86a20f9469cfc6cu128.to_le_bytes()[..10]);
        out.push(b'.');
        // protocol version 1001
        out.extend_from_slice(&[0x80, 2, b'M', 0xe9, 0x03, b'.']);
        // sys_info
        let mut p = Pickler::default();
        p.out.extend_from_slice(&[0x80, 2, b'}']);
        p.put();
        p.out.push(b'(');
        p.unicode_fresh("protocol_version");
        p.int(1001);
        p.unicode_fresh("little_endian");
        p.out.push(if self.big_endian { 0x89 } else { 0x88 });
        p.unicode_fresh("type_sizes");
        p.out.push(b'}');
        p.put();
        p.out.push(b'(');
        for (k, v) in [("short", 2), ("int", 4), ("long", 4)] {
            p.unicode_fresh(k);
            p.int(v);
        }
        p.out.push(b'u');
        p.out.push(b'u');
        p.out.push(b'.');
        out.extend_from_slice(&p.out);
        out.extend_from_slice(&self.pickle(true));
        // sorted storage keys
        let mut keys: Vec<(String, usize)> = (0..self.storages.len())
            .map(|i| (self.key(i, true), i))
            .collect();
        keys.sort();
        let mut p = Pickler::default();
        p.out.extend_from_slice(&[0x80, 2, b']']);
        p.put();
        if !keys.is_empty() {
            p.out.push(b'(');
            for (k, _) in &keys {
                p.unicode_fresh(k);
            }
            p.out.push(b'e');
        }
        p.out.push(b'.');
        out.extend_from_slice(&p.out);
        for (_, i) in keys {
            let (_, _, numel) = &self.storages[i];
            let n = *numel as u64;
            out.extend_from_slice(&if self.big_endian {
                n.to_be_bytes()
            } else {
                n.to_le_bytes()
            });
            out.extend_from_slice(&self.data_bytes(i));
        }
        out
    }

    pub fn write_zip(&self, path: &Path) {
        std::fs::write(path, self.zip_bytes()).unwrap();
    }

    pub fn write_legacy(&self, path: &Path) {
        std::fs::write(path, self.legacy_bytes()).unwrap();
    }
}

/// A zip archive `archive/…` with the given `data.pkl`; `data` adds the storage entries.
pub fn zip_with(
    pkl: &[u8],
    data: impl FnOnce(
        &mut zip::ZipWriter<Cursor<Vec<u8>>>,
        zip::write::SimpleFileOptions,
        zip::write::SimpleFileOptions,
    ),
    byteorder: &str,
) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let deflated = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    z.start_file("archive/data.pkl", stored).unwrap();
    z.write_all(pkl).unwrap();
    z.start_file("archive/byteorder", stored).unwrap();
    z.write_all(byteorder.as_bytes()).unwrap();
    data(&mut z, stored, deflated);
    z.start_file("archive/version", stored).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap().into_inner()
}

/// A zip-form file whose `data.pkl` is exactly `pkl` (for hostile pickles).
pub fn zip_raw_pickle(pkl: &[u8]) -> Vec<u8> {
    zip_with(pkl, |_, _, _| {}, "little")
}

#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
    next: u32,
    memo: HashMap<String, u32>,
}

impl Pickler {
    fn put(&mut self) -> u32 {
        let i = self.next;
        if i < 256 {
            self.out.extend_from_slice(&[b'q', i as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&i.to_le_bytes());
        }
        self.next += 1;
        i
    }
    fn get(&mut self, i: u32) {
        if i < 256 {
            self.out.extend_from_slice(&[b'h', i as u8]);
        } else {
            self.out.push(b'j');
            self.out.extend_from_slice(&i.to_le_bytes());
        }
    }
    fn global(&mut self, module: &str, name: &str) {
        let key = format!("g:{module}.{name}");
        if let Some(&i) = self.memo.get(&key) {
            self.get(i);
            return;
        }
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
        let i = self.put();
        self.memo.insert(key, i);
    }
    /// A string pickled once and then fetched from the memo (same object each time).
    fn unicode_memo(&mut self, s: &str) {
        let key = format!("s:{s}");
        if let Some(&i) = self.memo.get(&key) {
            self.get(i);
            return;
        }
        self.unicode_raw(s);
        let i = self.put();
        self.memo.insert(key, i);
    }
    fn unicode_fresh(&mut self, s: &str) {
        self.unicode_raw(s);
        self.put();
    }
    fn unicode_raw(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            self.out.extend_from_slice(&[0x8a, 8]);
            self.out.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn int_tuple(&mut self, v: &[usize]) {
        match v.len() {
            0 => self.out.push(b')'),
            1..=3 => {
                for &x in v {
                    self.int(x as i64);
                }
                self.out.push(0x84 + v.len() as u8);
            }
            _ => {
                self.out.push(b'(');
                for &x in v {
                    self.int(x as i64);
                }
                self.out.push(b't');
            }
        }
        if !v.is_empty() {
            self.put();
        }
    }
}

/// A fresh, unique temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "sae-ablate-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
