//! `ferry run`: resumes a package; a cancel suspends it back into the
//! package (or, for a clone, discards it).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_engine::{AccelChoice, Engine};
use ferry_package::{Package, TrustedKeys};

use crate::events::{CancelAction, EventSink};
use crate::owner::{own, Outcome, OwnerOptions};
use crate::record::NetSpec;
use crate::start::{self, package::Mode, package::PackageStart};
use crate::vm::{ConsoleSink, NetChoice};
use crate::vmdir::generate_name;
use crate::{Cancel, Paths, RuntimeError};

/// Options of `ferry run`.
pub struct RunOptions {
    /// The package.
    pub package: PathBuf,
    /// The VM's name; generated if `None`.
    pub name: Option<String>,
    /// Run a copy-on-write clone: no lock, no write-back, a new identity.
    pub clone: bool,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Where the guest console is copied besides its log.
    pub console: Option<ConsoleSink>,
    /// What to forward to the guest's serial console (`--enable-input`).
    pub input: Option<Box<dyn std::io::Read + Send>>,
    /// When the command started, for the events' figures.
    pub started: Instant,
    /// Its network.
    pub net: NetChoice,
    /// The keys one of which must have signed the package (`--trust`).
    pub trust: TrustedKeys,
}

/// `ferry run`.
pub fn run(
    engine: &dyn Engine,
    paths: &Paths,
    opts: RunOptions,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<Outcome, RuntimeError> {
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => {
            let pkg = Package::open(&opts.package)?;
            opts.trust.check(pkg.index())?;
            generate_name(&crate::package_meta::read(&pkg)?.recipe)
        }
    };
    let plan = start::package::plan(
        engine,
        paths,
        PackageStart {
            package: opts.package.clone(),
            name,
            mode: if opts.clone { Mode::Clone } else { Mode::Own },
            accel: opts.accel,
            console: opts.console.clone(),
            net: NetSpec::from_choice(&opts.net),
            live_timeout: Duration::from_secs(60),
            verified: false,
            trust: opts.trust.clone(),
            started: opts.started,
            detached: None,
        },
    )?;
    let mut owned = start::execute(engine, paths, plan, events, cancel)?;
    if let Some(input) = opts.input {
        owned.vm.forward_input(input)?;
    }
    own(
        engine,
        paths,
        owned,
        OwnerOptions {
            on_cancel: if opts.clone {
                CancelAction::Discard
            } else {
                CancelAction::Suspend
            },
            save_to: (!opts.clone).then(|| opts.package.clone()),
            ..OwnerOptions::default()
        },
        events,
    )
}
