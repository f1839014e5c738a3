//! Filters, scores and the FailedScheduling message of the scheduling algorithm, on in-memory nodes and pods.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};
use windlass_control::scheduler::{Cache, PodRequest, ScheduleError, Scheduler};

fn node(name: &str, cpu: &str, mem: &str, extra: Value) -> Node {
    let mut n = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "allocatable": {"cpu": cpu, "memory": mem, "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    });
    merge(&mut n, extra);
    serde_json::from_value(n).expect("should succeed")
}

fn pod(name: &str, cpu: &str, mem: &str, extra: Value) -> Pod {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox",
            "resources": {"requests": {"cpu": cpu, "memory": mem}}}]}
    });
    merge(&mut p, extra);
    serde_json::from_value(p).expect("should succeed")
}

/// JSON merge patch (RFC 7386), enough to vary fixtures.
fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    merge(b.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p,
    }
}

fn cache_of(nodes: &[Node]) -> Cache {
    let mut c = Cache::new();
    for n in nodes {
        c.upsert_node(n).expect("should succeed");
    }
    c
}

fn place(cache: &Cache, p: &Pod) -> Result<String, ScheduleError> {
    let req = PodRequest::from_pod(p).expect("should succeed");
    Scheduler::with_seed(7)
        .schedule(cache, &req)
        .map(|pl| pl.node)
}

fn message(cache: &Cache, p: &Pod) -> String {
    match place(cache, p) {
        Err(e) => e.to_string(),
        Ok(n) => panic!("expected no fit, got {n}"),
    }
}

#[test]
fn pod_goes_to_the_only_node_with_enough_cpu_and_memory() {
    let cache = cache_of(&[
        node("small", "1", "1Gi", json!({})),
        node("big", "4", "8Gi", json!({})),
    ]);
    assert_eq!(
        place(&cache, &pod("p", "2", "1Gi", json!({}))).expect("should succeed"),
        "big"
    );
}

#[test]
fn requests_of_placed_pods_are_subtracted_and_freed_on_removal() {
    let mut cache = cache_of(&[node("a", "2", "4Gi", json!({}))]);
    let mut s = Scheduler::with_seed(1);
    let first =
        PodRequest::from_pod(&pod("first", "1500m", "1Gi", json!({}))).expect("should succeed");
    let node = s.schedule(&cache, &first).expect("should succeed").node;
    cache.assume(&first, &node);
    let second =
        PodRequest::from_pod(&pod("second", "1", "1Gi", json!({}))).expect("should succeed");
    assert_eq!(
        s.schedule(&cache, &second)
            .expect_err("should fail")
            .to_string(),
        "0/1 nodes are available: 1 Insufficient cpu."
    );
    cache.remove_pod("default/first");
    assert_eq!(
        s.schedule(&cache, &second).expect("should succeed").node,
        "a"
    );
}

#[test]
fn pods_bound_elsewhere_count_against_their_node() {
    let mut cache = cache_of(&[
        node("a", "1", "1Gi", json!({})),
        node("b", "1", "1Gi", json!({})),
    ]);
    cache
        .add_pod(&pod(
            "running",
            "900m",
            "10Mi",
            json!({"spec": {"nodeName": "a"}}),
        ))
        .expect("should succeed");
    assert_eq!(
        place(&cache, &pod("p", "500m", "10Mi", json!({}))).expect("should succeed"),
        "b"
    );
}

#[test]
fn memory_shortage_and_pod_count_are_reported_with_upstream_wording() {
    let cache = cache_of(&[
        node("a", "4", "1Gi", json!({})),
        node(
            "b",
            "4",
            "8Gi",
            json!({"status": {"allocatable": {"pods": "0"}}}),
        ),
    ]);
    assert_eq!(
        message(&cache, &pod("p", "1", "2Gi", json!({}))),
        "0/2 nodes are available: 1 Insufficient memory, 1 Too many pods."
    );
}

#[test]
fn a_node_short_of_both_cpu_and_memory_counts_under_both_reasons() {
    let cache = cache_of(&[node("a", "1", "1Gi", json!({}))]);
    assert_eq!(
        message(&cache, &pod("p", "2", "2Gi", json!({}))),
        "0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient memory."
    );
}

