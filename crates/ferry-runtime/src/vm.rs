//! A running VM and everything ferry holds for it: the engine's VM, the state
//! directory, the console log, the agent connection, the network and the
//! control socket. Dropping a [`RunningVm`] kills the guest and removes its
//! state directory, so no error path can leave a stray engine process
//! behind. It is made by the start pipeline ([`crate::start`]) and driven
//! by its one owner ([`crate::owner`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_agent_proto::{b64_encode, Identity, Reply, Request};
use ferry_blueprint::Blueprint;
use ferry_engine::{
    Accel, DiskSpec, Engine, ExitReason, NetAttachment, SavedState, Vm, VmEvent, VmSpec,
};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::agent::{AgentClient, AgentEvent};
use crate::control::{
    ControlHandler, ControlReply, ControlRequest, ControlServer, ExecOutput, VmStatus,
    CONTROL_API_VERSION,
};
use crate::error::{FileError, StartError, VmError};
use crate::guest_errors::{ErrorLog, GuestError, GuestErrorKind};
use crate::vmdir::{files, ConsoleLog, VmDir, CONSOLE_LOG_CAP};
use crate::Paths;

/// The most agent events queued for the supervisor and not yet taken. A
/// guest flooding its agent channel while nobody drains the queue (during
/// a suspend, or a long operation) cannot grow it past this: the excess is
/// dropped and logged once, and the VM keeps running.
pub const MAX_QUEUED_AGENT_EVENTS: usize = 1024;

/// The supervisor's end of its event channel, counting the agent events
/// in it (see [`MAX_QUEUED_AGENT_EVENTS`]).
struct EventQueue {
    rx: Receiver<SupervisorEvent>,
    agent_queued: Arc<AtomicUsize>,
}

impl EventQueue {
    fn taken(&self, ev: SupervisorEvent) -> SupervisorEvent {
        if matches!(ev, SupervisorEvent::Agent(_)) {
            self.agent_queued.fetch_sub(1, Ordering::SeqCst);
        }
        ev
    }

    fn recv(&self) -> Result<SupervisorEvent, std::sync::mpsc::RecvError> {
        self.rx.recv().map(|ev| self.taken(ev))
    }

    fn try_recv(&self) -> Result<SupervisorEvent, std::sync::mpsc::TryRecvError> {
        self.rx.try_recv().map(|ev| self.taken(ev))
    }

    fn recv_timeout(&self, d: Duration) -> Result<SupervisorEvent, RecvTimeoutError> {
        self.rx.recv_timeout(d).map(|ev| self.taken(ev))
    }
}

/// Queues an agent event for the supervisor unless [`MAX_QUEUED_AGENT_EVENTS`]
/// are waiting already (a disconnect always goes through); says so once
/// per flood.
fn queue_agent_event(
    sender: &Sender<SupervisorEvent>,
    queued: &AtomicUsize,
    logged: &AtomicBool,
    ev: AgentEvent,
) {
    if ev != AgentEvent::Disconnected && queued.load(Ordering::SeqCst) >= MAX_QUEUED_AGENT_EVENTS {
        if !logged.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                "the guest's agent sent more than {MAX_QUEUED_AGENT_EVENTS} events not yet handled: dropping the excess"
            );
        }
        return;
    }
    logged.store(false, Ordering::SeqCst);
    queued.fetch_add(1, Ordering::SeqCst);
    if sender.send(SupervisorEvent::Agent(ev)).is_err() {
        queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Cuts a base64 exec stream to [`ferry_agent_proto::MAX_EXEC_OUTPUT`]
/// bytes (whole base64 quanta); whether it cut.
fn cap_exec_output(b64: &mut String) -> bool {
    ferry_agent_proto::cap_b64(b64, ferry_agent_proto::MAX_EXEC_OUTPUT)
}

/// What the supervisor waits on, from every source, in one channel.
pub enum SupervisorEvent {
    /// The caller tripped its [`crate::Cancel`] (Ctrl-C, SIGTERM).
    Cancel,
    /// Work was queued for the owner (`stop` on the control socket, a
    /// fleet change).
    Jobs,
    /// The VM stopped.
    VmExited(ExitReason),
    /// The agent said something unasked.
    Agent(AgentEvent),
    /// A peer asks to take this VM over (see [`crate::owner`]).
    Migration(Box<ferry_transport::migration::Incoming>),
    /// Something went wrong in the guest (already recorded).
    GuestError(GuestError),
}

use crate::start::Prepare;

/// How long a resumed guest's agent may take to answer `after-resume`.
const AFTER_RESUME_TIMEOUT: Duration = Duration::from_secs(30);

/// How [`RunningVm::start_in`] starts the engine.
enum StartKind<'a> {
    Boot(Option<Prepare<'a>>),
    Restore(&'a SavedState, RestoreMemory, Option<Prepare<'a>>),
    Receive {
        provenance: &'a ferry_engine::Provenance,
        disk_size: u64,
    },
}

/// What [`RunningVm::wait_for_request`] returns.
pub enum Wake {
    /// The caller's cancel.
    Cancel,
    /// Work was queued for the owner.
    Jobs,
    /// A peer asks to take the VM over.
    Migration(Box<ferry_transport::migration::Incoming>),
    /// Something went wrong in the guest (already recorded in its
    /// directory); the owner reports it and waits on.
    GuestError(GuestError),
}

impl std::fmt::Debug for Wake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wake::Cancel => write!(f, "Cancel"),
            Wake::Jobs => write!(f, "Jobs"),
            Wake::Migration(m) => write!(f, "Migration({})", m.control.peer()),
            Wake::GuestError(e) => write!(f, "GuestError({e:?})"),
        }
    }
}

impl std::fmt::Debug for SupervisorEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SupervisorEvent::Cancel => write!(f, "Cancel"),
            SupervisorEvent::Jobs => write!(f, "Jobs"),
            SupervisorEvent::VmExited(r) => write!(f, "VmExited({r:?})"),
            SupervisorEvent::Agent(e) => write!(f, "Agent({e:?})"),
            SupervisorEvent::Migration(m) => write!(f, "Migration({})", m.control.peer()),
            SupervisorEvent::GuestError(e) => write!(f, "GuestError({e:?})"),
        }
    }
}

