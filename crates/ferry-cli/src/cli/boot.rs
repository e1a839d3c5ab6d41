//! `ferry boot`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_runtime::ops::{boot, BootOptions, BootSource};
use ferry_runtime::Paths;

use super::Ctx;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The blueprint directory (from 'ferry blueprint build').
    #[arg(
        long,
        required_unless_present = "from_bss",
        conflicts_with = "from_bss"
    )]
    blueprint: Option<PathBuf>,
    /// Boot what a boot service (BSS, 'ferry boot-service') has for --mac:
    /// its base URL, e.g. http://127.0.0.1:27778.
    #[arg(long = "from-bss", value_name = "URL", requires = "mac")]
    from_bss: Option<String>,
    /// With --from-bss: the node's MAC, also the guest NIC's.
    #[arg(long, value_name = "MAC", requires = "from_bss")]
    mac: Option<String>,
    /// With --from-bss: boot as a bare-metal node netboots, through the
    /// NIC's firmware: a PC machine (q35) with a PCI NIC whose boot ROM is
    /// iPXE gets its boot URL from a DHCP server on the VM's network (yours:
    /// e.g. dnsmasq in --netns) and runs the service's boot script. The
    /// script's URLs must be the guest's view: the service advertised at
    /// the guest's gateway (http://172.100.100.1:PORT).
    #[arg(long, requires = "from_bss")]
    netboot: bool,
    /// With an `https://` --from-bss: trust this CA, present a client
    /// certificate.
    #[command(flatten)]
    bss_tls: super::tls::ClientTlsArgs,
    /// The VM's name (default: the recipe's name, or `node`, and a random
    /// suffix).
    #[arg(long)]
    name: Option<String>,
    /// Guest memory in MiB (default: the blueprint's).
    #[arg(long = "memory-size")]
    memory_size: Option<u64>,
    /// Number of vCPUs (default: the blueprint's).
    #[arg(long)]
    cpus: Option<u32>,
    /// Accelerator: auto uses KVM only where it really boots a Linux guest.
    #[arg(long, value_enum, default_value = "auto")]
    accel: super::AccelArg,
    /// Shut down as soon as the service is live.
    #[arg(long = "exit-when-live")]
    exit_when_live: bool,
    /// Seconds to wait for the service (default: the blueprint's).
    #[arg(long = "live-timeout")]
    live_timeout: Option<u64>,
    /// Copy the guest's console to standard error.
    #[arg(long)]
    console: bool,
    #[command(flatten)]
    net: super::NetArgs,
}

pub fn run(args: Args, paths: &Paths, started: Instant, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let engine = super::engine(paths)?;
    let net = args.net.choice()?;
    if args.netboot && matches!(net, ferry_runtime::vm::NetChoice::None) {
        return Err(ferry_runtime::RuntimeError::BadOption(
            "--netboot needs the VM's network (its firmware asks DHCP there): drop --net none"
                .into(),
        )
        .into());
    }
    let source = match (args.blueprint, args.from_bss, args.mac) {
        (Some(bp), _, _) => BootSource::Blueprint(bp),
        (None, Some(url), Some(mac)) => BootSource::Bss {
            url,
            mac,
            netboot: args.netboot,
            tls: args.bss_tls.settings(),
        },
        // clap makes sure one of the two is given.
        _ => unreachable!("--blueprint or --from-bss with --mac"),
    };
    let opts = BootOptions {
        source,
        name: args.name,
        memory_mib: args.memory_size,
        cpus: args.cpus,
        accel: args.accel.into(),
        exit_when_live: args.exit_when_live,
        live_timeout: args.live_timeout.map(Duration::from_secs),
        console: super::console(args.console),
        started,
        net,
    };
    boot(&engine, paths, &opts, &ctx.render, &ctx.cancel()?)?;
    Ok(ExitCode::SUCCESS)
}
