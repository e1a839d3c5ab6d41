//! `ferry shell`: sessions in a running VM over its shell channel
//! (`docs/shell.md`).
//!
//! The VM's owner holds the one connection to the guest's shell server
//! (the engine's shell stream) and relays sessions over it
//! ([`ShellRelay`], on `<vm dir>/shell.sock`), so any number of clients
//! can have a shell at once. A client ([`connect`]) sends one JSON line
//! ([`ClientHello`]), gets one back ([`ClientWelcome`]), and then speaks
//! frames of `ferry_agent_proto::shell` for its one session (id 1 on its
//! connection; the relay renumbers). Only root and the user the owner
//! runs as may connect (`SO_PEERCRED`).
//!
//! Nothing here touches the guest agent or the guest network: the path is
//! host socket → owner → virtio-serial port → shell server process.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_agent_proto::shell::{
    ClientHello, ClientWelcome, FrameDecoder, Kind, PortHello, ShellFrame, SHELL_PROTOCOL_VERSION,
};
pub use ferry_agent_proto::shell::{OpenRequest, Opened};

use crate::error::{ExitClass, NameError};
use crate::vmdir::{files, running_vm_dir};
use crate::Paths;

/// How long the guest's shell server has to answer `Hello` or `Open`: a
/// guest whose kernel hangs gets a clear error instead of a hang.
pub const GUEST_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A session whose guest sends nothing, not even the answer to a ping,
/// for this long while its client waits is ended with
/// [`ShellError::Timeout`]: the guest kernel (or the VM's owner) hangs.
/// Generous: a loaded TCG host can stall a guest for seconds.
pub const GUEST_SILENCE_TIMEOUT: Duration = Duration::from_secs(20);

/// How often a waiting client pings the guest ([`ShellSession::keep_alive`]).
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);

/// The session id a client sees on its own connection.
pub const CLIENT_SESSION: u32 = 1;

/// Opening or running a `ferry shell` session.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// The VM is not running.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The VM exists but does not run.
    #[error("VM '{name}' is {state}, not running: {}", if *.resumable {
        format!("'ferry start {name}' resumes it, then 'ferry shell {name}'")
    } else {
        format!("it has no saved state to resume ('ferry ps' says why it ended; 'ferry rm {name}' removes it)")
    })]
    NotRunning {
        /// The VM.
        name: String,
        /// Its state.
        state: crate::record::RecordState,
        /// Whether `ferry start` can resume it (it has a saved state).
        resumable: bool,
    },
    /// The VM runs without a shell channel: it was resumed from a package
    /// made before ferry had one, or its engine has none.
    #[error("VM '{name}' has no shell channel ({reason}): re-package it from a blueprint built by this ferry ('ferry package') to get 'ferry shell', or use 'ferry exec {name} -- CMD' meanwhile")]
    NoShellPort {
        /// The VM.
        name: String,
        /// Why, as the engine said.
        reason: String,
    },
    /// The caller is neither root nor the user the VM runs as.
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// The guest's shell server did not answer in time.
    #[error("the guest's shell server did not answer within {secs} s ({what}): the guest kernel may be hung; 'ferry logs {name}' shows its console")]
    Timeout {
        /// The VM.
        name: String,
        /// What was waited for.
        what: String,
        /// How long.
        secs: u64,
    },
    /// The guest refused the session (e.g. the command does not exist).
    #[error("{0}")]
    Guest(String),
    /// The connection to the VM's owner failed.
    #[error("shell socket {path}: {detail}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

impl ShellError {
    /// The class of this failure.
    pub fn exit_class(&self) -> ExitClass {
        match self {
            ShellError::Name(n) => n.exit_class(),
            ShellError::NotRunning { .. }
            | ShellError::NoShellPort { .. }
            | ShellError::NotAllowed(_) => ExitClass::BadInput,
            ShellError::Timeout { .. } => ExitClass::VmFailed,
            ShellError::Guest(_) => ExitClass::Other,
            ShellError::Socket { .. } => ExitClass::Other,
        }
    }