#[test]
fn init_containers_count_by_their_largest_phase_and_sidecars_add_up() {
    let cache = cache_of(&[node("a", "2", "8Gi", json!({}))]);
    // App containers 1 cpu; a plain init container of 1.5 cpu runs alone: the pod needs 1.5 cpu and fits.
    let init = pod(
        "p",
        "1",
        "1Mi",
        json!({"spec": {"initContainers": [{"name": "i", "image": "x",
            "resources": {"requests": {"cpu": "1500m"}}}]}}),
    );
    assert_eq!(place(&cache, &init).expect("should succeed"), "a");
    // A sidecar (restartPolicy Always) of 1.5 cpu keeps running next to the 1 cpu app: 2.5 cpu, no fit.
    let sidecar = pod(
        "p",
        "1",
        "1Mi",
        json!({"spec": {"initContainers": [{"name": "i", "image": "x", "restartPolicy": "Always",
            "resources": {"requests": {"cpu": "1500m"}}}]}}),
    );
    assert_eq!(
        message(&cache, &sidecar),
        "0/1 nodes are available: 1 Insufficient cpu."
    );
}

#[test]
fn pod_overhead_is_added_to_requests() {
    let cache = cache_of(&[node("a", "1", "8Gi", json!({}))]);
    let p = pod(
        "p",
        "900m",
        "1Mi",
        json!({"spec": {"overhead": {"cpu": "200m"}}}),
    );
    assert_eq!(
        message(&cache, &p),
        "0/1 nodes are available: 1 Insufficient cpu."
    );
}

#[test]
fn cordoned_nodes_are_skipped_unless_the_pod_tolerates_unschedulable() {
    let cache = cache_of(&[node(
        "a",
        "4",
        "4Gi",
        json!({"spec": {"unschedulable": true}}),
    )]);
    assert_eq!(
        message(&cache, &pod("p", "1", "1Mi", json!({}))),
        "0/1 nodes are available: 1 node(s) were unschedulable."
    );
    let tolerant = pod(
        "p",
        "1",
        "1Mi",
        json!({"spec": {"tolerations": [{"key": "node.kubernetes.io/unschedulable", "operator": "Exists",
            "effect": "NoSchedule"}]}}),
    );
    assert_eq!(place(&cache, &tolerant).expect("should succeed"), "a");
}

#[test]
fn not_ready_and_unknown_nodes_are_treated_as_tainted_like_upstream() {
    let cache = cache_of(&[
        node(
            "down",
            "4",
            "4Gi",
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        ),
        node(
            "silent",
            "4",
            "4Gi",
            json!({"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}),
        ),
    ]);
    assert_eq!(
        message(&cache, &pod("p", "1", "1Mi", json!({}))),
        "0/2 nodes are available: 1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }, \
         1 node(s) had untolerated taint {node.kubernetes.io/unreachable: }."
    );
}

#[test]
fn spec_node_name_pins_the_pod() {
    let cache = cache_of(&[
        node("a", "4", "4Gi", json!({})),
        node("b", "4", "4Gi", json!({})),
    ]);
    assert_eq!(
        place(
            &cache,
            &pod("p", "1", "1Mi", json!({"spec": {"nodeName": "b"}}))
        )
        .expect("should succeed"),
        "b"
    );
    assert_eq!(
        message(
            &cache,
            &pod("p", "1", "1Mi", json!({"spec": {"nodeName": "c"}}))
        ),
        "0/2 nodes are available: 2 node(s) didn't match the requested node name."
    );
}

#[test]
fn node_selector_must_match_all_labels() {
    let cache = cache_of(&[
        node(
            "ssd",
            "4",
            "4Gi",
            json!({"metadata": {"labels": {"disk": "ssd", "zone": "a"}}}),
        ),
        node(
            "hdd",
            "4",
            "4Gi",
            json!({"metadata": {"labels": {"disk": "hdd", "zone": "a"}}}),
        ),
        node("bare", "1", "4Gi", json!({})),
    ]);
    let p = pod(
        "p",
        "1",
        "1Mi",
        json!({"spec": {"nodeSelector": {"disk": "ssd", "zone": "a"}}}),
    );
    assert_eq!(place(&cache, &p).expect("should succeed"), "ssd");
    let big = pod(
        "p",
        "2",
        "1Mi",
        json!({"spec": {"nodeSelector": {"disk": "nvme"}}}),
    );
    assert_eq!(
        message(&cache, &big),
        "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
    );
}

fn required(terms: Value) -> Value {
    json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
        {"nodeSelectorTerms": terms}}}}})
}

