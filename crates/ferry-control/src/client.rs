//! HTTP clients: [`LinkClient`] is how a worker calls the manager;
//! [`ClusterClient`] is how `ferry cluster` (or any Rust program) calls
//! the manager's API. Both are blocking (ferry's runtime is), and both turn
//! a problem JSON answer into an error that carries its status and detail.

use std::io::Read;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{ClusterEvent, CreateInstance, Instance, MigrateInstance, Node, Problem};
use crate::link::{Command, CommandResult, Heartbeat, Outcome, Register, Registered};

/// `HOST:PORT` as `http://HOST:PORT` (`https://` with TLS settings); a
/// URL as given, without a trailing `/`.
fn base_url(addr: &str, tls: bool) -> String {
    let url = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    url.trim_end_matches('/').to_string()
}

/// An agent for the manager; `read_timeout` none: no limit (event
/// streams).
fn agent(read_timeout: Option<Duration>, tls: Option<&ureq::tls::TlsConfig>) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        // Redirects (a follower manager's 307 to its leader) are followed
        // by the callers, which keep the token: ureq would drop it.
        .max_redirects(0)
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_recv_response(read_timeout)
        .timeout_recv_body(read_timeout)
        .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")));
    if let Some(tls) = tls {
        config = config.tls_config(tls.clone());
    }
    ureq::Agent::new_with_config(config.build())
}

/// What to do when the TLS handshake with the manager fails.
const TLS_FIX: &str = "pass --ca FILE with the manager's CA (and --client-cert/--client-key if it asks for one, --client-ca); its certificate must hold the name used and be in date";

/// An HTTP exchange: its status and body, or why there was none.
enum Answer {
    /// The server answered.
    Status(u16, Vec<u8>),
    /// It redirected (307/308) to this URL: a follower manager names its
    /// leader so.
    Redirect(String),
    /// It could not be reached.
    Unreachable(String),
    /// The TLS handshake failed: trying again will not help.
    TlsRefused(String),
}

