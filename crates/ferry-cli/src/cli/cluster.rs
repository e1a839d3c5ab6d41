//! `ferry cluster`: a client for `ferry manager`'s API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ferry_control::api::{ClusterEvent, CreateInstance, Instance, Node};
use ferry_control::client::ClusterClient;

use super::render::out;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The manager's API (`http://HOST:1400`, or `https://` when it has
    /// TLS).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:1400")]
    manager: String,
    /// The manager's token, from FILE.
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// TLS to the manager (`ferry manager --tls-cert`).
    #[command(flatten)]
    tls: super::tls::ClientTlsArgs,
    /// Seconds a create, move or delete may take.
    #[arg(long = "timeout-s", value_name = "S", default_value_t = 900)]
    timeout_s: u64,
    #[command(subcommand)]
    command: Verb,
}

#[derive(clap::Subcommand, Debug)]
enum Verb {
    /// List the nodes.
    Nodes,
    /// List the instances.
    Instances,
    /// Create an instance from a registry; returns once it runs.
    Create {
        /// The registry (`HOST:PORT` or a URL).
        source: String,
        /// The node (default: the one with the most free memory).
        #[arg(long)]
        node: Option<String>,
        /// Its name.
        #[arg(long)]
        name: Option<String>,
        /// `HOSTPORT:GUESTPORT` on its node's address. Repeatable.
        #[arg(long, value_name = "HOSTPORT:GUESTPORT")]
        expose: Vec<String>,
    },
    /// Move an instance to another node; returns once it runs there.
    Migrate {
        /// The instance.
        name: String,
        /// The node.
        node: String,
    },
    /// Suspend an instance on its node (its memory and disk saved there);
    /// returns once it is saved.
    Suspend {
        /// The instance.
        name: String,
    },
    /// Resume a suspended instance on its node; returns once it runs.
    Resume {
        /// The instance.
        name: String,
    },
    /// Delete an instance (its VM and its state).
    Delete {
        /// The instance.
        name: String,
    },
    /// Print every change as it happens, until Ctrl-C.
    Watch,
}

pub fn run(args: Args, ctx: &super::Ctx) -> anyhow::Result<ExitCode> {
    let token = args
        .token_file
        .as_deref()
        .map(|f| super::tokens::read_file("--token-file", f))
        .transpose()?
        .map(|t| t.expose().to_string());
    let mut client = ClusterClient::new(&args.manager, token, Duration::from_secs(args.timeout_s));
    if let Some(tls) = args.tls.settings() {
        client = client
            .with_tls(&tls)
            .map_err(|e| ferry_runtime::RuntimeError::BadOption(e.to_string()))?;
    }
    let json = ctx.render.json();
    let print = |value: serde_json::Value, human: String| {
        if json {
            out(&value.to_string());
        } else {
            out(&human);
        }
    };
    match args.command {
        Verb::Nodes => {
            let nodes = client.nodes()?;
            print(serde_json::to_value(&nodes)?, nodes_table(&nodes));
        }
        Verb::Instances => {
            let list = client.instances()?;
            print(serde_json::to_value(&list)?, instances_table(&list));
        }
        Verb::Create {
            source,
            node,
            name,
            expose,
        } => {
            let i = client.create(&CreateInstance {
                source,
                name,
                node,
                expose,
            })?;
            let human = format!(
                "{} runs on {} at {}",
                i.name,
                i.node,
                i.address.as_deref().unwrap_or("?")
            );
            print(serde_json::to_value(&i)?, human);
        }
        Verb::Migrate { name, node } => {
            let i = client.migrate(&name, &node)?;
            let downtime = i
                .moves
                .last()
                .and_then(|m| m.downtime_ms)
                .map(|d| format!(" ({d} ms paused by the engine's count)"))
                .unwrap_or_default();
            let human = format!(
                "{} moved to {} at {}{downtime}",
                i.name,
                i.node,
                i.address.as_deref().unwrap_or("?")
            );
            print(serde_json::to_value(&i)?, human);
        }
        Verb::Suspend { name } => {
            let i = client.suspend(&name)?;
            print(
                serde_json::to_value(&i)?,
                format!("{} suspended on {}", i.name, i.node),
            );
        }
        Verb::Resume { name } => {
            let i = client.resume(&name)?;
            let human = format!(
                "{} runs on {} at {}",
                i.name,
                i.node,
                i.address.as_deref().unwrap_or("?")
            );
            print(serde_json::to_value(&i)?, human);
        }
        Verb::Delete { name } => {
            let i = client.delete(&name)?;
            print(serde_json::to_value(&i)?, format!("deleted {}", i.name));
        }
        Verb::Watch => {
            let cancel = ctx.cancel()?;
            client.watch(|ev| {
                let human = match &ev {
                    ClusterEvent::Node { node } => format!("node {} {:?}", node.name, node.state),
                    ClusterEvent::Instance { instance } => format!(
                        "instance {} {} on {}{}",
                        instance.name,
                        instance.state,
                        instance.node,
                        instance
                            .reason
                            .as_deref()
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    ),
                    ClusterEvent::Deleted { name } => format!("instance {name} deleted"),
                    ClusterEvent::GuestError { name, error, .. } => {
                        super::watch::error_line(name, &error.what)
                    }
                };
                print(serde_json::to_value(&ev).unwrap_or_default(), human);
                !cancel.is_cancelled()
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn nodes_table(nodes: &[Node]) -> String {
    let mut s = format!(
        "{:<16} {:<6} {:<16} {:<5} {:>9} {:>9} {:>9}",
        "NODE", "STATE", "ADDRESS", "ACCEL", "MEM MiB", "FREE MiB", "INSTANCES"
    );
    for n in nodes {
        s.push_str(&format!(
            "\n{:<16} {:<6} {:<16} {:<5} {:>9} {:>9} {:>9}",
            n.name,
            format!("{:?}", n.state).to_lowercase(),
            n.address,
            n.accel,
            n.memory_mib,
            n.free_mib,
            n.instances
        ));
    }
    s
}

fn instances_table(list: &[Instance]) -> String {
    let mut s = format!(
        "{:<20} {:<10} {:<12} {:<22} {}",
        "INSTANCE", "STATE", "NODE", "ADDRESS", "EXPOSES"
    );
    for i in list {
        s.push_str(&format!(
            "\n{:<20} {:<10} {:<12} {:<22} {}{}",
            i.name,
            i.state.to_string(),
            i.node,
            i.address.as_deref().unwrap_or("-"),
            i.exposes.join(","),
            i.reason
                .as_deref()
                .map(|r| format!("  ({r})"))
                .unwrap_or_default()
        ));
    }
    s
}
