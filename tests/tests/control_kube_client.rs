//! The `kube` crate as a client of `windlass-control serve`: discovery, list, create, watch (classic and streaming
//! lists), and a relist after an expired resourceVersion.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, Event};
use kube::Discovery;
use windlass_tests::control::ControlPlane;
use windlass_tests::require_privileged;

const WAIT: Duration = Duration::from_secs(20);

fn pod(name: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "kube-test"}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }))
    .expect("pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kube_crate_discovers_lists_creates_and_watches() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = tokio::task::spawn_blocking(ControlPlane::start)
        .await
        .expect("start");
    let client = cp.kube_client().await;

    // Both discovery flavours kube-rs offers.
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("legacy discovery");
    assert!(discovery.groups().any(|g| g.name() == "apps"));
    let aggregated = Discovery::new(client.clone())
        .run_aggregated()
        .await
        .expect("aggregated discovery");
    assert!(aggregated
        .groups()
        .any(|g| g.name() == "rbac.authorization.k8s.io"));

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let created = pods
        .create(&PostParams::default(), &pod("a"))
        .await
        .expect("create pod a");
    assert_eq!(
        created
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref()),
        Some("Always")
    );
    let list = pods
        .list(&ListParams::default().labels("app=kube-test"))
        .await
        .expect("list");
    assert_eq!(list.items.len(), 1);
    let rv = list
        .metadata
        .resource_version
        .clone()
        .expect("list resourceVersion");

    // A raw watch from the list's resourceVersion sees the next create, and nothing before it.
    let mut raw = pods
        .watch(
            &WatchParams::default().labels("app=kube-test").timeout(30),
            &rv,
        )
        .await
        .expect("watch")
        .boxed();
    pods.create(&PostParams::default(), &pod("b"))
        .await
        .expect("create pod b");
    let ev = tokio::time::timeout(WAIT, raw.try_next())
        .await
        .expect("watch event in time")
        .expect("watch ok")
        .expect("an event");
    match ev {
        WatchEvent::Added(p) => assert_eq!(p.metadata.name.as_deref(), Some("b")),
        other => panic!("expected ADDED b, got {other:?}"),
    }

    // kube-runtime's watcher, with streaming lists (sendInitialEvents + initial-events-end bookmark).
    for streaming in [false, true] {
        let mut cfg = watcher::Config::default().labels("app=kube-test");
        if streaming {
            cfg = cfg.streaming_lists();
        }
        let mut w = watcher::watcher(pods.clone(), cfg).boxed();
        let mut initial = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, w.try_next())
                .await
                .expect("watcher in time")
            {
                Ok(Some(Event::Init)) => {}
                Ok(Some(Event::InitApply(p))) => initial.push(p.metadata.name.unwrap_or_default()),
                Ok(Some(Event::InitDone)) => break,
                other => panic!("unexpected watcher event {other:?}"),
            }
        }
        initial.sort();
        let mut expected = vec!["a".to_string(), "b".to_string()];
        if streaming {
            expected.push("live-false".into());
        }
        assert_eq!(initial, expected, "initial state (streaming={streaming})");
        let name = format!("live-{streaming}");
        pods.create(&PostParams::default(), &pod(&name))
            .await
            .expect("create");
        match tokio::time::timeout(WAIT, w.try_next())
            .await
            .expect("watcher in time")
        {
            Ok(Some(Event::Apply(p))) => {
                assert_eq!(p.metadata.name.as_deref(), Some(name.as_str()))
            }
            other => panic!("expected Apply {name}, got {other:?}"),
        }
    }

    // A watch from a revision from before the server's restart: the embedded store's watch history starts anew, so
    // it gets an in-stream 410, which kube reports; on etcd the history survives and the watch replays it.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let old_rv = cms
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({
        "metadata": {"name": "x"}, "data": {"k": "v"}}))
        .expect("cm"),
    )
    .await
    .expect("create cm");
    let mut cp = cp;
    let cp = tokio::task::spawn_blocking(move || {
        cp.restart();
        cp
    })
    .await
    .expect("restart");
    let client = cp.kube_client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut stream = cms
        .watch(&WatchParams::default(), &old_rv)
        .await
        .expect("watch")
        .boxed();
    let event = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .expect("event in time");
    if windlass_tests::control::store_backend_is_etcd() {
        // etcd keeps its history across restarts of the API server: the watch replays what happened since.
        match event {
            Ok(Some(WatchEvent::Added(cm))) => assert_eq!(cm.metadata.name.as_deref(), Some("x")),
            other => panic!("expected the replayed ADDED x from etcd's history, got {other:?}"),
        }
    } else {
        match event {
            Ok(Some(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
            other => panic!("expected an in-stream 410, got {other:?}"),
        }
    }
}

/// A whole list (no `limit`) is streamed from the store a chunk at a time: with more objects than one chunk it
/// still returns every object once, in name order, each with its own resourceVersion, and selectors still apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_list_longer_than_a_chunk_returns_every_object_once() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = tokio::task::spawn_blocking(ControlPlane::start)
        .await
        .expect("start");
    let client = cp.kube_client().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    // More than the server's store chunk (256 items), so the list spans several chunks.
    let count = 600;
    futures_util::stream::iter(0..count)
        .map(|i| {
            let maps = maps.clone();
            async move {
                let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("cm-{i:04}"),
                                 "labels": {"parity": if i % 2 == 0 { "even" } else { "odd" }}},
                    "data": {"i": i.to_string()},
                }))
                .expect("configmap");
                maps.create(&PostParams::default(), &cm)
                    .await
                    .expect("create configmap")
            }
        })
        .buffer_unordered(16)
        .for_each(|_| async {})
        .await;

    let all = maps.list(&ListParams::default()).await.expect("list");
    let names: Vec<String> = all
        .items
        .iter()
        .filter_map(|cm| cm.metadata.name.clone())
        .filter(|n| n.starts_with("cm-"))
        .collect();
    let want: Vec<String> = (0..count).map(|i| format!("cm-{i:04}")).collect();
    assert_eq!(names, want, "every configmap once, in name order");
    let list_rv: i64 = all
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .expect("list resourceVersion");
    for cm in &all.items {
        let rv: i64 = cm
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .expect("item resourceVersion");
        assert!(
            rv > 0 && rv <= list_rv,
            "item rv {rv} within the list's {list_rv}"
        );
    }

    let even = maps
        .list(&ListParams::default().labels("parity=even"))
        .await
        .expect("list by label");
    assert_eq!(even.items.len(), count / 2);
    assert!(even.items.iter().all(|cm| cm
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("parity"))
        .is_some_and(|p| p == "even")));
    let one = maps
        .list(&ListParams::default().fields("metadata.name=cm-0007"))
        .await
        .expect("list by name");
    assert_eq!(one.items.len(), 1);
    assert_eq!(
        one.items[0]
            .data
            .as_ref()
            .and_then(|d| d.get("i"))
            .map(String::as_str),
        Some("7")
    );
}
