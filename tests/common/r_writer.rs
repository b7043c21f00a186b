//! Test-side writer of R's XDR serialization format and of lazy-load databases
//! (`.rdx` index + `.rdb` blobs). Use with `#[path = "common/r_writer.rs"] mod r_writer;`.
#![allow(dead_code)]

use std::io::Write;

use flate2::write::{GzEncoder, ZlibEncoder};
pub const ASCII: u32 = 64;
pub const UTF8: u32 = 8;
pub const LATIN1: u32 = 4;
pub const HAS_ATTR: u32 = 1 << 9;
pub const HAS_TAG: u32 = 1 << 10;

/// A tiny writer of R's XDR serialization format.
pub struct Ser(pub Vec<u8>);

impl Ser {
    pub fn v3() -> Self {
        let mut s = Ser(b"X\n".to_vec());
        s.int(3).int(0x040201).int(0x030500).int(5);
        s.0.extend_from_slice(b"UTF-8");
        s
    }
    pub fn v2() -> Self {
        let mut s = Ser(b"X\n".to_vec());
        s.int(2).int(0x040201).int(0x020300);
        s
    }
    pub fn int(&mut self, i: i32) -> &mut Self {
        self.0.extend_from_slice(&i.to_be_bytes());
        self
    }
    pub fn flags(&mut self, f: u32) -> &mut Self {
        self.int(f as i32)
    }
    pub fn charsxp(&mut self, s: Option<&[u8]>, levels: u32) -> &mut Self {
        self.flags(9 | (levels << 12));
        match s {
            None => self.int(-1),
            Some(b) => {
                self.int(b.len() as i32);
                self.0.extend_from_slice(b);
                self
            }
        }
    }
    pub fn strsxp(&mut self, items: &[Option<&str>], extra_flags: u32) -> &mut Self {
        self.flags(16 | extra_flags).int(items.len() as i32);
        for it in items {
            self.charsxp(it.map(str::as_bytes), ASCII);
        }
        self
    }
    pub fn sym(&mut self, name: &str) -> &mut Self {
        self.flags(1).charsxp(Some(name.as_bytes()), ASCII)
    }
    pub fn reference(&mut self, i: u32) -> &mut Self {
        self.flags((i << 8) | 255)
    }
    pub fn nil(&mut self) -> &mut Self {
        self.flags(254)
    }
    pub fn ints(&mut self, v: &[i32], extra_flags: u32) -> &mut Self {
        self.flags(13 | extra_flags).int(v.len() as i32);
        for &x in v {
            self.int(x);
        }
        self
    }
    pub fn reals(&mut self, v: &[f64]) -> &mut Self {
        self.flags(14).int(v.len() as i32);
        for x in v {
            self.0.extend_from_slice(&x.to_be_bytes());
        }
        self
    }
    /// Start a pairlist node with a tag given as a fresh symbol.
    pub fn node_sym(&mut self, tag: &str) -> &mut Self {
        self.flags(2 | HAS_TAG).sym(tag)
    }
    pub fn bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

pub fn zlib(b: &[u8]) -> Vec<u8> {
    let mut e = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

pub fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// A serialized `list(variables = list(...), references = list(), compressed = <c>)`.
pub fn index_bytes(
    vars: &[(&str, u64, u64)],
    real_offsets: bool,
    compressed: Option<i32>,
) -> Vec<u8> {
    let mut s = Ser::v3();
    s.flags(19 | HAS_ATTR).int(3);
    s.flags(19 | HAS_ATTR).int(vars.len() as i32);
    for (_, off, len) in vars {
        if real_offsets {
            s.reals(&[*off as f64, *len as f64]);
        } else {
            s.ints(&[*off as i32, *len as i32], 0);
        }
    }
    let names: Vec<Option<&str>> = vars.iter().map(|(n, _, _)| Some(*n)).collect();
    s.node_sym("names").strsxp(&names, 0).nil();
    s.flags(19).int(0); // references = list()
    match compressed {
        None => s.flags(10).int(1).int(1),
        Some(c) => s.ints(&[c], 0),
    };
    s.flags(2 | HAS_TAG)
        .reference(1)
        .strsxp(
            &[Some("variables"), Some("references"), Some("compressed")],
            0,
        )
        .nil();
    gzip(&s.bytes())
}

pub fn strsxp_stream(items: &[Option<&str>]) -> Vec<u8> {
    let mut s = Ser::v3();
    s.strsxp(items, 0);
    s.bytes()
}

pub fn type1_blob(raw: &[u8]) -> Vec<u8> {
    let mut b = (raw.len() as u32).to_be_bytes().to_vec();
    b.extend(zlib(raw));
    b
}

/// An .rdx/.rdb pair with type-1 (zlib) blobs.
pub fn db_pair(vars: &[(&str, Vec<u8>)], real_offsets: bool) -> (Vec<u8>, Vec<u8>) {
    let mut rdb = Vec::new();
    let mut pos = Vec::new();
    for (name, raw) in vars {
        let blob = type1_blob(raw);
        pos.push((*name, rdb.len() as u64, blob.len() as u64));
        rdb.extend(blob);
    }
    (index_bytes(&pos, real_offsets, None), rdb)
}