/// How a VM is networked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetChoice {
    /// A network device connected to nothing (`--net none`): no root needed.
    None,
    /// In a VM namespace: `netns` (used, or created and later removed) or
    /// a private one named after the VM; `exposes` proxied from the host.
    Namespace {
        /// `--netns`.
        netns: Option<String>,
        /// `--expose`.
        exposes: Vec<ferry_net::ExposeSpec>,
    },
}

impl Default for NetChoice {
    fn default() -> Self {
        NetChoice::Namespace {
            netns: None,
            exposes: Vec::new(),
        }
    }
}

/// What a VM's state directory says about its network (`net.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetInfo {
    /// The namespace.
    pub netns: String,
    /// Whether ferry created it for this VM (and must remove it).
    pub created_netns: bool,
    /// Exposed ports.
    pub exposes: Vec<ferry_net::ExposeSpec>,
}

/// Takes the guest's console output as it comes.
pub type ConsoleSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// How to size and place a VM.
#[derive(Clone)]
pub struct VmConfig {
    /// Its name.
    pub name: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Accelerator.
    pub accel: Accel,
    /// Where to copy the guest's console besides its log (`--console`).
    pub console: Option<ConsoleSink>,
    /// Its network.
    pub net: NetChoice,
}

impl VmConfig {
    /// The config of a saved VM: sized as its provenance says (a restore
    /// must give it exactly what it was saved with).
    pub fn saved(
        name: &str,
        provenance: &ferry_engine::Provenance,
        accel: Accel,
        console: Option<ConsoleSink>,
        net: NetChoice,
    ) -> Self {
        VmConfig {
            name: name.to_string(),
            memory_mib: provenance.memory_mib,
            cpus: provenance.cpus,
            accel,
            console,
            net,
        }
    }
}

/// What a VM boots from: kernel, initramfs, command line and the pristine
/// disk its copy-on-write overlay sits on. Comes from a blueprint or from a
/// package's extracted sections.
#[derive(Debug, Clone)]
pub struct BootImage {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// The pristine raw disk (never written).
    pub disk: PathBuf,
    /// Where it came from, for `status`.
    pub source: String,
    /// The guest's addressing.
    pub network: ferry_blueprint::NetworkConfig,
    /// When set, the disk is served over NBD on this Unix socket (a lazy
    /// disk) and `disk` is not used.
    pub disk_server: Option<PathBuf>,
    /// The guest NIC's MAC; `None`: the engine's fixed one.
    pub guest_mac: Option<String>,
    /// Host services this guest reaches at its gateway besides the ports
    /// VMs expose (the boot service and the URLs in its boot parameters).
    pub gateway_forwards: Vec<GatewayForward>,
    /// Boot through the NIC's firmware (`ferry boot --from-bss --netboot`):
    /// DHCP, iPXE, the boot service's script; see
    /// [`ferry_engine::VmSpec::netboot`].
    pub netboot: bool,
}

/// A port of the guest's gateway that leads to a host service: a guest
/// that dials `gateway:port` is connected to `to`, from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayForward {
    /// The gateway's port.
    pub port: u16,
    /// The host address it leads to.
    pub to: std::net::SocketAddr,
}

impl BootImage {
    /// The guest an accelerator probe boots: this image's kernel.
    pub fn probe(&self) -> ferry_engine::ProbeGuest {
        ferry_engine::ProbeGuest {
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            cmdline: self.cmdline.clone(),
        }
    }
}

impl From<&Blueprint> for BootImage {
    fn from(bp: &Blueprint) -> Self {
        BootImage {
            kernel: bp.kernel(),
            initramfs: bp.initramfs(),
            cmdline: bp.manifest.cmdline.clone(),
            disk: bp.disk(),
            source: bp.dir.display().to_string(),
            network: bp.manifest.network.clone(),
            disk_server: None,
            guest_mac: None,
            gateway_forwards: Vec::new(),
            netboot: false,
        }
    }
}

/// How a restored VM maps the saved memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMemory {
    /// Guest writes go to the file (the VM owns it; saving again is cheap).
    Shared,
    /// Guest writes stay private (the file is a shared, read-only cache:
    /// clones of one package share its unchanged pages).
    Private,
}

/// A VM ferry is running.
pub struct RunningVm {
    vm: Box<dyn Vm>,
    network: Option<ferry_net::VmNetwork>,
    dir: Option<VmDir>,
    agent: Arc<Mutex<Option<Arc<AgentClient>>>>,
    events: EventQueue,
    sender: Sender<SupervisorEvent>,
    console: Arc<Mutex<ConsoleLog>>,
    status: Arc<Mutex<VmStatus>>,
    live: Arc<AtomicBool>,
    agent_generation: Arc<AtomicU64>,
    _control: Option<ControlServer>,
    _shell: Option<crate::shell::ShellRelay>,
    control_extension: Extension,
    errors: ErrorLog,
    /// The service exit last recorded as an error (once per exit).
    service_exit_seen: Arc<Mutex<Option<i32>>>,
}

/// Answers the control requests the VM itself does not (`stop`), once its
/// owner ([`crate::owner::own`]) holds it, in the foreground or detached.
type Extension = Arc<Mutex<Option<Arc<dyn ControlHandler>>>>;

impl RunningVm {
    /// Cold-boots `image` as a new VM in a new directory (see
    /// [`RunningVm::boot_in`]).
    pub fn boot(
        engine: &dyn Engine,
        paths: &Paths,
        image: &BootImage,
        config: &VmConfig,
    ) -> Result<Self, StartError> {
        let dir = VmDir::create(paths, &config.name)?;
        Self::boot_in(dir, engine, paths, image, config, None)
    }

