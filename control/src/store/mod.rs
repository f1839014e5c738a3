//! The store layer: one [`Store`] trait, several backends.
//!
//! The API server is the only component that talks to the store, and it needs exactly what it needs from etcd
//! (Ref: kubernetes `staging/src/k8s.io/apiserver/pkg/storage/etcd3/store.go`): a flat, ordered key space with
//! one global, monotonically increasing revision; every write bumps it and stamps the written key with it (its
//! *mod revision*, which becomes the object's `resourceVersion`); creates that fail when the key exists;
//! compare-and-swap updates and deletes on the mod revision (optimistic concurrency, HTTP 409 upstream); prefix
//! lists that report the store revision they were read at (the list's `resourceVersion`); and watches that replay
//! every change from a given revision on, in revision order, or fail with [`StoreError::Compacted`] when that
//! history is gone (HTTP 410 Gone / `Expired` upstream).
//!
//! Backends: [`embedded`] (default; redb on local disk) and [`etcd`]. Both must pass the generic suite in
//! [`conformance`]. [`open`] picks one from a [`StoreConfig`], in one place.

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::Stream;

pub mod embedded;
pub mod etcd;
pub mod snapshot;
mod wal;

#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;

/// A store revision (etcd's `int64` revision). Revision 0 means "nothing written yet"; the first write is 1.
pub type Revision = i64;

/// One key with its value and the revisions etcd would report for it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created this key (since it last did not exist).
    pub create_revision: Revision,
    /// Revision of the last write to this key: the object's `resourceVersion`.
    pub mod_revision: Revision,
    /// Number of writes to this key since it was created (1 after the create), as etcd's `version`.
    pub version: i64,
}

impl fmt::Debug for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &self.key)
            .field("value_len", &self.value.len())
            .field("create_revision", &self.create_revision)
            .field("mod_revision", &self.mod_revision)
            .field("version", &self.version)
            .finish()
    }
}

/// Options of a prefix list.
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    /// At most this many items (`None` or `Some(0)`: all).
    pub limit: Option<usize>,
    /// Only keys strictly greater than this one (the continue point of a paginated list).
    pub start_after: Option<String>,
}

/// The result of a prefix list.
#[derive(Clone, Debug)]
pub struct ListResult {
    /// The keys under the prefix, in key order.
    pub items: Vec<KeyValue>,
    /// The store revision this list was read at.
    pub revision: Revision,
    /// Whether more keys under the prefix follow the last returned one (then list again with `start_after`).
    pub more: bool,
    /// How many keys under the prefix follow the last returned one (upstream `remainingItemCount`), if known.
    pub remaining: Option<u64>,
}

/// One change seen by a watch. Every event carries the revision of the write that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key did not exist before this write.
    Created(KeyValue),
    /// The key existed and was overwritten.
    Updated { prev: KeyValue, kv: KeyValue },
    /// The key was deleted at `revision`; `prev` is its last value.
    Deleted { prev: KeyValue, revision: Revision },
}

impl Event {
    /// The revision of the write behind this event.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Created(kv) | Event::Updated { kv, .. } => kv.mod_revision,
            Event::Deleted { revision, .. } => *revision,
        }
    }

    /// The key this event is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Created(kv) | Event::Updated { kv, .. } => &kv.key,
            Event::Deleted { prev, .. } => &prev.key,
        }
    }
}

/// A stream of watch events in revision order. It ends with an `Err` (and then nothing) when the watch cannot go
/// on, e.g. [`StoreError::Compacted`] when this watcher fell so far behind that the history it needs is gone.
/// The events of a watch, in revision order. Each event is shared: every watcher of a key gets the same
/// allocation (the embedded store publishes one per write), so a watch costs no copy of the object per watcher.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Arc<Event>, StoreError>> + Send>>;

/// `items` in consecutive chunks of at most `chunk` (at least 1), without copying them.
pub(crate) fn into_chunks<T>(mut items: Vec<T>, chunk: usize) -> impl Iterator<Item = Vec<T>> {
    let chunk = chunk.max(1);
    std::iter::from_fn(move || {
        if items.is_empty() {
            return None;
        }
        let rest = items.split_off(items.len().min(chunk));
        Some(std::mem::replace(&mut items, rest))
    })
}

/// A whole prefix read from one consistent view of the store, handed out in chunks.
pub struct ChunkedList {
    /// The store revision the list was read at.
    pub revision: Revision,
    /// The keys in key order, a chunk at a time; an `Err` ends the list early.
    pub chunks: Pin<Box<dyn Stream<Item = Result<Vec<KeyValue>, StoreError>> + Send>>,
}

