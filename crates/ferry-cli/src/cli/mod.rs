//! Argument parsing and dispatch. Exit codes are stable, per failure class:
//! 0 success, 1 other errors, 2 usage, 3 bad input (blueprint, recipe, name,
//! option, package, listen address), 4 missing host software or accelerator,
//! 5 the VM failed (died, agent silent, service not live), 6 a live
//! migration did not happen (the VM stays where it was, or is in doubt),
//! 130 interrupted. `ferry exec` exits with the guest command's own code.

mod blueprint;
mod boot;
mod boot_service;
mod clean;
mod cluster;
mod exec;
mod inspect;
mod key;
mod logs;
mod manager;
mod net;
mod operator;
mod package;
mod peer;
mod ps;
mod registry;
pub mod render;
mod restart;
mod rm;
mod run;
mod shell;
mod signals;
mod start;
mod stop;
mod supervise;
mod tls;
mod tokens;
mod up;
mod watch;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use ferry_blueprint::BlueprintError;
use ferry_engine::EngineError;
use ferry_runtime::vm::NetChoice;
use ferry_runtime::{Cancel, Paths, RuntimeError};

/// ferry: build a microVM from a recipe, boot it, snapshot it, ship it.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    /// Log what ferry does (or set FERRY_LOG=debug).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Machine-readable output: JSON lines on standard output, one object
    /// per event (`docs/events.md`); `ps` prints one JSON array.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build and inspect blueprints.
    Blueprint(blueprint::Args),
    /// Cold-boot a blueprint and wait until its service is live.
    Boot(boot::Args),
    /// Serve inventory (SMD), boot parameters and iPXE scripts (BSS),
    /// cloud-init data and boot files to netbooting nodes; `load` a node list.
    #[command(name = "boot-service")]
    BootService(boot_service::Args),
    /// Run a command inside a running VM.
    Exec(exec::Args),
    /// A shell (a real terminal) or a command in a running VM, even when its
    /// service, network or agent are broken.
    Shell(shell::Args),
    /// Boot a blueprint, wait until its service is live, snapshot it into a package.
    Package(package::Args),
    /// Resume a package; Ctrl-C suspends it back into the package.
    Run(run::Args),
    /// Show what a package holds; --verify checks every chunk.
    Inspect(inspect::Args),
    /// Keys for signing packages (`key gen --out PREFIX`).
    Key(key::Args),
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
    /// Follow VMs and print one line per error (service exited, kernel
    /// oops or panic, OOM); --on-error shell opens a shell in the first
    /// that fails.
    Watch(watch::Args),
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
    /// The control plane's API: nodes, instances, placement, moves.
    Manager(manager::Args),
    /// Run the manager's VMs on this host.
    Worker(worker::Args),
    /// Talk to a manager: nodes, instances, create, migrate, delete, watch.
    Cluster(cluster::Args),
    /// TLS certificates for a test cluster (`tls init DIR`).
    Tls(tls::Args),
    /// The Kubernetes operator: Instance objects become VMs.
    Operator(operator::Args),
    /// The supervisor of one detached VM (started by ferry itself).
    #[command(hide = true)]
    Supervise(supervise::Args),
}

/// `--trust PUB` (repeatable): only packages signed by one of these keys
/// are run.
#[derive(clap::Args, Debug, Default)]
pub struct TrustArgs {
    /// Run the package only if it is signed by this key (a PREFIX.pub from
    /// `ferry key gen`; repeatable: any one of them). An unsigned package,
    /// one signed by another key, or one changed since it was signed is
    /// refused before anything of it runs.
    #[arg(long = "trust", value_name = "PUB")]
    trust: Vec<PathBuf>,
}

impl TrustArgs {
    /// The keys, read (and checked) before anything else is done.
    pub fn keys(&self) -> anyhow::Result<ferry_package::TrustedKeys> {
        Ok(ferry_package::TrustedKeys::load(&self.trust)?)
    }
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

/// What every command gets besides its arguments: the event renderer and
/// the cancel handle (Ctrl-C), installed on first use.
pub struct Ctx {
    /// Renders events (human lines or JSON lines).
    pub render: render::Render,
    cancel: std::sync::OnceLock<Cancel>,
}

impl Ctx {
    /// A context rendering JSON lines if `json`.
    pub fn new(json: bool) -> Self {
        Ctx {
            render: render::Render::new(json),
            cancel: std::sync::OnceLock::new(),
        }
    }

    /// One result line: on standard output, or a `notice` event with
    /// `--json`.
    pub fn notice(&self, line: &str) {
        use ferry_runtime::EventSink;
        self.render.emit(ferry_runtime::Event::Notice {
            message: line.to_string(),
        });
    }

