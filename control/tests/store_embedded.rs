//! The embedded store against the generic store conformance suite, plus its crash-safety guarantee.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use windlass_control::store::embedded::{EmbeddedOptions, EmbeddedStore};
use windlass_control::store::{Store, StoreError};

async fn fresh() -> (Arc<EmbeddedStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open store");
    (Arc::new(store), dir)
}

windlass_control::store_conformance_tests!(fresh());

async fn fresh_with(options: EmbeddedOptions) -> (Arc<EmbeddedStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(dir.path(), options).expect("open store");
    (Arc::new(store), dir)
}

/// The suite with a checkpoint every few batches: reads merge the writes pending since the last checkpoint over a
/// B-tree that checkpoints change under them.
mod frequent_checkpoints {
    windlass_control::store_conformance_tests!(super::fresh_with(super::checkpoints("often")));
}

/// The suite without the write-ahead log: a durable redb commit per batch.
mod without_the_log {
    use windlass_control::store::embedded::EmbeddedOptions;
    windlass_control::store_conformance_tests!(super::fresh_with(EmbeddedOptions {
        write_ahead_log: false,
        ..EmbeddedOptions::default()
    }));
}

/// Set in the child process of the kill -9 tests: the directory to write to.
const CHILD_DIR_ENV: &str = "WINDLASS_STORE_CRASH_CHILD_DIR";
/// Set in the child process of the kill -9 tests: how often the store checkpoints (see [`checkpoints`]).
const CHILD_CHECKPOINTS_ENV: &str = "WINDLASS_STORE_CRASH_CHILD_CHECKPOINTS";

/// The store's options for a checkpoint schedule: `never` (every write after opening stays in the write-ahead
/// log only, so a crash is recovered by replaying it), `often` (a checkpoint every few batches, so kill -9 is
/// likely to land in or right after one), anything else the defaults.
fn checkpoints(schedule: &str) -> EmbeddedOptions {
    match schedule {
        "never" => EmbeddedOptions {
            checkpoint_interval: Duration::from_secs(3600),
            ..EmbeddedOptions::default()
        },
        "often" => EmbeddedOptions {
            log_bytes: 16 << 10,
            checkpoint_interval: Duration::from_millis(5),
            ..EmbeddedOptions::default()
        },
        _ => EmbeddedOptions::default(),
    }
}

/// In the child: writes keys forever, printing `ACK <i>` after each write is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child_writes_until_killed() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return; // Only meaningful as the child of `acknowledged_writes_survive_kill_9`.
    };
    let schedule = std::env::var(CHILD_CHECKPOINTS_ENV).unwrap_or_default();
    let store =
        Arc::new(EmbeddedStore::open(Path::new(&dir), checkpoints(&schedule)).expect("open"));
    // Several concurrent writers, so acknowledged writes come from group commits too.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("/crash/{w}/{i:08}");
                store
                    .create(&key, format!("value-{w}-{i}").into_bytes())
                    .await
                    .expect("create");
                if i > 0 {
                    // Also CAS-update the previous key, so updates are covered too.
                    let prev = format!("/crash/{w}/{:08}", i - 1);
                    let (kv, _) = store.get(&prev).await.expect("get");
                    let kv = kv.expect("previous key exists");
                    store
                        .update(
                            &prev,
                            kv.mod_revision,
                            format!("updated-{w}-{}", i - 1).into_bytes(),
                        )
                        .await
                        .expect("update");
                }
                println!("ACK {w} {i}");
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    kill_9_while_writing("default");
}

/// With no checkpoint after opening, every acknowledged write is only in the write-ahead log (and redb's
/// non-durable commits, gone with the process): reopening replays the log and finds all of them.
#[test]
fn writes_acknowledged_after_the_last_checkpoint_are_replayed_from_the_log_after_kill_9() {
    let (store, _dir) = kill_9_while_writing("never");
    let (first, last) = store
        .recovered()
        .expect("the reopened store replayed its log");
    assert!(
        last - first >= 400,
        "replayed revisions {first}..={last}: fewer than the acknowledged writes"
    );
}

/// With a checkpoint every few batches, kill -9 lands during or right after one (a durable redb commit, then the
/// log restarting over its earlier records): nothing acknowledged is lost either way.
#[test]
fn kill_9_during_frequent_checkpoints_loses_no_acknowledged_write() {
    kill_9_while_writing("often");
}

