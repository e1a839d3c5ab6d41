//! `ferry peer`: run a VM that came from a registry or from another peer,
//! and (with `--listen`) hand it on to the next peer by live migration.
//!
//! A live migration, as the destination drives it (protocol:
//! `docs/migration-protocol.md`):
//!
//! 1. The destination connects to the source's `--listen` address with the
//!    token and gets an *offer*: the VM's metadata, disk size, and the
//!    digests of its kernel and initramfs (fetched only if not cached).
//! 2. It starts a paused VM that waits for state and disk, opens the two
//!    data channels (state, disk) and says *ready*.
//! 3. The source copies the disk (then keeps mirroring new writes) and
//!    pre-copies memory while the guest runs, pauses it for the last pass,
//!    flushes the disk copy and says *switch*.
//! 4. **Commit point**: the destination checks that all state arrived,
//!    stops serving its disk, resumes the VM and says *committed*. The
//!    source then exits.
//!
//! Until the source has sent *switch* it owns the VM: any failure (the
//! destination dies, the link drops) cancels the copy and the source
//! resumes. After *switch*, if it never hears *committed* (or an explicit
//! *abort*), it cannot tell whether the destination resumed: it keeps the
//! VM paused, says it is in doubt, and never resumes on a guess (Ctrl-C
//! saves the paused VM into a package). A destination whose source
//! disappears before *switch* removes its half-received VM and fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_engine::{AccelChoice, Engine, LiveLimits, LiveStats, SavedState};
use ferry_lazydisk::{LazyDisk, LazyDiskOptions, NbdServer, RemoteSection};
use ferry_package::SectionKind;
use ferry_transport::migration::{self, ChannelKind, DestMsg, MigrationError, SourceMsg, Tunnel};
/// The offer, now typed in the migration protocol.
pub use ferry_transport::migration::{Blob, VmOffer};
use ferry_transport::RemotePackage;
use sha2::{Digest, Sha256};
use std::sync::Arc;

use crate::cache::SectionCache;
use crate::ops::{forward_signals, SignalForwarder};
use crate::package::{
    check_host_memory, check_writable, copy_sparse, now_unix, probe_of, saved_provenance,
    write_package, PackageMeta, Sources, DEVICE_STATE_IN, DEVICE_STATE_OUT,
};
use crate::supervisor::{BootImage, NetChoice, RestoreMemory, RunningVm, VmConfig, Wake};
use crate::vmdir::{generate_name, validate_name};
use crate::{Paths, RuntimeError};

/// How long the source waits for *committed* after *switch*.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a destination waits for *switch* (the whole copy).
const SWITCH_TIMEOUT: Duration = Duration::from_secs(900);

/// Options of `ferry peer`.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// `http(s)://…` (a package) or `HOST:PORT` (a peer to migrate from).
    pub from: String,
    /// The VM's name here; the package's recipe (or the source VM's name).
    pub name: Option<String>,
    /// Its network.
    pub net: NetChoice,
    /// Serve the VM to the next peer on this address.
    pub listen: Option<SocketAddr>,
    /// Bearer token for the registry, the source peer and `--listen`.
    pub token: Option<String>,
    /// Accelerator choice (must match the VM's).
    pub accel: AccelChoice,
    /// Copy the guest console to standard error.
    pub echo_console: bool,
    /// Forward standard input to the guest's console.
    pub enable_input: bool,
    /// Where Ctrl-C suspends the VM to (default `./<name>.ferry`).
    pub save: Option<PathBuf>,
    /// When the command started.
    pub started: Instant,
    /// Cap on the bandwidth of a migration out, bytes per second.
    pub max_bandwidth: Option<u64>,
}

/// Where a peer's lazy disk is served from: kept until after the VM.
struct LazyServed {
    disk: Arc<LazyDisk>,
    _server: NbdServer,
}

/// The lazy disk's file and socket in the VM's directory.
const LAZY_DISK_FILE: &str = "disk-lazy.raw";
const LAZY_DISK_SOCKET: &str = "disk-lazy.sock";

/// A VM this peer runs and can hand on. Fields drop in order: the VM
/// first, then what serves its disk.
struct PeerVm {
    vm: RunningVm,
    name: String,
    meta: PackageMeta,
    kernel: PathBuf,
    initramfs: PathBuf,
    disk_size: u64,
    /// The migration listener's events go to the VM's channel; it stops
    /// when dropped.
    _listener: Option<migration::Server>,
    /// Ctrl-C and SIGTERM go to the VM's channel while this lives.
    _signals: SignalForwarder,
    /// The lazy disk, for a VM resumed from a registry.
    _lazy: Option<LazyServed>,
}

