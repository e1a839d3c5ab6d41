//! Start source: a cold boot of a blueprint (`ferry boot`, `ferry package`).

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_blueprint::Blueprint;
use ferry_engine::{AccelChoice, Engine, Provenance};

use super::{How, StartPlan};
use crate::error::StartError;
use crate::owner::{Held, SaveInfo};
use crate::package_meta::PackageMeta;
use crate::vm::{BootImage, ConsoleSink, NetChoice, VmConfig};
use crate::Paths;

/// What a cold boot is asked for.
#[derive(Clone)]
pub struct BlueprintStart {
    /// The blueprint directory.
    pub blueprint: std::path::PathBuf,
    /// The VM's name.
    pub name: String,
    /// Guest memory; the blueprint's default if `None`.
    pub memory_mib: Option<u64>,
    /// vCPUs; the blueprint's default if `None`.
    pub cpus: Option<u32>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Where the console is copied besides its log.
    pub console: Option<ConsoleSink>,
    /// How long to wait for live; the blueprint's if `None`.
    pub live_timeout: Option<Duration>,
    /// Its network.
    pub net: NetChoice,
    /// When the operation started.
    pub started: Instant,
}

/// The plan of a cold boot: the blueprint checked, the VM sized, the
/// accelerator chosen.
pub fn plan(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &BlueprintStart,
) -> Result<StartPlan<'static>, StartError> {
    let blueprint = load_verified(paths, &opts.blueprint)?;
    let m = &blueprint.manifest;
    let (memory_mib, cpus) = size(&blueprint, opts.memory_mib, opts.cpus)?;
    crate::vmdir::validate_name(&opts.name)?;
    let image = BootImage::from(&blueprint);
    let accel = engine.choose_accel(opts.accel, &image.probe())?;
    let config = VmConfig {
        name: opts.name.clone(),
        memory_mib,
        cpus,
        accel: accel.accel,
        console: opts.console.clone(),
        net: opts.net.clone(),
    };
    // What the first package of this VM will say; the save path fills in
    // what the engine reports when it saves.
    let meta = PackageMeta {
        ferry_version: env!("CARGO_PKG_VERSION").into(),
        written_unix: 0,
        generation: 0,
        provenance: Provenance {
            engine: engine.name().to_string(),
            engine_version: String::new(),
            cpu_model: String::new(),
            accel: accel.accel,
            memory_mib,
            memory_extra_kib: 0,
            shell_port: true,
            cpus,
        },
        recipe: m.recipe.clone(),
        cmdline: m.cmdline.clone(),
        network: m.network.clone(),
        liveness: m.liveness.clone(),
        memory_in_state: false,
    };
    let disk_size = std::fs::metadata(blueprint.disk())
        .map(|d| d.len())
        .unwrap_or(0);
    Ok(StartPlan {
        name: opts.name.clone(),
        save: SaveInfo {
            meta,
            kernel: blueprint.kernel(),
            initramfs: blueprint.initramfs(),
            base_package: None,
            private_memory: false,
            disk_size,
            adopt_cache: None,
        },
        image,
        config,
        accel,
        how: How::Boot,
        dir: None,
        prepare: None,
        live_timeout: opts
            .live_timeout
            .unwrap_or(Duration::from_secs(m.live_timeout_s)),
        started: opts.started,
        background_check: None,
        held: Held::default(),
        record: None,
    })
}

/// Loads a blueprint and checks its files against their sha256 sums (a
/// file unchanged since its last check is not hashed again).
pub fn load_verified(paths: &Paths, dir: &Path) -> Result<Blueprint, StartError> {
    let blueprint = Blueprint::load(dir)?;
    blueprint.verify(Some(&paths.cache))?;
    Ok(blueprint)
}

/// The memory and vCPUs a VM of `blueprint` gets: the user's choice or the
/// blueprint's default, checked against the recipe's minimum.
pub fn size(
    blueprint: &Blueprint,
    memory_mib: Option<u64>,
    cpus: Option<u32>,
) -> Result<(u64, u32), StartError> {
    let d = &blueprint.manifest.defaults;
    let memory_mib = memory_mib.unwrap_or(d.memory_mib);
    if memory_mib < d.min_memory_mib {
        return Err(StartError::MemoryTooSmall {
            asked: memory_mib,
            min: d.min_memory_mib,
            recipe: blueprint.manifest.recipe.clone(),
        });
    }
    let cpus = cpus.unwrap_or(d.cpus);
    if cpus == 0 || cpus > 64 {
        return Err(StartError::CpusOutOfRange(cpus));
    }
    Ok((memory_mib, cpus))
}
