//! One QEMU process running one guest.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_engine::{
    Accel, BeforeRun, DiskSpec, EngineError, ExitReason, Incoming, LiveLimits, LiveStats,
    NetAttachment, Provenance, SavedState, Vm, VmEvent, VmSpec, DISK_EXPORT_NAME,
};
use serde_json::{json, Value};

use crate::cgroup::VmCgroup;
use crate::confine::{Handed, QemuUser};
use crate::qmp::{Qmp, QmpError, QmpEvent};
use crate::version::QemuVersion;

/// How much of QEMU's error output is kept for error messages.
const STDERR_TAIL: usize = 4096;

/// How long a failed connection to the agent socket waits for QEMU's exit.
/// QEMU closes its agent channel and removes the socket on its way out,
/// before the process has ended and its exit reason is known: a connect
/// that fails then is QEMU exiting, and its reason is the error to give.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// How long the waiter lets the stderr reader drain what QEMU said last.
const STDERR_DRAIN: Duration = Duration::from_millis(200);

/// State shared with the threads that watch the process.
#[derive(Default)]
struct Watch {
    exit: Mutex<Option<ExitReason>>,
    exited: Condvar,
    /// The reason QEMU gave in its last `SHUTDOWN` event.
    shutdown_reason: Mutex<Option<String>>,
    stderr_tail: Mutex<String>,
    /// Set once QEMU's stderr is closed (all of it is in `stderr_tail`).
    stderr_done: Mutex<bool>,
    stderr_closed: Condvar,
    /// Set once QEMU's stdout (the guest's console) is closed and all of it
    /// was sent as [`VmEvent::Console`]: the exit event comes after it, so
    /// the owner sees a panic's last console lines before the exit.
    console_done: Mutex<bool>,
    console_closed: Condvar,
    /// The process's cgroup, removed by the waiter once QEMU is gone.
    cgroup: Mutex<Option<Arc<VmCgroup>>>,
    /// How many events that may end a wait for a migration or a block job
    /// QEMU has sent ([`WAKING_EVENTS`]), and QEMU's exit: the waits query
    /// QEMU when this moves (or after [`QUERY_FALLBACK`]), not every
    /// millisecond.
    wakes: Mutex<u64>,
    woken: Condvar,
}

impl Watch {
    /// Counts a wake and wakes the waits.
    fn wake(&self) {
        *self.wakes.lock().expect("watch") += 1;
        self.woken.notify_all();
    }

    /// The wakes so far: read before a query, handed to [`Watch::wait_wake`]
    /// after it, so that an event between the two is not missed.
    fn wakes(&self) -> u64 {
        *self.wakes.lock().expect("watch")
    }

    /// Waits until the wakes move past `seen`, at most `max`; returns the
    /// wakes then.
    fn wait_wake(&self, seen: u64, max: Duration) -> u64 {
        let guard = self.wakes.lock().expect("watch");
        let (guard, _) = self
            .woken
            .wait_timeout_while(guard, max, |n| *n == seen)
            .expect("watch");
        *guard
    }
}

/// The QMP events after which a migration's or a block job's state may
/// have changed. With the `events` capability on, QEMU sends `MIGRATION`
/// at every change of a migration's status and `MIGRATION_PASS` at every
/// pass; a job's every change of status is a `JOB_STATUS_CHANGE`.
///
/// Why not poll: ferry asked `query-migrate` every 2 ms for a whole copy,
/// and `query-block-jobs` every millisecond while the disk was copied:
/// thousands of QMP round trips a move, each served by QEMU's main loop
/// and parsed by ferry. On this host that is little; in the KVM lab,
/// where every instruction of ferry and QEMU is emulated, it was CPU taken
/// from the guest whose clients the move is meant to spare.
const WAKING_EVENTS: &[&str] = &[
    "MIGRATION",
    "MIGRATION_PASS",
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_READY",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_ERROR",
];

/// The longest a wait for a migration or a block job goes without asking
/// QEMU, events or not: a safety net, and the step of a wait's own timers
/// (the downtime limit's relaxation, its time limit).
const QUERY_FALLBACK: Duration = Duration::from_millis(100);

/// A running QEMU process.
pub struct QemuVm {
    pid: u32,
    qmp: Arc<Qmp>,
    watch: Arc<Watch>,
    events: Option<Receiver<VmEvent>>,
    /// QEMU's standard input is the serial console's input.
    stdin: Option<ChildStdin>,
    agent_socket: PathBuf,
    /// The shell channel's socket, when the VM has one.
    shell_socket: Option<PathBuf>,
    /// The agent connection made before a cold-booted guest ran, handed
    /// out by the first [`Vm::agent_stream`].
    first_agent: Mutex<Option<UnixStream>>,
    provenance: Provenance,
    /// This QEMU's release.
    version: QemuVersion,
    /// The QEMU release that made the state being loaded, when it is not
    /// this one: a failure to load it is then the state's, and said so.
    state_from: Option<String>,
    /// Whether guest writes reach `memory_file` (shared mapping).
    memory_in_file: bool,
    /// Whether guest memory is `memory_file` mapped, shared or private
    /// (not anonymous): see [`prefetch_memory`].
    memory_mapped: bool,
    memory_file: PathBuf,
    /// The file QEMU writes the guest's disk to.
    disk_file: PathBuf,
    /// What `disk_file` is.
    disk_kind: DiskKind,
    /// The image tool of the same QEMU.
    qemu_img: PathBuf,
    /// The process's cgroup directory, when it has one.
    cgroup: Option<PathBuf>,
    /// While a live copy arrives: see [`Writeback`].
    writeback: Option<Writeback>,
    /// QEMU's NBD server for an arriving disk runs, its export ended or
    /// not: it is stopped after the guest runs (see `end_disk_export`).
    nbd_serving: bool,
}

/// Brings the whole of a guest's memory file into the page cache, in a
/// thread of its own, ahead of QEMU reading every page of it: a live copy
/// (started with the disk copy that comes first) or a save with the RAM
/// in the state (a clone's).
///
/// A resumed guest's memory file is mostly holes (pages it never wrote),
/// and its page cache cold. QEMU's first pass then faults the holes in
/// one 4 KiB page at a time, each allocated and zeroed: for a 512 MiB
/// Redis guest that was 2.6-3.3 s of the migration thread's time (`perf`:
/// 79% `memset` under `ext4_mpage_readpages`), the memory phase of every
/// bench/migrate move, against the raw engine's 0.14 s from a warm file.
/// Readahead over the same file takes about 0.2 s. On tmpfs, which has
/// no readahead, the holes are faulted in here instead (see
/// [`populate_shmem`]). Best effort: a failure only costs time. The handle
/// is for tests.
///
/// It runs at the priority of the rest of ferry. At `SCHED_IDLE` (tried
/// in the KVM lab, one CPU for both peers and a serving guest) the client
/// waited 4.2 s, and a loaded move failed when the disk copy's NBD
/// handshake hit QEMU's 10 s limit: most likely the starved prefetch was
/// preempted holding page-cache pages of the memory file, locked while it
/// filled them, that the guest's vCPU then faulted on.
fn prefetch_memory(path: &Path) -> Option<std::thread::JoinHandle<()>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!("not prefetching {}: {e}", path.display());
            return None;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("vm-prefetch".into())
        .spawn(move || {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let done = if on_tmpfs(&file) {
                populate_shmem(&file, len)
            } else {
                read_ahead(&file, len)
            };
            if let Err(e) = done {
                tracing::debug!("prefetching guest memory: {e}");
            }
        });
    spawned
        .map_err(|e| tracing::debug!("no prefetch thread: {e}"))
        .ok()
}

/// The step of [`read_ahead`] and [`populate_shmem`]: small enough that a
/// failure partway has still done the part before it.
const PREFETCH_STEP: u64 = 2 << 20;

/// Whether `file` is on tmpfs (or shmem), where readahead does nothing.
fn on_tmpfs(file: &std::fs::File) -> bool {
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on a descriptor `file` keeps open, into `fs`.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) };
    rc == 0 && fs.f_type == libc::TMPFS_MAGIC
}

/// Starts readahead over the whole of `file`, 2 MiB at a time.
fn read_ahead(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    let mut offset = 0;
    while offset < len {
        let step = PREFETCH_STEP.min(len - offset);
        // SAFETY: posix_fadvise on a descriptor `file` keeps open, over a
        // range of it; it only starts readahead and touches no memory of
        // this process.
        let err = unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                offset as libc::off_t,
                step as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(err));
        }
        offset += step;
    }
    Ok(())
}

/// Faults in every page of a tmpfs `file` through a read-only shared
/// mapping (`MADV_POPULATE_READ`), so that its holes get their pages here
/// and not one by one under QEMU's migration thread. A hole on tmpfs gets
/// a page at its first read fault whoever reads it, so this adds no memory
/// that the live copy would not add; it only moves the work off the
/// copy's path, beside the disk copy that comes first.
fn populate_shmem(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    let Ok(size) = usize::try_from(len) else {
        return Ok(());
    };
    if size == 0 {
        return Ok(());
    }
    // SAFETY: a new read-only shared mapping of `size` bytes of a file
    // `file` keeps open; nothing here reads or writes through it, and it
    // is unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mut result = Ok(());
    let mut offset = 0usize;
    while offset < size {
        let step = (PREFETCH_STEP as usize).min(size - offset);
        // SAFETY: `addr + offset .. + step` lies inside the mapping made
        // above; MADV_POPULATE_READ only faults its pages in.
        let rc = unsafe {
            libc::madvise(
                addr.cast::<u8>().add(offset).cast(),
                step,
                libc::MADV_POPULATE_READ,
            )
        };
        if rc != 0 {
            result = Err(std::io::Error::last_os_error());
            break;
        }
        offset += step;
    }
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, size) };
    result
}

/// Writes a received guest's memory file back to disk while the copy
/// arrives. When an incoming migration ends, QEMU msyncs the whole of
/// every file-backed RAM block it loaded (`ram_load_cleanup`), before it
/// says `completed`, with the guest paused on both hosts: every page that
/// arrived during the live copy was still dirty, and that msync took 44 ms
/// here (512 MiB guest, 77 MB received), a fifth of a move's client-seen
/// gap. Started as the pages arrive, writeback leaves that msync the last
/// pass's pages only.
struct Writeback {
    /// Dropped to stop the thread, which wakes at once and ends on its own:
    /// the switch does not wait for it (`sync_file_range` may block while
    /// the device's queue is full).
    _stop: std::sync::mpsc::Sender<()>,
}

impl Writeback {
    /// How often writeback of what arrived since is started.
    const EVERY: Duration = Duration::from_millis(20);

    fn start(path: &Path) -> std::io::Result<Writeback> {
        let file = std::fs::File::open(path)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("vm-writeback".into())
            .spawn(move || loop {
                // SAFETY: sync_file_range on a descriptor this thread owns;
                // the whole file, start writeback only (it does not wait
                // for it and has no memory effects here).
                unsafe {
                    libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
                };
                match stopped.recv_timeout(Self::EVERY) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            })?;
        Ok(Writeback { _stop: stop })
    }
}

/// Which QEMU runs, and how it finds its data.
pub struct Launch<'a> {
    /// The `qemu-system-x86_64` binary.
    pub program: &'a Path,
    /// Passed as `-L`, in order.
    pub data_dirs: &'a [PathBuf],
    /// The image tool of the same QEMU.
    pub qemu_img: &'a Path,
    /// ferry's cache, where overlay templates are kept (`memo`).
    pub cache_dir: &'a Path,
    /// The firmware to name with `-bios`, or `None` for QEMU's default.
    pub bios: Option<&'a str>,
    /// Its release.
    pub version: QemuVersion,
    /// How QEMU is confined.
    pub confine: &'a crate::Confine,
}

/// How a QEMU process starts.
pub enum Start<'a> {
    /// A cold boot; the guest runs after the callback.
    Boot(BeforeRun<'a>),
    /// From a saved state; runs once loaded and after the callback.
    Restore(&'a SavedState, BeforeRun<'a>),
    /// Paused, waiting for a live VM's disk and state, sent by a VM made
    /// as the provenance says.
    Receive(&'a Incoming, &'a Provenance),
}

/// How long a sending VM's devices get to finish in-flight work once its
/// vCPUs stopped, before the last pass (see `send_state`).
const DRAIN_MS: u64 = 10;

/// How long a live copy iterates past its first pass, the guest at full
/// speed, before QEMU may slow the guest to make it converge (see
/// `send_state`): a few passes under the limit asked for.
const ITERATING_THROTTLE: Duration = Duration::from_secs(5);

/// The first QEMU with the `avail-switchover-bandwidth` migration
/// parameter (see `send_state`).
const SWITCHOVER_BANDWIDTH_SINCE: QemuVersion = QemuVersion::new(8, 2, 0);

