//! The interface between ferry and whatever runs its VMs.
//!
//! ferry's first engine drives QEMU; a native engine on the rust-vmm crates may
//! follow. Everything above this crate (runtime, packages, migration) speaks
//! only these types, so this crate names no hypervisor, machine type or wire
//! protocol of any engine. The shape follows Cloud Hypervisor's `Hypervisor`
//! trait: an [`Engine`] is a small, thread-safe factory, and each running
//! guest is a [`Vm`] whose optional abilities have default implementations
//! that say "not supported".
//!
//! Data flow: the runtime builds a [`VmSpec`], asks the engine to
//! [`Engine::boot`] or [`Engine::restore`] it, reads [`VmEvent`]s (console
//! output, exit) from the returned VM, and talks to the guest agent over the
//! byte stream from [`Vm::agent_stream`].
#![warn(missing_docs)]

pub mod memo;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The hardware-virtualisation choice the user makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// Use hardware virtualisation only where it really runs a Linux guest.
    Auto,
    /// Hardware virtualisation (Linux KVM).
    Kvm,
    /// Software emulation.
    Tcg,
}

/// The accelerator a VM actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation (Linux KVM).
    Kvm,
    /// Software emulation (binary translation).
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The accelerator chosen, and why when it is not the fast one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelDecision {
    /// What the VM will use.
    pub accel: Accel,
    /// Why hardware virtualisation is not used, if it is not.
    pub reason: Option<String>,
}

impl std::fmt::Display for AccelDecision {
    /// The one line ferry prints: `accel: kvm` or `accel: tcg (<why>)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            Some(why) => write!(f, "accel: {} ({why})", self.accel),
            None => write!(f, "accel: {}", self.accel),
        }
    }
}

/// A guest to probe an accelerator with: any kernel and initramfs whose init
/// prints [`PROBE_MARKER`] and powers off when `ferry.probe` is on the
/// kernel command line.
#[derive(Debug, Clone)]
pub struct ProbeGuest {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: PathBuf,
    /// Base kernel command line (`ferry.probe` is added).
    pub cmdline: String,
}

/// The guest NIC's MAC when the image names none ([`VmSpec::guest_mac`]).
/// Fixed, so a snapshot resumes with the same one; the host's side of
/// the guest's link knows it too (it writes the guest's neighbour entry
/// before the guest runs).
pub const DEFAULT_GUEST_MAC: &str = "52:54:00:fe:44:01";

/// What a probe guest prints when it has booted.
pub const PROBE_MARKER: &str = "FERRY-PROBE-OK";

/// The guest's root disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSpec {
    /// The VM writes to this raw image directly.
    Raw(PathBuf),
    /// The VM reads `base` (never written) and writes its changes to
    /// `overlay`, which the engine creates in its own format.
    CopyOnWrite {
        /// The pristine raw image.
        base: PathBuf,
        /// Where the changes go.
        overlay: PathBuf,
    },
    /// A raw disk served by a block server (NBD) on this Unix socket, e.g.
    /// one that fetches it lazily while the VM runs. Writes go there too.
    Nbd {
        /// The server's socket.
        socket: PathBuf,
    },
}

/// How the guest's network device is attached on the host.
#[derive(Debug, Clone)]
pub enum NetAttachment {
    /// The device exists (so snapshots are portable) but is connected to
    /// nothing.
    Isolated,
    /// A tap device, already created, in network namespace `netns` (the
    /// engine process runs there) or in the caller's own.
    Tap {
        /// The tap's interface name (for logs and errors).
        ifname: String,
        /// The namespace's nsfs path (e.g. `/run/netns/NAME`).
        netns: Option<PathBuf>,
        /// The tap, opened and attached by whoever made it, for the engine
        /// to hand its process as it is. The engine never attaches by
        /// name: that takes the kernel's network lock, which the rest of a
        /// VM's network, made at the same time, holds for milliseconds at
        /// a time, and a confined engine process could not.
        attached: std::sync::Arc<std::os::fd::OwnedFd>,
    },
}

