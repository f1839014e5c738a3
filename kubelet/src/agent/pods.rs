//! The pods bound to this node: a watch with `fieldSelector=spec.nodeName=<node>`, one worker task per pod UID
//! fed the newest object through a `watch` channel (so a busy worker only ever sees the latest version, as
//! upstream's pod workers coalesce updates), and clean-up of pods whose sandboxes outlived their API objects.
//!
//! Static pods (from `--pod-manifest-path`) get workers the same way, keyed by their config hash, whether or not
//! the API server answers; a static pod removed from the directory is terminated with its grace period. Mirror
//! pods seen in the watch are never run: they go to [`super::mirror::MirrorPods`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::static_source::StaticPods;
use super::worker::PodWorker;
use super::Shared;
use crate::static_pods::{is_mirror_pod, CONFIG_MIRROR_ANNOTATION};

struct Workers {
    shared: Arc<Shared>,
    senders: HashMap<String, watch::Sender<Option<Pod>>>,
    tasks: JoinSet<String>,
    /// The static pods the file source wants running, by UID.
    desired: StaticPods,
    /// UIDs of static pods with a worker (wanted, or still terminating): never mistaken for API pods.
    static_uids: HashSet<String>,
    /// Static pods being terminated, by UID, with their full names: a new static pod of the same name waits
    /// for them (upstream `allowStaticPodStart`), so an edited host-network pod never races its predecessor for
    /// the node's ports.
    terminating: HashMap<String, (String, String)>,
    /// The mirror pod UID each static pod's worker last heard of: a new mirror (re-created after a delete) wakes
    /// the worker so it writes the status onto it at once, not at its next safety resync.
    mirror_uids: HashMap<String, String>,
}

