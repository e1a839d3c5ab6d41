//! `ferry-web`: a small HTTP service for ferry guests, and the service of
//! the `web` recipe.
//!
//! It shows what a fleet of ferry VMs can do with the fleet file the agent
//! writes (`/run/ferry/fleet.json`): each instance keeps key/value pairs on
//! its own VM's disk, and can ping, write to and report on the other
//! members at the addresses the fleet file gives. The API is in
//! `docs/web.md`.
//!
//! Like the agent it is a static binary (glibc, `+crt-static`) copied into
//! the guest, so it stays small and does no NSS lookups: addresses are
//! numeric, the hostname comes from `/proc`.
//!
//! The work is split by concern: [`cli`] reads the options, [`server`]
//! accepts connections, [`http`] reads and writes HTTP (and calls other
//! members), [`api`] answers the routes, [`storage`] keeps the values and
//! [`fleet`] reads the fleet file.

#[macro_use]
mod log;

mod api;
mod cli;
mod error;
mod fleet;
mod http;
mod server;
mod storage;

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;

use error::StartError;

fn main() -> ExitCode {
    let options = match cli::parse(std::env::args_os().skip(1), |var| std::env::var(var).ok()) {
        Ok(cli::Command::Run(options)) => options,
        Ok(cli::Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(cli::Command::Version) => {
            println!("ferry-web {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            info!("{message}\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    log::set_debug(options.debug);
    match start(options) {
        Ok(never) => match never {},
        Err(e) => {
            info!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Opens the store, binds and serves; returns only if it cannot start.
fn start(options: cli::Options) -> Result<std::convert::Infallible, StartError> {
    let store = storage::Store::open(&options.storage_dir)?;
    let listener = TcpListener::bind(options.listen).map_err(|source| StartError::Bind {
        addr: options.listen,
        source,
    })?;
    let addr = listener.local_addr().unwrap_or(options.listen);
    info!(
        "version {} listening on {addr} (fleet file {}, storage {})",
        env!("CARGO_PKG_VERSION"),
        options.fleet_file.display(),
        options.storage_dir.display()
    );
    // On stdout as well, in a fixed form, for whoever started it with port 0.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "listening on {addr}");
    let _ = stdout.flush();
    drop(stdout);
    server::serve(listener, api::Service::new(options, store))
}
