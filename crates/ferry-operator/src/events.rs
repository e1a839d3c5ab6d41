//! The manager's event stream (`GET /v1/events`) as reconcile triggers.
//!
//! Without it, the operator would learn what happened to a VM on the
//! manager's side (it failed, its node was lost, someone moved it with
//! `ferry cluster`) only at its next resync. With it, each `instance` or
//! `deleted` event reconciles the Instance that owns the VM (the VM
//! `NAMESPACE.NAME` is Instance `NAME` in `NAMESPACE`) within moments, and
//! every `node` event (a node registered, was lost, came back) reconciles
//! every Instance, since any of them may wait for that node.
//!
//! The stream runs on a thread of its own (the manager's client is
//! blocking). When it drops or cannot connect, it connects again after
//! 0.5 s, 1 s, 2 s … at most 30 s; each time it connects, every Instance
//! is reconciled, for what changed while it was away. The controller's
//! slow resync stays as the safety net, and a manager that cannot be
//! reached still shows in the reconcile itself (`Degraded`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_control::api::ClusterEvent;
use futures_util::Stream;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;

use crate::crd::Instance;
use crate::manager::Manager;
use crate::metrics::Metrics;

/// The first wait before connecting again.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait before connecting again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A stream that lasted this long starts the backoff over.
const HEALTHY: Duration = Duration::from_secs(10);

/// The Instance that owns the manager's VM `name` (`NAMESPACE.NAME`), if
/// the name has that shape (a namespace never has a dot).
pub fn instance_of(vm: &str) -> Option<ObjectRef<Instance>> {
    let (ns, name) = vm.split_once('.')?;
    (!ns.is_empty() && !name.is_empty()).then(|| ObjectRef::new(name).within(ns))
}

/// Reconcile triggers from the manager's events: one Instance, or all.
pub struct Triggers {
    /// One Instance whose VM changed.
    pub one: std::pin::Pin<Box<dyn Stream<Item = ObjectRef<Instance>> + Send>>,
    /// Every Instance (connected again; a node changed).
    pub all: std::pin::Pin<Box<dyn Stream<Item = ()> + Send>>,
}

/// Follows the manager's events on a thread until the controller stops
/// taking its triggers.
pub fn follow(manager: &Manager, metrics: Arc<Metrics>) -> Triggers {
    let (one_tx, one_rx) = mpsc::unbounded_channel::<ObjectRef<Instance>>();
    let (all_tx, all_rx) = mpsc::unbounded_channel::<()>();
    let client = manager.client();
    let url = manager.url().to_string();
    let spawned = std::thread::Builder::new()
        .name("manager events".into())
        .spawn(move || {
            let mut backoff = FIRST_BACKOFF;
            loop {
                let opened = Instant::now();
                let result = client.watch_from(
                    || {
                        metrics.events_connected(true);
                        tracing::info!(manager = url, "following the manager's events");
                        let _ = all_tx.send(());
                    },
                    |ev| {
                        metrics.manager_event();
                        match ev {
                            ClusterEvent::Instance { instance } => {
                                match instance_of(&instance.name) {
                                    Some(r) => one_tx.send(r).is_ok(),
                                    None => true,
                                }
                            }
                            ClusterEvent::Deleted { name } => match instance_of(&name) {
                                Some(r) => one_tx.send(r).is_ok(),
                                None => true,
                            },
                            ClusterEvent::Node { .. } => all_tx.send(()).is_ok(),
                            ClusterEvent::GuestError { .. } => true,
                        }
                    },
                );
                metrics.events_connected(false);
                if one_tx.is_closed() || all_tx.is_closed() {
                    return;
                }
                if opened.elapsed() >= HEALTHY {
                    backoff = FIRST_BACKOFF;
                }
                match result {
                    Ok(()) => tracing::info!(
                        retry_in = ?backoff,
                        "the manager's event stream ended; connecting again"
                    ),
                    Err(e) => tracing::warn!(
                        error = %e,
                        retry_in = ?backoff,
                        "the manager's event stream failed; connecting again"
                    ),
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot follow the manager's events: resyncs only");
    }
    Triggers {
        one: Box::pin(futures_util::stream::unfold(one_rx, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        })),
        all: Box::pin(futures_util::stream::unfold(all_rx, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_name_names_its_instance() {
        let r = instance_of("default.kv").unwrap();
        assert_eq!(r.name, "kv");
        assert_eq!(r.namespace.as_deref(), Some("default"));
        // A name may hold dots; a namespace never does.
        let r = instance_of("team-a.kv.v2").unwrap();
        assert_eq!(
            (r.namespace.as_deref(), r.name.as_str()),
            (Some("team-a"), "kv.v2")
        );
        assert!(instance_of("redis-abc123").is_none(), "not the operator's");
        assert!(instance_of(".kv").is_none());
    }
}