/// The rate (bytes a second) a live copy has sent at since it began, from
/// `query-migrate`'s answer: asked once its first pass is over, the rate
/// of that pass, in which every page went once. `None` before QEMU has
/// figures.
fn first_pass_rate(info: &Value) -> Option<u64> {
    let bytes = info["ram"]["transferred"].as_u64()?;
    let ms = info["total-time"].as_u64().filter(|&ms| ms > 0)?;
    Some(bytes.saturating_mul(1000) / ms).filter(|&rate| rate > 0)
}

/// The share (percent) of what a period of the copy sent that the guest
/// must have dirtied again in it, in two periods, for QEMU to slow it once
/// armed: QEMU's own default. A guest rewriting the same memory faster
/// than the link carries it dirties about all of it.
const THROTTLE_TRIGGER_PCT: u64 = 50;

/// Guest memory added under TCG on QEMU before 9.0, so that the RAM
/// block's length is not a multiple of 64 pages.
///
/// QEMU before 9.0 has a fast path for syncing the migration dirty bitmap of
/// a RAM block whose length is a multiple of 64 pages, and that path forgets
/// to re-arm TCG's write tracking ("physmem: Fix migration dirty bitmap
/// coherency with TCG memory access", QEMU commit of 2024-02). Guest writes
/// made during a live copy are then lost: the guest arrives with corrupt
/// kernel lists. Two extra pages make QEMU take its exact per-page path.
/// The price: QEMU then syncs that block page by page, which stalls the
/// guest during a live copy (about half of a migration's client-seen gap
/// on QEMU 7.2 here). KVM's dirty log is not affected, and QEMU 9.0 fixed
/// the fast path, so there guests get exactly what they ask.
///
/// A state keeps the figure it was made with (`memory_extra_kib` in its
/// provenance) wherever it resumes: RAM sizes must match to load.
pub const TCG_MEMORY_EXTRA_KIB: u64 = 8;

/// The memory the engine adds for `accel` on a cold boot with QEMU
/// `version` (see [`TCG_MEMORY_EXTRA_KIB`]).
pub fn memory_extra_kib(accel: Accel, version: QemuVersion) -> u64 {
    match accel {
        Accel::Tcg if version.tcg_needs_extra_memory() => TCG_MEMORY_EXTRA_KIB,
        Accel::Tcg | Accel::Kvm => 0,
    }
}

/// QEMU's seccomp filter: besides its default list, no obsolete system
/// calls, no change of user or group, no new processes or programs, no
/// scheduler or resource-limit changes. Nothing ferry asks of QEMU needs
/// them once saves and restores go through descriptors (`fd:`).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The name under which QEMU holds the file a state is saved to or
/// loaded from, or the connection a live move's state travels on.
const STATE_FD: &str = "ferry-state";

/// Set to `1`: a TCG guest's QEMU keeps transparent huge pages
/// (to measure what turning them off buys; see `QemuVm::start`).
const KEEP_HUGE_PAGES_ENV: &str = "FERRY_QEMU_THP";

/// The disk's format node: what an NBD export names.
const DISK_NODE: &str = "disk0-format";

/// The thread the disk's I/O runs in (see `qemu_args`).
const DISK_IOTHREAD: &str = "disk-io";

/// The protocol node of a lazy disk's local file, once QEMU reads it
/// directly (see `QemuVm::use_local_disk`).
const LOCAL_DISK_NODE: &str = "ferry-local-disk";

/// What the file QEMU writes the guest's disk to is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskKind {
    /// A raw image (a received disk, a lazy disk's complete file): never
    /// probed, as the guest writes its first bytes.
    Raw,
    /// The copy-on-write overlay ferry made (qcow2; raw without qemu-img).
    Overlay,
    /// An NBD server's socket (a lazy disk, served by ferry).
    Nbd,
}

/// The block job that copies the disk to a receiver.
const MIRROR_JOB: &str = "ferry-mirror";

/// The receiver's disk, as a block node of the sender.
const MIRROR_TARGET: &str = "ferry-mirror-target";

/// The name of the connection to the receiver's disk, handed to QEMU.
const MIRROR_FD: &str = "ferry-mirror-conn";

/// The name of the listening socket for an incoming disk, handed to QEMU.
const INCOMING_DISK_FD: &str = "ferry-incoming-disk";

