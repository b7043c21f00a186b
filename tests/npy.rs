//! `.npy` / `.npz` reading and writing, against byte-built files.

#[path = "common/checks.rs"]
mod checks;
use checks::err_naming;
#[path = "common/st_writer.rs"]
mod st_writer;

use candle_core::{DType, Device, Tensor};
use sae_ablate::io::npy::{parse_npy, read_npy, read_npz, write_npy_f32, NpyHeader};
use st_writer::{npy_f32, npy_header, npz_bytes, write_npz, TempDir};

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
}

fn err_of(r: sae_ablate::Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn round_trip_f32_v1_header() {
    let dir = TempDir::new("npy-rt");
    let p = dir.path().join("a.npy");
    let t = Tensor::new(&[[1.5f32, -2.0, 3.25], [0.0, 7.0, -0.125]], &Device::Cpu).unwrap();
    write_npy_f32(&p, &t).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let h = NpyHeader::parse(&bytes).unwrap();
    assert_eq!(h.descr, "<f4");
    assert!(!h.fortran_order);
    assert_eq!(h.shape, vec![2, 3]);
    assert_eq!(h.data_offset % 64, 0, "data aligned to 64 bytes");
    assert_eq!(bytes.len(), h.data_offset + 24);
    let back = read_npy(&p, &Device::Cpu).unwrap();
    assert_eq!(back.dtype(), DType::F32);
    assert_eq!(back.dims(), &[2, 3]);
    assert_eq!(vals(&back), vec![1.5, -2.0, 3.25, 0.0, 7.0, -0.125]);
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn round_trip_scalar_and_vector() {
    let dir = TempDir::new("npy-rt0");
    let p = dir.path().join("s.npy");
    write_npy_f32(&p, &Tensor::new(4.5f32, &Device::Cpu).unwrap()).unwrap();
    let t = read_npy(&p, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[] as &[usize]);
    assert_eq!(t.to_scalar::<f32>().unwrap(), 4.5);
    write_npy_f32(&p, &Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()).unwrap();
    let h = NpyHeader::parse(&std::fs::read(&p).unwrap()).unwrap();
    assert_eq!(h.shape, vec![2]);
    // A transposed (non-contiguous) view is written in its logical C order.
    let m = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &Device::Cpu).unwrap();
    write_npy_f32(&p, &m.t().unwrap()).unwrap();
    let back = read_npy(&p, &Device::Cpu).unwrap();
    assert_eq!(back.dims(), &[3, 2]);
    assert_eq!(vals(&back), vec![1., 4., 2., 5., 3., 6.]);
}

#[test]
fn f16_little_endian() {
    // 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800
    let mut b = npy_header("<f2", false, "(3,)");
    b.extend_from_slice(&[0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38]);
    let t = parse_npy(&b, &Device::Cpu).unwrap();
    assert_eq!(t.dtype(), DType::F16);
    assert_eq!(vals(&t), vec![1.0, -2.0, 0.5]);
}

#[test]
fn f16_big_endian() {
    let mut b = npy_header(">f2", false, "(2,)");
    b.extend_from_slice(&[0x3C, 0x00, 0xC0, 0x00]);
    let t = parse_npy(&b, &Device::Cpu).unwrap();
    assert_eq!(t.dtype(), DType::F16);
    assert_eq!(vals(&t), vec![1.0, -2.0]);
}

#[test]
fn bf16_as_void2_and_named() {
    // bf16: 1.0 = 0x3F80, -2.0 = 0xC000, 0.5 = 0x3F00
    let data = [0x80, 0x3F, 0x00, 0xC0, 0x00, 0x3F];
    for descr in ["<V2", "|V2", "bfloat16"] {
        let mut b = npy_header(descr, false, "(3,)");
        b.extend_from_slice(&data);
        let t = parse_npy(&b, &Device::Cpu).unwrap();
        assert_eq!(t.dtype(), DType::BF16, "{descr}");
        assert_eq!(vals(&t), vec![1.0, -2.0, 0.5], "{descr}");
    }
}

#[test]
fn big_endian_f4() {
    // 1.5 = 0x3FC00000, -2.0 = 0xC0000000
    let mut b = npy_header(">f4", false, "(2,)");
    b.extend_from_slice(&[0x3F, 0xC0, 0, 0, 0xC0, 0, 0, 0]);
    let t = parse_npy(&b, &Device::Cpu).unwrap();
    assert_eq!(t.dtype(), DType::F32);
    assert_eq!(vals(&t), vec![1.5, -2.0]);
}

#[test]
fn f8_is_narrowed_to_f32() {
    let mut b = npy_header("<f8", false, "(2,)");
    b.extend_from_slice(&0.25f64.to_le_bytes());
    b.extend_from_slice(&(-3.0f64).to_le_bytes());
    let t = parse_npy(&b, &Device::Cpu).unwrap();
    assert_eq!(t.dtype(), DType::F32);
    assert_eq!(vals(&t), vec![0.25, -3.0]);
    let mut b = npy_header(">f8", false, "(1,)");
    b.extend_from_slice(&0.75f64.to_be_bytes());
    assert_eq!(vals(&parse_npy(&b, &Device::Cpu).unwrap()), vec![0.75]);
}

#[test]
fn integers() {
    let mut b = npy_header("<i8", false, "(2,)");
    b.extend_from_slice(&7i64.to_le_bytes());
    b.extend_from_slice(&(-9i64).to_le_bytes());
    let t = parse_npy(&b, &Device::Cpu).unwrap();
    assert_eq!(t.dtype(), DType::I64);
    assert_eq!(t.to_vec1::<i64>().unwrap(), vec![7, -9]);
    let mut b = npy_header("<i4", false, "(1,)");
    b.extend_from_slice(&(-5i32).to_le_bytes());
    let t = parse_npy(&b, &Device::Cpu).unwrap();
    assert_eq!(t.dtype(), DType::I32);
    assert_eq!(vals(&t), vec![-5.0]);
}

#[test]
fn fortran_order_2x3_is_returned_in_c_order() {
    // Logical [[1, 2, 3], [4, 5, 6]] stored column-major: 1 4 2 5 3 6.
    let mut b = npy_header("<f4", true, "(2, 3)");
    for v in [1f32, 4., 2., 5., 3., 6.] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let t = parse_npy(&b, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[2, 3]);
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        vec![vec![1., 2., 3.], vec![4., 5., 6.]]
    );
}

