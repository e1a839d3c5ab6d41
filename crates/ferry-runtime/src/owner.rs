//! The one owner of a running VM. Whether the VM runs in the foreground
//! (`ferry boot`, `run`, `peer`) or detached (`--detach`, `up`, `start`),
//! the same loop ([`own`]) holds it until it ends, and answers the same
//! requests:
//!
//! - the caller's [`Cancel`] (Ctrl-C, SIGTERM): what [`OwnerOptions::on_cancel`]
//!   says — suspend into the VM's package, shut it down, or discard it;
//! - `stop` on the control socket (`ferry stop NAME [--discard]`): suspend
//!   or discard, answered once done;
//! - a peer's migration request, when the VM is served to peers: the VM
//!   moves, or stays here running (or paused, in doubt);
//! - a fleet's membership changing: the guest is told.
//!
//! Every suspend goes through [`crate::save`]. A failed suspend never loses
//! the old package: the VM resumes and runs on (in doubt, it stays paused),
//! and the caller may ask again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_agent_proto::FleetMember;
use ferry_engine::{Engine, LiveLimits, LiveStats};
use ferry_transport::migration::{self, ChannelKind, DestMsg, MigrationError, SourceMsg};

use crate::control::{ControlHandler, ControlReply, ControlRequest};
use crate::error::{FileError, VmError};
use crate::events::{CancelAction, CancelGuard, Event, EventSink};
use crate::package_meta::PackageMeta;
use crate::record::{FleetSpec, RecordState, VmRecord};
use crate::save::{save, CacheAdoption, Generation, StateFrom};
use crate::vm::{describe_exit, RunningVm, SupervisorEvent, Wake};
use crate::vmdir::files;
use crate::{Paths, RuntimeError};

/// What the owner needs to save a VM: its metadata so far, the kernel and
/// initramfs to put in the package, and the package to reuse chunks from.
#[derive(Debug, Clone)]
pub struct SaveInfo {
    /// The metadata of the package the VM came from (or, for a cold boot,
    /// what its first package will say).
    pub meta: PackageMeta,
    /// The kernel to put into the package.
    pub kernel: PathBuf,
    /// The initramfs to put into the package.
    pub initramfs: PathBuf,
    /// Where unchanged chunks are copied from: the package the VM last
    /// resumed from.
    pub base_package: Option<PathBuf>,
    /// Whether the VM's memory is private (a clone that never suspended,
    /// or a VM received from a peer): its RAM is then saved in the device
    /// state.
    pub private_memory: bool,
    /// The disk's size in bytes (what a migration offers).
    pub disk_size: u64,
    /// Make the saved sections the section cache's entries (`ferry run`).
    pub adopt_cache: Option<CacheAdoption>,
}

/// What must live exactly as long as the VM, dropped after it.
#[derive(Default)]
pub struct Held {
    /// One non-clone run per package.
    pub lock: Option<crate::locks::PackageLock>,
    /// A lazily fetched disk and its NBD server.
    pub lazy: Option<crate::start::registry::LazyServed>,
}

/// A running VM, live, with what its owner needs. Fields drop in order:
/// the VM first, then what serves its disk, then the lock.
pub struct OwnedVm {
    /// The running VM.
    pub vm: RunningVm,
    /// Its name.
    pub name: String,
    /// How to save it.
    pub save: SaveInfo,
    /// A detached VM's record (`vm.json`); `None` in the foreground.
    pub record: Option<VmRecord>,
    pub(crate) held: Held,
    pub(crate) _cancel: CancelGuard,
}

/// How the owner treats a VM.
pub struct OwnerOptions {
    /// What a cancel does.
    pub on_cancel: CancelAction,
    /// Where a suspend writes; default: the record's saved package, or
    /// `<vm dir>/saved.ferry` (a clone's own).
    pub save_to: Option<PathBuf>,
    /// Serve the VM to peers on this address, with this token.
    pub listen: Option<(SocketAddr, ferry_transport::Token)>,
    /// Serve it only over TLS (`--tls-cert`, `--tls-key`, `--client-ca`).
    pub listen_tls: Option<ferry_transport::ServerTls>,
    /// Limits of a migration out.
    pub limits: LiveLimits,
    /// The fleet whose members the guest is told about.
    pub fleet: Option<FleetSpec>,
}