/// Everything an engine needs to start a VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The VM's name, for logs and process titles.
    pub name: String,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Root disk.
    pub disk: DiskSpec,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM lives in this file, so that a snapshot need not copy it.
    pub memory_file: PathBuf,
    /// Whether guest writes reach `memory_file` (`true`) or stay private to
    /// this VM (`false`: copy-on-write, for restores and clones). A VM
    /// received private ([`Engine::receive`]) has no file to start from:
    /// its RAM is anonymous memory and `memory_file` is not used.
    pub memory_shared: bool,
    /// Accelerator.
    pub accel: Accel,
    /// Network device attachment.
    pub net: NetAttachment,
    /// The guest NIC's MAC (`aa:bb:cc:dd:ee:ff`); `None`:
    /// [`DEFAULT_GUEST_MAC`], the same for every guest.
    pub guest_mac: Option<String>,
    /// A directory the engine may use for its sockets and files.
    pub run_dir: PathBuf,
    /// Boot through the NIC's firmware (DHCP, then what it names), as a
    /// bare-metal node netboots, instead of loading `kernel` directly. The
    /// engine then emulates a PC with PCI devices and a network boot ROM
    /// (QEMU: `q35`, iPXE); `kernel`, `initramfs` and `cmdline` only say
    /// what the firmware is expected to load (the accelerator probe boots
    /// them). Only for boots; a netbooted VM is not saved or moved.
    pub netboot: bool,
}

/// Where a saved VM's state lives and what it was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// Device state (CPU registers, devices), engine-specific bytes.
    pub device_state: PathBuf,
    /// Guest RAM image (the VM's memory file at save time), or `None` when
    /// the RAM is inside the device state (VMs with private memory).
    pub memory_file: Option<PathBuf>,
    /// Provenance, checked before a restore.
    pub provenance: Provenance,
}

/// What a saved state was made with; a restore where these differ is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// Engine name.
    pub engine: String,
    /// Engine version.
    pub engine_version: String,
    /// CPU model presented to the guest.
    pub cpu_model: String,
    /// Accelerator.
    pub accel: Accel,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Memory the engine added beyond `memory_mib`, in KiB, for its own
    /// reasons (a restore must give the guest exactly the same size).
    /// Absent in states written before engines could add any.
    #[serde(default)]
    pub memory_extra_kib: u64,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Whether the VM has the shell channel (`ferry shell`). States made
    /// before it existed lack it (`false`), and a restore must give the
    /// guest the same devices, so such a VM keeps going without one.
    #[serde(default)]
    pub shell_port: bool,
}

impl Provenance {
    /// The guest's memory size in bytes, extra included.
    pub fn memory_bytes(&self) -> u64 {
        (self.memory_mib << 20) + (self.memory_extra_kib << 10)
    }
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ExitReason {
    /// The guest powered itself off.
    Poweroff,
    /// The guest rebooted (ferry VMs stop instead).
    Reset,
    /// The guest kernel panicked.
    Panic,
    /// ferry stopped it.
    Stopped,
    /// The engine process died or failed.
    EngineFailed {
        /// What the engine said last.
        detail: String,
    },
}

/// Something that happened to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// Bytes the guest wrote to its console.
    Console(Vec<u8>),
    /// The VM stopped running for good.
    Exited(ExitReason),
}

