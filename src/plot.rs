//! The shared PNG plumbing of every plot (training curves, latent density, ESR figures):
//! plotters' pure-Rust bitmap backend, labels in DejaVu Sans embedded from the `dejavu`
//! crate (no system fonts needed), and atomic writes.

use std::path::Path;
use std::sync::Once;

use plotters::style::{register_font, FontStyle};

use crate::{Error, Result};

/// The font family name every plot's text uses.
pub(crate) const FONT: &str = "sans-serif";

fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // A failure leaves text unrendered; plotters then reports an error we surface.
        let _ = register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Draw a PNG atomically: `draw(tmp)` renders into a temporary `.png` beside `path`
/// (the bitmap encoder picks the format from the extension), which is renamed over `path`
/// only on success. Registers the embedded font first.
pub(crate) fn write_png(path: &Path, draw: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    register();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".tmp-{}-{}.png",
        std::process::id(),
        stem.unwrap_or_default()
    ));
    let r = draw(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}