impl QemuVm {
    /// Starts QEMU for `spec`, as `start` says.
    pub fn start(
        launch: &Launch<'_>,
        spec: &VmSpec,
        start: Start<'_>,
        provenance: Provenance,
    ) -> Result<Self, EngineError> {
        std::fs::create_dir_all(&spec.run_dir)
            .map_err(|e| io(format!("creating {}", spec.run_dir.display()), e))?;
        if let DiskSpec::CopyOnWrite { base, overlay } = &spec.disk {
            create_overlay(launch.qemu_img, launch.cache_dir, base, overlay)?;
        }
        // A guest received private arrives into anonymous memory: every
        // page comes with it, and a file's pages would cost the move (see
        // `Flags::anonymous_memory`).
        let anonymous_memory = matches!(start, Start::Receive(..)) && !spec.memory_shared;
        // QEMU would make a missing memory file with the umask's mode
        // (0644): guest RAM is for its owner only, so make it 0600 first
        // (QEMU only grows an empty file to the guest's size).
        if !anonymous_memory && !spec.memory_file.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&spec.memory_file)
                .map_err(|e| io(format!("creating {}", spec.memory_file.display()), e))?;
        }
        let qmp_socket = spec.run_dir.join("qmp.sock");
        let agent_socket = spec.run_dir.join("agent.sock");
        let shell_socket = provenance
            .shell_port
            .then(|| spec.run_dir.join("shell-port.sock"));
        let _ = std::fs::remove_file(&qmp_socket);
        let _ = std::fs::remove_file(&agent_socket);
        if let Some(s) = &shell_socket {
            let _ = std::fs::remove_file(s);
        }

        // Only a boot loads a kernel; a guest that arrives brings its own
        // (see `Flags::incoming`).
        let boot = matches!(start, Start::Boot(_));
        let state_from = match &start {
            Start::Boot(_) => None,
            Start::Restore(state, _) => Some(&state.provenance.engine_version),
            Start::Receive(_, sender) => Some(&sender.engine_version),
        }
        .filter(|v| **v != provenance.engine_version)
        .cloned();
        // A QEMU that runs as another user gets what it needs as
        // descriptors (see `Handed`).
        let mut handed = Handed::default();
        let over = match launch.confine.user {
            Some(user) => hand_over(
                spec,
                launch,
                HandOver {
                    qmp: &qmp_socket,
                    agent: &agent_socket,
                    shell: shell_socket.as_deref(),
                    user,
                    kernel: boot,
                    memory_file: !anonymous_memory,
                },
                &mut handed,
            )?,
            None => Overrides::default(),
        };
        // The tap comes attached: QEMU gets it as it is, confined or not
        // (see `NetAttachment::Tap`).
        let netdev = match &spec.net {
            NetAttachment::Isolated => Netdev::Hub,
            NetAttachment::Tap { attached, .. } => {
                let dup = attached
                    .try_clone()
                    .map_err(|e| io("duplicating the tap's descriptor".into(), e))?;
                Netdev::Tap(handed.keep(dup))
            }
        };
        let qemu = launch.program;
        let mut cmd = Command::new(qemu);
        for dir in launch.data_dirs {
            cmd.arg("-L").arg(dir);
        }
        // A netboot runs `q35`'s own firmware (SeaBIOS), which runs the
        // NIC's boot ROM; qboot runs none.
        let netboot_rom = match spec.netboot {
            true => Some(netboot_rom(launch.data_dirs)?),
            false => None,
        };
        if let (Some(bios), false) = (launch.bios, spec.netboot) {
            cmd.args(["-bios", bios]);
        }
        cmd.args(qemu_args(
            spec,
            provenance.memory_bytes() >> 10,
            &qmp_socket,
            &agent_socket,
            shell_socket.as_deref(),
            Flags {
                incoming: !boot,
                // A cold boot starts paused so that the agent socket is
                // connected before the guest can run (and stop, taking the
                // socket with it).
                paused: matches!(start, Start::Receive(..) | Start::Boot(_)),
                netboot_rom,
                tsc_khz: match spec.accel {
                    Accel::Tcg => host_tsc_khz(launch.cache_dir),
                    Accel::Kvm => None,
                },
                netdev,
                anonymous_memory,
                disk_iothread: launch.version.disk_iothread(spec.accel),
                tcg_tb_mib: launch
                    .confine
                    .caps_tcg_cache()
                    .then_some(crate::confine::TCG_TB_SIZE_MIB),
                over,
            },
        ));
        if launch.confine.sandbox {
            cmd.args(["-sandbox", SANDBOX]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // QEMU runs inside the VM's network namespace, where its tap is.
        let netns = match &spec.net {
            NetAttachment::Tap {
                netns: Some(path), ..
            } => Some(
                std::fs::File::open(path)
                    .map_err(|e| io(format!("opening network namespace {}", path.display()), e))?,
            ),
            _ => None,
        };
        let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        // Its own cgroup, under ferry's, entered by the child before exec.
        let cgroup = match &launch.confine.cgroup {
            Some(parent) => {
                let disk_on_tmpfs = disk_bytes_on_tmpfs(&spec.disk);
                let limit =
                    provenance.memory_bytes() + launch.confine.memory_overhead + disk_on_tmpfs;
                match VmCgroup::create(
                    parent,
                    &spec.name,
                    limit,
                    launch.confine.memory_overhead,
                    disk_on_tmpfs,
                    crate::confine::PIDS_MAX,
                ) {
                    Ok(c) => Some(Arc::new(c)),
                    // Degraded, not refused: the VM runs with the rest of
                    // its confinement, and the log says why.
                    Err(e) => {
                        tracing::warn!(
                            "QEMU runs without a cgroup of its own: cannot make one under {}: {e}",
                            parent.display()
                        );
                        None
                    }
                }
            }
            None => None,
        };
        let handed_fds = handed.raw().to_vec();
        let user = launch.confine.user;
        // A TCG guest's QEMU gets no transparent huge pages. QEMU asks for
        // them on all guest RAM and on its translation cache:
        // - after a move each first write to an untouched 2 MiB of anonymous
        //   RAM, or of the empty cache, had the kernel clear a whole huge
        //   page on the vCPU's thread, guest running, client waiting. `perf`
        //   of the destination from the clients' cut to their first answer
        //   (bench/migrate, 2 kHz): 70-120 ms of the vCPU's time in
        //   `clear_page_erms`, against 10-70 ms for the raw engine, whose
        //   guest memory is a private file mapping and never gets huge
        //   pages. Without them (A/B, one bench run each): the idle move's
        //   client-seen gap 306 -> 193 ms (raw engine 200 and 206 ms), under
        //   write load 389 -> 339 ms (noisy; raw 199 and 185 ms);
        // - an idle clone's translation cache was held in 2 MiB pages, 20 MiB
        //   where 18 MiB were used, and a 2 MiB buffer beside it where 1 MiB
        //   was: 4.5 MiB a clone (smaps of two `web` clones; bench/fleet:
        //   each extra 256 MiB clone 16.4% -> 14.6% of its guest memory),
        //   and resumes are not slower (12 alternating each: first PONG 425
        //   ms without, 457 ms with).
        // Under KVM huge pages make the guest's memory faster for as long as
        // it runs, so they stay. (`FERRY_QEMU_THP=1` keeps them, to compare.)
        let no_huge_pages = spec.accel == Accel::Tcg
            && std::env::var_os(KEEP_HUGE_PAGES_ENV).is_none_or(|v| v != "1");
        // SAFETY: the closure runs in the child between fork and exec and only
        // calls prctl, setpgid, setns, fcntl, setgroups, setgid and setuid,
        // which are async-signal-safe, and
        // allocates nothing; the namespace file stays open until after the
        // spawn.
        unsafe {
            cmd.pre_exec(move || {
                // Its own process group: a Ctrl-C in ferry's terminal goes to
                // ferry, which suspends or stops the VM, not straight to QEMU.
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                crate::confine::keep_open(&handed_fds)?;
                // Kept across exec and the change of user. A kernel without
                // it (before 3.15) runs QEMU with huge pages, as before.
                if no_huge_pages {
                    libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
                }
                if let Some(user) = user {
                    crate::confine::become_user(user)?;
                }
                // QEMU must not outlive the ferry process that owns it
                // (set after the change of user, which clears it).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| io(format!("starting {}", qemu.display()), e))?;
        let pid = child.id();
        drop(netns);
        // QEMU has its own copies.
        drop(handed);
        // Into its cgroup while it loads, from here: a move into a cgroup
        // waits for an RCU grace period (5-15 ms each on cgroup v1 here,
        // one per hierarchy), which the child's `pre_exec` spent before
        // QEMU even started. QEMU runs no guest code and loads no guest
        // state until it has answered on QMP, and the move is joined
        // right after the QMP handshake, before any command that starts,
        // loads or receives a guest: so guest memory, the state it loads
        // and everything it does for the guest are counted; what its own
        // start-up allocated before the move stays with ferry's cgroup.
        let admitted = cgroup.clone().map(|cg| {
            std::thread::Builder::new()
                .name("cgroup-admit".into())
                .spawn(move || cg.admit(pid))
        });
        // The waiter holds it from here on, and removes it.
        let cgroup_path = cgroup.as_ref().map(|c| c.path().to_path_buf());
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let watch = Arc::new(Watch::default());
        *watch.cgroup.lock().expect("watch") = cgroup;
        let (tx, rx) = channel();
        spawn_console_reader(stdout, tx.clone(), watch.clone());
        spawn_stderr_reader(stderr, watch.clone());
        spawn_waiter(child, watch.clone(), tx.clone());

        let event_watch = watch.clone();
        let alive_watch = watch.clone();
        let qmp = Qmp::connect(
            &qmp_socket,
            Instant::now() + Duration::from_secs(30),
            &move || alive_watch.exit.lock().expect("watch").is_none(),
            move |ev: QmpEvent| on_event(&event_watch, ev),
        );
        // QEMU's own start-up (the emulator's initialisation, a confined
        // one's sandbox and change of user), apart from what follows.
        if qmp.is_ok() {
            tracing::debug!(
                ms = spawned.elapsed().as_millis() as u64,
                "QEMU answered on QMP"
            );
        }
        let admitted = match admitted {
            None => Ok(()),
            Some(Ok(thread)) => thread
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the cgroup thread panicked"))),
            Some(Err(e)) => Err(e),
        };
        let mut vm = match qmp {
            Ok(qmp) => QemuVm {
                pid,
                qmp: Arc::new(qmp),
                watch,
                events: Some(rx),
                stdin,
                agent_socket,
                shell_socket,
                first_agent: Mutex::default(),
                provenance,
                version: launch.version,
                state_from,
                memory_in_file: spec.memory_shared,
                memory_mapped: !anonymous_memory,
                memory_file: spec.memory_file.clone(),
                disk_file: match &spec.disk {
                    DiskSpec::Raw(p) => p.clone(),
                    DiskSpec::CopyOnWrite { overlay, .. } => overlay.clone(),
                    DiskSpec::Nbd { socket } => socket.clone(),
                },
                disk_kind: match &spec.disk {
                    DiskSpec::Raw(_) => DiskKind::Raw,
                    DiskSpec::CopyOnWrite { .. } => DiskKind::Overlay,
                    DiskSpec::Nbd { .. } => DiskKind::Nbd,
                },
                qemu_img: launch.qemu_img.to_path_buf(),
                cgroup: cgroup_path,
                writeback: None,
                nbd_serving: false,
            },
            Err(e) => {
                kill_pid(pid);
                let detail = wait_for_tail(&watch);
                return Err(EngineError::StartFailed(if detail.is_empty() {
                    format!("cannot reach QEMU's control socket: {e}")
                } else {
                    detail
                }));
            }
        };
        if let Err(e) = admitted {
            vm.kill();
            return Err(EngineError::StartFailed(format!(
                "cannot move QEMU into its cgroup {}: {e}",
                vm.cgroup.as_deref().unwrap_or(Path::new("?")).display()
            )));
        }
        let prepared = match start {
            Start::Boot(before_run) => vm.connect_agent_then_run(before_run),
            Start::Restore(state, before_run) => vm
                .incoming(state)
                .map_err(|e| vm.load_failure(e, "saved"))
                .and_then(|()| before_run())
                .and_then(|()| vm.cmd("cont", json!({})).map(|_| ())),
            Start::Receive(incoming, _) => vm.prepare_receive(incoming),
        };
        if let Err(e) = prepared {
            vm.kill();
            return Err(e);
        }
        Ok(vm)
    }

    /// Whether QEMU tracks every guest write during a live copy here.
    fn live_copy_is_exact(&self) -> bool {
        self.provenance.accel == Accel::Kvm
            || !self.version.tcg_needs_extra_memory()
            || self.provenance.memory_extra_kib > 0
    }

    /// A state from another QEMU release that this one failed to load is
    /// refused as the state's fault, with what to do; any load failure
    /// keeps QEMU's own reasons.
    fn load_failure(&self, e: EngineError, verb: &str) -> EngineError {
        let fix = if verb == "saved" {
            "rebuild the package here with 'ferry package', or resume it where that QEMU runs"
        } else {
            "move it to a host with that QEMU release"
        };
        // QEMU names the part it could not load before its last line
        // ("Size mismatch: pc.bios: ..."): keep those lines.
        let said = load_errors(&self.watch.stderr_tail.lock().expect("watch"));
        match &self.state_from {
            Some(from) if !matches!(e, EngineError::Incompatible(_)) => {
                let why = if said.is_empty() { e.to_string() } else { said };
                EngineError::Incompatible(format!(
                    "it was {verb} with QEMU {from}, and this host's QEMU {} could not load it \
                     ({why}); {fix}",
                    self.version
                ))
            }
            None if matches!(e, EngineError::NotRunning(_)) && !said.is_empty() => {
                EngineError::NotRunning(said)
            }
            _ => e,
        }
    }

    /// Connects the agent socket of a paused, cold-booted guest, then lets
    /// it run: a guest that stops at once is then seen stopping by the
    /// agent connection, not as a missing socket.
    fn connect_agent_then_run(&mut self, before_run: BeforeRun<'_>) -> Result<(), EngineError> {
        let stream = self.connect_agent_socket().map_err(|e| self.exited_or(e))?;
        *self.first_agent.lock().expect("first agent") = Some(stream);
        before_run()?;
        self.cmd("cont", json!({})).map(|_| ())
    }

    /// `e`, unless QEMU is exiting (see [`EXIT_GRACE`]): then why it exited.
    fn exited_or(&self, e: EngineError) -> EngineError {
        let guard = self.watch.exit.lock().expect("watch");
        let (guard, _) = self
            .watch
            .exited
            .wait_timeout_while(guard, EXIT_GRACE, |e| e.is_none())
            .expect("watch");
        match guard.as_ref() {
            Some(reason) => EngineError::NotRunning(describe(reason)),
            None => e,
        }
    }

    fn connect_agent_socket(&self) -> Result<UnixStream, EngineError> {
        UnixStream::connect(&self.agent_socket).map_err(|e| {
            io(
                format!(
                    "connecting to the agent socket {}",
                    self.agent_socket.display()
                ),
                e,
            )
        })
    }

    /// Exports the (empty) disk for the sender and listens for its state.
    /// The VM was started with `-S`: it stays paused after the state is in.
    fn prepare_receive(&mut self, incoming: &Incoming) -> Result<(), EngineError> {
        self.set_ignore_shared(false)?;
        // Not the received disk: the mirror's data is written back by the
        // sender's flush at its stop anyway, but with the disk written back
        // here too the raw engine's moves run after ferry's in
        // bench/migrate were slowed (2 runs of 2), and ferry's gap was no
        // shorter for it.
        if self.memory_in_file {
            match Writeback::start(&self.memory_file) {
                Ok(w) => self.writeback = Some(w),
                Err(e) => tracing::debug!("no writeback while receiving: {e}"),
            }
        }
        // Filled by the caller: QEMU only has the file open, inactive, as
        // an incoming VM's disks are, and reads it once it runs.
        let Some(socket) = &incoming.disk_socket else {
            return Ok(());
        };
        // ferry listens on the disk's socket and hands QEMU the
        // descriptor: a QEMU running as its own user may not make sockets
        // in ferry's directories.
        let disk = listen_at(socket)?;
        self.hand_fd(INCOMING_DISK_FD, disk.as_fd())?;
        self.cmd(
            "nbd-server-start",
            json!({ "addr": { "type": "fd", "data": { "str": INCOMING_DISK_FD } } }),
        )?;
        self.nbd_serving = true;
        drop(disk);
        self.cmd(
            "block-export-add",
            json!({ "type": "nbd", "id": "ferry-incoming-disk", "node-name": DISK_NODE,
                    "name": DISK_EXPORT_NAME, "writable": true }),
        )?;
        // The state comes later, on a connection handed over by
        // `receive_state`.
        Ok(())
    }

    /// The mirror job's `query-block-jobs` entry, if it still exists.
    fn mirror_job(&self) -> Result<Option<Value>, EngineError> {
        let jobs = self.cmd("query-block-jobs", json!({}))?;
        Ok(jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == MIRROR_JOB).cloned()))
    }

    /// Polls the mirror job until `done` says so, failing if it stops with
    /// an error, vanishes, the VM dies or `timeout` passes.
    fn wait_mirror(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(Option<&Value>) -> bool,
    ) -> Result<(), EngineError> {
        let started = Instant::now();
        let mut seen = self.watch.wakes();
        loop {
            let job = self.mirror_job()?;
            if done(job.as_ref()) {
                return Ok(());
            }
            let failed = match &job {
                None => Some("the disk copy ended early".to_string()),
                Some(j) if j["status"] == "concluded" || j["status"] == "aborting" => Some(
                    j["error"]
                        .as_str()
                        .unwrap_or("the disk copy stopped")
                        .to_string(),
                ),
                _ => None,
            };
            if let Some(detail) = failed {
                return Err(EngineError::Command {
                    command: what.into(),
                    detail,
                });
            }
            if let Some(reason) = self.watch.exit.lock().expect("watch").clone() {
                return Err(EngineError::NotRunning(describe(&reason)));
            }
            if started.elapsed() > timeout {
                return Err(EngineError::Timeout(what.into()));
            }
            // Until the job's status changes: finishing the copy is on a
            // move's critical path (the guest is paused), and the event
            // comes at once.
            seen = self.watch.wait_wake(seen, QUERY_FALLBACK);
        }
    }

    /// Loads a saved state into a QEMU started with `-incoming defer`; the
    /// caller lets it run.
    fn incoming(&mut self, state: &SavedState) -> Result<(), EngineError> {
        self.set_ignore_shared(state.memory_file.is_some())?;
        let file = std::fs::File::open(&state.device_state).map_err(|e| {
            io(
                format!("opening the saved state {}", state.device_state.display()),
                e,
            )
        })?;
        let uri = self.hand_fd(STATE_FD, file.as_fd())?;
        self.cmd("migrate-incoming", json!({ "uri": uri }))?;
        // QEMU holds its own copy now.
        drop(file);
        self.wait_migration("restore", Duration::from_secs(120))
    }

    /// Sets `x-ignore-shared` for the migration about to start, and the
    /// `events` its wait is woken by (see [`WAKING_EVENTS`]): every
    /// migration ferry starts, in or out, sets this first. It also turns
    /// `pause-before-switchover` off, which a live send on QEMU before 9.0
    /// turns on (see `send_state`) and QEMU keeps for the next migration:
    /// a save after such a send (a VM left in doubt, or one whose move
    /// failed) then stopped at `pre-switchover`, waiting for a
    /// `migrate-continue` that nothing sends (QEMU 7.2, the in-doubt test).
    fn set_ignore_shared(&self, on: bool) -> Result<(), EngineError> {
        self.cmd(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on },
                                     { "capability": "events", "state": true },
                                     { "capability": "pause-before-switchover", "state": false }] }),
        )
        .map(|_| ())
    }

    fn wait_migration(&self, what: &str, timeout: Duration) -> Result<(), EngineError> {
        self.wait_migration_polling(what, timeout, &mut |_| Ok(()))
            .map(|_| ())
    }

    /// [`Self::wait_migration`], calling `each` with `query-migrate`'s
    /// answer after every poll that did not end it; returns the answer
    /// that said `completed` (its times and byte counts).
    fn wait_migration_polling(
        &self,
        what: &str,
        timeout: Duration,
        each: &mut dyn FnMut(&Value) -> Result<(), EngineError>,
    ) -> Result<Value, EngineError> {
        let started = Instant::now();
        let mut seen = self.watch.wakes();
        let mut queries = 0u32;
        loop {
            let info = self.cmd("query-migrate", json!({}))?;
            queries += 1;
            match info["status"].as_str().unwrap_or("") {
                "completed" => {
                    tracing::debug!(
                        queries,
                        ms = started.elapsed().as_millis() as u64,
                        "{what}: done"
                    );
                    return Ok(info);
                }
                "failed" | "cancelled" => {
                    return Err(EngineError::Command {
                        command: what.into(),
                        detail: info["error-desc"]
                            .as_str()
                            .unwrap_or("migration failed")
                            .to_string(),
                    })
                }
                _ => {}
            }
            if let Some(reason) = self.watch.exit.lock().expect("watch").clone() {
                return Err(EngineError::NotRunning(describe(&reason)));
            }
            if started.elapsed() > timeout {
                return Err(EngineError::Timeout(what.into()));
            }
            each(&info)?;
            seen = self.watch.wait_wake(seen, QUERY_FALLBACK);
        }
    }

    /// `info`, the answer that said `completed`, or a later one that has
    /// the copy's figures. QEMU 7.2 says `completed` before it has reckoned
    /// the copy's total time and downtime (`migration_calculate_complete`
    /// comes after the change of status): asked at once, as the event has
    /// it asked, it answered 0 for both (KVM lab). Asked again until the
    /// total time is there, a few milliseconds at most.
    fn completed_figures(&self, info: Value) -> Result<Value, EngineError> {
        let mut info = info;
        let started = Instant::now();
        while info["total-time"].as_u64().unwrap_or(0) == 0
            && started.elapsed() < Duration::from_millis(500)
        {
            std::thread::sleep(Duration::from_millis(1));
            info = self.cmd("query-migrate", json!({}))?;
        }
        Ok(info)
    }

    /// Hands `fd` to QEMU as `name` and returns the migration URI naming
    /// it: QEMU reads and writes state through what ferry opened, so its
    /// sandbox may deny it `exec:` (spawning a shell) and its user need not
    /// reach ferry's paths. `fd:` works on every QEMU ferry supports
    /// (`file:` needs 8.2).
    fn hand_fd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<String, EngineError> {
        // A name left from an earlier save is replaced.
        let _ = self.qmp.execute("closefd", json!({ "fdname": name }));
        self.qmp
            .send_fd(name, fd)
            .map_err(|e| self.qmp_error("getfd", e))?;
        Ok(format!("fd:{name}"))
    }

    fn cmd(&self, command: &str, args: Value) -> Result<Value, EngineError> {
        self.qmp
            .execute(command, args)
            .map_err(|e| self.qmp_error(command, e))
    }

    /// A failed QMP command as the engine says it: QEMU gone (with its
    /// last words), out of time, or QEMU's own error.
    fn qmp_error(&self, command: &str, e: QmpError) -> EngineError {
        match e {
            QmpError::Closed => EngineError::NotRunning(wait_for_tail(&self.watch)),
            QmpError::Timeout(_) => EngineError::Timeout(format!("QEMU command {command}")),
            other => EngineError::Command {
                command: command.into(),
                detail: other.to_string(),
            },
        }
    }
}

