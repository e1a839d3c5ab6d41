//! `ferry peer --detach`: the same peer, run by a `ferry peer` process of
//! its own in a new session, with its output in a log file.
//!
//! A peer's VM has no supervisor besides the peer process itself (which
//! also serves migrations), so the detached process is simply `ferry peer`
//! without `--detach`. `ferry ps` lists its VM like any running VM,
//! `ferry logs` shows its console, and `ferry stop` sends the process
//! SIGTERM, which does what Ctrl-C does in the foreground: the VM is saved
//! into `--save`. A VM that migrates away ends the process by itself.
//!
//! The log, `$FERRY_STATE/logs/peer-<name>.log`, outlives the process, so
//! that why a detached peer ended can still be read.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Paths, RuntimeError};

/// A peer that is running detached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachedPeer {
    /// Its VM's name.
    pub name: String,
    /// The peer process.
    pub pid: u32,
    /// Its log.
    pub log: PathBuf,
    /// What it printed until its VM ran.
    pub lines: Vec<String>,
}

/// The directory of detached peers' logs.
pub fn logs_dir(paths: &Paths) -> PathBuf {
    paths.state.join("logs")
}

/// Starts `ferry` (the binary at `ferry`) with `args` (a `peer` command
/// line without `--detach`) in a new session and waits up to `timeout` for
/// its VM to run. On Ctrl-C (or SIGTERM) meanwhile, or when the time is
/// up, the peer is sent SIGTERM (what Ctrl-C would do to it) and this fails.
pub fn detach_peer(
    ferry: &Path,
    paths: &Paths,
    args: &[OsString],
    timeout: Duration,
) -> Result<DetachedPeer, RuntimeError> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let mut handlers = Vec::new();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        handlers.push(
            signal_hook::flag::register(sig, interrupted.clone())
                .map_err(RuntimeError::io("signal handler"))?,
        );
    }
    let result = start_and_wait(ferry, paths, args, timeout, &interrupted);
    for id in handlers {
        signal_hook::low_level::unregister(id);
    }
    result
}

fn start_and_wait(
    ferry: &Path,
    paths: &Paths,
    args: &[OsString],
    timeout: Duration,
    interrupted: &AtomicBool,
) -> Result<DetachedPeer, RuntimeError> {
    let dir = logs_dir(paths);
    std::fs::create_dir_all(&dir).map_err(RuntimeError::io(&dir))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let starting = dir.join(format!(".peer-starting-{}-{nanos}.log", std::process::id()));
    let log = File::create(&starting).map_err(RuntimeError::io(&starting))?;
    let err = log.try_clone().map_err(RuntimeError::io(&starting))?;
    let mut cmd = Command::new(ferry);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err));
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls setsid, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // Its own session: a Ctrl-C in this terminal does not reach it.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(RuntimeError::io(format!("starting {}", ferry.display())))?;
    let pid = child.id();
    let deadline = Instant::now() + timeout;
    let mut reader = File::open(&starting).map_err(RuntimeError::io(&starting))?;
    let mut text = String::new();
    let stop_child = || {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    };
    loop {
        read_new(&mut reader, &mut text);
        if let Some(name) = running_name(&text) {
            let kept = dir.join(format!("peer-{name}.log"));
            let log = match std::fs::rename(&starting, &kept) {
                Ok(()) => kept,
                Err(_) => starting,
            };
            return Ok(DetachedPeer {
                name,
                pid,
                log,
                lines: text.lines().map(String::from).collect(),
            });
        }
        if let Ok(Some(status)) = child.try_wait() {
            read_new(&mut reader, &mut text);
            let line = text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("ferry: "))
                .unwrap_or("it exited without saying why")
                .to_string();
            let _ = std::fs::remove_file(&starting);
            return Err(RuntimeError::DetachedStart {
                name: "peer".into(),
                code: status.code().map_or(1, |c| c.clamp(1, 255) as u8),
                message: line,
            });
        }
        if interrupted.load(Ordering::SeqCst) {
            stop_child();
            eprintln!(
                "ferry: the detached peer (pid {pid}) was told to stop; its log is {}",
                starting.display()
            );
            let _ = child.wait();
            return Err(RuntimeError::Interrupted);
        }
        if Instant::now() > deadline {
            stop_child();
            return Err(RuntimeError::DetachedStart {
                name: "peer".into(),
                code: 5,
                message: format!(
                    "its VM did not run within {} s; it was told to stop (pid {pid}, log {})",
                    timeout.as_secs(),
                    starting.display()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_new(reader: &mut File, text: &mut String) {
    let mut buf = Vec::new();
    // Reads on from where the last call stopped.
    if reader.read_to_end(&mut buf).is_ok() {
        text.push_str(&String::from_utf8_lossy(&buf));
    }
}

/// The VM's name once the peer said it runs (`VM 'NAME' is running here`).
fn running_name(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix("VM '")?;
        let (name, tail) = rest.split_once('\'')?;
        tail.starts_with(" is running here")
            .then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_names_the_vm() {
        let text = "accel: tcg\nlive in 900 ms\nVM 'kv-1' is running here; Ctrl-C suspends it into kv.ferry\n";
        assert_eq!(running_name(text).as_deref(), Some("kv-1"));
        assert_eq!(running_name("VM 'kv' is paused\n"), None);
        assert_eq!(running_name("serving VM 'kv' to peers\n"), None);
    }
}
