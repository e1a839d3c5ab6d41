//! Progress for long steps: one line per step on standard error, with its
//! duration, so a user watching a build knows what is happening and how long
//! each part took.

use std::io::Write;
use std::time::Instant;

/// Reports the steps of a long operation.
pub trait Progress {
    /// A step starts.
    fn step(&mut self, what: &str);
    /// Extra detail for the current step (e.g. a download's progress).
    fn detail(&mut self, _text: &str) {}
}

/// Prints `==> step` lines to standard error, with the time each took.
pub struct StderrProgress {
    current: Option<(String, Instant)>,
    quiet: bool,
}

impl StderrProgress {
    /// A reporter; `quiet` suppresses everything.
    pub fn new(quiet: bool) -> Self {
        Self {
            current: None,
            quiet,
        }
    }

    fn finish_current(&mut self) {
        if let Some((what, started)) = self.current.take() {
            if !self.quiet {
                eprintln!("    {what}: {:.1} s", started.elapsed().as_secs_f64());
            }
        }
    }
}

impl Progress for StderrProgress {
    fn step(&mut self, what: &str) {
        self.finish_current();
        if !self.quiet {
            eprintln!("==> {what}");
            let _ = std::io::stderr().flush();
        }
        self.current = Some((what.to_string(), Instant::now()));
    }

    fn detail(&mut self, text: &str) {
        if !self.quiet {
            eprintln!("    {text}");
        }
    }
}

impl Drop for StderrProgress {
    fn drop(&mut self) {
        self.finish_current();
    }
}
