//! The file source of static pods: `--pod-manifest-path` watched with inotify (the `notify` crate) and rescanned
//! every [`FILE_CHECK_FREQUENCY`], published as a snapshot of the static pods by UID.
//!
//! Ref: upstream `pkg/kubelet/config/file.go` and `file_linux.go`: the kubelet's own config source, read whether or
//! not the API server answers. Every change is a full rescan (upstream's periodic `listConfig` sends a SET of all
//! pods), so a manifest that became unreadable drops its pod and one that was fixed brings it back. A changed
//! manifest has a new hash and so a new UID: its old pod is stopped and the new one started (as upstream).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use notify::Watcher;
use tokio::sync::{mpsc, watch};

use super::Shared;
use crate::events::{self, EventType};
use crate::static_pods;

/// Upstream's `fileCheckFrequency`: a full rescan even without inotify events (missed events, a directory that
/// appears later, a watch that could not be set up).
pub(crate) const FILE_CHECK_FREQUENCY: Duration = Duration::from_secs(20);

/// Editors and `kubectl`-like tools write a file in several steps: events within this window make one rescan.
const SETTLE: Duration = Duration::from_millis(150);

/// Reason of the Event about a manifest that cannot be used (upstream logs it; an Event on the Node makes it
/// visible with `kubectl describe node`).
const FAILED_STATIC_POD: &str = "FailedStaticPodManifest";

/// The static pods by UID (their config hash).
pub(crate) type StaticPods = BTreeMap<String, Pod>;

/// The manifest directory's current pods, and what was reported about its bad files.
pub(crate) struct FileSource {
    dir: PathBuf,
    node_name: String,
    current: StaticPods,
    reported: BTreeSet<String>,
}

impl FileSource {
    pub(crate) fn new(dir: &Path, node_name: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            node_name: node_name.to_string(),
            current: BTreeMap::new(),
            reported: BTreeSet::new(),
        }
    }

    /// Rescans the directory; returns the new pod set when it changed. Pods whose UID did not change keep the
    /// object first seen (its `config.seen` annotation), so their workers are not woken. Bad files are logged
    /// (and recorded as an Event on the Node through `warn`) once per distinct error.
    pub(crate) fn rescan(&mut self, warn: &mut dyn FnMut(&str)) -> Option<StaticPods> {
        let found = match static_pods::load_dir(&self.dir, &self.node_name, Timestamp::now()) {
            Ok(f) => f,
            Err(e) => {
                // An unreadable directory keeps what runs (upstream logs and retries at the next check).
                let msg = e.to_string();
                if self.reported.insert(msg.clone()) {
                    tracing::error!(error = %msg, "cannot read the static pod manifests");
                    warn(&msg);
                }
                return None;
            }
        };
        let mut errors = BTreeSet::new();
        for e in &found.errors {
            let msg = e.to_string();
            if !self.reported.contains(&msg) {
                tracing::error!(error = %msg, "static pod manifest skipped");
                warn(&msg);
            }
            errors.insert(msg);
        }
        self.reported = errors;
        let mut next = BTreeMap::new();
        for sp in found.pods {
            let Some(uid) = sp.pod.metadata.uid.clone() else {
                continue;
            };
            let pod = match self.current.get(&uid) {
                Some(old) => old.clone(),
                None => {
                    tracing::info!(
                        pod = %uid,
                        name = sp.pod.metadata.name.as_deref().unwrap_or_default(),
                        source = %sp.source.display(),
                        "static pod manifest loaded"
                    );
                    sp.pod
                }
            };
            next.insert(uid, pod);
        }
        let changed = next.keys().ne(self.current.keys());
        self.current = next;
        changed.then(|| self.current.clone())
    }
}

/// Starts the source: the first scan happens before this returns (so a restarted kubelet knows its static pods
/// before it cleans up sandboxes), then a task follows the directory until every receiver is gone.
pub(crate) fn start(shared: Arc<Shared>, dir: &Path) -> watch::Receiver<StaticPods> {
    let mut source = FileSource::new(dir, &shared.cfg.node_name);
    let node = shared.cfg.node_name.clone();
    let warn = move |shared: &Shared, msg: &str| {
        shared.event(
            &events::node_ref(&node),
            EventType::Warning,
            FAILED_STATIC_POD,
            msg,
        );
    };
    let first = source.rescan(&mut |m| warn(&shared, m)).unwrap_or_default();
    let (tx, rx) = watch::channel(first);
    let dir = dir.to_path_buf();
    tokio::spawn(async move {
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<()>();
        let mut watcher: Option<notify::RecommendedWatcher> = None;
        let mut tick = tokio::time::interval(FILE_CHECK_FREQUENCY);
        tick.tick().await;
        loop {
            if watcher.is_none() {
                watcher = watch_dir(&dir, ev_tx.clone());
            }
            tokio::select! {
                _ = tick.tick() => {}
                Some(()) = ev_rx.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while ev_rx.try_recv().is_ok() {}
                }
            }
            if tx.is_closed() {
                return;
            }
            if let Some(pods) = source.rescan(&mut |m| warn(&shared, m)) {
                tracing::info!(count = pods.len(), "static pods changed");
                tx.send_replace(pods);
            }
        }
    });
    rx
}

/// An inotify watch of the directory (not recursive, as upstream); `None` when it cannot be set up yet (e.g. the
/// directory does not exist), retried after the next rescan.
fn watch_dir(dir: &Path, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    if !dir.is_dir() {
        return None;
    }
    let mut w = match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.send(());
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the static pod directory; rescanning periodically");
            return None;
        }
    };
    match w.watch(dir, notify::RecursiveMode::NonRecursive) {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), "watching static pod manifests");
            Some(w)
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the static pod directory; rescanning periodically");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: w\n    image: busybox\n";

    #[test]
    fn rescans_report_changes_by_uid_and_keep_unchanged_pods() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = FileSource::new(dir.path(), "n1");
        let mut warnings = Vec::new();
        assert_eq!(src.rescan(&mut |m| warnings.push(m.to_string())), None);
        std::fs::write(dir.path().join("web.yaml"), POD).unwrap();
        let first = src.rescan(&mut |m| warnings.push(m.to_string())).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(src.rescan(&mut |_| {}), None, "nothing changed");
        std::fs::write(dir.path().join("web.yaml"), POD.replace("busybox", "other")).unwrap();
        let second = src.rescan(&mut |_| {}).unwrap();
        assert_eq!(second.len(), 1);
        assert_ne!(
            first.keys().next(),
            second.keys().next(),
            "an edit is a new pod"
        );
        std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
        assert_eq!(src.rescan(&mut |_| {}).unwrap().len(), 0);
        assert!(warnings.is_empty());
    }

    #[test]
    fn a_bad_manifest_is_reported_once_and_does_not_stop_the_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), POD).unwrap();
        std::fs::write(dir.path().join("bad.yaml"), "kind: [").unwrap();
        let mut src = FileSource::new(dir.path(), "n1");
        let mut warnings = Vec::new();
        let pods = src.rescan(&mut |m| warnings.push(m.to_string())).unwrap();
        assert_eq!(pods.len(), 1);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("bad.yaml"), "{warnings:?}");
        src.rescan(&mut |m| warnings.push(m.to_string()));
        assert_eq!(warnings.len(), 1, "the same error is not repeated");
    }
}
