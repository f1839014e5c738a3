//! The embedded store: one redb file on local disk, with etcd's revision semantics on top.
//!
//! Why redb: it is a copy-on-write B-tree whose commits are durable when `commit()` returns
//! (`Durability::Immediate`, the default: data pages are fsync'd, then the new root is written with a checksum and
//! fsync'd), and an unclean shutdown rolls back to the last committed root. That is exactly "an acknowledged write
//! survives kill -9 and power loss" without us writing a log format, torn-write detection or snapshotting by hand.
//!
//! Throughput: an fsync per write would cap us at the disk's sync rate (as etcd: ~450 puts/s on this machine). All
//! writes go through one writer thread that drains every queued request into one transaction and commits once
//! (group commit), so concurrent writers share an fsync; each request still succeeds or fails on its own, and none is
//! acknowledged before the commit that holds it is durable.
//!
//! Revisions: a global counter in the `meta` table, bumped by every create, update and delete in the same
//! transaction as the write (as etcd's main revision). Watches are served from a bounded in-memory history of
//! recent events plus a tokio broadcast channel for live ones; history is not persisted, so after a restart
//! watches can start at the current revision or later, and older ones get [`StoreError::Compacted`] (clients then
//! relist, as they do after etcd compaction).
//!
//! TTL (etcd leases' role, for Events): a key created with a TTL has its deadline in the `expiry` table (and in
//! `expiry_by_time`, ordered by deadline); the writer thread deletes keys past their deadline as ordinary deletes
//! (a revision and a watch event each), checking at least every [`EXPIRY_CHECK`]. Deadlines are wall-clock times
//! on disk, so they survive restarts.

use std::collections::VecDeque;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, oneshot};

use super::{
    ChunkedList, Event, KeyValue, ListOptions, ListResult, Revision, Store, StoreError, WatchStream,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
/// Key → deadline (Unix milliseconds) of keys created with a TTL.
const EXPIRY: TableDefinition<&str, i64> = TableDefinition::new("expiry");
/// `"<deadline ms, 20 digits> <key>"` → (): the same deadlines in time order, for the expiry scan.
const EXPIRY_BY_TIME: TableDefinition<&str, ()> = TableDefinition::new("expiry_by_time");
/// How often the writer looks for expired keys when no writes wake it.
const EXPIRY_CHECK: std::time::Duration = std::time::Duration::from_millis(500);
/// Most requests folded into one transaction; bounds the latency one commit adds to the first request in it.
const MAX_BATCH: usize = 512;
/// Bytes of the header before a value: create revision, mod revision, version (little-endian i64 each).
const HEADER: usize = 24;

/// Options of the embedded store.
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// How many recent events are kept in memory for watches that start in the past.
    pub history: usize,
    /// At most this many bytes of keys and values in that history: the oldest events go first, so a burst of
    /// large objects cannot grow the server (at 10k pods of ~3 KB, 5000 events would hold ~15 MB). A watch
    /// older than the history gets `410 Gone` and relists, as from upstream's watch cache.
    pub history_bytes: usize,
    /// redb's page cache (bytes). redb's own default is 1 GiB, which a control plane on a small VM cannot spare;
    /// the store is mostly read through the API server's watch cache and lists, so a small cache costs little.
    pub cache_bytes: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            history: 5000,
            history_bytes: 8 << 20,
            cache_bytes: 8 << 20,
        }
    }
}

/// The embedded, redb-backed [`Store`]. Dropping it stops the writer thread after pending writes.
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    shared: Arc<Mutex<Shared>>,
    writer: Option<std_mpsc::Sender<WriteRequest>>,
    thread: Option<JoinHandle<()>>,
}

/// Watch state shared by the writer thread and every watch stream.
struct Shared {
    /// Revision of the last published write.
    revision: Revision,
    /// History holds every event with a revision greater than this.
    floor: Revision,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// Bytes of keys and values in `history`, and their bound.
    history_bytes: usize,
    history_bytes_limit: usize,
    tx: broadcast::Sender<Arc<Event>>,
}

