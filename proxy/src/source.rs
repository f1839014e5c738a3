//! Where Services and EndpointSlices come from: the [`ServiceSource`] trait and a file-backed implementation.
//!
//! The API watcher (kube-rs) is the production source and plugs in behind the same trait; until it exists the
//! binary can follow a file with a Kubernetes `List` of Services and EndpointSlices (`--services-file`), which
//! the namespace-lab tests use.

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discoveryv1;
use tracing::{info, warn};

use crate::model::{EndpointSliceInfo, ModelEvent, Service, SliceKey};

/// Failure of a source that cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a JSON List of Services and EndpointSlices: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Something that reports the cluster's Services and EndpointSlices as [`ModelEvent`]s.
///
/// `run` blocks until the source ends (or `events` is closed) and sends a `Replace` first (the initial list), then
/// changes. A kube-rs watcher implements it by mapping `watcher::Event`s through [`Service::from_k8s`] and
/// [`EndpointSliceInfo::from_k8s`].
pub trait ServiceSource: Send + 'static {
    fn run(self: Box<Self>, events: Sender<ModelEvent>) -> Result<(), SourceError>;
}

/// Follows a JSON file holding `{"items": [Service..., EndpointSlice...]}` (what `kubectl get svc,endpointslices
/// -A -o json` prints); every change of its modification time replaces the whole model.
pub struct FileSource {
    pub path: PathBuf,
    pub poll: Duration,
}

/// Converts a `List`'s items; objects that do not convert are logged and skipped, as a watcher would.
pub fn parse_list(json: &str) -> Result<ModelEvent, serde_json::Error> {
    let list: serde_json::Value = serde_json::from_str(json)?;
    let mut services = Vec::new();
    let mut slices = Vec::new();
    let items = list
        .get("items")
        .and_then(|i| i.as_array())
        .cloned()
        .unwrap_or_default();
    for item in items {
        match item.get("kind").and_then(|k| k.as_str()) {
            Some("Service") => {
                let svc: corev1::Service = serde_json::from_value(item)?;
                match Service::from_k8s(&svc) {
                    Ok(s) => services.push(s),
                    Err(e) => warn!(error = %e, "skipping Service"),
                }
            }
            Some("EndpointSlice") => {
                let slice: discoveryv1::EndpointSlice = serde_json::from_value(item)?;
                let key = SliceKey {
                    namespace: slice
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    name: slice.metadata.name.clone().unwrap_or_default(),
                };
                match EndpointSliceInfo::from_k8s(&slice) {
                    Ok(Some(info)) => slices.push((key, info)),
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "skipping EndpointSlice"),
                }
            }
            other => {
                warn!(kind = ?other, "skipping an object that is neither a Service nor an EndpointSlice")
            }
        }
    }
    Ok(ModelEvent::Replace { services, slices })
}

impl ServiceSource for FileSource {
    fn run(self: Box<Self>, events: Sender<ModelEvent>) -> Result<(), SourceError> {
        let mut seen: Option<SystemTime> = None;
        loop {
            let mtime = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .map_err(|source| SourceError::Read {
                    path: self.path.clone(),
                    source,
                })?;
            if seen != Some(mtime) {
                let text =
                    std::fs::read_to_string(&self.path).map_err(|source| SourceError::Read {
                        path: self.path.clone(),
                        source,
                    })?;
                match parse_list(&text) {
                    Ok(ev) => {
                        info!(path = %self.path.display(), "services file changed");
                        if events.send(ev).is_err() {
                            return Ok(());
                        }
                        seen = Some(mtime);
                    }
                    // A half-written file: try again at the next poll rather than give up.
                    Err(e) if seen.is_some() => {
                        warn!(error = %e, "cannot parse the services file yet")
                    }
                    Err(source) => {
                        return Err(SourceError::Parse {
                            path: self.path.clone(),
                            source,
                        })
                    }
                }
            }
            std::thread::sleep(self.poll);
        }
    }
}
