//! Same-run benchmark of `windlass-cni` against the reference plugins (issue 7).
//!
//! 1. CNI ADD+DEL latency for one pod on one lab node: windlass-cni versus the reference `bridge` (+`host-local`,
//!    and + `loopback` for the `lo` windlass-cni also brings up), each with and without masquerade, interleaved
//!    round by round (the order rotates every round) in the same node namespace. The plugin is executed directly
//!    from a thread inside the node namespace, as a runtime would, so no `ip netns exec` cost is measured.
//! 2. TCP throughput between two lab nodes: pod to pod across nodes in `host-gw` and `vxlan` mode versus node to
//!    node on the same lab links, with a sender and a receiver thread inside the namespaces (no extra tools).
//!
//! Usage (root): `cargo run --release -p windlass-tests --bin bench-cni -- [RUNS] [OUT.md]`

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use windlass_cni::{Mode, NodeNet, NodeRoutes};
use windlass_tests::bench::{markdown_table, Samples};
use windlass_tests::cni::{windlass_conf, CniCall};
use windlass_tests::lab::{in_netns, Lab, LabNode};
use windlass_tests::netns::NetnsGuard;

const REFERENCE_DIR: &str = "/usr/lib/cni";
const THROUGHPUT_SECS: u64 = 3;
const THROUGHPUT_ROUNDS: usize = 3;

fn fail(msg: &str) -> ! {
    eprintln!("bench-cni: {msg}");
    std::process::exit(1)
}

/// One plugin invocation sequence to time.
struct Variant {
    name: String,
    /// (plugin, config, ifname) run in order for ADD, in reverse for DEL.
    steps: Vec<(PathBuf, String, &'static str)>,
}

/// Runs one plugin inside the calling thread's network namespace (the thread is already in the node's).
fn exec_plugin(plugin: &Path, command: &str, id: &str, netns: &Path, ifname: &str, conf: &str) {
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", REFERENCE_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", plugin.display())));
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(conf.as_bytes());
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| fail(&format!("wait for {}: {e}", plugin.display())));
    if !out.status.success() {
        fail(&format!(
            "{} {command} failed: {}{}",
            plugin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
}

fn latency(runs: usize) -> String {
    let lab = Lab::new(1).unwrap_or_else(|e| fail(&format!("lab: {e}")));
    let node = &lab.nodes[0];
    let windlass = windlass_tests::workspace_binary("windlass-cni");
    let bridge = PathBuf::from(REFERENCE_DIR).join("bridge");
    let loopback = PathBuf::from(REFERENCE_DIR).join("loopback");
    let ref_dir = tempfile::tempdir().unwrap_or_else(|e| fail(&format!("tempdir: {e}")));
    let reference = |masq: bool, bridge_name: &str, subnet: &str| {
        json!({
            "cniVersion": "1.0.0", "name": format!("ref-{bridge_name}"), "type": "bridge", "bridge": bridge_name,
            "isGateway": true, "ipMasq": masq,
            "ipam": {"type": "host-local", "subnet": subnet, "dataDir": ref_dir.path(),
                     "routes": [{"dst": "0.0.0.0/0"}]},
        })
        .to_string()
    };
    let lo = r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#.to_string();
    let ours = |masq: bool, bridge_name: &str, subnet: &str| {
        windlass_conf(
            &format!("w-{bridge_name}"),
            subnet,
            node.data_dir.path(),
            json!({"bridge": bridge_name, "ipMasq": masq}),
        )
    };
    let variants = [
        Variant {
            name: "windlass-cni (ipMasq)".into(),
            steps: vec![(windlass.clone(), ours(true, "wl0", "10.244.1.0/24"), "eth0")],
        },
        Variant {
            name: "windlass-cni (no masq)".into(),
            steps: vec![(
                windlass.clone(),
                ours(false, "wl1", "10.244.2.0/24"),
                "eth0",
            )],
        },
        Variant {
            name: "bridge+host-local (ipMasq)".into(),
            steps: vec![(
                bridge.clone(),
                reference(true, "ref0", "10.88.0.0/24"),
                "eth0",
            )],
        },
        Variant {
            name: "bridge+host-local (no masq)".into(),
            steps: vec![(
                bridge.clone(),
                reference(false, "ref1", "10.88.1.0/24"),
                "eth0",
            )],
        },
        Variant {
            name: "bridge+host-local+loopback (no masq)".into(),
            steps: vec![
                (
                    bridge.clone(),
                    reference(false, "ref2", "10.88.2.0/24"),
                    "eth0",
                ),
                (loopback.clone(), lo.clone(), "lo"),
            ],
        },
    ];
    let mut samples: Vec<Samples> = variants.iter().map(|v| Samples::new(&v.name)).collect();
    let node_path = node.netns.path();
    let warmup = 3;
    for round in 0..warmup + runs {
        for k in 0..variants.len() {
            let idx = (round + k) % variants.len();
            let v = &variants[idx];
            let pod = lab
                .pod_netns()
                .unwrap_or_else(|e| fail(&format!("pod netns: {e}")));
            let pod_path = pod.path();
            let id = format!("bench{round}x{idx}");
            let took = in_netns(&node_path, || {
                let start = Instant::now();
                for (plugin, conf, ifname) in &v.steps {
                    exec_plugin(plugin, "ADD", &id, &pod_path, ifname, conf);
                }
                for (plugin, conf, ifname) in v.steps.iter().rev() {
                    exec_plugin(plugin, "DEL", &id, &pod_path, ifname, conf);
                }
                start.elapsed()
            })
            .unwrap_or_else(|e| fail(&format!("enter node netns: {e}")));
            if round >= warmup {
                samples[idx].push(took);
            }
        }
    }
    let baseline = samples
        .iter()
        .find(|s| s.name == "bridge+host-local (no masq)")
        .cloned()
        .unwrap_or_default();
    let rows: Vec<&Samples> = samples.iter().collect();
    markdown_table(&rows, &baseline)
}

/// Bytes per second from a sender thread in `from` to a receiver thread in `to` listening on `to_ip`.
fn tcp_throughput(from: &Path, to: &Path, to_ip: Ipv4Addr) -> f64 {
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            in_netns(to, || {
                let listener =
                    TcpListener::bind((to_ip, 0)).unwrap_or_else(|e| fail(&format!("bind: {e}")));
                let addr = listener
                    .local_addr()
                    .unwrap_or_else(|e| fail(&format!("addr: {e}")));
                let _ = tx.send(addr);
                let (mut conn, _) = listener
                    .accept()
                    .unwrap_or_else(|e| fail(&format!("accept: {e}")));
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0u64;
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                total
            })
            .unwrap_or_else(|e| fail(&format!("receiver netns: {e}")))
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| fail(&format!("receiver did not start: {e}")));
        let elapsed = in_netns(from, || {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| fail(&format!("connect {addr}: {e}")));
            let buf = vec![0x5au8; 1 << 16];
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(THROUGHPUT_SECS) {
                if conn.write_all(&buf).is_err() {
                    break;
                }
            }
            drop(conn);
            start.elapsed()
        })
        .unwrap_or_else(|e| fail(&format!("sender netns: {e}")));
        let bytes = receiver
            .join()
            .unwrap_or_else(|_| fail("receiver panicked"));
        bytes as f64 / elapsed.as_secs_f64()
    })
}

