//! Offline images: `image import` of an OCI image layout (directory or tar) or a `docker save` tar, and
//! `image export` to an OCI image layout directory or tar.
//!
//! Ref: OCI image-spec image-layout.md (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`; names from the
//! `org.opencontainers.image.ref.name` annotation, containerd's `io.containerd.image.name` preferred), and Docker's
//! `docker save` format (`manifest.json` with `Config`, `RepoTags`, `Layers`). Every blob is re-hashed on import:
//! an archive is as untrusted as a registry.

use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

use oci_client::manifest::{
    IMAGE_DOCKER_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
    IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
};
use serde::Deserialize;
use serde_json::json;

use super::config::ImageConfig;
use super::digest::{self, HashingWriter};
use super::pull::{
    choose_platform, parse_manifest, Descriptor, IndexEntry, Parsed, Platform, PullError,
};
use super::store::{normalize_reference, remove_tree, rename_into_place, ImageRecord, Store};
use super::unpack::{open_layer, sniff, unpack_stream, Compression};

/// What failed while importing or exporting an archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Content(#[from] PullError),
    #[error("{path}: neither an OCI image layout (index.json) nor a `docker save` archive (manifest.json)")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("image in {path} has no usable name ({found}); pass a name")]
    NoName { path: PathBuf, found: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("export target {0} exists and is not an empty directory")]
    TargetExists(PathBuf),
}

impl From<super::store::StoreError> for ArchiveError {
    fn from(e: super::store::StoreError) -> Self {
        ArchiveError::Content(PullError::Store(e))
    }
}

