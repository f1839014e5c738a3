//! The Node object and its Lease: registered at start, status posted every 10 s when it changed (and every
//! 5 min regardless), the Lease in `kube-node-lease` renewed every 10 s.
//!
//! Ref: upstream `kubelet_node_status.go` (`registerWithAPIServer`, `updateNodeStatus`) and
//! `pkg/kubelet/nodelease` (renew interval 10 s, retries from 200 ms doubling to 7 s).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{DaemonEndpoint, Node, NodeDaemonEndpoints};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;

use super::Shared;
use crate::node::{self, HostRoots, NodeConfig, NodeFacts, Readiness};

/// Ready needs a network configuration (upstream: the runtime's NetworkReady from the CNI plugin).
fn readiness(shared: &Shared) -> Readiness {
    match shared.cni.network() {
        Ok(_) => Readiness::default(),
        Err(e) => Readiness {
            not_ready: Some(format!(
                "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady \
                 message:Network plugin returns error: cni config uninitialized ({e})"
            )),
        },
    }
}

async fn facts(shared: &Shared) -> Option<NodeFacts> {
    let roots = HostRoots::system(&shared.cfg.root_dir);
    match tokio::task::spawn_blocking(move || NodeFacts::read(&roots)).await {
        Ok(Ok(f)) => Some(f),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read node facts");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "node facts task failed");
            None
        }
    }
}

/// One status round: build the Node from the facts, create it if missing, post the status if it changed.
async fn sync_node(
    shared: &Shared,
    last: &mut Option<(Node, Instant)>,
) -> Result<Option<String>, kube::Error> {
    let Some(f) = facts(shared).await else {
        return Ok(None);
    };
    let api: Api<Node> = Api::all(shared.client.clone());
    let name = &shared.cfg.node_name;
    let existing = api.get_opt(name).await?;
    let cfg = NodeConfig {
        node_name: name.clone(),
        node_ip: shared.node_ip.clone(),
        hostname: name.clone(),
        max_pods: shared.cfg.max_pods,
        labels: Default::default(),
    };
    let ready = readiness(shared);
    let mut node = node::build_node(&cfg, &f, &ready, Timestamp::now(), existing.as_ref());
    if let Some(status) = node.status.as_mut() {
        // Where the API server reaches this kubelet's API (logs, exec, port-forward).
        status.daemon_endpoints = Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(shared.cfg.port),
            }),
        });
        if let Ok(mut a) = shared.allocatable.write() {
            *a = status.allocatable.clone().unwrap_or_default();
        }
    }
    let node = match existing {
        None => {
            let mut fresh = node.clone();
            fresh.metadata.resource_version = None;
            let created = api.create(&PostParams::default(), &fresh).await?;
            tracing::info!(node = %name, "node registered");
            shared.event(
                &crate::events::node_ref(name),
                crate::events::EventType::Normal,
                crate::events::reasons::STARTING,
                "Starting kubelet.",
            );
            // The create may drop the status (a status subresource): post it below.
            let mut n = node;
            n.metadata = created.metadata;
            n
        }
        Some(_) => node,
    };
    let since = last
        .as_ref()
        .map(|(_, at)| at.elapsed())
        .unwrap_or(Duration::MAX);
    if node::should_report_status(last.as_ref().map(|(n, _)| n), &node, since) {
        let patch = serde_json::json!({ "status": node.status });
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        *last = Some((node.clone(), Instant::now()));
    }
    Ok(node.metadata.uid.clone())
}

async fn renew(shared: &Shared, node_uid: Option<&str>) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(shared.client.clone(), node::LEASE_NAMESPACE);
    let name = &shared.cfg.node_name;
    let existing = api.get_opt(name).await?;
    let lease = node::renew_lease(existing.as_ref(), name, node_uid, Timestamp::now());
    match existing {
        None => api.create(&PostParams::default(), &lease).await.map(|_| ()),
        Some(_) => api
            .replace(name, &PostParams::default(), &lease)
            .await
            .map(|_| ()),
    }
}

/// The node loop: never returns.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut last: Option<(Node, Instant)> = None;
    let mut node_uid: Option<String> = None;
    let mut failures = 0u32;
    loop {
        match sync_node(&shared, &mut last).await {
            Ok(Some(uid)) => node_uid = Some(uid),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "node status update failed"),
        }
        match renew(&shared, node_uid.as_deref()).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "lease renewal failed");
            }
        }
        tokio::time::sleep(node::next_lease_attempt(failures)).await;
    }
}
