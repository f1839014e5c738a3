//! The garbage collector: deletes objects whose owners are gone (background propagation), deletes the
//! dependents of an owner deleted in the foreground before letting it go (`foregroundDeletion` finalizer,
//! held by dependents with `blockOwnerDeletion`), and removes the owner reference from dependents of an owner
//! deleted with orphan propagation (`orphan` finalizer) (Ref: kubernetes `pkg/controller/garbagecollector`).
//!
//! It watches every resource that can be listed, watched and deleted, keeps an ownership graph (UIDs only),
//! and checks the live API before acting, so a lagging watch never deletes an object whose owner exists.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    DeleteParams, DynamicObject, Patch, PatchParams, Preconditions, PropagationPolicy,
};
use kube::discovery::{verbs, ApiResource, Discovery, Scope};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::ownership::{is_conflict, is_not_found, FIELD_MANAGER};
use super::{Context, ControllerError, ControllerFuture};

const NAME: &str = "garbagecollector";
pub(crate) const FINALIZER_ORPHAN: &str = "orphan";
pub(crate) const FINALIZER_FOREGROUND: &str = "foregroundDeletion";
/// How often every object with owners is checked again, in case a watch event was lost.
const RESYNC: Duration = Duration::from_secs(30);

/// A kind the API serves that can be listed, watched and deleted.
#[derive(Clone, Debug)]
pub(crate) struct Kind {
    pub resource: ApiResource,
    pub namespaced: bool,
}

impl Kind {
    pub fn api(&self, client: &Client, namespace: Option<&str>) -> Api<DynamicObject> {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &self.resource),
            _ => Api::all_with(client.clone(), &self.resource),
        }
    }
}