fn full_name(pod: &Pod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
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
        let static_pod = self.static_uids.contains(uid);
        let worker = PodWorker::new(self.shared.clone(), uid.to_string(), rx, static_pod);
        let uid = uid.to_string();
        self.tasks.spawn(async move {
            worker.run().await;
            uid
        });
    }

    /// Wakes the static pod's worker when `mirror` is a mirror it has not written to yet.
    fn mirror_seen(&mut self, mirror: &Pod) {
        let (Some(hash), Some(mirror_uid)) = (
            mirror
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(CONFIG_MIRROR_ANNOTATION)),
            mirror.metadata.uid.as_ref(),
        ) else {
            return;
        };
        if self.mirror_uids.get(hash) == Some(mirror_uid) {
            return;
        }
        self.mirror_uids.insert(hash.clone(), mirror_uid.clone());
        if let Some(tx) = self.senders.get(hash) {
            // Same pod, new target: `send_modify` wakes the worker whatever it compares.
            tx.send_modify(|_| {});
        }
    }

    /// The file source's new set of static pods: new ones start, removed ones terminate with their grace period
    /// (an edited manifest is both: its hash, and so its UID, changed).
    fn set_statics(&mut self, next: StaticPods) {
        self.shared.mirrors.set_static(next.values());
        let removed: Vec<Pod> = self
            .desired
            .iter()
            .filter(|(uid, _)| !next.contains_key(*uid))
            .map(|(_, p)| p.clone())
            .collect();
        let added: Vec<(String, Pod)> = next
            .iter()
            .filter(|(uid, _)| !self.desired.contains_key(*uid))
            .map(|(u, p)| (u.clone(), p.clone()))
            .collect();
        self.static_uids.extend(next.keys().cloned());
        self.desired = next;
        for pod in removed {
            let Some(uid) = uid_of(&pod) else { continue };
            tracing::info!(pod = %uid, name = pod.metadata.name.as_deref().unwrap_or_default(), "static pod removed");
            self.terminating.insert(uid.clone(), full_name(&pod));
            self.dispatch(&uid, Some(crate::static_pods::deleting(pod)));
        }
        for (uid, pod) in &added {
            if self.waits_for_predecessor(pod) {
                tracing::info!(pod = %uid, "static pod waits for its predecessor to terminate");
            }
        }
        self.start_statics();
    }

    fn waits_for_predecessor(&self, pod: &Pod) -> bool {
        let name = full_name(pod);
        self.terminating.values().any(|n| *n == name)
    }

    /// Starts every wanted static pod that has no worker and no predecessor of its name still terminating.
    fn start_statics(&mut self) {
        let ready: Vec<(String, Pod)> = self
            .desired
            .iter()
            .filter(|(uid, pod)| {
                !self.senders.contains_key(*uid) && !self.waits_for_predecessor(pod)
            })
            .map(|(u, p)| (u.clone(), p.clone()))
            .collect();
        for (uid, pod) in ready {
            self.dispatch(&uid, Some(pod));
        }
    }

    /// A worker finished (its pod is torn down).
    fn finished(&mut self, done: Result<String, tokio::task::JoinError>) {
        match done {
            Ok(uid) => {
                if self.senders.get(&uid).is_some_and(|tx| tx.is_closed()) {
                    self.senders.remove(&uid);
                }
                if !self.static_uids.contains(&uid) {
                    return;
                }
                self.terminating.remove(&uid);
                if !self.desired.contains_key(&uid) {
                    self.static_uids.remove(&uid);
                    self.mirror_uids.remove(&uid);
                }
                // Successors that waited for it, and a static pod that came back (the same manifest again) while
                // its worker was terminating.
                self.start_statics();
            }
            Err(e) if e.is_panic() => tracing::error!(error = %e, "pod worker panicked"),
            Err(_) => {}
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

/// Watches the node's pods (and the static pods from `statics`) until aborted; dropping it aborts every worker
/// (pods keep running).
pub(crate) async fn run(shared: Arc<Shared>, statics: Option<watch::Receiver<StaticPods>>) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let selector = format!("spec.nodeName={}", shared.cfg.node_name);
    let mut stream = watcher::watcher(api, watcher::Config::default().fields(&selector))
        .default_backoff()
        .boxed();
    let mut workers = Workers {
        shared: shared.clone(),
        senders: HashMap::new(),
        tasks: JoinSet::new(),
        desired: StaticPods::new(),
        static_uids: HashSet::new(),
        terminating: HashMap::new(),
        mirror_uids: HashMap::new(),
    };
    // Static pods start at once, before (and without) the API server.
    let (mut statics, mut statics_open) = match statics {
        Some(mut rx) => {
            workers.set_statics(rx.borrow_and_update().clone());
            (rx, true)
        }
        None => {
            shared.mirrors.set_static([]);
            (watch::channel(StaticPods::new()).1, false)
        }
    };
    // UIDs seen in the current (re)list; what the runtime has beyond them is cleaned up after the first list.
    let mut listing: HashSet<String> = HashSet::new();
    let mut first_list = true;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    // Whether pods came or went since the last tick (then freed memory is handed back to the system).
    let mut churn = false;
    loop {
        tokio::select! {
            changed = statics.changed(), if statics_open => {
                match changed {
                    Ok(()) => {
                        let next = statics.borrow_and_update().clone();
                        workers.set_statics(next);
                    }
                    Err(_) => statics_open = false,
                }
            }
            Some(done) = workers.tasks.join_next(), if !workers.tasks.is_empty() => workers.finished(done),
            ev = stream.next() => {
                let Some(ev) = ev else { break };
                churn = true;
                match ev {
                    Ok(Event::Init) => {
                        listing.clear();
                        shared.mirrors.relist_started();
                    }
                    Ok(Event::InitApply(pod) | Event::Apply(pod)) if is_mirror_pod(&pod) => {
                        workers.mirror_seen(&pod);
                        shared.mirrors.observe(pod);
                    }
                    Ok(Event::Delete(pod)) if is_mirror_pod(&pod) => shared.mirrors.forget(&pod),
                    Ok(Event::InitApply(pod)) => {
                        if let Some(uid) = uid_of(&pod).filter(|u| !workers.static_uids.contains(u)) {
                            listing.insert(uid.clone());
                            workers.dispatch(&uid, Some(pod));
                        }
                    }
                    Ok(Event::InitDone) => {
                        // Pods we run that the new list does not have were deleted while we did not watch.
                        let gone: Vec<String> = workers
                            .senders
                            .keys()
                            .filter(|u| !listing.contains(*u) && !workers.static_uids.contains(*u))
                            .cloned()
                            .collect();
                        for uid in gone {
                            workers.dispatch(&uid, None);
                        }
                        shared.mirrors.relist_done();
                        if first_list {
                            first_list = false;
                            let mut keep = listing.clone();
                            keep.extend(workers.static_uids.iter().cloned());
                            adopt_or_clean(&shared, &mut workers, &keep).await;
                        }
                    }
                    // A static pod's UID is its hash: an API pod claiming one must not drive its worker.
                    Ok(Event::Apply(pod)) => {
                        if let Some(uid) = uid_of(&pod).filter(|u| !workers.static_uids.contains(u)) {
                            workers.dispatch(&uid, Some(pod));
                        }
                    }
                    Ok(Event::Delete(pod)) => {
                        if let Some(uid) = uid_of(&pod).filter(|u| !workers.static_uids.contains(u)) {
                            workers.dispatch(&uid, None);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                }
            }
            _ = tick.tick() => {
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
