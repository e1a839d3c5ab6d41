//! `ferry net up` / `ferry net down`.

use std::process::ExitCode;

use ferry_net::hostnet::{self, HostNet, NetUpOptions};
use ferry_runtime::Paths;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: NetCommand,
}

#[derive(clap::Subcommand, Debug)]
enum NetCommand {
    /// Make VM namespaces <prefix>0..N-1 with NAT out of a host interface;
    /// runs until Ctrl-C, then removes exactly what it made.
    Up {
        /// Guests reach the outside through this interface.
        #[arg(long = "host-interface", value_name = "IF")]
        host_interface: String,
        /// How many namespaces.
        #[arg(long, default_value_t = 10)]
        namespaces: u32,
        /// Namespace name prefix.
        #[arg(long, default_value = "ferry")]
        prefix: String,
    },
    /// Remove what a crashed 'ferry net up --prefix P' left behind.
    Down {
        /// Namespace name prefix.
        #[arg(long, default_value = "ferry")]
        prefix: String,
    },
}

pub fn run(args: Args, paths: &Paths, ctx: &super::Ctx) -> anyhow::Result<ExitCode> {
    let record_dir = paths.state.join("net");
    match args.command {
        NetCommand::Up {
            host_interface,
            namespaces,
            prefix,
        } => {
            // Signals first: a Ctrl-C during set-up must still tear down.
            let mut signals = signal_hook::iterator::Signals::new([
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
            ])?;
            let net = HostNet::up(&NetUpOptions {
                host_interface: host_interface.clone(),
                namespaces,
                prefix,
                record_dir,
            })?;
            for ns in &net.record().namespaces {
                ctx.notice(&format!(
                    "{}  host link {} {}  (namespace end {})",
                    ns.name,
                    ns.host_veth,
                    ns.subnet(),
                    ns.ns_addr
                ));
            }
            ctx.notice(&format!(
                "ready: {namespaces} namespaces, NAT out of {host_interface}; Ctrl-C removes them"
            ));
            signals.forever().next();
            let made = net.record().namespaces.len();
            net.down()?;
            ctx.notice(&format!("removed {made} namespaces and ferry's rules"));
            Ok(ExitCode::SUCCESS)
        }
        NetCommand::Down { prefix } => {
            match hostnet::down(&record_dir, &prefix)? {
                Some(rec) => ctx.notice(&format!(
                    "removed {} namespaces and ferry's rules for prefix {prefix}",
                    rec.namespaces.len()
                )),
                None => ctx.notice(&format!("nothing to remove for prefix {prefix}")),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
