//! The wire protocol between peers for live migration (see
//! `docs/migration-protocol.md`): one authenticated TCP control connection
//! from the destination to the source's `--listen` address, and two data
//! channels (the VM's running state, and its disk as NBD) that the
//! destination opens to the same address and the source ties to its engine.
//!
//! Every connection starts with one JSON line, a [`Hello`], carrying the
//! bearer token; the source checks it (in constant time) before it sends
//! anything, and never sends memory to an unauthenticated caller. Control
//! messages are JSON lines; a [`SourceMsg::Blob`] is followed by that many
//! raw bytes. With TLS (the listener's `--tls-cert`, the caller's `--ca`),
//! every connection is a TLS connection of its own, handshaken before its
//! hello; a TLS listener speaks nothing else (see [`PeerStream`]).
//!
//! The messages are typed on both ends ([`VmOffer`] for the offer,
//! [`LiveStats`] for the switch). Between versions of one protocol major: a
//! field a newer peer adds is ignored, a field this version needs and does
//! not find is a [`MigrationError::Protocol`] that names it, and an offer is
//! [validated](VmOffer::validate) before anything is made from it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_engine::LiveStats;
use serde::{Deserialize, Serialize};

mod offer;
mod stream;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;

pub use offer::{Blob, VmOffer};
pub use stream::PeerStream;

use crate::{PeerClientTls, ServerTls, Token};

/// The protocol version; a peer refuses another major version.
pub const PROTOCOL_VERSION: u32 = 1;

/// How long a new connection has to say its whole hello (an overall
/// deadline: a caller trickling one byte every few seconds is cut off).
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// How long a destination waits, in all, for the source's offer after its
/// hello (the source hashes the kernel and initramfs first).
const OFFER_DEADLINE: Duration = Duration::from_secs(30);

/// The longest control line (a JSON message) read: an offer is a few KiB.
pub const MAX_LINE: usize = 1 << 20;

/// The longest hello line read.
const MAX_HELLO: usize = 64 * 1024;

/// How many connections may be in their handshake at once; more are closed
/// at once (a flood of idle connections holds no thread).
pub const MAX_HANDSHAKES: usize = 64;

/// The longest pause of the accept loop after an accept error (EMFILE...):
/// it backs off from 10 ms, doubling, instead of spinning.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Migration protocol errors.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The peer refused us (bad token, busy, version).
    #[error("the peer at {addr} refused the migration: {reason}")]
    Refused {
        /// The peer.
        addr: String,
        /// What it said.
        reason: String,
    },
    /// The connection failed or broke.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer said something out of turn or unreadable.
    #[error("the peer broke the migration protocol: {0}")]
    Protocol(String),
    /// The peer closed the connection.
    #[error("the peer closed the connection ({0})")]
    Closed(String),
    /// Nothing arrived in time.
    #[error("timed out {0}")]
    Timeout(String),
    /// TLS with the peer failed (its certificate, ours, or a peer that
    /// does not speak it). The detail names the fix.
    #[error("TLS with the peer at {addr} failed: {detail}")]
    Tls {
        /// The peer.
        addr: String,
        /// What rustls said, and what to do.
        detail: String,
    },
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}: pick another --listen address")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl MigrationError {
    /// An I/O error while doing `what` with `peer`: a TLS error inside it
    /// becomes [`MigrationError::Tls`], with its fix.
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrationError {
        let what = what.into();
        move |source| match stream::rustls_error(&source) {
            Some(e) => MigrationError::Tls {
                addr: peer_of(&what),
                detail: tls_detail(e),
            },
            None => MigrationError::Io { what, source },
        }
    }
}

/// The peer named at the end of an I/O error's `what` ("reading from
/// 10.0.0.2:7100").
fn peer_of(what: &str) -> String {
    what.rsplit(' ').next().unwrap_or(what).to_string()
}

/// What a TLS failure means for a migration, with the fix.
fn tls_detail(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let fix = match e {
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "its certificate has expired: give that peer a current --tls-cert"
        }
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "its certificate is not valid yet: check both hosts' clocks"
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "its certificate does not name the address dialled: dial a name it holds, or make it with `ferry tls init DIR --san HOST`"
        }
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "its certificate is not signed by the --ca given: pass the CA that signed its --tls-cert"
        }
        E::InvalidCertificate(_) => "its certificate was refused: check --ca and its --tls-cert",
        E::AlertReceived(
            A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::DecryptError,
        ) => {
            "it refused this side's certificate (or its absence): pass --client-cert and --client-key signed by its --client-ca"
        }
        E::NoCertificatesPresented => {
            "no client certificate: pass --client-cert and --client-key signed by this peer's --client-ca"
        }
        _ => "check that both peers use TLS (--tls-cert on the listener, --ca on the caller)",
    };
    format!("{e}: {fix}")
}

/// The first line on every connection. Its `Debug` output leaves the token
/// out.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Hello {
    /// The control connection of a new migration.
    Control {
        /// [`PROTOCOL_VERSION`].
        v: u32,
        /// The bearer token.
        token: String,
    },
    /// A data channel of migration `session`.
    Channel {
        /// [`PROTOCOL_VERSION`].
        v: u32,
        /// The bearer token.
        token: String,
        /// The session the source named in its offer.
        session: String,
        /// Which channel.
        channel: ChannelKind,
    },
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hello::Control { v, .. } => f
                .debug_struct("Control")
                .field("v", v)
                .field("token", &"<redacted>")
                .finish(),
            Hello::Channel {
                v,
                session,
                channel,
                ..
            } => f
                .debug_struct("Channel")
                .field("v", v)
                .field("token", &"<redacted>")
                .field("session", session)
                .field("channel", channel)
                .finish(),
        }
    }
}

