//! Backups of the embedded store with the real `windlass-control snapshot save/restore` commands: consistent while
//! a server writes, exact on restore (keys, values, revisions), and refusing damaged files and non-empty targets.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use windlass_control::store::embedded::{EmbeddedOptions, EmbeddedStore};
use windlass_control::store::snapshot::SnapshotServer;
use windlass_control::store::{KeyValue, Revision, Store};

fn control(args: &[&str], dir: &Path, file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_windlass-control"))
        .args(args)
        .arg(file)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("run windlass-control")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "windlass-control failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn all_keys(store: &dyn Store) -> (Vec<KeyValue>, Revision) {
    let list = store.list("/", &Default::default()).await.expect("list");
    (list.items, list.revision)
}

/// One acknowledged write, to recompute the store's content at any revision.
enum Write {
    Put(KeyValue),
    Delete(String, Revision),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_while_writes_go_on_restores_one_point_in_time_exactly() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    let store = Arc::new(EmbeddedStore::open(&dir, EmbeddedOptions::default()).expect("open"));
    let _server = SnapshotServer::start(store.clone(), &dir).expect("snapshot server");
    for i in 0..200 {
        store
            .create(&format!("/registry/pods/ns/p{i:04}"), vec![b'x'; 2000])
            .await
            .expect("create");
    }

    // Writers create, update and delete keys until told to stop; every acknowledged write is recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3 {
        let (store, stop) = (store.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut log = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("/registry/pods/w{w}/k{i:05}");
                let kv = store
                    .create(&key, format!("{w}-{i}").into_bytes())
                    .await
                    .expect("create");
                log.push(Write::Put(kv.clone()));
                if i % 3 == 1 {
                    let kv = store
                        .update(&key, kv.mod_revision, b"updated".to_vec())
                        .await
                        .expect("update");
                    log.push(Write::Put(kv));
                } else if i % 3 == 2 {
                    let (_, rev) = store.delete(&key, None).await.expect("delete");
                    log.push(Write::Delete(key, rev));
                }
                i += 1;
            }
            log
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = store.revision().await.expect("revision");
    let file = tmp.path().join("backup.snap");
    let (d, f) = (dir.clone(), file.clone());
    let out = tokio::task::spawn_blocking(move || control(&["snapshot", "save"], &d, &f))
        .await
        .expect("save");
    let after = store.revision().await.expect("revision");
    stop.store(true, Ordering::SeqCst);
    let mut log = Vec::new();
    for w in writers {
        log.extend(w.await.expect("writer"));
    }
    let stdout = ok(out);
    assert!(stdout.starts_with("saved "), "{stdout}");
    assert!(after > before, "writes went on during the save");

    let restored_dir = tmp.path().join("restored");
    ok(control(&["snapshot", "restore"], &restored_dir, &file));
    let restored = EmbeddedStore::open(&restored_dir, EmbeddedOptions::default()).expect("open");
    let (items, revision) = all_keys(&restored).await;
    assert!(
        (before..=after).contains(&revision),
        "snapshot revision {revision} taken between {before} and {after}"
    );

    // The content at `revision`: the initial keys plus every logged write up to it, in revision order.
    let mut expected: BTreeMap<String, KeyValue> = BTreeMap::new();
    for i in 0..200 {
        let key = format!("/registry/pods/ns/p{i:04}");
        let (kv, _) = store.get(&key).await.expect("get");
        expected.insert(key, kv.expect("initial key"));
    }
    let mut ordered: Vec<_> = log
        .into_iter()
        .map(|w| match &w {
            Write::Put(kv) => (kv.mod_revision, w),
            Write::Delete(_, rev) => (*rev, w),
        })
        .filter(|(rev, _)| *rev <= revision)
        .collect();
    ordered.sort_by_key(|(rev, _)| *rev);
    for (_, w) in ordered {
        match w {
            Write::Put(kv) => {
                expected.insert(kv.key.clone(), kv);
            }
            Write::Delete(key, _) => {
                expected.remove(&key);
            }
        }
    }
    let expected: Vec<_> = expected.into_values().collect();
    assert_eq!(items.len(), expected.len(), "same number of keys");
    assert!(
        items == expected,
        "restored keys, values and revisions are the store's at revision {revision}"
    );