    /// Restores a VM in a new directory (see [`RunningVm::restore_in`]).
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        engine: &dyn Engine,
        paths: &Paths,
        image: &BootImage,
        config: &VmConfig,
        state: &SavedState,
        memory: RestoreMemory,
        prepare: impl FnOnce(&VmDir) -> Result<(), StartError>,
    ) -> Result<Self, StartError> {
        let dir = VmDir::create(paths, &config.name)?;
        let prepare: Prepare<'_> = Box::new(prepare);
        Self::restore_in(
            dir,
            engine,
            paths,
            image,
            config,
            state,
            memory,
            Some(prepare),
        )
    }

    /// Shuts the guest down cleanly and removes its state directory.
    pub fn shutdown(mut self) -> Result<ExitReason, VmError> {
        self.shutdown_guest()
    }

    /// Cold-boots `image` as a new VM in `dir`. Returns as soon as the
    /// engine runs it; call [`RunningVm::wait_live`] next.
    pub fn boot_in(
        dir: VmDir,
        engine: &dyn Engine,
        paths: &Paths,
        image: &BootImage,
        config: &VmConfig,
        prepare: Option<Prepare<'_>>,
    ) -> Result<Self, StartError> {
        Self::start_in(dir, engine, paths, image, config, StartKind::Boot(prepare))
    }

    /// Starts the receiving end of a live migration in `dir`: a paused VM
    /// with an empty raw disk of `disk_size` bytes in its directory, for the
    /// caller to fill ([`RunningVm::received_disk`]); its state comes on a
    /// connection handed to the engine's `receive_state`.
    pub fn receive_in(
        dir: VmDir,
        engine: &dyn Engine,
        paths: &Paths,
        image: &BootImage,
        config: &VmConfig,
        provenance: &ferry_engine::Provenance,
        disk_size: u64,
    ) -> Result<Self, StartError> {
        let kind = StartKind::Receive {
            provenance,
            disk_size,
        };
        Self::start_in(dir, engine, paths, image, config, kind)
    }

    /// The disk file of a VM started by [`RunningVm::receive_in`], which
    /// the caller fills with what the sender copies (the engine only has it
    /// open, and reads it once the VM runs).
    pub fn received_disk(&self) -> PathBuf {
        self.dir().path().join(files::RECEIVED_DISK)
    }

    /// Starts a VM from a saved state in `dir` (a new directory, or a
    /// suspended VM's, which keeps its record, saved package and logs).
    /// `prepare` runs before the engine starts: it can put the saved device
    /// state, disk overlay or memory file in place. Without an overlay in
    /// the directory, the VM's disk is a fresh overlay on the image's disk.
    #[allow(clippy::too_many_arguments)]
    pub fn restore_in(
        dir: VmDir,
        engine: &dyn Engine,
        paths: &Paths,
        image: &BootImage,
        config: &VmConfig,
        state: &SavedState,
        memory: RestoreMemory,
        prepare: Option<Prepare<'_>>,
    ) -> Result<Self, StartError> {
        let kind = StartKind::Restore(state, memory, prepare);
        Self::start_in(dir, engine, paths, image, config, kind)
    }

    fn start_in(
        dir: VmDir,
        engine: &dyn Engine,
        paths: &Paths,
        image: &BootImage,
        config: &VmConfig,
        kind: StartKind<'_>,
    ) -> Result<Self, StartError> {
        let started = Instant::now();
        let (sender, events) = channel();
        let console_path = dir.path().join(files::CONSOLE);
        let console = Arc::new(Mutex::new(ConsoleLog::open(
            &console_path,
            CONSOLE_LOG_CAP,
        )?));
        let restoring = !matches!(kind, StartKind::Boot(_));
        let receiving = matches!(kind, StartKind::Receive { .. });
        let pending = match prepare_network(paths, image, config, &dir, !receiving) {
            Ok(n) => n,
            Err(e) => {
                dir.remove();
                return Err(e.into());
            }
        };
        let spec = VmSpec {
            name: config.name.clone(),
            kernel: image.kernel.clone(),
            initramfs: image.initramfs.clone(),
            cmdline: image.cmdline.clone(),
            disk: match &image.disk_server {
                Some(socket) => DiskSpec::Nbd {
                    socket: socket.clone(),
                },
                None => DiskSpec::CopyOnWrite {
                    base: image.disk.clone(),
                    overlay: dir.path().join(files::DISK),
                },
            },
            memory_mib: config.memory_mib,
            cpus: config.cpus,
            memory_file: dir.path().join(files::MEMORY),
            memory_shared: !restoring,
            accel: config.accel,
            net: match &pending {
                Some(n) => NetAttachment::Tap {
                    ifname: n.tap().to_string(),
                    netns: Some(n.netns_path()),
                    attached: n.tap_fd(),
                },
                None => NetAttachment::Isolated,
            },
            guest_mac: image.guest_mac.clone(),
            run_dir: dir.path().to_path_buf(),
            netboot: image.netboot,
        };
        // The engine starts (QEMU loads the state) while the rest of the
        // network is made on a thread of its own; the engine waits for it
        // before the guest's first instruction, so the guest never runs
        // without its firewall.
        let (launched, network) = std::thread::scope(|s| {
            let mut finishing = pending.map(|p| s.spawn(move || p.finish()));
            let mut network = None;
            let mut before_run = || -> Result<(), ferry_engine::EngineError> {
                let Some(thread) = finishing.take() else {
                    return Ok(());
                };
                let waited = Instant::now();
                let made = thread
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                tracing::debug!(
                    waited_ms = waited.elapsed().as_millis() as u64,
                    since_start_ms = started.elapsed().as_millis() as u64,
                    "network ready for the guest"
                );
                let failed = made.is_err();
                network = Some(made);
                if failed {
                    return Err(ferry_engine::EngineError::StartFailed(
                        "the VM's network could not be made".into(),
                    ));
                }
                Ok(())
            };
            let launched = start_engine(engine, &dir, spec, kind, &mut before_run);
            // Whatever the engine did, the network thread is done here.
            let _ = before_run();
            (launched, network)
        });
        let network = match network.transpose() {
            Ok(n) => n,
            Err(e) => {
                drop(launched);
                dir.remove();
                return Err(e.into());
            }
        };
        let mut vm = match launched {
            Ok(vm) => vm,
            Err(e) => {
                drop(network);
                dir.remove();
                return Err(e);
            }
        };
        let status = Arc::new(Mutex::new(VmStatus {
            api_version: CONTROL_API_VERSION,
            name: config.name.clone(),
            state: "booting".into(),
            pid: std::process::id(),
            engine_pid: vm.pid(),
            cgroup: vm.cgroup().map(|p| p.display().to_string()),
            accel: config.accel,
            memory_mib: config.memory_mib,
            cpus: config.cpus,
            live: false,
            uptime_s: 0,
            source: image.source.clone(),
            netns: network.as_ref().map(|n| n.netns_name().to_string()),
            exposes: network
                .as_ref()
                .map(|n| n.exposes().to_vec())
                .unwrap_or_default(),
        }));
        let errors = ErrorLog::new(dir.path(), console.clone());
        if let Some(events) = vm.take_events() {
            pump_vm_events(
                events,
                console.clone(),
                sender.clone(),
                config.console.clone(),
                errors.clone(),
            );
        }
        let mut running = RunningVm {
            vm,
            network,
            dir: Some(dir),
            agent: Arc::default(),
            events: EventQueue {
                rx: events,
                agent_queued: Arc::default(),
            },
            sender,
            console,
            status,
            live: Arc::default(),
            agent_generation: Arc::default(),
            _control: None,
            _shell: None,
            control_extension: Arc::default(),
            errors,
            service_exit_seen: Arc::default(),
        };
        if let Err(e) = running.connect_agent() {
            // A guest that stops at once takes the engine (and its agent
            // socket) with it: say why it stopped, not that the socket is
            // missing.
            if let Some(reason) = running.vm.wait_exit(Duration::from_millis(500)) {
                return Err(running.died(reason).into());
            }
            return Err(e.into());
        }
        let handler = Arc::new(Control {
            agent: running.agent.clone(),
            status: running.status.clone(),
            live: running.live.clone(),
            started,
            extension: running.control_extension.clone(),
        });
        let control_path = running.dir().path().join(files::CONTROL);
        running._control = Some(ControlServer::start(&control_path, handler)?);
        // The shell channel: a VM from a package made before it existed
        // has none, and its clients are told so.
        let guest_shell = running.vm.shell_stream().map_err(|e| {
            tracing::info!("no shell channel: {e}");
            e.to_string()
        });
        let shell_path = running.dir().path().join(files::SHELL);
        running._shell = Some(crate::shell::ShellRelay::start(
            &shell_path,
            &config.name,
            guest_shell,
        )?);
        Ok(running)
    }

    /// Stops the exposure proxies and closes their client connections (the
    /// VM moved away; its clients should reconnect elsewhere).
    pub fn close_exposures(&mut self) {
        if let Some(n) = self.network.as_mut() {
            n.close_exposures();
        }
    }

    /// Its exposures carry clients from now on: a VM that arrives by a
    /// live move, at its switch (see [`ferry_net::VmNetOptions::admitted`]).
    pub fn admit_clients(&self) {
        if let Some(n) = self.network.as_ref() {
            n.admit_clients();
        }
    }

    /// Closes the connections its exposure proxies carry, which go on
    /// accepting: see [`ferry_net::VmNetwork::drop_exposed_clients`].
    pub fn drop_exposed_clients(&self) {
        if let Some(n) = self.network.as_ref() {
            n.drop_exposed_clients();
        }
    }

    /// Cuts the guest off from its network, unseen by the guest (see
    /// [`ferry_net::VmNetwork::silence_guest`]); a VM without one has no
    /// one to reach.
    pub fn silence_guest(&self) -> Result<(), ferry_net::NetError> {
        match self.network.as_ref() {
            Some(n) => n.silence_guest(),
            None => Ok(()),
        }
    }

    /// One line on where the VM's network is: its namespace and what is
    /// exposed where. `None` without a network.
    pub fn network_summary(&self) -> Option<String> {
        let n = self.network.as_ref()?;
        let mut line = format!("network: namespace {}", n.netns_name());
        for e in n.exposes() {
            line.push_str(&format!(
                "; {} -> guest port {}",
                e.host_addr(),
                e.guest_port
            ));
        }
        Some(line)
    }

    /// (Re)connects to the guest agent's channel.
    pub fn connect_agent(&mut self) -> Result<(), VmError> {
        // The engine serves one connection at a time: close the old one first.
        self.agent.lock().expect("agent slot").take();
        let stream = self.vm.agent_stream()?;
        let sender = self.sender.clone();
        // Only the newest connection's close matters; an old one closing
        // (because we replaced it) must not trigger another reconnect.
        let generation = self.agent_generation.fetch_add(1, Ordering::SeqCst) + 1;
        let current = self.agent_generation.clone();
        let queued = self.events.agent_queued.clone();
        let logged = AtomicBool::new(false);
        let errors = self.errors.clone();
        let seen = self.service_exit_seen.clone();
        let was_live = self.live.clone();
        let client = AgentClient::new(stream, move |ev| {
            if ev == AgentEvent::Disconnected && current.load(Ordering::SeqCst) != generation {
                return;
            }
            if matches!(ev, AgentEvent::Live { .. }) {
                was_live.store(true, Ordering::SeqCst);
            }
            if let AgentEvent::Status(s) = &ev {
                // Live before, not live now, and still running: the agent's
                // recheck failed.
                if !s.live && s.service_exit.is_none() && was_live.swap(false, Ordering::SeqCst) {
                    let e = GuestError::now(
                        GuestErrorKind::LivenessFailed,
                        "service failed its liveness check (it still runs)",
                    );
                    errors.record(&e);
                    let _ = sender.send(SupervisorEvent::GuestError(e));
                }
                let mut seen = seen.lock().expect("service exit");
                if s.service_exit.is_some() && *seen != s.service_exit {
                    *seen = s.service_exit;
                    let code = s.service_exit.unwrap_or_default();
                    let what = match code {
                        127 => "the service could not be started (exit code 127)".to_string(),
                        c if c > 128 => {
                            format!(
                                "service exited with code {c} (killed by signal {})",
                                c - 128
                            )
                        }
                        c => format!("service exited with code {c}"),
                    };
                    let e = GuestError::now(GuestErrorKind::ServiceExited, what);
                    errors.record(&e);
                    let _ = sender.send(SupervisorEvent::GuestError(e));
                }
            }
            queue_agent_event(&sender, &queued, &logged, ev);
        })?;
        *self.agent.lock().expect("agent slot") = Some(Arc::new(client));
        Ok(())
    }

    /// The agent connection.
    pub fn agent(&self) -> Arc<AgentClient> {
        self.agent
            .lock()
            .expect("agent slot")
            .clone()
            .expect("the agent is connected while the VM runs")
    }

    /// What `status` on the control socket reports now.
    pub fn status(&self) -> VmStatus {
        self.status.lock().expect("status").clone()
    }

    /// The state directory.
    pub fn dir(&self) -> &VmDir {
        self.dir.as_ref().expect("present until drop")
    }

    /// The engine's VM, for pause, resume and save.
    pub fn engine_vm(&mut self) -> &mut dyn Vm {
        self.vm.as_mut()
    }

    /// Forwards `input` (the caller's terminal, for `--enable-input`) to
    /// the guest's serial console as it arrives; Ctrl-C stays with the
    /// caller (it suspends or stops the VM).
    pub fn forward_input(
        &mut self,
        mut input: Box<dyn std::io::Read + Send>,
    ) -> Result<(), VmError> {
        let Some(mut console) = self.vm.take_console_input() else {
            return Err(VmError::Internal(
                "the engine gives no console input (asked for twice?)".into(),
            ));
        };
        std::thread::Builder::new()
            .name("console-input".into())
            .spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 4096];
                while let Ok(n) = input.read(&mut buf) {
                    if n == 0 || console.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let _ = console.flush();
                }
            })
            .map_err(FileError::at("console input thread"))?;
        Ok(())
    }

    /// A sender into this VM's event channel (for the migration listener
    /// and the owner's job queue).
    pub fn event_sender(&self) -> Sender<SupervisorEvent> {
        self.sender.clone()
    }

    /// The last lines the guest printed.
    pub fn console_tail(&self, lines: usize) -> Vec<String> {
        self.console.lock().expect("console").last_lines(lines)
    }

    /// Waits until the agent reports the service live: says hello (resending
    /// until answered), then waits for the `live` event, checking status now
    /// and then in case the event was lost. Fails early if the VM stops or a
    /// signal arrives.
    pub fn wait_live(&mut self, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        let mut greeted = false;
        let mut last_status = Instant::now();
        loop {
            while let Ok(ev) = self.events.try_recv() {
                self.on_event(ev)?;
            }
            if self.live.load(Ordering::SeqCst) {
                self.set_state("running");
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_live_error(greeted, timeout));
            }
            if !greeted {
                let slice = Duration::from_millis(500).min(deadline - Instant::now());
                match self.agent().hello(slice) {
                    Ok((_, status)) => {
                        greeted = true;
                        if status.live {
                            self.live.store(true, Ordering::SeqCst);
                        }
                    }
                    Err(VmError::Agent(m)) if m == "no answer to hello" => {}
                    Err(VmError::Agent(m)) if m.starts_with("cannot write") => {
                        // Reconnect once the reader has seen the close.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e),
                }
                continue;
            }
            if last_status.elapsed() > Duration::from_secs(1) {
                last_status = Instant::now();
                if let Ok(Reply::Status(s)) = self
                    .agent()
                    .request(&Request::Status, Duration::from_secs(1))
                {
                    if s.live {
                        self.live.store(true, Ordering::SeqCst);
                    }
                }
                continue;
            }
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok(ev) => self.on_event(ev)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("we hold a sender"),
            }
        }
    }

    fn on_event(&mut self, ev: SupervisorEvent) -> Result<(), VmError> {
        match ev {
            SupervisorEvent::Cancel => Err(VmError::Interrupted),
            SupervisorEvent::Jobs => Ok(()),
            SupervisorEvent::VmExited(reason) => Err(self.died(reason)),
            SupervisorEvent::Agent(AgentEvent::Live { .. }) => {
                self.live.store(true, Ordering::SeqCst);
                Ok(())
            }
            SupervisorEvent::Agent(AgentEvent::Status(s)) => {
                if s.live {
                    self.live.store(true, Ordering::SeqCst);
                }
                Ok(())
            }
            SupervisorEvent::Agent(AgentEvent::Disconnected) => self.reconnect_agent(),
            SupervisorEvent::Migration(m) => {
                refuse(*m, "the VM is not live yet");
                Ok(())
            }
            SupervisorEvent::GuestError(_) => Ok(()),
        }
    }

    /// The engine dropped the agent connection while the VM runs (QEMU does
    /// this, e.g. while the guest resets the serial device): connect again.
    fn reconnect_agent(&mut self) -> Result<(), VmError> {
        if self.vm.wait_exit(Duration::from_millis(20)).is_some() {
            return Ok(()); // the exit event follows and says why
        }
        tracing::info!("agent channel closed; reconnecting");
        match self.connect_agent() {
            Ok(()) => Ok(()),
            // The engine closes the channel (and removes its socket) on its
            // way out, before its exit is known: a reconnect that fails then
            // is the VM stopping. Say why, as a start does.
            Err(e) => match self.vm.wait_exit(Duration::from_secs(5)) {
                Some(reason) => Err(self.died(reason)),
                None => Err(e),
            },
        }
    }

    fn died(&self, reason: ExitReason) -> VmError {
        // Let the console pump write what the guest said last.
        std::thread::sleep(Duration::from_millis(50));
        // A panicking guest restarts (`panic=-1`) and the engine stops on a
        // restart: a panic the console showed just before is the reason.
        let reason = match reason {
            ExitReason::Reset
                if crate::guest_errors::last_error(self.dir().path()).is_some_and(|e| {
                    e.kind == crate::guest_errors::GuestErrorKind::KernelPanic
                        && crate::guest_errors::GuestError::now(e.kind, "").unix_ms
                            < e.unix_ms + 30_000
                }) =>
            {
                ExitReason::Panic
            }
            other => other,
        };
        VmError::VmDied {
            reason: describe_exit(&reason),
            detail: self.console_detail(),
        }
    }

    fn console_detail(&self) -> String {
        let tail = self.console_tail(5);
        let log = self.dir().path().join(files::CONSOLE);
        if tail.is_empty() {
            format!(
                "; the guest printed nothing (console log: {})",
                log.display()
            )
        } else {
            format!("; last console lines: {}", tail.join(" | "))
        }
    }

    fn not_live_error(&self, greeted: bool, timeout: Duration) -> VmError {
        let secs = timeout.as_secs();
        if greeted {
            VmError::NotLive {
                secs,
                detail: format!(
                    "the agent runs but the liveness check has not passed; raise --live-timeout or check the recipe's service and liveness{}",
                    self.console_detail()
                ),
            }
        } else {
            VmError::AgentSilent {
                secs,
                detail: format!(
                    "is ferry-agent in the guest image and the guest booting? raise --live-timeout on a slow host{}",
                    self.console_detail()
                ),
            }
        }
    }

    fn set_state(&self, state: &str) {
        let mut s = self.status.lock().expect("status");
        s.state = state.to_string();
        s.live = self.live.load(Ordering::SeqCst);
    }

    /// Waits for the caller's cancel, queued work or a peer's migration
    /// request; fails if the VM dies. Reconnects the agent if its channel
    /// drops.
    pub fn wait_for_request(&mut self) -> Result<Wake, VmError> {
        loop {
            match self.events.recv() {
                Ok(SupervisorEvent::Cancel) => return Ok(Wake::Cancel),
                Ok(SupervisorEvent::Jobs) => return Ok(Wake::Jobs),
                Ok(SupervisorEvent::Migration(m)) => return Ok(Wake::Migration(m)),
                Ok(SupervisorEvent::GuestError(e)) => return Ok(Wake::GuestError(e)),
                Ok(SupervisorEvent::VmExited(reason)) => return Err(self.died(reason)),
                Ok(SupervisorEvent::Agent(AgentEvent::Disconnected)) => {
                    // Exec requests fail until the channel is back.
                    if let Err(e) = self.reconnect_agent() {
                        tracing::warn!(error = %e, "cannot reconnect to the agent");
                    }
                }
                Ok(SupervisorEvent::Agent(_)) => {}
                Err(_) => unreachable!("we hold a sender"),
            }
        }
    }

    /// An event that arrived, without waiting: `Err` if the VM died, and
    /// `Ok(true)` if the caller cancelled. Migration requests that arrive
    /// meanwhile are refused; queued work waits for the owner.
    pub fn poll_cancel(&mut self) -> Result<bool, VmError> {
        loop {
            match self.events.try_recv() {
                Ok(SupervisorEvent::Cancel) => return Ok(true),
                Ok(SupervisorEvent::Jobs) => {}
                Ok(SupervisorEvent::VmExited(reason)) => return Err(self.died(reason)),
                Ok(SupervisorEvent::Migration(m)) => refuse(*m, "this VM is busy"),
                Ok(SupervisorEvent::GuestError(_)) => {}
                Ok(SupervisorEvent::Agent(AgentEvent::Disconnected)) => {
                    let _ = self.reconnect_agent();
                }
                Ok(SupervisorEvent::Agent(_)) => {}
                Err(_) => return Ok(false),
            }
        }
    }

    /// Sends [`SupervisorEvent::Cancel`] into this VM's channel on every
    /// trip of `cancel`, while the guard lives. A cancel that came before
    /// (while the VM was being made) is delivered at once.
    pub fn watch_cancel(&self, cancel: &crate::Cancel) -> crate::events::CancelGuard {
        let sender = Mutex::new(self.sender.clone());
        let guard = cancel.on_cancel(move || {
            let _ = sender.lock().expect("sender").send(SupervisorEvent::Cancel);
        });
        if cancel.is_cancelled() {
            let _ = self.sender.send(SupervisorEvent::Cancel);
        }
        guard
    }

    /// Records that the service is live (the agent said so when resumed).
    pub fn set_live(&self) {
        self.live.store(true, Ordering::SeqCst);
    }

    /// Records the VM's state for `status` (`running`, `in-doubt`, ...).
    pub fn mark(&self, state: &str) {
        self.set_state(state);
    }

    /// Hands the control requests this supervisor does not answer itself
    /// (`stop`) to `handler`.
    pub fn set_control_extension(&self, handler: Arc<dyn ControlHandler>) {
        *self.control_extension.lock().expect("extension") = Some(handler);
    }

    /// Tells the guest its fleet (`set-fleet`): it writes the list to
    /// `/run/ferry/fleet.json`.
    pub fn set_fleet(
        &self,
        self_name: &str,
        members: Vec<ferry_agent_proto::FleetMember>,
    ) -> Result<(), VmError> {
        self.agent()
            .set_fleet(self_name, members, Duration::from_secs(5))
    }

    /// Tells the agent the guest was resumed: steps the clock to the host's,
    /// reseeds its RNG, and optionally gives it a new identity. Before the
    /// guest's service serves: for a guest whose clock may be hours behind.
    pub fn after_resume(&self, identity: Option<Identity>) -> Result<Reply, VmError> {
        // A guest resumed under TCG on a host whose two cores are busy with
        // other VMs and builds answered in more than 10 s here (the package
        // suite, run beside two compiles): the answer comes, late.
        self.agent()
            .request(&resumed_request(identity, false), AFTER_RESUME_TIMEOUT)
    }

    /// [`RunningVm::after_resume`] for a guest that was paused briefly (a
    /// live move, a save that failed), on a thread of its own: the agent
    /// does it at the guest's idle priority, after what its service has to
    /// do first, so under load the answer may take seconds, and nothing
    /// waits for it (a move's destination said `live` up to 7 s late under
    /// bench/migrate's write load). Under TCG a just-resumed guest
    /// translates every path anew, and this work on the critical path
    /// lengthened a move's client-seen gap by 40-60 ms here. `None` if no
    /// thread could be made (the guest's clock then catches up at its next
    /// resume).
    pub fn after_short_pause(&self) -> Option<std::thread::JoinHandle<Result<Reply, VmError>>> {
        let agent = self.agent();
        let request = resumed_request(None, true);
        std::thread::Builder::new()
            .name("after-pause".into())
            .spawn(move || {
                let answer = agent.request(&request, AFTER_RESUME_TIMEOUT);
                if let Err(e) = &answer {
                    tracing::debug!("after a short pause, the agent answered: {e}");
                }
                answer
            })
            .inspect_err(|e| tracing::warn!("cannot tell the guest it was paused: {e}"))
            .ok()
    }

    /// Shuts the guest down cleanly (through the agent, then the engine's
    /// power button, then a kill); dropping the VM then removes its state
    /// directory.
    pub fn shutdown_guest(&mut self) -> Result<ExitReason, VmError> {
        self.set_state("stopping");
        let asked = self
            .agent
            .lock()
            .expect("agent slot")
            .clone()
            .map(|a| a.request(&Request::Shutdown, Duration::from_secs(5)));
        let reason = match asked {
            Some(Ok(_)) => match self.vm.wait_exit(Duration::from_secs(20)) {
                Some(r) => r,
                None => self.vm.shutdown(Duration::from_secs(5))?,
            },
            _ => self.vm.shutdown(Duration::from_secs(5))?,
        };
        Ok(reason)
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.agent_generation.fetch_add(1, Ordering::SeqCst);
        self.agent.lock().expect("agent slot").take();
        self.vm.kill();
        self._control.take();
        self._shell.take();
        // After the engine: the tap and namespace are in use until it exits.
        self.network.take();
        if let Some(dir) = self.dir.take() {
            dir.remove();
        }
    }
}

