//! The controller: one idempotent [`reconcile`] of an [`Instance`] against
//! what `ferry manager` reports, with one finalizer.
//!
//! Each reconcile reads the VM's record from the manager and takes at most
//! one step towards the spec: create it on `spec.nodeName`, move it there,
//! or (the object being deleted) delete it; then it writes the whole
//! status by server-side apply. Running it twice in a row takes no second
//! step: the second run finds the step taken. The manager refuses a
//! second operation on a VM while one runs (409), and kube-rs never runs
//! two reconciles of one object at once, so there are never two moves at
//! once; an edit while a move runs is acted on when it ends. A restarted
//! operator finds a move or a create that its last life started in the
//! manager's record (`migrating`, `starting`) and waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_control::api::{self, CreateInstance, InstanceState};
use futures_util::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::crd::{Condition, Instance, InstanceStatus, MoveRecord, State};
use crate::events::Triggers;
use crate::manager::{Manager, ManagerError};
use crate::metrics::{ErrorKind, Metrics, Step};

/// The finalizer that keeps an Instance until its VM is deleted.
pub const FINALIZER: &str = "ferry.dev/vm";
/// The field manager of the status the operator applies.
pub const FIELD_MANAGER: &str = "ferry-operator";

/// How often a settled Instance is compared with the manager again. The
/// manager's events (`crate::events`) trigger reconciles as things
/// happen; this is the safety net for an event that was missed.
const RESYNC: Duration = Duration::from_secs(300);
/// How often one in flight (a create or a move started elsewhere) is: its
/// end comes as an event too.
const IN_FLIGHT: Duration = Duration::from_secs(10);
/// How many times in a row a failed VM is recreated before the operator
/// gives up (and says so).
pub const MAX_RECREATIONS: u32 = 5;
/// The wait before the first recreation; it doubles with each one.
const RECREATE_BACKOFF: Duration = Duration::from_secs(5);
/// A VM that ran this long since its last recreation starts the count
/// over.
const RECREATE_FORGET: Duration = Duration::from_secs(600);

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The manager's API.
    pub manager: Manager,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Failures in a row per object, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context for one controller.
    pub fn new(client: Client, manager: Manager, identity: &str, metrics: Arc<Metrics>) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.to_string()),
            },
        );
        Context {
            client,
            manager,
            recorder,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }
}

/// A reconcile failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The manager could not be reached or failed.
    #[error("the manager: {0}")]
    Manager(#[from] ManagerError),
    /// The Kubernetes API failed.
    #[error("the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The manager is busy with this VM (a create, move or delete runs).
    #[error("{0}")]
    Busy(String),
    /// Adding or removing the finalizer, or a step inside it, failed.
    #[error(transparent)]
    Finalizer(Box<kube::runtime::finalizer::Error<ReconcileError>>),
}

impl ReconcileError {
    fn kind(&self) -> ErrorKind {
        match self {
            ReconcileError::Manager(_) => ErrorKind::Manager,
            ReconcileError::Kube(_) => ErrorKind::Kube,
            ReconcileError::Busy(_) => ErrorKind::Other,
            ReconcileError::Finalizer(e) => match &**e {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.kind(),
                _ => ErrorKind::Kube,
            },
        }
    }
}

/// The manager's name for an Instance's VM: `NAMESPACE.NAME` (a namespace
/// has no dots, so no two Instances share one).
pub fn vm_name(inst: &Instance) -> String {
    format!(
        "{}.{}",
        inst.namespace().unwrap_or_else(|| "default".into()),
        inst.name_any()
    )
}

fn key(inst: &Instance) -> String {
    format!(
        "{}/{}",
        inst.namespace().unwrap_or_default(),
        inst.name_any()
    )
}

