//! Pulling images over the OCI distribution API into the store.
//!
//! Flow (Ref: OCI distribution-spec "Pulling manifests"/"Pulling blobs", image-spec image-index.md): fetch the
//! manifest for the tag or digest; if it is an index / Docker manifest list, pick the entry for our platform and
//! fetch that; fetch the config; fetch every layer blob (hashing while writing to `tmp/`, renamed into place only
//! when the digest matches) and unpack it once per diffID; write the image record last. Transient failures
//! (connection errors, 5xx, 429) are retried with exponential backoff; a digest mismatch never is.
//!
//! One download per image: pulls of the same reference in this process queue behind one another and a waiter
//! reuses the record the first one wrote; across processes, each blob and each layer unpack is guarded by an
//! exclusive `flock`, and whoever gets it second finds the content already there.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{
    OciDescriptor, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::auth::Credentials;
use super::config::{host_architecture, ImageConfig};
use super::digest::{self, DigestError};
use super::store::{
    normalize_reference, now_secs, ImageRecord, LayerRecord, PutBlobError, Store, StoreError,
};
use super::unpack::{unpack_layer, UnpackError};

/// What failed while pulling (or importing) an image.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("registry request for {reference} failed: {source}")]
    Registry {
        reference: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("{what} {expected}: content hashes to {actual}; refusing it (nothing stored)")]
    DigestMismatch {
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error(
        "{reference}: no manifest for platform {platform} in the index (available: {available})"
    )]
    NoMatchingPlatform {
        reference: String,
        platform: String,
        available: String,
    },
    #[error("{reference}: unsupported manifest media type `{media_type}`")]
    UnsupportedMediaType {
        reference: String,
        media_type: String,
    },
    #[error("{reference}: bad manifest or config: {reason}")]
    BadManifest { reference: String, reason: String },
    #[error("layer {digest}: {source}")]
    Unpack {
        digest: String,
        #[source]
        source: UnpackError,
    },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad CA certificate: {0}")]
    Tls(String),
    #[error("background task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

impl From<PutBlobError> for PullError {
    fn from(e: PutBlobError) -> Self {
        match e {
            PutBlobError::Mismatch { expected, actual } => PullError::DigestMismatch {
                what: "blob",
                expected,
                actual,
            },
            PutBlobError::Store(s) => PullError::Store(s),
        }
    }
}

/// The platform an index entry must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The machine we run on (`linux/amd64`, `linux/arm64/v8` ...).
    pub fn host() -> Self {
        let architecture = host_architecture().to_string();
        let variant = match architecture.as_str() {
            "arm64" => Some("v8".to_string()),
            "arm" => Some("v7".to_string()),
            _ => None,
        };
        Self {
            os: "linux".into(),
            architecture,
            variant,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// `host:port` of registries spoken to over plain HTTP (labs only).
    pub insecure_registries: Vec<String>,
    pub credentials: Credentials,
    /// Extra PEM CA certificates to trust (e.g. a lab registry's self-signed certificate).
    pub ca_certs_pem: Vec<Vec<u8>>,
    pub platform: Platform,
    /// Attempts per request on transient failures.
    pub attempts: u32,
    /// First backoff; doubled after each failed attempt.
    pub backoff: Duration,
    /// Layers downloaded and unpacked at once.
    pub max_concurrent_layers: usize,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            insecure_registries: Vec::new(),
            credentials: Credentials::default(),
            ca_certs_pem: Vec::new(),
            platform: Platform::host(),
            attempts: 4,
            backoff: Duration::from_millis(250),
            max_concurrent_layers: 3,
        }
    }
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullOutcome {
    pub record: ImageRecord,
    /// Blobs fetched from the registry (0 when everything was already in the store).
    pub blobs_downloaded: usize,
    pub bytes_downloaded: u64,
    pub layers_unpacked: usize,
}

