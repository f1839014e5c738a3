//! Watch: a chunked stream of newline-delimited `{"type": ..., "object": ...}` events
//! (Ref: apiserver `pkg/endpoints/handlers/watch.go`, `pkg/storage/cacher`).
//!
//! - `resourceVersion` unset or `0`, or `sendInitialEvents=true`: synthetic ADDED events for the current objects,
//!   then live events; with `sendInitialEvents=true` the initial events end with a BOOKMARK annotated
//!   `k8s.io/initial-events-end: "true"`.
//! - `resourceVersion=N`: every change after N. When that history is gone: HTTP 200, then one ERROR event with a
//!   410 `Expired` Status, then the end of the stream (an HTTP-level 410 would make kube-rs retry forever).
//! - Selectors are applied to both the old and the new object, as upstream: an object that starts matching is
//!   ADDED, one that stops matching is DELETED.
//! - `timeoutSeconds` ends the body cleanly; `allowWatchBookmarks=true` adds periodic BOOKMARKs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::handlers::{append_stored_json, list_kvs, object_of, stored_object, Selection};
use super::resources::ResourceKind;
use super::selectors::FieldSelector;
use super::status::ApiError;
use super::{table, Body, Ctx, State, Target};
use crate::store::{Event, KeyValue, StoreError};

/// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
const BOOKMARK_EVERY: Duration = Duration::from_secs(30);

