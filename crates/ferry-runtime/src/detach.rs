//! Detached VMs (`ferry up`, `run --detach`, `peer --detach`, `start`):
//! each VM is owned by its own supervisor, a `ferry supervise NAME` process
//! that the starting command spawns in a new session, with standard input
//! `/dev/null` once it has read its [`DetachSpec`], and standard output and
//! error appended to its log (`<vm dir>/supervisor.log`; a peer's,
//! `$FERRY_STATE/logs/peer-NAME.log`, which outlives a VM that moves on).
//! The supervisor runs the same start pipeline ([`crate::start`]) and the
//! same owner ([`crate::owner`]) as a foreground command; QEMU dies with it
//! (`PR_SET_PDEATHSIG`).
//!
//! Readiness comes back over a pipe ([`launch`] / [`ReadyPipe`]): the
//! start's events, one JSON line each, then one line saying either that
//! the VM is live or the one-line error and exit code that a foreground
//! command would have printed. A supervisor that dies before it says
//! either closes the pipe, and the starting command says so and where its
//! log is.
//!
//! Stopping: `ferry stop` (or SIGTERM/SIGINT to the supervisor) suspends
//! the VM into a package — its own `<vm dir>/saved.ferry` for a clone, the
//! package it runs from otherwise, `--save` for a peer — and the directory
//! keeps that package, the record and the logs ([`crate::vmdir::KEPT`]);
//! `stop --discard` drops the VM and removes everything.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_engine::{Accel, AccelChoice, Engine};
use ferry_package::TrustedKeys;
use serde::{Deserialize, Serialize};

use crate::error::{FileError, StartError};
use crate::events::{Event, EventSink};
use crate::ops::peer::PeerOptions;
use crate::owner::{own_and_tell, Outcome, OwnedVm, OwnerOptions};
use crate::record::{FleetSpec, NetSpec, RecordState, VmRecord};
use crate::start::package::{self, Detached, Mode, PackageStart};
use crate::start::StartPlan;
use crate::vmdir::{files, VmDir};
use crate::{Cancel, Paths, RuntimeError};

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
// One is built per start and sent once over a pipe: its size does not
// matter, and boxing the peer's fields would only make it harder to read.
#[allow(clippy::large_enum_variant)]
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
        /// Keys one of which must have signed the package (`--trust`).
        #[serde(default, skip_serializing_if = "TrustedKeys::is_empty")]
        trust: TrustedKeys,
    },
    /// The package itself, suspended back into it by `ferry stop`
    /// (`run --detach` without `--clone`).
    Package {
        /// The package.
        package: PathBuf,
        /// Keys one of which must have signed the package (`--trust`).
        #[serde(default, skip_serializing_if = "TrustedKeys::is_empty")]
        trust: TrustedKeys,
    },
    /// The VM's own saved state (`ferry start` of a suspended VM); its
    /// network and fleet come from its record.
    Saved {
        /// Serve its next migration (a control-plane worker resuming an
        /// instance: it stays movable); none for `ferry start`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        serve: Option<Serve>,
    },
    /// A peer's VM (`ferry peer --detach`): from a registry or another
    /// peer, served on `listen`, saved into `save` by `ferry stop`.
    Peer {
        /// `http(s)://…` or `HOST:PORT`.
        source: String,
        /// The token for reading from a registry source (the spec travels
        /// over a pipe, never on a command line).
        #[serde(default)]
        registry_token: Option<ferry_transport::Token>,
        /// TLS settings for an `https://` registry source.
        #[serde(default)]
        registry_tls: Option<ferry_transport::ClientTls>,
        /// The token for a peer source and for `listen`.
        #[serde(default)]
        migrate_token: Option<ferry_transport::Token>,
        /// Serve `listen` with this token instead of `migrate_token`: a
        /// control-plane worker's VM takes a fresh credential with each
        /// move, so the one it came with is no good once it has moved.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        serve_token: Option<ferry_transport::Token>,
        /// TLS to a peer source.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        migrate_tls: Option<ferry_transport::ClientTls>,
        /// Serve `listen` only over TLS.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listen_tls: Option<ferry_transport::ServerTlsFiles>,
        /// Serve the VM to the next peer here.
        #[serde(default)]
        listen: Option<SocketAddr>,
        /// Where a stop saves it (an absolute path).
        save: PathBuf,
        /// Cap on a migration out, bytes per second.
        #[serde(default)]
        max_bandwidth: Option<u64>,
        /// Keys one of which must have signed a registry's package.
        #[serde(default, skip_serializing_if = "TrustedKeys::is_empty")]
        trust: TrustedKeys,
    },
}

