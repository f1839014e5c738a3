//! The content store: blobs by digest, image records by reference, unpacked layers shared by every image, leases
//! held by containers, and garbage collection.
//!
//! Layout under the root (default `/var/lib/windlass/images`):
//! ```text
//! blobs/sha256/<hex>          manifests, configs and compressed layers, exactly as the registry served them
//! layers/<diffID hex>/        one unpacked layer in overlayfs form (whiteouts as 0:0 char devices), shared
//! images/<sha256(ref)>.json   an image record: reference → manifest, config and layers
//! leases/<container id>.json  the image (and its layers) a container's root filesystem uses
//! containers/<container id>/  the container's overlay upper and work directories
//! locks/, tmp/                flock files; partial downloads and unpacks (same filesystem, so rename is atomic)
//! ```
//! Every file is written to `tmp/`, fsynced and renamed into place, so a crash never leaves a half-written blob,
//! record or layer under its final name. Layers are keyed by diffID, not chain ID: in overlay form a layer
//! does not depend on its parents, so two images that share a layer at different depths still share its directory.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use oci_client::Reference;
use serde::{Deserialize, Serialize};

use super::digest::{self, DigestError};

/// Where `windlass-runtime image` keeps images unless `--store` says otherwise.
pub const DEFAULT_STORE_ROOT: &str = "/var/lib/windlass/images";

