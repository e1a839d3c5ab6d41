//! `ferry worker`: runs the manager's VMs on this host. It registers with
//! its capacity, keeps a lease with heartbeats, long-polls for commands and
//! carries them out through the runtime library: each VM is a detached peer
//! ([`ferry_runtime::detach`], as `ferry peer --detach` starts it), so VMs
//! outlive the worker, and a restarted worker adopts what its host still
//! runs (`ferry ps` of its `FERRY_STATE`) and reports it.
//!
//! Each instance serves its next migration on `ADVERTISE:PORT` (a port of
//! `--ports`) with the credential the manager gave it; that address is the
//! instance's address in the API.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_runtime::detach::{launch, DetachSpec, StartFrom};
use ferry_runtime::events::{Collect, Event, EventSink, NoEvents};
use ferry_runtime::fleet::{self, Target};
use ferry_runtime::record::{NetSpec, RecordState};
use ferry_runtime::{Cancel, Paths};
use serde::{Deserialize, Serialize};

use crate::client::{LinkClient, LinkError};
use crate::link::{Command, CommandKind, Heartbeat, Outcome, Register, Report};

/// How long a VM may take to run here (a package fetched from a registry,
/// or a whole migration, under TCG).
const START_TIMEOUT: Duration = Duration::from_secs(900);

/// How `ferry worker` runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The node's name.
    pub name: String,
    /// The manager's workers' link, `HOST:PORT` or a URL.
    pub manager: String,
    /// The manager's token.
    pub token: Option<String>,
    /// TLS to the manager (`--ca`, `--client-cert`, `--client-key`): a
    /// bare `HOST:PORT` is then `https://`.
    pub tls: Option<ferry_transport::ClientTls>,
    /// TLS for https:// registries (`--registry-ca`): the VMs it starts
    /// from a registry fetch their package with it.
    pub registry_tls: Option<ferry_transport::ClientTls>,
    /// TLS for the instances' migration listeners (`--tls-cert`,
    /// `--tls-key`, `--client-ca`): each serves its moves only over TLS.
    pub peer_listen_tls: Option<ferry_transport::ServerTlsFiles>,
    /// TLS to the source of a move (the cluster's CA, `--ca`, and the
    /// client certificate, `--client-cert`): the source's certificate must
    /// be signed by it and name its address.
    pub peer_tls: Option<ferry_transport::ClientTls>,
    /// The address instances and exposed ports are reached at.
    pub advertise: IpAddr,
    /// The lease, seconds.
    pub lease_s: u64,
    /// Memory offered to VMs, MiB (default: the host's available memory).
    pub capacity_mib: Option<u64>,
    /// Ports instances serve migrations on.
    pub ports: Range<u16>,
    /// The `ferry` binary (its supervisors run `ferry supervise`).
    pub ferry: PathBuf,
    /// `kvm` or `tcg`, as the engine found.
    pub accel: String,
    /// This host's state directories.
    pub paths: Paths,
}