/// The data channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelKind {
    /// The VM's running state (RAM and devices), source to destination.
    State,
    /// The disk, as NBD: the source's engine is the client.
    Disk,
}

/// A data channel's connection, with the kind it was opened as: what
/// ferry does with it (its socket bounds, [`size_buffers`]) follows from
/// what it carries, so that no caller names the kind a second time.
pub struct DataChannel {
    stream: PeerStream,
    kind: ChannelKind,
}

impl DataChannel {
    /// `stream`, a connection that carries data channel `kind`.
    pub fn new(stream: PeerStream, kind: ChannelKind) -> Self {
        Self { stream, kind }
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }
}

/// Source to destination, on the control connection.
// A message is made once and sent: the offer's size in the enum costs
// nothing, and a Box would show in every match on it.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SourceMsg {
    /// The hello was accepted; what is on offer.
    Offer {
        /// Names the data channels.
        session: String,
        /// The VM: checked with [`VmOffer::validate`] on receipt.
        vm: VmOffer,
    },
    /// No migration (bad token, busy, wrong version).
    Refused {
        /// Why.
        reason: String,
    },
    /// The bytes of a file asked for with [`DestMsg::Fetch`] follow.
    Blob {
        /// Its name.
        name: String,
        /// How many bytes follow.
        len: u64,
    },
    /// Disk and state are all sent and the VM is paused here: the
    /// destination may take over (the commit point is its resume).
    Switch {
        /// The engine's figures (`wire_bytes` counted by the source).
        stats: LiveStats,
    },
    /// The source gave up before the switch; it keeps the VM.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Destination to source, on the control connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum DestMsg {
    /// Send a file from the offer (e.g. the kernel) as a [`SourceMsg::Blob`].
    Fetch {
        /// Its name.
        name: String,
    },
    /// The receiving VM waits and both data channels are open: go.
    Ready,
    /// The VM runs here now; the source may let it go.
    Committed,
    /// The destination gives up (before the switch).
    Abort {
        /// Why.
        reason: String,
    },
}

/// One end of a control connection: JSON lines plus raw blobs.
pub struct Control {
    /// Reads are buffered; writes go to the stream itself.
    reader: BufReader<PeerStream>,
    peer: String,
    /// The start of a line whose end has not arrived yet (kept across a
    /// timeout, so that a poll never loses half a message).
    pending: Vec<u8>,
}

impl Control {
    fn new(stream: PeerStream) -> Result<Control, MigrationError> {
        let peer = stream
            .tcp()
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let _ = stream.tcp().set_nodelay(true);
        Ok(Control {
            reader: BufReader::new(stream),
            peer,
            pending: Vec::new(),
        })
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        self.reader.get_ref().is_tls()
    }

    /// The other end's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends one message.
    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), MigrationError> {
        let mut line = serde_json::to_vec(msg).expect("serialisable");
        line.push(b'\n');
        let stream = self.reader.get_mut();
        stream
            .write_all(&line)
            .and_then(|()| stream.flush())
            .map_err(MigrationError::io(format!("writing to {}", self.peer)))
    }

    /// Receives one message, waiting up to `timeout` in all (`None`:
    /// forever). A line longer than [`MAX_LINE`] is refused.
    pub fn recv<T: for<'de> Deserialize<'de>>(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<T, MigrationError> {
        let line = self.read_line(timeout.map(|t| Instant::now() + t))?;
        decode_line(&line)
    }

    /// Reads up to the next newline, by `deadline` (an overall limit, not
    /// one per read), at most [`MAX_LINE`] bytes.
    fn read_line(&mut self, deadline: Option<Instant>) -> Result<Vec<u8>, MigrationError> {
        use std::io::ErrorKind;
        loop {
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(MigrationError::Timeout(format!(
                        "waiting for {}",
                        self.peer
                    )));
                }
                let _ = self.reader.get_ref().set_read_timeout(Some(left));
            } else {
                let _ = self.reader.get_ref().set_read_timeout(None);
            }
            let buf = match self.reader.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(MigrationError::Timeout(format!(
                        "waiting for {}",
                        self.peer
                    )))
                }
                Err(e) => return Err(MigrationError::io(format!("reading from {}", self.peer))(e)),
            };
            if buf.is_empty() {
                // A TLS alert record (0x15 0x03) where a line was due: a
                // TLS listener answering a plain caller.
                if self.pending.starts_with(&[0x15, 0x03]) {
                    return Err(MigrationError::Tls {
                        addr: self.peer.clone(),
                        detail: "it answered in TLS: it speaks only TLS; pass --ca FILE (the CA that signed its --tls-cert)".into(),
                    });
                }
                return Err(MigrationError::Closed(self.peer.clone()));
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            let room = (MAX_LINE + 1).saturating_sub(self.pending.len());
            self.pending.extend_from_slice(&buf[..take.min(room)]);
            self.reader.consume(take);
            if self.pending.len() > MAX_LINE {
                self.pending.clear();
                return Err(MigrationError::Protocol(format!(
                    "{} sent a control line longer than {MAX_LINE} bytes",
                    self.peer
                )));
            }
            if done {
                let mut line = std::mem::take(&mut self.pending);
                line.pop();
                return Ok(line);
            }
        }
    }

    /// Sends a file as a [`SourceMsg::Blob`].
    pub fn send_blob(&mut self, name: &str, path: &Path) -> Result<(), MigrationError> {
        let mut file = std::fs::File::open(path)
            .map_err(MigrationError::io(format!("opening {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(MigrationError::io(format!("reading {}", path.display())))?
            .len();
        self.send(&SourceMsg::Blob {
            name: name.to_string(),
            len,
        })?;
        let stream = self.reader.get_mut();
        std::io::copy(&mut file, stream)
            .and_then(|_| stream.flush())
            .map_err(MigrationError::io(format!(
                "sending {name} to {}",
                self.peer
            )))?;
        Ok(())
    }

    /// Receives a blob's `len` bytes (after its [`SourceMsg::Blob`]) into
    /// `dest` (created 0600) and returns their SHA-256, hashed as they were
    /// written: the caller checks it against the offer without reading the
    /// file again (on an emulated CPU the second read and hash of a 14 MB
    /// kernel took a second of a move's set-up). On any failure `dest` is
    /// removed: nothing is left behind.
    pub fn recv_blob_into(&mut self, len: u64, dest: &Path) -> Result<[u8; 32], MigrationError> {
        let received = self.recv_blob_file(len, dest);
        if received.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        received
    }

    fn recv_blob_file(&mut self, len: u64, dest: &Path) -> Result<[u8; 32], MigrationError> {
        use sha2::Digest;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = self
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(60)));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dest)
            .map_err(MigrationError::io(format!("creating {}", dest.display())))?;
        let mut out = HashingWriter {
            file,
            hasher: sha2::Sha256::new(),
        };
        // A partial line held back by a poll would be lost: there is none
        // here (a blob follows its header at once).
        let copied = std::io::copy(&mut (&mut self.reader).take(len), &mut out)
            .map_err(MigrationError::io(format!("receiving from {}", self.peer)))?;
        if copied != len {
            return Err(MigrationError::Protocol(format!(
                "{} sent {copied} of the {len} bytes it announced, then closed",
                self.peer
            )));
        }
        let HashingWriter { file, hasher } = out;
        file.sync_all()
            .map_err(MigrationError::io(format!("writing {}", dest.display())))?;
        Ok(hasher.finalize().into())
    }
}

