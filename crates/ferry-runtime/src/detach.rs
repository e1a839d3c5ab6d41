//! Detached VMs (`ferry up`, `run --detach`, `start`): each VM is owned by
//! its own supervisor, a `ferry supervise NAME` process that the starting
//! command spawns in a new session, with standard input `/dev/null` once
//! it has read its [`DetachSpec`], and standard output and error appended
//! to `<vm dir>/supervisor.log` once its directory exists. The supervisor
//! holds QEMU (which dies with it: `PR_SET_PDEATHSIG`), the exposure
//! proxies and the control socket, exactly as a foreground `ferry run`
//! does, and answers one more control request, `stop`.
//!
//! Readiness comes back over a pipe ([`launch`] / [`ReadyPipe`]): one JSON
//! line, either the VM is live or the one-line error and exit code that a
//! foreground command would have printed. A supervisor that dies before it
//! says either closes the pipe, and the starting command says so and
//! where its log is.
//!
//! Stopping: `ferry stop` (or SIGTERM/SIGINT to the supervisor) suspends
//! the VM into a package — its own `<vm dir>/saved.ferry` for a clone, the
//! package it runs from otherwise — and the directory keeps that package,
//! the record and the logs ([`crate::vmdir::KEPT`]); `stop --discard` shuts
//! the guest down and removes everything. A clone's changed memory is
//! private to its QEMU and in no file, so its first suspend saves RAM in the
//! device state (see [`PackageMeta::memory_in_state`]); from then on it runs
//! from a memory file of its own, like any resumed package.
//!
//! Fleets: a supervisor whose VM has a [`FleetSpec`] looks at the state
//! directory twice a second and, whenever the set of running members
//! changes, sends the guest the new list (`set-fleet`), which the agent
//! writes to `/run/ferry/fleet.json`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_agent_proto::{FleetMember, Identity, Reply};
use ferry_engine::{Accel, AccelChoice, Engine, SavedState};
use ferry_package::{Package, SectionKind};
use serde::{Deserialize, Serialize};

use crate::cache::SectionCache;
use crate::control::{ControlHandler, ControlReply, ControlRequest};
use crate::ops::forward_signals;
use crate::package::{
    check_host_memory, check_writable, choose_saved_accel, now_unix, read_meta, saved_provenance,
    write_package, PackageLock, PackageMeta, Sources, DEVICE_STATE_IN,
};
use crate::record::{FleetSpec, NetSpec, RecordState, VmRecord};
use crate::supervisor::{
    describe_exit, BootImage, RestoreMemory, RunningVm, SupervisorEvent, VmConfig,
};
use crate::vmdir::{files, VmDir};
use crate::{Paths, RuntimeError};

/// What a detached VM's supervisor is asked to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetachSpec {
    /// The VM's name.
    pub name: String,
    /// What it starts from.
    pub from: StartFrom,
    /// Accelerator choice (it must be the package's).
    pub accel: AccelChoice,
    /// Its network.
    #[serde(default)]
    pub net: NetSpec,
    /// Its fleet.
    #[serde(default)]
    pub fleet: Option<FleetSpec>,
    /// How long to wait for the service to be live.
    pub live_timeout_s: u64,
}

/// Where a detached VM comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StartFrom {
    /// A copy-on-write clone of a package, with its own identity.
    Clone {
        /// The package.
        package: PathBuf,
        /// The starting command has checked every chunk already.
        #[serde(default)]
        verified: bool,
    },
    /// The package itself, suspended back into it by `ferry stop`
    /// (`run --detach` without `--clone`).
    Package {
        /// The package.
        package: PathBuf,
    },
    /// The VM's own saved state (`ferry start` of a suspended VM); its
    /// network and fleet come from its record.
    Saved,
}

/// A supervisor's report once its VM is live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    /// The VM's name.
    pub name: String,
    /// The supervisor's pid.
    pub pid: u32,
    /// The engine's pid.
    pub engine_pid: Option<u32>,
    /// The accelerator.
    pub accel: Accel,
    /// Milliseconds from the supervisor's start to live.
    pub ms: u64,
    /// Exposed ports.
    pub exposes: Vec<ferry_net::ExposeSpec>,
}

