//! `ferry rm`.

use std::process::ExitCode;

use ferry_runtime::fleet::rm;
use ferry_runtime::Paths;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM (suspended, stopped or crashed) whose state to delete.
    name: String,
}

pub fn run(args: Args, paths: &Paths, ctx: &super::Ctx) -> anyhow::Result<ExitCode> {
    use ferry_runtime::EventSink;
    ctx.render
        .emit(ferry_runtime::Event::VmChanged(rm(paths, &args.name)?));
    Ok(ExitCode::SUCCESS)
}
