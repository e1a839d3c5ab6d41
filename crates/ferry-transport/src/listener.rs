//! A TCP listener for ferry's HTTP servers (the registry, the manager's
//! API and its workers' link), served by axum: it caps the connections
//! served at once and, with a [`ServerTls`], speaks only TLS, each
//! handshake bounded by [`TLS_HANDSHAKE_DEADLINE`] and run on the
//! connection's own task (never in the accept loop, so a client that
//! stalls its handshake holds only its own connection).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::ServerTls;

/// How long a client has for its TLS handshake, in all.
pub const TLS_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// A listener for `axum::serve`: at most as many connections at once as
/// it has permits (one past that is closed at once, logged once per
/// flood); TLS only when it has a [`ServerTls`]. Accept errors are retried
/// with a pause by axum's own listener.
pub struct CappedListener {
    inner: tokio::net::TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
    over_cap_logged: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
    what: &'static str,
}

impl std::fmt::Debug for CappedListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CappedListener")
            .field("what", &self.what)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl CappedListener {
    /// Serves `listener` (non-blocking, on a tokio runtime with I/O
    /// enabled) with at most `max_connections` at once, over TLS when
    /// `tls` is given. `what` names the server in logs.
    ///
    /// # Errors
    /// The socket cannot be registered with the runtime.
    pub fn new(
        listener: std::net::TcpListener,
        max_connections: usize,
        tls: Option<&ServerTls>,
        what: &'static str,
    ) -> std::io::Result<CappedListener> {
        Ok(CappedListener {
            inner: tokio::net::TcpListener::from_std(listener)?,
            permits: Arc::new(tokio::sync::Semaphore::new(max_connections.max(1))),
            over_cap_logged: false,
            tls: tls.map(|t| tokio_rustls::TlsAcceptor::from(t.0.clone())),
            what,
        })
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    self.over_cap_logged = false;
                    let stream = CappedStream {
                        io,
                        _permit: permit,
                    };
                    // The handshake runs on the connection's own task (its
                    // first read or write), never in this accept loop.
                    let io = match &self.tls {
                        None => Conn(ConnState::Plain(stream)),
                        Some(acceptor) => {
                            let accept = acceptor.accept(stream);
                            Conn(ConnState::Handshake(Box::pin(async move {
                                match tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, accept).await {
                                    Ok(r) => r,
                                    Err(_) => Err(std::io::Error::new(
                                        std::io::ErrorKind::TimedOut,
                                        "TLS handshake deadline passed",
                                    )),
                                }
                            })))
                        }
                    };
                    return (io, addr);
                }
                Err(_) => {
                    if !self.over_cap_logged {
                        warn!(
                            server = self.what,
                            "serving the most connections at once: closing new ones until some end"
                        );
                        self.over_cap_logged = true;
                    }
                    drop(io);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

type Handshake = std::pin::Pin<
    Box<dyn Future<Output = std::io::Result<tokio_rustls::server::TlsStream<CappedStream>>> + Send>,
>;

/// A connection of a [`CappedListener`]: plain, or TLS (first its
/// handshake).
pub struct Conn(ConnState);

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conn")
    }
}

enum ConnState {
    Plain(CappedStream),
    Handshake(Handshake),
    Tls(Box<tokio_rustls::server::TlsStream<CappedStream>>),
    Failed,
}

impl ConnState {
    /// Drives a pending handshake; `Ready(Ok)` once the stream is usable.
    fn ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        if let ConnState::Handshake(h) = self {
            match h.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(tls)) => *self = ConnState::Tls(Box::new(tls)),
                Poll::Ready(Err(e)) => {
                    debug!("a TLS handshake failed: {e}");
                    *self = ConnState::Failed;
                    return Poll::Ready(Err(e));
                }
            }
        }
        match self {
            ConnState::Failed => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "TLS handshake failed",
            ))),
            _ => Poll::Ready(Ok(())),
        }
    }
}

macro_rules! io_dispatch {
    ($self:ident, $cx:ident, $io:ident => $e:expr) => {{
        let this = &mut $self.get_mut().0;
        match this.ready($cx) {
            std::task::Poll::Pending => return std::task::Poll::Pending,
            std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Err(e)),
            std::task::Poll::Ready(Ok(())) => {}
        }
        match this {
            ConnState::Plain($io) => {
                let $io = std::pin::Pin::new($io);
                $e
            }
            ConnState::Tls(tls) => {
                let $io = std::pin::Pin::new(&mut **tls);
                $e
            }
            ConnState::Handshake(_) | ConnState::Failed => unreachable!("ready() resolved it"),
        }
    }};
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        io_dispatch!(self, cx, io => io.poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        io_dispatch!(self, cx, io => io.poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        io_dispatch!(self, cx, io => io.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        io_dispatch!(self, cx, io => io.poll_shutdown(cx))
    }
}

/// A connection holding its place under the cap until it is dropped.
struct CappedStream {
    io: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for CappedStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CappedStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
