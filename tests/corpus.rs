//! R serialization, lazy-load databases and the Austen corpus, against
//! byte streams built here by a tiny test-side serializer.

use checks::err_naming;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sae_ablate::corpus::austen::{book_text, extract_austen};
use sae_ablate::corpus::rdata::{
    decompress_blob, read_rds_bytes, unserialize, Compression, Encoding, LazyLoadDb, RObject,
    RString, RValue,
};

#[path = "common/checks.rs"]
mod checks;
#[path = "common/r_writer.rs"]
mod r_writer;
use r_writer::*;

fn strs(o: &RObject) -> Vec<Option<String>> {
    o.as_character()
        .expect("a character vector")
        .iter()
        .map(|s| s.as_ref().map(|s| s.to_utf8("UTF-8").unwrap()))
        .collect()
}

fn err_text<T: std::fmt::Debug>(r: sae_ablate::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "sae-ablate-corpus-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ------------------------------------------------------------ (a) serialization

#[test]
fn character_vector_with_na_and_encodings() {
    let mut s = Ser::v3();
    s.flags(16).int(5);
    s.charsxp(Some(b"plain"), ASCII)
        .charsxp(None, 0)
        .charsxp(Some("caf\u{e9}".as_bytes()), UTF8)
        .charsxp(Some(b"caf\xe9"), LATIN1)
        .charsxp(Some(b""), 0);
    let u = unserialize(&s.bytes()).unwrap();
    assert_eq!(u.version, 3);
    assert_eq!(u.native_encoding, "UTF-8");
    let v = u.object.as_character().unwrap();
    assert_eq!(v.len(), 5);
    assert_eq!(v[0].as_ref().unwrap().encoding, Encoding::Ascii);
    assert!(v[1].is_none());
    assert_eq!(v[2].as_ref().unwrap().encoding, Encoding::Utf8);
    assert_eq!(v[3].as_ref().unwrap().encoding, Encoding::Latin1);
    assert_eq!(v[3].as_ref().unwrap().bytes, b"caf\xe9");
    assert_eq!(v[4].as_ref().unwrap().encoding, Encoding::Native);
    assert_eq!(
        strs(&u.object),
        vec![
            Some("plain".to_string()),
            None,
            Some("caf\u{e9}".to_string()),
            Some("caf\u{e9}".to_string()),
            Some(String::new()),
        ]
    );
    // Invalid UTF-8 declared as UTF-8 is an error, not mojibake.
    let bad = RString {
        bytes: vec![0xff, 0xfe],
        encoding: Encoding::Utf8,
    };
    err_naming(
        bad.to_utf8("UTF-8"),
        &["R serialization", "not valid UTF-8", "UTF-8"],
    );
    // An unflagged string under a Latin-1 writer is converted.
    let native = RString {
        bytes: vec![b'n', 0xe9],
        encoding: Encoding::Native,
    };
    assert_eq!(native.to_utf8("latin1").unwrap(), "n\u{e9}");
}

#[test]
fn named_list_with_attributes_and_symbol_references() {
    // list(a = c(1L, NA), b = structure(c(0.5, -2), names = c("p", "q")), c = TRUE)
    let mut s = Ser::v3();
    s.flags(19 | HAS_ATTR).int(3);
    s.ints(&[1, i32::MIN], 0);
    s.flags(14 | HAS_ATTR).int(2);
    s.0.extend_from_slice(&0.5f64.to_be_bytes());
    s.0.extend_from_slice(&(-2f64).to_be_bytes());
    // attributes of b: names = c("p", "q"); "names" becomes reference 1
    s.node_sym("names").strsxp(&[Some("p"), Some("q")], 0).nil();
    s.flags(10).int(1).int(1); // TRUE
                               // attributes of the list: names (by reference), then class = "foo"
    s.flags(2 | HAS_TAG)
        .reference(1)
        .strsxp(&[Some("a"), Some("b"), Some("c")], 0);
    s.node_sym("class").strsxp(&[Some("foo")], 0).nil();
    let u = unserialize(&s.bytes()).unwrap();
    let o = &u.object;
    assert_eq!(o.type_name(), "list");
    assert_eq!(strs(o.attr("class").unwrap()), vec![Some("foo".into())]);
    let a = o.get("a", "UTF-8").unwrap();
    assert_eq!(a.value, RValue::Integer(vec![Some(1), None]));
    let b = o.get("b", "UTF-8").unwrap();
    assert_eq!(b.value, RValue::Real(vec![0.5, -2.0]));
    assert_eq!(
        strs(b.attr("names").unwrap()),
        vec![Some("p".into()), Some("q".into())]
    );
    assert_eq!(
        o.get("c", "UTF-8").unwrap().value,
        RValue::Logical(vec![Some(true)])
    );
    assert!(o.get("d", "UTF-8").is_none());
}

#[test]
fn pairlist_v2_and_long_reference_form() {
    // pairlist(x = NULL, y = <symbol x by long reference>, 7L) in format version 2.
    let mut s = Ser::v2();
    s.node_sym("x").nil();
    s.node_sym("y").flags(255).int(1); // REFSXP with index 0 in flags: index follows
    s.flags(2).ints(&[7], 0);
    s.nil();
    let u = unserialize(&s.bytes()).unwrap();
    assert_eq!(u.version, 2);
    let RValue::Pairlist(nodes) = &u.object.value else {
        panic!("expected a pairlist, got {:?}", u.object)
    };
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes[0].0.as_deref(), Some("x"));
    assert_eq!(nodes[0].1.value, RValue::Null);
    assert_eq!(nodes[1].0.as_deref(), Some("y"));
    assert_eq!(nodes[1].1.value, RValue::Symbol(Arc::from("x")));
    assert_eq!(nodes[2].0, None);
    assert_eq!(nodes[2].1.value, RValue::Integer(vec![Some(7)]));
}

