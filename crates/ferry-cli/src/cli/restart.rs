//! `ferry restart`.

use std::process::ExitCode;
use std::time::Duration;

use ferry_runtime::fleet::restart;
use ferry_runtime::Paths;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM to suspend and resume.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    name: Option<String>,
    /// Every running VM.
    #[arg(long)]
    all: bool,
    /// Seconds each may take to be live again.
    #[arg(long = "live-timeout", value_name = "S", default_value_t = 60)]
    live_timeout: u64,
}

pub fn run(args: Args, paths: &Paths, ctx: &super::Ctx) -> anyhow::Result<ExitCode> {
    let ferry = std::env::current_exe()?;
    let target = super::target(args.name, args.all);
    restart(
        paths,
        &ferry,
        &target,
        Duration::from_secs(args.live_timeout),
        &ctx.render,
    )?;
    Ok(ExitCode::SUCCESS)
}
