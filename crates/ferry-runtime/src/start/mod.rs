//! The one start pipeline. Every way a VM comes to run on this host is a
//! *source* that only knows how to make a [`StartPlan`]:
//!
//! - [`blueprint`]: a cold boot (`ferry boot`, `ferry package`);
//! - [`bss`]: a cold boot of a node's boot data from a boot service
//!   (`ferry boot --from-bss URL --mac MAC`);
//! - [`package`]: a local package (`ferry run`, a clone, `run --detach`,
//!   `ferry up`, `ferry start` of a suspended VM);
//! - [`registry`]: a remote package, its disk served lazily (`ferry peer
//!   --from http://…`);
//! - [`incoming`]: a live migration from another peer (`ferry peer --from
//!   HOST:PORT`).
//!
//! [`execute`] runs any plan the same way: the accelerator event, the VM's
//! directory and its files, the engine, the caller's cancel wired to the
//! VM, the resume handshake or the wait for live, the network event. What
//! comes out is an [`OwnedVm`]: the VM and everything its owner
//! ([`crate::owner`]) needs to save it, move it or stop it.
//!
//! ```text
//!  blueprint ─┐
//!  bss ───────┤
//!  package ───┤   StartPlan   ┌──────────┐   OwnedVm   ┌───────┐
//!  registry ──┼──────────────▶│ execute  │────────────▶│ owner │──▶ save / move / stop
//!  incoming ──┘               └──────────┘             └───────┘
//! ```

pub mod blueprint;
pub mod bss;
pub mod incoming;
pub mod package;
pub mod registry;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_agent_proto::{Identity, Reply};
use ferry_engine::{AccelDecision, Engine, Provenance, SavedState};

use crate::error::StartError;
use crate::events::{Event, EventSink};
use crate::owner::{Held, OwnedVm, SaveInfo};
use crate::record::VmRecord;
use crate::vm::{BootImage, RestoreMemory, RunningVm, VmConfig};
use crate::vmdir::VmDir;
use crate::{Cancel, Paths};

/// Puts files into a VM's new directory before its engine starts.
pub type Prepare<'a> = Box<dyn FnOnce(&VmDir) -> Result<(), StartError> + 'a>;

/// How the engine starts the VM.
pub enum How {
    /// A cold boot; the plan waits for the service to be live.
    Boot,
    /// From a saved state; the guest is told it was resumed.
    Restore {
        /// Device state, memory file and provenance.
        state: SavedState,
        /// Shared (the VM owns the file) or private (a clone).
        memory: RestoreMemory,
        /// A new hostname and machine-id (clones).
        identity: Option<Identity>,
    },
    /// A paused VM waiting for a migration's state and disk; the source
    /// module finishes the protocol and resumes it.
    Receive {
        /// What the source says the VM was made with.
        provenance: Provenance,
        /// The disk's size.
        disk_size: u64,
    },
}

/// Everything needed to start one VM, whatever it comes from.
pub struct StartPlan<'a> {
    /// Its name.
    pub name: String,
    /// Kernel, initramfs, command line and disk.
    pub image: BootImage,
    /// Size, accelerator, network, console.
    pub config: VmConfig,
    /// The accelerator decision, reported as [`Event::Accel`].
    pub accel: AccelDecision,
    /// Boot, restore or receive.
    pub how: How,
    /// A directory claimed already (a suspended VM's, which keeps its
    /// record and logs); a new one is made otherwise.
    pub dir: Option<VmDir>,
    /// Files to put in place before the engine starts.
    pub prepare: Option<Prepare<'a>>,
    /// How long the service may take to be live.
    pub live_timeout: Duration,
    /// When the operation started (for the `ms` of events).
    pub started: Instant,
    /// A check that runs beside the engine's start (every chunk of a
    /// package) and must pass before the VM is called live.
    pub background_check: Option<JoinHandle<Result<u128, ferry_package::PackageError>>>,
    /// What the owner needs to save the VM later.
    pub save: SaveInfo,
    /// What must live as long as the VM (a package lock, a lazy disk).
    pub held: Held,
    /// A detached VM's record, written once it is live.
    pub record: Option<VmRecord>,
}

