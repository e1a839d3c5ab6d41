//! The manager's routes: the seed-compatible ones (`/nodes`, ...), the
//! resource API under `/v1/`, `/metrics`, and the workers' link under
//! `/link/v1/`. Each handler turns a request into a [`Shared`] call and
//! its result into JSON or problem JSON.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{ApiError, Shared};
use crate::api::{CreateInstance, InstanceState, MigrateInstance, NodeState};
use crate::link::{CommandResult, Heartbeat, Register, Registered};

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    /// The manager's state.
    pub shared: Arc<Shared>,
    /// The token every request needs, if any.
    pub token: Option<ferry_transport::Token>,
    /// How long a registry may take to describe a package.
    pub registry_timeout: Duration,
}

/// The API: seed routes, `/v1/`, `/metrics`.
pub fn api(state: AppState) -> Router {
    Router::new()
        .route("/nodes", get(seed_nodes))
        .route("/nodes/{node}/instances", get(seed_instances))
        .route(
            "/nodes/{node}/instances/{*address}",
            post(seed_create_or_move).delete(seed_delete),
        )
        .route("/v1/nodes", get(v1_nodes))
        .route("/v1/nodes/{name}", get(v1_node))
        .route("/v1/instances", get(v1_instances).post(v1_create))
        .route("/v1/instances/{name}", get(v1_instance).delete(v1_delete))
        .route("/v1/instances/{name}/migrate", post(v1_migrate))
        .route("/v1/events", get(v1_events))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// The workers' link.
pub fn link(state: AppState) -> Router {
    Router::new()
        .route("/link/v1/register", post(link_register))
        .route("/link/v1/heartbeat", post(link_heartbeat))
        .route("/link/v1/commands", get(link_commands))
        .route("/link/v1/results", post(link_result))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Every request needs the token, when there is one; compared in constant
/// time.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        if !token.matches(given.as_bytes()) {
            return ApiError::unauthorized().into_response();
        }
    }
    let route = route_name(req.uri().path());
    {
        let mut core = state.shared.lock();
        *core.metrics.requests.entry(route).or_default() += 1;
    }
    next.run(req).await
}

/// A bounded set of names for request counters.
fn route_name(path: &str) -> &'static str {
    match path.split('/').nth(1).unwrap_or("") {
        "nodes" => "nodes",
        "v1" => "v1",
        "link" => "link",
        "metrics" => "metrics",
        _ => "other",
    }
}

async fn not_found() -> ApiError {
    ApiError::new_not_found()
}

impl ApiError {
    fn new_not_found() -> ApiError {
        let mut e = ApiError::bad(
            "no such route: see docs/control-plane.md (GET /nodes, GET /v1/instances, ...)".into(),
        );
        e.status = StatusCode::NOT_FOUND;
        e.title = "not found";
        e
    }
}

/// A JSON body of type `T`, or 400 naming what is wrong with it.
fn body<T: for<'de> Deserialize<'de>>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad(format!("the request body: {e}")))
}

/// Runs a create, move or delete to its end even when its client goes
/// away (a closed connection drops the handler): one dropped half-way would
/// leave its instance busy, refusing every later operation.
async fn detached<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(op)
        .await
        .unwrap_or_else(|e| Err(ApiError::unavailable(format!("the operation stopped: {e}"))))
}

async fn seed_nodes(State(s): State<AppState>) -> Response {
    Json(s.shared.nodes()).into_response()
}

