//! `ferry watch [NAME... | --all] [--on-error shell | --on-error exec CMD...]`:
//! one line per error in the followed VMs (`[VM NAME error] what`), and
//! optionally a shell in (or a command run in) the VM that failed.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use ferry_runtime::guest_errors::{GuestErrorKind, Watch, WatchSet};
use ferry_runtime::{Paths, RuntimeError};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VMs to follow.
    names: Vec<String>,
    /// Follow every VM, also those started later.
    #[arg(long, conflicts_with = "names")]
    all: bool,
    /// What to do on an error: `shell` opens a shell in the first VM that
    /// fails (and ends the watch with the shell); `exec CMD...` runs CMD in
    /// each failing VM and goes on watching.
    #[arg(long = "on-error", num_args = 1.., allow_hyphen_values = true, value_name = "shell | exec CMD")]
    on_error: Vec<String>,
}

enum OnError {
    Report,
    Shell,
    Exec(Vec<String>),
}

/// The one line an error in VM `name`'s guest is shown as, here, in
/// `ferry run`'s output and in `ferry cluster watch`.
pub fn error_line(name: &str, what: &str) -> String {
    format!("[VM {name} error] {what}")
}

pub fn run(args: Args, paths: &Paths) -> anyhow::Result<ExitCode> {
    let on_error = match args.on_error.split_first() {
        None => OnError::Report,
        Some((what, rest)) if what == "shell" && rest.is_empty() => OnError::Shell,
        Some((what, rest)) if what == "exec" && !rest.is_empty() => OnError::Exec(rest.to_vec()),
        Some(_) => {
            return Err(RuntimeError::BadOption(
                "--on-error takes 'shell' or 'exec CMD [ARGS...]'".into(),
            )
            .into())
        }
    };
    let set = match (args.all, args.names.is_empty()) {
        (true, _) => WatchSet::All,
        (false, false) => WatchSet::Names(args.names.clone()),
        (false, true) => {
            return Err(
                RuntimeError::BadOption("name the VMs to watch, or give --all".into()).into(),
            )
        }
    };
    let mut watch = Watch::new(paths, set)?;
    eprintln!(
        "watching {}; Ctrl-C ends",
        match &args.all {
            true => "every VM".to_string(),
            false => args.names.join(", "),
        }
    );
    loop {
        for (name, error) in watch.poll() {
            {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", error_line(&name, &error.what))?;
                out.flush()?;
            }
            match &on_error {
                OnError::Report => {}
                OnError::Shell => {
                    let dir = paths.vms().join(&name);
                    eprintln!("--- last console lines of {name} ---");
                    for line in ferry_runtime::fleet::console_lines(&dir, 15) {
                        eprintln!("{line}");
                    }
                    if error.kind == GuestErrorKind::ServiceExited {
                        eprintln!("--- the service: {} ---", error.what);
                    }
                    eprintln!("--- a shell in {name} (exit it to end the watch) ---");
                    return super::shell::run(super::shell::Args::interactive(&name), paths);
                }
                OnError::Exec(argv) => {
                    let code = super::shell::run(super::shell::Args::command(&name, argv), paths)?;
                    eprintln!("[VM {name}] {} ended: {code:?}", argv.join(" "));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
