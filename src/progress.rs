//! Progress of long steps (harvesting, training, evaluation, the ESR experiment),
//! reported to a callback the caller supplies.
//!
//! The library draws nothing itself: each long step sends [`ProgressEvent`]s to the
//! [`Reporter`] in its config, and the caller decides what to show (the `sae-ablate`
//! CLI draws terminal bars, or prints a line every few seconds when stderr is a log file).
//! The default reporter ignores every event.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use sae_ablate::progress::{ProgressEvent, Reporter};
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = seen.clone();
//! let reporter = Reporter::new(move |e: &ProgressEvent<'_>| {
//!     if let ProgressEvent::Advance { step, done, total } = e {
//!         // A poisoned lock (a panic while it was held) drops the entry.
//!         if let Ok(mut log) = log.lock() {
//!             log.push(format!("{step}: {done}/{total}"));
//!         }
//!     }
//! });
//! let mut cfg = sae_ablate::harvest::HarvestConfig::default();
//! cfg.progress = reporter;
//! # let _ = (cfg, seen);
//! ```

use std::sync::Arc;

/// One report about a long step. Steps may nest (an experiment step that runs a
/// harvest); `step` names the step an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgressEvent<'a> {
    /// A step starts: `total` units of `unit` (e.g. `tokens`, `steps`; may be empty)
    /// are to be done.
    Start {
        /// What is running (`harvest`, `train`, `eval`, …).
        step: &'a str,
        /// What is counted.
        unit: &'a str,
        /// Units to do.
        total: u64,
    },
    /// `done` of `total` units of `step` are finished.
    Advance {
        /// The step.
        step: &'a str,
        /// Units finished so far.
        done: u64,
        /// Units to do.
        total: u64,
    },
    /// The step is over (finished, or stopped by an error).
    Finish {
        /// The step.
        step: &'a str,
    },
}

/// Receives [`ProgressEvent`]s. Implemented by every `Fn(&ProgressEvent) + Send + Sync`.
pub trait Progress: Send + Sync {
    /// Handle one event.
    fn event(&self, event: &ProgressEvent<'_>);
}

impl<F> Progress for F
where
    F: Fn(&ProgressEvent<'_>) + Send + Sync,
{
    fn event(&self, event: &ProgressEvent<'_>) {
        self(event)
    }
}

/// The progress callback of a config: nothing (the default) or a shared [`Progress`].
///
/// Cloning shares the callback. A reporter never changes what a step computes, so every
/// two reporters compare equal: configs that differ only in their reporter are equal.
#[derive(Clone, Default)]
pub struct Reporter(Option<Arc<dyn Progress>>);

impl Reporter {
    /// A reporter that ignores every event.
    pub fn none() -> Self {
        Reporter(None)
    }

    /// A reporter that sends every event to `progress`.
    pub fn new(progress: impl Progress + 'static) -> Self {
        Reporter(Some(Arc::new(progress)))
    }

    /// Whether events go anywhere.
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    fn send(&self, event: &ProgressEvent<'_>) {
        if let Some(p) = &self.0 {
            p.event(event);
        }
    }

    /// Start a step of `total` units; the step reports [`ProgressEvent::Finish`] when it
    /// is finished or dropped.
    pub(crate) fn step(&self, step: &str, unit: &str, total: u64) -> Step {
        self.send(&ProgressEvent::Start { step, unit, total });
        Step {
            reporter: self.clone(),
            step: step.to_string(),
            done: 0,
            total,
            finished: false,
        }
    }
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Reporter(on)"
        } else {
            "Reporter(none)"
        })
    }
}

impl PartialEq for Reporter {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A running step (see [`Reporter::step`]).
pub(crate) struct Step {
    reporter: Reporter,
    step: String,
    done: u64,
    total: u64,
    finished: bool,
}

impl Step {
    /// A step that reports nothing.
    #[cfg_attr(not(feature = "esr"), allow(dead_code))]
    pub(crate) fn hidden() -> Self {
        Reporter::none().step("", "", 0)
    }

    /// `n` more units are done.
    pub(crate) fn inc(&mut self, n: u64) {
        self.set(self.done.saturating_add(n));
    }

    /// `done` units are done in all.
    pub(crate) fn set(&mut self, done: u64) {
        self.done = done;
        self.reporter.send(&ProgressEvent::Advance {
            step: &self.step,
            done,
            total: self.total,
        });
    }

    /// The step is over.
    pub(crate) fn finish(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if !self.finished {
            self.finished = true;
            self.reporter
                .send(&ProgressEvent::Finish { step: &self.step });
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_step_reports_start_advances_and_one_finish() -> crate::TestResult {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let r = Reporter::new(move |e: &ProgressEvent<'_>| {
            // A poisoned log (a panicking test thread) is left alone.
            if let Ok(mut l) = l.lock() {
                l.push(format!("{e:?}"));
            }
        });
        let mut s = r.step("train", "steps", 3);
        s.inc(1);
        s.inc(2);
        s.finish();
        drop(r.step("eval", "", 1));
        let log = log.lock().map_err(|_| "the log's lock is poisoned")?;
        assert_eq!(log.len(), 6, "{log:?}");
        assert!(log[0].starts_with("Start { step: \"train\""));
        assert!(log[2].contains("done: 3, total: 3"));
        assert!(log[3].starts_with("Finish { step: \"train\""));
        assert!(log[5].starts_with("Finish { step: \"eval\""));
        assert_eq!(Reporter::none(), r);
        Ok(())
    }
}