/// What became of a migration out.
enum Outcome {
    /// The destination runs the VM.
    Moved(LiveStats),
    /// It did not happen; the VM runs here again.
    Failed(String),
    /// Unknown whether the destination resumed; the VM stays paused.
    InDoubt(String),
}

/// `ferry peer`: takes the VM (from a registry or a peer), runs it, and
/// serves it on `--listen` until it moves on or Ctrl-C suspends it.
pub fn peer(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &PeerOptions,
    say: &mut dyn FnMut(&str),
) -> Result<(), RuntimeError> {
    if opts.listen.is_some() && opts.token.is_none() {
        return Err(RuntimeError::BadOption(
            "--listen needs --token or --token-file: peers never send a VM's memory to an unauthenticated caller".into(),
        ));
    }
    let mut pvm = if opts.from.starts_with("http://") || opts.from.starts_with("https://") {
        from_registry(engine, paths, opts, say)?
    } else {
        migrate_in(engine, paths, opts, say)?
    };
    if let Some(addr) = opts.listen {
        let sender = pvm.vm.event_sender();
        let token = opts.token.clone().expect("checked above");
        let server = migration::Server::bind(addr, &token, move |incoming| {
            let _ = sender.send(crate::supervisor::SupervisorEvent::Migration(Box::new(
                incoming,
            )));
        })?;
        say(&format!(
            "serving VM '{}' to peers on {}",
            pvm.name,
            server.local_addr()
        ));
        pvm._listener = Some(server);
    }
    if opts.enable_input {
        pvm.vm.forward_stdin()?;
    }
    let save = opts
        .save
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.ferry", pvm.name)));
    eprintln!(
        "VM '{}' is running here; Ctrl-C suspends it into {}",
        pvm.name,
        save.display()
    );
    let limits = LiveLimits {
        max_bandwidth: opts
            .max_bandwidth
            .unwrap_or(LiveLimits::default().max_bandwidth),
        ..LiveLimits::default()
    };
    serve(engine, pvm, &save, &limits, say)
}

/// Waits for Ctrl-C (suspend into `save`) or a migration request.
fn serve(
    engine: &dyn Engine,
    mut pvm: PeerVm,
    save: &Path,
    limits: &LiveLimits,
    say: &mut dyn FnMut(&str),
) -> Result<(), RuntimeError> {
    let mut in_doubt = false;
    loop {
        match pvm.vm.wait_for_request()? {
            Wake::Signal(_) => {
                let t = Instant::now();
                match suspend_to(engine, &mut pvm, save, in_doubt) {
                    Ok(()) => {
                        say(&format!(
                            "suspended into {} in {} ms",
                            save.display(),
                            t.elapsed().as_millis()
                        ));
                        return Ok(());
                    }
                    Err(e) if in_doubt => {
                        eprintln!(
                            "ferry: could not save the paused VM into {}: {e}; it stays paused: fix the cause and press Ctrl-C again",
                            save.display()
                        );
                    }
                    Err(e) => {
                        eprintln!(
                            "ferry: could not suspend into {}: {e}; the VM keeps running: fix the cause and press Ctrl-C again",
                            save.display()
                        );
                        pvm.vm.engine_vm().resume()?;
                        let _ = pvm.vm.after_resume(None);
                    }
                }
            }
            Wake::Migration(mut incoming) => {
                let to = incoming.control.peer().to_string();
                if in_doubt {
                    let _ = incoming.control.send(&SourceMsg::Refused {
                        reason: "this VM is in doubt after an earlier migration; it stays paused"
                            .into(),
                    });
                    continue;
                }
                say(&format!("migrating VM '{}' to {to}", pvm.name));
                match migrate_out(&mut pvm, &mut incoming, limits) {
                    Outcome::Moved(stats) => {
                        // Clients connected here learn at once that the
                        // VM is gone, and reconnect to where it runs now.
                        pvm.vm.close_exposures();
                        tracing::debug!("closed the exposed connections here");
                        say(&format!(
                            "moved VM '{}' to {to}: {} ms in all, {} ms paused (engine's figure), {} MiB of memory and devices sent, {} MiB on the wire with the disk; exiting",
                            pvm.name,
                            stats.total_ms,
                            stats.downtime_ms,
                            stats.state_bytes >> 20,
                            stats.wire_bytes >> 20
                        ));
                        pvm.vm.mark("moved");
                        // On a shared host the destination's first moments
                        // (a cold engine) must not compete with tearing
                        // down this copy: wait a little, then do it slowly.
                        std::thread::sleep(TEARDOWN_GRACE);
                        lower_priority(pvm.vm.engine_vm().pid());
                        // Dropping the VM removes what is left here.
                        return Ok(());
                    }
                    Outcome::Failed(why) => {
                        let _ = std::fs::remove_file(pvm.vm.dir().path().join(SENT_STATE));
                        eprintln!(
                            "ferry: migration to {to} failed: {why}; VM '{}' keeps running here",
                            pvm.name
                        );
                        pvm.vm.mark("running");
                    }
                    Outcome::InDoubt(why) => {
                        in_doubt = true;
                        pvm.vm.mark("in-doubt");
                        eprintln!(
                            "ferry: migration to {to} is in doubt: {why}; VM '{}' stays paused here and is not resumed (check {to}; Ctrl-C saves it into {})",
                            pvm.name,
                            save.display()
                        );
                    }
                }
            }
        }
    }
}

