//! End to end: static pods from the kubelet's `--pod-manifest-path` and their mirror pods in the API (as kubeadm
//! runs its control plane), and pods on the node's network (`hostNetwork`). Everything runs in the node network
//! namespace of a [`KubeletLab`]; the checks are what a user sees: `kubectl get pods`, HTTP from the node, the
//! node's links.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use windlass_tests::kubelet_lab::{KubeletLab, TOOLS};
use windlass_tests::{require_privileged, run_ok, wait_for};

/// A static pod running the lab's httpd image (port 80) with a short grace period (httpd as PID 1 ignores
/// SIGTERM, so only the SIGKILL at the end of the grace period stops it).
fn web_manifest(lab: &KubeletLab, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: default\n  labels:\n    app: web\n    version: {version}\n\
         spec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: httpd\n    image: {}\n    ports:\n    - containerPort: 80\n",
        lab.image
    )
}

/// A pod on the node's network whose httpd listens on `port` of the node and serves the container's hostname and
/// resolv.conf as its page.
fn host_network_spec(lab: &KubeletLab, port: u16) -> String {
    format!(
        "spec:\n  hostNetwork: true\n  dnsPolicy: ClusterFirstWithHostNet\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: httpd\n    image: {}\n    command: [sh, -c, \"{{ hostname; cat /etc/resolv.conf; }} > /www/index.html && exec httpd -f -p {port} -h /www\"]\n    ports:\n    - containerPort: {port}\n",
        lab.image
    )
}

/// Writes a manifest the way config management does: a hidden temporary file (ignored by the kubelet) renamed
/// into place, so the kubelet never reads half a file.
fn put_manifest(lab: &KubeletLab, file: &str, text: &str) {
    let dir = lab.manifest_dir();
    std::fs::create_dir_all(&dir).expect("manifest dir");
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, dir.join(file)).expect("rename manifest");
}

fn mirror_name(lab: &KubeletLab, name: &str) -> String {
    format!("{name}-{}", lab.node_name)
}

fn running_with_ip(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && p["status"]["podIP"]
            .as_str()
            .is_some_and(|ip| !ip.is_empty())
        && p["status"]["containerStatuses"][0]["ready"] == true
}