/// Reconciles one Instance. Idempotent: see the module's doc.
pub async fn reconcile(inst: Arc<Instance>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    ctx.metrics.reconciled();
    let ns = inst.namespace().unwrap_or_else(|| "default".into());
    let api: Api<Instance> = Api::namespaced(ctx.client.clone(), &ns);
    let k = key(&inst);
    let action = finalizer(&api, FINALIZER, inst, |event| async {
        match event {
            Finalizer::Apply(i) => apply(&i, &api, &ctx).await,
            Finalizer::Cleanup(i) => cleanup(&i, &api, &ctx).await,
        }
    })
    .await
    .map_err(|e| ReconcileError::Finalizer(Box::new(e)))?;
    ctx.failures.lock().expect("not poisoned").remove(&k);
    Ok(action)
}

/// Requeues a failed reconcile after 1 s, 2 s, 4 s ... up to 60 s.
pub fn error_policy(inst: Arc<Instance>, err: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(err.kind());
    let n = {
        let mut f = ctx.failures.lock().expect("not poisoned");
        let n = f.entry(key(&inst)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay =
        Duration::from_secs(1u64 << n.min(6).saturating_sub(1)).min(Duration::from_secs(60));
    match err {
        ReconcileError::Busy(e) => tracing::info!(instance = %key(&inst), "{e}"),
        e => {
            tracing::warn!(instance = %key(&inst), error = %e, retry_in = ?delay, "reconcile failed")
        }
    }
    Action::requeue(delay)
}

/// The status being built: starts from the object's, so that conditions
/// keep their transition times.
struct Status {
    old: InstanceStatus,
    new: InstanceStatus,
    generation: Option<i64>,
}

impl Status {
    fn of(inst: &Instance) -> Status {
        let old = inst.status.clone().unwrap_or_default();
        let mut new = old.clone();
        new.observed_generation = inst.metadata.generation;
        new.instance_name = Some(vm_name(inst));
        Status {
            old,
            new,
            generation: inst.metadata.generation,
        }
    }

    fn set(&mut self, type_: &str, on: bool, reason: &str, message: impl Into<String>) {
        let status = if on { "True" } else { "False" };
        let since = self
            .old
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(now);
        let c = Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: message.into(),
            last_transition_time: since,
            observed_generation: self.generation,
        };
        match self.new.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(old) => *old = c,
            None => self.new.conditions.push(c),
        }
    }

    fn state(&mut self, s: State) {
        self.new.state = Some(s);
    }

    /// Takes where the VM is from the manager's record.
    fn observe(&mut self, vm: &api::Instance) {
        self.new.node_name = Some(vm.node.clone());
        self.new.package_laddr = vm.address.clone();
        self.new.exposes = vm.exposes.clone();
        self.new.moves = vm.moves.iter().map(move_record).collect();
    }

    fn ok(&mut self) {
        self.set("Degraded", false, "AsExpected", "");
    }

    fn condition_changed(&self, type_: &str) -> bool {
        let find = |s: &InstanceStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == type_)
                .map(|c| (c.status.clone(), c.reason.clone()))
        };
        find(&self.old) != find(&self.new)
    }

    async fn write(&self, api: &Api<Instance>, inst: &Instance) -> Result<(), kube::Error> {
        let patch = json!({
            "apiVersion": "ferry.dev/v1alpha1",
            "kind": "Instance",
            "status": self.new,
        });
        api.patch_status(
            &inst.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        Ok(())
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn time_of(ms: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn move_record(m: &api::Move) -> MoveRecord {
    MoveRecord {
        from: m.from.clone(),
        to: m.to.clone(),
        phase: match m.ok {
            None => "Running",
            Some(true) => "Succeeded",
            Some(false) => "Failed",
        }
        .into(),
        start_time: time_of(m.started_unix_ms),
        end_time: m.ended_unix_ms.map(time_of),
        downtime_ms: m.downtime_ms,
        error: m.error.clone(),
    }
}

async fn event(ctx: &Context, inst: &Instance, warning: bool, reason: &str, note: String) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &inst.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "publishing an event");
    }
}