impl Vm for QemuVm {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn cgroup(&self) -> Option<PathBuf> {
        self.cgroup.clone()
    }

    fn take_events(&mut self) -> Option<Receiver<VmEvent>> {
        self.events.take()
    }

    fn agent_stream(&self) -> Result<UnixStream, EngineError> {
        match self.first_agent.lock().expect("first agent").take() {
            Some(stream) => Ok(stream),
            None => self.connect_agent_socket().map_err(|e| self.exited_or(e)),
        }
    }

    fn shell_stream(&self) -> Result<UnixStream, EngineError> {
        let Some(path) = &self.shell_socket else {
            return Err(EngineError::Unsupported(
                "a shell channel in VMs from packages made before ferry had one",
            ));
        };
        UnixStream::connect(path).map_err(|e| {
            self.exited_or(io(
                format!("connecting to the shell socket {}", path.display()),
                e,
            ))
        })
    }

    fn take_console_input(&mut self) -> Option<Box<dyn std::io::Write + Send>> {
        self.stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Write + Send>)
    }

    fn pause(&mut self) -> Result<(), EngineError> {
        self.cmd("stop", json!({})).map(|_| ())
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        self.cmd("cont", json!({}))?;
        if std::mem::take(&mut self.nbd_serving) {
            // Its export is gone (`end_disk_export`): the server only
            // listens, serving nothing, so it stops with the guest running.
            if let Err(e) = self.cmd("nbd-server-stop", json!({})) {
                tracing::debug!("stopping the incoming disk's NBD server: {e}");
            }
        }
        Ok(())
    }

    fn save_state(&mut self, device_state: &Path) -> Result<SavedState, EngineError> {
        self.cmd("stop", json!({}))?;
        self.set_ignore_shared(self.memory_in_file)?;
        // A private mapping's pages go into the state: every one is read.
        if self.memory_mapped && !self.memory_in_file {
            prefetch_memory(&self.memory_file);
        }
        let file = private_file(device_state)
            .map_err(|e| io(format!("creating {}", device_state.display()), e))?;
        let uri = self.hand_fd(STATE_FD, file.as_fd())?;
        self.cmd("migrate", json!({ "uri": uri }))?;
        drop(file);
        self.wait_migration("saving the VM state", Duration::from_secs(300))?;
        Ok(SavedState {
            device_state: device_state.to_path_buf(),
            memory_file: self.memory_in_file.then(|| self.memory_file.clone()),
            provenance: self.provenance.clone(),
        })
    }

    fn export_disk(&mut self, dest: &Path) -> Result<(), EngineError> {
        // Flush what the guest wrote; a no-op after a completed save.
        let _ = self.cmd("stop", json!({}));
        let (source, format) = match self.disk_kind {
            // The block server takes a second client.
            DiskKind::Nbd => (
                format!("nbd+unix:///?socket={}", self.disk_file.display()),
                "raw",
            ),
            DiskKind::Raw => return sparse_copy(&self.disk_file, dest),
            DiskKind::Overlay if disk_format(&self.disk_file) == "raw" => {
                return sparse_copy(&self.disk_file, dest)
            }
            DiskKind::Overlay => (self.disk_file.display().to_string(), "qcow2"),
        };
        // -U: QEMU holds the image lock; the VM is paused, so this is safe.
        let out = Command::new(&self.qemu_img)
            .args(["convert", "-U", "-O", "raw", "-S", "4k", "-f", format])
            .arg(&source)
            .arg(dest)
            .output()
            .map_err(|e| io("running qemu-img convert".into(), e))?;
        if !out.status.success() {
            return Err(EngineError::Command {
                command: "exporting the disk".into(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    fn use_local_disk(&mut self, file: &Path) -> Result<(), EngineError> {
        if self.disk_kind != DiskKind::Nbd {
            return Ok(());
        }
        // Opened here and handed over: a confined QEMU may not reach the
        // path. The fd set keeps it for QEMU to duplicate (on a reopen
        // too), until QEMU exits.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(file)
            .map_err(|e| io(format!("opening {}", file.display()), e))?;
        let fdset = self
            .qmp
            .add_fd(opened.as_fd(), LOCAL_DISK_NODE)
            .map_err(|e| self.qmp_error("add-fd", e))?;
        drop(opened);
        let forget = |vm: &Self| {
            let _ = vm.cmd("remove-fd", json!({ "fdset-id": fdset }));
        };
        // The options the `-drive` gave the disk (cache=writeback,
        // discard=unmap); a reopen resets those it is not given.
        let cache = json!({ "direct": false, "no-flush": false });
        if let Err(e) = self.cmd(
            "blockdev-add",
            json!({ "driver": "file", "node-name": LOCAL_DISK_NODE,
                    "filename": format!("/dev/fdset/{fdset}"),
                    "discard": "unmap", "cache": cache }),
        ) {
            forget(self);
            return Err(e);
        }
        // QEMU drains the node's requests, then swaps its `file` child:
        // the NBD client node goes, and its connection with it.
        if let Err(e) = self.cmd(
            "blockdev-reopen",
            json!({ "options": [{ "driver": "raw", "node-name": DISK_NODE,
                                  "file": LOCAL_DISK_NODE, "discard": "unmap",
                                  "cache": cache }] }),
        ) {
            let _ = self.cmd("blockdev-del", json!({ "node-name": LOCAL_DISK_NODE }));
            forget(self);
            return Err(e);
        }
        self.disk_file = file.to_path_buf();
        self.disk_kind = DiskKind::Raw;
        Ok(())
    }

    fn start_disk_copy(&mut self, target: OwnedFd) -> Result<(), EngineError> {
        // The memory copy that follows reads every page of guest memory:
        // have the file's pages in the page cache by then.
        if self.memory_mapped {
            prefetch_memory(&self.memory_file);
        }
        // The target is an NBD client node on a connection ferry made and
        // handed over (QEMU may not reach ferry's sockets by path).
        let _ = self.cmd("blockdev-del", json!({ "node-name": MIRROR_TARGET }));
        let _ = self.qmp.execute("closefd", json!({ "fdname": MIRROR_FD }));
        self.qmp
            .send_fd(MIRROR_FD, target.as_fd())
            .map_err(|e| EngineError::Command {
                command: "getfd".into(),
                detail: e.to_string(),
            })?;
        drop(target);
        // `discard: unmap` on both nodes, so that the zeros the mirror
        // writes (every region the source holds none of, the whole disk
        // first) may become holes on the receiver. Without it QEMU drops
        // the mirror's may-unmap flag at this node, the NBD request says
        // "no hole", and the receiver's QEMU allocates every zero
        // (`FALLOC_FL_ZERO_RANGE`; on tmpfs, which has no zero range,
        // allocated and cleared pages): a 1 GiB disk holding 194 MiB
        // arrived as 1,024 MiB, and on tmpfs the copy took 340-380 ms
        // against 200-215 ms, the receiving QEMU's CPU doubled
        // (bench/README.md, 2026-12-07).
        self.cmd(
            "blockdev-add",
            json!({ "driver": "raw", "node-name": MIRROR_TARGET, "discard": "unmap",
                    "file": { "driver": "nbd", "export": DISK_EXPORT_NAME, "discard": "unmap",
                              "server": { "type": "fd", "str": MIRROR_FD } } }),
        )?;
        self.cmd(
            "blockdev-mirror",
            json!({ "device": "disk0", "job-id": MIRROR_JOB, "target": MIRROR_TARGET,
                    "sync": "full", "auto-dismiss": false }),
        )?;
        self.wait_mirror("copying the disk", Duration::from_secs(600), |job| {
            job.is_some_and(|j| j["ready"] == true)
        })
    }

    fn send_state(
        &mut self,
        stream: OwnedFd,
        limits: &LiveLimits,
    ) -> Result<LiveStats, EngineError> {
        self.set_ignore_shared(false)?;
        let drain = self.provenance.accel == Accel::Tcg && self.version.tcg_needs_extra_memory();
        // The copy runs under the downtime limit asked for from its start,
        // as the raw engine's does. (Until 2026-12-07 it started at 15 ms
        // and got the asked-for limit after 2 s of passes past its first:
        // on this host that no longer shortened anything, the engine's
        // downtime being 2-12 ms under either, and in the KVM lab an idle
        // guest's copy then went on for 320-1,500 ms of passes past its
        // first under 15 ms, the guest short of the lab's one CPU; under
        // 50 ms, 131-451 ms: bench/README.md.)
        let limit = limits.max_downtime.as_millis() as u64;
        // A TCG guest on QEMU before 9.0 started without the extra memory
        // (a state made on QEMU 9.0 or later, or by an older ferry) would
        // lose writes made during a live copy (see TCG_MEMORY_EXTRA_KIB):
        // it is paused for the whole copy instead, slower but never wrong.
        let paused_copy = !self.live_copy_is_exact();
        // A guest that writes memory faster than the link carries it never
        // leaves little enough for the last pass: the copy would iterate
        // until the caller's timeout and fail. QEMU's auto-converge slows
        // such a guest's vCPUs (by 20%, then 10 points more at a time, up
        // to 99%) until the copy ends. QEMU slows it after two periods (of
        // a second or more) in which the guest dirtied more than a share
        // of what the period sent: at first 100%, a guest that writes more
        // than the link carries (test: a guest rewriting a 2 MiB file
        // without end, at 16 MiB/s, slowed by 30% within 11 s; not slowed,
        // its copy took 181 s); once the copy has iterated for
        // ITERATING_THROTTLE past its first pass, QEMU's own 50%. A guest
        // that calms down by itself in that time is never slowed. A paused
        // copy's guest writes nothing.
        let throttle = !paused_copy;
        // Once the first pass is over, QEMU is told the rate that pass ran
        // at (`avail-switchover-bandwidth`) instead of guessing it from the
        // last 100 ms, in which an idle guest's few dirty pages give a
        // rate near zero: the copy then iterated until some pass found
        // almost nothing left (KVM lab, idle guest: 20 passes over 0.4-1.8
        // s, the guest starved of the lab's one CPU meanwhile, the client
        // waiting 90-582 ms before the source even stopped). With the first
        // pass's rate, the last pass is what that rate carries in the
        // downtime limit. Reset first: an earlier copy's figure must not
        // count for this one's first pass. (QEMU 8.2 and later. The
        // figures above are from the QEMU 7.2 lab, which lacks it: they are
        // why, not a measured gain. In the QEMU 10 lab that rate is below
        // what the link carries, most of a first pass being zero pages,
        // scanned but not sent; yet without it, as the raw engine runs,
        // the copy did not end sooner: the guest stopped at QEMU's fourth
        // pass in all six moves, 145-408 ms after the second began,
        // against the fourth to ninth, 131-498 ms, in two runs with it;
        // the client's gaps were no shorter. bench/README.md, 2026-12-07.)
        let tell_rate = !paused_copy && self.version >= SWITCHOVER_BANDWIDTH_SINCE;
        let mut parameters = json!({ "downtime-limit": limit, "max-bandwidth": limits.max_bandwidth,
                                     "throttle-trigger-threshold": 100 });
        if tell_rate {
            parameters["avail-switchover-bandwidth"] = json!(0);
        }
        self.cmd("migrate-set-parameters", parameters)?;
        // On QEMU before 9.0 under TCG, stop before the switchover and give
        // devices DRAIN_MS to finish what they had in flight (a virtio-net
        // transmission completing writes the used ring) before the last
        // pass. It came with that QEMU's lost TCG writes, whose corrupt
        // guests it was meant to keep whole. QEMU's own stop for the last
        // pass already drains block I/O and stops the virtio queues; on
        // later QEMUs (and KVM) the moves' tests and bench/migrate's raw
        // engine, which never pauses, lose nothing without it, and it cost
        // every move about 12 ms of the client-seen gap.
        self.cmd(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "pause-before-switchover", "state": drain },
                                     { "capability": "auto-converge", "state": throttle }] }),
        )?;
        if paused_copy {
            self.cmd("stop", json!({}))?;
        }
        let uri = self.hand_fd(STATE_FD, stream.as_fd())?;
        self.cmd("migrate", json!({ "uri": uri }))?;
        drop(stream);
        // When the first pass ended: QEMU syncs the dirty bitmap once at
        // the start and again at the end of every pass.
        let mut iterating_since: Option<Instant> = None;
        // Once: the status may still read `pre-switchover` right after.
        let mut continued = false;
        // The most QEMU slowed the guest (QEMU says it only while the copy
        // is active).
        let mut throttle_pct = 0u64;
        let mut throttle_armed = false;
        // A line of the copy's figures at most every second (debug).
        let mut logged = Instant::now();
        let waited = self.wait_migration_polling("sending the VM", limits.timeout, &mut |info| {
            throttle_pct = throttle_pct.max(info["cpu-throttle-percentage"].as_u64().unwrap_or(0));
            if logged.elapsed() >= Duration::from_secs(1) {
                logged = Instant::now();
                let ram = &info["ram"];
                tracing::debug!(
                    sent_mib = ram["transferred"].as_u64().unwrap_or(0) >> 20,
                    left_mib = ram["remaining"].as_u64().unwrap_or(0) >> 20,
                    mbps = ram["mbps"].as_f64().unwrap_or(0.0) as u64,
                    dirty_pages_per_s = ram["dirty-pages-rate"].as_u64().unwrap_or(0),
                    passes = ram["dirty-sync-count"].as_u64().unwrap_or(0),
                    throttle_pct = info["cpu-throttle-percentage"].as_u64().unwrap_or(0),
                    "sending the VM"
                );
            }
            if drain && !continued && info["status"] == "pre-switchover" {
                continued = true;
                std::thread::sleep(Duration::from_millis(DRAIN_MS));
                self.cmd("migrate-continue", json!({ "state": "pre-switchover" }))?;
            }
            if info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 {
                if iterating_since.is_none() && tell_rate {
                    if let Some(rate) = first_pass_rate(info) {
                        tracing::debug!(bytes_per_s = rate, "the first pass's rate, told to QEMU");
                        self.cmd(
                            "migrate-set-parameters",
                            json!({ "avail-switchover-bandwidth": rate }),
                        )?;
                    }
                }
                let since = *iterating_since.get_or_insert_with(Instant::now);
                if throttle && !throttle_armed && since.elapsed() >= ITERATING_THROTTLE {
                    throttle_armed = true;
                    self.cmd(
                        "migrate-set-parameters",
                        json!({ "throttle-trigger-threshold": THROTTLE_TRIGGER_PCT }),
                    )?;
                }
            }
            Ok(())
        });
        let info = match waited {
            Err(EngineError::Timeout(what)) => {
                // QEMU's figures as it gives up, for what outran the copy.
                let last = self.cmd("query-migrate", json!({})).unwrap_or(Value::Null);
                return Err(EngineError::Command {
                    command: what,
                    detail: not_converging(&last, limits.timeout, throttle_pct),
                });
            }
            other => other?,
        };
        let info = self.completed_figures(info)?;
        let total_ms = info["total-time"].as_u64().unwrap_or(0);
        Ok(LiveStats {
            total_ms,
            downtime_ms: if paused_copy {
                total_ms
            } else {
                info["downtime"].as_u64().unwrap_or(0)
            },
            state_bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
            wire_bytes: 0,
            downtime_limit_ms: limit,
            throttle_pct,
        })
    }

    fn finish_disk_copy(&mut self) -> Result<(), EngineError> {
        // Cancelling a mirror that is ready completes it: everything
        // written so far reaches the target, and the VM keeps its own disk.
        self.cmd("block-job-cancel", json!({ "device": MIRROR_JOB }))?;
        self.wait_mirror("finishing the disk copy", Duration::from_secs(60), |job| {
            job.is_none_or(|j| j["status"] == "concluded")
        })?;
        if let Some(job) = self.mirror_job()? {
            let error = job["error"].as_str().map(String::from);
            self.cmd("job-dismiss", json!({ "id": MIRROR_JOB }))?;
            if let Some(detail) = error {
                let _ = self.cmd("blockdev-del", json!({ "node-name": MIRROR_TARGET }));
                return Err(EngineError::Command {
                    command: "finishing the disk copy".into(),
                    detail,
                });
            }
        }
        Ok(())
    }

    fn release_disk_copy(&mut self) -> Result<(), EngineError> {
        // The NBD client's close (about 55 ms here) no longer holds the
        // guest paused: the receiver has been told to switch already.
        self.cmd("blockdev-del", json!({ "node-name": MIRROR_TARGET }))
            .map(|_| ())
    }

    fn reclaim_sent(&mut self) -> Result<(), EngineError> {
        let status = self.cmd("query-status", json!({}))?;
        // QEMU refuses `migrate` in `postmigrate` ("Can't migrate the vm
        // that was paused due to previous migration"); `cont` is the one
        // way out of it, and takes the disks back from the destination.
        if status["status"] == "postmigrate" {
            self.cmd("cont", json!({}))?;
            hold_reclaimed(self);
            self.cmd("stop", json!({}))?;
        }
        Ok(())
    }

    fn abort_send(&mut self) -> Result<(), EngineError> {
        let _ = self.cmd("migrate_cancel", json!({}));
        if self.mirror_job()?.is_some() {
            let _ = self.cmd(
                "block-job-cancel",
                json!({ "device": MIRROR_JOB, "force": true }),
            );
            let _ = self.wait_mirror("cancelling the disk copy", Duration::from_secs(30), |job| {
                job.is_none_or(|j| j["status"] == "concluded")
            });
            let _ = self.cmd("job-dismiss", json!({ "id": MIRROR_JOB }));
        }
        let _ = self.cmd("blockdev-del", json!({ "node-name": MIRROR_TARGET }));
        // Let the migration settle before the caller resumes the VM.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            let info = self.cmd("query-migrate", json!({}))?;
            match info["status"].as_str().unwrap_or("none") {
                "active" | "cancelling" | "setup" | "device" | "pre-switchover" => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => break,
            }
        }
        Ok(())
    }

    fn receive_state(&mut self, stream: OwnedFd) -> Result<(), EngineError> {
        // `fd:` reads a connected stream: for a plain move, the source's
        // TCP connection itself.
        let uri = self.hand_fd(STATE_FD, stream.as_fd())?;
        self.cmd("migrate-incoming", json!({ "uri": uri }))?;
        drop(stream);
        Ok(())
    }

    fn wait_received(&mut self, timeout: Duration) -> Result<(), EngineError> {
        let received = self
            .wait_migration("receiving the VM", timeout)
            .map_err(|e| self.load_failure(e, "started"));
        self.writeback = None;
        received
    }

    fn end_disk_export(&mut self) -> Result<(), EngineError> {
        if !self.nbd_serving {
            // The caller filled the disk (`Incoming::disk_socket` None).
            return Ok(());
        }
        // The sender finished its copy before it said "switch": every write
        // was acknowledged and flushed, and its connection is idle. Its
        // close (QEMU's NBD client takes about 55 ms) is not waited for:
        // `hard` cuts it, which drops nothing, because nothing is in
        // flight. With the export gone nothing can write the disk; the
        // server itself stops after the guest runs (`resume`).
        self.cmd(
            "block-export-del",
            json!({ "id": "ferry-incoming-disk", "mode": "hard" }),
        )
        .map(|_| ())
    }

    fn shutdown(&mut self, timeout: Duration) -> Result<ExitReason, EngineError> {
        if let Some(r) = self.watch.exit.lock().expect("watch").clone() {
            return Ok(r);
        }
        let _ = self.cmd("system_powerdown", json!({}));
        if let Some(r) = self.wait_exit(timeout) {
            return Ok(r);
        }
        let _ = self
            .qmp
            .execute_timeout("quit", json!({}), Duration::from_secs(2));
        if let Some(r) = self.wait_exit(Duration::from_secs(2)) {
            return Ok(r);
        }
        self.kill();
        Ok(self
            .wait_exit(Duration::from_secs(5))
            .unwrap_or(ExitReason::Stopped))
    }

    fn kill(&mut self) {
        if self.watch.exit.lock().expect("watch").is_none() {
            kill_pid(self.pid);
        }
        let _ = self.wait_exit(Duration::from_secs(5));
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitReason> {
        let guard = self.watch.exit.lock().expect("watch");
        let (guard, _) = self
            .watch
            .exited
            .wait_timeout_while(guard, timeout, |e| e.is_none())
            .expect("watch");
        guard.clone()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How [`qemu_args`] starts QEMU.
struct Flags {
    /// `-incoming defer`, and no `-kernel`, `-initrd` or `-append`: a
    /// guest that arrives (restored or received) has its kernel in its
    /// memory already, and QEMU keeps what `-kernel` and `-initrd` name in
    /// its own memory for as long as it runs (16 MiB of a `web` clone's
    /// 54 MiB; `-no-reboot` means no reset ever needs them).
    incoming: bool,
    /// `-S`.
    paused: bool,
    /// TCG's translation cache size, in MiB (`None`: QEMU's default).
    tcg_tb_mib: Option<u64>,
    /// For a netboot ([`VmSpec::netboot`]): the NIC's boot ROM.
    netboot_rom: Option<PathBuf>,
    /// The host's TSC frequency, told to a TCG guest (`guest_cmdline`).
    tsc_khz: Option<u64>,
    /// What the guest's NIC is connected to.
    netdev: Netdev,
    /// Guest RAM is anonymous (`memory-backend-ram`), not `memory_file`:
    /// for a guest received private. In a shared file, QEMU 10.0 msyncs
    /// every received page before it completes the move, guest paused on
    /// both hosts (QEMU 10.1 no longer does, for memory that is not
    /// persistent), and the page cache's dirty limits throttle the copy.
    anonymous_memory: bool,
    /// The disk runs in an iothread (see `QemuVersion::disk_iothread`).
    disk_iothread: bool,
    /// What a QEMU running as another user gets instead of paths.
    over: Overrides,
}

/// The `-netdev` of a VM's NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Netdev {
    /// A hub port that goes nowhere ([`NetAttachment::Isolated`]).
    Hub,
    /// The tap on this descriptor of QEMU's ([`NetAttachment::Tap`]).
    Tap(i32),
}

/// Arguments that name descriptors instead of ferry's paths (`None`: the
/// path).
#[derive(Default)]
struct Overrides {
    kernel: Option<String>,
    initrd: Option<String>,
    mem_path: Option<String>,
    /// `mem_path` is open read-only (a private mapping, QEMU 8.2 or later).
    mem_readonly: bool,
    /// The `-drive` source (`file=...,format=...`).
    drive: Option<String>,
    /// Listening sockets' descriptors.
    qmp: Option<i32>,
    agent: Option<i32>,
    shell: Option<i32>,
}

/// The paths [`hand_over`] turns into descriptors.
struct HandOver<'a> {
    qmp: &'a Path,
    agent: &'a Path,
    shell: Option<&'a Path>,
    user: QemuUser,
    /// Whether QEMU gets the kernel and initramfs (see [`Flags::incoming`]).
    kernel: bool,
    /// Whether QEMU gets the memory file (see [`Flags::anonymous_memory`]).
    memory_file: bool,
}