fn feasible_names(cache: &Cache, p: &Pod, names: &[&str]) -> Vec<String> {
    // Pin the pod to each node in turn: the ones it lands on are the feasible ones.
    let mut ok = Vec::new();
    for n in names {
        let mut pinned = p.clone();
        pinned.spec.as_mut().expect("should succeed").node_name = Some((*n).into());
        if place(cache, &pinned).is_ok() {
            ok.push((*n).to_owned());
        }
    }
    ok
}

#[test]
fn required_node_affinity_operators_behave_like_label_selectors() {
    let names = ["gpu", "cpu8", "plain"];
    let cache = cache_of(&[
        node(
            "gpu",
            "4",
            "4Gi",
            json!({"metadata": {"labels": {"accel": "gpu", "cores": "16"}}}),
        ),
        node(
            "cpu8",
            "4",
            "4Gi",
            json!({"metadata": {"labels": {"accel": "none", "cores": "8"}}}),
        ),
        node("plain", "4", "4Gi", json!({})),
    ]);
    let case = |exprs: Value| {
        let p = pod(
            "p",
            "1",
            "1Mi",
            required(json!([{"matchExpressions": exprs}])),
        );
        feasible_names(&cache, &p, &names)
    };
    assert_eq!(
        case(json!([{"key": "accel", "operator": "In", "values": ["gpu", "tpu"]}])),
        ["gpu"]
    );
    assert_eq!(
        case(json!([{"key": "accel", "operator": "NotIn", "values": ["gpu"]}])),
        ["cpu8", "plain"]
    );
    assert_eq!(
        case(json!([{"key": "cores", "operator": "Exists"}])),
        ["gpu", "cpu8"]
    );
    assert_eq!(
        case(json!([{"key": "cores", "operator": "DoesNotExist"}])),
        ["plain"]
    );
    assert_eq!(
        case(json!([{"key": "cores", "operator": "Gt", "values": ["8"]}])),
        ["gpu"]
    );
    assert_eq!(
        case(json!([{"key": "cores", "operator": "Lt", "values": ["16"]}])),
        ["cpu8"]
    );
    assert_eq!(
        case(
            json!([{"key": "cores", "operator": "Exists"}, {"key": "accel", "operator": "In", "values": ["none"]}])
        ),
        ["cpu8"],
        "expressions in one term are ANDed"
    );
}

#[test]
fn node_affinity_terms_are_ored_and_match_fields_select_by_name() {
    let names = ["a", "b", "c"];
    let cache = cache_of(&[
        node(
            "a",
            "4",
            "4Gi",
            json!({"metadata": {"labels": {"tier": "x"}}}),
        ),
        node("b", "4", "4Gi", json!({})),
        node("c", "4", "4Gi", json!({})),
    ]);
    let p = pod(
        "p",
        "1",
        "1Mi",
        required(json!([
            {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]}]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["c"]}]}
        ])),
    );
    assert_eq!(feasible_names(&cache, &p, &names), ["a", "c"]);
    let empty_term = pod("p", "1", "1Mi", required(json!([{}])));
    assert!(
        feasible_names(&cache, &empty_term, &names).is_empty(),
        "an empty term matches nothing"
    );
}