/// Whether an instance's source is a registry (a URL) rather than a peer
/// (`HOST:PORT`), as `ferry peer --from` tells them apart.
fn from_registry(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

/// Why the worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The manager refused it (a token, a name held by another worker).
    #[error("the manager refused this worker: {0}")]
    Refused(String),
    /// A TLS file (`--ca`, `--client-cert`, `--client-key`) could not be
    /// read.
    #[error(transparent)]
    Tls(#[from] ferry_transport::TlsError),
    /// Its own state could not be read or written.
    #[error("{path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What the worker keeps of each instance it runs: the VM record holds the
/// rest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Instances {
    /// By name: the address it serves migrations on.
    addresses: BTreeMap<String, String>,
}

/// The worker's own files, under `$FERRY_STATE/worker/`.
struct WorkerFiles {
    dir: PathBuf,
}

impl WorkerFiles {
    fn id(&self) -> Result<String, WorkerError> {
        let path = self.dir.join("id");
        if let Ok(id) = std::fs::read_to_string(&path) {
            if !id.trim().is_empty() {
                return Ok(id.trim().to_string());
            }
        }
        let id = crate::manager::core::random_token();
        write_beside(&path, id.as_bytes())?;
        Ok(id)
    }

    fn load(&self) -> Instances {
        std::fs::read(self.dir.join("instances.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, i: &Instances) -> Result<(), WorkerError> {
        let bytes = serde_json::to_vec_pretty(i).expect("serialises");
        write_beside(&self.dir.join("instances.json"), &bytes)
    }

    fn saved_package(&self, name: &str) -> PathBuf {
        self.dir.join("saved").join(format!("{name}.ferry"))
    }
}

/// Writes `path` beside the old one, then renames it over.
fn write_beside(path: &Path, bytes: &[u8]) -> Result<(), WorkerError> {
    let err = |source| WorkerError::State {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// The worker.
struct Worker {
    config: WorkerConfig,
    files: WorkerFiles,
    id: String,
    link: LinkClient,
    instances: Mutex<Instances>,
    session: Mutex<Option<String>>,
    /// Supervisors this process started: its children until they exit.
    children: Arc<Mutex<Vec<u32>>>,
    /// Instances being started here: kept in `instances` though no VM
    /// directory shows them yet.
    starting: Mutex<std::collections::HashSet<String>>,
}

/// Runs the worker until `cancel` is tripped. Its VMs keep running after
/// it stops. Reports what it does as `notice` events.
pub fn run(
    config: WorkerConfig,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<(), WorkerError> {
    let files = WorkerFiles {
        dir: config.paths.state.join("worker"),
    };
    let mut link = LinkClient::new(&config.manager, config.token.clone());
    if let Some(tls) = &config.tls {
        link = link.with_tls(tls)?;
    }
    let worker = Arc::new(Worker {
        id: files.id()?,
        instances: Mutex::new(files.load()),
        files,
        link,
        session: Mutex::new(None),
        children: Arc::new(Mutex::new(Vec::new())),
        starting: Mutex::new(Default::default()),
        config,
    });
    let notice = |message: String| events.emit(Event::Notice { message });
    worker.register(cancel, &notice)?;
    // Heartbeats on a thread of their own, so that a long command never
    // costs the lease.
    let beat = {
        let w = worker.clone();
        let cancel = cancel.clone();
        std::thread::spawn(move || w.heartbeats(&cancel))
    };
    let reaper = {
        let cancel = cancel.clone();
        let children = worker.children.clone();
        std::thread::spawn(move || reap_children(&children, &cancel))
    };
    let mut backoff = Duration::from_millis(200);
    while !cancel.is_cancelled() {
        let Some(session) = worker.session() else {
            worker.register(cancel, &notice)?;
            continue;
        };
        match worker.link.commands(&session, 20) {
            Ok(commands) => {
                backoff = Duration::from_millis(200);
                for c in commands {
                    notice(describe(&c));
                    let w = worker.clone();
                    std::thread::spawn(move || w.carry_out(c));
                }
            }
            Err(LinkError::UnknownSession) => {
                worker.forget_session(&session);
            }
            Err(e) => {
                tracing::warn!(error = %e, "polling the manager for commands");
                sleep_unless(cancel, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    let _ = beat.join();
    let _ = reaper.join();
    notice("worker stopped; its VMs keep running and a restarted worker adopts them".into());
    Ok(())
}

fn describe(c: &Command) -> String {
    match &c.kind {
        CommandKind::Create { name, source, .. } => format!("create {name} from {source}"),
        CommandKind::Receive { name, from, .. } => format!("receive {name} from {from}"),
        CommandKind::Delete { name } => format!("delete {name}"),
        CommandKind::Suspend { name } => format!("suspend {name}"),
        CommandKind::Resume { name, .. } => format!("resume {name}"),
    }
}

impl Worker {
    fn session(&self) -> Option<String> {
        self.session.lock().expect("session").clone()
    }

    /// Forgets session `failed` (the manager does not know it), unless
    /// another thread registered again meanwhile: forgetting the new one
    /// would register a third time and drop the commands queued for it.
    fn forget_session(&self, failed: &str) {
        let mut s = self.session.lock().expect("session");
        if s.as_deref() == Some(failed) {
            *s = None;
        }
    }

    /// Registers (again), retrying while the manager cannot be reached.
    fn register(&self, cancel: &Cancel, notice: &dyn Fn(String)) -> Result<(), WorkerError> {
        let mut backoff = Duration::from_millis(200);
        let mut said = false;
        while !cancel.is_cancelled() {
            let reports = self.reports();
            let adopted = reports.len();
            let reg = Register {
                name: self.config.name.clone(),
                worker_id: self.id.clone(),
                address: self.config.advertise.to_string(),
                accel: self.config.accel.clone(),
                cpus: std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1),
                memory_mib: self.capacity_mib(),
                free_mib: self.free_mib(&reports),
                lease_s: self.config.lease_s,
                instances: reports,
            };
            match self.link.register(&reg) {
                Ok(session) => {
                    *self.session.lock().expect("session") = Some(session);
                    notice(format!(
                        "registered as node {} with the manager at {} ({} VM{} running here)",
                        self.config.name,
                        self.config.manager,
                        adopted,
                        if adopted == 1 { "" } else { "s" }
                    ));
                    return Ok(());
                }
                Err(LinkError::Refused(why)) => return Err(WorkerError::Refused(why)),
                Err(e) => {
                    if !said {
                        notice(format!(
                            "waiting for the manager at {}: {e}",
                            self.config.manager
                        ));
                        said = true;
                    }
                    sleep_unless(cancel, backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        Ok(())
    }

    fn heartbeats(&self, cancel: &Cancel) {
        let every =
            Duration::from_millis(self.config.lease_s * 1000 / 3).max(Duration::from_millis(200));
        while !cancel.is_cancelled() {
            sleep_unless(cancel, every);
            let Some(session) = self.session() else {
                continue;
            };
            let instances = self.reports();
            let beat = Heartbeat {
                session: session.clone(),
                free_mib: self.free_mib(&instances),
                instances,
            };
            match self.link.heartbeat(&beat) {
                Ok(()) => {}
                Err(LinkError::UnknownSession) => self.forget_session(&session),
                Err(e) => tracing::warn!(error = %e, "heartbeat"),
            }
        }
    }

    /// Every VM in this host's state directory, as the manager sees it.
    fn reports(&self) -> Vec<Report> {
        let starting = self.starting.lock().expect("starting").clone();
        let mut known = self.instances.lock().expect("instances");
        let vms = fleet::list(&self.config.paths);
        // Instances that left (moved away, deleted) are forgotten.
        let before = known.addresses.len();
        known
            .addresses
            .retain(|name, _| starting.contains(name) || vms.iter().any(|v| &v.name == name));
        if known.addresses.len() != before {
            if let Err(e) = self.files.save(&known) {
                tracing::warn!(error = %e, "cannot record the worker's instances");
            }
        }
        let mut reports: Vec<Report> = vms
            .into_iter()
            // A VM being received has no record until it runs here; a VM
            // that moved away drops its record at once and is torn down a
            // moment later: it is no longer this node's.
            .filter(|v| starting.contains(&v.name) || v.state != RecordState::Running || v.detached)
            .map(|v| Report {
                address: (v.state == RecordState::Running)
                    .then(|| known.addresses.get(&v.name).cloned())
                    .flatten(),
                state: if starting.contains(&v.name) {
                    "starting".into()
                } else {
                    v.state.to_string()
                },
                exposes: v.exposes.iter().map(ToString::to_string).collect(),
                memory_mib: v.memory_mib,
                note: v.note,
                last_error: v.last_error.map(Into::into),
                name: v.name,
            })
            .collect();
        for name in &starting {
            if !reports.iter().any(|r| &r.name == name) {
                reports.push(Report {
                    name: name.clone(),
                    state: "starting".into(),
                    address: None,
                    exposes: Vec::new(),
                    memory_mib: None,
                    note: None,
                    last_error: None,
                });
            }
        }
        reports
    }

    fn capacity_mib(&self) -> u64 {
        self.config
            .capacity_mib
            .unwrap_or_else(|| meminfo("MemTotal").unwrap_or(0))
    }

    /// What more VMs may use: the capacity less what runs here, and never
    /// more than the host has available.
    fn free_mib(&self, reports: &[Report]) -> u64 {
        let used: u64 = reports
            .iter()
            .filter(|r| r.state == "running")
            .map(|r| r.memory_mib.unwrap_or(0) + crate::manager::core::ENGINE_OVERHEAD_MIB)
            .sum();
        let by_capacity = self.capacity_mib().saturating_sub(used);
        let available = meminfo("MemAvailable").unwrap_or(0).saturating_sub(256);
        by_capacity.min(available)
    }

    /// Carries out a command and reports its outcome (retrying while the
    /// manager is away).
    fn carry_out(&self, c: Command) {
        let outcome = match &c.kind {
            CommandKind::Create {
                name,
                source,
                registry_token,
                token,
                expose,
            } => self.start(name, source, registry_token.clone(), token, None, expose),
            CommandKind::Receive {
                name,
                from,
                token,
                serve_token,
                expose,
            } => self.start(name, from, None, token, serve_token.as_ref(), expose),
            CommandKind::Delete { name } => self.delete(name),
            CommandKind::Suspend { name } => self.suspend(name),
            CommandKind::Resume { name, token } => self.resume(name, token),
        };
        if let Outcome::Failed { message, .. } = &outcome {
            tracing::warn!(command = describe(&c), error = message, "command failed");
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(300) {
            let Some(session) = self.session() else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            match self.link.result(&session, c.id, &outcome) {
                Ok(()) => return,
                // A new session: the manager restarted and settles its
                // records from heartbeats instead.
                Err(LinkError::UnknownSession) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "reporting a result");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Starts instance `name` from `source` (a registry URL, or the peer
    /// serving it with `token`), serving its next migration with
    /// `serve_token` (a move's fresh credential), else `token`.
    fn start(
        &self,
        name: &str,
        source: &str,
        registry_token: Option<ferry_transport::Token>,
        token: &ferry_transport::Token,
        serve_token: Option<&ferry_transport::Token>,
        expose: &[String],
    ) -> Outcome {
        let failed = |class: &str, message: String| Outcome::Failed {
            class: class.into(),
            message,
        };
        let mut exposes = Vec::new();
        for e in expose {
            let spec = match e.parse::<ferry_net::ExposeSpec>() {
                Ok(mut s) => {
                    if e.matches(':').count() == 1 {
                        s.host = self.config.advertise;
                    }
                    s
                }
                Err(err) => return failed("bad-input", err.to_string()),
            };
            exposes.push(spec);
        }
        let port = match self.claim_port(name) {
            Some(p) => p,
            None => {
                return failed(
                    "bad-input",
                    format!(
                        "no free port in {}-{} to serve the instance's migrations: widen --ports",
                        self.config.ports.start,
                        self.config.ports.end - 1
                    ),
                )
            }
        };
        let listen = SocketAddr::new(self.config.advertise, port);
        let spec = DetachSpec {
            name: name.to_string(),
            from: StartFrom::Peer {
                source: source.to_string(),
                registry_token,
                registry_tls: self.config.registry_tls.clone(),
                migrate_token: Some(token.clone()),
                serve_token: serve_token.cloned(),
                // A registry source is read with `registry_tls`; a peer
                // (another worker's instance) is dialled with TLS.
                migrate_tls: self
                    .config
                    .peer_tls
                    .clone()
                    .filter(|_| !from_registry(source)),
                listen_tls: self.config.peer_listen_tls.clone(),
                listen: Some(listen),
                save: self.files.saved_package(name),
                max_bandwidth: None,
                trust: Default::default(),
            },
            accel: ferry_engine::AccelChoice::Auto,
            net: NetSpec {
                none: false,
                netns: None,
                exposes,
            },
            fleet: None,
            live_timeout_s: START_TIMEOUT.as_secs(),
        };
        self.starting
            .lock()
            .expect("starting")
            .insert(name.to_string());
        let outcome = self.launch(name, listen, &spec);
        self.starting.lock().expect("starting").remove(name);
        outcome
    }

    fn launch(&self, name: &str, listen: SocketAddr, spec: &DetachSpec) -> Outcome {
        let failed = |class: &str, message: String| Outcome::Failed {
            class: class.into(),
            message,
        };
        if let Err(e) = self.files.save(&self.instances.lock().expect("instances")) {
            return failed("other", e.to_string());
        }
        if let Some(dir) = self.files.saved_package(name).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let events = Collect::default();
        let started = launch(&self.config.ferry, &self.config.paths, spec)
            .and_then(|l| l.wait(START_TIMEOUT, &Cancel::new(), Some(&events)));
        match started {
            Ok(s) => {
                self.children.lock().expect("children").push(s.pid);
                let downtime_ms = events.events().iter().find_map(|e| match e {
                    Event::MigratedIn { downtime_ms, .. } => Some(*downtime_ms),
                    _ => None,
                });
                Outcome::Done {
                    report: Report {
                        name: name.to_string(),
                        state: "running".into(),
                        address: Some(listen.to_string()),
                        exposes: s.exposes.iter().map(ToString::to_string).collect(),
                        memory_mib: None,
                        note: None,
                        last_error: None,
                    },
                    downtime_ms,
                }
            }
            Err(e) => {
                let mut known = self.instances.lock().expect("instances");
                known.addresses.remove(name);
                let _ = self.files.save(&known);
                failed(e.exit_class().name(), e.to_string())
            }
        }
    }

    /// Claims for instance `name` the lowest port of `--ports` that no
    /// instance here uses and nothing else has bound (under one lock, so
    /// that two starts never pick one port).
    fn claim_port(&self, name: &str) -> Option<u16> {
        let mut known = self.instances.lock().expect("instances");
        let used: Vec<String> = known.addresses.values().cloned().collect();
        let port = self.config.ports.clone().find(|p| {
            let addr = SocketAddr::new(self.config.advertise, *p);
            !used.contains(&addr.to_string()) && std::net::TcpListener::bind(addr).is_ok()
        })?;
        known.addresses.insert(
            name.to_string(),
            SocketAddr::new(self.config.advertise, port).to_string(),
        );
        Some(port)
    }

    /// Suspends instance `name` into its saved package here (`ferry
    /// stop`'s path: the runtime's one save path); its migration port is
    /// given back.
    fn suspend(&self, name: &str) -> Outcome {
        let result = fleet::stop(
            &self.config.paths,
            &Target::One(name.to_string()),
            false,
            &NoEvents,
        );
        if let Err(e) = result {
            return Outcome::Failed {
                class: e.exit_class().name().into(),
                message: e.to_string(),
            };
        }
        let mut known = self.instances.lock().expect("instances");
        known.addresses.remove(name);
        let _ = self.files.save(&known);
        Outcome::Done {
            report: Report {
                name: name.to_string(),
                state: "suspended".into(),
                address: None,
                exposes: Vec::new(),
                memory_mib: None,
                note: None,
                last_error: None,
            },
            downtime_ms: None,
        }
    }

    /// Resumes the suspended instance `name` from its saved package here,
    /// serving its next migration on a port of `--ports` with `token`.
    fn resume(&self, name: &str, token: &ferry_transport::Token) -> Outcome {
        let failed = |class: &str, message: String| Outcome::Failed {
            class: class.into(),
            message,
        };
        let Some(port) = self.claim_port(name) else {
            return failed(
                "bad-input",
                format!(
                    "no free port in {}-{} to serve the instance's migrations: widen --ports",
                    self.config.ports.start,
                    self.config.ports.end - 1
                ),
            );
        };
        let listen = SocketAddr::new(self.config.advertise, port);
        if let Err(e) = self.files.save(&self.instances.lock().expect("instances")) {
            return failed("other", e.to_string());
        }
        self.starting
            .lock()
            .expect("starting")
            .insert(name.to_string());
        let resumed = fleet::resume(
            &self.config.paths,
            &self.config.ferry,
            name,
            Some(ferry_runtime::detach::Serve {
                listen,
                token: token.clone(),
                tls: self.config.peer_listen_tls.clone(),
            }),
            START_TIMEOUT,
            &Cancel::new(),
        );
        self.starting.lock().expect("starting").remove(name);
        match resumed {
            Ok(Some(s)) => {
                self.children.lock().expect("children").push(s.pid);
                Outcome::Done {
                    report: Report {
                        name: name.to_string(),
                        state: "running".into(),
                        address: Some(listen.to_string()),
                        exposes: s.exposes.iter().map(ToString::to_string).collect(),
                        memory_mib: None,
                        note: None,
                        last_error: None,
                    },
                    downtime_ms: None,
                }
            }
            Ok(None) => failed(
                "bad-input",
                format!("'{name}' runs here already: it was not suspended"),
            ),
            Err(e) => {
                let mut known = self.instances.lock().expect("instances");
                known.addresses.remove(name);
                let _ = self.files.save(&known);
                failed(e.exit_class().name(), e.to_string())
            }
        }
    }

    fn delete(&self, name: &str) -> Outcome {
        let result = fleet::stop(
            &self.config.paths,
            &Target::One(name.to_string()),
            true,
            &NoEvents,
        );
        let gone = match result {
            Ok(_) => true,
            Err(ferry_runtime::FleetError::Name(ferry_runtime::NameError::UnknownVm {
                ..
            })) => true,
            Err(e) => {
                return Outcome::Failed {
                    class: e.exit_class().name().into(),
                    message: e.to_string(),
                }
            }
        };
        let _ = fleet::rm(&self.config.paths, name);
        let _ = std::fs::remove_file(self.files.saved_package(name));
        let mut known = self.instances.lock().expect("instances");
        known.addresses.remove(name);
        let _ = self.files.save(&known);
        Outcome::Done {
            report: Report {
                name: name.to_string(),
                state: if gone { "deleted" } else { "unknown" }.into(),
                address: None,
                exposes: Vec::new(),
                memory_mib: None,
                note: None,
                last_error: None,
            },
            downtime_ms: None,
        }
    }
}

/// A `/proc/meminfo` field in MiB.
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
}

fn sleep_unless(cancel: &Cancel, d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d && !cancel.is_cancelled() {
        std::thread::sleep(Duration::from_millis(50).min(d));
    }
}

/// Reaps the supervisors this worker started once they exit (they handed
/// their VM on, or stopped): they run in sessions of their own and outlive
/// the worker, but while it runs they are its children. Only those pids:
/// a `waitpid(-1)` would steal the status of the commands the runtime runs.
fn reap_children(children: &Mutex<Vec<u32>>, cancel: &Cancel) {
    while !cancel.is_cancelled() {
        children.lock().expect("children").retain(|pid| {
            let mut status = 0;
            // SAFETY: waitpid on our own child's pid with WNOHANG only
            // reads its status into a local.
            let r = unsafe { libc::waitpid(*pid as libc::pid_t, &mut status, libc::WNOHANG) };
            r == 0
        });
        sleep_unless(cancel, Duration::from_secs(1));
    }
}

/// The first IPv4 address of interface `name` (for `--host-interface`).
pub fn interface_addr(name: &str) -> Option<IpAddr> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", name])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|a| a.parse().ok())
}
