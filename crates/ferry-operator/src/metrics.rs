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

/// Serves `/metrics` on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move { m.render() }
        }),
    );
    axum::serve(listener, app).await
}
