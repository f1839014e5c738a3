//! The node network agent behind `windlass-cni daemon`: feeds [`NodeRoutes`] from a [`NodeSource`] and keeps the
//! node's conflist written from its pod CIDR.
//!
//! The production source is a watch on Node objects ([`crate::KubeNodeSource`]: name, `spec.podCIDR`,
//! InternalIP); [`FileNodeSource`] reads the same facts from a JSON file an operator or a lab writes, re-reading it
//! whenever it changes, for nodes run without an API server.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use ipnet::Ipv4Net;
use serde::Deserialize;
use tracing::{info, warn};

use crate::conflist::{write_conflist, ConflistOptions};
use crate::routes::{run_agent, NodeEvent, NodeNet, NodeRoutes, NodeSource};

/// One entry of the nodes file: `[{"name": "node1", "podCIDR": "10.244.1.0/24", "nodeIP": "172.30.0.11"}]`,
/// optionally with `"vtepMAC": "0e:57:ac:1e:00:0b"`.
#[derive(Debug, Deserialize)]
struct NodeEntry {
    name: String,
    #[serde(rename = "podCIDR")]
    pod_cidr: Ipv4Net,
    #[serde(rename = "nodeIP")]
    node_ip: std::net::Ipv4Addr,
    #[serde(rename = "vtepMAC", default)]
    vtep_mac: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodesFileError {
    #[error("cannot read nodes file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("nodes file {path} is not a JSON list of nodes: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("nodes file {path}: node {node} has an invalid vtepMAC {mac:?}")]
    Mac {
        path: PathBuf,
        node: String,
        mac: String,
    },
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = text
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).ok())
        .collect::<Option<_>>()?;
    parts.try_into().ok()
}

/// Reads and validates a nodes file.
pub fn read_nodes_file(path: &Path) -> Result<Vec<NodeNet>, NodesFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| NodesFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let entries: Vec<NodeEntry> =
        serde_json::from_str(&text).map_err(|source| NodesFileError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
    entries
        .into_iter()
        .map(|e| {
            let mut node = NodeNet::new(&e.name, e.pod_cidr, e.node_ip);
            if let Some(mac) = e.vtep_mac {
                node.vtep_mac = Some(parse_mac(&mac).ok_or_else(|| NodesFileError::Mac {
                    path: path.to_path_buf(),
                    node: e.name.clone(),
                    mac: mac.clone(),
                })?);
            }
            Ok(node)
        })
        .collect()
}

/// A [`NodeSource`] over a JSON file, polled for changes (modification time and size).
pub struct FileNodeSource {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
    poll: Duration,
}

impl FileNodeSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            seen: None,
            poll: Duration::from_millis(100),
        }
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }
}

impl NodeSource for FileNodeSource {
    fn next_event(&mut self, timeout: Duration) -> NodeEvent {
        let deadline = Instant::now() + timeout;
        loop {
            let stamp = self.stamp();
            if stamp.is_some() && stamp != self.seen {
                match read_nodes_file(&self.path) {
                    Ok(nodes) => {
                        self.seen = stamp;
                        return NodeEvent::Nodes(nodes);
                    }
                    // A half-written file: try again on the next poll.
                    Err(e) => warn!(error = %e, "ignoring unreadable nodes file"),
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return NodeEvent::Idle;
            }
            std::thread::sleep(self.poll.min(deadline - now));
        }
    }
}

/// Wraps a source so every node set also rewrites the local node's conflist from its pod CIDR.
pub struct WithConflist<S> {
    pub inner: S,
    pub node: String,
    pub conf_dir: PathBuf,
    pub options: ConflistOptions,
}

impl<S: NodeSource> NodeSource for WithConflist<S> {
    fn next_event(&mut self, timeout: Duration) -> NodeEvent {
        let event = self.inner.next_event(timeout);
        if let NodeEvent::Nodes(nodes) = &event {
            match nodes.iter().find(|n| n.name == self.node) {
                Some(me) => match write_conflist(&self.conf_dir, me.pod_cidr, &self.options) {
                    Ok(path) => {
                        info!(path = %path.display(), pod_cidr = %me.pod_cidr, "conflist written")
                    }
                    Err(e) => warn!(error = %e, "cannot write conflist"),
                },
                None => {
                    warn!(node = %self.node, "local node has no pod CIDR yet; no conflist written")
                }
            }
        }
        event
    }
}

/// `windlass-cni daemon`: runs the agent on `source` (and keeps the conflist written when `conflist` is given)
/// until the source closes.
pub fn run_daemon<S: NodeSource>(
    routes: &NodeRoutes,
    source: S,
    conflist: Option<(PathBuf, ConflistOptions)>,
    node: &str,
    resync: Duration,
) {
    match conflist {
        Some((conf_dir, options)) => {
            let mut source = WithConflist {
                inner: source,
                node: node.to_string(),
                conf_dir,
                options,
            };
            run_agent(&mut source, routes, resync);
        }
        None => {
            let mut source = source;
            run_agent(&mut source, routes, resync);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nodes_file_parses_into_node_nets() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("nodes.json");
        std::fs::write(
            &path,
            r#"[{"name":"a","podCIDR":"10.244.1.0/24","nodeIP":"172.30.0.10"},
                {"name":"b","podCIDR":"10.244.2.0/24","nodeIP":"172.30.0.11","vtepMAC":"0e:57:00:00:00:01"}]"#,
        )
        .expect("write");
        let nodes = read_nodes_file(&path).expect("parse");
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].vtep_mac, Some([0x0e, 0x57, 0, 0, 0, 1]));
    }

    #[test]
    fn a_bad_mac_is_reported_with_the_node() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("nodes.json");
        std::fs::write(
            &path,
            r#"[{"name":"a","podCIDR":"10.244.1.0/24","nodeIP":"172.30.0.10","vtepMAC":"zz"}]"#,
        )
        .expect("write");
        assert!(
            matches!(read_nodes_file(&path), Err(NodesFileError::Mac { node, .. }) if node == "a")
        );
    }

    #[test]
    fn the_file_source_reports_changes_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("nodes.json");
        let mut source = FileNodeSource::new(&path);
        assert_eq!(
            source.next_event(Duration::from_millis(50)),
            NodeEvent::Idle
        );
        std::fs::write(
            &path,
            r#"[{"name":"a","podCIDR":"10.244.1.0/24","nodeIP":"1.2.3.4"}]"#,
        )
        .expect("write");
        assert!(
            matches!(source.next_event(Duration::from_secs(2)), NodeEvent::Nodes(n) if n.len() == 1)
        );
        assert_eq!(
            source.next_event(Duration::from_millis(50)),
            NodeEvent::Idle
        );
    }
}
