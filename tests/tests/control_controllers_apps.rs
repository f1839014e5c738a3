//! The ReplicaSet, Deployment, garbage-collector and namespace controllers against a real `windlass-control serve`,
//! driven and observed with the real `kubectl`. There is no kubelet: the test plays it, marking pods Running and
//! Ready a moment after they appear (pods whose image contains `never-ready` stay Pending).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use windlass_control::controllers::{Context, ControllersConfig, CONTROLLERS};
use windlass_tests::control::ControlPlane;
use windlass_tests::{require_privileged, wait_for, workspace_binary};

const WAIT: Duration = Duration::from_secs(60);

/// A control plane with the four controllers running in this process and a pretend kubelet.
struct Lab {
    // Dropped first: the controllers stop before the server does.
    rt: tokio::runtime::Runtime,
    client: Client,
    cp: ControlPlane,
}

impl Lab {
    fn start(ready_after: Duration) -> Self {
        windlass_tests::install_rustls_provider();
        // When `serve` runs controllers itself, it must not run these too (two ReplicaSet controllers would
        // both create pods): this process runs them, with the test's timing.
        let help = std::process::Command::new(workspace_binary("windlass-control"))
            .args(["serve", "--help"])
            .output()
            .expect("windlass-control serve --help");
        let own_controllers = String::from_utf8_lossy(&help.stdout).contains("--controllers");
        let cp = ControlPlane::start_with(|_| {
            if own_controllers {
                // The service account controller stays on there: pods need their `default` ServiceAccount.
                vec!["--controllers=serviceaccount,root-ca-cert-publisher".into()]
            } else {
                Vec::new()
            }
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = rt.block_on(cp.kube_client());
        let config = Arc::new(ControllersConfig::default());
        for name in ["replicaset", "deployment", "garbagecollector", "namespace"] {
            let entry = CONTROLLERS
                .iter()
                .find(|c| c.name == name)
                .unwrap_or_else(|| panic!("controller {name} is registered"));
            let fut = (entry.start)(Context {
                client: client.clone(),
                config: config.clone(),
            });
            rt.spawn(async move {
                if let Err(e) = fut.await {
                    eprintln!("controller {name} stopped: {e}");
                }
            });
        }
        rt.spawn(fake_kubelet(client.clone(), ready_after));
        Lab { rt, client, cp }
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.cp.kubectl_ok(args)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&a)).expect("kubectl -o json")
    }

    /// Pods in `ns` with `selector` that are not being deleted.
    fn pods(&self, ns: &str, selector: &str) -> Vec<Value> {
        self.json(&["get", "pods", "-n", ns, "-l", selector])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
            .collect()
    }

    fn wait_pods(&self, ns: &str, selector: &str, n: usize) -> Vec<Value> {
        wait_for(&format!("{n} pods with {selector} in {ns}"), WAIT, || {
            let pods = self.pods(ns, selector);
            (pods.len() == n).then_some(pods)
        })
    }

    fn wait_gone(&self, what: &str, args: &[&str]) {
        wait_for(what, WAIT, || {
            let out = self.cp.kubectl(args);
            let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (!out.status.success() || stdout.is_empty()).then_some(())
        });
    }
}

