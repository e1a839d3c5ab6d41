//! Start source: a package on a registry (or any HTTP server with byte
//! ranges), `ferry peer --from http(s)://…`. Kernel, initramfs, memory and
//! device state are fetched whole into the section cache, checked chunk by
//! chunk; the disk is not fetched first: it is served to the engine from a
//! local file that fills chunk by chunk, on demand, then in the background
//! once the service is live.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_engine::{AccelChoice, Engine, SavedState};
use ferry_lazydisk::{LazyDisk, LazyDiskOptions, NbdServer, RemoteSection};
use ferry_package::{SectionKind, TrustedKeys};
use ferry_transport::RemotePackage;

use super::package::DEVICE_STATE_IN;
use super::{saved_accel, How, StartPlan};
use crate::cache::SectionCache;
use crate::error::{FileError, StartError};
use crate::events::{Event, EventSink};
use crate::owner::{Held, OwnedVm, SaveInfo};
use crate::vm::{BootImage, ConsoleSink, NetChoice, RestoreMemory, VmConfig};
use crate::{Cancel, Paths};

/// The lazy disk's file and socket in the VM's directory.
const LAZY_DISK_FILE: &str = "disk-lazy.raw";
const LAZY_DISK_SOCKET: &str = "disk-lazy.sock";

/// Where a VM's lazy disk is served from: kept until after the VM.
pub struct LazyServed {
    pub(crate) disk: Arc<LazyDisk>,
    _server: NbdServer,
}

/// What resuming a remote package is asked for.
#[derive(Clone)]
pub struct RegistryStart {
    /// The package's URL.
    pub url: String,
    /// The registry's token.
    pub token: Option<ferry_transport::Token>,
    /// TLS settings for an `https://` registry (`None`: the public roots).
    pub tls: Option<ferry_transport::ClientTls>,
    /// The keys one of which must have signed the package (`--trust`);
    /// empty: no signature needed. (A `#sha256=` pin in the URL is
    /// checked by [`RemotePackage`] itself.)
    pub trust: TrustedKeys,
    /// The VM's name here; the recipe's and a suffix if `None`.
    pub name: Option<String>,
    /// Accelerator choice (it must be the package's).
    pub accel: AccelChoice,
    /// Where the console is copied besides its log.
    pub console: Option<ConsoleSink>,
    /// Its network.
    pub net: NetChoice,
    /// When the operation started.
    pub started: Instant,
}

/// Where the prepare step leaves the lazy disk it serves.
pub type LazySlot = Arc<Mutex<Option<LazyServed>>>;

/// Fetches what must be here before the VM starts, and plans its start;
/// the lazy disk lands in the slot once the plan's prepare step ran.
pub fn plan(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &RegistryStart,
    events: &dyn EventSink,
) -> Result<(StartPlan<'static>, LazySlot), StartError> {
    let remote = Arc::new(RemotePackage::open_with(
        &opts.url,
        opts.token.as_ref().map(|t| t.expose()),
        opts.tls.as_ref(),
    )?);
    // Against the table just read, before any section is fetched.
    opts.trust.check(remote.index())?;
    let meta = remote.vm_meta()?;
    super::check_host_memory(meta.provenance.memory_mib)?;
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| crate::vmdir::generate_name(&meta.recipe));
    crate::vmdir::validate_name(&name)?;
    let cache = SectionCache::new(&paths.cache);
    let fetched = |kind: SectionKind| -> Result<PathBuf, StartError> {
        let mut last = Instant::now();
        cache.get_remote(&remote, kind, &mut |done, total| {
            if last.elapsed() > Duration::from_secs(1) {
                last = Instant::now();
                events.emit(Event::Progress {
                    what: format!("fetching {kind}"),
                    done,
                    total,
                });
            }
        })
    };
    let kernel = fetched(SectionKind::Kernel)?;
    let initramfs = fetched(SectionKind::Initramfs)?;
    let memory = fetched(SectionKind::Memory)?;
    let device_state = fetched(SectionKind::DeviceState)?;
    events.emit(Event::Fetched {
        from: opts.url.clone(),
        bytes: remote.bytes_fetched(),
    });
    let vm_dir = paths.vms().join(&name);
    let disk_socket = vm_dir.join(LAZY_DISK_SOCKET);
    let image = BootImage {
        kernel: kernel.clone(),
        initramfs: initramfs.clone(),
        cmdline: meta.cmdline.clone(),
        disk: PathBuf::new(),
        source: opts.url.clone(),
        network: meta.network.clone(),
        disk_server: Some(disk_socket.clone()),
        guest_mac: None,
        gateway_forwards: Vec::new(),
        netboot: false,
    };
    let accel = saved_accel(engine, opts.accel, &image, meta.provenance.accel)?;
    let config = VmConfig::saved(
        &name,
        &meta.provenance,
        accel.accel,
        opts.console.clone(),
        opts.net.clone(),
    );
    // The VM owns a copy of the memory (holes kept), mapped shared, so
    // that suspending it again writes no second copy.
    let memory_file = vm_dir.join(crate::vmdir::files::MEMORY);
    let state = SavedState {
        device_state: vm_dir.join(DEVICE_STATE_IN),
        memory_file: Some(memory_file.clone()),
        provenance: meta.provenance.clone(),
    };
    let disk_size = remote.section(SectionKind::Disk)?.size;
    let served: LazySlot = Arc::default();
    let slot = served.clone();
    let prepare = move |d: &crate::vmdir::VmDir| -> Result<(), StartError> {
        std::fs::copy(&device_state, d.path().join(DEVICE_STATE_IN))
            .map_err(FileError::at(d.path().join(DEVICE_STATE_IN)))?;
        super::package::copy_sparse(&memory, &memory_file)?;
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
        *slot.lock().expect("lazy slot") = Some(LazyServed {
            disk,
            _server: server,
        });
        Ok(())
    };
    let plan = StartPlan {
        name: name.clone(),
        image,
        config,
        accel,
        how: How::Restore {
            state,
            memory: RestoreMemory::Shared,
            identity: None,
        },
        dir: None,
        prepare: Some(Box::new(prepare)),
        live_timeout: Duration::from_secs(60),
        started: opts.started,
        background_check: None,
        save: SaveInfo {
            meta,
            kernel,
            initramfs,
            base_package: None,
            private_memory: false,
            disk_size,
            adopt_cache: None,
        },
        // The lazy disk joins it once the prepare step has run.
        held: Held::default(),
        record: None,
    };
    Ok((plan, served))
}

/// Resumes the package at `opts.url` and returns the live VM; its disk
/// goes on filling in the background.
pub fn start(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &RegistryStart,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<OwnedVm, StartError> {
    let (plan, slot) = plan(engine, paths, opts, events)?;
    let mut owned = super::execute(engine, paths, plan, events, cancel)?;
    let lazy = slot
        .lock()
        .expect("lazy slot")
        .take()
        .ok_or_else(|| StartError::Internal("the lazy disk was not set up".into()))?;
    let status = lazy.disk.status();
    events.emit(Event::LazyDisk {
        fetched_bytes: status.bytes_fetched,
        size_bytes: lazy.disk.size(),
    });
    lazy.disk.resume_prefetch();
    owned.held.lazy = Some(lazy);
    Ok(owned)
}
