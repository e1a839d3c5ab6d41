//! The host side of the guest agent protocol (see `docs/agent-protocol.md`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_agent_proto::{decode, encode, Decoder, Frame, GuestStatus, Reply, Request};

use crate::error::{FileError, VmError};

/// Something the agent said without being asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The service passed its liveness check.
    Live {
        /// Guest uptime when it did.
        uptime_ms: u64,
    },
    /// The guest's status changed.
    Status(GuestStatus),
    /// The channel closed (the VM stopped, or the engine dropped us).
    Disconnected,
}

type Pending = Arc<Mutex<HashMap<u64, Sender<Reply>>>>;

/// A connection to one guest's agent. Requests may be issued from several
/// threads at once; replies are matched by id.
pub struct AgentClient {
    writer: Mutex<UnixStream>,
    pending: Pending,
    next_id: AtomicU64,
}

impl AgentClient {
    /// Wraps a connected stream; `on_event` receives unsolicited messages.
    pub fn new(
        stream: UnixStream,
        on_event: impl Fn(AgentEvent) + Send + 'static,
    ) -> Result<Self, VmError> {
        // A guest that stops reading must not wedge ferry: writes give up.
        stream
            .set_write_timeout(Some(Duration::from_secs(2)))
            .map_err(FileError::at("agent socket"))?;
        let reader = stream.try_clone().map_err(FileError::at("agent socket"))?;
        let pending: Pending = Arc::default();
        let routes = pending.clone();
        std::thread::Builder::new()
            .name("agent-reader".into())
            .spawn(move || read_loop(reader, routes, on_event))
            .map_err(FileError::at("agent reader thread"))?;
        Ok(Self {
            writer: Mutex::new(stream),
            pending,
            // Ids start high and random-ish per connection so that a stale
            // reply from an earlier connection cannot match a new request.
            next_id: AtomicU64::new(1 + (rand::random::<u32>() as u64) * 1000),
        })
    }

    /// Sends a request and waits up to `timeout` for its reply. An agent
    /// `error` reply becomes [`VmError::Agent`].
    pub fn request(&self, request: &Request, timeout: Duration) -> Result<Reply, VmError> {
        let (tx, rx) = channel();
        let id = self.send(request, tx)?;
        let reply = match rx.recv_timeout(timeout) {
            Ok(reply) => reply,
            Err(e) => {
                self.pending.lock().expect("agent lock").remove(&id);
                return Err(match e {
                    RecvTimeoutError::Timeout => VmError::Agent(format!(
                        "no answer to '{}' within {} ms",
                        request_name(request),
                        timeout.as_millis()
                    )),
                    RecvTimeoutError::Disconnected => {
                        VmError::Agent("the agent channel closed".into())
                    }
                });
            }
        };
        match reply {
            Reply::Error { message } => Err(VmError::Agent(message)),
            other => Ok(other),
        }
    }

    /// Says hello until the agent answers, resending every 200 ms: the agent
    /// may not have opened its port yet, and whatever it sent before ferry
    /// connected is gone. Returns the agent's protocol version and status.
    pub fn hello(&self, timeout: Duration) -> Result<(u32, GuestStatus), VmError> {
        let deadline = Instant::now() + timeout;
        let (tx, rx) = channel();
        let mut ids = Vec::new();
        let hello = Request::Hello {
            host_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let result = loop {
            ids.push(self.send(&hello, tx.clone())?);
            let wait =
                Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now()));
            match rx.recv_timeout(wait) {
                Ok(Reply::Hello {
                    protocol_version,
                    status,
                    ..
                }) => break Ok((protocol_version, status)),
                Ok(Reply::Error { message }) => break Err(VmError::Agent(message)),
                Ok(other) => {
                    break Err(VmError::Agent(format!(
                        "unexpected answer to hello: {other:?}"
                    )))
                }
                Err(_) if Instant::now() >= deadline => {
                    break Err(VmError::Agent("no answer to hello".into()))
                }
                Err(_) => {}
            }
        };
        let mut pending = self.pending.lock().expect("agent lock");
        for id in ids {
            pending.remove(&id);
        }
        result
    }

    /// Tells the guest its fleet (`set-fleet`, protocol minor 1): the agent
    /// writes it to `/run/ferry/fleet.json` and answers once it is there.
    pub fn set_fleet(
        &self,
        self_name: &str,
        members: Vec<ferry_agent_proto::FleetMember>,
        timeout: Duration,
    ) -> Result<(), VmError> {
        let request = Request::SetFleet {
            self_name: self_name.to_string(),
            members,
        };
        match self.request(&request, timeout)? {
            Reply::FleetSet => Ok(()),
            other => Err(VmError::Agent(format!(
                "unexpected answer to set-fleet: {other:?}"
            ))),
        }
    }

    fn send(&self, request: &Request, reply_to: Sender<Reply>) -> Result<u64, VmError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.pending
            .lock()
            .expect("agent lock")
            .insert(id, reply_to);
        let line = encode(id, request);
        if let Err(e) = self.writer.lock().expect("agent lock").write_all(&line) {
            self.pending.lock().expect("agent lock").remove(&id);
            return Err(VmError::Agent(format!(
                "cannot write to the agent channel: {e}"
            )));
        }
        Ok(id)
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        // Closing the socket lets the engine accept the next connection.
        let _ = self
            .writer
            .lock()
            .map(|w| w.shutdown(std::net::Shutdown::Both));
    }
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Hello { .. } => "hello",
        Request::Status => "status",
        Request::Exec { .. } => "exec",
        Request::BeforeSuspend { .. } => "before-suspend",
        Request::AfterResume { .. } => "after-resume",
        Request::Shutdown => "shutdown",
        Request::SetFleet { .. } => "set-fleet",
    }
}

fn read_loop(mut stream: UnixStream, pending: Pending, on_event: impl Fn(AgentEvent)) {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for line in decoder.push(&buf[..n]) {
            let frame: Frame<Reply> = match decode(&line) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(error = %e, "dropping an agent frame");
                    continue;
                }
            };
            if frame.id == 0 {
                match frame.body {
                    Reply::Live { uptime_ms } => on_event(AgentEvent::Live { uptime_ms }),
                    Reply::Status(s) => on_event(AgentEvent::Status(s)),
                    other => tracing::debug!(?other, "unsolicited agent message"),
                }
            } else if let Some(tx) = pending.lock().expect("agent lock").remove(&frame.id) {
                let _ = tx.send(frame.body);
            }
        }
    }
    // Dropping the senders wakes every waiter with "disconnected".
    pending.lock().expect("agent lock").clear();
    on_event(AgentEvent::Disconnected);
}