/// Plays kubelet: a pod becomes Running and Ready `ready_after` after it was created.
async fn fake_kubelet(client: Client, ready_after: Duration) {
    let pods: Api<Pod> = Api::all(client.clone());
    loop {
        if let Ok(list) = pods.list(&ListParams::default()).await {
            for p in list.items {
                let ready = p
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let never = p.spec.as_ref().is_some_and(|s| {
                    s.containers.iter().any(|c| {
                        c.image
                            .as_deref()
                            .unwrap_or_default()
                            .contains("never-ready")
                    })
                });
                let age = p
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| jiff::Timestamp::now().duration_since(t.0))
                    .unwrap_or_default();
                if ready
                    || never
                    || p.metadata.deletion_timestamp.is_some()
                    || age < jiff::SignedDuration::try_from(ready_after).unwrap_or_default()
                {
                    continue;
                }
                let now = jiff::Timestamp::now().to_string();
                let status = json!({"status": {"phase": "Running", "conditions": [
                    {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                ]}});
                let api: Api<Pod> =
                    Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
                let _ = api
                    .patch_status(
                        &p.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&status),
                    )
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn owner_of(obj: &Value) -> (String, String, bool, bool) {
    let r = &obj["metadata"]["ownerReferences"][0];
    (
        r["kind"].as_str().unwrap_or_default().to_string(),
        r["name"].as_str().unwrap_or_default().to_string(),
        r["controller"].as_bool().unwrap_or(false),
        r["blockOwnerDeletion"].as_bool().unwrap_or(false),
    )
}

fn image_of(pod: &Value) -> String {
    pod.pointer("/spec/containers/0/image")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_deployment_gets_owned_pods_and_follows_kubectl_scale() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let lab = Lab::start(Duration::from_millis(100));
    lab.kubectl(&[
        "create",
        "deployment",
        "web",
        "--image=busybox:v1",
        "--replicas=3",
    ]);
    let pods = lab.wait_pods("default", "app=web", 3);
    let rs = lab.json(&["get", "replicasets", "-l", "app=web"])["items"][0].clone();
    let rs_name = rs["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let hash = rs["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        rs_name,
        format!("web-{hash}"),
        "ReplicaSets are named after the template hash"
    );
    assert_eq!(
        owner_of(&rs),
        ("Deployment".into(), "web".into(), true, true)
    );
    assert_eq!(
        rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "1"
    );
    for p in &pods {
        assert_eq!(
            owner_of(p),
            ("ReplicaSet".into(), rs_name.clone(), true, true)
        );
        assert_eq!(p["metadata"]["labels"]["pod-template-hash"], hash.as_str());
    }
    lab.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let d = lab.json(&["get", "deployment", "web"]);
    assert_eq!(d["status"]["readyReplicas"], 3);
    assert_eq!(d["status"]["availableReplicas"], 3);
    assert_eq!(
        d["status"]["observedGeneration"],
        d["metadata"]["generation"]
    );
    let available = d["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Available")
        .cloned()
        .unwrap_or_default();
    assert_eq!(available["status"], "True");

    lab.kubectl(&["scale", "deployment/web", "--replicas=5"]);
    lab.wait_pods("default", "app=web", 5);
    lab.kubectl(&["scale", "deployment/web", "--replicas=2"]);
    lab.wait_pods("default", "app=web", 2);
    lab.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let out = lab.kubectl(&["get", "deployment", "web"]);
    assert!(out.contains("2/2"), "kubectl get shows 2/2 ready:\n{out}");
    let sets = lab.json(&["get", "replicasets", "-l", "app=web"]);
    assert_eq!(
        sets["items"].as_array().map(Vec::len),
        Some(1),
        "scaling makes no new ReplicaSet"
    );

    // What happened is in the events `kubectl describe` shows.
    wait_for("the scaling events", WAIT, || {
        let d = lab.kubectl(&["describe", "deployment", "web"]);
        (d.contains("ScalingReplicaSet")
            && d.contains(&format!("Scaled up replica set {rs_name} from 0 to 3"))
            && d.contains(&format!("Scaled down replica set {rs_name} from 5 to 2")))
        .then_some(())
    });
    let described = lab.kubectl(&["describe", "replicaset", &rs_name]);
    assert!(
        described.contains("SuccessfulCreate") && described.contains("SuccessfulDelete"),
        "ReplicaSet events:\n{described}"
    );
}

#[test]
fn a_rolling_update_stays_within_its_surge_and_unavailability_and_rolls_back_with_undo() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    // Pods take a while to become ready, so the rollout goes in several steps.
    let lab = Lab::start(Duration::from_millis(700));
    // 4 replicas with the default 25%/25%: at most 5 pods, at least 3 ready.
    lab.kubectl(&[
        "create",
        "deployment",
        "web",
        "--image=busybox:v1",
        "--replicas=4",
    ]);
    lab.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    lab.wait_pods("default", "app=web", 4);

    // Sample what a user would see during the rollout.
    let samples = Arc::new(Mutex::new((0usize, usize::MAX, 0usize)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (samples, stop, client) = (samples.clone(), stop.clone(), lab.client.clone());
        lab.rt.spawn(async move {
            let pods: Api<Pod> = Api::namespaced(client, "default");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(list) = pods.list(&ListParams::default().labels("app=web")).await {
                    let live: Vec<&Pod> = list
                        .items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                        .collect();
                    let ready = live
                        .iter()
                        .filter(|p| {
                            p.status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|c| {
                                    c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                                })
                        })
                        .count();
                    let mut s = samples.lock().unwrap_or_else(|p| p.into_inner());
                    s.0 = s.0.max(live.len());
                    s.1 = s.1.min(ready);
                    s.2 += 1;
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    lab.kubectl(&["set", "image", "deployment/web", "busybox=busybox:v2"]);
    lab.kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = lab.rt.block_on(sampler);
    let (max_pods, min_ready, n) = *samples.lock().unwrap_or_else(|p| p.into_inner());
    assert!(n > 10, "sampled the rollout ({n} samples)");
    assert!(
        max_pods <= 5,
        "never more than replicas + maxSurge pods (saw {max_pods})"
    );
    assert!(
        min_ready >= 3,
        "never fewer than replicas - maxUnavailable ready (saw {min_ready})"
    );
    let pods = lab.wait_pods("default", "app=web", 4);
    assert!(pods.iter().all(|p| image_of(p) == "busybox:v2"));

    let history = lab.kubectl(&["rollout", "history", "deployment/web"]);
    let revisions: BTreeSet<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(revisions, BTreeSet::from(["1", "2"]), "history:\n{history}");
    let rev1 = lab.kubectl(&["rollout", "history", "deployment/web", "--revision=1"]);
    assert!(
        rev1.contains("busybox:v1"),
        "revision 1 shows its template:\n{rev1}"
    );

    lab.kubectl(&["rollout", "undo", "deployment/web"]);
    lab.kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    let d = lab.json(&["get", "deployment", "web"]);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "busybox:v1"
    );
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    let pods = lab.wait_pods("default", "app=web", 4);
    assert!(
        pods.iter().all(|p| image_of(p) == "busybox:v1"),
        "undo brings v1 pods back"
    );
    let sets = lab.json(&["get", "replicasets", "-l", "app=web"]);
    let items = sets["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 2, "undo reuses v1's ReplicaSet");
    let v1 = items
        .iter()
        .find(|r| r["spec"]["template"]["spec"]["containers"][0]["image"] == "busybox:v1")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        v1["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    assert_eq!(
        v1["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"],
        "1"
    );
    let history = lab.kubectl(&["rollout", "history", "deployment/web"]);
    assert!(
        history.contains('2') && history.contains('3'),
        "history after undo:\n{history}"
    );
}

#[test]
fn pause_resume_and_restart_control_when_a_deployment_rolls() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let lab = Lab::start(Duration::from_millis(100));
    lab.kubectl(&[
        "create",
        "deployment",
        "app",
        "--image=busybox:v1",
        "--replicas=2",
    ]);
    lab.kubectl(&["rollout", "status", "deployment/app", "--timeout=60s"]);
    lab.kubectl(&["rollout", "pause", "deployment/app"]);
    lab.kubectl(&["set", "image", "deployment/app", "busybox=busybox:v2"]);
    wait_for("the paused condition", WAIT, || {
        let d = lab.json(&["get", "deployment", "app"]);
        let reason = d["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Progressing")
            .map(|c| c["reason"].clone());
        (reason == Some(json!("DeploymentPaused"))
            && d["status"]["observedGeneration"] == d["metadata"]["generation"])
            .then_some(())
    });
    let sets = lab.json(&["get", "replicasets", "-l", "app=app"]);
    assert_eq!(
        sets["items"].as_array().map(Vec::len),
        Some(1),
        "a paused deployment does not roll"
    );

    lab.kubectl(&["rollout", "resume", "deployment/app"]);
    lab.kubectl(&["rollout", "status", "deployment/app", "--timeout=60s"]);
    let pods = lab.wait_pods("default", "app=app", 2);
    assert!(pods.iter().all(|p| image_of(p) == "busybox:v2"));

    lab.kubectl(&["rollout", "restart", "deployment/app"]);
    lab.kubectl(&["rollout", "status", "deployment/app", "--timeout=60s"]);
    let sets = lab.json(&["get", "replicasets", "-l", "app=app"]);
    assert_eq!(
        sets["items"].as_array().map(Vec::len),
        Some(3),
        "restart rolls a new ReplicaSet"
    );
    let d = lab.json(&["get", "deployment", "app"]);
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
}

#[test]
fn a_rollout_that_makes_no_progress_exceeds_its_deadline() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let lab = Lab::start(Duration::from_millis(100));
    lab.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "stuck"},
            "spec": {"replicas": 2, "progressDeadlineSeconds": 3,
                "selector": {"matchLabels": {"app": "stuck"}},
                "template": {"metadata": {"labels": {"app": "stuck"}},
                    "spec": {"containers": [{"name": "c", "image": "never-ready:v1"}]}}}}"#,
    );
    let out = lab
        .cp
        .kubectl(&["rollout", "status", "deployment/stuck", "--timeout=60s"]);
    assert!(!out.status.success(), "rollout status fails");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exceeded its progress deadline"),
        "kubectl says why: {stderr}"
    );
    let d = lab.json(&["get", "deployment", "stuck"]);
    let progressing = d["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Progressing")
        .cloned()
        .unwrap_or_default();
    assert_eq!(progressing["status"], "False");
    assert_eq!(progressing["reason"], "ProgressDeadlineExceeded");
}

