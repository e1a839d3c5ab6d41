//! A small typed client for QMP, QEMU's JSON control protocol, on a Unix
//! socket. One reader thread routes replies to their callers by `id` and
//! hands asynchronous events to a callback, so a command issued from one
//! thread never swallows an event another part of ferry waits for.
//!
//! The `qapi` crate was considered; its generated types track QEMU versions
//! closely and pull in an async stack, while ferry issues a dozen commands.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// QEMU answered with an error.
    #[error("{class}: {desc}")]
    Qemu {
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer in time.
    #[error("no answer from QEMU within {0:?}")]
    Timeout(Duration),
    /// The socket is closed: QEMU exited.
    #[error("QEMU closed its control socket")]
    Closed,
    /// Connecting or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An answer not of the shape the command's schema gives.
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

type Pending = Arc<Mutex<HashMap<u64, Sender<Result<Value, QmpError>>>>>;

/// An asynchronous QMP event: its name and data.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    /// E.g. `SHUTDOWN`, `STOP`, `RESUME`.
    pub name: String,
    /// The event's `data` member.
    pub data: Value,
}

/// A connected QMP session (capabilities negotiated).
pub struct Qmp {
    writer: Mutex<UnixStream>,
    pending: Pending,
    next_id: AtomicU64,
}

impl Qmp {
    /// Connects to `path`, retrying until `deadline` while `alive()` says the
    /// QEMU process is still there, and negotiates capabilities.
    pub fn connect(
        path: &Path,
        deadline: Instant,
        alive: &dyn Fn() -> bool,
        on_event: impl Fn(QmpEvent) + Send + 'static,
    ) -> Result<Self, QmpError> {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if Instant::now() > deadline {
                        return Err(QmpError::Io(e));
                    }
                    if !alive() {
                        return Err(QmpError::Closed);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        let reader = stream.try_clone()?;
        let pending: Pending = Arc::default();
        let (greeting_tx, greeting_rx) = channel();
        let routes = pending.clone();
        std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || read_loop(reader, routes, greeting_tx, on_event))?;
        // A socket ferry bound itself accepts the connection before QEMU
        // is up: the greeting gets the rest of the deadline, at least 10 s.
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(10));
        greeting_rx
            .recv_timeout(wait)
            .map_err(|_| QmpError::Timeout(wait))?;
        let qmp = Qmp {
            writer: Mutex::new(stream),
            pending,
            next_id: AtomicU64::new(1),
        };
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Hands `fd` to QEMU under `name` (QMP `getfd`, the descriptor sent
    /// with the command as `SCM_RIGHTS`): a sandboxed QEMU that may not
    /// spawn or open ferry's paths reads and writes what ferry opened,
    /// e.g. as a migration URI `fd:NAME`.
    pub fn send_fd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_inner(
            "getfd",
            json!({ "fdname": name }),
            Some(fd),
            Duration::from_secs(30),
        )
        .map(|_| ())
    }

    /// Puts `fd` in a new fd set of QEMU's (QMP `add-fd`, the descriptor
    /// sent as `SCM_RIGHTS`) and returns the set's id: a block node opens
    /// `/dev/fdset/ID`, which QEMU serves by duplicating the descriptor
    /// (a `getfd` name is for migration, chardevs and sockets only).
    pub fn add_fd(&self, fd: BorrowedFd<'_>, opaque: &str) -> Result<u64, QmpError> {
        let answer = self.execute_inner(
            "add-fd",
            json!({ "opaque": opaque }),
            Some(fd),
            Duration::from_secs(30),
        )?;
        answer["fdset-id"]
            .as_u64()
            .ok_or_else(|| QmpError::Protocol(format!("add-fd answered {answer}")))
    }

    /// Runs a command and returns its `return` value. Waits up to 30 s.
    pub fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, Duration::from_secs(30))
    }

    /// Runs a command, waiting up to `timeout` for the answer.
    pub fn execute_timeout(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.execute_inner(command, arguments, None, timeout)
    }

    fn execute_inner(
        &self,
        command: &str,
        arguments: Value,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel();
        self.pending.lock().expect("qmp lock").insert(id, tx);
        let mut line = serde_json::to_vec(&json!({
            "execute": command,
            "arguments": arguments,
            "id": id,
        }))
        .expect("json");
        line.push(b'\n');
        let written = {
            let mut writer = self.writer.lock().expect("qmp lock");
            match fd {
                Some(fd) => send_with_fd(&writer, &line, fd),
                None => writer.write_all(&line),
            }
        };
        if let Err(e) = written {
            self.pending.lock().expect("qmp lock").remove(&id);
            return Err(if e.kind() == std::io::ErrorKind::BrokenPipe {
                QmpError::Closed
            } else {
                QmpError::Io(e)
            });
        }
        match rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                self.pending.lock().expect("qmp lock").remove(&id);
                Err(QmpError::Timeout(timeout))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(QmpError::Closed),
        }
    }
}

/// Writes `line` with `fd` attached (`SCM_RIGHTS`), the rest of the line
/// without, as QEMU takes the descriptor with the bytes it arrives with.
fn send_with_fd(stream: &UnixStream, line: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let raw = fd.as_raw_fd();
    let space = 64usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: line.as_ptr() as *mut libc::c_void,
        iov_len: line.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen =
        unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as _;
    assert!(msg.msg_controllen as usize <= space);
    // SAFETY: msg_control points at `control`, large enough for one header
    // with one int (checked above); CMSG_FIRSTHDR/CMSG_DATA stay inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::c_int, raw);
    }
    // SAFETY: msg points at live buffers (line, control) for the call.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let rest = &line[sent as usize..];
    let mut stream = stream;
    stream.write_all(rest)
}

fn read_loop(
    stream: UnixStream,
    pending: Pending,
    greeting: Sender<()>,
    on_event: impl Fn(QmpEvent),
) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(line, "unparseable QMP line");
            continue;
        };
        if msg.get("QMP").is_some() {
            let _ = greeting.send(());
        } else if let Some(name) = msg.get("event").and_then(Value::as_str) {
            on_event(QmpEvent {
                name: name.to_string(),
                data: msg.get("data").cloned().unwrap_or(Value::Null),
            });
        } else if let Some(id) = msg.get("id").and_then(Value::as_u64) {
            let result = if let Some(ret) = msg.get("return") {
                Ok(ret.clone())
            } else {
                let err = msg.get("error").cloned().unwrap_or(Value::Null);
                Err(QmpError::Qemu {
                    class: err["class"].as_str().unwrap_or("Error").to_string(),
                    desc: err["desc"].as_str().unwrap_or("unknown error").to_string(),
                })
            };
            if let Some(tx) = pending.lock().expect("qmp lock").remove(&id) {
                let _ = tx.send(result);
            }
        }
    }
    // QEMU is gone: fail everyone still waiting.
    for (_, tx) in pending.lock().expect("qmp lock").drain() {
        let _ = tx.send(Err(QmpError::Closed));
    }
}
