//! The watch protocol on the wire (what kube-rs and client-go rely on), driven with `kubectl get --raw`, and the
//! binding subresource the scheduler uses.

use std::time::{Duration, Instant};

use serde_json::Value;
use windlass_tests::control::ControlPlane;
use windlass_tests::require_privileged;

fn lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("watch line is not JSON ({e}): {l}"))
        })
        .collect()
}

#[test]
fn watch_honours_timeout_initial_events_bookmarks_and_expiry() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    // The root-ca-cert-publisher would add its `kube-root-ca.crt` to the ConfigMaps this test counts.
    let mut cp =
        ControlPlane::start_with(|_| vec!["--controllers=*,-root-ca-cert-publisher".into()]);
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: one\ndata: {a: b}\n";
    cp.kubectl_stdin_ok(&["create", "-f", "-"], cm);
    let list: Value = serde_json::from_str(&cp.kubectl_ok(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/configmaps",
    ]))
    .expect("list");
    let list_rv: i64 = list["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("list rv");

    // timeoutSeconds ends the stream cleanly; resourceVersion unset gives the current objects as ADDED.
    let started = Instant::now();
    let out = cp.kubectl_ok(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=1",
    ]);
    assert!(started.elapsed() < Duration::from_secs(10));
    let events = lines(&out);
    assert_eq!(events.len(), 1, "{out}");
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "one");

    // Streaming list: initial events, then a bookmark marking their end at the list revision.
    let out = cp.kubectl_ok(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/configmaps?watch=1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1",
    ]);
    let events = lines(&out);
    assert_eq!(events.len(), 2, "{out}");
    assert_eq!(events[1]["type"], "BOOKMARK");
    assert_eq!(events[1]["object"]["kind"], "ConfigMap");
    assert_eq!(
        events[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    let bookmark_rv: i64 = events[1]["object"]["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("rv");
    assert!(bookmark_rv >= list_rv);

    // From a resourceVersion: only later changes, with the right types, in order.
    cp.kubectl_ok(&["label", "cm", "one", "x=1"]);
    cp.kubectl_ok(&["delete", "cm", "one"]);
    let out = cp.kubectl_ok(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={list_rv}&timeoutSeconds=1"),
    ]);
    let types: Vec<String> = lines(&out)
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(types, ["MODIFIED", "DELETED"], "{out}");

    // History that is gone (the embedded store's from before a restart; etcd's once compacted): HTTP 200 with an
    // in-stream 410 Expired.
    cp.restart();
    if let Some(url) = cp.etcd_url() {
        windlass_tests::run_ok(
            std::process::Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", url, "compact", &(list_rv + 2).to_string()]),
        );
    }
    let out = cp.kubectl_ok(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={list_rv}&timeoutSeconds=5"),
    ]);
    let events = lines(&out);
    assert_eq!(events.len(), 1, "{out}");
    assert_eq!(events[0]["type"], "ERROR");
    assert_eq!(events[0]["object"]["code"], 410);
    assert_eq!(events[0]["object"]["reason"], "Expired");
}

#[test]
fn binding_assigns_a_pod_to_a_node_once() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - {name: c, image: busybox}\n";
    cp.kubectl_stdin_ok(&["create", "-f", "-"], pod);
    let binding = r#"{"apiVersion":"v1","kind":"Binding","metadata":{"name":"p"},"target":{"kind":"Node","name":"n1"}}"#;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("binding.json");
    std::fs::write(&file, binding).expect("write binding");
    let path = "/api/v1/namespaces/default/pods/p/binding";
    cp.kubectl_ok(&["create", "--raw", path, "-f", file.to_str().expect("utf-8")]);
    let p: Value =
        serde_json::from_str(&cp.kubectl_ok(&["get", "pod", "p", "-o", "json"])).expect("pod");
    assert_eq!(p["spec"]["nodeName"], "n1");
    let scheduled = p["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .any(|c| c["type"] == "PodScheduled" && c["status"] == "True");
    assert!(scheduled, "{p}");
    let err = cp.kubectl_err(&["create", "--raw", path, "-f", file.to_str().expect("utf-8")]);
    assert!(err.contains("already assigned"), "{err}");
}