impl Lab {
    fn kubectl_stdin(&self, args: &[&str], manifest: &str) -> String {
        self.cp.kubectl_stdin_ok(args, manifest)
    }
}

#[test]
fn a_replicaset_adopts_matching_orphans_and_releases_pods_that_stop_matching() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let lab = Lab::start(Duration::from_millis(100));
    lab.kubectl(&["run", "stray", "--image=busybox", "--labels=app=db"]);
    lab.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "db"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "db"}},
                "template": {"metadata": {"labels": {"app": "db"}},
                    "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}"#,
    );
    let pods = lab.wait_pods("default", "app=db", 2);
    assert!(
        pods.iter().any(|p| p["metadata"]["name"] == "stray"),
        "the orphan is kept"
    );
    wait_for("the orphan to be adopted", WAIT, || {
        let p = lab.json(&["get", "pod", "stray"]);
        (owner_of(&p) == ("ReplicaSet".into(), "db".into(), true, true)).then_some(())
    });

    lab.kubectl(&["label", "pod", "stray", "app=other", "--overwrite"]);
    wait_for("the relabelled pod to be released", WAIT, || {
        let p = lab.json(&["get", "pod", "stray"]);
        p["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(Vec::is_empty)
            .then_some(())
    });
    let pods = lab.wait_pods("default", "app=db", 2);
    assert!(
        pods.iter().all(|p| p["metadata"]["name"] != "stray"),
        "a replacement was made"
    );
    wait_for("status to count ready replicas", WAIT, || {
        let rs = lab.json(&["get", "replicaset", "db"]);
        (rs["status"]["readyReplicas"] == 2 && rs["status"]["fullyLabeledReplicas"] == 2)
            .then_some(())
    });
}

