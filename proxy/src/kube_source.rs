//! The production [`ServiceSource`]: watches Services and EndpointSlices on the API server with kube-rs.
//!
//! Nothing is sent until both initial lists are complete, then one `Replace` with both, so the first sync never
//! sees Services without their endpoints (which would reject their traffic for a moment). After that each watch
//! event becomes one model event; a re-list (watch restarted) replaces that kind's objects wholesale.

use std::path::PathBuf;
use std::sync::mpsc::Sender;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discoveryv1;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::model::{
    EndpointSliceInfo, ModelEvent, Service, ServiceName, SliceKey, SERVICE_NAME_LABEL,
};
use crate::source::{ServiceSource, SourceError};

/// Watches an API server given by a kubeconfig (or the in-cluster / default configuration when `None`).
pub struct KubeSource {
    pub kubeconfig: Option<PathBuf>,
}

// Items are moved once from the stream into the mapper; boxing them would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
enum Item {
    Svc(watcher::Event<corev1::Service>),
    Slice(watcher::Event<discoveryv1::EndpointSlice>),
}

fn svc_name(s: &corev1::Service) -> ServiceName {
    ServiceName::new(
        s.metadata.namespace.as_deref().unwrap_or("default"),
        s.metadata.name.as_deref().unwrap_or_default(),
    )
}

fn slice_key(s: &discoveryv1::EndpointSlice) -> SliceKey {
    SliceKey {
        namespace: s
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: s.metadata.name.clone().unwrap_or_default(),
    }
}

fn convert_service(s: &corev1::Service) -> Option<Service> {
    Service::from_k8s(s)
        .map_err(|e| warn!(error = %e, "skipping Service"))
        .ok()
}

fn convert_slice(s: &discoveryv1::EndpointSlice) -> Option<(SliceKey, EndpointSliceInfo)> {
    match EndpointSliceInfo::from_k8s(s) {
        Ok(Some(info)) => Some((slice_key(s), info)),
        Ok(None) => None,
        Err(e) => {
            warn!(error = %e, "skipping EndpointSlice");
            None
        }
    }
}

/// Turns watch events into model events; buffers the initial lists (see the module docs).
#[derive(Default)]
pub(crate) struct EventMapper {
    services: Option<Vec<Service>>,
    slices: Option<Vec<(SliceKey, EndpointSliceInfo)>>,
    svc_listing: Vec<Service>,
    slice_listing: Vec<(SliceKey, EndpointSliceInfo)>,
    started: bool,
    /// Per-object events of a kind whose list is done, while the other kind's list is still running.
    early: Vec<ModelEvent>,
}

impl EventMapper {
    fn map(&mut self, item: Item) -> Vec<ModelEvent> {
        let mut out = Vec::new();
        match item {
            Item::Svc(watcher::Event::Init) => self.svc_listing.clear(),
            Item::Svc(watcher::Event::InitApply(s)) => self.svc_listing.extend(convert_service(&s)),
            Item::Svc(watcher::Event::InitDone) => {
                self.services = Some(std::mem::take(&mut self.svc_listing));
            }
            Item::Svc(watcher::Event::Apply(s)) => {
                out.extend(convert_service(&s).map(ModelEvent::ServiceUpsert))
            }
            Item::Svc(watcher::Event::Delete(s)) => {
                out.push(ModelEvent::ServiceDelete(svc_name(&s)))
            }
            Item::Slice(watcher::Event::Init) => self.slice_listing.clear(),
            Item::Slice(watcher::Event::InitApply(s)) => {
                self.slice_listing.extend(convert_slice(&s))
            }
            Item::Slice(watcher::Event::InitDone) => {
                self.slices = Some(std::mem::take(&mut self.slice_listing));
            }
            Item::Slice(watcher::Event::Apply(s)) => match convert_slice(&s) {
                Some((k, info)) => out.push(ModelEvent::SliceUpsert(k, info)),
                // A slice that stopped being usable (e.g. its label was removed) must not keep old endpoints.
                None => out.push(ModelEvent::SliceDelete(slice_key(&s))),
            },
            Item::Slice(watcher::Event::Delete(s)) => {
                out.push(ModelEvent::SliceDelete(slice_key(&s)))
            }
        }
        if !self.started {
            self.early.append(&mut out);
            if self.services.is_some() && self.slices.is_some() {
                self.started = true;
                out.push(ModelEvent::Replace {
                    services: self.services.take().unwrap_or_default(),
                    slices: self.slices.take().unwrap_or_default(),
                });
                // Events that came after their kind's list are newer than it: apply them after the Replace.
                out.append(&mut self.early);
            }
            return out;
        }
        // A re-list after start-up (the watch restarted): replace that kind only.
        if let Some(services) = self.services.take() {
            out.push(ModelEvent::ReplaceServices(services));
        }
        if let Some(slices) = self.slices.take() {
            out.push(ModelEvent::ReplaceSlices(slices));
        }
        out
    }
}

