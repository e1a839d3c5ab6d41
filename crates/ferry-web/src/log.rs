//! Console logging, as in the agent: the service's stderr is the guest's
//! serial console, which the host keeps as the boot log, so only start-up
//! and errors are printed unless `--debug` asks for one line per request.
//! (No `tracing` here: a subscriber would be most of the binary's size.)

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Turns per-request lines on or off.
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

/// Whether per-request lines are printed.
pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Writes one prefixed line to stderr in a single `write`, so that lines of
/// different threads never interleave; a closed stderr is ignored.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    let line = format!("ferry-web: {args}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs a line the console should always show.
macro_rules! info {
    ($($arg:tt)*) => {
        $crate::log::write_line(format_args!($($arg)*))
    };
}

/// Logs a line only with `--debug`.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::write_line(format_args!($($arg)*))
        }
    };
}