#[test]
fn invalid_affinity_and_quantities_are_rejected_with_the_pod_named() {
    let bad_op = pod(
        "bad",
        "1",
        "1Mi",
        required(
            json!([{"matchExpressions": [{"key": "k", "operator": "Near", "values": ["x"]}]}]),
        ),
    );
    let err = PodRequest::from_pod(&bad_op)
        .expect_err("should fail")
        .to_string();
    assert!(
        err.contains("default/bad") && err.contains("unknown operator"),
        "{err}"
    );
    let bad_gt = pod(
        "bad",
        "1",
        "1Mi",
        required(json!([{"matchExpressions": [{"key": "k", "operator": "Gt", "values": ["x"]}]}])),
    );
    assert!(PodRequest::from_pod(&bad_gt).is_err());
    let bad_q = pod("bad", "lots", "1Mi", json!({}));
    assert!(PodRequest::from_pod(&bad_q)
        .expect_err("should fail")
        .to_string()
        .contains("\"lots\""));
}

#[test]
fn taints_need_matching_tolerations() {
    let taint =
        json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}});
    let cache = cache_of(&[node("db", "4", "4Gi", taint)]);
    assert_eq!(
        message(&cache, &pod("p", "1", "1Mi", json!({}))),
        "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: db}."
    );
    for tol in [
        json!({"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}),
        json!({"key": "dedicated", "value": "db"}),
        json!({"key": "dedicated", "operator": "Exists"}),
        json!({"operator": "Exists"}),
    ] {
        let p = pod(
            "p",
            "1",
            "1Mi",
            json!({"spec": {"tolerations": [tol.clone()]}}),
        );
        assert_eq!(
            place(&cache, &p).expect("should succeed"),
            "db",
            "toleration {tol}"
        );
    }
    for tol in [
        json!({"key": "dedicated", "value": "web"}),
        json!({"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}),
        json!({"key": "other", "operator": "Exists"}),
    ] {
        let p = pod(
            "p",
            "1",
            "1Mi",
            json!({"spec": {"tolerations": [tol.clone()]}}),
        );
        assert!(
            place(&cache, &p).is_err(),
            "toleration {tol} must not match"
        );
    }
}

#[test]
fn no_execute_taints_filter_too_and_prefer_no_schedule_only_scores() {
    let cache = cache_of(&[
        node(
            "evict",
            "4",
            "4Gi",
            json!({"spec": {"taints": [{"key": "k", "effect": "NoExecute"}]}}),
        ),
        node(
            "soft",
            "4",
            "4Gi",
            json!({"spec": {"taints": [{"key": "k", "effect": "PreferNoSchedule"}]}}),
        ),
        node("clean", "4", "4Gi", json!({})),
    ]);
    for seed in 0..20 {
        let req = PodRequest::from_pod(&pod("p", "1", "1Mi", json!({}))).expect("should succeed");
        assert_eq!(
            Scheduler::with_seed(seed)
                .schedule(&cache, &req)
                .expect("should succeed")
                .node,
            "clean"
        );
    }
    let soft_only = cache_of(&[node(
        "soft",
        "4",
        "4Gi",
        json!({"spec": {"taints": [{"key": "k", "effect": "PreferNoSchedule"}]}}),
    )]);
    assert_eq!(
        place(&soft_only, &pod("p", "1", "1Mi", json!({}))).expect("should succeed"),
        "soft"
    );
}

#[test]
fn host_port_conflicts_follow_protocol_and_ip() {
    let with_port = |name: &str, port: Value| {
        pod(
            name,
            "10m",
            "1Mi",
            json!({"spec": {"containers": [{"name": "c", "image": "x", "ports": [port]}]}}),
        )
    };
    let mut cache = cache_of(&[node("a", "4", "4Gi", json!({}))]);
    cache
        .add_pod(&{
            let mut p = with_port(
                "web",
                json!({"containerPort": 80, "hostPort": 8080, "hostIP": "10.0.0.1"}),
            );
            p.spec.as_mut().expect("should succeed").node_name = Some("a".into());
            p
        })
        .expect("should succeed");
    let conflict =
        "0/1 nodes are available: 1 node(s) didn't have free ports for the requested pod ports.";
    assert_eq!(
        message(
            &cache,
            &with_port("p", json!({"containerPort": 80, "hostPort": 8080}))
        ),
        conflict
    );
    assert_eq!(
        message(
            &cache,
            &with_port(
                "p",
                json!({"containerPort": 80, "hostPort": 8080, "hostIP": "10.0.0.1"})
            )
        ),
        conflict
    );
    for free in [
        json!({"containerPort": 80, "hostPort": 8080, "hostIP": "10.0.0.2"}),
        json!({"containerPort": 80, "hostPort": 8080, "protocol": "UDP"}),
        json!({"containerPort": 80, "hostPort": 8081}),
        json!({"containerPort": 8080}),
    ] {
        assert_eq!(
            place(&cache, &with_port("p", free.clone())).expect("should succeed"),
            "a",
            "{free}"
        );
    }
    cache.remove_pod("default/web");
    assert_eq!(
        place(
            &cache,
            &with_port("p", json!({"containerPort": 80, "hostPort": 8080}))
        )
        .expect("should succeed"),
        "a"
    );
}

#[test]
fn least_allocated_prefers_the_emptier_node() {
    let mut cache = cache_of(&[
        node("a", "4", "8Gi", json!({})),
        node("b", "4", "8Gi", json!({})),
    ]);
    cache
        .add_pod(&pod("busy", "2", "4Gi", json!({"spec": {"nodeName": "a"}})))
        .expect("should succeed");
    for seed in 0..20 {
        let req =
            PodRequest::from_pod(&pod("p", "100m", "100Mi", json!({}))).expect("should succeed");
        assert_eq!(
            Scheduler::with_seed(seed)
                .schedule(&cache, &req)
                .expect("should succeed")
                .node,
            "b"
        );
    }
}

#[test]
fn balanced_allocation_prefers_the_node_left_evenly_used() {
    // "skewed" has more room left (least allocated 50 vs 37) but would end at 25% cpu / 75% memory (balance 75),
    // "even" at 62.5% of both (balance 100): 50 + 75 < 37 + 100.
    let mut cache = cache_of(&[
        node("skewed", "4", "4Gi", json!({})),
        node("even", "4", "4Gi", json!({})),
    ]);
    cache
        .add_pod(&pod(
            "m",
            "0",
            "2Gi",
            json!({"spec": {"nodeName": "skewed"}}),
        ))
        .expect("should succeed");
    cache
        .add_pod(&pod(
            "c",
            "1500m",
            "1536Mi",
            json!({"spec": {"nodeName": "even"}}),
        ))
        .expect("should succeed");
    for seed in 0..20 {
        let req = PodRequest::from_pod(&pod("p", "1", "1Gi", json!({}))).expect("should succeed");
        assert_eq!(
            Scheduler::with_seed(seed)
                .schedule(&cache, &req)
                .expect("should succeed")
                .node,
            "even"
        );
    }
}

#[test]
fn replicas_of_one_owner_spread_across_nodes() {
    let nodes: Vec<Node> = (0..4)
        .map(|i| node(&format!("n{i}"), "8", "16Gi", json!({})))
        .collect();
    let mut cache = cache_of(&nodes);
    let mut s = Scheduler::with_seed(3);
    let owned = |i: usize| {
        pod(
            &format!("web-{i}"),
            "100m",
            "64Mi",
            json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "web", "uid": "rs-uid", "controller": true}]}}),
        )
    };
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..8 {
        let req = PodRequest::from_pod(&owned(i)).expect("should succeed");
        let n = s.schedule(&cache, &req).expect("should succeed").node;
        cache.assume(&req, &n);
        *per_node.entry(n).or_default() += 1;
    }
    assert_eq!(
        per_node.values().copied().collect::<Vec<_>>(),
        [2, 2, 2, 2],
        "{per_node:?}"
    );
}

