//! The manager's state and what it does with it: placement, the instance
//! lifecycle, leases, and settling its records on what workers report. No
//! HTTP here: the routes translate requests into these calls.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, oneshot, Notify};

use crate::api::{
    now_unix, now_unix_ms, ClusterEvent, CreateInstance, Instance, InstanceState, Move, Node,
    NodeState,
};
use crate::link::{Command, CommandKind, Heartbeat, Outcome, Register, Report};
use crate::manager::ApiError;
use crate::store::{InstanceRecord, NodeRecord, Store};

/// Memory a VM's engine uses beyond its guest's, MiB: what placement adds
/// to the package's guest memory before it checks a node's room.
pub const ENGINE_OVERHEAD_MIB: u64 = 64;

/// A node as the manager holds it.
struct NodeEntry {
    rec: NodeRecord,
    /// The worker's current session (none until it registers with this
    /// manager process).
    session: Option<String>,
    /// Commands it has not fetched yet.
    queue: VecDeque<Command>,
    /// When it last reported to this manager process.
    last_seen: Instant,
    /// What it reported last time: each VM's state.
    reported: HashMap<String, String>,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    /// Requests served, by route.
    pub requests: BTreeMap<&'static str, u64>,
    /// Migrations that moved the instance.
    pub migrations_ok: u64,
    /// Migrations that did not.
    pub migrations_failed: u64,
    /// Sum of the engine's downtime over the migrations that moved.
    pub downtime_ms_sum: u64,
}

/// The manager's state.
pub struct Core {
    store: Store,
    nodes: BTreeMap<String, NodeEntry>,
    instances: BTreeMap<String, InstanceRecord>,
    /// Waiting callers, by command id.
    waiters: HashMap<u64, oneshot::Sender<Outcome>>,
    /// Instances with a create, move or delete in flight (in this process):
    /// their records are not settled from heartbeats meanwhile, because
    /// both ends of a move report the VM until the switch.
    busy: HashSet<String>,
    next_id: u64,
    /// Counters.
    pub metrics: Metrics,
}

/// The state shared by every request.
pub struct Shared {
    core: Mutex<Core>,
    /// Wakes workers' long polls when a command is queued.
    pub wake: Notify,
    /// Every change, for `GET /v1/events`.
    pub events: broadcast::Sender<ClusterEvent>,
    /// How long a create, move or delete may take before the caller gets
    /// an error.
    pub op_timeout: Duration,
    /// The registries' token, if they need one.
    pub registry_token: Option<ferry_transport::Token>,
}

impl Shared {
    /// The state, loaded from `store`. Nodes count as heard from now: a
    /// restarted manager gives each a full lease to report again.
    pub fn load(
        store: Store,
        op_timeout: Duration,
        registry_token: Option<ferry_transport::Token>,
    ) -> Result<Arc<Shared>, ApiError> {
        let snap = store.load().map_err(ApiError::store)?;
        let now = Instant::now();
        let nodes = snap
            .nodes
            .into_iter()
            .map(|rec| {
                let entry = NodeEntry {
                    rec,
                    session: None,
                    queue: VecDeque::new(),
                    last_seen: now,
                    reported: HashMap::new(),
                };
                (entry.rec.node.name.clone(), entry)
            })
            .collect();
        let instances = snap
            .instances
            .into_iter()
            .map(|i| (i.instance.name.clone(), i))
            .collect();
        Ok(Arc::new(Shared {
            core: Mutex::new(Core {
                store,
                nodes,
                instances,
                waiters: HashMap::new(),
                busy: HashSet::new(),
                next_id: 1,
                metrics: Metrics::default(),
            }),
            wake: Notify::new(),
            events: broadcast::channel(1024).0,
            op_timeout,
            registry_token,
        }))
    }