/// Serves the control socket from the supervisor's shared state.
struct Control {
    agent: Arc<Mutex<Option<Arc<AgentClient>>>>,
    status: Arc<Mutex<VmStatus>>,
    live: Arc<AtomicBool>,
    started: Instant,
    extension: Extension,
}

impl ControlHandler for Control {
    fn handle(&self, request: ControlRequest) -> ControlReply {
        match request {
            ControlRequest::Status => {
                let mut s = self.status.lock().expect("status").clone();
                s.live = self.live.load(Ordering::SeqCst);
                s.uptime_s = self.started.elapsed().as_secs();
                ControlReply::Status(s)
            }
            ControlRequest::Exec {
                argv,
                stdin_b64,
                timeout_ms,
            } => {
                let Some(agent) = self.agent.lock().expect("agent slot").clone() else {
                    return ControlReply::Error {
                        message: "the VM has no agent connection right now; try again".into(),
                    };
                };
                // Without a command timeout, wait as long as a user would.
                let wait = Duration::from_millis(timeout_ms.unwrap_or(3_600_000) + 10_000);
                let request = Request::Exec {
                    argv,
                    stdin_b64,
                    timeout_ms,
                };
                match agent.request(&request, wait) {
                    Ok(Reply::ExecResult {
                        exit_code,
                        mut stdout_b64,
                        mut stderr_b64,
                        truncated,
                        timed_out,
                    }) => {
                        // The agent caps each stream; a guest's agent is
                        // not trusted to: cut here too.
                        let cut =
                            cap_exec_output(&mut stdout_b64) | cap_exec_output(&mut stderr_b64);
                        if cut {
                            tracing::warn!(
                                "the guest's agent sent more exec output than {} bytes a stream: cut",
                                ferry_agent_proto::MAX_EXEC_OUTPUT
                            );
                        }
                        ControlReply::Exec(ExecOutput {
                            exit_code,
                            stdout_b64,
                            stderr_b64,
                            truncated: truncated || cut,
                            timed_out,
                        })
                    }
                    Ok(other) => ControlReply::Error {
                        message: format!("unexpected agent answer: {other:?}"),
                    },
                    Err(e) => ControlReply::Error {
                        message: e.to_string(),
                    },
                }
            }
            other => match self.extension.lock().expect("extension").clone() {
                Some(handler) => handler.handle(other),
                None => ControlReply::Error {
                    message:
                        "the VM is still starting: its owner takes this request once the VM is live"
                            .into(),
                },
            },
        }
    }
}

