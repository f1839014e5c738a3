//! Cluster DNS end to end: the proxy's DNS server runs inside a "node" network namespace on 10.96.0.10:53 (an
//! address on the node's `lo`), a "pod" namespace reaches it over a veth pair, and a fake upstream resolver on
//! the node's 127.0.0.1:53 answers names outside the cluster domain. Nothing leaves the test's namespaces.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use windlass_proxy::dns::{self, DnsConfig, DnsModel};
use windlass_proxy::{
    Endpoint, EndpointPort, EndpointSliceInfo, ModelEvent, Protocol, Service, ServiceName,
    ServicePort, SliceKey, TrafficPolicy,
};
use windlass_tests::netns::NetnsGuard;
use windlass_tests::{require_privileged, unique_name, wait_for};

const DNS_IP: &str = "10.96.0.10";
/// The address the fake upstream gives `outside.example.`.
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 55);

/// Enters `ns` on the calling thread (a helper thread only: sockets made afterwards live in `ns`).
fn enter(ns: &Path) {
    let f = File::open(ns).expect("open netns");
    // SAFETY: setns on a valid namespace fd changes only this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

fn service(ns: &str, name: &str, ip: Option<Ipv4Addr>, ports: &[(&str, u16)]) -> Service {
    Service {
        name: ServiceName::new(ns, name),
        cluster_ips: ip.into_iter().collect(),
        ports: ports
            .iter()
            .map(|(n, p)| ServicePort {
                name: n.to_string(),
                protocol: Protocol::Tcp,
                port: *p,
                node_port: None,
            })
            .collect(),
        affinity_timeout: None,
        external_traffic_policy: TrafficPolicy::Cluster,
        internal_traffic_policy: TrafficPolicy::Cluster,
        external_ips: vec![],
        health_check_node_port: None,
        external_name: None,
    }
}

fn slice(
    ns: &str,
    svc: &str,
    port: (&str, u16),
    eps: &[(Ipv4Addr, bool)],
) -> (SliceKey, EndpointSliceInfo) {
    (
        SliceKey {
            namespace: ns.into(),
            name: format!("{svc}-1"),
        },
        EndpointSliceInfo {
            service: ServiceName::new(ns, svc),
            ports: vec![EndpointPort {
                name: port.0.into(),
                protocol: Protocol::Tcp,
                port: port.1,
            }],
            endpoints: eps
                .iter()
                .map(|(ip, ready)| Endpoint {
                    address: *ip,
                    ready: *ready,
                    serving: *ready,
                    terminating: false,
                    node_name: None,
                })
                .collect(),
        },
    )
}

/// Ready pods of shop/big, a headless Service whose A answer does not fit 512 bytes.
const BIG: u8 = 60;

/// shop/web (ClusterIP 10.96.0.20, port http 80), shop/db (headless: two ready pods, one not ready) and shop/big
/// (headless, [`BIG`] ready pods).
fn static_model() -> DnsModel {
    let mut m = DnsModel::new();
    let big: Vec<(Ipv4Addr, bool)> = (1..=BIG)
        .map(|i| (Ipv4Addr::new(10, 244, 9, i), true))
        .collect();
    m.apply(&ModelEvent::Replace {
        services: vec![
            service("shop", "big", None, &[("http", 80)]),
            service(
                "shop",
                "web",
                Some(Ipv4Addr::new(10, 96, 0, 20)),
                &[("http", 80)],
            ),
            service("shop", "db", None, &[("pg", 5432)]),
        ],
        slices: vec![
            slice("shop", "big", ("http", 8080), &big),
            slice(
                "shop",
                "web",
                ("http", 8080),
                &[(Ipv4Addr::new(10, 244, 1, 5), true)],
            ),
            slice(
                "shop",
                "db",
                ("pg", 5432),
                &[
                    (Ipv4Addr::new(10, 244, 1, 7), true),
                    (Ipv4Addr::new(10, 244, 2, 8), true),
                    (Ipv4Addr::new(10, 244, 2, 9), false),
                ],
            ),
        ],
    });
    m
}

/// A minimal upstream resolver: answers A queries for `outside.example.` with [`OUTSIDE_IP`] (TTL 300) and
/// anything else with an empty NOERROR, counting the A queries it saw for that name.
fn fake_upstream_reply(query: &[u8], outside_a_queries: &AtomicU32) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    while i < query.len() && query[i] != 0 {
        let len = query[i] as usize;
        labels.push(String::from_utf8_lossy(query.get(i + 1..i + 1 + len)?).to_lowercase());
        i += 1 + len;
    }
    let qend = i + 5; // root label, QTYPE, QCLASS
    let qtype = u16::from_be_bytes([*query.get(i + 1)?, *query.get(i + 2)?]);
    let hit = labels == ["outside", "example"] && qtype == 1;
    if hit {
        outside_a_queries.fetch_add(1, Ordering::SeqCst);
    }
    let mut r = Vec::new();
    r.extend_from_slice(&query[0..2]);
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(hit), 0, 0, 0, 0]);
    r.extend_from_slice(query.get(12..qend)?);
    if hit {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        r.extend_from_slice(&300u32.to_be_bytes());
        r.extend_from_slice(&[0, 4]);
        r.extend_from_slice(&OUTSIDE_IP.octets());
    }
    Some(r)
}

