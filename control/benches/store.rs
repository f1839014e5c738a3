//! Store write benchmark: the same ~2 KB pod JSON put sequentially and concurrently into
//! - the embedded store, through the `Store` trait, with its write-ahead log (the default) and without (every
//!   batch a durable redb commit);
//! - the etcd backend, through the `Store` trait (a create = one etcd txn);
//! - etcd directly with `etcd-client` puts (the floor any etcd-backed API server pays), and with the same
//!   create-if-absent txn the backend sends (to tell etcd's txn cost from the backend's own);
//! - `etcdctl put` in a loop (a process per put; sequential only);
//!
//! all in the same run, against one etcd member started here (Debian's `etcd`, data in a temp dir on the same file
//! system as the embedded store). Every measurement is repeated and reported as median (min–max) writes/s, plus
//! the ratio of each median to raw etcd-client's, and the median CPU per write of the store's process (the
//! embedded store: this process, whose client side is a loop of calls; etcd: the etcd server).
//!
//! Run: `cargo bench -p windlass-control --bench store` (needs `etcd`, `etcdctl`; env `BENCH_N`, `BENCH_ROUNDS`,
//! `BENCH_CONCURRENCY` override the sizes).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use windlass_control::store::embedded::{EmbeddedOptions, EmbeddedStore};
use windlass_control::store::etcd::{EtcdConfig, EtcdStore};
use windlass_control::store::Store;
use windlass_tests::bench::{cpu_seconds, env_usize, settle, Spread};

/// A pod as kube-apiserver would store it (JSON, ~2 KB).
fn pod_json() -> Vec<u8> {
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "web-7c5ddbdf54-x2x9q", "generateName": "web-7c5ddbdf54-", "namespace": "default",
            "uid": "5f0b3c1e-6b7a-4d4e-9c55-2b8f4f1c9a10", "resourceVersion": "123456",
            "creationTimestamp": "2026-11-23T20:00:00Z",
            "labels": {"app": "web", "pod-template-hash": "7c5ddbdf54", "tier": "frontend"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-23T19:59:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7c5ddbdf54",
                "uid": "0e2c55d5-0a3b-4bb4-8d5e-6c1f0a3e2b44", "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "containers": [{
                "name": "web", "image": "registry.local/library/nginx:1.27.2", "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "MODE", "value": "production"}, {"name": "LOG_LEVEL", "value": "info"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"
            }],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "nodeName": "node-1", "schedulerName": "default-scheduler",
            "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {
            "phase": "Running", "hostIP": "10.0.0.11", "podIP": "10.244.1.17", "podIPs": [{"ip": "10.244.1.17"}],
            "startTime": "2026-11-23T20:00:01Z", "qosClass": "Burstable",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-11-23T20:00:01Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-23T20:00:03Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-11-23T20:00:03Z"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-23T20:00:00Z"}],
            "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0, "started": true,
                "image": "registry.local/library/nginx:1.27.2",
                "imageID": "registry.local/library/nginx@sha256:0d17b565c37bcbd895e9d92315a05c1c3c9a29f762b011a10c54a66cd53c9b31",
                "containerID": "windlass://8f14e45fceea167a5a36dedd4bea2543c3f1b8a4d0e2f6a9b7c1d3e5f7a9b1c3",
                "state": {"running": {"startedAt": "2026-11-23T20:00:02Z"}}, "lastState": {}}]
        }
    });
    let mut json = serde_json::to_vec(&pod).unwrap_or_default();
    // Pad to 2 KB, the size of a typical stored pod.
    while json.len() < 2048 {
        json.push(b' ');
    }
    json
}

#[derive(Clone, Copy)]
enum Target {
    Embedded,
    EmbeddedNoWal,
    EtcdBackend,
    RawEtcdClient,
    RawEtcdTxn,
}

struct Ctx {
    embedded: Arc<EmbeddedStore>,
    embedded_no_wal: Arc<EmbeddedStore>,
    etcd_pid: u32,
    etcd_store: Arc<EtcdStore>,
    raw: etcd_client::Client,
    pod: Vec<u8>,
}

async fn put(ctx: &Ctx, target: Target, client: &mut etcd_client::KvClient, key: String) {
    match target {
        Target::Embedded => {
            ctx.embedded
                .create(&key, ctx.pod.clone())
                .await
                .expect("embedded create");
        }
        Target::EmbeddedNoWal => {
            ctx.embedded_no_wal
                .create(&key, ctx.pod.clone())
                .await
                .expect("embedded create");
        }
        Target::EtcdBackend => {
            ctx.etcd_store
                .create(&key, ctx.pod.clone())
                .await
                .expect("etcd backend create");
        }
        Target::RawEtcdClient => {
            client
                .put(key, ctx.pod.clone(), None)
                .await
                .expect("etcd-client put");
        }
        Target::RawEtcdTxn => {
            // What the backend's create sends, without the backend: put if the key does not exist.
            let txn = etcd_client::Txn::new()
                .when([etcd_client::Compare::create_revision(
                    key.as_str(),
                    etcd_client::CompareOp::Equal,
                    0,
                )])
                .and_then([etcd_client::TxnOp::put(key.as_str(), ctx.pod.clone(), None)]);
            client.txn(txn).await.expect("etcd-client txn");
        }
    }
}