/// Records that the manager could not be reached (or failed), keeping the
/// rest of the status, and returns the error for the backoff.
async fn degraded(
    st: &mut Status,
    api: &Api<Instance>,
    inst: &Instance,
    ctx: &Context,
    e: ManagerError,
) -> ReconcileError {
    let reason = match e {
        ManagerError::Unreachable(_) => "ManagerUnreachable",
        ManagerError::Api { .. } => "ManagerError",
    };
    st.set("Degraded", true, reason, e.to_string());
    if st.new.state.is_none() {
        st.state(State::Pending);
    }
    if st.condition_changed("Degraded") {
        event(ctx, inst, true, reason, e.to_string()).await;
    }
    if let Err(k) = st.write(api, inst).await {
        return k.into();
    }
    e.into()
}

/// Whether the manager knows a node of that name (or the error).
async fn node_known(ctx: &Context, node: &str) -> Result<Result<(), String>, ManagerError> {
    let nodes = ctx.manager.nodes().await?;
    if nodes.iter().any(|n| n.name == node) {
        return Ok(Ok(()));
    }
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    Ok(Err(format!(
        "no worker is named '{node}' (the manager knows: {}); set spec.nodeName to one of them",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )))
}

async fn apply(
    inst: &Instance,
    api: &Api<Instance>,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let name = vm_name(inst);
    let want = inst.spec.node_name.clone();
    let mut st = Status::of(inst);
    if let Err(e) = ferry_control_name_ok(&name) {
        st.state(State::Failed);
        st.set("Ready", false, "InvalidName", e.clone());
        st.set("Degraded", true, "InvalidName", e);
        st.write(api, inst).await?;
        return Ok(Action::await_change());
    }
    let vm = match ctx.manager.instance(&name).await {
        Ok(vm) => vm.filter(|v| v.state != InstanceState::Deleted),
        Err(e) => return Err(degraded(&mut st, api, inst, ctx, e).await),
    };
    let Some(vm) = vm else {
        if st.old.package_laddr.is_some() {
            // It ran once, and the manager has no VM for it any more
            // (deleted behind the operator's back): create it again.
            event(
                ctx,
                inst,
                true,
                "Recreating",
                format!(
                    "the manager has no VM {name} any more; creating it again on {} from {}",
                    inst.spec.node_name, inst.spec.package_raddr
                ),
            )
            .await;
        }
        return create(inst, api, ctx, st, name).await;
    };
    st.observe(&vm);
    st.ok();
    let action = match vm.state {
        InstanceState::Pending | InstanceState::Starting => {
            st.state(State::Starting);
            st.set(
                "Ready",
                false,
                "Starting",
                format!("starting on {}", vm.node),
            );
            Action::requeue(IN_FLIGHT)
        }
        InstanceState::Migrating => {
            st.state(State::Migrating);
            let to = vm.moves.last().map(|m| m.to.clone()).unwrap_or_default();
            let mut msg = format!("moving from {} to {to}", vm.node);
            if to != want {
                msg.push_str(&format!(
                    "; the move to {want} (spec.nodeName) waits until this one ends"
                ));
            }
            st.set("Migrating", true, "Moving", msg);
            Action::requeue(IN_FLIGHT)
        }
        InstanceState::Running if vm.node != want => {
            return migrate(inst, api, ctx, st, vm, want).await;
        }
        InstanceState::Running => {
            st.state(State::Running);
            let mut msg = format!(
                "running on {} at {}",
                vm.node,
                vm.address.as_deref().unwrap_or("?")
            );
            if let Some(m) = inst.spec.memory.filter(|m| *m != vm.memory_mib) {
                msg.push_str(&format!(
                    "; its package gives it {} MiB, not the {m} MiB of spec.memory",
                    vm.memory_mib
                ));
            }
            st.set("Ready", true, "Running", msg);
            let settled = st
                .new
                .last_recreate_time
                .as_deref()
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                .is_none_or(|t| {
                    k8s_openapi::jiff::Timestamp::now()
                        .duration_since(t)
                        .as_secs()
                        >= RECREATE_FORGET.as_secs() as i64
                });
            if settled {
                st.new.recreations = None;
                st.new.last_recreate_time = None;
            }
            if st.old.conditions.iter().any(|c| c.type_ == "Migrating") {
                let last = vm.moves.last();
                let (reason, msg) = match last {
                    Some(m) if m.ok == Some(false) => (
                        "MigrationFailed",
                        format!(
                            "the move to {} failed: {}",
                            m.to,
                            m.error.as_deref().unwrap_or("?")
                        ),
                    ),
                    _ => ("Moved", format!("on {}", vm.node)),
                };
                st.set("Migrating", false, reason, msg);
            }
            Action::requeue(RESYNC)
        }
        InstanceState::Failed => {
            return recreate(inst, api, ctx, st, vm).await;
        }
        InstanceState::Suspended => {
            st.state(State::Failed);
            let why = vm
                .reason
                .clone()
                .unwrap_or_else(|| format!("it is {}", vm.state));
            st.set("Ready", false, "Failed", why.clone());
            st.set("Degraded", true, "VmFailed", why.clone());
            if st.condition_changed("Ready") {
                event(ctx, inst, true, "Failed", why).await;
            }
            Action::requeue(RESYNC)
        }
        InstanceState::Lost => {
            st.state(State::Lost);
            let why = vm
                .reason
                .clone()
                .unwrap_or_else(|| format!("{} stopped reporting", vm.node));
            st.set("Ready", false, "NodeLost", why.clone());
            st.set("Degraded", true, "NodeLost", why.clone());
            if st.condition_changed("Ready") {
                event(ctx, inst, true, "NodeLost", why).await;
            }
            Action::requeue(IN_FLIGHT)
        }
        InstanceState::Deleted => unreachable!("filtered above"),
    };
    st.write(api, inst).await?;
    Ok(action)
}