#[test]
fn preferred_node_affinity_weights_pick_the_heavier_match() {
    let cache = cache_of(&[
        node(
            "light",
            "4",
            "4Gi",
            json!({"metadata": {"labels": {"a": "1"}}}),
        ),
        node(
            "heavy",
            "4",
            "4Gi",
            json!({"metadata": {"labels": {"b": "1"}}}),
        ),
        node("none", "4", "4Gi", json!({})),
    ]);
    let p = pod(
        "p",
        "1",
        "1Mi",
        json!({"spec": {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 10, "preference": {"matchExpressions": [{"key": "a", "operator": "Exists"}]}},
            {"weight": 80, "preference": {"matchExpressions": [{"key": "b", "operator": "Exists"}]}}
        ]}}}}),
    );
    for seed in 0..20 {
        let req = PodRequest::from_pod(&p).expect("should succeed");
        assert_eq!(
            Scheduler::with_seed(seed)
                .schedule(&cache, &req)
                .expect("should succeed")
                .node,
            "heavy"
        );
    }
}

#[test]
fn ties_are_broken_at_random() {
    let nodes: Vec<Node> = (0..3)
        .map(|i| node(&format!("n{i}"), "4", "4Gi", json!({})))
        .collect();
    let cache = cache_of(&nodes);
    let req = PodRequest::from_pod(&pod("p", "1", "1Gi", json!({}))).expect("should succeed");
    let mut s = Scheduler::with_seed(42);
    let mut seen = BTreeMap::new();
    for _ in 0..300 {
        *seen
            .entry(s.schedule(&cache, &req).expect("should succeed").node)
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|&c| c > 50), "roughly uniform: {seen:?}");
}

