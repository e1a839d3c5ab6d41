//! Start source: a live migration from another peer (`ferry peer --from
//! HOST:PORT`), the destination side of `docs/migration-protocol.md`:
//!
//! 1. connect to the source's `--listen` address with the token and get an
//!    *offer*: the VM's metadata, disk size, and the digests of its kernel
//!    and initramfs (fetched only if not cached);
//! 2. start a paused VM that waits for state and disk (the start plan,
//!    [`How::Receive`]), open the two data channels (state, disk) and say
//!    *ready*;
//! 3. the source copies the disk and memory and says *switch*;
//! 4. **commit point**: check that all state arrived, stop serving the
//!    disk, resume the VM and say *committed*.
//!
//! A destination whose source disappears before *switch* removes its
//! half-received VM and fails; the source keeps the VM.

use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::{AccelChoice, Engine};
use ferry_lazydisk::{Export, FileDisk, NbdConnection, NbdOptions};
use ferry_transport::migration::{self, ChannelKind, DestMsg, MigrationError, SourceMsg};

use super::{How, StartPlan};
use crate::error::{FileError, MigrateError, StartError, VmError};
use crate::events::{Event, EventSink};
use crate::owner::{Held, OwnedVm, SaveInfo};
use crate::vm::{BootImage, ConsoleSink, NetChoice, VmConfig};
use crate::{Cancel, Paths};

/// How long a destination waits for *switch* (the whole copy).
const SWITCH_TIMEOUT: Duration = Duration::from_secs(900);

pub use ferry_transport::migration::{Blob, VmOffer};

/// What a migration in is asked for.
#[derive(Clone)]
pub struct IncomingStart {
    /// The source peer, `HOST:PORT`.
    pub from: String,
    /// Its token (the migrate role's).
    pub token: ferry_transport::Token,
    /// TLS to it (`--ca`, `--client-cert`, `--client-key`); plain TCP
    /// without.
    pub tls: Option<ferry_transport::ClientTls>,
    /// The VM's name here; the source's if `None`.
    pub name: Option<String>,
    /// Accelerator choice (it must be the VM's).
    pub accel: AccelChoice,
    /// Where the console is copied besides its log.
    pub console: Option<ConsoleSink>,
    /// Its network.
    pub net: NetChoice,
    /// When the operation started.
    pub started: Instant,
}

