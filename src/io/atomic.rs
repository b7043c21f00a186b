//! Atomic file writes: write to a temporary file beside the target, then rename.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Write a file atomically: `fill` writes into a temporary file in the same
/// directory, which is flushed, synced and renamed over `path` only if `fill`
/// succeeds. A failed or interrupted write never leaves a half-written `path`.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    write_atomic_path(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        fill(&mut w)?;
        w.flush().map_err(|e| Error::io(tmp, e))?;
        let file = w.into_inner().map_err(|e| Error::io(tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(tmp, e))
    })
}

/// Write `bytes` to `path`, atomically.
#[cfg_attr(not(feature = "esr"), allow(dead_code))]
pub(crate) fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// Write `value` as pretty JSON to `path`, atomically.
pub(crate) fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value)
            .map_err(|e| Error::format("json", e.to_string()).in_file(path))
    })
}

/// Run `write(tmp)` on a temporary path beside `path`, then rename it over `path`.
/// For writers that want a path rather than a stream (e.g. safetensors).
pub fn write_atomic_path(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write(&tmp)
        .and_then(|()| readable(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Give the finished file ordinary permissions (rw-r--r--): some writers create their
/// output private (0600), which would make a published SAE unreadable to other users.
#[cfg(unix)]
fn readable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).map_err(|e| Error::io(p, e))
}

#[cfg(not(unix))]
fn readable(_: &Path) -> Result<()> {
    Ok(())
}
