//! Mirror pods: for every static pod, a pod in the API with the same name and the `kubernetes.io/config.mirror`
//! annotation, owned by the Node, onto which the static pod's status is written.
//!
//! Ref: upstream `pkg/kubelet/pod/mirror_client.go` (create with the Node as controller owner, delete with a UID
//! precondition) and `kubelet.go` `SyncPod` / `HandlePodCleanups`: a mirror pod that is being deleted or whose hash
//! no longer matches is deleted and created again; a mirror pod without a static pod is deleted. So `kubectl
//! delete` of a mirror pod never stops the static pod: the mirror simply comes back. Mirror pods are never run.
//!
//! The API side feeds what the pod watch sees ([`MirrorPods::observe`] and friends), the file source feeds the
//! static pods ([`MirrorPods::set_static`]); [`run`] reconciles the two whenever either changes, and retries
//! while the API server is away.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, Client};
use tokio::sync::Notify;

use super::Shared;
use crate::static_pods::{self, mirror_is_current};

/// How often mirror pods are checked without a change (the API server may have come back).
const RECHECK: Duration = Duration::from_secs(5);

type FullName = (String, String);

fn full_name(pod: &Pod) -> FullName {
    (
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

#[derive(Default)]
struct State {
    /// The static pods by full name; `None` until the file source's first scan.
    statics: Option<BTreeMap<FullName, Pod>>,
    /// Mirror pods in the API bound to this node, by full name, as the pod watch last saw them.
    mirrors: BTreeMap<FullName, Pod>,
    /// Mirror pods seen during a relist (they replace `mirrors` when it completes).
    relisting: Option<BTreeMap<FullName, Pod>>,
    /// The pod watch has listed at least once: absent mirrors are really absent.
    synced: bool,
}

/// The static pods and the mirror pods in the API, shared by the pod watch, the file source and the workers.
#[derive(Default)]
pub(crate) struct MirrorPods {
    state: Mutex<State>,
    wake: Notify,
}

/// What one reconcile round has to do in the API.
#[derive(Debug, PartialEq)]
pub(crate) enum MirrorAction {
    /// Delete this mirror pod (being deleted, out of date, or without a static pod).
    Delete(Pod),
    /// Create the mirror pod of this static pod.
    Create(Pod),
}

impl MirrorPods {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the maps are still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file source's current static pods.
    pub(crate) fn set_static<'a>(&self, pods: impl IntoIterator<Item = &'a Pod>) {
        self.lock().statics = Some(
            pods.into_iter()
                .map(|p| (full_name(p), p.clone()))
                .collect(),
        );
        self.wake.notify_one();
    }

    /// The pod watch starts a (re)list.
    pub(crate) fn relist_started(&self) {
        self.lock().relisting = Some(BTreeMap::new());
    }

    /// The pod watch finished a (re)list: what it saw is now the whole truth.
    pub(crate) fn relist_done(&self) {
        let mut st = self.lock();
        if let Some(seen) = st.relisting.take() {
            st.mirrors = seen;
        }
        st.synced = true;
        drop(st);
        self.wake.notify_one();
    }

    /// A mirror pod seen by the pod watch (added or changed).
    pub(crate) fn observe(&self, pod: Pod) {
        let mut st = self.lock();
        let key = full_name(&pod);
        if let Some(r) = st.relisting.as_mut() {
            r.insert(key.clone(), pod.clone());
        }
        st.mirrors.insert(key, pod);
        drop(st);
        self.wake.notify_one();
    }

    /// A mirror pod the pod watch saw deleted.
    pub(crate) fn forget(&self, pod: &Pod) {
        let mut st = self.lock();
        let key = full_name(pod);
        if st.mirrors.get(&key).map(|m| &m.metadata.uid) == Some(&pod.metadata.uid) {
            st.mirrors.remove(&key);
        }
        drop(st);
        self.wake.notify_one();
    }

    /// The current mirror pod of a static pod: present, not being deleted, carrying the static pod's hash.
    pub(crate) fn mirror_of(&self, static_pod: &Pod) -> Option<Pod> {
        self.lock()
            .mirrors
            .get(&full_name(static_pod))
            .filter(|m| m.metadata.deletion_timestamp.is_none() && mirror_is_current(m, static_pod))
            .cloned()
    }

    /// What the API needs so that every static pod has exactly one current mirror pod and no mirror pod lacks a
    /// static pod. Nothing until both sides are known (the first scan and the first list).
    pub(crate) fn plan(&self) -> Vec<MirrorAction> {
        let st = self.lock();
        let Some(statics) = st.statics.as_ref().filter(|_| st.synced) else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        for (key, mirror) in &st.mirrors {
            let keep = statics.get(key).is_some_and(|sp| {
                mirror.metadata.deletion_timestamp.is_none() && mirror_is_current(mirror, sp)
            });
            if !keep {
                actions.push(MirrorAction::Delete(mirror.clone()));
            }
        }
        for (key, sp) in statics {
            let current = st.mirrors.get(key).is_some_and(|m| {
                m.metadata.deletion_timestamp.is_none() && mirror_is_current(m, sp)
            });
            if !current {
                actions.push(MirrorAction::Create(sp.clone()));
            }
        }
        actions
    }

    fn created(&self, pod: Pod) {
        self.lock().mirrors.insert(full_name(&pod), pod);
    }

    fn deleted(&self, pod: &Pod) {
        self.forget(pod);
    }
}

/// Keeps the mirror pods in line with the static pods until aborted.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mirrors = &shared.mirrors;
    loop {
        let wake = mirrors.wake.notified();
        for action in mirrors.plan() {
            match action {
                MirrorAction::Delete(m) => match delete(&shared.client, &m).await {
                    Ok(()) => {
                        tracing::info!(pod = ?full_name(&m), "mirror pod deleted");
                        mirrors.deleted(&m);
                    }
                    Err(e) => {
                        tracing::warn!(pod = ?full_name(&m), error = %e, "deleting mirror pod failed")
                    }
                },
                MirrorAction::Create(sp) => match create(&shared, &sp).await {
                    Ok(m) => {
                        tracing::info!(pod = ?full_name(&m), uid = m.metadata.uid.as_deref().unwrap_or_default(), "mirror pod created");
                        mirrors.created(m);
                    }
                    // The old mirror may still be on its way out, or the API server away: the next round retries.
                    Err(e) => {
                        tracing::warn!(pod = ?full_name(&sp), error = %e, "creating mirror pod failed")
                    }
                },
            }
        }
        let _ = tokio::time::timeout(RECHECK, wake).await;
    }
}

