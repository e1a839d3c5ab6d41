//! Argument parsing and dispatch. Exit codes are stable, per failure class:
//! 0 success, 1 other errors, 2 usage, 3 bad input (blueprint, recipe, name,
//! option, package, listen address), 4 missing host software or accelerator,
//! 5 the VM failed (died, agent silent, service not live), 6 a live
//! migration did not happen (the VM stays where it was, or is in doubt),
//! 130 interrupted. `ferry exec` exits with the guest command's own code.

mod blueprint;
mod boot;
mod clean;
mod exec;
mod inspect;
mod logs;
mod net;
mod package;
mod peer;
mod ps;
mod registry;
mod restart;
mod rm;
mod run;
mod start;
mod stop;
mod supervise;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use ferry_blueprint::BlueprintError;
use ferry_engine::EngineError;
use ferry_runtime::supervisor::NetChoice;
use ferry_runtime::{Paths, RuntimeError};
use ferry_transport::TransportError;

/// ferry: build a microVM from a recipe, boot it, snapshot it, ship it.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    /// Log what ferry does (or set FERRY_LOG=debug).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build and inspect blueprints.
    Blueprint(blueprint::Args),
    /// Cold-boot a blueprint and wait until its service is live.
    Boot(boot::Args),
    /// Run a command inside a running VM.
    Exec(exec::Args),
    /// Boot a blueprint, wait until its service is live, snapshot it into a package.
    Package(package::Args),
    /// Resume a package; Ctrl-C suspends it back into the package.
    Run(run::Args),
    /// Show what a package holds; --verify checks every chunk.
    Inspect(inspect::Args),
    /// Pre-made VM network namespaces with NAT to a host interface.
    Net(net::Args),
    /// Serve packages over HTTP (read-only, byte ranges) until Ctrl-C.
    Registry(registry::Args),
    /// Resume a VM from a registry, or live-migrate one from another peer.
    Peer(peer::Args),
    /// Start N copy-on-write clones of a package as a fleet of detached VMs.
    Up(up::Args),
    /// List VMs: running, suspended, stopped and crashed.
    Ps(ps::Args),
    /// Print a VM's console log; -f follows it.
    Logs(logs::Args),
    /// Suspend a VM (or every VM) keeping its state; --discard drops it.
    Stop(stop::Args),
    /// Resume a suspended VM, detached, with the ports and fleet it had.
    Start(start::Args),
    /// Suspend and resume a VM (or every running VM).
    Restart(restart::Args),
    /// Delete the state of a VM that is not running.
    Rm(rm::Args),
    /// Remove what crashed VMs left: state directories, namespaces, links, rules.
    Clean(clean::Args),
    /// The supervisor of one detached VM (started by ferry itself).
    #[command(hide = true)]
    Supervise(supervise::Args),
}

/// `--accel` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum AccelArg {
    /// KVM only where it really boots a Linux guest, else TCG.
    Auto,
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl From<AccelArg> for ferry_engine::AccelChoice {
    fn from(a: AccelArg) -> Self {
        match a {
            AccelArg::Auto => ferry_engine::AccelChoice::Auto,
            AccelArg::Kvm => ferry_engine::AccelChoice::Kvm,
            AccelArg::Tcg => ferry_engine::AccelChoice::Tcg,
        }
    }
}

/// Runs the parsed command.
pub fn run(cli: Cli, started: Instant) -> anyhow::Result<ExitCode> {
    let paths = Paths::from_env();
    match cli.command {
        Command::Blueprint(args) => blueprint::run(args, &paths),
        Command::Boot(args) => boot::run(args, &paths, started),
        Command::Exec(args) => exec::run(args, &paths),
        Command::Package(args) => package::run(args, &paths),
        Command::Run(args) => run::run(args, &paths, started),
        Command::Inspect(args) => inspect::run(args),
        Command::Net(args) => net::run(args, &paths),
        Command::Registry(args) => registry::run(args),
        Command::Peer(args) => peer::run(args, &paths, started),
        Command::Up(args) => up::run(args, &paths),
        Command::Ps(args) => ps::run(args, &paths),
        Command::Logs(args) => logs::run(args, &paths),
        Command::Stop(args) => stop::run(args, &paths),
        Command::Start(args) => start::run(args, &paths),
        Command::Restart(args) => restart::run(args, &paths),
        Command::Rm(args) => rm::run(args, &paths),
        Command::Clean(args) => clean::run(args, &paths),
        Command::Supervise(args) => supervise::run(args, &paths),
    }
}

