//! Start source: a local package. One plan for every way a package is
//! resumed here: `ferry run` (the package itself, or a `--clone`), `run
//! --detach`, `ferry up`'s clones, and `ferry start` of a suspended VM
//! (from the package it was saved into).
//!
//! The package's sections are extracted once into the section cache, keyed
//! by their digests. The package itself copies the memory section into the
//! VM's directory and maps it shared (so that suspending again only writes
//! device state) and puts a copy-on-write overlay on the cached disk; a
//! clone maps the cached memory privately (clones of one package share its
//! unchanged pages) and gets a new identity.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_agent_proto::Identity;
use ferry_engine::{AccelChoice, Engine, SavedState};
use ferry_package::{Package, SectionKind, TrustedKeys};

use super::{saved_accel, How, StartPlan};
use crate::cache::{SectionCache, VerifiedPackages};
use crate::error::{FileError, StartError};
use crate::locks::PackageLock;
use crate::owner::{Held, SaveInfo};
use crate::package_meta;
use crate::record::{FleetSpec, NetSpec, RecordState, VmRecord};
use crate::save::{now_unix, CacheAdoption};
use crate::vm::{BootImage, ConsoleSink, RestoreMemory, VmConfig};
use crate::vmdir::{files, VmDir};
use crate::Paths;

/// The saved device state a restore reads, in the VM's directory.
pub(crate) const DEVICE_STATE_IN: &str = "device-state.in";

/// How a package is resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The package itself: locked while it runs, suspended back into it.
    Own,
    /// A copy-on-write clone with its own identity; never writes back
    /// into the package (a detached clone saves into a package of its own).
    Clone,
}

/// What resuming a package is asked for.
pub struct PackageStart {
    /// The package.
    pub package: PathBuf,
    /// The VM's name.
    pub name: String,
    /// The package itself or a clone.
    pub mode: Mode,
    /// Accelerator choice (it must be the package's).
    pub accel: AccelChoice,
    /// Where the console is copied besides its log.
    pub console: Option<ConsoleSink>,
    /// Its network.
    pub net: NetSpec,
    /// How long the service may take to be live after the resume.
    pub live_timeout: Duration,
    /// Every chunk was checked already (by `ferry up`, once for all clones).
    pub verified: bool,
    /// The keys one of which must have signed the package (`--trust`);
    /// empty: no signature needed.
    pub trust: TrustedKeys,
    /// When the operation started.
    pub started: Instant,
    /// Detached: the record to keep, with its fleet.
    pub detached: Option<Detached>,
}

/// What a detached VM's record needs beyond [`PackageStart`].
pub struct Detached {
    /// Its fleet.
    pub fleet: Option<FleetSpec>,
    /// The record of the suspended VM being started again (`ferry
    /// start`), whose directory is claimed already.
    pub previous: Option<(VmRecord, VmDir)>,
}

