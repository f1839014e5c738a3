//! Node IPAM: gives each node a `spec.podCIDR` (and `podCIDRs`) carved from `--cluster-cidr` in blocks of
//! `--node-cidr-mask-size` (Ref: kube-controller-manager `nodeipam`, RangeAllocator/`cidrset`).
//!
//! The allocation is recomputed from the nodes themselves on every change, so a deleted node's block is free
//! again and a restarted controller knows every block already handed out. Blocks written but not yet seen back
//! through the watch are remembered, so two nodes never get the same one while the cache lags.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use super::watch::{self, Tasks};
use super::{Context, ControllerError, ControllerFuture};

const NAME: &str = "nodeipam";
const RESYNC: Duration = Duration::from_secs(30);

pub(crate) fn start(ctx: Context) -> ControllerFuture {
    Box::pin(run(ctx))
}

/// The per-node blocks of a cluster CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CidrSet {
    base: u32,
    cluster_prefix: u8,
    node_prefix: u8,
}

impl CidrSet {
    /// `None` when the node mask is not within the cluster CIDR (upstream refuses to start the same way).
    pub(crate) fn new(cluster: (Ipv4Addr, u8), node_prefix: u8) -> Option<Self> {
        let (ip, prefix) = cluster;
        if prefix > 32 || node_prefix < prefix || node_prefix > 32 || node_prefix - prefix > 24 {
            return None;
        }
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Some(Self {
            base: u32::from(ip) & mask,
            cluster_prefix: prefix,
            node_prefix,
        })
    }

    fn len(&self) -> u32 {
        1 << (self.node_prefix - self.cluster_prefix)
    }

    fn block(&self, i: u32) -> String {
        let size = 1u64 << (32 - self.node_prefix);
        let addr = (u64::from(self.base) + u64::from(i) * size) as u32;
        format!("{}/{}", Ipv4Addr::from(addr), self.node_prefix)
    }

    /// The index of `cidr` if it is one of our blocks.
    fn index_of(&self, cidr: &str) -> Option<u32> {
        let (ip, len) = cidr.split_once('/')?;
        let ip: Ipv4Addr = ip.parse().ok()?;
        if len.parse::<u8>().ok()? != self.node_prefix {
            return None;
        }
        let off = u32::from(ip).checked_sub(self.base)?;
        let i = off >> (32 - self.node_prefix);
        (i < self.len() && off % (1u32 << (32 - self.node_prefix)) == 0).then_some(i)
    }
}

/// Nodes (by name, with their current `spec.podCIDR`) that need a block, and the block each gets: the lowest
/// free one, nodes in name order. `pending` are blocks already written but not yet seen on the node.
pub(crate) fn plan(
    set: &CidrSet,
    nodes: &BTreeMap<String, Option<String>>,
    pending: &HashMap<String, String>,
) -> Vec<(String, Option<String>)> {
    let mut used: HashSet<u32> = nodes
        .values()
        .flatten()
        .chain(pending.values())
        .filter_map(|c| set.index_of(c))
        .collect();
    let mut next = 0u32;
    let mut out = Vec::new();
    for (name, cidr) in nodes {
        if cidr.is_some() || pending.contains_key(name) {
            continue;
        }
        while next < set.len() && used.contains(&next) {
            next += 1;
        }
        if next >= set.len() {
            // Exhausted: upstream records a CIDRNotAvailable event; the node stays without a range.
            out.push((name.clone(), None));
            continue;
        }
        used.insert(next);
        out.push((name.clone(), Some(set.block(next))));
    }
    out
}