impl Default for OwnerOptions {
    fn default() -> Self {
        OwnerOptions {
            on_cancel: CancelAction::Suspend,
            save_to: None,
            listen: None,
            listen_tls: None,
            limits: LiveLimits::default(),
            fleet: None,
        }
    }
}

/// How a VM's time with its owner ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Suspended into a package.
    Suspended {
        /// The package.
        path: PathBuf,
        /// How long the suspend took.
        ms: u64,
    },
    /// Dropped without saving.
    Discarded,
    /// The guest was shut down.
    ShutDown,
    /// It moved to another host.
    Moved {
        /// The destination.
        to: String,
        /// The engine's figures.
        stats: LiveStats,
    },
}

/// Holds `owned` until it ends: suspended, discarded, shut down or moved
/// (`Ok`), or dead (`Err`, with the guest's last words; a detached VM's
/// record then says `crashed` or `stopped`).
pub fn own(
    engine: &dyn Engine,
    paths: &Paths,
    owned: OwnedVm,
    opts: OwnerOptions,
    events: &dyn EventSink,
) -> Result<Outcome, RuntimeError> {
    own_and_tell(engine, paths, owned, opts, events, || {})
}

/// [`own`], calling `held` once the owner answers requests (`ferry stop`,
/// moves): a supervisor reports the VM live only then, so that a stop
/// sent right after `up` returns is taken by the owner, never refused as
/// "still starting".
pub fn own_and_tell(
    engine: &dyn Engine,
    paths: &Paths,
    mut owned: OwnedVm,
    opts: OwnerOptions,
    events: &dyn EventSink,
    held: impl FnOnce(),
) -> Result<Outcome, RuntimeError> {
    let inbox = Arc::new(Inbox {
        jobs: Mutex::default(),
        wake: Mutex::new(owned.vm.event_sender()),
    });
    owned
        .vm
        .set_control_extension(Arc::new(StopHandler(inbox.clone())));
    let _listener = match &opts.listen {
        Some((addr, token)) => {
            let sender = Mutex::new(owned.vm.event_sender());
            let tls = opts.listen_tls.as_ref();
            let server = migration::Server::bind(*addr, token, tls, move |incoming| {
                let _ = sender
                    .lock()
                    .expect("sender")
                    .send(SupervisorEvent::Migration(Box::new(incoming)));
            })?;
            events.emit(Event::Serving {
                name: owned.name.clone(),
                addr: server.local_addr().to_string(),
            });
            Some(server)
        }
        None => None,
    };
    let disk_watch = owned
        .held
        .lazy
        .as_ref()
        .map(|lazy| watch_lazy_disk(lazy.disk.clone(), inbox.clone()));
    let watcher = opts.fleet.clone().map(|fleet| {
        FleetWatcher::start(
            paths.clone(),
            owned.name.clone(),
            fleet,
            owned.save.meta.network.gateway.clone(),
            inbox.clone(),
        )
    });
    // Never the package a clone came from: that one is shared, and a
    // clone saves into a package of its own.
    let save_to = opts
        .save_to
        .clone()
        .or_else(|| owned.record.as_ref().and_then(|r| r.saved.clone()))
        .unwrap_or_else(|| owned.vm.dir().path().join(files::SAVED));
    held();
    let status = owned.vm.status();
    events.emit(Event::Running {
        name: owned.name.clone(),
        memory_mib: status.memory_mib,
        cpus: status.cpus,
        source: status.source,
        on_cancel: opts.on_cancel,
        save: (opts.on_cancel == CancelAction::Suspend).then(|| save_to.clone()),
    });
    let mut in_doubt = false;
    let result = loop {
        let wake = match owned.vm.wait_for_request() {
            Ok(w) => w,
            Err(e) => break Err(e),
        };
        let mut jobs = Vec::new();
        match wake {
            Wake::GuestError(e) => {
                events.emit(Event::GuestError {
                    name: owned.name.clone(),
                    kind: e.kind,
                    what: e.what,
                });
                continue;
            }
            Wake::Cancel => jobs.push(Job::Stop {
                action: opts.on_cancel,
                reply: None,
            }),
            Wake::Jobs => {
                // `ferry stop NAME` does what a cancel does for this VM
                // (a boot shuts down, a foreground clone is dropped, the
                // rest suspend); `--discard` always drops it.
                jobs = inbox.take();
                for job in &mut jobs {
                    if let Job::Stop { action, .. } = job {
                        if *action == CancelAction::Suspend {
                            *action = opts.on_cancel;
                        }
                    }
                }
            }
            Wake::Migration(mut incoming) => {
                let to = incoming.control.peer().to_string();
                if in_doubt || opts.listen.is_none() {
                    let _ = incoming.control.send(&SourceMsg::Refused {
                        reason: if in_doubt {
                            "this VM is in doubt after an earlier migration; it stays paused".into()
                        } else {
                            "this VM is not served to peers".into()
                        },
                    });
                    continue;
                }
                events.emit(Event::MigratingOut {
                    name: owned.name.clone(),
                    to: to.clone(),
                });
                match migrate_out(
                    &mut owned,
                    &mut incoming,
                    &opts.limits,
                    &paths.cache,
                    events,
                ) {
                    MoveResult::Moved(stats) => {
                        break Ok((
                            Outcome::Moved {
                                to: to.clone(),
                                stats,
                            },
                            None,
                        ))
                    }
                    MoveResult::Failed(why) => {
                        owned.vm.mark("running");
                        events.emit(Event::MigrationFailed {
                            name: owned.name.clone(),
                            to,
                            message: why,
                        });
                    }
                    MoveResult::InDoubt(why) => {
                        in_doubt = true;
                        owned.vm.mark("in-doubt");
                        events.emit(Event::InDoubt {
                            name: owned.name.clone(),
                            to,
                            message: why,
                            save: save_to.clone(),
                        });
                    }
                }
                continue;
            }
        }
        let mut done = None;
        for job in jobs {
            match job {
                Job::Fleet(members) if done.is_none() => {
                    let n = members.len();
                    match owned.vm.set_fleet(&owned.name, members) {
                        Ok(()) => tracing::info!(members = n, "fleet sent to the guest"),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not send the fleet to the guest; trying again");
                            if let Some(w) = &watcher {
                                w.resend.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                }
                Job::Fleet(_) => {}
                Job::DiskComplete {
                    fetched_bytes,
                    size_bytes,
                    ms,
                } => {
                    events.emit(Event::LazyDiskComplete {
                        fetched_bytes,
                        size_bytes,
                        ms,
                    });
                    // A VM in doubt stays exactly as it was; one stopped
                    // by a job before this one is gone.
                    if !in_doubt && done.is_none() {
                        use_local_disk(&mut owned, events);
                    }
                }
                Job::Stop { action, reply } if done.is_none() => {
                    match stop(engine, &mut owned, action, &save_to, in_doubt, events) {
                        Ok(outcome) => done = Some((outcome, reply)),
                        Err(e) => {
                            events.emit(Event::SuspendFailed {
                                path: save_to.clone(),
                                message: e.to_string(),
                                running: !in_doubt,
                            });
                            if let Some(r) = reply {
                                let _ = r.send(ControlReply::Error {
                                    message: e.to_string(),
                                });
                            }
                        }
                    }
                }
                Job::Stop { reply, .. } => {
                    if let Some(r) = reply {
                        let _ = r.send(ControlReply::Error {
                            message: "the VM is being stopped already".into(),
                        });
                    }
                }
            }
        }
        if let Some(d) = done {
            break Ok(d);
        }
    };
    if let Some(w) = watcher {
        w.stop.store(true, Ordering::SeqCst);
    }
    if let Some(stop) = disk_watch {
        stop.store(true, Ordering::SeqCst);
    }
    let (outcome, reply) = match result {
        Ok((Outcome::Moved { to, stats }, _)) => {
            moved_away(owned, &to, &stats, events);
            return Ok(Outcome::Moved { to, stats });
        }
        Ok(d) => d,
        Err(e) => return Err(died(owned, e)),
    };
    finish(owned, &outcome, reply, events);
    Ok(outcome)
}

/// Suspends, discards or shuts down the VM as `action` says. On `Err` the
/// VM runs on (in doubt: stays paused) and nothing was lost.
fn stop(
    engine: &dyn Engine,
    owned: &mut OwnedVm,
    action: CancelAction,
    save_to: &Path,
    in_doubt: bool,
    events: &dyn EventSink,
) -> Result<Outcome, RuntimeError> {
    let t = Instant::now();
    match action {
        CancelAction::Discard => {
            events.emit(Event::Discarding {
                name: owned.name.clone(),
            });
            owned.vm.mark("stopping");
            Ok(Outcome::Discarded)
        }
        CancelAction::Shutdown => {
            events.emit(Event::ShuttingDown {
                name: owned.name.clone(),
            });
            Ok(Outcome::ShutDown)
        }
        CancelAction::Suspend => {
            owned.vm.mark("suspending");
            events.emit(Event::Suspending {
                path: save_to.to_path_buf(),
            });
            let from = if in_doubt {
                StateFrom::AfterSend
            } else {
                StateFrom::Engine
            };
            match save(engine, owned, save_to, from, Generation::Next, None, events) {
                Ok(meta) => {
                    owned.save.meta = meta;
                    let ms = t.elapsed().as_millis() as u64;
                    events.emit(Event::Suspended {
                        path: save_to.to_path_buf(),
                        ms,
                    });
                    Ok(Outcome::Suspended {
                        path: save_to.to_path_buf(),
                        ms,
                    })
                }
                Err(e) => {
                    if !in_doubt {
                        let _ = owned.vm.engine_vm().resume();
                        let _ = owned.vm.after_short_pause();
                        owned.vm.mark("running");
                    } else {
                        owned.vm.mark("in-doubt");
                    }
                    Err(e.into())
                }
            }
        }
    }
}

/// Lets the VM go after a suspend, discard or shutdown, and answers the
/// `stop` that asked for it, if one did.
fn finish(
    owned: OwnedVm,
    outcome: &Outcome,
    reply: Option<Sender<ControlReply>>,
    events: &dyn EventSink,
) {
    let t = Instant::now();
    let OwnedVm {
        mut vm,
        record,
        held,
        name,
        ..
    } = owned;
    let dir = vm.dir().path().to_path_buf();
    match (outcome, record) {
        (Outcome::Suspended { path, .. }, Some(mut record)) => {
            record.state = RecordState::Suspended;
            record.saved = Some(path.clone());
            if let Err(e) = record.save(&dir) {
                events.emit(Event::Warning {
                    message: format!("cannot record that '{name}' is suspended: {e}"),
                });
            }
        }
        (Outcome::Discarded | Outcome::ShutDown, Some(record)) => {
            // Without its record and own package, the directory goes whole.
            if record.owns_saved(&dir) {
                let _ = std::fs::remove_file(dir.join(files::SAVED));
            }
            let _ = std::fs::remove_file(dir.join(files::RECORD));
        }
        _ => {}
    }
    if *outcome == Outcome::ShutDown {
        vm.mark("stopping");
        match vm.shutdown_guest() {
            Ok(reason) => tracing::info!(reason = describe_exit(&reason), "shut down"),
            Err(e) => tracing::warn!(error = %e, "shutting down"),
        }
    }
    // The package lock first: once the directory is unlocked too,
    // 'ferry start' may resume the VM at once, from the same package.
    let Held { lock, lazy } = held;
    drop(lock);
    drop(vm);
    drop(lazy);
    if let Some(r) = reply {
        let (state, saved) = match outcome {
            Outcome::Suspended { path, .. } => ("suspended", Some(path.display().to_string())),
            Outcome::ShutDown => ("shut down", None),
            _ => ("discarded", None),
        };
        let ms = match outcome {
            Outcome::Suspended { ms, .. } => ms + t.elapsed().as_millis() as u64,
            _ => t.elapsed().as_millis() as u64,
        };
        let _ = r.send(ControlReply::Stopped {
            state: state.into(),
            ms,
            saved,
        });
        // Let the control thread write it before the caller goes on (a
        // supervisor exits next).
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Records how the VM died (a guest that powered off is `stopped`,
/// anything else `crashed`), then lets it go: a detached VM's directory
/// keeps the record and the logs for `ferry ps` and `ferry logs`.
fn died(owned: OwnedVm, e: VmError) -> RuntimeError {
    if let Some(mut record) = owned.record.clone() {
        let powered_off = matches!(&e, VmError::VmDied { reason, .. }
            if *reason == describe_exit(&ferry_engine::ExitReason::Poweroff));
        record.state = if powered_off {
            RecordState::Stopped
        } else {
            RecordState::Crashed
        };
        // The console lines are in the log, where `ps` and `logs` read them.
        record.note = Some(match &e {
            VmError::VmDied { reason, .. } if powered_off => reason.clone(),
            VmError::VmDied { reason, .. } => {
                format!("the VM stopped unexpectedly: {reason}")
            }
            other => other.to_string(),
        });
        if let Err(err) = record.save(owned.vm.dir().path()) {
            tracing::warn!(error = %err, "cannot record how the VM ended");
        }
    }
    tracing::warn!(error = %e, "the VM ended");
    e.into()
}

/// The VM runs elsewhere now: close its exposures here (clients reconnect
/// to where it runs), then tear down slowly.
fn moved_away(mut owned: OwnedVm, to: &str, stats: &LiveStats, events: &dyn EventSink) {
    owned.vm.close_exposures();
    owned.vm.mark("moved");
    events.emit(Event::MovedOut {
        name: owned.name.clone(),
        to: to.to_string(),
        stats: stats.clone(),
    });
    if owned.record.is_some() {
        // Nothing of it is left here to resume: the directory goes whole.
        let dir = owned.vm.dir().path().to_path_buf();
        let _ = std::fs::remove_file(dir.join(files::RECORD));
    }
    // On a shared host the destination's first moments (a cold engine)
    // must not compete with tearing down this copy: wait a little, then do
    // it at the lowest priority.
    std::thread::sleep(TEARDOWN_GRACE);
    lower_priority(owned.vm.engine_vm().pid());
}

/// How long a source waits after a migration before tearing its copy down.
/// In bench/migrate on this 2-core host (while it was busy with other work
/// too), tearing down at once (the engine's exit, the namespace, the
/// firewall rules) delayed the destination's first answer by about 100 ms.
const TEARDOWN_GRACE: Duration = Duration::from_secs(1);

/// How long the source waits for *committed* after *switch*.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the rest of this process (this thread, and `engine` if given) at the
/// lowest CPU priority: what is left to do here is tear-down, which can wait.
fn lower_priority(engine: Option<u32>) {
    let mut tids: Vec<u32> = vec![0];
    if let Some(pid) = engine {
        // Every thread of the engine: a process's nice value is per thread.
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            tids.extend(
                tasks
                    .flatten()
                    .filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok()),
            );
        }
    }
    for tid in tids {
        // SAFETY: setpriority(2) takes plain integers; a thread that has
        // gone meanwhile makes it fail with ESRCH, which is ignored.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) };
    }
}

/// What became of a migration out.
enum MoveResult {
    /// The destination runs the VM.
    Moved(LiveStats),
    /// It did not happen; the VM runs here again.
    Failed(String),
    /// Unknown whether the destination resumed; the VM stays paused.
    InDoubt(String),
}

/// Hands the VM to the destination that sent `incoming` (the source side
/// of `docs/migration-protocol.md`). Before *switch* the VM is ours: any
/// failure resumes it here. After *switch*, only *committed* or an explicit
/// *abort* settles it; anything else leaves it paused, in doubt.
fn migrate_out(
    owned: &mut OwnedVm,
    incoming: &mut migration::Incoming,
    limits: &LiveLimits,
    cache: &Path,
    events: &dyn EventSink,
) -> MoveResult {
    let offer = match offer_of(owned, cache) {
        Ok(o) => o,
        Err(e) => {
            let _ = incoming.control.send(&SourceMsg::Refused {
                reason: e.to_string(),
            });
            return MoveResult::Failed(e.to_string());
        }
    };
    let control = &mut incoming.control;
    let sent = control.send(&SourceMsg::Offer {
        session: incoming.session.clone(),
        vm: offer,
    });
    if let Err(e) = sent {
        return MoveResult::Failed(e.to_string());
    }
    // Serve files until the destination is ready.
    loop {
        match control.recv::<DestMsg>(Some(Duration::from_secs(600))) {
            Ok(DestMsg::Fetch { name }) => {
                let path = match name.as_str() {
                    "kernel" => &owned.save.kernel,
                    "initramfs" => &owned.save.initramfs,
                    _ => return MoveResult::Failed(format!("the destination asked for '{name}'")),
                };
                if let Err(e) = control.send_blob(&name, path) {
                    return MoveResult::Failed(e.to_string());
                }
            }
            Ok(DestMsg::Ready) => break,
            Ok(DestMsg::Abort { reason }) => {
                return MoveResult::Failed(format!("the destination gave up: {reason}"))
            }
            Ok(DestMsg::Committed) => {
                return MoveResult::Failed("the destination said 'committed' out of turn".into())
            }
            Err(e) => return MoveResult::Failed(e.to_string()),
        }
    }
    // A plain channel is the engine's own connection (`migration::attach`):
    // nothing of ferry's is in the path of the copy. (A VM left in doubt
    // is saved by taking it back from the engine: `StateFrom::AfterSend`.)
    let channels = (|| -> Result<_, MigrationError> {
        let disk = incoming.channel(ChannelKind::Disk, Duration::from_secs(10))?;
        let state = incoming.channel(ChannelKind::State, Duration::from_secs(10))?;
        Ok((migration::attach(disk)?, migration::attach(state)?))
    })();
    let control = &mut incoming.control;
    let ((disk_fd, disk), (state_fd, state)) = match channels {
        Ok(c) => c,
        Err(e) => {
            let _ = control.send(&SourceMsg::Failed {
                reason: e.to_string(),
            });
            return MoveResult::Failed(e.to_string());
        }
    };
    owned.vm.mark("migrating");
    let sent = (|| -> Result<LiveStats, ferry_engine::EngineError> {
        let e = owned.vm.engine_vm();
        let t = Instant::now();
        e.start_disk_copy(disk_fd)?;
        events.emit(crate::start::phase("disk-in-sync", t));
        let t = Instant::now();
        let stats = e.send_state(state_fd, limits)?;
        events.emit(crate::start::phase("state-sent", t));
        let t = Instant::now();
        e.finish_disk_copy()?;
        events.emit(crate::start::phase("disk-copy-finished", t));
        Ok(stats)
    })();
    let mut stats = match sent {
        Ok(s) => s,
        Err(e) => {
            let e2 = owned.vm.engine_vm().abort_send();
            let resumed = owned.vm.engine_vm().resume();
            let _ = control.send(&SourceMsg::Failed {
                reason: e.to_string(),
            });
            if let Err(r) = e2.and(resumed) {
                tracing::warn!("resuming after a failed migration: {r}");
            }
            let _ = owned.vm.after_short_pause();
            return MoveResult::Failed(e.to_string());
        }
    };
    // Everything the engine sent and received on the two channels.
    stats.wire_bytes = disk.bytes() + state.bytes();
    if let Err(e) = control.send(&SourceMsg::Switch {
        stats: stats.clone(),
    }) {
        return MoveResult::InDoubt(format!("sending 'switch' failed: {e}"));
    }
    // The clients' connections are cut now, as the raw engine's bench
    // proxy does when its copy is done, not after the destination's
    // answer: the guest is paused, so nothing they wait for can come from
    // here, and they reconnect to the destination while it switches (their
    // first SYN waits in its tap until its guest runs). Nothing they had
    // acknowledged is lost; if the destination gives up, they reconnect
    // here, where the proxies still accept. (On the one-move harness the
    // client then dialled the destination about 45 ms before its guest
    // ran, instead of just after; the gap it saw did not shrink beyond
    // the noise, because a just-moved TCG guest takes about 125 ms to
    // answer a new connection either way.)
    owned.vm.drop_exposed_clients();
    // The copy's connection is idle; closing it waited here with the guest
    // paused before (the receiver cuts it anyway).
    if let Err(e) = owned.vm.engine_vm().release_disk_copy() {
        tracing::debug!("closing the disk copy's connection: {e}");
    }
    match control.recv::<DestMsg>(Some(COMMIT_TIMEOUT)) {
        Ok(DestMsg::Committed) => MoveResult::Moved(stats),
        Ok(DestMsg::Abort { reason }) => {
            // The destination says it did not resume: the VM is ours again.
            if let Err(e) = owned.vm.engine_vm().resume() {
                return MoveResult::InDoubt(format!(
                    "the destination gave up ({reason}) and resuming here failed: {e}"
                ));
            }
            let _ = owned.vm.after_short_pause();
            MoveResult::Failed(format!(
                "the destination gave up at the switchover: {reason}"
            ))
        }
        Ok(other) => MoveResult::InDoubt(format!("the destination answered {other:?} to 'switch'")),
        Err(e) => MoveResult::InDoubt(format!("no answer to 'switch' ({e})")),
    }
}

/// What the destination is offered. The kernel's and initramfs's digests
/// come from the cache's memo when it has them (the kernel's is there from
/// the accelerator's verdict): hashing 17 MB on every move took the
/// guest's CPU while it served, seconds of it on an emulated CPU.
fn offer_of(owned: &OwnedVm, cache: &Path) -> Result<crate::start::incoming::VmOffer, FileError> {
    let blob = |p: &Path| -> Result<crate::start::incoming::Blob, FileError> {
        Ok(crate::start::incoming::Blob {
            sha256: ferry_engine::memo::sha256(cache, p).map_err(FileError::at(p))?,
            size: std::fs::metadata(p).map_err(FileError::at(p))?.len(),
        })
    };
    Ok(crate::start::incoming::VmOffer {
        name: owned.name.clone(),
        meta: owned.save.meta.clone(),
        disk_size: owned.save.disk_size,
        kernel: blob(&owned.save.kernel)?,
        initramfs: blob(&owned.save.initramfs)?,
    })
}

/// Once the lazy disk is complete, has the engine use its file directly
/// ([`ferry_engine::Vm::use_local_disk`]) rather than through ferry's NBD
/// server, which copies every request once more and, in the KVM lab, read
/// a move's whole disk copy on the one CPU the guest also needed (the
/// copy took 29-51 s through it, 24-42 s from the file). A failure only
/// costs speed: the server goes on serving.
fn use_local_disk(owned: &mut OwnedVm, events: &dyn EventSink) {
    let Some(file) = owned
        .held
        .lazy
        .as_ref()
        .map(|l| l.disk.path().to_path_buf())
    else {
        return;
    };
    let t = Instant::now();
    match owned.vm.engine_vm().use_local_disk(&file) {
        Ok(()) => events.emit(Event::LazyDiskLocal {
            file,
            ms: t.elapsed().as_millis() as u64,
        }),
        Err(e) => events.emit(Event::Warning {
            message: format!(
                "the engine goes on reading the disk through ferry's server (slower): \
                 it could not open {} itself: {e}",
                file.display()
            ),
        }),
    }
}

/// Tells the owner's loop when every chunk of the lazy disk is here
/// ([`Job::DiskComplete`]); setting the flag it returns ends the watch.
fn watch_lazy_disk(disk: Arc<ferry_lazydisk::LazyDisk>, inbox: Arc<Inbox>) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let since = Instant::now();
    let spawned = std::thread::Builder::new()
        .name("lazy-disk-watch".into())
        .spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                if disk.wait_complete(Duration::from_secs(1)) {
                    inbox.push(Job::DiskComplete {
                        fetched_bytes: disk.status().bytes_fetched,
                        size_bytes: disk.size(),
                        ms: since.elapsed().as_millis() as u64,
                    });
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch the lazy disk's fetching: {e}");
    }
    stop
}

/// Work for the owner's loop, from control connections, the fleet
/// watcher and the lazy disk's watch.
enum Job {
    Stop {
        action: CancelAction,
        reply: Option<Sender<ControlReply>>,
    },
    Fleet(Vec<FleetMember>),
    /// Every chunk of the lazy disk is here.
    DiskComplete {
        fetched_bytes: u64,
        size_bytes: u64,
        ms: u64,
    },
}

struct Inbox {
    jobs: Mutex<Vec<Job>>,
    wake: Mutex<Sender<SupervisorEvent>>,
}

impl Inbox {
    fn push(&self, job: Job) {
        self.jobs.lock().expect("inbox").push(job);
        let _ = self.wake.lock().expect("wake").send(SupervisorEvent::Jobs);
    }

    fn take(&self) -> Vec<Job> {
        std::mem::take(&mut *self.jobs.lock().expect("inbox"))
    }
}

/// Answers `stop` on the control socket by handing it to the owner's loop.
struct StopHandler(Arc<Inbox>);

impl ControlHandler for StopHandler {
    fn handle(&self, request: ControlRequest) -> ControlReply {
        match request {
            ControlRequest::Stop { discard } => {
                let (tx, rx) = channel();
                self.0.push(Job::Stop {
                    action: if discard {
                        CancelAction::Discard
                    } else {
                        CancelAction::Suspend
                    },
                    reply: Some(tx),
                });
                rx.recv_timeout(Duration::from_secs(900))
                    .unwrap_or_else(|_| ControlReply::Error {
                        message: "the owner ended without finishing the stop; 'ferry ps' shows what is left".into(),
                    })
            }
            other => ControlReply::Error {
                message: format!("unexpected request {other:?}"),
            },
        }
    }
}

/// Sends the guest its fleet whenever the set of running members changes.
struct FleetWatcher {
    stop: Arc<AtomicBool>,
    resend: Arc<AtomicBool>,
}

impl FleetWatcher {
    fn start(
        paths: Paths,
        me: String,
        fleet: FleetSpec,
        gateway: String,
        inbox: Arc<Inbox>,
    ) -> FleetWatcher {
        let stop = Arc::new(AtomicBool::new(false));
        let resend = Arc::new(AtomicBool::new(false));
        let (s, r) = (stop.clone(), resend.clone());
        let spawned = std::thread::Builder::new()
            .name("fleet-watch".into())
            .spawn(move || {
                let mut last: Option<Vec<FleetMember>> = None;
                while !s.load(Ordering::SeqCst) {
                    let members = crate::fleet::fleet_members(&paths, &fleet, &gateway);
                    if last.as_ref() != Some(&members) || r.swap(false, Ordering::SeqCst) {
                        tracing::debug!(me, ?members, "fleet changed");
                        inbox.push(Job::Fleet(members.clone()));
                        last = Some(members);
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot watch the fleet");
        }
        FleetWatcher { stop, resend }
    }
}