/// Engine errors. Messages name the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine's program is not installed.
    #[error("{program} not found: {fix}")]
    NotInstalled {
        /// The program looked for.
        program: String,
        /// How to install it.
        fix: String,
    },
    /// The requested accelerator cannot be used.
    #[error("accelerator {accel} is not usable here: {reason}")]
    AccelUnavailable {
        /// The accelerator.
        accel: Accel,
        /// Why.
        reason: String,
    },
    /// The engine failed to start the VM.
    #[error("the VM did not start: {0}")]
    StartFailed(String),
    /// A control command to the engine failed.
    #[error("{command} failed: {detail}")]
    Command {
        /// The operation.
        command: String,
        /// The engine's answer.
        detail: String,
    },
    /// The engine did not answer in time.
    #[error("{0} timed out")]
    Timeout(String),
    /// The VM is gone.
    #[error("the VM is not running ({0})")]
    NotRunning(String),
    /// The engine cannot do this.
    #[error("this engine does not support {0}")]
    Unsupported(&'static str),
    /// A saved state does not fit this engine or host.
    #[error("saved state does not fit: {0}")]
    Incompatible(String),
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// What must be done before a new guest runs, called by the engine at the
/// last moment (see [`Engine::boot_gated`]).
pub type BeforeRun<'a> = &'a mut dyn FnMut() -> Result<(), EngineError>;

/// A way to run VMs.
pub trait Engine: Send + Sync {
    /// Short name, recorded in saved states.
    fn name(&self) -> &'static str;

    /// The engine's version, recorded in saved states.
    fn version(&self) -> Result<String, EngineError>;

    /// The CPU model presented to guests with `accel`, recorded in saved states.
    fn cpu_model(&self, accel: Accel) -> String;

    /// Chooses the accelerator. `Auto` tries hardware virtualisation with a
    /// real guest (`probe`) rather than trusting that `/dev/kvm` exists.
    fn choose_accel(
        &self,
        choice: AccelChoice,
        probe: &ProbeGuest,
    ) -> Result<AccelDecision, EngineError>;

    /// Cold-boots a VM.
    fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, EngineError>;

    /// Starts a VM from a saved state; it runs when this returns.
    fn restore(&self, spec: &VmSpec, state: &SavedState) -> Result<Box<dyn Vm>, EngineError>;

    /// As [`Engine::boot`], calling `before_run` once the engine is ready
    /// and before the guest's first instruction: what the guest must not
    /// run without (its firewall) is made while the engine starts, not
    /// before it. An error from `before_run` stops the VM and is returned.
    /// By default `before_run` simply comes first.
    fn boot_gated(
        &self,
        spec: &VmSpec,
        before_run: BeforeRun<'_>,
    ) -> Result<Box<dyn Vm>, EngineError> {
        before_run()?;
        self.boot(spec)
    }

    /// As [`Engine::restore`], calling `before_run` once the state is
    /// loaded and before the guest runs (see [`Engine::boot_gated`]).
    fn restore_gated(
        &self,
        spec: &VmSpec,
        state: &SavedState,
        before_run: BeforeRun<'_>,
    ) -> Result<Box<dyn Vm>, EngineError> {
        before_run()?;
        self.restore(spec, state)
    }

    /// Starts the receiving end of a live move: a VM that stays paused
    /// while another engine fills its disk (exported, writable, on
    /// `incoming.disk_socket`, or written by the caller into the spec's
    /// disk file) and sends its running state (on the
    /// connection given to [`Vm::receive_state`]). `provenance` is the
    /// sender's, checked as a restore's is. Then [`Vm::wait_received`],
    /// [`Vm::end_disk_export`] and [`Vm::resume`] make it run here.
    fn receive(
        &self,
        _spec: &VmSpec,
        _provenance: &Provenance,
        _incoming: &Incoming,
    ) -> Result<Box<dyn Vm>, EngineError> {
        Err(EngineError::Unsupported("receiving a live VM"))
    }
}

/// Where a VM being received live gets its disk from (its state comes on
/// a connection handed over later: [`Vm::receive_state`]).
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Unix socket where the engine serves the (empty, writable) disk for
    /// the sender to fill, as NBD export [`DISK_EXPORT_NAME`]; `None`: the
    /// caller fills the VM's disk file itself while the VM waits paused
    /// (ferry serves it on the peer's connection), and the engine only
    /// opens it, as the VM's disk, reading nothing of it until it resumes.
    pub disk_socket: Option<PathBuf>,
}

/// The NBD export name of a disk being received.
pub const DISK_EXPORT_NAME: &str = "disk0";

/// Limits for sending a running VM.
#[derive(Debug, Clone, Copy)]
pub struct LiveLimits {
    /// The longest pause the engine may plan for the final copy.
    pub max_downtime: Duration,
    /// Bytes per second at most.
    pub max_bandwidth: u64,
    /// Give up after this long.
    pub timeout: Duration,
}

impl Default for LiveLimits {
    fn default() -> Self {
        LiveLimits {
            max_downtime: Duration::from_millis(50),
            max_bandwidth: 10 << 30,
            timeout: Duration::from_secs(600),
        }
    }
}

