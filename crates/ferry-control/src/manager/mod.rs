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

/// The most connections each listener (the API, the link) serves at once:
/// more are closed as soon as they are accepted. Each worker holds about
/// three (its long poll, a heartbeat, a result); each `watch` one.
pub const MAX_CONNECTIONS: usize = 512;

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
    pub token: Option<ferry_transport::Token>,
    /// How long a create, move or delete may take.
    pub op_timeout: Duration,
    /// How long a registry may take to describe a package.
    pub registry_timeout: Duration,
    /// Keep the records in etcd, with a leader among several managers.
    pub etcd: Option<EtcdConfig>,
    /// The registries' token, if they need one: the manager reads package
    /// descriptions with it and hands it to the node that creates.
    pub registry_token: Option<ferry_transport::Token>,
    /// TLS for https:// registries (`--registry-ca`), when the manager
    /// reads a package's description.
    pub registry_tls: Option<ferry_transport::ClientTls>,
    /// Speak only TLS on both listeners (`--tls-cert`, `--tls-key`,
    /// `--client-ca`), each handshake bounded by
    /// [`ferry_transport::TLS_HANDSHAKE_DEADLINE`].
    pub tls: Option<ferry_transport::ServerTls>,
}

/// `--etcd`: several managers share records in etcd; one leads.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://HOST:2379[,...]`.
    pub endpoints: String,
    /// Key prefix (several clusters may share one etcd).
    pub prefix: String,
    /// The leader's lease, seconds: how soon a follower takes over.
    pub ttl_s: u64,
    /// The URL clients reach this manager's API at, when it leads
    /// (`--api-url`; default `http(s)://LISTEN` unless it listens on an
    /// unspecified address): followers redirect API requests there.
    pub api_url: Option<String>,
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
    /// This manager lost its etcd lease: another manager leads now.
    #[error("this manager lost its leadership (its etcd lease could not be kept): it stopped; another manager leads")]
    LostLeadership,
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
/// With etcd, it answers 503 (naming the leader) until it is elected, then
/// serves; it fails with [`ManagerError::LostLeadership`] if it loses its
/// lease, so that it never acts beside another leader.
pub fn run(
    config: ManagerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr, SocketAddr),
) -> Result<(), ManagerError> {
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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    rt.spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let clone = |l: &std::net::TcpListener, addr| {
        l.try_clone()
            .map_err(|source| ManagerError::Serve { addr, source })
    };
    let (store, leader) = match &config.etcd {
        None => (Store::open(&config.store)?, None),
        Some(e) => {
            let etcd = crate::etcd::Etcd::new(&e.endpoints, &e.prefix);
            let me = crate::etcd::LeaderValue {
                id: core::random_token(),
                api: api_addr.to_string(),
                url: e.api_url.clone().or_else(|| {
                    (!api_addr.ip().is_unspecified()).then(|| {
                        let scheme = if config.tls.is_some() {
                            "https"
                        } else {
                            "http"
                        };
                        format!("{scheme}://{api_addr}")
                    })
                }),
            };
            let standby = rt.block_on(standby(
                clone(&api, api_addr)?,
                clone(&link, link_addr)?,
                etcd.clone(),
                me.clone(),
                e.ttl_s,
                config.tls.clone(),
                stop_rx.clone(),
            ))?;
            let Some(lease) = standby else {
                return Ok(()); // shut down before it was elected
            };
            let fence_value = serde_json::to_vec(&me).expect("serialises");
            let fence = (etcd.key("leader"), fence_value);
            tracing::info!(id = me.id, "elected leader");
            (
                Store::etcd(etcd.clone(), fence),
                Some((etcd, lease, e.ttl_s)),
            )
        }
    };
    let shared =
        Shared::load(store, config.op_timeout, config.registry_token.clone()).map_err(|e| {
            ManagerError::Store(StoreError::Database {
                path: config.store.clone(),
                detail: e.detail,
            })
        })?;
    let state = routes::AppState {
        shared: shared.clone(),
        token: config.token.clone(),
        registry_timeout: config.registry_timeout,
        registry_tls: config.registry_tls.clone(),
    };
    let tls = config.tls.clone();
    rt.block_on(async move {
        let api =
            capped(api, tls.as_ref(), "manager API").map_err(|source| ManagerError::Serve {
                addr: api_addr,
                source,
            })?;
        let link =
            capped(link, tls.as_ref(), "manager link").map_err(|source| ManagerError::Serve {
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
        // The leader keeps its etcd lease alive; if it cannot, it stops
        // serving at once.
        let (lost_tx, mut lost_rx) = tokio::sync::watch::channel(false);
        if let Some((etcd, lease, ttl_s)) = leader {
            tokio::task::spawn_blocking(move || keep_leading(&etcd, &lease, ttl_s, &lost_tx));
        }
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let api_server =
            ferry_transport::serve(api, routes::api(state.clone()), stopped(stop_rx.clone()));
        let link_server =
            ferry_transport::serve(link, routes::link(state), stopped(stop_rx.clone()));
        // Long polls and event streams never end by themselves: after a
        // shutdown is asked for, they get a short grace, then are cut.
        let grace = async move {
            stopped(stop_rx).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let (a, l) = tokio::select! {
            r = async { tokio::join!(api_server, link_server) } => r,
            () = grace => (Ok(()), Ok(())),
            _ = lost_rx.wait_for(|l| *l) => {
                leases.abort();
                return Err(ManagerError::LostLeadership);
            }
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

/// A listener serving at most [`MAX_CONNECTIONS`], over TLS when `tls`
/// is given. Must be called on the runtime.
fn capped(
    l: std::net::TcpListener,
    tls: Option<&ferry_transport::ServerTls>,
    what: &'static str,
) -> std::io::Result<ferry_transport::CappedListener> {
    ferry_transport::CappedListener::new(l, MAX_CONNECTIONS, tls, what)
}

/// Answers while it campaigns for leadership: on the API, a redirect
/// (307, which keeps the method and body) to the same path at the
/// leader's URL, or 503 naming the leader when its URL is not known; on
/// the link, 503 (workers move on to the next manager address
/// themselves). Returns its lease once elected, or `None` if a shutdown
/// came first.
async fn standby(
    api: std::net::TcpListener,
    link: std::net::TcpListener,
    etcd: crate::etcd::Etcd,
    me: crate::etcd::LeaderValue,
    ttl_s: u64,
    tls: Option<ferry_transport::ServerTls>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<String>, ManagerError> {
    let leader_now: Arc<std::sync::Mutex<Option<crate::etcd::LeaderValue>>> = Arc::default();
    let answer = {
        let leader_now = leader_now.clone();
        move |redirect: bool, uri: &axum::http::Uri| -> Response {
            let leader = leader_now.lock().expect("leader").clone();
            match leader {
                Some(crate::etcd::LeaderValue { url: Some(url), .. }) if redirect => {
                    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                    let location = format!("{}{path}", url.trim_end_matches('/'));
                    (
                        StatusCode::TEMPORARY_REDIRECT,
                        [(axum::http::header::LOCATION, location)],
                    )
                        .into_response()
                }
                leader => ApiError::unavailable(format!(
                    "this manager is a follower; the leader is at {}: ask it",
                    leader
                        .map(|l| l.url.unwrap_or(l.api))
                        .unwrap_or_else(|| "(none yet)".into())
                ))
                .into_response(),
            }
        }
    };
    type Answer = std::sync::Arc<dyn Fn(bool, &axum::http::Uri) -> Response + Send + Sync>;
    let router = |answer: Answer, redirect: bool| {
        axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let answer = answer.clone();
            async move { answer(redirect, &uri) }
        })
    };
    let answer: Answer = Arc::new(answer);
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let serve = |l: std::net::TcpListener, rx: tokio::sync::watch::Receiver<bool>, redirect| {
        let app = router(answer.clone(), redirect);
        let tls = tls.clone();
        async move {
            let addr = l.local_addr().ok();
            if let Ok(l) = capped(l, tls.as_ref(), "standby manager") {
                let _ = ferry_transport::serve(l, app, async move {
                    let mut rx = rx;
                    let _ = rx.wait_for(|d| *d).await;
                })
                .await;
            }
            tracing::debug!(?addr, "standby listener closed");
        }
    };
    let a = tokio::spawn(serve(api, done_rx.clone(), true));
    let l = tokio::spawn(serve(link, done_rx, false));
    let value = serde_json::to_vec(&me).expect("serialises");
    let key = etcd.key("leader");
    let elected = loop {
        if *stop.borrow() {
            break None;
        }
        let attempt = {
            let (etcd, key, value) = (etcd.clone(), key.clone(), value.clone());
            tokio::task::spawn_blocking(
                // Ok(Ok(lease)): elected; Ok(Err(leader)): another leads.
                move || -> Result<Result<Option<String>, crate::etcd::LeaderValue>, crate::etcd::EtcdError> {
                    let lease = etcd.grant(ttl_s)?;
                    if etcd.create_with_lease(&key, &value, &lease)? {
                        return Ok(Ok(Some(lease)));
                    }
                    if let Some(v) = etcd.get(&key)? {
                        if let Ok(l) = serde_json::from_slice::<crate::etcd::LeaderValue>(&v) {
                            return Ok(Err(l));
                        }
                    }
                    Ok(Ok(None))
                },
            )
            .await
            .unwrap_or(Ok(Ok(None)))
        };
        match attempt {
            Ok(Ok(Some(lease))) => break Some(lease),
            Ok(Err(leader)) => {
                *leader_now.lock().expect("leader") = Some(leader);
            }
            Ok(Ok(None)) => {}
            Err(e) => tracing::warn!(error = %e, "campaigning for leadership"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    };
    let _ = done_tx.send(true);
    let _ = a.await;
    let _ = l.await;
    Ok(elected)
}

/// Keeps the leader's lease alive every `ttl/3`; says so on `lost` when it
/// cannot (the lease expired, or etcd was unreachable for longer than the
/// lease).
fn keep_leading(
    etcd: &crate::etcd::Etcd,
    lease: &str,
    ttl_s: u64,
    lost: &tokio::sync::watch::Sender<bool>,
) {
    let every = Duration::from_millis(ttl_s * 1000 / 3).max(Duration::from_millis(300));
    let mut last_ok = std::time::Instant::now();
    loop {
        std::thread::sleep(every);
        match etcd.keep_alive(lease) {
            Ok(true) => last_ok = std::time::Instant::now(),
            Ok(false) => break,
            Err(e) => {
                tracing::warn!(error = %e, "keeping the leader lease");
                if last_ok.elapsed() > Duration::from_secs(ttl_s) {
                    break;
                }
            }
        }
        if lost.is_closed() {
            return;
        }
    }
    tracing::error!("lost the leader lease: stopping");
    let _ = lost.send(true);
}
