//! `ferry peer`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_runtime::detach::{launch, DetachSpec, StartFrom};
use ferry_runtime::ops::{peer, PeerOptions};
use ferry_runtime::record::NetSpec;
use ferry_runtime::{Paths, RuntimeError};

use super::render::out;
use super::Ctx;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the VM comes from: `http(s)://…` (a registry root serving one
    /// package, `…/packages/NAME`, or any URL of a package file) to resume
    /// it, or `HOST:PORT` (a peer started with --listen) to live-migrate
    /// the VM running there to this host. A package URL may end in
    /// `#sha256=<table sha256>` (as `ferry inspect` and the registry's
    /// listing show it): any other package is then refused.
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
    #[command(flatten)]
    token: super::tokens::SharedToken,
    /// The registry role's token (reading a package from an http(s)://
    /// --from), from FILE: overrides --token/--token-file for it.
    #[arg(long = "registry-token-file", value_name = "FILE")]
    registry_token_file: Option<PathBuf>,
    /// The migrate role's token (a HOST:PORT --from, and --listen), from
    /// FILE: overrides --token/--token-file for it.
    #[arg(long = "migrate-token-file", value_name = "FILE")]
    migrate_token_file: Option<PathBuf>,
    /// Trust this CA (PEM) for an https:// --from instead of the public
    /// roots (e.g. ca.crt from `ferry tls init`). With a HOST:PORT --from,
    /// migrate over TLS: the source peer's certificate must be signed by
    /// this CA and name HOST.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Present this client certificate (PEM) to an https:// registry or a
    /// TLS source peer that asks for one (its --client-ca).
    #[arg(long = "client-cert", value_name = "FILE", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long = "client-key", value_name = "FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Allow plain TCP/HTTP off loopback (a HOST:PORT --from without
    /// --ca, an http:// --from, --listen on another address without
    /// --tls-cert): the token and the VM's memory then travel in clear.
    #[arg(long)]
    insecure: bool,
    /// Serve --listen only over TLS (and, with --client-ca, only to peers
    /// with a client certificate signed by that CA).
    #[command(flatten)]
    listen_tls: super::tls::ServerTlsArgs,
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
    /// (With an http(s):// --from.)
    #[command(flatten)]
    trust: super::TrustArgs,
    #[command(flatten)]
    net: super::NetArgs,
}

/// The plain (unencrypted) links off loopback that `from` and `listen` ask
/// for, as the flags name them: a HOST:PORT `from` is TLS with `peer_tls`,
/// `listen` with `listen_tls`.
fn plain_off_loopback(
    from: &str,
    listen: Option<SocketAddr>,
    peer_tls: bool,
    listen_tls: bool,
) -> Vec<String> {
    let loopback = |host: &str| {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    let mut plain = Vec::new();
    let https = from.starts_with("https://");
    let peer_over_tls = peer_tls && !from.starts_with("http://") && !https;
    if !https && !peer_over_tls {
        let rest = from.strip_prefix("http://").unwrap_or(from);
        let authority = rest.split('/').next().unwrap_or(rest);
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        };
        if !loopback(host) {
            plain.push(format!("--from {from}"));
        }
    }
    if let Some(l) = listen.filter(|l| !l.ip().is_loopback() && !listen_tls) {
        plain.push(format!("--listen {l}"));
    }
    plain
}

/// `p` made absolute (a detached supervisor runs in '/').
fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

/// How long a detached peer's VM may take to run here (a large package
/// fetched from a registry, or a long migration).
const DETACHED_READY: Duration = Duration::from_secs(1800);

