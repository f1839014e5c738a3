//! Same-run benchmark of the proxy's nftables sync against upstream kube-proxy's rulesets (issue 8).
//!
//! Everything runs inside a network namespace this program creates (`ip netns add`); nothing touches the root
//! namespace. For 1k/5k/10k Services × 5 endpoints it measures: windlass-proxy's full sync (compute + render + one
//! `nft -f` transaction), loading the equivalent upstream nftables-mode ruleset (per-Service and per-endpoint
//! chains) with `nft -f`, and the upstream iptables-mode ruleset with `iptables-restore`; then, with 10k Services
//! loaded, the time from one endpoint change to rules applied (windlass incremental sync). Prints Markdown.
//!
//! Usage: `bench-proxy [RUNS] [--skip-upstream-10k]` (as root).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use windlass_proxy::{
    Conntrack, Endpoint, EndpointPort, EndpointSliceInfo, Metrics, Model, ModelEvent, Nft,
    Protocol, Proxier, RulesetConfig, Service, ServiceName, ServicePort, SliceKey, SyncKind,
    TrafficPolicy,
};
use windlass_tests::bench::{markdown_table, Samples};
use windlass_tests::netns::NetnsGuard;
use windlass_tests::unique_name;

const ENDPOINTS: usize = 5;

fn svc_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 10 + i as u32)
}

fn ep_ip(i: usize, e: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + (i * ENDPOINTS + e) as u32 + 2)
}

fn model(n: usize, ready_mask: impl Fn(usize, usize) -> bool) -> Model {
    let mut m = Model::new();
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..n {
        let name = ServiceName::new("bench", &format!("svc-{i}"));
        services.push(Service {
            name: name.clone(),
            cluster_ips: vec![svc_ip(i)],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
            }],
            affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_ips: vec![],
            health_check_node_port: None,
            external_name: None,
        });
        slices.push((
            SliceKey {
                namespace: "bench".into(),
                name: format!("svc-{i}-abc"),
            },
            EndpointSliceInfo {
                service: name,
                ports: vec![EndpointPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8080,
                }],
                endpoints: (0..ENDPOINTS)
                    .map(|e| Endpoint {
                        address: ep_ip(i, e),
                        ready: ready_mask(i, e),
                        serving: true,
                        terminating: false,
                        // Five endpoints on five nodes: one of each Service's endpoints is on this node (n0).
                        node_name: Some(format!("n{e}")),
                    })
                    .collect(),
            },
        ));
    }
    m.apply(ModelEvent::Replace { services, slices });
    m
}

/// Upstream kube-proxy nftables mode: service-ips vmap → per-Service chain → numgen vmap → per-endpoint chain.
fn upstream_nft(n: usize) -> String {
    let mut s = String::from(
        "add table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {\n",
    );
    s.push_str(" map service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n");
    s.push_str(" chain mark-for-masquerade {\n  meta mark set meta mark | 0x4000\n }\n");
    s.push_str(" chain services {\n  ip daddr . meta l4proto . th dport vmap @service-ips\n }\n");
    s.push_str(" chain nat-prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n  jump services\n }\n");
    for i in 0..n {
        let mut vm = Vec::new();
        for e in 0..ENDPOINTS {
            let _ = write!(
                s,
                " chain endpoint-{i}-{e} {{\n  ip saddr {ip} jump mark-for-masquerade\n  meta l4proto tcp dnat to {ip}:8080\n }}\n",
                ip = ep_ip(i, e)
            );
            vm.push(format!("{e} : goto endpoint-{i}-{e}"));
        }
        let _ = write!(
            s,
            " chain service-{i} {{\n  ip daddr {ip} tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade\n  numgen random mod {ENDPOINTS} vmap {{ {} }}\n }}\n",
            vm.join(", "),
            ip = svc_ip(i)
        );
    }
    s.push_str("}\n");
    let elems: Vec<String> = (0..n)
        .map(|i| format!("{} . tcp . 80 : goto service-{i}", svc_ip(i)))
        .collect();
    let _ = writeln!(
        s,
        "add element ip kube-proxy service-ips {{ {} }}",
        elems.join(", ")
    );
    s
}

