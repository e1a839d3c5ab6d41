//! Serves an axum router on a [`CappedListener`], as `axum::serve` does,
//! but with hyper's header deadline on *every* request of a connection:
//! axum's server sets no timer, so after a keep-alive connection's first
//! request (which [`CappedListener`] bounds) a client could trickle the
//! next request's headers for ever and hold its slot. Here hyper starts
//! [`HEADER_DEADLINE`] each time it waits for a request's head, the first
//! and every later one, so an idle or trickling keep-alive connection is
//! closed then too.
//!
//! HTTP/1 only, as ferry's axum is built (no HTTP/2 feature, no ALPN).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tracing::trace;

use crate::listener::{CappedListener, HEADER_DEADLINE};

/// Serves `app` on `listener` until `shutdown` completes, then lets the
/// connections finish their requests (each told to close when idle) and
/// returns once all have. Every request carries its client's address as
/// `ConnectInfo<SocketAddr>`. Callers bound the wait after a shutdown
/// themselves (long polls never end by themselves).
///
/// # Errors
/// None today: accept errors are retried by the listener. The `Result`
/// keeps the shape of `axum::serve`'s.
pub async fn serve(
    listener: CappedListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_deadline(listener, app, shutdown, HEADER_DEADLINE).await
}

/// [`serve`] with another header deadline than [`HEADER_DEADLINE`]
/// (tests).
pub async fn serve_with_deadline(
    mut listener: CappedListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    header_deadline: Duration,
) -> std::io::Result<()> {
    use axum::serve::Listener;
    // Dropped by the accept loop at shutdown: each connection then starts
    // its graceful close. Each connection holds a `done` receiver; once
    // all are gone, every connection has ended.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let (done_tx, done_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, addr) = tokio::select! {
            conn = listener.accept() => conn,
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let mut stop_rx = stop_rx.clone();
        let done_rx = done_rx.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let mut app = app.clone();
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut().insert(ConnectInfo::<SocketAddr>(addr));
                    async move {
                        let response: Result<axum::response::Response, Infallible> =
                            tower_service::Service::call(&mut app, req).await;
                        response
                    }
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_deadline);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                // The sender is dropped at shutdown (no value is sent).
                _ = stop_rx.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(e) = result {
                trace!(%addr, "connection ended: {e}");
            }
            drop(done_rx);
        });
    }
    drop(stop_tx);
    drop(stop_rx);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}
