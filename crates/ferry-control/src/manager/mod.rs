//! `ferry manager`: one API to see every node and instance, create VMs
//! from a registry on any node, move them between nodes and delete them,
//! with its state kept across restarts (`--store DIR`).
//!
//! Two listeners: the API (`--listen`, default `127.0.0.1:1400`) for
//! people, scripts and `ferry cluster`, and the workers' link
//! (`--workers-listen`, default `127.0.0.1:1399`, see [`crate::link`]).
//! Routes are in [`routes`]; the state and what is done with it in
//! [`core`]. `docs/control-plane.md` documents both.

pub mod core;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::api::Problem;
use crate::store::{Store, StoreError};

pub use self::core::Shared;

/// How long requests still running get after a shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How `ferry manager` runs.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// The API's address.
    pub listen: SocketAddr,
    /// The workers' link's address.
    pub workers_listen: SocketAddr,
    /// Where its state is kept.
    pub store: PathBuf,
    /// When set, every request (API and link) needs `Authorization: Bearer`
    /// with it.
    pub token: Option<String>,
    /// How long a create, move or delete may take.
    pub op_timeout: Duration,
    /// How long a registry may take to describe a package.
    pub registry_timeout: Duration,
}

/// Why `ferry manager` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// Its store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An address could not be listened on.
    #[error("cannot listen on {addr}: {source}{hint}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
        /// What to do.
        hint: &'static str,
    },
    /// The async runtime could not start.
    #[error("cannot start the manager's runtime: {0}")]
    Runtime(std::io::Error),
    /// Serving failed.
    #[error("serving {addr}: {source}")]
    Serve {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A failed request: its HTTP status and problem JSON.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// A short summary of the kind.
    pub title: &'static str,
    /// What happened and what to do.
    pub detail: String,
    /// Free memory, for "no room".
    pub free_mib: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, title: &'static str, detail: String) -> ApiError {
        ApiError {
            status,
            title,
            detail,
            free_mib: None,
        }
    }

    /// 400: a malformed request.
    pub fn bad(detail: String) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed request", detail)
    }

    /// 401: no token, or the wrong one.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this manager needs 'Authorization: Bearer <token>' with its token (--token-file)"
                .into(),
        )
    }

    /// 404: no such node.
    pub fn unknown_node(name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown node",
            format!("no node is named '{name}': GET /nodes lists them"),
        )
    }

    /// 404: no such instance.
    pub fn unknown_instance(name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown instance",
            format!("no instance is named '{name}': GET /v1/instances lists them"),
        )
    }

    /// 404 on the link: a session this manager does not know (it
    /// restarted): the worker registers again.
    pub fn unknown_session() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown session",
            "this manager does not know the session (it restarted): register again".into(),
        )
    }

    /// 409: it conflicts with the state.
    pub fn conflict(detail: String) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", detail)
    }

    /// 409: no node has room.
    pub fn no_room(node: Option<&str>, need_mib: u64, free_mib: u64) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::CONFLICT,
            "no room",
            format!(
                "{} has {free_mib} MiB free, and the instance needs {need_mib} MiB plus {} MiB for its engine: choose another node, or free memory there",
                node.map(|n| format!("node {n}")).unwrap_or_else(|| "no ready node has room: the roomiest".into()),
                core::ENGINE_OVERHEAD_MIB
            ),
        );
        e.free_mib = Some(free_mib);
        e
    }

    /// 502: the worker tried and failed.
    pub fn worker(node: &str, class: &str, message: &str) -> ApiError {
        let status = if class == "bad-input" {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::BAD_GATEWAY
        };
        ApiError::new(status, "the node failed", format!("{node}: {message}"))
    }

    /// 503: try again.
    pub fn unavailable(detail: String) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }

    /// 504: the node did not answer in time.
    pub fn timeout(detail: String) -> ApiError {
        ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", detail)
    }

    /// 500: the store failed.
    pub fn store(e: StoreError) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store failed",
            e.to_string(),
        )
    }

    /// As problem JSON.
    pub fn problem(&self) -> Problem {
        Problem {
            kind: "about:blank".into(),
            title: self.title.into(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            free_mib: self.free_mib,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).expect("a problem serialises");
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
    }
}

/// Runs the manager until `shutdown` completes. Blocks the calling thread.
pub fn run(
    config: ManagerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr, SocketAddr),
) -> Result<(), ManagerError> {
    let store = Store::open(&config.store)?;
    let shared = Shared::load(store, config.op_timeout).map_err(|e| {
        ManagerError::Store(StoreError::Database {
            path: config.store.clone(),
            detail: e.detail,
        })
    })?;
    let bind = |addr: SocketAddr, hint| {
        std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| ManagerError::Bind { addr, source, hint })
    };
    let api = bind(config.listen, ": choose another --listen")?;
    let link = bind(config.workers_listen, ": choose another --workers-listen")?;
    let (api_addr, link_addr) = (
        api.local_addr().unwrap_or(config.listen),
        link.local_addr().unwrap_or(config.workers_listen),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ManagerError::Runtime)?;
    on_listening(api_addr, link_addr);
    let state = routes::AppState {
        shared: shared.clone(),
        token: config.token.clone().map(Arc::from),
        registry_timeout: config.registry_timeout,
    };
    rt.block_on(async move {
        let api = tokio::net::TcpListener::from_std(api).map_err(|source| ManagerError::Serve {
            addr: api_addr,
            source,
        })?;
        let link =
            tokio::net::TcpListener::from_std(link).map_err(|source| ManagerError::Serve {
                addr: link_addr,
                source,
            })?;
        let leases = {
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    shared.check_leases();
                }
            })
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let api_server = axum::serve(api, routes::api(state.clone()))
            .with_graceful_shutdown(stopped(stop_rx.clone()));
        let link_server =
            axum::serve(link, routes::link(state)).with_graceful_shutdown(stopped(stop_rx.clone()));
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        // Long polls and event streams never end by themselves: after a
        // shutdown is asked for, they get a short grace, then are cut.
        let grace = async move {
            stopped(stop_rx).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let (a, l) = tokio::select! {
            r = async { tokio::join!(api_server, link_server) } => r,
            () = grace => (Ok(()), Ok(())),
        };
        leases.abort();
        a.map_err(|source| ManagerError::Serve {
            addr: api_addr,
            source,
        })?;
        l.map_err(|source| ManagerError::Serve {
            addr: link_addr,
            source,
        })
    })
}