/// Opens (as root) everything QEMU would open by path, for a QEMU that
/// runs as `how.user`: files as `/proc/self/fd/N`, sockets bound here and
/// passed listening.
fn hand_over(
    spec: &VmSpec,
    launch: &Launch<'_>,
    how: HandOver<'_>,
    handed: &mut Handed,
) -> Result<Overrides, EngineError> {
    let user = how.user;
    let file = |handed: &mut Handed, path: &Path, write: bool| {
        handed
            .file(path, write, user)
            .map_err(|e| io(format!("opening {} for QEMU", path.display()), e))
    };
    let mut over = Overrides::default();
    if how.kernel {
        over.kernel = Some(file(handed, &spec.kernel, false)?);
        over.initrd = Some(file(handed, &spec.initramfs, false)?);
    }
    // A private mapping of a shared file (a clone's memory) is never
    // written through: QEMU 8.2 and later map a read-only file writable
    // and private (`readonly=on,rom=off`); older ones need write access.
    if how.memory_file {
        let memory_write = spec.memory_shared || launch.version < crate::QemuVersion::new(8, 2, 0);
        over.mem_path = Some(file(handed, &spec.memory_file, memory_write)?);
        over.mem_readonly = !memory_write;
    }
    over.drive = Some(match &spec.disk {
        DiskSpec::Raw(p) => format!(
            "file={},format=raw,detect-zeroes=unmap",
            file(handed, p, true)?
        ),
        DiskSpec::CopyOnWrite { base, overlay } => {
            let format = disk_format(overlay);
            let top = file(handed, overlay, true)?;
            if format == "qcow2" {
                // The overlay names its base by path: QEMU gets it by
                // descriptor too.
                let base = file(handed, base, false)?;
                format!("file={top},format=qcow2,backing.driver=raw,backing.file.filename={base}")
            } else {
                format!("file={top},format={format}")
            }
        }
        DiskSpec::Nbd { socket } => {
            let stream = UnixStream::connect(socket)
                .map_err(|e| io(format!("connecting to {}", socket.display()), e))?;
            let fd = handed.keep(stream.into());
            format!("driver=raw,file.driver=nbd,file.server.type=fd,file.server.str={fd}")
        }
    });
    let listen = |handed: &mut Handed, path: &Path| -> Result<i32, EngineError> {
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| io(format!("listening on {}", path.display()), e))?;
        Ok(handed.keep(l.into()))
    };
    over.qmp = Some(listen(handed, how.qmp)?);
    over.agent = Some(listen(handed, how.agent)?);
    if let Some(shell) = how.shell {
        over.shell = Some(listen(handed, shell)?);
    }
    Ok(over)
}

