//! The embedded store's write-ahead log: one preallocated file of records, each holding the changes of one
//! committed batch (see [`super::embedded`] for how the store uses it).
//!
//! A record is a 32-byte header — CRC32 (u32) of everything after its first 8 bytes, 4 zero bytes, payload length
//! (u64), first and last revision of the batch (i64 each), all little-endian — and a payload of changes:
//! `1 key value` (put), `2 deadline key value` (put with a TTL deadline, Unix ms), `3 key` (delete); keys and
//! values are a u64 length and the bytes, a value being exactly what the B-tree stores (revision header + data).
//!
//! Records are written at increasing offsets from 0; after a checkpoint the log restarts at offset 0 and
//! overwrites the previous pass in place. So the file holds the current pass's records followed by whatever an
//! earlier pass left, and reading stops at the first record that is torn (short, zero, bad CRC) or that does
//! not continue the revision chain (an earlier pass's records carry older revisions). Revisions only grow, so a
//! stale record can never continue the chain.
//!
//! The file is written with zeros once when created (not `fallocate`d, which leaves unwritten extents that the
//! first write of each block converts — a journaled metadata change): later records overwrite allocated,
//! written blocks, so `fdatasync` only has the data to flush, never the file's size or extents. (On the
//! development VM — ext4 without a journal — preallocating made no measurable difference in CPU or throughput;
//! on a journaled file system each size-extending `fdatasync` would also commit the journal.)

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::Revision;

/// Bytes of a record header.
pub(crate) const RECORD_HEADER: usize = 32;
const TAG_PUT: u8 = 1;
const TAG_PUT_EXPIRING: u8 = 2;
const TAG_DELETE: u8 = 3;
/// Zeros written per call while preallocating.
const ZERO_CHUNK: usize = 1 << 20;

/// The open log file and where its next record goes.
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    capacity: u64,
    offset: u64,
}

/// One change of a replayed record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Change<'a> {
    Put {
        key: &'a str,
        /// The stored bytes (revision header and value).
        value: &'a [u8],
        expires_at_ms: Option<i64>,
    },
    Delete {
        key: &'a str,
    },
}

/// A record read back from the log.
#[derive(Debug)]
pub(crate) struct Record<'a> {
    pub(crate) last: Revision,
    pub(crate) changes: Vec<Change<'a>>,
}

/// A record under construction; reused across batches so the write path does not allocate per batch.
pub(crate) struct RecordBuf {
    buf: Vec<u8>,
}

impl Default for RecordBuf {
    fn default() -> Self {
        Self {
            buf: vec![0; RECORD_HEADER],
        }
    }
}

fn put_len(buf: &mut Vec<u8>, len: usize) {
    // usize fits in u64 on every target Rust supports.
    buf.extend_from_slice(&(len as u64).to_le_bytes());
}

impl RecordBuf {
    /// Starts a new record.
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.buf.resize(RECORD_HEADER, 0);
    }

    /// Appends a put of `key` whose stored bytes are `header` followed by `value`; returns where those stored
    /// bytes are in [`Self::bytes`], so the caller inserts the same bytes into the B-tree without another copy.
    pub(crate) fn put(
        &mut self,
        key: &str,
        expires_at_ms: Option<i64>,
        header: &[u8],
        value: &[u8],
    ) -> std::ops::Range<usize> {
        match expires_at_ms {
            None => self.buf.push(TAG_PUT),
            Some(deadline) => {
                self.buf.push(TAG_PUT_EXPIRING);
                self.buf.extend_from_slice(&deadline.to_le_bytes());
            }
        }
        put_len(&mut self.buf, key.len());
        self.buf.extend_from_slice(key.as_bytes());
        put_len(&mut self.buf, header.len() + value.len());
        let start = self.buf.len();
        self.buf.extend_from_slice(header);
        self.buf.extend_from_slice(value);
        start..self.buf.len()
    }

    /// Appends a delete of `key`.
    pub(crate) fn delete(&mut self, key: &str) {
        self.buf.push(TAG_DELETE);
        put_len(&mut self.buf, key.len());
        self.buf.extend_from_slice(key.as_bytes());
    }

    /// The record's bytes so far (header not yet filled in).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Fills in the header for revisions `first..=last` and returns the whole record.
    pub(crate) fn finish(&mut self, first: Revision, last: Revision) -> &[u8] {
        let len = (self.buf.len() - RECORD_HEADER) as u64;
        self.buf[4..8].copy_from_slice(&[0; 4]);
        self.buf[8..16].copy_from_slice(&len.to_le_bytes());
        self.buf[16..24].copy_from_slice(&first.to_le_bytes());
        self.buf[24..32].copy_from_slice(&last.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[8..]);
        self.buf[0..4].copy_from_slice(&crc.to_le_bytes());
        &self.buf
    }
}

