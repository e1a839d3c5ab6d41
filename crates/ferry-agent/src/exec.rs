//! Running a command for the host (`exec`).
//!
//! Output is read from both pipes at once (a command filling one pipe while
//! the agent waits on the other would deadlock), capped at
//! [`MAX_EXEC_OUTPUT`] per stream but drained to the end so the command
//! never blocks on a full pipe. The command gets its own process group: a
//! timeout kills the whole group, shells' children included.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_agent_proto::MAX_EXEC_OUTPUT;

use crate::reaper::{lock, Reaper};

/// After the command exits, how long its output pipes may stay open. They
/// normally close with it; a background process it started that kept them
/// (`daemon &`) would otherwise hold the reply forever.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Exit code of a command that could not be started, as in a shell.
pub const CANNOT_RUN: i32 = 127;

/// What to run.
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in the child's `PATH`.
    pub argv: Vec<String>,
    /// Environment of the command (the agent's is not inherited).
    pub env: Vec<(String, String)>,
    /// Bytes for its stdin; `None` gives it `/dev/null`.
    pub stdin: Option<Vec<u8>>,
    /// Kill it after this long.
    pub timeout: Option<Duration>,
}

/// How a command ended.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Exit code, or `128 + signal`.
    pub exit_code: i32,
    /// Captured standard output.
    pub stdout: Vec<u8>,
    /// Captured standard error.
    pub stderr: Vec<u8>,
    /// Whether either stream was cut at the cap.
    pub truncated: bool,
    /// Whether the command was killed for exceeding its timeout.
    pub timed_out: bool,
}

/// One captured stream, bounded.
#[derive(Debug, Default)]
pub struct Capture {
    data: Vec<u8>,
    truncated: bool,
}

impl Capture {
    /// Appends `chunk`, keeping at most `cap` bytes in all.
    pub fn push(&mut self, chunk: &[u8], cap: usize) {
        let room = cap.saturating_sub(self.data.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
}

/// Runs `request` to completion.
///
/// # Errors
/// Only an empty `argv`, which is the host's mistake. A program that cannot
/// be started is an outcome (exit code 127, the reason on stderr), as in a
/// shell.
pub fn run(reaper: &Reaper, request: ExecRequest) -> Result<ExecOutcome, String> {
    let Some((program, args)) = request.argv.split_first() else {
        return Err("exec needs a program to run (argv is empty)".to_owned());
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(request.env)
        .stdin(if request.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut spawned = match reaper.spawn(&mut command) {
        Ok(spawned) => spawned,
        Err(e) => {
            return Ok(ExecOutcome {
                exit_code: CANNOT_RUN,
                stderr: format!("ferry-agent: cannot run '{program}': {}\n", describe(&e))
                    .into_bytes(),
                ..ExecOutcome::default()
            })
        }
    };
    let pid = spawned.child.id() as i32;

    // Pipes of a child spawned with `Stdio::piped()` are always present.
    let (done_tx, done_rx) = mpsc::channel();
    let stdout = spawned
        .child
        .stdout
        .take()
        .map(|pipe| drain(pipe, done_tx.clone()));
    let stderr = spawned
        .child
        .stderr
        .take()
        .map(|pipe| drain(pipe, done_tx.clone()));
    drop(done_tx);
    if let (Some(mut pipe), Some(bytes)) = (spawned.child.stdin.take(), request.stdin) {
        // A thread of its own, so a command that does not read its input
        // cannot stall the rest. Dropping the pipe closes the command's stdin.
        let feeder = std::thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || {
                // EPIPE when the command exits without reading: not an error.
                let _ = pipe.write_all(&bytes);
            });
        if let Err(e) = feeder {
            info!("cannot feed the command's stdin: {e}");
        }
    }

    let mut timed_out = false;
    let exit_code = match request.timeout {
        Some(timeout) => match spawned.exit.recv_timeout(timeout) {
            Ok(code) => code,
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                reaper.signal_group(pid, libc::SIGKILL);
                spawned.exit.recv().unwrap_or(-1)
            }
            Err(RecvTimeoutError::Disconnected) => -1,
        },
        None => spawned.exit.recv().unwrap_or(-1),
    };

    // Both readers report when their pipe closes; wait for that, but not
    // beyond the grace period.
    let deadline = Instant::now() + OUTPUT_GRACE;
    let mut open = usize::from(stdout.is_some()) + usize::from(stderr.is_some());
    while open > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(()) => open -= 1,
            Err(_) => break,
        }
    }
    let (stdout, stdout_cut) = take(stdout);
    let (stderr, stderr_cut) = take(stderr);
    Ok(ExecOutcome {
        exit_code,
        stdout,
        stderr,
        truncated: stdout_cut || stderr_cut,
        timed_out,
    })
}