/// The one line a supervisor writes to its ready pipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum ReadyMsg {
    /// The VM is live.
    Live(Started),
    /// It could not be started.
    Failed {
        /// ferry's exit code for the error.
        code: u8,
        /// The error on one line.
        message: String,
    },
}

/// The hidden subcommand the starting command runs: `ferry supervise
/// --ready-fd FD NAME`, with the [`DetachSpec`] as JSON on standard input.
pub const SUPERVISE_COMMAND: &str = "supervise";

/// A supervisor being started.
pub struct Launch {
    name: String,
    child: Child,
    ready: File,
    log: PathBuf,
}

/// Starts the supervisor of `spec` (the `ferry` binary at `ferry`) in a
/// new session; [`Launch::wait`] waits for its report.
pub fn launch(ferry: &Path, paths: &Paths, spec: &DetachSpec) -> Result<Launch, RuntimeError> {
    let (read, write) = pipe()?;
    let write_fd = write.as_raw_fd();
    let mut cmd = Command::new(ferry);
    cmd.arg(SUPERVISE_COMMAND)
        .arg("--ready-fd")
        .arg(write_fd.to_string())
        .arg(&spec.name)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/");
    if std::env::var_os("FERRY_LOG").is_none() {
        cmd.env("FERRY_LOG", "info");
    }
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls setsid and fcntl, which are async-signal-safe; `write` stays
    // open in the parent until after the spawn.
    unsafe {
        cmd.pre_exec(move || {
            // Its own session: no terminal, and a Ctrl-C in the starting
            // command's terminal does not reach it.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The one descriptor it inherits besides stdio.
            if libc::fcntl(write_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(RuntimeError::io(format!("starting {}", ferry.display())))?;
    drop(write);
    let mut stdin = child.stdin.take().expect("piped");
    let json = serde_json::to_vec(spec).expect("the spec serialises");
    // A supervisor that died at once closes its end: its report says why.
    let _ = stdin.write_all(&json);
    drop(stdin);
    Ok(Launch {
        name: spec.name.clone(),
        child,
        ready: File::from(read),
        log: paths.vms().join(&spec.name).join(files::SUPERVISOR_LOG),
    })
}

impl Launch {
    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits up to `timeout` for the supervisor's report. If `interrupted`
    /// becomes true meanwhile, or the time is up, the supervisor is told to
    /// stop (SIGTERM: a VM that is not live yet is dropped) and this fails.
    pub fn wait(
        mut self,
        timeout: Duration,
        interrupted: &AtomicBool,
    ) -> Result<Started, RuntimeError> {
        let deadline = Instant::now() + timeout;
        let mut line = Vec::new();
        let mut buf = [0u8; 4096];
        let stopped = |child: &mut Child, why: &str| {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let waited = Instant::now();
            while waited.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            why.to_string()
        };
        loop {
            if interrupted.load(Ordering::SeqCst) {
                let why = stopped(&mut self.child, "interrupted");
                return Err(self.failed(&why, 130));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = stopped(
                    &mut self.child,
                    &format!(
                        "not live within {} s; stopped it (its log: {})",
                        timeout.as_secs(),
                        self.log.display()
                    ),
                );
                return Err(self.failed(&why, 5));
            }
            if !readable(&self.ready, left.min(Duration::from_millis(200))) {
                continue;
            }
            let n = match self.ready.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RuntimeError::io("the supervisor's ready pipe")(e)),
            };
            if n == 0 {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                let why = format!(
                    "its supervisor exited ({status}) before the VM was live; see {}",
                    self.log.display()
                );
                return Err(self.failed(&why, 5));
            }
            line.extend_from_slice(&buf[..n]);
            if line.contains(&b'\n') {
                break;
            }
        }
        match serde_json::from_slice::<ReadyMsg>(&line) {
            Ok(ReadyMsg::Live(started)) => Ok(started),
            Ok(ReadyMsg::Failed { code, message }) => {
                // It exits right after saying so.
                let _ = self.child.wait();
                Err(RuntimeError::DetachedStart {
                    name: self.name,
                    message,
                    code,
                })
            }
            Err(e) => Err(self.failed(&format!("its supervisor's report is garbled: {e}"), 1)),
        }
    }

    fn failed(&self, message: &str, code: u8) -> RuntimeError {
        RuntimeError::DetachedStart {
            name: self.name.clone(),
            message: message.to_string(),
            code,
        }
    }
}

/// Whether `file` has something to read (or is closed) within `timeout`.
fn readable(file: &File, timeout: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd that lives on this stack frame, for a
    // descriptor `file` keeps open.
    let n = unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
    n > 0
}

/// A pipe, both ends close-on-exec.
fn pipe() -> Result<(OwnedFd, OwnedFd), RuntimeError> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2(2) writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(RuntimeError::io("creating a pipe")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: pipe2 succeeded: both descriptors are new and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The supervisor's end of the ready pipe.
pub struct ReadyPipe(Option<File>);

impl ReadyPipe {
    /// Takes descriptor `fd` (from `--ready-fd`), checking it is open. It
    /// is made close-on-exec again, so that QEMU does not inherit it.
    pub fn from_fd(fd: i32) -> Result<Self, RuntimeError> {
        // SAFETY: fcntl(2) on a descriptor number; an invalid one fails
        // with EBADF and nothing else happens.
        let ok = fd > 2 && unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == 0;
        if !ok {
            return Err(RuntimeError::BadOption(format!(
                "--ready-fd {fd} is not an open descriptor: 'ferry supervise' is started by ferry up, run --detach and start"
            )));
        }
        // SAFETY: the descriptor is open (checked above) and handed to this
        // process for it alone to write and close.
        Ok(Self(Some(unsafe { File::from_raw_fd(fd) })))
    }

    /// Sends the report and closes the pipe; later reports are dropped.
    pub fn send(&mut self, msg: &ReadyMsg) {
        if let Some(mut f) = self.0.take() {
            let mut line = serde_json::to_vec(msg).expect("the report serialises");
            line.push(b'\n');
            let _ = f.write_all(&line);
        }
    }

    /// Whether the report was sent.
    pub fn sent(&self) -> bool {
        self.0.is_none()
    }
}

/// How a supervisor's VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Suspended into its package.
    Suspended,
    /// Shut down and its state dropped.
    Discarded,
}

/// `ferry supervise`: starts the VM `spec` describes, reports to `ready`
/// once it is live, then runs it until `ferry stop` (or SIGTERM/SIGINT,
/// which suspend it too), or until it dies (`Err`; its record then says
/// `crashed` or `stopped` and why).
pub fn supervise(
    engine: &dyn Engine,
    paths: &Paths,
    spec: &DetachSpec,
    ready: &mut ReadyPipe,
) -> Result<Outcome, RuntimeError> {
    let t0 = Instant::now();
    // SIGTERM/SIGINT before the VM's own signal forwarding is in place (the
    // starting command gave up on it) must not kill this process midway,
    // which would leave a namespace behind: noted here, acted on as soon as
    // the VM exists.
    let early = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        signal_hook::flag::register(sig, early.clone())
            .map_err(RuntimeError::io("signal handler"))?;
    }
    let mut sup = start_vm(engine, paths, spec, &early)?;
    let status = sup.vm.status();
    let started = Started {
        name: spec.name.clone(),
        pid: std::process::id(),
        engine_pid: status.engine_pid,
        accel: status.accel,
        ms: t0.elapsed().as_millis() as u64,
        exposes: status.exposes.clone(),
    };
    tracing::info!(ms = started.ms, "live");
    ready.send(&ReadyMsg::Live(started));

    let inbox = sup.inbox.clone();
    let watcher = sup.record.fleet.clone().map(|fleet| {
        FleetWatcher::start(
            paths.clone(),
            spec.name.clone(),
            fleet,
            sup.meta.network.gateway.clone(),
            inbox.clone(),
        )
    });

    let (outcome, reply) = loop {
        let signal = match sup.vm.wait_for_signal() {
            Ok(sig) => sig,
            Err(e) => return Err(sup.died(e)),
        };
        let mut jobs = inbox.take();
        if signal != WAKE {
            tracing::info!(signal, "signalled: suspending, as 'ferry stop' does");
            jobs.push(Job::Stop {
                discard: false,
                reply: None,
            });
        }
        let mut done = None;
        for job in jobs {
            match job {
                Job::Fleet(members) if done.is_none() => {
                    let n = members.len();
                    match sup.vm.set_fleet(&spec.name, members) {
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
                Job::Stop { discard, reply } if done.is_none() => match sup.stop(engine, discard) {
                    Ok(reply_msg) => done = Some((discard, reply, reply_msg)),
                    Err(e) => {
                        tracing::warn!(error = %e, "stopping failed; the VM keeps running");
                        if let Some(r) = reply {
                            let _ = r.send(ControlReply::Error {
                                message: e.to_string(),
                            });
                        }
                    }
                },
                Job::Stop { reply, .. } => {
                    if let Some(r) = reply {
                        let _ = r.send(ControlReply::Error {
                            message: "the VM is being stopped already".into(),
                        });
                    }
                }
            }
        }
        if let Some((discard, reply, msg)) = done {
            let outcome = if discard {
                Outcome::Discarded
            } else {
                Outcome::Suspended
            };
            break (outcome, reply.map(|r| (r, msg)));
        }
    };
    if let Some(w) = watcher {
        w.stop.store(true, Ordering::SeqCst);
    }
    let t = Instant::now();
    let answer = |reply: Option<(Sender<ControlReply>, ControlReply)>| {
        if let Some((r, msg)) = reply {
            let _ = r.send(msg);
            // Let the control thread write it before this process exits.
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // The package first: once the directory is unlocked, 'ferry start'
    // may resume the VM at once, from the same package.
    drop(sup.package_lock);
    match outcome {
        Outcome::Suspended => {
            drop(sup.vm);
            answer(reply);
        }
        Outcome::Discarded => {
            match sup.vm.shutdown() {
                Ok(reason) => tracing::info!(reason = describe_exit(&reason), "shut down"),
                Err(e) => tracing::warn!(error = %e, "shutting down"),
            }
            // The time it took includes the guest's shutdown.
            let reply = reply.map(|(r, msg)| match msg {
                ControlReply::Stopped { state, ms, saved } => (
                    r,
                    ControlReply::Stopped {
                        state,
                        ms: ms + t.elapsed().as_millis() as u64,
                        saved,
                    },
                ),
                other => (r, other),
            });
            answer(reply);
        }
    }
    tracing::info!(
        ms = t.elapsed().as_millis() as u64,
        ?outcome,
        "supervisor done"
    );
    Ok(outcome)
}

/// A control wake-up rather than a real signal (`Signal(0)`).
const WAKE: i32 = 0;

/// Work for the supervisor's main loop, from control connections and the
/// fleet watcher.
enum Job {
    Stop {
        discard: bool,
        reply: Option<Sender<ControlReply>>,
    },
    Fleet(Vec<FleetMember>),
}

struct Inbox {
    jobs: Mutex<Vec<Job>>,
    wake: Sender<SupervisorEvent>,
}

impl Inbox {
    fn push(&self, job: Job) {
        self.jobs.lock().expect("inbox").push(job);
        let _ = self.wake.send(SupervisorEvent::Signal(WAKE));
    }

    fn take(&self) -> Vec<Job> {
        std::mem::take(&mut *self.jobs.lock().expect("inbox"))
    }
}

/// Answers `stop` on the control socket by handing it to the main loop.
struct StopHandler(Arc<Inbox>);

impl ControlHandler for StopHandler {
    fn handle(&self, request: ControlRequest) -> ControlReply {
        match request {
            ControlRequest::Stop { discard } => {
                let (tx, rx) = channel();
                self.0.push(Job::Stop {
                    discard,
                    reply: Some(tx),
                });
                rx.recv_timeout(Duration::from_secs(900))
                    .unwrap_or_else(|_| ControlReply::Error {
                        message: "the supervisor ended without finishing the stop; 'ferry ps' shows what is left".into(),
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

/// A detached VM and what its supervisor needs to suspend it.
struct Supervised {
    vm: RunningVm,
    record: VmRecord,
    meta: PackageMeta,
    sources: Sources,
    /// Where unchanged chunks are copied from when suspending: the package
    /// the VM last resumed from.
    base_package: PathBuf,
    /// Whether its memory is a private mapping (a clone that never
    /// suspended): its RAM is then saved in the device state.
    private_memory: bool,
    package_lock: Option<PackageLock>,
    /// Work for the main loop.
    inbox: Arc<Inbox>,
    _signals: crate::ops::SignalForwarder,
}

/// Resumes the VM `spec` describes and waits until it is live.
fn start_vm(
    engine: &dyn Engine,
    paths: &Paths,
    spec: &DetachSpec,
    early: &AtomicBool,
) -> Result<Supervised, RuntimeError> {
    let name = &spec.name;
    let (package, clone, verified, claimed, previous) = match &spec.from {
        StartFrom::Clone { package, verified } => (package.clone(), true, *verified, None, None),
        StartFrom::Package { package } => (package.clone(), false, false, None, None),
        StartFrom::Saved => {
            let dir = VmDir::resume(paths, name)?;
            let Some(record) = VmRecord::load(dir.path()) else {
                let err = RuntimeError::BadOption(format!(
                    "'{name}' has no record ({}): it was not started detached, so there is nothing to resume",
                    dir.path().join(files::RECORD).display()
                ));
                dir.remove();
                return Err(err);
            };
            let saved = record.saved.clone().filter(|p| p.exists()).ok_or_else(|| {
                RuntimeError::BadOption(format!(
                    "'{name}' has no saved state to resume ({}); 'ferry rm {name}' removes it",
                    record.note.as_deref().unwrap_or("it never was suspended")
                ))
            })?;
            (saved, false, false, Some(dir), Some(record))
        }
    };
    let (net, fleet) = match &previous {
        Some(r) => (r.net.clone(), r.fleet.clone()),
        None => (spec.net.clone(), spec.fleet.clone()),
    };
    // A package the VM writes back into is its alone while it runs.
    let owns_package = previous
        .as_ref()
        .is_some_and(|r| claimed.as_ref().is_some_and(|d| r.owns_saved(d.path())));
    let lock = if clone || owns_package {
        None
    } else {
        Some(PackageLock::acquire(paths, &package)?)
    };
    let pkg = Package::open(&package)?;
    let meta = read_meta(&pkg)?;
    for kind in SectionKind::ALL {
        pkg.section(kind)?;
    }
    if !verified {
        let t = Instant::now();
        pkg.verify(&mut |_, _| {})?;
        tracing::info!(ms = t.elapsed().as_millis() as u64, "package verified");
    }
    check_host_memory(meta.provenance.memory_mib)?;
    let vm_dir = paths.vms().join(name);
    let cache = SectionCache::new(&paths.cache);
    let kernel = cache.get(&pkg, SectionKind::Kernel)?;
    let initramfs = cache.get(&pkg, SectionKind::Initramfs)?;
    // A clone runs from the shared cache; a VM that writes back owns its
    // memory and disk, extracted into its directory.
    let (disk, memory_file) = if clone {
        (
            cache.get(&pkg, SectionKind::Disk)?,
            cache.get(&pkg, SectionKind::Memory)?,
        )
    } else {
        (vm_dir.join(files::BASE_DISK), vm_dir.join(files::MEMORY))
    };
    let image = BootImage {
        kernel: kernel.clone(),
        initramfs: initramfs.clone(),
        cmdline: meta.cmdline.clone(),
        disk,
        source: package.display().to_string(),
        network: meta.network.clone(),
        disk_server: None,
    };
    let decision = choose_saved_accel(engine, spec.accel, &image, meta.provenance.accel)?;
    let state = SavedState {
        device_state: vm_dir.join(DEVICE_STATE_IN),
        memory_file: (!meta.memory_in_state).then(|| memory_file.clone()),
        provenance: meta.provenance.clone(),
    };
    let config = VmConfig {
        name: name.clone(),
        memory_mib: meta.provenance.memory_mib,
        cpus: meta.provenance.cpus,
        accel: decision.accel,
        echo_console: false,
        net: net.choice(),
    };
    let record = VmRecord {
        name: name.clone(),
        state: RecordState::Running,
        package: previous
            .as_ref()
            .map(|r| r.package.clone())
            .unwrap_or(package.clone()),
        clone: previous.as_ref().map(|r| r.clone).unwrap_or(clone),
        saved: if clone { None } else { Some(package.clone()) },
        fleet,
        net,
        accel: decision.accel,
        memory_mib: meta.provenance.memory_mib,
        supervisor_pid: std::process::id(),
        started_unix: now_unix(),
        note: None,
    };
    let resuming = previous.is_some();
    let prepare = |d: &VmDir| -> Result<(), RuntimeError> {
        redirect_output(&d.path().join(files::SUPERVISOR_LOG));
        tracing::info!(package = %package.display(), clone, "starting");
        // A suspended VM's record keeps saying so until it is live again:
        // if this start fails, it is still suspended.
        if !resuming {
            record.save(d.path())?;
        }
        pkg.extract(
            SectionKind::DeviceState,
            &d.path().join(DEVICE_STATE_IN),
            &mut |_, _| {},
        )?;
        if !clone {
            let t = Instant::now();
            pkg.extract(SectionKind::Memory, &memory_file, &mut |_, _| {})?;
            pkg.extract(
                SectionKind::Disk,
                &d.path().join(files::BASE_DISK),
                &mut |_, _| {},
            )?;
            tracing::info!(
                ms = t.elapsed().as_millis() as u64,
                "memory and disk extracted"
            );
        }
        Ok(())
    };
    let memory = if clone {
        RestoreMemory::Private
    } else {
        RestoreMemory::Shared
    };
    let mut vm = match claimed {
        Some(dir) => {
            RunningVm::restore_in(dir, engine, paths, &image, &config, &state, memory, prepare)?
        }
        None => RunningVm::restore(engine, paths, &image, &config, &state, memory, prepare)?,
    };
    // From here a signal reaches the VM's event channel (and interrupts the
    // wait for live); one that came earlier stops the start now.
    let signals = forward_signals(&vm)?;
    if early.load(Ordering::SeqCst) {
        return Err(RuntimeError::Interrupted);
    }
    // A `stop` that comes before the VM is live waits for it.
    let inbox = Arc::new(Inbox {
        jobs: Mutex::default(),
        wake: vm.event_sender(),
    });
    vm.set_control_extension(Arc::new(StopHandler(inbox.clone())));
    let identity = clone.then(|| Identity {
        hostname: name.clone(),
        machine_id: random_hex(16),
    });
    let live =
        matches!(vm.after_resume(identity)?, Reply::Resumed { ref status, .. } if status.live);
    if !live {
        vm.wait_live(Duration::from_secs(spec.live_timeout_s))?;
    }
    vm.mark("running");
    record.save(vm.dir().path())?;
    Ok(Supervised {
        vm,
        record,
        meta,
        sources: Sources { kernel, initramfs },
        base_package: package,
        private_memory: clone,
        package_lock: lock,
        inbox,
        _signals: signals,
    })
}

impl Supervised {
    /// Suspends (or, with `discard`, prepares to drop) the VM; the caller
    /// then drops or shuts it down. On `Err` the VM runs on.
    fn stop(&mut self, engine: &dyn Engine, discard: bool) -> Result<ControlReply, RuntimeError> {
        let t = Instant::now();
        let dir = self.vm.dir().path().to_path_buf();
        if discard {
            self.vm.mark("stopping");
            // Without its record and own package, the directory goes whole.
            if self.record.owns_saved(&dir) {
                let _ = std::fs::remove_file(dir.join(files::SAVED));
            }
            let _ = std::fs::remove_file(dir.join(files::RECORD));
            return Ok(ControlReply::Stopped {
                state: "discarded".into(),
                ms: t.elapsed().as_millis() as u64,
                saved: None,
            });
        }
        self.vm.mark("suspending");
        let target = self
            .record
            .saved
            .clone()
            .unwrap_or_else(|| dir.join(files::SAVED));
        match self.suspend(engine, &target) {
            Ok(()) => {}
            Err(e) => {
                let _ = self.vm.engine_vm().resume();
                let _ = self.vm.after_resume(None);
                self.vm.mark("running");
                return Err(e);
            }
        }
        self.record.state = RecordState::Suspended;
        self.record.saved = Some(target.clone());
        self.record.save(&dir)?;
        let ms = t.elapsed().as_millis() as u64;
        tracing::info!(ms, saved = %target.display(), "suspended");
        Ok(ControlReply::Stopped {
            state: "suspended".into(),
            ms,
            saved: Some(target.display().to_string()),
        })
    }

    fn suspend(&mut self, engine: &dyn Engine, target: &Path) -> Result<(), RuntimeError> {
        check_writable(target)?;
        let provenance = saved_provenance(&mut self.vm, engine)?;
        let dir = self.vm.dir().path().to_path_buf();
        if self.private_memory {
            // RAM went into the device state; the memory section is all
            // holes, of the guest's size.
            let path = dir.join(files::MEMORY);
            File::create(&path)
                .and_then(|f| f.set_len(self.meta.provenance.memory_bytes()))
                .map_err(RuntimeError::io(&path))?;
        }
        let old = Package::open(&self.base_package)?;
        let meta = PackageMeta {
            ferry_version: env!("CARGO_PKG_VERSION").into(),
            written_unix: now_unix(),
            generation: self.meta.generation + 1,
            provenance,
            memory_in_state: self.private_memory,
            ..self.meta.clone()
        };
        write_package(&mut self.vm, target, &meta, &self.sources, Some(&old))
    }

    /// Records how the VM died (a guest that powered off is `stopped`,
    /// anything else `crashed`), then lets it go: the directory keeps the
    /// record and the logs for `ferry ps` and `ferry logs`.
    fn died(mut self, e: RuntimeError) -> RuntimeError {
        let powered_off = matches!(&e, RuntimeError::VmDied { reason, .. }
            if *reason == describe_exit(&ferry_engine::ExitReason::Poweroff));
        self.record.state = if powered_off {
            RecordState::Stopped
        } else {
            RecordState::Crashed
        };
        // The console lines are in the log, where `ps` and `logs` read them.
        self.record.note = Some(match &e {
            RuntimeError::VmDied { reason, .. } if powered_off => reason.clone(),
            RuntimeError::VmDied { reason, .. } => format!("the VM stopped unexpectedly: {reason}"),
            other => other.to_string(),
        });
        tracing::warn!(error = %e, "the VM ended");
        if let Err(err) = self.record.save(self.vm.dir().path()) {
            tracing::warn!(error = %err, "cannot record how the VM ended");
        }
        drop(self.vm);
        e
    }
}

/// Appends this process's standard output and error to `log`.
fn redirect_output(log: &Path) {
    let Ok(file) = File::options().create(true).append(true).open(log) else {
        return;
    };
    for fd in [1, 2] {
        // SAFETY: dup2(2) of a descriptor `file` keeps open onto stdout or
        // stderr; Rust's std handles write to whatever those numbers are.
        unsafe {
            libc::dup2(file.as_raw_fd(), fd);
        }
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// The accelerator choice that gets `accel` again.
pub fn choice_of(accel: Accel) -> AccelChoice {
    match accel {
        Accel::Kvm => AccelChoice::Kvm,
        Accel::Tcg => AccelChoice::Tcg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_reports_round_trip() {
        let spec = DetachSpec {
            name: "web-0".into(),
            from: StartFrom::Clone {
                package: "/p/web.ferry".into(),
                verified: true,
            },
            accel: AccelChoice::Auto,
            net: NetSpec::default(),
            fleet: Some(FleetSpec {
                name: "web".into(),
                guest_port: 8000,
            }),
            live_timeout_s: 60,
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<DetachSpec>(&json).unwrap(), spec);
        let msg = ReadyMsg::Failed {
            code: 3,
            message: "no".into(),
        };
        let json = serde_json::to_string(&msg).unwrap();
        assert_eq!(json, r#"{"result":"failed","code":3,"message":"no"}"#);
        assert_eq!(serde_json::from_str::<ReadyMsg>(&json).unwrap(), msg);
    }

    #[test]
    fn a_ready_pipe_needs_an_open_descriptor() {
        assert!(ReadyPipe::from_fd(987).is_err());
        assert!(ReadyPipe::from_fd(1).is_err());
        let (read, write) = pipe().unwrap();
        let fd = write.as_raw_fd();
        std::mem::forget(write);
        let mut pipe = ReadyPipe::from_fd(fd).unwrap();
        assert!(!pipe.sent());
        pipe.send(&ReadyMsg::Failed {
            code: 5,
            message: "x".into(),
        });
        assert!(pipe.sent());
        let mut text = String::new();
        File::from(read).read_to_string(&mut text).unwrap();
        assert!(text.ends_with("\"message\":\"x\"}\n"), "{text}");
    }
}
