//! [`model_sha256`]: the one identity of a model path, recorded in harvest manifests and
//! keying the experiment caches.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use crate::io::sha256::{self, Sha256};
use crate::{Error, Result};

/// The files a model path stands for: the file itself, or a directory's files in name order.
fn model_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let rd = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for e in rd {
        let p = e.map_err(|e| Error::io(path, e))?.path();
        if p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Each file's name, size and modification time: when these are unchanged, so is the hash.
type Stamp = Vec<(PathBuf, u64, u128)>;

fn stamp(files: &[PathBuf]) -> Result<Stamp> {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            Ok((f.clone(), m.len(), t))
        })
        .collect()
}

/// SHA-256 identifying a model path: the file's hash, or for a directory the hash of its
/// files' names and hashes. The same files give the same hash whichever path reaches
/// them; within a process the hash of unchanged files (same names, sizes and
/// modification times) is computed once.
pub fn model_sha256(path: impl AsRef<Path>) -> Result<String> {
    static DONE: Mutex<Option<HashMap<PathBuf, (Stamp, String)>>> = Mutex::new(None);
    let path = path.as_ref();
    let files = model_files(path)?;
    let st = stamp(&files)?;
    let key = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    if let Ok(done) = DONE.lock() {
        if let Some((s, h)) = done.as_ref().and_then(|m| m.get(&key)) {
            if *s == st {
                return Ok(h.clone());
            }
        }
    }
    let hash = if path.is_file() {
        sha256::file_hex(path)?
    } else {
        let mut h = Sha256::new();
        for f in &files {
            h.update(
                f.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .as_bytes(),
            );
            h.update(sha256::file_hex(f)?.as_bytes());
        }
        h.finalize_hex()
    };
    if let Ok(mut done) = DONE.lock() {
        done.get_or_insert_with(HashMap::new)
            .insert(key, (st, hash.clone()));
    }
    Ok(hash)
}