/// The transaction upstream's nftables mode writes when endpoint 3 of Service `i` turns unready (`ready` false:
/// the service chain is rewritten with 4 endpoints and the endpoint chain deleted) or ready again (the endpoint
/// chain is created and the service chain rewritten with 5). Ref: kube-proxy `pkg/proxy/nftables/proxier.go`
/// (service chains flushed and refilled, stale endpoint chains deleted).
fn upstream_change(i: usize, ready: bool) -> String {
    let mut s = String::new();
    let ep = format!("endpoint-{i}-3");
    if ready {
        let ip = ep_ip(i, 3);
        let _ = writeln!(s, "add chain ip kube-proxy {ep}");
        let _ = writeln!(
            s,
            "add rule ip kube-proxy {ep} ip saddr {ip} jump mark-for-masquerade"
        );
        let _ = writeln!(
            s,
            "add rule ip kube-proxy {ep} meta l4proto tcp dnat to {ip}:8080"
        );
    }
    let eps: Vec<usize> = (0..ENDPOINTS).filter(|e| *e != 3 || ready).collect();
    let vm: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(k, e)| format!("{k} : goto endpoint-{i}-{e}"))
        .collect();
    let _ = writeln!(s, "flush chain ip kube-proxy service-{i}");
    let _ = writeln!(
        s,
        "add rule ip kube-proxy service-{i} ip daddr {} tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
        svc_ip(i)
    );
    let _ = writeln!(
        s,
        "add rule ip kube-proxy service-{i} numgen random mod {} vmap {{ {} }}",
        eps.len(),
        vm.join(", ")
    );
    if !ready {
        let _ = writeln!(s, "delete chain ip kube-proxy {ep}");
    }
    s
}

/// Upstream kube-proxy iptables mode (nat table): KUBE-SERVICES → KUBE-SVC-* (statistic random) → KUBE-SEP-*.
fn upstream_iptables(n: usize) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    let mut rules = String::from("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    for i in 0..n {
        let _ = writeln!(chains, ":KUBE-SVC-{i:08X} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-{i:08X}",
            svc_ip(i)
        );
        let _ = writeln!(
            rules,
            "-A KUBE-SVC-{i:08X} ! -s 10.244.0.0/16 -d {}/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ",
            svc_ip(i)
        );
        for e in 0..ENDPOINTS {
            let _ = writeln!(chains, ":KUBE-SEP-{i:08X}{e} - [0:0]");
            let left = ENDPOINTS - e;
            if left > 1 {
                let _ = writeln!(
                    rules,
                    "-A KUBE-SVC-{i:08X} -m statistic --mode random --probability {:.11} -j KUBE-SEP-{i:08X}{e}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(rules, "-A KUBE-SVC-{i:08X} -j KUBE-SEP-{i:08X}{e}");
            }
            let _ = writeln!(
                rules,
                "-A KUBE-SEP-{i:08X}{e} -s {ip}/32 -j KUBE-MARK-MASQ\n-A KUBE-SEP-{i:08X}{e} -p tcp -m tcp -j DNAT --to-destination {ip}:8080",
                ip = ep_ip(i, e)
            );
        }
    }
    format!("{chains}{rules}COMMIT\n")
}