fn pump_vm_events(
    events: Receiver<VmEvent>,
    console: Arc<Mutex<ConsoleLog>>,
    sender: Sender<SupervisorEvent>,
    echo: Option<ConsoleSink>,
    errors: ErrorLog,
) {
    std::thread::Builder::new()
        .name("vm-events".into())
        .spawn(move || {
            let mut scanner = crate::guest_errors::ConsoleScanner::default();
            for ev in events {
                match ev {
                    VmEvent::Console(bytes) => {
                        console.lock().expect("console").write(&bytes);
                        for e in scanner.push(&bytes) {
                            errors.record(&e);
                            let _ = sender.send(SupervisorEvent::GuestError(e));
                        }
                        if let Some(echo) = &echo {
                            echo(&bytes);
                        }
                    }
                    VmEvent::Exited(reason) => {
                        let _ = sender.send(SupervisorEvent::VmExited(reason));
                    }
                }
            }
        })
        .expect("spawn thread");
}

/// One phrase for an exit reason.
pub fn describe_exit(reason: &ExitReason) -> String {
    match reason {
        ExitReason::Poweroff => "the guest powered off".into(),
        ExitReason::Reset => "the guest rebooted".into(),
        ExitReason::Panic => "the guest kernel panicked".into(),
        ExitReason::Stopped => "stopped by ferry".into(),
        ExitReason::EngineFailed { detail } => format!("the engine failed: {detail}"),
    }
}

