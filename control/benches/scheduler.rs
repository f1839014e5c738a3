//! Throughput of the scheduling algorithm alone (no API, no binding): 10k pods onto 1k and 5k nodes.
//!
//! `cargo bench -p windlass-control --bench scheduler` (plain binary, no harness). Pods come from 100 ReplicaSets
//! (owner spreading is exercised), have varied requests, a fifth carry a nodeSelector on a zone label, a tenth a
//! preferred node affinity, and a twentieth tolerate a PreferNoSchedule taint on a tenth of the nodes. Each pod is
//! converted from a `k8s_openapi` Pod, scheduled and assumed into the cache, like the real loop does.

use std::time::Instant;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use windlass_control::scheduler::{Cache, PodRequest, Scheduler};

const PODS: usize = 10_000;

fn nodes(n: usize) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let mut taints = vec![];
            if i % 10 == 0 {
                taints.push(json!({"key": "spot", "value": "true", "effect": "PreferNoSchedule"}));
            }
            serde_json::from_value(json!({
                "metadata": {"name": format!("node-{i}"), "labels": {
                    "kubernetes.io/hostname": format!("node-{i}"),
                    "topology.kubernetes.io/zone": format!("zone-{}", i % 3),
                    "node.kubernetes.io/instance-type": if i % 2 == 0 { "large" } else { "xlarge" }
                }},
                "spec": {"taints": taints},
                "status": {
                    "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
                    "conditions": [{"type": "Ready", "status": "True"}]
                }
            }))
            .map_err(|e| format!("node fixture: {e}"))
            .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

fn pods() -> Vec<Pod> {
    (0..PODS)
        .map(|i| {
            let mut spec = json!({"containers": [{"name": "app", "image": "busybox", "resources": {"requests": {
                "cpu": format!("{}m", 100 + (i % 5) * 100),
                "memory": format!("{}Mi", 128 + (i % 4) * 128)
            }}}]});
            if i % 5 == 0 {
                spec["nodeSelector"] = json!({"topology.kubernetes.io/zone": format!("zone-{}", i % 3)});
            }
            if i % 10 == 1 {
                spec["affinity"] = json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 50, "preference": {"matchExpressions": [
                        {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["xlarge"]}]}}]}});
            }
            if i % 20 == 2 {
                spec["tolerations"] = json!([{"key": "spot", "operator": "Exists"}]);
            }
            serde_json::from_value(json!({
                "metadata": {"name": format!("pod-{i}"), "namespace": "bench", "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("rs-{}", i % 100),
                    "uid": format!("uid-{}", i % 100), "controller": true}]},
                "spec": spec
            }))
            .map_err(|e| format!("pod fixture: {e}"))
            .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

fn run(node_count: usize, pct: Option<u8>, pods: &[Pod]) {
    let mut cache = Cache::new();
    for n in nodes(node_count) {
        cache.upsert_node(&n).unwrap_or_else(|e| panic!("{e}"));
    }
    let mut s = Scheduler::with_seed(1);
    s.set_percentage_of_nodes_to_score(pct);
    let start = Instant::now();
    let mut evaluated = 0usize;
    for p in pods {
        let req = PodRequest::from_pod(p).unwrap_or_else(|e| panic!("{e}"));
        let placement = s.schedule(&cache, &req).unwrap_or_else(|e| panic!("{e}"));
        evaluated += placement.evaluated_nodes;
        cache.assume(&req, &placement.node);
    }
    let secs = start.elapsed().as_secs_f64();
    let mode = match pct {
        None => "adaptive".to_owned(),
        Some(p) => format!("{p}%"),
    };
    println!(
        "| {node_count} | {mode} | {} | {:.3} | {:.0} | {:.0} |",
        pods.len(),
        secs,
        pods.len() as f64 / secs,
        evaluated as f64 / pods.len() as f64
    );
}

fn main() {
    let pods = pods();
    println!("| nodes | nodes scored | pods | seconds | pods/s | nodes evaluated per pod |");
    println!("|---|---|---|---|---|---|");
    for nodes in [1000, 5000] {
        for pct in [None, Some(100)] {
            run(nodes, pct, &pods);
        }
    }
}