/// The error text without std's " (os error N)" suffix, as a shell prints it.
fn describe(error: &std::io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// Reads `pipe` to its end in a thread, into a shared capture; `done` is told
/// at end-of-file.
fn drain(mut pipe: impl Read + Send + 'static, done: Sender<()>) -> Arc<Mutex<Capture>> {
    let capture = Arc::new(Mutex::new(Capture::default()));
    let shared = Arc::clone(&capture);
    let spawned = std::thread::Builder::new()
        .name("exec-output".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => lock(&shared).push(&buf[..n], MAX_EXEC_OUTPUT),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = done.send(());
        });
    if let Err(e) = spawned {
        // Dropping the pipe makes the command see EPIPE instead of hanging.
        info!("cannot read the command's output: {e}");
    }
    capture
}

fn take(capture: Option<Arc<Mutex<Capture>>>) -> (Vec<u8>, bool) {
    capture.map_or((Vec::new(), false), |c| {
        let mut c = lock(&c);
        (std::mem::take(&mut c.data), c.truncated)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reaper::test_reaper;

    fn request(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), crate::agent::CHILD_PATH.into())],
            stdin: None,
            timeout: None,
        }
    }

    #[test]
    fn capture_caps_and_flags() {
        let mut c = Capture::default();
        c.push(b"abc", 5);
        assert!(!c.truncated);
        c.push(b"defg", 5);
        assert_eq!(c.data, b"abcde");
        assert!(c.truncated);
        c.push(b"h", 5);
        assert_eq!(c.data, b"abcde");
        c = Capture::default();
        c.push(b"12345", 5);
        assert!(!c.truncated);
    }

    #[test]
    fn captures_both_streams_and_the_code() {
        let out = run(
            test_reaper(),
            request(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
        )
        .unwrap();
        assert_eq!(out.exit_code, 3);
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert!(!out.truncated && !out.timed_out);
    }

    #[test]
    fn feeds_stdin() {
        let mut req = request(&["cat"]);
        req.stdin = Some(b"hello".to_vec());
        let out = run(test_reaper(), req).unwrap();
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.exit_code, 0);
    }

    #[test]
    fn truncates_big_output_but_drains_it() {
        let cmd = format!("head -c {} /dev/zero", MAX_EXEC_OUTPUT + 100_000);
        let out = run(test_reaper(), request(&["sh", "-c", &cmd])).unwrap();
        assert_eq!(out.exit_code, 0);
        assert_eq!(out.stdout.len(), MAX_EXEC_OUTPUT);
        assert!(out.truncated);
    }

    #[test]
    fn kills_the_group_on_timeout() {
        let mut req = request(&["sh", "-c", "sleep 30; echo never"]);
        req.timeout = Some(Duration::from_millis(200));
        let started = Instant::now();
        let out = run(test_reaper(), req).unwrap();
        assert!(out.timed_out);
        assert_eq!(out.exit_code, 128 + libc::SIGKILL);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn missing_program_is_127() {
        let out = run(test_reaper(), request(&["ferry-no-such-program"])).unwrap();
        assert_eq!(out.exit_code, CANNOT_RUN);
        assert_eq!(
            String::from_utf8(out.stderr).unwrap(),
            "ferry-agent: cannot run 'ferry-no-such-program': No such file or directory\n"
        );
    }

    #[test]
    fn background_children_do_not_hold_the_reply() {
        let started = Instant::now();
        let out = run(
            test_reaper(),
            request(&["sh", "-c", "sleep 3 & echo started"]),
        )
        .unwrap();
        assert_eq!(out.stdout, b"started\n");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn empty_argv_is_an_error() {
        assert!(run(test_reaper(), request(&[])).is_err());
    }
}
