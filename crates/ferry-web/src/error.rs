//! Errors that stop the service from starting, and errors of one request.

use std::net::SocketAddr;

use crate::fleet::FleetError;
use crate::http::CallError;
use crate::storage::StorageError;

/// Why the service could not start. Each has its own exit code.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listening address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The storage directory cannot be created.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

impl StartError {
    /// The process exit code: 3 for a taken address, 4 for storage.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Bind { .. } => 3,
            StartError::Storage(_) => 4,
        }
    }
}

/// Why a request failed; [`ApiError::status`] is what the client gets,
/// with the message as `{"error": ...}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No such route, key or member.
    #[error("{0}")]
    NotFound(String),
    /// The route exists, the method does not.
    #[error("{method} is not allowed on {path}: use {allow}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path.
        path: String,
        /// The methods that are (the `Allow` header).
        allow: &'static str,
    },
    /// The request is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// A value too large to store.
    #[error("{0}")]
    TooLarge(String),
    /// The fleet file is unusable.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// Another member could not be reached or answered wrongly.
    #[error("{0}")]
    Upstream(String),
    /// This VM's disk failed.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::BadRequest(_) => 400,
            ApiError::TooLarge(_) => 413,
            ApiError::Fleet(FleetError::BadAddress { .. }) | ApiError::Upstream(_) => 502,
            ApiError::Fleet(_) | ApiError::Internal(_) => 500,
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::BadKey(_) => ApiError::BadRequest(e.to_string()),
            StorageError::TooLarge(_) => ApiError::TooLarge(e.to_string()),
            StorageError::NotFound(_) => ApiError::NotFound(e.to_string()),
            StorageError::Io { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        ApiError::Upstream(e.to_string())
    }
}