/// Writes to a file and hashes what it wrote.
struct HashingWriter {
    file: std::fs::File,
    hasher: sha2::Sha256,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The destination's side: connects, says hello, reads the offer and
/// checks it ([`VmOffer::validate`]).
///
/// # Errors
/// [`MigrationError::Refused`] if the source refused; a
/// [`MigrationError::Protocol`] for an offer that does not read (the
/// message names a missing field) or does not validate, after telling the
/// source (with [`DestMsg::Abort`]); or a connection error.
///
/// With `tls`, the connection is TLS (the peer's certificate checked
/// against the CA and the host of `addr`) before the hello is sent; a TLS
/// failure is a [`MigrationError::Tls`] naming the fix.
pub fn connect(
    addr: &str,
    token: &Token,
    tls: Option<&PeerClientTls>,
) -> Result<(Control, String, VmOffer), MigrationError> {
    let stream = dial(addr, tls)?;
    let mut control = Control::new(stream)?;
    control.send(&Hello::Control {
        v: PROTOCOL_VERSION,
        token: token.expose().to_string(),
    })?;
    // Read untyped first, so that an unreadable offer gets its own message
    // (not the whole line) and the source is told why.
    let msg = control.recv::<serde_json::Value>(Some(OFFER_DEADLINE))?;
    let msg = match first_source_msg(msg, addr) {
        Ok(msg) => msg,
        Err(e) => {
            let _ = control.send(&DestMsg::Abort {
                reason: e.to_string(),
            });
            return Err(e);
        }
    };
    match msg {
        SourceMsg::Offer { session, vm } => Ok((control, session, vm)),
        SourceMsg::Refused { reason } => Err(MigrationError::Refused {
            addr: addr.to_string(),
            reason,
        }),
        other => Err(MigrationError::Protocol(format!(
            "expected an offer, got {other:?}"
        ))),
    }
}

/// The destination's side: opens data channel `kind` of `session` (over
/// TLS with `tls`, as [`connect`]).
pub fn open_channel(
    addr: &str,
    token: &Token,
    tls: Option<&PeerClientTls>,
    session: &str,
    kind: ChannelKind,
) -> Result<DataChannel, MigrationError> {
    let mut stream = dial(addr, tls)?;
    let mut hello = serde_json::to_vec(&Hello::Channel {
        v: PROTOCOL_VERSION,
        token: token.expose().to_string(),
        session: session.to_string(),
        channel: kind,
    })
    .expect("serialisable");
    hello.push(b'\n');
    stream
        .write_all(&hello)
        .and_then(|()| stream.flush())
        .map_err(MigrationError::io(format!("opening a channel to {addr}")))?;
    Ok(DataChannel::new(stream, kind))
}

/// Connects to `addr`, with TLS if `tls` (handshaken within
/// [`HANDSHAKE_DEADLINE`]).
fn dial(addr: &str, tls: Option<&PeerClientTls>) -> Result<PeerStream, MigrationError> {
    let tcp = dial_tcp(addr)?;
    let Some(tls) = tls else {
        return Ok(PeerStream::plain(tcp));
    };
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|_| {
        MigrationError::Tls {
            addr: addr.to_string(),
            detail: format!("{host:?} is neither a DNS name nor an IP address"),
        }
    })?;
    let conn =
        rustls::ClientConnection::new(tls.0.clone(), name).map_err(|e| MigrationError::Tls {
            addr: addr.to_string(),
            detail: tls_detail(&e),
        })?;
    PeerStream::tls(tcp, conn.into(), Instant::now() + HANDSHAKE_DEADLINE).map_err(|e| {
        match stream::rustls_error(&e) {
            Some(t) => MigrationError::Tls {
                addr: addr.to_string(),
                detail: tls_detail(t),
            },
            None if e.kind() == std::io::ErrorKind::UnexpectedEof => MigrationError::Tls {
                addr: addr.to_string(),
                detail: "it closed the connection in the TLS handshake: it may not speak TLS (then drop --ca) or may have refused this side's certificate".into(),
            },
            None if e.kind() == std::io::ErrorKind::TimedOut => MigrationError::Timeout(format!(
                "in the TLS handshake with {addr} (more than {HANDSHAKE_DEADLINE:?})"
            )),
            None => MigrationError::io(format!("the TLS handshake with {addr}"))(e),
        }
    })
}

