//! The store conformance suite: what every [`Store`] backend must do, written once against the trait.
//!
//! Each check takes a fresh, empty store. A backend's tests instantiate them all with
//! [`store_conformance_tests!`](crate::store_conformance_tests):
//!
//! ```ignore
//! windlass_control::store_conformance_tests!(async { my_backend_on_a_fresh_dir().await });
//! ```
//!
//! Checks panic with a message saying what went wrong (they are test code).

use std::time::Duration;

use futures_util::StreamExt;

use super::{Event, ListOptions, Store, StoreError, WatchStream};

const WAIT: Duration = Duration::from_secs(10);

async fn next(stream: &mut WatchStream) -> Result<Event, StoreError> {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("watch produced nothing in {WAIT:?} (deadlocked?)"))
        .unwrap_or_else(|| panic!("watch ended unexpectedly"))
        .map(|event| (*event).clone())
}

/// Create stamps revisions; a second create of the same key fails and changes nothing.
pub async fn create_then_get(store: &dyn Store) {
    let r0 = store.revision().await.expect("revision");
    let kv = store
        .create("/registry/pods/a/x", b"one".to_vec())
        .await
        .expect("create");
    assert_eq!(kv.mod_revision, r0 + 1);
    assert_eq!(kv.create_revision, r0 + 1);
    assert_eq!(kv.version, 1);
    let err = store
        .create("/registry/pods/a/x", b"two".to_vec())
        .await
        .expect_err("a second create must fail");
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
    let (got, rev) = store.get("/registry/pods/a/x").await.expect("get");
    assert_eq!(got.expect("key exists").value, b"one");
    assert_eq!(rev, r0 + 1, "a failed create does not bump the revision");
    let (missing, _) = store.get("/registry/pods/a/nope").await.expect("get");
    assert!(missing.is_none());
}

/// Updates and deletes succeed only on the current mod revision; a conflict reports the current value.
pub async fn compare_and_swap(store: &dyn Store) {
    let kv = store.create("/k/a", b"1".to_vec()).await.expect("create");
    let kv2 = store
        .update("/k/a", kv.mod_revision, b"2".to_vec())
        .await
        .expect("update");
    assert!(kv2.mod_revision > kv.mod_revision);
    assert_eq!(kv2.create_revision, kv.create_revision);
    assert_eq!(kv2.version, 2);
    match store.update("/k/a", kv.mod_revision, b"3".to_vec()).await {
        Err(StoreError::Conflict { current, .. }) => assert_eq!(current.value, b"2"),
        other => panic!("stale update must conflict, got {other:?}"),
    }
    match store.delete("/k/a", Some(kv.mod_revision)).await {
        Err(StoreError::Conflict { .. }) => {}
        other => panic!("stale delete must conflict, got {other:?}"),
    }
    let (prev, rev) = store
        .delete("/k/a", Some(kv2.mod_revision))
        .await
        .expect("delete");
    assert_eq!(prev.value, b"2");
    assert!(rev > kv2.mod_revision);
    assert!(matches!(
        store.update("/k/a", rev, b"4".to_vec()).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete("/k/a", None).await,
        Err(StoreError::NotFound { .. })
    ));
    // Re-creating starts a new life: version 1, new create revision.
    let again = store.create("/k/a", b"5".to_vec()).await.expect("recreate");
    assert_eq!(again.version, 1);
    assert!(again.create_revision > rev);
}

/// Lists return exactly the prefix, in key order, with the store revision, and paginate.
pub async fn list_prefix_and_paginate(store: &dyn Store) {
    for name in ["c", "a", "b", "d", "e"] {
        store
            .create(
                &format!("/registry/pods/ns1/{name}"),
                name.as_bytes().to_vec(),
            )
            .await
            .expect("create");
    }
    store
        .create("/registry/pods/ns2/z", b"z".to_vec())
        .await
        .expect("create");
    store
        .create("/registry/podsx/ns1/y", b"y".to_vec())
        .await
        .expect("create");
    let all = store
        .list("/registry/pods/ns1/", &ListOptions::default())
        .await
        .expect("list");
    let keys: Vec<_> = all
        .items
        .iter()
        .map(|kv| kv.key.rsplit('/').next().unwrap_or(""))
        .collect();
    assert_eq!(keys, ["a", "b", "c", "d", "e"]);
    assert!(!all.more);
    assert_eq!(all.revision, store.revision().await.expect("revision"));
    let both = store
        .list("/registry/pods/", &ListOptions::default())
        .await
        .expect("list");
    assert_eq!(
        both.items.len(),
        6,
        "the prefix /registry/pods/ must not match /registry/podsx/"
    );

    let mut seen = Vec::new();
    let mut after = None;
    for _ in 0..10 {
        let page = store
            .list(
                "/registry/pods/",
                &ListOptions {
                    limit: Some(2),
                    start_after: after.clone(),
                },
            )
            .await
            .expect("list page");
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|kv| kv.key.clone()));
        if !page.more {
            if let Some(remaining) = page.remaining {
                assert_eq!(remaining, 0, "the last page has nothing remaining");
            }
            break;
        }
        after = page.items.last().map(|kv| kv.key.clone());
    }
    let expected: Vec<_> = both.items.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(seen, expected, "pages concatenate to the full list");
}

