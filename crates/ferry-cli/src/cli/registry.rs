//! `ferry registry`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use ferry_transport::{Registry, RegistryConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A package file to serve as /packages/<file name> (repeat, or list
    /// several, for more).
    #[arg(long = "package", value_name = "FILE", required = true, num_args = 1..)]
    packages: Vec<PathBuf>,
    /// The address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Require `Authorization: Bearer TOKEN` on every request.
    #[command(flatten)]
    token: super::tokens::SharedToken,
    /// The registry role's token (reading packages), from FILE: overrides
    /// --token/--token-file here.
    #[arg(long = "registry-token-file", value_name = "FILE")]
    registry_token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: super::tls::ServerTlsArgs,
    /// Serve plain HTTP on an address that is not loopback (packages and
    /// the token then travel in clear).
    #[arg(long, conflicts_with = "tls_cert")]
    insecure: bool,
}

pub fn run(args: Args, ctx: &super::Ctx) -> anyhow::Result<ExitCode> {
    use ferry_runtime::{Event, EventSink};
    let shared = args.token.read()?;
    let token = super::tokens::role(
        "--registry-token-file",
        args.registry_token_file.as_deref(),
        &shared,
    )?;
    let guarded = token.is_some();
    let tls = args.tls.config()?;
    if tls.is_none() && !args.listen.ip().is_loopback() && !args.insecure {
        return Err(ferry_runtime::RuntimeError::BadOption(format!(
            "--listen {}: plain HTTP off loopback sends packages and the token in clear: pass --tls-cert FILE --tls-key FILE (see `ferry tls init`), or --insecure",
            args.listen
        ))
        .into());
    }
    let mut registry = Registry::bind(RegistryConfig {
        packages: args.packages,
        listen: args.listen,
        token,
    })?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Some(tls) = tls {
        registry = registry.with_tls(tls);
    }
    if args.insecure {
        ctx.render.emit(Event::Warning {
            message: format!(
                "--insecure: serving plain HTTP on {}; packages and the token travel in clear",
                args.listen
            ),
        });
    }
    let cancel = ctx.cancel()?;
    for p in registry.packages() {
        ctx.render.emit(Event::RegistryPackage {
            path: p.path.clone(),
            size: p.entry.size,
            table_sha256: p.entry.table_sha256.clone(),
            url: p.entry.url.clone(),
        });
    }
    let url = format!("{scheme}://{}", registry.local_addr());
    let running = registry.spawn()?;
    ctx.render.emit(Event::Listening {
        url,
        token_required: guarded,
    });
    // Serve until Ctrl-C (SIGINT) or SIGTERM.
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