fn pod_on(lab: &Lab, node: &LabNode, mode: Mode) -> (NetnsGuard, Ipv4Addr) {
    let pod = lab
        .pod_netns()
        .unwrap_or_else(|e| fail(&format!("pod: {e}")));
    let path = pod.path();
    let mtu = if mode == Mode::Vxlan {
        json!(1450)
    } else {
        json!(1500)
    };
    let conf = windlass_conf(
        "windlass",
        &node.pod_cidr,
        node.data_dir.path(),
        json!({"mtu": mtu}),
    );
    let out = CniCall::new(
        windlass_tests::workspace_binary("windlass-cni"),
        &node.netns,
        "ADD",
        &format!("tp-{}", node.name),
    )
    .netns(&path)
    .run(&conf)
    .ok()
    .json();
    let ip = out["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| fail("no pod address"));
    (pod, ip)
}

fn throughput() -> String {
    let mut out =
        String::from("| path | rounds | median (Gbit/s) | min–max (Gbit/s) |\n|---|---|---|---|\n");
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    for mode in [Mode::HostGw, Mode::Vxlan] {
        let lab = Lab::new(2).unwrap_or_else(|e| fail(&format!("lab: {e}")));
        let nodes: Vec<NodeNet> = lab
            .nodes
            .iter()
            .map(|n| NodeNet::new(&n.name, n.pod_cidr.parse().unwrap_or_default(), n.ip))
            .collect();
        for n in &lab.nodes {
            let routes = NodeRoutes::new(mode, &n.name);
            in_netns(&n.netns.path(), || routes.reconcile(&nodes))
                .unwrap_or_else(|e| fail(&format!("netns: {e}")))
                .unwrap_or_else(|e| fail(&format!("reconcile: {e}")));
        }
        let (p0, _) = pod_on(&lab, &lab.nodes[0], mode);
        let (p1, ip1) = pod_on(&lab, &lab.nodes[1], mode);
        let mut pod_rates = Vec::new();
        let mut node_rates = Vec::new();
        for _ in 0..THROUGHPUT_ROUNDS {
            pod_rates.push(tcp_throughput(&p0.path(), &p1.path(), ip1));
            node_rates.push(tcp_throughput(
                &lab.nodes[0].netns.path(),
                &lab.nodes[1].netns.path(),
                lab.nodes[1].ip,
            ));
        }
        rows.push((format!("pod→pod across nodes ({mode:?})"), pod_rates));
        rows.push((format!("node→node, same links ({mode:?} lab)"), node_rates));
    }
    for (name, mut rates) in rows {
        rates.sort_by(f64::total_cmp);
        let gbit = |b: f64| b * 8.0 / 1e9;
        out.push_str(&format!(
            "| {name} | {} | {:.2} | {:.2}–{:.2} |\n",
            rates.len(),
            gbit(rates[rates.len() / 2]),
            gbit(rates[0]),
            gbit(rates[rates.len() - 1])
        ));
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(40);
    let out_path = args.get(2).map(PathBuf::from);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        fail("needs root (network namespaces)");
    }
    let lat = latency(runs);
    let tp = throughput();
    let report = format!(
        "### CNI ADD+DEL latency, one pod, same node namespace, interleaved ({runs} runs each after 3 warm-up rounds)\n\n\
         {lat}\n### TCP throughput between two lab nodes ({THROUGHPUT_ROUNDS} × {THROUGHPUT_SECS} s each, \
         interleaved pod/node)\n\n{tp}"
    );
    println!("{report}");
    if let Some(path) = out_path {
        std::fs::write(&path, &report)
            .unwrap_or_else(|e| fail(&format!("write {}: {e}", path.display())));
    }
}