/// A watch from a past revision replays history in order, then goes live; types and prev values are right.
pub async fn watch_replays_then_follows(store: &dyn Store) {
    let a = store.create("/w/a", b"1".to_vec()).await.expect("create");
    let a2 = store
        .update("/w/a", a.mod_revision, b"2".to_vec())
        .await
        .expect("update");
    store
        .create("/other/x", b"x".to_vec())
        .await
        .expect("create");
    let mut w = store.watch("/w/", a.mod_revision).await.expect("watch");
    assert_eq!(
        next(&mut w).await.expect("event"),
        Event::Created(a.clone())
    );
    assert_eq!(
        next(&mut w).await.expect("event"),
        Event::Updated {
            prev: a.clone(),
            kv: a2.clone()
        }
    );
    let (_, del_rev) = store.delete("/w/a", None).await.expect("delete");
    let b = store.create("/w/b", b"b".to_vec()).await.expect("create");
    assert_eq!(
        next(&mut w).await.expect("event"),
        Event::Deleted {
            prev: a2,
            revision: del_rev
        }
    );
    assert_eq!(next(&mut w).await.expect("event"), Event::Created(b));
}

/// A watch from revision 0 sees only later writes; many concurrent writes arrive once each, in revision order.
pub async fn watch_from_now_sees_concurrent_writes_in_order(store: &dyn Store) {
    store
        .create("/c/old", b"old".to_vec())
        .await
        .expect("create");
    let mut w = store.watch("/c/", 0).await.expect("watch");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let key = format!("/c/k{i}");
        tasks.push(async move { (key.clone(), store.create(&key, vec![1]).await) });
    }
    let results = futures_util::future::join_all(tasks).await;
    for (key, r) in &results {
        r.as_ref().unwrap_or_else(|e| panic!("create {key}: {e}"));
    }
    let mut last = 0;
    let mut keys = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let e = next(&mut w).await.expect("event");
        assert!(e.revision() > last, "events in revision order");
        last = e.revision();
        assert!(matches!(e, Event::Created(_)));
        assert_ne!(
            e.key(),
            "/c/old",
            "a watch from 0 starts after the current revision"
        );
        keys.insert(e.key().to_string());
    }
    assert_eq!(keys.len(), 50);
}

/// After compaction, watching from before the compacted revision fails with Compacted; from it, works.
pub async fn watch_before_compaction_is_refused(store: &dyn Store) {
    let a = store.create("/x/a", b"1".to_vec()).await.expect("create");
    let b = store.create("/x/b", b"1".to_vec()).await.expect("create");
    let c = store.create("/x/c", b"1".to_vec()).await.expect("create");
    store.compact(c.mod_revision).await.expect("compact");
    match store.watch("/x/", a.mod_revision).await {
        Err(StoreError::Compacted { .. }) => {}
        Ok(mut w) => match tokio::time::timeout(WAIT, w.next()).await {
            Ok(Some(Err(StoreError::Compacted { .. }))) => {}
            other => panic!("watch from a compacted revision must fail, got {other:?}"),
        },
        Err(e) => panic!("expected Compacted, got {e}"),
    }
    let _ = b;
    let mut w = store
        .watch("/x/", c.mod_revision)
        .await
        .expect("watch from the compaction point");
    assert_eq!(next(&mut w).await.expect("event").key(), "/x/c");
}

/// Large values and many keys survive intact.
pub async fn values_are_stored_verbatim(store: &dyn Store) {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    store.create("/big", big.clone()).await.expect("create");
    let (got, _) = store.get("/big").await.expect("get");
    assert_eq!(got.expect("exists").value, big);
    store.create("/empty", Vec::new()).await.expect("create");
    assert_eq!(
        store
            .get("/empty")
            .await
            .expect("get")
            .0
            .expect("exists")
            .value,
        b""
    );
}