    fn from_welcome(name: &str, message: String, kind: &str) -> Self {
        match kind {
            "no-shell-port" => ShellError::NoShellPort {
                name: name.to_string(),
                reason: message,
            },
            "not-allowed" => ShellError::NotAllowed(message),
            "timeout" => ShellError::Timeout {
                name: name.to_string(),
                what: message,
                secs: GUEST_ANSWER_TIMEOUT.as_secs(),
            },
            _ => ShellError::Guest(message),
        }
    }
}

// ---------------------------------------------------------------- client

/// What a session sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellOutput {
    /// Output (all of it, on a terminal).
    Stdout(Vec<u8>),
    /// Error output (sessions without a terminal).
    Stderr(Vec<u8>),
    /// The command ended with this code.
    Exit(i32),
    /// The answer to [`ShellSession::ping`].
    Pong(Vec<u8>),
}

/// An open session, seen from the client. Cloneable halves: one thread
/// reads ([`ShellSession::recv`]), others write.
pub struct ShellSession {
    stream: UnixStream,
    decoder: FrameDecoder,
    pending: std::collections::VecDeque<ShellFrame>,
    /// What the guest said when it opened the session.
    pub opened: Opened,
    alive: Arc<Liveness>,
}

/// What [`ShellSession::keep_alive`] watches: how long the reader has been
/// waiting for the guest. Only time spent waiting counts, so a client that
/// stops reading (its output piped into a pager) is not taken for a hung
/// guest.
#[derive(Default)]
struct Liveness {
    /// Since when the reader waits without having heard anything; `None`
    /// while it is not reading.
    waiting_since: Mutex<Option<Instant>>,
    /// The session was ended for the guest's silence.
    silent: AtomicBool,
    /// The session was dropped.
    ended: AtomicBool,
}

/// The writing half of a session.
#[derive(Clone)]
pub struct ShellInput {
    stream: Arc<Mutex<UnixStream>>,
}

impl ShellInput {
    fn send(&self, frame: &ShellFrame) -> std::io::Result<()> {
        let mut s = self.stream.lock().expect("shell input");
        s.write_all(&frame.encode())
    }

    /// Sends input bytes.
    ///
    /// # Errors
    /// The owner's socket is gone.
    pub fn input(&self, data: &[u8]) -> std::io::Result<()> {
        let mut s = self.stream.lock().expect("shell input");
        s.write_all(&ShellFrame::data(Kind::Stdin, CLIENT_SESSION, data))
    }

    /// Closes the session's input.
    ///
    /// # Errors
    /// The owner's socket is gone.
    pub fn eof(&self) -> std::io::Result<()> {
        self.send(&ShellFrame::new(Kind::StdinEof, CLIENT_SESSION, Vec::new()))
    }

    /// Tells the guest the terminal's new size.
    ///
    /// # Errors
    /// The owner's socket is gone.
    pub fn resize(&self, rows: u16, cols: u16) -> std::io::Result<()> {
        self.send(&ShellFrame::resize(CLIENT_SESSION, rows, cols))
    }

    /// Asks the guest for a `Pong` with `payload`.
    ///
    /// # Errors
    /// The owner's socket is gone.
    pub fn ping(&self, payload: &[u8]) -> std::io::Result<()> {
        self.send(&ShellFrame::new(
            Kind::Ping,
            CLIENT_SESSION,
            payload.to_vec(),
        ))
    }
}

impl ShellSession {
    /// The writing half.
    ///
    /// # Errors
    /// The socket cannot be duplicated.
    pub fn input(&self) -> std::io::Result<ShellInput> {
        Ok(ShellInput {
            stream: Arc::new(Mutex::new(self.stream.try_clone()?)),
        })
    }