fn dial_tcp(addr: &str) -> Result<TcpStream, MigrationError> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(MigrationError::io(format!("resolving {addr}")))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(MigrationError::io(format!(
        "connecting to the peer at {addr}"
    ))(
        last.unwrap_or_else(|| std::io::Error::other("no address")),
    ))
}

/// A new migration asked of the source: its control connection, and where
/// its data channels will arrive.
pub struct Incoming {
    /// The control connection (hello already checked).
    pub control: Control,
    /// The session name to put in the offer.
    pub session: String,
    channels: Receiver<(ChannelKind, PeerStream)>,
    server: Arc<ServerShared>,
}

impl Incoming {
    /// Waits for data channel `kind` (the destination opens both before it
    /// says [`DestMsg::Ready`]).
    pub fn channel(
        &mut self,
        kind: ChannelKind,
        timeout: Duration,
    ) -> Result<DataChannel, MigrationError> {
        self.stream_of(kind, timeout)
            .map(|stream| DataChannel::new(stream, kind))
    }

    fn stream_of(
        &mut self,
        kind: ChannelKind,
        timeout: Duration,
    ) -> Result<PeerStream, MigrationError> {
        let deadline = Instant::now() + timeout;
        let mut parked = self.server.parked.lock().expect("parked");
        if let Some(s) = parked.remove(&(self.session.clone(), kind)) {
            return Ok(s);
        }
        drop(parked);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.channels.recv_timeout(left) {
                Ok((k, s)) if k == kind => return Ok(s),
                Ok((k, s)) => {
                    self.server
                        .parked
                        .lock()
                        .expect("parked")
                        .insert((self.session.clone(), k), s);
                }
                Err(_) => {
                    if let Some(s) = self
                        .server
                        .parked
                        .lock()
                        .expect("parked")
                        .remove(&(self.session.clone(), kind))
                    {
                        return Ok(s);
                    }
                    return Err(MigrationError::Timeout(format!(
                        "waiting for the {kind:?} channel"
                    )));
                }
            }
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.server
            .sessions
            .lock()
            .expect("sessions")
            .remove(&self.session);
        self.server
            .parked
            .lock()
            .expect("parked")
            .retain(|(s, _), _| *s != self.session);
    }
}

struct ServerShared {
    token: Token,
    /// TLS only, when set.
    tls: Option<ServerTls>,
    limits: ServerLimits,
    /// Connections in their handshake now (see [`MAX_HANDSHAKES`]).
    handshakes: std::sync::atomic::AtomicUsize,
    /// Whether a refusal over the cap was logged (once per flood).
    over_cap_logged: AtomicBool,
    sessions: Mutex<HashMap<String, Sender<(ChannelKind, PeerStream)>>>,
    parked: Mutex<HashMap<(String, ChannelKind), PeerStream>>,
    stopping: AtomicBool,
}

/// A listener's limits on unauthenticated callers.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// The overall deadline for a connection's hello
    /// ([`HANDSHAKE_DEADLINE`]).
    pub handshake: Duration,
    /// Connections in their handshake at once ([`MAX_HANDSHAKES`]).
    pub max_handshakes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            handshake: HANDSHAKE_DEADLINE,
            max_handshakes: MAX_HANDSHAKES,
        }
    }
}

/// The source's listener: authenticates every connection and hands new
/// migrations to `on_migration`. Stops on drop.
pub struct Server {
    listener: TcpListener,
    shared: Arc<ServerShared>,
    addr: SocketAddr,
}

impl Server {
    /// Listens on `addr`. Every caller must present `token` (a [`Token`]:
    /// never empty or short). With `tls`, every connection must be TLS
    /// (and present a client certificate if `tls` requires one), its
    /// handshake and hello done within [`HANDSHAKE_DEADLINE`] in all.
    pub fn bind(
        addr: SocketAddr,
        token: &Token,
        tls: Option<&ServerTls>,
        on_migration: impl Fn(Incoming) + Send + Sync + 'static,
    ) -> Result<Server, MigrationError> {
        Server::bind_with(addr, token, tls, ServerLimits::default(), on_migration)
    }