/// Reads the changes of a payload whose CRC matched; `None` if it does not parse (a bug, not a torn write).
fn parse_changes(mut p: &[u8]) -> Option<Vec<Change<'_>>> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if p.len() < n {
            return None;
        }
        let (head, rest) = p.split_at(n);
        *p = rest;
        Some(head)
    }
    fn num(p: &mut &[u8]) -> Option<u64> {
        take(p, 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn bytes<'a>(p: &mut &'a [u8]) -> Option<&'a [u8]> {
        let n = usize::try_from(num(p)?).ok()?;
        take(p, n)
    }
    let mut changes = Vec::new();
    while let Some(tag) = take(&mut p, 1) {
        let change = match tag[0] {
            TAG_PUT | TAG_PUT_EXPIRING => {
                let expires_at_ms = if tag[0] == TAG_PUT_EXPIRING {
                    Some(num(&mut p)? as i64)
                } else {
                    None
                };
                let key = std::str::from_utf8(bytes(&mut p)?).ok()?;
                Change::Put {
                    key,
                    value: bytes(&mut p)?,
                    expires_at_ms,
                }
            }
            TAG_DELETE => Change::Delete {
                key: std::str::from_utf8(bytes(&mut p)?).ok()?,
            },
            _ => return None,
        };
        changes.push(change);
    }
    Some(changes)
}

