//! Console logging.
//!
//! The agent's stderr is the guest's serial console, which the host keeps as
//! the boot log, so the agent stays quiet: start-up, `live`, errors and
//! shutdown. Per-request lines appear only with `--debug` or
//! `FERRY_AGENT_DEBUG=1` (the kernel passes unknown `KEY=value` command-line
//! words to PID 1's environment, so this can be switched on at boot).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Turns debug lines on (also on when `FERRY_AGENT_DEBUG` is set to `1`).
pub fn set_debug(on: bool) {
    let from_env = std::env::var_os("FERRY_AGENT_DEBUG").is_some_and(|v| v == "1");
    DEBUG.store(on || from_env, Ordering::Relaxed);
}

/// Whether debug lines are printed.
pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Writes one prefixed line to stderr in a single `write`, so that lines of
/// different threads never interleave. Failures are ignored on purpose:
/// `eprintln!` panics when stderr is gone, and PID 1 must not.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    let line = format!("ferry-agent: {args}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs a line the console should always show.
macro_rules! info {
    ($($arg:tt)*) => {
        $crate::log::write_line(format_args!($($arg)*))
    };
}

/// Logs a line only when debug logging is on.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::write_line(format_args!($($arg)*))
        }
    };
}