    /// As [`Server::bind`], with other limits (tests use short deadlines).
    pub fn bind_with(
        addr: SocketAddr,
        token: &Token,
        tls: Option<&ServerTls>,
        limits: ServerLimits,
        on_migration: impl Fn(Incoming) + Send + Sync + 'static,
    ) -> Result<Server, MigrationError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| MigrationError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(MigrationError::io("reading the listen address"))?;
        let shared = Arc::new(ServerShared {
            token: token.clone(),
            tls: tls.cloned(),
            limits,
            handshakes: Default::default(),
            over_cap_logged: AtomicBool::new(false),
            sessions: Mutex::default(),
            parked: Mutex::default(),
            stopping: AtomicBool::new(false),
        });
        let accept = listener
            .try_clone()
            .map_err(MigrationError::io("cloning the listener"))?;
        let s = shared.clone();
        std::thread::Builder::new()
            .name("migration listener".into())
            .spawn(move || accept_loop(accept, s, on_migration))
            .map_err(MigrationError::io("starting the migration listener"))?;
        Ok(Server {
            listener,
            shared,
            addr: local,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept (Linux returns EINVAL from it).
        let _ = shutdown_listener(&self.listener);
    }
}

fn shutdown_listener(l: &TcpListener) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: shutdown(2) on a socket we own; no memory is passed.
    let rc = unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn accept_loop(
    listener: TcpListener,
    shared: Arc<ServerShared>,
    on_migration: impl Fn(Incoming) + Send + Sync + 'static,
) {
    let on_migration = Arc::new(on_migration);
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = Duration::ZERO;
                // As the dialling side: a data channel's last bytes must
                // not wait for an acknowledgement (Nagle's algorithm
                // against the receiver's delayed ACK: up to 40 ms at a
                // move's switchover).
                let _ = stream.set_nodelay(true);
                stream
            }
            Err(e) => {
                // EMFILE and the like do not go away by retrying at once:
                // back off (10 ms, doubling, up to 1 s), log once a streak.
                if backoff.is_zero() {
                    tracing::warn!("the migration listener cannot accept: {e}; backing off");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                std::thread::sleep(backoff);
                continue;
            }
        };
        // A connection past the cap is closed at once: no thread for it.
        let n = shared.handshakes.fetch_add(1, Ordering::SeqCst);
        if n >= shared.limits.max_handshakes {
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
            if !shared.over_cap_logged.swap(true, Ordering::SeqCst) {
                tracing::warn!(
                    "more than {} migration connections in their handshake: closing the excess",
                    shared.limits.max_handshakes
                );
            }
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        let (shared, on_migration) = (shared.clone(), on_migration.clone());
        let spawned = std::thread::Builder::new()
            .name("migration hello".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    if let Err(e) = greet(stream, &shared, &*on_migration) {
                        tracing::info!("refused a migration connection: {e}");
                    }
                }
            });
        if spawned.is_err() {
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn greet(
    tcp: TcpStream,
    shared: &Arc<ServerShared>,
    on_migration: &dyn Fn(Incoming),
) -> Result<(), MigrationError> {
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    // One deadline for the TLS handshake and the hello together. Read
    // exactly the hello line: on a data channel, the channel's bytes (e.g.
    // an NBD server's greeting) may follow at once. The handshake slot is
    // given back once the hello is read (or not).
    let deadline = shared.limits.handshake;
    let until = Instant::now() + deadline;
    let line = accept_stream(tcp, shared.tls.as_ref(), until, &peer).and_then(|mut stream| {
        let line = read_hello_line(&mut stream, until, deadline)?;
        Ok((stream, line))
    });
    if shared.handshakes.fetch_sub(1, Ordering::SeqCst) <= shared.limits.max_handshakes {
        shared.over_cap_logged.store(false, Ordering::SeqCst);
    }
    let (mut stream, line) = line?;
    let hello = decode_hello(&line, &peer)?;
    let (v, token) = match &hello {
        Hello::Control { v, token } | Hello::Channel { v, token, .. } => (*v, token),
    };
    let refuse = |stream: &mut PeerStream, reason: &str| {
        let mut line = serde_json::to_vec(&SourceMsg::Refused {
            reason: reason.to_string(),
        })
        .expect("serialisable");
        line.push(b'\n');
        let _ = stream.write_all(&line).and_then(|()| stream.flush());
        stream.close();
        Err(MigrationError::Refused {
            addr: peer.clone(),
            reason: reason.to_string(),
        })
    };
    if !shared.token.matches(token.as_bytes()) {
        return refuse(&mut stream, "wrong token: pass the source's --token");
    }
    if v != PROTOCOL_VERSION {
        return refuse(
            &mut stream,
            &format!(
            "protocol version {v} is not {PROTOCOL_VERSION}: use the same ferry version on both peers"
            ),
        );
    }
    match hello {
        Hello::Control { .. } => {
            if shared.stopping.load(Ordering::SeqCst) {
                return refuse(&mut stream, "this peer is shutting down");
            }
            let _ = stream.set_read_timeout(None);
            let control = Control::new(stream)?;
            let session = random_session();
            let (tx, rx) = channel();
            shared
                .sessions
                .lock()
                .expect("sessions")
                .insert(session.clone(), tx);
            on_migration(Incoming {
                control,
                session,
                channels: rx,
                server: shared.clone(),
            });
            Ok(())
        }
        Hello::Channel {
            session, channel, ..
        } => {
            let _ = stream.set_read_timeout(None);
            let sender = shared
                .sessions
                .lock()
                .expect("sessions")
                .get(&session)
                .cloned();
            match sender {
                Some(tx) => {
                    let _ = tx.send((channel, stream));
                    Ok(())
                }
                None => refuse(&mut stream, &format!("unknown session {session}")),
            }
        }
    }
}

/// The listener's side of a new connection: plain, or (with `tls`) TLS,
/// handshaken by `until`. A TLS listener answers a caller whose first byte
/// is not a TLS handshake with one plain refusal line naming the fix, and
/// closes; a failed handshake is closed gently (what the caller sent is
/// read away first), so that the caller reads the TLS alert that says why
/// instead of a reset.
fn accept_stream(
    tcp: TcpStream,
    tls: Option<&ServerTls>,
    until: Instant,
    peer: &str,
) -> Result<PeerStream, MigrationError> {
    let Some(tls) = tls else {
        return Ok(PeerStream::plain(tcp));
    };
    let mut first = [0u8; 1];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrationError::Timeout(format!(
                "waiting for {peer}'s TLS handshake"
            )));
        }
        let _ = tcp.set_read_timeout(Some(left));
        match tcp.peek(&mut first) {
            Ok(0) => return Err(MigrationError::Closed("before its TLS handshake".into())),
            Ok(_) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(MigrationError::io(format!("reading from {peer}"))(e)),
        }
    }
    if first[0] != stream::TLS_HANDSHAKE_RECORD {
        let mut line = serde_json::to_vec(&SourceMsg::Refused {
            reason: "this peer speaks only TLS: pass --ca FILE (the CA that signed its --tls-cert)"
                .into(),
        })
        .expect("serialisable");
        line.push(b'\n');
        let _ = (&tcp).write_all(&line);
        linger_close(&tcp);
        return Err(MigrationError::Tls {
            addr: peer.to_string(),
            detail: "it sent plain text to this TLS listener: refused".into(),
        });
    }
    let keep = tcp
        .try_clone()
        .map_err(MigrationError::io("cloning a connection"))?;
    let conn = rustls::ServerConnection::new(tls.0.clone()).map_err(|e| MigrationError::Tls {
        addr: peer.to_string(),
        detail: e.to_string(),
    })?;
    PeerStream::tls(tcp, conn.into(), until).map_err(|e| {
        linger_close(&keep);
        match stream::rustls_error(&e) {
            Some(t) => MigrationError::Tls {
                addr: peer.to_string(),
                detail: t.to_string(),
            },
            None if e.kind() == std::io::ErrorKind::TimedOut => {
                MigrationError::Timeout(format!("in the TLS handshake with {peer}"))
            }
            None => MigrationError::io(format!("the TLS handshake with {peer}"))(e),
        }
    })
}

