//! windlass-proxy in a one-node namespace lab: real connections through the nftables rules it programs.
//!
//! Every test builds its own lab (node, client and pod namespaces; see `windlass_tests::proxy_lab`) and runs the
//! proxy binary inside the node namespace. Needs `cargo build -p windlass-proxy` first.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use windlass_tests::proxy_lab::{
    service, slice, udp_socket_in, ProxyLab, BRIDGE_IP, CLIENT_IP, NODE, NODE_IP,
};
use windlass_tests::{require_privileged, wait_for, ChildGuard};

const TOOLS: &[&str] = &["ip", "nft", "busybox", "conntrack", "timeout"];

fn web_ports() -> (Value, Value) {
    (
        json!([{"name": "http", "port": 80, "targetPort": 80, "nodePort": 30080},
               {"name": "udp", "port": 9000, "protocol": "UDP"}]),
        json!([{"name": "http", "port": 80}, {"name": "udp", "port": 9000, "protocol": "UDP"}]),
    )
}

/// `web` (10.96.0.20, NodePort 30080) over all three pods: pods 0 and 1 on this node, pod 2 on another.
fn web(lab: &ProxyLab, ready: [bool; 3], extra: Value) -> Vec<Value> {
    let (sp, ep) = web_ports();
    let nodes = [NODE, NODE, "node-b"];
    let eps: Vec<(&str, bool, &str)> = lab
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| (p.ip.as_str(), ready[i], nodes[i]))
        .collect();
    vec![
        service("web", "10.96.0.20", sp, extra),
        slice("web", ep, &eps),
    ]
}

fn lab_with(objects: impl FnOnce(&ProxyLab) -> Vec<Value>) -> ProxyLab {
    let mut lab = ProxyLab::new(3);
    let objs = objects(&lab);
    lab.set_objects(objs);
    lab.start_proxy();
    lab
}

/// Which pod answered each of `n` requests.
fn spread(
    lab: &ProxyLab,
    ns: &windlass_tests::netns::NetnsGuard,
    url: &str,
    n: usize,
) -> BTreeMap<String, usize> {
    let mut hits = BTreeMap::new();
    for _ in 0..n {
        let body = lab
            .fetch(ns, url)
            .unwrap_or_else(|e| panic!("{e}\nproxy log:\n{}", lab.proxy_log()));
        *hits.entry(body).or_insert(0) += 1;
    }
    hits
}

#[test]
fn cluster_ip_reaches_all_three_endpoints_evenly_from_the_node_and_from_a_pod() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = lab_with(|l| web(l, [true; 3], json!({})));
    let hits = spread(&lab, &lab.node, "http://10.96.0.20/", 60);
    assert_eq!(hits.len(), 3, "every endpoint answers: {hits:?}");
    // Each gets 1/3 exactly in expectation (20 of 60); 8..=32 is more than 3 standard deviations wide.
    for (pod, n) in &hits {
        assert!((8..=32).contains(n), "{pod} got {n} of 60: {hits:?}");
    }
    let from_pod = spread(&lab, &lab.pods[1].ns, "http://10.96.0.20/", 15);
    assert!(
        from_pod.len() >= 2,
        "a pod reaches the service too: {from_pod:?}"
    );
}

#[test]
fn the_nft_tool_backend_programs_and_follows_services_like_the_library() {
    if !require_privileged(TOOLS) {
        return;
    }
    // The default backend is libnftables in the proxy's process; `--nft-backend nft` runs the tool per sync.
    let mut lab = ProxyLab::new(3);
    let objs = web(&lab, [true; 3], json!({}));
    lab.set_objects(objs);
    lab.start_proxy_with(&["--nft-backend", "nft"]);
    assert!(
        lab.proxy_log().contains("nft -f"),
        "the tool backend was not chosen:\n{}",
        lab.proxy_log()
    );
    assert_eq!(spread(&lab, &lab.node, "http://10.96.0.20/", 30).len(), 3);
    let objs = web(&lab, [true, true, false], json!({}));
    lab.set_objects(objs);
    lab.wait_endpoints("10.244.1.12 . 80", false);
    let hits = spread(&lab, &lab.node, "http://10.96.0.20/", 20);
    assert!(!hits.contains_key("pod-2"), "{hits:?}");
}

