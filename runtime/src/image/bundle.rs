//! An OCI bundle made from a stored image: its overlay root filesystem plus a `config.json` whose process comes
//! from the image config, the way `podman create` or a CRI runtime derive it. Used by `windlass-runtime image
//! bundle` (labs, demos, debugging) and, for the same merge, by anything that runs images without a kubelet.

use std::fs;
use std::path::{Path, PathBuf};

use super::process::{process_spec, ContainerProcessSpec, ProcessSpecError};
use super::rootfs::{Rootfs, RootfsError};
use super::store::{Store, StoreError};

/// What to put into the bundle's config besides the image's own process settings.
#[derive(Debug, Clone, Default)]
pub struct BundleOptions {
    /// Overrides in Kubernetes terms (command replaces Entrypoint and Cmd, args replaces Cmd, env merges).
    pub container: ContainerProcessSpec,
    /// Join this network namespace (e.g. a pod's, set up by CNI) instead of creating a new one.
    pub network_namespace: Option<PathBuf>,
    pub hostname: Option<String>,
}

/// Why a bundle could not be made. Nothing is left mounted or leased when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error("cannot derive the process for {image}: {source}")]
    Process {
        image: String,
        #[source]
        source: ProcessSpecError,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the runtime config: {0}")]
    Config(String),
}

impl Store {
    /// Mounts `image`'s root filesystem at `bundle/rootfs` for `container_id` and writes `bundle/config.json`:
    /// the OCI default spec (runc's: new namespaces, default mounts, masked paths, default capabilities) with the
    /// image's process merged with `options.container`. Undone by [`Store::remove_bundle`].
    pub fn create_bundle(
        &self,
        image: &str,
        container_id: &str,
        bundle: &Path,
        options: &BundleOptions,
    ) -> Result<Rootfs, BundleError> {
        let record = self.get(image)?;
        let config = self.config(&record)?;
        let rootfs_dir = bundle.join("rootfs");
        let rootfs = self.prepare_rootfs(image, container_id, &rootfs_dir)?;
        let written = (|| {
            let process =
                process_spec(&config, &options.container, &rootfs_dir).map_err(|source| {
                    BundleError::Process {
                        image: record.reference.clone(),
                        source,
                    }
                })?;
            let mut spec = serde_json::to_value(oci_spec::runtime::Spec::default())
                .map_err(|e| BundleError::Config(e.to_string()))?;
            spec["root"] = serde_json::json!({"path": "rootfs", "readonly": false});
            spec["process"]["terminal"] = false.into();
            spec["process"]["args"] = serde_json::json!(process.args);
            spec["process"]["env"] = serde_json::json!(process.env);
            spec["process"]["cwd"] = process.cwd.into();
            spec["process"]["user"] = serde_json::json!({
                "uid": process.uid, "gid": process.gid, "additionalGids": process.additional_gids,
            });
            if let Some(hostname) = &options.hostname {
                spec["hostname"] = hostname.clone().into();
            }
            if let Some(netns) = &options.network_namespace {
                if let Some(namespaces) = spec["linux"]["namespaces"].as_array_mut() {
                    for ns in namespaces.iter_mut() {
                        if ns["type"] == "network" {
                            ns["path"] = netns.display().to_string().into();
                        }
                    }
                }
            }
            let path = bundle.join("config.json");
            let text =
                serde_json::to_vec_pretty(&spec).map_err(|e| BundleError::Config(e.to_string()))?;
            fs::write(&path, text).map_err(|source| BundleError::Write { path, source })
        })();
        if let Err(e) = written {
            // No half-made bundle: unmount, drop the container's layers and lease.
            let _ = self.remove_rootfs(container_id, &rootfs_dir);
            return Err(e);
        }
        Ok(rootfs)
    }

    /// Unmounts and removes what [`Store::create_bundle`] made for `container_id` (config.json included).
    pub fn remove_bundle(&self, container_id: &str, bundle: &Path) -> Result<(), BundleError> {
        self.remove_rootfs(container_id, &bundle.join("rootfs"))?;
        match fs::remove_file(bundle.join("config.json")) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(BundleError::Write {
                path: bundle.join("config.json"),
                source,
            }),
        }
    }
}
