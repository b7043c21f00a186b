//! End-to-end tests of the `sae-ablate` binary on temporary files.

#[path = "common/small.rs"]
mod small;

use std::path::{Path, PathBuf};
use std::process::Command;

use sae_ablate::sae::Architecture;
use small::*;

/// A `.npy` v1.0 file written byte by byte (independent of the crate's writer).
fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let shape_s = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

fn write_f32(path: &Path, rows: &[&[f32]]) {
    let data: Vec<u8> = rows
        .iter()
        .flat_map(|r| r.iter())
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write_npy(path, "<f4", &[rows.len(), rows[0].len()], &data);
}

/// Read a C-order `<f4` 2-D `.npy` written by the CLI, parsing the header by hand.
fn read_f32(path: &Path) -> Vec<Vec<f32>> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape = &header[header.find("'shape': (").unwrap() + 10..];
    let shape: Vec<usize> = shape[..shape.find(')').unwrap()]
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    assert_eq!(shape.len(), 2, "{header}");
    let vals: Vec<f32> = b[10 + hlen..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(vals.len(), shape[0] * shape[1]);
    vals.chunks(shape[1].max(1)).map(|c| c.to_vec()).collect()
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sae-ablate"))
}

struct Setup {
    dir: PathBuf,
    sae: PathBuf,
    x: PathBuf,
}

fn setup(tag: &str) -> Setup {
    let dir = tmpdir(tag);
    let sae_dir = dir.join("sae");
    sae(Architecture::Standard).save_saelens(&sae_dir).unwrap();
    let x = dir.join("x.npy");
    write_f32(&x, &[&[2., 1.], &[-1., 0.]]);
    Setup {
        dir,
        sae: sae_dir,
        x,
    }
}

fn run_ok(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run_err(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?} should exit 2");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one-line message expected: {err}"
    );
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn encode_writes_dense_latents() {
    let t = setup("cli-encode");
    let out = t.dir.join("f.npy");
    run_ok(&[
        "encode",
        "--sae",
        s(&t.sae),
        "--input",
        s(&t.x),
        "--output",
        s(&out),
    ]);
    assert_close(
        &read_f32(&out),
        &[vec![1.5, 1., 0.25], vec![0., 0., 0.]],
        1e-6,
    );
}

#[test]
fn apply_every_edit_kind() {
    let t = setup("cli-apply");
    let out = t.dir.join("y.npy");
    let out_s = out.to_str().unwrap().to_string();
    let base = [
        "apply",
        "--sae",
        s(&t.sae),
        "--input",
        s(&t.x),
        "--output",
        &out_s,
    ];
    let cases: Vec<(Vec<&str>, Vec<Vec<f32>>)> = vec![
        (vec![], vec![vec![2., 1.], vec![-1., 0.]]),
        (vec!["--zero", "1"], vec![vec![2., -1.], vec![-1., 0.]]),
        // clamp latent 2 to 1.25 and scale latent 0 by 3 (row 2: all inactive).
        (
            vec!["--clamp", "2=1.25", "--scale", "0=3"],
            vec![vec![6., 2.], vec![0.25, 1.25]],
        ),
        (vec!["--add", "0=1"], vec![vec![3., 1.], vec![0., 0.]]),
        (vec!["--steer", "1=0.5"], vec![vec![2., 2.], vec![-1., 1.]]),
        (
            vec!["--zero", "1", "--mode", "reconstruct"],
            vec![vec![2.25, -0.25], vec![0.5, -0.5]],
        ),
    ];
    for (extra, want) in cases {
        let mut args = base.to_vec();
        args.extend(extra.iter());
        run_ok(&args);
        assert_close(&read_f32(&out), &want, 1e-6);
    }
}

#[test]
fn half_precision_input() {
    let t = setup("cli-f16");
    let x16 = t.dir.join("x16.npy");
    let data: Vec<u8> = [2f32, 1., -1., 0.]
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    write_npy(&x16, "<f2", &[2, 2], &data);
    let out = t.dir.join("y.npy");
    run_ok(&[
        "apply",
        "--sae",
        s(&t.sae),
        "--input",
        s(&x16),
        "--output",
        s(&out),
        "--zero",
        "1",
    ]);
    assert_close(&read_f32(&out), &[vec![2., -1.], vec![-1., 0.]], 1e-6);
}

#[test]
fn inspect_reports_the_release() {
    let t = setup("cli-inspect");
    let js: serde_json::Value =
        serde_json::from_str(&run_ok(&["inspect", s(&t.sae), "--json"])).unwrap();
    assert_eq!(js["format"], "saelens");
    assert_eq!(js["architecture"], "standard");
    assert_eq!(js["d_in"], 2);
    assert_eq!(js["d_sae"], 3);
    assert_eq!(js["dtype"], "f32");
    assert_eq!(js["non_finite"], serde_json::json!({}));
    // decoder norms are 1, 2, √2.
    assert_eq!(js["decoder_norm"]["max"], 2.0);
    let text = run_ok(&["inspect", s(&t.sae)]);
    assert!(
        text.contains("standard") && text.contains("d_sae"),
        "{text}"
    );
}