/// Closes `tcp` after reading what the caller still sends (for up to a
/// second), so that what was written last reaches it before any reset.
fn linger_close(tcp: &TcpStream) {
    let _ = tcp.shutdown(Shutdown::Write);
    let until = Instant::now() + Duration::from_secs(1);
    let mut sink = [0u8; 4096];
    let mut r = tcp;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let _ = tcp.set_read_timeout(Some(left));
        match r.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = tcp.shutdown(Shutdown::Both);
}

/// Reads one line, byte by byte, so that nothing after it is consumed, by
/// `until` (an overall deadline, `deadline` long in all).
fn read_hello_line(
    stream: &mut PeerStream,
    until: Instant,
    deadline: Duration,
) -> Result<Vec<u8>, MigrationError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrationError::Timeout(format!(
                "waiting for a hello: none in {deadline:?}"
            )));
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut byte) {
            Ok(0) => return Err(MigrationError::Closed("before its hello".into())),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_)
                if line.is_empty()
                    && !stream.is_tls()
                    && byte[0] == stream::TLS_HANDSHAKE_RECORD =>
            {
                // A TLS caller on a plain listener: closed at once (it
                // sees the end of its handshake), not held to the deadline.
                stream.close();
                return Err(MigrationError::Protocol(
                    "a TLS handshake on a plain listener: start the listener with --tls-cert and --tls-key, or drop --ca on the caller".into(),
                ));
            }
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_HELLO {
                    return Err(MigrationError::Protocol("hello line too long".into()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(MigrationError::io("reading a hello")(e)),
        }
    }
    Ok(line)
}

// What a peer sends, decoded from its bytes alone: the functions below are
// all the parsing the listener and both ends of a control connection do, so
// that tests and the fuzzer (`fuzz/`, target `migration`) reach it without
// a socket.

/// Decodes a hello line (without its newline) from `peer`, as the listener
/// does before it checks the token.
///
/// # Errors
/// [`MigrationError::Protocol`]: not UTF-8, or not a [`Hello`].
pub fn decode_hello(line: &[u8], peer: &str) -> Result<Hello, MigrationError> {
    let line = std::str::from_utf8(line)
        .map_err(|_| MigrationError::Protocol("hello is not UTF-8".into()))?;
    serde_json::from_str(line)
        .map_err(|e| MigrationError::Protocol(format!("bad hello from {peer}: {e}")))
}

/// Decodes one control line (without its newline) as `T`, as
/// [`Control::recv`] does with each line it reads.
///
/// # Errors
/// [`MigrationError::Protocol`] quoting the start of the line.
pub fn decode_line<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, MigrationError> {
    let line = String::from_utf8_lossy(line);
    serde_json::from_str(&line)
        .map_err(|e| MigrationError::Protocol(format!("{e}: {}", offer::shown(line.trim()))))
}

/// Reads the first message a source sends a destination from `addr`
/// (already decoded as JSON): an offer, [validated](VmOffer::validate), or
/// any other [`SourceMsg`].
///
/// # Errors
/// [`MigrationError::Protocol`]: not a [`SourceMsg`] (the message names a
/// missing field), or an offer that does not validate.
pub fn first_source_msg(msg: serde_json::Value, addr: &str) -> Result<SourceMsg, MigrationError> {
    let msg = serde_json::from_value::<SourceMsg>(msg)
        .map_err(|e| MigrationError::Protocol(format!("unreadable offer from {addr}: {e}")))?;
    if let SourceMsg::Offer { vm, .. } = &msg {
        vm.validate()?;
    }
    Ok(msg)
}

fn random_session() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Ties a data channel (plain or TLS) to a Unix stream on this side,
/// already connected to its user: the other end of a socket pair whose
/// first end the engine (or ferry's NBD server) was handed.
pub struct Tunnel(pub UnixStream);

/// A running tunnel; dropping it closes both sides.
pub struct TunnelHandle {
    tcp: TcpStream,
    done: Receiver<()>,
    bytes: Arc<AtomicU64>,
}

impl TunnelHandle {
    /// Waits until both directions are closed, up to `timeout`.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.done.recv_timeout(timeout).is_ok()
    }

    /// Bytes carried so far, both directions together.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for TunnelHandle {
    fn drop(&mut self) {
        let _ = self.tcp.shutdown(Shutdown::Both);
    }
}

/// A data channel handed to the engine by [`attach`]: kept until the move
/// is over; dropping it closes the connection.
pub struct Attached {
    carried: Carried,
}

enum Carried {
    /// The engine reads and writes the TCP connection itself; `base` is
    /// what the connection had carried (its hello) when it was handed over.
    Direct { tcp: TcpStream, base: u64 },
    /// A tunnel carries it.
    Tunnel(TunnelHandle),
}