    /// The state, locked. A panic while it was held leaves it as it was
    /// (every change is applied whole), so a poisoned lock is taken over.
    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: ClusterEvent) {
        let _ = self.events.send(event);
    }

    /// Every node.
    pub fn nodes(&self) -> Vec<Node> {
        let core = self.lock();
        core.nodes.values().map(|n| core.node_view(n)).collect()
    }

    /// One node.
    pub fn node(&self, name: &str) -> Result<Node, ApiError> {
        let core = self.lock();
        let n = core
            .nodes
            .get(name)
            .ok_or_else(|| ApiError::unknown_node(name))?;
        Ok(core.node_view(n))
    }

    /// Every instance (on `node`, if given), deleted ones left out.
    pub fn instances(&self, node: Option<&str>) -> Result<Vec<Instance>, ApiError> {
        let core = self.lock();
        if let Some(n) = node {
            if !core.nodes.contains_key(n) {
                return Err(ApiError::unknown_node(n));
            }
        }
        Ok(core
            .instances
            .values()
            .filter(|i| node.is_none_or(|n| i.instance.node == n))
            .map(|i| i.instance.clone())
            .collect())
    }

    /// One instance.
    pub fn instance(&self, name: &str) -> Result<Instance, ApiError> {
        self.lock()
            .instances
            .get(name)
            .map(|i| i.instance.clone())
            .ok_or_else(|| ApiError::unknown_instance(name))
    }

    /// The instance whose address is `addr`, if any.
    pub fn instance_at(&self, addr: &str) -> Option<Instance> {
        self.lock()
            .instances
            .values()
            .find(|i| i.instance.address.as_deref() == Some(addr))
            .map(|i| i.instance.clone())
    }

    /// Creates an instance from the package at `source` (its guest memory
    /// `memory_mib`, recipe `recipe`) and waits until it runs.
    pub async fn create(
        &self,
        req: &CreateInstance,
        source: String,
        memory_mib: u64,
        recipe: &str,
    ) -> Result<Instance, ApiError> {
        let (id, rx, name) = {
            let mut core = self.lock();
            let name = match &req.name {
                Some(n) => {
                    ferry_runtime::vmdir::validate_name(n)
                        .map_err(|e| ApiError::bad(e.to_string()))?;
                    if core.instances.contains_key(n) {
                        return Err(ApiError::conflict(format!(
                            "the name '{n}' is taken by another instance: choose another name, or delete that one"
                        )));
                    }
                    n.clone()
                }
                None => loop {
                    let n = ferry_runtime::vmdir::generate_name(recipe);
                    if !core.instances.contains_key(&n) {
                        break n;
                    }
                },
            };
            let node = core.place(req.node.as_deref(), memory_mib)?;
            let rec = InstanceRecord {
                instance: Instance {
                    name: name.clone(),
                    source: source.clone(),
                    node: node.clone(),
                    state: InstanceState::Starting,
                    reason: None,
                    address: None,
                    exposes: Vec::new(),
                    memory_mib,
                    moves: Vec::new(),
                    created_unix: now_unix(),
                    last_error: None,
                },
                token: random_token(),
                pending_token: None,
                expose: req.expose.clone(),
            };
            let kind = CommandKind::Create {
                name: name.clone(),
                source,
                registry_token: self.registry_token.clone(),
                token: instance_token(&rec.token)?,
                expose: req.expose.clone(),
            };
            core.put(rec, self)?;
            core.busy.insert(name.clone());
            let (id, rx) = core.send(&node, kind);
            (id, rx, name)
        };
        self.wake.notify_waiters();
        let outcome = self.wait(id, rx).await;
        let mut core = self.lock();
        core.busy.remove(&name);
        let mut rec = core
            .instances
            .get(&name)
            .cloned()
            .ok_or_else(|| ApiError::unknown_instance(&name))?;
        let result = match outcome {
            Ok(Outcome::Done { report, .. }) => {
                rec.instance.state = InstanceState::Running;
                rec.instance.reason = None;
                rec.instance.address = report.address;
                rec.instance.exposes = report.exposes;
                Ok(())
            }
            Ok(Outcome::Failed { class, message }) => {
                rec.instance.state = InstanceState::Failed;
                rec.instance.reason = Some(message.clone());
                Err(ApiError::worker(&rec.instance.node, &class, &message))
            }
            Err(e) => {
                rec.instance.state = InstanceState::Failed;
                rec.instance.reason = Some(e.detail.clone());
                Err(e)
            }
        };
        let view = rec.instance.clone();
        core.put(rec, self)?;
        result.map(|()| view)
    }

    /// Moves instance `name` to `node` and waits until it runs there. On
    /// failure it runs where it was (the peer protocol's commit point
    /// decides), and the move is recorded as failed.
    pub async fn migrate(&self, name: &str, node: &str) -> Result<Instance, ApiError> {
        let (id, rx) = {
            let mut core = self.lock();
            let rec = core
                .instances
                .get(name)
                .cloned()
                .ok_or_else(|| ApiError::unknown_instance(name))?;
            if !core.nodes.contains_key(node) {
                return Err(ApiError::unknown_node(node));
            }
            if core.busy.contains(name) || rec.instance.state == InstanceState::Migrating {
                return Err(ApiError::conflict(format!(
                    "'{name}' is being created, moved or deleted already: wait for that to end"
                )));
            }
            if rec.instance.node == node {
                return Err(ApiError::conflict(format!(
                    "'{name}' runs on {node} already: name another node"
                )));
            }
            if rec.instance.state != InstanceState::Running {
                return Err(ApiError::conflict(format!(
                    "'{name}' is {} ({}), not running: only a running instance moves",
                    rec.instance.state,
                    rec.instance
                        .reason
                        .as_deref()
                        .unwrap_or("no reason recorded")
                )));
            }
            let from = rec.instance.address.clone().ok_or_else(|| {
                ApiError::conflict(format!("'{name}' has no address yet: wait until it runs"))
            })?;
            core.room(node, rec.instance.memory_mib)?;
            let mut rec = rec;
            // A fresh credential for this move: the destination serves the
            // instance with it, so this move's (the source's) is spent.
            let fresh = random_token();
            rec.pending_token = Some(fresh.clone());
            rec.instance.state = InstanceState::Migrating;
            rec.instance.moves.push(Move {
                from: rec.instance.node.clone(),
                to: node.to_string(),
                started_unix_ms: now_unix_ms(),
                ended_unix_ms: None,
                ok: None,
                error: None,
                downtime_ms: None,
            });
            let kind = CommandKind::Receive {
                name: name.to_string(),
                from,
                token: instance_token(&rec.token)?,
                serve_token: Some(instance_token(&fresh)?),
                expose: rec.expose.clone(),
            };
            core.put(rec, self)?;
            core.busy.insert(name.to_string());
            core.send(node, kind)
        };
        self.wake.notify_waiters();
        let outcome = self.wait(id, rx).await;
        let mut core = self.lock();
        core.busy.remove(name);
        let mut rec = core
            .instances
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::unknown_instance(name))?;
        let last = rec.instance.moves.last_mut().expect("a move was recorded");
        last.ended_unix_ms = Some(now_unix_ms());
        let result = match outcome {
            Ok(Outcome::Done {
                report,
                downtime_ms,
            }) => {
                last.ok = Some(true);
                last.downtime_ms = downtime_ms;
                if let Some(t) = rec.pending_token.take() {
                    rec.token = t;
                }
                rec.instance.node = node.to_string();
                rec.instance.state = InstanceState::Running;
                rec.instance.reason = None;
                rec.instance.address = report.address;
                rec.instance.exposes = report.exposes;
                // Its destination said so just now, whatever it last put in
                // a heartbeat (`starting`): a heartbeat from the source
                // taken before the switch and arriving after this must not
                // take the instance back (a delete would go there and
                // leave the moved VM running).
                if let Some(entry) = core.nodes.get_mut(node) {
                    entry.reported.insert(name.to_string(), "running".into());
                }
                core.metrics.migrations_ok += 1;
                core.metrics.downtime_ms_sum += downtime_ms.unwrap_or(0);
                Ok(())
            }
            Ok(Outcome::Failed { class, message }) => {
                last.ok = Some(false);
                last.error = Some(message.clone());
                // Nothing serves the fresh credential: the source keeps
                // serving with its own.
                rec.pending_token = None;
                rec.instance.state = InstanceState::Running;
                core.metrics.migrations_failed += 1;
                Err(ApiError::worker(
                    node,
                    &class,
                    &format!("{message}; the instance stays on {}", rec.instance.node),
                ))
            }
            Err(e) => {
                last.ok = Some(false);
                last.error = Some(e.detail.clone());
                // Where it runs now, the next heartbeats say.
                rec.instance.state = InstanceState::Running;
                core.metrics.migrations_failed += 1;
                Err(e)
            }
        };
        let view = rec.instance.clone();
        core.put(rec, self)?;
        result.map(|()| view)
    }

    /// Stops instance `name`, drops its state on its node, and forgets it.
    pub async fn delete(&self, name: &str) -> Result<Instance, ApiError> {
        let (id, rx, node) = {
            let mut core = self.lock();
            let rec = core
                .instances
                .get(name)
                .cloned()
                .ok_or_else(|| ApiError::unknown_instance(name))?;
            if core.busy.contains(name) {
                return Err(ApiError::conflict(format!(
                    "'{name}' is being created, moved or deleted already: wait for that to end"
                )));
            }
            let node = rec.instance.node.clone();
            let ready = core
                .nodes
                .get(&node)
                .is_some_and(|n| n.rec.node.state == NodeState::Ready);
            if !ready {
                return Err(ApiError::conflict(format!(
                    "'{name}' is on {node}, which does not hold its lease: it may still run there; delete it once {node} reports again (or remove the node's VMs by hand)"
                )));
            }
            core.busy.insert(name.to_string());
            let (id, rx) = core.send(
                &node,
                CommandKind::Delete {
                    name: name.to_string(),
                },
            );
            (id, rx, node)
        };
        self.wake.notify_waiters();
        let outcome = self.wait(id, rx).await;
        let mut core = self.lock();
        core.busy.remove(name);
        match outcome {
            Ok(Outcome::Done { .. }) => {}
            Ok(Outcome::Failed { class, message }) => {
                return Err(ApiError::worker(&node, &class, &message))
            }
            Err(e) => return Err(e),
        }
        let mut rec = core
            .instances
            .remove(name)
            .ok_or_else(|| ApiError::unknown_instance(name))?;
        core.store.delete_instance(name).map_err(ApiError::store)?;
        rec.instance.state = InstanceState::Deleted;
        rec.instance.address = None;
        self.emit(ClusterEvent::Deleted {
            name: name.to_string(),
        });
        Ok(rec.instance)
    }

    /// Suspends instance `name` on its node into its saved package (its
    /// QEMU goes, its memory and disk are kept there) and waits until it
    /// is saved.
    pub async fn suspend(&self, name: &str) -> Result<Instance, ApiError> {
        let (id, rx) = {
            let mut core = self.lock();
            let rec = core.idle_on_ready_node(name, "suspended")?;
            if rec.instance.state != InstanceState::Running {
                return Err(ApiError::conflict(format!(
                    "'{name}' is {}, not running: only a running instance is suspended",
                    rec.instance.state
                )));
            }
            core.busy.insert(name.to_string());
            let node = rec.instance.node.clone();
            core.send(
                &node,
                CommandKind::Suspend {
                    name: name.to_string(),
                },
            )
        };
        self.wake.notify_waiters();
        let outcome = self.wait(id, rx).await;
        self.settle_op(name, outcome, |rec, _| {
            rec.instance.state = InstanceState::Suspended;
            rec.instance.reason = Some("suspended through the API".into());
            rec.instance.address = None;
            rec.instance.exposes = Vec::new();
        })
    }

    /// Resumes the suspended instance `name` from its saved package on its
    /// node and waits until it runs (and serves its next migration) again.
    pub async fn resume(&self, name: &str) -> Result<Instance, ApiError> {
        let (id, rx) = {
            let mut core = self.lock();
            let rec = core.idle_on_ready_node(name, "resumed")?;
            if rec.instance.state != InstanceState::Suspended {
                return Err(ApiError::conflict(format!(
                    "'{name}' is {}, not suspended: only a suspended instance is resumed",
                    rec.instance.state
                )));
            }
            let node = rec.instance.node.clone();
            core.room(&node, rec.instance.memory_mib)?;
            let kind = CommandKind::Resume {
                name: name.to_string(),
                token: instance_token(&rec.token)?,
            };
            core.busy.insert(name.to_string());
            core.send(&node, kind)
        };
        self.wake.notify_waiters();
        let outcome = self.wait(id, rx).await;
        self.settle_op(name, outcome, |rec, report| {
            rec.instance.state = InstanceState::Running;
            rec.instance.reason = None;
            rec.instance.address = report.address.clone();
            rec.instance.exposes = report.exposes.clone();
        })
    }

    /// Ends a suspend or a resume of `name`: on success `done` updates its
    /// record with the node's report; on failure the record stays as it
    /// was (the next heartbeats say where the VM is) and the caller gets
    /// the error.
    fn settle_op(
        &self,
        name: &str,
        outcome: Result<Outcome, ApiError>,
        done: impl FnOnce(&mut InstanceRecord, &Report),
    ) -> Result<Instance, ApiError> {
        let mut core = self.lock();
        core.busy.remove(name);
        let mut rec = core
            .instances
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::unknown_instance(name))?;
        match outcome {
            Ok(Outcome::Done { report, .. }) => {
                done(&mut rec, &report);
                let view = rec.instance.clone();
                core.put(rec, self)?;
                Ok(view)
            }
            Ok(Outcome::Failed { class, message }) => {
                Err(ApiError::worker(&rec.instance.node, &class, &message))
            }
            Err(e) => Err(e),
        }
    }

    async fn wait(&self, id: u64, rx: oneshot::Receiver<Outcome>) -> Result<Outcome, ApiError> {
        match tokio::time::timeout(self.op_timeout, rx).await {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(_)) => Err(ApiError::unavailable(
                "its node registered again (a restarted worker) before it answered: see the instance's state, then retry".into(),
            )),
            Err(_) => {
                self.lock().waiters.remove(&id);
                Err(ApiError::timeout(format!(
                    "no answer from its node within {} s: see the instance's state (GET /v1/instances/NAME), then retry",
                    self.op_timeout.as_secs()
                )))
            }
        }
    }

    /// A worker registers (or registers again).
    pub fn register(&self, r: Register) -> Result<String, ApiError> {
        if r.lease_s == 0 {
            return Err(ApiError::bad(
                "a lease of 0 s cannot be kept: use --lease-s 1 or more".into(),
            ));
        }
        let session = random_token();
        {
            let mut core = self.lock();
            if let Some(n) = core.nodes.get(&r.name) {
                let live = n.rec.node.state == NodeState::Ready
                    && n.last_seen.elapsed() < Duration::from_secs(n.rec.node.lease_s)
                    && n.session.is_some();
                if live && n.rec.worker_id != r.worker_id {
                    return Err(ApiError::conflict(format!(
                        "the node name '{}' is held by another live worker (at {}): give this worker another --name",
                        r.name, n.rec.node.address
                    )));
                }
            }
            let old = core.nodes.remove(&r.name);
            let mut entry = NodeEntry {
                rec: NodeRecord {
                    node: Node {
                        name: r.name.clone(),
                        address: r.address.clone(),
                        state: NodeState::Ready,
                        accel: r.accel.clone(),
                        cpus: r.cpus,
                        memory_mib: r.memory_mib,
                        free_mib: r.free_mib,
                        last_heartbeat_unix: now_unix(),
                        lease_s: r.lease_s,
                        instances: 0,
                    },
                    worker_id: r.worker_id.clone(),
                },
                session: Some(session.clone()),
                queue: VecDeque::new(),
                last_seen: Instant::now(),
                reported: HashMap::new(),
            };
            // Commands the old session never fetched are the new one's:
            // queued before this worker (re)registered (after a manager
            // restart, or while it restarted), they are still wanted.
            if let Some(old) = old {
                entry.queue = old.queue;
            }
            core.store.put_node(&entry.rec).map_err(ApiError::store)?;
            entry.rec.node.instances = core.count_on(&r.name);
            let view = entry.rec.node.clone();
            core.nodes.insert(r.name.clone(), entry);
            core.settle(&r.name, &r.instances, self);
            self.emit(ClusterEvent::Node { node: view });
        }
        tracing::info!(node = r.name, address = r.address, "worker registered");
        Ok(session)
    }

    /// A worker reports.
    pub fn heartbeat(&self, h: Heartbeat) -> Result<(), ApiError> {
        let mut core = self.lock();
        let name = core.node_of(&h.session)?;
        let entry = core.nodes.get_mut(&name).expect("found by session");
        entry.last_seen = Instant::now();
        entry.rec.node.last_heartbeat_unix = now_unix();
        entry.rec.node.free_mib = h.free_mib;
        if entry.rec.node.state == NodeState::Lost {
            entry.rec.node.state = NodeState::Ready;
            let rec = entry.rec.clone();
            core.store.put_node(&rec).map_err(ApiError::store)?;
            tracing::info!(node = name, "node reports again");
            self.emit(ClusterEvent::Node {
                node: core.node_view(core.nodes.get(&name).expect("there")),
            });
        }
        core.settle(&name, &h.instances, self);
        Ok(())
    }

    /// A worker's long poll: its queued commands, or none after `wait`.
    pub async fn commands(&self, session: &str, wait: Duration) -> Result<Vec<Command>, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.wake.notified();
            {
                let mut core = self.lock();
                let name = core.node_of(session)?;
                let entry = core.nodes.get_mut(&name).expect("found by session");
                entry.last_seen = Instant::now();
                if !entry.queue.is_empty() {
                    return Ok(entry.queue.drain(..).collect());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    /// A worker says what became of a command.
    pub fn result(&self, session: &str, id: u64, outcome: Outcome) -> Result<(), ApiError> {
        let mut core = self.lock();
        core.node_of(session)?;
        match core.waiters.remove(&id) {
            Some(w) => {
                let _ = w.send(outcome);
            }
            // Its caller gave up, or this manager restarted since: the
            // heartbeats settle the records.
            None => tracing::info!(id, "a result nobody waits for"),
        }
        Ok(())
    }

    /// Marks nodes that missed their lease, and their instances, lost.
    pub fn check_leases(&self) {
        let mut core = self.lock();
        let lost: Vec<String> = core
            .nodes
            .values()
            .filter(|n| {
                n.rec.node.state == NodeState::Ready
                    && n.last_seen.elapsed() > Duration::from_secs(n.rec.node.lease_s)
            })
            .map(|n| n.rec.node.name.clone())
            .collect();
        for name in lost {
            let entry = core.nodes.get_mut(&name).expect("listed");
            entry.rec.node.state = NodeState::Lost;
            let silent = entry.last_seen.elapsed().as_secs();
            let rec = entry.rec.clone();
            if let Err(e) = core.store.put_node(&rec) {
                tracing::warn!(error = %e, "cannot record a lost node");
            }
            tracing::warn!(node = name, silent_s = silent, "node missed its lease");
            self.emit(ClusterEvent::Node {
                node: core.node_view(core.nodes.get(&name).expect("there")),
            });
            let on_it: Vec<InstanceRecord> = core
                .instances
                .values()
                .filter(|i| i.instance.node == name)
                .filter(|i| {
                    matches!(
                        i.instance.state,
                        InstanceState::Running | InstanceState::Starting | InstanceState::Suspended
                    )
                })
                .cloned()
                .collect();
            for mut rec in on_it {
                rec.instance.state = InstanceState::Lost;
                rec.instance.reason = Some(format!(
                    "its node {name} missed its lease (silent for {silent} s); the VM may still run there"
                ));
                if let Err(e) = core.put(rec, self) {
                    tracing::warn!(error = %e.detail, "cannot record a lost instance");
                }
            }
        }
    }
}

impl Core {
    /// Instance `name`, if no other operation on it runs and its node holds
    /// its lease (`what`: what the caller is about to do with it).
    fn idle_on_ready_node(&self, name: &str, what: &str) -> Result<InstanceRecord, ApiError> {
        let rec = self
            .instances
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::unknown_instance(name))?;
        if self.busy.contains(name) || rec.instance.state == InstanceState::Migrating {
            return Err(ApiError::conflict(format!(
                "'{name}' is being created, moved, suspended, resumed or deleted already: wait for that to end"
            )));
        }
        let node = &rec.instance.node;
        let ready = self
            .nodes
            .get(node)
            .is_some_and(|n| n.rec.node.state == NodeState::Ready);
        if !ready {
            return Err(ApiError::conflict(format!(
                "'{name}' is on {node}, which does not hold its lease: it cannot be {what} until {node} reports again"
            )));
        }
        Ok(rec)
    }

    fn node_view(&self, n: &NodeEntry) -> Node {
        let mut node = n.rec.node.clone();
        node.instances = self.count_on(&node.name);
        node
    }

    fn count_on(&self, node: &str) -> usize {
        self.instances
            .values()
            .filter(|i| i.instance.node == node)
            .count()
    }

    fn node_of(&self, session: &str) -> Result<String, ApiError> {
        self.nodes
            .values()
            .find(|n| n.session.as_deref() == Some(session))
            .map(|n| n.rec.node.name.clone())
            .ok_or_else(ApiError::unknown_session)
    }

    /// The node for a new instance of `memory_mib`: `asked`, if it has
    /// room, else the ready node with the most free memory that fits.
    fn place(&self, asked: Option<&str>, memory_mib: u64) -> Result<String, ApiError> {
        if let Some(n) = asked {
            self.room(n, memory_mib)?;
            return Ok(n.to_string());
        }
        let best = self
            .nodes
            .values()
            .filter(|n| n.rec.node.state == NodeState::Ready)
            .map(|n| (self.free_of(&n.rec.node.name), n.rec.node.name.clone()))
            .max();
        match best {
            Some((free, name)) if free >= memory_mib + ENGINE_OVERHEAD_MIB => Ok(name),
            Some((free, _)) => Err(ApiError::no_room(None, memory_mib, free)),
            None => Err(ApiError::conflict(
                "no node is ready: start a worker ('ferry worker --name N --control-plane HOST:1399')".into(),
            )),
        }
    }

    /// Fails unless node `n` is ready and has room for `memory_mib` more.
    fn room(&self, n: &str, memory_mib: u64) -> Result<(), ApiError> {
        let entry = self.nodes.get(n).ok_or_else(|| ApiError::unknown_node(n))?;
        if entry.rec.node.state != NodeState::Ready {
            return Err(ApiError::conflict(format!(
                "node {n} does not hold its lease (last heard {} s ago): choose another node",
                entry.last_seen.elapsed().as_secs()
            )));
        }
        let free = self.free_of(n);
        if free < memory_mib + ENGINE_OVERHEAD_MIB {
            return Err(ApiError::no_room(Some(n), memory_mib, free));
        }
        Ok(())
    }

    /// Free memory on node `n`: what it reported, less what is on its way
    /// there and not in its reports yet.
    fn free_of(&self, n: &str) -> u64 {
        let Some(entry) = self.nodes.get(n) else {
            return 0;
        };
        let coming: u64 = self
            .instances
            .values()
            .filter(|i| {
                (i.instance.node == n && i.instance.state == InstanceState::Starting)
                    || (i.instance.state == InstanceState::Migrating
                        && i.instance.moves.last().is_some_and(|m| m.to == n))
            })
            .map(|i| i.instance.memory_mib + ENGINE_OVERHEAD_MIB)
            .sum();
        entry.rec.node.free_mib.saturating_sub(coming)
    }

    /// Queues a command for `node`; the receiver gets its outcome.
    fn send(&mut self, node: &str, kind: CommandKind) -> (u64, oneshot::Receiver<Outcome>) {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(id, tx);
        self.nodes
            .get_mut(node)
            .expect("checked by the caller")
            .queue
            .push_back(Command { id, kind });
        (id, rx)
    }

    /// Stores an instance record and tells watchers.
    fn put(&mut self, rec: InstanceRecord, shared: &Shared) -> Result<(), ApiError> {
        self.store.put_instance(&rec).map_err(ApiError::store)?;
        shared.emit(ClusterEvent::Instance {
            instance: rec.instance.clone(),
        });
        self.instances.insert(rec.instance.name.clone(), rec);
        Ok(())
    }

    /// Settles the records of instances on `node` (or reported by it) on
    /// what it reports. Instances with an operation in flight in this
    /// process are left to that operation. A move this process did not see
    /// end (it restarted meanwhile) is decided by where the VM turns up:
    /// running at its destination, it moved; still running at its source
    /// while the destination reports nothing of it, it did not. A
    /// destination reports a VM it is still receiving as `starting`, and a
    /// source stops reporting a VM the moment it has handed it on.
    fn settle(&mut self, node: &str, reports: &[Report], shared: &Shared) {
        if let Some(entry) = self.nodes.get_mut(node) {
            entry.reported = reports
                .iter()
                .map(|r| (r.name.clone(), r.state.clone()))
                .collect();
        }
        let mut changed = Vec::new();
        for r in reports {
            if self.busy.contains(&r.name) {
                continue;
            }
            let Some(rec) = self.instances.get(&r.name) else {
                tracing::debug!(node, vm = r.name, "a VM this manager does not manage");
                continue;
            };
            let mut rec = rec.clone();
            let before = rec.instance.clone();
            let open_move = rec
                .instance
                .moves
                .last()
                .filter(|m| m.ok.is_none() && rec.instance.state == InstanceState::Migrating)
                .cloned();
            let here = rec.instance.node == node;
            match r.state.as_str() {
                "running" => {
                    if let Some(m) = &open_move {
                        if m.to == node {
                            self.end_move(&mut rec, true, None);
                        } else if here {
                            // Still at its source: the move failed, unless
                            // its destination is still receiving it (or has
                            // not reported since this manager started).
                            match self.state_on(&m.to, &r.name) {
                                Some("starting") | Some("running") | None => continue,
                                Some(_) => {
                                    self.end_move(
                                        &mut rec,
                                        false,
                                        Some(
                                            "the manager restarted during the move; it stayed"
                                                .into(),
                                        ),
                                    );
                                    rec.pending_token = None;
                                }
                            }
                        } else {
                            continue;
                        }
                    } else if !here {
                        // Both ends of a move that ended report it for a
                        // moment (the source's last heartbeat may have been
                        // taken before the switch): the record's node keeps
                        // it until it stops saying so.
                        if matches!(
                            self.state_on(&rec.instance.node.clone(), &r.name),
                            Some("running") | Some("starting")
                        ) {
                            continue;
                        }
                    }
                    if rec.instance.node != node {
                        // It moved (a move this process did not see end):
                        // it serves with that move's fresh credential.
                        if let Some(t) = rec.pending_token.take() {
                            rec.token = t;
                        }
                    }
                    rec.instance.node = node.to_string();
                    rec.instance.state = InstanceState::Running;
                    rec.instance.reason = None;
                    rec.instance.address = r.address.clone();
                    rec.instance.exposes = r.exposes.clone();
                }
                "suspended" | "stopped" if here && open_move.is_none() => {
                    // A suspend through the API keeps its reason.
                    if rec.instance.state != InstanceState::Suspended || r.note.is_some() {
                        rec.instance.reason = r.note.clone();
                    }
                    rec.instance.state = InstanceState::Suspended;
                    rec.instance.address = None;
                    rec.instance.exposes = Vec::new();
                }
                "crashed" if here && open_move.is_none() => {
                    rec.instance.state = InstanceState::Failed;
                    rec.instance.reason = Some(format!(
                        "its VM crashed on {node}: {}",
                        r.note.as_deref().unwrap_or("no note")
                    ));
                    rec.instance.address = None;
                }
                _ => {}
            }
            // An error its node saw in the guest that the record does not
            // have yet (a restarted manager has it in its store, so it is
            // told once).
            let new_error = r
                .last_error
                .as_ref()
                .filter(|e| {
                    rec.instance.node == node && rec.instance.last_error.as_ref() != Some(*e)
                })
                .cloned();
            if let Some(e) = &new_error {
                rec.instance.last_error = Some(e.clone());
            }
            if rec.instance != before {
                changed.push((rec, new_error));
            }
        }
        // Recorded here, running, and not reported: gone.
        for rec in self.instances.values() {
            if rec.instance.node != node
                || self.busy.contains(&rec.instance.name)
                || reports.iter().any(|r| r.name == rec.instance.name)
                || !matches!(
                    rec.instance.state,
                    InstanceState::Running
                        | InstanceState::Lost
                        | InstanceState::Suspended
                        | InstanceState::Starting
                )
            {
                continue;
            }
            let mut rec = rec.clone();
            rec.instance.state = InstanceState::Failed;
            rec.instance.reason = Some(format!(
                "its VM is no longer on {node} (stopped outside the control plane, or its state was removed)"
            ));
            rec.instance.address = None;
            changed.push((rec, None));
        }
        for (rec, new_error) in changed {
            let (name, node) = (rec.instance.name.clone(), rec.instance.node.clone());
            if let Err(e) = self.put(rec, shared) {
                tracing::warn!(error = %e.detail, "cannot record an instance");
                continue;
            }
            if let Some(error) = new_error {
                tracing::info!(vm = name, node, what = error.what, "guest error");
                shared.emit(ClusterEvent::GuestError { name, node, error });
            }
        }
    }

    /// What `node` last said of VM `name`: its state, `"absent"` if it
    /// did not list it, or `None` if it has not reported to this manager
    /// process yet.
    fn state_on(&self, node: &str, name: &str) -> Option<&str> {
        let entry = self.nodes.get(node)?;
        entry.session.as_ref()?;
        Some(
            entry
                .reported
                .get(name)
                .map(String::as_str)
                .unwrap_or("absent"),
        )
    }

    /// Closes the open move of `rec`.
    fn end_move(&mut self, rec: &mut InstanceRecord, ok: bool, error: Option<String>) {
        if let Some(m) = rec.instance.moves.last_mut() {
            m.ended_unix_ms = Some(now_unix_ms());
            m.ok = Some(ok);
            m.error = error;
        }
        if ok {
            self.metrics.migrations_ok += 1;
        } else {
            self.metrics.migrations_failed += 1;
        }
    }
}