/// The cluster DNS server and the fake upstream, on a thread inside the node namespace. Stopped on drop.
struct DnsServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    outside_a_queries: Arc<AtomicU32>,
    _dir: tempfile::TempDir,
}

impl DnsServer {
    fn start(node: &NetnsGuard, model: &DnsModel, resolv_conf: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let resolv: PathBuf = dir.path().join("resolv.conf");
        std::fs::write(&resolv, resolv_conf).expect("write resolv.conf");
        let (zone_tx, zone_rx) = dns::zone_channel();
        zone_tx.send_replace(model.snapshot());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let counter = Arc::new(AtomicU32::new(0));
        let count = counter.clone();
        let ns = node.path();
        let config = DnsConfig {
            bind: SocketAddr::new(IpAddr::V4(DNS_IP.parse().expect("ip")), 53),
            cluster_domain: "cluster.local".into(),
            ttl: dns::DEFAULT_TTL,
            upstream_resolv_conf: Some(resolv),
            assign_address: false,
        };
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let upstream = tokio::net::UdpSocket::bind("127.0.0.1:53")
                    .await
                    .expect("bind fake upstream");
                let upstream_task = async move {
                    let mut buf = [0u8; 1500];
                    loop {
                        let Ok((n, from)) = upstream.recv_from(&mut buf).await else {
                            return;
                        };
                        if let Some(r) = fake_upstream_reply(&buf[..n], &count) {
                            let _ = upstream.send_to(&r, from).await;
                        }
                    }
                };
                tokio::select! {
                    r = dns::serve(config, zone_rx) => panic!("DNS server stopped: {r:?}"),
                    _ = upstream_task => {}
                    _ = stop_rx => {}
                }
                drop(zone_tx);
            });
        });
        Self {
            stop: Some(stop_tx),
            thread: Some(thread),
            outside_a_queries: counter,
            _dir: dir,
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A node namespace with 10.96.0.10 on `lo` and a pod namespace (10.88.0.2) routed to it over a veth pair.
struct Lab {
    // Field order is drop order: the server goes before the namespaces.
    server: DnsServer,
    pod: NetnsGuard,
    _node: NetnsGuard,
}

impl Lab {
    fn new() -> Self {
        Self::with_upstream("nameserver 127.0.0.1\n")
    }

    /// A lab whose DNS server forwards to the resolvers named by `resolv_conf` (the fake upstream listens on
    /// 127.0.0.1:53).
    fn with_upstream(resolv_conf: &str) -> Self {
        let node = NetnsGuard::new(&unique_name("dnsn")).expect("node netns");
        let pod = NetnsGuard::new(&unique_name("dnsp")).expect("pod netns");
        let host_if = unique_name("dnv");
        let n = node.name();
        for argv in [
            vec!["ip", "addr", "add", "10.96.0.10/32", "dev", "lo"],
            vec![
                "ip",
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.name(),
            ],
            vec!["ip", "addr", "add", "10.88.0.1/24", "dev", &host_if],
            vec!["ip", "link", "set", &host_if, "up"],
        ] {
            node.exec(&argv).unwrap_or_else(|e| panic!("node {n}: {e}"));
        }
        let pod_setup: [&[&str]; 3] = [
            &["ip", "addr", "add", "10.88.0.2/24", "dev", "eth0"],
            &["ip", "link", "set", "eth0", "up"],
            &["ip", "route", "add", "default", "via", "10.88.0.1"],
        ];
        for argv in pod_setup {
            pod.exec(argv).expect("pod netns setup");
        }
        let server = DnsServer::start(&node, &static_model(), resolv_conf);
        let lab = Self {
            server,
            pod,
            _node: node,
        };
        wait_for("the DNS server to answer", Duration::from_secs(10), || {
            lab.nslookup("web.shop.svc.cluster.local")
                .contains("10.96.0.20")
                .then_some(())
        });
        lab
    }

    /// busybox `nslookup NAME 10.96.0.10` from the pod; stdout and stderr.
    fn nslookup(&self, name: &str) -> String {
        let out = self
            .pod
            .command("busybox")
            .args(["nslookup", "-type=a", name, DNS_IP])
            .output()
            .expect("run busybox nslookup");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Runs `f` on a thread inside the pod namespace with a current-thread runtime.
    fn in_pod<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
    ) -> T {
        let ns = self.pod.path();
        std::thread::spawn(move || {
            enter(&ns);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f())
        })
        .join()
        .expect("pod thread")
    }
}

