//! Leader election with a `coordination.k8s.io/v1` Lease, so that of
//! several replicas exactly one reconciles.
//!
//! A replica takes the Lease when it is free, expired (its `renewTime` is
//! older than `leaseDurationSeconds`) or already its own, by replacing it
//! at the `resourceVersion` it read: of two replicas racing, the API server
//! lets one write and answers the other 409. The leader renews every third
//! of the duration; a leader that cannot renew within the duration stops
//! acting (the caller exits), before another replica may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// A Lease this replica competes for.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// Leader election failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The Lease could not be read or written.
    #[error("the lease {name}: {source}")]
    Kube {
        /// The Lease.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The lease was lost (another replica holds it, or it could not be
    /// renewed in time).
    #[error("lost the lease {0}: another replica may act now, so this one stops")]
    Lost(String),
}

impl LeaseLock {
    /// The Lease `name` in `namespace`, held as `identity` for `duration`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> LeaseLock {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
    }

    /// Its identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Kube {
            name: self.name.clone(),
            source,
        }
    }

    /// Takes or renews the Lease; whether this replica holds it now, and
    /// who does otherwise.
    pub async fn try_acquire(&self) -> Result<(bool, Option<String>), LeaderError> {
        let now = Timestamp::now();
        let secs = self.duration.as_secs().max(1) as i32;
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.err(e))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok((true, None)),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok((false, None)),
                Err(e) => Err(self.err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(MicroTime(t)), Some(d)) => {
                now.as_millisecond() > t.as_millisecond() + i64::from(d) * 1000
            }
            _ => true,
        };
        if !(mine || holder.is_none() || expired) {
            return Ok((false, holder));
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(secs),
            acquire_time: if mine {
                spec.acquire_time.clone()
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!mine)),
            ..spec
        });
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok((true, None)),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok((false, holder)),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Gives the Lease up (on a clean shutdown), so that another replica
    /// takes it at once instead of after it expires.
    pub async fn release(&self) -> Result<(), LeaderError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.acquire_time = None;
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            // Someone else wrote it meanwhile: it is not ours to give.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<(), LeaderError> {
        let mut said = None;
        loop {
            match self.try_acquire().await {
                Ok((true, _)) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "leading");
                    return Ok(());
                }
                Ok((false, holder)) => {
                    if said != holder {
                        tracing::info!(lease = %self.name, holder = ?holder, "waiting for the lease");
                        said = holder;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews the Lease every third of its duration; returns (with
    /// [`LeaderError::Lost`]) once it is held by another replica or could
    /// not be renewed for most of its duration.
    pub async fn hold(&self) -> LeaderError {
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_acquire().await {
                Ok((true, _)) => last = tokio::time::Instant::now(),
                Ok((false, holder)) => {
                    tracing::error!(holder = ?holder, "the lease is held by another replica");
                    return LeaderError::Lost(self.name.clone());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the lease");
                    // Stop before it can expire for the others.
                    if last.elapsed() > self.duration * 2 / 3 {
                        return LeaderError::Lost(self.name.clone());
                    }
                }
            }
        }
    }
}
