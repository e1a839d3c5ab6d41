//! `ferry run`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use ferry_runtime::package::{run as run_package, RunOptions};
use ferry_runtime::Paths;

use super::AccelArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The package file (from 'ferry package').
    #[arg(long)]
    package: PathBuf,
    /// The VM's name (default: the recipe's name and a random suffix).
    #[arg(long)]
    name: Option<String>,
    /// Run a copy-on-write clone with its own identity; the package is not changed.
    #[arg(long)]
    clone: bool,
    /// Accelerator; must match the one the package was made with.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,
    /// Copy the guest's console to standard error.
    #[arg(long)]
    console: bool,
    /// Forward this terminal to the guest's serial console (a shell runs
    /// there); shows the console too. Ctrl-C still suspends the VM.
    #[arg(long = "enable-input")]
    enable_input: bool,
    #[command(flatten)]
    net: super::NetArgs,
}

pub fn run(args: Args, paths: &Paths, started: Instant) -> anyhow::Result<ExitCode> {
    let engine = super::engine(paths)?;
    let net = args.net.choice()?;
    let opts = RunOptions {
        package: args.package,
        name: args.name,
        clone: args.clone,
        accel: args.accel.into(),
        echo_console: args.console,
        enable_input: args.enable_input,
        started,
        net,
    };
    run_package(&engine, paths, &opts, &mut super::say)?;
    Ok(ExitCode::SUCCESS)
}
