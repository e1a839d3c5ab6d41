//! ferry's Kubernetes operator: `Instance` objects (`instances.ferry.dev`)
//! become VMs through `ferry manager`'s API.
//!
//! - [`crd`]: the `Instance` resource, its schema and its YAML.
//! - [`controller`]: the one idempotent reconcile, its finalizer and its
//!   status (server-side apply), conditions and Events.
//! - [`events`]: the manager's event stream as reconcile triggers.
//! - [`leader`]: leader election with a Lease.
//! - [`metrics`]: Prometheus counters.
//! - [`manager`]: the manager's (blocking) client, for async code.
//!
//! `docs/operator.md` explains how it behaves and how it is tested.
#![warn(missing_docs)]

pub mod controller;
pub mod crd;
pub mod events;
pub mod leader;
pub mod manager;
pub mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub use crd::{crd_yaml, Instance, InstanceSpec, InstanceStatus};

/// How to run the operator (`ferry operator run`).
pub struct Options {
    /// The manager's API URL.
    pub manager_url: String,
    /// The manager's token.
    pub manager_token: Option<String>,
    /// TLS to the manager (`--ca`, `--client-cert`, `--client-key`).
    pub manager_tls: Option<ferry_transport::ClientTls>,
    /// How long a create or a move may take.
    pub op_timeout: Duration,
    /// A kubeconfig file (default: as kubectl: `KUBECONFIG`, then
    /// `~/.kube/config`, then the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// Watch this namespace only (default: all).
    pub namespace: Option<String>,
    /// Elect a leader with a Lease before acting.
    pub leader_elect: bool,
    /// The Lease's namespace (default: the kubeconfig's namespace).
    pub lease_namespace: Option<String>,
    /// The Lease's name.
    pub lease_name: String,
    /// How long a Lease lasts without renewal.
    pub lease_duration: Duration,
    /// This replica's identity (in the Lease and in Events).
    pub identity: String,
    /// Where to serve `/metrics` (none: not served).
    pub metrics_listen: Option<SocketAddr>,
}

/// What the operator tells its caller as it starts.
pub enum Progress<'a> {
    /// `/metrics` is served at this address.
    Metrics(SocketAddr),
    /// Waiting for the Lease (held by someone else).
    Waiting(&'a str),
    /// Acting now: leading (or not electing), watching this namespace
    /// (`None`: all).
    Ready(Option<&'a str>),
}

/// The operator failed to start or to keep running.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The kubeconfig could not be read.
    #[error("the kubeconfig: {0}")]
    Kubeconfig(String),
    /// The API server could not be used.
    #[error("the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The `Instance` CRD is not installed.
    #[error("the Instance CRD (instances.ferry.dev) is not there ({0}): install it with `ferry operator crd | kubectl apply -f -`")]
    NoCrd(String),
    /// `/metrics` could not listen.
    #[error("listening for /metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Leader election failed.
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
    /// A TLS file for the manager could not be read.
    #[error(transparent)]
    Tls(#[from] ferry_transport::TlsError),
}

async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client, OperatorError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| OperatorError::Kubeconfig(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| OperatorError::Kubeconfig(e.to_string()))?
        }
        None => Config::infer()
            .await
            .map_err(|e| OperatorError::Kubeconfig(e.to_string()))?,
    };
    Ok(Client::try_from(config)?)
}

/// Runs the operator until SIGINT/SIGTERM (then `Ok`) or until it loses
/// its Lease (then [`leader::LeaderError::Lost`]: the caller exits, and a
/// Deployment starts it again).
pub async fn run(
    opts: Options,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<(), OperatorError> {
    let client = client(opts.kubeconfig.as_ref()).await?;
    let metrics = metrics::Metrics::new();
    if let Some(addr) = opts.metrics_listen {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|source| OperatorError::Metrics { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, m).await {
                tracing::error!(error = %e, "serving /metrics");
            }
        });
        progress(Progress::Metrics(local));
    }
    let api: Api<Instance> = match &opts.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    api.list(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(|e| OperatorError::NoCrd(e.to_string()))?;
    let lock = if opts.leader_elect {
        let ns = opts
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let lock = leader::LeaseLock::new(
            client.clone(),
            &ns,
            &opts.lease_name,
            &opts.identity,
            opts.lease_duration,
        );
        if let Ok((false, Some(holder))) = lock.try_acquire().await {
            progress(Progress::Waiting(&holder));
        }
        lock.acquire().await?;
        metrics.set_leader(true);
        Some(lock)
    } else {
        None
    };
    let manager = manager::Manager::new(
        &opts.manager_url,
        opts.manager_token,
        opts.op_timeout,
        opts.manager_tls.as_ref(),
    )?;
    let triggers = events::follow(&manager, metrics.clone());
    let ctx = Arc::new(controller::Context::new(
        client,
        manager,
        &opts.identity,
        metrics.clone(),
    ));
    progress(Progress::Ready(opts.namespace.as_deref()));
    let controller = controller::run_controller(api, ctx, triggers);
    match lock {
        Some(lock) => {
            tokio::select! {
                _ = controller => {
                    // A clean shutdown: hand the Lease on at once.
                    metrics.set_leader(false);
                    if let Err(e) = lock.release().await {
                        tracing::warn!(error = %e, "releasing the lease");
                    }
                    Ok(())
                }
                lost = lock.hold() => {
                    metrics.set_leader(false);
                    Err(lost.into())
                }
            }
        }
        None => {
            controller.await;
            Ok(())
        }
    }
}
