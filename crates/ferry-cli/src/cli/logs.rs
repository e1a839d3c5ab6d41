//! `ferry logs`.

use std::process::ExitCode;

use ferry_runtime::fleet::logs;
use ferry_runtime::Paths;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM's name.
    name: String,
    /// Keep printing what the guest prints, until the VM stops.
    #[arg(short, long)]
    follow: bool,
    /// Show what the VM's supervisor (ferry) logged instead of the guest's console.
    #[arg(long)]
    supervisor: bool,
}

pub fn run(args: Args, paths: &Paths) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    logs(paths, &args.name, args.follow, args.supervisor, &mut out)?;
    Ok(ExitCode::SUCCESS)
}