fn run_stdin(ns: &NetnsGuard, argv: &[&str], input: &str) -> Duration {
    let t = Instant::now();
    let _ = ns; // the whole process has entered the namespace (see main)
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_string();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().expect("wait");
    let _ = w.join();
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let skip_10k_upstream = std::env::args().any(|a| a == "--skip-upstream-10k");
    let only_ours = std::env::args().any(|a| a == "--only-ours");
    if let Some(dir) = std::env::args().skip_while(|a| a != "--dump").nth(1) {
        // Writes the 10k-Service rebuild script, for inspecting nft by hand.
        let config = RulesetConfig {
            node_name: "n0".into(),
            cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
            nodeport_addresses: vec![],
        };
        let a = windlass_proxy::Ruleset::compute(&model(10_000, |_, _| true), &config);
        std::fs::write(format!("{dir}/rebuild.nft"), a.render_rebuild(&config)).expect("write");
        return;
    }
    let ns = NetnsGuard::new(&unique_name("pxb")).expect("bench netns");
    // Enter the namespace for good (this process is single-threaded here), so every tool runs directly, as the
    // proxy does on a node, without `ip netns exec`'s set-up cost in the measurements.
    let f = std::fs::File::open(ns.path()).expect("open netns");
    // SAFETY: setns with a valid namespace fd; only this process is affected.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    let nft = Nft::default();
    let config = RulesetConfig {
        node_name: "n0".into(),
        cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
        nodeport_addresses: vec![],
    };
    let mut out = String::new();
    let mut all: BTreeMap<usize, Vec<Samples>> = BTreeMap::new();
    let mut up_change: Option<Samples> = None;
    for n in [1000, 5000, 10_000] {
        let m = model(n, |_, _| true);
        let mut ours = Samples::new(&format!("windlass full sync, {n} svc"));
        for _ in 0..runs {
            let mut p = Proxier::new(
                config.clone(),
                nft.clone(),
                Conntrack::default(),
                Arc::new(Metrics::new()),
            );
            let mut m = m.clone();
            let r = p.sync(&mut m, SyncKind::Rebuild).expect("windlass sync");
            ours.push(r.took);
        }
        let _ = run_stdin(&ns, &["nft", "-f", "-"], &windlass_proxy::render_cleanup());
        let mut cpu = Samples::new(&format!("windlass compute + render only (no nft), {n} svc"));
        for _ in 0..runs {
            let t = Instant::now();
            let rs = windlass_proxy::Ruleset::compute(&m, &config);
            let text = rs.render_rebuild(&config);
            std::hint::black_box(text);
            cpu.push(t.elapsed());
        }
        if only_ours {
            eprintln!(
                "{n}: ours {:.0} ms, of which compute+render {:.0} ms",
                ours.median(),
                cpu.median()
            );
            all.insert(n, vec![ours, cpu]);
            continue;
        }
        let up_runs = if n >= 5000 { 1 } else { runs };
        let mut up_nft = Samples::new(&format!("upstream nftables mode `nft -f`, {n} svc"));
        if !(n == 10_000 && skip_10k_upstream) {
            let text = upstream_nft(n);
            for _ in 0..up_runs {
                up_nft.push(run_stdin(&ns, &["nft", "-f", "-"], &text));
            }
            if n == 10_000 {
                // The same endpoint flip as windlass's, in upstream's shape, on its loaded 10k ruleset.
                let mut c = Samples::new(
                    "upstream nftables mode one endpoint change, 10k svc (`nft -f` of the transaction)",
                );
                for r in 0..(runs * 10).max(20) {
                    c.push(run_stdin(
                        &ns,
                        &["nft", "-f", "-"],
                        &upstream_change(4242, r % 2 == 1),
                    ));
                }
                up_change = Some(c);
            }
            let _ = run_stdin(
                &ns,
                &["nft", "-f", "-"],
                "add table ip kube-proxy\ndelete table ip kube-proxy\n",
            );
        }
        let mut up_ipt = Samples::new(&format!(
            "upstream iptables mode `iptables-restore`, {n} svc"
        ));
        let text = upstream_iptables(n);
        for _ in 0..up_runs {
            up_ipt.push(run_stdin(&ns, &["iptables-restore", "-w"], &text));
        }
        let _ = run_stdin(&ns, &["iptables-restore", "-w"], "*nat\nCOMMIT\n");
        let _ = run_stdin(&ns, &["nft", "-f", "-"], "flush ruleset\n");
        eprintln!(
            "{n}: ours {:.0} ms, upstream nft {:.0} ms, iptables {:.0} ms",
            ours.median(),
            up_nft.median(),
            up_ipt.median()
        );
        all.insert(n, vec![ours, cpu, up_nft, up_ipt]);
    }
    for (n, rows) in &all {
        let _ = writeln!(
            out,
            "\n### Full sync, {n} Services × {ENDPOINTS} endpoints\n"
        );
        let refs: Vec<&Samples> = rows.iter().filter(|s| !s.millis.is_empty()).collect();
        out.push_str(&markdown_table(&refs, &rows[0]));
    }

    // One endpoint change with 10k Services loaded: flip one endpoint of one Service unready and back, applied with
    // the nft tool (a process per change) and with libnftables in this process.
    let n = 10_000;
    let changes = (runs * 10).max(20);
    let lib = Nft::default()
        .with_library()
        .expect("libnftables (Debian libnftables1)");
    let (inc, bytes) = one_change(
        n,
        &config,
        &nft,
        changes,
        "windlass one endpoint change, 10k svc, nft tool (event → rules applied)",
    );
    let (inc_lib, _) = one_change(
        n,
        &config,
        &lib,
        changes,
        "windlass one endpoint change, 10k svc, libnftables (event → rules applied)",
    );
    let mut m = model(n, |_, _| true);
    let mut p = Proxier::new(
        config.clone(),
        lib.clone(),
        Conntrack::default(),
        Arc::new(Metrics::new()),
    );
    p.sync(&mut m, SyncKind::Rebuild).expect("initial sync");
    let base = &mut m;
    let mut resync = Samples::new("windlass periodic resync (in place), 10k svc");
    for _ in 0..runs {
        resync.push(p.sync(base, SyncKind::Resync).expect("resync").took);
    }
    let _ = writeln!(
        out,
        "\n### With {n} Services loaded (script of one change: {bytes} bytes)\n"
    );
    let mut rows = vec![&inc, &inc_lib, &resync];
    if let Some(c) = &up_change {
        rows.push(c);
    }
    out.push_str(&markdown_table(&rows, &inc_lib));
    let _ = run_stdin(&ns, &["nft", "-f", "-"], &windlass_proxy::render_cleanup());
    if !only_ours || std::env::args().any(|a| a == "--latency") {
        out.push_str(&connect_latency(&config, &nft, runs.max(3) * 100));
    }
    println!("{out}");
}