fn addresses(out: &str) -> Vec<String> {
    // busybox prints the server first ("Server: 10.96.0.10", "Address: 10.96.0.10:53"), then the answers.
    out.lines()
        .skip_while(|l| !l.starts_with("Name:"))
        .filter_map(|l| l.strip_prefix("Address:").map(|a| a.trim().to_string()))
        .collect()
}

#[test]
fn a_pod_resolves_a_service_name_to_its_cluster_ip_with_busybox_nslookup() {
    if !require_privileged(&["ip", "busybox"]) {
        return;
    }
    let lab = Lab::new();
    let out = lab.nslookup("web.shop.svc.cluster.local");
    assert_eq!(addresses(&out), vec!["10.96.0.20"], "{out}");
    // Case does not matter.
    let out = lab.nslookup("WEB.Shop.SVC.cluster.local");
    assert_eq!(addresses(&out), vec!["10.96.0.20"], "{out}");
    assert!(
        out.contains("Name:\tWEB.Shop.SVC.cluster.local"),
        "answer keeps the asked case: {out}"
    );
    // A pod name spells its address.
    let out = lab.nslookup("10-244-7-9.shop.pod.cluster.local");
    assert_eq!(addresses(&out), vec!["10.244.7.9"], "{out}");
}

#[test]
fn a_headless_service_name_returns_every_ready_pod_ip() {
    if !require_privileged(&["ip", "busybox"]) {
        return;
    }
    let lab = Lab::new();
    let out = lab.nslookup("db.shop.svc.cluster.local");
    let mut got = addresses(&out);
    got.sort();
    assert_eq!(got, vec!["10.244.1.7", "10.244.2.8"], "{out}");
}

#[test]
fn an_unknown_name_in_the_cluster_domain_is_nxdomain() {
    if !require_privileged(&["ip", "busybox"]) {
        return;
    }
    let lab = Lab::new();
    let out = lab.nslookup("nope.shop.svc.cluster.local");
    assert!(out.contains("NXDOMAIN"), "{out}");
    assert!(addresses(&out).is_empty(), "{out}");
}

#[test]
fn an_outside_name_is_forwarded_upstream_once_and_then_served_from_the_cache() {
    if !require_privileged(&["ip", "busybox"]) {
        return;
    }
    let lab = Lab::new();
    for _ in 0..2 {
        let out = lab.nslookup("outside.example");
        assert_eq!(addresses(&out), vec![OUTSIDE_IP.to_string()], "{out}");
    }
    assert_eq!(lab.server.outside_a_queries.load(Ordering::SeqCst), 1);
}