    /// The next thing the session sends; `None` once the owner closed the
    /// connection without an exit code (the VM stopped).
    pub fn recv(&mut self) -> Option<ShellOutput> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            while let Some(f) = self.pending.pop_front() {
                match f.kind {
                    Kind::Stdout => return Some(ShellOutput::Stdout(f.payload)),
                    Kind::Stderr => return Some(ShellOutput::Stderr(f.payload)),
                    Kind::Exit => return Some(ShellOutput::Exit(f.code().unwrap_or(-1))),
                    Kind::Pong => return Some(ShellOutput::Pong(f.payload)),
                    _ => {}
                }
            }
            self.alive
                .waiting_since
                .lock()
                .expect("liveness")
                .get_or_insert_with(Instant::now);
            let read = self.stream.read(&mut buf);
            *self.alive.waiting_since.lock().expect("liveness") = None;
            match read {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.pending.extend(self.decoder.push(&buf[..n])),
            }
        }
    }

    /// Pings the guest every few seconds while [`Self::recv`] waits, and
    /// ends the session if nothing at all comes back for
    /// [`GUEST_SILENCE_TIMEOUT`]: then `recv` returns `None` and
    /// [`Self::went_silent`] is true. A hung guest kernel (or a stopped VM
    /// owner) must not leave `ferry shell` hanging; the owner, seeing the
    /// client go, hangs the session up in the guest.
    ///
    /// # Errors
    /// The socket cannot be duplicated.
    pub fn keep_alive(&self) -> std::io::Result<()> {
        let input = self.input()?;
        let alive = self.alive.clone();
        std::thread::Builder::new()
            .name("shell-keepalive".into())
            .spawn(move || {
                let mut pinged = Instant::now();
                while !alive.ended.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(500));
                    let waited = alive
                        .waiting_since
                        .lock()
                        .expect("liveness")
                        .map(|t| t.elapsed());
                    if waited.is_some_and(|w| w >= GUEST_SILENCE_TIMEOUT) {
                        alive.silent.store(true, Ordering::SeqCst);
                        let s = input.stream.lock().expect("shell input");
                        let _ = s.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    if waited.is_some() && pinged.elapsed() >= KEEPALIVE_EVERY {
                        if input.ping(b"keepalive").is_err() {
                            return;
                        }
                        pinged = Instant::now();
                    }
                }
            })?;
        Ok(())
    }

    /// Whether [`Self::keep_alive`] ended the session because the guest
    /// answered nothing for [`GUEST_SILENCE_TIMEOUT`].
    pub fn went_silent(&self) -> bool {
        self.alive.silent.load(Ordering::SeqCst)
    }
}

impl Drop for ShellSession {
    fn drop(&mut self) {
        self.alive.ended.store(true, Ordering::SeqCst);
    }
}

/// Opens a session in the running VM `name`.
///
/// # Errors
/// See [`ShellError`].
pub fn connect(paths: &Paths, name: &str, open: OpenRequest) -> Result<ShellSession, ShellError> {
    let dir = match running_vm_dir(paths, name) {
        Ok(dir) => dir,
        Err(e) => {
            return Err(match crate::fleet::state_of(paths, name) {
                Some((state, record)) if state != crate::record::RecordState::Running => {
                    ShellError::NotRunning {
                        name: name.to_string(),
                        state,
                        resumable: record.is_some_and(|r| r.resumable()),
                    }
                }
                _ => e.into(),
            })
        }
    };
    let path = dir.join(files::SHELL);
    let err = |detail: String| ShellError::Socket {
        path: path.clone(),
        detail,
    };
    if !path.exists() {
        // A VM whose owner predates the shell channel has no socket.
        return Err(ShellError::NoShellPort {
            name: name.to_string(),
            reason: "its owner is an older ferry".into(),
        });
    }
    let mut stream = UnixStream::connect(&path).map_err(|e| err(format!("cannot connect: {e}")))?;
    let mut line = serde_json::to_vec(&ClientHello {
        v: SHELL_PROTOCOL_VERSION,
        open,
    })
    .expect("json");
    line.push(b'\n');
    // The owner refuses some clients (another uid) before it reads their
    // hello, then closes: the send fails, but its answer is already waiting
    // and says more than a broken pipe.
    let sent = stream.write_all(&line);
    // The owner waits up to GUEST_ANSWER_TIMEOUT twice (hello, open).
    stream
        .set_read_timeout(Some(GUEST_ANSWER_TIMEOUT * 2 + Duration::from_secs(5)))
        .map_err(|e| err(e.to_string()))?;
    let welcome = match (read_line(&mut stream), sent) {
        (Ok(welcome), _) if !welcome.is_empty() => welcome,
        (_, Err(e)) => return Err(err(format!("cannot send: {e}"))),
        (Ok(welcome), Ok(())) => welcome,
        (Err(e), Ok(())) => return Err(err(format!("no answer: {e}"))),
    };
    stream
        .set_read_timeout(None)
        .map_err(|e| err(e.to_string()))?;
    let welcome: ClientWelcome =
        serde_json::from_slice(&welcome).map_err(|e| err(format!("bad answer: {e}")))?;
    match welcome {
        ClientWelcome::Opened(opened) => Ok(ShellSession {
            stream,
            decoder: FrameDecoder::new(),
            pending: Default::default(),
            opened,
            alive: Arc::default(),
        }),
        ClientWelcome::Error { message, kind } => {
            Err(ShellError::from_welcome(name, message, &kind))
        }
    }
}

