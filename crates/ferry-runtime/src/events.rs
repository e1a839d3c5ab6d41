//! What the runtime tells its caller while it works: typed [`Event`]s sent
//! to an [`EventSink`] the caller owns, and a [`Cancel`] handle the caller
//! trips to stop a long operation. The library never prints, installs no
//! signal handler and never exits the process: the `ferry` binary renders
//! events as lines of text (or JSON lines with `--json`) and turns Ctrl-C
//! into [`Cancel::cancel`]; a daemon does whatever suits it.
//!
//! The JSON form of an event is `{"v":1,"type":"live",...}`: see
//! `docs/events.md`. Variants and fields may be added in later minor
//! versions; none is renamed or removed without raising [`EVENTS_VERSION`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_engine::{Accel, LiveStats};
use serde::{Deserialize, Serialize};

/// The version of the event stream's JSON form (the `v` of every line).
pub const EVENTS_VERSION: u32 = 1;

/// One thing that happened, in the order it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Event {
    /// The accelerator chosen, and why not KVM if not.
    Accel {
        /// The accelerator.
        accel: Accel,
        /// Why this one (set when KVM was not used).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A step of the start pipeline or the save path finished.
    Phase {
        /// Its name: `planned`, `engine-started`, `guest-resumed`,
        /// `package-verified`, `service-live` (start); `quiesced`, `state-saved`,
        /// `disk-exported`, `<section>-written`, `committed` (save).
        phase: String,
        /// How long it took.
        ms: u64,
    },
    /// Progress of long work (fetching, extracting or writing a section).
    Progress {
        /// What: e.g. `fetching memory`, `writing disk`.
        what: String,
        /// Bytes done.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
    /// A saved VM runs again (the guest's clock and RNG are refreshed).
    Resumed {
        /// The VM.
        name: String,
        /// Milliseconds since the operation started.
        ms: u64,
    },
    /// The VM's service is live.
    Live {
        /// The VM.
        name: String,
        /// Milliseconds since the operation started.
        ms: u64,
    },
    /// Where the VM's network is.
    Network {
        /// Its namespace.
        netns: String,
        /// Host addresses and the guest ports they lead to.
        exposes: Vec<ferry_net::ExposeSpec>,
    },
    /// The VM runs and waits: for Ctrl-C (what [`Event::Running::on_cancel`]
    /// says happens then), a `stop` on its control socket, or a peer.
    Running {
        /// The VM.
        name: String,
        /// Memory in MiB.
        memory_mib: u64,
        /// vCPUs.
        cpus: u32,
        /// Where it came from.
        source: String,
        /// What a cancel does.
        on_cancel: CancelAction,
        /// Where a suspend writes, if it does.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        save: Option<PathBuf>,
    },
    /// How much of a lazily fetched disk was here when the VM was live
    /// (the rest follows in the background).
    LazyDisk {
        /// Bytes fetched.
        fetched_bytes: u64,
        /// The disk's size.
        size_bytes: u64,
    },
    /// The whole of a lazily fetched disk is here: the VM no longer reads
    /// from the registry (it may go away), and a move sends the disk from
    /// this host's file.
    LazyDiskComplete {
        /// Bytes fetched, in all.
        fetched_bytes: u64,
        /// The disk's size.
        size_bytes: u64,
        /// Milliseconds since the VM was live (its `lazy-disk` event).
        ms: u64,
    },
    /// After [`Event::LazyDiskComplete`]: the engine reads and writes the
    /// disk's file itself; ferry's NBD server is out of the disk's path.
    LazyDiskLocal {
        /// The file.
        file: PathBuf,
        /// Milliseconds the switch took (the engine finishes the disk
        /// requests in flight first).
        ms: u64,
    },
    /// The sections fetched from a registry (those in the cache were not).
    Fetched {
        /// Where from.
        from: String,
        /// Bytes fetched.
        bytes: u64,
    },
    /// The service is live and the VM is about to be snapshotted.
    Snapshotting {
        /// Milliseconds since the operation started.
        ms: u64,
    },
    /// A package was written by `ferry package`.
    Packaged {
        /// The file.
        path: PathBuf,
        /// Milliseconds since the operation started.
        ms: u64,
        /// Its size in bytes.
        file_bytes: u64,
        /// The guest's memory.
        memory_mib: u64,
    },
    /// A suspend started.
    Suspending {
        /// Into this package.
        path: PathBuf,
    },
    /// The VM was suspended into a package.
    Suspended {
        /// The package.
        path: PathBuf,
        /// How long the suspend took.
        ms: u64,
    },
    /// Something went wrong inside a running guest: its service exited, a
    /// kernel oops or panic, the OOM killer (`docs/shell.md`).
    GuestError {
        /// The VM.
        name: String,
        /// `service-exited`, `kernel-oops`, `kernel-panic` or `oom`.
        kind: crate::guest_errors::GuestErrorKind,
        /// One line: what happened.
        what: String,
    },
    /// A suspend failed; nothing was lost: the old package is unchanged.
    SuspendFailed {
        /// The package it was written to.
        path: PathBuf,
        /// Why.
        message: String,
        /// Whether the VM runs on (else it stays paused: in doubt).
        running: bool,
    },
    /// The VM is being shut down.
    ShuttingDown {
        /// The VM.
        name: String,
    },
    /// The VM (a clone) is being dropped without saving.
    Discarding {
        /// The VM.
        name: String,
    },
    /// The VM is served to peers for migration.
    Serving {
        /// The VM.
        name: String,
        /// The listening address.
        addr: String,
    },
    /// A migration out started.
    MigratingOut {
        /// The VM.
        name: String,
        /// The destination.
        to: String,
    },
    /// The VM moved to another host; this owner is done with it.
    MovedOut {
        /// The VM.
        name: String,
        /// The destination.
        to: String,
        /// The engine's figures.
        stats: LiveStats,
    },
    /// A migration out did not happen; the VM runs here again.
    MigrationFailed {
        /// The VM.
        name: String,
        /// The destination.
        to: String,
        /// Why.
        message: String,
    },
    /// A migration out is in doubt: the VM stays paused here.
    InDoubt {
        /// The VM.
        name: String,
        /// The destination.
        to: String,
        /// Why.
        message: String,
        /// Where a cancel saves it.
        save: PathBuf,
    },
    /// A migration in started.
    Receiving {
        /// The VM.
        name: String,
        /// The source.
        from: String,
    },
    /// The destination has all state and is about to resume the VM (the
    /// commit point comes next).
    Switching {
        /// The VM.
        name: String,
    },
    /// A migration in finished: the VM runs here.
    MigratedIn {
        /// The VM.
        name: String,
        /// The source.
        from: String,
        /// From *ready* (both channels open) to running here.
        ms: u64,
        /// The engine's downtime at the source.
        downtime_ms: u64,
        /// From *switch* to running here.
        switch_ms: u64,
    },
    /// A detached VM is live (`ferry up`, `run --detach`, `start`).
    Started(crate::detach::Started),
    /// A VM of a group failed to start.
    StartFailed {
        /// The VM.
        name: String,
        /// Why.
        message: String,
    },
    /// A fleet command (`stop`, `restart`, `rm`, `clean`) changed a VM.
    VmChanged(crate::fleet::VmChange),
    /// A registry serves a package.
    RegistryPackage {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The SHA-256 of its table.
        table_sha256: String,
        /// Where it is served.
        url: String,
    },
    /// A server listens.
    Listening {
        /// Its URL.
        url: String,
        /// Whether every request needs the token.
        token_required: bool,
    },
    /// Something worth a line that has no event of its own.
    Notice {
        /// The line.
        message: String,
    },
    /// Something went wrong but the operation goes on.
    Warning {
        /// The line.
        message: String,
    },
}

/// What a cancel (Ctrl-C, SIGTERM, `ferry stop`) does to a running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CancelAction {
    /// Suspend it into its package (kept; `ferry run`/`start` resume it).
    Suspend,
    /// Shut the guest down (`ferry boot`).
    Shutdown,
    /// Drop it without saving (a foreground clone).
    Discard,
}

