//! `ferry clean`.

use std::process::ExitCode;

use ferry_runtime::fleet::clean;
use ferry_runtime::Paths;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args, paths: &Paths, ctx: &super::Ctx) -> anyhow::Result<ExitCode> {
    clean(paths, &ctx.render)?;
    Ok(ExitCode::SUCCESS)
}
