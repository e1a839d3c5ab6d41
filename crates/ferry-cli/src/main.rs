//! `ferry`: the command-line front end. Each subcommand lives in
//! `cli/<verb>.rs`, turns its arguments into options and calls the library;
//! `cli/render.rs` turns the library's events into lines.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let started = std::time::Instant::now();
    let args = cli::Cli::parse();
    let filter = std::env::var("FERRY_LOG")
        .unwrap_or_else(|_| if args.verbose { "info" } else { "warn" }.to_string());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // A detached VM's supervisor logs to a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let ctx = cli::Ctx::new(args.json);
    match cli::run(args, started, &ctx) {
        Ok(code) => code,
        Err(e) => {
            let class = cli::exit_class(&e);
            let message = cli::one_line(&e);
            eprintln!("ferry: {message}");
            ctx.render.error(class.name(), class.code(), &message);
            ExitCode::from(class.code())
        }
    }
}