enum Op {
    Create {
        key: String,
        value: Vec<u8>,
        /// Deadline in Unix milliseconds (a TTL).
        expires_at_ms: Option<i64>,
    },
    Update {
        key: String,
        expected: Revision,
        value: Vec<u8>,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
}

enum Reply {
    Kv(KeyValue),
    Deleted(KeyValue, Revision),
}

struct WriteRequest {
    op: Op,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
}

fn backend(what: &str, path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{what} {}: {e}", path.display()))
}

fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

fn decode(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    let field = |i: usize| -> Result<i64, StoreError> {
        raw.get(i * 8..i * 8 + 8)
            .and_then(|b| b.try_into().ok())
            .map(i64::from_le_bytes)
            .ok_or_else(|| StoreError::Backend(format!("corrupt value header for key {key}")))
    };
    Ok(KeyValue {
        key: key.to_string(),
        create_revision: field(0)?,
        mod_revision: field(1)?,
        version: field(2)?,
        value: raw.get(HEADER..).unwrap_or_default().to_vec(),
    })
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir` (file `dir/store.redb`).
    pub fn open(dir: &Path, options: EmbeddedOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| backend("cannot create", dir, e))?;
        let path = dir.join("store.redb");
        let db = redb::Builder::new()
            .set_cache_size(options.cache_bytes)
            .create(&path)
            .map_err(|e| backend("cannot open", &path, e))?;
        // Make sure both tables exist so readers never see "table does not exist".
        let revision = {
            let txn = db
                .begin_write()
                .map_err(|e| backend("cannot write", &path, e))?;
            let revision = {
                txn.open_table(KV)
                    .map_err(|e| backend("cannot open table in", &path, e))?;
                txn.open_table(EXPIRY)
                    .map_err(|e| backend("cannot open table in", &path, e))?;
                txn.open_table(EXPIRY_BY_TIME)
                    .map_err(|e| backend("cannot open table in", &path, e))?;
                let meta = txn
                    .open_table(META)
                    .map_err(|e| backend("cannot open table in", &path, e))?;
                let revision = meta
                    .get(META_REVISION)
                    .map_err(|e| backend("cannot read", &path, e))?
                    .map(|v| v.value())
                    .unwrap_or(0);
                revision
            };
            txn.commit()
                .map_err(|e| backend("cannot commit to", &path, e))?;
            revision
        };
        let (tx, _) = broadcast::channel(options.history.max(16));
        let shared = Arc::new(Mutex::new(Shared {
            revision,
            floor: revision,
            history: VecDeque::new(),
            history_limit: options.history.max(1),
            history_bytes: 0,
            history_bytes_limit: options.history_bytes,
            tx,
        }));
        let db = Arc::new(db);
        let (writer, rx) = std_mpsc::channel();
        let thread = {
            let db = db.clone();
            let shared = shared.clone();
            let writer_path = path.clone();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer_loop(&db, &writer_path, &shared, rx))
                .map_err(|e| backend("cannot start the writer thread for", &path, e))?
        };
        tracing::info!(path = %path.display(), revision, "opened embedded store");
        Ok(Self {
            db,
            path,
            shared,
            writer: Some(writer),
            thread: Some(thread),
        })
    }

    /// For backups ([`super::snapshot`]): calls `each` for every key, in key order, all read in one redb read
    /// transaction — a consistent point-in-time view while writes go on — and returns that view's store revision.
    /// Blocking.
    pub fn export(
        &self,
        mut each: impl FnMut(KeyValue) -> Result<(), StoreError>,
    ) -> Result<Revision, StoreError> {
        let path = &self.path;
        let txn = self
            .db
            .begin_read()
            .map_err(|e| backend("cannot read", path, e))?;
        let revision = read_revision(&txn, path)?;
        let kv = txn
            .open_table(KV)
            .map_err(|e| backend("cannot open table in", path, e))?;
        for entry in kv.iter().map_err(|e| backend("cannot read", path, e))? {
            let (k, v) = entry.map_err(|e| backend("cannot read", path, e))?;
            each(decode(k.value(), v.value())?)?;
        }
        Ok(revision)
    }

    /// Creates the store in `dir` holding exactly `items`, with their revisions, at store `revision` (a restored
    /// backup). Fails if `dir` already holds a store. Written to a temporary file renamed into place once
    /// committed, so a failure leaves no store behind. Blocking.
    pub fn import(dir: &Path, revision: Revision, items: &[KeyValue]) -> Result<(), StoreError> {
        let path = dir.join("store.redb");
        if path.exists() {
            return Err(backend("refusing to overwrite", &path, "a store exists"));
        }
        let tmp = dir.join("store.redb.restoring");
        let result = (|| {
            let db = Database::create(&tmp).map_err(|e| backend("cannot create", &tmp, e))?;
            let txn = db
                .begin_write()
                .map_err(|e| backend("cannot write", &tmp, e))?;
            {
                let mut kv = txn
                    .open_table(KV)
                    .map_err(|e| backend("cannot open table in", &tmp, e))?;
                for item in items {
                    kv.insert(item.key.as_str(), encode(item).as_slice())
                        .map_err(|e| backend("cannot write", &tmp, e))?;
                }
                let mut meta = txn
                    .open_table(META)
                    .map_err(|e| backend("cannot open table in", &tmp, e))?;
                meta.insert(META_REVISION, revision)
                    .map_err(|e| backend("cannot write", &tmp, e))?;
            }
            txn.commit()
                .map_err(|e| backend("cannot commit to", &tmp, e))?;
            drop(db);
            std::fs::rename(&tmp, &path).map_err(|e| backend("cannot rename", &tmp, e))?;
            // Make the rename durable too.
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| backend("cannot sync", dir, e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    async fn write(&self, op: Op) -> Result<Reply, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(WriteRequest { op, reply })
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database, &Path) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(&db, &path))
            .await
            .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer loop once queued writes are committed.
        self.writer.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What an event holds in memory, for the history's byte bound.
fn event_bytes(event: &Event) -> usize {
    let kv_bytes = |kv: &KeyValue| kv.key.len() + kv.value.len();
    match event {
        Event::Created(kv) => kv_bytes(kv),
        Event::Updated { prev, kv } => kv_bytes(prev) + kv_bytes(kv),
        Event::Deleted { prev, .. } => kv_bytes(prev),
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding this lock cannot leave the history inconsistent (each field is updated atomically),
    // so a poisoned lock is still usable.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn writer_loop(
    db: &Database,
    path: &Path,
    shared: &Mutex<Shared>,
    rx: std_mpsc::Receiver<WriteRequest>,
) {
    let mut next_expiry_check = std::time::Instant::now();
    loop {
        let first = match rx.recv_timeout(EXPIRY_CHECK) {
            Ok(req) => Some(req),
            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if let Some(first) = first {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            apply(db, path, shared, batch);
        }
        if std::time::Instant::now() >= next_expiry_check {
            next_expiry_check = std::time::Instant::now() + EXPIRY_CHECK;
            match expired_keys(db, path, now_ms()) {
                Ok(keys) if !keys.is_empty() => {
                    tracing::debug!(count = keys.len(), "deleting keys whose TTL ran out");
                    let batch = keys
                        .into_iter()
                        .map(|key| WriteRequest {
                            op: Op::Delete {
                                key,
                                expected: None,
                            },
                            // Nobody waits for the reply of an expiry.
                            reply: oneshot::channel().0,
                        })
                        .collect();
                    apply(db, path, shared, batch);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot scan for expired keys"),
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn expiry_index_key(deadline_ms: i64, key: &str) -> String {
    format!("{deadline_ms:020} {key}")
}

/// Keys whose deadline is at or before `now_ms` (at most one batch's worth; the rest go in the next check).
fn expired_keys(db: &Database, path: &Path, now_ms: i64) -> Result<Vec<String>, StoreError> {
    let txn = db
        .begin_read()
        .map_err(|e| backend("cannot read", path, e))?;
    let by_time = txn
        .open_table(EXPIRY_BY_TIME)
        .map_err(|e| backend("cannot open table in", path, e))?;
    let mut keys = Vec::new();
    for entry in by_time
        .iter()
        .map_err(|e| backend("cannot read", path, e))?
    {
        let (k, _) = entry.map_err(|e| backend("cannot read", path, e))?;
        let Some((deadline, key)) = k.value().split_once(' ') else {
            continue;
        };
        if deadline.parse::<i64>().map_or(true, |d| d > now_ms) || keys.len() >= MAX_BATCH {
            break;
        }
        keys.push(key.to_string());
    }
    Ok(keys)
}

/// Commits a batch, publishes its events to watchers, then answers each request.
fn apply(db: &Database, path: &Path, shared: &Mutex<Shared>, batch: Vec<WriteRequest>) {
    match commit_batch(db, path, &batch) {
        Ok(mut results) => {
            // Publish before replying, so a writer that then watches from its own revision sees its event.
            {
                let mut sh = lock(shared);
                for (_, event) in results.iter_mut() {
                    if let Some(event) = event.take() {
                        let event = Arc::new(event);
                        sh.revision = event.revision();
                        sh.history_bytes += event_bytes(&event);
                        sh.history.push_back(event.clone());
                        // The newest event always stays, however large.
                        while sh.history.len() > 1
                            && (sh.history.len() > sh.history_limit
                                || sh.history_bytes > sh.history_bytes_limit)
                        {
                            if let Some(old) = sh.history.pop_front() {
                                sh.floor = old.revision();
                                sh.history_bytes -= event_bytes(&old);
                            }
                        }
                        // No receivers is fine: nobody watches.
                        let _ = sh.tx.send(event);
                    }
                }
            }
            for (req, (result, _)) in batch.into_iter().zip(results) {
                let _ = req.reply.send(result);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "store commit failed; failing the whole batch");
            for req in batch {
                let _ = req.reply.send(Err(StoreError::Backend(e.to_string())));
            }
        }
    }
}

type OpResult = (Result<Reply, StoreError>, Option<Event>);

/// Applies a batch in one transaction. Per-request failures (exists, conflict, not found) are results; an `Err`
/// means the transaction failed and nothing in the batch was written.
fn commit_batch(
    db: &Database,
    path: &Path,
    batch: &[WriteRequest],
) -> Result<Vec<OpResult>, StoreError> {
    let txn = db
        .begin_write()
        .map_err(|e| backend("cannot write", path, e))?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut kv = txn
            .open_table(KV)
            .map_err(|e| backend("cannot open table in", path, e))?;
        let mut meta = txn
            .open_table(META)
            .map_err(|e| backend("cannot open table in", path, e))?;
        let mut expiry = txn
            .open_table(EXPIRY)
            .map_err(|e| backend("cannot open table in", path, e))?;
        let mut by_time = txn
            .open_table(EXPIRY_BY_TIME)
            .map_err(|e| backend("cannot open table in", path, e))?;
        let mut revision = meta
            .get(META_REVISION)
            .map_err(|e| backend("cannot read", path, e))?
            .map(|v| v.value())
            .unwrap_or(0);
        for req in batch {
            let key = match &req.op {
                Op::Create { key, .. } | Op::Update { key, .. } | Op::Delete { key, .. } => {
                    key.as_str()
                }
            };
            if let Op::Create {
                value,
                expires_at_ms,
                ..
            } = &req.op
            {
                // One B-tree walk for the usual create of a new key: insert, and put the old value back in the
                // rare case the key existed (all inside this uncommitted transaction).
                let new = KeyValue {
                    key: key.to_string(),
                    value: value.clone(),
                    create_revision: revision + 1,
                    mod_revision: revision + 1,
                    version: 1,
                };
                let replaced = kv
                    .insert(key, encode(&new).as_slice())
                    .map_err(|e| backend("cannot write", path, e))?
                    .map(|old| old.value().to_vec());
                if let Some(old) = replaced {
                    kv.insert(key, old.as_slice())
                        .map_err(|e| backend("cannot write", path, e))?;
                    results.push((
                        Err(StoreError::AlreadyExists {
                            key: key.to_string(),
                        }),
                        None,
                    ));
                    continue;
                }
                revision += 1;
                if let Some(deadline) = expires_at_ms {
                    expiry
                        .insert(key, *deadline)
                        .map_err(|e| backend("cannot write", path, e))?;
                    by_time
                        .insert(expiry_index_key(*deadline, key).as_str(), ())
                        .map_err(|e| backend("cannot write", path, e))?;
                }
                results.push((Ok(Reply::Kv(new.clone())), Some(Event::Created(new))));
                continue;
            }
            let current = match kv.get(key).map_err(|e| backend("cannot read", path, e))? {
                Some(raw) => Some(decode(key, raw.value())?),
                None => None,
            };
            let result = match (&req.op, current) {
                // Handled above.
                (Op::Create { .. }, _) => continue,
                (Op::Update { .. } | Op::Delete { .. }, None) => (
                    Err(StoreError::NotFound {
                        key: key.to_string(),
                    }),
                    None,
                ),
                (Op::Update { expected, .. }, Some(cur))
                | (
                    Op::Delete {
                        expected: Some(expected),
                        ..
                    },
                    Some(cur),
                ) if cur.mod_revision != *expected => (
                    Err(StoreError::Conflict {
                        key: key.to_string(),
                        expected: *expected,
                        current: Box::new(cur),
                    }),
                    None,
                ),
                (Op::Update { value, .. }, Some(cur)) => {
                    revision += 1;
                    let new = KeyValue {
                        key: key.to_string(),
                        value: value.clone(),
                        create_revision: cur.create_revision,
                        mod_revision: revision,
                        version: cur.version + 1,
                    };
                    kv.insert(key, encode(&new).as_slice())
                        .map_err(|e| backend("cannot write", path, e))?;
                    (
                        Ok(Reply::Kv(new.clone())),
                        Some(Event::Updated { prev: cur, kv: new }),
                    )
                }
                (Op::Delete { .. }, Some(cur)) => {
                    revision += 1;
                    kv.remove(key)
                        .map_err(|e| backend("cannot delete from", path, e))?;
                    let deadline = expiry
                        .remove(key)
                        .map_err(|e| backend("cannot delete from", path, e))?
                        .map(|d| d.value());
                    if let Some(deadline) = deadline {
                        by_time
                            .remove(expiry_index_key(deadline, key).as_str())
                            .map_err(|e| backend("cannot delete from", path, e))?;
                    }
                    (
                        Ok(Reply::Deleted(cur.clone(), revision)),
                        Some(Event::Deleted {
                            prev: cur,
                            revision,
                        }),
                    )
                }
            };
            results.push(result);
        }
        meta.insert(META_REVISION, revision)
            .map_err(|e| backend("cannot write", path, e))?;
    }
    txn.commit()
        .map_err(|e| backend("cannot commit to", path, e))?;
    Ok(results)
}

fn read_revision(txn: &redb::ReadTransaction, path: &Path) -> Result<Revision, StoreError> {
    let meta = txn
        .open_table(META)
        .map_err(|e| backend("cannot open table in", path, e))?;
    Ok(meta
        .get(META_REVISION)
        .map_err(|e| backend("cannot read", path, e))?
        .map(|v| v.value())
        .unwrap_or(0))
}

#[async_trait]
impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        Ok(lock(&self.shared).revision)
    }

    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Revision), StoreError> {
        let key = key.to_string();
        self.read(move |db, path| {
            let txn = db
                .begin_read()
                .map_err(|e| backend("cannot read", path, e))?;
            let revision = read_revision(&txn, path)?;
            let kv = txn
                .open_table(KV)
                .map_err(|e| backend("cannot open table in", path, e))?;
            let found = match kv
                .get(key.as_str())
                .map_err(|e| backend("cannot read", path, e))?
            {
                Some(raw) => Some(decode(&key, raw.value())?),
                None => None,
            };
            Ok((found, revision))
        })
        .await
    }

    async fn list(&self, prefix: &str, options: &ListOptions) -> Result<ListResult, StoreError> {
        let prefix = prefix.to_string();
        let options = options.clone();
        self.read(move |db, path| {
            let txn = db
                .begin_read()
                .map_err(|e| backend("cannot read", path, e))?;
            let revision = read_revision(&txn, path)?;
            let kv = txn
                .open_table(KV)
                .map_err(|e| backend("cannot open table in", path, e))?;
            let start = match options.start_after.as_deref() {
                Some(after) if after >= prefix.as_str() => Bound::Excluded(after),
                _ => Bound::Included(prefix.as_str()),
            };
            let range = kv
                .range::<&str>((start, Bound::Unbounded))
                .map_err(|e| backend("cannot read", path, e))?;
            let limit = options.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
            let mut items = Vec::new();
            let mut more = false;
            for entry in range {
                let (k, v) = entry.map_err(|e| backend("cannot read", path, e))?;
                let k = k.value();
                if !k.starts_with(prefix.as_str()) {
                    break;
                }
                if items.len() == limit {
                    // Counting the rest would read every later key for each page (quadratic over a paginated
                    // list of 10k pods), so a page only says that more follow; `remainingItemCount` is optional.
                    more = true;
                    break;
                }
                items.push(decode(k, v.value())?);
            }
            Ok(ListResult {
                items,
                revision,
                more,
                remaining: (!more).then_some(0),
            })
        })
        .await
    }

    async fn list_chunked(&self, prefix: &str, chunk: usize) -> Result<ChunkedList, StoreError> {
        // One read transaction (a redb snapshot) serves every chunk, so the list is consistent however slowly
        // the client reads it; the bounded channel keeps at most two chunks in memory.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<KeyValue>, StoreError>>(1);
        let (opened_tx, opened_rx) = oneshot::channel();
        let db = self.db.clone();
        let path = self.path.clone();
        let prefix = prefix.to_string();
        let chunk = chunk.max(1);
        tokio::task::spawn_blocking(move || {
            let open = || {
                let txn = db
                    .begin_read()
                    .map_err(|e| backend("cannot read", &path, e))?;
                let revision = read_revision(&txn, &path)?;
                let table = txn
                    .open_table(KV)
                    .map_err(|e| backend("cannot open table in", &path, e))?;
                Ok::<_, StoreError>((revision, table))
            };
            let table = match open() {
                Ok((revision, table)) => {
                    if opened_tx.send(Ok(revision)).is_err() {
                        return;
                    }
                    table
                }
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                    return;
                }
            };
            let range =
                match table.range::<&str>((Bound::Included(prefix.as_str()), Bound::Unbounded)) {
                    Ok(range) => range,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(backend("cannot read", &path, e)));
                        return;
                    }
                };
            let mut items = Vec::with_capacity(chunk);
            for entry in range {
                let kv = entry
                    .map_err(|e| backend("cannot read", &path, e))
                    .and_then(|(k, v)| {
                        let k = k.value();
                        if k.starts_with(prefix.as_str()) {
                            decode(k, v.value()).map(Some)
                        } else {
                            Ok(None)
                        }
                    });
                match kv {
                    Ok(Some(kv)) => items.push(kv),
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
                // A closed channel: the client went away.
                if items.len() >= chunk && tx.blocking_send(Ok(std::mem::take(&mut items))).is_err()
                {
                    return;
                }
            }
            if !items.is_empty() {
                let _ = tx.blocking_send(Ok(items));
            }
        });
        let revision = opened_rx
            .await
            .map_err(|_| StoreError::Backend("list task failed".into()))??;
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        Ok(ChunkedList {
            revision,
            chunks: Box::pin(chunks),
        })
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue, StoreError> {
        match self
            .write(Op::Create {
                key: key.to_string(),
                value,
                expires_at_ms: None,
            })
            .await?
        {
            Reply::Kv(kv) => Ok(kv),
            Reply::Deleted(..) => Err(StoreError::Backend("unexpected reply to create".into())),
        }
    }

    async fn create_with_ttl(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: std::time::Duration,
    ) -> Result<KeyValue, StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        match self
            .write(Op::Create {
                key: key.to_string(),
                value,
                expires_at_ms: Some(now_ms().saturating_add(ttl_ms)),
            })
            .await?
        {
            Reply::Kv(kv) => Ok(kv),
            Reply::Deleted(..) => Err(StoreError::Backend("unexpected reply to create".into())),
        }
    }

    async fn update(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
    ) -> Result<KeyValue, StoreError> {
        match self
            .write(Op::Update {
                key: key.to_string(),
                expected,
                value,
            })
            .await?
        {
            Reply::Kv(kv) => Ok(kv),
            Reply::Deleted(..) => Err(StoreError::Backend("unexpected reply to update".into())),
        }
    }

    async fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> Result<(KeyValue, Revision), StoreError> {
        match self
            .write(Op::Delete {
                key: key.to_string(),
                expected,
            })
            .await?
        {
            Reply::Deleted(kv, revision) => Ok((kv, revision)),
            Reply::Kv(_) => Err(StoreError::Backend("unexpected reply to delete".into())),
        }
    }

    async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError> {
        let prefix = prefix.to_string();
        let (backlog, rx, next) = {
            let sh = lock(&self.shared);
            let start = if start <= 0 { sh.revision + 1 } else { start };
            let (backlog, rx) = subscribe(&sh, &prefix, start)?;
            (backlog, rx, start)
        };
        let state = WatchState {
            shared: self.shared.clone(),
            prefix,
            backlog,
            rx,
            next,
            done: false,
        };
        Ok(Box::pin(futures_util::stream::unfold(state, next_event)))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut sh = lock(&self.shared);
        if revision > sh.revision + 1 {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: sh.revision,
            });
        }
        // As etcd: after compact(r), watching from r still works, from r-1 does not.
        let floor = revision - 1;
        if floor > sh.floor {
            sh.floor = floor;
            while sh.history.front().is_some_and(|e| e.revision() <= floor) {
                if let Some(old) = sh.history.pop_front() {
                    sh.history_bytes -= event_bytes(&old);
                }
            }
        }
        Ok(())
    }
}

/// History events to replay, and the live receiver.
type Subscription = (VecDeque<Arc<Event>>, broadcast::Receiver<Arc<Event>>);

/// Events from `start` on in history (matching `prefix`) and a receiver for everything published afterwards.
/// Called with the lock held, so no event falls between the two.
fn subscribe(sh: &Shared, prefix: &str, start: Revision) -> Result<Subscription, StoreError> {
    if start <= sh.floor {
        return Err(StoreError::Compacted {
            requested: start,
            compacted: sh.floor + 1,
        });
    }
    let backlog = sh
        .history
        .iter()
        .filter(|e| e.revision() >= start && e.key().starts_with(prefix))
        .cloned()
        .collect();
    Ok((backlog, sh.tx.subscribe()))
}

struct WatchState {
    shared: Arc<Mutex<Shared>>,
    prefix: String,
    backlog: VecDeque<Arc<Event>>,
    rx: broadcast::Receiver<Arc<Event>>,
    /// Smallest revision not yet delivered (or skipped as not matching).
    next: Revision,
    done: bool,
}

async fn next_event(mut st: WatchState) -> Option<(Result<Event, StoreError>, WatchState)> {
    if st.done {
        return None;
    }
    loop {
        if let Some(event) = st.backlog.pop_front() {
            st.next = event.revision() + 1;
            return Some((Ok((*event).clone()), st));
        }
        match st.rx.recv().await {
            Ok(event) => {
                if event.revision() < st.next {
                    continue;
                }
                st.next = event.revision() + 1;
                if event.key().starts_with(st.prefix.as_str()) {
                    return Some((Ok((*event).clone()), st));
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // This watcher fell behind the channel; catch up from history if it still covers us.
                let resubscribed = {
                    let sh = lock(&st.shared);
                    subscribe(&sh, &st.prefix, st.next)
                };
                match resubscribed {
                    Ok((backlog, rx)) => {
                        st.backlog = backlog;
                        st.rx = rx;
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}