/// Every listable, watchable, deletable kind, from discovery.
pub(crate) async fn deletable_kinds(client: &Client) -> Result<Vec<Kind>, kube::Error> {
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut out = Vec::new();
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            if [verbs::LIST, verbs::WATCH, verbs::DELETE]
                .iter()
                .all(|v| caps.supports_operation(v))
            {
                out.push(Kind {
                    resource: ar,
                    namespaced: caps.scope == Scope::Namespaced,
                });
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
struct Node {
    kind: usize,
    namespace: Option<String>,
    name: String,
    owners: Vec<OwnerReference>,
    deleting: bool,
    finalizers: Vec<String>,
}

#[derive(Default)]
struct Graph {
    nodes: HashMap<String, Node>,
    dependents: HashMap<String, HashSet<String>>,
    /// Kinds whose initial list has completed.
    synced: HashSet<usize>,
    /// UIDs listed since the last `Init` of each kind (to drop objects deleted while a watch was down).
    relisting: HashMap<usize, HashSet<String>>,
}

impl Graph {
    fn insert(&mut self, uid: String, node: Node) -> Option<Node> {
        let old = self.nodes.insert(uid.clone(), node.clone());
        if let Some(o) = &old {
            for r in &o.owners {
                if let Some(d) = self.dependents.get_mut(&r.uid) {
                    d.remove(&uid);
                }
            }
        }
        for r in &node.owners {
            self.dependents
                .entry(r.uid.clone())
                .or_default()
                .insert(uid.clone());
        }
        old
    }

    fn remove(&mut self, uid: &str) -> Option<Node> {
        let old = self.nodes.remove(uid)?;
        for r in &old.owners {
            if let Some(d) = self.dependents.get_mut(&r.uid) {
                d.remove(uid);
                if d.is_empty() {
                    self.dependents.remove(&r.uid);
                }
            }
        }
        Some(old)
    }

    fn dependents_of(&self, uid: &str) -> Vec<String> {
        self.dependents
            .get(uid)
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn foreground_deleting(&self, uid: &str) -> bool {
        self.nodes
            .get(uid)
            .is_some_and(|n| n.deleting && n.finalizers.iter().any(|f| f == FINALIZER_FOREGROUND))
    }

    /// Whether this object needs the collector's attention now.
    fn needs_work(&self, uid: &str) -> bool {
        let Some(n) = self.nodes.get(uid) else {
            return false;
        };
        if n.deleting
            && n.finalizers
                .iter()
                .any(|f| f == FINALIZER_ORPHAN || f == FINALIZER_FOREGROUND)
        {
            return true;
        }
        n.owners
            .iter()
            .any(|o| !self.nodes.contains_key(&o.uid) || self.foreground_deleting(&o.uid))
    }
}

struct Collector {
    client: Client,
    kinds: Vec<Kind>,
    graph: Mutex<Graph>,
    queue: mpsc::UnboundedSender<String>,
    queued: Mutex<HashSet<String>>,
}

/// What failed while collecting one object.
#[derive(Debug, thiserror::Error)]
#[error("{action} {object}: {source}")]
struct GcError {
    action: &'static str,
    object: String,
    #[source]
    source: kube::Error,
}

impl Collector {
    fn graph(&self) -> std::sync::MutexGuard<'_, Graph> {
        match self.graph.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn enqueue(&self, uid: String) {
        let fresh = match self.queued.lock() {
            Ok(mut q) => q.insert(uid.clone()),
            Err(p) => p.into_inner().insert(uid.clone()),
        };
        if fresh {
            let _ = self.queue.send(uid);
        }
    }

    fn all_synced(&self) -> bool {
        self.graph().synced.len() == self.kinds.len()
    }

    fn kind_of(&self, api_version: &str, kind: &str) -> Option<usize> {
        self.kinds
            .iter()
            .position(|k| k.resource.api_version == api_version && k.resource.kind == kind)
    }

    fn node_of(&self, kind: usize, obj: &DynamicObject) -> Node {
        Node {
            kind,
            namespace: obj.namespace(),
            name: obj.name_any(),
            owners: obj.owner_references().to_vec(),
            deleting: obj.metadata.deletion_timestamp.is_some(),
            finalizers: obj.finalizers().to_vec(),
        }
    }

    fn on_event(&self, kind: usize, ev: watcher::Event<DynamicObject>) {
        let mut work = Vec::new();
        {
            let mut g = self.graph();
            match ev {
                watcher::Event::Init => {
                    g.relisting.insert(kind, HashSet::new());
                }
                watcher::Event::InitApply(obj) | watcher::Event::Apply(obj) => {
                    let Some(uid) = obj.uid() else { return };
                    if let Some(seen) = g.relisting.get_mut(&kind) {
                        seen.insert(uid.clone());
                    }
                    let node = self.node_of(kind, &obj);
                    let old = g.insert(uid.clone(), node.clone());
                    if g.needs_work(&uid) {
                        work.push(uid.clone());
                    }
                    // An owner waiting in the foreground may be unblocked by a reference going away.
                    if let Some(old) = old {
                        for r in old.owners {
                            if !node.owners.iter().any(|o| o.uid == r.uid)
                                && g.foreground_deleting(&r.uid)
                            {
                                work.push(r.uid);
                            }
                        }
                    }
                    // A new foreground deletion: its dependents go first.
                    if g.foreground_deleting(&uid) {
                        work.extend(g.dependents_of(&uid));
                    }
                }
                watcher::Event::Delete(obj) => {
                    let Some(uid) = obj.uid() else { return };
                    work.extend(self.forget(&mut g, &uid));
                }
                watcher::Event::InitDone => {
                    let listed = g.relisting.remove(&kind).unwrap_or_default();
                    let vanished: Vec<String> = g
                        .nodes
                        .iter()
                        .filter(|(u, n)| n.kind == kind && !listed.contains(*u))
                        .map(|(u, _)| u.clone())
                        .collect();
                    for uid in vanished {
                        work.extend(self.forget(&mut g, &uid));
                    }
                    g.synced.insert(kind);
                    if g.synced.len() == self.kinds.len() {
                        tracing::info!(controller = NAME, objects = g.nodes.len(), "graph synced");
                        work.extend(
                            g.nodes
                                .keys()
                                .filter(|u| g.needs_work(u))
                                .cloned()
                                .collect::<Vec<_>>(),
                        );
                    }
                }
            }
        }
        if self.all_synced() {
            for uid in work {
                self.enqueue(uid);
            }
        }
    }

    /// An object is gone: its dependents may now be dangling, its foreground owners unblocked.
    fn forget(&self, g: &mut Graph, uid: &str) -> Vec<String> {
        let mut work = g.dependents_of(uid);
        if let Some(old) = g.remove(uid) {
            work.extend(
                old.owners
                    .into_iter()
                    .filter(|o| g.foreground_deleting(&o.uid))
                    .map(|o| o.uid),
            );
        }
        work
    }

    fn describe(&self, n: &Node) -> String {
        let kind = &self.kinds[n.kind].resource;
        match &n.namespace {
            Some(ns) => format!("{} {ns}/{}", kind.kind, n.name),
            None => format!("{} {}", kind.kind, n.name),
        }
    }

    async fn get_live(&self, n: &Node, uid: &str) -> Result<Option<DynamicObject>, GcError> {
        let api = self.kinds[n.kind].api(&self.client, n.namespace.as_deref());
        match api.get(&n.name).await {
            Ok(o) if o.uid().as_deref() == Some(uid) => Ok(Some(o)),
            Ok(_) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(source) => Err(GcError {
                action: "read",
                object: self.describe(n),
                source,
            }),
        }
    }

    /// One queued object: finish an orphan or foreground deletion it is in, or delete it if its owners are
    /// gone.
    async fn process(&self, uid: &str) -> Result<(), GcError> {
        let Some(node) = self.graph().nodes.get(uid).cloned() else {
            return Ok(());
        };
        let Some(live) = self.get_live(&node, uid).await? else {
            return Ok(());
        };
        let live_node = self.node_of(node.kind, &live);
        if live_node.deleting {
            if live_node.finalizers.iter().any(|f| f == FINALIZER_ORPHAN) {
                return self.orphan_dependents(&live_node, uid, &live).await;
            }
            if live_node
                .finalizers
                .iter()
                .any(|f| f == FINALIZER_FOREGROUND)
            {
                return self
                    .process_deleting_dependents(&live_node, uid, &live)
                    .await;
            }
            return Ok(());
        }
        if live_node.owners.is_empty() {
            return Ok(());
        }
        self.attempt_to_delete(&live_node, uid, &live).await
    }

    /// Upstream `attemptToDeleteItem`: classify the owners as solid, dangling (gone) or waiting (being deleted
    /// in the foreground), then drop the references to the latter if a solid owner remains, else delete.
    async fn attempt_to_delete(
        &self,
        n: &Node,
        uid: &str,
        live: &DynamicObject,
    ) -> Result<(), GcError> {
        let mut solid = Vec::new();
        let mut dangling = Vec::new();
        let mut waiting = Vec::new();
        for r in &n.owners {
            let Some(k) = self.kind_of(&r.api_version, &r.kind) else {
                // A kind we cannot look up: never delete on a guess.
                solid.push(r.clone());
                continue;
            };
            let owner_ns = self.kinds[k]
                .namespaced
                .then(|| n.namespace.clone())
                .flatten();
            let owner_node = Node {
                kind: k,
                namespace: owner_ns,
                name: r.name.clone(),
                owners: Vec::new(),
                deleting: false,
                finalizers: Vec::new(),
            };
            match self.get_live(&owner_node, &r.uid).await? {
                None => dangling.push(r.clone()),
                Some(o)
                    if o.metadata.deletion_timestamp.is_some()
                        && o.finalizers().iter().any(|f| f == FINALIZER_FOREGROUND) =>
                {
                    waiting.push(r.clone())
                }
                Some(_) => solid.push(r.clone()),
            }
        }
        if !solid.is_empty() {
            if dangling.is_empty() && waiting.is_empty() {
                return Ok(());
            }
            let drop: HashSet<&str> = dangling
                .iter()
                .chain(&waiting)
                .map(|r| r.uid.as_str())
                .collect();
            let keep: Vec<&OwnerReference> = n
                .owners
                .iter()
                .filter(|r| !drop.contains(r.uid.as_str()))
                .collect();
            tracing::info!(controller = NAME, object = %self.describe(n), "removing references to deleted owners");
            return self
                .patch_meta(n, live, json!({"ownerReferences": keep}))
                .await;
        }
        let has_dependents = !self.graph().dependents_of(uid).is_empty();
        let policy = if !waiting.is_empty() && has_dependents {
            // Its owner waits in the foreground and it has dependents of its own: delete it the same way, so
            // the wait covers the whole tree (upstream also unblocks its references first).
            let refs: Vec<OwnerReference> = n
                .owners
                .iter()
                .cloned()
                .map(|mut r| {
                    if waiting.iter().any(|w| w.uid == r.uid) {
                        r.block_owner_deletion = Some(false);
                    }
                    r
                })
                .collect();
            self.patch_meta(n, live, json!({"ownerReferences": refs}))
                .await?;
            PropagationPolicy::Foreground
        } else if n.finalizers.iter().any(|f| f == FINALIZER_ORPHAN) {
            PropagationPolicy::Orphan
        } else if n.finalizers.iter().any(|f| f == FINALIZER_FOREGROUND) {
            PropagationPolicy::Foreground
        } else {
            PropagationPolicy::Background
        };
        tracing::info!(controller = NAME, object = %self.describe(n), ?policy, "deleting: its owners are gone");
        let dp = DeleteParams {
            propagation_policy: Some(policy),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let api = self.kinds[n.kind].api(&self.client, n.namespace.as_deref());
        match api.delete(&n.name, &dp).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) || is_conflict(&e) => Ok(()),
            Err(source) => Err(GcError {
                action: "delete",
                object: self.describe(n),
                source,
            }),
        }
    }

    /// Upstream `orphanDependents` then removal of the `orphan` finalizer.
    async fn orphan_dependents(
        &self,
        n: &Node,
        uid: &str,
        live: &DynamicObject,
    ) -> Result<(), GcError> {
        let dependents = self.graph().dependents_of(uid);
        for d in dependents {
            let Some(dn) = self.graph().nodes.get(&d).cloned() else {
                continue;
            };
            let Some(dlive) = self.get_live(&dn, &d).await? else {
                continue;
            };
            let keep: Vec<OwnerReference> = dlive
                .owner_references()
                .iter()
                .filter(|r| r.uid != uid)
                .cloned()
                .collect();
            if keep.len() != dlive.owner_references().len() {
                self.patch_meta(&dn, &dlive, json!({"ownerReferences": keep}))
                    .await?;
            }
        }
        tracing::info!(controller = NAME, object = %self.describe(n), "dependents orphaned");
        self.remove_finalizer(n, live, FINALIZER_ORPHAN).await
    }

    /// Upstream `processDeletingDependentsItem`: the owner goes once no dependent blocks it; meanwhile its
    /// dependents are deleted.
    async fn process_deleting_dependents(
        &self,
        n: &Node,
        uid: &str,
        live: &DynamicObject,
    ) -> Result<(), GcError> {
        let blocking: Vec<String> = {
            let g = self.graph();
            g.dependents_of(uid)
                .into_iter()
                .filter(|d| {
                    g.nodes.get(d).is_some_and(|dn| {
                        dn.owners
                            .iter()
                            .any(|r| r.uid == uid && r.block_owner_deletion == Some(true))
                    })
                })
                .collect()
        };
        if blocking.is_empty() {
            tracing::info!(controller = NAME, object = %self.describe(n), "dependents gone; finishing foreground deletion");
            return self.remove_finalizer(n, live, FINALIZER_FOREGROUND).await;
        }
        for d in self.graph().dependents_of(uid) {
            self.enqueue(d);
        }
        Ok(())
    }

    async fn remove_finalizer(
        &self,
        n: &Node,
        live: &DynamicObject,
        f: &str,
    ) -> Result<(), GcError> {
        let keep: Vec<&String> = live.finalizers().iter().filter(|x| *x != f).collect();
        self.patch_meta(n, live, json!({"finalizers": keep})).await
    }

    /// A metadata merge patch guarded by the object's UID and resourceVersion (a conflict is retried).
    async fn patch_meta(
        &self,
        n: &Node,
        live: &DynamicObject,
        mut meta: serde_json::Value,
    ) -> Result<(), GcError> {
        meta["uid"] = json!(live.uid());
        meta["resourceVersion"] = json!(live.resource_version());
        let api = self.kinds[n.kind].api(&self.client, n.namespace.as_deref());
        match api
            .patch(
                &n.name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Merge(json!({"metadata": meta})),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(GcError {
                action: "update",
                object: self.describe(n),
                source,
            }),
        }
    }
}

pub(crate) fn start(ctx: Context) -> ControllerFuture {
    Box::pin(run(ctx.client))
}

async fn run(client: Client) -> Result<(), ControllerError> {
    let kinds = deletable_kinds(&client)
        .await
        .map_err(|source| ControllerError::Api {
            controller: NAME,
            source,
        })?;
    tracing::info!(controller = NAME, kinds = kinds.len(), "starting");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let gc = Arc::new(Collector {
        client: client.clone(),
        kinds: kinds.clone(),
        graph: Mutex::new(Graph::default()),
        queue: tx,
        queued: Mutex::new(HashSet::new()),
    });
    let worker = {
        let gc = gc.clone();
        async move {
            while let Some(uid) = rx.recv().await {
                match gc.queued.lock() {
                    Ok(mut q) => q.remove(&uid),
                    Err(p) => p.into_inner().remove(&uid),
                };
                if let Err(e) = gc.process(&uid).await {
                    let retriable = is_conflict(&e.source);
                    if !retriable {
                        tracing::warn!(controller = NAME, error = %e, "retrying");
                    }
                    let gc = gc.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(if retriable {
                            100
                        } else {
                            1000
                        }))
                        .await;
                        gc.enqueue(uid);
                    });
                }
            }
        }
    };
    let resync = {
        let gc = gc.clone();
        async move {
            loop {
                tokio::time::sleep(RESYNC).await;
                if !gc.all_synced() {
                    continue;
                }
                let work: Vec<String> = {
                    let g = gc.graph();
                    g.nodes
                        .keys()
                        .filter(|u| g.needs_work(u))
                        .cloned()
                        .collect()
                };
                for uid in work {
                    gc.enqueue(uid);
                }
            }
        }
    };
    let events = stream::select_all(kinds.iter().enumerate().map(|(i, k)| {
        watcher(k.api(&client, None), watcher::Config::default())
            .default_backoff()
            .map(move |ev| (i, ev))
            .boxed()
    }));
    let watch = {
        let gc = gc.clone();
        events.for_each(move |(i, ev)| {
            match ev {
                Ok(ev) => gc.on_event(i, ev),
                Err(e) => tracing::debug!(controller = NAME, error = %e, "watch error; retrying"),
            }
            futures_util::future::ready(())
        })
    };
    tokio::select! {
        () = watch => {}
        () = worker => {}
        () = resync => {}
    }
    Err(ControllerError::Watch {
        controller: NAME,
        message: "the watches ended".into(),
    })
}
