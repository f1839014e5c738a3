//! Same-run benchmark of pod startup (issue 6): the time from a pod's create to all its containers running, as a
//! watch sees it (image already present), for 1 pod at a time and for a batch created at once, through the whole
//! Windlass path (API server → scheduler → kubelet → runtime + CNI) — next to `podman pod create` + `podman run -d`
//! of the same image in the same lab network namespace (podman without a network: its bridge would write nftables
//! rules, so the peer does less work than the kubelet, which wires every pod through CNI). Then the
//! kubelet's RSS and CPU with many idle pods.
//!
//! Everything runs in a one-node lab (tests/src/kubelet_lab.rs): API server, registry and kubelet in a network
//! namespace of their own. podman's crun refuses this machine's hybrid cgroup layout, so the benchmark re-executes
//! itself in a private mount namespace without the `unified` cgroup2 mount (testbed notes), which the kubelet and
//! its pods share.
//!
//! Usage (root): `cargo build --release -p windlass-tests --bins && target/release/bench-kubelet` (env
//! `BENCH_RUNS` single-pod runs (10), `BENCH_BATCH` pods per batch (30), `BENCH_BATCH_ROUNDS` (3),
//! `BENCH_IDLE_PODS` (100), `BENCH_IDLE_SECONDS` CPU sampling window (30), `BENCH_KUBELET_LOG` a file to keep the
//! kubelet's log in).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::{Client, Config};
use windlass_tests::bench::{
    children_cpu_seconds, cpu_seconds, env_usize, markdown_table, rss_mib, Samples,
};
use windlass_tests::kubelet_lab::KubeletLab;

const IN_NS: &str = "WINDLASS_BENCH_IN_PRIVATE_MOUNT_NS";

fn fail(msg: &str) -> ! {
    eprintln!("bench-kubelet: {msg}");
    std::process::exit(1)
}

fn pod(name: &str, image: &str, command: Option<&[&str]>) -> Pod {
    let mut container = serde_json::json!({"name": "main", "image": image});
    if let Some(c) = command {
        container["command"] = serde_json::json!(c);
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": "startup"}},
        "spec": {"containers": [container], "terminationGracePeriodSeconds": 1},
    }))
    .unwrap_or_else(|e| fail(&format!("pod: {e}")))
}

fn all_running(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            !cs.is_empty()
                && cs
                    .iter()
                    .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        })
}

async fn client(lab: &KubeletLab) -> Client {
    let kc = kube::config::Kubeconfig::read_from(lab.control.kubeconfig())
        .unwrap_or_else(|e| fail(&format!("kubeconfig: {e}")));
    let config = Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap_or_else(|e| fail(&format!("kube config: {e}")));
    Client::try_from(config).unwrap_or_else(|e| fail(&format!("kube client: {e}")))
}

/// One pod's start as the watch saw it: create → bound to the node (the scheduler's share) and create → all
/// containers running.
#[derive(Debug, Clone, Copy)]
struct Started {
    bound: Duration,
    running: Duration,
}

/// Creates `names` at once; returns each pod's latencies, as the watch saw them.
async fn start_pods(api: &Api<Pod>, names: &[String], image: &str) -> Vec<Started> {
    let rv = api
        .list(&ListParams::default().limit(1))
        .await
        .unwrap_or_else(|e| fail(&format!("list: {e}")))
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut stream = api
        .watch(
            &WatchParams::default().labels("bench=startup").timeout(290),
            &rv,
        )
        .await
        .unwrap_or_else(|e| fail(&format!("watch: {e}")))
        .boxed();
    let mut created: HashMap<String, Instant> = HashMap::new();
    let creates = names.iter().map(|n| {
        let api = api.clone();
        let p = pod(n, image, None);
        async move {
            let at = Instant::now();
            api.create(&PostParams::default(), &p)
                .await
                .unwrap_or_else(|e| fail(&format!("create: {e}")));
            at
        }
    });
    for (n, at) in names
        .iter()
        .zip(futures_util::future::join_all(creates).await)
    {
        created.insert(n.clone(), at);
    }
    let mut out = HashMap::new();
    let mut bound: HashMap<String, Duration> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while out.len() < names.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, stream.try_next())
            .await
            .unwrap_or_else(|_| fail("pods not running within 180 s"))
            .unwrap_or_else(|e| fail(&format!("watch: {e}")))
            .unwrap_or_else(|| fail("watch ended"));
        let (WatchEvent::Added(p) | WatchEvent::Modified(p)) = ev else {
            continue;
        };
        let name = p.metadata.name.clone().unwrap_or_default();
        if let Some(at) = created.get(&name) {
            let on_node = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
            if on_node && !bound.contains_key(&name) {
                bound.insert(name.clone(), at.elapsed());
            }
            if all_running(&p) && !out.contains_key(&name) {
                let running = at.elapsed();
                let b = bound.get(&name).copied().unwrap_or(running);
                out.insert(name, Started { bound: b, running });
            }
        }
    }
    out.into_values().collect()
}

