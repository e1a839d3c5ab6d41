//! A migration connection: plain TCP, or TLS over it (rustls, blocking).
//!
//! Every connection of a migration (the control connection and both data
//! channels) is a [`PeerStream`]. With TLS, each is a TLS connection of its
//! own, handshaken before its hello is sent or read, so the hello (and the
//! token in it) never travels in clear. A data channel's bytes are carried
//! by [`pump_tls`]: one thread that moves both directions between the
//! engine's Unix socket and the TLS connection with `poll(2)`, since a
//! rustls connection cannot be split between a reading and a writing
//! thread.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The first byte of a TLS handshake record: what a TLS client sends first.
pub(crate) const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// One connection between peers.
pub struct PeerStream {
    tcp: TcpStream,
    tls: Option<Box<rustls::Connection>>,
}

impl std::fmt::Debug for PeerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerStream")
            .field("peer", &self.tcp.peer_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl From<TcpStream> for PeerStream {
    /// A plain TCP connection.
    fn from(tcp: TcpStream) -> PeerStream {
        PeerStream::plain(tcp)
    }
}

impl PeerStream {
    /// A plain TCP connection.
    pub(crate) fn plain(tcp: TcpStream) -> PeerStream {
        PeerStream { tcp, tls: None }
    }

    /// TLS over `tcp`, handshaken by `deadline` (an overall limit).
    ///
    /// # Errors
    /// The handshake failed (the error wraps the [`rustls::Error`] when TLS
    /// refused it), the peer closed, or the deadline passed
    /// ([`ErrorKind::TimedOut`]).
    pub(crate) fn tls(
        tcp: TcpStream,
        conn: rustls::Connection,
        deadline: Instant,
    ) -> std::io::Result<PeerStream> {
        let mut s = PeerStream {
            tcp,
            tls: Some(Box::new(conn)),
        };
        s.handshake(deadline)?;
        Ok(s)
    }

    /// Whether it is TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The TCP connection under it (for its address, timeouts, shutdown).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Sets the read timeout of the socket under it.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.tcp.set_read_timeout(t)
    }

    /// Ends the connection: a TLS close_notify (if it can be sent at once),
    /// then both directions of the socket.
    pub fn close(&mut self) {
        if let Some(conn) = self.tls.as_mut() {
            conn.send_close_notify();
            let _ = self.tcp.set_write_timeout(Some(Duration::from_secs(1)));
            while conn.wants_write() {
                if conn.write_tls(&mut self.tcp).is_err() {
                    break;
                }
            }
        }
        let _ = self.tcp.shutdown(Shutdown::Both);
    }

    /// Its parts, for a tunnel.
    pub(crate) fn into_parts(self) -> (TcpStream, Option<Box<rustls::Connection>>) {
        (self.tcp, self.tls)
    }

    /// Drives the handshake to its end by `deadline`, one read or write
    /// at a time (rustls's `complete_io` would keep reading while bytes
    /// trickle in, each read within the socket's timeout, past any
    /// overall deadline).
    fn handshake(&mut self, deadline: Instant) -> std::io::Result<()> {
        let Some(conn) = self.tls.as_mut() else {
            return Ok(());
        };
        while conn.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "the TLS handshake took too long",
                ));
            }
            self.tcp.set_read_timeout(Some(left))?;
            self.tcp.set_write_timeout(Some(left))?;
            if conn.wants_write() {
                match conn.write_tls(&mut self.tcp) {
                    Ok(_) => {}
                    Err(e) if retry(&e) => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            match conn.read_tls(&mut self.tcp) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(_) => process(conn, &mut self.tcp)?,
                Err(e) if retry(&e) => {}
                Err(e) => return Err(e),
            }
        }
        while conn.wants_write() {
            conn.write_tls(&mut self.tcp)?;
        }
        self.tcp.set_write_timeout(None)?;
        Ok(())
    }
}

/// Whether an I/O error only means "not now" (a timeout, a signal).
fn retry(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Processes the records read; on a TLS error, sends the alert that says
/// why (best effort) and returns the error inside an I/O error.
fn process(conn: &mut rustls::Connection, tcp: &mut TcpStream) -> std::io::Result<()> {
    if let Err(e) = conn.process_new_packets() {
        while conn.wants_write() {
            if conn.write_tls(tcp).is_err() {
                break;
            }
        }
        return Err(std::io::Error::new(ErrorKind::InvalidData, e));
    }
    Ok(())
}

impl Read for PeerStream {
    /// With TLS, at most one read from the socket per call: a read that
    /// brought only part of a record returns [`ErrorKind::Interrupted`]
    /// (callers retry, and check their deadlines in between); a socket
    /// timeout returns `WouldBlock`, the partial record kept by rustls.
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(conn) = self.tls.as_mut() else {
            return self.tcp.read(buf);
        };
        if conn.wants_read() {
            while conn.wants_write() {
                conn.write_tls(&mut self.tcp)?;
            }
            if conn.read_tls(&mut self.tcp)? > 0 {
                process(conn, &mut self.tcp)?;
                while conn.wants_write() {
                    conn.write_tls(&mut self.tcp)?;
                }
            }
            // Plaintext, the end (Ok(0) after close_notify,
            // UnexpectedEof without), or not yet.
            return match conn.reader().read(buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => Err(std::io::Error::new(
                    ErrorKind::Interrupted,
                    "part of a TLS record",
                )),
                other => other,
            };
        }
        conn.reader().read(buf)
    }
}

