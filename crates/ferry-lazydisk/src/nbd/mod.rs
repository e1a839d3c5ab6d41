//! An NBD server that exports one [`LazyDisk`] on a Unix socket, for QEMU's
//! built-in NBD client (no kernel NBD module needed):
//!
//! ```text
//! -blockdev driver=raw,node-name=d0,file.driver=nbd,file.server.type=unix,file.server.path=SOCKET
//! -drive id=d0,if=none,driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=SOCKET
//! qemu-img / qemu-io:  nbd+unix:///?socket=SOCKET
//! ```
//!
//! It speaks fixed newstyle negotiation (`NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`,
//! `NBD_OPT_INFO`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`, `NBD_OPT_STRUCTURED_REPLY`
//! and the `base:allocation` metadata context; every other option, TLS
//! included, is answered `NBD_REP_ERR_UNSUP`), simple or structured replies,
//! and the commands READ, WRITE (and FUA), FLUSH, TRIM, WRITE_ZEROES, CACHE,
//! BLOCK_STATUS and DISC. BLOCK_STATUS is there so that clients copying the
//! disk (`qemu-img convert`, a `drive-mirror` migration) skip zero chunks
//! instead of reading them, which would fetch them. Each connection reads requests on one
//! thread and runs them on a few workers, so a request waiting for a chunk
//! from the registry does not hold up requests for chunks already here;
//! replies go out as requests finish, which simple replies allow.

mod conn;
mod proto;

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tracing::{debug, info, warn};

use crate::error::NbdError;
use crate::sys;
use crate::{Export, LazyDisk};

pub use conn::{replay_client, ClientReplay, NbdStream, ReplayedRequest};

/// Largest READ or WRITE payload accepted: the 32 MiB the protocol says
/// every server should take, and the maximum advertised to clients.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// How an [`NbdServer`] exports its disk.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// The export's name. Clients may also ask for the default export (the
    /// empty name), which is this one.
    pub export_name: String,
    /// Refuse writes (`NBD_FLAG_READ_ONLY`, EPERM).
    pub read_only: bool,
    /// Requests of one connection run at once.
    pub workers_per_connection: usize,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            export_name: "ferry".into(),
            read_only: false,
            workers_per_connection: 4,
        }
    }
}

/// A running NBD server. Dropping it (or [`stop`](Self::stop)) stops
/// accepting, lets requests in flight finish, closes every connection and
/// removes the socket.
pub struct NbdServer {
    path: PathBuf,
    shared: Arc<Shared>,
    /// Dropping it wakes the accept loop.
    wake: Option<UnixStream>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("path", &self.path)
            .field("disk", &self.shared.disk.path())
            .finish()
    }
}

struct Shared {
    disk: Arc<LazyDisk>,
    options: NbdOptions,
    stopping: AtomicBool,
    accepted: AtomicU64,
    conns: Mutex<Conns>,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    /// A second handle on each live connection, to shut it down on stop.
    live: HashMap<u64, UnixStream>,
    threads: Vec<JoinHandle<()>>,
}

impl NbdServer {
    /// Serves `disk` to NBD clients on the Unix socket `path` with the
    /// default [`NbdOptions`].
    ///
    /// # Errors
    /// As [`serve_with`](Self::serve_with).
    pub fn serve(path: &Path, disk: Arc<LazyDisk>) -> Result<NbdServer, NbdError> {
        Self::serve_with(path, disk, NbdOptions::default())
    }

