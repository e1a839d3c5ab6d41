//! The HTTP routes, one module per service copied, and what they share:
//! the token check on writes, query strings with repeated keys (SMD's
//! `?id=a&id=b`), JSON bodies whose errors name the field.

mod bss;
mod cloud_init;
mod files;
mod smd;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::debug;

use crate::error::ApiError;
use crate::AppState;

/// Every route, behind the token check.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    routes()
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .merge(smd::routes())
        .merge(bss::routes())
        .merge(cloud_init::routes())
        .merge(files::routes())
        .fallback(|| async { ApiError::not_found("no such route") })
}

/// The routes of the plain listener for nodes: only what a node asks
/// ([`node_route`]); anything else is a 403 naming `api_url`, where the
/// API is served (over TLS when it has it).
pub(crate) fn node_router(state: Arc<AppState>, api_url: String) -> Router {
    let api_url = Arc::new(api_url);
    routes()
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::from_fn_with_state(api_url, nodes_only))
        .with_state(state)
}

/// What nodes ask, which the node listener serves: the boot script (and
/// the service's status), cloud-init's documents, files, and phone-home
/// (the one write nodes make, without a token).
fn node_route(method: &Method, path: &str) -> bool {
    if path.ends_with("/phone-home") {
        return method == Method::POST;
    }
    let read = method == Method::GET || method == Method::HEAD;
    read && (path == "/boot/v1/bootscript"
        || path == "/boot/v1/service/status"
        || path.starts_with("/files/")
        || (path.starts_with("/cloud-init/") && !path.starts_with("/cloud-init/admin/")))
}

/// Refuses on the node listener what is not [`node_route`].
async fn nodes_only(State(api_url): State<Arc<String>>, req: Request, next: Next) -> Response {
    if node_route(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    debug!(method = %req.method(), uri = %req.uri(), "refused on the node listener");
    ApiError::forbidden(format!(
        "this is the boot service's listener for nodes: it serves the boot script, cloud-init, files and phone-home only; {} {} goes to {api_url}",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

/// Writes need the token (when one is set); reads and phone-home (nodes
/// hold no tokens) do not. Logs every request.
async fn guard(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let read = method == Method::GET || method == Method::HEAD;
    let node_write = uri.path().ends_with("/phone-home");
    let response = match &state.token {
        Some(token) if !read && !node_write && !authorized(req.headers(), token) => {
            ApiError::unauthorized().into_response()
        }
        _ => next.run(req).await,
    };
    debug!(%method, %uri, status = response.status().as_u16(), "request");
    response
}

/// Whether `headers` carry `Authorization: Bearer <token>`.
fn authorized(headers: &HeaderMap, token: &ferry_transport::Token) -> bool {
    token.authorizes(headers)
}

/// A query string's pairs, decoded, repeated keys kept in order.
pub(crate) fn pairs(raw: Option<&str>) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    raw.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// Every value of `key` (case-insensitive, as SMD's filters are), with
/// comma-separated lists split.
pub(crate) fn values(pairs: &[(String, String)], key: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(key))
        .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Parses a JSON body; a bad one is a 400 naming where it broke.
pub(crate) fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad("body", e))
}

/// A JSON answer.
pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec(value).expect("answers serialise");
    let mut r = (status, Body::from(body)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A text answer.
pub(crate) fn text(content_type: &'static str, body: String) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_listener_serves_what_nodes_ask() {
        let get = Method::GET;
        for path in [
            "/boot/v1/bootscript",
            "/cloud-init/meta-data",
            "/cloud-init/aa:bb:cc:dd:ee:ff/user-data",
            "/files/k/vmlinuz",
        ] {
            assert!(node_route(&get, path), "{path}");
        }
        assert!(node_route(
            &Method::POST,
            "/cloud-init/aa:bb:cc:dd:ee:ff/phone-home"
        ));
        assert!(node_route(&Method::POST, "/boot/v1/phone-home"));
        assert!(!node_route(&get, "/cloud-init/phone-home"));
        assert!(!node_route(&get, "/cloud-init/admin/groups"));
        assert!(!node_route(&get, "/hsm/v2/State/Components"));
        assert!(!node_route(&get, "/boot/v1/bootparameters"));
        assert!(!node_route(&Method::POST, "/boot/v1/bootparameters"));
        assert!(!node_route(&Method::DELETE, "/files/k"));
    }

    #[test]
    fn queries_keep_repeats_and_decode() {
        let p = pairs(Some("id=x1&ID=x2,x3&mac=aa%3Abb&json=1&empty"));
        assert_eq!(values(&p, "id"), ["x1", "x2", "x3"]);
        assert_eq!(values(&p, "mac"), ["aa:bb"]);
        assert!(values(&p, "empty").is_empty());
    }
}