/// What sending a running VM took, as the engine measured it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveStats {
    /// From start to the VM paused here, state all sent.
    pub total_ms: u64,
    /// The engine's own figure for how long the VM was paused.
    pub downtime_ms: u64,
    /// Bytes of running state (RAM and devices) sent.
    pub state_bytes: u64,
    /// Bytes on the wire in all (state and disk), if the caller counted.
    #[serde(default)]
    pub wire_bytes: u64,
    /// The downtime limit the engine sized the last pass by, in ms
    /// ([`LiveLimits::max_downtime`] for ferry-qemu; sources of ferry
    /// before 2026-12-07 started a copy at 15 ms and said which limit it
    /// ended under). 0: not known (an engine or a source that does not
    /// say).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub downtime_limit_ms: u64,
    /// The most the engine slowed the guest's vCPUs, in percent of their
    /// time, so that a copy the guest's writes outran could end: a guest
    /// that writes memory faster than the link carries it never leaves the
    /// copy little enough for the last pass, and would fail at the timeout
    /// instead. 0: never slowed (or an engine that does not say).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub throttle_pct: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A running VM. Dropping it kills the VM: nothing outlives its owner.
pub trait Vm: Send {
    /// Process id of the engine process, if it has one.
    fn pid(&self) -> Option<u32>;