#[test]
fn an_endpoint_turning_unready_stops_receiving_new_connections() {
    if !require_privileged(TOOLS) {
        return;
    }
    let mut lab = lab_with(|l| web(l, [true; 3], json!({})));
    lab.wait_endpoints("10.244.1.12 . 80", true);
    let objs = web(&lab, [true, true, false], json!({}));
    lab.set_objects(objs);
    lab.wait_endpoints("10.244.1.12 . 80", false);
    let hits = spread(&lab, &lab.node, "http://10.96.0.20/", 30);
    assert!(!hits.contains_key("pod-2"), "{hits:?}");
    assert_eq!(hits.len(), 2, "{hits:?}");
}

#[test]
fn a_service_without_endpoints_is_refused_at_once_not_left_to_time_out() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = lab_with(|l| {
        let mut objs = web(l, [true; 3], json!({}));
        objs.push(service(
            "empty",
            "10.96.0.40",
            json!([{"name": "http", "port": 80, "nodePort": 30090}]),
            json!({"type": "NodePort"}),
        ));
        objs
    });
    for (who, ns, url) in [
        ("the node", &lab.node, "http://10.96.0.40/".to_string()),
        ("a pod", &lab.pods[0].ns, "http://10.96.0.40/".to_string()),
        (
            "the outside client",
            &lab.client,
            format!("http://{NODE_IP}:30090/"),
        ),
    ] {
        let (r, took) = lab.timed_fetch(ns, url.as_str());
        let err = r.expect_err("no endpoints: must fail");
        assert!(
            took < Duration::from_millis(1000),
            "{who}: took {took:?}: {err}"
        );
        assert!(err.contains("refused"), "{who}: {err}");
    }
}

#[test]
fn node_port_answers_the_outside_client_and_local_policy_keeps_its_source_address() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = lab_with(|l| {
        let mut objs = web(
            l,
            [true; 3],
            json!({"type": "NodePort", "externalIPs": ["192.168.200.100"]}),
        );
        let eps: Vec<(&str, bool, &str)> = vec![
            (l.pods[0].ip.as_str(), true, NODE),
            (l.pods[1].ip.as_str(), true, NODE),
            (l.pods[2].ip.as_str(), true, "node-b"),
        ];
        objs.push(service(
            "local",
            "10.96.0.21",
            json!([{"name": "http", "port": 80, "nodePort": 30081}]),
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 31001}),
        ));
        objs.push(slice("local", json!([{"name": "http", "port": 80}]), &eps));
        objs.push(service(
            "remote-only",
            "10.96.0.22",
            json!([{"name": "http", "port": 80, "nodePort": 30082}]),
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 31002}),
        ));
        objs.push(slice(
            "remote-only",
            json!([{"name": "http", "port": 80}]),
            &eps[2..],
        ));
        objs
    });
    // Cluster policy: any endpoint, source masqueraded to the node's bridge address.
    let cluster = spread(
        &lab,
        &lab.client,
        &format!("http://{NODE_IP}:30080/cgi-bin/ip"),
        30,
    );
    assert!(cluster.len() >= 2, "{cluster:?}");
    for answer in cluster.keys() {
        assert!(
            answer.ends_with(&format!(" {BRIDGE_IP}")),
            "masqueraded: {answer}"
        );
    }
    // An externalIP routed to the node answers like the ClusterIP.
    lab.client
        .exec(&["ip", "route", "add", "192.168.200.100/32", "via", NODE_IP])
        .expect("route to the external IP");
    let external = spread(&lab, &lab.client, "http://192.168.200.100/", 15);
    assert!(external.len() >= 2, "externalIP spreads too: {external:?}");
    // Local policy: only this node's endpoints (pods 0 and 1), and they see the real client.
    let local = spread(
        &lab,
        &lab.client,
        &format!("http://{NODE_IP}:30081/cgi-bin/ip"),
        30,
    );
    for answer in local.keys() {
        assert!(
            answer == &format!("pod-0 {CLIENT_IP}") || answer == &format!("pod-1 {CLIENT_IP}"),
            "{local:?}"
        );
    }
    // The health-check node ports tell load balancers which nodes have local endpoints.
    let hc = wait_for("health check 31001", Duration::from_secs(5), || {
        lab.fetch(&lab.node, "http://127.0.0.1:31001/").ok()
    });
    let hc: Value = serde_json::from_str(&hc).expect("JSON");
    assert_eq!(hc["localEndpoints"], 2, "{hc}");
    assert_eq!(hc["service"]["name"], "local");
    let out = lab.run_in(
        &lab.node,
        &[
            "timeout",
            "5",
            "busybox",
            "wget",
            "-S",
            "-q",
            "-O",
            "-",
            "http://127.0.0.1:31002/",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("503"), "no local endpoints → 503: {stderr}");
    // Local policy with endpoints only elsewhere: dropped, not answered, for outside clients...
    assert!(lab
        .fetch(&lab.client, &format!("http://{NODE_IP}:30082/"))
        .is_err());
    // ...but a pod is not external: it reaches the endpoint on the other node, with its own address.
    assert_eq!(
        lab.fetch(
            &lab.pods[0].ns,
            &format!("http://{NODE_IP}:30082/cgi-bin/ip")
        )
        .as_deref(),
        Ok("pod-2 10.244.1.10")
    );
}