/// Resumes a package from a registry (or any HTTP server with ranges):
/// every section is fetched into the section cache, checked chunk by chunk.
fn from_registry(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &PeerOptions,
    say: &mut dyn FnMut(&str),
) -> Result<PeerVm, RuntimeError> {
    let remote = Arc::new(RemotePackage::open(&opts.from, opts.token.as_deref())?);
    let meta = remote.vm_meta()?;
    check_host_memory(meta.provenance.memory_mib)?;
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| generate_name(&meta.recipe));
    validate_name(&name)?;
    let cache = SectionCache::new(&paths.cache);
    let fetched = |kind: SectionKind| -> Result<PathBuf, RuntimeError> {
        let mut last = Instant::now();
        cache.get_remote(&remote, kind, &mut |done, total| {
            if last.elapsed() > Duration::from_secs(1) {
                last = Instant::now();
                eprintln!("    fetching {kind}: {} / {} MiB", done >> 20, total >> 20);
            }
        })
    };
    let kernel = fetched(SectionKind::Kernel)?;
    let initramfs = fetched(SectionKind::Initramfs)?;
    let memory = fetched(SectionKind::Memory)?;
    let device_state = fetched(SectionKind::DeviceState)?;
    eprintln!(
        "==> fetched {} MiB from {} (sections already in the cache are not fetched again)",
        remote.bytes_fetched() >> 20,
        opts.from
    );
    let vm_dir = paths.vms().join(&name);
    // The disk is not fetched first: it is served to the engine from a
    // local file that fills chunk by chunk, on demand, then in the
    // background once the service is live.
    let disk_socket = vm_dir.join(LAZY_DISK_SOCKET);
    let image = BootImage {
        kernel: kernel.clone(),
        initramfs: initramfs.clone(),
        cmdline: meta.cmdline.clone(),
        disk: PathBuf::new(),
        source: opts.from.clone(),
        network: meta.network.clone(),
        disk_server: Some(disk_socket.clone()),
    };
    let config = vm_config(engine, opts, &name, &meta, &image, say)?;
    let mut lazy: Option<LazyServed> = None;
    // The VM owns a copy of the memory (holes kept), mapped shared, so
    // that suspending it again writes no second copy.
    let memory_file = vm_dir.join(crate::vmdir::files::MEMORY);
    let state = SavedState {
        device_state: vm_dir.join(DEVICE_STATE_IN),
        memory_file: Some(memory_file.clone()),
        provenance: meta.provenance.clone(),
    };
    let mut vm = RunningVm::restore(
        engine,
        paths,
        &image,
        &config,
        &state,
        RestoreMemory::Shared,
        |d| {
            std::fs::copy(&device_state, d.path().join(DEVICE_STATE_IN))
                .map_err(RuntimeError::io(d.path().join(DEVICE_STATE_IN)))?;
            copy_sparse(&memory, &memory_file)?;
            let source = RemoteSection::new(remote.clone(), SectionKind::Disk)?;
            let disk = Arc::new(LazyDisk::open(
                &d.path().join(LAZY_DISK_FILE),
                source,
                LazyDiskOptions {
                    prefetch: false,
                    ..LazyDiskOptions::default()
                },
            )?);
            let server = NbdServer::serve(&disk_socket, disk.clone())?;
            lazy = Some(LazyServed {
                disk,
                _server: server,
            });
            Ok(())
        },
    )?;
    let lazy = lazy.expect("prepared before the engine started");
    let signals = forward_signals(&vm)?;
    let live = matches!(
        vm.after_resume(None)?,
        ferry_agent_proto::Reply::Resumed { ref status, .. } if status.live
    );
    say(&format!(
        "resumed in {} ms",
        opts.started.elapsed().as_millis()
    ));
    if let Some(line) = vm.network_summary() {
        say(&line);
    }
    if !live {
        vm.wait_live(Duration::from_secs(60))?;
    }
    say(&format!(
        "live in {} ms",
        opts.started.elapsed().as_millis()
    ));
    let status = lazy.disk.status();
    let disk_size = lazy.disk.size();
    say(&format!(
        "disk: {} of {} MiB fetched when live ({}%); the rest follows in the background",
        status.bytes_fetched >> 20,
        disk_size >> 20,
        status.bytes_fetched * 100 / disk_size.max(1)
    ));
    lazy.disk.resume_prefetch();
    Ok(PeerVm {
        vm,
        name,
        meta,
        kernel,
        initramfs,
        disk_size,
        _listener: None,
        _signals: signals,
        _lazy: Some(lazy),
    })
}

