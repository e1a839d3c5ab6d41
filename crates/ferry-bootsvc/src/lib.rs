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

/// Connections each listener serves at once; one past that is closed at
/// once. Generous: every node of a cluster asks at power-on, and each
/// request is short.
pub const MAX_CONNECTIONS: usize = 1024;

/// Shared by every request.
pub(crate) struct AppState {
    pub(crate) store: Store,
    pub(crate) token: Option<ferry_transport::Token>,
    /// `http://host:port` (or `https://`), no trailing slash.
    pub(crate) advertise: String,
    pub(crate) files: PathBuf,
}

/// A service bound to its address with its store open, not yet serving.
pub struct BootService {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    /// The plain listener for nodes ([`BootService::with_node_listener`]).
    node: Option<(std::net::TcpListener, SocketAddr)>,
    tls: Option<ferry_transport::ServerTls>,
    /// `--advertise` as given.
    advertise_given: Option<String>,
    state: AppState,
}

impl std::fmt::Debug for BootService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootService")
            .field("addr", &self.addr)
            .field("node", &self.node.as_ref().map(|n| n.1))
            .field("tls", &self.tls.is_some())
            .field("advertise", &self.state.advertise)
            .finish()
    }
}

/// Turns `host:port`, `http://host:port[/]` or `https://host:port[/]`
/// into a base URL without a trailing slash; a bare `host:port` is
/// `http://`.
///
/// # Errors
/// [`BootSvcError::BadAdvertise`] for anything else.
pub fn advertise_url(text: &str) -> Result<String, BootSvcError> {
    advertise_with(text, "http")
}

/// As [`advertise_url`], a bare `host:port` taking `scheme`.
fn advertise_with(text: &str, scheme: &str) -> Result<String, BootSvcError> {
    let bad = || BootSvcError::BadAdvertise(text.to_string());
    let t = text.trim().trim_end_matches('/');
    let (scheme, rest) = match (t.strip_prefix("http://"), t.strip_prefix("https://")) {
        (Some(rest), _) => ("http", rest),
        (_, Some(rest)) => ("https", rest),
        _ => (scheme, t),
    };
    if rest.is_empty() || rest.contains('/') || rest.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok(format!("{scheme}://{rest}"))
}

/// The URL of `addr` for clients on this host (an unspecified address
/// becomes loopback).
fn local_url(scheme: &str, addr: SocketAddr) -> String {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("{scheme}://{a}")
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
        let (listener, addr) = bind(config.listen)?;
        let mut service = BootService {
            listener,
            addr,
            node: None,
            tls: None,
            advertise_given: config.advertise,
            state: AppState {
                store,
                token,
                advertise: String::new(),
                files,
            },
        };
        service.settle_advertise()?;
        Ok(service)
    }

    /// Speaks only TLS on the listening address (the API and, without a
    /// node listener, the nodes' routes too): each handshake and the
    /// headers of each request have an overall deadline
    /// ([`ferry_transport::HEADER_DEADLINE`]).
    ///
    /// # Errors
    /// [`BootSvcError::BadAdvertise`] if `--advertise` no longer fits.
    pub fn with_tls(
        mut self,
        tls: ferry_transport::ServerTls,
    ) -> Result<BootService, BootSvcError> {
        self.tls = Some(tls);
        self.settle_advertise()?;
        Ok(self)
    }

    /// Also listens on `addr` in plain HTTP for what nodes ask (iPXE and
    /// an initramfs cannot do TLS): the boot script, cloud-init data,
    /// files and phone-home, and nothing else (403 naming the API's
    /// address). Nodes are then told to use this address unless
    /// `advertise` says otherwise.
    ///
    /// # Errors
    /// [`BootSvcError::Bind`], [`BootSvcError::BadAdvertise`].
    pub fn with_node_listener(mut self, addr: SocketAddr) -> Result<BootService, BootSvcError> {
        self.node = Some(bind(addr)?);
        self.settle_advertise()?;
        Ok(self)
    }

    /// Works out the address nodes are told to use: `--advertise` (a bare
    /// `host:port` in the scheme nodes' listener speaks), else the node
    /// listener, else the listening address.
    fn settle_advertise(&mut self) -> Result<(), BootSvcError> {
        let node_scheme = if self.node.is_none() && self.tls.is_some() {
            "https"
        } else {
            "http"
        };
        self.state.advertise = match (&self.advertise_given, &self.node) {
            (Some(a), _) => advertise_with(a, node_scheme)?,
            (None, Some((_, node))) => local_url("http", *node),
            (None, None) => local_url(node_scheme, self.addr),
        };
        Ok(())
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API's base URL for clients on this host (`https://` with TLS).
    pub fn url(&self) -> String {
        local_url(self.scheme(), self.addr)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The address of the plain listener for nodes, if there is one.
    pub fn node_addr(&self) -> Option<SocketAddr> {
        self.node.as_ref().map(|n| n.1)
    }

    /// The base URL nodes are told to use.
    pub fn advertise(&self) -> &str {
        &self.state.advertise
    }

    /// Serves until `shutdown` completes. Must run on a tokio runtime with
    /// I/O and time enabled.
    ///
    /// # Errors
    /// [`BootSvcError::Serve`] if a socket fails.
    pub async fn serve_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BootSvcError> {
        let addr = self.addr;
        let api_url = self.url();
        let serve_err = |addr| move |source| BootSvcError::Serve { addr, source };
        let listener = ferry_transport::CappedListener::new(
            self.listener,
            MAX_CONNECTIONS,
            self.tls.as_ref(),
            "boot-service",
        )
        .map_err(serve_err(addr))?;
        info!(%addr, tls = self.tls.is_some(), advertise = %self.state.advertise, "boot service listening");
        let state = Arc::new(self.state);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        // Each request carries its client's address (`ConnectInfo`):
        // cloud-init finds nodes by their source address.
        let api = ferry_transport::serve(
            listener,
            routes::router(state.clone()),
            stopped(stop_rx.clone()),
        );
        let node = match self.node {
            None => None,
            Some((l, node_addr)) => {
                let l = ferry_transport::CappedListener::new(
                    l,
                    MAX_CONNECTIONS,
                    None,
                    "boot-service nodes",
                )
                .map_err(serve_err(node_addr))?;
                info!(addr = %node_addr, "boot service listening for nodes (plain HTTP)");
                let app = routes::node_router(state, api_url);
                Some((node_addr, ferry_transport::serve(l, app, stopped(stop_rx))))
            }
        };
        let deadline = async move {
            shutdown.await;
            info!("boot service shutting down");
            let _ = stop_tx.send(true);
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let servers = async move {
            match node {
                None => api.await.map_err(serve_err(addr)),
                Some((node_addr, node)) => {
                    let (a, n) = tokio::join!(api, node);
                    a.map_err(serve_err(addr))?;
                    n.map_err(serve_err(node_addr))
                }
            }
        };
        tokio::select! {
            result = servers => result,
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

/// Binds `addr`, non-blocking for the runtime.
fn bind(addr: SocketAddr) -> Result<(std::net::TcpListener, SocketAddr), BootSvcError> {
    let err = |source| BootSvcError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
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