/// Runs the crash child with a checkpoint schedule, kills it with SIGKILL after 400 acknowledged writes, reopens
/// the store and checks that every acknowledged create and update is there; returns the reopened store and its
/// directory.
fn kill_9_while_writing(schedule: &str) -> (EmbeddedStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = std::env::current_exe().expect("test executable");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "crash_child_writes_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir.path())
        .env(CHILD_CHECKPOINTS_ENV, schedule)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut acked: Vec<(u32, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read child output");
        if let Some(rest) = line.strip_prefix("ACK ") {
            let mut it = rest.split(' ');
            let w = it.next().and_then(|s| s.parse().ok()).expect("writer");
            let i = it.next().and_then(|s| s.parse().ok()).expect("index");
            acked.push((w, i));
        }
        if acked.len() >= 400 || Instant::now() > deadline {
            break;
        }
    }
    // SIGKILL while the writers are mid-flight.
    child.kill().expect("kill -9 the child");
    let _ = child.wait();
    assert!(
        acked.len() >= 400,
        "child acknowledged only {} writes",
        acked.len()
    );

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = rt.block_on(async {
        let store =
            EmbeddedStore::open(dir.path(), checkpoints(schedule)).expect("reopen after kill -9");
        for (w, i) in &acked {
            let key = format!("/crash/{w}/{i:08}");
            let (kv, _) = store.get(&key).await.expect("get");
            let kv = kv.unwrap_or_else(|| panic!("acknowledged key {key} lost after kill -9"));
            let value = String::from_utf8_lossy(&kv.value).into_owned();
            // The ACK of i came after updating i-1, so every acknowledged i-1 holds its update.
            let updated = acked.contains(&(*w, i + 1));
            if updated {
                assert_eq!(
                    value,
                    format!("updated-{w}-{i}"),
                    "acknowledged update of {key} lost"
                );
            } else {
                assert!(
                    value == format!("value-{w}-{i}") || value == format!("updated-{w}-{i}"),
                    "{key} = {value}"
                );
            }
        }
        // The revision counter survived too: new writes get fresh revisions.
        let rev = store.revision().await.expect("revision");
        let kv = store
            .create("/crash/after", b"x".to_vec())
            .await
            .expect("write after reopen");
        assert_eq!(kv.mod_revision, rev + 1);
        match store
            .create(&format!("/crash/0/{:08}", 0), b"again".to_vec())
            .await
        {
            Err(StoreError::AlreadyExists { .. }) => {}
            other => panic!("expected AlreadyExists, got {other:?}"),
        }
        store
    });
    (store, dir)
}

#[tokio::test]
async fn history_from_before_a_restart_is_reported_compacted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = {
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open");
        store.create("/r/a", b"1".to_vec()).await.expect("create")
    };
    let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("reopen");
    assert!(matches!(
        store.watch("/r/", first.mod_revision).await,
        Err(StoreError::Compacted { .. })
    ));
    let rev = store.revision().await.expect("revision");
    assert!(
        store.watch("/r/", rev + 1).await.is_ok(),
        "watching from the next revision works"
    );
}

#[tokio::test]
async fn a_slow_watcher_past_the_history_gets_compacted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(
        dir.path(),
        EmbeddedOptions {
            history: 16,
            ..EmbeddedOptions::default()
        },
    )
    .expect("open");
    let mut w = store.watch("/s/", 0).await.expect("watch");
    for i in 0..100 {
        store
            .create(&format!("/s/{i:03}"), vec![])
            .await
            .expect("create");
    }
    use futures_util::StreamExt;
    let mut got = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("watch stalled")
        {
            Some(Ok(_)) => got += 1,
            Some(Err(StoreError::Compacted { .. })) => break,
            other => panic!("expected Compacted, got {other:?}"),
        }
        assert!(
            got < 100,
            "a watcher 100 events behind a 16-event history cannot catch up"
        );
    }
}

/// The watch history is bounded by bytes too: after large writes only the newest events that fit are kept, so
/// a watch from before them is refused (the client relists) while one from the newest event still works.
#[tokio::test]
async fn the_watch_history_keeps_only_as_many_bytes_as_allowed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(
        dir.path(),
        EmbeddedOptions {
            history: 1000,
            history_bytes: 10_000,
            ..EmbeddedOptions::default()
        },
    )
    .expect("open");
    let first = store
        .create("/b/000", vec![b'x'; 3000])
        .await
        .expect("create");
    let mut last = first.clone();
    for i in 1..10 {
        last = store
            .create(&format!("/b/{i:03}"), vec![b'x'; 3000])
            .await
            .expect("create");
    }
    assert!(
        matches!(
            store.watch("/b/", first.mod_revision).await,
            Err(StoreError::Compacted { .. })
        ),
        "30 kB of events do not fit in a 10 kB history"
    );
    let mut w = store
        .watch("/b/", last.mod_revision - 2)
        .await
        .expect("the newest three events fit");
    use futures_util::StreamExt;
    for want in last.mod_revision - 2..=last.mod_revision {
        let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("watch stalled")
            .expect("an event")
            .expect("no error");
        assert_eq!(ev.revision(), want);
    }
}

