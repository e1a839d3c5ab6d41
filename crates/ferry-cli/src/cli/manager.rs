//! `ferry manager`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ferry_control::manager::{self, ManagerConfig};
use ferry_runtime::{Event, EventSink, Paths, RuntimeError};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The API's address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1400")]
    listen: SocketAddr,
    /// Where workers connect.
    #[arg(
        long = "workers-listen",
        value_name = "ADDR",
        default_value = "127.0.0.1:1399"
    )]
    workers_listen: SocketAddr,
    /// Where the manager keeps its state (default: $FERRY_STATE/manager).
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Every request (API and workers) needs `Authorization: Bearer` with
    /// the token in FILE.
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The registries' token, from FILE: the manager reads package
    /// descriptions with it and hands it to the node that creates.
    #[arg(long = "registry-token-file", value_name = "FILE")]
    registry_token_file: Option<PathBuf>,
    /// Trust this CA (PEM) for https:// registries instead of the public
    /// roots, when reading package descriptions (workers take their own
    /// --registry-ca).
    #[arg(long = "registry-ca", value_name = "FILE")]
    registry_ca: Option<PathBuf>,
    /// TLS on both listeners (the API and the workers' link).
    #[command(flatten)]
    tls: super::tls::ServerTlsArgs,
    /// Listen beyond loopback without TLS (anyone on the network can read
    /// the traffic, the token included).
    #[arg(long, conflicts_with = "tls_cert")]
    insecure: bool,
    /// Keep the records in etcd (`http://HOST:2379[,...]`) instead of
    /// --store: several managers then share them, one leads, and a
    /// follower takes over when the leader is gone.
    #[arg(long, value_name = "URL,...")]
    etcd: Option<String>,
    /// The key prefix in etcd.
    #[arg(
        long = "etcd-prefix",
        value_name = "PREFIX",
        default_value = "/ferry",
        requires = "etcd"
    )]
    etcd_prefix: String,
    /// Seconds the leader's etcd lease lasts: how soon a follower takes
    /// over when the leader dies.
    #[arg(long = "leader-ttl-s", value_name = "S", default_value_t = 5, requires = "etcd", value_parser = clap::value_parser!(u64).range(2..))]
    leader_ttl_s: u64,
    /// The URL clients reach this manager's API at (with --etcd): while
    /// another manager leads, this one redirects API requests to the
    /// leader's (default: http(s)://LISTEN, unless --listen is 0.0.0.0).
    #[arg(long = "api-url", value_name = "URL", requires = "etcd")]
    api_url: Option<String>,
    /// Seconds a create, move or delete may take before the caller gets an
    /// error.
    #[arg(long = "op-timeout-s", value_name = "S", default_value_t = 900)]
    op_timeout_s: u64,
}

pub fn run(args: Args, paths: &Paths, ctx: &super::Ctx) -> anyhow::Result<ExitCode> {
    let tls = args.tls.config()?;
    if tls.is_none() {
        for addr in [args.listen, args.workers_listen] {
            plain_listener_allowed(addr, args.insecure, ctx)?;
        }
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let token = args
        .token_file
        .as_deref()
        .map(|f| super::tokens::read_file("--token-file", f))
        .transpose()?;
    let registry_token = args
        .registry_token_file
        .as_deref()
        .map(|f| super::tokens::read_file("--registry-token-file", f))
        .transpose()?;
    let cancel = ctx.cancel()?;
    let (tx, rx) = tokio_oneshot();
    let _guard = cancel.on_cancel(move || {
        if let Some(tx) = tx.lock().expect("once").take() {
            let _ = tx.send(());
        }
    });
    let config = ManagerConfig {
        listen: args.listen,
        workers_listen: args.workers_listen,
        store: args.store.unwrap_or_else(|| paths.state.join("manager")),
        token: token.clone(),
        op_timeout: Duration::from_secs(args.op_timeout_s),
        registry_timeout: Duration::from_secs(30),
        registry_token,
        registry_tls: args
            .registry_ca
            .map(|p| std::path::absolute(&p).unwrap_or(p))
            .map(|ca| ferry_transport::ClientTls {
                ca: Some(ca),
                client_cert: None,
                client_key: None,
            }),
        tls,
        etcd: args.etcd.map(|endpoints| manager::EtcdConfig {
            endpoints,
            prefix: args.etcd_prefix,
            ttl_s: args.leader_ttl_s,
            api_url: args.api_url,
        }),
    };
    let render = &ctx.render;
    manager::run(
        config,
        async move {
            let _ = rx.await;
        },
        |api, link| {
            render.emit(Event::Listening {
                url: format!("{scheme}://{api}"),
                token_required: token.is_some(),
            });
            render.emit(Event::Notice {
                message: format!("workers connect to {scheme}://{link}"),
            });
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

type Once = std::sync::Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>;

fn tokio_oneshot() -> (Once, tokio::sync::oneshot::Receiver<()>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    (std::sync::Arc::new(std::sync::Mutex::new(Some(tx))), rx)
}

/// Plain HTTP only on loopback, unless `--insecure` says otherwise (and
/// then ferry says so).
pub(super) fn plain_listener_allowed(
    addr: SocketAddr,
    insecure: bool,
    ctx: &super::Ctx,
) -> Result<(), RuntimeError> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if !insecure {
        return Err(RuntimeError::BadOption(format!(
            "{addr} is not a loopback address: pass --tls-cert FILE --tls-key FILE (see `ferry tls init`), or --insecure to serve plain HTTP there anyway, or listen on 127.0.0.1"
        )));
    }
    ctx.render.emit(Event::Warning {
        message: format!("--insecure: serving plain HTTP on {addr}; anyone on that network can read and change the traffic, the token included"),
    });
    Ok(())
}
