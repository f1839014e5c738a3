//! The embedded store: one redb file on local disk plus a write-ahead log, with etcd's revision semantics on top.
//!
//! Why redb: a copy-on-write B-tree whose durable commits (`Durability::Immediate`: pages written and fsync'd,
//! then the new root with a checksum) survive kill -9 and power loss, and an unclean shutdown rolls back to the
//! last durable commit. That gives us torn-write detection and snapshots of the whole B-tree for free.
//!
//! Why a write-ahead log too (etcd's split: a WAL for durability, the B-tree written in the background): a
//! durable redb commit per batch was a third of the API server's CPU per pod create — it writes every touched
//! 4 KiB page (a ~2.8 KB pod fills a leaf of its own; branch and table-root pages are rewritten by every batch),
//! frees the previous versions and syncs. So each batch is now
//! 1. checked against the current state (preconditions, revisions): the pending writes, else the B-tree;
//! 2. appended as ONE log record (every resulting key and stored value or delete, TTL deadlines, the batch's
//!    revision range; CRC32) to the log file, which is `fdatasync`'d;
//! 3. added to the **pending writes** — an in-memory, persistent (cheaply cloned) ordered map holding the latest
//!    write of each key since the last checkpoint — which readers see over a redb snapshot (see `View`);
//! 4. published to watchers and acknowledged — never before the `fdatasync` holding it returned.
//!
//! A checkpoint puts the pending writes into the B-tree in key order in ONE durable redb commit, after which its
//! log restarts at offset 0 and those pending writes are dropped. There are two log files: when the one taking
//! records is full ([`EmbeddedOptions::log_bytes`]) or the last checkpoint is
//! [`EmbeddedOptions::checkpoint_interval`] old, it and the writes pending so far (exactly its records' writes) go
//! to a checkpoint thread, and the writer goes on logging batches to the other file — so a checkpoint (tens of ms
//! under load) no longer stalls every write. Readers keep seeing those writes in the pending writes until the
//! commit is done; then the writer drops those not written again since. If the second log fills before the
//! checkpoint is done, the writer waits for it. The writer checkpoints on its own thread (the batch at hand going
//! into that commit) when a batch does not fit in an empty log, when writes trickle in (an empty log and the
//! interval passed), when it is idle with records logged, and when the store is dropped (a clean shutdown leaves
//! nothing to replay). Between checkpoints redb is not written at all, so every page — a pod's leaf, the branches
//! above it, the revision counter, the expiry tables — is written once per checkpoint however many batches
//! changed it. (Before the pending writes, each batch was a non-durable redb commit: each rewrote its branch pages
//! copy-on-write, and redb wrote those copies out whenever its 8 MiB cache filled.) TTL deadlines of keys written
//! since the last checkpoint reach the expiry tables with it (`Deadline`); the expiry scan leaves those keys alone
//! until then.
//!
//! Measured (scripts/api-rss.sh, 10k pod creates through the API server, alternated builds): server CPU per
//! create 97 / 120 / 108 µs with the pending writes against 114 / 141 / 118 µs with a non-durable commit per
//! batch; peak RSS 62 MiB against 52 MiB (the pending writes hold up to a log's worth of values).
//!
//! Recovery on [`EmbeddedStore::open`]: redb rolls back to its last durable commit (revision R in `meta`); the
//! logs' records are replayed from offset 0 while they continue the revision chain (R+1, then each record's last
//! revision + 1), stopping at the first torn record (short, bad CRC) or stale one (an earlier pass's records,
//! left after the log restarted, carry revisions ≤ R); the chain goes on in the other log if its first record
//! continues it (a crash while a checkpoint was in flight); then one durable commit, and the logs start afresh.
//! Replay writes the recorded values as they are, so replaying a record twice changes nothing. Each log file
//! (`wal.rs`) is written with zeros once (8 MiB by default) so records overwrite allocated blocks and `fdatasync`
//! need not journal size changes. A log without its database (deleted by hand) or left beside a restored backup
//! is discarded, never replayed onto another store.
//!
//! A failed log write or `fdatasync`, or a failed redb commit after the log holds the batch, fails the batch and
//! from then on every write (reads go on): after a failed `fdatasync` Linux may have dropped the dirty pages and
//! cleared the error, so a retry could "succeed" without the data (PostgreSQL's "fsyncgate"), and a log record
//! whose batch redb lacks would break the chain. etcd exits on a failed WAL sync; we refuse writes until a
//! restart rebuilds the state from disk. Such a batch was never acknowledged, but its record may be on disk and
//! be replayed by that restart (as a write whose etcd request failed may still have been applied).
//!
//! Throughput: all writes go through one writer thread that drains every queued request into one transaction
//! and one log record (group commit), so concurrent writers share an `fdatasync`; each request still succeeds or
//! fails on its own.
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

use std::collections::{HashSet, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, oneshot};

use super::wal::{Change, RecordBuf, Wal};
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
/// The write-ahead log's file name, next to `store.redb`.
/// The two log files. Records go to one while the other's records are being checkpointed (see the module docs).
const WAL_FILES: [&str; 2] = ["store.wal", "store.2.wal"];

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
    /// Make batches durable in a write-ahead log and the B-tree only at checkpoints (see the module docs).
    /// `false` commits every batch durably to redb, as before the log existed (kept to compare the two).
    pub write_ahead_log: bool,
    /// Size of the log file (written with zeros once when created). A checkpoint (a durable redb commit, after
    /// which the log restarts) happens when the next batch's record would not fit ...
    pub log_bytes: u64,
    /// ... or when the last checkpoint is this old.
    pub checkpoint_interval: Duration,
    /// Unit tests only: each checkpoint thread waits this long before writing, to hold a checkpoint in flight.
    #[cfg(test)]
    pub(crate) checkpoint_pause: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            history: 5000,
            history_bytes: 8 << 20,
            cache_bytes: 8 << 20,
            write_ahead_log: true,
            log_bytes: DEFAULT_LOG_BYTES,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            #[cfg(test)]
            checkpoint_pause: Duration::ZERO,
        }
    }
}

/// Each log's size, so a checkpoint every 8 MiB of log (~2800 pods of ~2.8 KB; ~0.3 s of pod creates through the
/// API server at full speed here). Measured over 10k pod creates through the API server (scripts/api-rss.sh),
/// when the writer thread still made checkpoints itself: its CPU per create was 46 / 41 / 38 µs with a log of
/// 2 / 4 / 8 MiB, and one checkpoint stalled the writer ~15 / ~18 / ~22 ms (median); a checkpoint thread now
/// takes that stall. In the store benchmark (12 writers) 2, 8 and 32 MiB were within noise (40, 40, 50 µs per
/// write). 8 MiB: most of the CPU gain, 2 × 8 MiB of disk, up to 16 MiB of pending values in memory while a
/// checkpoint is in flight, and little to replay after a crash.
const DEFAULT_LOG_BYTES: u64 = 8 << 20;
/// Checkpoint at least every second when writes trickle in (a durable commit of a few batches costs ~1-2 ms), so
/// redb's freed pages are reclaimed and a restart has little to replay.
const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// The embedded, redb-backed [`Store`]. Dropping it stops the writer thread after pending writes and checkpoints.
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    recovered: Option<(Revision, Revision)>,
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
    /// The writes logged since the last checkpoint, which the B-tree does not hold yet (see [`Pending`]);
    /// replaced by the writer after each batch and emptied by each checkpoint, after its commit.
    pending: PendingWrites,
}

/// Writes logged since the last checkpoint, by key (the latest write of each key), not yet in the B-tree. Readers
/// see them over a B-tree snapshot; the checkpoint puts them into the B-tree in key order in one durable commit.
/// A persistent map: a reader's copy is a reference count, and the writer's next batch shares every unchanged node.
type PendingWrites = imbl::OrdMap<String, Pending>;

/// The latest write of a key since the last checkpoint.
#[derive(Clone, Debug)]
enum Pending {
    /// The stored bytes (revision header, then the value), and what the checkpoint does with the key's TTL.
    Put {
        stored: Arc<[u8]>,
        deadline: Deadline,
    },
    Deleted,
}

/// What a checkpoint does with the TTL of a key written since the last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deadline {
    /// An update of a key the B-tree holds: its deadline (if any) stays.
    Keep,
    /// The key was created since the last checkpoint (perhaps after a delete): any older deadline goes, and this
    /// one (if any) is set.
    Reset(Option<i64>),
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

