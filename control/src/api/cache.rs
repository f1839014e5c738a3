//! In-memory caches of the objects the API server consults on every request: RBAC roles and bindings (for the
//! authorizer), namespaces (for the "namespace exists and is not terminating" check on create) and service
//! accounts (for service-account token authentication and the ServiceAccount admission plugin), and which bound
//! pods use which secrets and configMaps (for the Node authorizer). Upstream's
//! authorizer and admission plugins read these from informer caches, never from etcd per request (Ref:
//! `plugin/pkg/auth/authorizer/rbac/rbac.go` built on `rbaclisters`, `plugin/pkg/admission/namespace/lifecycle`).
//!
//! Each [`Cache`] lists its key prefix once, then follows the store's watch from the list's revision; when the
//! watch ends (compaction, a broken etcd stream) it lists again. It records the store revision it reflects, so a
//! write made through this server can wait until the cache has seen it: [`SyncedStore`] does that for every write
//! under a cached prefix before acknowledging it, so "create a RoleBinding, then use it" works at once, as
//! upstream's RBAC does within its informer's latency. Writes made elsewhere (another API server on the same etcd)
//! reach the cache through the watch, within milliseconds.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use k8s_openapi::api::rbac::v1::{PolicyRule, RoleRef, Subject};
use serde::Deserialize;

use super::resources;
use crate::store::{
    ChunkedList, Event, KeyValue, ListOptions, ListResult, Revision, Store, StoreError, WatchStream,
};

/// How long a write waits for the caches to see it before it is acknowledged anyway (with a warning): a stuck
/// watch must not stop writes, and the cache catches up once its watch is re-established.
const WRITE_VISIBLE_WITHIN: Duration = Duration::from_secs(5);
/// Pause before listing again after a failed list or a broken watch.
const RELIST_BACKOFF: Duration = Duration::from_millis(200);

/// What a cache keeps of one stored object.
pub(crate) enum Projected<T> {
    Keep(T),
    /// Nothing the server needs (e.g. a pod not bound to a node): not cached.
    Skip,
    /// Not decodable: left out of the cache, with a warning.
    Undecodable,
}

impl<T> From<Option<T>> for Projected<T> {
    fn from(decoded: Option<T>) -> Self {
        decoded.map_or(Projected::Undecodable, Projected::Keep)
    }
}

/// Objects under one store key prefix, projected to what the server needs of them, keyed by store key.
pub(crate) struct Cache<T> {
    prefix: String,
    project: fn(&KeyValue) -> Projected<T>,
    items: RwLock<BTreeMap<String, Arc<T>>>,
    /// The store revision the cache reflects: every write to the prefix up to it has been applied.
    applied: tokio::sync::watch::Sender<Revision>,
}

