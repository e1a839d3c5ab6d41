//! Packages: a live VM snapshotted into one file (`ferry package`), resumed
//! from it (`ferry run`), suspended back into it on Ctrl-C, and inspected.
//!
//! Resuming: the package's kernel, initramfs, disk and memory sections are
//! extracted once into the cache, keyed by their digests. A plain `run`
//! copies the memory file into the VM's directory and maps it shared (so that
//! suspending again only writes device state) and puts a copy-on-write
//! overlay on the cached disk. A `--clone` maps the cached memory privately
//! (clones of one package share its unchanged pages) and never writes back.
//!
//! Suspending writes a whole new package beside the old one, copying every
//! unchanged chunk verbatim from the old one, and renames it into place: at
//! every instant the file is either the old or the new package. If writing
//! fails (read-only file system, disk full), the VM resumes and keeps running.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_agent_proto::{Identity, Reply, Request};
use ferry_engine::{AccelChoice, Engine, ProbeGuest, Provenance, SavedState};
use ferry_package::{Package, PackageWriter, SectionKind, DEFAULT_CHUNK_SIZE};

use crate::cache::SectionCache;
use crate::ops::{boot_until_live, forward_signals, load_verified, LiveBoot};
use crate::supervisor::{BootImage, NetChoice, RestoreMemory, RunningVm, VmConfig};
use crate::vmdir::{files, generate_name, validate_name};
use crate::{Paths, RuntimeError};

/// What a package says about the VM inside it (its metadata, and its
/// `config` section): now [`ferry_package::VmMeta`].
pub use ferry_package::VmMeta as PackageMeta;

pub(crate) const DEVICE_STATE_IN: &str = "device-state.in";
pub(crate) const DEVICE_STATE_OUT: &str = "device-state";
const DISK_EXPORT: &str = "disk.raw";

/// Options of `ferry package`.
#[derive(Debug, Clone)]
pub struct PackageOptions {
    /// The blueprint to boot.
    pub blueprint: PathBuf,
    /// The package file to write.
    pub out: PathBuf,
    /// Guest memory; the blueprint's default if `None`.
    pub memory_mib: Option<u64>,
    /// vCPUs; the blueprint's default if `None`.
    pub cpus: Option<u32>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// How long to wait for live; the blueprint's if `None`.
    pub live_timeout: Option<Duration>,
    /// Copy the guest console to standard error.
    pub echo_console: bool,
    /// The network the VM is packaged in (what the guest sees is the same
    /// in every namespace, so this does not change the package).
    pub net: NetChoice,
}

/// `ferry package`: boots a blueprint, waits for live, snapshots it into one
/// package file.
pub fn package(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &PackageOptions,
    say: &mut dyn FnMut(&str),
) -> Result<(), RuntimeError> {
    let started = Instant::now();
    let blueprint = load_verified(paths, &opts.blueprint)?;
    let m = &blueprint.manifest;
    let (mut vm, _signals) = boot_until_live(
        engine,
        paths,
        &blueprint,
        &LiveBoot {
            name: generate_name(&format!("pkg-{}", m.recipe)),
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            accel: opts.accel,
            echo_console: opts.echo_console,
            live_timeout: opts.live_timeout,
            net: opts.net.clone(),
        },
        say,
    )?;
    let memory_mib = vm.status().memory_mib;
    eprintln!(
        "==> service live after {} ms; snapshotting",
        started.elapsed().as_millis()
    );
    let provenance = saved_provenance(&mut vm, engine)?;
    let meta = PackageMeta {
        ferry_version: env!("CARGO_PKG_VERSION").into(),
        written_unix: now_unix(),
        generation: 0,
        provenance,
        recipe: m.recipe.clone(),
        cmdline: m.cmdline.clone(),
        network: m.network.clone(),
        liveness: m.liveness.clone(),
        memory_in_state: false,
    };
    let sources = Sources {
        kernel: blueprint.kernel(),
        initramfs: blueprint.initramfs(),
    };
    write_package(&mut vm, &opts.out, &meta, &sources, None)?;
    let pkg = Package::open(&opts.out)?;
    say(&format!(
        "packaged {} in {} ms: {} MiB file for {} MiB of guest memory",
        opts.out.display(),
        started.elapsed().as_millis(),
        pkg.file_size() >> 20,
        memory_mib
    ));
    drop(vm);
    Ok(())
}

