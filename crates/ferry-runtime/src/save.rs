//! The one save path: every package ferry writes from a VM goes through
//! [`save`] — `ferry package`'s first snapshot, Ctrl-C on `ferry run` or
//! `ferry peer`, `ferry stop` of a detached VM, a clone saved into a
//! package of its own, and a VM left in doubt by a migration, saved
//! without its guest being asked (it is paused, and cut off first).
//!
//! A save writes a whole new package beside the target, copying every
//! unchanged chunk verbatim from the package the VM came from, and renames
//! it into place: at every instant the target is either the old or the new
//! package. A save that fails leaves the old package as it was; the owner
//! then resumes the VM (or, in doubt, leaves it paused).
//!
//! ```text
//!  quiesce guest ──────────────────────┐
//!  (or, in doubt: cut off, reclaim) ────┴▶ save device state ─▶ export disk ─▶ write sections ─▶ commit (rename)
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_agent_proto::Request;
use ferry_engine::{Engine, Provenance};
use ferry_package::{Package, PackageWriter, SecretKey, SectionKind, DEFAULT_CHUNK_SIZE};

use crate::error::VmError;
use crate::events::{Event, EventSink};
use crate::owner::OwnedVm;
use crate::package_meta::PackageMeta;
use crate::vm::RunningVm;
use crate::vmdir::files;

/// The saved device state written into a VM's directory.
pub(crate) const DEVICE_STATE_OUT: &str = "device-state";
/// The disk exported for a save, in the VM's directory.
pub(crate) const DISK_EXPORT: &str = "disk.raw";

/// Where a save takes the VM's running state from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFrom {
    /// The engine saves it now (the guest is quiesced and paused first).
    Engine,
    /// The engine saves it now, from a VM paused after its state was sent
    /// to a peer that may or may not run it (in doubt). Its guest is cut
    /// off from the network, then runs for the moment the engine needs to
    /// be able to save it again ([`ferry_engine::Vm::reclaim_sent`]); it
    /// is not asked to quiesce, which would run it for longer.
    ///
    /// Before, the source kept a copy of the stream it sent and saved
    /// that, so its guest never ran again. Making the copy put ferry's
    /// tunnel in the path of every byte of every move, for the rare move
    /// left in doubt: in the KVM lab its copies took 2.1-2.4 s to meet
    /// their downtime limit against 0.2-0.4 s without it.
    AfterSend,
}

/// Which generation the new package is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// The first snapshot (`ferry package`).
    First,
    /// One more than the package the VM came from.
    Next,
}