    // The restored store goes on from the snapshot's revision.
    let kv = restored
        .create("/registry/pods/ns/new", b"{}".to_vec())
        .await
        .expect("write to the restored store");
    assert_eq!(kv.mod_revision, revision + 1);
}

#[tokio::test]
async fn a_stopped_store_is_saved_directly() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    let written = {
        let store = EmbeddedStore::open(&dir, EmbeddedOptions::default()).expect("open");
        let a = store.create("/a", b"1".to_vec()).await.expect("create");
        store
            .update("/a", a.mod_revision, b"2".to_vec())
            .await
            .expect("update");
        store.create("/b", Vec::new()).await.expect("create");
        all_keys(&store).await
    };
    let file = tmp.path().join("s.snap");
    ok(control(&["snapshot", "save"], &dir, &file));
    let restored_dir = tmp.path().join("restored");
    ok(control(&["snapshot", "restore"], &restored_dir, &file));
    let restored = EmbeddedStore::open(&restored_dir, EmbeddedOptions::default()).expect("open");
    assert_eq!(all_keys(&restored).await, written);
}

#[tokio::test]
async fn save_refuses_a_store_locked_by_a_process_without_the_snapshot_socket() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    let _store = EmbeddedStore::open(&dir, EmbeddedOptions::default()).expect("open");
    let file = tmp.path().join("s.snap");
    let out = control(&["snapshot", "save"], &dir, &file);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("snapshot.sock"), "{stderr}");
    assert!(!file.exists(), "no partial snapshot is left");
}

async fn saved_snapshot(tmp: &Path) -> std::path::PathBuf {
    let dir = tmp.join("data");
    {
        let store = EmbeddedStore::open(&dir, EmbeddedOptions::default()).expect("open");
        for i in 0..50 {
            store
                .create(&format!("/k{i:02}"), vec![i; 100])
                .await
                .expect("create");
        }
    }
    let file = tmp.join("s.snap");
    ok(control(&["snapshot", "save"], &dir, &file));
    file
}

#[tokio::test]
async fn a_corrupt_snapshot_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let file = saved_snapshot(tmp.path()).await;
    let good = std::fs::read(&file).expect("read");

    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let truncated = good[..good.len() - 100].to_vec();
    let mut not_a_snapshot = b"{\"kind\":\"Pod\"}".to_vec();
    not_a_snapshot.resize(100, b' ');
    for (name, bytes, expect) in [
        ("flipped", flipped, "checksum"),
        ("truncated", truncated, "checksum"),
        ("foreign", not_a_snapshot, "not a windlass-control snapshot"),
    ] {
        let bad = tmp.path().join(format!("{name}.snap"));
        std::fs::write(&bad, bytes).expect("write");
        let target = tmp.path().join(format!("restore-{name}"));
        let out = control(&["snapshot", "restore"], &target, &bad);
        assert!(!out.status.success(), "{name}: restore must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{name}: {stderr}");
        assert!(!target.exists(), "{name}: nothing is written");
    }
}

#[tokio::test]
async fn restore_refuses_a_non_empty_target() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let file = saved_snapshot(tmp.path()).await;
    let target = tmp.path().join("busy");
    std::fs::create_dir(&target).expect("mkdir");
    std::fs::write(target.join("ca.crt"), "keep me").expect("write");
    let out = control(&["snapshot", "restore"], &target, &file);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    let left: Vec<_> = std::fs::read_dir(&target)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, ["ca.crt"], "the target is untouched");

    // An existing but empty directory is fine.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    ok(control(&["snapshot", "restore"], &empty, &file));
    let restored = EmbeddedStore::open(&empty, EmbeddedOptions::default()).expect("open");
    assert_eq!(all_keys(&restored).await.0.len(), 50);
}
