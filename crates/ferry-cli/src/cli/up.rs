//! `ferry up`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ferry_runtime::fleet::{up, UpOptions};
use ferry_runtime::Paths;

use super::{AccelArg, Ctx};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The package to clone (from 'ferry package').
    #[arg(long)]
    package: PathBuf,
    /// How many copy-on-write clones to start.
    #[arg(short = 'n', value_name = "N")]
    count: u64,
    /// Name the clones PREFIX-0 … PREFIX-(N-1); also the fleet's name
    /// (default: the package's recipe).
    #[arg(long = "name-prefix", value_name = "PREFIX")]
    name_prefix: Option<String>,
    /// Expose clone i's service on host port PORT+i (default: ports the
    /// kernel picks; 'ferry ps' shows them).
    #[arg(long = "expose-base", value_name = "PORT")]
    expose_base: Option<u16>,
    /// The guest port to expose (default: the package's TCP liveness port).
    #[arg(long = "guest-port", value_name = "P")]
    guest_port: Option<u16>,
    /// The host address the exposed ports listen on.
    #[arg(
        long = "expose-address",
        value_name = "ADDR",
        default_value = "127.0.0.1"
    )]
    expose_address: IpAddr,
    /// Accelerator; must match the one the package was made with.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,
    /// Seconds each clone may take to be live.
    #[arg(long = "live-timeout", value_name = "S", default_value_t = 60)]
    live_timeout: u64,
    #[command(flatten)]
    trust: super::TrustArgs,
}

pub fn run(args: Args, paths: &Paths, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let opts = UpOptions {
        package: args.package,
        count: args.count,
        name_prefix: args.name_prefix,
        expose_base: args.expose_base,
        guest_port: args.guest_port,
        host: args.expose_address,
        accel: args.accel.into(),
        live_timeout: Duration::from_secs(args.live_timeout),
        ferry: std::env::current_exe()?,
        trust: args.trust.keys()?,
    };
    up(paths, &opts, &ctx.render, &ctx.cancel()?)?;
    Ok(ExitCode::SUCCESS)
}