/// Where a resumed VM serves its next migration, and with which token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serve {
    /// The migration listener's address.
    pub listen: SocketAddr,
    /// The token a destination must present.
    pub token: ferry_transport::Token,
    /// Serve it only over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ferry_transport::ServerTlsFiles>,
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

/// A line a supervisor writes to its ready pipe: events, then `live` or
/// `failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum ReadyMsg {
    /// Something happened while the VM was starting.
    Event(Event),
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
pub fn launch(ferry: &Path, paths: &Paths, spec: &DetachSpec) -> Result<Launch, StartError> {
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
        .current_dir("/")
        // The caller's paths, not whatever this process's environment says.
        .envs(paths.env_vars());
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
        .map_err(FileError::at(format!("starting {}", ferry.display())))?;
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
        log: match &spec.from {
            StartFrom::Peer { .. } => {
                crate::vmdir::peer_logs_dir(paths).join(format!("peer-{}.log", spec.name))
            }
            _ => paths.vms().join(&spec.name).join(files::SUPERVISOR_LOG),
        },
    })
}

impl Launch {
    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The supervisor's log.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Waits up to `timeout` for the supervisor's report, passing the
    /// start's events on to `events` if given. If `cancel` is tripped
    /// meanwhile, or the time is up, the supervisor is told to stop
    /// (SIGTERM: a VM that is not live yet is dropped) and this fails.
    pub fn wait(
        mut self,
        timeout: Duration,
        cancel: &Cancel,
        events: Option<&dyn EventSink>,
    ) -> Result<Started, StartError> {
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
        let report = loop {
            if cancel.is_cancelled() {
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
                Err(e) => return Err(FileError::at("the supervisor's ready pipe")(e).into()),
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
            let mut report = None;
            while let Some(end) = line.iter().position(|b| *b == b'\n') {
                let one: Vec<u8> = line.drain(..=end).collect();
                match serde_json::from_slice::<ReadyMsg>(&one) {
                    Ok(ReadyMsg::Event(e)) => {
                        if let Some(sink) = events {
                            sink.emit(e);
                        }
                    }
                    other => {
                        report = Some(other);
                        break;
                    }
                }
            }
            if let Some(r) = report {
                break r;
            }
        };
        match report {
            Ok(ReadyMsg::Event(_)) => unreachable!("events are passed on above"),
            Ok(ReadyMsg::Live(started)) => Ok(started),
            Ok(ReadyMsg::Failed { code, message }) => {
                // It exits right after saying so.
                let _ = self.child.wait();
                Err(StartError::DetachedStart {
                    name: self.name,
                    message,
                    code,
                })
            }
            Err(e) => Err(self.failed(&format!("its supervisor's report is garbled: {e}"), 1)),
        }
    }

    fn failed(&self, message: &str, code: u8) -> StartError {
        StartError::DetachedStart {
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
fn pipe() -> Result<(OwnedFd, OwnedFd), FileError> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2(2) writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(FileError::at("creating a pipe")(
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
    pub fn from_fd(fd: i32) -> Result<Self, StartError> {
        // SAFETY: fcntl(2) on a descriptor number; an invalid one fails
        // with EBADF and nothing else happens.
        let ok = fd > 2 && unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == 0;
        if !ok {
            return Err(StartError::Internal(format!(
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

/// `ferry supervise`: starts the VM `spec` describes, reports to `ready`
/// once it is live (the start's events go there too), then owns it until
/// `ferry stop`, a cancel (SIGTERM/SIGINT, which suspend it too), a move
/// to another peer, or its death (`Err`; its record then says `crashed` or
/// `stopped` and why). Events after the start go to `events`.
pub fn supervise(
    engine: &dyn Engine,
    paths: &Paths,
    spec: &DetachSpec,
    ready: &mut ReadyPipe,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<Outcome, RuntimeError> {
    let t0 = Instant::now();
    let name = &spec.name;
    let log = match &spec.from {
        StartFrom::Peer { .. } => {
            let dir = crate::vmdir::peer_logs_dir(paths);
            std::fs::create_dir_all(&dir).map_err(FileError::at(&dir))?;
            dir.join(format!("peer-{name}.log"))
        }
        _ => paths.vms().join(name).join(files::SUPERVISOR_LOG),
    };
    let start_events = ReadySink {
        pipe: Mutex::new(ready.0.take()),
        also: events,
    };
    let started = start(engine, paths, spec, &log, &start_events, cancel);
    ready.0 = start_events.pipe.into_inner().expect("pipe");
    let (owned, owner) = started?;
    let status = owned.vm.status();
    let report = Started {
        name: spec.name.clone(),
        pid: std::process::id(),
        engine_pid: status.engine_pid,
        accel: status.accel,
        ms: t0.elapsed().as_millis() as u64,
        exposes: status.exposes.clone(),
    };
    tracing::info!(ms = report.ms, "live");
    let outcome = own_and_tell(engine, paths, owned, owner, events, || {
        ready.send(&ReadyMsg::Live(report))
    })?;
    tracing::info!(?outcome, "supervisor done");
    Ok(outcome)
}

/// Starts the VM of `spec` and says how its owner treats it.
fn start(
    engine: &dyn Engine,
    paths: &Paths,
    spec: &DetachSpec,
    log: &Path,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<(OwnedVm, OwnerOptions), RuntimeError> {
    let name = &spec.name;
    let started = Instant::now();
    let live_timeout = Duration::from_secs(spec.live_timeout_s);
    let package_start = |package: PathBuf, mode, verified, trust, detached| PackageStart {
        package,
        name: name.clone(),
        mode,
        accel: spec.accel,
        console: None,
        net: spec.net.clone(),
        live_timeout,
        verified,
        trust,
        started,
        detached: Some(detached),
    };
    let redirect = |_: &crate::vmdir::VmDir| -> Result<(), StartError> {
        redirect_output(log);
        Ok(())
    };
    let mut owner = OwnerOptions {
        fleet: spec.fleet.clone(),
        ..OwnerOptions::default()
    };
    let plan = match &spec.from {
        StartFrom::Clone {
            package,
            verified,
            trust,
        } => package::plan(
            engine,
            paths,
            package_start(
                package.clone(),
                Mode::Clone,
                *verified,
                trust.clone(),
                Detached {
                    fleet: spec.fleet.clone(),
                    previous: None,
                },
            ),
        )?,
        StartFrom::Package { package, trust } => package::plan(
            engine,
            paths,
            package_start(
                package.clone(),
                Mode::Own,
                false,
                trust.clone(),
                Detached {
                    fleet: spec.fleet.clone(),
                    previous: None,
                },
            ),
        )?,
        StartFrom::Saved { serve } => {
            owner.listen = serve.clone().map(|s| (s.listen, s.token));
            if let Some(files) = serve.as_ref().and_then(|s| s.tls.as_ref()) {
                owner.listen_tls = Some(
                    files
                        .load()
                        .map_err(|e| RuntimeError::BadOption(e.to_string()))?,
                );
            }
            let dir = VmDir::resume(paths, name)?;
            redirect_output(log);
            let Some(record) = VmRecord::load(dir.path()) else {
                let err = StartError::NothingToResume {
                    name: name.clone(),
                    why: format!(
                        "it has no record ({}): it was not started detached",
                        dir.path().join(files::RECORD).display()
                    ),
                };
                dir.remove();
                return Err(err.into());
            };
            let Some(saved) = record.saved.clone().filter(|p| p.exists()) else {
                return Err(StartError::NothingToResume {
                    name: name.clone(),
                    why: record
                        .note
                        .clone()
                        .unwrap_or_else(|| "it never was suspended".into()),
                }
                .into());
            };
            owner.fleet = record.fleet.clone();
            // What it saved into is its own to write back into.
            // Its own saved state: ferry wrote it, unsigned.
            let mut opts = package_start(
                saved,
                Mode::Own,
                false,
                TrustedKeys::default(),
                Detached {
                    fleet: record.fleet.clone(),
                    previous: None,
                },
            );
            opts.net = record.net.clone();
            opts.detached = Some(Detached {
                fleet: record.fleet.clone(),
                previous: Some((record, dir)),
            });
            package::plan(engine, paths, opts)?
        }
        StartFrom::Peer {
            source,
            registry_token,
            registry_tls,
            migrate_token,
            serve_token,
            migrate_tls,
            listen_tls,
            listen,
            save,
            max_bandwidth,
            trust,
        } => {
            redirect_output(log);
            let opts = PeerOptions {
                from: source.clone(),
                name: Some(name.clone()),
                net: spec.net.choice(),
                listen: *listen,
                registry_token: registry_token.clone(),
                registry_tls: registry_tls.clone(),
                migrate_token: migrate_token.clone(),
                migrate_tls: migrate_tls.clone(),
                listen_tls: listen_tls.clone(),
                accel: spec.accel,
                console: None,
                input: None,
                save: Some(save.clone()),
                started,
                max_bandwidth: *max_bandwidth,
                trust: trust.clone(),
            };
            let mut owned = crate::ops::peer::take(engine, paths, &opts, events, cancel)?;
            let status = owned.vm.status();
            let record = VmRecord {
                name: name.clone(),
                state: RecordState::Running,
                package: save.clone(),
                clone: false,
                saved: Some(save.clone()),
                fleet: None,
                net: spec.net.clone(),
                accel: status.accel,
                memory_mib: status.memory_mib,
                supervisor_pid: std::process::id(),
                started_unix: crate::save::now_unix(),
                note: None,
            };
            record.save(owned.vm.dir().path())?;
            owned.record = Some(record);
            let mut owner = crate::ops::peer::owner_options(&opts, name)?;
            if let Some(t) = serve_token {
                owner.listen = listen.map(|l| (l, t.clone()));
            }
            return Ok((owned, owner));
        }
    };
    let plan = StartPlan {
        prepare: chain(plan.prepare, Box::new(redirect)),
        ..plan
    };
    let owned = crate::start::execute(engine, paths, plan, events, cancel)?;
    Ok((owned, owner))
}

/// Runs `first` (output redirected) before `then`.
fn chain<'a>(
    then: Option<crate::start::Prepare<'a>>,
    first: crate::start::Prepare<'a>,
) -> Option<crate::start::Prepare<'a>> {
    Some(Box::new(move |d| {
        first(d)?;
        match then {
            Some(t) => t(d),
            None => Ok(()),
        }
    }))
}

/// Sends the start's events over the ready pipe, for the starting command
/// to render as a foreground one would, and to the supervisor's own sink.
struct ReadySink<'a> {
    pipe: Mutex<Option<File>>,
    also: &'a dyn EventSink,
}

impl EventSink for ReadySink<'_> {
    fn emit(&self, event: Event) {
        self.also.emit(event.clone());
        if let Some(f) = self.pipe.lock().expect("pipe").as_mut() {
            let mut line = serde_json::to_vec(&ReadyMsg::Event(event)).expect("events serialise");
            line.push(b'\n');
            let _ = f.write_all(&line);
        }
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
                trust: TrustedKeys::default(),
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
    fn a_saved_start_serves_only_when_asked() {
        let plain: StartFrom = serde_json::from_str(r#"{"kind":"saved"}"#).unwrap();
        assert_eq!(plain, StartFrom::Saved { serve: None });
        let serving = StartFrom::Saved {
            serve: Some(Serve {
                listen: "10.0.0.1:17000".parse().unwrap(),
                token: ferry_transport::Token::new("instance-token-0123456789").unwrap(),
                tls: Some(ferry_transport::ServerTlsFiles {
                    cert: "/tls/server.crt".into(),
                    key: "/tls/server.key".into(),
                    client_ca: None,
                }),
            }),
        };
        let json = serde_json::to_string(&serving).unwrap();
        assert_eq!(serde_json::from_str::<StartFrom>(&json).unwrap(), serving);
    }

    /// A detached peer keeps its TLS settings across the pipe; a spec of
    /// an older ferry (without them) reads as plain.
    #[test]
    fn a_peer_spec_carries_its_tls_settings() {
        let peer = StartFrom::Peer {
            source: "10.0.0.2:7100".into(),
            registry_token: None,
            registry_tls: None,
            migrate_token: Some(ferry_transport::Token::new("migrate-token-0123456789").unwrap()),
            serve_token: None,
            migrate_tls: Some(ferry_transport::ClientTls {
                ca: Some("/tls/ca.crt".into()),
                client_cert: Some("/tls/client.crt".into()),
                client_key: Some("/tls/client.key".into()),
            }),
            listen_tls: Some(ferry_transport::ServerTlsFiles {
                cert: "/tls/server.crt".into(),
                key: "/tls/server.key".into(),
                client_ca: Some("/tls/ca.crt".into()),
            }),
            listen: Some("0.0.0.0:7100".parse().unwrap()),
            save: "/saved/kv.ferry".into(),
            max_bandwidth: None,
            trust: TrustedKeys::default(),
        };
        let json = serde_json::to_string(&peer).unwrap();
        assert_eq!(serde_json::from_str::<StartFrom>(&json).unwrap(), peer);
        let old: StartFrom = serde_json::from_str(
            r#"{"kind":"peer","source":"10.0.0.2:7100","save":"/saved/kv.ferry"}"#,
        )
        .unwrap();
        assert!(matches!(
            old,
            StartFrom::Peer {
                migrate_tls: None,
                listen_tls: None,
                ..
            }
        ));
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