/// The plan of resuming a package.
pub fn plan(
    engine: &dyn Engine,
    paths: &Paths,
    mut opts: PackageStart,
) -> Result<StartPlan<'static>, StartError> {
    let name = &opts.name.clone();
    crate::vmdir::validate_name(name)?;
    let clone = opts.mode == Mode::Clone;
    let (previous, previous_dir) = match opts.detached.as_mut().and_then(|d| d.previous.take()) {
        Some((r, d)) => (Some(r), Some(d)),
        None => (None, None),
    };
    let previous = previous.as_ref();
    // A package the VM writes back into is its alone while it runs (a
    // suspended VM's own saved package is guarded by its directory).
    let owns_saved = previous
        .zip(previous_dir.as_ref())
        .is_some_and(|(r, d)| r.owns_saved(d.path()));
    let lock = if clone || owns_saved {
        None
    } else {
        Some(PackageLock::acquire(paths, &opts.package)?)
    };
    // Opened once: the checks, the cache, the verifier and the prepare step
    // all read this one handle (reads are positioned, so it is shared).
    let pkg = Arc::new(Package::open(&opts.package)?);
    // Before anything of the package is used (extracted, cached, run).
    opts.trust.check(pkg.index())?;
    let meta = package_meta::read(&pkg)?;
    for kind in SectionKind::ALL {
        pkg.section(kind)?;
    }
    // Every chunk is checked, so that a damaged package is refused even
    // where the section cache could stand in for it. The check runs beside
    // the engine's start-up and is awaited before the VM is declared live;
    // a package checked before and unchanged since is not checked again.
    let checked = VerifiedPackages::new(&paths.cache);
    let stamp = checked.stamp(&opts.package);
    let background_check = (!opts.verified && !VerifiedPackages::known(stamp.as_deref()))
        .then(|| verify_in_background(pkg.clone(), checked, stamp));
    super::check_host_memory(meta.provenance.memory_mib)?;
    let cache = SectionCache::new(&paths.cache);
    let kernel = cache.get(&pkg, SectionKind::Kernel)?;
    let initramfs = cache.get(&pkg, SectionKind::Initramfs)?;
    let disk = cache.get(&pkg, SectionKind::Disk)?;
    let memory_cache = cache.get(&pkg, SectionKind::Memory)?;
    let image = BootImage {
        kernel: kernel.clone(),
        initramfs: initramfs.clone(),
        cmdline: meta.cmdline.clone(),
        disk,
        source: opts.package.display().to_string(),
        network: meta.network.clone(),
        disk_server: None,
        guest_mac: None,
        gateway_forwards: Vec::new(),
        netboot: false,
    };
    let accel = saved_accel(engine, opts.accel, &image, meta.provenance.accel)?;
    let vm_dir = paths.vms().join(name);
    let (memory_file, memory) = if clone {
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
    let config = VmConfig::saved(
        name,
        &meta.provenance,
        accel.accel,
        opts.console.clone(),
        opts.net.choice(),
    );
    let record = opts.detached.as_ref().map(|d| VmRecord {
        name: name.clone(),
        state: RecordState::Running,
        package: previous
            .map(|r| r.package.clone())
            .unwrap_or(opts.package.clone()),
        clone: previous.map(|r| r.clone).unwrap_or(clone),
        saved: if clone {
            None
        } else {
            Some(opts.package.clone())
        },
        fleet: d.fleet.clone(),
        net: opts.net.clone(),
        accel: accel.accel,
        memory_mib: meta.provenance.memory_mib,
        supervisor_pid: std::process::id(),
        started_unix: now_unix(),
        note: None,
    });
    let resuming = previous.is_some();
    let first_record = record.clone().filter(|_| !resuming);
    let reader = pkg.clone();
    let prepare = move |d: &VmDir| -> Result<(), StartError> {
        // A suspended VM's record keeps saying so until it is live again:
        // if this start fails, it is still suspended.
        if let Some(r) = &first_record {
            r.save(d.path())?;
        }
        reader.extract(
            SectionKind::DeviceState,
            &d.path().join(DEVICE_STATE_IN),
            &mut |_, _| {},
        )?;
        if !clone {
            let t = Instant::now();
            copy_sparse(&memory_cache, &memory_file)?;
            tracing::info!(ms = t.elapsed().as_millis() as u64, "memory copied");
        }
        Ok(())
    };
    let digest = |k: SectionKind| pkg.section(k).map(|s| s.digest.clone());
    let adopt_cache = if clone {
        None
    } else {
        Some(CacheAdoption {
            cache: paths.cache.clone(),
            memory_digest: digest(SectionKind::Memory)?,
            disk_digest: digest(SectionKind::Disk)?,
        })
    };
    let disk_size = pkg.section(SectionKind::Disk)?.size;
    Ok(StartPlan {
        name: name.clone(),
        image,
        config,
        accel,
        how: How::Restore {
            state,
            memory,
            identity: clone.then(|| Identity {
                hostname: name.clone(),
                machine_id: random_hex(16),
            }),
        },
        dir: previous_dir,
        prepare: Some(Box::new(prepare)),
        live_timeout: opts.live_timeout,
        started: opts.started,
        background_check,
        save: SaveInfo {
            meta,
            kernel,
            initramfs,
            base_package: Some(opts.package.clone()),
            private_memory: clone,
            disk_size,
            adopt_cache,
        },
        held: Held { lock, lazy: None },
        record,
    })
}

/// Checks every chunk of `pkg` on a thread of lower priority: the
/// engine's start-up comes first.
/// Remembers a package that passed (`stamp`, taken before the check).
fn verify_in_background(
    pkg: Arc<Package>,
    checked: VerifiedPackages,
    stamp: Option<PathBuf>,
) -> std::thread::JoinHandle<Result<u128, ferry_package::PackageError>> {
    std::thread::spawn(move || {
        // SAFETY: setpriority(2) on the calling thread (who = 0); no
        // memory is involved.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, 10);
        }
        let t = Instant::now();
        pkg.verify(&mut |_, _| {})?;
        if let Some(stamp) = stamp {
            checked.remember(&stamp);
        }
        Ok(t.elapsed().as_millis())
    })
}

/// Copies a file, keeping holes (and sharing blocks where the file system
/// can).
pub(crate) fn copy_sparse(from: &Path, to: &Path) -> Result<(), StartError> {
    let status = std::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .map_err(FileError::at(to))?;
    if status.success() {
        // cp keeps the source's mode: a copy of memory or disk is private.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600))
            .map_err(FileError::at(to))?;
        Ok(())
    } else {
        Err(FileError {
            path: to.to_path_buf(),
            source: std::io::Error::other(format!("cp from {} failed", from.display())),
        }
        .into())
    }
}

/// `n` random bytes as hex.
pub(crate) fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}
