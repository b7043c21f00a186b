//! Progress bars on stderr (indicatif) for every step that takes more than a few
//! seconds. indicatif draws nothing when stderr is not a terminal, so logs and tests stay
//! clean.

/// A bar of `len` units labelled `what`; hidden when `show` is false.
pub(crate) fn bar(len: u64, what: &str, unit: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    if let Ok(s) = indicatif::ProgressStyle::with_template(&format!(
        "{what:>12} {{bar:40}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})"
    )) {
        b.set_style(s);
    }
    b
}