/// Chooses the accelerator (it must be the one the VM was made with) and
/// sizes the VM as its provenance says.
fn vm_config(
    engine: &dyn Engine,
    opts: &PeerOptions,
    name: &str,
    meta: &PackageMeta,
    image: &BootImage,
    say: &mut dyn FnMut(&str),
) -> Result<VmConfig, RuntimeError> {
    let decision = engine.choose_accel(opts.accel, &probe_of(image))?;
    if decision.accel != meta.provenance.accel {
        return Err(RuntimeError::Engine(
            ferry_engine::EngineError::Incompatible(format!(
                "the VM runs with accelerator {} but this host runs {} ({})",
                meta.provenance.accel,
                decision.accel,
                decision.reason.as_deref().unwrap_or("chosen")
            )),
        ));
    }
    say(&decision.to_string());
    Ok(VmConfig {
        name: name.to_string(),
        memory_mib: meta.provenance.memory_mib,
        cpus: meta.provenance.cpus,
        accel: decision.accel,
        echo_console: opts.echo_console || opts.enable_input,
        net: opts.net.clone(),
    })
}

/// Live-migrates the VM running on the peer at `opts.from` to this host.
fn migrate_in(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &PeerOptions,
    say: &mut dyn FnMut(&str),
) -> Result<PeerVm, RuntimeError> {
    let addr = opts.from.as_str();
    let token = opts.token.as_deref().ok_or_else(|| {
        RuntimeError::BadOption(format!(
            "migrating from the peer {addr} needs its token: pass --token or --token-file"
        ))
    })?;
    let (mut control, session, offer) = migration::connect(addr, token)?;
    let failed = |detail: String| RuntimeError::MigrationFailed {
        direction: "from",
        peer: addr.to_string(),
        detail,
    };
    let abort = |control: &mut migration::Control, why: &str| {
        let _ = control.send(&DestMsg::Abort {
            reason: why.to_string(),
        });
    };
    // Refuse early, before anything is made here.
    if let Err(e) = check_host_memory(offer.meta.provenance.memory_mib) {
        abort(&mut control, &e.to_string());
        return Err(e);
    }
    let name = opts.name.clone().unwrap_or_else(|| offer.name.clone());
    validate_name(&name)?;
    let blobs = paths.cache.join("blobs");
    let kernel = fetch_blob(&mut control, "kernel", &offer.kernel, &blobs)?;
    let initramfs = fetch_blob(&mut control, "initramfs", &offer.initramfs, &blobs)?;
    let image = BootImage {
        kernel: kernel.clone(),
        initramfs: initramfs.clone(),
        cmdline: offer.meta.cmdline.clone(),
        disk: PathBuf::new(),
        source: format!("peer {addr}"),
        network: offer.meta.network.clone(),
        disk_server: None,
    };
    let config = match vm_config(engine, opts, &name, &offer.meta, &image, say) {
        Ok(c) => c,
        Err(e) => {
            abort(&mut control, &e.to_string());
            return Err(e);
        }
    };
    let mut vm = match RunningVm::receive(
        engine,
        paths,
        &image,
        &config,
        &offer.meta.provenance,
        offer.disk_size,
    ) {
        Ok(vm) => vm,
        Err(e) => {
            abort(&mut control, &e.to_string());
            return Err(e);
        }
    };
    let signals = forward_signals(&vm)?;
    let sockets = vm.incoming_sockets();
    let channel = |kind| migration::open_channel(addr, token, &session, kind);
    let tunnels = (|| -> Result<_, MigrationError> {
        let state =
            Tunnel::Dial(sockets.state_socket.clone()).start(channel(ChannelKind::State)?)?;
        let disk = Tunnel::Dial(sockets.disk_socket.clone()).start(channel(ChannelKind::Disk)?)?;
        Ok((state, disk))
    })();
    let _tunnels = match tunnels {
        Ok(t) => t,
        Err(e) => {
            abort(&mut control, &e.to_string());
            return Err(e.into());
        }
    };
    control.send(&DestMsg::Ready)?;
    let t = Instant::now();
    say(&format!("receiving VM '{}' from {addr}", offer.name));
    let stats = loop {
        match control.recv::<SourceMsg>(Some(Duration::from_millis(500))) {
            Ok(SourceMsg::Switch { stats }) => {
                // For tests: a destination that dies at the worst moment,
                // after *switch* and before *committed*, which a test
                // cannot time from outside.
                if std::env::var("FERRY_FAULT").as_deref() == Ok("exit-after-switch") {
                    eprintln!("ferry: FERRY_FAULT=exit-after-switch: exiting");
                    std::process::exit(99);
                }
                break stats;
            }
            Ok(SourceMsg::Failed { reason }) => {
                return Err(failed(format!(
                    "the source gave up ({reason}); it keeps the VM, nothing runs here"
                )))
            }
            Ok(other) => {
                abort(&mut control, "unexpected message");
                return Err(MigrationError::Protocol(format!("unexpected {other:?}")).into());
            }
            Err(MigrationError::Timeout(_)) => {
                if let Some(_sig) = vm.poll_stop().inspect_err(|_| {
                    abort(&mut control, "the receiving VM died");
                })? {
                    abort(&mut control, "interrupted on the destination");
                    return Err(RuntimeError::Interrupted);
                }
                if t.elapsed() > SWITCH_TIMEOUT {
                    abort(&mut control, "the copy took too long");
                    return Err(failed("the copy took too long; the source keeps the VM".into()));
                }
            }
            Err(e) => {
                return Err(failed(format!(
                    "the source went away before the switchover ({e}); it owns the VM, nothing was started here"
                )))
            }
        }
    };
    // The commit point: check, stop serving the disk, resume.
    let switch = Instant::now();
    let commit = (|| -> Result<(), RuntimeError> {
        let e = vm.engine_vm();
        e.wait_received(Duration::from_secs(30))?;
        e.end_disk_export()?;
        e.resume()?;
        Ok(())
    })();
    if let Err(e) = commit {
        abort(&mut control, &e.to_string());
        return Err(failed(format!("{e}; told the source to keep the VM")));
    }
    let switch_ms = switch.elapsed().as_millis();
    let _ = control.send(&DestMsg::Committed);
    vm.mark("running");
    // The guest's clock stood still while it was paused.
    let _ = vm.after_resume(None);
    say(&format!(
        "migrated VM '{}' from {addr} in {} ms ({} ms paused at the source by its engine's count, {switch_ms} ms to resume here)",
        offer.name,
        t.elapsed().as_millis(),
        stats.downtime_ms
    ));
    if let Some(line) = vm.network_summary() {
        say(&line);
    }
    say(&format!(
        "live in {} ms",
        opts.started.elapsed().as_millis()
    ));
    Ok(PeerVm {
        vm,
        name,
        meta: offer.meta,
        kernel,
        initramfs,
        disk_size: offer.disk_size,
        _listener: None,
        _signals: signals,
        _lazy: None,
    })
}