/// Quiesces the guest and saves its device state; returns the provenance
/// to record. Leaves the VM paused.
pub(crate) fn saved_provenance(
    vm: &mut RunningVm,
    engine: &dyn Engine,
) -> Result<Provenance, RuntimeError> {
    let t = Instant::now();
    vm.agent().request(
        &Request::BeforeSuspend { drop_caches: true },
        Duration::from_secs(60),
    )?;
    tracing::info!(ms = t.elapsed().as_millis() as u64, "guest quiesced");
    let t = Instant::now();
    let dir = vm.dir().path().to_path_buf();
    let state = vm.engine_vm().save_state(&dir.join(DEVICE_STATE_OUT))?;
    tracing::info!(ms = t.elapsed().as_millis() as u64, "device state saved");
    let mut provenance = state.provenance;
    provenance.engine = engine.name().to_string();
    Ok(provenance)
}

/// Kernel and initramfs files to put into a package.
pub(crate) struct Sources {
    pub(crate) kernel: PathBuf,
    pub(crate) initramfs: PathBuf,
}

/// Writes the paused, saved VM into `dest` (atomically), reusing unchanged
/// chunks of `old`.
pub(crate) fn write_package(
    vm: &mut RunningVm,
    dest: &Path,
    meta: &PackageMeta,
    sources: &Sources,
    old: Option<&Package>,
) -> Result<(), RuntimeError> {
    let dir = vm.dir().path().to_path_buf();
    let disk = dir.join(DISK_EXPORT);
    let t = Instant::now();
    vm.engine_vm().export_disk(&disk)?;
    tracing::info!(ms = t.elapsed().as_millis() as u64, "disk exported");
    let mut writer = PackageWriter::create(dest)?;
    let config = serde_json::to_vec_pretty(meta).expect("metadata serialises");
    writer.add_bytes(SectionKind::Config, &config)?;
    let sections = [
        (SectionKind::DeviceState, dir.join(DEVICE_STATE_OUT)),
        (SectionKind::Memory, dir.join(files::MEMORY)),
        (SectionKind::Kernel, sources.kernel.clone()),
        (SectionKind::Initramfs, sources.initramfs.clone()),
        (SectionKind::Disk, disk.clone()),
    ];
    for (kind, path) in sections {
        let t = Instant::now();
        let mut last = Instant::now();
        let info = writer.add_file(kind, &path, DEFAULT_CHUNK_SIZE, old, &mut |done, total| {
            if last.elapsed() > Duration::from_secs(1) {
                last = Instant::now();
                eprintln!("    {kind}: {} / {} MiB", done >> 20, total >> 20);
            }
        })?;
        tracing::info!(
            section = %kind,
            size = info.size,
            ms = t.elapsed().as_millis() as u64,
            "section written"
        );
    }
    let t = Instant::now();
    writer.commit(meta)?;
    tracing::info!(ms = t.elapsed().as_millis() as u64, "package committed");
    Ok(())
}

/// Options of `ferry run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The package.
    pub package: PathBuf,
    /// The VM's name; generated if `None`.
    pub name: Option<String>,
    /// Run a copy-on-write clone: no lock, no write-back, a new identity.
    pub clone: bool,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Copy the guest console to standard error.
    pub echo_console: bool,
    /// Forward standard input to the guest's serial console.
    pub enable_input: bool,
    /// When the command started, for the `resumed in N ms` figure.
    pub started: Instant,
    /// Its network.
    pub net: NetChoice,
}

