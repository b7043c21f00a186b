//! The fuzz targets' bodies (`fuzz/src/targets.rs`) over every saved crash input
//! (`tests/data/fuzz-regressions/<target>/`) and every seed (`fuzz/corpus/<target>/seed-*`):
//! each must load or give an error, never panic, and never make one allocation over
//! 64 MiB + 64 × the input's length (the fuzzers' allocator is this binary's global
//! allocator; an oversized allocation aborts the test with a message saying so).
//! CI runs this, not the fuzzers. One test, so that only one input is bounded at a time.

#[path = "../fuzz/src/bound.rs"]
mod bound;
#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;

fn inputs(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(prefix) && !n.starts_with('.'))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn run_all(prefix: &str, sub: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failed = Vec::new();
    let mut n = 0;
    for t in targets::TARGETS {
        for p in inputs(&root.join(sub).join(t), prefix) {
            let bytes = std::fs::read(&p).unwrap();
            n += 1;
            let _bound = bound::AllocBound::new(bytes.len());
            if std::panic::catch_unwind(|| targets::run(t, &bytes)).is_err() {
                failed.push(p.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "panicked on: {failed:#?}");
    n
}

#[test]
fn saved_crash_inputs_and_seeds_are_handled() {
    let n = run_all("", "tests/data/fuzz-regressions");
    assert!(n > 0, "no regression inputs found");
    let n = run_all("seed-", "fuzz/corpus");
    assert!(
        n >= 9,
        "only {n} seeds: run `cargo test --test fuzz_seeds -- --ignored`"
    );
}
