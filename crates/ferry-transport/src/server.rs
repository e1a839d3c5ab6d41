//! The registry: a read-only HTTP server for package files.
//!
//! It only has to make the bytes of each package reachable by range request:
//! peers check every chunk against the package's own sha256s, so integrity
//! never depends on the server. What it adds over a static file server is
//! that it checks each package at start (a damaged header or table fails
//! there, not on every peer), lists what it serves, derives `ETag`s from the
//! packages' table digests, and can require a token.
//!
//! Each package is served from the file descriptor opened and checked at
//! start, with positioned reads: replacing the file at its path (as `ferry
//! package` does, by rename) does not change what is served until the
//! registry restarts, so the bytes always match the `ETag`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ferry_package::Package;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::listener::CappedListener;
use crate::range::{self, RangeRequest};
use crate::thread::ServerThread;
use crate::{Token, TransportError};

/// Bytes read from a package file at a time while streaming it.
const READ_SIZE: u64 = 256 << 10;

/// After a shutdown is asked for, transfers still running get this long to
/// finish before their connections are dropped: long enough for a chunk,
/// short enough that Ctrl-C feels immediate.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The most connections the registry serves at once. More are closed as
/// soon as they are accepted (logged once per flood), so that clients that
/// connect and say nothing hold a bounded amount of memory and tasks.
pub const MAX_REGISTRY_CONNECTIONS: usize = 256;

/// What the registry serves and where it listens.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The package files. Each is served as `/packages/<file name>`.
    pub packages: Vec<PathBuf>,
    /// The address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// When set, every request must carry `Authorization: Bearer <token>`
    /// (checked where it was read: see [`Token::new`]).
    pub token: Option<Token>,
}

/// The answer to `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The served packages, in the order they were given.
    pub packages: Vec<ListedPackage>,
}

/// One package in a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedPackage {
    /// Its name: the file name it was served from.
    pub name: String,
    /// Size of the package file in bytes.
    pub size: u64,
    /// sha256 of its section table, lowercase hex: identifies the package
    /// (the table holds every chunk's sha256). Also its `ETag`.
    pub table_sha256: String,
    /// Where to fetch it: `/packages/<name>`, percent-encoded.
    pub url: String,
    /// The key id of its signer, when it carries a signature that matches
    /// its table. Informational only: a client trusts a signer through
    /// `--trust`, checked on the package itself, never through this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
}

/// A package the registry serves, and the file it came from.
#[derive(Debug, Clone)]
pub struct ServedPackage {
    /// The path it was opened from.
    pub path: PathBuf,
    /// How it is listed.
    pub entry: ListedPackage,
}

/// One served package with its open file.
struct Served {
    package: Package,
    etag: HeaderValue,
    size: u64,
}

/// Shared by every request.
struct AppState {
    packages: HashMap<String, Arc<Served>>,
    /// `GET /`, serialised once.
    listing: Bytes,
    token: Option<Token>,
}

/// A registry bound to its address, its packages checked, not yet serving.
pub struct Registry {
    listener: std::net::TcpListener,
    max_connections: usize,
    tls: Option<crate::ServerTls>,
    addr: SocketAddr,
    served: Vec<ServedPackage>,
    state: Arc<AppState>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("addr", &self.addr)
            .field("served", &self.served)
            .field("token", &self.state.token.is_some())
            .finish()
    }
}

impl Registry {
    /// Opens and checks every package, then binds the listening socket, so
    /// that a damaged package or a taken address fails here, before anything
    /// is served.
    ///
    /// # Errors
    /// [`TransportError::NoPackages`], [`TransportError::OpenPackage`],
    /// [`TransportError::BadPackageName`], [`TransportError::DuplicateName`],
    /// or [`TransportError::Bind`].
    pub fn bind(config: RegistryConfig) -> Result<Registry, TransportError> {
        if config.packages.is_empty() {
            return Err(TransportError::NoPackages);
        }
        let token = config.token;
        let mut packages = HashMap::new();
        let mut served: Vec<ServedPackage> = Vec::new();
        for path in &config.packages {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| TransportError::BadPackageName(path.clone()))?
                .to_string();
            if let Some(first) = served.iter().find(|s| s.entry.name == name) {
                return Err(TransportError::DuplicateName {
                    name,
                    first: first.path.clone(),
                    second: path.clone(),
                });
            }
            let package = Package::open(path).map_err(TransportError::OpenPackage)?;
            let index = package.index();
            let table_sha256 = index.table_sha256();
            let etag = HeaderValue::from_str(&format!("\"{table_sha256}\""))
                .expect("hex is a valid header value");
            let entry = ListedPackage {
                url: format!("/packages/{}", percent_encode(&name)),
                name: name.clone(),
                size: index.file_len(),
                table_sha256,
                signed_by: index
                    .signature()
                    .filter(|s| s.matches_table)
                    .map(|s| s.key_id()),
            };
            served.push(ServedPackage {
                path: path.clone(),
                entry,
            });
            packages.insert(
                name,
                Arc::new(Served {
                    size: package.file_size(),
                    package,
                    etag,
                }),
            );
        }
        let listing = Listing {
            packages: served.iter().map(|s| s.entry.clone()).collect(),
        };
        let listing = Bytes::from(serde_json::to_vec(&listing).expect("a listing serialises"));