#[test]
fn failed_scheduling_message_counts_nodes_per_reason_sorted_like_upstream() {
    let cache = cache_of(&[
        node(
            "small",
            "1",
            "8Gi",
            json!({"metadata": {"labels": {"disk": "ssd"}}}),
        ),
        node(
            "hdd1",
            "8",
            "8Gi",
            json!({"metadata": {"labels": {"disk": "hdd"}}}),
        ),
        node(
            "hdd2",
            "8",
            "8Gi",
            json!({"metadata": {"labels": {"disk": "hdd"}}}),
        ),
    ]);
    let p = pod(
        "p",
        "2",
        "1Gi",
        json!({"spec": {"nodeSelector": {"disk": "ssd"}}}),
    );
    assert_eq!(
        message(&cache, &p),
        "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't match Pod's node affinity/selector."
    );
}

#[test]
fn no_nodes_at_all_is_its_own_error() {
    let cache = Cache::new();
    assert_eq!(
        place(&cache, &pod("p", "1", "1Mi", json!({}))).expect_err("should fail"),
        ScheduleError::NoNodes
    );
}

#[test]
fn removed_nodes_are_no_longer_candidates() {
    let mut cache = cache_of(&[
        node("a", "4", "4Gi", json!({})),
        node("b", "4", "4Gi", json!({})),
    ]);
    cache.remove_node("a");
    assert_eq!(cache.node_count(), 1);
    for seed in 0..10 {
        let req = PodRequest::from_pod(&pod("p", "1", "1Mi", json!({}))).expect("should succeed");
        assert_eq!(
            Scheduler::with_seed(seed)
                .schedule(&cache, &req)
                .expect("should succeed")
                .node,
            "b"
        );
    }
}

#[test]
fn large_clusters_evaluate_a_share_of_nodes_but_report_all_on_failure() {
    let nodes: Vec<Node> = (0..1000)
        .map(|i| node(&format!("n{i}"), "4", "4Gi", json!({})))
        .collect();
    let cache = cache_of(&nodes);
    let req = PodRequest::from_pod(&pod("p", "1", "1Mi", json!({}))).expect("should succeed");
    let mut s = Scheduler::with_seed(1);
    let pl = s.schedule(&cache, &req).expect("should succeed");
    // Adaptive: 50% - 1000/125 = 42% of 1000 nodes.
    assert_eq!(pl.feasible_nodes, 420);
    s.set_percentage_of_nodes_to_score(Some(100));
    assert_eq!(
        s.schedule(&cache, &req)
            .expect("should succeed")
            .feasible_nodes,
        1000
    );
    let huge = PodRequest::from_pod(&pod("p", "64", "1Mi", json!({}))).expect("should succeed");
    s.set_percentage_of_nodes_to_score(None);
    assert_eq!(
        s.schedule(&cache, &huge)
            .expect_err("should fail")
            .to_string(),
        "0/1000 nodes are available: 1000 Insufficient cpu."
    );
}
