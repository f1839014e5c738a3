//! The pods bound to this node: a watch with `fieldSelector=spec.nodeName=<node>`, one worker task per pod UID
//! fed the newest object through a `watch` channel (so a busy worker only ever sees the latest version, as
//! upstream's pod workers coalesce updates), and clean-up of pods whose sandboxes outlived their API objects.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::worker::PodWorker;
use super::Shared;

struct Workers {
    shared: Arc<Shared>,
    senders: HashMap<String, watch::Sender<Option<Pod>>>,
    tasks: JoinSet<String>,
}

impl Workers {
    /// Hands `pod` (None: gone from the API) to its worker, starting one if needed.
    fn dispatch(&mut self, uid: &str, pod: Option<Pod>) {
        if let Some(tx) = self.senders.get(uid) {
            if !tx.is_closed() {
                // The worker always reads the newest object, but is woken only by changes that matter to a
                // sync (upstream `podsDifferSemantically`): not by the status patches the kubelet itself makes.
                tx.send_if_modified(|cur| {
                    let wake = differs(cur.as_ref(), pod.as_ref());
                    *cur = pod;
                    wake
                });
                return;
            }
        }
        let (tx, rx) = watch::channel(pod);
        self.senders.insert(uid.to_string(), tx);
        let worker = PodWorker::new(self.shared.clone(), uid.to_string(), rx);
        let uid = uid.to_string();
        self.tasks.spawn(async move {
            worker.run().await;
            uid
        });
    }

    fn reap(&mut self) {
        while let Some(done) = self.tasks.try_join_next() {
            match done {
                Ok(uid) => {
                    if self.senders.get(&uid).is_some_and(|tx| tx.is_closed()) {
                        self.senders.remove(&uid);
                    }
                }
                Err(e) if e.is_panic() => tracing::error!(error = %e, "pod worker panicked"),
                Err(_) => {}
            }
        }
    }
}

/// Whether `new` differs from `old` in anything but status and bookkeeping metadata.
fn differs(old: Option<&Pod>, new: Option<&Pod>) -> bool {
    match (old, new) {
        (Some(a), Some(b)) => {
            let (ma, mb) = (&a.metadata, &b.metadata);
            a.spec != b.spec
                || ma.labels != mb.labels
                || ma.annotations != mb.annotations
                || ma.deletion_timestamp != mb.deletion_timestamp
                || ma.deletion_grace_period_seconds != mb.deletion_grace_period_seconds
                || ma.uid != mb.uid
        }
        (None, None) => false,
        _ => true,
    }
}

fn uid_of(pod: &Pod) -> Option<String> {
    pod.metadata.uid.clone().filter(|u| !u.is_empty())
}

/// Watches the node's pods until aborted; dropping it aborts every worker (pods keep running).
pub(crate) async fn run(shared: Arc<Shared>) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let selector = format!("spec.nodeName={}", shared.cfg.node_name);
    let mut stream = watcher::watcher(api, watcher::Config::default().fields(&selector))
        .default_backoff()
        .boxed();
    let mut workers = Workers {
        shared: shared.clone(),
        senders: HashMap::new(),
        tasks: JoinSet::new(),
    };
    // UIDs seen in the current (re)list; what the runtime has beyond them is cleaned up after the first list.
    let mut listing: HashSet<String> = HashSet::new();
    let mut first_list = true;
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    // Whether pods came or went since the last tick (then freed memory is handed back to the system).
    let mut churn = false;
    loop {
        tokio::select! {
            ev = stream.next() => {
                let Some(ev) = ev else { break };
                churn = true;
                match ev {
                    Ok(Event::Init) => listing.clear(),
                    Ok(Event::InitApply(pod)) => {
                        if let Some(uid) = uid_of(&pod) {
                            listing.insert(uid.clone());
                            workers.dispatch(&uid, Some(pod));
                        }
                    }
                    Ok(Event::InitDone) => {
                        // Pods we run that the new list does not have were deleted while we did not watch.
                        let gone: Vec<String> = workers
                            .senders
                            .keys()
                            .filter(|u| !listing.contains(*u))
                            .cloned()
                            .collect();
                        for uid in gone {
                            workers.dispatch(&uid, None);
                        }
                        if first_list {
                            first_list = false;
                            adopt_or_clean(&shared, &mut workers, &listing).await;
                        }
                    }
                    Ok(Event::Apply(pod)) => {
                        if let Some(uid) = uid_of(&pod) {
                            workers.dispatch(&uid, Some(pod));
                        }
                    }
                    Ok(Event::Delete(pod)) => {
                        if let Some(uid) = uid_of(&pod) {
                            workers.dispatch(&uid, None);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                }
            }
            _ = tick.tick() => {
                workers.reap();
                if std::mem::take(&mut churn) {
                    super::trim_heap();
                }
            }
        }
    }
}

/// At start: sandboxes of pods the API no longer has are torn down (upstream's housekeeping of orphaned pods);
/// those of listed pods are left to their workers, which adopt them as they are.
async fn adopt_or_clean(shared: &Arc<Shared>, workers: &mut Workers, listed: &HashSet<String>) {
    let rt = shared.rt.clone();
    let on_disk = match tokio::task::spawn_blocking(move || rt.sandboxes_by_pod()).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot list sandboxes");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "sandbox listing failed");
            return;
        }
    };
    for uid in on_disk.keys() {
        if listed.contains(uid) {
            tracing::info!(pod = %uid, "adopting running pod");
        } else {
            tracing::info!(pod = %uid, "pod is gone from the API; cleaning up");
            workers.dispatch(uid, None);
        }
    }
    // Pod directories without a sandbox (a kubelet stopped mid-teardown) go too.
    let pods_dir = shared.cfg.root_dir.join("pods");
    if let Ok(entries) = std::fs::read_dir(&pods_dir) {
        for entry in entries.flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            if !listed.contains(&uid) && !on_disk.contains_key(&uid) {
                workers.dispatch(&uid, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};

    fn pod(node: &str, phase: &str) -> Pod {
        Pod {
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn status_only_changes_do_not_wake_a_pod_worker() {
        let a = pod("n1", "Pending");
        let mut b = pod("n1", "Running");
        b.metadata.resource_version = Some("7".into());
        assert!(!differs(Some(&a), Some(&b)));
        let mut deleting = a.clone();
        deleting.metadata.deletion_grace_period_seconds = Some(30);
        assert!(differs(Some(&a), Some(&deleting)));
        assert!(differs(Some(&a), None));
        assert!(differs(Some(&a), Some(&pod("n2", "Pending"))));
    }
}