// ------------------------------------------------- (b) lazy-load database

#[test]
fn lazy_load_db_extracts_character_vectors() {
    for real_offsets in [false, true] {
        let (rdx, rdb) = db_pair(
            &[
                ("x", strsxp_stream(&[Some("one"), None, Some("three")])),
                ("y", strsxp_stream(&[])),
            ],
            real_offsets,
        );
        let db = LazyLoadDb::from_bytes(&rdx, rdb).unwrap();
        assert_eq!(db.names().collect::<Vec<_>>(), vec!["x", "y"]);
        assert_eq!(db.compression(), Compression::Zlib);
        let x = db.get("x").unwrap();
        assert_eq!(
            strs(&x.object),
            vec![Some("one".into()), None, Some("three".into())]
        );
        assert_eq!(
            strs(&db.get("y").unwrap().object),
            Vec::<Option<String>>::new()
        );
        let e = err_text(db.get("z"));
        assert!(e.contains("no variable `z`"), "{e}");
        // The book text: lines joined by "\n", NA as an empty line, a final "\n".
        assert_eq!(book_text(&db, "x").unwrap(), b"one\n\nthree\n");
        assert_eq!(book_text(&db, "y").unwrap(), b"");
    }
}

#[test]
fn lazy_load_db_from_files_and_book_text_of_non_character() {
    let mut ints = Ser::v3();
    ints.ints(&[1, 2], 0);
    let (rdx, rdb) = db_pair(
        &[
            ("lines", strsxp_stream(&[Some("a"), Some("b")])),
            ("n", ints.bytes()),
        ],
        false,
    );
    let t = TempDir::new("files");
    std::fs::write(t.0.join("Rdata.rdx"), &rdx).unwrap();
    std::fs::write(t.0.join("Rdata.rdb"), &rdb).unwrap();
    let db = LazyLoadDb::open(&t.0.join("Rdata.rdx")).unwrap();
    assert_eq!(book_text(&db, "lines").unwrap(), b"a\nb\n");
    assert_eq!(
        db.get("n").unwrap().object.value,
        RValue::Integer(vec![Some(1), Some(2)])
    );
    let e = err_text(book_text(&db, "n"));
    assert!(e.contains("expected a character vector"), "{e}");
}