/// Group commit folds concurrent writes into one transaction, but each keeps its own precondition: of many
/// compare-and-swap updates racing on one key from the same revision exactly one wins, the rest get a conflict
/// naming the winner's revision, and the unrelated creates committed alongside them all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_precondition_in_a_group_commit_fails_only_its_own_write() {
    let (store, _dir) = fresh().await;
    let base = store
        .create("/race/shared", b"v0".to_vec())
        .await
        .expect("create shared key");
    let mut tasks = Vec::new();
    for i in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let update = store.update(
                "/race/shared",
                base.mod_revision,
                format!("v-{i}").into_bytes(),
            );
            let own = format!("/race/own/{i:02}");
            let create = store.create(&own, b"x".to_vec());
            let duplicate = store.create("/race/shared", b"dup".to_vec());
            tokio::join!(update, create, duplicate)
        }));
    }
    let mut winners = Vec::new();
    let mut conflicts = Vec::new();
    for t in tasks {
        let (update, create, duplicate) = t.await.expect("task");
        create.expect("an unrelated create in the same batch succeeds");
        assert!(
            matches!(duplicate, Err(StoreError::AlreadyExists { .. })),
            "{duplicate:?}"
        );
        match update {
            Ok(kv) => winners.push(kv),
            Err(StoreError::Conflict { current, .. }) => conflicts.push(current.mod_revision),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one CAS from the same revision wins"
    );
    assert_eq!(conflicts.len(), 31);
    let winner = &winners[0];
    // Each loser saw the key as it was when its own write was applied: the winner's revision once it committed
    // (or a later one), never the base revision it expected.
    assert!(conflicts.iter().all(|r| *r >= winner.mod_revision));
    let (kv, _) = store.get("/race/shared").await.expect("get");
    assert_eq!(kv.expect("shared key").value, winner.value);
    let own = store
        .list("/race/own/", &Default::default())
        .await
        .expect("list");
    assert_eq!(own.items.len(), 32);
}

/// Set in the child process of the failed-log-write test.
const LOG_FAIL_CHILD_ENV: &str = "WINDLASS_STORE_LOG_FAIL_CHILD_DIR";

/// In the child: makes the write-ahead log's `pwrite` fail for real (a file size limit below the log's next
/// offset: EFBIG) and checks what callers see; prints `LOG-FAIL-CHILD-OK` at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_fail_child() {
    let Ok(dir) = std::env::var(LOG_FAIL_CHILD_ENV) else {
        return; // Only meaningful as the child of `a_failed_log_write_fails_its_batch_and_refuses_later_writes`.
    };
    let dir = Path::new(&dir);
    let options = checkpoints("never");
    let store = EmbeddedStore::open(dir, options.clone()).expect("open");
    for i in 0..10 {
        store
            .create(&format!("/f/{i:03}"), b"acknowledged".to_vec())
            .await
            .expect("create before the limit");
    }
    let limit = |bytes: u64| {
        let lim = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit reads the struct we pass; no memory is shared.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
    };
    // Writes past the limit fail with EFBIG instead of killing the process.
    // SAFETY: ignoring a signal installs no handler code.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // The log holds ~10 small records (< 2 KiB); some record below soon crosses 4 KiB.
    limit(4096);
    let mut failed_at = None;
    for i in 10..200 {
        if store
            .create(&format!("/f/{i:03}"), b"acknowledged".to_vec())
            .await
            .is_err()
        {
            failed_at = Some(i);
            break;
        }
    }
    let failed_at = failed_at.expect("a log write past the file size limit fails");
    limit(libc::RLIM_INFINITY);
    // Even with the disk writable again, no write is accepted until a restart: whether the failed record
    // reached the disk is unknown.
    let refused = store.create("/f/after", b"x".to_vec()).await;
    assert!(
        matches!(&refused, Err(StoreError::Backend(msg)) if msg.contains("restart")),
        "{refused:?}"
    );
    // Reads still serve everything acknowledged, and nothing of the failed batch.
    let listed = store.list("/f/", &Default::default()).await.expect("list");
    assert_eq!(listed.items.len(), failed_at);
    drop(store);
    let store = EmbeddedStore::open(dir, options).expect("reopen");
    let listed = store.list("/f/", &Default::default()).await.expect("list");
    assert_eq!(
        listed.items.len(),
        failed_at,
        "after a restart: every acknowledged write, and not the torn record of the failed one"
    );
    store
        .create("/f/after-restart", b"x".to_vec())
        .await
        .expect("writes work again after a restart");
    println!("\nLOG-FAIL-CHILD-OK");
}

/// A write to the log that fails (here EFBIG from a file size limit, standing in for EIO) fails its batch with
/// nothing applied, and the store then refuses writes until restarted, as etcd does (see the module docs on
/// fsyncgate); reads go on, and a restart recovers exactly the acknowledged writes.
#[test]
fn a_failed_log_write_fails_its_batch_and_refuses_later_writes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = std::env::current_exe().expect("test executable");
    let out = Command::new(exe)
        .args([
            "--exact",
            "log_fail_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(LOG_FAIL_CHILD_ENV, dir.path())
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("LOG-FAIL-CHILD-OK"),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
