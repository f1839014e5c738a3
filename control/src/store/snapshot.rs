//! Backups of the embedded store: `windlass-control snapshot save FILE --data-dir DIR` and
//! `windlass-control snapshot restore FILE --data-dir NEWDIR`. (The etcd backend is backed up with
//! `etcdctl snapshot save`/`restore`, as upstream.)
//!
//! Consistency while serving: a running server holds redb's exclusive lock on `DIR/store.redb`, so no other
//! process can open it. The server therefore serves snapshots itself on a Unix socket, `DIR/snapshot.sock`
//! (mode 0600, like the data directory's keys only for root): every connection gets one snapshot, read in one redb
//! read transaction, i.e. one point in time, while writes go on (redb readers never block the writer). This is
//! etcd's design too (the `Maintenance.Snapshot` RPC streams from a read transaction of the running member).
//! `snapshot save` uses the socket when a server answers on it, and otherwise opens the store itself (offline
//! backup); it refuses when the store is locked but nobody answers on the socket.
//!
//! File format (version 1), all integers little-endian:
//! `b"WLSNAP\0\x01"`, then per key `0x01, key_len: u32, key, create_revision: i64, mod_revision: i64,
//! version: i64, value_len: u32, value` in key order, then `0x00, store_revision: i64, key_count: u64`, then the
//! SHA-256 of everything before it. A restore checks all of it before writing anything.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use super::embedded::{EmbeddedOptions, EmbeddedStore};
use super::{KeyValue, Revision, StoreError};

const MAGIC: &[u8; 8] = b"WLSNAP\0\x01";
const TAG_KEY: u8 = 1;
const TAG_END: u8 = 0;
/// The socket a serving embedded store answers snapshot requests on, inside its data directory.
pub const SOCKET: &str = "snapshot.sock";

/// What went wrong taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("snapshot {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("snapshot {} fails its checksum (damaged or truncated); nothing was restored", path.display())]
    Checksum { path: PathBuf },
    #[error("restore target {} is not empty; restore into a new directory", dir.display())]
    TargetNotEmpty { dir: PathBuf },
    #[error(
        "the store in {} is in use by a process that does not serve snapshots on {}",
        dir.display(),
        socket.display()
    )]
    InUse { dir: PathBuf, socket: PathBuf },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a snapshot stream: the magic, the keys, the trailer and the checksum.
struct SnapshotWriter<W: Write> {
    out: W,
    hash: Sha256,
    count: u64,
}

impl<W: Write> SnapshotWriter<W> {
    fn new(out: W) -> io::Result<Self> {
        let mut w = Self {
            out,
            hash: Sha256::new(),
            count: 0,
        };
        w.put(MAGIC)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hash.update(bytes);
        self.out.write_all(bytes)
    }

    fn key(&mut self, kv: &KeyValue) -> io::Result<()> {
        let too_big =
            |what| io::Error::new(io::ErrorKind::InvalidData, format!("{what} too large"));
        let key_len = u32::try_from(kv.key.len()).map_err(|_| too_big("key"))?;
        let value_len = u32::try_from(kv.value.len()).map_err(|_| too_big("value"))?;
        self.put(&[TAG_KEY])?;
        self.put(&key_len.to_le_bytes())?;
        self.put(kv.key.as_bytes())?;
        self.put(&kv.create_revision.to_le_bytes())?;
        self.put(&kv.mod_revision.to_le_bytes())?;
        self.put(&kv.version.to_le_bytes())?;
        self.put(&value_len.to_le_bytes())?;
        self.put(&kv.value)?;
        self.count += 1;
        Ok(())
    }