#[test]
fn short_names_resolve_through_a_pod_search_path() {
    if !require_privileged(&["ip", "busybox"]) {
        return;
    }
    let lab = Lab::new();
    // The resolv.conf the kubelet writes for a pod in namespace "shop" (ClusterFirst DNS policy).
    let conf = format!(
        "nameserver {DNS_IP}\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
    );
    let results = lab.in_pod(move || {
        Box::pin(async move {
            use hickory_resolver::net::runtime::TokioRuntimeProvider;
            let (config, opts) = hickory_resolver::system_conf::parse_resolv_conf(conf.as_bytes())
                .expect("resolv.conf");
            let mut opts = opts;
            // No client cache, so each lookup reaches the server.
            opts.cache_size = 0;
            let resolver = hickory_resolver::Resolver::builder_with_config(
                config,
                TokioRuntimeProvider::default(),
            )
            .with_options(opts)
            .build()
            .expect("resolver");
            let mut out = Vec::new();
            for name in ["web", "web.shop", "db", "web.shop.svc", "outside.example"] {
                let ips: Vec<String> = match resolver
                    .lookup(name, hickory_resolver::proto::rr::RecordType::A)
                    .await
                {
                    Ok(l) => {
                        let mut v: Vec<String> = l
                            .answers()
                            .iter()
                            .filter_map(|r| match &r.data {
                                hickory_resolver::proto::rr::RData::A(a) => Some(a.0.to_string()),
                                _ => None,
                            })
                            .collect();
                        v.sort();
                        v
                    }
                    Err(e) => vec![format!("error: {e}")],
                };
                out.push((name.to_string(), ips));
            }
            out
        })
    });
    let get = |n: &str| {
        results
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(get("web"), vec!["10.96.0.20"], "{results:?}");
    assert_eq!(get("web.shop"), vec!["10.96.0.20"], "{results:?}");
    assert_eq!(get("web.shop.svc"), vec!["10.96.0.20"], "{results:?}");
    assert_eq!(get("db"), vec!["10.244.1.7", "10.244.2.8"], "{results:?}");
    // Every search suffix is NXDOMAIN, so the name is finally asked as is and forwarded.
    assert_eq!(
        get("outside.example"),
        vec![OUTSIDE_IP.to_string()],
        "{results:?}"
    );
}

/// A raw DNS query for an A record (RD set), as a client builds it.
fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[test]
fn the_server_answers_over_tcp_too() {
    if !require_privileged(&["ip", "busybox"]) {
        return;
    }
    let lab = Lab::new();
    let ns = lab.pod.path();
    let (rcode, answers, tail) = std::thread::spawn(move || {
        enter(&ns);
        let mut s = TcpStream::connect((DNS_IP, 53)).expect("connect over TCP");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let q = a_query(0x4242, "web.shop.svc.cluster.local");
        s.write_all(&(q.len() as u16).to_be_bytes()).expect("write");
        s.write_all(&q).expect("write");
        let mut len = [0u8; 2];
        s.read_exact(&mut len).expect("read length");
        let mut r = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut r).expect("read response");
        assert_eq!(&r[0..2], &[0x42, 0x42]);
        (
            r[3] & 0x0f,
            u16::from_be_bytes([r[6], r[7]]),
            r[r.len() - 4..].to_vec(),
        )
    })
    .join()
    .expect("pod thread");
    assert_eq!(rcode, 0);
    assert_eq!(answers, 1);
    assert_eq!(tail, vec![10, 96, 0, 20]);
    // And UDP from a plain socket gets the same answer.
    let ns = lab.pod.path();
    let udp_tail = std::thread::spawn(move || {
        enter(&ns);
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.send_to(&a_query(7, "web.shop.svc.cluster.local"), (DNS_IP, 53))
            .expect("send");
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).expect("recv");
        buf[n - 4..n].to_vec()
    })
    .join()
    .expect("pod thread");
    assert_eq!(udp_tail, vec![10, 96, 0, 20]);
}

