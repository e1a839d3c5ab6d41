//! The control socket, `<vm dir>/control.sock`: how other ferry commands
//! (`ferry exec`, `ps`, `stop`) reach a VM's supervisor. One JSON
//! request per line, one JSON reply per line; see `docs/control-api.md`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::Accel;
use serde::{Deserialize, Serialize};

use crate::error::{FileError, VmError};

/// Version of the control API, reported by `status`.
pub const CONTROL_API_VERSION: u32 = 1;

/// A request to a VM's supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ControlRequest {
    /// The VM's [`VmStatus`].
    Status,
    /// Runs a command in the guest through the agent.
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
        /// Standard input (base64).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stdin_b64: Option<String>,
        /// Kill the command after this many milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Stops the VM: suspends it into a package (its state is kept and
    /// `ferry start` resumes it), or with `discard` shuts it down and drops
    /// its state. Answered once done, by every owner (foreground `boot`,
    /// `run` and `peer` too: there it does what Ctrl-C does). A VM still
    /// starting answers `error`.
    Stop {
        /// Shut down and drop the state instead of suspending.
        #[serde(default)]
        discard: bool,
    },
}

/// A supervisor's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ControlReply {
    /// Answer to `status`.
    Status(VmStatus),
    /// Answer to `exec`.
    Exec(ExecOutput),
    /// Answer to `stop`: done; the supervisor exits next.
    Stopped {
        /// `suspended` or `discarded`.
        state: String,
        /// How long it took.
        ms: u64,
        /// Where a suspended VM's state is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        saved: Option<String>,
    },
    /// The request failed.
    Error {
        /// One line saying why.
        message: String,
    },
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Control API version.
    pub api_version: u32,
    /// The VM's name.
    pub name: String,
    /// `booting`, `running` or `stopping`.
    pub state: String,
    /// The supervisor's pid.
    pub pid: u32,
    /// The engine process's pid.
    pub engine_pid: Option<u32>,
    /// The engine process's cgroup directory, when it has one of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Accelerator.
    pub accel: Accel,
    /// Guest memory.
    pub memory_mib: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Whether the service is live.
    pub live: bool,
    /// Seconds since the VM started.
    pub uptime_s: u64,
    /// Where it came from (a blueprint directory, later a package).
    pub source: String,
    /// Its network namespace, if it has a network.
    #[serde(default)]
    pub netns: Option<String>,
    /// Its exposed ports.
    #[serde(default)]
    pub exposes: Vec<ferry_net::ExposeSpec>,
}

/// A finished command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Exit code (128 + signal if killed).
    pub exit_code: i32,
    /// Standard output (base64).
    pub stdout_b64: String,
    /// Standard error (base64).
    pub stderr_b64: String,
    /// Whether output was cut.
    pub truncated: bool,
    /// Whether the command hit its timeout.
    pub timed_out: bool,
}

/// Answers control requests; implemented by the VM supervisor.
pub trait ControlHandler: Send + Sync {
    /// Handles one request.
    fn handle(&self, request: ControlRequest) -> ControlReply;
}