        let bind = |source| TransportError::Bind {
            addr: config.listen,
            source,
        };
        let listener = std::net::TcpListener::bind(config.listen).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        Ok(Registry {
            listener,
            max_connections: MAX_REGISTRY_CONNECTIONS,
            tls: None,
            addr,
            served,
            state: Arc::new(AppState {
                packages,
                listing,
                token,
            }),
        })
    }

    /// The address it listens on (with the real port when port 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves at most `n` connections at once (default
    /// [`MAX_REGISTRY_CONNECTIONS`]).
    pub fn with_max_connections(mut self, n: usize) -> Registry {
        self.max_connections = n.max(1);
        self
    }

    /// Speaks only TLS, with `tls` (plain HTTP to it fails the
    /// handshake). A handshake must end within
    /// [`TLS_HANDSHAKE_DEADLINE`](crate::TLS_HANDSHAKE_DEADLINE).
    pub fn with_tls(mut self, tls: crate::ServerTls) -> Registry {
        self.tls = Some(tls);
        self
    }

    /// Whether it speaks TLS (its URLs are `https://`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The packages it serves, in the order given.
    pub fn packages(&self) -> &[ServedPackage] {
        &self.served
    }

    /// Serves until `shutdown` completes, then stops accepting connections
    /// and gives running transfers a short grace period. Must run on a tokio
    /// runtime with I/O and time enabled; blocking callers use
    /// [`run_until`](Self::run_until).
    ///
    /// # Errors
    /// [`TransportError::Serve`] if the socket fails.
    pub async fn serve_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), TransportError> {
        let addr = self.addr;
        let serve_err = |source| TransportError::Serve { addr, source };
        let listener = CappedListener::new(
            self.listener,
            self.max_connections,
            self.tls.as_ref(),
            "registry",
        )
        .map_err(serve_err)?;
        info!(%addr, packages = self.served.len(), "registry listening");

        let app = Router::new()
            .route("/", get(list))
            .route("/packages/{name}", get(package))
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(self.state.clone(), guard))
            .with_state(self.state);

        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let server = crate::serve(listener, app, async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        });
        let deadline = async move {
            shutdown.await;
            info!("registry shutting down");
            let _ = stop_tx.send(true);
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            result = server => result.map_err(serve_err),
            () = deadline => {
                warn!("transfers still running after the shutdown grace period are cut off");
                Ok(())
            }
        }
    }

    /// Serves until `shutdown` completes, on a runtime of its own: the entry
    /// point for ferry's blocking code. Blocks the calling thread.
    ///
    /// # Errors
    /// [`TransportError::Setup`] if the runtime cannot start, else as
    /// [`serve_until`](Self::serve_until).
    pub fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), TransportError> {
        runtime()?.block_on(self.serve_until(shutdown))
    }

    /// Serves on a thread of its own until the returned handle is stopped or
    /// dropped: for tests and for code that serves while doing other work.
    ///
    /// # Errors
    /// [`TransportError::Setup`] if the thread or the runtime cannot start.
    pub fn spawn(self) -> Result<RunningRegistry, TransportError> {
        let addr = self.addr;
        let tls = self.is_tls();
        let rt = runtime()?;
        let thread = ServerThread::spawn("registry", move |stop| {
            rt.block_on(self.serve_until(stop.wait()))
        })
        .map_err(|source| TransportError::Setup {
            what: "thread",
            source,
        })?;
        Ok(RunningRegistry { addr, tls, thread })
    }
}

/// A registry serving on a thread of its own ([`Registry::spawn`]). Dropping
/// it stops the registry.
#[derive(Debug)]
pub struct RunningRegistry {
    addr: SocketAddr,
    tls: bool,
    thread: ServerThread<TransportError>,
}

impl RunningRegistry {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its root URL, `http://ADDR/` (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/", self.addr)
    }

    /// Stops it and waits until it has stopped.
    ///
    /// # Errors
    /// What the server failed with, if it did.
    pub fn stop(self) -> Result<(), TransportError> {
        self.thread.stop()
    }
}

/// The runtime a blocking caller's registry runs on. Reads of package files
/// run on its blocking pool; its size bounds the reads in flight.
fn runtime() -> Result<tokio::runtime::Runtime, TransportError> {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name("registry-io")
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .map_err(|source| TransportError::Setup {
            what: "runtime",
            source,
        })
}

/// Percent-encodes a name for a URL path segment: everything but RFC 3986's
/// unreserved characters.
fn percent_encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Checks the token (when one is configured) before anything else, so that
/// without it nothing is learnt, not even which names exist; logs every
/// request.
async fn guard(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let response = match &state.token {
        Some(token) if !authorized(req.headers(), token) => {
            let mut r = empty(StatusCode::UNAUTHORIZED);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ferry registry\""),
            );
            r
        }
        _ => next.run(req).await,
    };
    debug!(%method, %uri, status = response.status().as_u16(), "request");
    response
}