fn qemu_args(
    spec: &VmSpec,
    memory_kib: u64,
    qmp: &Path,
    agent: &Path,
    shell: Option<&Path>,
    flags: Flags,
) -> Vec<String> {
    let Flags {
        incoming,
        paused,
        tcg_tb_mib,
        netboot_rom,
        tsc_khz,
        netdev,
        anonymous_memory,
        disk_iothread,
        over,
    } = flags;
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let tcg = match tcg_tb_mib {
        Some(mib) => format!("tcg,thread=multi,tb-size={mib}"),
        None => "tcg,thread=multi".to_string(),
    };
    let (accel, cpu) = match spec.accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => (tcg.as_str(), "max"),
    };
    push(&["-name", &format!("ferry:{}", spec.name)]);
    // The devices differ by bus only: virtio-mmio on `microvm`, PCI on
    // `q35` (a PC's firmware finds its NIC's boot ROM on PCI).
    let (machine, bus) = match netboot_rom {
        Some(_) => ("q35,memory-backend=mem", "pci"),
        None => ("microvm,acpi=on,memory-backend=mem", "device"),
    };
    push(&["-M", machine]);
    push(&["-accel", accel, "-cpu", cpu]);
    push(&[
        "-m",
        &format!("{memory_kib}K"),
        "-smp",
        &spec.cpus.to_string(),
    ]);
    let backend = match anonymous_memory {
        true => format!("memory-backend-ram,id=mem,size={memory_kib}K"),
        false => format!(
            "memory-backend-file,id=mem,size={memory_kib}K,mem-path={},share={}{}",
            over.mem_path
                .clone()
                .unwrap_or_else(|| spec.memory_file.display().to_string()),
            if spec.memory_shared { "on" } else { "off" },
            if over.mem_readonly {
                ",readonly=on,rom=off"
            } else {
                ""
            }
        ),
    };
    push(&["-object", &backend]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&[
        "-chardev",
        "stdio,id=con,signal=off",
        "-serial",
        "chardev:con",
    ]);
    match &netboot_rom {
        // The firmware loads what DHCP and the boot script name.
        Some(_) => push(&["-boot", "n"]),
        None if incoming => {}
        None => {
            push(&[
                "-kernel",
                &over
                    .kernel
                    .clone()
                    .unwrap_or_else(|| spec.kernel.display().to_string()),
            ]);
            push(&[
                "-initrd",
                &over
                    .initrd
                    .clone()
                    .unwrap_or_else(|| spec.initramfs.display().to_string()),
            ]);
            push(&["-append", &guest_cmdline(spec, tsc_khz)]);
        }
    }
    let source = match &spec.disk {
        _ if over.drive.is_some() => over.drive.clone().unwrap_or_default(),
        // Zeros written to a raw disk as data become holes: the file stays
        // sparse, and the next move of the VM skips them. (A disk being
        // received also gets the mirror's own zero writes, holes only
        // because its sender allows unmap: see `start_disk_copy`.)
        DiskSpec::Raw(p) => format!("file={},format=raw,detect-zeroes=unmap", p.display()),
        DiskSpec::CopyOnWrite { overlay, .. } => {
            format!("file={},format={}", overlay.display(), disk_format(overlay))
        }
        DiskSpec::Nbd { socket } => format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={}",
            socket.display()
        ),
    };
    push(&[
        "-drive",
        &format!("id=disk0,node-name={DISK_NODE},{source},if=none,cache=writeback,discard=unmap"),
    ]);
    // The disk's requests and a move's mirror job run in their own thread
    // where QEMU can: in QEMU's main loop the mirror held the big lock
    // while the guest's vCPU waited on it (the KVM lab's sampler under
    // write load, bench/README.md 2026-12-07). (A receiving QEMU's own
    // NBD export, `Incoming::disk_socket`, probably stays in the main
    // loop until its guest runs; ferry's moves no longer use it.)
    let iothread = match disk_iothread {
        true => {
            push(&["-object", &format!("iothread,id={DISK_IOTHREAD}")]);
            format!(",iothread={DISK_IOTHREAD}")
        }
        false => String::new(),
    };
    push(&[
        "-device",
        &format!("virtio-blk-{bus},drive=disk0{iothread}"),
    ]);
    match netdev {
        Netdev::Hub => push(&["-netdev", "hubport,id=net0,hubid=0"]),
        Netdev::Tap(fd) => push(&["-netdev", &format!("tap,id=net0,fd={fd}")]),
    }
    let mac = spec
        .guest_mac
        .as_deref()
        .unwrap_or(ferry_engine::DEFAULT_GUEST_MAC);
    match &netboot_rom {
        // Debian's iPXE ROM for virtio-net is built for the modern
        // (virtio 1.0) device only, PCI ID 1af4:1041: a transitional NIC
        // (1af4:1000, QEMU's default) does not match it and SeaBIOS never
        // runs it.
        Some(rom) => push(&[
            "-device",
            &format!(
                "virtio-net-pci,disable-legacy=on,netdev=net0,mac={mac},romfile={},bootindex=1",
                rom.display()
            ),
        ]),
        None => push(&[
            "-device",
            &format!("virtio-net-device,netdev=net0,mac={mac}"),
        ]),
    }
    // Port 0 is reserved for a console; the agent's is 1, the shell's 2. A
    // VM saved before the shell channel existed keeps its two ports (a
    // restore needs the same devices).
    let max_ports = if shell.is_some() { 3 } else { 2 };
    push(&[
        "-device",
        &format!("virtio-serial-{bus},max_ports={max_ports}"),
    ]);
    let socket = |id: &str, fd: Option<i32>, path: &Path| match fd {
        Some(fd) => format!("socket,id={id},fd={fd},server=on,wait=off"),
        None => format!("socket,id={id},path={},server=on,wait=off", path.display()),
    };
    push(&["-chardev", &socket("agent", over.agent, agent)]);
    push(&["-device", "virtserialport,chardev=agent,name=ferry.agent"]);
    if let Some(shell) = shell {
        push(&["-chardev", &socket("shell", over.shell, shell)]);
        push(&[
            "-device",
            "virtserialport,chardev=shell,name=ferry.shell,nr=2",
        ]);
    }
    match over.qmp {
        Some(_) => push(&[
            "-chardev",
            &socket("qmp", over.qmp, qmp),
            "-mon",
            "chardev=qmp,mode=control",
        ]),
        None => push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
        ]),
    }
    if incoming {
        push(&["-incoming", "defer"]);
    }
    if paused {
        push(&["-S"]);
    }
    a
}

/// Where Debian's `ipxe-qemu` puts its ROMs; QEMU's data directories are
/// looked in too.
const IPXE_DIR: &str = "/usr/lib/ipxe/qemu";

/// The iPXE boot ROM for a virtio-net PCI NIC (`efi-virtio.rom`: a legacy
/// BIOS image and an EFI one).
fn netboot_rom(data_dirs: &[PathBuf]) -> Result<PathBuf, EngineError> {
    const ROM: &str = "efi-virtio.rom";
    std::iter::once(Path::new(IPXE_DIR))
        .chain(data_dirs.iter().map(|d| d.as_path()))
        .chain([Path::new("/usr/share/qemu")])
        .map(|d| d.join(ROM))
        .find(|p| p.is_file())
        .ok_or_else(|| EngineError::NotInstalled {
            program: format!("the NIC boot ROM {IPXE_DIR}/{ROM}"),
            fix: "a netboot needs iPXE: apt-get install ipxe-qemu (scripts/setup.sh does)".into(),
        })
}

/// The kernel command line, plus what this engine knows the guest needs.
///
/// Under TCG the guest's TSC is the host's, but `microvm` offers no HPET or
/// PM timer to calibrate it against, and calibrating against the emulated
/// PIT fails now and then on a loaded host ("tsc: Unable to calibrate against
/// PIT"), after which the guest hangs in early boot. So ferry measures the
/// host TSC itself and tells the guest (`tsc_early_khz`), and marks it
/// reliable so no watchdog second-guesses it. KVM guests use kvmclock.
fn guest_cmdline(spec: &VmSpec, tsc_khz: Option<u64>) -> String {
    let mut cmdline = match (spec.accel, tsc_khz) {
        (Accel::Tcg, Some(khz)) => format!("{} tsc_early_khz={khz} tsc=reliable", spec.cmdline),
        _ => spec.cmdline.clone(),
    };
    restart_by_triple_fault(&mut cmdline);
    cmdline
}

/// Adds `reboot=t` unless the command line chooses a restart method.
///
/// A panicking guest restarts (ferry's recipes say `panic=-1`) and
/// `-no-reboot` turns that into QEMU's exit. On `microvm` the kernel's
/// usual ways to restart (ACPI, keyboard controller, then a jump into the
/// BIOS) do not reset the machine: the BIOS jump left a panicked guest
/// spinning for good, a VM that looked alive. A triple fault always
/// resets it.
fn restart_by_triple_fault(cmdline: &mut String) {
    if !cmdline.split_whitespace().any(|a| a.starts_with("reboot=")) {
        cmdline.push_str(" reboot=t");
    }
}

/// The host's TSC frequency in kHz, measured against the monotonic clock
/// (20 ms: well within 0.1 %) once per boot of the host (remembered in the
/// cache's `memo/`, and in the process), or `None` if it cannot be read.
/// Measuring it on every start put those 20 ms before every guest ran.
fn host_tsc_khz(cache_dir: &Path) -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        ferry_engine::memo::this_boot(cache_dir, "tsc-khz", || {
            measure_tsc_khz().map(|khz| khz.to_string())
        })
        .and_then(|text| text.parse().ok())
    })
}

fn measure_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    if !flags.split_whitespace().any(|f| f == "constant_tsc") {
        return None;
    }
    let sample = || {
        // SAFETY: RDTSC has no preconditions on x86-64; it reads a counter.
        let tsc = unsafe { core::arch::x86_64::_rdtsc() };
        (tsc, Instant::now())
    };
    let (t0, i0) = sample();
    std::thread::sleep(Duration::from_millis(20));
    let (t1, i1) = sample();
    let nanos = i1.duration_since(i0).as_nanos() as u64;
    (nanos > 0).then(|| (t1.wrapping_sub(t0)) * 1_000_000 / nanos)
}

/// Creates the copy-on-write overlay: a qcow2 file backed by the pristine
/// image. Without `qemu-img` (QEMU's system package does not bring it), a
/// sparse raw copy does the same job, more slowly for large disks.
///
/// Every overlay of one base is the same small file (the header names the
/// base by path), so the first is kept in the cache as a template and the
/// next VMs get a copy of it: a `qemu-img` run less on every start.
fn create_overlay(
    qemu_img: &Path,
    cache_dir: &Path,
    base: &Path,
    overlay: &Path,
) -> Result<(), EngineError> {
    if overlay.exists() {
        return Ok(());
    }
    // A mark left by an earlier raw copy would make a new qcow2 overlay
    // read as raw.
    let _ = std::fs::remove_file(raw_copy_mark(overlay));
    let base =
        std::fs::canonicalize(base).map_err(|e| io(format!("disk {}", base.display()), e))?;
    let template = ferry_engine::memo::path(cache_dir, "overlay", &base);
    if let Some(t) = template.as_ref().filter(|t| t.is_file()) {
        if std::fs::copy(t, overlay).is_ok() {
            return Ok(());
        }
        let _ = std::fs::remove_file(overlay);
    }
    run_qemu_img_create(qemu_img, &base, overlay)?;
    // Only a qcow2 header is worth keeping (not the raw copy made without
    // qemu-img).
    let small = std::fs::metadata(overlay).is_ok_and(|m| m.len() <= 4 << 20);
    if let (Some(t), true) = (template, small) {
        if let Ok(bytes) = std::fs::read(overlay) {
            if bytes.starts_with(b"QFI\xfb") {
                ferry_engine::memo::keep(&t, &bytes);
            }
        }
    }
    Ok(())
}

