//! Scheduling throughput end to end through the API: a `windlass-control serve` (embedded store, scheduler off)
//! holds N fake nodes and P unscheduled pods; then a scheduler-only process (`serve --disable-api --kubeconfig
//! scheduler.kubeconfig --controllers=scheduler`, authenticated and authorized as `system:kube-scheduler`) starts,
//! and the clock runs from its start until a watch has seen every pod bound. That covers its initial lists, one
//! `pods/binding` per pod (a store write each, RBAC-checked) and the Scheduled events.
//!
//! `cargo bench -p windlass-control --bench scheduler_api` (plain binary). Sizes: `BENCH_NODES` (default
//! `1000,5000`) and `BENCH_PODS` (default 10000); `BENCH_AS_ADMIN=1` runs the scheduler as the admin (a
//! `system:masters` member: no RBAC evaluation), to see what authorization costs.

use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{ListParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use serde_json::json;
use windlass_tests::control::ControlPlane;
use windlass_tests::{workspace_binary, ChildGuard};

const CONCURRENCY: usize = 32;

async fn client(path: &std::path::Path) -> Client {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(path).unwrap_or_else(|e| panic!("kubeconfig: {e}"));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("kube config: {e}"));
    Client::try_from(config).unwrap_or_else(|e| panic!("client: {e}"))
}

fn node(i: usize) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": format!("node-{i}"), "labels": {
            "kubernetes.io/hostname": format!("node-{i}"),
            "topology.kubernetes.io/zone": format!("zone-{}", i % 3)}},
        "status": {"allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "capacity": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap_or_else(|e| panic!("node: {e}"))
}

fn pod(ns: &str, i: usize) -> Pod {
    let mut spec = json!({"containers": [{"name": "app", "image": "busybox", "resources": {"requests": {
        "cpu": format!("{}m", 100 + (i % 5) * 100), "memory": format!("{}Mi", 128 + (i % 4) * 128)}}}]});
    if i % 5 == 0 {
        spec["nodeSelector"] = json!({"topology.kubernetes.io/zone": format!("zone-{}", i % 3)});
    }
    serde_json::from_value(
        json!({"metadata": {"name": format!("pod-{i}"), "namespace": ns}, "spec": spec}),
    )
    .unwrap_or_else(|e| panic!("pod: {e}"))
}

async fn run(nodes: usize, pods: usize) {
    let cp = tokio::task::spawn_blocking(|| {
        ControlPlane::start_with(|_| {
            vec![
                "--controllers=serviceaccount".into(),
                "--leader-elect=false".into(),
            ]
        })
    })
    .await
    .unwrap_or_else(|e| panic!("start: {e}"));
    let admin = client(&cp.kubeconfig()).await;
    let node_api: Api<Node> = Api::all(admin.clone());
    futures_util::stream::iter(0..nodes)
        .map(|i| {
            let api = node_api.clone();
            async move { api.create(&PostParams::default(), &node(i)).await }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap_or_else(|e| panic!("create nodes: {e}"));
    let ns = "bench";
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap_or_default(),
        )
        .await
        .unwrap_or_else(|e| panic!("namespace: {e}"));
    let pod_api: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let created = Instant::now();
    futures_util::stream::iter(0..pods)
        .map(|i| {
            let api = pod_api.clone();
            async move { api.create(&PostParams::default(), &pod(ns, i)).await }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap_or_else(|e| panic!("create pods: {e}"));
    let create_secs = created.elapsed().as_secs_f64();
    let rv = pod_api
        .list_metadata(&ListParams::default().limit(1))
        .await
        .unwrap_or_else(|e| panic!("list: {e}"))
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut watch = pod_api
        .watch(&WatchParams::default().timeout(290), &rv)
        .await
        .unwrap_or_else(|e| panic!("watch: {e}"))
        .boxed();

    let log = std::fs::File::create(cp.data_dir().join("scheduler.log"))
        .unwrap_or_else(|e| panic!("log: {e}"));
    let start = Instant::now();
    let _scheduler = ChildGuard::spawn(
        std::process::Command::new(workspace_binary("windlass-control"))
            .args([
                "serve",
                "--disable-api",
                "--controllers=scheduler",
                "--leader-elect=false",
                "--kubeconfig",
            ])
            .arg(if std::env::var("BENCH_AS_ADMIN").is_ok_and(|v| v == "1") {
                cp.kubeconfig()
            } else {
                cp.data_dir().join("scheduler.kubeconfig")
            })
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log),
    )
    .unwrap_or_else(|e| panic!("scheduler: {e}"));
    let mut bound = std::collections::HashSet::new();
    let deadline = start + Duration::from_secs(280);
    while bound.len() < pods && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(30), watch.next()).await {
            Ok(Some(Ok(WatchEvent::Modified(p)))) => {
                if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                    bound.insert(p.metadata.name.unwrap_or_default());
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "watch ended early ({} bound): {:?}",
                bound.len(),
                other.map(|o| o.map(|r| r.is_ok()))
            ),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "| {nodes} | {pods} | {:.0} | {:.2} | {} | {:.0} |",
        pods as f64 / create_secs,
        secs,
        bound.len(),
        bound.len() as f64 / secs
    );
}

fn sizes(var: &str, default: &str) -> Vec<usize> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().unwrap_or_else(|e| panic!("runtime: {e}"));
    let pods = sizes("BENCH_PODS", "10000")
        .first()
        .copied()
        .unwrap_or(10000);
    println!("| nodes | pods | pod creates/s | seconds to bind all | bound | pods/s end to end |");
    println!("|---|---|---|---|---|---|");
    for nodes in sizes("BENCH_NODES", "1000,5000") {
        rt.block_on(run(nodes, pods));
    }
}
