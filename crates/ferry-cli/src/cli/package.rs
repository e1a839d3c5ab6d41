//! `ferry package`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ferry_runtime::ops::{package, PackageOptions};
use ferry_runtime::Paths;

use super::Ctx;

use super::AccelArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The blueprint directory to boot and snapshot.
    #[arg(long)]
    blueprint: PathBuf,
    /// The package file to write (replaced atomically if it exists).
    #[arg(long)]
    out: PathBuf,
    /// Guest memory in MiB (default: the blueprint's).
    #[arg(long = "memory-size")]
    memory_size: Option<u64>,
    /// Number of vCPUs (default: the blueprint's).
    #[arg(long)]
    cpus: Option<u32>,
    /// Accelerator: auto uses KVM only where it really boots a Linux guest.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,
    /// Seconds to wait for the service (default: the blueprint's).
    #[arg(long = "live-timeout")]
    live_timeout: Option<u64>,
    /// Copy the guest's console to standard error.
    #[arg(long)]
    console: bool,
    /// Sign the package with this key (a PREFIX.key from `ferry key gen`),
    /// so that `--trust PREFIX.pub` accepts it.
    #[arg(long, value_name = "KEY")]
    sign: Option<PathBuf>,
    #[command(flatten)]
    net: super::NetArgs,
}

pub fn run(args: Args, paths: &Paths, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    // Read before the VM boots: a bad key must not cost a boot.
    let sign = args
        .sign
        .as_deref()
        .map(ferry_package::SecretKey::load)
        .transpose()?;
    let engine = super::engine(paths)?;
    let net = args.net.choice()?;
    let opts = PackageOptions {
        blueprint: args.blueprint,
        out: args.out,
        memory_mib: args.memory_size,
        cpus: args.cpus,
        accel: args.accel.into(),
        live_timeout: args.live_timeout.map(Duration::from_secs),
        console: super::console(args.console),
        net,
        sign,
    };
    package(&engine, paths, &opts, &ctx.render, &ctx.cancel()?)?;
    Ok(ExitCode::SUCCESS)
}