/// `NAME` or `--all` (clap makes sure there is exactly one).
pub fn target(name: Option<String>, all: bool) -> ferry_runtime::fleet::Target {
    match name {
        Some(n) if !all => ferry_runtime::fleet::Target::One(n),
        _ => ferry_runtime::fleet::Target::All,
    }
}

/// `--net`, `--netns` and `--expose`: where a VM's network lives.
#[derive(clap::Args, Debug, Clone)]
pub struct NetArgs {
    /// Network: `namespace` (the VM gets a network namespace, needs root)
    /// or `none` (a network device connected to nothing).
    #[arg(long, value_enum, default_value = "namespace")]
    net: NetMode,
    /// Put the VM in this network namespace, created (and later removed)
    /// if missing. Default: a private namespace named after the VM.
    #[arg(long, value_name = "NAME")]
    netns: Option<String>,
    /// Make a guest port reachable on the host, and from every ferry guest
    /// at 172.100.100.1:HOSTPORT. HOSTADDR defaults to 127.0.0.1. Repeatable.
    #[arg(long, value_name = "[HOSTADDR:]HOSTPORT:GUESTPORT")]
    expose: Vec<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum NetMode {
    Namespace,
    None,
}

impl NetArgs {
    /// The runtime's view, or a bad-option error.
    pub fn choice(&self) -> Result<NetChoice, RuntimeError> {
        let exposes = self
            .expose
            .iter()
            .map(|s| s.parse::<ferry_net::ExposeSpec>())
            .collect::<Result<Vec<_>, _>>()?;
        match self.net {
            NetMode::None if self.netns.is_some() || !exposes.is_empty() => Err(
                RuntimeError::BadOption(
                    "--net none gives the VM no network: drop --netns and --expose, or use --net namespace".into(),
                ),
            ),
            NetMode::None => Ok(NetChoice::None),
            NetMode::Namespace => Ok(NetChoice::Namespace {
                netns: self.netns.clone(),
                exposes,
            }),
        }
    }
}

/// Prints one line of a command's results on standard output. A closed
/// stdout (`ferry peer | head -1`) must not take the VM down with a panic:
/// the line is dropped instead.
pub fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The engine ferry uses: QEMU, or the program `$FERRY_QEMU` names.
pub fn engine(paths: &Paths) -> Result<ferry_qemu::QemuEngine, EngineError> {
    let qemu = std::env::var("FERRY_QEMU").unwrap_or_else(|_| ferry_qemu::DEFAULT_QEMU.into());
    ferry_qemu::QemuEngine::new(&qemu, &paths.cache)
}

/// The stable exit code for an error.
pub fn exit_code(e: &anyhow::Error) -> ExitCode {
    ExitCode::from(exit_number(e))
}

/// [`exit_code`] as a number (what a detached VM's supervisor reports).
pub fn exit_number(e: &anyhow::Error) -> u8 {
    if let Some(r) = e.downcast_ref::<RuntimeError>() {
        match r {
            RuntimeError::Blueprint(b) => blueprint_code(b),
            RuntimeError::Engine(en) => engine_code(en),
            RuntimeError::BadName(_)
            | RuntimeError::NameInUse { .. }
            | RuntimeError::NoSuchVm { .. }
            | RuntimeError::MemoryTooSmall { .. }
            | RuntimeError::BadOption(_)
            | RuntimeError::Package(_)
            | RuntimeError::PackageInUse { .. }
            | RuntimeError::HostTooSmall { .. }
            | RuntimeError::NameHeld { .. }
            | RuntimeError::UnknownVm { .. }
            | RuntimeError::TooManyClones { .. } => 3,
            RuntimeError::DetachedStart { code, .. } | RuntimeError::Several { code, .. } => *code,
            RuntimeError::AgentSilent { .. }
            | RuntimeError::NotLive { .. }
            | RuntimeError::VmDied { .. }
            | RuntimeError::Agent(_) => 5,
            RuntimeError::Interrupted => 130,
            RuntimeError::Control { .. } | RuntimeError::Io { .. } => 1,
            RuntimeError::Net(n) => net_code(n),
            RuntimeError::Transport(t) => transport_code(t),
            RuntimeError::Migration(m) => migration_code(m),
            RuntimeError::MigrationFailed { .. } | RuntimeError::InDoubtUnsaved { .. } => 6,
            RuntimeError::LazyDisk(_) | RuntimeError::DiskServer(_) => 1,
        }
    } else if let Some(b) = e.downcast_ref::<BlueprintError>() {
        blueprint_code(b)
    } else if let Some(en) = e.downcast_ref::<EngineError>() {
        engine_code(en)
    } else if let Some(n) = e.downcast_ref::<ferry_net::NetError>() {
        net_code(n)
    } else if let Some(t) = e.downcast_ref::<TransportError>() {
        transport_code(t)
    } else {
        1
    }
}

fn blueprint_code(e: &BlueprintError) -> u8 {
    match e {
        BlueprintError::MissingTool { .. } => 4,
        BlueprintError::Io { .. } | BlueprintError::ToolFailed { .. } => 1,
        _ => 3,
    }
}

fn migration_code(e: &ferry_transport::migration::MigrationError) -> u8 {
    use ferry_transport::migration::MigrationError as M;
    match e {
        M::Refused { .. } | M::Bind { .. } => 3,
        _ => 6,
    }
}

fn net_code(e: &ferry_net::NetError) -> u8 {
    if e.is_bad_input() {
        3
    } else if e.is_missing_software() {
        4
    } else {
        1
    }
}

fn transport_code(e: &TransportError) -> u8 {
    use TransportError as T;
    match e {
        // What the user gave: packages, names, token, address, URL.
        T::NoPackages
        | T::OpenPackage(_)
        | T::BadPackageName(_)
        | T::DuplicateName { .. }
        | T::BadToken(_)
        | T::Bind { .. }
        | T::BadUrl { .. }
        | T::Unauthorized { .. }
        | T::NotFound { .. }
        | T::NotARegistry { .. }
        | T::EmptyRegistry { .. }
        | T::AmbiguousRegistry { .. }
        | T::Package(_)
        | T::ChunkCorrupt { .. } => 3,
        T::Setup { .. }
        | T::Serve { .. }
        | T::Connect { .. }
        | T::Request { .. }
        | T::Status { .. }
        | T::RangeUnsupported { .. }
        | T::BadResponse { .. }
        | T::Interrupted { .. }
        | T::Changed { .. } => 1,
    }
}

fn engine_code(e: &EngineError) -> u8 {
    match e {
        EngineError::NotInstalled { .. } | EngineError::AccelUnavailable { .. } => 4,
        EngineError::Incompatible(_) => 3,
        _ => 5,
    }
}

/// An error and its causes on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text.replace('\n', " ")
}

/// Where the static guest agent is: `--agent`, `$FERRY_AGENT`, beside the
/// `ferry` binary, or where `scripts/build.sh` leaves it.
pub fn find_agent(explicit: Option<PathBuf>) -> Result<PathBuf, BlueprintError> {
    if let Some(p) = explicit.or_else(|| std::env::var_os("FERRY_AGENT").map(PathBuf::from)) {
        return Ok(p);
    }
    let exe = std::env::current_exe().map_err(|e| BlueprintError::Agent(e.to_string()))?;
    // Beside ferry in an install; in a source tree, `cargo build` also leaves
    // a dynamic ferry-agent beside it, so only a static one counts. The same
    // places as for the recipes' other host-built binaries.
    let candidates: Vec<PathBuf> = ferry_blueprint::HostBinaries::search_dirs(&exe)
        .into_iter()
        .map(|dir| dir.join("ferry-agent"))
        .collect();
    candidates
        .iter()
        .find(|p| ferry_blueprint::is_static_executable(p))
        .cloned()
        .ok_or_else(|| {
            BlueprintError::Agent(format!(
                "the static ferry-agent binary was not found beside {}: build it with scripts/build.sh, or pass --agent PATH (or set FERRY_AGENT)",
                exe.display()
            ))
        })
}
