//! `ferry stop`.

use std::process::ExitCode;

use ferry_runtime::fleet::stop;
use ferry_runtime::Paths;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM to stop.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    name: Option<String>,
    /// Every VM.
    #[arg(long)]
    all: bool,
    /// Shut down and drop the state (also a suspended VM's saved state,
    /// and what a crashed VM left) instead of suspending.
    #[arg(long)]
    discard: bool,
}

pub fn run(args: Args, paths: &Paths, ctx: &super::Ctx) -> anyhow::Result<ExitCode> {
    let target = super::target(args.name, args.all);
    stop(paths, &target, args.discard, &ctx.render)?;
    Ok(ExitCode::SUCCESS)
}
