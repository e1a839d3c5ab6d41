//! `ferry boot`: cold-boots a blueprint (or a node's boot data from a boot
//! service, `--from-bss`), waits for its service, then either shuts down
//! (`exit_when_live`) or runs until the caller cancels, then shuts the
//! guest down cleanly.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_blueprint::Blueprint;
use ferry_engine::{AccelChoice, Engine};

use crate::events::{CancelAction, EventSink};
use crate::owner::{own, Outcome, OwnerOptions};
use crate::start::{self, blueprint::BlueprintStart, bss::BssStart};
use crate::vm::{ConsoleSink, NetChoice};
use crate::vmdir::generate_name;
use crate::{Cancel, Paths, RuntimeError};

/// What `ferry boot` boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSource {
    /// A blueprint directory (`--blueprint`).
    Blueprint(PathBuf),
    /// The boot data a boot service has for a MAC (`--from-bss URL --mac
    /// MAC`).
    Bss {
        /// The service's base URL.
        url: String,
        /// The node's MAC, also the guest NIC's.
        mac: String,
        /// Through the NIC's firmware (DHCP, iPXE, the boot script) on a PC
        /// machine, as a bare-metal node netboots (`--netboot`).
        netboot: bool,
        /// TLS for an `https://` service (`--ca`, a client certificate).
        tls: Option<ferry_transport::ClientTls>,
    },
}

/// Options of `ferry boot`.
#[derive(Clone)]
pub struct BootOptions {
    /// What it boots.
    pub source: BootSource,
    /// The VM's name; generated if `None`.
    pub name: Option<String>,
    /// Guest memory; the blueprint's default if `None`.
    pub memory_mib: Option<u64>,
    /// vCPUs; the blueprint's default if `None`.
    pub cpus: Option<u32>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Shut down as soon as the service is live.
    pub exit_when_live: bool,
    /// How long to wait for live; the blueprint's if `None`.
    pub live_timeout: Option<Duration>,
    /// Where the guest console is copied besides its log.
    pub console: Option<ConsoleSink>,
    /// When the command started, for the `live` event's figure.
    pub started: Instant,
    /// Its network.
    pub net: NetChoice,
}

/// `ferry boot`.
pub fn boot(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &BootOptions,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<Outcome, RuntimeError> {
    let plan = match &opts.source {
        BootSource::Blueprint(blueprint) => start::blueprint::plan(
            engine,
            paths,
            &BlueprintStart {
                blueprint: blueprint.clone(),
                name: match &opts.name {
                    Some(n) => n.clone(),
                    None => generate_name(&Blueprint::load(blueprint)?.manifest.recipe),
                },
                memory_mib: opts.memory_mib,
                cpus: opts.cpus,
                accel: opts.accel,
                console: opts.console.clone(),
                live_timeout: opts.live_timeout,
                net: opts.net.clone(),
                started: opts.started,
            },
        )?,
        BootSource::Bss {
            url,
            mac,
            netboot,
            tls,
        } => start::bss::plan(
            engine,
            paths,
            &BssStart {
                url: url.clone(),
                mac: mac.clone(),
                tls: tls.clone(),
                name: opts.name.clone().unwrap_or_else(|| generate_name("node")),
                memory_mib: opts.memory_mib,
                cpus: opts.cpus,
                accel: opts.accel,
                console: opts.console.clone(),
                live_timeout: opts.live_timeout,
                net: opts.net.clone(),
                started: opts.started,
                netboot: *netboot,
            },
            events,
        )?,
    };
    let mut owned = start::execute(engine, paths, plan, events, cancel)?;
    if opts.exit_when_live {
        owned.vm.shutdown_guest()?;
        return Ok(Outcome::ShutDown);
    }
    own(
        engine,
        paths,
        owned,
        OwnerOptions {
            on_cancel: CancelAction::Shutdown,
            ..OwnerOptions::default()
        },
        events,
    )
}