/// Fills `buf` from the kernel's RNG.
fn fill_random(buf: &mut [u8]) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        if f.read_exact(buf).is_ok() {
            return;
        }
    }
    for b in buf.iter_mut() {
        *b = rand::random();
    }
}

/// Encodes stdin bytes for an exec request.
pub fn stdin_payload(data: &[u8]) -> Option<String> {
    (!data.is_empty()).then(|| b64_encode(data))
}

/// Starts the engine for `kind` with `spec`: puts the prepared files in
/// place first; `before_run` is called before the guest runs.
fn start_engine(
    engine: &dyn Engine,
    dir: &VmDir,
    spec: VmSpec,
    kind: StartKind<'_>,
    before_run: ferry_engine::BeforeRun<'_>,
) -> Result<Box<dyn ferry_engine::Vm>, StartError> {
    Ok(match kind {
        StartKind::Boot(prepare) => {
            if let Some(p) = prepare {
                p(dir)?;
            }
            engine.boot_gated(&spec, before_run)?
        }
        StartKind::Receive {
            provenance,
            disk_size,
        } => {
            let disk = dir.path().join(files::RECEIVED_DISK);
            crate::paths::private_file(&disk)
                .and_then(|f| f.set_len(disk_size))
                .map_err(FileError::at(&disk))?;
            let spec = VmSpec {
                disk: DiskSpec::Raw(disk),
                // Private: anonymous memory, as a plain QEMU receives. A
                // shared file (a later suspend would write no RAM copy)
                // cost the move's switch QEMU's msync of every received
                // page, more under write load (docs/migration-protocol.md).
                memory_shared: false,
                ..spec
            };
            // It stays paused until the move's end resumes it: nothing
            // to overlap.
            before_run()?;
            engine.receive(&spec, provenance, &incoming_disk())?
        }
        StartKind::Restore(state, memory, prepare) => {
            if let Some(p) = prepare {
                p(dir)?;
            }
            let spec = VmSpec {
                memory_file: state
                    .memory_file
                    .clone()
                    .unwrap_or(spec.memory_file.clone()),
                memory_shared: memory == RestoreMemory::Shared,
                ..spec
            };
            engine.restore_gated(&spec, state, before_run)?
        }
    })
}