/// Reads one line byte by byte (frames follow it on the same stream, so
/// nothing may be read ahead).
fn read_line(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed without an answer",
                ))
            }
            _ if byte[0] == b'\n' => return Ok(line),
            _ => line.push(byte[0]),
        }
    }
}

// ----------------------------------------------------------------- relay

/// The guest end: one connection to the shell server, shared by sessions.
struct GuestLink {
    writer: Mutex<UnixStream>,
    /// Frames from the guest for each relayed session, by guest session id.
    sessions: Mutex<HashMap<u32, Sender<ShellFrame>>>,
    /// Whether the guest answered `Hello`.
    ready: Mutex<bool>,
    ready_cv: Condvar,
    /// Set when the connection broke.
    dead: AtomicBool,
}

impl GuestLink {
    fn send(&self, frame: &ShellFrame) -> bool {
        self.writer
            .lock()
            .expect("shell link")
            .write_all(&frame.encode())
            .is_ok()
    }

    /// Says `Hello` until the guest answers, up to `timeout`.
    fn ensure_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut ready = self.ready.lock().expect("ready");
        while !*ready {
            if self.dead.load(Ordering::SeqCst) {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Said while holding `ready`: no session can be opened between
            // this check and the hello (a hello hangs every session up).
            self.send(&ShellFrame::json(
                Kind::Hello,
                0,
                &PortHello {
                    v: SHELL_PROTOCOL_VERSION,
                    who: format!("ferry {}", env!("CARGO_PKG_VERSION")),
                },
            ));
            ready = self
                .ready_cv
                .wait_timeout(ready, left.min(Duration::from_secs(1)))
                .expect("ready")
                .0;
        }
        true
    }
}

/// Relays `ferry shell` clients to the guest's shell server. Dropping it
/// stops the listener and removes the socket; sessions end with the VM.
pub struct ShellRelay {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

struct RelayState {
    name: String,
    /// The guest link, or why there is none.
    link: Result<Arc<GuestLink>, String>,
    next_id: AtomicU32,
    owner_uid: u32,
}

impl ShellRelay {
    /// Listens on `path` for clients of the VM `name`; `guest` is the
    /// engine's shell stream, or why the VM has none (clients are told).
    ///
    /// # Errors
    /// The socket cannot be made.
    pub fn start(
        path: &Path,
        name: &str,
        guest: Result<UnixStream, String>,
    ) -> Result<Self, crate::error::FileError> {
        use crate::error::FileError;
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(FileError::at(path))?;
        // Anyone may connect; SO_PEERCRED decides, and says why not.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
        let link = match guest {
            Ok(stream) => Ok(start_link(stream).map_err(FileError::at("shell link"))?),
            Err(reason) => Err(reason),
        };
        let state = Arc::new(RelayState {
            name: name.to_string(),
            link,
            // Session ids differ from any earlier owner's (the guest may
            // still send frames of those after a restore).
            next_id: AtomicU32::new((std::process::id() & 0xffff) << 16 | 1),
            // SAFETY: geteuid cannot fail.
            owner_uid: unsafe { libc::geteuid() },
        });
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("shell-relay".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { break };
                    let state = state.clone();
                    let _ = std::thread::Builder::new()
                        .name("shell-client".into())
                        .spawn(move || serve_client(&state, conn));
                }
            })
            .map_err(FileError::at("shell relay thread"))?;
        Ok(Self {
            path: path.to_path_buf(),
            stop,
        })
    }
}