/// Why a save failed. Whatever it says, the old package is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The package's directory cannot take a new file (a read-only mount,
    /// no permission), found before the guest is paused.
    #[error("{dir}: {source}")]
    NotWritable {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The guest did not quiesce (its agent did not answer).
    #[error("the guest did not get ready to be saved: {0}")]
    Quiesce(VmError),
    /// The engine could not save the state or export the disk.
    #[error(transparent)]
    Engine(#[from] ferry_engine::EngineError),
    /// Reading the old package or writing the new one failed (e.g. the
    /// disk is full).
    #[error(transparent)]
    Package(#[from] ferry_package::PackageError),
    /// A VM in doubt after a migration that the engine could not take
    /// back to save.
    #[error("VM '{name}' is in doubt after its migration and cannot be saved here ({detail}); it stays paused: ask the destination whether it runs the VM")]
    InDoubtUnsaved {
        /// The VM.
        name: String,
        /// Why it cannot be saved.
        detail: String,
    },
    /// Another file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl SaveError {
    /// The class of this failure: a save fails because of the host (disk,
    /// permissions), the guest, or a migration left in doubt; never
    /// because of what the user typed.
    pub fn exit_class(&self) -> crate::ExitClass {
        match self {
            SaveError::Quiesce(e) => e.exit_class(),
            SaveError::Engine(e) => crate::error::engine_class(e),
            SaveError::InDoubtUnsaved { .. } => crate::ExitClass::Migration,
            SaveError::NotWritable { .. } | SaveError::Package(_) | SaveError::Io { .. } => {
                crate::ExitClass::Other
            }
        }
    }
}

/// Saves `owned` into `target` (signed with `sign`, if given) and returns
/// the new package's metadata. Leaves the VM paused; on error the old
/// package is unchanged.
pub fn save(
    engine: &dyn Engine,
    owned: &mut OwnedVm,
    target: &Path,
    from: StateFrom,
    generation: Generation,
    sign: Option<&SecretKey>,
    events: &dyn EventSink,
) -> Result<PackageMeta, SaveError> {
    check_writable(target)?;
    let dir = owned.vm.dir().path().to_path_buf();
    let provenance = match from {
        StateFrom::Engine => quiesce_and_save(&mut owned.vm, engine, events)?,
        StateFrom::AfterSend => reclaim_and_save(owned, engine, events)?,
    };
    // A clone that never suspended maps its memory privately, and a VM
    // received from a peer has anonymous memory: its changed pages are in
    // no file, so RAM goes into the device state and the memory section is
    // all holes, of the guest's size.
    let memory_in_state = owned.save.private_memory;
    if owned.save.private_memory {
        let path = dir.join(files::MEMORY);
        crate::paths::private_file(&path)
            .and_then(|f| f.set_len(provenance.memory_bytes()))
            .map_err(|source| SaveError::Io {
                path: path.clone(),
                source,
            })?;
    }
    let meta = PackageMeta {
        ferry_version: env!("CARGO_PKG_VERSION").into(),
        written_unix: now_unix(),
        generation: match generation {
            Generation::First => 0,
            Generation::Next => owned.save.meta.generation + 1,
        },
        provenance,
        memory_in_state,
        ..owned.save.meta.clone()
    };
    let old = match &owned.save.base_package {
        Some(p) if p.exists() => Some(Package::open(p)?),
        _ => None,
    };
    write_package(
        &mut owned.vm,
        target,
        &meta,
        Inputs {
            kernel: &owned.save.kernel,
            initramfs: &owned.save.initramfs,
            old: old.as_ref(),
            sign,
        },
        events,
    )?;
    adopt_into_cache(owned, target);
    Ok(meta)
}

/// Quiesces the guest and saves its device state; returns the provenance
/// to record. Leaves the VM paused.
fn quiesce_and_save(
    vm: &mut RunningVm,
    engine: &dyn Engine,
    events: &dyn EventSink,
) -> Result<Provenance, SaveError> {
    let t = Instant::now();
    vm.agent()
        .request(
            &Request::BeforeSuspend { drop_caches: true },
            Duration::from_secs(60),
        )
        .map_err(SaveError::Quiesce)?;
    events.emit(phase("quiesced", t));
    save_device_state(vm, engine, events)
}

/// Has the engine save the paused VM's device state into its directory;
/// returns the provenance to record.
fn save_device_state(
    vm: &mut RunningVm,
    engine: &dyn Engine,
    events: &dyn EventSink,
) -> Result<Provenance, SaveError> {
    let t = Instant::now();
    let dir = vm.dir().path().to_path_buf();
    let state = vm.engine_vm().save_state(&dir.join(DEVICE_STATE_OUT))?;
    events.emit(phase("state-saved", t));
    let mut provenance = state.provenance;
    provenance.engine = engine.name().to_string();
    Ok(provenance)
}

/// Saves the device state of a VM paused after its move was left in doubt
/// (see [`StateFrom::AfterSend`]); returns the provenance to record.
fn reclaim_and_save(
    owned: &mut OwnedVm,
    engine: &dyn Engine,
    events: &dyn EventSink,
) -> Result<Provenance, SaveError> {
    let unsaved = |detail: String| SaveError::InDoubtUnsaved {
        name: owned.name.clone(),
        detail,
    };
    let t = Instant::now();
    // Its other copy may be running: nothing this one sends while it runs
    // may reach anyone. Without a network there is no one to reach.
    owned
        .vm
        .silence_guest()
        .map_err(|e| unsaved(format!("cutting it off from its network failed: {e}")))?;
    owned
        .vm
        .engine_vm()
        .reclaim_sent()
        .map_err(|e| unsaved(format!("the engine did not give it back: {e}")))?;
    events.emit(phase("reclaimed", t));
    save_device_state(&mut owned.vm, engine, events)
}

/// What a package is written from besides the VM itself.
struct Inputs<'a> {
    kernel: &'a Path,
    initramfs: &'a Path,
    /// The package the VM came from, whose unchanged chunks are reused.
    old: Option<&'a Package>,
    /// Signs the new package.
    sign: Option<&'a SecretKey>,
}

/// Writes the paused, saved VM into `dest` (beside, then renamed), reusing
/// unchanged chunks of `inputs.old`, signed with `inputs.sign` if given.
fn write_package(
    vm: &mut RunningVm,
    dest: &Path,
    meta: &PackageMeta,
    inputs: Inputs<'_>,
    events: &dyn EventSink,
) -> Result<(), SaveError> {
    let Inputs {
        kernel,
        initramfs,
        old,
        sign,
    } = inputs;
    let dir = vm.dir().path().to_path_buf();
    let disk = dir.join(DISK_EXPORT);
    let t = Instant::now();
    vm.engine_vm().export_disk(&disk)?;
    events.emit(phase("disk-exported", t));
    let mut writer = PackageWriter::create(dest)?;
    let config = serde_json::to_vec_pretty(meta).expect("metadata serialises");
    writer.add_bytes(SectionKind::Config, &config)?;
    let sections = [
        (SectionKind::DeviceState, dir.join(DEVICE_STATE_OUT)),
        (SectionKind::Memory, dir.join(files::MEMORY)),
        (SectionKind::Kernel, kernel.to_path_buf()),
        (SectionKind::Initramfs, initramfs.to_path_buf()),
        (SectionKind::Disk, disk.clone()),
    ];
    for (kind, path) in sections {
        let t = Instant::now();
        let mut last = Instant::now();
        writer.add_file(kind, &path, DEFAULT_CHUNK_SIZE, old, &mut |done, total| {
            if last.elapsed() > Duration::from_secs(1) {
                last = Instant::now();
                events.emit(Event::Progress {
                    what: format!("writing {kind}"),
                    done,
                    total,
                });
            }
        })?;
        events.emit(phase(&format!("{kind}-written"), t));
    }
    let t = Instant::now();
    if let Some(key) = sign {
        writer.sign_with(key.clone());
    }
    writer.commit(meta)?;
    events.emit(phase("committed", t));
    Ok(())
}

/// A VM that runs from a memory file of its own and a disk extracted from
/// its package (`ferry run` without `--clone`) leaves exactly the new
/// package's sections in its directory: they become the section cache's
/// entries, so that the next run starts warm, and the old contents' go.
fn adopt_into_cache(owned: &OwnedVm, target: &Path) {
    let Some(adopt) = &owned.save.adopt_cache else {
        return;
    };
    let Ok(new) = Package::open(target) else {
        return;
    };
    let dir = owned.vm.dir().path();
    let cache = crate::cache::SectionCache::new(&adopt.cache);
    for (kind, file, old) in [
        (
            SectionKind::Memory,
            dir.join(files::MEMORY),
            &adopt.memory_digest,
        ),
        (SectionKind::Disk, dir.join(DISK_EXPORT), &adopt.disk_digest),
    ] {
        let Ok(now) = new.section(kind) else {
            continue;
        };
        if *old != now.digest {
            cache.adopt(kind, &now.digest, &file);
            cache.forget(kind, old);
        }
    }
}

/// What [`adopt_into_cache`] needs: the cache and the digests the VM's
/// files had when it started.
#[derive(Debug, Clone)]
pub struct CacheAdoption {
    /// `$FERRY_CACHE`.
    pub cache: PathBuf,
    /// The memory section's digest at the start.
    pub memory_digest: String,
    /// The disk section's digest at the start.
    pub disk_digest: String,
}

/// Fails early, before the guest is paused, if the package's directory
/// cannot take a new file (e.g. a read-only mount).
pub(crate) fn check_writable(path: &Path) -> Result<(), SaveError> {
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
        Err(e) => Err(SaveError::NotWritable {
            dir: dir.to_path_buf(),
            source: e,
        }),
    }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn phase(name: &str, since: Instant) -> Event {
    Event::Phase {
        phase: name.into(),
        ms: since.elapsed().as_millis() as u64,
    }
}
