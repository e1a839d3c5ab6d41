//! Ctrl-C and SIGTERM, turned into the runtime's [`Cancel`]: the library
//! installs no signal handlers; the binary does, and trips the handle.

use ferry_runtime::Cancel;
use signal_hook::consts::{SIGINT, SIGTERM};

/// A cancel handle tripped on every SIGINT and SIGTERM from now on.
pub fn cancel_on_signals() -> anyhow::Result<Cancel> {
    let cancel = Cancel::new();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let tripped = cancel.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                tripped.cancel();
            }
        })?;
    Ok(cancel)
}
