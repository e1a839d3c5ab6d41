//! `ferry boot-service` (serve) and `ferry boot-service load` (put a
//! static node list into a running service). The work is in
//! `ferry-bootsvc`; this file turns arguments into its options and renders.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use ferry_bootsvc::{BootService, BootServiceConfig, BootSvcError, LoadError};
use ferry_runtime::{Event, EventSink, Paths, RuntimeError};

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Create the components, interfaces and groups of a static node list
    /// (the `ochami discover static` format) in a running service.
    /// Loading the same list again changes nothing.
    Load(LoadArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// The address to listen on (port 0 picks a free port). Beyond
    /// loopback it needs TLS (--tls-cert, --tls-key) or --insecure.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:27778")]
    listen: SocketAddr,
    /// Also serve nodes in plain HTTP on ADDR, any address (iPXE and the
    /// node initramfs cannot do TLS): the boot script, cloud-init, files
    /// and phone-home only; everything else there is refused (403) and
    /// goes to --listen. Nodes are told to use it unless --advertise says
    /// otherwise.
    #[arg(long = "node-listen", value_name = "ADDR")]
    node_listen: Option<SocketAddr>,
    /// Where inventory, boot parameters and cloud-init data are kept
    /// (`state.json`), and the files served under /files (`files/`).
    /// Default: $FERRY_STATE/boot-service.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Writes need `Authorization: Bearer TOKEN`, TOKEN read from FILE;
    /// reads never do.
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The address nodes are told to use, `HOST:PORT` or
    /// `http://HOST:PORT` (default: --node-listen, else the listening
    /// address).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,
    #[command(flatten)]
    tls: super::tls::ServerTlsArgs,
    /// Listen beyond loopback without TLS: tokens and writes travel in
    /// clear text.
    #[arg(long, conflicts_with = "tls_cert")]
    insecure: bool,
}

#[derive(clap::Args, Debug)]
struct LoadArgs {
    /// The node list (YAML: `nodes: [{name, nid, xname, groups,
    /// interfaces: [{mac_addr, ip_addrs: [{name, ip_addr}]}]}]`).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The service's base URL.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:27778")]
    url: String,
    /// The token for writes, read from FILE.
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: super::tls::ClientTlsArgs,
}

pub fn run(args: Args, paths: &Paths, ctx: &super::Ctx) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(Sub::Load(load)) => run_load(load, ctx),
        None => serve(args.serve, paths, ctx),
    }
}

fn bad(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::BadOption(e.to_string())
}

fn serve(args: ServeArgs, paths: &Paths, ctx: &super::Ctx) -> anyhow::Result<ExitCode> {
    let tls = args.tls.config()?;
    if tls.is_none() && !args.listen.ip().is_loopback() {
        if !args.insecure {
            return Err(bad(format!(
                "--listen {}: plain HTTP off loopback sends writes and the token in clear: pass --tls-cert FILE --tls-key FILE (see `ferry tls init`; nodes then use --node-listen), or --insecure",
                args.listen
            ))
            .into());
        }
        ctx.render.emit(Event::Warning {
            message: format!(
                "--insecure: listening on {} without TLS; writes and the token travel in clear text",
                args.listen
            ),
        });
    }
    let told = args.node_listen.unwrap_or(args.listen);
    if told.ip().is_unspecified() && args.advertise.is_none() {
        ctx.render.emit(Event::Warning {
            message: format!(
                "{} {told} without --advertise: nodes are told to use 127.0.0.1, which only this host reaches",
                if args.node_listen.is_some() { "--node-listen" } else { "--listen" },
            ),
        });
    }
    let token = match &args.token_file {
        Some(f) => Some(super::tokens::read_file("--token-file", f)?),
        None => None,
    };
    let guarded = token.is_some();
    let setup = |e: BootSvcError| match e {
        BootSvcError::Setup { .. } | BootSvcError::Serve { .. } => anyhow::Error::from(e),
        e => bad(e).into(),
    };
    let mut service = BootService::bind(BootServiceConfig {
        listen: args.listen,
        store: args
            .store
            .unwrap_or_else(|| paths.state.join("boot-service")),
        token,
        advertise: args.advertise,
    })
    .map_err(setup)?;
    let with_tls = tls.is_some();
    if let Some(tls) = tls {
        service = service.with_tls(tls).map_err(setup)?;
    }
    if let Some(node) = args.node_listen {
        service = service.with_node_listener(node).map_err(setup)?;
    }
    if with_tls && service.node_addr().is_none() {
        ctx.render.emit(Event::Warning {
            message: "--tls-cert without --node-listen: nodes are told an https:// address, which iPXE and the node initramfs cannot use".into(),
        });
    }
    if let Some(node) = service.node_addr() {
        ctx.notice(&format!(
            "nodes' listener (plain HTTP: boot script, cloud-init, files, phone-home): http://{node}"
        ));
    }
    let cancel = ctx.cancel()?;
    let url = service.url();
    ctx.notice(&format!("nodes are told to use {}", service.advertise()));
    if guarded {
        ctx.notice("writes need the token (Authorization: Bearer); reads do not");
    }
    let running = service.spawn()?;
    // Reads never need the token, so not every request does.
    ctx.render.emit(Event::Listening {
        url,
        token_required: false,
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let _guard = cancel.on_cancel(move || {
        let _ = tx.send(());
    });
    if !cancel.is_cancelled() {
        let _ = rx.recv();
    }
    running.stop()?;
    Ok(ExitCode::SUCCESS)
}

fn run_load(args: LoadArgs, ctx: &super::Ctx) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| bad(format!("cannot read {}: {e}", args.file.display())))?;
    let list = ferry_bootsvc::client::parse_node_list(&text).map_err(bad)?;
    let token = match &args.token_file {
        Some(f) => Some(
            super::tokens::read_file("--token-file", f)?
                .expose()
                .to_string(),
        ),
        None => None,
    };
    let tls = args.tls.settings();
    let report = ferry_bootsvc::client::load_tls(&args.url, token.as_deref(), &list, tls.as_ref())
        .map_err(|e| match e {
            LoadError::Parse(_) | LoadError::BadNode { .. } | LoadError::Tls { .. } => {
                anyhow::Error::from(bad(e))
            }
            e => anyhow::Error::from(e),
        })?;
    if ctx.render.json() {
        let mut line = serde_json::to_value(&report)?;
        line["v"] = ferry_runtime::events::EVENTS_VERSION.into();
        line["type"] = "boot-service-load".into();
        line["nodes"] = list.nodes.len().into();
        line["created"] = report.created().into();
        super::render::out(&line.to_string());
    } else {
        ctx.notice(&format!(
            "loaded {} nodes: {} created ({} components, {} interfaces, {} groups, {} memberships), {} components and {} interfaces unchanged",
            list.nodes.len(),
            report.created(),
            report.components_created,
            report.interfaces_created,
            report.groups_created,
            report.members_added,
            report.components_unchanged,
            report.interfaces_unchanged,
        ));
    }
    Ok(ExitCode::SUCCESS)
}