pub fn run(args: Args, paths: &Paths, started: Instant, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let net = args.net.choice()?;
    // Plain links off loopback only when asked for, and said so.
    let from_registry = args.from.starts_with("http://") || args.from.starts_with("https://");
    let client_tls =
        (args.ca.is_some() || args.client_cert.is_some()).then(|| ferry_transport::ClientTls {
            ca: args.ca.clone().map(absolute),
            client_cert: args.client_cert.clone().map(absolute),
            client_key: args.client_key.clone().map(absolute),
        });
    let listen_tls = args
        .listen_tls
        .tls_cert
        .clone()
        .zip(args.listen_tls.tls_key.clone())
        .map(|(cert, key)| ferry_transport::ServerTlsFiles {
            cert: absolute(cert),
            key: absolute(key),
            client_ca: args.listen_tls.client_ca.clone().map(absolute),
        });
    // The files are read now: a bad one fails before any network I/O.
    if let Some(files) = &listen_tls {
        files
            .load()
            .map_err(|e| RuntimeError::BadOption(e.to_string()))?;
    }
    if let Some(t) = client_tls.as_ref().filter(|_| !from_registry) {
        t.peer()
            .map_err(|e| RuntimeError::BadOption(e.to_string()))?;
    }
    let plain = plain_off_loopback(
        &args.from,
        args.listen,
        client_tls.is_some(),
        listen_tls.is_some(),
    );
    if !plain.is_empty() {
        if !args.insecure {
            return Err(RuntimeError::BadOption(format!(
                "{}: plain TCP off loopback sends the token and the VM's memory in clear: use TLS (--ca for a peer --from, --tls-cert for --listen, an https:// registry) or loopback addresses, or pass --insecure",
                plain.join(", ")
            ))
            .into());
        }
        use ferry_runtime::EventSink;
        ctx.render.emit(ferry_runtime::Event::Warning {
            message: format!(
                "--insecure: {} in clear (token and memory)",
                plain.join(", ")
            ),
        });
    }
    // Every token is checked here, before any network I/O.
    let shared = args.token.read()?;
    let registry_token = super::tokens::role(
        "--registry-token-file",
        args.registry_token_file.as_deref(),
        &shared,
    )?;
    let migrate_token = super::tokens::role(
        "--migrate-token-file",
        args.migrate_token_file.as_deref(),
        &shared,
    )?;
    let trust = args.trust.keys()?;
    let opts = PeerOptions {
        from: args.from.clone(),
        trust,
        name: args.name.clone(),
        net,
        listen: args.listen,
        registry_token,
        registry_tls: client_tls.clone().filter(|_| from_registry),
        migrate_token,
        migrate_tls: client_tls.filter(|_| !from_registry),
        listen_tls,
        accel: args.accel.into(),
        console: super::console(args.console || args.enable_input),
        input: args
            .enable_input
            .then(|| Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>),
        save: args.save.clone(),
        started,
        max_bandwidth: args.max_bandwidth.map(|m| m << 20),
    };
    opts.check()?;
    if args.detach {
        return detached(opts, args.accel, paths, ctx);
    }
    let engine = super::engine(paths)?;
    peer(&engine, paths, opts, &ctx.render, &ctx.cancel()?)?;
    Ok(ExitCode::SUCCESS)
}

/// `peer --detach`: the same peer, owned by a supervisor process of its
/// own, started like every detached VM.
fn detached(
    opts: PeerOptions,
    accel: super::AccelArg,
    paths: &Paths,
    ctx: &Ctx,
) -> anyhow::Result<ExitCode> {
    let name = match &opts.name {
        Some(n) => n.clone(),
        None if opts.from_registry() => {
            let remote = ferry_transport::RemotePackage::open_with(
                &opts.from,
                opts.registry_token.as_ref().map(|t| t.expose()),
                opts.registry_tls.as_ref(),
            )?;
            opts.trust.check(remote.index())?;
            let meta = remote.vm_meta()?;
            ferry_runtime::vmdir::generate_name(&meta.recipe)
        }
        None => {
            return Err(RuntimeError::BadOption(
                "peer --detach from another peer needs --name NAME (the supervisor is named before the VM arrives)".into(),
            )
            .into())
        }
    };
    ferry_runtime::vmdir::validate_name(&name)?;
    // The supervisor runs in '/': every path it gets is absolute.
    let save = std::path::absolute(
        opts.save
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{name}.ferry"))),
    )?;
    let spec = DetachSpec {
        name: name.clone(),
        from: StartFrom::Peer {
            source: opts.from.clone(),
            registry_token: opts.registry_token.clone(),
            registry_tls: opts.registry_tls.clone(),
            migrate_token: opts.migrate_token.clone(),
            serve_token: None,
            migrate_tls: opts.migrate_tls.clone(),
            listen_tls: opts.listen_tls.clone(),
            listen: opts.listen,
            save,
            max_bandwidth: opts.max_bandwidth,
            trust: opts.trust.clone(),
        },
        accel: accel.into(),
        net: NetSpec::from_choice(&opts.net),
        fleet: None,
        live_timeout_s: DETACHED_READY.as_secs(),
    };
    let launch = launch(&std::env::current_exe()?, paths, &spec)?;
    let log = launch.log().to_path_buf();
    let started = launch.wait(DETACHED_READY, &ctx.cancel()?, Some(&ctx.render))?;
    if ctx.render.json() {
        use ferry_runtime::EventSink;
        ctx.render.emit(ferry_runtime::Event::Started(started));
        return Ok(ExitCode::SUCCESS);
    }
    out(&format!(
        "VM '{name}' runs detached (peer pid {pid}); 'ferry stop {name}' saves it as Ctrl-C would, 'ferry logs {name}' shows its console, the peer's log is {log}",
        pid = started.pid,
        log = log.display()
    ));
    Ok(ExitCode::SUCCESS)
}