impl Attached {
    /// Bytes the engine sent and received on it so far.
    pub fn bytes(&self) -> u64 {
        match &self.carried {
            Carried::Direct { tcp, base } => tcp_bytes(tcp).unwrap_or(0).saturating_sub(*base),
            Carried::Tunnel(t) => t.bytes(),
        }
    }

    /// Whether the engine holds the connection itself (no tunnel).
    pub fn is_direct(&self) -> bool {
        matches!(self.carried, Carried::Direct { .. })
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Carried::Direct { tcp, .. } = &self.carried {
            let _ = tcp.shutdown(Shutdown::Both);
        }
    }
}

/// Hands a data channel to the engine: the descriptor the engine reads and
/// writes, and what keeps the channel for the move's length.
///
/// A plain channel's TCP connection goes to the engine itself. Through a
/// tunnel every byte crossed this process twice more (socket to ferry to
/// socket) on each side: in the KVM lab, where every system call and
/// context switch is emulated, ferry's moves took twice the raw engine's
/// time, whose two QEMUs talk directly, and the source's guest lost its
/// CPU to the tunnels for all of it. A TLS channel cannot be handed over
/// (the engine does not speak ferry's TLS): the engine gets one end of a
/// Unix socket pair, and a tunnel carries the other end.
pub fn attach(channel: DataChannel) -> Result<(OwnedFd, Attached), MigrationError> {
    if channel.is_tls() {
        return tunnelled(channel);
    }
    let (tcp, _) = channel.stream.into_parts();
    size_buffers(&tcp, channel.kind);
    // The hello's read deadline must not reach the engine's reads.
    tcp.set_read_timeout(None)
        .and_then(|()| tcp.set_write_timeout(None))
        .map_err(MigrationError::io("handing over a data channel"))?;
    let engine = tcp
        .try_clone()
        .map_err(MigrationError::io("handing over a data channel"))?;
    let base = tcp_bytes(&tcp).unwrap_or(0);
    Ok((
        OwnedFd::from(engine),
        Attached {
            carried: Carried::Direct { tcp, base },
        },
    ))
}

fn tunnelled(channel: DataChannel) -> Result<(OwnedFd, Attached), MigrationError> {
    let (engine, ours) = UnixStream::pair().map_err(MigrationError::io("making a socket pair"))?;
    let handle = Tunnel(ours).start(channel)?;
    Ok((
        OwnedFd::from(engine),
        Attached {
            carried: Carried::Tunnel(handle),
        },
    ))
}

/// What `tcp` has carried, both ways (`TCP_INFO`'s bytes acknowledged and
/// received); `None` where the kernel does not say (before Linux 4.1).
fn tcp_bytes(tcp: &TcpStream) -> Option<u64> {
    let (info, len) = tcp_info(tcp)?;
    let end = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    (len >= end).then(|| info.tcpi_bytes_acked + info.tcpi_bytes_received)
}

/// `TCP_INFO` of `tcp`, and how many of its bytes the kernel filled (an
/// older kernel fills fewer fields).
fn tcp_info(tcp: &TcpStream) -> Option<(libc::tcp_info, usize)> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers; all zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket this function borrows, into a
    // tcp_info of the size given (the kernel writes at most `len` bytes).
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((info, len as usize))
}

impl Tunnel {
    /// Starts copying between `data` and the Unix side, both ways.
    pub fn start(self, data: DataChannel) -> Result<TunnelHandle, MigrationError> {
        let (tcp, tls) = data.stream.into_parts();
        size_buffers(&tcp, data.kind);
        let (tx, rx) = channel();
        let bytes = Arc::new(AtomicU64::new(0));
        let counter = bytes.clone();
        let keep = tcp
            .try_clone()
            .map_err(MigrationError::io("cloning a data channel"))?;
        spawn_pipe(tcp, tls, self.0, tx, counter)?;
        Ok(TunnelHandle {
            tcp: keep,
            done: rx,
            bytes,
        })
    }
}

/// Bounds a data channel's socket buffers where that pays: the state's
/// channel gets [`limit_unsent`] and [`bound_receive_queue`]; the disk's is
/// left to the kernel's sizing.
///
/// Why not the disk's: nothing of it waits for a last pass (the mirror is
/// in sync before the state's copy starts), and its copy is request and
/// reply (NBD), so the bounds only shortened how much of it was in
/// flight. A 194 MiB disk mirrored through a relay like the destination's
/// tunnel of the time (this host, tmpfs, 2026-12-07) took 383-466 ms with
/// the bounds and 310-392 ms without, the source's QEMU woken more often;
/// in the QEMU 10 KVM lab ferry's disk copies took 23-43 s without them
/// against 28-42 s with them the hour before (the raw engine's 11-19 s). Until
/// then the disk kept the bounds because an earlier lab run without them
/// (38-84 s against 37-77 s) was no faster, when the receiver's
/// allocation of every zero (fixed the same day) dominated the copy. The
/// source's guest then stalled for seconds during some lab disk copies
/// with or without them, under either engine, until the disk got its own
/// QEMU iothread (bench/README.md).
fn size_buffers(tcp: &TcpStream, kind: ChannelKind) {
    if kind == ChannelKind::State {
        limit_unsent(tcp);
        bound_receive_queue(tcp);
    }
}