pub(crate) async fn serve(
    state: &Arc<State>,
    ctx: &Ctx,
    t: &Target,
    name: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let mut sel = Selection::from_query(ctx, t.kind)?;
    if let Some(n) = name {
        let mut f = ctx
            .query
            .get("fieldSelector")
            .unwrap_or_default()
            .to_string();
        if !f.is_empty() {
            f.push(',');
        }
        f.push_str(&format!("metadata.name={n}"));
        sel.fields = FieldSelector::parse(&f, t.kind.kind).map_err(ApiError::bad_request)?;
    }
    let send_initial = ctx.query.get("sendInitialEvents") == Some("true");
    let bookmarks = ctx.query.flag("allowWatchBookmarks");
    let rv = ctx.query.get("resourceVersion").unwrap_or("0");
    let timeout = match ctx.query.get("timeoutSeconds") {
        Some(s) => Duration::from_secs(
            s.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {s:?}")))?,
        ),
        // Upstream: a random duration between the minimum request timeout (30 min) and twice that.
        None => Duration::from_secs(1800 + u64::from(uuid::Uuid::new_v4().as_bytes()[0]) * 7),
    };
    let (initial, start) = if rv == "0" || send_initial {
        // Stored bytes, not JSON trees: each initial object is decoded only when its event is sent.
        let page = list_kvs(state, t.kind, t.namespace.as_deref(), &sel, None, None).await?;
        (page.items, page.revision + 1)
    } else {
        let n: i64 = rv
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?;
        (Vec::new(), n + 1)
    };
    let prefix = t.kind.prefix(t.namespace.as_deref());
    let stream = state.store.watch(&prefix, start).await;

    let w = Watcher {
        state: state.clone(),
        kind: t.kind,
        sel,
        table: ctx.wants_table(),
        include_object: ctx.query.get("includeObject").map(String::from),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut last_rev = start - 1;
        for kv in initial {
            let line = match w.stored_line("ADDED", &kv.key, &kv.value, kv.mod_revision) {
                Ok(line) => line,
                Err(e) => {
                    let _ = tx
                        .send(encode(&json!({"type": "ERROR", "object": e.to_status()})))
                        .await;
                    return;
                }
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if send_initial {
            let mut b = w.bookmark(last_rev);
            b["object"]["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            if tx.send(encode(&b)).await.is_err() {
                return;
            }
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(error_line(e)).await;
                return;
            }
        };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_EVERY, BOOKMARK_EVERY);
        loop {
            let line = tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = tick.tick(), if bookmarks => encode(&w.bookmark(last_rev)),
                ev = stream.next() => match ev {
                    None => return,
                    Some(Err(e)) => {
                        let _ = tx.send(error_line(e)).await;
                        return;
                    }
                    Some(Ok(ev)) => {
                        last_rev = ev.revision();
                        match w.convert(&ev) {
                            Ok(Some(line)) => line,
                            Ok(None) => continue,
                            Err(e) => {
                                let _ = tx.send(encode(&json!({"type": "ERROR", "object": e.to_status()}))).await;
                                return;
                            }
                        }
                    }
                },
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let body = BodyExt::boxed(StreamBody::new(futures_util::stream::unfold(
        rx,
        |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
        },
    )));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// How many recent event lines [`SharedLines`] keeps, and how many bytes at most (a line over the byte bound is
/// encoded per watcher, as before).
const SHARED_LINES: usize = 64;
const SHARED_LINE_BYTES: usize = 1 << 20;

/// The encoded lines of recent events, shared by every JSON watcher: with a thousand watchers of pods, an event
/// is encoded once and its buffer shared (reference-counted [`Bytes`]) instead of built a thousand times. A line
/// is named by its revision, event type and key, which fix its bytes for all non-Table watchers.
#[derive(Default)]
pub(crate) struct SharedLines(Mutex<VecDeque<SharedLine>>);

struct SharedLine {
    revision: i64,
    kind: &'static str,
    key: String,
    line: Bytes,
}

impl SharedLines {
    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<SharedLine>> {
        // Entries are pushed and popped whole: a panic elsewhere cannot leave one half-written.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get_or_encode(
        &self,
        revision: i64,
        kind: &'static str,
        key: &str,
        encode: impl FnOnce() -> Result<Bytes, ApiError>,
    ) -> Result<Bytes, ApiError> {
        let found = self
            .recent()
            .iter()
            .rev()
            .find(|l| l.revision == revision && l.kind == kind && l.key == key)
            .map(|l| l.line.clone());
        if let Some(line) = found {
            return Ok(line);
        }
        // Encoded outside the lock: watchers racing on a new event may each encode it once, no more.
        let line = encode()?;
        if line.len() <= SHARED_LINE_BYTES {
            let mut recent = self.recent();
            recent.push_back(SharedLine {
                revision,
                kind,
                key: key.to_string(),
                line: line.clone(),
            });
            let mut bytes: usize = recent.iter().map(|l| l.line.len()).sum();
            while recent.len() > SHARED_LINES || bytes > SHARED_LINE_BYTES {
                match recent.pop_front() {
                    Some(old) => bytes -= old.line.len(),
                    None => break,
                }
            }
        }
        Ok(line)
    }
}

struct Watcher {
    state: Arc<State>,
    kind: &'static ResourceKind,
    sel: Selection,
    table: bool,
    include_object: Option<String>,
}

fn encode(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn error_line(e: StoreError) -> Bytes {
    encode(&json!({"type": "ERROR", "object": ApiError::from(e).to_status()}))
}

impl Watcher {
    fn line(&self, kind: &str, obj: Value) -> Bytes {
        let object = if self.table {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            table::table(self.kind, &[obj], &rv, None, self.include_object.as_deref())
        } else {
            obj
        };
        encode(&json!({"type": kind, "object": object}))
    }

    fn bookmark(&self, rev: i64) -> Value {
        json!({"type": "BOOKMARK", "object": {
            "kind": self.kind.kind,
            "apiVersion": self.kind.api_version(),
            "metadata": {"resourceVersion": rev.to_string()},
        }})
    }

    /// The event line for a stored object: its stored bytes with the revision spliced in (no JSON tree per
    /// watcher), or — for Table watches and bytes the splice does not take — parsed and encoded.
    fn stored_line(
        &self,
        kind: &str,
        key: &str,
        value: &[u8],
        revision: i64,
    ) -> Result<Bytes, ApiError> {
        if !self.table {
            let mut line = Vec::with_capacity(value.len() + 48);
            line.extend_from_slice(b"{\"type\":\"");
            line.extend_from_slice(kind.as_bytes());
            line.extend_from_slice(b"\",\"object\":");
            append_stored_json(&mut line, key, value, revision)?;
            line.extend_from_slice(b"}\n");
            return Ok(Bytes::from(line));
        }
        Ok(self.line(kind, stored_object(key, value, revision)?))
    }

    /// Whether the watch's selectors admit the object (parsed only when there is a selector).
    fn admits(&self, kv: &KeyValue) -> Result<bool, ApiError> {
        Ok(self.sel.is_empty() || self.sel.matches(&object_of(kv)?))
    }

    fn convert(&self, ev: &Event) -> Result<Option<Bytes>, ApiError> {
        let (kind, kv, revision) = match ev {
            Event::Created(kv) => {
                if !self.admits(kv)? {
                    return Ok(None);
                }
                ("ADDED", kv, kv.mod_revision)
            }
            Event::Updated { prev, kv } => {
                let kind = match (self.admits(prev)?, self.admits(kv)?) {
                    (true, true) => "MODIFIED",
                    (false, true) => "ADDED",
                    (true, false) => "DELETED",
                    (false, false) => return Ok(None),
                };
                (kind, kv, kv.mod_revision)
            }
            Event::Deleted { prev, revision } => {
                if !self.admits(prev)? {
                    return Ok(None);
                }
                // The deleted object carries the revision of its deletion.
                ("DELETED", prev, *revision)
            }
        };
        if self.table {
            return self
                .stored_line(kind, &kv.key, &kv.value, revision)
                .map(Some);
        }
        self.state
            .watch_lines
            .get_or_encode(revision, kind, &kv.key, || {
                self.stored_line(kind, &kv.key, &kv.value, revision)
            })
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn line(text: &str) -> Result<Bytes, ApiError> {
        Ok(Bytes::from(text.to_string()))
    }

    #[test]
    fn an_event_line_is_encoded_once_and_shared_by_later_watchers() {
        let lines = SharedLines::default();
        let first = lines
            .get_or_encode(7, "ADDED", "/registry/pods/ns/a", || line("a7"))
            .unwrap();
        let again = lines
            .get_or_encode(7, "ADDED", "/registry/pods/ns/a", || {
                panic!("encoded twice")
            })
            .unwrap();
        assert_eq!(again, "a7");
        assert_eq!(
            again.as_ptr(),
            first.as_ptr(),
            "the same buffer, not a copy"
        );
        // Another type, revision or key is another line.
        for (rev, kind, key, text) in [
            (7, "DELETED", "/registry/pods/ns/a", "d7"),
            (8, "ADDED", "/registry/pods/ns/a", "a8"),
            (7, "ADDED", "/registry/pods/ns/b", "b7"),
        ] {
            assert_eq!(
                lines.get_or_encode(rev, kind, key, || line(text)).unwrap(),
                text
            );
        }
    }

    #[test]
    fn the_shared_lines_stay_within_their_count_and_bytes() {
        let lines = SharedLines::default();
        for rev in 0..(SHARED_LINES as i64 * 2) {
            lines
                .get_or_encode(rev, "ADDED", "k", || line("x"))
                .unwrap();
        }
        assert_eq!(lines.recent().len(), SHARED_LINES);
        assert_eq!(
            lines.recent().front().map(|l| l.revision),
            Some(SHARED_LINES as i64)
        );
        let big = "y".repeat(SHARED_LINE_BYTES / 2 + 1);
        lines
            .get_or_encode(1000, "ADDED", "k", || line(&big))
            .unwrap();
        lines
            .get_or_encode(1001, "ADDED", "k", || line(&big))
            .unwrap();
        let held: usize = lines.recent().iter().map(|l| l.line.len()).sum();
        assert!(held <= SHARED_LINE_BYTES, "{held} bytes held");
        // A line over the bound is answered but not kept.
        let huge = "z".repeat(SHARED_LINE_BYTES + 1);
        let answered = lines
            .get_or_encode(1002, "ADDED", "k", || line(&huge))
            .unwrap();
        assert_eq!(answered.len(), huge.len());
        assert!(lines.recent().iter().all(|l| l.revision != 1002));
        // An encoding error reaches the watcher and is not kept.
        assert!(lines
            .get_or_encode(1003, "ADDED", "k", || Err(ApiError::internal("broken")))
            .is_err());
        assert!(lines.recent().iter().all(|l| l.revision != 1003));
    }
}
