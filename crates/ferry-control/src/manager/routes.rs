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
use crate::api::{
    ClusterEvent, CreateInstance, Instance, InstanceState, MigrateInstance, Node, NodeState,
    Problem,
};
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
    /// TLS for https:// registries (`--registry-ca`).
    pub registry_tls: Option<ferry_transport::ClientTls>,
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
        .route("/v1/instances/{name}/suspend", post(v1_suspend))
        .route("/v1/instances/{name}/resume", post(v1_resume))
        .route("/v1/events", get(v1_events))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// The API's OpenAPI document, generated from the handlers' `#[utoipa::path]`
/// annotations and the types in [`crate::api`]. Every route of [`api`] is
/// in it: a unit test below checks the router against it.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "ferry manager",
        description = "ferry's control plane: nodes, and instances placed, moved, suspended and deleted across them. Errors are RFC 7807 problem JSON. docs/control-plane.md explains each route.",
    ),
    paths(
        seed_nodes,
        seed_instances,
        seed_create_or_move,
        seed_delete,
        v1_nodes,
        v1_node,
        v1_instances,
        v1_create,
        v1_instance,
        v1_delete,
        v1_migrate,
        v1_suspend,
        v1_resume,
        v1_events,
        metrics,
        openapi_json,
    ),
    components(schemas(Node, NodeState, Instance, InstanceState, crate::api::Move, crate::api::GuestError, CreateInstance, MigrateInstance, Problem, ClusterEvent)),
    tags(
        (name = "seed", description = "The seed-compatible routes, kept exactly"),
        (name = "v1", description = "The resource API, version 1"),
        (name = "operations", description = "Metrics and this document"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document of the API, as JSON.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = <ApiDoc as utoipa::OpenApi>::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    summary = "This document",
    responses((status = 200, description = "The OpenAPI document of this API", body = Object)))]
async fn openapi_json() -> Response {
    Json(openapi()).into_response()
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

#[utoipa::path(get, path = "/nodes", tag = "seed",
    summary = "Every node (seed-compatible)",
    responses((status = 200, description = "Every node", body = [Node])))]
async fn seed_nodes(State(s): State<AppState>) -> Response {
    Json(s.shared.nodes()).into_response()
}

#[utoipa::path(get, path = "/nodes/{node}/instances", tag = "seed",
    summary = "The instances on a node (seed-compatible)",
    params(("node" = String, Path, description = "The node's name")),
    responses((status = 200, description = "The instances on it", body = [Instance]),
        (status = 404, description = "No such node", body = Problem, content_type = "application/problem+json")))]
