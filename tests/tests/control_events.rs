//! Events expire after `--event-ttl` (kube-apiserver keeps them an hour by default; an etcd lease deletes them),
//! while other objects stay.

use std::time::{Duration, Instant};

use windlass_tests::control::ControlPlane;
use windlass_tests::{require_privileged, wait_for};

const EVENT: &str = r#"apiVersion: v1
kind: Event
metadata:
  name: web.1
involvedObject:
  kind: Pod
  name: web
  namespace: default
reason: Started
message: Started container web
type: Normal
"#;

#[test]
fn events_disappear_after_the_event_ttl_and_other_objects_stay() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start_with(|_| vec!["--event-ttl".into(), "0h0m3s".into()]);
    let created = Instant::now();
    cp.kubectl_stdin_ok(&["create", "-f", "-"], EVENT);
    cp.kubectl_ok(&["create", "configmap", "settings", "--from-literal=a=b"]);
    let listed = cp.kubectl_ok(&["get", "events", "-o", "name"]);
    assert!(listed.contains("event/web.1"), "{listed}");
    // An update (as the event recorder's count bump) keeps the deadline.
    cp.kubectl_ok(&[
        "patch",
        "event",
        "web.1",
        "--type=merge",
        "-p",
        r#"{"count": 2}"#,
    ]);

    wait_for("the event to expire", Duration::from_secs(30), || {
        cp.kubectl_ok(&["get", "events", "-o", "name"])
            .trim()
            .is_empty()
            .then_some(())
    });
    assert!(
        created.elapsed() >= Duration::from_millis(2500),
        "the event went away after {:?}, before its 3 s TTL",
        created.elapsed()
    );
    let err = cp.kubectl_err(&["get", "event", "web.1"]);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
    cp.kubectl_ok(&["get", "configmap", "settings"]);
}
