//! Shared watch plumbing: a kube-runtime reflector per kind, kept in a [`Store`], that wakes its controller on
//! every change. Controllers here are level-triggered (as upstream's resync): on a wake-up they recompute the
//! desired state from the caches and write only what differs, so a missed or coalesced event costs nothing.

use std::fmt::Debug;
use std::sync::Arc;

use futures_util::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use super::ControllerError;

/// A cache of every `K` in the cluster, filled by a background reflector that notifies `wake` on each event.
/// The reflector retries with backoff on errors (kube-runtime's default), so the cache heals after an API outage.
pub(crate) fn cache<K>(api: Api<K>, wake: Arc<Notify>) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    cache_with(api, watcher::Config::default(), wake)
}

/// [`cache`] of only the objects `config` selects (a field or label selector).
pub(crate) fn cache_with<K>(
    api: Api<K>,
    config: watcher::Config,
    wake: Arc<Notify>,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher::watcher(api, config).default_backoff());
    let task = tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::debug!(error = %e, "watch error; retrying");
            }
            wake.notify_one();
        }
    });
    (reader, task)
}

/// Waits until every cache has listed once.
pub(crate) async fn ready<K>(
    controller: &'static str,
    store: &Store<K>,
) -> Result<(), ControllerError>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store
        .wait_until_ready()
        .await
        .map_err(|e| ControllerError::Watch {
            controller,
            message: e.to_string(),
        })
}

/// Aborts the reflector tasks when the controller stops (its future is dropped on lost leadership).
pub(crate) struct Tasks(pub Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Whether an API error is a 404 / 409 (someone else already did it, or raced us: retry on the next wake-up).
pub(crate) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}