fn run_qemu_img_create(qemu_img: &Path, base: &Path, overlay: &Path) -> Result<(), EngineError> {
    let out = match Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!("qemu-img not found (package qemu-utils): copying the disk instead");
            // The mark first: a copy is never there without it. The copy
            // is made beside and renamed: a half copy is never the overlay
            // (an overlay that exists is used as it is).
            let mark = raw_copy_mark(overlay);
            std::fs::write(&mark, b"").map_err(|e| io(format!("writing {}", mark.display()), e))?;
            let partial = with_suffix(overlay, ".partial");
            sparse_copy(base, &partial)?;
            return std::fs::rename(&partial, overlay)
                .map_err(|e| io(format!("renaming {}", partial.display()), e));
        }
        Err(e) => return Err(io("running qemu-img".into(), e)),
    };
    if !out.status.success() {
        return Err(EngineError::StartFailed(format!(
            "qemu-img could not create the disk overlay: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn sparse_copy(from: &Path, to: &Path) -> Result<(), EngineError> {
    let status = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .map_err(|e| io("running cp".into(), e))?;
    if !status.success() {
        return Err(EngineError::StartFailed(format!(
            "could not copy the disk {} to {}",
            from.display(),
            to.display()
        )));
    }
    Ok(())
}

/// Beside an overlay that is a raw copy of its base (made without
/// qemu-img): the copy's format, which its first bytes must not decide,
/// being the guest's.
fn raw_copy_mark(overlay: &Path) -> PathBuf {
    with_suffix(overlay, ".raw-copy")
}

/// `path` with `suffix` appended to its name (not replacing an extension).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// The image format of an overlay ferry made: `raw` for a raw copy
/// ([`raw_copy_mark`]), else from its first bytes (a qcow2 header ferry
/// wrote, which the guest cannot reach). A raw copy probed by its first
/// bytes would let a guest that wrote a qcow2 header there have QEMU open
/// the backing or data file the header names on the next start.
fn disk_format(path: &Path) -> &'static str {
    if raw_copy_mark(path).exists() {
        return "raw";
    }
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|_| &magic == b"QFI\xfb")
        .unwrap_or(false);
    if is_qcow2 {
        "qcow2"
    } else {
        "raw"
    }
}

fn on_event(watch: &Watch, ev: QmpEvent) {
    tracing::debug!(event = ev.name, data = %ev.data, "QMP event");
    if WAKING_EVENTS.contains(&ev.name.as_str()) {
        watch.wake();
    }
    if ev.name == "SHUTDOWN" {
        let reason = ev.data["reason"].as_str().unwrap_or("").to_string();
        *watch.shutdown_reason.lock().expect("watch") = Some(reason);
    } else if ev.name == "GUEST_PANICKED" {
        *watch.shutdown_reason.lock().expect("watch") = Some("guest-panic".into());
    }
}

fn spawn_console_reader(
    mut stdout: impl Read + Send + 'static,
    tx: Sender<VmEvent>,
    watch: Arc<Watch>,
) {
    std::thread::Builder::new()
        .name("vm-console".into())
        .spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = tx.send(VmEvent::Console(buf[..n].to_vec()));
            }
            *watch.console_done.lock().expect("watch") = true;
            watch.console_closed.notify_all();
        })
        .expect("spawn thread");
}

fn spawn_stderr_reader(mut stderr: impl Read + Send + 'static, watch: Arc<Watch>) {
    std::thread::Builder::new()
        .name("vm-stderr".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]);
                tracing::debug!(stderr = %text.trim_end(), "QEMU");
                let mut tail = watch.stderr_tail.lock().expect("watch");
                tail.push_str(&text);
                if tail.len() > STDERR_TAIL {
                    let cut = tail.len() - STDERR_TAIL;
                    let cut = (cut..tail.len())
                        .find(|&i| tail.is_char_boundary(i))
                        .unwrap_or(0);
                    tail.drain(..cut);
                }
            }
            *watch.stderr_done.lock().expect("watch") = true;
            watch.stderr_closed.notify_all();
        })
        .expect("spawn thread");
}

fn spawn_waiter(mut child: Child, watch: Arc<Watch>, tx: Sender<VmEvent>) {
    std::thread::Builder::new()
        .name("vm-waiter".into())
        .spawn(move || {
            let status = child.wait();
            // Let the stderr reader drain what QEMU said last: its pipe
            // closes with QEMU, unless a child QEMU started still holds it.
            let done = watch.stderr_done.lock().expect("watch");
            drop(
                watch
                    .stderr_closed
                    .wait_timeout_while(done, STDERR_DRAIN, |done| !*done)
                    .expect("watch"),
            );
            // The same for the console: a guest's last words (a panic) come
            // before its exit.
            let done = watch.console_done.lock().expect("watch");
            drop(
                watch
                    .console_closed
                    .wait_timeout_while(done, STDERR_DRAIN, |done| !*done)
                    .expect("watch"),
            );
            let shutdown = watch.shutdown_reason.lock().expect("watch").clone();
            let cgroup = watch.cgroup.lock().expect("watch").take();
            let over_limit = cgroup
                .as_ref()
                .filter(|c| c.oom_kills() > 0)
                .map(|c| over_memory_limit(c));
            if let Some(c) = &cgroup {
                tracing::debug!(
                    cgroup = %c.path().display(),
                    peak = c.peak_memory(),
                    limit = c.memory_limit(),
                    "QEMU's memory"
                );
            }
            // QEMU is gone: its cgroup can go (the last reference).
            drop(cgroup);
            let reason = match shutdown.as_deref() {
                _ if over_limit.is_some() => ExitReason::EngineFailed {
                    detail: over_limit.unwrap_or_default(),
                },
                Some("guest-shutdown") => ExitReason::Poweroff,
                Some("guest-reset") => ExitReason::Reset,
                Some("guest-panic") => ExitReason::Panic,
                Some("host-qmp-quit") | Some("host-qmp-system-reset") | Some("host-signal") => {
                    ExitReason::Stopped
                }
                _ => {
                    let tail = watch.stderr_tail.lock().expect("watch").trim().to_string();
                    let detail = match (&status, tail.is_empty()) {
                        (_, false) => last_line(&tail),
                        (Ok(s), true) => format!("QEMU exited with {s}"),
                        (Err(e), true) => format!("waiting for QEMU failed: {e}"),
                    };
                    match status {
                        Ok(s) if s.code().is_none() => ExitReason::Stopped,
                        _ => ExitReason::EngineFailed { detail },
                    }
                }
            };
            *watch.exit.lock().expect("watch") = Some(reason.clone());
            watch.exited.notify_all();
            watch.wake();
            let _ = tx.send(VmEvent::Exited(reason));
        })
        .expect("spawn thread");
}

/// What to say about a QEMU the kernel killed for its cgroup's memory
/// limit.
fn over_memory_limit(cgroup: &VmCgroup) -> String {
    let disk = match cgroup.disk_on_tmpfs() >> 20 {
        0 => String::new(),
        mib => format!(", {mib} MiB for its disk on tmpfs"),
    };
    format!(
        "QEMU was killed by the kernel: the VM went over its memory limit of {} MiB \
         (guest RAM plus {} MiB for QEMU{disk}; cgroup {}); give the VM less work or more room \
         with ${}",
        cgroup.memory_limit() >> 20,
        cgroup.overhead() >> 20,
        cgroup.path().display(),
        crate::confine::MEMORY_OVERHEAD_ENV,
    )
}

/// Test builds only (`fault-injection`): with `FERRY_FAULT=hold-reclaim`,
/// the reclaimed guest runs for 3 s before its `stop`, long enough to send
/// what a test can count, and the log says that QEMU ran it. Nothing it
/// sends may leave (the caller silenced it first): a test cannot otherwise
/// observe the moment between the two commands.
#[cfg(feature = "fault-injection")]
fn hold_reclaimed(vm: &QemuVm) {
    if std::env::var("FERRY_FAULT").as_deref() != Ok("hold-reclaim") {
        return;
    }
    std::thread::sleep(Duration::from_secs(3));
    let status = vm.cmd("query-status", json!({})).unwrap_or_default();
    tracing::warn!(
        "FERRY_FAULT=hold-reclaim: held the reclaimed guest for 3000 ms, QEMU status {}",
        status["status"]
    );
}

#[cfg(not(feature = "fault-injection"))]
fn hold_reclaimed(_: &QemuVm) {}

/// How much of the VM's memory limit its disk needs: its whole size when
/// QEMU writes it on tmpfs, else nothing. A tmpfs page counts against the
/// cgroup of the process that wrote it, and without swap it cannot be
/// reclaimed: with `FERRY_STATE` on tmpfs a live move's arriving disk
/// (the source's copy writes it all) went over the limit of guest RAM plus
/// QEMU's own part, and the copy failed with `Input/output error`. A disk
/// on a block device only passes through the page cache, which the kernel
/// writes back and frees within the limit. A disk another process serves
/// (NBD) counts against that process, not QEMU.
fn disk_bytes_on_tmpfs(disk: &DiskSpec) -> u64 {
    let (written, size_of) = match disk {
        DiskSpec::Raw(path) => (path, path),
        DiskSpec::CopyOnWrite { base, overlay } => (overlay, base),
        DiskSpec::Nbd { .. } => return 0,
    };
    // The overlay may not exist yet: its directory says where it will be.
    let probe = if written.exists() {
        written.as_path()
    } else {
        written.parent().unwrap_or(written)
    };
    match std::fs::File::open(probe) {
        Ok(f) if on_tmpfs(&f) => std::fs::metadata(size_of).map(|m| m.len()).unwrap_or(0),
        _ => 0,
    }
}

/// Waits briefly for QEMU's exit and returns what it said on stderr.
fn wait_for_tail(watch: &Watch) -> String {
    let guard = watch.exit.lock().expect("watch");
    let _ = watch
        .exited
        .wait_timeout_while(guard, Duration::from_secs(2), |e| e.is_none())
        .expect("watch");
    last_line(watch.stderr_tail.lock().expect("watch").trim())
}

/// QEMU's error lines about a failed load, without the program name, at
/// most three, joined.
fn load_errors(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(|l| match l.split_once(": ") {
            Some((program, rest)) if program.contains("qemu") && !program.contains(' ') => rest,
            _ => l,
        })
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(3)..].join("; ")
}

fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Why a live copy did not end within `timeout`, from QEMU's
/// `query-migrate` answer at that moment: how much was left, how fast the
/// guest wrote and the link carried, how far the guest was slowed; and
/// what to do.
fn not_converging(last: &Value, timeout: Duration, throttle_pct: u64) -> String {
    let ram = &last["ram"];
    let mib = |bytes: f64| bytes / f64::from(1u32 << 20);
    let mut line = format!("the copy did not end within {} s", timeout.as_secs());
    if let Some(remaining) = ram["remaining"].as_u64() {
        line += &format!(": {:.0} MiB still to send", mib(remaining as f64));
        let page = ram["page-size"].as_u64().unwrap_or(4096) as f64;
        let dirty = ram["dirty-pages-rate"].as_u64().unwrap_or(0) as f64 * page;
        // `mbps`: megabits (10^6) per second.
        let sent = ram["mbps"].as_f64().unwrap_or(0.0) * 1e6 / 8.0;
        line += &format!(
            "; the guest wrote {:.1} MiB/s of memory while the link carried {:.1} MiB/s",
            mib(dirty),
            mib(sent)
        );
    }
    if throttle_pct > 0 {
        line += &format!(", its vCPUs slowed by up to {throttle_pct}%");
    }
    line + "; give the move more bandwidth (--max-bandwidth) or move the VM while it writes less"
}

/// Why QEMU is gone, in words.
fn describe(reason: &ExitReason) -> String {
    match reason {
        ExitReason::Poweroff => "QEMU exited: the guest powered off".into(),
        ExitReason::Reset => "QEMU exited: the guest rebooted".into(),
        ExitReason::Panic => "QEMU exited: the guest kernel panicked".into(),
        ExitReason::Stopped => "QEMU was stopped".into(),
        ExitReason::EngineFailed { detail } => detail.clone(),
    }
}

fn kill_pid(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions. Callers only send
    // it while the waiter thread has not recorded the child's exit, so the pid
    // still names our QEMU (a reap in that instant is the only, tiny, window).
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Creates (or truncates) `path` for the owner only: a saved state holds
/// guest memory when the RAM is not in a memory file.
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// A listening Unix socket at `path` (a stale one is replaced).
fn listen_at(path: &Path) -> Result<std::os::unix::net::UnixListener, EngineError> {
    let _ = std::fs::remove_file(path);
    std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| io(format!("listening on {}", path.display()), e))
}

