//! What can go wrong running VMs, and the class of each failure
//! ([`ExitClass`]), which the `ferry` binary turns into its exit code: the
//! mapping lives here, beside the errors, so that every caller (the CLI, a
//! daemon, a detached supervisor) classifies a failure the same way. An
//! internal failure is [`RuntimeError::Internal`], never "bad input".

use std::path::PathBuf;

use ferry_blueprint::BlueprintError;
use ferry_engine::EngineError;

/// Errors running VMs. Each message names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
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
    /// A problem fetching a package over HTTP.
    #[error(transparent)]
    Transport(#[from] ferry_transport::TransportError),
    /// A problem talking to another peer.
    #[error(transparent)]
    Migration(#[from] ferry_transport::migration::MigrationError),
    /// A live migration did not happen; the VM stays where it was.
    #[error("the migration {direction} {peer} failed: {detail}")]
    MigrationFailed {
        /// "to" or "from".
        direction: &'static str,
        /// The other peer.
        peer: String,
        /// Why, and what happened to the VM.
        detail: String,
    },
    /// A problem with a disk fetched lazily.
    #[error(transparent)]
    LazyDisk(#[from] ferry_lazydisk::LazyDiskError),
    /// A problem serving a lazy disk to the engine.
    #[error(transparent)]
    DiskServer(#[from] ferry_lazydisk::NbdError),
    /// A networking problem.
    #[error(transparent)]
    Net(#[from] ferry_net::NetError),
    /// An engine problem.
    #[error(transparent)]
    Engine(#[from] EngineError),
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
    /// No VM, running or not, has this name.
    #[error("no VM is named '{name}' (looked in {dir}): 'ferry ps' lists them")]
    UnknownVm {
        /// The name.
        name: String,
        /// The state directory searched.
        dir: PathBuf,
    },
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
    /// No running VM has this name.
    #[error("no running VM is named '{name}' (looked in {dir}): check the name, or $FERRY_STATE if the VM runs with another")]
    NoSuchVm {
        /// The name.
        name: String,
        /// The state directory searched.
        dir: PathBuf,
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
    /// A bad option value (what the user gave; never an internal failure).
    #[error("{0}")]
    BadOption(String),
    /// A VM has no saved state to resume.
    #[error("'{name}' has nothing to resume ({why}); 'ferry rm {name}' removes it")]
    NothingToResume {
        /// The VM.
        name: String,
        /// Why.
        why: String,
    },
    /// A failure inside ferry (a bug or a broken invariant), never the
    /// user's input.
    #[error("internal error: {0}")]
    Internal(String),
    /// A save failed (the old package is unchanged).
    #[error(transparent)]
    Save(#[from] crate::save::SaveError),
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
    /// The control socket failed.
    #[error("control socket {path}: {detail}")]
    Control {
        /// The socket.
        path: PathBuf,
        /// What happened.
        detail: String,
    },
    /// Interrupted by a signal before the work was done.
    #[error("interrupted")]
    Interrupted,
    /// An I/O error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
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
        use ExitClass::*;
        match self {
            RuntimeError::Blueprint(b) => blueprint_class(b),
            RuntimeError::Engine(en) => engine_class(en),
            RuntimeError::BadName(_)
            | RuntimeError::NameInUse { .. }
            | RuntimeError::NoSuchVm { .. }
            | RuntimeError::MemoryTooSmall { .. }
            | RuntimeError::BadOption(_)
            | RuntimeError::NothingToResume { .. }
            | RuntimeError::Package(_)
            | RuntimeError::PackageInUse { .. }
            | RuntimeError::HostTooSmall { .. }
            | RuntimeError::NameHeld { .. }
            | RuntimeError::UnknownVm { .. }
            | RuntimeError::TooManyClones { .. } => BadInput,
            RuntimeError::DetachedStart { code, .. } | RuntimeError::Several { code, .. } => {
                ExitClass::from_code(*code)
            }
            RuntimeError::AgentSilent { .. }
            | RuntimeError::NotLive { .. }
            | RuntimeError::VmDied { .. }
            | RuntimeError::Agent(_) => VmFailed,
            RuntimeError::Interrupted => Interrupted,
            RuntimeError::Control { .. } | RuntimeError::Io { .. } | RuntimeError::Internal(_) => {
                Other
            }
            RuntimeError::Net(n) => net_class(n),
            RuntimeError::Transport(t) => transport_class(t),
            RuntimeError::Migration(m) => match m {
                ferry_transport::migration::MigrationError::Refused { .. }
                | ferry_transport::migration::MigrationError::Bind { .. } => BadInput,
                _ => Migration,
            },
            RuntimeError::MigrationFailed { .. } => Migration,
            RuntimeError::Save(e) => e.exit_class(),
            RuntimeError::LazyDisk(_) | RuntimeError::DiskServer(_) => Other,
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| RuntimeError::Io { path, source }
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
