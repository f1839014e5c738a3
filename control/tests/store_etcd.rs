//! The etcd backend against a real etcd started by the test: the generic store conformance suite on a single
//! member and on a 3-member cluster whose leader is dead, and a write + watch stream that goes on while the leader
//! is SIGKILLed in the middle of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use windlass_control::store::etcd::{EtcdConfig, EtcdStore};
use windlass_control::store::{Event, Store, StoreError};

use windlass_tests::etcd::EtcdCluster;

async fn connect(cluster: &EtcdCluster) -> Arc<EtcdStore> {
    let config = match &cluster.tls {
        None => EtcdConfig::from_servers(&cluster.servers_flag()),
        Some(certs) => EtcdConfig::from_flags(
            &cluster.servers_flag(),
            Some(&certs.ca),
            Some(&certs.client_cert),
            Some(&certs.client_key),
        ),
    }
    .expect("--etcd-servers");
    Arc::new(EtcdStore::connect(config).await.expect("connect to etcd"))
}

/// A fresh single-member etcd.
async fn single_member() -> (Arc<EtcdStore>, EtcdCluster) {
    let cluster = EtcdCluster::start(1).await;
    (connect(&cluster).await, cluster)
}

/// A fresh 3-member cluster whose leader has been SIGKILLed; the client still lists all three endpoints.
async fn three_members_leader_killed() -> (Arc<EtcdStore>, EtcdCluster) {
    let mut cluster = EtcdCluster::start(3).await;
    let store = connect(&cluster).await;
    let leader = cluster.leader().await;
    cluster.kill(leader);
    // Writes in flight while the survivors elect a new leader fail ambiguously (as with kube-apiserver, they may or
    // may not have been applied); the suite checks exact results, so it starts once a new leader is there. Writes
    // during the election are `writes_and_watches_continue_when_the_leader_is_killed`'s business.
    cluster.leader().await;
    // The client's connection to the dead member fails the first request sent on it as a broken pipe, which is
    // ambiguous for a write; reads (retried) make the client notice first, as an API server's reads would.
    for _ in 0..30 {
        store.revision().await.expect("read after the kill");
    }
    (store, cluster)
}

/// A fresh single member serving clients over TLS with client-certificate authentication.
async fn tls_member() -> (Arc<EtcdStore>, EtcdCluster) {
    let cluster = EtcdCluster::start_tls(1).await;
    (connect(&cluster).await, cluster)
}

mod tls_member {
    windlass_control::store_conformance_tests!(
        if windlass_tests::require_privileged(&["etcd", "openssl"]);
        super::tls_member()
    );
}

mod single_member {
    windlass_control::store_conformance_tests!(
        if windlass_tests::require_privileged(&["etcd"]);
        super::single_member()
    );
}