    /// Serves `disk` on the Unix socket `path` (created with mode 0600; a
    /// stale socket left by a dead server is replaced).
    ///
    /// # Errors
    /// [`NbdError::InUse`] if a server answers on `path`;
    /// [`NbdError::Bind`] if it cannot be bound; [`NbdError::Setup`] if a
    /// thread or socket cannot be made.
    pub fn serve_with(
        path: &Path,
        disk: Arc<LazyDisk>,
        options: NbdOptions,
    ) -> Result<NbdServer, NbdError> {
        let listener = bind(path)?;
        let setup = |what| move |source| NbdError::Setup { what, source };
        listener
            .set_nonblocking(true)
            .map_err(setup("listening socket"))?;
        let (wake, woken) = UnixStream::pair().map_err(setup("wake-up socket"))?;
        let shared = Arc::new(Shared {
            disk,
            options,
            stopping: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            conns: Mutex::new(Conns::default()),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&listener, &woken, &shared))
                .map_err(setup("accept thread"))?
        };
        info!(
            socket = %path.display(),
            disk = %shared.disk.path().display(),
            export = %shared.options.export_name,
            "serving the lazy disk over NBD"
        );
        Ok(NbdServer {
            path: path.to_path_buf(),
            shared,
            wake: Some(wake),
            accept: Some(accept),
        })
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// The URI qemu-img and qemu-io take for the default export:
    /// `nbd+unix:///?socket=PATH`.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.path.display())
    }

    /// The disk served.
    pub fn disk(&self) -> &Arc<LazyDisk> {
        &self.shared.disk
    }

    /// Connections open now.
    pub fn live_connections(&self) -> usize {
        self.shared.conns().live.len()
    }

    /// Connections accepted since the start.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Stops the server and waits until every connection is closed.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if self.accept.is_none() {
            return;
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        drop(self.wake.take());
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let (streams, threads) = {
            let mut c = self.shared.conns();
            (
                c.live.drain().map(|(_, s)| s).collect::<Vec<_>>(),
                std::mem::take(&mut c.threads),
            )
        };
        // Reading ends: requests already read are answered, then each
        // connection closes.
        for s in &streams {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
        for t in threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        debug!(socket = %self.path.display(), "NBD server stopped");
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One NBD client served on a connection the caller already has, not
/// accepted from a socket of the server's own: a peer's engine copying a
/// disk over a connection ferry opened and authenticated. Dropping it (or
/// [`stop`](Self::stop)) answers the requests already read, then closes
/// the connection.
///
/// Why: QEMU's NBD server takes clients only from a listening socket, so a
/// peer's connection reached it through a relay in ferry, a copy of every
/// byte on the CPU the guests needed (bench/README.md).
pub struct NbdConnection {
    /// Shuts the connection's reading side, which ends the serving thread.
    stop_reading: Box<dyn Fn() + Send>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdConnection")
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl NbdConnection {
    /// Serves `disk` to the NBD client at the other end of `stream`, on a
    /// thread of its own, from the server's greeting on.
    ///
    /// # Errors
    /// [`NbdError::Setup`] if the stream cannot be cloned or the thread
    /// cannot be started.
    pub fn serve<S: NbdStream>(
        stream: S,
        disk: std::sync::Arc<dyn Export>,
        options: NbdOptions,
    ) -> Result<NbdConnection, NbdError> {
        let setup = |what| move |source| NbdError::Setup { what, source };
        let handle = stream.try_clone().map_err(setup("connection"))?;
        let thread = std::thread::Builder::new()
            .name("nbd-peer".into())
            .spawn(move || conn::serve(stream, &*disk, &options, 0))
            .map_err(setup("connection thread"))?;
        Ok(NbdConnection {
            stop_reading: Box::new(move || {
                let _ = handle.shutdown(std::net::Shutdown::Read);
            }),
            thread: Some(thread),
        })
    }

    /// Whether the client has gone (or broke the protocol).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops reading requests, waits until those already read are
    /// answered, and closes the connection: when it returns, nothing more
    /// reaches the disk through it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(t) = self.thread.take() {
            (self.stop_reading)();
            let _ = t.join();
        }
    }
}

impl Drop for NbdConnection {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Binds `path`, replacing a socket nobody answers on.
fn bind(path: &Path) -> Result<UnixListener, NbdError> {
    let bind_err = |source| NbdError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let is_socket = std::fs::symlink_metadata(path)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if !is_socket {
                return Err(bind_err(e));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(NbdError::InUse {
                    path: path.to_path_buf(),
                });
            }
            debug!(socket = %path.display(), "replacing a stale socket");
            std::fs::remove_file(path).map_err(bind_err)?;
            UnixListener::bind(path).map_err(bind_err)?
        }
        Err(e) => return Err(bind_err(e)),
    };
    // The disk's bytes are the guest's: only this user may connect.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

fn accept_loop(listener: &UnixListener, woken: &UnixStream, shared: &Arc<Shared>) {
    loop {
        let ready = match sys::poll_readable(&[listener.as_fd(), woken.as_fd()], None) {
            Ok(r) => r,
            Err(e) => {
                warn!("NBD server: waiting for clients failed: {e}");
                return;
            }
        };
        if ready[1] || shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!("NBD server: accepting a client failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        if let Err(e) = start_connection(stream, shared) {
            warn!("NBD server: cannot serve a client: {e}");
        }
    }
}

fn start_connection(stream: UnixStream, shared: &Arc<Shared>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let handle = stream.try_clone()?;
    let mut c = shared.conns();
    c.threads.retain(|t| !t.is_finished());
    let id = c.next_id;
    c.next_id += 1;
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                conn::serve(stream, &*shared.disk, &shared.options, id);
                shared.conns().live.remove(&id);
            })?
    };
    c.live.insert(id, handle);
    c.threads.push(thread);
    shared.accepted.fetch_add(1, Ordering::Relaxed);
    Ok(())
}