/// Where a caller wants events. `Sync` so that several threads of one
/// operation may report.
pub trait EventSink: Send + Sync {
    /// Takes one event.
    fn emit(&self, event: Event);
}

impl<F: Fn(Event) + Send + Sync> EventSink for F {
    fn emit(&self, event: Event) {
        self(event)
    }
}

/// A sink that drops everything.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _: Event) {}
}

/// Collects events in memory (tests, and callers that want them at the end).
#[derive(Default)]
pub struct Collect(pub Mutex<Vec<Event>>);

impl EventSink for Collect {
    fn emit(&self, event: Event) {
        self.0.lock().expect("events").push(event);
    }
}

impl Collect {
    /// The events so far.
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().expect("events").clone()
    }
}

type Waker = Box<dyn Fn() + Send + Sync>;

/// The caller's "stop now" for a long operation: a `ferry` command trips
/// it on SIGINT/SIGTERM, a daemon when it is told to. It can be tripped
/// more than once (a suspend that failed may be asked for again), and
/// whoever waits registers a waker that runs on every trip.
#[derive(Clone, Default)]
pub struct Cancel(Arc<CancelInner>);

#[derive(Default)]
struct CancelInner {
    count: AtomicU64,
    wakers: Mutex<Vec<(u64, Waker)>>,
    next_id: AtomicU64,
}