/// `RssAnon` and `RssFile` (MiB) and `Threads` of a process: heap and stacks versus mapped program text.
fn rss_parts(pid: u32) -> (f64, f64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (
        field("RssAnon:") / 1024.0,
        field("RssFile:") / 1024.0,
        field("Threads:") as u64,
    )
}

/// Open sockets of a process (API connections kept alive, watches, listeners).
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

async fn delete_pods(api: &Api<Pod>) {
    let _ = api
        .delete_collection(
            &DeleteParams::default().grace_period(0),
            &ListParams::default().labels("bench=startup"),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let left = api
            .list(&ListParams::default().labels("bench=startup"))
            .await
            .map(|l| l.items.len())
            .unwrap_or(1);
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fail("pods not deleted within 120 s");
}

/// podman's configuration for this machine (testbed notes): cgroupfs, file events, ulimits it may set without
/// CAP_SYS_RESOURCE, no network (its bridge would write nftables rules), storage of its own.
fn podman_config(dir: &std::path::Path) {
    let conf = "[engine]\nruntime=\"crun\"\ncgroup_manager=\"cgroupfs\"\nevents_logger=\"file\"\n\
         [containers]\ndefault_ulimits=[\"nofile=1024:1024\",\"nproc=4096:4096\"]\nnetns=\"none\"\n";
    let storage = format!(
        "[storage]\ndriver=\"overlay\"\ngraphroot=\"{0}/graph\"\nrunroot=\"{0}/run\"\n",
        dir.display()
    );
    std::fs::write(dir.join("containers.conf"), conf).unwrap_or_else(|e| fail(&e.to_string()));
    std::fs::write(dir.join("storage.conf"), storage).unwrap_or_else(|e| fail(&e.to_string()));
    std::env::set_var("CONTAINERS_CONF", dir.join("containers.conf"));
    std::env::set_var("CONTAINERS_STORAGE_CONF", dir.join("storage.conf"));
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| fail(&format!("podman: {e}")))
}

