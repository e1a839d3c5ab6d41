//! `ferry peer`: runs a VM that came from a registry or from another peer,
//! and (with `--listen`) hands it on to the next peer by live migration;
//! a cancel suspends it into a local package. The protocol is in
//! `docs/migration-protocol.md`; its destination side is
//! [`crate::start::incoming`], its source side [`crate::owner`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use ferry_engine::{AccelChoice, Engine, LiveLimits};
use ferry_package::TrustedKeys;
use ferry_transport::Token;

use crate::events::{CancelAction, EventSink};
use crate::owner::{own, Outcome, OwnedVm, OwnerOptions};
use crate::start::incoming::IncomingStart;
use crate::start::registry::RegistryStart;
use crate::vm::{ConsoleSink, NetChoice};
use crate::{Cancel, Paths, RuntimeError};

/// Options of `ferry peer`.
pub struct PeerOptions {
    /// `http(s)://…` (a package) or `HOST:PORT` (a peer to migrate from).
    pub from: String,
    /// The VM's name here; the package's recipe (or the source VM's name).
    pub name: Option<String>,
    /// Its network.
    pub net: NetChoice,
    /// Serve the VM to the next peer on this address.
    pub listen: Option<SocketAddr>,
    /// Bearer token for reading from the registry (`--registry-token-file`,
    /// else `--token`).
    pub registry_token: Option<Token>,
    /// TLS settings for an `https://` registry (`--ca`, `--client-cert`,
    /// `--client-key`).
    pub registry_tls: Option<ferry_transport::ClientTls>,
    /// Bearer token for migrating: from the source peer, and of `--listen`
    /// (`--migrate-token-file`, else `--token`).
    pub migrate_token: Option<Token>,
    /// TLS to a `HOST:PORT` source peer (`--ca`, `--client-cert`,
    /// `--client-key`); plain TCP without.
    pub migrate_tls: Option<ferry_transport::ClientTls>,
    /// Serve `--listen` only over TLS (`--tls-cert`, `--tls-key`,
    /// `--client-ca`).
    pub listen_tls: Option<ferry_transport::ServerTlsFiles>,
    /// The keys one of which must have signed a registry's package
    /// (`--trust`); empty: no signature needed.
    pub trust: TrustedKeys,
    /// Accelerator choice (must match the VM's).
    pub accel: AccelChoice,
    /// Where the guest console is copied besides its log.
    pub console: Option<ConsoleSink>,
    /// What to forward to the guest's serial console.
    pub input: Option<Box<dyn std::io::Read + Send>>,
    /// Where a cancel suspends the VM to (default `./<name>.ferry`).
    pub save: Option<PathBuf>,
    /// When the command started.
    pub started: Instant,
    /// Cap on the bandwidth of a migration out, bytes per second.
    pub max_bandwidth: Option<u64>,
}

impl PeerOptions {
    /// Whether the VM comes from a registry (else from a peer).
    pub fn from_registry(&self) -> bool {
        self.from.starts_with("http://") || self.from.starts_with("https://")
    }

    /// Refuses what cannot work, before any network I/O.
    pub fn check(&self) -> Result<(), RuntimeError> {
        if !self.trust.is_empty() && !self.from_registry() {
            return Err(RuntimeError::BadOption(format!(
                "--trust checks packages from a registry; {} is a peer, whose VM comes by live migration with no package to check: drop --trust, or resume the package from its registry",
                self.from
            )));
        }
        if self.listen_tls.is_some() && self.listen.is_none() {
            return Err(RuntimeError::BadOption(
                "--tls-cert serves --listen: add --listen ADDR, or drop --tls-cert".into(),
            ));
        }
        if self.migrate_tls.is_some() && self.from_registry() {
            return Err(RuntimeError::BadOption(
                "TLS to a peer is for a HOST:PORT --from; an https:// registry takes --ca as it is"
                    .into(),
            ));
        }
        if self.listen.is_some() && self.migrate_token.is_none() {
            return Err(RuntimeError::BadOption(
                "--listen needs --migrate-token-file, --token or --token-file: peers never send a VM's memory to an unauthenticated caller".into(),
            ));
        }
        if !self.from_registry() && self.migrate_token.is_none() {
            return Err(RuntimeError::BadOption(format!(
                "migrating from the peer {} needs its token: pass --migrate-token-file, --token or --token-file",
                self.from
            )));
        }
        Ok(())
    }
}

/// Takes the VM (from a registry or a peer) and returns it running here.
pub fn take(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &PeerOptions,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<OwnedVm, RuntimeError> {
    opts.check()?;
    // The listener's files are read before the VM is taken: a bad key
    // fails the command before anything moves.
    owner_options(opts, "check")?;
    if opts.from_registry() {
        Ok(crate::start::registry::start(
            engine,
            paths,
            &RegistryStart {
                url: opts.from.clone(),
                token: opts.registry_token.clone(),
                tls: opts.registry_tls.clone(),
                trust: opts.trust.clone(),
                name: opts.name.clone(),
                accel: opts.accel,
                console: opts.console.clone(),
                net: opts.net.clone(),
                started: opts.started,
            },
            events,
            cancel,
        )?)
    } else {
        Ok(crate::start::incoming::start(
            engine,
            paths,
            &IncomingStart {
                from: opts.from.clone(),
                token: opts.migrate_token.clone().expect("checked"),
                tls: opts.migrate_tls.clone(),
                name: opts.name.clone(),
                accel: opts.accel,
                console: opts.console.clone(),
                net: opts.net.clone(),
                started: opts.started,
            },
            events,
            cancel,
        )?)
    }
}

/// How the owner treats a peer's VM.
///
/// # Errors
/// [`RuntimeError::BadOption`] when the listener's TLS files do not load.
pub fn owner_options(opts: &PeerOptions, name: &str) -> Result<OwnerOptions, RuntimeError> {
    let listen_tls = match &opts.listen_tls {
        Some(files) => Some(
            files
                .load()
                .map_err(|e| RuntimeError::BadOption(e.to_string()))?,
        ),
        None => None,
    };
    Ok(OwnerOptions {
        on_cancel: CancelAction::Suspend,
        save_to: Some(
            opts.save
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{name}.ferry"))),
        ),
        listen: opts.listen.zip(opts.migrate_token.clone()),
        listen_tls,
        limits: LiveLimits {
            max_bandwidth: opts
                .max_bandwidth
                .unwrap_or(LiveLimits::default().max_bandwidth),
            ..LiveLimits::default()
        },
        fleet: None,
    })
}

/// `ferry peer`: takes the VM, runs it, and serves it on `--listen` until
/// it moves on or a cancel suspends it.
pub fn peer(
    engine: &dyn Engine,
    paths: &Paths,
    mut opts: PeerOptions,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<Outcome, RuntimeError> {
    let mut owned = take(engine, paths, &opts, events, cancel)?;
    if let Some(input) = opts.input.take() {
        owned.vm.forward_input(input)?;
    }
    let owner = owner_options(&opts, &owned.name)?;
    own(engine, paths, owned, owner, events)
}
