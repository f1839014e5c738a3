//! OCI image layouts built offline with `umoci` from Debian's `busybox-static`, and hand-made layer tars (for
//! whiteouts, opaque directories and malicious entries that no well-behaved tool would write).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::bundle::busybox_rootfs;
use crate::{run_ok, TempDir};

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OCI image layout in a temp directory; each image in it is a tag.
pub struct OciLayout {
    dir: TempDir,
}

impl OciLayout {
    pub fn new() -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("windlass-layout-")
            .tempdir()?;
        run_ok(
            Command::new("umoci")
                .args(["init", "--layout"])
                .arg(dir.path().join("L")),
        );
        Ok(Self { dir })
    }

    /// The layout directory (`oci:<path>:<tag>` for skopeo).
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("L")
    }

    fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.path().display())
    }

    /// A one-layer busybox image `tag` running `/bin/sh -c 'echo hello'` (testbed.md recipe).
    pub fn busybox(&self, tag: &str) -> io::Result<()> {
        run_ok(Command::new("umoci").args(["new", "--image", &self.image(tag)]));
        self.change(tag, tag, busybox_rootfs)?;
        self.config(
            tag,
            &[
                "--config.cmd",
                "/bin/sh",
                "--config.cmd",
                "-c",
                "--config.cmd",
                "echo hello",
            ],
        );
        Ok(())
    }

    /// Unpacks `from`, lets `edit` change the root filesystem, and repacks the result as `to` (a new layer with
    /// umoci's whiteouts for anything deleted).
    pub fn change(
        &self,
        from: &str,
        to: &str,
        edit: impl FnOnce(&Path) -> io::Result<()>,
    ) -> io::Result<()> {
        let bundle = self.dir.path().join(format!("bundle-{to}"));
        run_ok(
            Command::new("umoci")
                .args(["unpack", "--image", &self.image(from)])
                .arg(&bundle),
        );
        edit(&bundle.join("rootfs"))?;
        run_ok(
            Command::new("umoci")
                .args(["repack", "--image", &self.image(to)])
                .arg(&bundle),
        );
        fs::remove_dir_all(&bundle)
    }

    /// Appends the uncompressed layer tar `layer` to `tag` verbatim.
    pub fn add_raw_layer(&self, tag: &str, layer: &[u8]) -> io::Result<()> {
        let path = self.dir.path().join("raw-layer.tar");
        fs::write(&path, layer)?;
        run_ok(
            Command::new("umoci")
                .args(["raw", "add-layer", "--image", &self.image(tag)])
                .arg(&path),
        );
        fs::remove_file(path)
    }

    /// Runs `umoci config` on `tag` with `args` (entrypoint cleared, PATH=/bin, linux/amd64 unless overridden).
    pub fn config(&self, tag: &str, args: &[&str]) {
        run_ok(
            Command::new("umoci")
                .args([
                    "config",
                    "--image",
                    &self.image(tag),
                    "--clear=config.entrypoint",
                ])
                .args(["--config.env", "PATH=/bin", "--os", "linux"])
                .args(args),
        );
    }

    /// Copies tag `from` to `to` with architecture `arch`.
    pub fn with_arch(&self, from: &str, to: &str, arch: &str) {
        run_ok(Command::new("umoci").args([
            "config",
            "--image",
            &self.image(from),
            "--tag",
            to,
            "--architecture",
            arch,
        ]));
    }

    fn index(&self) -> Value {
        let text = fs::read_to_string(self.path().join("index.json")).expect("read index.json");
        serde_json::from_str(&text).expect("parse index.json")
    }

    /// The manifest descriptor tagged `tag` in index.json.
    pub fn descriptor(&self, tag: &str) -> Value {
        self.index()["manifests"]
            .as_array()
            .and_then(|m| {
                m.iter()
                    .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
                    .cloned()
            })
            .unwrap_or_else(|| panic!("no tag {tag} in layout"))
    }

    /// The manifest digest of `tag`.
    pub fn digest(&self, tag: &str) -> String {
        self.descriptor(tag)["digest"]
            .as_str()
            .expect("digest")
            .to_string()
    }

    /// A blob's bytes.
    pub fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.trim_start_matches("sha256:");
        fs::read(self.path().join("blobs/sha256").join(hex)).expect("read blob")
    }

    /// The manifest of `tag`.
    pub fn manifest(&self, tag: &str) -> Value {
        serde_json::from_slice(&self.blob(&self.digest(tag))).expect("parse manifest")
    }

    /// Writes a blob, returning its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        fs::write(self.path().join("blobs/sha256").join(&digest[7..]), bytes).expect("write blob");
        digest
    }

    /// Adds tag `to`: an image index over the images tagged `entries` (tag, architecture).
    pub fn index_of(&self, to: &str, entries: &[(&str, &str)]) {
        let manifests: Vec<Value> = entries
            .iter()
            .map(|(tag, arch)| {
                let d = self.descriptor(tag);
                json!({"mediaType": d["mediaType"], "digest": d["digest"], "size": d["size"],
                       "platform": {"architecture": arch, "os": "linux"}})
            })
            .collect();
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .expect("serialise index");
        let digest = self.put_blob(&index);
        self.tag_descriptor(json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": digest,
            "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": to},
        }));
    }
}

/// One entry of a hand-made layer tar. Paths are written verbatim (including `..` or a leading `/`).
pub enum TarEntry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
}

/// An uncompressed tar of `entries`, bypassing the `tar` crate's path sanitising so hostile paths can be made.
pub fn layer_tar(entries: &[TarEntry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        let (path, kind, data, link): (&str, tar::EntryType, &[u8], Option<&str>) = match e {
            TarEntry::Dir(p) => (p, tar::EntryType::Directory, b"", None),
            TarEntry::File(p, d) => (p, tar::EntryType::Regular, d, None),
            TarEntry::Symlink(p, t) => (p, tar::EntryType::Symlink, b"", Some(t)),
            TarEntry::HardLink(p, t) => (p, tar::EntryType::Link, b"", Some(t)),
        };
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(t) = link {
            h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        builder.append(&h, data).expect("append tar entry");
    }
    builder.into_inner().expect("finish tar")
}

impl OciLayout {
    /// Adds tag `tag`: an OCI image made by hand from uncompressed `layers` (no tool gets to sanitise them),
    /// running `/bin/sh`.
    pub fn raw_image(&self, tag: &str, layers: &[Vec<u8>]) {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .expect("serialise config");
        let config_digest = self.put_blob(&config);
        let layer_descs: Vec<Value> = layers
            .iter()
            .map(|l| {
                json!({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                       "digest": self.put_blob(l), "size": l.len()})
            })
            .collect();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config.len()},
            "layers": layer_descs,
        }))
        .expect("serialise manifest");
        let digest = self.put_blob(&manifest);
        self.tag_descriptor(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
    }

    /// Adds a descriptor to the layout's index.json (umoci writes `"manifests": null` for an empty layout).
    fn tag_descriptor(&self, descriptor: Value) {
        let mut top = self.index();
        match top["manifests"].as_array_mut() {
            Some(list) => list.push(descriptor),
            None => top["manifests"] = json!([descriptor]),
        }
        fs::write(
            self.path().join("index.json"),
            serde_json::to_vec(&top).expect("serialise index.json"),
        )
        .expect("write index.json");
    }
}