/// A listening control socket. Dropping it stops the listener thread and
/// removes the socket file (a long-lived process, a daemon, keeps no
/// thread per VM it once ran).
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl ControlServer {
    /// Listens on `path`, serving each connection on its own thread.
    pub fn start(path: &Path, handler: Arc<dyn ControlHandler>) -> Result<Self, VmError> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(FileError::at(path))?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { break };
                    // Exec runs as root in the guest: only root and the
                    // user who owns the VM may ask for anything.
                    if let Err(message) = check_peer(&conn) {
                        tracing::warn!("control socket: {message}");
                        refuse(conn, message);
                        continue;
                    }
                    let handler = handler.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || serve(conn, handler.as_ref()));
                }
            })
            .map_err(FileError::at("control thread"))?;
        Ok(Self {
            path: path.to_path_buf(),
            stop,
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the listener, which sees the flag and ends.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The uid of the process at the other end of `conn` (`SO_PEERCRED`: what
/// the kernel recorded when it connected, which it cannot forge).
pub(crate) fn peer_uid(conn: &UnixStream) -> std::io::Result<u32> {
    use std::os::unix::io::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket `conn` owns, writing at most `len`
    // bytes into `cred`, a live `ucred` of exactly that size.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cred.uid)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Accepts root and the uid this process runs as; refuses anyone else,
/// saying why.
fn check_peer(conn: &UnixStream) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let owner = unsafe { libc::geteuid() };
    match peer_uid(conn) {
        Ok(uid) if uid == 0 || uid == owner => Ok(()),
        Ok(uid) => Err(format!(
            "refused a connection from uid {uid}: only root and the VM's owner (uid {owner}) may use it"
        )),
        Err(e) => Err(format!("refused a connection whose uid is unknown ({e})")),
    }
}

/// Answers a refused caller with one error reply and closes.
fn refuse(mut conn: UnixStream, message: String) {
    let mut out = serde_json::to_vec(&ControlReply::Error { message }).expect("json");
    out.push(b'\n');
    answer_unread(&mut conn, &out);
}

/// Writes `answer` to a caller whose request was not read (it is refused
/// before), then takes in that request, up to its first line, 64 KiB or
/// 1 s, before the connection closes: a client that sends before it reads
/// would otherwise see its send fail (a broken pipe) instead of the answer.
pub(crate) fn answer_unread(conn: &mut UnixStream, answer: &[u8]) {
    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
    if conn.write_all(answer).is_err() {
        return;
    }
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let mut request = Vec::new();
    let _ = BufReader::new(conn.take(64 * 1024)).read_until(b'\n', &mut request);
}

fn serve(conn: UnixStream, handler: &dyn ControlHandler) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<ControlRequest>(&line) {
            Ok(req) => handler.handle(req),
            Err(e) => ControlReply::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut out = serde_json::to_vec(&reply).expect("json");
        out.push(b'\n');
        if writer.write_all(&out).is_err() {
            break;
        }
    }
}

/// Sends one request to the control socket at `path` and waits up to
/// `timeout` for the reply.
pub fn call(
    path: &Path,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, VmError> {
    let err = |detail: String| VmError::Control {
        path: path.to_path_buf(),
        detail,
    };
    let mut conn = UnixStream::connect(path).map_err(|e| err(format!("cannot connect: {e}")))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| err(e.to_string()))?;
    let mut line = serde_json::to_vec(request).expect("json");
    line.push(b'\n');
    // A refused caller (another uid) is answered before its request is
    // read, and the connection closed: the send may fail, but the answer is
    // already waiting and says why.
    let sent = conn.write_all(&line);
    let mut reply = String::new();
    let read = BufReader::new(conn).read_line(&mut reply);
    match (read, sent) {
        (Ok(n), _) if n > 0 => {}
        (_, Err(e)) => return Err(err(format!("cannot send: {e}"))),
        (Err(e), Ok(())) => return Err(err(format!("no reply: {e}"))),
        (Ok(_), Ok(())) => {}
    }
    if reply.is_empty() {
        return Err(err(
            "the supervisor closed the connection without answering".into(),
        ));
    }
    serde_json::from_str(&reply).map_err(|e| err(format!("bad reply: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl ControlHandler for Echo {
        fn handle(&self, request: ControlRequest) -> ControlReply {
            ControlReply::Error {
                message: format!("{request:?}"),
            }
        }
    }

    /// Both tests start a server in this one process and one counts the
    /// process's "control" threads: they take turns, or the count races.
    static SERVERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn control_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "control")
            })
            .count()
    }

    /// A caller of another uid (nobody, 65534) is refused with one line
    /// and its request never reaches the handler; root is served. The
    /// socket is made writable for all here so that only `SO_PEERCRED`
    /// stands in the way (a VM's socket is also inside its 0700
    /// directory). Checked to fail without the defence by skipping
    /// `check_peer` once: nobody then got `Status` echoed.
    #[test]
    fn only_root_and_the_owner_may_use_the_control_socket() {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        // Not skipped without root: a skip would pass without checking.
        assert!(
            root,
            "this test switches a client to another uid, which needs root: run the tests as root"
        );
        let _turn = SERVERS.lock().unwrap_or_else(|e| e.into_inner());
        let before = control_threads();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("control.sock");
        let server = ControlServer::start(&path, Arc::new(Echo)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let client = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(b'{"op":"status"}\n')
print(s.makefile().readline().strip())
"#;
        let out = std::process::Command::new("python3")
            .args(["-c", client])
            .arg(&path)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let reply = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{reply} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reply: ControlReply = serde_json::from_str(reply.trim()).unwrap();
        match reply {
            ControlReply::Error { message } => assert!(
                message.starts_with(
                    "refused a connection from uid 65534: only root and the VM's owner"
                ),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
        // Root (the owner here) is served.
        let reply = call(&path, &ControlRequest::Status, Duration::from_secs(5)).unwrap();
        assert_eq!(
            reply,
            ControlReply::Error {
                message: "Status".into()
            }
        );
        drop(server);
        // The next test counts threads: this listener's must be gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while control_threads() > before && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_dropped_server_leaves_no_thread_and_no_socket() {
        let _turn = SERVERS.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let before = control_threads();
        let server = ControlServer::start(&path, Arc::new(Echo)).unwrap();
        let reply = call(&path, &ControlRequest::Status, Duration::from_secs(5)).unwrap();
        assert_eq!(
            reply,
            ControlReply::Error {
                message: "Status".into()
            }
        );
        assert_eq!(control_threads(), before + 1);
        drop(server);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while control_threads() > before && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(control_threads(), before, "the listener thread ended");
        assert!(!path.exists());
        assert!(call(&path, &ControlRequest::Status, Duration::from_secs(1)).is_err());
    }
}