/// `ferry run`: resumes a package; Ctrl-C suspends it back into the package
/// (or, for a clone, discards it).
pub fn run(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &RunOptions,
    say: &mut dyn FnMut(&str),
) -> Result<(), RuntimeError> {
    let pkg = Package::open(&opts.package)?;
    let meta = read_meta(&pkg)?;
    for kind in SectionKind::ALL {
        pkg.section(kind)?;
    }
    // Every chunk is checked, so that a damaged package is refused even
    // where the section cache could stand in for it. The check runs beside
    // the engine's start-up and is awaited before the VM is declared up.
    let verifier = {
        let path = opts.package.clone();
        std::thread::spawn(move || -> Result<u128, ferry_package::PackageError> {
            // Lower priority for this thread and the workers it starts (they
            // inherit it): the engine's start-up comes first.
            // SAFETY: setpriority(2) on the calling thread (who = 0); no
            // memory is involved.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 10);
            }
            let t = Instant::now();
            Package::open(&path)?.verify(&mut |_, _| {})?;
            Ok(t.elapsed().as_millis())
        })
    };
    let _lock = if opts.clone {
        None
    } else {
        Some(PackageLock::acquire(paths, &opts.package)?)
    };
    check_host_memory(meta.provenance.memory_mib)?;
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| generate_name(&meta.recipe));
    validate_name(&name)?;

    let cache = SectionCache::new(&paths.cache);
    let kernel = cache.get(&pkg, SectionKind::Kernel)?;
    let initramfs = cache.get(&pkg, SectionKind::Initramfs)?;
    let image = BootImage {
        kernel: kernel.clone(),
        initramfs: initramfs.clone(),
        cmdline: meta.cmdline.clone(),
        disk: cache.get(&pkg, SectionKind::Disk)?,
        source: opts.package.display().to_string(),
        network: meta.network.clone(),
        disk_server: None,
    };
    let decision = choose_saved_accel(engine, opts.accel, &image, meta.provenance.accel)?;
    say(&decision.to_string());
    let memory_cache = cache.get(&pkg, SectionKind::Memory)?;
    let old_digests: std::collections::BTreeMap<SectionKind, String> =
        [SectionKind::Memory, SectionKind::Disk]
            .into_iter()
            .filter_map(|k| Some((k, pkg.section(k).ok()?.digest.clone())))
            .collect();
    let vm_dir = paths.vms().join(&name);
    let (memory_file, memory_mode) = if opts.clone {
        (memory_cache.clone(), RestoreMemory::Private)
    } else {
        (vm_dir.join(files::MEMORY), RestoreMemory::Shared)
    };
    let state = SavedState {
        device_state: vm_dir.join(DEVICE_STATE_IN),
        // With RAM in the device state, the engine loads it from there
        // into the (zero) memory file.
        memory_file: (!meta.memory_in_state).then(|| memory_file.clone()),
        provenance: meta.provenance.clone(),
    };
    let config = VmConfig {
        name: name.clone(),
        memory_mib: meta.provenance.memory_mib,
        cpus: meta.provenance.cpus,
        accel: decision.accel,
        echo_console: opts.echo_console || opts.enable_input,
        net: opts.net.clone(),
    };
    let mut vm = RunningVm::restore(engine, paths, &image, &config, &state, memory_mode, |d| {
        pkg.extract(
            SectionKind::DeviceState,
            &d.path().join(DEVICE_STATE_IN),
            &mut |_, _| {},
        )?;
        if !opts.clone {
            let t = Instant::now();
            copy_sparse(&memory_cache, &memory_file)?;
            tracing::info!(ms = t.elapsed().as_millis() as u64, "memory copied");
        }
        Ok(())
    })?;
    let _signals = forward_signals(&vm)?;
    if opts.enable_input {
        vm.forward_stdin()?;
    }
    let identity = opts.clone.then(|| Identity {
        hostname: name.clone(),
        machine_id: random_hex(16),
    });
    let live = match vm.after_resume(identity)? {
        Reply::Resumed { status, .. } => status.live,
        _ => false,
    };
    say(&format!(
        "resumed in {} ms",
        opts.started.elapsed().as_millis()
    ));
    if let Some(line) = vm.network_summary() {
        say(&line);
    }
    // The guest runs from verified cache entries already; a damaged package
    // still stops it here, before it is called live or written back.
    match verifier.join() {
        Ok(Ok(ms)) => tracing::info!(ms = ms as u64, "package verified"),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {
            return Err(RuntimeError::BadOption(
                "package verification panicked".into(),
            ))
        }
    }
    if !live {
        vm.wait_live(Duration::from_secs(60))?;
    }
    say(&format!(
        "live in {} ms",
        opts.started.elapsed().as_millis()
    ));
    eprintln!(
        "VM '{name}' is running from {}; Ctrl-C {}",
        opts.package.display(),
        if opts.clone {
            "discards this clone"
        } else {
            "suspends it back into the package"
        }
    );
    drop(pkg);
    loop {
        vm.wait_for_signal()?;
        if opts.clone {
            eprintln!("discarding clone '{name}'");
            drop(vm);
            return Ok(());
        }
        let t = Instant::now();
        match suspend_into(&mut vm, engine, &opts.package, &meta, &kernel, &initramfs) {
            Ok(()) => {
                say(&format!(
                    "suspended into {} in {} ms",
                    opts.package.display(),
                    t.elapsed().as_millis()
                ));
                // The VM's memory file and exported disk are exactly the new
                // sections: they become the cache entries, so the next run
                // starts warm, and the entries of the old contents go.
                if let Ok(new) = Package::open(&opts.package) {
                    let disk = vm.dir().path().join(DISK_EXPORT);
                    for (kind, file) in [
                        (SectionKind::Memory, &memory_file),
                        (SectionKind::Disk, &disk),
                    ] {
                        let (Some(old), Ok(now)) = (old_digests.get(&kind), new.section(kind))
                        else {
                            continue;
                        };
                        if *old != now.digest {
                            cache.adopt(kind, &now.digest, file);
                            cache.forget(kind, old);
                        }
                    }
                }
                drop(vm);
                return Ok(());
            }
            Err(e) => {
                eprintln!(
                    "ferry: could not suspend into {}: {e}; the package is unchanged and the VM keeps running: fix the cause and press Ctrl-C again",
                    opts.package.display()
                );
                vm.engine_vm().resume()?;
                let _ = vm.after_resume(None);
            }
        }
    }
}