fn str_of<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn serves_page(lab: &KubeletLab, ip: &str, port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match lab.http_get(ip, port) {
            Ok(body) if body.contains("200 OK") => return body,
            other => assert!(
                Instant::now() < deadline,
                "no page from {ip}:{port}: {other:?}\nkubelet log:\n{}",
                lab.kubelet_log()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The node namespace's links as `name state` lines, sorted.
fn node_links(lab: &KubeletLab) -> Vec<String> {
    let out = run_ok(std::process::Command::new("ip").args([
        "-n",
        lab.netns.name(),
        "-j",
        "link",
        "show",
    ]));
    let links: Value = serde_json::from_str(&out).expect("ip -j link");
    let mut names: Vec<String> = links
        .as_array()
        .map(|a| {
            a.iter()
                .map(|l| format!("{} {}", str_of(l, "/ifname"), str_of(l, "/operstate")))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn sandbox_of(lab: &KubeletLab, uid: &str) -> bool {
    lab.sandbox_dirs().iter().any(|d| d.starts_with(uid))
}

fn gone_from_node(lab: &KubeletLab, uid: &str) -> bool {
    !sandbox_of(lab, uid)
        && lab.pod_cgroups(uid).is_empty()
        && !Path::new(&lab.root.path().join("pods").join(uid)).exists()
}

#[test]
fn a_static_pod_is_mirrored_in_the_api_and_keeps_running_when_its_mirror_is_deleted() {
    if !require_privileged(TOOLS) {
        return;
    }
    // The kubelet creates and deletes its mirror pods with its own node credentials, as NodeRestriction allows.
    let lab = KubeletLab::start_with_node_credentials();
    put_manifest(&lab, "web.yaml", &web_manifest(&lab, "one"));
    let name = mirror_name(&lab, "web");
    let pod = lab.wait_pod(
        &name,
        "mirrored and Running",
        Duration::from_secs(90),
        running_with_ip,
    );

    // Upstream's mirror pod: the static pod's name with the node's appended, its hash, owned by the Node.
    let annotations = &pod["metadata"]["annotations"];
    let hash = str_of(annotations, "/kubernetes.io~1config.hash").to_string();
    assert_eq!(hash.len(), 32, "{annotations}");
    assert_eq!(annotations["kubernetes.io/config.mirror"], hash.as_str());
    assert_eq!(annotations["kubernetes.io/config.source"], "file");
    assert_ne!(
        pod["metadata"]["uid"],
        hash.as_str(),
        "the API gives the mirror its own UID"
    );
    let owner = &pod["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "Node");
    assert_eq!(owner["name"], lab.node_name.as_str());
    assert_eq!(owner["controller"], true);
    assert_eq!(pod["spec"]["nodeName"], lab.node_name.as_str());
    assert_eq!(pod["metadata"]["labels"]["app"], "web");
    let ip = str_of(&pod, "/status/podIP").to_string();
    assert!(serves_page(&lab, &ip, 80).ends_with("hi\n"));
    assert!(
        sandbox_of(&lab, &hash),
        "the static pod runs under its hash"
    );
    let container_id = str_of(&pod, "/status/containerStatuses/0/containerID").to_string();
    let restarts = pod["status"]["containerStatuses"][0]["restartCount"].clone();
    let mirror_uid = str_of(&pod, "/metadata/uid").to_string();

    // `kubectl delete` of the mirror pod does not stop the static pod: the same containers keep running and the
    // kubelet creates the mirror again.
    lab.control
        .kubectl_ok(&["delete", "pod", &name, "--wait=false"]);
    let again = lab.wait_pod(&name, "mirrored again", Duration::from_secs(60), |p| {
        str_of(p, "/metadata/uid") != mirror_uid && running_with_ip(p)
    });
    assert_eq!(
        str_of(&again, "/status/containerStatuses/0/containerID"),
        container_id,
        "the container was not replaced"
    );
    assert_eq!(
        again["status"]["containerStatuses"][0]["restartCount"],
        restarts
    );
    assert_eq!(str_of(&again, "/status/podIP"), ip);
    assert!(serves_page(&lab, &ip, 80).ends_with("hi\n"));
}

#[test]
fn editing_a_static_pod_manifest_replaces_the_pod_and_removing_it_stops_the_pod() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    put_manifest(&lab, "web.yaml", &web_manifest(&lab, "one"));
    let name = mirror_name(&lab, "web");
    let first = lab.wait_pod(&name, "Running", Duration::from_secs(90), running_with_ip);
    let old_hash = str_of(&first, "/metadata/annotations/kubernetes.io~1config.hash").to_string();
    let old_container = str_of(&first, "/status/containerStatuses/0/containerID").to_string();

    // A new label is a new manifest: a new hash, the old containers stopped, new ones started, the mirror replaced.
    put_manifest(&lab, "web.yaml", &web_manifest(&lab, "two"));
    let second = lab.wait_pod(&name, "replaced", Duration::from_secs(90), |p| {
        p["metadata"]["labels"]["version"] == "two" && running_with_ip(p)
    });
    let new_hash = str_of(&second, "/metadata/annotations/kubernetes.io~1config.hash").to_string();
    assert_ne!(new_hash, old_hash);
    assert_eq!(
        second["metadata"]["annotations"]["kubernetes.io/config.mirror"],
        new_hash.as_str()
    );
    assert_ne!(
        str_of(&second, "/status/containerStatuses/0/containerID"),
        old_container
    );
    wait_for(
        "the old static pod to be gone from the node",
        Duration::from_secs(30),
        || gone_from_node(&lab, &old_hash).then_some(()),
    );
    assert!(serves_page(&lab, str_of(&second, "/status/podIP"), 80).ends_with("hi\n"));

    // Removing the file stops the pod and deletes its mirror.
    std::fs::remove_file(lab.manifest_dir().join("web.yaml")).expect("remove manifest");
    wait_for(
        "the mirror pod to be deleted",
        Duration::from_secs(60),
        || lab.pod(&name).is_none().then_some(()),
    );
    wait_for(
        "the static pod to be gone from the node",
        Duration::from_secs(30),
        || (gone_from_node(&lab, &new_hash) && lab.sandbox_dirs().is_empty()).then_some(()),
    );
}

#[test]
fn a_bad_manifest_is_reported_and_does_not_stop_the_other_static_pods() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    put_manifest(
        &lab,
        "broken.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: broken}\nspec: {containers: []}\n",
    );
    put_manifest(&lab, "web.yaml", &web_manifest(&lab, "one"));
    lab.wait_pod(
        &mirror_name(&lab, "web"),
        "Running",
        Duration::from_secs(90),
        running_with_ip,
    );
    assert!(lab.pod(&mirror_name(&lab, "broken")).is_none());
    wait_for(
        "an Event about the bad manifest",
        Duration::from_secs(30),
        || {
            let out = lab
                .control
                .kubectl_ok(&["get", "events", "-A", "-o", "json"]);
            let events: Value = serde_json::from_str(&out).ok()?;
            events["items"]
                .as_array()?
                .iter()
                .any(|e| {
                    e["involvedObject"]["kind"] == "Node"
                        && str_of(e, "/message").contains("broken.yaml")
                        && str_of(e, "/message").contains("containers must not be empty")
                })
                .then_some(())
        },
    );
}

#[test]
fn a_static_pod_runs_while_the_api_server_is_down_and_is_mirrored_once_it_is_back() {
    if !require_privileged(TOOLS) {
        return;
    }
    let mut lab = KubeletLab::start();
    // The image is pulled from the registry, which does not need the API server.
    lab.control.stop();
    let port = 18_081;
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: apiserver\n  namespace: default\n{}",
        host_network_spec(&lab, port)
    );
    put_manifest(&lab, "apiserver.yaml", &manifest);
    let deadline = Instant::now() + Duration::from_secs(90);
    while lab.http_get("127.0.0.1", port).is_err() {
        assert!(
            Instant::now() < deadline,
            "the static pod did not serve without the API server; kubelet log:\n{}",
            lab.kubelet_log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    lab.control.resume();
    let pod = lab.wait_pod(
        &mirror_name(&lab, "apiserver"),
        "mirrored once the API server is back",
        Duration::from_secs(120),
        running_with_ip,
    );
    assert_eq!(pod["status"]["podIP"], "127.0.0.1");
    assert_eq!(pod["status"]["containerStatuses"][0]["restartCount"], 0);
}

#[test]
fn a_host_network_pod_serves_on_the_node_ip_and_leaves_the_nodes_network_alone() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    let links_before = node_links(&lab);
    let port = 18_082;
    lab.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hostweb\n  namespace: default\n{}  nodeName: {}\n",
        host_network_spec(&lab, port),
        lab.node_name
    ));
    let pod = lab.wait_pod(
        "hostweb",
        "Running",
        Duration::from_secs(90),
        running_with_ip,
    );
    assert_eq!(pod["status"]["podIP"], "127.0.0.1", "the node's IP");
    assert_eq!(pod["status"]["podIPs"][0]["ip"], "127.0.0.1");
    assert_eq!(pod["status"]["hostIP"], "127.0.0.1");
    // The container port is the node's port; the page is the container's hostname and resolv.conf.
    let page = serves_page(&lab, "127.0.0.1", port);
    let body = page.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(
        body.lines().next(),
        Some(lab.node_name.as_str()),
        "the node's name: {page}"
    );
    // Cluster DNS for ClusterFirstWithHostNet.
    assert!(body.contains("nameserver 10.96.0.10"), "{page}");
    assert!(body.contains("default.svc.cluster.local"), "{page}");
    // No CNI: no address reserved, no bridge or veth made.
    assert!(
        lab.ip_reservations().is_empty(),
        "{:?}",
        lab.ip_reservations()
    );
    assert_eq!(node_links(&lab), links_before);

    let uid = str_of(&pod, "/metadata/uid").to_string();
    lab.control
        .kubectl_ok(&["delete", "pod", "hostweb", "--timeout=60s"]);
    wait_for(
        "the pod to be gone from the node",
        Duration::from_secs(30),
        || gone_from_node(&lab, &uid).then_some(()),
    );
    assert_eq!(
        node_links(&lab),
        links_before,
        "the node's links are untouched"
    );
    assert!(lab.http_get("127.0.0.1", port).is_err(), "httpd stopped");
}

#[test]
fn a_restarted_kubelet_adopts_its_static_and_host_network_pods_and_cleans_up_one_deleted_meanwhile()
{
    if !require_privileged(TOOLS) {
        return;
    }
    let mut lab = KubeletLab::start();
    let links_before = node_links(&lab);
    put_manifest(&lab, "web.yaml", &web_manifest(&lab, "one"));
    let port = 18_083;
    lab.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hostweb\n  namespace: default\n{}  nodeName: {}\n",
        host_network_spec(&lab, port),
        lab.node_name
    ));
    let name = mirror_name(&lab, "web");
    let web = lab.wait_pod(&name, "Running", Duration::from_secs(90), running_with_ip);
    let host = lab.wait_pod(
        "hostweb",
        "Running",
        Duration::from_secs(90),
        running_with_ip,
    );
    let web_container = str_of(&web, "/status/containerStatuses/0/containerID").to_string();
    let host_container = str_of(&host, "/status/containerStatuses/0/containerID").to_string();
    let host_uid = str_of(&host, "/metadata/uid").to_string();

    lab.stop_kubelet();
    lab.start_kubelet();
    wait_for(
        "the kubelet to adopt both pods",
        Duration::from_secs(60),
        || (lab.kubelet_log().matches("adopting running pod").count() >= 2).then_some(()),
    );
    // Nothing was restarted or re-created: same containers, same mirror pod, both still serving.
    let web_after = lab.pod(&name).expect("mirror pod");
    assert_eq!(web_after["metadata"]["uid"], web["metadata"]["uid"]);
    assert_eq!(
        str_of(&web_after, "/status/containerStatuses/0/containerID"),
        web_container
    );
    let host_after = lab.pod("hostweb").expect("hostweb");
    assert_eq!(
        str_of(&host_after, "/status/containerStatuses/0/containerID"),
        host_container
    );
    assert_eq!(
        host_after["status"]["containerStatuses"][0]["restartCount"],
        0
    );
    serves_page(&lab, str_of(&web, "/status/podIP"), 80);
    serves_page(&lab, "127.0.0.1", port);

    // A host-network pod force-deleted while the kubelet is down is torn down when it starts, without CNI and
    // without touching the node's links; the static pod stays.
    lab.stop_kubelet();
    lab.control
        .kubectl_ok(&["delete", "pod", "hostweb", "--grace-period=0", "--force"]);
    lab.start_kubelet();
    wait_for(
        "the deleted pod to be cleaned up",
        Duration::from_secs(60),
        || gone_from_node(&lab, &host_uid).then_some(()),
    );
    assert!(
        lab.http_get("127.0.0.1", port).is_err(),
        "its httpd stopped"
    );
    let web_hash = str_of(&web, "/metadata/annotations/kubernetes.io~1config.hash");
    assert!(sandbox_of(&lab, web_hash), "the static pod still runs");
    assert_eq!(
        str_of(
            &lab.pod(&name).expect("mirror pod"),
            "/status/containerStatuses/0/containerID"
        ),
        web_container
    );
    let links_after: Vec<String> = node_links(&lab)
        .into_iter()
        .filter(|l| !l.starts_with("veth") && !l.starts_with(&lab.bridge))
        .collect();
    let links_before: Vec<String> = links_before
        .into_iter()
        .filter(|l| !l.starts_with("veth") && !l.starts_with(&lab.bridge))
        .collect();
    assert_eq!(
        links_after, links_before,
        "the node's own links are untouched"
    );
}

#[test]
fn a_static_pod_that_completes_is_shown_succeeded_on_its_mirror_and_not_restarted() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    put_manifest(
        &lab,
        "job.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: job\nspec:\n  restartPolicy: Never\n  containers:\n  - name: once\n    image: {}\n    command: [sh, -c, \"echo done\"]\n",
            lab.image
        ),
    );
    let pod = lab.wait_pod(
        &mirror_name(&lab, "job"),
        "Succeeded",
        Duration::from_secs(90),
        |p| p["status"]["phase"] == "Succeeded",
    );
    let c = &pod["status"]["containerStatuses"][0];
    assert_eq!(c["state"]["terminated"]["exitCode"], 0, "{c}");
    assert_eq!(c["restartCount"], 0);
    // Its IP is released once it finished (upstream SyncTerminatedPod), and it stays Succeeded.
    wait_for(
        "the finished pod's IP to be released",
        Duration::from_secs(30),
        || lab.ip_reservations().is_empty().then_some(()),
    );
    let later = lab.pod(&mirror_name(&lab, "job")).expect("mirror pod");
    assert_eq!(later["status"]["phase"], "Succeeded");
    assert_eq!(later["status"]["containerStatuses"][0]["restartCount"], 0);
}