    /// The engine process's cgroup directory, when the engine made one for
    /// it (shown by `ferry ps --json`).
    fn cgroup(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// The event stream; `None` after the first call.
    fn take_events(&mut self) -> Option<Receiver<VmEvent>>;

    /// A fresh connection to the guest agent's channel. The previous one, if
    /// any, is closed by the engine.
    fn agent_stream(&self) -> Result<UnixStream, EngineError>;

    /// A fresh connection to the guest's shell channel (`ferry shell`), or
    /// `Unsupported` when the engine or this VM has none. The previous
    /// connection, if any, is closed by the engine.
    fn shell_stream(&self) -> Result<UnixStream, EngineError> {
        Err(EngineError::Unsupported("the shell channel"))
    }

    /// A writer into the guest's serial console (what a user would type), or
    /// `None` after the first call or if the engine has none.
    fn take_console_input(&mut self) -> Option<Box<dyn std::io::Write + Send>> {
        None
    }

    /// Stops the vCPUs.
    fn pause(&mut self) -> Result<(), EngineError> {
        Err(EngineError::Unsupported("pause"))
    }

    /// Starts the vCPUs again.
    fn resume(&mut self) -> Result<(), EngineError> {
        Err(EngineError::Unsupported("resume"))
    }

    /// Saves a paused VM's device state to `device_state`; guest RAM is
    /// already in the memory file. Flushes the disk first.
    fn save_state(&mut self, _device_state: &std::path::Path) -> Result<SavedState, EngineError> {
        Err(EngineError::Unsupported("saving state"))
    }

    /// Writes the guest's disk as it is now (the pristine image plus the
    /// VM's changes) to `dest` as a sparse raw image. Call it on a paused VM
    /// whose state was just saved, so that disk and memory agree.
    fn export_disk(&mut self, _dest: &std::path::Path) -> Result<(), EngineError> {
        Err(EngineError::Unsupported("exporting the disk"))
    }

    /// Has the engine read and write the guest's disk in `file` directly,
    /// instead of through the NBD server it was started on
    /// ([`DiskSpec::Nbd`]), which wrote it to `file`: for a lazy disk that
    /// is complete, whose server only adds a copy and a context switch to
    /// every request (a move's disk copy read the whole disk through it,
    /// on the CPU the guest needed). In-flight requests finish first; the
    /// guest sees nothing. A no-op for a disk that is not served.
    fn use_local_disk(&mut self, _file: &std::path::Path) -> Result<(), EngineError> {
        Err(EngineError::Unsupported(
            "switching the disk to its local file",
        ))
    }

    /// Starts copying the disk, as the guest sees it, to the NBD export
    /// [`DISK_EXPORT_NAME`] at the other end of `target`, a connected
    /// stream (to the receiver's [`Incoming::disk_socket`], directly or
    /// through a tunnel), and keeps later guest writes flowing there.
    /// Returns once the copy has caught up.
    fn start_disk_copy(&mut self, _target: OwnedFd) -> Result<(), EngineError> {
        Err(EngineError::Unsupported("copying the disk live"))
    }

    /// Sends the running state on `stream`, a connected stream to the
    /// receiver's [`Vm::receive_state`] (directly or through a tunnel),
    /// while the guest runs, then pauses it for the last pass. Returns with
    /// the VM paused here.
    fn send_state(
        &mut self,
        _stream: OwnedFd,
        _limits: &LiveLimits,
    ) -> Result<LiveStats, EngineError> {
        Err(EngineError::Unsupported("sending the state live"))
    }

    /// On the receiving end ([`Engine::receive`]): reads the running state
    /// from `stream`, a connected stream from the sender's
    /// [`Vm::send_state`], from now on. The engine reads it itself: for a
    /// plain connection between peers, the peer's TCP connection.
    fn receive_state(&mut self, _stream: OwnedFd) -> Result<(), EngineError> {
        Err(EngineError::Unsupported("receiving a live VM"))
    }

    /// After [`Vm::send_state`]: flushes the last disk writes to the target
    /// and stops copying. When it returns `Ok`, every write has been
    /// acknowledged by the target and nothing more is sent on the copy's
    /// connection, which stays open (idle) until
    /// [`Vm::release_disk_copy`]: closing it took QEMU about 55 ms here,
    /// with the guest paused, so it is done after the receiver was told to
    /// switch.
    fn finish_disk_copy(&mut self) -> Result<(), EngineError> {
        Err(EngineError::Unsupported("copying the disk live"))
    }

    /// After [`Vm::finish_disk_copy`]: closes the copy's idle connection.
    fn release_disk_copy(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    /// Cancels a state send and disk copy in progress (the VM stays here;
    /// call [`Vm::resume`] if it was paused).
    fn abort_send(&mut self) -> Result<(), EngineError> {
        Err(EngineError::Unsupported("sending the state live"))
    }

    /// After a [`Vm::send_state`] that completed: makes the VM savable
    /// again ([`Vm::save_state`]) and leaves it paused. QEMU will not save
    /// a VM whose state it has sent until the VM has run again, so this
    /// lets it run for the moment of two commands: the caller cuts the
    /// guest off first (its other copy may be running). For a VM whose
    /// move was left in doubt, the only way to keep it.
    fn reclaim_sent(&mut self) -> Result<(), EngineError> {
        Err(EngineError::Unsupported("saving a VM it has sent"))
    }

    /// On the receiving end: waits until the whole state has arrived.
    fn wait_received(&mut self, _timeout: Duration) -> Result<(), EngineError> {
        Err(EngineError::Unsupported("receiving a live VM"))
    }

    /// On the receiving end, once the sender said its copy is finished
    /// ([`Vm::finish_disk_copy`] returned `Ok` there): stops serving the
    /// disk, cutting the sender's connection, which is idle by then, so
    /// that nothing but this VM writes it from now on. A no-op where the
    /// caller filled the disk ([`Incoming::disk_socket`] `None`).
    fn end_disk_export(&mut self) -> Result<(), EngineError> {
        Err(EngineError::Unsupported("receiving a live VM"))
    }

    /// Asks the guest to power off (as a power button would), waits up to
    /// `timeout`, then kills it.
    fn shutdown(&mut self, timeout: Duration) -> Result<ExitReason, EngineError>;

    /// Kills the VM now.
    fn kill(&mut self);

    /// Waits until the VM has exited, up to `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitReason>;
}

/// A file's identity as caches of facts about it key on (the QEMU engine's
/// memo of versions, digests and overlays; the runtime's record of checked
/// packages): its canonical path, device, inode, size, and modification and
/// status-change times. The status-change time moves on every write and
/// cannot be set back from user space, so a changed file has another
/// identity. `None` if the file cannot be read.
pub fn file_identity(file: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let canonical = std::fs::canonicalize(file).ok()?;
    let m = std::fs::metadata(&canonical).ok()?;
    Some(format!(
        "{}|{}|{}|{}|{}.{}|{}.{}",
        canonical.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}