/// A file from the offer, from the blob cache or fetched from the source.
fn fetch_blob(
    control: &mut migration::Control,
    name: &str,
    blob: &Blob,
    dir: &Path,
) -> Result<PathBuf, RuntimeError> {
    let path = dir.join(&blob.sha256);
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(RuntimeError::io(dir))?;
    control.send(&DestMsg::Fetch {
        name: name.to_string(),
    })?;
    let len = match control.recv::<SourceMsg>(Some(Duration::from_secs(60)))? {
        SourceMsg::Blob { len, .. } => len,
        other => {
            return Err(MigrationError::Protocol(format!("expected {name}, got {other:?}")).into())
        }
    };
    let part = path.with_extension(format!("part-{}", std::process::id()));
    control.recv_blob_into(len, &part)?;
    if sha256_of(&part)? != blob.sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(MigrationError::Protocol(format!(
            "the {name} received does not match its sha256"
        ))
        .into());
    }
    std::fs::rename(&part, &path).map_err(RuntimeError::io(&path))?;
    Ok(path)
}

fn sha256_of(path: &Path) -> Result<String, RuntimeError> {
    let mut file = std::fs::File::open(path).map_err(RuntimeError::io(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(RuntimeError::io(path))?;
    Ok(hex::encode(hasher.finalize()))
}

/// How long a source waits after a migration before tearing its copy down.
/// In bench/migrate on this 2-core host (while it was busy with other work
/// too), tearing down at once (the engine's exit, the namespace, the
/// firewall rules) delayed the destination's first answer by about 100 ms.
const TEARDOWN_GRACE: Duration = Duration::from_secs(1);

/// The copy of the state sent in the last migration out, in the VM's
/// directory (see `migrate_out`).
const SENT_STATE: &str = "sent-state";

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

/// Hands the VM to the destination that sent `incoming`.
fn migrate_out(
    pvm: &mut PeerVm,
    incoming: &mut migration::Incoming,
    limits: &LiveLimits,
) -> Outcome {
    let offer = match offer_of(pvm) {
        Ok(o) => o,
        Err(e) => {
            let _ = incoming.control.send(&SourceMsg::Refused {
                reason: e.to_string(),
            });
            return Outcome::Failed(e.to_string());
        }
    };
    let control = &mut incoming.control;
    let sent = control.send(&SourceMsg::Offer {
        session: incoming.session.clone(),
        vm: offer,
    });
    if let Err(e) = sent {
        return Outcome::Failed(e.to_string());
    }
    // Serve files until the destination is ready.
    loop {
        match control.recv::<DestMsg>(Some(Duration::from_secs(600))) {
            Ok(DestMsg::Fetch { name }) => {
                let path = match name.as_str() {
                    "kernel" => &pvm.kernel,
                    "initramfs" => &pvm.initramfs,
                    _ => return Outcome::Failed(format!("the destination asked for '{name}'")),
                };
                if let Err(e) = control.send_blob(&name, path) {
                    return Outcome::Failed(e.to_string());
                }
            }
            Ok(DestMsg::Ready) => break,
            Ok(DestMsg::Abort { reason }) => {
                return Outcome::Failed(format!("the destination gave up: {reason}"))
            }
            Ok(DestMsg::Committed) => {
                return Outcome::Failed("the destination said 'committed' out of turn".into())
            }
            Err(e) => return Outcome::Failed(e.to_string()),
        }
    }
    let dir = pvm.vm.dir().path().to_path_buf();
    let (disk_sock, state_sock) = (
        dir.join("outgoing-disk.sock"),
        dir.join("outgoing-state.sock"),
    );
    let tunnels = (|| -> Result<_, MigrationError> {
        let disk = incoming.channel(ChannelKind::Disk, Duration::from_secs(10))?;
        let state = incoming.channel(ChannelKind::State, Duration::from_secs(10))?;
        Ok((
            Tunnel::Listen(disk_sock.clone()).start(disk)?,
            // A copy of what is sent stays here until the switch is
            // confirmed: QEMU will not save a VM it has sent, so it is the
            // only way to save a VM left in doubt.
            Tunnel::Listen(state_sock.clone()).start_recording(state, &dir.join(SENT_STATE))?,
        ))
    })();
    let control = &mut incoming.control;
    let tunnels = match tunnels {
        Ok(t) => t,
        Err(e) => {
            let _ = control.send(&SourceMsg::Failed {
                reason: e.to_string(),
            });
            return Outcome::Failed(e.to_string());
        }
    };
    pvm.vm.mark("migrating");
    // Before the switch the VM is ours: any failure resumes it here.
    let sent = (|| -> Result<LiveStats, RuntimeError> {
        let e = pvm.vm.engine_vm();
        let t = Instant::now();
        e.start_disk_copy(&disk_sock)?;
        tracing::info!(ms = t.elapsed().as_millis() as u64, "disk copy in sync");
        let t = Instant::now();
        let stats = e.send_state(&state_sock, limits)?;
        tracing::info!(ms = t.elapsed().as_millis() as u64, "state sent");
        let t = Instant::now();
        e.finish_disk_copy()?;
        tracing::info!(ms = t.elapsed().as_millis() as u64, "disk copy finished");
        Ok(stats)
    })();
    let mut stats = match sent {
        Ok(s) => s,
        Err(e) => {
            let e2 = pvm.vm.engine_vm().abort_send();
            let resumed = pvm.vm.engine_vm().resume();
            let _ = control.send(&SourceMsg::Failed {
                reason: e.to_string(),
            });
            if let Err(r) = e2.and(resumed) {
                tracing::warn!("resuming after a failed migration: {r}");
            }
            let _ = pvm.vm.after_resume(None);
            return Outcome::Failed(e.to_string());
        }
    };
    // Everything the engine sent went through the two tunnels.
    stats.wire_bytes = tunnels.0.bytes() + tunnels.1.bytes();
    if let Err(e) = control.send(&SourceMsg::Switch {
        stats: stats.clone(),
    }) {
        return Outcome::InDoubt(format!("sending 'switch' failed: {e}"));
    }
    match control.recv::<DestMsg>(Some(COMMIT_TIMEOUT)) {
        Ok(DestMsg::Committed) => Outcome::Moved(stats),
        Ok(DestMsg::Abort { reason }) => {
            // The destination says it did not resume: the VM is ours again.
            let resumed = pvm.vm.engine_vm().resume();
            if let Err(e) = resumed {
                return Outcome::InDoubt(format!(
                    "the destination gave up ({reason}) and resuming here failed: {e}"
                ));
            }
            let _ = pvm.vm.after_resume(None);
            Outcome::Failed(format!(
                "the destination gave up at the switchover: {reason}"
            ))
        }
        Ok(other) => Outcome::InDoubt(format!("the destination answered {other:?} to 'switch'")),
        Err(e) => Outcome::InDoubt(format!("no answer to 'switch' ({e})")),
    }
}

fn offer_of(pvm: &PeerVm) -> Result<VmOffer, RuntimeError> {
    let blob = |p: &Path| -> Result<Blob, RuntimeError> {
        Ok(Blob {
            sha256: sha256_of(p)?,
            size: std::fs::metadata(p).map_err(RuntimeError::io(p))?.len(),
        })
    };
    Ok(VmOffer {
        name: pvm.name.clone(),
        meta: pvm.meta.clone(),
        disk_size: pvm.disk_size,
        kernel: blob(&pvm.kernel)?,
        initramfs: blob(&pvm.initramfs)?,
    })
}

/// Ctrl-C: writes the VM into a new package at `save` (beside, then
/// renamed). A VM in doubt is paused already and its agent cannot answer:
/// it is saved as it is, never resumed.
fn suspend_to(
    engine: &dyn Engine,
    pvm: &mut PeerVm,
    save: &Path,
    in_doubt: bool,
) -> Result<(), RuntimeError> {
    eprintln!("==> suspending into {}", save.display());
    check_writable(save)?;
    let provenance = if in_doubt {
        // QEMU refuses to save a VM it has sent; what it sent was kept.
        let dir = pvm.vm.dir().path().to_path_buf();
        let sent = dir.join(SENT_STATE);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sent.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::rename(&sent, dir.join(DEVICE_STATE_OUT)).map_err(|e| {
            RuntimeError::InDoubtUnsaved {
                name: pvm.name.clone(),
                detail: format!("the copy of the state it sent is missing: {e}"),
            }
        })?;
        pvm.meta.provenance.clone()
    } else {
        saved_provenance(&mut pvm.vm, engine)?
    };
    let meta = PackageMeta {
        ferry_version: env!("CARGO_PKG_VERSION").into(),
        written_unix: now_unix(),
        generation: pvm.meta.generation + 1,
        provenance,
        // The sent stream carries the RAM as well.
        memory_in_state: in_doubt,
        ..pvm.meta.clone()
    };
    let sources = Sources {
        kernel: pvm.kernel.clone(),
        initramfs: pvm.initramfs.clone(),
    };
    write_package(&mut pvm.vm, save, &meta, &sources, None)
}