#[test]
fn client_ip_affinity_sends_one_client_to_one_endpoint_and_moves_it_when_that_one_goes() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = lab_with(|l| {
        web(
            l,
            [true; 3],
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}),
        )
    });
    for (who, ns) in [("a pod", &lab.pods[0].ns), ("the node", &lab.node)] {
        let hits = spread(&lab, ns, "http://10.96.0.20/", 20);
        assert_eq!(hits.len(), 1, "{who} sticks to one endpoint: {hits:?}");
    }
    let hits = spread(&lab, &lab.client, &format!("http://{NODE_IP}:30080/"), 20);
    assert_eq!(hits.len(), 1, "the NodePort client sticks too: {hits:?}");
    assert!(lab
        .list("map", "affinity")
        .contains("10.96.0.20 . tcp . 80"));
}

#[test]
fn a_pod_reaches_itself_through_its_service_hairpin() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = lab_with(|l| {
        vec![
            service(
                "self",
                "10.96.0.23",
                json!([{"name": "http", "port": 8080, "targetPort": 80}]),
                json!({}),
            ),
            slice(
                "self",
                json!([{"name": "http", "port": 80}]),
                &[(l.pods[0].ip.as_str(), true, NODE)],
            ),
        ]
    });
    let body = lab
        .fetch(&lab.pods[0].ns, "http://10.96.0.23:8080/cgi-bin/ip")
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.proxy_log()));
    assert_eq!(
        body,
        format!("pod-0 {BRIDGE_IP}"),
        "masqueraded to the node so the reply comes back"
    );
}

/// Which pod received `msg` on its UDP socket (answering it with its name), if any yet.
fn udp_receiver(lab: &ProxyLab, msg: &str) -> Option<usize> {
    let mut buf = [0u8; 512];
    for (i, pod) in lab.pods.iter().enumerate() {
        while let Ok((n, from)) = pod.udp.recv_from(&mut buf) {
            if &buf[..n] == msg.as_bytes() {
                let _ = pod.udp.send_to(pod.name.as_bytes(), from);
                return Some(i);
            }
        }
    }
    None
}

#[test]
fn a_udp_service_answers_and_a_removed_endpoint_loses_its_stale_flow() {
    if !require_privileged(TOOLS) {
        return;
    }
    let mut lab = lab_with(|l| web(l, [true; 3], json!({})));
    // One client socket: every datagram has the same 5-tuple, so it rides one conntrack entry.
    let client = udp_socket_in(&lab.node, "0.0.0.0:0");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let first = wait_for(
        "a pod to receive the datagram",
        Duration::from_secs(5),
        || {
            client.send_to(b"first", "10.96.0.20:9000").expect("send");
            std::thread::sleep(Duration::from_millis(100));
            udp_receiver(&lab, "first")
        },
    );
    let mut buf = [0u8; 64];
    let (n, from) = client.recv_from(&mut buf).expect("the reply comes back");
    assert_eq!(&buf[..n], lab.pods[first].name.as_bytes());
    assert_eq!(
        from.to_string(),
        "10.96.0.20:9000",
        "un-DNATed to the ClusterIP"
    );

    // Remove the pod that got the flow: its conntrack entry must be flushed, or the flow would keep going there.
    let mut ready = [true; 3];
    ready[first] = false;
    let objs = web(&lab, ready, json!({}));
    lab.set_objects(objs);
    lab.wait_endpoints(&format!("{} . 9000", lab.pods[first].ip), false);
    // Without the flush the entry (refreshed by every datagram) would pin the flow to the removed pod for minutes;
    // datagrams sent between the map update and the flush may still arrive there, so wait for another pod.
    wait_for(
        "the same flow to reach another pod",
        Duration::from_secs(5),
        || {
            client.send_to(b"second", "10.96.0.20:9000").expect("send");
            std::thread::sleep(Duration::from_millis(100));
            udp_receiver(&lab, "second").filter(|i| *i != first)
        },
    );
}