/// How much of what a tunnel was given may wait unsent in its TCP socket
/// (`TCP_NOTSENT_LOWAT`): past it, the tunnel's writes block, so the
/// engine behind it is held back too.
///
/// Why: QEMU decides that a live copy can end when what is left to send
/// fits its downtime limit at the rate it has been writing. It writes into
/// ferry's tunnel, not to the destination, and Linux grows a TCP socket's
/// send buffer to 4 MiB (`tcp_wmem`), so the rate QEMU saw was partly the
/// filling of buffers. On a busy host the destination was megabytes behind
/// when the source said it was done, and took 40-98 ms (bench/migrate,
/// phase `state-received`) to load them, guest paused on both sides. Held
/// to this bound it took 0-49 ms, and 0-7 ms with [`bound_receive_queue`]
/// too. Only the unsent queue is bounded: data in flight still gets the
/// window the path needs, so a long link is not slowed (a smaller
/// `SO_SNDBUF` would be).
pub const TUNNEL_UNSENT_LIMIT: u32 = 128 * 1024;

/// Sets [`TUNNEL_UNSENT_LIMIT`] on `tcp`; a kernel without the option
/// (before Linux 3.12) keeps its default, logged.
fn limit_unsent(tcp: &TcpStream) {
    let limit = TUNNEL_UNSENT_LIMIT as libc::c_int;
    if let Err(e) = set_int_option(tcp, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, limit) {
        tracing::debug!("TCP_NOTSENT_LOWAT on a data channel: {e}");
    }
}

/// `setsockopt` of an integer option on `tcp`.
fn set_int_option(
    tcp: &TcpStream,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket this function borrows, with a pointer
    // to an int that outlives the call and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The least receive window a data channel is held to (see
/// [`bound_receive_queue`]).
pub const TUNNEL_RECEIVE_WINDOW_MIN: u32 = 512 * 1024;

/// Above this window the kernel's own sizing is left alone.
const TUNNEL_RECEIVE_WINDOW_MAX: u64 = 16 << 20;

/// What a 10 Gbit/s link carries in a microsecond, in bytes.
const LINK_BYTES_PER_US: u64 = 1250;

/// Holds what may wait, received but unread, in a data channel's socket
/// to what a 10 Gbit/s link carries in one round trip (at least
/// [`TUNNEL_RECEIVE_WINDOW_MIN`]; a link slow enough to need more than
/// [`TUNNEL_RECEIVE_WINDOW_MAX`] keeps the kernel's sizing).
///
/// Why: where the destination's QEMU loads pages slower than they arrive
/// (TCG on two busy cores), Linux grew the receive buffer until 6.3-6.6
/// MB of the copy waited in it for the whole of the copy (`ss`, Recv-Q,
/// bench/migrate). [`TUNNEL_UNSENT_LIMIT`] cannot see that queue: it was
/// sent. Whatever is queued when the source's last pass starts is loaded
/// before that pass, guest paused. The window bounds the queue; one round
/// trip's worth at 10 Gbit/s still lets a long link run at that rate.
/// The round trip is the kernel's estimate after the channel's hello.
///
/// The disk's channel is not bounded (see [`size_buffers`]).
fn bound_receive_queue(tcp: &TcpStream) {
    let Some((info, _)) = tcp_info(tcp) else {
        return;
    };
    let window =
        (u64::from(info.tcpi_rtt) * LINK_BYTES_PER_US).max(u64::from(TUNNEL_RECEIVE_WINDOW_MIN));
    if window >= TUNNEL_RECEIVE_WINDOW_MAX {
        return;
    }
    // Linux doubles the value for its bookkeeping, and with large
    // segments (loopback) nearly all of it holds data: up to about twice
    // `window` may wait (about 1 MB was seen at the least window).
    if let Err(e) = set_int_option(
        tcp,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        window as libc::c_int,
    ) {
        tracing::debug!("SO_RCVBUF on a data channel: {e}");
    }
}

fn spawn_pipe(
    tcp: TcpStream,
    tls: Option<Box<rustls::Connection>>,
    unix: UnixStream,
    done: Sender<()>,
    bytes: Arc<AtomicU64>,
) -> Result<(), MigrationError> {
    if let Some(conn) = tls {
        // One thread for both directions (a TLS connection is one state).
        std::thread::Builder::new()
            .name("tunnel tls".into())
            .spawn(move || {
                let count = |n| {
                    bytes.fetch_add(n, Ordering::Relaxed);
                };
                stream::pump_tls(tcp, *conn, unix, &count);
                let _ = done.send(());
            })
            .map_err(MigrationError::io("starting a tunnel"))?;
        return Ok(());
    }
    let bytes2 = bytes.clone();
    let tcp2 = tcp
        .try_clone()
        .map_err(MigrationError::io("cloning a channel"))?;
    let unix2 = unix
        .try_clone()
        .map_err(MigrationError::io("cloning a socket"))?;
    std::thread::Builder::new()
        .name("tunnel".into())
        .spawn(move || {
            let back = std::thread::spawn(move || {
                let (mut from, mut to) = (unix2, tcp2);
                counted_copy(&mut from, &mut to, &bytes2);
                let _ = to.shutdown(Shutdown::Write);
            });
            let (mut from, mut to) = (tcp, unix);
            counted_copy(&mut from, &mut to, &bytes);
            let _ = to.shutdown(Shutdown::Write);
            let _ = back.join();
            let _ = done.send(());
        })
        .map_err(MigrationError::io("starting a tunnel"))?;
    Ok(())
}

/// Copies until EOF or an error, adding what it moved to `bytes` as it
/// goes.
///
/// Through this process, not spliced. splice(2) (socket to pipe to
/// socket, with tee(2) for the copy of the sent state a source then kept)
/// was tried: on this host's loopback the two tunnels' CPU did not fall
/// (the destination's 110-120 ms to 30-80, the source's 120-140 to
/// 220-410, per move of bench/migrate) and the moves took longer (totals
/// 1.5-2.4 s against 1.1-1.4 s); with the source's side alone copied, the
/// same.
fn counted_copy(from: &mut impl Read, to: &mut impl Write, bytes: &AtomicU64) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}
