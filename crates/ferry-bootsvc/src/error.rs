//! Errors: [`BootSvcError`] for starting and running the service,
//! [`ApiError`] for one request (rendered as RFC 7807 problem JSON, as SMD
//! and BSS answer), [`LoadError`] for `load`.

use std::net::SocketAddr;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;
use crate::types::Problem;

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum BootSvcError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `--advertise` is not a usable address.
    #[error("--advertise {0:?} is not an address nodes can use (e.g. 10.0.0.1:27778 or http://host:27778)")]
    BadAdvertise(String),
    /// The listening address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The runtime or its thread could not start.
    #[error("cannot start the service's {what}: {source}")]
    Setup {
        /// What.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The socket failed while serving.
    #[error("serving on {addr} failed: {source}")]
    Serve {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A request's failure: an HTTP status and a line saying what was wrong
/// (naming the field for bad input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {detail}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What was wrong.
    pub detail: String,
}

impl ApiError {
    /// 400, naming `field`.
    pub fn bad(field: &str, what: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            detail: format!("{field}: {what}"),
        }
    }

    /// 404.
    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            detail: what.into(),
        }
    }

    /// 409.
    pub fn conflict(what: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::CONFLICT,
            detail: what.into(),
        }
    }

    /// 403: not served here (the node listener's other routes).
    pub fn forbidden(what: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            detail: what.into(),
        }
    }

    /// 401: a write without the token.
    pub fn unauthorized() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            detail: "writes need Authorization: Bearer <token>".into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        tracing::error!("{e}");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            detail: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            kind: "about:blank".into(),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            status: self.status.as_u16(),
            detail: self.detail,
        };
        let body = serde_json::to_vec(&problem).expect("a problem serialises");
        let mut r = (self.status, body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ferry boot-service\""),
            );
        }
        r
    }
}

/// Why `load` failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The node list is not valid YAML of the expected shape.
    #[error("the node list is not valid: {0}")]
    Parse(String),
    /// A node in the list is wrong.
    #[error("node {node}: {what}")]
    BadNode {
        /// Its name or index.
        node: String,
        /// What is wrong.
        what: String,
    },
    /// The service could not be reached.
    #[error("cannot reach the boot service at {url}: {detail}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        detail: String,
    },
    /// TLS with the service failed (its certificate is not signed by
    /// `--ca`, or is for another name), or `--ca` cannot be read.
    #[error("TLS with the boot service at {url} failed: {detail}: give --ca FILE, the CA that signed its --tls-cert")]
    Tls {
        /// The URL.
        url: String,
        /// Why.
        detail: String,
    },
    /// The service refused a request.
    #[error("{method} {url} answered {status}: {detail}")]
    Refused {
        /// The method.
        method: &'static str,
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// The problem's detail, or the body.
        detail: String,
    },
}