/// What to do with a failed VM, recreated `done` times in a row so far,
/// the last time `since_last_s` ago.
#[derive(Debug, PartialEq, Eq)]
enum Recreate {
    /// Recreate it now.
    Now,
    /// Wait this many seconds more.
    Wait(u64),
    /// Give up: it failed after [`MAX_RECREATIONS`] recreations.
    GiveUp,
}

/// At once the first time; then 10 s, 20 s, 40 s, 80 s after the last
/// recreation; never more than [`MAX_RECREATIONS`] in a row.
fn recreate_step(done: u32, since_last_s: Option<u64>) -> Recreate {
    if done >= MAX_RECREATIONS {
        return Recreate::GiveUp;
    }
    let wait = (RECREATE_BACKOFF * (1u32 << done.min(10))).as_secs();
    match since_last_s {
        Some(s) if done > 0 && s < wait => Recreate::Wait(wait - s),
        _ => Recreate::Now,
    }
}

/// A VM the manager reports `failed` (it could not start, it crashed, or
/// it vanished from its node) is recreated on `spec.nodeName` from
/// `spec.packageRaddr`: its failed record is deleted, then it is created
/// as new. At most [`MAX_RECREATIONS`] times in a row, with backoff
/// ([`recreate_step`]; `status.recreations`, `status.lastRecreateTime`:
/// kept across operator restarts); then it stays `Failed` and the
/// Degraded condition says to delete the Instance and apply it again. A
/// `lost` VM is never recreated: it may still run on its node.
async fn recreate(
    inst: &Instance,
    api: &Api<Instance>,
    ctx: &Context,
    mut st: Status,
    vm: api::Instance,
) -> Result<Action, ReconcileError> {
    let name = vm.name.clone();
    let why = vm
        .reason
        .clone()
        .unwrap_or_else(|| format!("it is {}", vm.state));
    st.observe(&vm);
    st.state(State::Failed);
    st.set("Ready", false, "Failed", why.clone());
    let done = st.new.recreations.unwrap_or(0);
    let since = st
        .new
        .last_recreate_time
        .as_deref()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| {
            k8s_openapi::jiff::Timestamp::now()
                .duration_since(t)
                .as_secs()
                .max(0) as u64
        });
    let step = recreate_step(done, since);
    if step == Recreate::GiveUp {
        let msg = format!(
            "{why}; recreated {done} times and it failed again: the operator gave up. Look at node {} and the package, then delete the Instance and apply it again",
            vm.node
        );
        st.set("Degraded", true, "RecreateLimit", msg.clone());
        if st.condition_changed("Degraded") {
            event(ctx, inst, true, "RecreateLimit", msg).await;
        }
        st.write(api, inst).await?;
        return Ok(Action::requeue(RESYNC));
    }
    if let Recreate::Wait(left) = step {
        let msg = format!(
            "{why}; recreating it in {left} s (try {} of {MAX_RECREATIONS})",
            done + 1
        );
        st.set("Degraded", true, "VmFailed", msg);
        if st.condition_changed("Ready") {
            event(ctx, inst, true, "Failed", why).await;
        }
        st.write(api, inst).await?;
        return Ok(Action::requeue(Duration::from_secs(left)));
    }
    let node = inst.spec.node_name.clone();
    let msg = format!(
        "{why}; recreating it on {node} from {} (try {} of {MAX_RECREATIONS})",
        inst.spec.package_raddr,
        done + 1
    );
    st.set("Degraded", true, "VmFailed", msg.clone());
    st.set("Ready", false, "Recreating", msg.clone());
    st.new.recreations = Some(done + 1);
    st.new.last_recreate_time = Some(now());
    st.write(api, inst).await?;
    event(ctx, inst, true, "Recreating", msg).await;
    match ctx.manager.delete(&name).await {
        Ok(_) => {}
        Err(ManagerError::Api {
            status: 409,
            detail,
        }) => return Err(ReconcileError::Busy(detail)),
        Err(e) => return Err(degraded(&mut st, api, inst, ctx, e).await),
    }
    ctx.metrics.step(Step::Recreated);
    // The status as written: `create` builds on it.
    let mut next = inst.clone();
    next.status = Some(st.new.clone());
    let st = Status::of(&next);
    create(&next, api, ctx, st, name).await
}