const MANIFEST_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyManifest {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<IndexEntry>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IndexEntry {
    pub digest: String,
    #[serde(default)]
    pub platform: Option<EntryPlatform>,
    #[serde(default)]
    pub annotations: Option<std::collections::HashMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct EntryPlatform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

pub(crate) enum Parsed {
    Index(Vec<IndexEntry>),
    Image {
        media_type: String,
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Parses a manifest or index, telling them apart by media type (or shape, when the field is absent).
pub(crate) fn parse_manifest(bytes: &[u8], reference: &str) -> Result<Parsed, PullError> {
    let bad = |reason: String| PullError::BadManifest {
        reference: reference.to_string(),
        reason,
    };
    let m: AnyManifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if m.schema_version != Some(2) {
        return Err(bad(format!(
            "schemaVersion {:?} (only 2 is supported; Docker schema 1 is long deprecated)",
            m.schema_version
        )));
    }
    let media_type = m.media_type.clone().unwrap_or_default();
    let is_index = matches!(
        media_type.as_str(),
        OCI_IMAGE_INDEX_MEDIA_TYPE | IMAGE_MANIFEST_LIST_MEDIA_TYPE
    ) || (media_type.is_empty() && m.manifests.is_some());
    if is_index {
        return Ok(Parsed::Index(m.manifests.unwrap_or_default()));
    }
    let media_type = if media_type.is_empty() {
        OCI_IMAGE_MEDIA_TYPE.to_string()
    } else {
        media_type
    };
    if media_type != OCI_IMAGE_MEDIA_TYPE && media_type != IMAGE_MANIFEST_MEDIA_TYPE {
        return Err(PullError::UnsupportedMediaType {
            reference: reference.to_string(),
            media_type,
        });
    }
    let config = m
        .config
        .ok_or_else(|| bad("manifest has no config".into()))?;
    let layers = m.layers.unwrap_or_default();
    digest::hex_of(&config.digest)?;
    for l in &layers {
        digest::hex_of(&l.digest)?;
    }
    Ok(Parsed::Image {
        media_type,
        config,
        layers,
    })
}

/// The index entry for `platform`: exact variant match first, then any variant of the architecture.
pub(crate) fn choose_platform<'a>(
    entries: &'a [IndexEntry],
    platform: &Platform,
) -> Option<&'a IndexEntry> {
    let candidates = || {
        entries.iter().filter(|e| {
            e.platform
                .as_ref()
                .is_some_and(|p| p.os == platform.os && p.architecture == platform.architecture)
        })
    };
    candidates()
        .find(|e| e.platform.as_ref().and_then(|p| p.variant.as_ref()) == platform.variant.as_ref())
        .or_else(|| candidates().next())
}

fn platforms_of(entries: &[IndexEntry]) -> String {
    entries
        .iter()
        .filter_map(|e| e.platform.as_ref())
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_transient(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(r) => !r.is_builder() && !r.is_redirect(),
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

fn build_client(opts: &PullOptions) -> Result<Client, PullError> {
    let config = ClientConfig {
        protocol: if opts.insecure_registries.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(opts.insecure_registries.clone())
        },
        extra_root_certificates: opts
            .ca_certs_pem
            .iter()
            .map(|pem| Certificate {
                encoding: CertificateEncoding::Pem,
                data: pem.clone(),
            })
            .collect(),
        // We resolve indexes ourselves, so the chosen platform is explicit and the index is stored too.
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        user_agent: concat!("windlass/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    };
    Client::try_from(config).map_err(|e| PullError::Tls(e.to_string()))
}

/// Runs `f` up to `opts.attempts` times while it fails transiently, sleeping `backoff`, `2*backoff` ... between.
async fn with_retries<T, F, Fut>(
    opts: &PullOptions,
    what: &str,
    mut f: F,
) -> Result<T, OciDistributionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
{
    let mut delay = opts.backoff;
    let mut attempt = 1;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < opts.attempts && is_transient(&e) => {
                tracing::warn!(what, attempt, error = %e, retry_in = ?delay, "transient registry error; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PullError> + Send + 'static,
) -> Result<T, PullError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PullError::Task(e.to_string()))?
}

impl Store {
    /// Pulls `reference` (normalised Docker-style) from its registry into the store.
    pub async fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
    ) -> Result<PullOutcome, PullError> {
        let parsed = normalize_reference(reference)?;
        let key = parsed.whole();
        let gate = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let started = now_secs();
        let waited = gate.try_lock().is_err();
        let result = async {
            let _turn = gate.lock().await;
            if waited {
                // Someone in this process pulled it while we waited: that download is ours too.
                if let Ok(record) = self.get(&key) {
                    if record.created >= started {
                        tracing::info!(image = %key, "pull joined a concurrent pull of the same image");
                        return Ok(PullOutcome {
                            record,
                            blobs_downloaded: 0,
                            bytes_downloaded: 0,
                            layers_unpacked: 0,
                        });
                    }
                }
            }
            self.pull_now(&parsed, opts).await
        }
        .await;
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        // Drop the gate once nobody else holds it (the map and we are its last two owners).
        if map.get(&key).is_some_and(|g| Arc::strong_count(g) <= 2) {
            map.remove(&key);
        }
        result
    }

    async fn pull_now(
        &self,
        reference: &Reference,
        opts: &PullOptions,
    ) -> Result<PullOutcome, PullError> {
        let whole = reference.whole();
        let begin = Instant::now();
        tracing::info!(image = %whole, "pulling image");
        let client = build_client(opts)?;
        let auth = opts.credentials.for_registry(reference.registry());
        let reg_err = |source| PullError::Registry {
            reference: whole.clone(),
            source,
        };
        let store = self.clone();
        let _content = blocking(move || Ok(store.content_lock(false)?)).await?;

        let (mut bytes, _) = with_retries(opts, "manifest", || {
            client.pull_manifest_raw(reference, &auth, MANIFEST_TYPES)
        })
        .await
        .map_err(reg_err)?;
        let mut manifest_digest = digest::of_bytes(&bytes);
        if let Some(expected) = reference.digest() {
            if expected != manifest_digest {
                return Err(PullError::DigestMismatch {
                    what: "manifest",
                    expected: expected.to_string(),
                    actual: manifest_digest,
                });
            }
        }
        let mut index: Option<(Vec<u8>, String)> = None;
        let mut parsed = parse_manifest(&bytes, &whole)?;
        if let Parsed::Index(entries) = &parsed {
            let entry = choose_platform(entries, &opts.platform).ok_or_else(|| {
                PullError::NoMatchingPlatform {
                    reference: whole.clone(),
                    platform: opts.platform.to_string(),
                    available: platforms_of(entries),
                }
            })?;
            digest::hex_of(&entry.digest)?;
            tracing::info!(image = %whole, platform = %opts.platform, manifest = %entry.digest, "resolved index");
            let by_digest = reference.clone_with_digest(entry.digest.clone());
            let (platform_bytes, _) = with_retries(opts, "manifest", || {
                client.pull_manifest_raw(&by_digest, &auth, MANIFEST_TYPES)
            })
            .await
            .map_err(reg_err)?;
            let platform_digest = digest::of_bytes(&platform_bytes);
            if platform_digest != entry.digest {
                return Err(PullError::DigestMismatch {
                    what: "manifest",
                    expected: entry.digest.clone(),
                    actual: platform_digest,
                });
            }
            index = Some((
                std::mem::replace(&mut bytes, platform_bytes.to_vec().into()).to_vec(),
                manifest_digest,
            ));
            manifest_digest = platform_digest;
            parsed = parse_manifest(&bytes, &whole)?;
        }
        let Parsed::Image {
            media_type,
            config,
            layers,
        } = parsed
        else {
            return Err(PullError::BadManifest {
                reference: whole,
                reason: "an index inside an index".into(),
            });
        };

        let mut downloaded = 0usize;
        let mut bytes_downloaded = 0u64;
        let (_, got, n) = self.fetch_blob(&client, reference, &config, opts).await?;
        downloaded += usize::from(got);
        bytes_downloaded += n;
        let config_bytes = self.read_blob(&config.digest)?;
        let image_config: ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(|e| PullError::BadManifest {
                reference: whole.clone(),
                reason: format!("config {}: {e}", config.digest),
            })?;
        let diff_ids = image_config.diff_ids().to_vec();
        if diff_ids.len() != layers.len() {
            return Err(PullError::BadManifest {
                reference: whole,
                reason: format!(
                    "manifest has {} layers but config lists {} diff_ids",
                    layers.len(),
                    diff_ids.len()
                ),
            });
        }

        let total = layers.len();
        // Named async fns (not closures) keep the future Send for callers that spawn pulls.
        let tasks: Vec<_> = layers
            .iter()
            .zip(diff_ids.iter())
            .enumerate()
            .map(|(i, (layer, diff_id))| {
                self.layer_task(&client, reference, layer, diff_id, opts, (i + 1, total))
            })
            .collect();
        // Wait for every started layer even after one fails: an unpack runs on a blocking thread that cannot be
        // cancelled, and returning early would leave its temp directory behind while the caller looks.
        let outcomes: Vec<Result<(bool, u64, bool), PullError>> = futures_util::stream::iter(tasks)
            .buffer_unordered(opts.max_concurrent_layers.max(1))
            .collect()
            .await;
        let results = outcomes.into_iter().collect::<Result<Vec<_>, _>>()?;
        let mut layers_unpacked = 0;
        for (got, n, unpacked) in results {
            downloaded += usize::from(got);
            bytes_downloaded += n;
            layers_unpacked += usize::from(unpacked);
        }

        let record = self.commit_image(
            &whole,
            &bytes,
            &manifest_digest,
            &media_type,
            index.as_ref().map(|(b, d)| (b.as_slice(), d.as_str())),
            &config.digest,
            &layers,
            &diff_ids,
        )?;
        tracing::info!(
            image = %whole,
            digest = %record.manifest_digest,
            blobs_downloaded = downloaded,
            bytes = bytes_downloaded,
            layers_unpacked,
            elapsed = ?begin.elapsed(),
            "image pulled"
        );
        Ok(PullOutcome {
            record,
            blobs_downloaded: downloaded,
            bytes_downloaded,
            layers_unpacked,
        })
    }

    /// Downloads one layer blob (if missing) and unpacks it (if missing): (downloaded, bytes, unpacked).
    async fn layer_task(
        &self,
        client: &Client,
        reference: &Reference,
        layer: &Descriptor,
        diff_id: &str,
        opts: &PullOptions,
        (n, of): (usize, usize),
    ) -> Result<(bool, u64, bool), PullError> {
        let (path, got, bytes) = self.fetch_blob(client, reference, layer, opts).await?;
        let store = self.clone();
        let (d, diff) = (layer.digest.clone(), diff_id.to_string());
        let unpacked = blocking(move || store.ensure_layer(&path, &d, &diff)).await?;
        tracing::info!(layer = %layer.digest, n, of, "layer ready");
        Ok((got, bytes, unpacked))
    }

    /// Stores manifests and writes the record (after all content is in place, so a record implies content).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn commit_image(
        &self,
        reference: &str,
        manifest: &[u8],
        manifest_digest: &str,
        media_type: &str,
        index: Option<(&[u8], &str)>,
        config_digest: &str,
        layers: &[Descriptor],
        diff_ids: &[String],
    ) -> Result<ImageRecord, PullError> {
        self.put_blob_bytes(manifest, Some(manifest_digest))?;
        if let Some((bytes, d)) = index {
            self.put_blob_bytes(bytes, Some(d))?;
        }
        let record = ImageRecord {
            reference: reference.to_string(),
            manifest_digest: manifest_digest.to_string(),
            manifest_media_type: media_type.to_string(),
            index_digest: index.map(|(_, d)| d.to_string()),
            config_digest: config_digest.to_string(),
            layers: layers
                .iter()
                .zip(diff_ids)
                .map(|(l, diff_id)| LayerRecord {
                    digest: l.digest.clone(),
                    media_type: l.media_type.clone(),
                    size: l.size,
                    diff_id: diff_id.clone(),
                })
                .collect(),
            created: now_secs(),
        };
        self.write_record(&record)?;
        Ok(record)
    }

    /// Unpacks the layer blob at `blob` into `layers/<diffID>` unless it is there; true if this call unpacked it.
    pub(crate) fn ensure_layer(
        &self,
        blob: &Path,
        blob_digest: &str,
        diff_id: &str,
    ) -> Result<bool, PullError> {
        let dest = self.layer_path(diff_id)?;
        if dest.is_dir() {
            return Ok(false);
        }
        let _lock = self.lock(&format!("layer-{}", digest::hex_of(diff_id)?), true)?;
        if dest.is_dir() {
            return Ok(false);
        }
        let started = Instant::now();
        let stats = unpack_layer(blob, &dest, &self.tmp_path("unpack"), Some(diff_id)).map_err(
            |source| PullError::Unpack {
                digest: blob_digest.to_string(),
                source,
            },
        )?;
        tracing::debug!(layer = %blob_digest, entries = stats.entries, bytes = stats.uncompressed_size,
            elapsed = ?started.elapsed(), "layer unpacked");
        Ok(true)
    }

    /// Makes sure the blob `desc` is in the store, downloading it if needed. Returns its path, whether this call
    /// downloaded it, and how many bytes it fetched.
    async fn fetch_blob(
        &self,
        client: &Client,
        reference: &Reference,
        desc: &Descriptor,
        opts: &PullOptions,
    ) -> Result<(PathBuf, bool, u64), PullError> {
        let path = self.blob_path(&desc.digest)?;
        if path.is_file() {
            return Ok((path, false, 0));
        }
        let store = self.clone();
        let lock_name = format!("blob-{}", digest::hex_of(&desc.digest)?);
        let _lock = blocking(move || Ok(store.lock(&lock_name, true)?)).await?;
        if path.is_file() {
            return Ok((path, false, 0));
        }
        let oci_desc = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: i64::try_from(desc.size).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let mut delay = opts.backoff;
        let mut attempt = 1;
        loop {
            match self.download_once(client, reference, &oci_desc, desc).await {
                Ok(n) => return Ok((path, true, n)),
                Err(DownloadError::Fatal(e)) => return Err(e),
                Err(DownloadError::Transient(e)) if attempt < opts.attempts => {
                    tracing::warn!(blob = %desc.digest, attempt, error = %e, retry_in = ?delay,
                        "blob download failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(DownloadError::Transient(e)) => return Err(e),
            }
        }
    }

    async fn download_once(
        &self,
        client: &Client,
        reference: &Reference,
        oci_desc: &OciDescriptor,
        desc: &Descriptor,
    ) -> Result<u64, DownloadError> {
        let whole = reference.whole();
        let mut stream = client
            .pull_blob_stream(reference, oci_desc)
            .await
            .map_err(|source| {
                let transient = is_transient(&source);
                let e = PullError::Registry {
                    reference: whole.clone(),
                    source,
                };
                if transient {
                    DownloadError::Transient(e)
                } else {
                    DownloadError::Fatal(e)
                }
            })?;
        let tmp = self.tmp_path("download");
        let io_fatal = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DownloadError::Fatal(PullError::Io { path, source })
        };
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(io_fatal(&tmp))?;
        let guard = TmpGuard(tmp.clone());
        let mut hasher = Sha256::new();
        let mut count = 0u64;
        let total = stream.content_length.unwrap_or(desc.size);
        let mut last_log = Instant::now();
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // oci-client's verifying stream fails at the end when the digest is wrong: all bytes arrived.
                    if desc.size > 0 && count >= desc.size {
                        return Err(DownloadError::Fatal(PullError::DigestMismatch {
                            what: "blob",
                            expected: desc.digest.clone(),
                            actual: format!("sha256:{}", hex::encode(hasher.finalize())),
                        }));
                    }
                    return Err(DownloadError::Transient(PullError::Io {
                        path: tmp.clone(),
                        source: e,
                    }));
                }
            };
            hasher.update(&chunk);
            count += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io_fatal(&tmp))?;
            if last_log.elapsed() >= Duration::from_secs(2) {
                tracing::info!(blob = %desc.digest, bytes = count, total, "downloading");
                last_log = Instant::now();
            }
        }
        file.sync_all().await.map_err(io_fatal(&tmp))?;
        drop(file);
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != desc.digest {
            return Err(DownloadError::Fatal(PullError::DigestMismatch {
                what: "blob",
                expected: desc.digest.clone(),
                actual,
            }));
        }
        self.commit_blob_file(&tmp, &desc.digest)
            .map_err(|e| DownloadError::Fatal(e.into()))?;
        std::mem::forget(guard);
        tracing::debug!(blob = %desc.digest, bytes = count, "blob stored");
        Ok(count)
    }
}