#[test]
fn cleanup_removes_only_the_proxy_table_and_other_tables_are_untouched() {
    if !require_privileged(TOOLS) {
        return;
    }
    let mut lab = ProxyLab::new(1);
    lab.node
        .exec(&["nft", "add table inet bystander; add chain inet bystander c { type filter hook input priority 0; }; add rule inet bystander c tcp dport 9 counter accept"])
        .expect("bystander table");
    let before = lab
        .node
        .exec(&["nft", "list", "table", "inet", "bystander"])
        .expect("list");
    let objs = vec![
        service(
            "web",
            "10.96.0.20",
            json!([{"name": "http", "port": 80}]),
            json!({}),
        ),
        slice(
            "web",
            json!([{"name": "http", "port": 80}]),
            &[(lab.pods[0].ip.as_str(), true, NODE)],
        ),
    ];
    lab.set_objects(objs);
    lab.start_proxy();
    assert_eq!(
        lab.fetch(&lab.node, "http://10.96.0.20/").as_deref(),
        Ok("pod-0")
    );
    assert!(lab.nft_tables().contains("table ip windlass-proxy"));
    lab.kill_proxy();
    let bin = windlass_tests::workspace_binary("windlass-proxy");
    let out = lab.run_in(&lab.node, &[bin.to_str().expect("path"), "--cleanup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tables = lab.nft_tables();
    assert!(!tables.contains("windlass-proxy"), "{tables}");
    let after = lab
        .node
        .exec(&["nft", "list", "table", "inet", "bystander"])
        .expect("list");
    assert_eq!(before, after);
    // Cleaning up twice is fine (nothing to delete).
    let out = lab.run_in(&lab.node, &[bin.to_str().expect("path"), "--cleanup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_proxy_restart_keeps_an_open_tcp_connection_alive() {
    if !require_privileged(TOOLS) {
        return;
    }
    let mut lab = ProxyLab::new(1);
    let log = lab.dir.path().join("stream.log");
    let server = ChildGuard::spawn(
        lab.pods[0]
            .ns
            .command("busybox")
            .args(["nc", "-l", "-p", "7000"])
            // nc closes the connection when its stdin ends: keep a pipe open.
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(Stdio::null()),
    )
    .expect("nc -l");
    let objs = vec![
        service(
            "stream",
            "10.96.0.30",
            json!([{"name": "s", "port": 7000}]),
            json!({}),
        ),
        slice(
            "stream",
            json!([{"name": "s", "port": 7000}]),
            &[(lab.pods[0].ip.as_str(), true, NODE)],
        ),
    ];
    lab.set_objects(objs);
    lab.start_proxy();
    let mut nc = lab.node.command("busybox");
    nc.args(["nc", "10.96.0.30", "7000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut client = ChildGuard::spawn(&mut nc).expect("nc client");
    let mut stdin = client.child_mut().stdin.take().expect("stdin");
    stdin.write_all(b"before-restart\n").expect("write");
    stdin.flush().expect("flush");
    wait_for("the first line to arrive", Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|s| s.contains("before-restart"))
    });
    lab.kill_proxy();
    lab.start_proxy();
    stdin
        .write_all(b"after-restart\n")
        .expect("write after restart");
    stdin.flush().expect("flush");
    wait_for(
        "the second line to arrive on the same connection",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|s| s.contains("after-restart"))
        },
    );
    drop(server);
}

#[test]
fn healthz_and_metrics_report_the_syncs() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = lab_with(|l| web(l, [true; 3], json!({})));
    let healthz = lab
        .fetch(&lab.node, "http://127.0.0.1:10256/healthz")
        .expect("healthz 200");
    assert!(healthz.contains("lastUpdated"), "{healthz}");
    let metrics = lab
        .fetch(&lab.node, "http://127.0.0.1:10249/metrics")
        .expect("metrics");
    assert!(
        metrics.contains("windlass_proxy_sync_duration_seconds_count{kind=\"rebuild\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("windlass_proxy_sync_errors_total 0"),
        "{metrics}"
    );
    assert!(metrics.contains("windlass_proxy_services 1"), "{metrics}");
}

#[test]
fn with_an_unreachable_api_server_the_proxy_waits_unhealthy_and_programs_nothing() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node =
        windlass_tests::netns::NetnsGuard::new(&windlass_tests::unique_name("pxk")).expect("netns");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    // Port 1 on the namespace's own loopback: connection refused at once, every time.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n\
         contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user:\n    token: t\n",
    )
    .expect("kubeconfig");
    let bin = windlass_tests::workspace_binary("windlass-proxy");
    let _proxy = ChildGuard::spawn(
        node.command(bin.to_str().expect("path"))
            .args(["--node-name", "n1", "--kubeconfig"])
            .arg(&kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("start proxy");
    let out = wait_for("healthz to answer", Duration::from_secs(10), || {
        let o = node
            .command("timeout")
            .args([
                "5",
                "busybox",
                "wget",
                "-S",
                "-q",
                "-O",
                "-",
                "http://127.0.0.1:10256/healthz",
            ])
            .output()
            .ok()?;
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        stderr.contains("HTTP/1.1").then_some(stderr)
    });
    assert!(
        out.contains("503"),
        "not healthy before the first sync: {out}"
    );
    let tables = node.exec(&["nft", "list", "tables"]).expect("nft");
    assert!(
        !tables.contains("windlass-proxy"),
        "nothing programmed before the lists: {tables}"
    );
}

#[test]
fn node_ports_answer_only_on_the_configured_node_addresses() {
    if !require_privileged(TOOLS) {
        return;
    }
    let mut lab = ProxyLab::new(1);
    // A second node address, outside the configured NodePort CIDR.
    lab.node
        .exec(&["ip", "addr", "add", "192.168.201.1/24", "dev", "up0"])
        .expect("second address");
    lab.client
        .exec(&["ip", "addr", "add", "192.168.201.2/24", "dev", "eth0"])
        .expect("client second address");
    let objs = vec![
        service(
            "web",
            "10.96.0.20",
            json!([{"name": "http", "port": 80, "nodePort": 30080}]),
            json!({"type": "NodePort"}),
        ),
        slice(
            "web",
            json!([{"name": "http", "port": 80}]),
            &[(lab.pods[0].ip.as_str(), true, NODE)],
        ),
    ];
    lab.set_objects(objs);
    lab.start_proxy_with(&["--nodeport-addresses", "192.168.200.0/24"]);
    assert_eq!(
        lab.fetch(&lab.client, &format!("http://{NODE_IP}:30080/"))
            .as_deref(),
        Ok("pod-0")
    );
    assert!(
        lab.fetch(&lab.client, "http://192.168.201.1:30080/")
            .is_err(),
        "no NodePort on an address outside --nodeport-addresses"
    );
}

#[test]
fn the_periodic_resync_repairs_rules_someone_else_removed() {
    if !require_privileged(TOOLS) {
        return;
    }
    let mut lab = ProxyLab::new(1);
    let objs = vec![
        service(
            "web",
            "10.96.0.20",
            json!([{"name": "http", "port": 80}]),
            json!({}),
        ),
        slice(
            "web",
            json!([{"name": "http", "port": 80}]),
            &[(lab.pods[0].ip.as_str(), true, NODE)],
        ),
    ];
    lab.set_objects(objs);
    lab.start_proxy_with(&["--resync-period-s", "1"]);
    assert_eq!(
        lab.fetch(&lab.node, "http://10.96.0.20/").as_deref(),
        Ok("pod-0")
    );
    // Drift: another tool empties our dispatch map and a chain.
    lab.node
        .exec(&[
            "nft",
            "flush map ip windlass-proxy service-ips; flush chain ip windlass-proxy nat-output",
        ])
        .expect("cause drift");
    assert!(
        lab.fetch(&lab.node, "http://10.96.0.20/").is_err(),
        "drift breaks the Service"
    );
    wait_for(
        "the resync to repair the rules",
        Duration::from_secs(10),
        || {
            lab.fetch(&lab.node, "http://10.96.0.20/")
                .ok()
                .filter(|b| b == "pod-0")
        },
    );
}