fn suspend_into(
    vm: &mut RunningVm,
    engine: &dyn Engine,
    path: &Path,
    meta: &PackageMeta,
    kernel: &Path,
    initramfs: &Path,
) -> Result<(), RuntimeError> {
    eprintln!("==> suspending into {}", path.display());
    check_writable(path)?;
    let provenance = saved_provenance(vm, engine)?;
    let old = Package::open(path)?;
    let meta = PackageMeta {
        ferry_version: env!("CARGO_PKG_VERSION").into(),
        written_unix: now_unix(),
        generation: meta.generation + 1,
        provenance,
        // The VM ran from a shared memory file: RAM is in it again.
        memory_in_state: false,
        ..meta.clone()
    };
    let sources = Sources {
        kernel: kernel.to_path_buf(),
        initramfs: initramfs.to_path_buf(),
    };
    write_package(vm, path, &meta, &sources, Some(&old))
}

/// Fails early, before the guest is paused, if the package's directory
/// cannot take a new file (e.g. a read-only mount).
pub(crate) fn check_writable(path: &Path) -> Result<(), RuntimeError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let probe = dir.join(format!(".ferry-write-test-{}", std::process::id()));
    match File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(RuntimeError::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

pub(crate) fn read_meta(pkg: &Package) -> Result<PackageMeta, RuntimeError> {
    Ok(pkg.vm_meta()?)
}

/// Chooses the accelerator for a package's VM: it can only resume on the
/// one it was saved with.
pub(crate) fn choose_saved_accel(
    engine: &dyn Engine,
    choice: AccelChoice,
    image: &BootImage,
    saved: ferry_engine::Accel,
) -> Result<ferry_engine::AccelDecision, RuntimeError> {
    let decision = engine.choose_accel(choice, &probe_of(image))?;
    if decision.accel != saved {
        return Err(RuntimeError::Engine(ferry_engine::EngineError::Incompatible(format!(
            "the package was made with accelerator {} but this host runs {} ({}); rebuild the package here with 'ferry package'",
            saved,
            decision.accel,
            decision.reason.as_deref().unwrap_or("chosen")
        ))));
    }
    Ok(decision)
}

pub(crate) fn probe_of(image: &BootImage) -> ProbeGuest {
    ProbeGuest {
        kernel: image.kernel.clone(),
        initramfs: image.initramfs.clone(),
        cmdline: image.cmdline.clone(),
    }
}

/// `ferry inspect`: what a package holds; with `verify`, every chunk checked.
pub fn inspect(path: &Path, verify: bool, say: &mut dyn FnMut(&str)) -> Result<(), RuntimeError> {
    let pkg = Package::open(path)?;
    let (major, minor) = pkg.format_version();
    say(&format!("package:   {}", path.display()));
    say(&format!("format:    {major}.{minor}"));
    say(&format!(
        "file size: {} bytes ({} MiB)",
        pkg.file_size(),
        pkg.file_size() >> 20
    ));
    match read_meta(&pkg) {
        Ok(meta) => {
            let p = &meta.provenance;
            say(&format!("recipe:    {}", meta.recipe));
            say(&format!(
                "made with: {} {} ({}, cpu {}), {} MiB, {} vCPU",
                p.engine, p.engine_version, p.accel, p.cpu_model, p.memory_mib, p.cpus
            ));
            say(&format!(
                "written:   by ferry {} at {} (unix), generation {}",
                meta.ferry_version, meta.written_unix, meta.generation
            ));
        }
        Err(e) => say(&format!("metadata:  unreadable ({e})")),
    }
    say(&format!(
        "{:<13} {:>12} {:>7} {:>7} {:>7} {:>12}  digest",
        "section", "size", "chunks", "stored", "zero", "stored bytes"
    ));
    for s in pkg.sections() {
        let stored: Vec<_> = s.chunks.iter().flatten().collect();
        let stored_bytes: u64 = stored.iter().map(|c| c.stored_len).sum();
        say(&format!(
            "{:<13} {:>12} {:>7} {:>7} {:>7} {:>12}  {}",
            s.kind.to_string(),
            s.size,
            s.chunks.len(),
            stored.len(),
            s.chunks.len() - stored.len(),
            stored_bytes,
            &s.digest[..16.min(s.digest.len())]
        ));
    }
    if verify {
        let report = pkg.verify(&mut |_, _| {})?;
        say(&format!("verify:    ok ({report:?})"));
    }
    Ok(())
}

/// Copies a file, keeping holes (and sharing blocks where the file system
/// can).
pub(crate) fn copy_sparse(from: &Path, to: &Path) -> Result<(), RuntimeError> {
    let status = std::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .map_err(RuntimeError::io(to))?;
    if status.success() {
        Ok(())
    } else {
        Err(RuntimeError::Io {
            path: to.to_path_buf(),
            source: std::io::Error::other(format!("cp from {} failed", from.display())),
        })
    }
}

/// One `ferry run` per package: an exclusive lock under `$FERRY_STATE/locks`,
/// named after the package's real path. It lives outside the package's own
/// directory so that packages on read-only mounts can still be run.
pub(crate) struct PackageLock(#[allow(dead_code)] File);

impl PackageLock {
    pub(crate) fn acquire(paths: &Paths, package: &Path) -> Result<Self, RuntimeError> {
        use sha2::Digest;
        let canon = std::fs::canonicalize(package).map_err(RuntimeError::io(package))?;
        let dir = paths.state.join("locks");
        std::fs::create_dir_all(&dir).map_err(RuntimeError::io(&dir))?;
        let key = hex::encode(sha2::Sha256::digest(canon.to_string_lossy().as_bytes()));
        let path = dir.join(format!("{}.lock", &key[..20]));
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(RuntimeError::io(&path))?;
        // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !locked {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(RuntimeError::PackageInUse {
                path: canon,
                pid: pid.trim().to_string(),
            });
        }
        let _ = file.set_len(0);
        let _ =
            std::io::Write::write_all(&mut &file, format!("{}\n", std::process::id()).as_bytes());
        Ok(PackageLock(file))
    }
}

pub(crate) fn check_host_memory(memory_mib: u64) -> Result<(), RuntimeError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib / 1024);
    match total_mib {
        Some(total) if memory_mib > total => Err(RuntimeError::HostTooSmall {
            need_mib: memory_mib,
            have_mib: total,
        }),
        _ => Ok(()),
    }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}
