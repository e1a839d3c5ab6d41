//! A small typed client for QMP, QEMU's JSON control protocol, on a Unix
//! socket. One reader thread routes replies to their callers by `id` and
//! hands asynchronous events to a callback, so a command issued from one
//! thread never swallows an event another part of ferry waits for.
//!
//! The `qapi` crate was considered; its generated types track QEMU versions
//! closely and pull in an async stack, while ferry issues a dozen commands.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
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
        greeting_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| QmpError::Timeout(Duration::from_secs(10)))?;
        let qmp = Qmp {
            writer: Mutex::new(stream),
            pending,
            next_id: AtomicU64::new(1),
        };
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
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
        let written = self.writer.lock().expect("qmp lock").write_all(&line);
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
