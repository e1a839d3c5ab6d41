//! What can go wrong running VMs, one error type per operation, and the
//! class of each failure ([`ExitClass`]), which the `ferry` binary turns
//! into its exit code. The mapping lives here, beside the errors, so that
//! every caller (the CLI, a daemon, a detached supervisor) classifies a
//! failure the same way, and each variant maps to exactly one class (or
//! passes on the class of the error it wraps). An internal failure is
//! `Internal`, never "bad input".
//!
//! | operation | error |
//! |---|---|
//! | naming and finding a VM ([`crate::vmdir`]) | [`NameError`] |
//! | a running VM: engine, agent, control socket ([`crate::vm`]) | [`VmError`] |
//! | the start pipeline ([`crate::start`], [`crate::detach`]) | [`StartError`] |
//! | the save path ([`crate::save`]) | [`crate::save::SaveError`] |
//! | live migration, in or out | [`MigrateError`] |
//! | fleets: `up`, `stop`, `start`, `restart`, `rm`, `clean` ([`crate::fleet`]) | [`FleetError`] |
//! | a command that does several of these (`run`, `boot`, `peer`, ...) | [`RuntimeError`] |

use std::path::PathBuf;

use ferry_blueprint::BlueprintError;
use ferry_engine::EngineError;
use ferry_transport::migration::MigrationError;

use crate::save::SaveError;

/// A file or directory ferry could not read or write, with its path.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FileError {
    /// The file or directory (or what was being done, for a pipe or thread).
    pub path: PathBuf,
    /// The underlying error.
    pub source: std::io::Error,
}

impl FileError {
    /// Wraps an I/O error with the path it concerns:
    /// `.map_err(FileError::at(&path))?`.
    pub fn at(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| FileError { path, source }
    }
}

/// Naming a VM, or finding one by its name.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// The VM name is not acceptable.
    #[error("invalid VM name '{0}': use 1-63 characters from a-z, 0-9, '-', '_' and '.', starting with a letter or digit")]
    BadName(String),
    /// Another running VM has this name.
    #[error("the name '{name}' is in use by a running VM{pid}: choose another --name, or stop that VM first")]
    NameInUse {
        /// The name.
        name: String,
        /// " (pid N)" if known.
        pid: String,
    },
    /// A suspended or stopped VM keeps this name.
    #[error("the name '{name}' belongs to a {state} VM: resume it with 'ferry start {name}', or delete its state with 'ferry rm {name}'")]
    NameHeld {
        /// The name.
        name: String,
        /// Its state.
        state: crate::record::RecordState,
    },
    /// No running VM has this name.
    #[error("no running VM is named '{name}' (looked in {dir}): check the name, or $FERRY_STATE if the VM runs with another")]
    NoSuchVm {
        /// The name.
        name: String,
        /// The state directory searched.
        dir: PathBuf,
    },
    /// No VM, running or not, has this name.
    #[error("no VM is named '{name}' (looked in {dir}): 'ferry ps' lists them")]
    UnknownVm {
        /// The name.
        name: String,
        /// The state directory searched.
        dir: PathBuf,
    },
    /// The VM's directory could not be made, locked or read.
    #[error(transparent)]
    File(#[from] FileError),
}

impl NameError {
    /// The class of this failure.
    pub fn exit_class(&self) -> ExitClass {
        match self {
            NameError::File(_) => ExitClass::Other,
            _ => ExitClass::BadInput,
        }
    }
}

