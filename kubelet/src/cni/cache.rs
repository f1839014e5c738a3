//! The ADD result cache, one file per (network, container ID, interface), like libcni's
//! `/var/lib/cni/results/<network>-<containerID>-<ifname>` (format `cniCacheV1`), but under the kubelet's root dir
//! so several kubelets on one machine do not share it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{CniError, NetworkConfigList, RuntimeConf};

/// One cached attachment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedResult {
    /// Always `cniCacheV1` (libcni's marker).
    pub kind: String,
    pub container_id: String,
    pub if_name: String,
    pub network_name: String,
    /// The network configuration ADD ran with, so DEL can still run if the file in the conf dir changed.
    pub config: Value,
    #[serde(default)]
    pub cni_args: Vec<(String, String)>,
    #[serde(default)]
    pub capability_args: Map<String, Value>,
    pub result: Value,
}

impl CachedResult {
    pub(crate) fn new(net: &NetworkConfigList, rt: &RuntimeConf, result: Value) -> Self {
        Self {
            kind: "cniCacheV1".into(),
            container_id: rt.container_id.clone(),
            if_name: rt.ifname.clone(),
            network_name: net.name.clone(),
            config: net.raw.clone(),
            cni_args: rt.args.clone(),
            capability_args: rt.capability_args.clone(),
            result,
        }
    }
}

pub(crate) fn path(dir: &Path, network: &str, container_id: &str, ifname: &str) -> PathBuf {
    // Names could hold '/' in a hostile config; keep the file inside `dir`.
    let clean = |s: &str| s.replace('/', "_");
    dir.join(format!(
        "{}-{}-{}",
        clean(network),
        clean(container_id),
        clean(ifname)
    ))
}

/// Writes the entry atomically (temporary file + rename), so a crash never leaves half a cache file.
pub(crate) fn write(dir: &Path, entry: &CachedResult) -> Result<(), CniError> {
    let target = path(
        dir,
        &entry.network_name,
        &entry.container_id,
        &entry.if_name,
    );
    let err = |source| CniError::Cache {
        path: target.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut tmp = tempfile_in(dir).map_err(err)?;
    let bytes = serde_json::to_vec(entry).map_err(|e| err(std::io::Error::other(e)))?;
    tmp.1.write_all(&bytes).map_err(err)?;
    tmp.1.sync_all().map_err(err)?;
    std::fs::rename(&tmp.0, &target).map_err(|e| {
        let _ = std::fs::remove_file(&tmp.0);
        err(e)
    })
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let p = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)?;
    Ok((p, f))
}

/// Reads an entry; `Ok(None)` when there is none.
pub(crate) fn read(path: &Path) -> Result<Option<CachedResult>, CniError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CniError::Cache {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CniError::Cache {
            path: path.to_path_buf(),
            source,
        }),
    }
}

pub(crate) fn remove(path: &Path) -> Result<(), CniError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CniError::Cache {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_entry_reads_back_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let net = super::super::config::parse(
            serde_json::json!({"cniVersion":"1.0.0","name":"net","plugins":[{"type":"bridge"}]}),
            Path::new("x"),
        )
        .unwrap();
        let rt = RuntimeConf {
            container_id: "abc".into(),
            ifname: "eth0".into(),
            ..Default::default()
        };
        let entry = CachedResult::new(&net, &rt, serde_json::json!({"ips":[]}));
        write(dir.path(), &entry).unwrap();
        let p = path(dir.path(), "net", "abc", "eth0");
        assert!(p.ends_with("net-abc-eth0"));
        let back = read(&p).unwrap().unwrap();
        assert_eq!(back.kind, "cniCacheV1");
        assert_eq!(back.result, serde_json::json!({"ips":[]}));
        remove(&p).unwrap();
        remove(&p).unwrap();
        assert!(read(&p).unwrap().is_none());
    }
}