async fn seed_instances(State(s): State<AppState>, Path(node): Path<String>) -> Response {
    match s.shared.instances(Some(&node)) {
        Ok(list) => Json(list).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /nodes/NODE/instances/ADDRESS`: an instance's address moves it
/// to NODE; any other address is a registry to create one from. Answers
/// the instance's (new) address as a JSON string.
async fn seed_create_or_move(
    State(s): State<AppState>,
    Path((node, address)): Path<(String, String)>,
) -> Response {
    let address = address.trim_start_matches('/').to_string();
    let result = detached(async move {
        s.shared.node(&node)?;
        let instance = match s.shared.instance_at(&address) {
            Some(i) => s.shared.migrate(&i.name, &node).await?,
            None => {
                let req = CreateInstance {
                    source: address.clone(),
                    node: Some(node.clone()),
                    ..CreateInstance::default()
                };
                create(&s, &req).await?
            }
        };
        Ok::<_, ApiError>(instance.address.unwrap_or_default())
    })
    .await;
    match result {
        Ok(addr) => Json(addr).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `DELETE /nodes/NODE/instances/ADDRESS`.
async fn seed_delete(
    State(s): State<AppState>,
    Path((node, address)): Path<(String, String)>,
) -> Response {
    let address = address.trim_start_matches('/').to_string();
    let result = detached(async move {
        s.shared.node(&node)?;
        let i = s
            .shared
            .instance_at(&address)
            .filter(|i| i.node == node)
            .ok_or_else(|| ApiError::unknown_instance(&format!("at {address} on {node}")))?;
        s.shared.delete(&i.name).await?;
        Ok::<_, ApiError>(address)
    })
    .await;
    match result {
        Ok(addr) => Json(addr).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn v1_nodes(State(s): State<AppState>) -> Response {
    Json(s.shared.nodes()).into_response()
}

async fn v1_node(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match s.shared.node(&name) {
        Ok(n) => Json(n).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn v1_instances(State(s): State<AppState>) -> Response {
    match s.shared.instances(None) {
        Ok(list) => Json(list).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn v1_instance(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match s.shared.instance(&name) {
        Ok(i) => Json(i).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn v1_create(State(s): State<AppState>, bytes: Bytes) -> Response {
    let result = detached(async move {
        let req: CreateInstance = body(&bytes)?;
        create(&s, &req).await
    })
    .await;
    match result {
        Ok(i) => (StatusCode::CREATED, Json(i)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn v1_migrate(State(s): State<AppState>, Path(name): Path<String>, bytes: Bytes) -> Response {
    let result = detached(async move {
        let req: MigrateInstance = body(&bytes)?;
        s.shared.migrate(&name, &req.node).await
    })
    .await;
    match result {
        Ok(i) => Json(i).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn v1_delete(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match detached(async move { s.shared.delete(&name).await }).await {
        Ok(i) => Json(i).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/events`: every change as it happens, one JSON object per
/// server-sent event.
async fn v1_events(
    State(s): State<AppState>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = s.shared.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let data = serde_json::to_string(&ev).expect("an event serialises");
                    return Some((Ok(SseEvent::default().data(data)), rx));
                }
                // A slow reader missed some: it gets the next ones.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Prometheus text format.
async fn metrics(State(s): State<AppState>) -> Response {
    let nodes = s.shared.nodes();
    let instances = s.shared.instances(None).unwrap_or_default();
    let core = s.shared.lock();
    let mut out = String::new();
    out.push_str("# HELP ferry_manager_requests_total Requests served, by route.\n# TYPE ferry_manager_requests_total counter\n");
    for (route, n) in &core.metrics.requests {
        out.push_str(&format!(
            "ferry_manager_requests_total{{route=\"{route}\"}} {n}\n"
        ));
    }
    out.push_str("# HELP ferry_manager_nodes Nodes, by state.\n# TYPE ferry_manager_nodes gauge\n");
    for state in [NodeState::Ready, NodeState::Lost] {
        let n = nodes.iter().filter(|x| x.state == state).count();
        let name = serde_json::to_value(state).expect("serialises");
        out.push_str(&format!("ferry_manager_nodes{{state={name}}} {n}\n"));
    }
    out.push_str("# HELP ferry_manager_instances Instances, by state.\n# TYPE ferry_manager_instances gauge\n");
    for state in [
        InstanceState::Pending,
        InstanceState::Starting,
        InstanceState::Running,
        InstanceState::Migrating,
        InstanceState::Suspended,
        InstanceState::Failed,
        InstanceState::Lost,
    ] {
        let n = instances.iter().filter(|x| x.state == state).count();
        out.push_str(&format!(
            "ferry_manager_instances{{state=\"{state}\"}} {n}\n"
        ));
    }
    let m = &core.metrics;
    out.push_str(&format!(
        "# HELP ferry_manager_migrations_total Migrations, by result.\n# TYPE ferry_manager_migrations_total counter\nferry_manager_migrations_total{{result=\"moved\"}} {}\nferry_manager_migrations_total{{result=\"failed\"}} {}\n",
        m.migrations_ok, m.migrations_failed
    ));
    out.push_str(&format!(
        "# HELP ferry_manager_migration_downtime_ms_sum The engine's downtime summed over the migrations that moved.\n# TYPE ferry_manager_migration_downtime_ms_sum counter\nferry_manager_migration_downtime_ms_sum {}\n",
        m.downtime_ms_sum
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Creates an instance: resolves its source, asks the registry for its
/// package's guest memory, and hands it to [`Shared::create`].
async fn create(s: &AppState, req: &CreateInstance) -> Result<crate::api::Instance, ApiError> {
    let url = source_url(&req.source)?;
    let probe_url = url.clone();
    let token = s.shared.registry_token.clone();
    let described = tokio::time::timeout(
        s.registry_timeout,
        tokio::task::spawn_blocking(move || {
            let remote = ferry_transport::RemotePackage::open_with(
                &probe_url,
                token.as_ref().map(|t| t.expose()),
                None,
            )?;
            remote.vm_meta()
        }),
    )
    .await;
    let meta = match described {
        Ok(Ok(Ok(meta))) => meta,
        Ok(Ok(Err(e))) => {
            return Err(ApiError::bad(format!(
                "'{}' is neither an instance this manager knows nor a registry it can read ({e}): give an instance's address (GET /v1/instances) or a registry's",
                req.source
            )))
        }
        Ok(Err(e)) => return Err(ApiError::unavailable(format!("describing the package: {e}"))),
        Err(_) => {
            return Err(ApiError::bad(format!(
                "the registry at {url} did not describe its package within {} s: check the address",
                s.registry_timeout.as_secs()
            )))
        }
    };
    s.shared
        .create(req, url, meta.provenance.memory_mib, &meta.recipe)
        .await
}

/// `http(s)://…` as given; `HOST:PORT` as `http://HOST:PORT/`.
pub fn source_url(source: &str) -> Result<String, ApiError> {
    if source.starts_with("http://") || source.starts_with("https://") {
        return Ok(source.to_string());
    }
    let malformed = || {
        ApiError::bad(format!(
            "'{source}' is not an address: use HOST:PORT (a registry or an instance) or http://HOST:PORT/"
        ))
    };
    let (host, port) = source.rsplit_once(':').ok_or_else(malformed)?;
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(format!("http://{source}/")),
        _ => Err(malformed()),
    }
}

async fn link_register(State(s): State<AppState>, bytes: Bytes) -> Response {
    match body::<Register>(&bytes).and_then(|r| s.shared.register(r)) {
        Ok(session) => Json(Registered { session }).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn link_heartbeat(State(s): State<AppState>, bytes: Bytes) -> Response {
    match body::<Heartbeat>(&bytes).and_then(|h| s.shared.heartbeat(h)) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

/// The query of `GET /link/v1/commands`.
#[derive(Deserialize)]
struct Poll {
    session: String,
    #[serde(default)]
    wait_s: Option<u64>,
}

async fn link_commands(State(s): State<AppState>, Query(q): Query<Poll>) -> Response {
    let wait = Duration::from_secs(q.wait_s.unwrap_or(20).min(60));
    match s.shared.commands(&q.session, wait).await {
        Ok(c) => Json(c).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn link_result(State(s): State<AppState>, bytes: Bytes) -> Response {
    match body::<CommandResult>(&bytes).and_then(|r| s.shared.result(&r.session, r.id, r.outcome)) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_registries_or_refused() {
        assert_eq!(
            source_url("10.0.0.1:7070").unwrap(),
            "http://10.0.0.1:7070/"
        );
        assert_eq!(
            source_url("reg.example:80").unwrap(),
            "http://reg.example:80/"
        );
        assert_eq!(
            source_url("https://r.example/packages/redis.ferry").unwrap(),
            "https://r.example/packages/redis.ferry"
        );
        for bad in [
            "",
            "nohost",
            ":80",
            "10.0.0.1:0",
            "10.0.0.1:99999",
            "a b:80",
            "x:y",
        ] {
            let e = source_url(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
