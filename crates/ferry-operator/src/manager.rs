//! The manager's API for async code: [`ClusterClient`] is blocking (ferry's
//! runtime is), so each call runs on tokio's blocking pool.

use std::sync::Arc;
use std::time::Duration;

use ferry_control::api::{CreateInstance, Instance, Node};
use ferry_control::client::{ClusterClient, ClusterError};

/// `ferry manager`'s API, shared by every reconcile.
#[derive(Clone)]
pub struct Manager {
    client: Arc<ClusterClient>,
    url: String,
}

/// What a call to the manager came to, beyond success.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The manager could not be reached (or a call could not run).
    #[error("{0}")]
    Unreachable(String),
    /// It answered with an error status.
    #[error("the manager answered {status}: {detail}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// Its problem's detail.
        detail: String,
    },
}

impl From<ClusterError> for ManagerError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Api { status, detail } => ManagerError::Api { status, detail },
            e @ ClusterError::Unreachable { .. } => ManagerError::Unreachable(e.to_string()),
        }
    }
}

impl ManagerError {
    /// The HTTP status, when the manager answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ManagerError::Api { status, .. } => Some(*status),
            ManagerError::Unreachable(_) => None,
        }
    }
}

impl Manager {
    /// The manager at `url`, over TLS with `tls` if given; a create or a
    /// move may take `op_timeout`.
    ///
    /// # Errors
    /// A TLS certificate or key file cannot be read.
    pub fn new(
        url: &str,
        token: Option<String>,
        op_timeout: Duration,
        tls: Option<&ferry_transport::ClientTls>,
    ) -> Result<Manager, ferry_transport::TlsError> {
        let mut client = ClusterClient::new(url, token, op_timeout);
        if let Some(tls) = tls {
            client = client.with_tls(tls)?;
        }
        Ok(Manager {
            client: Arc::new(client),
            url: url.to_string(),
        })
    }

    /// The blocking client itself (the event stream runs on a thread of its
    /// own with it).
    pub fn client(&self) -> Arc<ClusterClient> {
        self.client.clone()
    }

    /// Its URL, as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ClusterClient) -> Result<T, ClusterError> + Send + 'static,
    ) -> Result<T, ManagerError> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || f(&client))
            .await
            .map_err(|e| ManagerError::Unreachable(format!("the call did not finish: {e}")))?
            .map_err(ManagerError::from)
    }

    /// The instance `name`, or none if the manager has no such instance.
    pub async fn instance(&self, name: &str) -> Result<Option<Instance>, ManagerError> {
        let name = name.to_string();
        match self.blocking(move |c| c.instance(&name)).await {
            Ok(i) => Ok(Some(i)),
            Err(ManagerError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every node.
    pub async fn nodes(&self) -> Result<Vec<Node>, ManagerError> {
        self.blocking(|c| c.nodes()).await
    }

    /// Creates an instance; returns once it runs.
    pub async fn create(&self, req: CreateInstance) -> Result<Instance, ManagerError> {
        self.blocking(move |c| c.create(&req)).await
    }

    /// Moves an instance; returns once it runs on `node`.
    pub async fn migrate(&self, name: &str, node: &str) -> Result<Instance, ManagerError> {
        let (name, node) = (name.to_string(), node.to_string());
        self.blocking(move |c| c.migrate(&name, &node)).await
    }

    /// Deletes an instance; `Ok(false)` if there was none.
    pub async fn delete(&self, name: &str) -> Result<bool, ManagerError> {
        let name = name.to_string();
        match self.blocking(move |c| c.delete(&name)).await {
            Ok(_) => Ok(true),
            Err(ManagerError::Api { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