    fn finish(mut self, revision: Revision) -> io::Result<W> {
        self.put(&[TAG_END])?;
        self.put(&revision.to_le_bytes())?;
        let count = self.count;
        self.put(&count.to_le_bytes())?;
        let digest = self.hash.finalize_reset();
        self.out.write_all(&digest)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Writes a consistent snapshot of `store` to `out` (see the module documentation for the format).
pub fn write_snapshot<W: Write>(store: &EmbeddedStore, out: W) -> Result<W, StoreError> {
    let io = |e: io::Error| StoreError::Backend(format!("cannot write snapshot: {e}"));
    let mut w = SnapshotWriter::new(out).map_err(io)?;
    let revision = store.export(|kv| w.key(&kv).map_err(io))?;
    w.finish(revision).map_err(io)
}

/// A snapshot's content, checked.
#[derive(Debug)]
pub struct Snapshot {
    pub revision: Revision,
    pub items: Vec<KeyValue>,
}

/// Parses and checks a snapshot held in memory: checksum first, then the structure and revisions.
pub fn parse_snapshot(bytes: &[u8], path: &Path) -> Result<Snapshot, SnapshotError> {
    let corrupt = |reason: &str| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < MAGIC.len() + 32 || !bytes.starts_with(&MAGIC[..6]) {
        return Err(corrupt("not a windlass-control snapshot"));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt("unsupported snapshot version"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return Err(SnapshotError::Checksum {
            path: path.to_path_buf(),
        });
    }
    let mut r = &body[MAGIC.len()..];
    let mut take = |n: usize| -> Result<&[u8], SnapshotError> {
        if r.len() < n {
            return Err(corrupt("truncated entry"));
        }
        let (head, rest) = r.split_at(n);
        r = rest;
        Ok(head)
    };
    let mut items: Vec<KeyValue> = Vec::new();
    let (revision, count) = loop {
        let tag = take(1)?[0];
        let i64_at = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as usize;
        match tag {
            TAG_KEY => {
                let key_len = u32_at(take(4)?);
                let key = std::str::from_utf8(take(key_len)?)
                    .map_err(|_| corrupt("a key is not UTF-8"))?
                    .to_string();
                let create_revision = i64_at(take(8)?);
                let mod_revision = i64_at(take(8)?);
                let version = i64_at(take(8)?);
                let value_len = u32_at(take(4)?);
                let value = take(value_len)?.to_vec();
                if items.last().is_some_and(|prev| prev.key >= key) {
                    return Err(corrupt("keys out of order"));
                }
                if create_revision < 1 || mod_revision < create_revision || version < 1 {
                    return Err(corrupt(&format!("bad revisions for key {key}")));
                }
                items.push(KeyValue {
                    key,
                    value,
                    create_revision,
                    mod_revision,
                    version,
                });
            }
            TAG_END => {
                let revision = i64_at(take(8)?);
                let count = u64::from_le_bytes(take(8)?.try_into().unwrap_or([0; 8]));
                break (revision, count);
            }
            _ => return Err(corrupt("unknown entry tag")),
        }
    };
    if !r.is_empty() {
        return Err(corrupt("data after the end marker"));
    }
    if count != items.len() as u64 {
        return Err(corrupt("key count does not match"));
    }
    if let Some(newest) = items.iter().map(|kv| kv.mod_revision).max() {
        if newest > revision {
            return Err(corrupt("a key is newer than the snapshot's revision"));
        }
    }
    Ok(Snapshot { revision, items })
}

/// Saves a snapshot of the embedded store in `data_dir` to `file`: through the running server's socket if one
/// answers, else by opening the store. The file appears (renamed into place, fsync'd) only once complete and
/// verified.
pub fn save(data_dir: &Path, file: &Path) -> Result<Snapshot, SnapshotError> {
    let socket = data_dir.join(SOCKET);
    let bytes = match UnixStream::connect(&socket) {
        Ok(mut stream) => {
            tracing::info!(socket = %socket.display(), "taking a snapshot from the running server");
            let mut bytes = Vec::new();
            stream
                .read_to_end(&mut bytes)
                .map_err(io_err("cannot read snapshot from", &socket))?;
            bytes
        }
        Err(_) => {
            let db = data_dir.join("store.redb");
            if !db.exists() {
                return Err(SnapshotError::Io {
                    what: "no store in",
                    path: data_dir.to_path_buf(),
                    source: io::Error::from(io::ErrorKind::NotFound),
                });
            }
            let store = match EmbeddedStore::open(data_dir, EmbeddedOptions::default()) {
                Ok(store) => store,
                Err(StoreError::Backend(msg)) if msg.contains("already open") => {
                    return Err(SnapshotError::InUse {
                        dir: data_dir.to_path_buf(),
                        socket,
                    })
                }
                Err(e) => return Err(e.into()),
            };
            tracing::info!(dir = %data_dir.display(), "taking a snapshot of the stopped store");
            write_snapshot(&store, Vec::new())?
        }
    };
    // Check what we got (the server may have died mid-stream) before anything is written.
    let snapshot = parse_snapshot(&bytes, &socket)?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = file.with_file_name(format!(".{name}.tmp"));
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)?;
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("cannot write snapshot", file)(e));
    }
    Ok(snapshot)
}