async fn run(ctx: Context) -> Result<(), ControllerError> {
    let Some(set) = CidrSet::new(ctx.config.cluster_cidr, ctx.config.node_cidr_mask_size) else {
        return Err(ControllerError::Watch {
            controller: NAME,
            message: format!(
                "--node-cidr-mask-size {} does not fit --cluster-cidr {}/{}",
                ctx.config.node_cidr_mask_size,
                ctx.config.cluster_cidr.0,
                ctx.config.cluster_cidr.1
            ),
        });
    };
    let api: Api<Node> = Api::all(ctx.client.clone());
    let wake = Arc::new(Notify::new());
    let (nodes, task) = watch::cache(api.clone(), wake.clone());
    let _tasks = Tasks(vec![task]);
    watch::ready(NAME, &nodes).await?;
    let mut pending: HashMap<String, String> = HashMap::new();
    loop {
        let current: BTreeMap<String, Option<String>> = nodes
            .state()
            .iter()
            .map(|n| {
                let cidr = n
                    .spec
                    .as_ref()
                    .and_then(|s| s.pod_cidr.clone())
                    .filter(|c| !c.is_empty());
                (n.name_any(), cidr)
            })
            .collect();
        // Forget pending blocks the cache now shows (or whose node went away).
        pending.retain(|name, _| matches!(current.get(name), Some(None)));
        for (name, cidr) in plan(&set, &current, &pending) {
            let Some(cidr) = cidr else {
                tracing::warn!(node = %name, "no pod CIDR left in the cluster CIDR for this node");
                continue;
            };
            let patch = json!({"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(node = %name, %cidr, "allocated pod CIDR");
                    pending.insert(name, cidr);
                }
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "cannot set the node's pod CIDR")
                }
            }
        }
        let _ = tokio::time::timeout(RESYNC, wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> CidrSet {
        CidrSet::new((Ipv4Addr::new(10, 244, 0, 0), 16), 24).expect("set")
    }

    #[test]
    fn new_nodes_get_the_lowest_free_blocks_and_existing_ones_are_kept() {
        let nodes = BTreeMap::from([
            ("a".to_owned(), Some("10.244.0.0/24".to_owned())),
            ("b".to_owned(), None),
            ("c".to_owned(), Some("10.244.2.0/24".to_owned())),
            ("d".to_owned(), None),
        ]);
        let got = plan(&set(), &nodes, &HashMap::new());
        assert_eq!(
            got,
            [
                ("b".to_owned(), Some("10.244.1.0/24".to_owned())),
                ("d".to_owned(), Some("10.244.3.0/24".to_owned()))
            ]
        );
    }

    #[test]
    fn a_deleted_nodes_block_is_reused_and_pending_blocks_are_not() {
        // "a" held 10.244.0.0/24 and was deleted: it is free again. 10.244.1.0/24 was just written to "x".
        let nodes = BTreeMap::from([("x".to_owned(), None), ("y".to_owned(), None)]);
        let pending = HashMap::from([("x".to_owned(), "10.244.1.0/24".to_owned())]);
        let got = plan(&set(), &nodes, &pending);
        assert_eq!(got, [("y".to_owned(), Some("10.244.0.0/24".to_owned()))]);
    }

    #[test]
    fn an_exhausted_range_leaves_the_node_without_a_block() {
        let small = CidrSet::new((Ipv4Addr::new(10, 0, 0, 0), 23), 24).expect("set");
        let nodes = BTreeMap::from([
            ("a".to_owned(), None),
            ("b".to_owned(), None),
            ("c".to_owned(), None),
        ]);
        let got = plan(&small, &nodes, &HashMap::new());
        assert_eq!(got[0].1.as_deref(), Some("10.0.0.0/24"));
        assert_eq!(got[1].1.as_deref(), Some("10.0.1.0/24"));
        assert_eq!(got[2].1, None);
    }

    #[test]
    fn foreign_or_misaligned_cidrs_are_not_counted_as_ours() {
        let s = set();
        assert_eq!(s.index_of("10.244.7.0/24"), Some(7));
        assert_eq!(s.index_of("10.245.0.0/24"), None);
        assert_eq!(s.index_of("10.244.7.128/24"), None);
        assert_eq!(s.index_of("10.244.7.0/25"), None);
        assert!(CidrSet::new((Ipv4Addr::new(10, 244, 0, 0), 16), 8).is_none());
    }
}