/// What went wrong in a store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {key} already exists")]
    AlreadyExists { key: String },
    #[error("key {key} not found")]
    NotFound { key: String },
    /// A compare-and-swap failed: the key's mod revision is not the expected one. `current` is what is stored now.
    #[error("key {key} was modified: expected mod revision {expected}, found {}", current.mod_revision)]
    Conflict {
        key: String,
        expected: Revision,
        current: Box<KeyValue>,
    },
    /// The requested revision is older than the oldest one the store still has history for.
    #[error("revision {requested} has been compacted (oldest available revision {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    /// A revision in the future was asked for.
    #[error("revision {requested} is newer than the store's revision {current}")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("store backend error: {0}")]
    Backend(String),
    #[error("store is closed")]
    Closed,
}

/// A key-value store with etcd's revision semantics; see the module documentation.
///
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend's name for logs (`embedded`, `etcd`).
    fn backend(&self) -> &'static str;

    /// The current store revision.
    async fn revision(&self) -> Result<Revision, StoreError>;

    /// One key (or `None`), and the store revision it was read at.
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Revision), StoreError>;

    /// The keys starting with `prefix`, in key order, with the store revision they were read at.
    /// Reads the latest state (there is no reading at a past revision).
    async fn list(&self, prefix: &str, options: &ListOptions) -> Result<ListResult, StoreError>;

    /// Every key starting with `prefix`, read at one revision, in chunks of at most `chunk` keys, so a caller
    /// can send a long list without holding all of it (a full list of 10k pods is ~30 MB). The default reads
    /// the whole list first.
    async fn list_chunked(&self, prefix: &str, chunk: usize) -> Result<ChunkedList, StoreError> {
        let listed = self.list(prefix, &ListOptions::default()).await?;
        Ok(ChunkedList {
            revision: listed.revision,
            chunks: Box::pin(futures_util::stream::iter(
                into_chunks(listed.items, chunk).map(Ok),
            )),
        })
    }

    /// Creates `key`; fails with [`StoreError::AlreadyExists`] if it exists. Returns the stored key.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue, StoreError>;

    /// Like [`Store::create`], and the key is deleted (an ordinary delete: a revision and a watch event) once
    /// `ttl` has passed, at most a few seconds late (etcd: a lease; several keys may share one). Updates keep the
    /// deadline. For Events' `--event-ttl`.
    async fn create_with_ttl(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: std::time::Duration,
    ) -> Result<KeyValue, StoreError>;

    /// Replaces `key`'s value if its mod revision is `expected`; otherwise [`StoreError::Conflict`] with the
    /// current value, or [`StoreError::NotFound`]. Returns the stored key.
    async fn update(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
    ) -> Result<KeyValue, StoreError>;

    /// Deletes `key` if its mod revision is `expected` (any revision when `None`); otherwise
    /// [`StoreError::Conflict`] or [`StoreError::NotFound`]. Returns the deleted value and the delete's revision.
    async fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> Result<(KeyValue, Revision), StoreError>;

    /// Every change to keys starting with `prefix` at revision `start` or later (as etcd's `start_revision`,
    /// inclusive), first from history, then live. `start` of 0 means "from the next write on". Fails with
    /// [`StoreError::Compacted`] when the history from `start` on is no longer kept.
    async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError>;

    /// Discards history older than `revision`: later watches from before it fail with [`StoreError::Compacted`].
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;
}

/// Which backend to use (`--etcd-servers` given: etcd; otherwise the embedded store in the data directory).
#[derive(Clone, Debug)]
pub enum StoreConfig {
    Embedded {
        dir: PathBuf,
        options: embedded::EmbeddedOptions,
    },
    Etcd(etcd::EtcdConfig),
}

/// An opened backend. Keep it alive as long as the store is used: for the embedded store it also serves
/// `windlass-control snapshot save` on `DIR/snapshot.sock` (see [`snapshot`]).
pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    _snapshots: Option<snapshot::SnapshotServer>,
}

/// Opens the configured backend; the only place a backend is chosen. Logs the choice at `info`.
pub async fn open(config: StoreConfig) -> Result<OpenedStore, StoreError> {
    match config {
        StoreConfig::Embedded { dir, options } => {
            let opened = tokio::task::spawn_blocking(move || {
                let store = Arc::new(embedded::EmbeddedStore::open(&dir, options)?);
                let snapshots = snapshot::SnapshotServer::start(store.clone(), &dir)
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                tracing::info!(backend = "embedded", dir = %dir.display(), "store backend chosen");
                Ok::<_, StoreError>(OpenedStore {
                    store,
                    _snapshots: Some(snapshots),
                })
            })
            .await
            .map_err(|e| {
                StoreError::Backend(format!("opening the embedded store failed: {e}"))
            })??;
            Ok(opened)
        }
        StoreConfig::Etcd(config) => {
            let endpoints = config.endpoints.join(",");
            let store = etcd::EtcdStore::connect(config).await?;
            tracing::info!(backend = "etcd", %endpoints, "store backend chosen");
            Ok(OpenedStore {
                store: Arc::new(store),
                _snapshots: None,
            })
        }
    }
}
