//! `ferry shell NAME [-- CMD...]`: a shell (or a command) in a running VM,
//! over its shell channel (`docs/shell.md`). With a terminal on both ends
//! the local terminal is put in raw mode and the guest gets a PTY of the
//! same size; otherwise stdin, stdout and stderr are pipes.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use ferry_runtime::shell::{connect, OpenRequest, ShellError, ShellOutput};
use ferry_runtime::Paths;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM's name.
    name: String,
    /// Give the session a terminal even when stdin or stdout is not one.
    #[arg(short = 't', long, conflicts_with = "no_tty")]
    tty: bool,
    /// Never give the session a terminal (stdin, stdout, stderr as pipes).
    #[arg(short = 'T', long)]
    no_tty: bool,
    /// Run this command instead of an interactive shell and exit with its
    /// code (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
}

impl Args {
    /// An interactive shell in `name` (`ferry watch --on-error shell`).
    pub fn interactive(name: &str) -> Self {
        Self {
            name: name.to_string(),
            tty: false,
            no_tty: false,
            command: Vec::new(),
        }
    }

    /// `command` in `name`, without a terminal (`ferry watch --on-error exec`).
    pub fn command(name: &str, command: &[String]) -> Self {
        Self {
            name: name.to_string(),
            tty: false,
            no_tty: true,
            command: command.to_vec(),
        }
    }
}

pub fn run(args: Args, paths: &Paths) -> anyhow::Result<ExitCode> {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let tty = !args.no_tty && (args.tty || (stdin.is_terminal() && stdout.is_terminal()));
    let (rows, cols) = terminal_size(stdout.as_raw_fd())
        .or_else(|| terminal_size(stdin.as_raw_fd()))
        .unwrap_or((24, 80));
    let argv = (!args.command.is_empty()).then(|| args.command.clone());
    let open = OpenRequest {
        argv: argv.clone(),
        tty,
        rows,
        cols,
        term: std::env::var("TERM").ok(),
    };
    let mut session = match connect(paths, &args.name, open) {
        Ok(s) => s,
        Err(ShellError::NoShellPort { name, .. }) if argv.is_some() => {
            // A VM from a package made before the shell channel: the
            // agent's exec still runs a command (no terminal, no streaming).
            eprintln!(
                "ferry: note: VM '{name}' has no shell channel (its package predates it); running the command through the guest agent instead, without a terminal; re-package it for 'ferry shell'"
            );
            let mut input = Vec::new();
            if !stdin.is_terminal() {
                stdin.lock().read_to_end(&mut input)?;
            }
            let result = ferry_runtime::ops::exec(
                paths,
                &name,
                args.command,
                (!input.is_empty()).then_some(input),
                None,
            )?;
            std::io::stdout().write_all(&result.stdout)?;
            std::io::stderr().write_all(&result.stderr)?;
            return Ok(ExitCode::from(result.exit_code.clamp(0, 255) as u8));
        }
        Err(ShellError::Guest(message)) if argv.is_some() => {
            // As a shell does for a command it cannot run.
            eprintln!("ferry: {message}");
            return Ok(ExitCode::from(127));
        }
        Err(e) => return Err(e.into()),
    };
    let input = session.input()?;
    session.keep_alive()?;
    // Raw mode from here on; restored when `_raw` drops, before any exit.
    let _raw = if tty && stdin.is_terminal() {
        RawMode::enter(stdin.as_raw_fd())
    } else {
        None
    };
    if tty {
        let resize = input.clone();
        let fd = if stdout.is_terminal() {
            stdout.as_raw_fd()
        } else {
            stdin.as_raw_fd()
        };
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGWINCH])?;
        std::thread::Builder::new()
            .name("sigwinch".into())
            .spawn(move || {
                for _ in signals.forever() {
                    if let Some((rows, cols)) = terminal_size(fd) {
                        if resize.resize(rows, cols).is_err() {
                            break;
                        }
                    }
                }
            })?;
    }
    let feed = input.clone();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = feed.eof();
                        break;
                    }
                    Ok(n) => {
                        if feed.input(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        })?;
    let mut out = std::io::stdout().lock();
    let code = loop {
        match session.recv() {
            Some(ShellOutput::Stdout(data)) => {
                out.write_all(&data)?;
                out.flush()?;
            }
            Some(ShellOutput::Stderr(data)) => {
                let mut err = std::io::stderr().lock();
                err.write_all(&data)?;
                err.flush()?;
            }
            Some(ShellOutput::Exit(code)) => break code,
            Some(ShellOutput::Pong(_)) => {}
            None if session.went_silent() => {
                drop(_raw);
                return Err(ShellError::Timeout {
                    name: args.name.clone(),
                    what: "not even a ping, while the session was open".into(),
                    secs: ferry_runtime::shell::GUEST_SILENCE_TIMEOUT.as_secs(),
                }
                .into());
            }
            None => {
                drop(_raw);
                anyhow::bail!(
                    "the shell channel of VM '{}' closed before the command ended (the VM stopped?)",
                    args.name
                );
            }
        }
    };
    drop(_raw);
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// The terminal's (rows, cols), if `fd` is a terminal.
fn terminal_size(fd: i32) -> Option<(u16, u16)> {
    // SAFETY: an all-zero winsize is valid; TIOCGWINSZ only writes it.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: `size` is a valid, writable winsize for the call.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// The local terminal in raw mode: keys (Ctrl-C, Ctrl-Z, arrows) go to the
/// guest as bytes. Dropping it restores the old mode.
struct RawMode {
    fd: i32,
    old: libc::termios,
}

impl RawMode {
    fn enter(fd: i32) -> Option<Self> {
        // SAFETY: an all-zero termios is valid; tcgetattr fills it in.
        let mut old: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `old` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut old) } != 0 {
            return None;
        }
        let mut raw = old;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios the call only reads.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { fd, old })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: `old` is the valid termios read in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.old) };
    }
}