/// Loads `n` Services, then applies `count` single-endpoint changes (endpoint 3 of Service 4242 flipping between
/// ready and unready, as EndpointSlice updates would), each timed from `Model::apply` to the transaction applied.
fn one_change(
    n: usize,
    config: &RulesetConfig,
    nft: &Nft,
    count: usize,
    label: &str,
) -> (Samples, usize) {
    let mut m = model(n, |_, _| true);
    let mut p = Proxier::new(
        config.clone(),
        nft.clone(),
        Conntrack::default(),
        Arc::new(Metrics::new()),
    );
    p.sync(&mut m, SyncKind::Rebuild).expect("initial sync");
    let slice = 4242usize;
    let key = SliceKey {
        namespace: "bench".into(),
        name: format!("svc-{slice}-abc"),
    };
    let mut inc = Samples::new(label);
    let mut bytes = 0;
    for r in 0..count {
        let ready = r % 2 == 1;
        let info = EndpointSliceInfo {
            service: ServiceName::new("bench", &format!("svc-{slice}")),
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints: (0..ENDPOINTS)
                .map(|e| Endpoint {
                    address: ep_ip(slice, e),
                    ready: e != 3 || ready,
                    serving: true,
                    terminating: false,
                    node_name: Some(format!("n{e}")),
                })
                .collect(),
        };
        let t = Instant::now();
        m.apply(ModelEvent::SliceUpsert(key.clone(), info));
        let rep = p
            .sync(&mut m, SyncKind::Incremental)
            .expect("incremental sync");
        inc.push(t.elapsed());
        bytes = rep.script_bytes;
    }
    (inc, bytes)
}