async fn client(kubeconfig: Option<PathBuf>) -> Result<Client, SourceError> {
    windlass_kubeclient::client(kubeconfig.as_deref(), "windlass-proxy")
        .await
        .map_err(|e| SourceError::Kube(e.to_string()))
}

impl ServiceSource for KubeSource {
    fn run(self: Box<Self>, events: Sender<ModelEvent>) -> Result<(), SourceError> {
        // Called on a blocking thread of the proxy's runtime: drive the watchers on that runtime.
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| SourceError::Kube(format!("no async runtime: {e}")))?;
        handle.block_on(async move {
            let client = client(self.kubeconfig).await?;
            info!("watching Services and EndpointSlices");
            let services = watcher(
                Api::<corev1::Service>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .map_ok(Item::Svc);
            // Only slices owned by a Service matter. Ref: kube-proxy selects on the same label.
            let slices = watcher(
                Api::<discoveryv1::EndpointSlice>::all(client),
                watcher::Config::default().labels(SERVICE_NAME_LABEL),
            )
            .default_backoff()
            .map_ok(Item::Slice);
            let mut stream = futures::stream::select(services.boxed(), slices.boxed());
            let mut mapper = EventMapper::default();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(item) => {
                        for ev in mapper.map(item) {
                            if events.send(ev).is_err() {
                                return Ok(());
                            }
                        }
                    }
                    // The watcher retries (with backoff) on the next poll; log and keep going, as kube-proxy does.
                    Err(e) => warn!(error = %e, "watch error"),
                }
            }
            Err(SourceError::Kube("watch streams ended".into()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> corev1::Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "d", "name": name},
            "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}
        }))
        .expect("service")
    }

    fn slice(name: &str, service: &str) -> discoveryv1::EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "d", "name": name, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.2"]}]
        }))
        .expect("slice")
    }

    #[test]
    fn nothing_is_emitted_until_both_initial_lists_are_complete() {
        let mut m = EventMapper::default();
        assert!(m.map(Item::Svc(watcher::Event::Init)).is_empty());
        assert!(m
            .map(Item::Svc(watcher::Event::InitApply(svc("a"))))
            .is_empty());
        assert!(m.map(Item::Svc(watcher::Event::InitDone)).is_empty());
        assert!(
            m.map(Item::Svc(watcher::Event::Apply(svc("b")))).is_empty(),
            "held back until the slices are listed"
        );
        assert!(m.map(Item::Slice(watcher::Event::Init)).is_empty());
        assert!(m
            .map(Item::Slice(watcher::Event::InitApply(slice("a-1", "a"))))
            .is_empty());
        let out = m.map(Item::Slice(watcher::Event::InitDone));
        match out.as_slice() {
            [ModelEvent::Replace { services, slices }, ModelEvent::ServiceUpsert(b)] => {
                assert_eq!(services.len(), 1);
                assert_eq!(slices.len(), 1);
                assert_eq!(b.name.name, "b", "the held-back event follows the Replace");
            }
            other => panic!("expected Replace then the held-back upsert, got {other:?}"),
        }
        // Afterwards, one model event per watch event; a re-list replaces that kind only.
        assert!(matches!(
            m.map(Item::Svc(watcher::Event::Apply(svc("c")))).as_slice(),
            [ModelEvent::ServiceUpsert(_)]
        ));
        assert!(matches!(
            m.map(Item::Slice(watcher::Event::Delete(slice("a-1", "a"))))
                .as_slice(),
            [ModelEvent::SliceDelete(_)]
        ));
        assert!(m.map(Item::Slice(watcher::Event::Init)).is_empty());
        assert!(matches!(
            m.map(Item::Slice(watcher::Event::InitDone)).as_slice(),
            [ModelEvent::ReplaceSlices(s)] if s.is_empty()
        ));
    }
}