#[test]
fn typed_blob_compression() {
    let raw = strsxp_stream(&[Some("hi")]);
    let len = (raw.len() as u32).to_be_bytes();
    let blob = |ty: u8, data: &[u8]| {
        let mut b = len.to_vec();
        b.push(ty);
        b.extend_from_slice(data);
        b
    };
    let stored = blob(b'0', &raw);
    let zl = blob(b'1', &zlib(&raw));
    assert_eq!(
        decompress_blob(&stored, Compression::Typed(3)).unwrap(),
        raw
    );
    assert_eq!(decompress_blob(&zl, Compression::Typed(2)).unwrap(), raw);
    for (ty, word) in [(b'2', "bzip2"), (b'Z', "xz")] {
        let e = err_text(decompress_blob(
            &blob(ty, b"whatever"),
            Compression::Typed(3),
        ));
        assert!(
            e.contains("unsupported compression") && e.contains(word),
            "{e}"
        );
    }
    let e = err_text(decompress_blob(&blob(b'?', b""), Compression::Typed(3)));
    assert!(e.contains("0x3f"), "{e}");
    assert_eq!(decompress_blob(&raw, Compression::None).unwrap(), raw);

    // A whole database with compressed = 3 and a stored blob.
    let idx = index_bytes(&[("v", 0, stored.len() as u64)], false, Some(3));
    let db = LazyLoadDb::from_bytes(&idx, stored).unwrap();
    assert_eq!(db.compression(), Compression::Typed(3));
    assert_eq!(strs(&db.get("v").unwrap().object), vec![Some("hi".into())]);

    // compressed = 0 (FALSE): blobs are bare serialization streams.
    let idx = index_bytes(&[("w", 0, raw.len() as u64)], false, Some(0));
    let db = LazyLoadDb::from_bytes(&idx, raw.clone()).unwrap();
    assert_eq!(db.compression(), Compression::None);
    assert_eq!(strs(&db.get("w").unwrap().object), vec![Some("hi".into())]);
    // compressed = 7 is not a known scheme.
    let idx = index_bytes(&[("w", 0, raw.len() as u64)], false, Some(7));
    let e = err_text(LazyLoadDb::from_bytes(&idx, raw));
    assert!(e.contains("compressed"), "{e}");
}

#[test]
fn rds_compressions() {
    let raw = strsxp_stream(&[Some("r")]);
    assert_eq!(
        strs(&read_rds_bytes(&raw).unwrap().object),
        vec![Some("r".into())]
    );
    assert_eq!(
        strs(&read_rds_bytes(&gzip(&raw)).unwrap().object),
        vec![Some("r".into())]
    );
    let e = err_text(read_rds_bytes(b"BZh91AY&SY..."));
    assert!(e.contains("bzip2"), "{e}");
    let e = err_text(read_rds_bytes(b"\xfd7zXZ\x00...."));
    assert!(e.contains("xz"), "{e}");
    let e = err_text(read_rds_bytes(b"A\n1\n"));
    assert!(e.contains("ASCII"), "{e}");
}

#[test]
fn extract_austen_rejects_wrong_text_and_writes_nothing() {
    // A package with the six variables but a one-line text each: the sums cannot match.
    let books = [
        "emma",
        "mansfieldpark",
        "northangerabbey",
        "persuasion",
        "prideprejudice",
        "sensesensibility",
    ];
    let vars: Vec<(&str, Vec<u8>)> = books
        .iter()
        .map(|b| (*b, strsxp_stream(&[Some("not the book")])))
        .collect();
    let (rdx, rdb) = db_pair(&vars, false);
    let t = TempDir::new("fake-pkg");
    let data = t.0.join("usr/lib/R/site-library/janeaustenr/data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("Rdata.rdx"), rdx).unwrap();
    std::fs::write(data.join("Rdata.rdb"), rdb).unwrap();
    let out = t.0.join("out");
    let e = err_text(extract_austen(&t.0, &out));
    assert!(e.contains("emma") && e.contains("sha256"), "{e}");
    assert!(!out.join("emma.txt").exists());

    let e = err_text(extract_austen(&t.0.join("nope"), &out));
    assert!(e.contains("no such file"), "{e}");
    let deb = t.0.join("x.deb");
    std::fs::write(&deb, b"!<arch>\ndebian-binary   ").unwrap();
    let e = err_text(extract_austen(&deb, &out));
    assert!(e.contains("dpkg-deb -x"), "{e}");
}

// ------------------------------------------------------- (c) hostile input

fn sample_stream() -> Vec<u8> {
    let mut s = Ser::v3();
    s.flags(19 | HAS_ATTR).int(2);
    s.strsxp(&[Some("alpha"), None, Some("beta")], 0);
    s.reals(&[1.5]);
    s.node_sym("names").strsxp(&[Some("s"), Some("r")], 0).nil();
    s.bytes()
}

#[test]
fn every_truncation_is_an_error() {
    let full = sample_stream();
    assert!(unserialize(&full).is_ok());
    for n in 0..full.len() {
        let e = err_naming(unserialize(&full[..n]), &["R serialization"]);
        assert!(
            e.contains("at byte") || e.contains("header"),
            "prefix of {n} bytes: {e}"
        );
    }
    let mut longer = full.clone();
    longer.push(0);
    let e = err_text(unserialize(&longer));
    assert!(e.contains("trailing"), "{e}");
}

#[test]
fn byte_flips_never_panic() {
    let full = sample_stream();
    for i in 0..full.len() {
        for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
            let mut b = full.clone();
            b[i] = v;
            // Parsed, or an error naming the format.
            if let Err(e) = unserialize(&b) {
                assert!(
                    e.to_string().contains("R serialization"),
                    "byte {i} = {v}: {e}"
                );
            }
        }
    }
    let (rdx, rdb) = db_pair(&[("x", sample_stream())], false);
    let mut unreadable = 0;
    for i in 0..rdb.len() {
        let mut b = rdb.clone();
        b[i] ^= 0x5a;
        // The index is intact: only reading the variable can fail, naming it.
        let db = LazyLoadDb::from_bytes(&rdx, b).unwrap();
        if let Err(e) = db.get("x") {
            let e = e.to_string();
            assert!(
                e.contains("R lazy-load database") && e.contains("variable `x`"),
                "{e}"
            );
            unreadable += 1;
        }
    }
    assert!(
        unreadable > 0,
        "some flipped byte of the compressed blob must be caught"
    );
}