/// An instance's stored credential as a token.
fn instance_token(t: &str) -> Result<ferry_transport::Token, ApiError> {
    ferry_transport::Token::new(t).map_err(|e| {
        ApiError::conflict(format!(
            "the instance's stored credential is not usable ({e}): delete and create it again"
        ))
    })
}

/// A random credential: 32 hex characters.
pub fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GuestError;

    fn report(error: Option<GuestError>) -> Report {
        Report {
            name: "kv".into(),
            state: "running".into(),
            address: Some("10.0.0.1:1500".into()),
            exposes: Vec::new(),
            memory_mib: Some(256),
            note: None,
            last_error: error,
        }
    }

    fn error(unix_ms: u64, what: &str) -> GuestError {
        GuestError {
            unix_ms,
            kind: "service-exited".into(),
            what: what.into(),
        }
    }

    fn guest_errors(rx: &mut broadcast::Receiver<ClusterEvent>) -> Vec<(String, String, u64)> {
        let mut found = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            if let ClusterEvent::GuestError { name, node, error } = ev {
                found.push((name, node, error.unix_ms));
            }
        }
        found
    }

    /// A store holding instance `kv`, running on node-1 (at `address`).
    fn store_kv_on_node_1(dir: &std::path::Path, address: Option<&str>) {
        Store::open(dir)
            .unwrap()
            .put_instance(&InstanceRecord {
                instance: Instance {
                    name: "kv".into(),
                    source: "http://r/".into(),
                    node: "node-1".into(),
                    state: InstanceState::Running,
                    reason: None,
                    address: address.map(String::from),
                    exposes: Vec::new(),
                    memory_mib: 256,
                    moves: Vec::new(),
                    created_unix: 1,
                    last_error: None,
                },
                token: "t".repeat(32),
                pending_token: None,
                expose: Vec::new(),
            })
            .unwrap();
    }

    /// A manager's state loaded from the store in `dir`.
    fn load(dir: &std::path::Path) -> Arc<Shared> {
        Shared::load(Store::open(dir).unwrap(), Duration::from_secs(5), None).unwrap()
    }

    /// A guest error is told once, when a worker first reports it; the
    /// instance keeps it, also across a manager restart.
    #[test]
    fn a_new_guest_error_is_recorded_and_told_once() {
        let dir = tempfile::tempdir().unwrap();
        store_kv_on_node_1(dir.path(), None);
        let shared = load(dir.path());
        let mut rx = shared.events.subscribe();
        let session = register_node(&shared, "node-1", vec![report(None)]);
        assert!(guest_errors(&mut rx).is_empty());

        let beat = |e: Option<GuestError>| {
            shared
                .heartbeat(Heartbeat {
                    session: session.clone(),
                    free_mib: 512,
                    instances: vec![report(e)],
                })
                .unwrap()
        };
        beat(Some(error(10, "service exited with code 137")));
        assert_eq!(
            guest_errors(&mut rx),
            vec![("kv".into(), "node-1".into(), 10)]
        );
        assert_eq!(
            shared.instance("kv").unwrap().last_error,
            Some(error(10, "service exited with code 137"))
        );
        // The same error again, or none: nothing new.
        beat(Some(error(10, "service exited with code 137")));
        beat(None);
        assert!(guest_errors(&mut rx).is_empty());
        assert_eq!(
            shared.instance("kv").unwrap().last_error.unwrap().unix_ms,
            10
        );
        beat(Some(error(20, "service exited with code 1")));
        assert_eq!(
            guest_errors(&mut rx),
            vec![("kv".into(), "node-1".into(), 20)]
        );
        drop(shared);

        // A restarted manager knows it already.
        let shared = load(dir.path());
        let mut rx = shared.events.subscribe();
        register_node(
            &shared,
            "node-1",
            vec![report(Some(error(20, "service exited with code 1")))],
        );
        assert!(guest_errors(&mut rx).is_empty());
        assert_eq!(
            shared.instance("kv").unwrap().last_error.unwrap().unix_ms,
            20
        );
    }

    fn register_node(shared: &Shared, node: &str, instances: Vec<Report>) -> String {
        shared
            .register(Register {
                name: node.into(),
                worker_id: format!("w-{node}"),
                address: "10.0.0.1".into(),
                accel: "tcg".into(),
                cpus: 2,
                memory_mib: 4096,
                free_mib: 2048,
                lease_s: 10,
                instances,
            })
            .unwrap()
    }

    fn kv_on(state: &str) -> Report {
        Report {
            state: state.into(),
            ..report(None)
        }
    }

    /// A heartbeat the source took before the switch and the manager got
    /// after the move ended must not take the instance back: a delete then
    /// went to the source, found nothing there, and left the moved VM
    /// running unmanaged (tests/operator.rs failed so in CI).
    #[test]
    fn a_stale_heartbeat_from_a_moves_source_does_not_take_the_instance_back() {
        let dir = tempfile::tempdir().unwrap();
        store_kv_on_node_1(dir.path(), Some("10.0.0.1:1500"));
        let shared = load(dir.path());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let s1 = register_node(&shared, "node-1", vec![kv_on("running")]);
        let s2 = register_node(&shared, "node-2", Vec::new());
        let beat = |session: &str, instances: Vec<Report>| {
            shared
                .heartbeat(Heartbeat {
                    session: session.into(),
                    free_mib: 2048,
                    instances,
                })
                .unwrap()
        };
        let node = || shared.instance("kv").unwrap().node;

        let moving = rt.spawn({
            let shared = shared.clone();
            async move { shared.migrate("kv", "node-2").await }
        });
        let cmds = rt
            .block_on(shared.commands(&s2, Duration::from_secs(5)))
            .unwrap();
        assert!(matches!(cmds[0].kind, CommandKind::Receive { .. }));
        // The destination reports it while receiving it, then says done.
        beat(&s2, vec![kv_on("starting")]);
        shared
            .result(
                &s2,
                cmds[0].id,
                Outcome::Done {
                    report: kv_on("running"),
                    downtime_ms: Some(5),
                },
            )
            .unwrap();
        rt.block_on(moving).unwrap().unwrap();
        assert_eq!(node(), "node-2");

        // The source's heartbeat from before the switch arrives late.
        beat(&s1, vec![kv_on("running")]);
        assert_eq!(node(), "node-2", "a stale report took it back");
        assert_eq!(shared.instance("kv").unwrap().state, InstanceState::Running);
        // Then both say where it is.
        beat(&s2, vec![kv_on("running")]);
        beat(&s1, Vec::new());
        assert_eq!(node(), "node-2");

        // Where the record's node no longer has it and another node runs
        // it, the record follows the VM.
        beat(&s2, Vec::new());
        beat(&s1, vec![kv_on("running")]);
        assert_eq!(node(), "node-1");
    }

    /// Older workers send no `last_error`; older managers ignore it.
    #[test]
    fn reports_without_last_error_still_parse() {
        let old = r#"{"name":"kv","state":"running","exposes":[],"memory_mib":256}"#;
        let r: Report = serde_json::from_str(old).unwrap();
        assert_eq!(r.last_error, None);
        let json = serde_json::to_value(report(None)).unwrap();
        assert!(json.get("last_error").is_none(), "{json}");
        let json = serde_json::to_value(report(Some(error(1, "x")))).unwrap();
        assert_eq!(json["last_error"]["kind"], "service-exited");
        // The runtime's kinds keep their names.
        use ferry_runtime::guest_errors as rt;
        let e = GuestError::from(rt::GuestError::now(rt::GuestErrorKind::Oom, "oom"));
        assert_eq!(e.kind, "oom");
        let e = GuestError::from(rt::GuestError::now(rt::GuestErrorKind::ServiceExited, "x"));
        assert_eq!(e.kind, "service-exited");
    }
}