/// Connect latency through a ClusterIP with 10 vs 10,000 Services programmed: a pod namespace (veth from this one)
/// runs a TCP listener; this namespace connects to the Service `count` times per size, and directly to the pod.
fn connect_latency(config: &RulesetConfig, nft: &Nft, count: usize) -> String {
    let pod = NetnsGuard::new(&unique_name("pxl")).expect("pod netns");
    let setup = [
        format!(
            "ip link add pv0 type veth peer name eth0 netns {}",
            pod.name()
        ),
        "ip addr add 10.250.0.1/24 dev pv0".to_string(),
        "ip link set pv0 up".to_string(),
        // Connects to a ClusterIP need a route before the OUTPUT hook rewrites the destination.
        "ip route add 10.96.0.0/12 dev pv0".to_string(),
    ];
    for cmd in setup {
        let st = Command::new("sh").args(["-c", &cmd]).status().expect("sh");
        assert!(st.success(), "{cmd}");
    }
    pod.exec(&[
        "sh",
        "-c",
        "ip addr add 10.250.0.2/24 dev eth0 && ip link set eth0 up",
    ])
    .expect("pod address");
    let path = pod.path();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open pod netns");
        // SAFETY: setns on a valid namespace fd; affects only this listener thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        let l = std::net::TcpListener::bind("0.0.0.0:8080").expect("listen");
        for c in l.incoming() {
            drop(c);
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let target = ServiceName::new("bench", "target");
    let mut out = String::from(
        "\n### Connect latency through a ClusterIP (node-local client, connect() only)\n\n| case | connects | median (µs) | p10–p90 (µs) |\n|---|---|---|---|\n",
    );
    let mut measure = |name: &str, addr: &str| {
        let mut v = Vec::with_capacity(count);
        for _ in 0..count {
            let t = Instant::now();
            let c = std::net::TcpStream::connect(addr).expect("connect");
            v.push(t.elapsed().as_secs_f64() * 1e6);
            drop(c);
        }
        v.sort_by(f64::total_cmp);
        let q = |x: f64| v[((v.len() - 1) as f64 * x).round() as usize];
        let _ = writeln!(
            out,
            "| {name} | {count} | {:.0} | {:.0}–{:.0} |",
            q(0.5),
            q(0.1),
            q(0.9)
        );
    };
    measure("direct to the pod (no Service rules)", "10.250.0.2:8080");
    for n in [10, 10_000] {
        let mut m = model(n, |_, _| true);
        m.apply(ModelEvent::ServiceUpsert(Service {
            name: target.clone(),
            cluster_ips: vec![Ipv4Addr::new(10, 111, 255, 250)],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
            }],
            affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_ips: vec![],
            health_check_node_port: None,
            external_name: None,
        }));
        m.apply(ModelEvent::SliceUpsert(
            SliceKey {
                namespace: "bench".into(),
                name: "target-abc".into(),
            },
            EndpointSliceInfo {
                service: target.clone(),
                ports: vec![EndpointPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8080,
                }],
                endpoints: vec![Endpoint {
                    address: Ipv4Addr::new(10, 250, 0, 2),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: Some("n0".into()),
                }],
            },
        ));
        let mut p = Proxier::new(
            config.clone(),
            nft.clone(),
            Conntrack::default(),
            Arc::new(Metrics::new()),
        );
        p.sync(&mut m, SyncKind::Rebuild).expect("sync");
        measure(
            &format!("via ClusterIP, {n} Services programmed"),
            "10.111.255.250:80",
        );
    }
    let _ = nft.apply(&windlass_proxy::render_cleanup());
    out
}