#[test]
fn srv_records_name_the_service_port_and_each_headless_pod() {
    if !require_privileged(&["ip", "busybox"]) {
        return;
    }
    let lab = Lab::new();
    let srv = |name: &str| {
        let out = lab
            .pod
            .command("busybox")
            .args(["nslookup", "-type=srv", name, DNS_IP])
            .output()
            .expect("run busybox nslookup");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = srv("_http._tcp.web.shop.svc.cluster.local");
    assert!(
        out.contains("service = 0 100 80 web.shop.svc.cluster.local"),
        "{out}"
    );
    let out = srv("_pg._tcp.db.shop.svc.cluster.local");
    for target in ["10-244-1-7", "10-244-2-8"] {
        assert!(
            out.contains(&format!(
                "service = 0 100 5432 {target}.db.shop.svc.cluster.local"
            )),
            "{out}"
        );
    }
    assert!(!out.contains("10-244-2-9"), "not-ready pod listed: {out}");
    // The headless targets resolve to their pods.
    let out = lab.nslookup("10-244-2-8.db.shop.svc.cluster.local");
    assert_eq!(addresses(&out), vec!["10.244.2.8"], "{out}");
}

/// Sends an A query for `name` over UDP (no EDNS, so 512 bytes at most) and over TCP from the pod; returns
/// (UDP truncation bit, UDP answer count, TCP answer count).
fn udp_and_tcp_answer_counts(lab: &Lab, name: &'static str) -> (bool, u16, u16) {
    let ns = lab.pod.path();
    std::thread::spawn(move || {
        enter(&ns);
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.send_to(&a_query(9, name), (DNS_IP, 53)).expect("send");
        let mut buf = [0u8; 4096];
        let n = s.recv(&mut buf).expect("recv");
        assert!(n <= 512, "UDP answer of {n} bytes without EDNS");
        let tc = buf[2] & 0x02 != 0;
        let udp_answers = u16::from_be_bytes([buf[6], buf[7]]);
        let mut t = TcpStream::connect((DNS_IP, 53)).expect("connect over TCP");
        t.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let q = a_query(10, name);
        t.write_all(&(q.len() as u16).to_be_bytes()).expect("write");
        t.write_all(&q).expect("write");
        let mut len = [0u8; 2];
        t.read_exact(&mut len).expect("read length");
        let mut r = vec![0u8; u16::from_be_bytes(len) as usize];
        t.read_exact(&mut r).expect("read response");
        (tc, udp_answers, u16::from_be_bytes([r[6], r[7]]))
    })
    .join()
    .expect("pod thread")
}

#[test]
fn a_headless_answer_too_big_for_udp_is_truncated_and_complete_over_tcp() {
    if !require_privileged(&["ip", "busybox"]) {
        return;
    }
    let lab = Lab::new();
    let (tc, udp_answers, tcp_answers) =
        udp_and_tcp_answer_counts(&lab, "big.shop.svc.cluster.local");
    assert!(tc, "the UDP answer must carry the TC bit");
    assert!(udp_answers < u16::from(BIG));
    assert_eq!(tcp_answers, u16::from(BIG));
}

#[test]
fn an_outside_name_is_servfail_when_the_upstream_does_not_answer() {
    if !require_privileged(&["ip", "busybox"]) {
        return;
    }
    // Nothing listens on 127.0.0.9:53 in the node namespace.
    let lab = Lab::with_upstream("nameserver 127.0.0.9\noptions timeout:1 attempts:1\n");
    // (busybox nslookup retries on SERVFAIL until it gives up, so ask with a plain socket.)
    let ns = lab.pod.path();
    let (rcode, took) = std::thread::spawn(move || {
        enter(&ns);
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let start = std::time::Instant::now();
        s.send_to(&a_query(11, "outside.example"), (DNS_IP, 53))
            .expect("send");
        let mut buf = [0u8; 512];
        s.recv(&mut buf).expect("an answer, not silence");
        (buf[3] & 0x0f, start.elapsed())
    })
    .join()
    .expect("pod thread");
    assert_eq!(rcode, 2, "SERVFAIL");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The cluster zone still answers.
    let out = lab.nslookup("web.shop.svc.cluster.local");
    assert_eq!(addresses(&out), vec!["10.96.0.20"], "{out}");
}