async fn seed_instances(State(s): State<AppState>, Path(node): Path<String>) -> Response {
    match s.shared.instances(Some(&node)) {
        Ok(list) => Json(list).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /nodes/NODE/instances/ADDRESS`: an instance's address moves it
/// to NODE; any other address is a registry to create one from. Answers
/// the instance's (new) address as a JSON string.
#[utoipa::path(post, path = "/nodes/{node}/instances/{address}", tag = "seed",
    summary = "Create an instance from a registry, or move one here (seed-compatible)",
    description = "An instance's address moves that instance to the node; any other HOST:PORT (or URL, slashes and all) is a registry to create one from there. Answers once it runs there (and, for a move, is gone from its source).",
    params(("node" = String, Path, description = "The node's name"), ("address" = String, Path, description = "An instance's HOST:PORT, or a registry's HOST:PORT or URL")),
    responses((status = 200, description = "The instance's (new) address", body = String),
        (status = 400, description = "Malformed address, or neither an instance nor a registry", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such node", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already there, busy, or no room (free_mib)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The node failed", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The node did not answer in time", body = Problem, content_type = "application/problem+json")))]
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
#[utoipa::path(delete, path = "/nodes/{node}/instances/{address}", tag = "seed",
    summary = "Delete the instance at an address (seed-compatible)",
    params(("node" = String, Path, description = "The node's name"), ("address" = String, Path, description = "The instance's HOST:PORT")),
    responses((status = 200, description = "The address", body = String),
        (status = 404, description = "No such node, or no instance at that address on it", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Busy, or its node does not hold its lease", body = Problem, content_type = "application/problem+json")))]
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

#[utoipa::path(get, path = "/v1/nodes", tag = "v1",
    summary = "Every node",
    responses((status = 200, description = "Every node", body = [Node])))]
async fn v1_nodes(State(s): State<AppState>) -> Response {
    Json(s.shared.nodes()).into_response()
}

#[utoipa::path(get, path = "/v1/nodes/{name}", tag = "v1",
    summary = "One node",
    params(("name" = String, Path, description = "The node's name")),
    responses((status = 200, description = "The node", body = Node),
        (status = 404, description = "No such node", body = Problem, content_type = "application/problem+json")))]
async fn v1_node(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match s.shared.node(&name) {
        Ok(n) => Json(n).into_response(),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(get, path = "/v1/instances", tag = "v1",
    summary = "Every instance",
    responses((status = 200, description = "Every instance", body = [Instance])))]
async fn v1_instances(State(s): State<AppState>) -> Response {
    match s.shared.instances(None) {
        Ok(list) => Json(list).into_response(),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(get, path = "/v1/instances/{name}", tag = "v1",
    summary = "One instance",
    params(("name" = String, Path, description = "The instance's name")),
    responses((status = 200, description = "The instance", body = Instance),
        (status = 404, description = "No such instance", body = Problem, content_type = "application/problem+json")))]
async fn v1_instance(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match s.shared.instance(&name) {
        Ok(i) => Json(i).into_response(),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(post, path = "/v1/instances", tag = "v1",
    summary = "Create an instance from a registry",
    description = "Without a node, the ready node with the most free memory that fits. Answers once it runs.",
    request_body = CreateInstance,
    responses((status = 201, description = "It runs", body = Instance),
        (status = 400, description = "Malformed body or source", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such node", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A name taken, or no room (free_mib)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The node failed", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The node did not answer in time", body = Problem, content_type = "application/problem+json")))]
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

#[utoipa::path(post, path = "/v1/instances/{name}/migrate", tag = "v1",
    summary = "Move an instance to another node",
    description = "Answers once it runs there; a failed move leaves it running where it was.",
    params(("name" = String, Path, description = "The instance's name")),
    request_body = MigrateInstance,
    responses((status = 200, description = "It runs on the node", body = Instance),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such instance or node", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already there, busy, not running, or no room", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The node failed; the instance stays where it was", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The node did not answer in time", body = Problem, content_type = "application/problem+json")))]
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

#[utoipa::path(post, path = "/v1/instances/{name}/suspend", tag = "v1",
    summary = "Suspend an instance on its node",
    description = "Its node saves it into its package (memory and disk) and stops its engine. Answers once it is saved: state suspended.",
    params(("name" = String, Path, description = "The instance's name")),
    responses((status = 200, description = "It is suspended", body = Instance),
        (status = 404, description = "No such instance", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Busy, not running, or its node does not hold its lease", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The node failed; the instance runs on", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The node did not answer in time", body = Problem, content_type = "application/problem+json")))]
async fn v1_suspend(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match detached(async move { s.shared.suspend(&name).await }).await {
        Ok(i) => Json(i).into_response(),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(post, path = "/v1/instances/{name}/resume", tag = "v1",
    summary = "Resume a suspended instance on its node",
    description = "Its node resumes it from its saved package; it serves its next migration again. Answers once it runs.",
    params(("name" = String, Path, description = "The instance's name")),
    responses((status = 200, description = "It runs", body = Instance),
        (status = 404, description = "No such instance", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Busy, not suspended, no room, or its node does not hold its lease", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The node failed", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The node did not answer in time", body = Problem, content_type = "application/problem+json")))]
async fn v1_resume(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match detached(async move { s.shared.resume(&name).await }).await {
        Ok(i) => Json(i).into_response(),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(delete, path = "/v1/instances/{name}", tag = "v1",
    summary = "Delete an instance (its VM and its state)",
    params(("name" = String, Path, description = "The instance's name")),
    responses((status = 200, description = "The instance as it was, state deleted", body = Instance),
        (status = 404, description = "No such instance", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Busy, or its node does not hold its lease", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The node failed", body = Problem, content_type = "application/problem+json")))]
async fn v1_delete(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match detached(async move { s.shared.delete(&name).await }).await {
        Ok(i) => Json(i).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/events`: every change as it happens, one JSON object per
/// server-sent event.
#[utoipa::path(get, path = "/v1/events", tag = "v1",
    summary = "Every change as it happens",
    description = "Server-sent events; each `data:` line is one JSON ClusterEvent.",
    responses((status = 200, description = "An event stream", body = ClusterEvent, content_type = "text/event-stream")))]
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
#[utoipa::path(get, path = "/metrics", tag = "operations",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
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
    let tls = s.registry_tls.clone();
    let described = tokio::time::timeout(
        s.registry_timeout,
        tokio::task::spawn_blocking(move || {
            let remote = ferry_transport::RemotePackage::open_with(
                &probe_url,
                token.as_ref().map(|t| t.expose()),
                tls.as_ref(),
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

    /// The router's paths, from its `Debug` output (axum has no other way
    /// to list them). Fails loudly if that output changes.
    fn router_paths(router: &Router) -> Vec<String> {
        let text = format!("{router:?}");
        let mut paths: Vec<String> = text
            .split('"')
            .filter(|s| s.starts_with('/') && !s.contains(' '))
            .map(String::from)
            .collect();
        paths.sort();
        paths.dedup();
        assert!(
            paths.iter().any(|p| p == "/v1/instances"),
            "axum's Debug output of a Router changed: {text}"
        );
        paths
    }

    /// Every method each path of the API router answers, found by asking
    /// it (a route that is not there answers 405, or the fallback's 404).
    async fn routes_served(router: &Router) -> Vec<(String, String)> {
        use tower::ServiceExt;
        let mut found = Vec::new();
        for path in router_paths(router) {
            let concrete: String = path
                .split('/')
                .map(|seg| if seg.starts_with('{') { "x1" } else { seg })
                .collect::<Vec<_>>()
                .join("/");
            for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
                let req = axum::http::Request::builder()
                    .method(method)
                    .uri(&concrete)
                    .body(axum::body::Body::empty())
                    .unwrap();
                let resp = router.clone().oneshot(req).await.unwrap();
                let status = resp.status();
                // Only a 404's body is read: an event stream never ends.
                let fallback = status == StatusCode::NOT_FOUND
                    && axum::body::to_bytes(resp.into_body(), 1 << 20)
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Problem>(&b).ok())
                        .is_some_and(|p| p.title == "not found");
                if status != StatusCode::METHOD_NOT_ALLOWED && !fallback {
                    // OpenAPI has no catch-all segments: `{*x}` is `{x}`.
                    found.push((method.to_lowercase(), path.replace("{*", "{")));
                }
            }
        }
        found.sort();
        found
    }

    #[tokio::test]
    async fn the_openapi_document_lists_every_route_of_the_api() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("store")).unwrap();
        let shared = Shared::load(store, Duration::from_secs(1), None).unwrap();
        let router = api(AppState {
            shared,
            token: None,
            registry_timeout: Duration::from_secs(1),
            registry_tls: None,
        });
        let served = routes_served(&router).await;
        let doc = serde_json::to_value(openapi()).unwrap();
        let mut documented: Vec<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
                    .map(move |m| (m.clone(), path.clone()))
            })
            .collect();
        documented.sort();
        assert_eq!(
            served, documented,
            "every route the API serves is in /openapi.json, and nothing else"
        );
        for path in [
            "/nodes",
            "/nodes/{node}/instances/{address}",
            "/v1/instances/{name}/suspend",
        ] {
            assert!(doc["paths"][path].is_object(), "{path}");
        }
        for schema in [
            "Instance",
            "Node",
            "Problem",
            "CreateInstance",
            "ClusterEvent",
            "GuestError",
        ] {
            assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
        }
    }

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