fn io_at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Deserialize)]
struct Layout {
    manifests: Vec<IndexEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveItem {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A path inside an unpacked archive, refusing anything (e.g. a symlink) that resolves outside it.
fn inside(root: &Path, rel: &str) -> Result<PathBuf, ArchiveError> {
    let bad = |reason: &str| ArchiveError::Bad {
        path: root.join(rel),
        reason: reason.to_string(),
    };
    let joined = root.join(rel.trim_start_matches('/'));
    let real = fs::canonicalize(&joined).map_err(io_at("resolve", &joined))?;
    let real_root = fs::canonicalize(root).map_err(io_at("resolve", root))?;
    if !real.starts_with(&real_root) {
        return Err(bad("resolves outside the archive"));
    }
    Ok(real)
}

impl Store {
    /// Copies the file at `src` into the blob store, checking it against `expected` when given.
    pub(crate) fn put_blob_file(
        &self,
        src: &Path,
        expected: Option<&str>,
    ) -> Result<String, ArchiveError> {
        if let Some(e) = expected {
            if self.has_blob(e)? {
                return Ok(e.to_string());
            }
        }
        let tmp = self.tmp_path("import");
        let result = (|| {
            let mut input = BufReader::new(File::open(src).map_err(io_at("open", src))?);
            let out = File::create(&tmp).map_err(io_at("create", &tmp))?;
            let mut writer = HashingWriter::new(out);
            io::copy(&mut input, &mut writer).map_err(io_at("copy", src))?;
            let (out, actual, _) = writer.finish();
            out.sync_all().map_err(io_at("fsync", &tmp))?;
            if let Some(expected) = expected {
                if expected != actual {
                    return Err(ArchiveError::Content(PullError::DigestMismatch {
                        what: "blob",
                        expected: expected.to_string(),
                        actual,
                    }));
                }
            }
            rename_into_place(&tmp, &self.blob_path(&actual)?)?;
            Ok(actual)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Imports every image in an OCI image layout (directory or tar) or a `docker save` tar at `path`.
    /// `name` names the image when the archive does not (or overrides it when it holds one image).
    pub fn import(
        &self,
        path: &Path,
        name: Option<&str>,
    ) -> Result<Vec<ImageRecord>, ArchiveError> {
        let _content = self.content_lock(false)?;
        let meta = fs::metadata(path).map_err(io_at("stat", path))?;
        if meta.is_dir() {
            return self.import_dir(path, path, name);
        }
        let scratch = self.tmp_path("archive");
        fs::create_dir(&scratch).map_err(io_at("create", &scratch))?;
        let result = (|| {
            let reader = open_layer(path).map_err(|e| ArchiveError::Bad {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            // The same safe unpacker as for layers: no `..`, no absolute paths, no writing through symlinks.
            unpack_stream(reader, &scratch).map_err(|e| ArchiveError::Bad {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            self.import_dir(&scratch, path, name)
        })();
        if let Err(e) = remove_tree(&scratch) {
            tracing::warn!(error = %e, "cannot remove import scratch directory");
        }
        result
    }

    fn import_dir(
        &self,
        dir: &Path,
        shown: &Path,
        name: Option<&str>,
    ) -> Result<Vec<ImageRecord>, ArchiveError> {
        if dir.join("index.json").is_file() {
            self.import_layout(dir, shown, name)
        } else if dir.join("manifest.json").is_file() {
            self.import_docker_save(dir, shown, name)
        } else {
            Err(ArchiveError::UnknownFormat {
                path: shown.to_path_buf(),
            })
        }
    }

    fn blob_in_layout(&self, dir: &Path, d: &str) -> Result<PathBuf, ArchiveError> {
        inside(
            dir,
            &format!(
                "blobs/sha256/{}",
                digest::hex_of(d).map_err(PullError::from)?
            ),
        )
    }

    fn import_layout(
        &self,
        dir: &Path,
        shown: &Path,
        name: Option<&str>,
    ) -> Result<Vec<ImageRecord>, ArchiveError> {
        let index_path = dir.join("index.json");
        let bytes = fs::read(&index_path).map_err(io_at("read", &index_path))?;
        let layout: Layout = serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Bad {
            path: index_path.clone(),
            reason: e.to_string(),
        })?;
        if name.is_some() && layout.manifests.len() > 1 {
            return Err(ArchiveError::Bad {
                path: shown.to_path_buf(),
                reason: "a name can only be given for an archive holding one image".into(),
            });
        }
        let mut out = Vec::new();
        for entry in &layout.manifests {
            let annotations = entry.annotations.clone().unwrap_or_default();
            let found = annotations
                .get("io.containerd.image.name")
                .or_else(|| annotations.get("org.opencontainers.image.ref.name"))
                .cloned();
            let reference = match name.map(str::to_string).or(found.clone()) {
                Some(n) if n.contains('/') || name.is_some() => normalize_reference(&n)?.whole(),
                other => {
                    return Err(ArchiveError::NoName {
                        path: shown.to_path_buf(),
                        found: other
                            .map(|t| format!("only the tag `{t}`"))
                            .unwrap_or_else(|| "no name".into()),
                    })
                }
            };
            let mut manifest_digest = entry.digest.clone();
            let mut index_blob = None;
            let mut manifest_bytes = fs::read(self.blob_in_layout(dir, &manifest_digest)?)
                .map_err(io_at("read", &dir.join(&manifest_digest)))?;
            if digest::of_bytes(&manifest_bytes) != manifest_digest {
                return Err(PullError::DigestMismatch {
                    what: "manifest",
                    expected: manifest_digest,
                    actual: digest::of_bytes(&manifest_bytes),
                }
                .into());
            }
            let mut parsed = parse_manifest(&manifest_bytes, &reference)?;
            if let Parsed::Index(entries) = &parsed {
                let chosen = choose_platform(entries, &Platform::host()).ok_or_else(|| {
                    ArchiveError::Bad {
                        path: shown.to_path_buf(),
                        reason: format!("no manifest for {} in the nested index", Platform::host()),
                    }
                })?;
                index_blob = Some((manifest_bytes.clone(), manifest_digest.clone()));
                manifest_digest = chosen.digest.clone();
                manifest_bytes = fs::read(self.blob_in_layout(dir, &manifest_digest)?)
                    .map_err(io_at("read", &dir.join(&manifest_digest)))?;
                if digest::of_bytes(&manifest_bytes) != manifest_digest {
                    return Err(PullError::DigestMismatch {
                        what: "manifest",
                        expected: manifest_digest,
                        actual: digest::of_bytes(&manifest_bytes),
                    }
                    .into());
                }
                parsed = parse_manifest(&manifest_bytes, &reference)?;
            }
            let Parsed::Image {
                media_type,
                config,
                layers,
            } = parsed
            else {
                return Err(ArchiveError::Bad {
                    path: shown.to_path_buf(),
                    reason: "an index inside an index".into(),
                });
            };
            self.put_blob_file(
                &self.blob_in_layout(dir, &config.digest)?,
                Some(&config.digest),
            )?;
            let diff_ids = self.diff_ids_of(&config.digest, layers.len(), &reference)?;
            for (layer, diff_id) in layers.iter().zip(&diff_ids) {
                self.put_blob_file(
                    &self.blob_in_layout(dir, &layer.digest)?,
                    Some(&layer.digest),
                )?;
                self.ensure_layer(&self.blob_path(&layer.digest)?, &layer.digest, diff_id)?;
            }
            let record = self.commit_image(
                &reference,
                &manifest_bytes,
                &manifest_digest,
                &media_type,
                index_blob.as_ref().map(|(b, d)| (b.as_slice(), d.as_str())),
                &config.digest,
                &layers,
                &diff_ids,
            )?;
            tracing::info!(image = %record.reference, digest = %record.manifest_digest, "image imported");
            out.push(record);
        }
        Ok(out)
    }

    fn diff_ids_of(
        &self,
        config_digest: &str,
        layers: usize,
        reference: &str,
    ) -> Result<Vec<String>, ArchiveError> {
        let config: ImageConfig =
            serde_json::from_slice(&self.read_blob(config_digest)?).map_err(|e| {
                PullError::BadManifest {
                    reference: reference.to_string(),
                    reason: format!("config: {e}"),
                }
            })?;
        let diff_ids = config.diff_ids().to_vec();
        if diff_ids.len() != layers {
            return Err(PullError::BadManifest {
                reference: reference.to_string(),
                reason: format!("{layers} layers but {} diff_ids", diff_ids.len()),
            }
            .into());
        }
        Ok(diff_ids)
    }

    fn import_docker_save(
        &self,
        dir: &Path,
        shown: &Path,
        name: Option<&str>,
    ) -> Result<Vec<ImageRecord>, ArchiveError> {
        let manifest_path = dir.join("manifest.json");
        let bytes = fs::read(&manifest_path).map_err(io_at("read", &manifest_path))?;
        let items: Vec<DockerSaveItem> =
            serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Bad {
                path: manifest_path.clone(),
                reason: e.to_string(),
            })?;
        let mut out = Vec::new();
        for item in items {
            let names: Vec<String> = match name {
                Some(n) => vec![n.to_string()],
                None => item.repo_tags.clone().unwrap_or_default(),
            };
            if names.is_empty() {
                return Err(ArchiveError::NoName {
                    path: shown.to_path_buf(),
                    found: "no RepoTags".into(),
                });
            }
            let config_digest = self.put_blob_file(&inside(dir, &item.config)?, None)?;
            let diff_ids = self.diff_ids_of(&config_digest, item.layers.len(), &names[0])?;
            let mut layers = Vec::new();
            for (rel, diff_id) in item.layers.iter().zip(&diff_ids) {
                let src = inside(dir, rel)?;
                let d = self.put_blob_file(&src, None)?;
                let blob = self.blob_path(&d)?;
                let mut head = [0u8; 4];
                let n = io::Read::read(
                    &mut File::open(&blob).map_err(io_at("open", &blob))?,
                    &mut head,
                )
                .map_err(io_at("read", &blob))?;
                let media_type = match sniff(&head[..n]) {
                    Compression::None => IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
                    _ => IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
                };
                self.ensure_layer(&blob, &d, diff_id)?;
                let size = fs::metadata(&blob).map_err(io_at("stat", &blob))?.len();
                layers.push(Descriptor {
                    media_type: media_type.to_string(),
                    digest: d,
                    size,
                });
            }
            let config_size = fs::metadata(self.blob_path(&config_digest)?)
                .map_err(io_at("stat", shown))?
                .len();
            // docker save has no distribution manifest: synthesise the Docker schema2 one it would push.
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": IMAGE_MANIFEST_MEDIA_TYPE,
                "config": {"mediaType": IMAGE_DOCKER_CONFIG_MEDIA_TYPE, "size": config_size, "digest": config_digest},
                "layers": layers.iter().map(|l| json!({"mediaType": l.media_type, "size": l.size, "digest": l.digest})).collect::<Vec<_>>(),
            });
            let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| ArchiveError::Bad {
                path: shown.to_path_buf(),
                reason: e.to_string(),
            })?;
            let manifest_digest = digest::of_bytes(&manifest_bytes);
            for n in names {
                let reference = normalize_reference(&n)?.whole();
                let record = self.commit_image(
                    &reference,
                    &manifest_bytes,
                    &manifest_digest,
                    IMAGE_MANIFEST_MEDIA_TYPE,
                    None,
                    &config_digest,
                    &layers,
                    &diff_ids,
                )?;
                tracing::info!(image = %record.reference, digest = %record.manifest_digest, "image imported");
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Writes `image` as an OCI image layout: a directory, or a tar file when `out` ends in `.tar`. The tar also
    /// carries a `docker save`-style `manifest.json`, so `docker load` accepts it.
    pub fn export(&self, image: &str, out: &Path) -> Result<ImageRecord, ArchiveError> {
        let _content = self.content_lock(false)?;
        let record = self.get(image)?;
        let manifest_size = fs::metadata(self.blob_path(&record.manifest_digest)?)
            .map_err(io_at("stat", out))?
            .len();
        let tag = record
            .reference
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .map(|(_, t)| t.to_string())
            .unwrap_or_else(|| "latest".into());
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE,
            "manifests": [{
                "mediaType": record.manifest_media_type,
                "digest": record.manifest_digest,
                "size": manifest_size,
                "annotations": {
                    "io.containerd.image.name": record.reference,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        });
        let docker_manifest = json!([{
            "Config": format!("blobs/sha256/{}", digest::hex_of(&record.config_digest).map_err(PullError::from)?),
            "RepoTags": [record.reference],
            "Layers": record.layers.iter()
                .map(|l| digest::hex_of(&l.digest).map(|h| format!("blobs/sha256/{h}")))
                .collect::<Result<Vec<_>, _>>().map_err(PullError::from)?,
        }]);
        let mut blobs = vec![record.manifest_digest.clone(), record.config_digest.clone()];
        blobs.extend(record.layers.iter().map(|l| l.digest.clone()));
        let to_bytes = |v: &serde_json::Value| serde_json::to_vec(v).unwrap_or_default();
        let files: Vec<(String, Vec<u8>)> = vec![
            (
                "oci-layout".into(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".into(), to_bytes(&index)),
            ("manifest.json".into(), to_bytes(&docker_manifest)),
        ];

        if out.extension().is_some_and(|e| e == "tar") {
            let tmp = out.with_extension("tar.partial");
            let result = (|| {
                let file = File::create(&tmp).map_err(io_at("create", &tmp))?;
                let mut builder = tar::Builder::new(file);
                for (name, bytes) in &files {
                    let mut header = tar::Header::new_gnu();
                    header.set_size(bytes.len() as u64);
                    header.set_mode(0o644);
                    header.set_cksum();
                    builder
                        .append_data(&mut header, name, bytes.as_slice())
                        .map_err(io_at("write", &tmp))?;
                }
                let mut seen = std::collections::BTreeSet::new();
                for d in &blobs {
                    if !seen.insert(d.clone()) {
                        continue;
                    }
                    let src = self.blob_path(d)?;
                    let name = format!(
                        "blobs/sha256/{}",
                        digest::hex_of(d).map_err(PullError::from)?
                    );
                    builder
                        .append_path_with_name(&src, &name)
                        .map_err(io_at("write", &tmp))?;
                }
                let file = builder.into_inner().map_err(io_at("write", &tmp))?;
                file.sync_all().map_err(io_at("fsync", &tmp))?;
                fs::rename(&tmp, out).map_err(io_at("rename", out))
            })();
            if result.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            result?;
        } else {
            if out.exists()
                && fs::read_dir(out)
                    .map_err(io_at("read", out))?
                    .next()
                    .is_some()
            {
                return Err(ArchiveError::TargetExists(out.to_path_buf()));
            }
            let blob_dir = out.join("blobs/sha256");
            fs::create_dir_all(&blob_dir).map_err(io_at("create", &blob_dir))?;
            for (name, bytes) in &files {
                let p = out.join(name);
                fs::write(&p, bytes).map_err(io_at("write", &p))?;
            }
            for d in &blobs {
                let src = self.blob_path(d)?;
                let dst = blob_dir.join(digest::hex_of(d).map_err(PullError::from)?);
                if dst.exists() {
                    continue;
                }
                if fs::hard_link(&src, &dst).is_err() {
                    fs::copy(&src, &dst).map_err(io_at("copy", &dst))?;
                }
            }
        }
        tracing::info!(image = %record.reference, out = %out.display(), "image exported");
        Ok(record)
    }
}