fn ferry_control_name_ok(name: &str) -> Result<(), String> {
    let ok = name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the VM would be named '{name}': NAMESPACE.NAME must be at most 63 characters"
        ))
    }
}

async fn create(
    inst: &Instance,
    api: &Api<Instance>,
    ctx: &Context,
    mut st: Status,
    name: String,
) -> Result<Action, ReconcileError> {
    let node = inst.spec.node_name.clone();
    match node_known(ctx, &node).await {
        Err(e) => return Err(degraded(&mut st, api, inst, ctx, e).await),
        Ok(Err(why)) => {
            st.state(State::Pending);
            st.set("Ready", false, "UnknownNode", why.clone());
            st.set("Degraded", true, "UnknownNode", why.clone());
            if st.condition_changed("Degraded") {
                event(ctx, inst, true, "UnknownNode", why).await;
            }
            st.write(api, inst).await?;
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
        Ok(Ok(())) => {}
    }
    st.state(State::Starting);
    st.ok();
    st.new.node_name = Some(node.clone());
    st.set("Ready", false, "Creating", format!("creating on {node}"));
    st.write(api, inst).await?;
    event(
        ctx,
        inst,
        false,
        "Creating",
        format!("creating {name} on {node} from {}", inst.spec.package_raddr),
    )
    .await;
    let req = CreateInstance {
        source: inst.spec.package_raddr.clone(),
        name: Some(name.clone()),
        node: Some(node.clone()),
        expose: inst.spec.exposes.iter().map(|e| e.0.clone()).collect(),
    };
    match ctx.manager.create(req).await {
        Ok(vm) => {
            ctx.metrics.step(Step::Created);
            st.observe(&vm);
            st.state(State::Running);
            let msg = format!(
                "running on {} at {}",
                vm.node,
                vm.address.as_deref().unwrap_or("?")
            );
            st.set("Ready", true, "Running", msg.clone());
            st.write(api, inst).await?;
            event(ctx, inst, false, "Created", msg).await;
            Ok(Action::requeue(RESYNC))
        }
        // A create (or another step) of this VM runs: look again soon.
        Err(ManagerError::Api {
            status: 409,
            detail,
        }) => Err(ReconcileError::Busy(detail)),
        Err(e @ ManagerError::Api { .. }) => {
            // Refused (4xx: bad input) or failed on the node (5xx): the
            // manager keeps a failed record of the latter, shown next time.
            st.state(State::Failed);
            st.set("Ready", false, "CreateFailed", e.to_string());
            st.set("Degraded", true, "CreateFailed", e.to_string());
            st.write(api, inst).await?;
            event(ctx, inst, true, "CreateFailed", e.to_string()).await;
            if e.status().is_some_and(|s| (400..500).contains(&s)) {
                Ok(Action::requeue(Duration::from_secs(60)))
            } else {
                Err(e.into())
            }
        }
        Err(e) => Err(degraded(&mut st, api, inst, ctx, e).await),
    }
}

async fn migrate(
    inst: &Instance,
    api: &Api<Instance>,
    ctx: &Context,
    mut st: Status,
    vm: api::Instance,
    want: String,
) -> Result<Action, ReconcileError> {
    let name = vm.name.clone();
    let from = vm.node.clone();
    st.state(State::Running);
    match node_known(ctx, &want).await {
        Err(e) => return Err(degraded(&mut st, api, inst, ctx, e).await),
        Ok(Err(why)) => {
            let why = format!("{why}; it stays on {from}");
            st.set("Ready", true, "Running", format!("running on {from}"));
            st.set("Migrating", false, "UnknownNode", why.clone());
            st.set("Degraded", true, "UnknownNode", why.clone());
            if st.condition_changed("Degraded") {
                event(ctx, inst, true, "UnknownNode", why).await;
            }
            st.write(api, inst).await?;
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
        Ok(Ok(())) => {}
    }
    st.state(State::Migrating);
    let msg = format!("moving from {from} to {want}");
    st.set("Migrating", true, "Moving", msg.clone());
    st.set(
        "Ready",
        true,
        "Running",
        format!("running on {from} while it moves"),
    );
    st.write(api, inst).await?;
    event(ctx, inst, false, "Migrating", msg).await;
    match ctx.manager.migrate(&name, &want).await {
        Ok(vm) => {
            ctx.metrics.step(Step::Moved);
            st.observe(&vm);
            st.state(State::Running);
            let downtime = vm
                .moves
                .last()
                .and_then(|m| m.downtime_ms)
                .map(|d| format!(", {d} ms of downtime"))
                .unwrap_or_default();
            let msg = format!("moved from {from} to {}{downtime}", vm.node);
            st.set("Migrating", false, "Moved", msg.clone());
            st.set(
                "Ready",
                true,
                "Running",
                format!(
                    "running on {} at {}",
                    vm.node,
                    vm.address.as_deref().unwrap_or("?")
                ),
            );
            st.write(api, inst).await?;
            event(ctx, inst, false, "Migrated", msg).await;
            Ok(Action::requeue(RESYNC))
        }
        Err(ManagerError::Api {
            status: 409,
            detail,
        }) => Err(ReconcileError::Busy(detail)),
        Err(e @ ManagerError::Api { .. }) => {
            // The move did not happen: the VM stays where it was.
            ctx.metrics.step(Step::MoveFailed);
            if let Ok(Some(vm)) = ctx.manager.instance(&name).await {
                st.observe(&vm);
            }
            st.state(State::Running);
            st.set("Migrating", false, "MigrationFailed", e.to_string());
            st.set("Degraded", true, "MigrationFailed", e.to_string());
            st.write(api, inst).await?;
            event(ctx, inst, true, "MigrationFailed", e.to_string()).await;
            Err(e.into())
        }
        Err(e) => Err(degraded(&mut st, api, inst, ctx, e).await),
    }
}

async fn cleanup(
    inst: &Instance,
    api: &Api<Instance>,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let name = vm_name(inst);
    let mut st = Status::of(inst);
    match ctx.manager.delete(&name).await {
        Ok(existed) => {
            if existed {
                ctx.metrics.step(Step::Deleted);
                event(ctx, inst, false, "Deleted", format!("deleted {name}")).await;
            }
            Ok(Action::await_change())
        }
        Err(ManagerError::Api {
            status: 409,
            detail,
        }) => {
            st.set(
                "Ready",
                false,
                "Deleting",
                format!("waiting to delete: {detail}"),
            );
            st.write(api, inst).await?;
            Err(ReconcileError::Busy(detail))
        }
        Err(e) => Err(degraded(&mut st, api, inst, ctx, e).await),
    }
}

/// Runs the controller over `api` until a signal ends it; `triggers`
/// (the manager's events) reconcile the Instances they are about.
pub async fn run_controller(api: Api<Instance>, ctx: Arc<Context>, triggers: Triggers) {
    Controller::new(api, watcher::Config::default().any_semantic())
        .reconcile_on(triggers.one)
        .reconcile_all_on(triggers.all)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(instance = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::InstanceSpec;

    fn instance(ns: &str, name: &str) -> Instance {
        let mut i = Instance::new(
            name,
            InstanceSpec {
                package_raddr: "10.0.0.1:7070".into(),
                node_name: "node-1".into(),
                memory: None,
                exposes: Vec::new(),
            },
        );
        i.metadata.namespace = Some(ns.into());
        i.metadata.generation = Some(3);
        i
    }

    #[test]
    fn vm_names_are_namespace_dot_name() {
        assert_eq!(vm_name(&instance("default", "kv")), "default.kv");
        assert!(ferry_control_name_ok("default.kv").is_ok());
        assert!(ferry_control_name_ok(&format!("default.{}", "a".repeat(60))).is_err());
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let mut inst = instance("default", "kv");
        let mut st = Status::of(&inst);
        st.set("Ready", true, "Running", "running on node-1");
        let first = st.new.conditions[0].last_transition_time.clone();
        assert_eq!(st.new.observed_generation, Some(3));
        assert!(st.condition_changed("Ready"));

        inst.status = Some(st.new.clone());
        std::thread::sleep(Duration::from_millis(5));
        let mut st = Status::of(&inst);
        st.set("Ready", true, "Running", "running on node-1 (again)");
        assert_eq!(st.new.conditions[0].last_transition_time, first);
        assert!(!st.condition_changed("Ready"));
        st.set("Ready", false, "NodeLost", "node-1 stopped reporting");
        assert_ne!(st.new.conditions[0].last_transition_time, first);
        assert!(st.condition_changed("Ready"));
        assert_eq!(st.new.conditions.len(), 1, "one condition per type");
    }

    #[test]
    fn a_failed_vm_is_recreated_a_bounded_number_of_times_with_backoff() {
        assert_eq!(recreate_step(0, None), Recreate::Now);
        assert_eq!(recreate_step(0, Some(0)), Recreate::Now);
        assert_eq!(recreate_step(1, Some(3)), Recreate::Wait(7));
        assert_eq!(recreate_step(1, Some(10)), Recreate::Now);
        assert_eq!(recreate_step(2, Some(5)), Recreate::Wait(15));
        assert_eq!(recreate_step(4, Some(79)), Recreate::Wait(1));
        assert_eq!(recreate_step(4, None), Recreate::Now);
        assert_eq!(
            recreate_step(MAX_RECREATIONS, Some(1_000)),
            Recreate::GiveUp
        );
        assert_eq!(recreate_step(MAX_RECREATIONS + 3, None), Recreate::GiveUp);
    }

    #[test]
    fn moves_become_records_with_a_phase() {
        let mv = |ok, ended: Option<u64>| api::Move {
            from: "node-1".into(),
            to: "node-2".into(),
            started_unix_ms: 1_700_000_000_000,
            ended_unix_ms: ended,
            ok,
            error: None,
            downtime_ms: ended.map(|_| 20),
        };
        let running = move_record(&mv(None, None));
        assert_eq!(running.phase, "Running");
        assert_eq!(running.start_time, "2023-11-14T22:13:20Z");
        assert_eq!(running.end_time, None);
        let done = move_record(&mv(Some(true), Some(1_700_000_001_500)));
        assert_eq!(done.phase, "Succeeded");
        assert_eq!(done.end_time.as_deref(), Some("2023-11-14T22:13:21.5Z"));
        assert_eq!(done.downtime_ms, Some(20));
        assert_eq!(move_record(&mv(Some(false), Some(1))).phase, "Failed");
    }
}