/// Creates the mirror pod of `static_pod`, owned by this kubelet's Node (upstream looks the Node's UID up for
/// every creation, and so does NodeRestriction).
async fn create(shared: &Shared, static_pod: &Pod) -> Result<Pod, kube::Error> {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let node = nodes.get(&shared.cfg.node_name).await?;
    let node_uid = node.metadata.uid.unwrap_or_default();
    let mirror = static_pods::mirror_pod(static_pod, &shared.cfg.node_name, &node_uid);
    let (ns, _) = full_name(&mirror);
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    api.create(&PostParams::default(), &mirror).await
}

/// Deletes a mirror pod at once (grace period 0) if it is still the one we saw (UID precondition).
async fn delete(client: &Client, mirror: &Pod) -> Result<(), kube::Error> {
    let (ns, name) = full_name(mirror);
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: mirror.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn static_pod(image: &str) -> Pod {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("web.yaml");
        std::fs::write(
            &f,
            format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: w\n    image: {image}\n"),
        )
        .unwrap();
        static_pods::load_file(&f, "n1", Timestamp::now())
            .unwrap()
            .remove(0)
            .pod
    }

    fn in_api(sp: &Pod, uid: &str) -> Pod {
        let mut m = static_pods::mirror_pod(sp, "n1", "node-uid");
        m.metadata.uid = Some(uid.into());
        m
    }

    #[test]
    fn nothing_happens_before_both_the_files_and_the_api_are_known() {
        let m = MirrorPods::default();
        m.set_static([&static_pod("a")]);
        assert!(m.plan().is_empty(), "the pod watch has not listed yet");
        m.relist_started();
        m.relist_done();
        assert!(matches!(m.plan()[..], [MirrorAction::Create(_)]));
    }

    #[test]
    fn a_deleted_or_outdated_mirror_is_replaced_and_an_orphan_goes() {
        let m = MirrorPods::default();
        let sp = static_pod("a");
        m.set_static([&sp]);
        m.relist_started();
        m.observe(in_api(&sp, "u1"));
        m.relist_done();
        assert!(m.plan().is_empty());
        assert!(m.mirror_of(&sp).is_some());

        let mut deleting = in_api(&sp, "u1");
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        m.observe(deleting.clone());
        assert!(m.mirror_of(&sp).is_none());
        assert_eq!(
            m.plan(),
            vec![
                MirrorAction::Delete(deleting),
                MirrorAction::Create(sp.clone())
            ]
        );

        let edited = static_pod("b");
        m.set_static([&edited]);
        let plan = m.plan();
        assert!(
            matches!(plan[..], [MirrorAction::Delete(_), MirrorAction::Create(ref p)] if p == &edited)
        );

        m.set_static([]);
        assert!(matches!(m.plan()[..], [MirrorAction::Delete(_)]));
    }

    #[test]
    fn a_relist_replaces_what_was_seen_before() {
        let m = MirrorPods::default();
        let sp = static_pod("a");
        m.set_static([&sp]);
        m.relist_started();
        m.observe(in_api(&sp, "u1"));
        m.relist_done();
        m.relist_started();
        m.relist_done();
        assert!(m.mirror_of(&sp).is_none(), "gone while the watch was down");
        assert!(matches!(m.plan()[..], [MirrorAction::Create(_)]));
    }
}
