//! Probes as the kubelet runs them: from inside the node network namespace, against a pod attached with the CNI
//! client, served by busybox httpd in the pod namespace.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ContainerPort, HTTPGetAction, Probe, TCPSocketAction};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use windlass_kubelet::cni::{CniClient, CniSettings, ProcessExec, RuntimeConf};
use windlass_kubelet::probes::{ContainerProbes, NetProber, NoExec, ProbeOutcome, Prober};
use windlass_tests::cni_lab::{run_in_netns, CniLab};
use windlass_tests::{require_privileged, ChildGuard};

fn http_probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(1),
        failure_threshold: Some(1),
        ..Default::default()
    }
}

#[test]
fn probes_from_the_node_namespace_reach_the_pod_and_see_it_go_away() {
    if !require_privileged(&["ip", "busybox", "/usr/lib/cni/bridge"]) {
        return;
    }
    let lab = CniLab::new().expect("lab");
    lab.write_bridge_conflist("10.244.12.0/24", &[])
        .expect("conflist");
    let settings = CniSettings::new(lab.conf_dir.path(), &lab.bin_path(), lab.root_dir.path());
    let cni = CniClient::new(settings, ProcessExec::wrapped(lab.node_wrapper()));
    let net = cni.network().expect("network");
    let rt = RuntimeConf {
        container_id: format!("probe-{}", lab.pod.name()),
        netns: lab.pod.path(),
        ifname: "eth0".into(),
        ..Default::default()
    };
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = tokio_rt.block_on(cni.add(&net, &rt)).expect("ADD");
    let pod_ip: IpAddr = result.ips_for("eth0")[0];

    let www = tempfile::tempdir().expect("www");
    std::fs::write(www.path().join("index.html"), "ok\n").expect("index");
    let mut httpd = Some(
        ChildGuard::spawn(
            lab.pod
                .command("busybox")
                .args(["httpd", "-f", "-p", "8080", "-h"])
                .arg(www.path()),
        )
        .expect("httpd"),
    );

    let prober = Arc::new(NetProber {
        pod_ip,
        container_id: "c1".into(),
        ports: vec![ContainerPort {
            name: Some("http".into()),
            container_port: 8080,
            ..Default::default()
        }],
        exec: Arc::new(NoExec),
    });
    let node_ns = lab.node.path();
    run_in_netns(&node_ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let t = Duration::from_secs(1);
            // httpd may still be starting: poll (bounded) until it answers.
            let mut ok = false;
            for _ in 0..50 {
                if prober.probe(&http_probe("/"), t).await == ProbeOutcome::Success {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(ok, "httpGet on {pod_ip}:8080 never succeeded");
            let tcp = Probe {
                tcp_socket: Some(TCPSocketAction {
                    port: IntOrString::Int(8080),
                    host: None,
                }),
                ..Default::default()
            };
            assert_eq!(prober.probe(&tcp, t).await, ProbeOutcome::Success);
            let missing = prober.probe(&http_probe("/missing"), t).await;
            assert!(
                matches!(missing, ProbeOutcome::Failure(ref m) if m.contains("statuscode: 404")),
                "{missing:?}"
            );

            // A readiness worker sees the pod ready, then unready once the server is gone.
            let container = Container {
                name: "web".into(),
                readiness_probe: Some(http_probe("/")),
                ..Default::default()
            };
            let probes =
                ContainerProbes::spawn(&container, prober.clone(), tokio::time::Instant::now());
            let mut watch = probes.watch();
            tokio::time::timeout(
                Duration::from_secs(10),
                watch.wait_for(|s| s.ready == Some(true)),
            )
            .await
            .expect("ready within 10 s")
            .expect("watch");
            drop(httpd.take());
            tokio::time::timeout(
                Duration::from_secs(10),
                watch.wait_for(|s| s.ready == Some(false)),
            )
            .await
            .expect("unready within 10 s of the server going away")
            .expect("watch");
            let refused = prober.probe(&tcp, t).await;
            assert!(matches!(refused, ProbeOutcome::Failure(_)), "{refused:?}");
        });
    })
    .expect("run in node netns");

    tokio_rt.block_on(cni.del(&net, &rt)).expect("DEL");
    assert!(lab.reserved_ips().is_empty());
}