/// Runs `plan`: the one way a VM starts. Returns once the VM is live (for
/// a receive: once the engine waits for the migration's state).
pub fn execute(
    engine: &dyn Engine,
    paths: &Paths,
    mut plan: StartPlan<'_>,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<OwnedVm, StartError> {
    // What the source spent before the engine (opening a package, checking
    // the host, choosing the accelerator): the first part of a resume's
    // breakdown, which the engine's own figures never include.
    events.emit(phase("planned", plan.started));
    events.emit(Event::Accel {
        accel: plan.accel.accel,
        reason: plan.accel.reason.clone(),
    });
    let t = Instant::now();
    let prepare = plan.prepare.take();
    let dir = match plan.dir.take() {
        Some(d) => d,
        None => VmDir::create(paths, &plan.name)?,
    };
    let receiving = matches!(plan.how, How::Receive { .. });
    let vm = match &plan.how {
        How::Boot => RunningVm::boot_in(dir, engine, paths, &plan.image, &plan.config, prepare)?,
        How::Restore { state, memory, .. } => RunningVm::restore_in(
            dir,
            engine,
            paths,
            &plan.image,
            &plan.config,
            state,
            *memory,
            prepare,
        )?,
        How::Receive {
            provenance,
            disk_size,
        } => RunningVm::receive_in(
            dir,
            engine,
            paths,
            &plan.image,
            &plan.config,
            provenance,
            *disk_size,
        )?,
    };
    events.emit(phase("engine-started", t));
    // From here the caller's cancel reaches the VM's channel; one that
    // came while the VM was being made is delivered at once.
    let cancel_guard = vm.watch_cancel(cancel);
    let mut owned = OwnedVm {
        name: plan.name.clone(),
        vm,
        save: plan.save,
        record: plan.record,
        held: plan.held,
        _cancel: cancel_guard,
    };
    if receiving {
        return Ok(owned);
    }
    let vm = &mut owned.vm;
    let cold_boot = matches!(plan.how, How::Boot);
    let mut live = false;
    if let How::Restore { identity, .. } = plan.how {
        let t = Instant::now();
        live =
            matches!(vm.after_resume(identity)?, Reply::Resumed { ref status, .. } if status.live);
        events.emit(phase("guest-resumed", t));
        events.emit(Event::Resumed {
            name: plan.name.clone(),
            ms: plan.started.elapsed().as_millis() as u64,
        });
        emit_network(vm, events);
    }
    // The guest runs from verified cache entries already; a damaged
    // package still stops it here, before it is called live.
    if let Some(check) = plan.background_check.take() {
        match check.join() {
            Ok(Ok(ms)) => events.emit(Event::Phase {
                phase: "package-verified".into(),
                ms: ms as u64,
            }),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(StartError::Internal("the package verifier panicked".into())),
        }
    }
    if live {
        vm.set_live();
    } else {
        let t = Instant::now();
        vm.wait_live(plan.live_timeout)?;
        events.emit(phase("service-live", t));
    }
    vm.mark("running");
    events.emit(Event::Live {
        name: plan.name.clone(),
        ms: plan.started.elapsed().as_millis() as u64,
    });
    if cold_boot {
        emit_network(vm, events);
    }
    if let Some(record) = &owned.record {
        record.save(owned.vm.dir().path())?;
    }
    Ok(owned)
}

/// [`Event::Network`] for a VM that has a network.
pub(crate) fn emit_network(vm: &RunningVm, events: &dyn EventSink) {
    let status = vm.status();
    if let Some(netns) = status.netns {
        events.emit(Event::Network {
            netns,
            exposes: status.exposes,
        });
    }
}

pub(crate) fn phase(name: &str, since: Instant) -> Event {
    Event::Phase {
        phase: name.into(),
        ms: since.elapsed().as_millis() as u64,
    }
}

/// Chooses the accelerator for a saved VM: it can only resume on the one
/// it was saved with.
pub(crate) fn saved_accel(
    engine: &dyn Engine,
    choice: ferry_engine::AccelChoice,
    image: &BootImage,
    saved: ferry_engine::Accel,
) -> Result<AccelDecision, StartError> {
    let decision = engine.choose_accel(choice, &image.probe())?;
    if decision.accel != saved {
        return Err(StartError::Engine(ferry_engine::EngineError::Incompatible(format!(
            "the VM was saved with accelerator {} but this host runs {} ({}); rebuild the package here with 'ferry package'",
            saved,
            decision.accel,
            decision.reason.as_deref().unwrap_or("chosen")
        ))));
    }
    Ok(decision)
}

/// Refuses a VM bigger than this host's memory, before anything is made.
pub(crate) fn check_host_memory(memory_mib: u64) -> Result<(), StartError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib / 1024);
    match total_mib {
        Some(total) if memory_mib > total => Err(StartError::HostTooSmall {
            need_mib: memory_mib,
            have_mib: total,
        }),
        _ => Ok(()),
    }
}
