//! Progress for long steps: one line per step, with its duration, so a user
//! watching a build knows what is happening and how long each part took.
//! The library makes the lines; the caller says where they go.

use std::time::Instant;

/// Reports the steps of a long operation.
pub trait Progress {
    /// A step starts.
    fn step(&mut self, what: &str);
    /// Extra detail for the current step (e.g. a download's progress).
    fn detail(&mut self, _text: &str) {}
}

/// Turns steps into `==> step` lines, with the time each took, and hands
/// each line to `sink` (the `ferry` binary writes them to standard error).
pub struct LineProgress<F: FnMut(&str)> {
    current: Option<(String, Instant)>,
    quiet: bool,
    sink: F,
}

impl<F: FnMut(&str)> LineProgress<F> {
    /// A reporter; `quiet` suppresses everything.
    pub fn new(quiet: bool, sink: F) -> Self {
        Self {
            current: None,
            quiet,
            sink,
        }
    }

    fn finish_current(&mut self) {
        if let Some((what, started)) = self.current.take() {
            if !self.quiet {
                (self.sink)(&format!(
                    "    {what}: {:.1} s",
                    started.elapsed().as_secs_f64()
                ));
            }
        }
    }
}

impl<F: FnMut(&str)> Progress for LineProgress<F> {
    fn step(&mut self, what: &str) {
        self.finish_current();
        if !self.quiet {
            (self.sink)(&format!("==> {what}"));
        }
        self.current = Some((what.to_string(), Instant::now()));
    }

    fn detail(&mut self, text: &str) {
        if !self.quiet {
            (self.sink)(&format!("    {text}"));
        }
    }
}

impl<F: FnMut(&str)> Drop for LineProgress<F> {
    fn drop(&mut self) {
        self.finish_current();
    }
}