impl<T: Send + Sync + 'static> Cache<T> {
    fn new(prefix: String, project: fn(&KeyValue) -> Projected<T>) -> Arc<Self> {
        Arc::new(Self {
            prefix,
            project,
            items: RwLock::new(BTreeMap::new()),
            applied: tokio::sync::watch::Sender::new(0),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<T>>> {
        // Writers replace or insert whole entries, so a panic elsewhere cannot leave the map half-updated.
        self.items.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<T>>> {
        self.items.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The object at `key`, if cached.
    pub fn get(&self, key: &str) -> Option<Arc<T>> {
        self.read().get(key).cloned()
    }

    /// Every object whose key starts with `prefix` (the prefix of one namespace, or the whole cache).
    pub fn under(&self, prefix: &str) -> Vec<Arc<T>> {
        self.read()
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The key prefix this cache holds.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn apply(&self, event: &Event) {
        match event {
            Event::Created(kv) | Event::Updated { kv, .. } => {
                let mut items = self.write();
                match (self.project)(kv) {
                    Projected::Keep(v) => {
                        items.insert(kv.key.clone(), Arc::new(v));
                    }
                    Projected::Skip => {
                        items.remove(&kv.key);
                    }
                    Projected::Undecodable => {
                        tracing::warn!(key = %kv.key, "cannot decode a stored object; left out of the cache");
                        items.remove(&kv.key);
                    }
                }
            }
            Event::Deleted { prev, .. } => {
                self.write().remove(&prev.key);
            }
        }
        self.applied.send_if_modified(|r| {
            let rev = event.revision();
            (rev > *r).then(|| *r = rev).is_some()
        });
    }

    /// Lists the prefix into the cache; returns the list's revision.
    async fn relist(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        let list = store.list(&self.prefix, &ListOptions::default()).await?;
        let items: BTreeMap<String, Arc<T>> = list
            .items
            .iter()
            .filter_map(|kv| match (self.project)(kv) {
                Projected::Keep(v) => Some((kv.key.clone(), Arc::new(v))),
                Projected::Skip | Projected::Undecodable => None,
            })
            .collect();
        *self.write() = items;
        self.applied
            .send_if_modified(|r| (list.revision > *r).then(|| *r = list.revision).is_some());
        Ok(list.revision)
    }

    /// List, then follow the watch; list again whenever the watch ends. Runs until aborted.
    async fn run(self: Arc<Self>, store: Arc<dyn Store>, synced: tokio::sync::mpsc::Sender<()>) {
        let mut synced = Some(synced);
        loop {
            let revision = match self.relist(store.as_ref()).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(prefix = %self.prefix, error = %e, "cannot list for the cache; retrying");
                    tokio::time::sleep(RELIST_BACKOFF).await;
                    continue;
                }
            };
            if let Some(tx) = synced.take() {
                let _ = tx.send(()).await;
            }
            let mut stream = match store.watch(&self.prefix, revision + 1).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(prefix = %self.prefix, error = %e, "cannot watch for the cache; relisting");
                    tokio::time::sleep(RELIST_BACKOFF).await;
                    continue;
                }
            };
            while let Some(event) = stream.next().await {
                match event {
                    Ok(event) => self.apply(&event),
                    Err(e) => {
                        tracing::info!(prefix = %self.prefix, error = %e, "cache watch ended; relisting");
                        break;
                    }
                }
            }
            tokio::time::sleep(RELIST_BACKOFF).await;
        }
    }
}

/// The rules of a Role or ClusterRole.
pub(crate) struct Rules(pub Vec<PolicyRule>);

/// A RoleBinding or ClusterRoleBinding: who, and which role.
pub(crate) struct Binding {
    pub subjects: Vec<Subject>,
    pub role_ref: RoleRef,
}

/// Waits until a cache's `applied` revision reaches `revision`; false on timeout.
async fn reflects(
    applied: &tokio::sync::watch::Sender<Revision>,
    revision: Revision,
    within: Duration,
) -> bool {
    let mut rx = applied.subscribe();
    tokio::time::timeout(within, rx.wait_for(|r| *r >= revision))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// What the create path needs of a namespace.
pub(crate) struct NamespaceState {
    /// Being deleted (`deletionTimestamp` set or phase `Terminating`): no new objects may be created in it.
    pub terminating: bool,
}

/// What token authentication and the ServiceAccount admission plugin need of a service account.
pub(crate) struct ServiceAccountState {
    pub uid: String,
    /// `deletionTimestamp` set: its tokens no longer authenticate.
    pub deleting: bool,
    /// `automountServiceAccountToken`, when the service account says.
    pub automount: Option<bool>,
    /// `imagePullSecrets`, as stored (pods without their own get these).
    pub image_pull_secrets: Vec<serde_json::Value>,
}

pub(crate) fn project_service_account(kv: &KeyValue) -> Option<ServiceAccountState> {
    #[derive(Deserialize)]
    struct Meta {
        #[serde(default)]
        uid: String,
        #[serde(rename = "deletionTimestamp")]
        deletion_timestamp: Option<serde_json::Value>,
    }
    #[derive(Deserialize)]
    struct Sa {
        metadata: Meta,
        #[serde(rename = "automountServiceAccountToken")]
        automount: Option<bool>,
        #[serde(rename = "imagePullSecrets", default)]
        image_pull_secrets: Option<Vec<serde_json::Value>>,
    }
    let sa: Sa = serde_json::from_slice(&kv.value).ok()?;
    Some(ServiceAccountState {
        uid: sa.metadata.uid,
        deleting: sa.metadata.deletion_timestamp.is_some_and(|v| !v.is_null()),
        automount: sa.automount,
        image_pull_secrets: sa.image_pull_secrets.unwrap_or_default(),
    })
}

fn project_rules(kv: &KeyValue) -> Option<Rules> {
    #[derive(Deserialize)]
    struct Role {
        #[serde(default)]
        rules: Option<Vec<PolicyRule>>,
    }
    let r: Role = serde_json::from_slice(&kv.value).ok()?;
    Some(Rules(r.rules.unwrap_or_default()))
}

fn project_binding(kv: &KeyValue) -> Option<Binding> {
    #[derive(Deserialize)]
    struct B {
        #[serde(default)]
        subjects: Option<Vec<Subject>>,
        #[serde(rename = "roleRef")]
        role_ref: RoleRef,
    }
    let b: B = serde_json::from_slice(&kv.value).ok()?;
    Some(Binding {
        subjects: b.subjects.unwrap_or_default(),
        role_ref: b.role_ref,
    })
}

fn project_namespace(kv: &KeyValue) -> Option<NamespaceState> {
    #[derive(Deserialize, Default)]
    struct Meta {
        #[serde(rename = "deletionTimestamp")]
        deletion_timestamp: Option<serde_json::Value>,
    }
    #[derive(Deserialize, Default)]
    struct Status {
        phase: Option<String>,
    }
    #[derive(Deserialize)]
    struct Ns {
        #[serde(default)]
        metadata: Meta,
        #[serde(default)]
        status: Option<Status>,
    }
    let ns: Ns = serde_json::from_slice(&kv.value).ok()?;
    let terminating = ns.metadata.deletion_timestamp.is_some_and(|v| !v.is_null())
        || ns.status.and_then(|s| s.phase).as_deref() == Some("Terminating");
    Some(NamespaceState { terminating })
}

/// Every cache the API server keeps.
pub(crate) struct Caches {
    pub cluster_roles: Arc<Cache<Rules>>,
    pub roles: Arc<Cache<Rules>>,
    pub cluster_role_bindings: Arc<Cache<Binding>>,
    pub role_bindings: Arc<Cache<Binding>>,
    pub namespaces: Arc<Cache<NamespaceState>>,
    pub service_accounts: Arc<Cache<ServiceAccountState>>,
    /// Bound pods that use secrets or configMaps, for the Node authorizer. Pod writes do not wait for it (every
    /// pod write would pay for it); a lookup it cannot answer yet falls back to the store.
    pub pod_refs: Arc<Cache<super::node_graph::PodRefs>>,
    tasks: Vec<tokio::task::AbortHandle>,
}

fn prefix_of(group: &str, plural: &str) -> String {
    match resources::find(group, "v1", plural) {
        Some(kind) => kind.prefix(None),
        // Every kind named here is in resources::KINDS; this only keeps the function total.
        None => format!("/registry/{plural}/"),
    }
}

impl Caches {
    /// Starts every cache on `store` and waits until each has listed once (as upstream waits for its informers
    /// to sync before serving).
    pub async fn start(store: Arc<dyn Store>) -> Arc<Self> {
        const RBAC: &str = "rbac.authorization.k8s.io";
        let cluster_roles = Cache::new(prefix_of(RBAC, "clusterroles"), |kv| {
            project_rules(kv).into()
        });
        let roles = Cache::new(prefix_of(RBAC, "roles"), |kv| project_rules(kv).into());
        let cluster_role_bindings = Cache::new(prefix_of(RBAC, "clusterrolebindings"), |kv| {
            project_binding(kv).into()
        });
        let role_bindings = Cache::new(prefix_of(RBAC, "rolebindings"), |kv| {
            project_binding(kv).into()
        });
        let namespaces = Cache::new(prefix_of("", "namespaces"), |kv| {
            project_namespace(kv).into()
        });
        let service_accounts = Cache::new(prefix_of("", "serviceaccounts"), |kv| {
            project_service_account(kv).into()
        });
        let pod_refs = Cache::new(prefix_of("", "pods"), super::node_graph::project_pod_refs);
        let (tx, mut rx) = tokio::sync::mpsc::channel(7);
        let tasks = vec![
            tokio::spawn(cluster_roles.clone().run(store.clone(), tx.clone())).abort_handle(),
            tokio::spawn(roles.clone().run(store.clone(), tx.clone())).abort_handle(),
            tokio::spawn(cluster_role_bindings.clone().run(store.clone(), tx.clone()))
                .abort_handle(),
            tokio::spawn(role_bindings.clone().run(store.clone(), tx.clone())).abort_handle(),
            tokio::spawn(namespaces.clone().run(store.clone(), tx.clone())).abort_handle(),
            tokio::spawn(service_accounts.clone().run(store.clone(), tx.clone())).abort_handle(),
            tokio::spawn(pod_refs.clone().run(store, tx)).abort_handle(),
        ];
        for _ in 0..tasks.len() {
            if rx.recv().await.is_none() {
                break;
            }
        }
        Arc::new(Self {
            cluster_roles,
            roles,
            cluster_role_bindings,
            role_bindings,
            namespaces,
            service_accounts,
            pod_refs,
            tasks,
        })
    }

    /// Waits until the cache holding `key`, if any, reflects revision `revision` (bounded by
    /// [`WRITE_VISIBLE_WITHIN`]).
    async fn written(&self, key: &str, revision: Revision) {
        let applied = [
            (self.cluster_roles.prefix(), &self.cluster_roles.applied),
            (self.roles.prefix(), &self.roles.applied),
            (
                self.cluster_role_bindings.prefix(),
                &self.cluster_role_bindings.applied,
            ),
            (self.role_bindings.prefix(), &self.role_bindings.applied),
            (self.namespaces.prefix(), &self.namespaces.applied),
            (
                self.service_accounts.prefix(),
                &self.service_accounts.applied,
            ),
        ];
        let Some((_, applied)) = applied.into_iter().find(|(p, _)| key.starts_with(p)) else {
            return;
        };
        if !reflects(applied, revision, WRITE_VISIBLE_WITHIN).await {
            tracing::warn!(%key, revision, "the API server's cache has not seen this write yet");
        }
    }
}

impl Drop for Caches {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The store as the API server's handlers use it: a write under a cached prefix is acknowledged only once the
/// caches reflect it, so a client that changed RBAC or a namespace sees the change in its next request.
pub(crate) struct SyncedStore {
    pub inner: Arc<dyn Store>,
    pub caches: Arc<Caches>,
}

#[async_trait]
impl Store for SyncedStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.inner.revision().await
    }

    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Revision), StoreError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str, options: &ListOptions) -> Result<ListResult, StoreError> {
        self.inner.list(prefix, options).await
    }

    async fn list_chunked(&self, prefix: &str, chunk: usize) -> Result<ChunkedList, StoreError> {
        self.inner.list_chunked(prefix, chunk).await
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue, StoreError> {
        let kv = self.inner.create(key, value).await?;
        self.caches.written(key, kv.mod_revision).await;
        Ok(kv)
    }

    async fn create_with_ttl(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<KeyValue, StoreError> {
        let kv = self.inner.create_with_ttl(key, value, ttl).await?;
        self.caches.written(key, kv.mod_revision).await;
        Ok(kv)
    }

    async fn update(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
    ) -> Result<KeyValue, StoreError> {
        let kv = self.inner.update(key, expected, value).await?;
        self.caches.written(key, kv.mod_revision).await;
        Ok(kv)
    }

    async fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> Result<(KeyValue, Revision), StoreError> {
        let (kv, revision) = self.inner.delete(key, expected).await?;
        self.caches.written(key, revision).await;
        Ok((kv, revision))
    }

    async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError> {
        self.inner.watch(prefix, start).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::rbac::{authorize, Attributes};
    use crate::api::User;
    use crate::store::embedded::{EmbeddedOptions, EmbeddedStore};

    fn user(name: &str) -> User {
        User {
            name: name.into(),
            groups: vec!["system:authenticated".into()],
        }
    }

    fn list_pods_in(ns: &str) -> Attributes {
        Attributes {
            verb: "list".into(),
            group: String::new(),
            resource: "pods".into(),
            subresource: None,
            namespace: Some(ns.into()),
            name: None,
            path: None,
        }
    }

    async fn started() -> (Arc<dyn Store>, SyncedStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let inner: Arc<dyn Store> = Arc::new(
            EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open store"),
        );
        let caches = Caches::start(inner.clone()).await;
        let synced = SyncedStore {
            inner: inner.clone(),
            caches,
        };
        (inner, synced, dir)
    }

    fn bytes(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).expect("json")
    }

    #[tokio::test]
    async fn a_binding_written_through_the_server_authorizes_the_next_request() {
        let (_inner, store, _dir) = started().await;
        let alice = user("alice");
        assert!(!authorize(&store.caches, &alice, &list_pods_in("dev")));
        store
            .create(
                "/registry/roles/dev/pod-reader",
                bytes(json!({"metadata": {"name": "pod-reader", "namespace": "dev"},
                    "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]})),
            )
            .await
            .expect("create role");
        let binding = store
            .create(
                "/registry/rolebindings/dev/alice-reads",
                bytes(json!({"metadata": {"name": "alice-reads", "namespace": "dev"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                    "subjects": [{"kind": "User", "name": "alice"}]})),
            )
            .await
            .expect("create binding");
        // No waiting: the write was acknowledged only once the cache had it.
        assert!(authorize(&store.caches, &alice, &list_pods_in("dev")));
        assert!(!authorize(&store.caches, &alice, &list_pods_in("prod")));
        assert!(!authorize(
            &store.caches,
            &user("bob"),
            &list_pods_in("dev")
        ));
        store
            .delete(
                "/registry/rolebindings/dev/alice-reads",
                Some(binding.mod_revision),
            )
            .await
            .expect("delete binding");
        assert!(!authorize(&store.caches, &alice, &list_pods_in("dev")));
    }

    #[tokio::test]
    async fn writes_made_behind_the_servers_back_reach_the_cache_through_the_watch() {
        let (inner, store, _dir) = started().await;
        let kv = inner
            .create(
                "/registry/namespaces/team-a",
                bytes(json!({"metadata": {"name": "team-a"}})),
            )
            .await
            .expect("create namespace");
        assert!(
            reflects(
                &store.caches.namespaces.applied,
                kv.mod_revision,
                Duration::from_secs(5)
            )
            .await,
            "the cache saw the namespace within 5 s"
        );
        let ns = store.caches.namespaces.get("/registry/namespaces/team-a");
        assert!(ns.is_some_and(|n| !n.terminating));
        let kv = inner
            .update(
                "/registry/namespaces/team-a",
                kv.mod_revision,
                bytes(json!({"metadata": {"name": "team-a", "deletionTimestamp": "2026-01-01T00:00:00Z"}})),
            )
            .await
            .expect("mark terminating");
        assert!(
            reflects(
                &store.caches.namespaces.applied,
                kv.mod_revision,
                Duration::from_secs(5)
            )
            .await
        );
        let ns = store.caches.namespaces.get("/registry/namespaces/team-a");
        assert!(ns.is_some_and(|n| n.terminating));
    }
}