/// `n` puts by `concurrency` tasks; returns writes/s and the store process's CPU µs per write.
async fn run(
    ctx: &Arc<Ctx>,
    target: Target,
    round: &str,
    n: usize,
    concurrency: usize,
) -> (f64, f64) {
    let pid = match target {
        Target::Embedded | Target::EmbeddedNoWal => std::process::id(),
        _ => ctx.etcd_pid,
    };
    let cpu = cpu_seconds(pid);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let ctx = ctx.clone();
        let round = round.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = ctx.raw.kv_client();
            for i in (t..n).step_by(concurrency) {
                put(
                    &ctx,
                    target,
                    &mut client,
                    format!("/registry/pods/{round}/pod-{i:06}"),
                )
                .await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("bench task");
    }
    (
        n as f64 / start.elapsed().as_secs_f64(),
        (cpu_seconds(pid) - cpu) * 1e6 / n as f64,
    )
}

fn etcdctl_loop(endpoint: &str, pod: &[u8], round: &str, n: usize) -> f64 {
    let value = String::from_utf8_lossy(pod).into_owned();
    let start = Instant::now();
    for i in 0..n {
        let status = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", endpoint, "put"])
            .arg(format!("/registry/pods/{round}/pod-{i:06}"))
            .arg("--")
            .arg(&value)
            .stdout(Stdio::null())
            .status()
            .expect("run etcdctl");
        assert!(status.success(), "etcdctl put failed");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n = env_usize("BENCH_N", 1000);
    let rounds = env_usize("BENCH_ROUNDS", 5);
    let concurrency = env_usize("BENCH_CONCURRENCY", 64);
    let etcdctl_n = env_usize("BENCH_ETCDCTL_N", 100);
    if windlass_tests::which("etcd").is_none() {
        eprintln!("the store benchmark needs etcd (Debian: etcd-server)");
        std::process::exit(2);
    }

    let cluster = windlass_tests::etcd::EtcdCluster::start(1).await;
    let endpoint = cluster.members[0].client_url.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let ctx = Arc::new(Ctx {
        embedded: Arc::new(
            EmbeddedStore::open(&dir.path().join("wal"), EmbeddedOptions::default())
                .expect("embedded store"),
        ),
        embedded_no_wal: Arc::new(
            EmbeddedStore::open(
                &dir.path().join("no-wal"),
                EmbeddedOptions {
                    write_ahead_log: false,
                    ..EmbeddedOptions::default()
                },
            )
            .expect("embedded store"),
        ),
        etcd_pid: cluster.members[0].pid().expect("etcd pid"),
        etcd_store: Arc::new(
            EtcdStore::connect(EtcdConfig::from_servers(&endpoint).expect("config"))
                .await
                .expect("etcd backend"),
        ),
        raw: etcd_client::Client::connect([endpoint.as_str()], None)
            .await
            .expect("etcd-client"),
        pod: pod_json(),
    });
    eprintln!(
        "pod JSON {} bytes; {n} puts x {rounds} rounds; concurrency {concurrency}; etcdctl {etcdctl_n} puts",
        ctx.pod.len()
    );

    let targets = [
        ("embedded store (Store trait)", Target::Embedded),
        (
            "embedded store without its log (Store trait)",
            Target::EmbeddedNoWal,
        ),
        ("etcd backend (Store trait)", Target::EtcdBackend),
        ("raw etcd-client put", Target::RawEtcdClient),
        ("raw etcd-client txn (create-if-absent)", Target::RawEtcdTxn),
    ];
    let mut rows = Vec::new();
    for (mode, conc) in [("sequential", 1), ("concurrent", concurrency)] {
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
        let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
        // Interleave the targets round by round, so drift (other load on the machine) hits all alike.
        for round in 0..rounds {
            for (t, (_, target)) in targets.iter().enumerate() {
                let tag = format!("{mode}-{t}-{round}");
                let (rate, cpu_us) = run(&ctx, *target, &tag, n, conc).await;
                results[t].push(rate);
                cpu[t].push(cpu_us);
                // The embedded store's idle checkpoint of this round's writes runs now, not in the next
                // target's round (that CPU is not in the table: the bench process hosts the store).
                let store_pid = match target {
                    Target::Embedded | Target::EmbeddedNoWal => std::process::id(),
                    _ => ctx.etcd_pid,
                };
                settle([store_pid].into_iter()).await;
            }
        }
        let raw = Spread::of(results[3].clone()).median;
        for (t, (name, _)) in targets.iter().enumerate() {
            let s = Spread::of(results[t].clone());
            rows.push(format!(
                "| {mode} ({conc}) | {name} | {:.0} | {:.0}–{:.0} | {:.2}× | {:.0} |",
                s.median,
                s.min,
                s.max,
                s.median / raw,
                Spread::of(cpu[t].clone()).median
            ));
        }
        if mode == "sequential" {
            let mut v = Vec::new();
            for round in 0..rounds.min(3) {
                let (ep, pod, tag) = (endpoint.clone(), ctx.pod.clone(), format!("ctl-{round}"));
                v.push(
                    tokio::task::spawn_blocking(move || etcdctl_loop(&ep, &pod, &tag, etcdctl_n))
                        .await
                        .expect("etcdctl"),
                );
            }
            let s = Spread::of(v);
            rows.push(format!(
                "| {mode} (1) | `etcdctl put` loop | {:.0} | {:.0}–{:.0} | {:.2}× | |",
                s.median,
                s.min,
                s.max,
                s.median / raw
            ));
        }
    }
    println!(
        "| mode (writers) | target | median writes/s | min–max | vs raw etcd-client | store CPU µs/write |"
    );
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    // Leave the machine as found: the store and etcd (SIGKILL via its guard) go with their guards.
    drop(ctx);
    drop(cluster);
}
