//! The accept loop: one thread per connection, one request per connection.
//!
//! A thread per connection is the simplest thing that lets a slow member
//! call (up to `--timeout-ms`) not hold up anyone else. The number of
//! connections served at once is capped; past the cap a client gets a quick
//! `503` rather than a thread.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::api::Service;
use crate::http::{self, Response};

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send its request, and to take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves forever.
pub fn serve(listener: TcpListener, service: Service) -> ! {
    let service = Arc::new(service);
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, or a connection reset while queued:
                // wait a little rather than spin.
                info!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            reject(stream, "too many connections at once; try again");
            continue;
        }
        let (service, counter) = (Arc::clone(&service), Arc::clone(&active));
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                connection(stream, &service);
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            info!("cannot start a thread: {e}");
        }
    }
}

/// Answers `503` on the accepting thread, without reading the request.
fn reject(mut stream: TcpStream, message: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&Response::error(503, message).to_bytes());
    linger_close(stream);
}

fn connection(mut stream: TcpStream, service: &Service) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let request = match http::read_request(&mut stream) {
        Ok(request) => request,
        Err(e) => {
            debug!("bad request: {e}");
            if let Some(status) = e.status() {
                let _ = stream.write_all(&Response::error(status, &e.to_string()).to_bytes());
                linger_close(stream);
            }
            return;
        }
    };
    let response =
        catch_unwind(AssertUnwindSafe(|| service.handle(&request))).unwrap_or_else(|_| {
            info!("{} {}: the handler panicked", request.method, request.path);
            Response::error(500, "ferry-web failed while answering; see its console")
        });
    debug!("{} {} -> {}", request.method, request.path, response.status);
    let _ = stream.write_all(&response.to_bytes());
    let _ = stream.shutdown(Shutdown::Write);
}

/// Closes after an early answer, reading (briefly) what the client still
/// sends: closing with unread data makes the kernel send a reset, and the
/// client may then lose the answer.
fn linger_close(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 16 * 1024];
    let mut total = 0;
    while total < http::MAX_BODY {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}