impl Op {
    fn key(&self) -> &str {
        match self {
            Op::Create { key, .. } | Op::Update { key, .. } | Op::Delete { key, .. } => key,
        }
    }
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

/// The revision header stored before a value.
fn header(kv: &KeyValue) -> [u8; HEADER] {
    let mut out = [0; HEADER];
    out[0..8].copy_from_slice(&kv.create_revision.to_le_bytes());
    out[8..16].copy_from_slice(&kv.mod_revision.to_le_bytes());
    out[16..24].copy_from_slice(&kv.version.to_le_bytes());
    out
}

fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + kv.value.len());
    out.extend_from_slice(&header(kv));
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
    /// Opens (creating if needed) the store in `dir` (files `store.redb`, `store.wal` and `store.2.wal`), replaying
    /// the write-ahead log's records that the B-tree's last durable commit does not hold.
    pub fn open(dir: &Path, options: EmbeddedOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| backend("cannot create", dir, e))?;
        let path = dir.join("store.redb");
        let wal_paths = WAL_FILES.map(|f| dir.join(f));
        // A log without its database (a store deleted by hand, a restore in progress) belongs to another store:
        // replaying it onto a new database would invent writes.
        let new_database = !path.exists();
        let db = redb::Builder::new()
            .set_cache_size(options.cache_bytes)
            .create(&path)
            .map_err(|e| backend("cannot open", &path, e))?;
        // Make sure every table exists so readers never see "table does not exist".
        let durable = {
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
        if new_database && !options.write_ahead_log {
            remove_logs(dir)?;
        }
        // Logs left by a run with the log on hold acknowledged writes even if this run does without one.
        let mut logs = Vec::new();
        for wal_path in &wal_paths {
            if options.write_ahead_log || wal_path.exists() {
                logs.push(
                    Wal::open(wal_path, options.log_bytes, new_database)
                        .map_err(|e| backend("cannot open", wal_path, e))?,
                );
            }
        }
        let recovered = recover(&db, &path, &logs, durable)?;
        let revision = recovered.map_or(durable, |(_, last)| last);
        for log in &mut logs {
            log.restart();
        }
        let (wal, spare) = if options.write_ahead_log {
            let mut logs = logs.into_iter();
            (logs.next(), logs.next())
        } else {
            // Replayed and committed durably above: nothing in them is needed any more.
            drop(logs);
            remove_logs(dir)?;
            (None, None)
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
            pending: PendingWrites::new(),
        }));
        let tree_keys = if wal.is_some() {
            all_keys(&db, &path)?
        } else {
            HashSet::new()
        };
        let db = Arc::new(db);
        let (writer, rx) = std_mpsc::channel();
        let thread = {
            let mut writer = Writer {
                db: db.clone(),
                path: path.clone(),
                shared: shared.clone(),
                wal,
                spare,
                in_flight: None,
                record: RecordBuf::default(),
                checkpoint_interval: options.checkpoint_interval,
                #[cfg(test)]
                checkpoint_pause: options.checkpoint_pause,
                last_checkpoint: Instant::now(),
                failed: None,
                pending: PendingWrites::new(),
                revision,
                tree: None,
                tree_keys,
            };
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer.run(rx))
                .map_err(|e| backend("cannot start the writer thread for", &path, e))?
        };
        tracing::info!(path = %path.display(), revision, ?recovered, "opened embedded store");
        Ok(Self {
            db,
            path,
            recovered,
            shared,
            writer: Some(writer),
            thread: Some(thread),
        })
    }

    /// The revisions (first, last) that opening the store replayed from its write-ahead log: writes acknowledged
    /// after the last checkpoint before the previous run ended without one (a crash). `None` if there were none.
    pub fn recovered(&self) -> Option<(Revision, Revision)> {
        self.recovered
    }

    /// For backups ([`super::snapshot`]): calls `each` for every key, in key order, all read in one redb read
    /// transaction — a consistent point-in-time view while writes go on — and returns that view's store revision.
    /// Blocking.
    pub fn export(
        &self,
        mut each: impl FnMut(KeyValue) -> Result<(), StoreError>,
    ) -> Result<Revision, StoreError> {
        let view = View::take(&self.db, &self.shared, &self.path)?;
        view.scan(&self.path, Bound::Unbounded, "", |kv| {
            each(kv).map(|()| true)
        })?;
        Ok(view.revision)
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
            // Logs left in `dir` belong to an earlier store: replayed onto this one they would invent writes.
            remove_logs(dir)?;
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
        f: impl FnOnce(View, &Path) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        let shared = self.shared.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(View::take(&db, &shared, &path)?, &path))
            .await
            .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }
}

/// What a read sees: the pending writes over a B-tree snapshot, and the store revision of that state.
struct View {
    pending: PendingWrites,
    revision: Revision,
    txn: redb::ReadTransaction,
}

impl View {
    fn take(db: &Database, shared: &Mutex<Shared>, path: &Path) -> Result<Self, StoreError> {
        // Both under the lock: the writer empties `pending` only after the checkpoint that put those writes into
        // the B-tree committed, so a snapshot taken with them never lacks them, nor holds a later checkpoint's.
        let sh = lock(shared);
        let txn = db
            .begin_read()
            .map_err(|e| backend("cannot read", path, e))?;
        let pending = sh.pending.clone();
        let published = sh.revision;
        drop(sh);
        // A batch committed as a checkpoint is in the B-tree a moment before it is published.
        let revision = published.max(read_revision(&txn, path)?);
        Ok(Self {
            pending,
            revision,
            txn,
        })
    }

    fn get(&self, key: &str, path: &Path) -> Result<Option<KeyValue>, StoreError> {
        match self.pending.get(key) {
            Some(Pending::Put { stored, .. }) => decode(key, stored).map(Some),
            Some(Pending::Deleted) => Ok(None),
            None => {
                let kv = self
                    .txn
                    .open_table(KV)
                    .map_err(|e| backend("cannot open table in", path, e))?;
                match kv.get(key).map_err(|e| backend("cannot read", path, e))? {
                    Some(raw) => decode(key, raw.value()).map(Some),
                    None => Ok(None),
                }
            }
        }
    }

