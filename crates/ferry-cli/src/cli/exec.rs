//! `ferry exec NAME -- CMD...`.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use ferry_runtime::ops::exec;
use ferry_runtime::Paths;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM's name.
    name: String,
    /// Kill the command after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Send this process's standard input to the command.
    #[arg(short, long)]
    interactive: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub fn run(args: Args, paths: &Paths) -> anyhow::Result<ExitCode> {
    let stdin = if args.interactive && !std::io::stdin().is_terminal() {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Some(buf)
    } else {
        None
    };
    let result = exec(
        paths,
        &args.name,
        args.command,
        stdin,
        args.timeout.map(Duration::from_secs),
    )?;
    std::io::stdout().write_all(&result.stdout)?;
    std::io::stderr().write_all(&result.stderr)?;
    if result.truncated {
        eprintln!("ferry: output was cut at {} MiB per stream", 4);
    }
    if result.timed_out {
        eprintln!("ferry: the command was killed after its --timeout");
    }
    Ok(ExitCode::from(result.exit_code.clamp(0, 255) as u8))
}
