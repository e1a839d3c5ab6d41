//! `ferry peer`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_runtime::peer::{peer, PeerOptions};
use ferry_runtime::peer_detach::detach_peer;
use ferry_runtime::Paths;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the VM comes from: `http(s)://…` (a registry root serving one
    /// package, `…/packages/NAME`, or any URL of a package file) to resume
    /// it, or `HOST:PORT` (a peer started with --listen) to live-migrate
    /// the VM running there to this host.
    #[arg(long, value_name = "SOURCE")]
    from: String,
    /// The VM's name here (default: the source VM's name, or the recipe's
    /// name and a random suffix).
    #[arg(long)]
    name: Option<String>,
    /// Serve this VM to the next peer on ADDR (needs a token).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Bearer token: for the registry, the source peer and --listen.
    /// Other users of this host can see it in the process list: prefer
    /// --token-file.
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
    token: Option<String>,
    /// Read the token from FILE (surrounding whitespace is ignored).
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Where Ctrl-C suspends the VM to (default: ./<name>.ferry).
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
    /// Accelerator: it must be the one the VM runs with.
    #[arg(long, value_enum, default_value = "auto")]
    accel: super::AccelArg,
    /// Forward standard input to a shell on the guest's serial console.
    #[arg(long = "enable-input")]
    enable_input: bool,
    /// Copy the guest's console to standard error.
    #[arg(long)]
    console: bool,
    /// Cap a migration out of this peer at MIB MiB/s (default: no cap
    /// beyond 10 GiB/s).
    #[arg(long = "max-bandwidth", value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    max_bandwidth: Option<u64>,
    /// Run in the background: return once the VM runs here. `ferry ps`
    /// lists it, `ferry logs NAME` shows its console, `ferry stop NAME`
    /// saves it into --save; the peer's own output goes to
    /// $FERRY_STATE/logs/peer-NAME.log.
    #[arg(short, long, conflicts_with_all = ["enable_input", "console"])]
    detach: bool,
    #[command(flatten)]
    net: super::NetArgs,
}

/// How long a detached peer's VM may take to run here (a large package
/// fetched from a registry, or a long migration).
const DETACHED_READY: Duration = Duration::from_secs(1800);

pub fn run(args: Args, paths: &Paths, started: Instant) -> anyhow::Result<ExitCode> {
    let net = args.net.choice()?;
    if args.detach {
        return detached(paths);
    }
    let token = match (args.token, args.token_file) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => Some(super::registry::read_token(&f)?),
        (None, None) => None,
    };
    let engine = super::engine(paths)?;
    let opts = PeerOptions {
        from: args.from,
        name: args.name,
        net,
        listen: args.listen,
        token,
        accel: args.accel.into(),
        echo_console: args.console,
        enable_input: args.enable_input,
        save: args.save,
        started,
        max_bandwidth: args.max_bandwidth.map(|m| m << 20),
    };
    peer(&engine, paths, &opts, &mut super::say)?;
    Ok(ExitCode::SUCCESS)
}

/// `peer --detach`: this very command line without `--detach`, run by a
/// process of its own.
fn detached(paths: &Paths) -> anyhow::Result<ExitCode> {
    let args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--detach" && a != "-d")
        .collect();
    let peer = detach_peer(&std::env::current_exe()?, paths, &args, DETACHED_READY)?;
    // Its own "Ctrl-C suspends it" line is the foreground's; the last line
    // below says how to stop it now.
    for line in peer.lines.iter().filter(|l| !l.contains("Ctrl-C")) {
        super::say(line);
    }
    super::say(&format!(
        "VM '{name}' runs detached (peer pid {pid}); 'ferry stop {name}' saves it as Ctrl-C would, 'ferry logs {name}' shows its console, the peer's log is {log}",
        name = peer.name,
        pid = peer.pid,
        log = peer.log.display()
    ));
    Ok(ExitCode::SUCCESS)
}
