//! `ferry-agent`: the guest side of ferry.
//!
//! The guest's init script mounts the pseudo file systems, configures the
//! network and then `exec`s this binary, so the agent runs as **PID 1**. That
//! shapes the whole program:
//!
//! * it is the reaper of every orphan in the guest ([`reaper`]);
//! * it must never exit or panic out of `main`: PID 1 exiting panics the
//!   kernel. Worker threads may panic (they unwind and are logged), the port
//!   loop restarts itself, and a fatal error powers the guest off instead;
//! * its stderr is the serial console, which the host keeps as the boot log,
//!   so it logs little ([`log`]).
//!
//! The work is split by concern: [`port`] finds and opens the virtio-serial
//! port, [`outbox`] owns every write to it, [`handlers`] answers requests,
//! [`service`] runs the guest's service and its liveness check, [`exec`] runs
//! commands for the host, [`fleet`] writes the fleet file, and [`sys`] wraps
//! the few raw system calls. The same binary, run with `--shell-server`, is
//! the guest's shell server ([`shell`]), a process of its own.

#[macro_use]
mod log;

mod agent;
mod cli;
mod console;
mod exec;
mod fleet;
mod handlers;
mod outbox;
mod port;
mod reaper;
mod service;
mod shell;
mod sys;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;

fn main() -> ExitCode {
    let pid1 = sys::is_pid1();
    let options = match cli::parse(std::env::args_os().skip(1)) {
        Ok(cli::Command::Run(options)) => options,
        Ok(cli::Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(cli::Command::Version) => {
            println!("ferry-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        // As PID 1 a typo in the init script must not panic the kernel:
        // carry on with the defaults, which is what the init script meant
        // in all but the most unusual images.
        Err(message) if pid1 => {
            info!("{message}; using the defaults");
            cli::Options::default()
        }
        Err(message) => {
            info!("{message}\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    log::set_debug(options.debug);
    if options.shell_server {
        shell::serve(options.port.as_deref());
    }

    // `agent::run` only returns by panicking: shutdown ends the process from
    // inside the handler.
    if catch_unwind(AssertUnwindSafe(|| agent::run(options))).is_err() {
        info!("fatal: the agent's main loop panicked");
    }
    if pid1 {
        info!("powering the guest off");
        sys::power_off();
    }
    ExitCode::FAILURE
}

/// Helpers for the unit tests.
#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory under the system temp dir, removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static COUNT: AtomicUsize = AtomicUsize::new(0);
            let n = COUNT.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("ferry-agent-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