    /// Calls `each` with every key from `start` on that begins with `prefix`, in key order (the pending writes
    /// merged over the B-tree); stops when `each` returns `false`.
    fn scan(
        &self,
        path: &Path,
        start: Bound<&str>,
        prefix: &str,
        mut each: impl FnMut(KeyValue) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let table = self
            .txn
            .open_table(KV)
            .map_err(|e| backend("cannot open table in", path, e))?;
        let mut tree = table
            .range::<&str>((start, Bound::Unbounded))
            .map_err(|e| backend("cannot read", path, e))?;
        let mut next_in_tree = || -> Result<Option<KeyValue>, StoreError> {
            match tree.next() {
                Some(entry) => {
                    let (k, v) = entry.map_err(|e| backend("cannot read", path, e))?;
                    decode(k.value(), v.value()).map(Some)
                }
                None => Ok(None),
            }
        };
        let mut pending = self.pending.range::<_, str>((start, Bound::Unbounded));
        let mut in_tree = next_in_tree()?;
        let mut in_pending = pending.next();
        loop {
            let from_pending = match (&in_tree, &in_pending) {
                (None, None) => return Ok(()),
                (Some(_), None) => None,
                (None, Some(p)) => Some(*p),
                (Some(t), Some(p)) => (p.0.as_str() <= t.key.as_str()).then_some(*p),
            };
            let item = match from_pending {
                Some((key, write)) => {
                    if !key.starts_with(prefix) {
                        return Ok(());
                    }
                    // A pending write replaces the B-tree's value of its key.
                    if in_tree.as_ref().is_some_and(|t| t.key == *key) {
                        in_tree = next_in_tree()?;
                    }
                    in_pending = pending.next();
                    match write {
                        Pending::Put { stored, .. } => Some(decode(key, stored)?),
                        Pending::Deleted => None,
                    }
                }
                None => {
                    let item = in_tree.take();
                    if item.as_ref().is_some_and(|t| !t.key.starts_with(prefix)) {
                        return Ok(());
                    }
                    in_tree = next_in_tree()?;
                    item
                }
            };
            if let Some(kv) = item {
                if !each(kv)? {
                    return Ok(());
                }
            }
        }
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

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    path: PathBuf,
    shared: Arc<Mutex<Shared>>,
    /// The log taking records. `None`: every batch is a durable redb commit.
    wal: Option<Wal>,
    /// The other log, restarted and free, while no checkpoint is in flight.
    spare: Option<Wal>,
    /// The checkpoint being written by its own thread, if any.
    in_flight: Option<InFlight>,
    /// The record of the batch being applied (reused).
    record: RecordBuf,
    checkpoint_interval: Duration,
    #[cfg(test)]
    checkpoint_pause: Duration,
    last_checkpoint: Instant,
    /// Why writes are refused: a write to the log, or a commit after one, failed (see the module docs).
    failed: Option<String>,
    /// With the log: the writes logged since the last finished checkpoint, including those an in-flight one is
    /// writing (what readers get in [`Shared::pending`]).
    pending: PendingWrites,
    /// The store's revision: the last write's.
    revision: Revision,
    /// With the log: the B-tree as of the last finished checkpoint, for lookups under `pending` (dropped while a
    /// checkpoint commits on the writer thread, so redb can reuse the pages it frees).
    tree: Option<redb::ReadOnlyTable<&'static str, &'static [u8]>>,
    /// With the log: every key the B-tree holds as of the last checkpoint (as etcd keeps its key index in memory;
    /// ~70 bytes a key), so a create checks that its key is free without a B-tree read.
    tree_keys: HashSet<String>,
}

/// A checkpoint written by its own thread while the writer logs new batches to the other log.
struct InFlight {
    /// The full log whose records the checkpoint holds; restarted (the next spare) once it committed.
    log: Wal,
    /// The pending writes it puts into the B-tree: those of `log`'s records.
    writes: PendingWrites,
    thread: JoinHandle<Result<(), StoreError>>,
}

impl Writer {
    fn run(&mut self, rx: std_mpsc::Receiver<WriteRequest>) {
        let mut next_expiry_check = Instant::now();
        loop {
            // A finished checkpoint is taken in promptly: until then its writes stay pending in memory.
            let wait = if self.in_flight.is_some() {
                Duration::from_millis(20)
            } else {
                EXPIRY_CHECK
            };
            self.take_finished_checkpoint(false);
            let first = match rx.recv_timeout(wait) {
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
                self.apply(batch);
            } else if self.checkpoint_due(0) {
                // Idle: put the logged writes into the B-tree, so a restart has little to replay.
                let _ = self.checkpoint();
            }
            if Instant::now() >= next_expiry_check && self.failed.is_none() {
                next_expiry_check = Instant::now() + EXPIRY_CHECK;
                match expired_keys(&self.db, &self.path, now_ms()) {
                    Ok(keys) if !keys.is_empty() => {
                        let batch: Vec<_> = keys
                            .into_iter()
                            // The expiry tables change at checkpoints: a key written since the last one (deleted,
                            // or created again with another deadline) is left to the deadline it has now.
                            .filter(|key| !self.pending.contains_key(key))
                            .map(|key| WriteRequest {
                                op: Op::Delete {
                                    key,
                                    expected: None,
                                },
                                // Nobody waits for the reply of an expiry.
                                reply: oneshot::channel().0,
                            })
                            .collect();
                        if !batch.is_empty() {
                            tracing::debug!(count = batch.len(), "deleting keys whose TTL ran out");
                            self.apply(batch);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot scan for expired keys"),
                }
            }
        }
        // A clean shutdown leaves nothing to replay.
        self.take_finished_checkpoint(true);
        if self.wal.as_ref().is_some_and(|w| w.offset() > 0) && self.failed.is_none() {
            let _ = self.checkpoint();
        }
    }

    /// Whether the writer thread should checkpoint itself, with the batch of `record_len` bytes at hand (0: idle)
    /// going into that commit instead of a log: when the log is empty and the interval passed (writes trickling
    /// in: logging the batch would cost its own sync plus a checkpoint after it), when a record does not fit even
    /// in an empty log, and when idle with a non-empty log and the interval passed. (A full log otherwise is
    /// handed to a checkpoint thread: [`Self::rotate_due`].)
    fn checkpoint_due(&self, record_len: u64) -> bool {
        let Some(wal) = &self.wal else { return false };
        if self.failed.is_some() || (wal.offset() == 0 && record_len == 0) {
            return false;
        }
        let interval_passed = self.last_checkpoint.elapsed() >= self.checkpoint_interval;
        record_len > wal.capacity()
            || (interval_passed
                && (record_len == 0 || (wal.offset() == 0 && self.in_flight.is_none())))
    }

    /// Whether the log should go to a checkpoint thread before `record_len` more bytes are appended: it is full,
    /// or the interval passed with records in it and no checkpoint in flight.
    fn rotate_due(&self, record_len: u64) -> bool {
        let Some(wal) = &self.wal else { return false };
        wal.offset() > 0
            && (wal.offset() + record_len > wal.capacity()
                || (self.in_flight.is_none()
                    && self.last_checkpoint.elapsed() >= self.checkpoint_interval))
    }

    /// Hands the log and the writes pending so far (exactly its records' writes: the previous checkpoint
    /// finished before it) to a checkpoint thread, and continues in the spare log. With a checkpoint still in
    /// flight (both logs hold records) this first waits for it, and returns its writes (see
    /// [`Self::take_finished_checkpoint`]).
    fn rotate(&mut self) -> Result<Option<PendingWrites>, StoreError> {
        let finished = self.take_finished_checkpoint(true);
        if let Some(why) = &self.failed {
            return Err(StoreError::Backend(why.clone()));
        }
        let gone = || StoreError::Backend("the write-ahead log is gone".into());
        let spare = self.spare.take().ok_or_else(gone)?;
        let Some(log) = self.wal.replace(spare) else {
            self.spare = self.wal.take();
            return Err(gone());
        };
        let writes = self.pending.clone();
        let (db, path, revision) = (self.db.clone(), self.path.clone(), self.revision);
        #[cfg(test)]
        let pause = self.checkpoint_pause;
        let thread = {
            let writes = writes.clone();
            std::thread::Builder::new()
                .name("store-checkpoint".into())
                .spawn(move || {
                    #[cfg(test)]
                    std::thread::sleep(pause);
                    let started = Instant::now();
                    let written = write_pending(&db, &path, &writes, revision);
                    tracing::debug!(
                        keys = writes.len(),
                        took_us = started.elapsed().as_micros() as u64,
                        "checkpoint"
                    );
                    written
                })
        };
        match thread {
            Ok(thread) => {
                self.in_flight = Some(InFlight {
                    log,
                    writes,
                    thread,
                });
                self.last_checkpoint = Instant::now();
                Ok(finished)
            }
            Err(e) => {
                // Nothing changed on disk: go on in the same log, which is full, so the next batch retries.
                self.spare = self.wal.replace(log);
                Err(backend(
                    "cannot start a checkpoint thread for",
                    &self.path,
                    e,
                ))
            }
        }
    }

    /// Takes in the in-flight checkpoint if it finished (or, with `wait`, once it finished): its log restarts as
    /// the spare, and its writes leave the pending writes unless written again since — after the commit, so a
    /// reader's B-tree snapshot from before it still finds them. Returns those writes, for a batch being built
    /// on a copy of the pending writes ([`forget_written`]). A failed checkpoint refuses every later write.
    fn take_finished_checkpoint(&mut self, wait: bool) -> Option<PendingWrites> {
        if !self
            .in_flight
            .as_ref()
            .is_some_and(|f| wait || f.thread.is_finished())
        {
            return None;
        }
        let InFlight {
            mut log,
            writes,
            thread,
        } = self.in_flight.take()?;
        let written = thread
            .join()
            .unwrap_or_else(|_| Err(StoreError::Backend("the checkpoint thread panicked".into())));
        if let Err(e) = written {
            self.fail(&e);
            return None;
        }
        log.restart();
        self.spare = Some(log);
        self.committed(&writes);
        Some(writes)
    }

    /// After a checkpoint committed `written`: they leave the pending writes (unless written again since) and
    /// readers' copy of them, the key index takes their keys, and lookups use the new B-tree.
    fn committed(&mut self, written: &PendingWrites) {
        forget_written(&mut self.pending, written);
        for (key, write) in written.iter() {
            match write {
                Pending::Put { .. } => {
                    self.tree_keys.insert(key.clone());
                }
                Pending::Deleted => {
                    self.tree_keys.remove(key.as_str());
                }
            }
        }
        lock(&self.shared).pending = self.pending.clone();
        match open_tree(&self.db, &self.path) {
            Ok(tree) => self.tree = Some(tree),
            Err(e) => {
                self.tree = None;
                tracing::warn!(error = %e, "cannot reopen the B-tree after a checkpoint");
            }
        }
    }

    /// Puts the pending writes into the B-tree, in key order, in one durable commit; then the log restarts and
    /// readers stop looking at those writes (only after the commit: a reader's B-tree snapshot from before it
    /// still needs them). A failure refuses every later write.
    fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.take_finished_checkpoint(true);
        if let Some(why) = &self.failed {
            return Err(StoreError::Backend(why.clone()));
        }
        let started = Instant::now();
        self.tree = None;
        let written = write_pending(&self.db, &self.path, &self.pending, self.revision);
        if let Err(e) = written {
            self.fail(&e);
            return Err(e);
        }
        let count = self.pending.len();
        if let Some(wal) = self.wal.as_mut() {
            tracing::debug!(
                log_bytes = wal.offset(),
                keys = count,
                took_us = started.elapsed().as_micros() as u64,
                "checkpoint"
            );
            wal.restart();
        }
        self.last_checkpoint = Instant::now();
        let written = std::mem::take(&mut self.pending);
        self.committed(&written);
        Ok(())
    }

    /// From now on every write fails: after a failed `fdatasync` the kernel may have dropped the dirty pages and
    /// cleared the error (a retried sync then "succeeds" without the data: PostgreSQL's fsyncgate), and after a
    /// failed commit the B-tree in memory may no longer match the log. Either way only a restart, which rebuilds
    /// the state from what is on disk, is safe — etcd exits on a failed WAL sync for the same reason. Reads go on
    /// serving what was acknowledged.
    fn fail(&mut self, e: &StoreError) {
        tracing::error!(error = %e, "the store's log or B-tree could not be written; refusing writes until restarted");
        self.failed = Some(format!("writes are refused until the server restarts: {e}"));
    }

    /// Commits a batch, publishes its events to watchers, then answers each request.
    fn apply(&mut self, batch: Vec<WriteRequest>) {
        let outcome = match &self.failed {
            Some(why) => Err(StoreError::Backend(why.clone())),
            None if self.wal.is_some() => self.log_batch(&batch),
            None => self.commit_batch(&batch),
        };
        match outcome {
            Ok(mut results) => {
                // Publish before replying, so a writer that then watches from its own revision sees its event,
                // and a reader that then reads sees its write.
                {
                    let mut sh = lock(&self.shared);
                    if self.wal.is_some() {
                        sh.pending = self.pending.clone();
                    }
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
                if self.failed.is_none() {
                    tracing::error!(error = %e, "store commit failed; failing the whole batch");
                }
                for req in batch {
                    let _ = req.reply.send(Err(StoreError::Backend(e.to_string())));
                }
            }
        }
    }

    /// Whether `key` exists for a batch being built on `pending`: as its pending write says, else the key index.
    fn exists(&self, pending: &PendingWrites, key: &str) -> bool {
        match pending.get(key) {
            Some(Pending::Put { .. }) => true,
            Some(Pending::Deleted) => false,
            None => self.tree_keys.contains(key),
        }
    }

    /// The current value of `key` for a batch being built on `pending`: its pending write, else the B-tree's.
    fn current(&self, pending: &PendingWrites, key: &str) -> Result<Option<KeyValue>, StoreError> {
        match pending.get(key) {
            Some(Pending::Put { stored, .. }) => decode(key, stored).map(Some),
            Some(Pending::Deleted) => Ok(None),
            None => {
                let tree = match &self.tree {
                    Some(tree) => tree,
                    None => return Err(backend("cannot read", &self.path, "no B-tree snapshot")),
                };
                match tree
                    .get(key)
                    .map_err(|e| backend("cannot read", &self.path, e))?
                {
                    Some(raw) => decode(key, raw.value()).map(Some),
                    None => Ok(None),
                }
            }
        }
    }

    /// With the log: checks a batch against the pending writes and the B-tree, appends its changes as one log
    /// record (`fdatasync`'d), then makes them pending writes — or, when a checkpoint is due, puts them into the
    /// B-tree with the other pending writes in one durable commit instead of logging them. The B-tree is not
    /// touched between checkpoints, so each of its pages is written once per checkpoint however many batches
    /// changed it. Per-request failures (exists, conflict, not found) are results; an `Err` means nothing in the
    /// batch was written.
    fn log_batch(&mut self, batch: &[WriteRequest]) -> Result<Vec<OpResult>, StoreError> {
        if self.tree.is_none() {
            self.tree = Some(open_tree(&self.db, &self.path)?);
        }
        let mut pending = self.pending.clone();
        self.record.clear();
        let mut results = Vec::with_capacity(batch.len());
        let first = self.revision + 1;
        let mut revision = self.revision;
        for req in batch {
            let key = req.op.key();
            let current = match &req.op {
                // A create only needs to know that the key is free, which the key index tells without reading
                // the key's B-tree leaf (most of them are not in redb's cache).
                Op::Create { .. } if !self.exists(&pending, key) => None,
                _ => self.current(&pending, key)?,
            };
            let (reply, event) = match decide(&req.op, key, current, revision + 1) {
                Ok(done) => done,
                Err(e) => {
                    results.push((Err(e), None));
                    continue;
                }
            };
            revision += 1;
            match (&req.op, &event) {
                (Op::Create { expires_at_ms, .. }, Event::Created(new)) => {
                    let stored = self
                        .record
                        .put(key, *expires_at_ms, &header(new), &new.value);
                    pending.insert(
                        key.to_string(),
                        Pending::Put {
                            stored: Arc::from(&self.record.bytes()[stored]),
                            deadline: Deadline::Reset(*expires_at_ms),
                        },
                    );
                }
                (_, Event::Updated { kv: new, .. }) => {
                    // An update keeps the key's TTL deadline, so the log records none (replay leaves the expiry
                    // tables as they are), and a key created since the last checkpoint keeps the one it got.
                    let deadline = match pending.get(key) {
                        Some(Pending::Put { deadline, .. }) => *deadline,
                        _ => Deadline::Keep,
                    };
                    let stored = self.record.put(key, None, &header(new), &new.value);
                    pending.insert(
                        key.to_string(),
                        Pending::Put {
                            stored: Arc::from(&self.record.bytes()[stored]),
                            deadline,
                        },
                    );
                }
                _ => {
                    self.record.delete(key);
                    pending.insert(key.to_string(), Pending::Deleted);
                }
            }
            results.push((Ok(reply), Some(event)));
        }
        if revision < first {
            // Nothing changed (every request failed its precondition): nothing to make durable.
            return Ok(results);
        }
        let record_len = self.record.finish(first, revision).len() as u64;
        if self.checkpoint_due(record_len) {
            // This batch goes into the checkpoint: one durable commit holds it and everything logged before it.
            let before = std::mem::replace(&mut self.pending, pending);
            let previous = std::mem::replace(&mut self.revision, revision);
            if let Err(e) = self.checkpoint() {
                self.pending = before;
                self.revision = previous;
                return Err(e);
            }
            return Ok(results);
        }
        if self.rotate_due(record_len) {
            // The batch's pending writes are dropped with `pending` on failure.
            if let Some(written) = self.rotate()? {
                forget_written(&mut pending, &written);
            }
        }
        let Some(wal) = self.wal.as_mut() else {
            return Err(StoreError::Backend("the write-ahead log is gone".into()));
        };
        if let Err(e) = wal.append(self.record.bytes()) {
            // The batch's pending writes are dropped with `pending`.
            let e = backend("cannot write", wal.path(), e);
            self.fail(&e);
            return Err(e);
        }
        self.pending = pending;
        self.revision = revision;
        Ok(results)
    }

    /// Without the log: applies a batch in one durable redb transaction. Per-request failures (exists, conflict,
    /// not found) are results; an `Err` means nothing in the batch was written.
    fn commit_batch(&mut self, batch: &[WriteRequest]) -> Result<Vec<OpResult>, StoreError> {
        let path = self.path.as_path();
        let txn = self
            .db
            .begin_write()
            .map_err(|e| backend("cannot write", path, e))?;
        let mut results = Vec::with_capacity(batch.len());
        let (first, last) = {
            let Tables {
                mut kv,
                mut meta,
                mut expiry,
                mut by_time,
            } = Tables::open(&txn, path)?;
            let mut revision = self.revision;
            let first = revision + 1;
            for req in batch {
                let key = req.op.key();
                let current = match kv.get(key).map_err(|e| backend("cannot read", path, e))? {
                    Some(raw) => Some(decode(key, raw.value())?),
                    None => None,
                };
                let (reply, event) = match decide(&req.op, key, current, revision + 1) {
                    Ok(done) => done,
                    Err(e) => {
                        results.push((Err(e), None));
                        continue;
                    }
                };
                revision += 1;
                match (&req.op, &event) {
                    (Op::Create { expires_at_ms, .. }, Event::Created(new)) => {
                        kv.insert(key, encode(new).as_slice())
                            .map_err(|e| backend("cannot write", path, e))?;
                        if let Some(deadline) = expires_at_ms {
                            set_expiry(&mut expiry, &mut by_time, key, *deadline, path)?;
                        }
                    }
                    // An update keeps the key's TTL deadline (it stays in the expiry tables).
                    (_, Event::Updated { kv: new, .. }) => {
                        kv.insert(key, encode(new).as_slice())
                            .map_err(|e| backend("cannot write", path, e))?;
                    }
                    _ => remove_key(&mut kv, &mut expiry, &mut by_time, key, path)?,
                }
                results.push((Ok(reply), Some(event)));
            }
            if revision >= first {
                meta.insert(META_REVISION, revision)
                    .map_err(|e| backend("cannot write", path, e))?;
            }
            (first, revision)
        };
        if last < first {
            txn.abort()
                .map_err(|e| backend("cannot abort a transaction in", path, e))?;
            return Ok(results);
        }
        txn.commit()
            .map_err(|e| backend("cannot commit to", path, e))?;
        self.revision = last;
        Ok(results)
    }
}

/// Removes from `pending` the writes a finished checkpoint put into the B-tree (`written`), except those made
/// again since (a new value is a new allocation; a delete again is still a delete, which the B-tree now holds).
fn forget_written(pending: &mut PendingWrites, written: &PendingWrites) {
    for (key, write) in written.iter() {
        let unchanged = match (pending.get(key), write) {
            (Some(Pending::Put { stored: now, .. }), Pending::Put { stored, .. }) => {
                Arc::ptr_eq(now, stored)
            }
            (Some(Pending::Deleted), Pending::Deleted) => true,
            _ => false,
        };
        if unchanged {
            pending.remove(key);
        }
    }
}

/// The durable commit of a checkpoint: `pending` into the B-tree in key order, and the store revision.
fn write_pending(
    db: &Database,
    path: &Path,
    pending: &PendingWrites,
    revision: Revision,
) -> Result<(), StoreError> {
    let txn = db
        .begin_write()
        .map_err(|e| backend("cannot write", path, e))?;
    {
        let Tables {
            mut kv,
            mut meta,
            mut expiry,
            mut by_time,
        } = Tables::open(&txn, path)?;
        for (key, write) in pending.iter() {
            match write {
                Pending::Put { stored, deadline } => {
                    kv.insert(key.as_str(), &stored[..])
                        .map_err(|e| backend("cannot write", path, e))?;
                    if let Deadline::Reset(deadline) = deadline {
                        remove_expiry(&mut expiry, &mut by_time, key, path)?;
                        if let Some(deadline) = deadline {
                            set_expiry(&mut expiry, &mut by_time, key, *deadline, path)?;
                        }
                    }
                }
                Pending::Deleted => remove_key(&mut kv, &mut expiry, &mut by_time, key, path)?,
            }
        }
        meta.insert(META_REVISION, revision)
            .map_err(|e| backend("cannot write", path, e))?;
    }
    txn.commit()
        .map_err(|e| backend("cannot commit to", path, e))
}

/// What `op` does to `key`, whose current value is `current`, as the write of `revision`: the reply and the watch
/// event; or why it fails (the key exists, is missing, or has another mod revision).
fn decide(
    op: &Op,
    key: &str,
    current: Option<KeyValue>,
    revision: Revision,
) -> Result<(Reply, Event), StoreError> {
    match (op, current) {
        (Op::Create { .. }, Some(_)) => Err(StoreError::AlreadyExists {
            key: key.to_string(),
        }),
        (Op::Create { value, .. }, None) => {
            let new = KeyValue {
                key: key.to_string(),
                value: value.clone(),
                create_revision: revision,
                mod_revision: revision,
                version: 1,
            };
            Ok((Reply::Kv(new.clone()), Event::Created(new)))
        }
        (Op::Update { .. } | Op::Delete { .. }, None) => Err(StoreError::NotFound {
            key: key.to_string(),
        }),
        (Op::Update { expected, .. }, Some(cur))
        | (
            Op::Delete {
                expected: Some(expected),
                ..
            },
            Some(cur),
        ) if cur.mod_revision != *expected => Err(StoreError::Conflict {
            key: key.to_string(),
            expected: *expected,
            current: Box::new(cur),
        }),
        (Op::Update { value, .. }, Some(cur)) => {
            let new = KeyValue {
                key: key.to_string(),
                value: value.clone(),
                create_revision: cur.create_revision,
                mod_revision: revision,
                version: cur.version + 1,
            };
            Ok((
                Reply::Kv(new.clone()),
                Event::Updated { prev: cur, kv: new },
            ))
        }
        (Op::Delete { .. }, Some(cur)) => Ok((
            Reply::Deleted(cur.clone(), revision),
            Event::Deleted {
                prev: cur,
                revision,
            },
        )),
    }
}

/// Removes the log files from `dir` (and makes that durable).
fn remove_logs(dir: &Path) -> Result<(), StoreError> {
    for name in WAL_FILES {
        let wal = dir.join(name);
        if wal.exists() {
            std::fs::remove_file(&wal)
                .and_then(|()| std::fs::File::open(dir)?.sync_all())
                .map_err(|e| backend("cannot remove", &wal, e))?;
        }
    }
    Ok(())
}

/// Every key in the B-tree.
fn all_keys(db: &Database, path: &Path) -> Result<HashSet<String>, StoreError> {
    let kv = open_tree(db, path)?;
    let mut keys = HashSet::new();
    for entry in kv.iter().map_err(|e| backend("cannot read", path, e))? {
        let (k, _) = entry.map_err(|e| backend("cannot read", path, e))?;
        keys.insert(k.value().to_string());
    }
    Ok(keys)
}

/// The B-tree's `kv` table in a fresh read transaction (the state of the last commit).
fn open_tree(
    db: &Database,
    path: &Path,
) -> Result<redb::ReadOnlyTable<&'static str, &'static [u8]>, StoreError> {
    db.begin_read()
        .map_err(|e| backend("cannot read", path, e))?
        .open_table(KV)
        .map_err(|e| backend("cannot open table in", path, e))
}

/// Replays the logs' records after revision `durable` (what redb's last durable commit holds) in one durable
/// commit; returns the revisions replayed. The chain may run through both logs (one was being checkpointed while
/// the other took new records), in either file order: each pass replays whichever log continues the chain.
fn recover(
    db: &Database,
    path: &Path,
    logs: &[Wal],
    durable: Revision,
) -> Result<Option<(Revision, Revision)>, StoreError> {
    if logs.is_empty() {
        return Ok(None);
    }
    let txn = db
        .begin_write()
        .map_err(|e| backend("cannot write", path, e))?;
    let replayed = {
        let Tables {
            mut kv,
            mut meta,
            mut expiry,
            mut by_time,
        } = Tables::open(&txn, path)?;
        let mut replay_log = |wal: &Wal, after: Revision| {
            wal.replay(after, |record| {
                for change in &record.changes {
                    match *change {
                        Change::Put {
                            key,
                            value,
                            expires_at_ms,
                        } => {
                            kv.insert(key, value)
                                .map_err(|e| backend("cannot write", path, e))?;
                            if let Some(deadline) = expires_at_ms {
                                set_expiry(&mut expiry, &mut by_time, key, deadline, path)?;
                            }
                        }
                        Change::Delete { key } => {
                            remove_key(&mut kv, &mut expiry, &mut by_time, key, path)?;
                        }
                    }
                }
                meta.insert(META_REVISION, record.last)
                    .map_err(|e| backend("cannot write", path, e))?;
                Ok::<(), StoreError>(())
            })
            .map_err(|e| backend("cannot read", wal.path(), e))?
        };
        let mut count = 0;
        let mut last = durable;
        let mut replayed = vec![false; logs.len()];
        // Each pass either replays one more log or ends the chain.
        for _ in 0..logs.len() {
            let mut progressed = false;
            for (i, wal) in logs.iter().enumerate() {
                if replayed[i] {
                    continue;
                }
                let (records, to) = replay_log(wal, last)?;
                if records > 0 {
                    replayed[i] = true;
                    count += records;
                    last = to;
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        (count, last)
    };
    let (count, last) = replayed;
    if count == 0 {
        txn.abort()
            .map_err(|e| backend("cannot abort a transaction in", path, e))?;
        return Ok(None);
    }
    txn.commit()
        .map_err(|e| backend("cannot commit to", path, e))?;
    tracing::info!(
        records = count,
        from = durable + 1,
        to = last,
        "replayed the write-ahead log"
    );
    Ok(Some((durable + 1, last)))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The store's tables, opened in one write transaction.
struct Tables<'t> {
    kv: redb::Table<'t, &'static str, &'static [u8]>,
    meta: redb::Table<'t, &'static str, i64>,
    expiry: redb::Table<'t, &'static str, i64>,
    by_time: redb::Table<'t, &'static str, ()>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t redb::WriteTransaction, path: &Path) -> Result<Self, StoreError> {
        let open = |e| backend("cannot open table in", path, e);
        Ok(Self {
            kv: txn.open_table(KV).map_err(open)?,
            meta: txn.open_table(META).map_err(open)?,
            expiry: txn.open_table(EXPIRY).map_err(open)?,
            by_time: txn.open_table(EXPIRY_BY_TIME).map_err(open)?,
        })
    }
}

/// Records `key`'s TTL deadline in both expiry tables.
fn set_expiry(
    expiry: &mut redb::Table<'_, &'static str, i64>,
    by_time: &mut redb::Table<'_, &'static str, ()>,
    key: &str,
    deadline_ms: i64,
    path: &Path,
) -> Result<(), StoreError> {
    expiry
        .insert(key, deadline_ms)
        .map_err(|e| backend("cannot write", path, e))?;
    by_time
        .insert(expiry_index_key(deadline_ms, key).as_str(), ())
        .map_err(|e| backend("cannot write", path, e))?;
    Ok(())
}

/// Deletes `key` and its TTL deadline, if it has one.
fn remove_key(
    kv: &mut redb::Table<'_, &'static str, &'static [u8]>,
    expiry: &mut redb::Table<'_, &'static str, i64>,
    by_time: &mut redb::Table<'_, &'static str, ()>,
    key: &str,
    path: &Path,
) -> Result<(), StoreError> {
    kv.remove(key)
        .map_err(|e| backend("cannot delete from", path, e))?;
    remove_expiry(expiry, by_time, key, path)
}

/// Removes `key`'s TTL deadline from both expiry tables, if it has one.
fn remove_expiry(
    expiry: &mut redb::Table<'_, &'static str, i64>,
    by_time: &mut redb::Table<'_, &'static str, ()>,
    key: &str,
    path: &Path,
) -> Result<(), StoreError> {
    let deadline = expiry
        .remove(key)
        .map_err(|e| backend("cannot delete from", path, e))?
        .map(|d| d.value());
    if let Some(deadline) = deadline {
        by_time
            .remove(expiry_index_key(deadline, key).as_str())
            .map_err(|e| backend("cannot delete from", path, e))?;
    }
    Ok(())
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

type OpResult = (Result<Reply, StoreError>, Option<Event>);

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
        self.read(move |view, path| Ok((view.get(&key, path)?, view.revision)))
            .await
    }

    async fn list(&self, prefix: &str, options: &ListOptions) -> Result<ListResult, StoreError> {
        let prefix = prefix.to_string();
        let options = options.clone();
        self.read(move |view, path| {
            let start = match options.start_after.as_deref() {
                Some(after) if after >= prefix.as_str() => Bound::Excluded(after),
                _ => Bound::Included(prefix.as_str()),
            };
            let limit = options.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
            let mut items = Vec::new();
            let mut more = false;
            view.scan(path, start, &prefix, |kv| {
                if items.len() == limit {
                    // Counting the rest would read every later key for each page (quadratic over a paginated
                    // list of 10k pods), so a page only says that more follow; `remainingItemCount` is optional.
                    more = true;
                    return Ok(false);
                }
                items.push(kv);
                Ok(true)
            })?;
            Ok(ListResult {
                items,
                revision: view.revision,
                more,
                remaining: (!more).then_some(0),
            })
        })
        .await
    }

    async fn list_chunked(&self, prefix: &str, chunk: usize) -> Result<ChunkedList, StoreError> {
        // One view (a redb snapshot and the pending writes of its time) serves every chunk, so the list is
        // consistent however slowly the client reads it; the bounded channel keeps at most two chunks in memory.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<KeyValue>, StoreError>>(1);
        let (opened_tx, opened_rx) = oneshot::channel();
        let db = self.db.clone();
        let shared = self.shared.clone();
        let path = self.path.clone();
        let prefix = prefix.to_string();
        let chunk = chunk.max(1);
        tokio::task::spawn_blocking(move || {
            let view = match View::take(&db, &shared, &path) {
                Ok(view) => {
                    if opened_tx.send(Ok(view.revision)).is_err() {
                        return;
                    }
                    view
                }
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                    return;
                }
            };
            let mut items = Vec::with_capacity(chunk);
            let scanned = view.scan(&path, Bound::Included(prefix.as_str()), &prefix, |kv| {
                items.push(kv);
                // A closed channel: the client went away.
                Ok(items.len() < chunk || tx.blocking_send(Ok(std::mem::take(&mut items))).is_ok())
            });
            match scanned {
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                }
                Ok(()) if !items.is_empty() => {
                    let _ = tx.blocking_send(Ok(items));
                }
                Ok(()) => {}
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

async fn next_event(mut st: WatchState) -> Option<(Result<Arc<Event>, StoreError>, WatchState)> {
    if st.done {
        return None;
    }
    loop {
        if let Some(event) = st.backlog.pop_front() {
            st.next = event.revision() + 1;
            return Some((Ok(event), st));
        }
        match st.rx.recv().await {
            Ok(event) => {
                if event.revision() < st.next {
                    continue;
                }
                st.next = event.revision() + 1;
                if event.key().starts_with(st.prefix.as_str()) {
                    return Some((Ok(event), st));
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A store in `dir` holding `/k/0` .. `/k/{n-1}` (revisions 1..=n), closed cleanly (so checkpointed).
    async fn closed_store_with(dir: &Path, n: usize) {
        let store = EmbeddedStore::open(dir, EmbeddedOptions::default()).unwrap();
        for i in 0..n {
            store
                .create(&format!("/k/{i}"), format!("v{i}").into_bytes())
                .await
                .unwrap();
        }
    }

    /// Stored bytes of a key's first version (created and last modified at `revision`).
    fn stored(key: &str, value: &str, revision: Revision) -> Vec<u8> {
        stored_version(key, value, revision, revision, 1)
    }

    fn stored_version(
        key: &str,
        value: &str,
        create: Revision,
        modified: Revision,
        version: i64,
    ) -> Vec<u8> {
        encode(&KeyValue {
            key: key.to_string(),
            value: value.as_bytes().to_vec(),
            create_revision: create,
            mod_revision: modified,
            version,
        })
    }

    /// A record as the writer would log it.
    fn record(first: Revision, last: Revision, each: impl FnOnce(&mut RecordBuf)) -> Vec<u8> {
        let mut r = RecordBuf::default();
        each(&mut r);
        r.finish(first, last).to_vec()
    }

    /// The first log of the (closed) store in `dir`, opened to append records as a crashed run would have.
    fn log_of(dir: &Path) -> Wal {
        nth_log_of(dir, 0)
    }

    /// Log `n` (0 or 1) of the (closed) store in `dir`.
    fn nth_log_of(dir: &Path, n: usize) -> Wal {
        Wal::open(&dir.join(WAL_FILES[n]), DEFAULT_LOG_BYTES, false).unwrap()
    }

    /// Appends a record of one put: `key` created as `value` at `revision`.
    fn append_put(wal: &mut Wal, revision: Revision, key: &str, value: &str) {
        wal.append(&record(revision, revision, |r| {
            r.put(key, None, &[], &stored(key, value, revision));
        }))
        .unwrap();
    }

    async fn value(store: &EmbeddedStore, key: &str) -> Option<String> {
        let (kv, _) = store.get(key).await.unwrap();
        kv.map(|kv| String::from_utf8(kv.value).unwrap())
    }

    #[tokio::test]
    async fn records_logged_after_the_last_checkpoint_are_replayed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        closed_store_with(dir.path(), 2).await;
        let mut wal = log_of(dir.path());
        // As if the last run logged these and was killed before its next checkpoint.
        wal.append(&record(3, 4, |r| {
            r.put("/k/new", None, &[], &stored("/k/new", "n", 3));
            r.put(
                "/k/0",
                None,
                &[],
                &stored_version("/k/0", "updated", 1, 4, 2),
            );
        }))
        .unwrap();
        let expired = now_ms() - 1000;
        wal.append(&record(5, 6, |r| {
            r.delete("/k/1");
            r.put("/k/ttl", Some(expired), &[], &stored("/k/ttl", "t", 6));
        }))
        .unwrap();
        drop(wal);

        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap();
        assert_eq!(store.recovered(), Some((3, 6)));
        assert_eq!(value(&store, "/k/new").await.as_deref(), Some("n"));
        assert_eq!(value(&store, "/k/0").await.as_deref(), Some("updated"));
        assert_eq!(value(&store, "/k/1").await, None);
        let (kv, rev) = store.get("/k/0").await.unwrap();
        assert_eq!((kv.unwrap().version, rev), (2, 6));
        // The replayed TTL's deadline is in the expiry tables: the key is deleted as expired.
        let deadline = Instant::now() + Duration::from_secs(10);
        while value(&store, "/k/ttl").await.is_some() {
            assert!(
                Instant::now() < deadline,
                "the replayed TTL key never expired"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // New writes continue the revision chain, and reopening replays nothing twice.
        assert_eq!(
            store.create("/k/later", vec![]).await.unwrap().mod_revision,
            8
        );
        drop(store);
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap();
        assert_eq!(store.recovered(), None);
        assert_eq!(store.revision().await.unwrap(), 8);
        assert_eq!(value(&store, "/k/0").await.as_deref(), Some("updated"));
    }

    /// A crash while a checkpoint thread was writing one log's records and new batches went to the other: the
    /// chain runs through both logs, whichever file holds its start.
    #[tokio::test]
    async fn records_in_both_logs_are_replayed_in_revision_order() {
        for first in [0, 1] {
            let dir = tempfile::tempdir().unwrap();
            closed_store_with(dir.path(), 1).await;
            let mut older = nth_log_of(dir.path(), first);
            let mut newer = nth_log_of(dir.path(), 1 - first);
            append_put(&mut older, 2, "/k/a", "a");
            older
                .append(&record(3, 3, |r| {
                    r.put("/k/0", None, &[], &stored_version("/k/0", "x", 1, 3, 2));
                }))
                .unwrap();
            newer
                .append(&record(4, 4, |r| {
                    r.put("/k/0", None, &[], &stored_version("/k/0", "y", 1, 4, 3));
                }))
                .unwrap();
            append_put(&mut newer, 5, "/k/b", "b");
            drop((older, newer));

            let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap();
            assert_eq!(store.recovered(), Some((2, 5)), "first log {first}");
            assert_eq!(value(&store, "/k/a").await.as_deref(), Some("a"));
            assert_eq!(value(&store, "/k/b").await.as_deref(), Some("b"));
            // The newer log's update wins: replayed after the older one's.
            assert_eq!(value(&store, "/k/0").await.as_deref(), Some("y"));
            assert_eq!(store.create("/k/c", vec![]).await.unwrap().mod_revision, 6);
        }
    }

    /// The second log's records after a gap in the chain (a batch that was never made durable) are not replayed.
    #[tokio::test]
    async fn records_after_a_gap_in_the_chain_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        closed_store_with(dir.path(), 1).await;
        let mut wal = log_of(dir.path());
        append_put(&mut wal, 2, "/k/a", "a");
        let mut other = nth_log_of(dir.path(), 1);
        append_put(&mut other, 4, "/k/b", "b");
        drop((wal, other));
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap();
        assert_eq!(store.recovered(), Some((2, 2)));
        assert_eq!(value(&store, "/k/b").await, None);
        assert_eq!(store.revision().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_torn_last_record_is_ignored_and_everything_before_it_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        closed_store_with(dir.path(), 1).await;
        let mut wal = log_of(dir.path());
        append_put(&mut wal, 2, "/k/a", "a");
        let mut torn = record(3, 3, |r| {
            r.put("/k/b", None, &[], &stored("/k/b", "b", 3));
        });
        // The crash hit while the last record was being written: its tail is still zeros.
        let n = torn.len();
        torn[n - 4..].fill(0);
        wal.append(&torn).unwrap();
        drop(wal);

        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap();
        assert_eq!(store.recovered(), Some((2, 2)));
        assert_eq!(value(&store, "/k/a").await.as_deref(), Some("a"));
        assert_eq!(value(&store, "/k/b").await, None);
        assert_eq!(store.revision().await.unwrap(), 2);
        assert_eq!(store.create("/k/b", vec![]).await.unwrap().mod_revision, 3);
    }

    #[tokio::test]
    async fn records_from_before_the_last_checkpoint_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        // Revisions 1..=3 are durable in the B-tree.
        closed_store_with(dir.path(), 3).await;
        let mut wal = log_of(dir.path());
        // The log still holds a pass that ended with the checkpoint at revision 3: records that, replayed again,
        // would delete keys written since.
        for rev in 1..=3 {
            wal.append(&record(rev, rev, |r| r.delete("/k/0"))).unwrap();
        }
        drop(wal);
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap();
        assert_eq!(store.recovered(), None);
        assert_eq!(value(&store, "/k/0").await.as_deref(), Some("v0"));
        assert_eq!(store.revision().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_log_whose_database_is_gone_is_not_replayed_onto_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        closed_store_with(dir.path(), 0).await;
        let mut wal = log_of(dir.path());
        append_put(&mut wal, 1, "/k/ghost", "g");
        drop(wal);
        std::fs::remove_file(dir.path().join("store.redb")).unwrap();
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap();
        assert_eq!(store.recovered(), None);
        assert_eq!(value(&store, "/k/ghost").await, None);
        assert_eq!(store.revision().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_store_opened_without_the_log_still_replays_the_one_left_behind_and_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        closed_store_with(dir.path(), 1).await;
        let mut wal = log_of(dir.path());
        append_put(&mut wal, 2, "/k/a", "a");
        drop(wal);
        let options = EmbeddedOptions {
            write_ahead_log: false,
            ..EmbeddedOptions::default()
        };
        let store = EmbeddedStore::open(dir.path(), options.clone()).unwrap();
        assert_eq!(store.recovered(), Some((2, 2)));
        assert_eq!(value(&store, "/k/a").await.as_deref(), Some("a"));
        for name in WAL_FILES {
            assert!(!dir.path().join(name).exists());
        }
        assert_eq!(store.create("/k/b", vec![]).await.unwrap().mod_revision, 3);
        drop(store);
        let store = EmbeddedStore::open(dir.path(), options).unwrap();
        assert_eq!(value(&store, "/k/b").await.as_deref(), Some(""));
    }

    #[tokio::test]
    async fn a_batch_bigger_than_the_log_is_committed_as_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let options = EmbeddedOptions {
            log_bytes: 4096,
            ..EmbeddedOptions::default()
        };
        let store = EmbeddedStore::open(dir.path(), options.clone()).unwrap();
        store.create("/k/small", b"s".to_vec()).await.unwrap();
        let big = store.create("/k/big", vec![b'x'; 10_000]).await.unwrap();
        assert_eq!(big.mod_revision, 2);
        assert_eq!(value(&store, "/k/small").await.as_deref(), Some("s"));
        drop(store);
        let store = EmbeddedStore::open(dir.path(), options).unwrap();
        assert_eq!(
            store.get("/k/big").await.unwrap().0.unwrap().value.len(),
            10_000
        );
    }

    /// A full log goes to a checkpoint thread: batches after it are logged to the other log and acknowledged
    /// while that checkpoint is still writing, reads see every write throughout, and once both logs are full the
    /// writer waits for the checkpoint instead of overwriting records it still needs.
    #[tokio::test]
    async fn batches_are_logged_to_the_other_log_while_a_checkpoint_is_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let pause = Duration::from_secs(3);
        let options = EmbeddedOptions {
            log_bytes: 8 << 10,
            checkpoint_pause: pause,
            ..no_timed_checkpoints()
        };
        let store = EmbeddedStore::open(dir.path(), options.clone()).unwrap();
        let kilobyte = vec![b'v'; 1000];
        // Seven ~1 KB records fill the first log; the eighth starts the checkpoint of the first seven.
        for i in 0..8 {
            store
                .create(&format!("/k/{i}"), kilobyte.clone())
                .await
                .unwrap();
        }
        let started = Instant::now();
        for i in 8..12 {
            store
                .create(&format!("/k/{i}"), kilobyte.clone())
                .await
                .unwrap();
        }
        store.update("/k/0", 1, b"changed".to_vec()).await.unwrap();
        store.delete("/k/1", None).await.unwrap();
        assert!(
            started.elapsed() < pause / 2,
            "writes waited {:?} for the checkpoint in flight",
            started.elapsed()
        );
        assert!(store.shared.lock().unwrap().pending.contains_key("/k/2"));
        let listed = all_keys_under(&store, "/k/").await;
        assert_eq!(listed.len(), 11, "{listed:?}");
        assert_eq!(value(&store, "/k/0").await.as_deref(), Some("changed"));
        // The second log fills too: the writer waits for the first checkpoint, then hands over the second log.
        for i in 12..20 {
            store
                .create(&format!("/k/{i}"), kilobyte.clone())
                .await
                .unwrap();
        }
        assert!(started.elapsed() >= pause / 2);
        // The first checkpoint's writes left the pending writes (they are in the B-tree); later ones did not.
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.shared.lock().unwrap().pending.contains_key("/k/2") {
            assert!(
                Instant::now() < deadline,
                "the first checkpoint never finished"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(store.shared.lock().unwrap().pending.contains_key("/k/0"));
        assert_eq!(all_keys_under(&store, "/k/").await.len(), 19);
        assert_eq!(value(&store, "/k/0").await.as_deref(), Some("changed"));
        assert_eq!(value(&store, "/k/1").await, None);
        // Kill-free restart: everything is there, nothing replayed twice.
        drop(store);
        let store = EmbeddedStore::open(dir.path(), options).unwrap();
        assert_eq!(all_keys_under(&store, "/k/").await.len(), 19);
        assert_eq!(value(&store, "/k/0").await.as_deref(), Some("changed"));
        assert_eq!(store.revision().await.unwrap(), 22);
    }

    async fn all_keys_under(store: &EmbeddedStore, prefix: &str) -> Vec<String> {
        let page = store.list(prefix, &ListOptions::default()).await.unwrap();
        keys(&page.items).into_iter().map(String::from).collect()
    }

    /// Options under which only a full log or a close makes a checkpoint, so writes stay pending.
    fn no_timed_checkpoints() -> EmbeddedOptions {
        EmbeddedOptions {
            checkpoint_interval: Duration::from_secs(3600),
            ..EmbeddedOptions::default()
        }
    }

    fn keys(items: &[KeyValue]) -> Vec<&str> {
        items.iter().map(|kv| kv.key.as_str()).collect()
    }

    async fn list_keys(
        store: &EmbeddedStore,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<String>, bool) {
        let options = ListOptions {
            limit: Some(limit),
            start_after: after.map(String::from),
        };
        let page = store.list(prefix, &options).await.unwrap();
        (
            keys(&page.items).into_iter().map(String::from).collect(),
            page.more,
        )
    }

    /// Polls `done` every 20 ms for at most `secs` seconds.
    async fn eventually(secs: u64, mut done: impl AsyncFnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if done().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn writes_since_the_last_checkpoint_are_read_over_the_b_tree_and_kept_by_it() {
        let dir = tempfile::tempdir().unwrap();
        closed_store_with(dir.path(), 5).await;
        let store = EmbeddedStore::open(dir.path(), no_timed_checkpoints()).unwrap();
        store.delete("/k/1", None).await.unwrap();
        store.update("/k/3", 4, b"new3".to_vec()).await.unwrap();
        store.create("/k/25", b"v25".to_vec()).await.unwrap();
        store.create("/l/0", b"l0".to_vec()).await.unwrap();
        assert_eq!(
            lock(&store.shared).pending.len(),
            4,
            "the writes are pending, not in the B-tree"
        );

        assert_eq!(
            value(&store, "/k/1").await,
            None,
            "a pending delete hides the B-tree's value"
        );
        let (k3, revision) = store.get("/k/3").await.unwrap();
        let k3 = k3.unwrap();
        assert_eq!(
            (
                k3.value.as_slice(),
                k3.create_revision,
                k3.mod_revision,
                k3.version
            ),
            (&b"new3"[..], 4, 7, 2)
        );
        assert_eq!(revision, 9);
        let all = store.list("/k/", &ListOptions::default()).await.unwrap();
        assert_eq!(keys(&all.items), ["/k/0", "/k/2", "/k/25", "/k/3", "/k/4"]);
        assert_eq!((all.revision, all.more), (9, false));
        // Pages that start and end on either side of pending writes.
        assert_eq!(
            list_keys(&store, "/k/", None, 2).await,
            (vec!["/k/0".into(), "/k/2".into()], true)
        );
        assert_eq!(
            list_keys(&store, "/k/", Some("/k/2"), 2).await,
            (vec!["/k/25".into(), "/k/3".into()], true)
        );
        assert_eq!(
            list_keys(&store, "/k/", Some("/k/3"), 2).await,
            (vec!["/k/4".into()], false)
        );
        let chunked = store.list_chunked("/k/", 2).await.unwrap();
        assert_eq!(chunked.revision, 9);
        let chunks: Vec<Vec<KeyValue>> = futures_util::StreamExt::collect::<Vec<_>>(chunked.chunks)
            .await
            .into_iter()
            .map(|c| c.unwrap())
            .collect();
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        assert_eq!(keys(&chunks.concat()), keys(&all.items));
        let mut exported = Vec::new();
        let exported_at = store.export(|kv| {
            exported.push(kv.key);
            Ok(())
        });
        assert_eq!(exported_at.unwrap(), 9);
        assert_eq!(exported, ["/k/0", "/k/2", "/k/25", "/k/3", "/k/4", "/l/0"]);
        drop(store);

        // Closing put them into the B-tree: the same state after a reopen, with nothing left to replay.
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap();
        assert_eq!(store.recovered(), None);
        assert_eq!(store.revision().await.unwrap(), 9);
        let all = store.list("/k/", &ListOptions::default()).await.unwrap();
        assert_eq!(keys(&all.items), ["/k/0", "/k/2", "/k/25", "/k/3", "/k/4"]);
        assert_eq!(value(&store, "/k/3").await.as_deref(), Some("new3"));
        // Creates check the key index, built from the B-tree on open.
        for taken in ["/k/0", "/k/25", "/l/0"] {
            let refused = store.create(taken, b"again".to_vec()).await;
            assert!(
                matches!(refused, Err(StoreError::AlreadyExists { .. })),
                "{taken}: {refused:?}"
            );
        }
        store.create("/k/1", b"back".to_vec()).await.unwrap();
        assert_eq!(value(&store, "/k/1").await.as_deref(), Some("back"));
    }

    #[tokio::test]
    async fn a_key_deleted_and_created_again_without_a_ttl_does_not_expire_at_its_old_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_millis(300);
        {
            let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap();
            store
                .create_with_ttl("/e/again", b"first".to_vec(), ttl)
                .await
                .unwrap();
            store
                .create_with_ttl("/e/expires", b"x".to_vec(), ttl)
                .await
                .unwrap();
        }
        // Both deadlines are in the B-tree's expiry tables now; the new "/e/again" stays pending.
        let store = EmbeddedStore::open(dir.path(), no_timed_checkpoints()).unwrap();
        let (kv, _) = store.get("/e/again").await.unwrap();
        store
            .delete("/e/again", Some(kv.unwrap().mod_revision))
            .await
            .unwrap();
        store.create("/e/again", b"second".to_vec()).await.unwrap();
        assert!(
            eventually(10, async || value(&store, "/e/expires").await.is_none()).await,
            "the other key expired"
        );
        assert_eq!(
            value(&store, "/e/again").await.as_deref(),
            Some("second"),
            "pending: not expired"
        );
        drop(store);

        // Checkpointed with the old deadline removed: a later expiry scan (seen deleting a fresh key) keeps it.
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap();
        store
            .create_with_ttl("/e/fresh", b"x".to_vec(), Duration::from_millis(1))
            .await
            .unwrap();
        assert!(
            eventually(10, async || value(&store, "/e/fresh").await.is_none()).await,
            "a key with a TTL past expired"
        );
        assert_eq!(value(&store, "/e/again").await.as_deref(), Some("second"));
    }
}