#[test]
fn version_2_header() {
    let dict = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n";
    let mut b = b"\x93NUMPY\x02\x00".to_vec();
    b.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    b.extend_from_slice(dict);
    b.extend_from_slice(&1f32.to_le_bytes());
    b.extend_from_slice(&2f32.to_le_bytes());
    assert_eq!(vals(&parse_npy(&b, &Device::Cpu).unwrap()), vec![1.0, 2.0]);
}

#[test]
fn header_key_order_and_double_quotes() {
    let dict = b"{\"shape\": (1,), \"fortran_order\": False, \"descr\": \"<f4\"}       \n";
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    b.extend_from_slice(dict);
    b.extend_from_slice(&9f32.to_le_bytes());
    assert_eq!(vals(&parse_npy(&b, &Device::Cpu).unwrap()), vec![9.0]);
}

#[test]
fn hostile_shape_on_tiny_file_is_rejected() {
    let dir = TempDir::new("npy-huge");
    let p = dir.path().join("huge.npy");
    // 1e12 elements declared, 4 bytes of data.
    let mut b = npy_header("<f4", false, "(1000000, 1000000)");
    b.extend_from_slice(&1f32.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let msg = err_of(read_npy(&p, &Device::Cpu));
    assert!(msg.contains("huge.npy"), "{msg}");
    assert!(msg.contains("4000000000000 bytes"), "{msg}");
    assert!(msg.contains("only 4 data bytes"), "{msg}");
}

#[test]
fn shape_product_overflow_is_rejected() {
    let mut b = npy_header("<f4", false, "(18446744073709551615, 2)");
    b.extend_from_slice(&[0; 8]);
    let msg = err_of(parse_npy(&b, &Device::Cpu));
    assert!(msg.contains("overflows"), "{msg}");
    // Element count fits, byte count does not.
    let mut b = npy_header("<f4", false, "(4611686018427387904, 2)");
    b.extend_from_slice(&[0; 8]);
    let msg = err_of(parse_npy(&b, &Device::Cpu));
    assert!(msg.contains("overflows"), "{msg}");
    // A dimension that does not fit in 64 bits at all.
    let b = npy_header("<f4", false, "(99999999999999999999999,)");
    let msg = err_of(parse_npy(&b, &Device::Cpu));
    assert!(msg.contains("too large"), "{msg}");
}

#[test]
fn truncated_data_and_header() {
    let mut b = npy_header("<f4", false, "(4,)");
    b.extend_from_slice(&[0; 8]);
    let msg = err_of(parse_npy(&b, &Device::Cpu));
    assert!(msg.contains("16 bytes") && msg.contains("only 8"), "{msg}");
    // Header cut short.
    let full = npy_f32(&[2], &[1.0, 2.0]);
    let msg = err_of(parse_npy(&full[..30], &Device::Cpu));
    assert!(msg.contains("truncated header"), "{msg}");
    // Trailing garbage.
    let mut b = npy_f32(&[1], &[1.0]);
    b.push(0);
    let msg = err_of(parse_npy(&b, &Device::Cpu));
    assert!(msg.contains("trailing"), "{msg}");
}

#[test]
fn bad_magic_version_and_header() {
    let mut b = npy_f32(&[1], &[1.0]);
    b[1] = b'X';
    assert!(err_of(parse_npy(&b, &Device::Cpu)).contains("magic"));
    let mut b = npy_f32(&[1], &[1.0]);
    b[6] = 9;
    assert!(err_of(parse_npy(&b, &Device::Cpu)).contains("version 9.0"));
    assert!(err_of(parse_npy(b"\x93NU", &Device::Cpu)).contains("magic"));
    for (descr, shape, want) in [
        ("<c8", "(1,)", "unsupported dtype"),
        ("<u2", "(1,)", "unsupported dtype"),
        ("<f4", "(1, -2)", "non-negative integers"),
        ("<f4", "[1]", "list values"),
    ] {
        let mut b = npy_header(descr, false, shape);
        b.extend_from_slice(&[0; 8]);
        let msg = err_of(parse_npy(&b, &Device::Cpu));
        assert!(msg.contains(want), "{descr} {shape}: {msg}");
    }
    // Missing key, duplicate key, unknown key, structured descr.
    for (dict, want) in [
        ("{'descr': '<f4', 'shape': (1,), }", "needs the keys"),
        (
            "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            "duplicate key",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 'y'}",
            "unexpected key",
        ),
        (
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
            "structured dtypes",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,) } junk",
            "after the dict",
        ),
    ] {
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        b.extend_from_slice(dict.as_bytes());
        b.extend_from_slice(&[0; 4]);
        let msg = err_of(parse_npy(&b, &Device::Cpu));
        assert!(msg.contains(want), "{dict}: {msg}");
    }
}

