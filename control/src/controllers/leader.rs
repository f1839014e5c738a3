//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's `leaderelection` package does it, so that
//! of several `windlass-control` processes sharing one etcd exactly one runs the scheduler and controllers.
//!
//! - A candidate reads the Lease every `retry_period`. It takes the Lease when there is none, when the holder
//!   released it (empty `holderIdentity`), or when the record has not changed for `lease_duration` as timed by
//!   the candidate's own clock (client-go's `observedTime`: no trust in other machines' clocks).
//! - The leader renews every `retry_period`; if it cannot renew for `renew_deadline` it steps down.
//! - Writes are optimistic (`resourceVersion`): of two candidates racing for an expired lease one gets a 409.
//! - On shutdown the leader releases the Lease (client-go `ReleaseOnCancel`), so a standby takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use tokio::time::Instant;

/// Where the lease lives and its timing (upstream defaults: 15 s / 10 s / 2 s).
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This process's identity (`holderIdentity`), unique per process.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// Upstream timing for `kube-system/windlass-control`, with `identity`.
    pub fn new(identity: String) -> Self {
        Self {
            namespace: "kube-system".into(),
            name: "windlass-control".into(),
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// One participant in the election.
pub struct LeaderElection {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The last Lease record seen (its resourceVersion) and when we saw it change.
    observed: Option<(String, Instant)>,
}

fn micro_now() -> Option<MicroTime> {
    serde_json::from_value(serde_json::Value::String(
        jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string(),
    ))
    .ok()
}

/// What a candidate should do with the Lease it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Someone else holds a live lease.
    Wait,
    /// Take or renew it; `transition` when the holder changes.
    Write { transition: bool },
}

/// client-go's rule: the lease is ours to take if it is ours already, released, or unchanged for its duration.
pub(crate) fn decide(
    holder: Option<&str>,
    me: &str,
    unchanged_for: Duration,
    duration: Duration,
) -> Decision {
    match holder.filter(|h| !h.is_empty()) {
        Some(h) if h == me => Decision::Write { transition: false },
        Some(_) if unchanged_for < duration => Decision::Wait,
        _ => Decision::Write { transition: true },
    }
}

impl LeaderElection {
    pub fn new(client: kube::Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// One attempt: `Ok(true)` when we hold the lease after it.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let s = &self.settings;
        let now = Instant::now();
        let duration_secs = i32::try_from(s.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(current) = self.api.get_opt(&s.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(s.name.clone()),
                    namespace: Some(s.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(s.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: micro_now(),
                    renew_time: micro_now(),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(l) => {
                    self.observed = Some((l.metadata.resource_version.unwrap_or_default(), now));
                    Ok(true)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let rv = current
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        let since = match &self.observed {
            Some((seen, at)) if *seen == rv => *at,
            _ => {
                self.observed = Some((rv.clone(), now));
                now
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        // The holder's own duration counts (another process may run with other flags).
        let duration = spec
            .lease_duration_seconds
            .and_then(|d| u64::try_from(d).ok())
            .map_or(s.lease_duration, Duration::from_secs);
        let transition = match decide(
            spec.holder_identity.as_deref(),
            &s.identity,
            now - since,
            duration,
        ) {
            Decision::Wait => return Ok(false),
            Decision::Write { transition } => transition,
        };
        let mut new = current.clone();
        let mut ns = spec.clone();
        ns.holder_identity = Some(s.identity.clone());
        ns.lease_duration_seconds = Some(duration_secs);
        ns.renew_time = micro_now();
        if transition {
            ns.acquire_time = micro_now();
            ns.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        new.spec = Some(ns);
        match self
            .api
            .replace(&s.name, &PostParams::default(), &new)
            .await
        {
            Ok(l) => {
                if transition {
                    tracing::info!(lease = %format!("{}/{}", s.namespace, s.name), identity = %s.identity, "acquired the lease");
                }
                self.observed = Some((l.metadata.resource_version.unwrap_or_default(), now));
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up if we hold it (empty holder, 1 s duration, as client-go's release).
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let s = &self.settings;
        let Some(mut current) = self.api.get_opt(&s.name).await? else {
            return Ok(());
        };
        let Some(spec) = current.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(s.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = micro_now();
        spec.acquire_time = micro_now();
        self.api
            .replace(&s.name, &PostParams::default(), &current)
            .await?;
        tracing::info!(identity = %s.identity, "released the lease");
        Ok(())
    }

    /// Waits until this process leads (retrying every `retry_period`).
    pub async fn acquire(&mut self) {
        loop {
            match tokio::time::timeout(self.settings.renew_deadline, self.try_acquire_or_renew())
                .await
            {
                Ok(Ok(true)) => return,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot read or take the lease; retrying")
                }
                Err(_) => tracing::debug!("lease request timed out; retrying"),
            }
            tokio::time::sleep(self.settings.retry_period).await;
        }
    }

    /// Renews every `retry_period`; returns when the lease could not be renewed for `renew_deadline` (or
    /// someone else holds it).
    pub async fn hold(&mut self) {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(self.settings.retry_period).await;
            let left = self.settings.renew_deadline.saturating_sub(last.elapsed());
            match tokio::time::timeout(
                left.max(Duration::from_millis(1)),
                self.try_acquire_or_renew(),
            )
            .await
            {
                Ok(Ok(true)) => last = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::warn!("another process holds the lease now");
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew the lease"),
                Err(_) => tracing::warn!("renewing the lease timed out"),
            }
            if last.elapsed() >= self.settings.renew_deadline {
                tracing::warn!("could not renew the lease within the renew deadline");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn a_live_lease_of_another_holder_is_respected_until_it_goes_stale() {
        assert_eq!(
            decide(Some("b"), "a", Duration::from_secs(14), D),
            Decision::Wait
        );
        assert_eq!(
            decide(Some("b"), "a", D, D),
            Decision::Write { transition: true }
        );
    }

    #[test]
    fn own_or_released_leases_are_taken_at_once() {
        assert_eq!(
            decide(Some("a"), "a", Duration::ZERO, D),
            Decision::Write { transition: false }
        );
        assert_eq!(
            decide(Some(""), "a", Duration::ZERO, D),
            Decision::Write { transition: true }
        );
        assert_eq!(
            decide(None, "a", Duration::ZERO, D),
            Decision::Write { transition: true }
        );
    }
}