fn io(context: String, source: std::io::Error) -> EngineError {
    EngineError::Io { context, source }
}

#[cfg(test)]
mod wake_tests {
    use super::*;

    fn event(name: &str) -> QmpEvent {
        QmpEvent {
            name: name.into(),
            data: json!({}),
        }
    }

    /// A wait for a migration or a block job ends at the event that may
    /// end it, even one that came between the query and the wait; other
    /// events do not end it, and it asks again after QUERY_FALLBACK
    /// without one.
    #[test]
    fn a_wait_for_qemu_ends_at_its_event_not_at_a_poll() {
        let watch = Arc::new(Watch::default());
        let seen = watch.wakes();
        on_event(&watch, event("MIGRATION"));
        let t = Instant::now();
        assert_eq!(watch.wait_wake(seen, Duration::from_secs(10)), seen + 1);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

        let seen = watch.wakes();
        on_event(&watch, event("RTC_CHANGE"));
        let t = Instant::now();
        assert_eq!(watch.wait_wake(seen, QUERY_FALLBACK), seen);
        assert!(t.elapsed() >= QUERY_FALLBACK, "{:?}", t.elapsed());

        for name in ["MIGRATION_PASS", "JOB_STATUS_CHANGE"] {
            let seen = watch.wakes();
            let w = watch.clone();
            let later = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                on_event(&w, event(name));
            });
            let t = Instant::now();
            assert_eq!(watch.wait_wake(seen, Duration::from_secs(10)), seen + 1);
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{name}: {:?}",
                t.elapsed()
            );
            later.join().unwrap();
        }
    }
}

#[cfg(test)]
mod converge_tests {
    use super::*;

    /// A copy that ran out of time says what was left, both rates (from
    /// QEMU's pages per second and megabits per second) and how far the
    /// guest was slowed; without QEMU's figures, only the time.
    #[test]
    fn a_copy_out_of_time_says_what_outran_it() {
        let last = json!({ "status": "active", "ram": {
            "remaining": 48u64 << 20, "page-size": 4096,
            "dirty-pages-rate": 5120, "mbps": 16.777216 } });
        let line = not_converging(&last, Duration::from_secs(600), 99);
        assert_eq!(
            line,
            "the copy did not end within 600 s: 48 MiB still to send; the guest wrote \
             20.0 MiB/s of memory while the link carried 2.0 MiB/s, its vCPUs slowed by up \
             to 99%; give the move more bandwidth (--max-bandwidth) or move the VM while it \
             writes less"
        );
        let line = not_converging(&Value::Null, Duration::from_secs(5), 0);
        assert!(
            line.starts_with("the copy did not end within 5 s; give"),
            "{line}"
        );
    }
}

#[cfg(test)]
mod cmdline_tests {
    use super::restart_by_triple_fault;

    #[test]
    fn a_guest_restarts_by_triple_fault_unless_told_otherwise() {
        let mut c = "console=ttyS0 panic=-1".to_string();
        restart_by_triple_fault(&mut c);
        assert_eq!(c, "console=ttyS0 panic=-1 reboot=t");
        let mut c = "console=ttyS0 reboot=a".to_string();
        restart_by_triple_fault(&mut c);
        assert_eq!(c, "console=ttyS0 reboot=a");
    }
}

#[cfg(test)]
mod args_tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "t".into(),
            kernel: "/k/kernel".into(),
            initramfs: "/k/initramfs".into(),
            cmdline: "console=ttyS0".into(),
            disk: DiskSpec::Raw("/d/disk".into()),
            memory_mib: 256,
            cpus: 1,
            memory_file: "/m/memory".into(),
            memory_shared: false,
            accel: Accel::Tcg,
            net: NetAttachment::Isolated,
            guest_mac: None,
            run_dir: "/r".into(),
            netboot: false,
        }
    }

    fn args(incoming: bool) -> Vec<String> {
        args_with(incoming, Netdev::Hub)
    }

    fn args_with(incoming: bool, netdev: Netdev) -> Vec<String> {
        qemu_args(
            &spec(),
            256 << 10,
            Path::new("/r/qmp.sock"),
            Path::new("/r/agent.sock"),
            None,
            Flags {
                incoming,
                paused: incoming,
                tcg_tb_mib: None,
                netboot_rom: None,
                tsc_khz: None,
                netdev,
                anonymous_memory: false,
                disk_iothread: true,
                over: Overrides::default(),
            },
        )
    }

    #[test]
    fn only_a_boot_gets_the_kernel_an_arriving_guest_brings_its_own() {
        let boot = args(false);
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(
                boot.iter().any(|a| a == flag),
                "a boot lacks {flag}: {boot:?}"
            );
        }
        let arriving = args(true);
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(
                !arriving.iter().any(|a| a == flag),
                "an arriving guest's QEMU got {flag}: {arriving:?}"
            );
        }
        assert!(arriving.iter().any(|a| a == "-incoming"));
    }

    #[test]
    fn the_disk_runs_in_an_iothread_the_command_line_defines() {
        for incoming in [false, true] {
            let a = args(incoming);
            let device = a
                .iter()
                .find(|x| x.starts_with("virtio-blk-"))
                .expect("a disk device");
            let thread = device
                .split(',')
                .find_map(|p| p.strip_prefix("iothread="))
                .unwrap_or_else(|| panic!("the disk has no iothread: {device}"));
            let object = format!("iothread,id={thread}");
            assert!(
                a.windows(2).any(|w| w[0] == "-object" && w[1] == object),
                "no -object {object}: {a:?}"
            );
        }
    }

    #[test]
    fn a_tap_reaches_qemu_only_as_the_descriptor_it_was_handed() {
        let a = args_with(true, Netdev::Tap(7));
        let netdev: Vec<_> = a.windows(2).filter(|w| w[0] == "-netdev").collect();
        assert_eq!(netdev.len(), 1, "{a:?}");
        assert_eq!(netdev[0][1], "tap,id=net0,fd=7");
        let a = args_with(true, Netdev::Hub);
        assert!(a.iter().any(|x| x == "hubport,id=net0,hubid=0"), "{a:?}");
        assert!(!a.iter().any(|x| x.contains("ifname=")), "{a:?}");
    }
}

#[cfg(test)]
mod prefetch_tests {
    use super::prefetch_memory;
    use std::os::unix::io::AsRawFd;

    /// How many of `file`'s pages are in the page cache (mincore).
    fn cached_pages(file: &std::fs::File, len: usize) -> usize {
        // SAFETY: a read-only shared mapping of `len` bytes of a file this
        // test owns; it is only passed to mincore and unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        let pages = len.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: `addr` maps `len` bytes (above) and `vec` holds one byte
        // per 4 KiB page of it.
        let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
        // SAFETY: unmaps exactly the mapping made above.
        unsafe { libc::munmap(addr, len) };
        assert_eq!(rc, 0, "mincore");
        vec.iter().filter(|b| **b & 1 == 1).count()
    }

    /// A temporary directory on a disk's file system (under target/), not
    /// in /tmp, which may be a tmpfs: the tests compare the two.
    pub(super) fn tempdir_on_disk() -> tempfile::TempDir {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
        std::fs::create_dir_all(&root).unwrap();
        tempfile::tempdir_in(&root).unwrap()
    }

    /// A new file of `len` bytes in `dir`, all holes.
    fn sparse_file(dir: &std::path::Path, len: usize) -> (std::path::PathBuf, std::fs::File) {
        let path = dir.join("memory");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(len as u64).unwrap();
        (path, file)
    }

    /// A guest's memory file full of holes is in the page cache once the
    /// prefetch is done, so that a live copy does not fault it in page by
    /// page. On disk (target/), not in /tmp: on tmpfs a hole has no page.
    #[test]
    fn a_sparse_memory_file_is_cached_whole_after_the_prefetch() {
        let dir = tempdir_on_disk();
        let len = 32usize << 20;
        let (path, file) = sparse_file(dir.path(), len);
        assert_eq!(
            cached_pages(&file, len),
            0,
            "a new sparse file has no cached pages"
        );
        prefetch_memory(&path)
            .expect("a prefetch thread")
            .join()
            .unwrap();
        assert_eq!(cached_pages(&file, len), len / 4096);
        assert!(prefetch_memory(&dir.path().join("missing")).is_none());
    }

    /// The same on tmpfs, where readahead does nothing and the prefetch
    /// faults the holes in instead: every page has one afterwards.
    #[test]
    fn a_sparse_memory_file_on_tmpfs_has_every_page_after_the_prefetch() {
        let dir = tempfile::tempdir_in("/dev/shm").expect("a directory on /dev/shm");
        let len = 32usize << 20;
        let (path, file) = sparse_file(dir.path(), len);
        assert!(super::on_tmpfs(&file), "/dev/shm is not a tmpfs here");
        assert_eq!(cached_pages(&file, len), 0, "holes have no pages");
        prefetch_memory(&path)
            .expect("a prefetch thread")
            .join()
            .unwrap();
        assert_eq!(cached_pages(&file, len), len / 4096);
    }
}

#[cfg(test)]
mod raw_copy_tests {
    use super::{create_overlay, disk_format};

    /// Without qemu-img the overlay is a raw copy of the base, and stays
    /// raw to ferry even once the guest has written a qcow2 header at its
    /// start: that header would name a backing file of the guest's choice.
    #[test]
    fn a_raw_copy_is_raw_whatever_the_guest_writes_at_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 16]).unwrap();
        let overlay = dir.path().join("disk.qcow2");
        let no_qemu_img = dir.path().join("no-such-qemu-img");
        create_overlay(&no_qemu_img, dir.path(), &base, &overlay).unwrap();
        assert_eq!(std::fs::read(&overlay).unwrap().len(), 1 << 16);
        assert_eq!(disk_format(&overlay), "raw");

        // What a hostile guest writes to its disk's first sector.
        let mut bytes = std::fs::read(&overlay).unwrap();
        bytes[..4].copy_from_slice(b"QFI\xfb");
        std::fs::write(&overlay, &bytes).unwrap();
        assert_eq!(disk_format(&overlay), "raw");

        // A qcow2 overlay ferry made (no mark) is read by its header.
        let made = dir.path().join("made.qcow2");
        std::fs::write(&made, b"QFI\xfb\0\0\0\x03").unwrap();
        assert_eq!(disk_format(&made), "qcow2");
    }
}

#[cfg(test)]
mod disk_on_tmpfs_tests {
    use super::disk_bytes_on_tmpfs;
    use ferry_engine::DiskSpec;

    /// A disk QEMU writes on tmpfs adds its size to the VM's memory limit;
    /// on a disk, or served by another process, it adds nothing.
    #[test]
    fn only_a_disk_written_on_tmpfs_counts_against_the_memory_limit() {
        let shm = tempfile::tempdir_in("/dev/shm").expect("a directory on /dev/shm");
        let disk_dir = super::prefetch_tests::tempdir_on_disk();
        let size = 3u64 << 20;
        let raw_on_shm = shm.path().join("disk.raw");
        let raw_on_disk = disk_dir.path().join("disk.raw");
        for path in [&raw_on_shm, &raw_on_disk] {
            std::fs::File::create(path).unwrap().set_len(size).unwrap();
        }

        assert_eq!(
            disk_bytes_on_tmpfs(&DiskSpec::Raw(raw_on_shm.clone())),
            size
        );
        assert_eq!(disk_bytes_on_tmpfs(&DiskSpec::Raw(raw_on_disk.clone())), 0);
        // An overlay not made yet: where it will be decides; the base's
        // size is what it can grow to.
        let cow = |base: &std::path::Path, dir: &std::path::Path| DiskSpec::CopyOnWrite {
            base: base.to_path_buf(),
            overlay: dir.join("overlay.qcow2"),
        };
        assert_eq!(disk_bytes_on_tmpfs(&cow(&raw_on_disk, shm.path())), size);
        assert_eq!(disk_bytes_on_tmpfs(&cow(&raw_on_shm, disk_dir.path())), 0);
        let nbd = DiskSpec::Nbd {
            socket: shm.path().join("nbd.sock"),
        };
        assert_eq!(disk_bytes_on_tmpfs(&nbd), 0);
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    /// The rate told to QEMU is what the copy has sent over the time it
    /// took; without both figures (QEMU's first answers) there is none.
    #[test]
    fn a_first_pass_rate_is_bytes_over_qemus_time() {
        let info = json!({ "total-time": 2000, "ram": { "transferred": 100_000_000 } });
        assert_eq!(first_pass_rate(&info), Some(50_000_000));
        assert_eq!(
            first_pass_rate(&json!({ "total-time": 0, "ram": { "transferred": 5 } })),
            None
        );
        assert_eq!(
            first_pass_rate(&json!({ "total-time": 10, "ram": { "transferred": 0 } })),
            None
        );
        assert_eq!(first_pass_rate(&json!({ "status": "setup" })), None);
    }
}