#[test]
fn random_mutations_never_panic() {
    // Deterministic xorshift: several bytes changed at once, in the stream and in an index.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let stream = sample_stream();
    let index = {
        let mut s = Ser::v3();
        s.flags(19 | HAS_ATTR).int(1).ints(&[0, 9], 0);
        s.node_sym("names").strsxp(&[Some("x")], 0).nil();
        s.bytes()
    };
    let mut parsed = 0;
    for round in 0..4000 {
        let mut b = if round % 2 == 0 {
            stream.clone()
        } else {
            index.clone()
        };
        for _ in 0..1 + next() % 4 {
            let i = (next() % b.len() as u64) as usize;
            b[i] = next() as u8;
        }
        if next() % 8 == 0 {
            b.truncate((next() % b.len() as u64) as usize);
        }
        match unserialize(&b) {
            Ok(_) => parsed += 1,
            Err(e) => assert!(e.to_string().contains("R serialization"), "{e}"),
        }
        // A mutated stream or index: a database, or an error naming the format at fault.
        if let Err(e) = LazyLoadDb::from_bytes(&b, vec![0; 16]) {
            let e = e.to_string();
            assert!(
                e.contains("R serialization") || e.contains("R lazy-load database"),
                "{e}"
            );
        }
    }
    // Most mutations hit string bytes or values and still parse; some must not.
    assert!(parsed > 0 && parsed < 4000, "{parsed}");
}

#[test]
fn huge_lengths_on_tiny_input_are_rejected_before_allocating() {
    for ty in [16, 19, 13, 14, 10] {
        let mut s = Ser::v3();
        s.flags(ty).int(i32::MAX);
        let e = err_text(unserialize(&s.bytes()));
        assert!(e.contains("2147483647"), "type {ty}: {e}");
    }
    // A long-vector length (-1, hi, lo).
    let mut s = Ser::v3();
    s.flags(16).int(-1).int(0x7fff_ffff).int(-1);
    let e = err_text(unserialize(&s.bytes()));
    assert!(e.contains("only"), "{e}");
    // A string length beyond the input.
    let mut s = Ser::v3();
    s.flags(16).int(1).flags(9 | (ASCII << 12)).int(i32::MAX);
    let e = err_text(unserialize(&s.bytes()));
    assert!(e.contains("truncated"), "{e}");
    // A blob declaring 4 GiB from a few bytes of zlib.
    let mut blob = u32::MAX.to_be_bytes().to_vec();
    blob.extend(zlib(b"tiny"));
    let e = err_text(decompress_blob(&blob, Compression::Zlib));
    assert!(e.contains("impossible"), "{e}");
}