/// A running VM: its engine, its guest agent, its network, its control
/// socket.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The VM's network could not be set up.
    #[error(transparent)]
    Net(#[from] ferry_net::NetError),
    /// The guest's network settings are not usable.
    #[error("the guest's network setting {what} '{value}' is not an IPv4 address: fix the recipe's [network]")]
    BadNetworkSetting {
        /// Which setting.
        what: &'static str,
        /// What it says.
        value: String,
    },
    /// The agent never answered.
    #[error("the guest agent did not answer within {secs} s: {detail}")]
    AgentSilent {
        /// Seconds waited.
        secs: u64,
        /// Console tail and hints.
        detail: String,
    },
    /// The agent answered but the service never became live.
    #[error("the service did not become live within {secs} s: {detail}")]
    NotLive {
        /// Seconds waited.
        secs: u64,
        /// Console tail and hints.
        detail: String,
    },
    /// The VM stopped while ferry waited for it.
    #[error("the VM stopped unexpectedly ({reason}){detail}")]
    VmDied {
        /// Why.
        reason: String,
        /// Console tail.
        detail: String,
    },
    /// The agent reported an error or broke the protocol.
    #[error("guest agent: {0}")]
    Agent(String),
    /// A control socket failed.
    #[error("control socket {path}: {detail}")]
    Control {
        /// The socket.
        path: PathBuf,
        /// What happened.
        detail: String,
    },
    /// The VM's directory or name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Cancelled by the caller before the work was done.
    #[error("interrupted")]
    Interrupted,
    /// A failure inside ferry (a bug or a broken invariant).
    #[error("internal error: {0}")]
    Internal(String),
    /// A file the VM needs.
    #[error(transparent)]
    File(#[from] FileError),
}

impl VmError {
    /// The class of this failure.
    pub fn exit_class(&self) -> ExitClass {
        match self {
            VmError::Engine(e) => engine_class(e),
            VmError::Net(n) => net_class(n),
            VmError::BadNetworkSetting { .. } => ExitClass::BadInput,
            VmError::AgentSilent { .. }
            | VmError::NotLive { .. }
            | VmError::VmDied { .. }
            | VmError::Agent(_) => ExitClass::VmFailed,
            VmError::Name(n) => n.exit_class(),
            VmError::Interrupted => ExitClass::Interrupted,
            VmError::Control { .. } | VmError::Internal(_) | VmError::File(_) => ExitClass::Other,
        }
    }
}

/// Starting a VM: any source of the start pipeline (blueprint, package,
/// registry, detached supervisor), up to the service being live.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A blueprint problem.
    #[error(transparent)]
    Blueprint(#[from] BlueprintError),
    /// A package problem.
    #[error(transparent)]
    Package(#[from] ferry_package::PackageError),
    /// Another `ferry run` holds the package.
    #[error("the package {path} is in use by another 'ferry run' (pid {pid}): stop that one, or pass --clone to run a copy-on-write clone")]
    PackageInUse {
        /// The package.
        path: PathBuf,
        /// The holder's pid, if known.
        pid: String,
    },
    /// The package needs more memory than the host has.
    #[error("the package needs {need_mib} MiB of guest memory but this host has {have_mib} MiB in all: run it on a larger host")]
    HostTooSmall {
        /// Guest memory of the package.
        need_mib: u64,
        /// The host's total memory.
        have_mib: u64,
    },
    /// Memory requested is below the recipe's minimum.
    #[error(
        "--memory-size {asked} is too small for recipe '{recipe}': it needs at least {min} MiB"
    )]
    MemoryTooSmall {
        /// Requested MiB.
        asked: u64,
        /// Minimum MiB.
        min: u64,
        /// The recipe.
        recipe: String,
    },
    /// The number of vCPUs asked for is out of range.
    #[error("--cpus {0} is out of range: use 1 to 64")]
    CpusOutOfRange(u32),
    /// A problem fetching a package over HTTP.
    #[error(transparent)]
    Transport(#[from] ferry_transport::TransportError),
    /// A problem with a disk fetched lazily.
    #[error(transparent)]
    LazyDisk(#[from] ferry_lazydisk::LazyDiskError),
    /// A problem serving a lazy disk to the engine.
    #[error(transparent)]
    DiskServer(#[from] ferry_lazydisk::NbdError),
    /// A networking problem.
    #[error(transparent)]
    Net(#[from] ferry_net::NetError),
    /// The engine cannot run this image (accelerator, version).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The VM's name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The VM failed while starting.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A VM has no saved state to resume.
    #[error("'{name}' has nothing to resume ({why}); 'ferry rm {name}' removes it")]
    NothingToResume {
        /// The VM.
        name: String,
        /// Why.
        why: String,
    },
    /// A detached VM's supervisor could not start it.
    #[error("{name}: {message}")]
    DetachedStart {
        /// The VM.
        name: String,
        /// The supervisor's error, on one line.
        message: String,
        /// The exit code the supervisor gave it (`ferry`'s classes).
        code: u8,
    },
    /// The boot data of `--from-bss` could not be had, or is unusable.
    #[error(transparent)]
    BootData(#[from] ferry_bootsvc::fetch::FetchBootError),
    /// The `--from-bss` URL is not a boot service's base URL.
    #[error("--from-bss {url}: {why} (the boot service's base URL, e.g. http://127.0.0.1:27778 or https://host:27778 with --ca)")]
    BadBssUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// A failure inside ferry (a bug or a broken invariant).
    #[error("internal error: {0}")]
    Internal(String),
    /// A file the start needs.
    #[error(transparent)]
    File(#[from] FileError),
}

impl StartError {
    /// The class of this failure.
    pub fn exit_class(&self) -> ExitClass {
        use ExitClass::*;
        match self {
            StartError::Blueprint(b) => blueprint_class(b),
            StartError::Package(_)
            | StartError::PackageInUse { .. }
            | StartError::HostTooSmall { .. }
            | StartError::MemoryTooSmall { .. }
            | StartError::CpusOutOfRange(_)
            | StartError::NothingToResume { .. } => BadInput,
            StartError::Transport(t) => transport_class(t),
            StartError::LazyDisk(_) | StartError::DiskServer(_) => Other,
            StartError::Net(n) => net_class(n),
            StartError::Engine(e) => engine_class(e),
            StartError::Name(n) => n.exit_class(),
            StartError::Vm(v) => v.exit_class(),
            StartError::DetachedStart { code, .. } => ExitClass::from_code(*code),
            StartError::BootData(b) => boot_data_class(b),
            StartError::BadBssUrl { .. } => BadInput,
            StartError::Internal(_) | StartError::File(_) => Other,
        }
    }

    /// Whether the caller's cancel stopped it.
    pub fn is_interrupted(&self) -> bool {
        matches!(self, StartError::Vm(VmError::Interrupted))
    }
}

/// A live migration, in or out. Whatever it says, the VM runs in exactly
/// one place, or (after the switch) is left paused and in doubt, and the
/// message says which.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The peer protocol failed (connecting, the token, a message).
    #[error(transparent)]
    Protocol(#[from] MigrationError),
    /// The migration did not happen; the VM stays where it was.
    #[error("the migration {direction} {peer} failed: {detail}")]
    Failed {
        /// "to" or "from".
        direction: &'static str,
        /// The other peer.
        peer: String,
        /// Why, and what happened to the VM.
        detail: String,
    },
    /// The receiving VM could not be started here (the source keeps it).
    #[error(transparent)]
    Start(Box<StartError>),
    /// The VM failed during the copy.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A file of the migration (a blob fetched from the source).
    #[error(transparent)]
    File(#[from] FileError),
}

impl From<StartError> for MigrateError {
    fn from(e: StartError) -> Self {
        MigrateError::Start(Box::new(e))
    }
}

impl MigrateError {
    /// The class of a peer protocol failure: a refusal (wrong token, a
    /// name taken), a TLS failure (a certificate, a CA, a plain caller) or
    /// an address that cannot be bound is the user's input.
    fn exit_class_of_protocol(m: &MigrationError) -> ExitClass {
        match m {
            MigrationError::Refused { .. }
            | MigrationError::Bind { .. }
            | MigrationError::Tls { .. } => ExitClass::BadInput,
            _ => ExitClass::Migration,
        }
    }

    /// The class of this failure.
    pub fn exit_class(&self) -> ExitClass {
        match self {
            MigrateError::Protocol(m) => Self::exit_class_of_protocol(m),
            MigrateError::Failed { .. } => ExitClass::Migration,
            MigrateError::Start(s) => s.exit_class(),
            MigrateError::Vm(v) => v.exit_class(),
            MigrateError::File(_) => ExitClass::Other,
        }
    }
}

/// Fleets and VMs by name: `up`, `run --detach`, `stop`, `start`,
/// `restart`, `rm`, `clean`.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A bad option value (what the user gave).
    #[error("{0}")]
    BadOption(String),
    /// `ferry up -n N` asks for more clones than the host's memory holds.
    #[error("{asked} clones do not fit: each may use up to {per_clone_mib} MiB ({guest_mib} MiB of guest memory, plus QEMU), and this host has {available_mib} MiB available (keeping {reserve_mib} MiB for itself): at most {fit} fit; start fewer")]
    TooManyClones {
        /// `-n`.
        asked: u64,
        /// How many fit.
        fit: u64,
        /// Guest memory of each clone.
        guest_mib: u64,
        /// Guest memory plus the engine's own.
        per_clone_mib: u64,
        /// `MemAvailable`.
        available_mib: u64,
        /// Left for the host.
        reserve_mib: u64,
    },
    /// The VM runs, and the command needs it stopped.
    #[error("'{name}' is running: stop it first ('ferry stop {name}'), or drop it at once with 'ferry stop {name} --discard'")]
    StillRunning {
        /// The VM.
        name: String,
    },
    /// A VM did not stop when asked.
    #[error("'{name}' still runs {secs} s after it was asked to stop; see {}", log.display())]
    StopTimedOut {
        /// The VM.
        name: String,
        /// Seconds waited.
        secs: u64,
        /// Its log.
        log: PathBuf,
    },
    /// Some of the VMs a command worked on failed; each line says which and why.
    #[error("{summary}: {}", failures.join("; "))]
    Several {
        /// What happened as a whole.
        summary: String,
        /// One line per failed VM.
        failures: Vec<String>,
        /// The exit code (the first failure's).
        code: u8,
    },
    /// A VM's name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Starting a VM failed.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A running VM (its control socket) failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A failure inside ferry (a bug or a broken invariant).
    #[error("internal error: {0}")]
    Internal(String),
    /// A file of the fleet.
    #[error(transparent)]
    File(#[from] FileError),
}

impl FleetError {
    /// The class of this failure.
    pub fn exit_class(&self) -> ExitClass {
        match self {
            FleetError::BadOption(_)
            | FleetError::TooManyClones { .. }
            | FleetError::StillRunning { .. } => ExitClass::BadInput,
            FleetError::StopTimedOut { .. } => ExitClass::VmFailed,
            FleetError::Several { code, .. } => ExitClass::from_code(*code),
            FleetError::Name(n) => n.exit_class(),
            FleetError::Start(s) => s.exit_class(),
            FleetError::Vm(v) => v.exit_class(),
            FleetError::Internal(_) | FleetError::File(_) => ExitClass::Other,
        }
    }
}

impl From<ferry_package::PackageError> for FleetError {
    fn from(e: ferry_package::PackageError) -> Self {
        FleetError::Start(e.into())
    }
}

/// The error of a command that does several operations (`boot` starts and
/// owns a VM; `run` starts, owns and saves it; `peer` migrates it in and
/// out): which operation failed, with that operation's error.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Starting the VM failed.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Saving the VM failed (the old package is unchanged).
    #[error(transparent)]
    Save(#[from] SaveError),
    /// A live migration failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// A fleet operation failed.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The running VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The VM's name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A bad option value (what the user gave; never an internal failure).
    #[error("{0}")]
    BadOption(String),
    /// A failure inside ferry (a bug or a broken invariant).
    #[error("internal error: {0}")]
    Internal(String),
    /// A file the command needs.
    #[error(transparent)]
    File(#[from] FileError),
}

impl From<BlueprintError> for RuntimeError {
    fn from(e: BlueprintError) -> Self {
        RuntimeError::Start(e.into())
    }
}

impl From<ferry_package::PackageError> for RuntimeError {
    fn from(e: ferry_package::PackageError) -> Self {
        RuntimeError::Start(e.into())
    }
}

impl From<EngineError> for RuntimeError {
    fn from(e: EngineError) -> Self {
        RuntimeError::Vm(e.into())
    }
}

impl From<MigrationError> for RuntimeError {
    fn from(e: MigrationError) -> Self {
        RuntimeError::Migrate(e.into())
    }
}

impl From<ferry_transport::TransportError> for RuntimeError {
    fn from(e: ferry_transport::TransportError) -> Self {
        RuntimeError::Start(e.into())
    }
}

impl From<ferry_net::NetError> for RuntimeError {
    fn from(e: ferry_net::NetError) -> Self {
        RuntimeError::Vm(e.into())
    }
}

/// The class of a failure, which the `ferry` binary turns into its exit
/// code: each error variant maps to exactly one class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// 1: anything else (I/O, a failed tool, an internal error).
    Other = 1,
    /// 3: bad input (blueprint, recipe, name, option, package, address).
    BadInput = 3,
    /// 4: missing host software or accelerator.
    MissingHost = 4,
    /// 5: the VM failed (died, agent silent, service not live).
    VmFailed = 5,
    /// 6: a live migration did not happen (the VM stays where it was, or
    /// is in doubt).
    Migration = 6,
    /// 130: interrupted.
    Interrupted = 130,
}

impl ExitClass {
    /// The exit code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The class of an exit code another ferry process reported.
    pub fn from_code(code: u8) -> Self {
        match code {
            3 => ExitClass::BadInput,
            4 => ExitClass::MissingHost,
            5 => ExitClass::VmFailed,
            6 => ExitClass::Migration,
            130 => ExitClass::Interrupted,
            _ => ExitClass::Other,
        }
    }

    /// Its name in JSON (`{"type":"error","exit_class":...}`).
    pub fn name(self) -> &'static str {
        match self {
            ExitClass::Other => "other",
            ExitClass::BadInput => "bad-input",
            ExitClass::MissingHost => "missing-host-software",
            ExitClass::VmFailed => "vm-failed",
            ExitClass::Migration => "migration-failed",
            ExitClass::Interrupted => "interrupted",
        }
    }
}

impl RuntimeError {
    /// The class of this failure.
    pub fn exit_class(&self) -> ExitClass {
        match self {
            RuntimeError::Start(e) => e.exit_class(),
            RuntimeError::Save(e) => e.exit_class(),
            RuntimeError::Migrate(e) => e.exit_class(),
            RuntimeError::Fleet(e) => e.exit_class(),
            RuntimeError::Vm(e) => e.exit_class(),
            RuntimeError::Name(e) => e.exit_class(),
            RuntimeError::BadOption(_) => ExitClass::BadInput,
            RuntimeError::Internal(_) | RuntimeError::File(_) => ExitClass::Other,
        }
    }

    /// Whether the caller's cancel stopped it (before the VM was live).
    pub fn is_interrupted(&self) -> bool {
        match self {
            RuntimeError::Start(s) => s.is_interrupted(),
            RuntimeError::Vm(v) => matches!(v, VmError::Interrupted),
            RuntimeError::Migrate(MigrateError::Start(s)) => s.is_interrupted(),
            RuntimeError::Migrate(MigrateError::Vm(VmError::Interrupted)) => true,
            _ => false,
        }
    }
}

/// The class of any error from this crate or the crates below it, found
/// by its type (for callers that hold it as a `dyn Error`, e.g. inside an
/// `anyhow::Error`); `None` for an error of another kind.
pub fn class_of(e: &(dyn std::error::Error + 'static)) -> Option<ExitClass> {
    if let Some(r) = e.downcast_ref::<RuntimeError>() {
        Some(r.exit_class())
    } else if let Some(x) = e.downcast_ref::<StartError>() {
        Some(x.exit_class())
    } else if let Some(x) = e.downcast_ref::<SaveError>() {
        Some(x.exit_class())
    } else if let Some(x) = e.downcast_ref::<MigrateError>() {
        Some(x.exit_class())
    } else if let Some(x) = e.downcast_ref::<FleetError>() {
        Some(x.exit_class())
    } else if let Some(x) = e.downcast_ref::<VmError>() {
        Some(x.exit_class())
    } else if let Some(x) = e.downcast_ref::<crate::shell::ShellError>() {
        Some(x.exit_class())
    } else if let Some(x) = e.downcast_ref::<NameError>() {
        Some(x.exit_class())
    } else if e.downcast_ref::<FileError>().is_some() {
        Some(ExitClass::Other)
    } else if let Some(b) = e.downcast_ref::<BlueprintError>() {
        Some(blueprint_class(b))
    } else if let Some(en) = e.downcast_ref::<EngineError>() {
        Some(engine_class(en))
    } else if let Some(n) = e.downcast_ref::<ferry_net::NetError>() {
        Some(net_class(n))
    } else if let Some(t) = e.downcast_ref::<ferry_transport::TransportError>() {
        Some(transport_class(t))
    } else if e.downcast_ref::<ferry_package::PackageError>().is_some() {
        Some(ExitClass::BadInput)
    } else if let Some(k) = e.downcast_ref::<ferry_package::KeyError>() {
        Some(if k.is_bad_input() {
            ExitClass::BadInput
        } else {
            ExitClass::Other
        })
    } else {
        e.downcast_ref::<MigrationError>()
            .map(MigrateError::exit_class_of_protocol)
    }
}

/// The class of a blueprint error.
pub fn blueprint_class(e: &BlueprintError) -> ExitClass {
    match e {
        BlueprintError::MissingTool { .. } => ExitClass::MissingHost,
        BlueprintError::Io { .. } | BlueprintError::ToolFailed { .. } => ExitClass::Other,
        _ => ExitClass::BadInput,
    }
}

/// The class of an engine error.
pub fn engine_class(e: &EngineError) -> ExitClass {
    match e {
        EngineError::NotInstalled { .. } | EngineError::AccelUnavailable { .. } => {
            ExitClass::MissingHost
        }
        EngineError::Incompatible(_) => ExitClass::BadInput,
        _ => ExitClass::VmFailed,
    }
}

/// The class of a networking error.
pub fn net_class(e: &ferry_net::NetError) -> ExitClass {
    if e.is_bad_input() {
        ExitClass::BadInput
    } else if e.is_missing_software() {
        ExitClass::MissingHost
    } else {
        ExitClass::Other
    }
}

/// The class of a `--from-bss` boot data failure.
pub fn boot_data_class(e: &ferry_bootsvc::fetch::FetchBootError) -> ExitClass {
    use ferry_bootsvc::fetch::FetchBootError as F;
    match e {
        // What the user or the service's data says: final, not retried.
        F::BadMac(_)
        | F::NoBootData { .. }
        | F::Http { .. }
        | F::BadBootData { .. }
        | F::DigestMismatch { .. }
        | F::Tls { .. }
        | F::TlsFiles(_) => ExitClass::BadInput,
        F::ServiceDown { .. } | F::Io { .. } => ExitClass::Other,
    }
}

/// The class of a transport error.
pub fn transport_class(e: &ferry_transport::TransportError) -> ExitClass {
    use ferry_transport::TransportError as T;
    match e {
        // What the user gave: packages, names, token, address, URL.
        T::NoPackages
        | T::OpenPackage(_)
        | T::BadPackageName(_)
        | T::DuplicateName { .. }
        | T::BadToken(_)
        | T::Tls(_)
        | T::TlsRefused { .. }
        | T::Bind { .. }
        | T::BadUrl { .. }
        | T::Unauthorized { .. }
        | T::NotFound { .. }
        | T::NotARegistry { .. }
        | T::EmptyRegistry { .. }
        | T::AmbiguousRegistry { .. }
        | T::Package(_)
        | T::ChunkCorrupt { .. } => ExitClass::BadInput,
        T::Setup { .. }
        | T::Serve { .. }
        | T::Connect { .. }
        | T::Request { .. }
        | T::Status { .. }
        | T::RangeUnsupported { .. }
        | T::BadResponse { .. }
        | T::Interrupted { .. }
        | T::Changed { .. } => ExitClass::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_failures_are_never_bad_input() {
        for class in [
            StartError::Internal("x".into()).exit_class(),
            FleetError::Internal("x".into()).exit_class(),
            VmError::Internal("x".into()).exit_class(),
            RuntimeError::Internal("x".into()).exit_class(),
        ] {
            assert_eq!(class, ExitClass::Other);
        }
    }

    #[test]
    fn a_wrapped_error_keeps_the_class_of_what_failed() {
        let silent = || VmError::AgentSilent {
            secs: 1,
            detail: String::new(),
        };
        assert_eq!(
            RuntimeError::from(MigrateError::from(StartError::from(silent()))).exit_class(),
            ExitClass::VmFailed
        );
        assert_eq!(
            FleetError::from(StartError::CpusOutOfRange(0)).exit_class(),
            ExitClass::BadInput
        );
        assert_eq!(
            FleetError::from(StartError::DetachedStart {
                name: "a".into(),
                message: "m".into(),
                code: 6
            })
            .exit_class(),
            ExitClass::Migration
        );
        let boxed: Box<dyn std::error::Error> =
            Box::new(FleetError::StillRunning { name: "a".into() });
        assert_eq!(class_of(boxed.as_ref()), Some(ExitClass::BadInput));
        let other: Box<dyn std::error::Error> = Box::new(std::fmt::Error);
        assert_eq!(class_of(other.as_ref()), None);
    }

    #[test]
    fn a_cancel_is_interrupted_whichever_operation_saw_it() {
        let e = RuntimeError::from(StartError::from(VmError::Interrupted));
        assert!(e.is_interrupted());
        assert_eq!(e.exit_class(), ExitClass::Interrupted);
        let e = RuntimeError::from(MigrateError::from(VmError::Interrupted));
        assert!(e.is_interrupted());
    }
}