/// What failed in the content store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse image reference `{reference}`: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("image `{0}` is not in the store")]
    NotFound(String),
    #[error("image `{reference}` is in use by container(s) {containers:?}; remove them first")]
    InUse {
        reference: String,
        containers: Vec<String>,
    },
    #[error("`{0}` is not a valid container id (1-128 of [A-Za-z0-9_.-], not `.` or `..`)")]
    BadContainerId(String),
    #[error("container `{container}` already holds a lease on `{image}`")]
    AlreadyLeased { container: String, image: String },
    #[error("corrupt store file {path}: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Digest(#[from] DigestError),
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// One layer of an image: the blob as distributed and the unpacked content it yields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the blob as distributed (compressed).
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids` entry); names the unpacked directory.
    pub diff_id: String,
}

/// What the store knows about one image reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Normalised reference, e.g. `docker.io/library/nginx:latest`.
    pub reference: String,
    /// Digest of the platform-specific image manifest (the image ID a container reports).
    pub manifest_digest: String,
    pub manifest_media_type: String,
    /// Digest of the index / manifest list the manifest was chosen from, if any.
    pub index_digest: Option<String>,
    pub config_digest: String,
    pub layers: Vec<LayerRecord>,
    /// Unix seconds when the record was written.
    pub created: u64,
}

impl ImageRecord {
    /// Sum of the distributed (compressed) layer sizes.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// The repo digest a kubelet reports (`registry/repo@sha256:...`).
    pub fn repo_digest(&self) -> String {
        let repo = match self.reference.split_once('@') {
            Some((repo, _)) => repo.to_string(),
            None => match self.reference.rfind(':') {
                Some(i) if !self.reference[i..].contains('/') => self.reference[..i].to_string(),
                _ => self.reference.clone(),
            },
        };
        format!(
            "{repo}@{}",
            self.index_digest.as_ref().unwrap_or(&self.manifest_digest)
        )
    }
}

/// A container's hold on an image: while it exists the image cannot be removed and its content is not collected.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LeaseRecord {
    pub container_id: String,
    pub reference: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub blobs: Vec<String>,
    pub diff_ids: Vec<String>,
}

/// What garbage collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_removed: usize,
    pub layers_removed: usize,
    pub bytes_freed: u64,
}

/// An image store rooted at one directory. Cheap to share behind an `Arc`; several processes may open the same
/// root (downloads, unpacks and GC coordinate through `flock`s under `locks/`).
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    /// In-process single flight: one pull per normalised reference at a time (shared by clones).
    pub(crate) inflight: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Parses and normalises a reference the way Docker does (`nginx` → `docker.io/library/nginx:latest`).
pub fn normalize_reference(reference: &str) -> Result<Reference, StoreError> {
    reference
        .parse::<Reference>()
        .map_err(|e| StoreError::BadReference {
            reference: reference.to_string(),
            reason: e.to_string(),
        })
}

pub(crate) fn validate_container_id(id: &str) -> Result<(), StoreError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadContainerId(id.to_string()))
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        for sub in [
            "blobs/sha256",
            "layers",
            "images",
            "leases",
            "containers",
            "locks",
            "tmp",
        ] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        }
        Ok(Self {
            root,
            inflight: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("blobs/sha256").join(digest::hex_of(digest)?))
    }

    /// The unpacked directory of the layer with this diffID (it exists once the layer is unpacked).
    pub fn layer_path(&self, diff_id: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("layers").join(digest::hex_of(diff_id)?))
    }

    pub fn has_blob(&self, digest: &str) -> Result<bool, StoreError> {
        Ok(self.blob_path(digest)?.is_file())
    }

    /// Reads a whole blob (manifests and configs; layers are streamed from [`Store::blob_path`]).
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest)?;
        fs::read(&path).map_err(io_err("read", &path))
    }

    pub(crate) fn container_dir(&self, id: &str) -> Result<PathBuf, StoreError> {
        validate_container_id(id)?;
        Ok(self.root.join("containers").join(id))
    }

    /// A fresh, unique path under `tmp/` (nothing is created).
    pub(crate) fn tmp_path(&self, what: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    /// Writes `bytes` as a blob after checking they hash to `expected` (if given); returns the digest.
    pub(crate) fn put_blob_bytes(
        &self,
        bytes: &[u8],
        expected: Option<&str>,
    ) -> Result<String, PutBlobError> {
        let actual = digest::of_bytes(bytes);
        if let Some(expected) = expected {
            if expected != actual {
                return Err(PutBlobError::Mismatch {
                    expected: expected.to_string(),
                    actual,
                });
            }
        }
        let dest = self.blob_path(&actual)?;
        if dest.is_file() {
            return Ok(actual);
        }
        let tmp = self.tmp_path("blob");
        write_synced(&tmp, bytes)?;
        rename_into_place(&tmp, &dest)?;
        Ok(actual)
    }

    /// Moves a fully written and verified temp file into the blob store under `digest`.
    pub(crate) fn commit_blob_file(&self, tmp: &Path, digest: &str) -> Result<PathBuf, StoreError> {
        let dest = self.blob_path(digest)?;
        rename_into_place(tmp, &dest)?;
        Ok(dest)
    }

    /// Takes an exclusive `flock` on `locks/<name>.lock`, blocking until it is free.
    pub(crate) fn lock(&self, name: &str, exclusive: bool) -> Result<Flock<File>, StoreError> {
        let path = self.root.join("locks").join(format!("{name}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let arg = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        Flock::lock(file, arg).map_err(|(_, errno)| StoreError::Io {
            op: "flock",
            path,
            source: errno.into(),
        })
    }

    /// Shared while content is being added or leased, exclusive while GC runs, so GC never deletes a blob a
    /// pull has just written but not yet recorded.
    pub(crate) fn content_lock(&self, exclusive: bool) -> Result<Flock<File>, StoreError> {
        self.lock("content", exclusive)
    }

    fn record_path(&self, normalized: &str) -> PathBuf {
        self.root.join("images").join(format!(
            "{}.json",
            &digest::of_bytes(normalized.as_bytes())[7..]
        ))
    }

    pub(crate) fn write_record(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let path = self.record_path(&record.reference);
        write_json(self, &path, record)
    }

    /// All image records, sorted by reference.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("read", &dir))? {
            let path = entry.map_err(io_err("read", &dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(read_json::<ImageRecord>(&path)?);
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// The record for `image`: a reference (normalised first) or a manifest digest.
    pub fn get(&self, image: &str) -> Result<ImageRecord, StoreError> {
        if image.starts_with("sha256:") {
            digest::hex_of(image)?;
            return self
                .list()?
                .into_iter()
                .find(|r| r.manifest_digest == image)
                .ok_or_else(|| StoreError::NotFound(image.to_string()));
        }
        let normalized = normalize_reference(image)?.whole();
        let path = self.record_path(&normalized);
        if !path.is_file() {
            return Err(StoreError::NotFound(normalized));
        }
        read_json(&path)
    }

    /// The image's config JSON (`config.json` of the OCI image spec).
    pub fn config(&self, record: &ImageRecord) -> Result<super::ImageConfig, StoreError> {
        let path = self.blob_path(&record.config_digest)?;
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt { path, source })
    }

    /// The unpacked layer directories of `record`, bottom layer first.
    pub fn layer_dirs(&self, record: &ImageRecord) -> Result<Vec<PathBuf>, StoreError> {
        record
            .layers
            .iter()
            .map(|l| self.layer_path(&l.diff_id))
            .collect()
    }

    fn leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        let dir = self.root.join("leases");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("read", &dir))? {
            let path = entry.map_err(io_err("read", &dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(read_json::<LeaseRecord>(&path)?);
            }
        }
        Ok(out)
    }

    /// Containers holding a lease on `image` (reference or manifest digest).
    pub fn leases_of(&self, image: &str) -> Result<Vec<String>, StoreError> {
        let record = self.get(image)?;
        let mut ids: Vec<String> = self
            .leases()?
            .into_iter()
            .filter(|l| {
                l.reference == record.reference || l.manifest_digest == record.manifest_digest
            })
            .map(|l| l.container_id)
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Records that `container_id` uses `image`: `remove` refuses the image and GC keeps its content until
    /// [`Store::release`]. The lease names the content itself, so re-pulling the tag to a new digest does not
    /// let GC take the layers from under a running container.
    pub fn lease(&self, image: &str, container_id: &str) -> Result<ImageRecord, StoreError> {
        validate_container_id(container_id)?;
        let _content = self.content_lock(false)?;
        let record = self.get(image)?;
        let path = self
            .root
            .join("leases")
            .join(format!("{container_id}.json"));
        if path.exists() {
            let existing: LeaseRecord = read_json(&path)?;
            if existing.manifest_digest != record.manifest_digest {
                return Err(StoreError::AlreadyLeased {
                    container: container_id.to_string(),
                    image: existing.reference,
                });
            }
            return Ok(record);
        }
        let mut blobs = vec![record.manifest_digest.clone(), record.config_digest.clone()];
        blobs.extend(record.index_digest.iter().cloned());
        blobs.extend(record.layers.iter().map(|l| l.digest.clone()));
        let lease = LeaseRecord {
            container_id: container_id.to_string(),
            reference: record.reference.clone(),
            manifest_digest: record.manifest_digest.clone(),
            config_digest: record.config_digest.clone(),
            blobs,
            diff_ids: record.layers.iter().map(|l| l.diff_id.clone()).collect(),
        };
        write_json(self, &path, &lease)?;
        Ok(record)
    }

    /// Drops `container_id`'s lease (no error if it holds none).
    pub fn release(&self, container_id: &str) -> Result<(), StoreError> {
        validate_container_id(container_id)?;
        let path = self
            .root
            .join("leases")
            .join(format!("{container_id}.json"));
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Removes the image record, refused while a container holds a lease on it. Content is reclaimed by
    /// [`Store::gc`].
    pub fn remove(&self, image: &str) -> Result<ImageRecord, StoreError> {
        let _content = self.content_lock(false)?;
        let record = self.get(image)?;
        let containers = self.leases_of(&record.reference)?;
        if !containers.is_empty() {
            return Err(StoreError::InUse {
                reference: record.reference,
                containers,
            });
        }
        let path = self.record_path(&record.reference);
        fs::remove_file(&path).map_err(io_err("remove", &path))?;
        tracing::info!(image = %record.reference, digest = %record.manifest_digest, "image removed");
        Ok(record)
    }

    /// Deletes blobs and unpacked layers no image record or lease refers to, and stale temp files.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _content = self.content_lock(true)?;
        let mut keep_blobs = BTreeSet::new();
        let mut keep_layers = BTreeSet::new();
        for r in self.list()? {
            keep_blobs.insert(r.manifest_digest.clone());
            keep_blobs.insert(r.config_digest.clone());
            keep_blobs.extend(r.index_digest.clone());
            for l in &r.layers {
                keep_blobs.insert(l.digest.clone());
                keep_layers.insert(l.diff_id.clone());
            }
        }
        for l in self.leases()? {
            keep_blobs.extend(l.blobs);
            keep_layers.extend(l.diff_ids);
        }
        let keep_blob_hex: BTreeSet<String> = keep_blobs
            .iter()
            .filter_map(|d| digest::hex_of(d).ok().map(str::to_string))
            .collect();
        let keep_layer_hex: BTreeSet<String> = keep_layers
            .iter()
            .filter_map(|d| digest::hex_of(d).ok().map(str::to_string))
            .collect();
        let mut report = GcReport::default();
        let blobs = self.root.join("blobs/sha256");
        for entry in fs::read_dir(&blobs).map_err(io_err("read", &blobs))? {
            let entry = entry.map_err(io_err("read", &blobs))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep_blob_hex.contains(&name) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(entry.path()).map_err(io_err("remove", &entry.path()))?;
            report.blobs_removed += 1;
            report.bytes_freed += size;
        }
        let layers = self.root.join("layers");
        for entry in fs::read_dir(&layers).map_err(io_err("read", &layers))? {
            let entry = entry.map_err(io_err("read", &layers))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep_layer_hex.contains(&name) {
                continue;
            }
            report.bytes_freed += dir_size(&entry.path());
            remove_tree(&entry.path())?;
            report.layers_removed += 1;
        }
        // Nothing under tmp/ is in use while we hold the content lock exclusively: pulls, imports and leases
        // take it shared for their whole run.
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err("read", &tmp))? {
            let entry = entry.map_err(io_err("read", &tmp))?;
            remove_tree(&entry.path())?;
        }
        tracing::info!(
            blobs = report.blobs_removed,
            layers = report.layers_removed,
            bytes = report.bytes_freed,
            "image garbage collection done"
        );
        Ok(report)
    }
}

/// Why a blob could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum PutBlobError {
    #[error("digest mismatch: expected {expected}, content hashes to {actual}")]
    Mismatch { expected: String, actual: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = File::create(path).map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

/// Renames `tmp` to `dest` and fsyncs the directory, so the new name survives a crash.
pub(crate) fn rename_into_place(tmp: &Path, dest: &Path) -> Result<(), StoreError> {
    fs::rename(tmp, dest).map_err(io_err("rename", dest))?;
    if let Some(parent) = dest.parent() {
        if let Ok(dir) = File::open(parent) {
            // Best effort: a failed directory fsync only weakens crash safety, it does not lose data now.
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

fn write_json<T: Serialize>(store: &Store, path: &Path, value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    let tmp = store.tmp_path("json");
    write_synced(&tmp, &bytes)?;
    rename_into_place(&tmp, path)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StoreError> {
    let bytes = fs::read(path).map_err(io_err("read", path))?;
    serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

/// Removes a file or a directory tree; a missing path is not an error.
pub(crate) fn remove_tree(path: &Path) -> Result<(), StoreError> {
    let res = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    res.map_err(io_err("remove", path))
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = fs::read_dir(&p) else { continue };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalised_like_docker() {
        assert_eq!(
            normalize_reference("nginx")
                .map(|r| r.whole())
                .ok()
                .as_deref(),
            Some("docker.io/library/nginx:latest")
        );
        assert_eq!(
            normalize_reference("registry.lab:5000/team/app:v2")
                .map(|r| r.whole())
                .ok()
                .as_deref(),
            Some("registry.lab:5000/team/app:v2")
        );
        assert!(normalize_reference("UPPER/Case").is_err());
    }

    #[test]
    fn container_ids_that_are_paths_are_refused() {
        assert!(validate_container_id("abc-123_x.y").is_ok());
        for bad in ["", ".", "..", "a/b", "../x", &"a".repeat(129)] {
            assert!(validate_container_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn repo_digest_drops_the_tag() {
        let r = ImageRecord {
            reference: "127.0.0.1:5000/test/bb:v1".into(),
            manifest_digest: "sha256:aa".into(),
            manifest_media_type: String::new(),
            index_digest: None,
            config_digest: String::new(),
            layers: vec![],
            created: 0,
        };
        assert_eq!(r.repo_digest(), "127.0.0.1:5000/test/bb@sha256:aa");
    }
}