impl Drop for ShellRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts the reader of the guest connection.
fn start_link(stream: UnixStream) -> std::io::Result<Arc<GuestLink>> {
    let mut reader = stream.try_clone()?;
    let link = Arc::new(GuestLink {
        writer: Mutex::new(stream),
        sessions: Mutex::new(HashMap::new()),
        ready: Mutex::new(false),
        ready_cv: Condvar::new(),
        dead: AtomicBool::new(false),
    });
    let l = link.clone();
    std::thread::Builder::new()
        .name("shell-guest".into())
        .spawn(move || {
            let mut decoder = FrameDecoder::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for frame in decoder.push(&buf[..n]) {
                    if frame.kind == Kind::Hello {
                        match frame.parse::<PortHello>() {
                            Ok(h) if h.v == SHELL_PROTOCOL_VERSION => {
                                *l.ready.lock().expect("ready") = true;
                                l.ready_cv.notify_all();
                            }
                            Ok(h) => tracing::warn!(
                                version = h.v,
                                "the guest's shell server speaks another protocol version"
                            ),
                            Err(e) => tracing::warn!("{e}"),
                        }
                        continue;
                    }
                    let to = l
                        .sessions
                        .lock()
                        .expect("sessions")
                        .get(&frame.session)
                        .cloned();
                    if let Some(to) = to {
                        let _ = to.send(frame);
                    }
                }
            }
            l.dead.store(true, Ordering::SeqCst);
            l.ready_cv.notify_all();
            // Every session's sender goes: their clients see the end.
            l.sessions.lock().expect("sessions").clear();
        })?;
    Ok(link)
}

fn welcome_line(w: &ClientWelcome) -> Vec<u8> {
    let mut line = serde_json::to_vec(w).expect("json");
    line.push(b'\n');
    line
}

fn welcome(conn: &mut UnixStream, w: &ClientWelcome) -> bool {
    conn.write_all(&welcome_line(w)).is_ok()
}

fn refuse(conn: &mut UnixStream, kind: &str, message: String) {
    welcome(
        conn,
        &ClientWelcome::Error {
            message,
            kind: kind.into(),
        },
    );
}

/// Refuses a client whose uid may not use this VM, before its hello is read.
fn refuse_unread(conn: &mut UnixStream, message: String) {
    let line = welcome_line(&ClientWelcome::Error {
        message,
        kind: "not-allowed".into(),
    });
    crate::control::answer_unread(conn, &line);
}

