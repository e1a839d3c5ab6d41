//! `ferry worker`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use ferry_control::worker::{self, WorkerConfig};
use ferry_runtime::{Paths, RuntimeError};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// This node's name in the cluster.
    #[arg(long)]
    name: String,
    /// The manager's workers' address (`ferry manager --workers-listen`),
    /// `HOST:PORT` or `https://HOST:PORT`; with several managers
    /// (`--etcd`), each, comma-separated.
    #[arg(long = "control-plane", value_name = "HOST:PORT")]
    control_plane: String,
    /// The interface whose address instances and exposed ports use.
    #[arg(long = "host-interface", value_name = "IF")]
    host_interface: Option<String>,
    /// The address instances and exposed ports use (default: that of
    /// --host-interface).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<IpAddr>,
    /// Seconds this node may stay silent before its instances count as lost.
    #[arg(long = "lease-s", value_name = "S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    lease_s: u64,
    /// The manager's token, from FILE.
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// TLS to the manager (`ferry manager --tls-cert`).
    #[command(flatten)]
    tls: super::tls::ClientTlsArgs,
    /// Trust this CA (PEM) for https:// registries instead of the public
    /// roots, when starting VMs from them (`ferry manager --registry-ca`
    /// for the manager's side).
    #[arg(long = "registry-ca", value_name = "FILE")]
    registry_ca: Option<PathBuf>,
    /// Memory to offer to VMs, MiB (default: the host's).
    #[arg(long = "capacity-mib", value_name = "MIB")]
    capacity_mib: Option<u64>,
    /// Instances serve their migrations only over TLS with this
    /// certificate (`--tls-cert`, `--tls-key`; it must name --advertise),
    /// requiring client certificates signed by `--client-ca`; moves in
    /// dial their source over TLS, trusting --ca and presenting
    /// --client-cert. Give every worker of a cluster TLS, or none.
    #[command(flatten, next_help_heading = "Moves between workers over TLS")]
    peer_tls: super::tls::ServerTlsArgs,
    /// Let instances serve migrations in plain TCP on a non-loopback
    /// address.
    #[arg(long, conflicts_with = "tls_cert")]
    insecure: bool,
    /// Ports instances serve migrations on, FIRST-LAST.
    #[arg(long, value_name = "FIRST-LAST", default_value = "17000-17099")]
    ports: String,
}

pub fn run(args: Args, paths: &Paths, ctx: &super::Ctx) -> anyhow::Result<ExitCode> {
    ferry_runtime::vmdir::validate_name(&args.name)?;
    let advertise = match (args.advertise, &args.host_interface) {
        (Some(a), _) => a,
        (None, Some(i)) => worker::interface_addr(i).ok_or_else(|| {
            RuntimeError::BadOption(format!(
                "--host-interface {i} has no IPv4 address here: check 'ip addr show {i}', or pass --advertise ADDR"
            ))
        })?,
        (None, None) => {
            return Err(RuntimeError::BadOption(
                "give --host-interface IF or --advertise ADDR: the address instances are reached at".into(),
            )
            .into())
        }
    };
    let ports = parse_ports(&args.ports)?;
    let token = args
        .token_file
        .as_deref()
        .map(|f| super::tokens::read_file("--token-file", f))
        .transpose()?
        .map(|t| t.expose().to_string());
    // The files are read and checked now, not at the first move.
    let peer_listen_tls = match (&args.peer_tls.tls_cert, &args.peer_tls.tls_key) {
        (Some(cert), Some(key)) => {
            args.peer_tls.config()?;
            let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            Some(ferry_transport::ServerTlsFiles {
                cert: absolute(cert),
                key: absolute(key),
                client_ca: args.peer_tls.client_ca.as_ref().map(absolute),
            })
        }
        _ => None,
    };
    let peer_tls = match &peer_listen_tls {
        None => None,
        Some(_) => {
            let Some(tls) = args.tls.settings().filter(|t| t.ca.is_some()) else {
                return Err(RuntimeError::BadOption(
                    "--tls-cert: moves between workers are then TLS both ways; give --ca FILE, the CA that signed the other workers' certificates (and --client-cert/--client-key if they ask for one)".into(),
                )
                .into());
            };
            tls.peer()
                .map_err(|e| RuntimeError::BadOption(e.to_string()))?;
            Some(tls)
        }
    };
    if !advertise.is_loopback() && peer_listen_tls.is_none() {
        if !args.insecure {
            return Err(RuntimeError::BadOption(format!(
                "--advertise {advertise}: instances would serve their migrations there in plain TCP (token and memory in clear): pass --tls-cert FILE --tls-key FILE with --ca FILE (see `ferry tls init`), or --insecure, or use a loopback address"
            ))
            .into());
        }
        use ferry_runtime::EventSink;
        ctx.render.emit(ferry_runtime::Event::Warning {
            message: format!(
                "--insecure: instances serve their migrations on {advertise} in plain TCP"
            ),
        });
    }
    // QEMU must be there; each VM then probes its accelerator with its
    // own kernel (`--accel auto`): without a usable /dev/kvm that is TCG.
    super::engine(paths)?;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let accel = if kvm { "auto" } else { "tcg" }.to_string();
    let config = WorkerConfig {
        name: args.name,
        manager: args.control_plane,
        token,
        tls: args.tls.settings(),
        registry_tls: args
            .registry_ca
            .map(|p| std::path::absolute(&p).unwrap_or(p))
            .map(|ca| ferry_transport::ClientTls {
                ca: Some(ca),
                client_cert: None,
                client_key: None,
            }),
        peer_listen_tls,
        peer_tls,
        advertise,
        lease_s: args.lease_s,
        capacity_mib: args.capacity_mib,
        ports,
        ferry: std::env::current_exe()?,
        accel,
        paths: paths.clone(),
    };
    worker::run(config, &ctx.render, &ctx.cancel()?)?;
    Ok(ExitCode::SUCCESS)
}

fn parse_ports(s: &str) -> Result<std::ops::Range<u16>, RuntimeError> {
    let bad =
        || RuntimeError::BadOption(format!("--ports '{s}': use FIRST-LAST, e.g. 17000-17099"));
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a == 0 || b < a || b == u16::MAX {
        return Err(bad());
    }
    Ok(a..b + 1)
}
