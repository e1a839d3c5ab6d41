//! `ferry boot`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_runtime::ops::{boot, BootOptions};
use ferry_runtime::Paths;

use super::Ctx;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The blueprint directory (from 'ferry blueprint build').
    #[arg(long)]
    blueprint: PathBuf,
    /// The VM's name (default: the recipe's name and a random suffix).
    #[arg(long)]
    name: Option<String>,
    /// Guest memory in MiB (default: the blueprint's).
    #[arg(long = "memory-size")]
    memory_size: Option<u64>,
    /// Number of vCPUs (default: the blueprint's).
    #[arg(long)]
    cpus: Option<u32>,
    /// Accelerator: auto uses KVM only where it really boots a Linux guest.
    #[arg(long, value_enum, default_value = "auto")]
    accel: super::AccelArg,
    /// Shut down as soon as the service is live.
    #[arg(long = "exit-when-live")]
    exit_when_live: bool,
    /// Seconds to wait for the service (default: the blueprint's).
    #[arg(long = "live-timeout")]
    live_timeout: Option<u64>,
    /// Copy the guest's console to standard error.
    #[arg(long)]
    console: bool,
    #[command(flatten)]
    net: super::NetArgs,
}

pub fn run(args: Args, paths: &Paths, started: Instant, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let engine = super::engine(paths)?;
    let net = args.net.choice()?;
    let opts = BootOptions {
        blueprint: args.blueprint,
        name: args.name,
        memory_mib: args.memory_size,
        cpus: args.cpus,
        accel: args.accel.into(),
        exit_when_live: args.exit_when_live,
        live_timeout: args.live_timeout.map(Duration::from_secs),
        console: super::console(args.console),
        started,
        net,
    };
    boot(&engine, paths, &opts, &ctx.render, &ctx.cancel()?)?;
    Ok(ExitCode::SUCCESS)
}