fn serve_client(state: &RelayState, mut conn: UnixStream) {
    match crate::control::peer_uid(&conn) {
        Ok(uid) if uid == 0 || uid == state.owner_uid => {}
        Ok(uid) => {
            return refuse_unread(
                &mut conn,
                format!(
                    "uid {uid} is neither root nor the user VM '{}' runs as (uid {})",
                    state.name, state.owner_uid
                ),
            )
        }
        Err(e) => return refuse_unread(&mut conn, format!("SO_PEERCRED: {e}")),
    }
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let hello = {
        let mut reader = BufReader::new(match conn.try_clone() {
            Ok(c) => c,
            Err(_) => return,
        });
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        // A client sends nothing before the answer, so nothing is lost
        // in the buffer.
        match serde_json::from_str::<ClientHello>(&line) {
            Ok(h) if h.v == SHELL_PROTOCOL_VERSION => h,
            Ok(h) => {
                return refuse(
                    &mut conn,
                    "other",
                    format!("shell protocol {} is not {SHELL_PROTOCOL_VERSION}", h.v),
                )
            }
            Err(e) => return refuse(&mut conn, "other", format!("bad request: {e}")),
        }
    };
    let _ = conn.set_read_timeout(None);
    let link = match &state.link {
        Ok(link) => link.clone(),
        Err(reason) => return refuse(&mut conn, "no-shell-port", reason.clone()),
    };
    if !link.ensure_ready(GUEST_ANSWER_TIMEOUT) {
        let what = if link.dead.load(Ordering::SeqCst) {
            "the shell channel closed"
        } else {
            "hello"
        };
        return refuse(&mut conn, "timeout", what.into());
    }
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = mpsc::channel();
    link.sessions.lock().expect("sessions").insert(id, tx);
    let forget = |link: &GuestLink| {
        link.sessions.lock().expect("sessions").remove(&id);
    };
    if !link.send(&ShellFrame::json(Kind::Open, id, &hello.open)) {
        forget(&link);
        return refuse(&mut conn, "timeout", "the shell channel closed".into());
    }
    // Frames of the session that come before `opened` (an older guest may
    // send output first) are passed on after it.
    let mut early = Vec::new();
    let opened = loop {
        match rx.recv_timeout(GUEST_ANSWER_TIMEOUT) {
            Ok(f) if f.kind == Kind::Opened => match f.parse::<Opened>() {
                Ok(o) => break o,
                Err(e) => {
                    forget(&link);
                    return refuse(&mut conn, "guest", e);
                }
            },
            Ok(f) if f.kind == Kind::OpenFailed => {
                forget(&link);
                return refuse(
                    &mut conn,
                    "guest",
                    String::from_utf8_lossy(&f.payload).into_owned(),
                );
            }
            Ok(f) => early.push(f),
            Err(_) => {
                forget(&link);
                link.send(&ShellFrame::new(Kind::Close, id, Vec::new()));
                return refuse(&mut conn, "timeout", "open".into());
            }
        }
    };
    if !welcome(&mut conn, &ClientWelcome::Opened(opened)) {
        forget(&link);
        link.send(&ShellFrame::new(Kind::Close, id, Vec::new()));
        return;
    }
    for mut f in early {
        f.session = CLIENT_SESSION;
        if conn.write_all(&f.encode()).is_err() {
            break;
        }
    }
    let Ok(writer) = conn.try_clone() else {
        forget(&link);
        link.send(&ShellFrame::new(Kind::Close, id, Vec::new()));
        return;
    };
    let exited = Arc::new(AtomicBool::new(false));
    let out = std::thread::Builder::new().name("shell-out".into()).spawn({
        let exited = exited.clone();
        move || to_client(rx, writer, &exited)
    });
    // Client → guest, until the client goes away.
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for mut f in decoder.push(&buf[..n]) {
            if matches!(
                f.kind,
                Kind::Stdin | Kind::StdinEof | Kind::Resize | Kind::Ping | Kind::Close
            ) {
                f.session = id;
                link.send(&f);
            }
        }
    }
    forget(&link);
    if !exited.load(Ordering::SeqCst) {
        // Ctrl-C or a closed terminal on the client: hang the session up.
        link.send(&ShellFrame::new(Kind::Close, id, Vec::new()));
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
    if let Ok(t) = out {
        let _ = t.join();
    }
}

/// Guest → client, until the session's exit code (then the client's socket
/// is shut for writing) or the link's end.
fn to_client(rx: Receiver<ShellFrame>, mut writer: UnixStream, exited: &AtomicBool) {
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(mut f) => {
                let is_exit = f.kind == Kind::Exit;
                f.session = CLIENT_SESSION;
                if writer.write_all(&f.encode()).is_err() {
                    return;
                }
                if is_exit {
                    exited.store(true, Ordering::SeqCst);
                    let _ = writer.shutdown(std::net::Shutdown::Write);
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                // The client's reader ends this thread through the socket.
                if writer.peer_addr().is_err() {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = writer.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
}
