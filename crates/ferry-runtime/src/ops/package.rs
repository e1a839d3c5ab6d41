//! `ferry package`: boots a blueprint, waits for live, and snapshots it
//! into one package file through the one save path.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_blueprint::Blueprint;
use ferry_engine::{AccelChoice, Engine};
use ferry_package::{Package, SecretKey};

use crate::events::{Event, EventSink};
use crate::save::{save, Generation, StateFrom};
use crate::start::{self, blueprint::BlueprintStart};
use crate::vm::{ConsoleSink, NetChoice};
use crate::vmdir::generate_name;
use crate::{Cancel, Paths, RuntimeError};

/// Options of `ferry package`.
#[derive(Clone)]
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
    /// Where the guest console is copied besides its log.
    pub console: Option<ConsoleSink>,
    /// The network the VM is packaged in (what the guest sees is the same
    /// in every namespace, so this does not change the package).
    pub net: NetChoice,
    /// Sign the package with this key (`--sign`).
    pub sign: Option<SecretKey>,
}

/// What `ferry package` made.
#[derive(Debug, Clone, PartialEq)]
pub struct Packaged {
    /// The package file.
    pub path: PathBuf,
    /// From the start to the package written.
    pub ms: u64,
    /// Its size.
    pub file_bytes: u64,
    /// The guest's memory.
    pub memory_mib: u64,
}

/// `ferry package`.
pub fn package(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &PackageOptions,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<Packaged, RuntimeError> {
    let started = Instant::now();
    let recipe = Blueprint::load(&opts.blueprint)?.manifest.recipe;
    let plan = start::blueprint::plan(
        engine,
        paths,
        &BlueprintStart {
            blueprint: opts.blueprint.clone(),
            name: generate_name(&format!("pkg-{recipe}")),
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            accel: opts.accel,
            console: opts.console.clone(),
            live_timeout: opts.live_timeout,
            net: opts.net.clone(),
            started,
        },
    )?;
    let mut owned = start::execute(engine, paths, plan, events, cancel)?;
    let memory_mib = owned.vm.status().memory_mib;
    events.emit(Event::Snapshotting {
        ms: started.elapsed().as_millis() as u64,
    });
    save(
        engine,
        &mut owned,
        &opts.out,
        StateFrom::Engine,
        Generation::First,
        opts.sign.as_ref(),
        events,
    )?;
    drop(owned);
    let packaged = Packaged {
        path: opts.out.clone(),
        ms: started.elapsed().as_millis() as u64,
        file_bytes: Package::open(&opts.out)?.file_size(),
        memory_mib,
    };
    events.emit(Event::Packaged {
        path: packaged.path.clone(),
        ms: packaged.ms,
        file_bytes: packaged.file_bytes,
        memory_mib,
    });
    Ok(packaged)
}
