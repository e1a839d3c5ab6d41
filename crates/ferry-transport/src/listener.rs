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

/// How long a client has, in all from its connection's accept (TLS
/// handshake included), to send its first request's headers (up to the
/// blank line that ends them). An overall deadline, not one per read: a
/// client trickling a byte every few seconds is cut off all the same, and
/// silent clients cannot hold every connection slot. Later requests on a
/// keep-alive connection get the same deadline from hyper, under
/// [`serve`](crate::serve) (axum's own server sets no header timeout).
pub const HEADER_DEADLINE: Duration = Duration::from_secs(10);

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
    header_deadline: Duration,
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
            header_deadline: HEADER_DEADLINE,
        })
    }

    /// Another deadline for a connection's first request headers than
    /// [`HEADER_DEADLINE`] (tests).
    pub fn with_header_deadline(mut self, deadline: Duration) -> CappedListener {
        self.header_deadline = deadline;
        self
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
                    let state = match &self.tls {
                        None => ConnState::Plain(stream),
                        Some(acceptor) => {
                            let accept = acceptor.accept(stream);
                            ConnState::Handshake(Box::pin(async move {
                                match tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, accept).await {
                                    Ok(r) => r,
                                    Err(_) => Err(std::io::Error::new(
                                        std::io::ErrorKind::TimedOut,
                                        "TLS handshake deadline passed",
                                    )),
                                }
                            }))
                        }
                    };
                    let io = Conn {
                        state,
                        head: Some(HeadWatch {
                            deadline: Box::pin(tokio::time::sleep(self.header_deadline)),
                            matched: 0,
                        }),
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
/// handshake), its first request's headers due by [`HEADER_DEADLINE`].
pub struct Conn {
    state: ConnState,
    /// Until the first request's headers have arrived.
    head: Option<HeadWatch>,
}

/// The first request's headers, on their way.
struct HeadWatch {
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// How much of `\r\n\r\n` the bytes read so far end with.
    matched: usize,
}

impl HeadWatch {
    /// Looks for the blank line that ends the headers in `data`, the next
    /// bytes read; true once found.
    fn saw(&mut self, data: &[u8]) -> bool {
        const END: &[u8] = b"\r\n\r\n";
        for &b in data {
            self.matched = if b == END[self.matched] {
                self.matched + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            if self.matched == END.len() {
                return true;
            }
        }
        false
    }
}

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
    ($state:expr, $cx:ident, $io:ident => $e:expr) => {{
        let this: &mut ConnState = $state;
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
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(head) = &mut this.head {
            if head.deadline.as_mut().poll(cx).is_ready() {
                debug!("a client's request headers missed their deadline");
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the request's headers took too long",
                )));
            }
        }
        let before = buf.filled().len();
        let read = io_dispatch!(&mut this.state, cx, io => io.poll_read(cx, buf));
        if let (Poll::Ready(Ok(())), Some(head)) = (&read, &mut this.head) {
            if head.saw(&buf.filled()[before..]) {
                this.head = None;
            }
        }
        read
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        io_dispatch!(&mut self.get_mut().state, cx, io => io.poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        io_dispatch!(&mut self.get_mut().state, cx, io => io.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        io_dispatch!(&mut self.get_mut().state, cx, io => io.poll_shutdown(cx))
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