/// A key created with a TTL is deleted (a watch event, as any delete) once it runs out, not before, even when
/// updated meanwhile; keys without one stay.
pub async fn ttl_keys_expire_with_a_delete_event(store: &dyn Store) {
    let ttl = Duration::from_secs(2);
    let mut w = store.watch("/ev/", 0).await.expect("watch");
    let created = std::time::Instant::now();
    let kv = store
        .create_with_ttl("/ev/a", b"event".to_vec(), ttl)
        .await
        .expect("create with ttl");
    store
        .create("/ev/b", b"kept".to_vec())
        .await
        .expect("create");
    let kv = store
        .update("/ev/a", kv.mod_revision, b"event x2".to_vec())
        .await
        .expect("update keeps the deadline");
    for key in ["/ev/a", "/ev/b", "/ev/a"] {
        assert_eq!(next(&mut w).await.expect("event").key(), key);
    }
    match next(&mut w).await.expect("the expiry's event") {
        Event::Deleted { prev, revision } => {
            assert_eq!(prev.key, "/ev/a");
            assert_eq!(prev.value, b"event x2");
            assert!(revision > kv.mod_revision);
        }
        other => panic!("expected /ev/a to be deleted by its TTL, got {other:?}"),
    }
    let lived = created.elapsed();
    assert!(
        lived >= ttl - Duration::from_millis(500),
        "deleted after {lived:?}, before its {ttl:?} TTL"
    );
    assert!(store.get("/ev/a").await.expect("get").0.is_none());
    assert!(store.get("/ev/b").await.expect("get").0.is_some());
}

/// A chunked list hands out every key under the prefix, in key order and chunks of at most the asked size,
/// from one revision: a write made while the list is being read is not in it.
pub async fn chunked_list_reads_one_revision(store: &dyn Store) {
    for i in 0..7 {
        store
            .create(
                &format!("/registry/pods/c/p{i}"),
                format!("v{i}").into_bytes(),
            )
            .await
            .expect("create");
    }
    store
        .create("/registry/pods/d/other", b"x".to_vec())
        .await
        .expect("create");
    let listed = store
        .list_chunked("/registry/pods/c/", 3)
        .await
        .expect("list");
    let mut chunks = listed.chunks;
    let first = tokio::time::timeout(WAIT, chunks.next())
        .await
        .expect("a chunk in time")
        .expect("a first chunk")
        .expect("no error");
    let late = store
        .create("/registry/pods/c/p9", b"late".to_vec())
        .await
        .expect("create during the list");
    assert!(late.mod_revision > listed.revision);
    let mut keys: Vec<String> = first.iter().map(|kv| kv.key.clone()).collect();
    let mut sizes = vec![first.len()];
    while let Some(chunk) = tokio::time::timeout(WAIT, chunks.next())
        .await
        .expect("a chunk in time")
    {
        let chunk = chunk.expect("no error");
        sizes.push(chunk.len());
        keys.extend(chunk.into_iter().map(|kv| kv.key));
    }
    let want: Vec<String> = (0..7).map(|i| format!("/registry/pods/c/p{i}")).collect();
    assert_eq!(
        keys, want,
        "every key once, in order, without the late write"
    );
    assert!(
        sizes.iter().all(|n| *n <= 3 && *n > 0),
        "chunk sizes {sizes:?}"
    );
}

/// Instantiates every conformance check as a `#[tokio::test]`, given an expression (evaluated once per test)
/// that is a future producing a fresh store (anything that derefs to `dyn Store`) — plus anything to keep
/// alive (e.g. a temp dir) as a tuple `(store, guard)`.
///
/// A backend that needs an outside tool (a real etcd) first checks a condition, so the tests skip (or, in CI, fail)
/// through `windlass_tests::require_privileged` before the store is made:
/// `store_conformance_tests!(if windlass_tests::require_privileged(&["etcd"]); fresh_etcd())`.
#[macro_export]
macro_rules! store_conformance_tests {
    (if $run:expr; $fresh:expr) => {
        $crate::store_conformance_tests!(@tests $run; $fresh;
            create_then_get, compare_and_swap, list_prefix_and_paginate, watch_replays_then_follows,
            watch_from_now_sees_concurrent_writes_in_order, watch_before_compaction_is_refused,
            values_are_stored_verbatim, ttl_keys_expire_with_a_delete_event,
            chunked_list_reads_one_revision);
    };
    ($fresh:expr) => {
        $crate::store_conformance_tests!(if true; $fresh);
    };
    (@tests $run:expr; $fresh:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if !$run {
                    return;
                }
                let (store, _guard) = $fresh.await;
                $crate::store::conformance::$name(&*store).await;
            }
        )*
    };
}
