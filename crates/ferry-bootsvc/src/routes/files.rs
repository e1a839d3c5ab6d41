//! `/files/...`: the store's `files/` directory over plain HTTP, for the
//! kernels, initrds and root images nodes boot (as BSS leaves to a web
//! server). One byte range per request is honoured (resumed downloads);
//! anything else gets the whole file, which RFC 9110 allows.

use std::os::unix::fs::FileExt;
use std::path::{Component, PathBuf};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use crate::error::ApiError;
use crate::AppState;

/// Bytes read at a time while streaming a file.
const READ_SIZE: u64 = 256 << 10;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/files/{*path}", get(file))
}

/// The file under `root` a URL path names: only plain names, so no `..`
/// or absolute path leaves the directory.
fn resolve(root: &std::path::Path, path: &str) -> Option<PathBuf> {
    let rel = std::path::Path::new(path);
    if path.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(root.join(rel))
}

/// What a `Range` header asks of `len` bytes: `Some((first, last))`,
/// `None` for the whole file, `Err` if unsatisfiable.
fn range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let r = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (None, Some(n)) if a.is_empty() => {
            if n == 0 || len == 0 {
                return Err(());
            }
            (len - n.min(len), len - 1)
        }
        (Some(x), None) if b.is_empty() => (x, len.saturating_sub(1)),
        (Some(x), Some(y)) if x <= y => (x, y.min(len.saturating_sub(1))),
        _ => return Ok(None),
    };
    if r.0 >= len {
        return Err(());
    }
    Ok(Some(r))
}

fn value(s: String) -> HeaderValue {
    HeaderValue::from_str(&s).expect("digits make a valid header value")
}

async fn file(
    State(s): State<Arc<AppState>>,
    Path(path): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found(format!("no file {path} in the store"));
    let full = resolve(&s.files, &path).ok_or_else(not_found)?;
    let f = std::fs::File::open(&full).map_err(|_| not_found())?;
    let meta = f.metadata().map_err(|_| not_found())?;
    if !meta.is_file() {
        return Err(not_found());
    }
    let size = meta.len();
    let mut r = Response::new(Body::empty());
    let h = r.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let asked = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (first, len) = match range(asked, size) {
        Ok(None) => (0, size),
        Ok(Some((a, b))) => {
            h.insert(
                header::CONTENT_RANGE,
                value(format!("bytes {a}-{b}/{size}")),
            );
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            (a, b - a + 1)
        }
        Err(()) => {
            h.insert(header::CONTENT_RANGE, value(format!("bytes */{size}")));
            *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            return Ok(r);
        }
    };
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, value(len.to_string()));
    if method != Method::HEAD {
        *r.body_mut() = Body::from_stream(stream(Arc::new(f), first, len));
    }
    Ok(r)
}

/// `len` bytes at `first`, read in pieces on the blocking pool; a file that
/// shrank ends the stream with an error (the client sees a short body, not
/// a wrong one).
fn stream(
    f: Arc<std::fs::File>,
    first: u64,
    len: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures_util::stream::try_unfold((f, first, len), |(f, at, left)| async move {
        if left == 0 {
            return Ok(None);
        }
        let n = left.min(READ_SIZE) as usize;
        let reader = f.clone();
        let piece = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n];
            reader.read_exact_at(&mut buf, at)?;
            Ok::<_, std::io::Error>(buf)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Some((
            Bytes::from(piece),
            (f, at + n as u64, left - n as u64),
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside() {
        let root = std::path::Path::new("/s/files");
        assert_eq!(resolve(root, "k/vmlinuz"), Some(root.join("k/vmlinuz")));
        assert_eq!(resolve(root, "../state.json"), None);
        assert_eq!(resolve(root, "/etc/passwd"), None);
        assert_eq!(resolve(root, "a/./b"), Some(root.join("a/b")));
    }

    #[test]
    fn ranges() {
        assert_eq!(range(None, 10), Ok(None));
        assert_eq!(range(Some("bytes=2-4"), 10), Ok(Some((2, 4))));
        assert_eq!(range(Some("bytes=8-"), 10), Ok(Some((8, 9))));
        assert_eq!(range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(range(Some("bytes=1-2,4-5"), 10), Ok(None));
    }
}
