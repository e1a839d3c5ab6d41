//! Prometheus metrics of the operator: reconciles, their errors by kind,
//! moves, and whether this replica leads. Served as text on `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The operator's counters (cheap to clone, shared by every reconcile).
#[derive(Default, Debug)]
pub struct Metrics {
    reconciles: AtomicU64,
    errors_manager: AtomicU64,
    errors_kube: AtomicU64,
    errors_other: AtomicU64,
    creates: AtomicU64,
    moves_ok: AtomicU64,
    moves_failed: AtomicU64,
    deletes: AtomicU64,
    leader: AtomicU64,
    recreates: AtomicU64,
    manager_events: AtomicU64,
    events_connected: AtomicU64,
    events_connects: AtomicU64,
}

/// What a counted error was about.
#[derive(Debug, Clone, Copy)]
pub enum ErrorKind {
    /// The manager was unreachable or refused.
    Manager,
    /// The Kubernetes API failed.
    Kube,
    /// Anything else.
    Other,
}

/// A step the operator took through the manager.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// A VM was created.
    Created,
    /// A VM moved.
    Moved,
    /// A move failed.
    MoveFailed,
    /// A VM was deleted.
    Deleted,
    /// A failed VM was recreated.
    Recreated,
}

impl Metrics {
    /// New, all zero.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// One reconcile ran.
    pub fn reconciled(&self) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
    }

    /// One reconcile failed.
    pub fn error(&self, kind: ErrorKind) {
        let c = match kind {
            ErrorKind::Manager => &self.errors_manager,
            ErrorKind::Kube => &self.errors_kube,
            ErrorKind::Other => &self.errors_other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A step was taken.
    pub fn step(&self, step: Step) {
        let c = match step {
            Step::Created => &self.creates,
            Step::Moved => &self.moves_ok,
            Step::MoveFailed => &self.moves_failed,
            Step::Deleted => &self.deletes,
            Step::Recreated => &self.recreates,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// An event came from the manager's stream.
    pub fn manager_event(&self) {
        self.manager_events.fetch_add(1, Ordering::Relaxed);
    }

    /// The manager's event stream is (or is no longer) connected.
    pub fn events_connected(&self, on: bool) {
        if on {
            self.events_connects.fetch_add(1, Ordering::Relaxed);
        }
        self.events_connected.store(on as u64, Ordering::Relaxed);
    }

    /// Whether this replica leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "# HELP ferry_operator_reconciles_total Reconciles run.\n\
             # TYPE ferry_operator_reconciles_total counter\n\
             ferry_operator_reconciles_total {}\n\
             # HELP ferry_operator_reconcile_errors_total Reconciles that failed, by what failed.\n\
             # TYPE ferry_operator_reconcile_errors_total counter\n\
             ferry_operator_reconcile_errors_total{{kind=\"manager\"}} {}\n\
             ferry_operator_reconcile_errors_total{{kind=\"kube\"}} {}\n\
             ferry_operator_reconcile_errors_total{{kind=\"other\"}} {}\n\
             # HELP ferry_operator_steps_total Steps taken through the manager.\n\
             # TYPE ferry_operator_steps_total counter\n\
             ferry_operator_steps_total{{step=\"create\"}} {}\n\
             ferry_operator_steps_total{{step=\"move\",result=\"ok\"}} {}\n\
             ferry_operator_steps_total{{step=\"move\",result=\"failed\"}} {}\n\
             ferry_operator_steps_total{{step=\"delete\"}} {}\n\
             ferry_operator_steps_total{{step=\"recreate\"}} {}\n\
             # HELP ferry_operator_manager_events_total Events read from the manager's /v1/events stream.\n\
             # TYPE ferry_operator_manager_events_total counter\n\
             ferry_operator_manager_events_total {}\n\
             # HELP ferry_operator_manager_event_stream_connects_total Times the manager's event stream was opened.\n\
             # TYPE ferry_operator_manager_event_stream_connects_total counter\n\
             ferry_operator_manager_event_stream_connects_total {}\n\
             # HELP ferry_operator_manager_event_stream_up Whether the manager's event stream is open.\n\
             # TYPE ferry_operator_manager_event_stream_up gauge\n\
             ferry_operator_manager_event_stream_up {}\n\
             # HELP ferry_operator_leader Whether this replica holds the lease.\n\
             # TYPE ferry_operator_leader gauge\n\
             ferry_operator_leader {}\n",
            g(&self.reconciles),
            g(&self.errors_manager),
            g(&self.errors_kube),
            g(&self.errors_other),
            g(&self.creates),
            g(&self.moves_ok),
            g(&self.moves_failed),
            g(&self.deletes),
            g(&self.recreates),
            g(&self.manager_events),
            g(&self.events_connects),
            g(&self.events_connected),
            g(&self.leader),
        )
    }
}

/// Connections `/metrics` serves at once; one past that is closed at once.
const MAX_CONNECTIONS: usize = 64;

/// Serves `/metrics` on `listener` until the process ends, as ferry's other
/// listeners are served: a connection cap, and a header deadline on every
/// request of a connection (`ferry_transport::serve`), so that scrapers
/// that stall cannot hold the listener.
///
/// # Errors
/// The socket cannot be registered with the runtime.
pub async fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    serve_with_deadline(listener, metrics, ferry_transport::HEADER_DEADLINE).await
}

async fn serve_with_deadline(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    header_deadline: std::time::Duration,
) -> std::io::Result<()> {
    use axum::routing::get;
    listener.set_nonblocking(true)?;
    let listener =
        ferry_transport::CappedListener::new(listener, MAX_CONNECTIONS, None, "operator metrics")?
            .with_header_deadline(header_deadline);
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move { m.render() }
        }),
    );
    ferry_transport::serve_with_deadline(listener, app, std::future::pending(), header_deadline)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    /// A scraper that sends one request, then trickles the next one's
    /// headers on the same keep-alive connection, is cut off at the header
    /// deadline; with `axum::serve` (before) it held the connection for
    /// ever.
    #[test]
    fn a_stalled_keep_alive_scrape_is_cut_off() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.spawn(serve_with_deadline(
            listener,
            Metrics::new(),
            Duration::from_millis(300),
        ));
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 65536];
        let n = conn.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // The first line of a second request, and nothing more.
        conn.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        let t = Instant::now();
        let closed = loop {
            match conn.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        assert!(closed, "the stalled connection was still open after 5 s");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
}