/// Starts the VM's network (if it has one): what the engine needs to
/// start; the rest is [`ferry_net::PendingNetwork::finish`]. Records it in
/// its state directory.
fn prepare_network(
    paths: &Paths,
    image: &BootImage,
    config: &VmConfig,
    dir: &VmDir,
    admitted: bool,
) -> Result<Option<ferry_net::PendingNetwork>, VmError> {
    let NetChoice::Namespace { netns, exposes } = &config.net else {
        return Ok(None);
    };
    let bad = |what: &'static str, value: &str| VmError::BadNetworkSetting {
        what,
        value: value.to_string(),
    };
    let n = &image.network;
    let guest = ferry_net::GuestNet {
        guest: n
            .guest_address
            .parse()
            .map_err(|_| bad("guest_address", &n.guest_address))?,
        gateway: n.gateway.parse().map_err(|_| bad("gateway", &n.gateway))?,
        prefix: n.prefix_len,
        mac: ferry_net::parse_mac(
            image
                .guest_mac
                .as_deref()
                .unwrap_or(ferry_engine::DEFAULT_GUEST_MAC),
        ),
    };
    let vms = paths.vms();
    // This guest's own forwards first (they are what its boot data names),
    // then whatever a VM exposes; nothing else.
    let forwards = image.gateway_forwards.clone();
    let network = ferry_net::VmNetwork::prepare(ferry_net::VmNetOptions {
        vm_name: config.name.clone(),
        netns: netns.clone(),
        private_prefix: paths.net_prefix.clone(),
        exposes: exposes.clone(),
        resolve: Some(Arc::new(move |port| {
            forwards
                .iter()
                .find(|f| f.port == port)
                .map(|f| f.to)
                .or_else(|| exposed_host_addr(&vms, port))
        })),
        guest,
        // A netbooting guest's firmware asks DHCP (a server the user runs
        // in the namespace) for its address and boot URL.
        dhcp: image.netboot,
        // A VM that arrives by a live move serves its clients from its
        // switch (`RunningVm::admit_clients`).
        admitted,
    })?;
    let info = NetInfo {
        netns: network.netns_name().to_string(),
        created_netns: network.created_namespace(),
        exposes: network.exposes().to_vec(),
    };
    let path = dir.path().join(files::NET);
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&info).expect("serialisable"),
    )
    .map_err(FileError::at(&path))?;
    Ok(Some(network))
}