    /// The cancel handle, tripped by SIGINT and SIGTERM from the first call
    /// on (commands that do not ask keep the default: Ctrl-C ends them).
    pub fn cancel(&self) -> anyhow::Result<Cancel> {
        if let Some(c) = self.cancel.get() {
            return Ok(c.clone());
        }
        let c = signals::cancel_on_signals()?;
        Ok(self.cancel.get_or_init(|| c).clone())
    }
}

/// Runs the parsed command.
pub fn run(cli: Cli, started: Instant, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let paths = Paths::from_env();
    match cli.command {
        Command::Blueprint(args) => blueprint::run(args, &paths),
        Command::Boot(args) => boot::run(args, &paths, started, ctx),
        Command::BootService(args) => boot_service::run(args, &paths, ctx),
        Command::Exec(args) => exec::run(args, &paths),
        Command::Shell(args) => shell::run(args, &paths),
        Command::Watch(args) => watch::run(args, &paths),
        Command::Package(args) => package::run(args, &paths, ctx),
        Command::Run(args) => run::run(args, &paths, started, ctx),
        Command::Inspect(args) => inspect::run(args, cli.json),
        Command::Key(args) => key::run(args, cli.json),
        Command::Net(args) => net::run(args, &paths, ctx),
        Command::Registry(args) => registry::run(args, ctx),
        Command::Peer(args) => peer::run(args, &paths, started, ctx),
        Command::Up(args) => up::run(args, &paths, ctx),
        Command::Ps(args) => ps::run(args, &paths, cli.json),
        Command::Logs(args) => logs::run(args, &paths),
        Command::Stop(args) => stop::run(args, &paths, ctx),
        Command::Start(args) => start::run(args, &paths, ctx),
        Command::Restart(args) => restart::run(args, &paths, ctx),
        Command::Rm(args) => rm::run(args, &paths, ctx),
        Command::Clean(args) => clean::run(args, &paths, ctx),
        Command::Manager(args) => manager::run(args, &paths, ctx),
        Command::Worker(args) => worker::run(args, &paths, ctx),
        Command::Operator(args) => operator::run(args),
        Command::Cluster(args) => cluster::run(args, ctx),
        Command::Supervise(args) => supervise::run(args, &paths),
        Command::Tls(args) => tls::run(args),
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

/// Where `--console` copies the guest's console: standard error.
pub fn console(on: bool) -> Option<ferry_runtime::vm::ConsoleSink> {
    on.then(|| {
        std::sync::Arc::new(|bytes: &[u8]| {
            use std::io::Write;
            let _ = std::io::stderr().write_all(bytes);
        }) as ferry_runtime::vm::ConsoleSink
    })
}

/// The engine ferry uses: QEMU, or the program `$FERRY_QEMU` names.
pub fn engine(paths: &Paths) -> Result<ferry_qemu::QemuEngine, EngineError> {
    let qemu = std::env::var("FERRY_QEMU").unwrap_or_else(|_| ferry_qemu::DEFAULT_QEMU.into());
    ferry_qemu::QemuEngine::new(&qemu, &paths.cache)
}

/// The exit code for an error (also what a detached VM's supervisor reports).
pub fn exit_number(e: &anyhow::Error) -> u8 {
    exit_class(e).code()
}

/// The class of an error: the runtime's own mapping, for its errors and
/// those of the crates below it.
pub fn exit_class(e: &anyhow::Error) -> ferry_runtime::ExitClass {
    use ferry_runtime::ExitClass;
    e.chain()
        .find_map(|c| {
            ferry_runtime::error::class_of(c).or_else(|| {
                if let Some(m) = c.downcast_ref::<ferry_control::manager::ManagerError>() {
                    Some(match m {
                        ferry_control::manager::ManagerError::Bind { .. } => ExitClass::BadInput,
                        _ => ExitClass::Other,
                    })
                } else if let Some(w) = c.downcast_ref::<ferry_control::worker::WorkerError>() {
                    Some(match w {
                        ferry_control::worker::WorkerError::Refused(_)
                        | ferry_control::worker::WorkerError::Tls(_) => ExitClass::BadInput,
                        _ => ExitClass::Other,
                    })
                } else {
                    c.downcast_ref::<ferry_control::client::ClusterError>()
                        .map(|x| {
                            if x.is_bad_input() {
                                ExitClass::BadInput
                            } else {
                                ExitClass::Other
                            }
                        })
                }
            })
        })
        .unwrap_or(ExitClass::Other)
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