/// Takes the VM over from the source peer; returns it running here.
pub fn start(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &IncomingStart,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<OwnedVm, MigrateError> {
    std::thread::scope(|s| receive(s, engine, paths, opts, events, cancel))
}

fn receive<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    engine: &'scope dyn Engine,
    paths: &Paths,
    opts: &IncomingStart,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<OwnedVm, MigrateError> {
    let addr = opts.from.as_str();
    let token = &opts.token;
    let tls = match &opts.tls {
        Some(t) => Some(t.peer().map_err(|e| MigrationError::Tls {
            addr: addr.to_string(),
            detail: e.to_string(),
        })?),
        None => None,
    };
    // The destination's set-up before its engine starts is timed in
    // phases of its own: in the KVM lab a move's destination took 13-17 s
    // to get there (the raw engine's under 2 s), the source's guest
    // starving beside it, and nothing said where the time went.
    let t = Instant::now();
    // The offer comes checked: digests are hex, never paths; sizes agree.
    let (mut control, session, offer) = migration::connect(addr, token, tls.as_ref())?;
    events.emit(super::phase("offer-received", t));
    // The engine learns its version (QEMU's `--version`: the whole
    // emulator starts, seconds on an emulated CPU, when the cache has not
    // remembered it) while the kernel and initramfs arrive; the
    // accelerator's choice needs it. Not before the offer: a connection
    // that brings none costs nothing here.
    let version = scope.spawn(|| engine.version());
    let failed = |detail: String| MigrateError::Failed {
        direction: "from",
        peer: addr.to_string(),
        detail,
    };
    let abort = |control: &mut migration::Control, why: &str| {
        let _ = control.send(&DestMsg::Abort {
            reason: why.to_string(),
        });
    };
    let plan = (|| -> Result<StartPlan<'static>, MigrateError> {
        // Refuse early, before anything is made here.
        super::check_host_memory(offer.meta.provenance.memory_mib)?;
        let name = opts.name.clone().unwrap_or_else(|| offer.name.clone());
        crate::vmdir::validate_name(&name).map_err(StartError::from)?;
        let t = Instant::now();
        let kernel = fetch_blob(&mut control, "kernel", &offer.kernel, &paths.cache)?;
        let initramfs = fetch_blob(&mut control, "initramfs", &offer.initramfs, &paths.cache)?;
        events.emit(super::phase("image-fetched", t));
        let image = BootImage {
            kernel: kernel.clone(),
            initramfs: initramfs.clone(),
            cmdline: offer.meta.cmdline.clone(),
            disk: PathBuf::new(),
            source: format!("peer {addr}"),
            network: offer.meta.network.clone(),
            disk_server: None,
            guest_mac: None,
            gateway_forwards: Vec::new(),
            netboot: false,
        };
        let t = Instant::now();
        let _ = version.join();
        let accel = super::saved_accel(engine, opts.accel, &image, offer.meta.provenance.accel)?;
        events.emit(super::phase("accel-chosen", t));
        let config = VmConfig::saved(
            &name,
            &offer.meta.provenance,
            accel.accel,
            opts.console.clone(),
            opts.net.clone(),
        );
        Ok(StartPlan {
            name,
            image,
            config,
            accel,
            how: How::Receive {
                provenance: offer.meta.provenance.clone(),
                disk_size: offer.disk_size,
            },
            dir: None,
            prepare: None,
            live_timeout: Duration::from_secs(60),
            started: opts.started,
            background_check: None,
            save: SaveInfo {
                meta: offer.meta.clone(),
                kernel,
                initramfs,
                base_package: None,
                // Received into anonymous memory (see `StartKind::Receive`).
                private_memory: true,
                disk_size: offer.disk_size,
                adopt_cache: None,
            },
            held: Held::default(),
            record: None,
        })
    })();
    let owned = plan.and_then(|plan| Ok(super::execute(engine, paths, plan, events, cancel)?));
    let mut owned = match owned {
        Ok(o) => o,
        Err(e) => {
            abort(&mut control, &e.to_string());
            return Err(e);
        }
    };
    let received_disk = owned.vm.received_disk();
    let channel = |kind| migration::open_channel(addr, token, tls.as_ref(), &session, kind);
    // The state's connection goes to the engine itself when it is plain
    // (`migration::attach`). The disk's is served here, by ferry's own NBD
    // server writing the disk file: QEMU's server takes clients only from
    // a listening socket, so the peer's connection reached it through a
    // relay, which doubled the disk copy in the KVM lab (bench/README.md).
    let channels = (|| -> Result<_, MigrateError> {
        let (fd, state) = migration::attach(channel(ChannelKind::State)?)?;
        owned.vm.engine_vm().receive_state(fd).map_err(|e| {
            failed(format!(
                "the engine could not take the state's connection: {e}"
            ))
        })?;
        let (fd, disk) = migration::attach(channel(ChannelKind::Disk)?)?;
        let server = serve_disk(&received_disk, fd, disk.is_direct()).map_err(failed)?;
        Ok((state, disk, server))
    })();
    let (_state, _disk, disk_server) = match channels {
        Ok(t) => t,
        Err(e) => {
            abort(&mut control, &e.to_string());
            return Err(e);
        }
    };
    control.send(&DestMsg::Ready)?;
    let ready = Instant::now();
    events.emit(Event::Receiving {
        name: offer.name.clone(),
        from: addr.to_string(),
    });
    let stats = loop {
        match control.recv::<SourceMsg>(Some(Duration::from_millis(500))) {
            Ok(SourceMsg::Switch { stats }) => break stats,
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
                if owned.vm.poll_cancel().inspect_err(|_| {
                    abort(&mut control, "the receiving VM died");
                })? {
                    abort(&mut control, "interrupted on the destination");
                    return Err(VmError::Interrupted.into());
                }
                if ready.elapsed() > SWITCH_TIMEOUT {
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
    events.emit(Event::Switching {
        name: owned.name.clone(),
    });
    // The source has cut its clients: those that come here now wait in
    // the dial for the guest, which runs within the switch.
    owned.vm.admit_clients();
    // The commit point: check, stop serving the disk, resume.
    let switch = Instant::now();
    let commit = (|| -> Result<(), ferry_engine::EngineError> {
        let e = owned.vm.engine_vm();
        let t = Instant::now();
        e.wait_received(Duration::from_secs(30))?;
        events.emit(super::phase("state-received", t));
        let t = Instant::now();
        // Requests read are answered, then the sender's connection (idle:
        // its copy is finished) is cut, and nothing else writes the disk.
        disk_server.stop();
        events.emit(super::phase("disk-export-ended", t));
        let t = Instant::now();
        e.resume()?;
        events.emit(super::phase("engine-resumed", t));
        Ok(())
    })();
    if let Err(e) = commit {
        abort(&mut control, &e.to_string());
        return Err(failed(format!("{e}; told the source to keep the VM")));
    }
    let switch_ms = switch.elapsed().as_millis() as u64;
    let _ = control.send(&DestMsg::Committed);
    owned.vm.mark("running");
    // The guest's clock stood still while it was paused: it catches up in
    // the background.
    let _ = owned.vm.after_short_pause();
    events.emit(Event::MigratedIn {
        name: offer.name.clone(),
        from: addr.to_string(),
        ms: ready.elapsed().as_millis() as u64,
        downtime_ms: stats.downtime_ms,
        switch_ms,
    });
    super::emit_network(&owned.vm, events);
    events.emit(Event::Live {
        name: owned.name.clone(),
        ms: opts.started.elapsed().as_millis() as u64,
    });
    Ok(owned)
}

/// Serves the disk file `path` to the sender's engine on the disk's
/// channel, `fd` (the peer's TCP connection when `direct`, else the end of
/// a socket pair a TLS tunnel carries), as NBD export
/// [`ferry_engine::DISK_EXPORT_NAME`].
fn serve_disk(path: &Path, fd: OwnedFd, direct: bool) -> Result<NbdConnection, String> {
    let disk = FileDisk::open(path).map_err(|e| format!("cannot open the disk to receive: {e}"))?;
    let options = NbdOptions {
        export_name: ferry_engine::DISK_EXPORT_NAME.into(),
        ..NbdOptions::default()
    };
    let disk: Arc<dyn Export> = Arc::new(disk);
    let served = if direct {
        NbdConnection::serve(TcpStream::from(fd), disk, options)
    } else {
        NbdConnection::serve(UnixStream::from(fd), disk, options)
    };
    served.map_err(|e| format!("cannot serve the disk to receive: {e}"))
}

/// A file from the offer, from the blob cache (`<cache>/blobs`) or
/// fetched from the source. `blob.sha256` is 64 lowercase hex digits
/// ([`VmOffer::validate`]), so the cache path stays in the blob directory;
/// the source must send exactly the offered size, and what does not arrive
/// whole and right is removed. What arrives is hashed as it is written, and
/// its digest remembered ([`ferry_engine::memo`]): the accelerator's choice
/// that follows keys its verdict by the kernel's digest and does not read
/// the kernel again.
fn fetch_blob(
    control: &mut migration::Control,
    name: &str,
    blob: &Blob,
    cache: &Path,
) -> Result<PathBuf, MigrateError> {
    if let Some(path) = cached_blob(cache, blob) {
        return Ok(path);
    }
    let dir = cache.join("blobs");
    let path = dir.join(&blob.sha256);
    crate::paths::private_dir(&dir).map_err(FileError::at(&dir))?;
    control.send(&DestMsg::Fetch {
        name: name.to_string(),
    })?;
    let len = match control.recv::<SourceMsg>(Some(Duration::from_secs(60)))? {
        SourceMsg::Blob { name: sent, len } if sent == name => len,
        other => {
            return Err(MigrationError::Protocol(format!("expected {name}, got {other:?}")).into())
        }
    };
    if len != blob.size {
        return Err(MigrationError::Protocol(format!(
            "the source offered a {name} of {} bytes and sends {len}",
            blob.size
        ))
        .into());
    }
    let part = path.with_extension(format!("part-{}", std::process::id()));
    let digest = hex::encode(control.recv_blob_into(len, &part)?);
    if digest != blob.sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(MigrationError::Protocol(format!(
            "the {name} received does not match its sha256"
        ))
        .into());
    }
    std::fs::rename(&part, &path).map_err(FileError::at(&path))?;
    ferry_engine::memo::remember_sha256(cache, &path, &digest);
    Ok(path)
}

/// The offered blob, if the blob cache has it. A blob there is named by
/// its digest, checked when it was put there, so its digest is remembered
/// from the name when no memo holds it (the memo was pruned, or the blob
/// was laid there by hand): the accelerator's choice would otherwise read
/// the whole kernel again, seconds of CPU in the KVM lab beside the
/// source's guest.
fn cached_blob(cache: &Path, blob: &Blob) -> Option<PathBuf> {
    let dir = cache.join("blobs");
    let path = dir.join(&blob.sha256);
    debug_assert_eq!(path.parent(), Some(dir.as_path()));
    if !path.is_file() {
        return None;
    }
    ferry_engine::memo::remember_sha256(cache, &path, &blob.sha256);
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_blob_is_known_by_its_name() {
        let cache = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(cache.path().join("blobs")).unwrap();
        // Named by a digest that is not its content's: only a memo made
        // from the name can give it back.
        let named = "ab".repeat(32);
        let path = cache.path().join("blobs").join(&named);
        std::fs::write(&path, b"kernel").unwrap();
        let blob = Blob {
            sha256: named.clone(),
            size: 6,
        };
        assert_eq!(cached_blob(cache.path(), &blob), Some(path.clone()));
        assert_eq!(
            ferry_engine::memo::sha256(cache.path(), &path).unwrap(),
            named
        );
        let absent = Blob {
            sha256: "cd".repeat(32),
            size: 6,
        };
        assert_eq!(cached_blob(cache.path(), &absent), None);
    }
}