/// Whether `headers` carry `Authorization: Bearer <token>` ([`Token::authorizes`]).
fn authorized(headers: &HeaderMap, token: &Token) -> bool {
    token.authorizes(headers)
}

/// `GET /`.
async fn list(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.listing.clone(),
    )
        .into_response()
}

async fn not_found() -> Response {
    empty(StatusCode::NOT_FOUND)
}

/// A response without a body.
fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    r
}

/// `GET` and `HEAD /packages/<name>`: the file, or one range of it. The name
/// is only ever looked up in the table of served packages, so no path (`..`,
/// `/`, encoded or not) reaches the file system.
async fn package(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let Some(served) = state.packages.get(&name).cloned() else {
        return empty(StatusCode::NOT_FOUND);
    };
    let size = served.size;
    let mut response_headers = HeaderMap::new();
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response_headers.insert(header::ETAG, served.etag.clone());

    if none_match(&headers, &served.etag) {
        let mut r = empty(StatusCode::NOT_MODIFIED);
        r.headers_mut().extend(response_headers);
        r.headers_mut().remove(header::CONTENT_LENGTH);
        return r;
    }

    let range_header = headers
        .get(header::RANGE)
        .filter(|_| if_range_holds(&headers, &served.etag))
        .and_then(|v| v.to_str().ok());
    let (status, first, len) = match range::parse(range_header, size) {
        RangeRequest::Full => (StatusCode::OK, 0, size),
        RangeRequest::Partial { first, last } => {
            response_headers.insert(
                header::CONTENT_RANGE,
                header_value(format!("bytes {first}-{last}/{size}")),
            );
            (StatusCode::PARTIAL_CONTENT, first, last - first + 1)
        }
        RangeRequest::Unsatisfiable => {
            let mut r = empty(StatusCode::RANGE_NOT_SATISFIABLE);
            r.headers_mut().extend(response_headers);
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(format!("bytes */{size}")),
            );
            return r;
        }
    };
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response_headers.insert(header::CONTENT_LENGTH, header_value(len.to_string()));
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from_stream(file_stream(served, first, len))
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = response_headers;
    r
}

fn header_value(s: String) -> HeaderValue {
    HeaderValue::from_str(&s).expect("digits and ASCII make a valid header value")
}

/// Whether `If-None-Match` names the package's ETag (or `*`): the client has
/// it already (304).
fn none_match(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let Some(v) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let etag = etag.to_str().expect("ASCII");
    v.split(',').map(str::trim).any(|t| {
        // Weak comparison: W/"x" matches "x".
        t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag
    })
}

/// Whether a `Range` may be honoured given `If-Range`: only when that names
/// the current ETag (strongly); a date or another ETag means the client's
/// copy is stale, so it gets the whole file.
fn if_range_holds(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.as_bytes() == etag.as_bytes())
}

/// The `len` bytes at `first` of a served package, read in pieces on the
/// blocking pool. A file that got shorter under the registry ends the
/// stream with an error, which aborts the connection: the client sees a
/// short body instead of a silently wrong one.
fn file_stream(
    served: Arc<Served>,
    first: u64,
    len: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures_util::stream::try_unfold((served, first, len), |(served, at, left)| async move {
        if left == 0 {
            return Ok(None);
        }
        let n = left.min(READ_SIZE) as usize;
        let reader = served.clone();
        let piece = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n];
            reader.package.file().read_exact_at(&mut buf, at)?;
            Ok::<_, std::io::Error>(buf)
        })
        .await
        .map_err(std::io::Error::other)?
        .inspect_err(|e| {
            warn!(
                path = %served.package.path().display(),
                "reading {n} bytes at {at} failed: {e}; the transfer is cut off"
            );
        })?;
        let n = n as u64;
        Ok(Some((Bytes::from(piece), (served, at + n, left - n))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(percent_encode("vm-1.ferry"), "vm-1.ferry");
        assert_eq!(percent_encode("a b/ü?"), "a%20b%2F%C3%BC%3F");
    }

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        let secret = Token::new("secret-secret-secret").unwrap();
        assert!(!authorized(&h, &secret));
        for (value, ok) in [
            ("Bearer secret-secret-secret", true),
            ("bearer  secret-secret-secret ", true),
            ("Bearer secret-secret-secret2", false),
            ("Bearer secret-secret-secre", false),
            ("Basic secret-secret-secret", false),
            ("Bearer", false),
            ("secret-secret-secret", false),
        ] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(authorized(&h, &secret), ok, "{value}");
        }
    }

    #[test]
    fn conditional_headers() {
        let etag = HeaderValue::from_static("\"abc\"");
        let mut h = HeaderMap::new();
        assert!(!none_match(&h, &etag));
        assert!(if_range_holds(&h, &etag));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", W/\"abc\""),
        );
        assert!(none_match(&h, &etag));
        h.insert(header::IF_RANGE, HeaderValue::from_static("\"abc\""));
        assert!(if_range_holds(&h, &etag));
        h.insert(
            header::IF_RANGE,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert!(!if_range_holds(&h, &etag));
    }
}