#[test]
fn deleting_a_deployment_cascades_in_the_background_and_orphan_keeps_its_pods() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let lab = Lab::start(Duration::from_millis(100));
    lab.kubectl(&[
        "create",
        "deployment",
        "gone",
        "--image=busybox",
        "--replicas=2",
    ]);
    lab.kubectl(&[
        "create",
        "deployment",
        "kept",
        "--image=busybox",
        "--replicas=2",
    ]);
    lab.wait_pods("default", "app=gone", 2);
    lab.wait_pods("default", "app=kept", 2);

    lab.kubectl(&["delete", "deployment", "gone"]);
    lab.wait_gone(
        "the deleted deployment's ReplicaSets",
        &["get", "replicasets", "-l", "app=gone", "-o", "name"],
    );
    lab.wait_pods("default", "app=gone", 0);

    lab.kubectl(&["delete", "deployment", "kept", "--cascade=orphan"]);
    lab.wait_gone(
        "the orphaning deployment",
        &["get", "deployment", "kept", "-o", "name"],
    );
    let sets = lab.json(&["get", "replicasets", "-l", "app=kept"]);
    let items = sets["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "the ReplicaSet stays");
    wait_for(
        "the orphaned ReplicaSet to lose its owner reference",
        WAIT,
        || {
            let rs = lab.json(&["get", "replicasets", "-l", "app=kept"])["items"][0].clone();
            rs["metadata"]["ownerReferences"]
                .as_array()
                .is_none_or(Vec::is_empty)
                .then_some(())
        },
    );
    // Still running its pods, and still a ReplicaSet that keeps them.
    let pods = lab.pods("default", "app=kept");
    assert_eq!(pods.len(), 2);
    lab.kubectl(&[
        "delete",
        "pod",
        pods[0]["metadata"]["name"].as_str().unwrap_or_default(),
    ]);
    lab.wait_pods("default", "app=kept", 2);
}

