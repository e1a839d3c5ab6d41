//! A shell on the serial console.
//!
//! `ferry run --enable-input` forwards the host's terminal to the guest's
//! serial console, as Drafter does; something in the guest must read it.
//! The agent (as PID 1) keeps a shell there, restarting it when it exits.
//! Without forwarded input the shell just waits, costing nothing.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::agent::Agent;

/// The serial console device.
const CONSOLE: &str = "/dev/ttyS0";

/// Starts the thread that keeps a shell on the console.
pub fn start(agent: &Arc<Agent>) {
    let agent = Arc::clone(agent);
    let spawned = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || loop {
            if let Err(e) = run_shell(&agent) {
                info!("no shell on the console: {e}");
                return;
            }
            // Typing `exit` ends the shell; a new one takes its place.
            std::thread::sleep(Duration::from_secs(1));
        });
    if let Err(e) = spawned {
        info!("cannot start the console thread: {e}");
    }
}

/// Runs one shell on the console until it exits.
fn run_shell(agent: &Agent) -> std::io::Result<()> {
    let tty = OpenOptions::new().read(true).write(true).open(CONSOLE)?;
    let shell = ["/bin/sh", "/ferry/bin/sh"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| std::io::Error::other("no /bin/sh or /ferry/bin/sh"))?;
    let mut command = Command::new(shell);
    command
        .env_clear()
        .envs(agent.child_env())
        .env("PS1", "ferry# ")
        .env("HOME", "/root")
        .current_dir("/")
        .stdin(Stdio::from(tty.try_clone()?))
        .stdout(Stdio::from(tty.try_clone()?))
        .stderr(Stdio::from(tty))
        .process_group(0);
    let spawned = agent.reaper.spawn(&mut command)?;
    let _ = spawned.exit.recv();
    Ok(())
}