mod three_members_with_the_leader_killed {
    windlass_control::store_conformance_tests!(
        if windlass_tests::require_privileged(&["etcd"]);
        super::three_members_leader_killed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_stored_verbatim_so_etcdctl_shows_them() {
    if !windlass_tests::require_privileged(&["etcd", "etcdctl"]) {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let store = connect(&cluster).await;
    store
        .create("/registry/pods/default/web", br#"{"kind":"Pod"}"#.to_vec())
        .await
        .expect("create");
    let out = windlass_tests::run_ok(
        std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(cluster.servers_flag())
            .args(["get", "--prefix", "/registry"]),
    );
    assert_eq!(out, "/registry/pods/default/web\n{\"kind\":\"Pod\"}\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_fails_with_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut config = EtcdConfig::from_servers(&format!("http://127.0.0.1:{port}")).expect("config");
    config.retry_timeout = Duration::from_millis(300);
    let err = match EtcdStore::connect(config).await {
        Ok(_) => panic!("nothing listens on port {port}"),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

/// Writes go on through the survivors after the leader is SIGKILLed, and a watch opened before the kill sees every
/// acknowledged write exactly once, in revision order, without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_watches_continue_when_the_leader_is_killed() {
    if !windlass_tests::require_privileged(&["etcd"]) {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    let store = connect(&cluster).await;
    let mut watch = store.watch("/registry/pods/", 0).await.expect("watch");

    const WRITES: usize = 120;
    const KILL_AT: usize = 40;
    let mut acked = Vec::new();
    let mut ambiguous = 0;
    let started = Instant::now();
    for i in 0..WRITES {
        if i == KILL_AT {
            let leader = cluster.leader().await;
            cluster.kill(leader);
        }
        let key = format!("/registry/pods/default/p{i:04}");
        let value = format!("{{\"i\":{i}}}").into_bytes();
        match store.create(&key, value.clone()).await {
            Ok(kv) => acked.push(kv),
            Err(StoreError::Backend(e)) => {
                // The member holding the request died: it may or may not have been applied. Find out, as a
                // client would, and count it.
                ambiguous += 1;
                eprintln!("write {i} failed ambiguously: {e}");
                assert!(ambiguous <= 3, "too many failed writes; last: {e}");
                let (kv, _) = store.get(&key).await.expect("get after a failed write");
                match kv {
                    Some(kv) => acked.push(kv),
                    None => acked.push(store.create(&key, value).await.expect("retry create")),
                }
            }
            Err(e) => panic!("create {key}: {e}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "writes stalled"
    );

    let mut last = 0;
    for kv in &acked {
        let event = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .unwrap_or_else(|_| panic!("watch stalled before {} (last revision {last})", kv.key))
            .expect("watch ended")
            .expect("watch event");
        assert!(event.revision() > last, "events in revision order");
        last = event.revision();
        assert_eq!(
            *event,
            Event::Created(kv.clone()),
            "the watch sees each write once, in order"
        );
    }
    // Nothing more than the writes: no duplicates after the watch moved to another member.
    let extra = tokio::time::timeout(Duration::from_millis(300), watch.next()).await;
    assert!(extra.is_err(), "unexpected extra event {extra:?}");
    let list = store
        .list("/registry/pods/", &Default::default())
        .await
        .expect("list after the kill");
    assert_eq!(list.items.len(), WRITES);
}

/// A watch whose only member is killed and comes back resumes from where it stopped: it sees the write made
/// through the survivors meanwhile, once, and nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_after_its_member_restarts() {
    if !windlass_tests::require_privileged(&["etcd"]) {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    let writer = connect(&cluster).await;
    let first = writer.create("/w/a", b"1".to_vec()).await.expect("create");
    // The watcher reaches member 0 only, so its watch must go down with it.
    let mut config = EtcdConfig::from_servers(&cluster.members[0].client_url).expect("config");
    config.retry_timeout = Duration::from_secs(30);
    let watcher = EtcdStore::connect(config).await.expect("connect");
    let mut w = watcher
        .watch("/w/", first.mod_revision)
        .await
        .expect("watch");
    assert_eq!(next_event(&mut w).await, Event::Created(first));
    cluster.kill(0);
    cluster.leader().await;
    let b = writer
        .create("/w/b", b"2".to_vec())
        .await
        .expect("create while member 0 is down");
    cluster.restart(0).await;
    let c = writer
        .create("/w/c", b"3".to_vec())
        .await
        .expect("create after the restart");
    assert_eq!(next_event(&mut w).await, Event::Created(b));
    assert_eq!(next_event(&mut w).await, Event::Created(c));
}

async fn next_event(w: &mut windlass_control::store::WatchStream) -> Event {
    tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .expect("watch stalled")
        .expect("watch ended")
        .map(|event| (*event).clone())
        .expect("watch event")
}

/// The backup procedure the README documents for the etcd backend: `etcdctl snapshot save`, then
/// `etcdctl snapshot restore` into a new member; the store sees the same keys, values and revisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_snapshot_restore_brings_back_keys_values_and_revisions() {
    if !windlass_tests::require_privileged(&["etcd", "etcdctl"]) {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let store = connect(&cluster).await;
    for i in 0..20 {
        let kv = store
            .create(
                &format!("/registry/pods/default/p{i:02}"),
                format!("v{i}").into_bytes(),
            )
            .await
            .expect("create");
        if i % 2 == 0 {
            store
                .update(&kv.key, kv.mod_revision, b"updated".to_vec())
                .await
                .expect("update");
        }
    }
    let before = store
        .list("/registry/", &Default::default())
        .await
        .expect("list");
    let backup = tempfile::tempdir().expect("temp dir");
    let file = backup.path().join("etcd.db");
    windlass_tests::run_ok(
        std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(cluster.servers_flag())
            .args(["snapshot", "save"])
            .arg(&file),
    );
    drop(store);
    drop(cluster);

    let restored = EtcdCluster::start_from_snapshot(&file).await;
    let store = connect(&restored).await;
    let after = store
        .list("/registry/", &Default::default())
        .await
        .expect("list");
    assert_eq!(after.items, before.items);
    assert_eq!(after.revision, before.revision);
    let kv = store
        .create("/registry/pods/default/new", b"{}".to_vec())
        .await
        .expect("write after the restore");
    assert_eq!(kv.mod_revision, before.revision + 1);
}

/// Lists larger than one gRPC message (4 MiB by default) or one internal page come back whole, in order, at one
/// revision, and limits still count what remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_lists_come_back_whole() {
    if !windlass_tests::require_privileged(&["etcd"]) {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let store = connect(&cluster).await;
    let big = vec![b'b'; 120_000];
    for i in 0..45 {
        store
            .create(&format!("/big/{i:02}"), big.clone())
            .await
            .expect("create");
    }
    let list = store
        .list("/big/", &Default::default())
        .await
        .expect("list");
    assert_eq!(list.items.len(), 45, "45 × 120 KB = 5.4 MB in one list");
    assert!(list.items.iter().all(|kv| kv.value == big));

    let keys: Vec<String> = (0..1500).map(|i| format!("/many/{i:05}")).collect();
    futures_util::stream::iter(keys.iter())
        .for_each_concurrent(50, |key| {
            let store = store.clone();
            async move {
                store.create(key, vec![1]).await.expect("create");
            }
        })
        .await;
    let list = store
        .list("/many/", &Default::default())
        .await
        .expect("list");
    let got: Vec<_> = list.items.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(got, keys, "every key, in order, across internal pages");
    assert_eq!(list.revision, store.revision().await.expect("revision"));
    assert!(!list.more);
    let limited = store
        .list(
            "/many/",
            &windlass_control::store::ListOptions {
                limit: Some(1200),
                start_after: None,
            },
        )
        .await
        .expect("list");
    assert_eq!(limited.items.len(), 1200);
    assert!(limited.more);
    assert_eq!(limited.remaining, Some(300));
}

/// Against members that require client certificates, a client without one is refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_refuses_a_client_without_a_certificate() {
    if !windlass_tests::require_privileged(&["etcd", "openssl"]) {
        return;
    }
    let cluster = EtcdCluster::start_tls(1).await;
    let certs = cluster.tls.clone().expect("tls cluster");
    let store = connect(&cluster).await;
    store
        .create("/registry/pods/default/tls", b"{}".to_vec())
        .await
        .expect("create over TLS");
    let mut config = EtcdConfig::from_flags(&cluster.servers_flag(), Some(&certs.ca), None, None)
        .expect("config");
    config.retry_timeout = Duration::from_millis(500);
    match EtcdStore::connect(config).await {
        Ok(_) => panic!("a client without a certificate must be refused"),
        Err(e) => {
            assert!(matches!(e, StoreError::Backend(_)), "{e}");
            assert!(
                e.to_string().contains(&cluster.servers_flag()),
                "names the endpoint: {e}"
            );
        }
    }
}

/// The per-request timeout bounds unary calls and a watch's setup, not the life of a watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_watch_outlives_the_request_timeout() {
    if !windlass_tests::require_privileged(&["etcd"]) {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let mut config = EtcdConfig::from_servers(&cluster.servers_flag()).expect("config");
    config.request_timeout = Duration::from_millis(500);
    let store = EtcdStore::connect(config).await.expect("connect");
    let mut w = store.watch("/idle/", 0).await.expect("watch");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kv = store
        .create("/idle/a", b"1".to_vec())
        .await
        .expect("create");
    assert_eq!(next_event(&mut w).await, Event::Created(kv));
}