/// Restores the snapshot in `file` into `data_dir`, which must not exist or be empty. The whole snapshot is
/// checked first; on any error nothing is left in `data_dir`.
pub fn restore(file: &Path, data_dir: &Path) -> Result<Snapshot, SnapshotError> {
    let bytes = std::fs::read(file).map_err(io_err("cannot read snapshot", file))?;
    let snapshot = parse_snapshot(&bytes, file)?;
    let created = match std::fs::read_dir(data_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(SnapshotError::TargetNotEmpty {
                    dir: data_dir.to_path_buf(),
                });
            }
            false
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(io_err("cannot create", data_dir))?;
            true
        }
        Err(e) => return Err(io_err("cannot read", data_dir)(e)),
    };
    if let Err(e) = EmbeddedStore::import(data_dir, snapshot.revision, &snapshot.items) {
        if created {
            let _ = std::fs::remove_dir(data_dir);
        }
        return Err(e.into());
    }
    Ok(snapshot)
}

/// Serves snapshots of a running embedded store on `DIR/snapshot.sock` until dropped.
pub struct SnapshotServer {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SnapshotServer {
    /// Listens on `data_dir/snapshot.sock` (replacing a stale socket file left by a crashed server).
    pub fn start(store: Arc<EmbeddedStore>, data_dir: &Path) -> Result<Self, SnapshotError> {
        let socket = data_dir.join(SOCKET);
        if UnixStream::connect(&socket).is_ok() {
            return Err(SnapshotError::InUse {
                dir: data_dir.to_path_buf(),
                socket,
            });
        }
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("cannot remove stale socket", &socket)(e)),
        }
        let listener = UnixListener::bind(&socket).map_err(io_err("cannot listen on", &socket))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("cannot restrict", &socket))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("snapshot-server".into())
                .spawn(move || accept_loop(&listener, &store, &stop))
                .map_err(io_err("cannot start the snapshot thread for", &socket))?
        };
        tracing::info!(socket = %socket.display(), "serving store snapshots");
        Ok(Self {
            socket,
            stop,
            thread: Some(thread),
        })
    }
}

fn accept_loop(listener: &UnixListener, store: &Arc<EmbeddedStore>, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        let store = store.clone();
        // One thread per request: a snapshot is a long read, and requests are rare (an operator's backup).
        let _ = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || match write_snapshot(&store, BufWriter::new(conn)) {
                Ok(_) => tracing::info!("snapshot sent"),
                Err(e) => tracing::warn!(error = %e, "snapshot failed"),
            });
    }
}

impl Drop for SnapshotServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the loop sees the flag.
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// `windlass-control snapshot ...`.
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Saves a consistent snapshot of the embedded store (also while the server runs) to FILE.
    Save {
        file: PathBuf,
        /// The server's data directory.
        #[arg(long, default_value = "/var/lib/windlass/control")]
        data_dir: PathBuf,
    },
    /// Restores FILE into a new (absent or empty) data directory.
    Restore {
        file: PathBuf,
        /// The data directory to create.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// Runs a snapshot subcommand; prints what it did on stdout.
pub fn run(command: &SnapshotCommand) -> Result<(), SnapshotError> {
    match command {
        SnapshotCommand::Save { file, data_dir } => {
            let s = save(data_dir, file)?;
            println!(
                "saved {} keys at revision {} to {}",
                s.items.len(),
                s.revision,
                file.display()
            );
        }
        SnapshotCommand::Restore { file, data_dir } => {
            let s = restore(file, data_dir)?;
            println!(
                "restored {} keys at revision {} into {}",
                s.items.len(),
                s.revision,
                data_dir.display()
            );
        }
    }
    Ok(())
}