enum DownloadError {
    Transient(PullError),
    Fatal(PullError),
}

/// Removes a partial download when the attempt fails.
struct TmpGuard(PathBuf);

impl Drop for TmpGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(arch: &str, variant: Option<&str>, d: &str) -> IndexEntry {
        IndexEntry {
            digest: d.into(),
            platform: Some(EntryPlatform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
            }),
            annotations: None,
        }
    }

    #[test]
    fn index_resolution_picks_our_architecture_and_variant() {
        let entries = vec![
            entry("arm", Some("v6"), "a"),
            entry("arm", Some("v7"), "b"),
            entry("amd64", None, "c"),
            entry("arm64", Some("v8"), "d"),
        ];
        let p = |a: &str, v: Option<&str>| Platform {
            os: "linux".into(),
            architecture: a.into(),
            variant: v.map(Into::into),
        };
        assert_eq!(
            choose_platform(&entries, &p("amd64", None)).map(|e| e.digest.as_str()),
            Some("c")
        );
        assert_eq!(
            choose_platform(&entries, &p("arm", Some("v7"))).map(|e| e.digest.as_str()),
            Some("b")
        );
        assert_eq!(
            choose_platform(&entries, &p("arm64", None)).map(|e| e.digest.as_str()),
            Some("d")
        );
        assert!(choose_platform(&entries, &p("s390x", None)).is_none());
    }

    #[test]
    fn schema1_and_unknown_media_types_are_refused() {
        assert!(parse_manifest(br#"{"schemaVersion":1}"#, "r").is_err());
        assert!(matches!(
            parse_manifest(
                br#"{"schemaVersion":2,"mediaType":"application/x-nope","config":{"digest":"x"}}"#,
                "r"
            ),
            Err(PullError::UnsupportedMediaType { .. })
        ));
    }
}
