//! `ferry operator`: the Kubernetes operator (`crd` prints the CRD, `run`
//! runs the controller); the work is in the `ferry-operator` crate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ferry_operator::{Options, Progress};

use super::render::out;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Verb,
}

#[derive(clap::Subcommand, Debug)]
enum Verb {
    /// Print the Instance CRD (instances.ferry.dev) as YAML, for
    /// `kubectl apply -f -`.
    Crd,
    /// Run the controller: Instances become VMs through the manager.
    Run(Box<RunArgs>),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The manager's API.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:1400")]
    manager: String,
    /// The manager's token, from FILE.
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// TLS to the manager (`ferry manager --tls-cert`).
    #[command(flatten)]
    tls: super::tls::ClientTlsArgs,
    /// Seconds a create or a move may take.
    #[arg(long = "timeout-s", value_name = "S", default_value_t = 900)]
    timeout_s: u64,
    /// The kubeconfig (default: as kubectl: KUBECONFIG, ~/.kube/config,
    /// then the in-cluster service account).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Watch only this namespace (default: all).
    #[arg(long, value_name = "NS")]
    namespace: Option<String>,
    /// Take a Lease before acting, so that of several replicas one acts.
    #[arg(long = "leader-elect")]
    leader_elect: bool,
    /// The Lease's namespace (default: the kubeconfig's, in a pod its own).
    #[arg(long = "lease-namespace", value_name = "NS")]
    lease_namespace: Option<String>,
    /// The Lease's name.
    #[arg(long = "lease-name", default_value = "ferry-operator")]
    lease_name: String,
    /// Seconds the Lease lasts without renewal.
    #[arg(long = "lease-duration-s", value_name = "S", default_value_t = 15)]
    lease_duration_s: u64,
    /// This replica's name in the Lease and in Events (default: the host
    /// name and process id; in a pod, set it to the pod's name).
    #[arg(long, env = "FERRY_OPERATOR_IDENTITY")]
    identity: Option<String>,
    /// Serve Prometheus metrics on ADDR (`/metrics`).
    #[arg(long = "metrics-listen", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "ferry".into());
    format!("{host}-{}", std::process::id())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let a = match args.command {
        Verb::Crd => {
            out(ferry_operator::crd_yaml().trim_end());
            return Ok(ExitCode::SUCCESS);
        }
        Verb::Run(a) => *a,
    };
    let token = a
        .token_file
        .as_deref()
        .map(|f| super::tokens::read_file("--token-file", f))
        .transpose()?
        .map(|t| t.expose().to_string());
    let opts = Options {
        manager_url: a.manager,
        manager_token: token,
        manager_tls: a.tls.settings(),
        op_timeout: Duration::from_secs(a.timeout_s),
        kubeconfig: a.kubeconfig,
        namespace: a.namespace,
        leader_elect: a.leader_elect,
        lease_namespace: a.lease_namespace,
        lease_name: a.lease_name,
        lease_duration: Duration::from_secs(a.lease_duration_s.max(3)),
        identity: a.identity.unwrap_or_else(default_identity),
        metrics_listen: a.metrics_listen,
    };
    let identity = opts.identity.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(ferry_operator::run(opts, |p| match p {
        Progress::Metrics(addr) => out(&format!("metrics on http://{addr}/metrics")),
        Progress::Waiting(holder) => out(&format!("waiting for the lease held by {holder}")),
        Progress::Ready(ns) => out(&format!(
            "ready: {identity} reconciles Instances in {}",
            ns.map(|n| format!("namespace {n}"))
                .unwrap_or_else(|| "every namespace".into())
        )),
    }))?;
    Ok(ExitCode::SUCCESS)
}