/// Where a guest that dials its gateway on `port` is sent: the host address
/// of the VM that exposes `port` (loopback for a wildcard address); `None`
/// if no VM of this state directory exposes it: a guest never reaches the
/// host's own services.
fn exposed_host_addr(vms: &std::path::Path, port: u16) -> Option<std::net::SocketAddr> {
    let found = std::fs::read_dir(vms)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join(files::NET)).ok())
        .filter_map(|b| serde_json::from_slice::<NetInfo>(&b).ok())
        .flat_map(|info| info.exposes)
        .find(|e| e.host_port == port);
    Some(match found? {
        e if !e.host.is_unspecified() => e.host_addr(),
        e if e.host.is_ipv6() => (std::net::Ipv6Addr::LOCALHOST, port).into(),
        _ => (std::net::Ipv4Addr::LOCALHOST, port).into(),
    })
}

/// How a VM being received gets its disk: ferry fills the file itself, on
/// the peer's connection (`start::incoming`), not through the engine.
fn incoming_disk() -> ferry_engine::Incoming {
    ferry_engine::Incoming { disk_socket: None }
}

/// Turns a migration request away, telling the peer why.
fn refuse(mut m: ferry_transport::migration::Incoming, reason: &str) {
    let _ = m
        .control
        .send(&ferry_transport::migration::SourceMsg::Refused {
            reason: reason.to_string(),
        });
}

/// An `after-resume` request with the host's time now and fresh entropy.
fn resumed_request(identity: Option<Identity>, background: bool) -> Request {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut entropy = [0u8; 64];
    fill_random(&mut entropy);
    Request::AfterResume {
        unix_time_ns: now,
        entropy_hex: hex::encode(entropy),
        identity,
        background,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_output_from_the_guest_is_capped() {
        let max = ferry_agent_proto::MAX_EXEC_OUTPUT;
        let mut fits = b64_encode(&vec![1u8; max]);
        assert!(!cap_exec_output(&mut fits));
        let mut big = b64_encode(&vec![1u8; max + 10_000]);
        assert!(cap_exec_output(&mut big));
        let n = ferry_agent_proto::b64_decode(&big).unwrap().len();
        assert!(n <= max && n + 3 > max, "{n}");
    }

    /// A guest flooding agent events while nobody drains them: the queue
    /// stops at the cap, a disconnect still gets through, and once drained
    /// events queue again. Checked to fail without the cap (all 5000
    /// events were queued).
    #[test]
    fn agent_events_queued_for_the_supervisor_are_capped() {
        let (tx, rx) = channel();
        let queue = EventQueue {
            rx,
            agent_queued: Arc::default(),
        };
        let logged = AtomicBool::new(false);
        for i in 0..5000 {
            queue_agent_event(
                &tx,
                &queue.agent_queued,
                &logged,
                AgentEvent::Live { uptime_ms: i },
            );
        }
        queue_agent_event(&tx, &queue.agent_queued, &logged, AgentEvent::Disconnected);
        let mut taken = Vec::new();
        while let Ok(SupervisorEvent::Agent(ev)) = queue.try_recv() {
            taken.push(ev);
        }
        assert_eq!(taken.len(), MAX_QUEUED_AGENT_EVENTS + 1);
        assert_eq!(taken.last(), Some(&AgentEvent::Disconnected));
        assert_eq!(queue.agent_queued.load(Ordering::SeqCst), 0);
        queue_agent_event(
            &tx,
            &queue.agent_queued,
            &logged,
            AgentEvent::Live { uptime_ms: 1 },
        );
        assert!(matches!(
            queue.recv_timeout(Duration::from_secs(1)),
            Ok(SupervisorEvent::Agent(AgentEvent::Live { .. }))
        ));
    }
}
