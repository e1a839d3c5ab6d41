//! `ferry inspect`.

use std::path::PathBuf;
use std::process::ExitCode;

use ferry_runtime::package::inspect;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The package file.
    file: PathBuf,
    /// Check every chunk against its sha256.
    #[arg(long)]
    verify: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    inspect(&args.file, args.verify, &mut super::say)?;
    Ok(ExitCode::SUCCESS)
}
