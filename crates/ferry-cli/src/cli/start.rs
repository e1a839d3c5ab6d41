//! `ferry start`.

use std::process::ExitCode;
use std::time::Duration;

use ferry_runtime::fleet::{start, started_line};
use ferry_runtime::Paths;

use super::Ctx;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The suspended VM to resume.
    name: String,
    /// Seconds it may take to be live.
    #[arg(long = "live-timeout", value_name = "S", default_value_t = 60)]
    live_timeout: u64,
}

pub fn run(args: Args, paths: &Paths, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let ferry = std::env::current_exe()?;
    let started = start(
        paths,
        &ferry,
        &args.name,
        Duration::from_secs(args.live_timeout),
        &ctx.cancel()?,
    )?;
    match started {
        Some(s) if ctx.render.json() => {
            use ferry_runtime::EventSink;
            ctx.render.emit(ferry_runtime::Event::Started(s));
        }
        s => ctx.notice(&started_line(&args.name, s.as_ref())),
    }
    Ok(ExitCode::SUCCESS)
}