#[test]
fn npz_stored_and_deflated() {
    let dir = TempDir::new("npz");
    let mut fortran = npy_header("<f4", true, "(2, 2)");
    for v in [1f32, 3., 2., 4.] {
        fortran.extend_from_slice(&v.to_le_bytes());
    }
    let members = vec![
        ("W_enc.npy", npy_f32(&[2, 3], &[1., 2., 3., 4., 5., 6.])),
        ("b.npy", npy_f32(&[3], &[-1., 0.5, 8.])),
        ("f.npy", fortran),
    ];
    for deflate in [false, true] {
        let p = dir.path().join(format!("p{deflate}.npz"));
        write_npz(&p, &members, deflate);
        let m = read_npz(&p, &Device::Cpu).unwrap();
        assert_eq!(
            m.keys().cloned().collect::<Vec<_>>(),
            vec!["W_enc".to_string(), "b".into(), "f".into()]
        );
        assert_eq!(m["W_enc"].dims(), &[2, 3]);
        assert_eq!(vals(&m["W_enc"]), vec![1., 2., 3., 4., 5., 6.]);
        assert_eq!(vals(&m["b"]), vec![-1., 0.5, 8.]);
        assert_eq!(
            m["f"].to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.]]
        );
    }
}

#[test]
fn npz_member_header_declaring_more_than_member_is_rejected() {
    let dir = TempDir::new("npz-huge");
    let mut huge = npy_header("<f4", false, "(1000000, 1000000)");
    huge.extend_from_slice(&[0; 4]);
    for deflate in [false, true] {
        let p = dir.path().join(format!("h{deflate}.npz"));
        write_npz(&p, &[("x.npy", huge.clone())], deflate);
        let msg = read_npz(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(msg.contains(&format!("h{deflate}.npz")), "{msg}");
        assert!(msg.contains("member `x.npy`"), "{msg}");
        assert!(msg.contains("4000000000128 bytes with header"), "{msg}");
    }
}

#[test]
fn npz_corrupted_and_truncated() {
    let dir = TempDir::new("npz-bad");
    let data: Vec<f32> = (0..64).map(|i| i as f32 * 0.5).collect();
    let good = npz_bytes(&[("a.npy", npy_f32(&[64], &data))], true);
    // Truncated: no central directory.
    let p = dir.path().join("trunc.npz");
    std::fs::write(&p, &good[..good.len() / 2]).unwrap();
    let msg = read_npz(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("trunc.npz") && msg.contains("npz"), "{msg}");
    // Corrupted compressed data (the bytes after the member name in the local header).
    let mut bad = good.clone();
    let start = find(&bad, b"a.npy") + 5;
    for b in &mut bad[start + 4..start + 20] {
        *b ^= 0x5A;
    }
    let p = dir.path().join("corrupt.npz");
    std::fs::write(&p, &bad).unwrap();
    let msg = read_npz(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("corrupt.npz"), "{msg}");
    // Stored member with a flipped data byte: the CRC check catches it.
    let good = npz_bytes(&[("a.npy", npy_f32(&[4], &[1., 2., 3., 4.]))], false);
    let mut bad = good.clone();
    let n = bad.len();
    // The last data byte: the npy starts at its magic, data after its 64-byte header.
    bad[find(&good, b"\x93NUMPY") + 64 + 15] ^= 0xFF;
    assert_ne!(bad, good);
    assert_eq!(bad.len(), n);
    let p = dir.path().join("crc.npz");
    std::fs::write(&p, &bad).unwrap();
    let msg = read_npz(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("crc.npz") && msg.contains("a.npy"), "{msg}");
    // Not a zip at all.
    let p = dir.path().join("not.npz");
    std::fs::write(&p, b"hello").unwrap();
    err_naming(read_npz(&p, &Device::Cpu).map(|_| ()), &["not.npz"]);
}

#[test]
fn npz_member_declaring_a_huge_uncompressed_size_is_rejected_before_reading() {
    // Patch the central directory's uncompressed size (offset 24 in the entry) to ~4 GiB.
    let dir = TempDir::new("npz-size");
    for (deflate, want) in [
        (true, "more than deflate can produce"),
        (false, "stored member declares 4294967280 bytes"),
    ] {
        let mut b = npz_bytes(&[("a.npy", npy_f32(&[2], &[1., 2.]))], deflate);
        let cd = find(&b, b"PK\x01\x02");
        b[cd + 24..cd + 28].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        let p = dir.path().join(format!("s{deflate}.npz"));
        std::fs::write(&p, &b).unwrap();
        let msg = read_npz(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(msg.contains(want), "{msg}");
        assert!(msg.contains("a.npy"), "{msg}");
    }
}