fn exchange(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Answer {
    let auth = token.map(|t| format!("Bearer {t}"));
    let result = match (method, body) {
        ("GET", _) => {
            let mut r = agent.get(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        ("DELETE", _) => {
            let mut r = agent.delete(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        (_, body) => {
            let mut r = agent.post(url).header("Content-Type", "application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send(body.unwrap_or_default())
        }
    };
    match result {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            if matches!(status, 307 | 308) {
                if let Some(to) = redirect_target(url, &resp) {
                    return Answer::Redirect(to);
                }
            }
            let mut bytes = Vec::new();
            if let Err(e) = resp.body_mut().as_reader().read_to_end(&mut bytes) {
                return Answer::Unreachable(format!("reading the answer: {e}"));
            }
            Answer::Status(status, bytes)
        }
        Err(e) if ferry_transport::is_tls_failure(&e) => {
            Answer::TlsRefused(format!("the TLS handshake failed ({e}): {TLS_FIX}"))
        }
        Err(e) => Answer::Unreachable(e.to_string()),
    }
}

/// The absolute URL a 307/308 answer to `url` points at.
fn redirect_target(url: &str, resp: &ureq::http::Response<ureq::Body>) -> Option<String> {
    let loc = resp.headers().get("location")?.to_str().ok()?;
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return Some(loc.to_string());
    }
    // A path: on the same scheme, host and port.
    let scheme_end = url.find("://")? + 3;
    let host_end = url[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(url.len());
    loc.starts_with('/')
        .then(|| format!("{}{loc}", &url[..host_end]))
}

/// How many redirects a call follows (a follower to its leader is one).
const MAX_REDIRECTS: usize = 3;

/// The detail of a problem JSON body, or the body as text.
fn detail_of(body: &[u8]) -> String {
    serde_json::from_slice::<Problem>(body)
        .map(|p| p.detail)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string())
}

/// A worker's call to the manager failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The manager refused the worker (wrong token, its name held by
    /// another worker, a malformed registration).
    #[error("{0}")]
    Refused(String),
    /// The manager does not know the session (it restarted).
    #[error("the manager does not know this session")]
    UnknownSession,
    /// The manager could not be reached, or answered oddly.
    #[error("{0}")]
    Unreachable(String),
    /// The manager is a follower (several managers share etcd).
    #[error("{0}")]
    Follower(String),
}

/// How long a link call may take to answer (a long poll waits up to 60 s).
const LINK_READ_TIMEOUT: Duration = Duration::from_secs(70);

/// A worker's client for the manager's link. With several managers (etcd,
/// one leader), it moves on to the next address when one does not answer
/// or answers that it is a follower (503), and stays with the one that
/// serves.
pub struct LinkClient {
    addrs: Vec<String>,
    bases: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
    token: Option<String>,
    agent: ureq::Agent,
}

impl LinkClient {
    /// For the manager at `addrs` (`HOST:PORT` or a URL; several,
    /// comma-separated).
    pub fn new(addrs: &str, token: Option<String>) -> LinkClient {
        let addrs: Vec<String> = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect();
        LinkClient {
            bases: addrs.iter().map(|a| base_url(a, false)).collect(),
            addrs,
            current: Default::default(),
            token,
            agent: agent(Some(LINK_READ_TIMEOUT), None),
        }
    }

    /// Speaks TLS with `tls` (a CA, a client certificate): a bare
    /// `HOST:PORT` is then `https://HOST:PORT`.
    ///
    /// # Errors
    /// A certificate or key file cannot be read.
    pub fn with_tls(
        mut self,
        tls: &ferry_transport::ClientTls,
    ) -> Result<LinkClient, ferry_transport::TlsError> {
        let config = tls.ureq_config()?;
        self.bases = self.addrs.iter().map(|a| base_url(a, true)).collect();
        self.agent = agent(Some(LINK_READ_TIMEOUT), Some(&config));
        Ok(self)
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Option<T>, LinkError> {
        use std::sync::atomic::Ordering;
        let n = self.bases.len().max(1);
        let mut result = Err(LinkError::Unreachable("no manager address given".into()));
        for _ in 0..n {
            let i = self.current.load(Ordering::SeqCst) % n;
            result = self.call_one(&self.bases[i], method, path, body);
            match &result {
                Err(LinkError::Unreachable(_)) | Err(LinkError::Follower(_)) => {
                    self.current.store((i + 1) % n, Ordering::SeqCst);
                }
                _ => return result,
            }
        }
        result
    }

    fn call_one<T: DeserializeOwned>(
        &self,
        base: &str,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Option<T>, LinkError> {
        let url = format!("{base}{path}");
        let body = body.map(|b| serde_json::to_vec(b).expect("a link message serialises"));
        match exchange(&self.agent, method, &url, self.token.as_deref(), body) {
            Answer::Status(503, bytes) => Err(LinkError::Follower(detail_of(&bytes))),
            Answer::Redirect(to) => Err(LinkError::Follower(format!(
                "{url} is a follower: its leader is {to}"
            ))),
            Answer::Status(204, _) => Ok(None),
            Answer::Status(200, bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                LinkError::Unreachable(format!("the manager's answer to {path}: {e}"))
            }),
            Answer::Status(404, bytes) if detail_of(&bytes).contains("session") => {
                Err(LinkError::UnknownSession)
            }
            Answer::Status(s @ (400 | 401 | 403 | 409), bytes) => {
                Err(LinkError::Refused(format!("{s}: {}", detail_of(&bytes))))
            }
            Answer::Status(s, bytes) => Err(LinkError::Unreachable(format!(
                "{url} answered {s}: {}",
                detail_of(&bytes)
            ))),
            Answer::Unreachable(e) => Err(LinkError::Unreachable(format!("{url}: {e}"))),
            Answer::TlsRefused(e) => Err(LinkError::Refused(format!("{url}: {e}"))),
        }
    }

    /// Registers; returns the session.
    pub fn register(&self, r: &Register) -> Result<String, LinkError> {
        let reg: Option<Registered> = self.call("POST", "/link/v1/register", Some(r))?;
        reg.map(|r| r.session)
            .ok_or_else(|| LinkError::Unreachable("the manager sent no session".into()))
    }

    /// Reports.
    pub fn heartbeat(&self, h: &Heartbeat) -> Result<(), LinkError> {
        self.call::<serde_json::Value>("POST", "/link/v1/heartbeat", Some(h))
            .map(|_| ())
    }

    /// Waits up to `wait_s` for commands.
    pub fn commands(&self, session: &str, wait_s: u64) -> Result<Vec<Command>, LinkError> {
        let path = format!("/link/v1/commands?session={session}&wait_s={wait_s}");
        Ok(self
            .call::<Vec<Command>>("GET", &path, None::<&()>)?
            .unwrap_or_default())
    }

    /// Says what became of command `id`.
    pub fn result(&self, session: &str, id: u64, outcome: &Outcome) -> Result<(), LinkError> {
        let r = CommandResult {
            session: session.to_string(),
            id,
            outcome: outcome.clone(),
        };
        self.call::<serde_json::Value>("POST", "/link/v1/results", Some(&r))
            .map(|_| ())
    }
}

/// A call to the manager's API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The manager answered with an error.
    #[error("the manager answered {status}: {detail}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// Its problem's detail.
        detail: String,
    },
    /// It could not be reached, or its answer was not understood.
    #[error("the manager at {url}: {detail}")]
    Unreachable {
        /// What was called.
        url: String,
        /// Why it failed.
        detail: String,
    },
}

impl ClusterError {
    /// Whether the request itself was at fault (a 4xx answer).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, ClusterError::Api { status, .. } if (400..500).contains(status))
    }
}

/// A client for the manager's API (`ferry cluster`).
pub struct ClusterClient {
    url: String,
    base: String,
    token: Option<String>,
    timeout: Duration,
    tls: Option<ureq::tls::TlsConfig>,
    agent: ureq::Agent,
}

impl ClusterClient {
    /// For the manager at `url` (`http://HOST:PORT` or `HOST:PORT`); calls
    /// that create or move VMs may take `timeout`.
    pub fn new(url: &str, token: Option<String>, timeout: Duration) -> ClusterClient {
        ClusterClient {
            url: url.to_string(),
            base: base_url(url, false),
            token,
            timeout,
            tls: None,
            agent: agent(Some(timeout), None),
        }
    }

    /// Speaks TLS with `tls` (a CA, a client certificate): a bare
    /// `HOST:PORT` is then `https://HOST:PORT`.
    ///
    /// # Errors
    /// A certificate or key file cannot be read.
    pub fn with_tls(
        mut self,
        tls: &ferry_transport::ClientTls,
    ) -> Result<ClusterClient, ferry_transport::TlsError> {
        let config = tls.ureq_config()?;
        self.base = base_url(&self.url, true);
        self.agent = agent(Some(self.timeout), Some(&config));
        self.tls = Some(config);
        Ok(self)
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClusterError> {
        let mut url = format!("{}{path}", self.base);
        let body = body.map(|b| serde_json::to_vec(b).expect("a request serialises"));
        let mut answer = exchange(
            &self.agent,
            method,
            &url,
            self.token.as_deref(),
            body.clone(),
        );
        // A follower manager redirects to its leader: ask it, with the
        // same token and body.
        for _ in 0..MAX_REDIRECTS {
            let Answer::Redirect(to) = &answer else {
                break;
            };
            tracing::debug!(from = url, to, "following a redirect");
            url = to.clone();
            answer = exchange(
                &self.agent,
                method,
                &url,
                self.token.as_deref(),
                body.clone(),
            );
        }
        match answer {
            Answer::Redirect(to) => Err(ClusterError::Unreachable {
                url,
                detail: format!("more than {MAX_REDIRECTS} redirects (the last to {to})"),
            }),
            Answer::Status(s, bytes) if (200..300).contains(&s) => serde_json::from_slice(&bytes)
                .map_err(|e| ClusterError::Unreachable {
                    url,
                    detail: format!("an answer that is not what the API says: {e}"),
                }),
            Answer::Status(status, bytes) => Err(ClusterError::Api {
                status,
                detail: detail_of(&bytes),
            }),
            Answer::Unreachable(detail) | Answer::TlsRefused(detail) => {
                Err(ClusterError::Unreachable { url, detail })
            }
        }
    }

    /// Every node.
    pub fn nodes(&self) -> Result<Vec<Node>, ClusterError> {
        self.call("GET", "/v1/nodes", None::<&()>)
    }

    /// Every instance.
    pub fn instances(&self) -> Result<Vec<Instance>, ClusterError> {
        self.call("GET", "/v1/instances", None::<&()>)
    }

    /// One instance.
    pub fn instance(&self, name: &str) -> Result<Instance, ClusterError> {
        self.call("GET", &format!("/v1/instances/{name}"), None::<&()>)
    }

    /// Creates an instance; returns once it runs.
    pub fn create(&self, req: &CreateInstance) -> Result<Instance, ClusterError> {
        self.call("POST", "/v1/instances", Some(req))
    }

    /// Moves an instance; returns once it runs on `node`.
    pub fn migrate(&self, name: &str, node: &str) -> Result<Instance, ClusterError> {
        let req = MigrateInstance {
            node: node.to_string(),
        };
        self.call("POST", &format!("/v1/instances/{name}/migrate"), Some(&req))
    }

    /// Suspends an instance on its node; returns once it is saved.
    pub fn suspend(&self, name: &str) -> Result<Instance, ClusterError> {
        self.call(
            "POST",
            &format!("/v1/instances/{name}/suspend"),
            None::<&()>,
        )
    }

    /// Resumes a suspended instance on its node; returns once it runs.
    pub fn resume(&self, name: &str) -> Result<Instance, ClusterError> {
        self.call("POST", &format!("/v1/instances/{name}/resume"), None::<&()>)
    }

    /// Deletes an instance.
    pub fn delete(&self, name: &str) -> Result<Instance, ClusterError> {
        self.call("DELETE", &format!("/v1/instances/{name}"), None::<&()>)
    }

    /// Follows `GET /v1/events`, calling `each` for every event until it
    /// returns false or the stream ends.
    pub fn watch(&self, each: impl FnMut(ClusterEvent) -> bool) -> Result<(), ClusterError> {
        self.watch_from(|| {}, each)
    }

    /// As [`ClusterClient::watch`], calling `on_open` once the manager has
    /// accepted the stream: a follower (the operator) looks at everything
    /// again then, for what changed while it was not connected.
    pub fn watch_from(
        &self,
        on_open: impl FnOnce(),
        mut each: impl FnMut(ClusterEvent) -> bool,
    ) -> Result<(), ClusterError> {
        let mut url = format!("{}/v1/events", self.base);
        let agent = agent(None, self.tls.as_ref());
        let mut hops = 0;
        let mut resp = loop {
            let mut r = agent.get(&url);
            if let Some(t) = &self.token {
                r = r.header("Authorization", &format!("Bearer {t}"));
            }
            let resp = r.call().map_err(|e| ClusterError::Unreachable {
                url: url.clone(),
                detail: if ferry_transport::is_tls_failure(&e) {
                    format!("the TLS handshake failed ({e}): {TLS_FIX}")
                } else {
                    e.to_string()
                },
            })?;
            match redirect_target(&url, &resp) {
                Some(to) if hops < MAX_REDIRECTS && matches!(resp.status().as_u16(), 307 | 308) => {
                    hops += 1;
                    url = to;
                }
                _ => break resp,
            }
        };
        let status = resp.status().as_u16();
        if status != 200 {
            let mut bytes = Vec::new();
            let _ = resp.body_mut().as_reader().read_to_end(&mut bytes);
            return Err(ClusterError::Api {
                status,
                detail: detail_of(&bytes),
            });
        }
        on_open();
        let reader = std::io::BufReader::new(resp.body_mut().as_reader());
        for line in std::io::BufRead::lines(reader) {
            let line = line.map_err(|e| ClusterError::Unreachable {
                url: url.clone(),
                detail: e.to_string(),
            })?;
            if let Some(data) = line.strip_prefix("data:") {
                match serde_json::from_str(data.trim()) {
                    Ok(ev) => {
                        if !each(ev) {
                            return Ok(());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "an event this client does not know"),
                }
            }
        }
        Ok(())
    }
}