impl Write for PeerStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(conn) = self.tls.as_mut() else {
            return self.tcp.write(buf);
        };
        let n = conn.writer().write(buf)?;
        while conn.wants_write() {
            conn.write_tls(&mut self.tcp)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(conn) = self.tls.as_mut() {
            while conn.wants_write() {
                conn.write_tls(&mut self.tcp)?;
            }
        }
        self.tcp.flush()
    }
}

/// The TLS error inside an I/O error, if it is one.
pub(crate) fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

/// Carries a data channel's bytes both ways between the engine's Unix
/// socket and a TLS connection, until both directions end (or either
/// socket fails, or the TCP socket is shut down from outside). `count`
/// sees every byte carried (plaintext, both directions).
pub(crate) fn pump_tls(
    mut tcp: TcpStream,
    mut conn: rustls::Connection,
    mut unix: UnixStream,
    count: &dyn Fn(u64),
) {
    if tcp.set_nonblocking(true).is_err() || unix.set_nonblocking(true).is_err() {
        return;
    }
    let _ = conn.process_new_packets();
    let mut buf = vec![0u8; 64 * 1024];
    // Engine -> peer: plaintext rustls has not taken yet.
    let mut up: Vec<u8> = Vec::new();
    // Peer -> engine: plaintext not yet written to the engine.
    let mut down: Vec<u8> = Vec::new();
    let mut down_at = 0usize;
    let (mut unix_eof, mut close_sent, mut tcp_shut) = (false, false, false);
    let (mut tcp_eof, mut unix_shut) = (false, false);
    let would_block =
        |e: &std::io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted);
    'pump: loop {
        let mut progress = false;
        // The engine's bytes into the TLS connection.
        if !unix_eof && up.is_empty() && !conn.wants_write() {
            match unix.read(&mut buf) {
                Ok(0) => unix_eof = true,
                Ok(n) => up.extend_from_slice(&buf[..n]),
                Err(e) if would_block(&e) => {}
                Err(_) => break,
            }
            progress |= unix_eof || !up.is_empty();
        }
        if !up.is_empty() {
            match conn.writer().write(&up) {
                Ok(0) => {}
                Ok(n) => {
                    count(n as u64);
                    up.drain(..n);
                    progress = true;
                }
                Err(_) => break,
            }
        }
        if unix_eof && up.is_empty() && !close_sent {
            conn.send_close_notify();
            close_sent = true;
            progress = true;
        }
        // Records out to the peer.
        while conn.wants_write() {
            match conn.write_tls(&mut tcp) {
                Ok(0) => break,
                Ok(_) => progress = true,
                Err(e) if would_block(&e) => break,
                Err(_) => break 'pump,
            }
        }
        if close_sent && !conn.wants_write() && !tcp_shut {
            let _ = tcp.shutdown(Shutdown::Write);
            tcp_shut = true;
            progress = true;
        }
        // Records in from the peer, and their plaintext out.
        if !tcp_eof && down_at == down.len() {
            down.clear();
            down_at = 0;
            match conn.read_tls(&mut tcp) {
                Ok(0) => {
                    tcp_eof = true;
                    progress = true;
                }
                Ok(_) => {
                    if conn.process_new_packets().is_err() {
                        let _ = conn.write_tls(&mut tcp);
                        break;
                    }
                    progress = true;
                }
                Err(e) if would_block(&e) => {}
                Err(_) => break,
            }
            loop {
                match conn.reader().read(&mut buf) {
                    Ok(0) => {
                        // The peer's close_notify.
                        tcp_eof = true;
                        break;
                    }
                    Ok(n) => down.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // Closed without close_notify: what came is delivered,
                    // then the engine sees the end.
                    Err(_) => {
                        tcp_eof = true;
                        break;
                    }
                }
            }
        }
        if down_at < down.len() {
            match unix.write(&down[down_at..]) {
                Ok(n) => {
                    down_at += n;
                    count(n as u64);
                    progress = true;
                }
                Err(e) if would_block(&e) => {}
                Err(_) => break,
            }
        }
        if tcp_eof && down_at == down.len() && !unix_shut {
            let _ = unix.shutdown(Shutdown::Write);
            unix_shut = true;
            progress = true;
        }
        if unix_shut && tcp_shut {
            break;
        }
        if !progress {
            let mut fds = [
                libc::pollfd {
                    fd: tcp.as_raw_fd(),
                    events: 0,
                    revents: 0,
                },
                libc::pollfd {
                    fd: unix.as_raw_fd(),
                    events: 0,
                    revents: 0,
                },
            ];
            if !tcp_eof && down_at == down.len() {
                fds[0].events |= libc::POLLIN;
            }
            if conn.wants_write() {
                fds[0].events |= libc::POLLOUT;
            }
            if !unix_eof && up.is_empty() && !conn.wants_write() {
                fds[1].events |= libc::POLLIN;
            }
            if down_at < down.len() {
                fds[1].events |= libc::POLLOUT;
            }
            // SAFETY: poll(2) on two pollfd structs this frame owns, their
            // count given; the descriptors stay open during the call.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            // A socket in error (the tunnel dropped: shut down from
            // outside) shows in the next read or write.
            if fds
                .iter()
                .any(|f| f.revents & (libc::POLLERR | libc::POLLNVAL) != 0)
            {
                break;
            }
        }
    }
}
