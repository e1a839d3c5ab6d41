//! The link between the manager and its workers, version 1: what a worker
//! sends (`register`, `heartbeat`, command results) and what the manager
//! hands it (commands). The worker always calls; the manager never dials a
//! worker, so a worker behind NAT or in a namespace only needs to reach the
//! manager's `--workers-listen` address.
//!
//! ```text
//!  worker                                   manager
//!    │ POST /link/v1/register  ───────────▶   (node ready, session)
//!    │ POST /link/v1/heartbeat ───────────▶   every lease/3: free memory and every VM it runs
//!    │ GET  /link/v1/commands  ───────────▶   long poll: create / receive / delete / suspend / resume
//!    │ POST /link/v1/results   ───────────▶   what became of each command
//! ```
//!
//! What workers report is the truth about where VMs run: the manager's
//! records say what was asked, heartbeats say what is, and the manager
//! settles its records on them (a VM that appears on another node after a
//! manager restart mid-migration is where it is).

use serde::{Deserialize, Serialize};

/// The version of this link (the `/v1/` in its routes).
pub const LINK_VERSION: u32 = 1;

/// `POST /link/v1/register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// The node's name.
    pub name: String,
    /// Who this worker is across restarts (kept in its state directory):
    /// the manager lets a restarted worker take its name back at once, and
    /// refuses another worker the name while the first holds its lease.
    pub worker_id: String,
    /// The address instances and exposed ports are reached at.
    pub address: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// CPUs.
    pub cpus: u32,
    /// Memory offered to VMs, MiB.
    pub memory_mib: u64,
    /// Free memory, MiB.
    pub free_mib: u64,
    /// The lease it keeps, seconds.
    pub lease_s: u64,
    /// The VMs it runs (after a restart: those it adopted).
    pub instances: Vec<Report>,
}

/// The answer to [`Register`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// Names this worker's session in every later call.
    pub session: String,
}

/// `POST /link/v1/heartbeat`: sent every `lease_s / 3`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// From [`Registered`].
    pub session: String,
    /// Free memory, MiB.
    pub free_mib: u64,
    /// Every VM the worker runs or keeps.
    pub instances: Vec<Report>,
}

/// What a worker says of one of its VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The instance (its VM's name).
    pub name: String,
    /// `running`, `suspended`, `stopped` or `crashed` (`ferry ps`'s states).
    pub state: String,
    /// Its peer address, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Exposed ports, `HOST:PORT:GUESTPORT`.
    #[serde(default)]
    pub exposes: Vec<String>,
    /// Guest memory, MiB.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Why it stopped or crashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The last error seen in its guest (its `errors.jsonl`); a manager
    /// that has not seen this one yet records it and tells watchers.
    /// Absent from older workers, ignored by older managers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<crate::api::GuestError>,
}

/// A command for a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Names the command in its result.
    pub id: u64,
    /// What to do.
    pub kind: CommandKind,
}

/// What a worker is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum CommandKind {
    /// Start instance `name` from a registry's package.
    Create {
        /// The instance.
        name: String,
        /// The package URL.
        source: String,
        /// The registry's token, if it needs one (`ferry manager
        /// --registry-token-file`).
        #[serde(default)]
        registry_token: Option<ferry_transport::Token>,
        /// The instance's credential: it serves its next migration with it.
        token: ferry_transport::Token,
        /// `HOSTPORT:GUESTPORT` on the node's address.
        expose: Vec<String>,
    },
    /// Take instance `name` over from the peer serving it at `from`.
    Receive {
        /// The instance.
        name: String,
        /// Its current address.
        from: String,
        /// The credential of this move: the source serves the instance
        /// with it, and takes no other.
        token: ferry_transport::Token,
        /// The credential of its next move, fresh for this one: the
        /// instance is served with it here, so `token` is no good once
        /// it has moved (replayed, it is refused). Absent from older
        /// managers: then `token` serves again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        serve_token: Option<ferry_transport::Token>,
        /// `HOSTPORT:GUESTPORT` on this node's address.
        expose: Vec<String>,
    },
    /// Stop instance `name` and drop its state.
    Delete {
        /// The instance.
        name: String,
    },
    /// Suspend instance `name` into its saved package on this node (the
    /// runtime's one save path, as `ferry stop` does).
    Suspend {
        /// The instance.
        name: String,
    },
    /// Resume the suspended instance `name` from its saved package on this
    /// node, serving its next migration with `token`.
    Resume {
        /// The instance.
        name: String,
        /// Its credential.
        token: ferry_transport::Token,
    },
}

/// `POST /link/v1/results`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// From [`Registered`].
    pub session: String,
    /// The command's id.
    pub id: u64,
    /// What became of it.
    pub outcome: Outcome,
}

/// What became of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    /// Done; the VM as it is now (for `delete`, as it was).
    Done {
        /// The VM.
        report: Report,
        /// For `receive`: how long the guest was paused, by the engine.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_ms: Option<u64>,
    },
    /// It failed; nothing was left running by it.
    Failed {
        /// ferry's exit class of the failure (`bad-input`, `vm-failed`, ...).
        class: String,
        /// Why, on one line.
        message: String,
    },
}
