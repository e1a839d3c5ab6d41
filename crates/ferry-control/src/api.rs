//! The manager's API, version 1, as types: what `ferry cluster`, scripts
//! and the Kubernetes operator send and get back. Every body is one of
//! these, serialised as JSON; fields are only added within a version, and
//! readers ignore the fields they do not know. Their JSON schemas in
//! `GET /openapi.json` are derived from these definitions (utoipa).

use serde::{Deserialize, Serialize};

/// The version of this API (the `/v1/` in its routes).
pub const API_VERSION: u32 = 1;

/// A host that runs VMs: a `ferry worker`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Node {
    /// Its name (`--name`), unique in the cluster.
    pub name: String,
    /// The address it is reached at (instances' addresses and exposed
    /// ports are on it).
    pub address: String,
    /// Whether it holds its lease.
    pub state: NodeState,
    /// The accelerator its VMs run with (`kvm` or `tcg`).
    pub accel: String,
    /// Its CPUs.
    pub cpus: u32,
    /// Memory it offers to VMs in all, MiB.
    pub memory_mib: u64,
    /// Memory it has free for more VMs, MiB (at its last heartbeat).
    pub free_mib: u64,
    /// When it last reported, Unix seconds.
    pub last_heartbeat_unix: u64,
    /// How long it may stay silent before it is `lost`, seconds.
    pub lease_s: u64,
    /// How many instances run on it.
    pub instances: usize,
}

/// Whether a node holds its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    /// It reports within its lease.
    Ready,
    /// It missed its lease: its instances are `lost` until it reports again.
    Lost,
}

/// A VM the control plane runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Instance {
    /// Its name, unique in the cluster (also its VM's name on its node).
    pub name: String,
    /// What it was created from: a registry's package URL.
    pub source: String,
    /// The node it runs on (or, while `pending`/`starting`, will).
    pub node: String,
    /// Where it is in its life.
    pub state: InstanceState,
    /// Why it is in that state, when it is not plainly `running`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its address while it runs (`HOST:PORT`): a peer serving it, the
    /// source of its next migration. `POST /nodes/N/instances/ADDRESS`
    /// moves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Its exposed ports on its node, `HOST:PORT:GUESTPORT`: clients follow
    /// an instance through these.
    #[serde(default)]
    pub exposes: Vec<String>,
    /// Guest memory, MiB (from its package).
    pub memory_mib: u64,
    /// Every move it made or tried, oldest first.
    #[serde(default)]
    pub moves: Vec<Move>,
    /// When it was created, Unix seconds.
    pub created_unix: u64,
    /// The last error its node saw in the guest (the service exited, a
    /// kernel oops or panic, the OOM killer), kept until a newer one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<GuestError>,
}

/// An error in a running guest, as its node's runtime saw it (`ferry ps
/// --json`'s `last_error`, `ferry watch`'s lines). The API's own copy of
/// the runtime's record: its `kind` is a string so that a reader keeps
/// working when a newer worker reports a kind it does not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GuestError {
    /// When the node saw it, Unix milliseconds.
    pub unix_ms: u64,
    /// What kind: `service-exited`, `liveness-failed`, `kernel-oops`,
    /// `kernel-panic` or `oom`.
    #[schema(example = "service-exited")]
    pub kind: String,
    /// One line: what happened.
    #[schema(example = "service exited with code 137 (killed by signal 9)")]
    pub what: String,
}

impl From<ferry_runtime::guest_errors::GuestError> for GuestError {
    fn from(e: ferry_runtime::guest_errors::GuestError) -> Self {
        let kind = serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| "unknown".into());
        Self {
            unix_ms: e.unix_ms,
            kind,
            what: e.what,
        }
    }
}

/// Where an instance is in its life: `pending` → `starting` → `running`
/// → `migrating` → `running`, or `suspended`, `failed`, `lost`, `deleted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Recorded, not sent to its node yet.
    Pending,
    /// Its node is starting it.
    Starting,
    /// It runs on its node.
    Running,
    /// It is being moved to another node.
    Migrating,
    /// It is saved on its node and does not run.
    Suspended,
    /// It could not be started, or it stopped; `reason` says why.
    Failed,
    /// Its node missed its lease: it may still run, nobody knows.
    Lost,
    /// It was deleted (gone from its node).
    Deleted,
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).expect("a state serialises");
        write!(f, "{}", s.as_str().unwrap_or("?"))
    }
}

/// One move of an instance between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Move {
    /// The node it left.
    pub from: String,
    /// The node it went to.
    pub to: String,
    /// When the move began, Unix milliseconds.
    pub started_unix_ms: u64,
    /// When it ended, Unix milliseconds (none while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_unix_ms: Option<u64>,
    /// Whether it moved (none while the move runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    /// Why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the guest was paused, by the engine's count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
}

/// `POST /v1/instances`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateInstance {
    /// A registry: its root (`http://HOST:PORT/`, serving one package), a
    /// package URL, or `HOST:PORT` for `http://HOST:PORT/`.
    pub source: String,
    /// Its name (default: the recipe's name and a random suffix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The node (default: the ready node with the most free memory that
    /// fits it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Ports to expose on its node, `HOSTPORT:GUESTPORT` (on the node's
    /// address).
    #[serde(default)]
    pub expose: Vec<String>,
}

/// `POST /v1/instances/{name}/migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrateInstance {
    /// The node to move it to.
    pub node: String,
}

/// An error, as RFC 7807 problem JSON (`application/problem+json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`about:blank` when the status says
    /// it all).
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What happened, and what to do about it.
    pub detail: String,
    /// Memory free on the node asked for, MiB (when there is no room).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_mib: Option<u64>,
}

/// One event of `GET /v1/events` (server-sent events, `data:` lines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ClusterEvent {
    /// A node registered, reported again after it was lost, or was lost.
    Node {
        /// The node now.
        node: Node,
    },
    /// An instance changed.
    Instance {
        /// The instance now.
        instance: Instance,
    },
    /// An instance was deleted.
    Deleted {
        /// Its name.
        name: String,
    },
    /// An error in an instance's guest that its node reported for the
    /// first time (also the instance's `last_error` from now on).
    GuestError {
        /// The instance.
        name: String,
        /// The node it runs on.
        node: String,
        /// The error.
        error: GuestError,
    },
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    now_unix_ms() / 1000
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
