//! `ferry peer`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use ferry_runtime::peer::{peer, PeerOptions};
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
    #[command(flatten)]
    net: super::NetArgs,
}

pub fn run(args: Args, paths: &Paths, started: Instant) -> anyhow::Result<ExitCode> {
    let net = args.net.choice()?;
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