impl Cancel {
    /// A new, untripped handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trips it: every registered waker runs.
    pub fn cancel(&self) {
        self.0.count.fetch_add(1, Ordering::SeqCst);
        for (_, w) in self.0.wakers.lock().expect("wakers").iter() {
            w();
        }
    }

    /// Whether it was tripped at least once.
    pub fn is_cancelled(&self) -> bool {
        self.0.count.load(Ordering::SeqCst) > 0
    }

    /// Runs `waker` on every later trip, while the returned guard lives.
    pub fn on_cancel(&self, waker: impl Fn() + Send + Sync + 'static) -> CancelGuard {
        let id = self.0.next_id.fetch_add(1, Ordering::SeqCst);
        self.0
            .wakers
            .lock()
            .expect("wakers")
            .push((id, Box::new(waker)));
        CancelGuard {
            cancel: self.clone(),
            id,
        }
    }
}

/// Unregisters a waker when dropped.
pub struct CancelGuard {
    cancel: Cancel,
    id: u64,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.cancel
            .0
            .wakers
            .lock()
            .expect("wakers")
            .retain(|(id, _)| *id != self.id);
    }
}

/// An event in its JSON-lines form, `{"v":1,"type":...}`.
#[derive(Debug, Serialize)]
pub struct JsonLine<'a> {
    /// [`EVENTS_VERSION`].
    pub v: u32,
    /// The event.
    #[serde(flatten)]
    pub event: &'a Event,
}

impl<'a> JsonLine<'a> {
    /// Wraps `event`.
    pub fn new(event: &'a Event) -> Self {
        JsonLine {
            v: EVENTS_VERSION,
            event,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_a_version_and_a_type() {
        let e = Event::Live {
            name: "r1".into(),
            ms: 412,
        };
        let line = serde_json::to_string(&JsonLine::new(&e)).unwrap();
        assert_eq!(line, r#"{"v":1,"type":"live","name":"r1","ms":412}"#);
        let back: Event = serde_json::from_str(&line).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn cancel_wakes_every_waiter_until_its_guard_goes() {
        let cancel = Cancel::new();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let guard = cancel.on_cancel(move || {
            h.fetch_add(1, Ordering::SeqCst);
        });
        assert!(!cancel.is_cancelled());
        cancel.cancel();
        cancel.cancel();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        drop(guard);
        cancel.cancel();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        assert!(cancel.is_cancelled());
    }
}