impl Wal {
    /// Opens the log at `path`, first creating it (or, with `fresh`, replacing whatever is there) and writing it
    /// with zeros up to `capacity` bytes. An existing longer file keeps its length.
    pub(crate) fn open(path: &Path, capacity: u64, fresh: bool) -> io::Result<Self> {
        if fresh {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        if len < capacity {
            let zeros = vec![0u8; ZERO_CHUNK];
            let mut at = len;
            while at < capacity {
                let n = usize::try_from(capacity - at).map_or(ZERO_CHUNK, |n| n.min(ZERO_CHUNK));
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            file.sync_all()?;
            // The new file's name must be durable too before records in it are relied on.
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            capacity: len.max(capacity),
            offset: 0,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written since the log last restarted.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Appends a finished record and waits until it is on stable storage (`fdatasync`). The caller has checked
    /// that it fits ([`Self::offset`] + length ≤ [`Self::capacity`]).
    pub(crate) fn append(&mut self, record: &[u8]) -> io::Result<()> {
        let end = self.offset + record.len() as u64;
        if end > self.capacity {
            return Err(io::Error::other("record does not fit in the log"));
        }
        self.file.write_all_at(record, self.offset)?;
        self.file.sync_data()?;
        self.offset = end;
        Ok(())
    }

    /// Starts writing at offset 0 again: everything logged so far is durable elsewhere (a checkpoint).
    pub(crate) fn restart(&mut self) {
        self.offset = 0;
    }

    /// Calls `each` for every record from offset 0 that continues the revision chain after `after`, in order;
    /// stops at the first torn or stale record. Returns how many records were read and the last revision.
    pub(crate) fn replay<E>(
        &self,
        after: Revision,
        mut each: impl FnMut(&Record<'_>) -> Result<(), E>,
    ) -> Result<Result<(usize, Revision), E>, io::Error> {
        let mut offset = 0u64;
        let mut expected = after + 1;
        let mut count = 0;
        let mut header = [0u8; RECORD_HEADER];
        let mut payload = Vec::new();
        loop {
            if offset + RECORD_HEADER as u64 > self.capacity {
                break;
            }
            match self.file.read_exact_at(&mut header, offset) {
                Ok(()) => {}
                // A file shorter than its capacity (cut short by hand or by a full disk) ends the log there.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
            let field =
                |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().unwrap_or([0; 8]));
            let crc = u32::from_le_bytes(header[0..4].try_into().unwrap_or([0; 4]));
            let len = field(8);
            let (first, last) = (field(16) as i64, field(24) as i64);
            let end = offset
                .saturating_add(RECORD_HEADER as u64)
                .saturating_add(len);
            // A zero length is unwritten space; a revision range that does not continue the chain is a record
            // from an earlier pass (or a torn header); past the end is torn.
            if len == 0 || first != expected || last < first || end > self.capacity {
                break;
            }
            let Ok(len) = usize::try_from(len) else { break };
            payload.resize(len, 0);
            match self
                .file
                .read_exact_at(&mut payload, offset + RECORD_HEADER as u64)
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&header[8..]);
            hasher.update(&payload);
            if hasher.finalize() != crc {
                break;
            }
            let Some(changes) = parse_changes(&payload) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "record at offset {offset} of {} has a valid checksum but cannot be parsed",
                        self.path.display()
                    ),
                ));
            };
            if let Err(e) = each(&Record { last, changes }) {
                return Ok(Err(e));
            }
            count += 1;
            expected = last + 1;
            offset = end;
        }
        Ok(Ok((count, expected - 1)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn record(first: Revision, last: Revision, puts: &[(&str, &str)]) -> Vec<u8> {
        let mut r = RecordBuf::default();
        for (k, v) in puts {
            r.put(k, None, b"hdr", v.as_bytes());
        }
        r.finish(first, last).to_vec()
    }

    /// (last revision, keys) of every record replayed after `after`.
    fn read_all(wal: &Wal, after: Revision) -> Vec<(Revision, Vec<String>)> {
        let mut out = Vec::new();
        wal.replay::<()>(after, |r| {
            let keys = r
                .changes
                .iter()
                .map(|c| match c {
                    Change::Put { key, .. } | Change::Delete { key } => key.to_string(),
                })
                .collect();
            out.push((r.last, keys));
            Ok(())
        })
        .unwrap()
        .unwrap();
        out
    }

    #[test]
    fn records_read_back_with_every_kind_of_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(&dir.path().join("wal"), 1 << 16, true).unwrap();
        let mut r = RecordBuf::default();
        let range = r.put("/a", None, b"HDR", b"one");
        assert_eq!(&r.bytes()[range], b"HDRone");
        r.put("/b", Some(1234), b"", b"two");
        r.delete("/c");
        wal.append(r.finish(5, 7)).unwrap();
        let mut seen = Vec::new();
        wal.replay::<()>(4, |rec| {
            assert_eq!(rec.last, 7);
            seen = vec![
                format!("{:?}", rec.changes[0]),
                format!("{:?}", rec.changes[1]),
                format!("{:?}", rec.changes[2]),
            ];
            assert_eq!(rec.changes.len(), 3);
            Ok(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            seen[1],
            format!(
                "{:?}",
                Change::Put {
                    key: "/b",
                    value: b"two",
                    expires_at_ms: Some(1234)
                }
            )
        );
        assert_eq!(seen[2], format!("{:?}", Change::Delete { key: "/c" }));
    }

    #[test]
    fn a_torn_last_record_is_ignored_and_the_records_before_it_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let mut wal = Wal::open(&path, 1 << 16, true).unwrap();
        wal.append(&record(1, 1, &[("/a", "1")])).unwrap();
        wal.append(&record(2, 3, &[("/b", "2"), ("/c", "3")]))
            .unwrap();
        let torn_at = wal.offset();
        let last = record(4, 4, &[("/d", "4")]);
        wal.append(&last).unwrap();
        // The last record's final bytes never reached the disk.
        wal.file
            .write_all_at(&[0; 3], torn_at + last.len() as u64 - 3)
            .unwrap();
        assert_eq!(
            read_all(&wal, 0),
            vec![
                (1, vec!["/a".to_string()]),
                (3, vec!["/b".to_string(), "/c".to_string()])
            ]
        );
        // A header written without its payload (a length pointing past what was written) is torn too.
        let mut header_only = record(4, 4, &[("/d", "4")]);
        header_only.truncate(RECORD_HEADER);
        wal.file.write_all_at(&header_only, torn_at).unwrap();
        wal.file
            .write_all_at(&vec![0; last.len() - RECORD_HEADER], torn_at + 32)
            .unwrap();
        assert_eq!(read_all(&wal, 0).len(), 2);
    }

    #[test]
    fn records_of_an_earlier_pass_after_a_restart_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let mut wal = Wal::open(&path, 1 << 16, true).unwrap();
        for rev in 1..=4 {
            wal.append(&record(rev, rev, &[("/old", "x")])).unwrap();
        }
        // Checkpoint at revision 4; the next pass overwrites the first record with one of the same size, so the
        // second record of the earlier pass follows it intact (valid CRC, revision 2).
        wal.restart();
        wal.append(&record(5, 5, &[("/new", "y")])).unwrap();
        assert_eq!(read_all(&wal, 4), vec![(5, vec!["/new".to_string()])]);
        // Once a checkpoint made revision 5 durable in the B-tree, nothing in the log is replayed.
        assert!(read_all(&wal, 5).is_empty());
    }

    #[test]
    fn a_record_that_does_not_fit_is_refused_and_the_log_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(&dir.path().join("wal"), 128, true).unwrap();
        let big = record(1, 1, &[("/k", &"v".repeat(200))]);
        assert!(wal.append(&big).is_err());
        assert_eq!(wal.offset(), 0);
        assert!(read_all(&wal, 0).is_empty());
    }

    #[test]
    fn a_new_log_is_written_with_zeros_to_its_capacity_and_an_existing_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let mut wal = Wal::open(&path, 3 << 20, true).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 << 20);
        wal.append(&record(1, 1, &[("/a", "1")])).unwrap();
        drop(wal);
        let wal = Wal::open(&path, 1 << 20, false).unwrap();
        assert_eq!(wal.capacity(), 3 << 20);
        assert_eq!(read_all(&wal, 0).len(), 1);
        let wal = Wal::open(&path, 1 << 20, true).unwrap();
        assert!(read_all(&wal, 0).is_empty());
    }
}
