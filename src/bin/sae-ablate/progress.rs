//! Progress on stderr for the library's long steps: indicatif bars on a terminal, and in a
//! log file or CI (stderr not a terminal) one line per step every few seconds.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sae_ablate::progress::{Progress, ProgressEvent, Reporter};

/// Seconds between two progress lines of a step when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// The reporter of a command: nothing when `quiet`, bars on a terminal, else lines.
pub fn reporter(quiet: bool) -> Reporter {
    if quiet {
        Reporter::none()
    } else if std::io::stderr().is_terminal() {
        Reporter::new(Bars::default())
    } else {
        Reporter::new(Lines::new(Box::new(std::io::stderr()), LINE_EVERY))
    }
}

/// indicatif bars, one per running step.
#[derive(Default)]
struct Bars {
    bars: Mutex<HashMap<String, indicatif::ProgressBar>>,
}

impl Progress for Bars {
    fn event(&self, event: &ProgressEvent<'_>) {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        match *event {
            ProgressEvent::Start { step, unit, total } => {
                let b = indicatif::ProgressBar::new(total);
                if let Ok(s) = indicatif::ProgressStyle::with_template(&format!(
                    "{step:>12} {{bar:40}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})"
                )) {
                    b.set_style(s);
                }
                bars.insert(step.to_string(), b);
            }
            ProgressEvent::Advance { step, done, .. } => {
                if let Some(b) = bars.get(step) {
                    b.set_position(done);
                }
            }
            ProgressEvent::Finish { step } => {
                if let Some(b) = bars.remove(step) {
                    b.finish_and_clear();
                }
            }
            _ => {}
        }
    }
}

struct LineStep {
    unit: String,
    start: Instant,
    last: Instant,
    done: u64,
    printed: bool,
}

/// A line `step: done/total unit (percent, rate/s, eta)` at most every `every` per step,
/// and a closing line for the steps that printed one. Steps shorter than `every` print
/// nothing.
pub struct Lines {
    out: Mutex<Box<dyn Write + Send>>,
    every: Duration,
    steps: Mutex<HashMap<String, LineStep>>,
}

impl Lines {
    /// Lines to `out`, one per step every `every`.
    pub fn new(out: Box<dyn Write + Send>, every: Duration) -> Self {
        Lines {
            out: Mutex::new(out),
            every,
            steps: Mutex::new(HashMap::new()),
        }
    }

    fn line(&self, text: &str) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        // Progress is advisory: a closed stderr must not stop the work.
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}

fn secs(d: f64) -> String {
    if d >= 3600.0 {
        format!("{:.0}h{:02.0}m", (d / 3600.0).floor(), (d % 3600.0) / 60.0)
    } else if d >= 60.0 {
        format!("{:.0}m{:02.0}s", (d / 60.0).floor(), d % 60.0)
    } else {
        format!("{d:.0}s")
    }
}

impl Progress for Lines {
    fn event(&self, event: &ProgressEvent<'_>) {
        let now = Instant::now();
        let mut steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        match *event {
            ProgressEvent::Start { step, unit, .. } => {
                steps.insert(
                    step.to_string(),
                    LineStep {
                        unit: unit.to_string(),
                        start: now,
                        last: now,
                        done: 0,
                        printed: false,
                    },
                );
            }
            ProgressEvent::Advance { step, done, total } => {
                let Some(s) = steps.get_mut(step) else {
                    return;
                };
                s.done = done;
                if now.duration_since(s.last) < self.every {
                    return;
                }
                s.last = now;
                s.printed = true;
                let el = now.duration_since(s.start).as_secs_f64().max(1e-9);
                let rate = done as f64 / el;
                let pct = 100.0 * done as f64 / (total.max(1)) as f64;
                let eta = if rate > 0.0 {
                    secs(total.saturating_sub(done) as f64 / rate)
                } else {
                    "?".into()
                };
                let unit = if s.unit.is_empty() { "" } else { " " };
                let text = format!(
                    "{step}: {done}/{total}{unit}{} ({pct:.0}%, {rate:.1}/s, eta {eta})",
                    s.unit
                );
                drop(steps);
                self.line(&text);
            }
            ProgressEvent::Finish { step } => {
                if let Some(s) = steps.remove(step) {
                    if s.printed {
                        let unit = if s.unit.is_empty() { "" } else { " " };
                        let text = format!(
                            "{step}: done, {}{unit}{} in {}",
                            s.done,
                            s.unit,
                            secs(now.duration_since(s.start).as_secs_f64())
                        );
                        drop(steps);
                        self.line(&text);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("the buffer's lock is poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Buf {
        fn text(&self) -> String {
            // A poisoned lock or invalid UTF-8 reads as empty or lossy: the assertions on
            // the text then fail.
            self.0
                .lock()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        }
    }

    fn run(l: &Lines) {
        l.event(&ProgressEvent::Start {
            step: "harvest",
            unit: "tokens",
            total: 100,
        });
        for done in [10, 50, 100] {
            l.event(&ProgressEvent::Advance {
                step: "harvest",
                done,
                total: 100,
            });
        }
        l.event(&ProgressEvent::Finish { step: "harvest" });
    }

    #[test]
    fn lines_are_printed_once_the_interval_has_passed() {
        let buf = Buf::default();
        run(&Lines::new(Box::new(buf.clone()), Duration::ZERO));
        let text = buf.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].starts_with("harvest: 10/100 tokens (10%,"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("harvest: 100/100 tokens (100%,"),
            "{text}"
        );
        assert!(
            lines[3].starts_with("harvest: done, 100 tokens in "),
            "{text}"
        );
    }

    #[test]
    fn short_steps_print_nothing() {
        let buf = Buf::default();
        run(&Lines::new(
            Box::new(buf.clone()),
            Duration::from_secs(3600),
        ));
        assert_eq!(buf.text(), "");
    }

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(secs(42.0), "42s");
        assert_eq!(secs(125.0), "2m05s");
        assert_eq!(secs(7260.0), "2h01m");
    }
}