#[test]
fn inspect_reports_nan_weights() {
    let t = setup("cli-nan");
    let mut w = weights();
    w.b_enc = t1(&[0., f32::NAN, 0.]);
    let sae = sae_ablate::Sae::new(
        sae_ablate::sae::SaeConfig::new(Architecture::Standard, 2, 3),
        w,
    )
    .unwrap();
    let p = t.dir.join("nan");
    sae.save_saelens(&p).unwrap();
    let out = bin().args(["inspect", s(&p)]).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`b_enc` has 1 NaN/Inf"), "{err}");
    let js: serde_json::Value =
        serde_json::from_str(&run_ok(&["inspect", s(&p), "--json"])).unwrap();
    assert_eq!(js["non_finite"]["b_enc"], 1);
}

#[test]
fn bad_input_exits_2_with_a_clear_message_and_no_output() {
    let t = setup("cli-bad");
    let out = t.dir.join("y.npy");
    let x3 = t.dir.join("x3.npy");
    write_f32(&x3, &[&[1., 2., 3.]]);
    let garbage = t.dir.join("garbage.npy");
    std::fs::write(&garbage, b"not an npy file").unwrap();
    let apply = |input: &Path, extra: &[&str]| {
        let mut a = vec![
            "apply",
            "--sae",
            s(&t.sae),
            "--input",
            s(input),
            "--output",
            s(&out),
        ];
        a.extend_from_slice(extra);
        run_err(&a)
    };
    let e = apply(&x3, &[]);
    assert!(e.contains("d_in = 2") && e.contains("x3.npy"), "{e}");
    let e = apply(&t.x, &["--zero", "3"]);
    assert!(e.contains("latent id 3") && e.contains("d_sae = 3"), "{e}");
    let e = apply(&t.x, &["--clamp", "2:1.0"]);
    assert!(e.contains("--clamp") && e.contains("2:1.0"), "{e}");
    let e = apply(&t.x, &["--zero-preset", "esr26"]);
    assert!(e.contains("latent id"), "{e}");
    let e = apply(&t.x, &["--zero", "1,1"]);
    assert!(e.contains("latent id 1"), "{e}");
    let e = apply(&garbage, &[]);
    assert!(e.contains("garbage.npy"), "{e}");
    let e = apply(&t.dir.join("missing.npy"), &[]);
    assert!(e.contains("missing.npy"), "{e}");
    assert!(!out.exists(), "no output may be written on error");
    let e = run_err(&["inspect", s(&t.dir.join("nowhere"))]);
    assert!(e.contains("nowhere"), "{e}");
    let e = run_err(&[
        "apply",
        "--sae",
        s(&t.sae),
        "--input",
        s(&t.x),
        "--output",
        s(&out),
        "--mode",
        "sideways",
    ]);
    assert!(e.contains("sideways"), "{e}");
}

/// `harvest` and `eval` take the model's weight dtype and format like `logits`; bad values
/// are errors naming the flag, before any file is read.
#[test]
fn harvest_and_eval_take_model_weight_flags() {
    let e = run_err(&[
        "harvest",
        "--model",
        "missing.gguf",
        "--out",
        "unused",
        "--model-dtype",
        "f8",
    ]);
    assert!(e.contains("--model-dtype") && e.contains("f8"), "{e}");
    let e = run_err(&[
        "harvest",
        "--model",
        "missing.gguf",
        "--out",
        "unused",
        "--weights",
        "sparse",
    ]);
    assert!(e.contains("--weights") && e.contains("sparse"), "{e}");
    let e = run_err(&[
        "eval",
        "--model",
        "missing.gguf",
        "--sae",
        "unused",
        "--dtype",
        "f8",
    ]);
    assert!(e.contains("--dtype") && e.contains("f8"), "{e}");
}

#[test]
fn bench_prints_json_rows_with_speedups() {
    let out = run_ok(&[
        "bench",
        "--random",
        "32x256",
        "--dtype",
        "bf16",
        "--batch",
        "1,3",
        "--ops",
        "forward,ablate26",
        "--compare",
        "--budget",
        "0.01",
        "--json",
        "--no-ceilings",
    ]);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 2 batches × 2 ops × (fused, reference).
    assert_eq!(rows.len(), 8, "{out}");
    for r in &rows {
        assert_eq!(r["size"], "32x256");
        assert!(
            r["ms"].as_f64().unwrap() > 0.0 && r["tok_s"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        let is_ref = r["path"] == "reference";
        assert_eq!(r["speedup"].is_number(), is_ref, "{r}");
    }
    let e = run_err(&["bench", "--random", "32by256"]);
    assert!(e.contains("32by256"), "{e}");
    let e = run_err(&["bench", "--random", "32x256", "--ops", "ablate27"]);
    assert!(e.contains("ablate27"), "{e}");
}