#[test]
fn foreground_deletion_removes_the_dependents_before_the_deployment() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let lab = Lab::start(Duration::from_millis(100));
    lab.kubectl(&[
        "create",
        "deployment",
        "fg",
        "--image=busybox",
        "--replicas=3",
    ]);
    lab.wait_pods("default", "app=fg", 3);
    // Watch the deployment while it is deleted: it must still exist (with the foregroundDeletion finalizer)
    // while its pods do.
    let seen = Arc::new(Mutex::new(Vec::<(bool, usize)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (seen, stop, client) = (seen.clone(), stop.clone(), lab.client.clone());
        lab.rt.spawn(async move {
            let deps: Api<k8s_openapi::api::apps::v1::Deployment> =
                Api::namespaced(client.clone(), "default");
            let pods: Api<Pod> = Api::namespaced(client, "default");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Pods first: a deployment seen afterwards existed while that many pods did.
                let n = pods
                    .list(&ListParams::default().labels("app=fg"))
                    .await
                    .map(|l| l.items.len())
                    .unwrap_or(0);
                if let Ok(Some(d)) = deps.get_opt("fg").await {
                    let fg = d.finalizers().iter().any(|f| f == "foregroundDeletion");
                    seen.lock().unwrap_or_else(|p| p.into_inner()).push((fg, n));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // kubectl waits until the deployment is gone; by then its pods and ReplicaSet must be gone too.
    lab.kubectl(&[
        "delete",
        "deployment",
        "fg",
        "--cascade=foreground",
        "--timeout=60s",
    ]);
    let pods_left = lab.pods("default", "app=fg").len();
    let sets_left = lab.kubectl(&["get", "replicasets", "-l", "app=fg", "-o", "name"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = lab.rt.block_on(watcher);
    assert_eq!(
        pods_left, 0,
        "no pod outlives a foreground-deleted deployment"
    );
    assert!(
        sets_left.trim().is_empty(),
        "nor its ReplicaSet: {sets_left}"
    );
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        seen.iter().any(|(fg, _)| *fg),
        "the deployment waited with the foregroundDeletion finalizer: {seen:?}"
    );
}

#[test]
fn a_recreate_deployment_never_runs_old_and_new_pods_together() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let lab = Lab::start(Duration::from_millis(300));
    lab.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "rc"},
            "spec": {"replicas": 3, "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": {"app": "rc"}},
                "template": {"metadata": {"labels": {"app": "rc"}},
                    "spec": {"containers": [{"name": "c", "image": "busybox:v1"}]}}}}"#,
    );
    lab.kubectl(&["rollout", "status", "deployment/rc", "--timeout=60s"]);
    let mixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (mixed, stop, client) = (mixed.clone(), stop.clone(), lab.client.clone());
        lab.rt.spawn(async move {
            let pods: Api<Pod> = Api::namespaced(client, "default");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(list) = pods.list(&ListParams::default().labels("app=rc")).await {
                    let images: BTreeSet<String> = list
                        .items
                        .iter()
                        .filter_map(|p| p.spec.as_ref()?.containers[0].image.clone())
                        .collect();
                    if images.len() > 1 {
                        mixed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    lab.kubectl(&["set", "image", "deployment/rc", "c=busybox:v2"]);
    lab.kubectl(&["rollout", "status", "deployment/rc", "--timeout=60s"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = lab.rt.block_on(sampler);
    assert!(
        !mixed.load(std::sync::atomic::Ordering::Relaxed),
        "old and new pods never coexist"
    );
    let pods = lab.wait_pods("default", "app=rc", 3);
    assert!(pods.iter().all(|p| image_of(p) == "busybox:v2"));
}

#[test]
fn deleting_a_namespace_removes_everything_in_it_and_then_the_namespace() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let lab = Lab::start(Duration::from_millis(100));
    lab.kubectl(&["create", "namespace", "team"]);
    lab.kubectl(&[
        "create",
        "deployment",
        "web",
        "--image=busybox",
        "--replicas=2",
        "-n",
        "team",
    ]);
    lab.kubectl(&[
        "create",
        "configmap",
        "settings",
        "--from-literal=a=b",
        "-n",
        "team",
    ]);
    lab.kubectl(&[
        "create",
        "service",
        "clusterip",
        "web",
        "--tcp=80:80",
        "-n",
        "team",
    ]);
    lab.wait_pods("team", "app=web", 2);
    let ns = lab.json(&["get", "namespace", "team"]);
    assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]));

    lab.kubectl(&["delete", "namespace", "team", "--timeout=60s"]);
    let out = lab.cp.kubectl(&["get", "namespace", "team"]);
    assert!(!out.status.success(), "the namespace is gone");
    for kind in [
        "pods",
        "replicasets",
        "deployments",
        "configmaps",
        "services",
    ] {
        let left = lab.kubectl(&["get", kind, "-n", "team", "-o", "name"]);
        assert!(left.trim().is_empty(), "no {kind} left: {left}");
    }
    // Other namespaces are untouched.
    lab.kubectl(&["get", "namespace", "default"]);
}

#[test]
fn scaling_a_deployment_mid_rollout_spreads_the_new_replicas_proportionally() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let lab = Lab::start(Duration::from_millis(100));
    lab.kubectl(&[
        "create",
        "deployment",
        "mid",
        "--image=busybox:v1",
        "--replicas=4",
    ]);
    lab.kubectl(&["rollout", "status", "deployment/mid", "--timeout=60s"]);
    // v2 never becomes ready: with 4 replicas, surge 1 and unavailable 1 the rollout stops at 3 old + 2 new.
    lab.kubectl(&["set", "image", "deployment/mid", "busybox=never-ready:v2"]);
    let sizes = |lab: &Lab| -> (i64, i64) {
        let sets = lab.json(&["get", "replicasets", "-l", "app=mid"]);
        let mut old_new = (0, 0);
        for rs in sets["items"].as_array().into_iter().flatten() {
            let n = rs["spec"]["replicas"].as_i64().unwrap_or(0);
            if rs["spec"]["template"]["spec"]["containers"][0]["image"] == "busybox:v1" {
                old_new.0 = n;
            } else {
                old_new.1 = n;
            }
        }
        old_new
    };
    wait_for("the rollout to stall at 3 old + 2 new", WAIT, || {
        (sizes(&lab) == (3, 2)).then_some(())
    });
    // Scaling to 8 (surge 2: up to 10) adds 5, shared 3:2 like the sets' sizes (upstream rounds 3*10/5, 2*10/5).
    lab.kubectl(&["scale", "deployment/mid", "--replicas=8"]);
    wait_for("proportional sizes 6 old + 4 new", WAIT, || {
        (sizes(&lab) == (6, 4)).then_some(())
    });
    lab.wait_pods("default", "app=mid", 10);
    let sets = lab.json(&["get", "replicasets", "-l", "app=mid"]);
    for rs in sets["items"].as_array().into_iter().flatten() {
        assert_eq!(
            rs["metadata"]["annotations"]["deployment.kubernetes.io/desired-replicas"],
            "8"
        );
        assert_eq!(
            rs["metadata"]["annotations"]["deployment.kubernetes.io/max-replicas"],
            "10"
        );
    }
}

#[test]
fn a_namespace_waits_in_terminating_for_finalizers_and_says_why() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let lab = Lab::start(Duration::from_millis(100));
    lab.kubectl(&["create", "namespace", "hold"]);
    lab.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "held", "namespace": "hold", "finalizers": ["example.com/hold"]},
            "data": {"a": "b"}}"#,
    );
    lab.kubectl(&["delete", "namespace", "hold", "--wait=false"]);
    let ns = wait_for("the namespace to report what holds it", WAIT, || {
        let ns = lab.json(&["get", "namespace", "hold"]);
        let held = ns["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c["type"] == "NamespaceFinalizersRemaining"
                    && c["status"] == "True"
                    && c["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("example.com/hold in 1 resource instances"))
            });
        held.then_some(ns)
    });
    assert_eq!(ns["status"]["phase"], "Terminating");
    let refused = lab.cp.kubectl_err(&[
        "create",
        "configmap",
        "late",
        "--from-literal=a=b",
        "-n",
        "hold",
    ]);
    assert!(
        refused.contains("being terminated"),
        "creating in a terminating namespace fails: {refused}"
    );

    lab.kubectl(&[
        "patch",
        "configmap",
        "held",
        "-n",
        "hold",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    lab.wait_gone("the namespace", &["get", "namespace", "hold", "-o", "name"]);
}