/// `podman pod create` + `podman run -d` of the image for each name, all at once; per-pod wall time until `run -d`
/// returned (the container is running then).
fn podman_start(names: &[String], image: &str) -> Vec<Duration> {
    std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| {
                s.spawn(move || {
                    let at = Instant::now();
                    let out = podman(&["pod", "create", "--name", n]);
                    assert!(
                        out.status.success(),
                        "podman pod create: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let out = podman(&[
                        "run",
                        "-d",
                        "--pod",
                        n,
                        "--name",
                        &format!("{n}-main"),
                        image,
                    ]);
                    assert!(
                        out.status.success(),
                        "podman run: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    at.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| fail("podman thread panicked")))
            .collect()
    })
}

fn podman_cleanup(names: &[String]) {
    for n in names {
        let _ = podman(&["pod", "rm", "-f", "-t", "0", n]);
    }
}

fn samples(name: &str, v: &[Duration]) -> Samples {
    let mut s = Samples::new(name);
    for d in v {
        s.push(*d);
    }
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if std::env::var_os(IN_NS).is_none() {
        let status = Command::new("unshare")
            .args(["-m", "--propagation", "private", "--"])
            .args(&args)
            .env(IN_NS, "1")
            .status()
            .unwrap_or_else(|e| fail(&format!("cannot run unshare: {e}")));
        std::process::exit(status.code().unwrap_or(1));
    }
    let _ = Command::new("umount")
        .arg("/sys/fs/cgroup/unified")
        .status();
    windlass_tests::install_rustls_provider();
    let runs = env_usize("BENCH_RUNS", 10);
    let batch = env_usize("BENCH_BATCH", 30);
    let batch_rounds = env_usize("BENCH_BATCH_ROUNDS", 3);
    let idle = env_usize("BENCH_IDLE_PODS", 100);
    let idle_secs = env_usize("BENCH_IDLE_SECONDS", 30);

    let podman_dir = tempfile::tempdir().unwrap_or_else(|e| fail(&format!("temp dir: {e}")));
    podman_config(podman_dir.path());
    let lab = KubeletLab::start();
    let image = lab.image.clone();
    let kubelet_pid = lab.kubelet_pid();
    // The kubelet's footprint with no pods yet (registered, watching, serving).
    std::thread::sleep(Duration::from_secs(2));
    let (rss_empty, anon_empty) = (rss_mib(kubelet_pid).0, rss_parts(kubelet_pid).0);
    let netns = lab.netns.path();
    let report = windlass_tests::lab::in_netns(&netns, || {
        let rt = tokio::runtime::Runtime::new().unwrap_or_else(|e| fail(&format!("tokio: {e}")));
        rt.block_on(async {
            let api: Api<Pod> = Api::namespaced(client(&lab).await, "default");
            // Warm-up: the image is pulled once, for both.
            start_pods(&api, &["warm".to_string()], &image).await;
            delete_pods(&api).await;
            let out = podman(&["pull", "--tls-verify=false", &image]);
            if !out.status.success() {
                fail(&format!("podman pull: {}", String::from_utf8_lossy(&out.stderr)));
            }
            let mut one_w: Vec<Started> = Vec::new();
            let mut one_p = Vec::new();
            for i in 0..runs {
                // Interleaved, so background load hits both alike.
                let names = vec![format!("one-{i}")];
                one_w.extend(start_pods(&api, &names, &image).await);
                delete_pods(&api).await;
                one_p.extend(podman_start(&names, &image));
                podman_cleanup(&names);
            }
            let mut many_w: Vec<Started> = Vec::new();
            let mut many_p = Vec::new();
            let (mut kubelet_cpu, mut children_cpu, mut batch_wall) = (0.0, 0.0, Duration::ZERO);
            for r in 0..batch_rounds {
                let names: Vec<String> = (0..batch).map(|i| format!("b{r}-{i}")).collect();
                let (cpu0, child0, t0) = (cpu_seconds(kubelet_pid), children_cpu_seconds(kubelet_pid), Instant::now());
                many_w.extend(start_pods(&api, &names, &image).await);
                kubelet_cpu += cpu_seconds(kubelet_pid) - cpu0;
                children_cpu += children_cpu_seconds(kubelet_pid) - child0;
                batch_wall += t0.elapsed();
                delete_pods(&api).await;
                many_p.extend(podman_start(&names, &image));
                podman_cleanup(&names);
            }

            // Idle pods: the kubelet's own footprint.
            let names: Vec<String> = (0..idle).map(|i| format!("idle-{i}")).collect();
            start_pods(&api, &names, &image).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            let (rss0, cpu0) = (rss_mib(kubelet_pid).0, cpu_seconds(kubelet_pid));
            let t0 = Instant::now();
            tokio::time::sleep(Duration::from_secs(idle_secs as u64)).await;
            let (rss1, cpu1) = (rss_mib(kubelet_pid).0, cpu_seconds(kubelet_pid));
            let (anon, file, threads) = rss_parts(kubelet_pid);
            let socks = sockets(kubelet_pid);
            let cpu_pct = (cpu1 - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
            delete_pods(&api).await;

            let mut md = String::new();
            let running = |v: &[Started]| v.iter().map(|s| s.running).collect::<Vec<_>>();
            let (w1, p1) = (samples("windlass (API → scheduler → kubelet)", &running(&one_w)), samples("podman pod create + run -d", &one_p));
            md.push_str(&format!("### One pod at a time ({runs} runs)\n\n"));
            md.push_str(&markdown_table(&[&w1, &p1], &p1));
            md.push_str(&format!("\np99: windlass {:.0} ms, podman {:.0} ms\n", w1.quantile(0.99), p1.quantile(0.99)));
            let (wb, pb) = (samples("windlass (API → scheduler → kubelet)", &running(&many_w)), samples("podman pod create + run -d", &many_p));
            md.push_str(&format!("\n### {batch} pods at once ({batch_rounds} rounds, per-pod latency)\n\n"));
            md.push_str(&markdown_table(&[&wb, &pb], &pb));
            md.push_str(&format!("\np99: windlass {:.0} ms, podman {:.0} ms\n", wb.quantile(0.99), pb.quantile(0.99)));
            // Where a batch pod's time went: create → bound (API server + scheduler) and bound → running (kubelet,
            // runtime, CNI, status patch), and what the kubelet and the processes it waited for cost in CPU.
            let bound = samples("bound", &many_w.iter().map(|s| s.bound).collect::<Vec<_>>());
            let on_node = samples("on node", &many_w.iter().map(|s| s.running.saturating_sub(s.bound)).collect::<Vec<_>>());
            md.push_str(&format!(
                "\nBreakdown: create → bound median {:.0} ms (p99 {:.0}); bound → running median {:.0} ms (p99 {:.0}). \
                 Kubelet CPU {:.2} s + its waited-for children (CNI plugins, runtime) {:.2} s over {:.2} s of batches.\n",
                bound.median(), bound.quantile(0.99), on_node.median(), on_node.quantile(0.99),
                kubelet_cpu, children_cpu, batch_wall.as_secs_f64()
            ));
            md.push_str(&format!(
                "\n### The kubelet with {idle} idle pods\n\nRSS {rss1:.1} MiB (anonymous {anon:.1} MiB, file-backed {file:.1} MiB; {threads} threads, {socks} sockets; before the idle window {rss0:.1} MiB; with no pods at start {rss_empty:.1} MiB, anonymous {anon_empty:.1} MiB); CPU {cpu_pct:.2}% of one core over {idle_secs} s.\n"
            ));
            md
        })
    })
    .unwrap_or_else(|e| fail(&format!("lab netns: {e}")));
    if let Some(path) = std::env::var_os("BENCH_KUBELET_LOG") {
        // The kubelet's log (its debug "sync timings" lines give each pod's phases) before the lab is removed.
        if let Err(e) = std::fs::write(&path, lab.kubelet_log()) {
            eprintln!(
                "bench-kubelet: {}: {e}",
                std::path::Path::new(&path).display()
            );
        }
    }
    println!("{report}");
}
