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
    /// A bad option value.
    #[error("{0}")]
    BadOption(String),
    /// A VM in doubt after a migration, whose sent state was not kept here.
    #[error("VM '{name}' is in doubt after its migration and cannot be saved here ({detail}); it stays paused: ask the destination whether it runs the VM")]
    InDoubtUnsaved {
        /// The VM.
        name: String,
        /// Why it cannot be saved.
        detail: String,
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

impl RuntimeError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| RuntimeError::Io { path, source }
    }
}
