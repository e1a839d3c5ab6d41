//! ferry's boot and inventory service: the network half of booting
//! stateless nodes, API-compatible with OpenCHAMI's services so that their
//! tools and scripts work against it unchanged.
//!
//! - `/hsm/v2`: inventory as SMD has it (components, EthernetInterfaces,
//!   groups);
//! - `/boot/v1`: boot parameters and iPXE boot scripts as BSS has them;
//! - `/cloud-init`: nocloud-net meta-data, user-data and vendor-data by the
//!   node's source address (as OpenCHAMI does) or by MAC (ferry's guests
//!   all share one address), with group data and phone-home;
//! - `/files`: the kernels, initrds and images in the store's `files/`.
//!
//! Everything is kept in one [`store::Store`] written before each write is
//! answered. Writes need the token when one is set; reads never do (nodes
//! hold no tokens). The library serves and returns; it prints nothing.

#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod fetch;
pub mod ids;
pub mod model;
mod routes;
pub mod store;
pub mod types;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_transport::ServerThread;
use tracing::info;

pub use error::{ApiError, BootSvcError, LoadError};
pub use store::{Store, StoreError};

/// The port BSS listens on by default; ferry's service serves all of SMD,
/// BSS and cloud-init there.
pub const DEFAULT_PORT: u16 = 27778;

/// After a shutdown is asked for, requests still running get this long.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What the service serves and where.
#[derive(Debug, Clone)]
pub struct BootServiceConfig {
    /// The address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// The store directory: `state.json` and `files/`.
    pub store: PathBuf,
    /// When set, writes need `Authorization: Bearer <token>` (a checked
    /// token: 16 characters or more, as everywhere in ferry).
    pub token: Option<ferry_transport::Token>,
    /// The base URL nodes are told to use (`http://host:port`); `None`:
    /// the listening address.
    pub advertise: Option<String>,
}

/// Shared by every request.
pub(crate) struct AppState {
    pub(crate) store: Store,
    pub(crate) token: Option<ferry_transport::Token>,
    /// `http://host:port`, no trailing slash.
    pub(crate) advertise: String,
    pub(crate) files: PathBuf,
}

/// A service bound to its address with its store open, not yet serving.
pub struct BootService {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    state: Arc<AppState>,
}

impl std::fmt::Debug for BootService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootService")
            .field("addr", &self.addr)
            .field("advertise", &self.state.advertise)
            .finish()
    }
}

/// Turns `host:port` or `http://host:port[/]` into `http://host:port`.
///
/// # Errors
/// [`BootSvcError::BadAdvertise`] for anything else.
pub fn advertise_url(text: &str) -> Result<String, BootSvcError> {
    let bad = || BootSvcError::BadAdvertise(text.to_string());
    let t = text.trim().trim_end_matches('/');
    let rest = t.strip_prefix("http://").unwrap_or(t);
    if rest.is_empty()
        || rest.contains('/')
        || rest.contains(char::is_whitespace)
        || t.starts_with("https://")
    {
        return Err(bad());
    }
    Ok(format!("http://{rest}"))
}

impl BootService {
    /// Opens the store and binds the socket, so that a damaged store or a
    /// taken address fails here, before anything is served.
    ///
    /// # Errors
    /// [`BootSvcError::Store`],
    /// [`BootSvcError::BadAdvertise`] or [`BootSvcError::Bind`].
    pub fn bind(config: BootServiceConfig) -> Result<BootService, BootSvcError> {
        let token = config.token;
        let store = Store::open(&config.store)?;
        let files = config.store.join("files");
        std::fs::create_dir_all(&files).map_err(|source| {
            BootSvcError::Store(StoreError::Io {
                path: files.clone(),
                source,
            })
        })?;
        let bind = |source| BootSvcError::Bind {
            addr: config.listen,
            source,
        };
        let listener = std::net::TcpListener::bind(config.listen).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let advertise = match &config.advertise {
            Some(a) => advertise_url(a)?,
            None if addr.ip().is_unspecified() => format!("http://127.0.0.1:{}", addr.port()),
            None => format!("http://{addr}"),
        };
        Ok(BootService {
            listener,
            addr,
            state: Arc::new(AppState {
                store,
                token,
                advertise,
                files,
            }),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL nodes are told to use.
    pub fn advertise(&self) -> &str {
        &self.state.advertise
    }

    /// Serves until `shutdown` completes. Must run on a tokio runtime with
    /// I/O and time enabled.
    ///
    /// # Errors
    /// [`BootSvcError::Serve`] if the socket fails.
    pub async fn serve_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BootSvcError> {
        let addr = self.addr;
        let serve_err = |source| BootSvcError::Serve { addr, source };
        let listener = tokio::net::TcpListener::from_std(self.listener).map_err(serve_err)?;
        info!(%addr, advertise = %self.state.advertise, "boot service listening");
        let app = routes::router(self.state);
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        });
        let deadline = async move {
            shutdown.await;
            info!("boot service shutting down");
            let _ = stop_tx.send(true);
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            result = server => result.map_err(serve_err),
            () = deadline => Ok(()),
        }
    }

    /// Serves until `shutdown` completes, on a runtime of its own; blocks.
    ///
    /// # Errors
    /// [`BootSvcError::Setup`] if the runtime cannot start, else as
    /// [`serve_until`](Self::serve_until).
    pub fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BootSvcError> {
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("boot-service")
            .enable_all()
            .build()
            .map_err(|source| BootSvcError::Setup {
                what: "runtime",
                source,
            })?
            .block_on(self.serve_until(shutdown))
    }
}

impl BootService {
    /// Serves on a thread of its own until the returned handle is stopped
    /// or dropped: for blocking callers (the CLI waits for Ctrl-C).
    ///
    /// # Errors
    /// [`BootSvcError::Setup`] if the thread cannot start.
    pub fn spawn(self) -> Result<RunningBootService, BootSvcError> {
        ServerThread::spawn("boot-service", move |stop| self.run_until(stop.wait())).map_err(
            |source| BootSvcError::Setup {
                what: "thread",
                source,
            },
        )
    }
}

/// A service serving on its own thread ([`BootService::spawn`]); dropping
/// it stops the service, [`ServerThread::stop`] stops it and returns what
/// it failed with.
pub type RunningBootService = ServerThread<BootSvcError>;
