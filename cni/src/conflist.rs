//! The node's CNI configuration, written from its pod CIDR so no node needs a hand-written conflist.

use std::io;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde_json::json;

use crate::spec::{Mode, CNI_VERSION, DEFAULT_BRIDGE, DEFAULT_CLUSTER_CIDR, DEFAULT_DATA_DIR};

/// The file name: sorts before most others so runtimes that pick the first conflist pick ours.
pub const CONFLIST_FILE: &str = "10-windlass.conflist";
/// The network name (also the IPAM state directory under `dataDir`).
pub const NETWORK_NAME: &str = "windlass";

#[derive(Debug, thiserror::Error)]
#[error("cannot write CNI configuration {path}: {source}")]
pub struct ConflistError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// Everything in the conflist besides the pod CIDR, with the contract's defaults.
#[derive(Debug, Clone)]
pub struct ConflistOptions {
    pub bridge: String,
    pub data_dir: PathBuf,
    pub mode: Mode,
    pub mtu: Option<u32>,
    pub ip_masq: bool,
    pub cluster_cidr: Ipv4Net,
}

impl Default for ConflistOptions {
    fn default() -> Self {
        Self {
            bridge: DEFAULT_BRIDGE.to_string(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            mode: Mode::HostGw,
            mtu: None,
            ip_masq: true,
            cluster_cidr: DEFAULT_CLUSTER_CIDR.parse().unwrap_or_default(),
        }
    }
}

/// The conflist JSON for a node with `pod_cidr`.
pub fn conflist_json(pod_cidr: Ipv4Net, opts: &ConflistOptions) -> serde_json::Value {
    let mut plugin = json!({
        "type": "windlass-cni",
        "bridge": opts.bridge,
        "subnet": pod_cidr.trunc().to_string(),
        "dataDir": opts.data_dir,
        "mode": opts.mode,
        "ipMasq": opts.ip_masq,
        "clusterCIDR": opts.cluster_cidr.to_string(),
    });
    if let Some(mtu) = opts.mtu {
        plugin["mtu"] = json!(mtu);
    }
    json!({
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": [plugin],
    })
}

/// Writes `<conf_dir>/10-windlass.conflist` atomically (temp file + rename, so a runtime never reads half a
/// file); leaves an identical file untouched. Returns the path.
pub fn write_conflist(
    conf_dir: &Path,
    pod_cidr: Ipv4Net,
    opts: &ConflistOptions,
) -> Result<PathBuf, ConflistError> {
    let path = conf_dir.join(CONFLIST_FILE);
    let err = |source| ConflistError {
        path: path.clone(),
        source,
    };
    let text = serde_json::to_string_pretty(&conflist_json(pod_cidr, opts))
        .map_err(io::Error::other)
        .map_err(err)?;
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok(path);
    }
    std::fs::create_dir_all(conf_dir).map_err(err)?;
    let tmp = conf_dir.join(format!(".{CONFLIST_FILE}.tmp"));
    std::fs::write(&tmp, &text).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_conflist_is_a_valid_windlass_config_for_the_pod_cidr() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_conflist(
            tmp.path(),
            "10.244.5.0/24".parse().expect("net"),
            &ConflistOptions::default(),
        )
        .expect("write");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(v["name"], "windlass");
        let plugin = &v["plugins"][0];
        assert_eq!(plugin["type"], "windlass-cni");
        assert_eq!(plugin["subnet"], "10.244.5.0/24");
        assert_eq!(plugin["mode"], "host-gw");
        // The plugin's own parser accepts it once cniVersion/name are merged in as a runtime does.
        let mut conf = plugin.clone();
        conf["cniVersion"] = v["cniVersion"].clone();
        conf["name"] = v["name"].clone();
        let parsed =
            crate::spec::NetConf::parse(conf.to_string().as_bytes()).expect("plugin accepts it");
        assert_eq!(parsed.subnet.to_string(), "10.244.5.0/24");
    }
}