#[test]
fn unknown_and_unsupported_types_are_named() {
    for (ty, word) in [
        (99u32, "99"),
        (4, "ENVSXP"),
        (238, "ALTREP"),
        (247, "PERSISTSXP"),
        (3, "CLOSXP"),
    ] {
        let mut s = Ser::v3();
        s.flags(ty).int(0).int(0);
        let e = err_text(unserialize(&s.bytes()));
        assert!(
            e.contains("unsupported SEXP type") && e.contains(word),
            "{ty}: {e}"
        );
    }
    let mut s = Ser::v3();
    s.reference(3);
    let e = err_text(unserialize(&s.bytes()));
    assert!(e.contains("reference 3 out of range"), "{e}");
    let e = err_text(unserialize(
        b"X\n\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00",
    ));
    assert!(e.contains("format version 4"), "{e}");
    let e = err_text(unserialize(b"PK\x03\x04"));
    assert!(e.contains("not an XDR stream"), "{e}");
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let mut s = Ser::v3();
    for _ in 0..100_000 {
        s.flags(19).int(1);
    }
    s.nil();
    let e = err_text(unserialize(&s.bytes()));
    assert!(e.contains("nested deeper"), "{e}");
    // A long pairlist is read iteratively: 100 000 nodes parse fine.
    let mut s = Ser::v3();
    for _ in 0..100_000 {
        s.flags(2).nil();
    }
    s.nil();
    match unserialize(&s.bytes()).unwrap().object.value {
        RValue::Pairlist(n) => assert_eq!(n.len(), 100_000),
        v => panic!("expected a pairlist, got {v:?}"),
    }
}

#[test]
fn bad_zlib_and_bad_index_are_clear_errors() {
    let mut blob = 100u32.to_be_bytes().to_vec();
    blob.extend_from_slice(b"\x78\x9cthis is not deflate data");
    let e = err_text(decompress_blob(&blob, Compression::Zlib));
    assert!(e.contains("zlib"), "{e}");
    // A valid zlib stream shorter than declared.
    let raw = sample_stream();
    let mut blob = ((raw.len() + 10) as u32).to_be_bytes().to_vec();
    blob.extend(zlib(&raw));
    let e = err_text(decompress_blob(&blob, Compression::Zlib));
    assert!(e.contains("declares"), "{e}");
    let e = err_text(decompress_blob(b"\x00\x01", Compression::Zlib));
    assert!(e.contains("too short"), "{e}");
    // A truncated gzip index.
    let (rdx, rdb) = db_pair(&[("x", raw.clone())], false);
    err_naming(
        LazyLoadDb::from_bytes(&rdx[..rdx.len() / 2], rdb.clone()),
        &["gzip stream"],
    );
    // A variable that points past the end of the .rdb.
    let idx = index_bytes(&[("x", 10, rdb.len() as u64)], false, None);
    let e = err_text(LazyLoadDb::from_bytes(&idx, rdb.clone()));
    assert!(e.contains("outside"), "{e}");
    // Negative offsets.
    let idx = index_bytes(&[("x", u32::MAX as u64, 4)], false, None);
    let e = err_text(LazyLoadDb::from_bytes(&idx, rdb));
    assert!(e.contains("c(offset, length)"), "{e}");
}

// ---------------------------------------------------------- (d) real data

/// SHA-256 of the reference extraction, kept here independently of the library's table.
const REAL_SUMS: [(&str, &str, usize); 6] = [
    (
        "emma",
        "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe",
        16235,
    ),
    (
        "mansfieldpark",
        "98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9",
        15349,
    ),
    (
        "northangerabbey",
        "51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed",
        7856,
    ),
    (
        "persuasion",
        "8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a",
        8328,
    ),
    (
        "prideprejudice",
        "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d",
        13030,
    ),
    (
        "sensesensibility",
        "105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09",
        12624,
    ),
];

#[test]
fn real_janeaustenr_package_gives_the_reference_texts() {
    use sha2::{Digest, Sha256};
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/austen/janeaustenr/data");
    assert!(
        data.join("Rdata.rdx").is_file() && data.join("Rdata.rdb").is_file(),
        "{}/Rdata.{{rdx,rdb}} missing: run scripts/fetch-austen.sh to download the \
         r-cran-janeaustenr package",
        data.display()
    );
    let t = TempDir::new("real");
    let written = extract_austen(&data, &t.0).unwrap();
    assert_eq!(written.len(), 6);
    for ((name, sum, lines), path) in REAL_SUMS.iter().zip(&written) {
        assert_eq!(path, &t.0.join(format!("{name}.txt")));
        let bytes = std::fs::read(path).unwrap();
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(&hex, sum, "{name}");
        assert_eq!(
            bytes.iter().filter(|&&b| b == b'\n').count(),
            *lines,
            "{name}"
        );
    }
    let emma = std::fs::read(&written[0]).unwrap();
    assert!(emma.starts_with(b"EMMA\n\nBy Jane Austen\n"));
}
