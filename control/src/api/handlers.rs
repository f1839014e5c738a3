//! Generic resource handlers: get, list, create, update, patch, delete (+ the status, scale and binding
//! subresources), with upstream semantics (Ref: apiserver `pkg/registry/generic/registry/store.go`).

use std::net::Ipv4Addr;
use std::sync::Arc;

use base64::Engine;
use http::{Method, Response};
use serde_json::{json, Value};

use super::fieldmanager::{self, Scope};
use super::objects::{self, decode, meta, meta_mut, name_of, FieldValidation};
use super::resources::{self, ResourceKind};
use super::selectors::{FieldSelector, LabelSelector};
use super::status::{ApiError, Cause};
use super::{
    json_bytes_response, json_response, patch, table, watch, with_warnings, Body, Ctx, State,
    Target,
};
use crate::store::{KeyValue, ListOptions, Store, StoreError};

/// How many times an update without a client-given resourceVersion retries after losing a race.
const RETRIES: usize = 8;
/// Finalizers of the garbage collector (Ref: `metav1.FinalizerOrphanDependents`, `FinalizerDeleteDependents`).
const FINALIZER_ORPHAN: &str = "orphan";
const FINALIZER_FOREGROUND: &str = "foregroundDeletion";

pub(crate) async fn dispatch(
    state: &Arc<State>,
    ctx: Ctx,
    t: Target,
) -> Result<Response<Body>, ApiError> {
    let watching = t.watch_path || ctx.query.flag("watch");
    let name = t.name.clone();
    let sub = t.subresource.clone();
    match (&ctx.method, name.as_deref(), sub.as_deref()) {
        (&Method::GET, None, None) if watching => watch::serve(state, &ctx, &t, None).await,
        (&Method::GET, Some(n), None) if watching => watch::serve(state, &ctx, &t, Some(n)).await,
        (&Method::GET, None, None) => list(state, &ctx, &t).await,
        (&Method::GET, Some(n), None | Some("status")) => get(state, &ctx, &t, n).await,
        (&Method::GET, Some(n), Some("scale")) => {
            let (obj, _) = read(state, &t, n).await?;
            Ok(json_response(200, &scale_of(t.kind, &obj)?))
        }
        (&Method::POST, None, None)
            if matches!(
                t.kind.kind,
                "SelfSubjectAccessReview" | "SubjectAccessReview"
            ) =>
        {
            self_subject_access_review(state, &ctx, &t).await
        }
        (&Method::POST, None, None) if t.kind.kind == "SelfSubjectReview" => {
            // Ref: upstream `selfsubjectreview` REST: the answer is the authenticated user; the body carries
            // nothing to read (so neither its JSON nor its protobuf form is decoded).
            Ok(json_response(
                201,
                &json!({
                    "kind": "SelfSubjectReview",
                    "apiVersion": "authentication.k8s.io/v1",
                    "metadata": {"creationTimestamp": objects::now()},
                    "status": {"userInfo": {"username": ctx.user.name, "groups": ctx.user.groups}},
                }),
            ))
        }
        (_, _, _)
            if matches!(
                t.kind.kind,
                "SelfSubjectAccessReview" | "SubjectAccessReview" | "SelfSubjectReview"
            ) =>
        {
            Err(ApiError::method_not_allowed(format!(
                "{} only supports create",
                t.kind.plural
            )))
        }
        (&Method::POST, None, None) => create(state, &ctx, &t).await,
        (&Method::POST, Some(n), Some("binding")) => bind(state, &ctx, &t, n).await,
        (&Method::POST, Some(n), Some("token")) => {
            let body = if ctx
                .content_type
                .starts_with("application/vnd.kubernetes.protobuf")
            {
                super::protobuf::decode_token_request(&ctx.body)?
            } else {
                serde_json::from_slice(&ctx.body).map_err(|e| {
                    ApiError::bad_request(format!("the request body is not valid JSON: {e}"))
                })?
            };
            let ns = ns_of(&t).unwrap_or("default");
            let out = super::sa_token::create_token(state, ns, n, body).await?;
            Ok(json_response(201, &out))
        }
        (&Method::PUT, Some(n), _) => update(state, &ctx, &t, n).await,
        (&Method::PATCH, Some(n), _) => patch(state, &ctx, &t, n).await,
        (&Method::DELETE, Some(n), None) => delete(state, &ctx, &t, n).await,
        (&Method::DELETE, None, None) => delete_collection(state, &ctx, &t).await,
        (m, _, _) => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({m} {})",
            ctx.path
        ))),
    }
}

/// `kubectl auth can-i` (SelfSubjectAccessReview): evaluates the requested attributes for the caller;
/// SubjectAccessReview: for the user and groups in `spec` (what kubelets ask about their API's callers).
async fn self_subject_access_review(
    state: &State,
    ctx: &Ctx,
    t: &Target,
) -> Result<Response<Body>, ApiError> {
    let body = body_object(ctx, t.kind)?;
    let (mut review, _) = decode(t.kind, body, FieldValidation::Strict)?;
    let str_at = |p: &str| {
        review
            .pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let attrs = if review.pointer("/spec/resourceAttributes").is_some() {
        let opt = |s: String| (!s.is_empty()).then_some(s);
        super::rbac::Attributes {
            verb: str_at("/spec/resourceAttributes/verb"),
            group: str_at("/spec/resourceAttributes/group"),
            resource: str_at("/spec/resourceAttributes/resource"),
            subresource: opt(str_at("/spec/resourceAttributes/subresource")),
            namespace: opt(str_at("/spec/resourceAttributes/namespace")),
            name: opt(str_at("/spec/resourceAttributes/name")),
            path: None,
        }
    } else if review.pointer("/spec/nonResourceAttributes").is_some() {
        super::rbac::Attributes {
            verb: str_at("/spec/nonResourceAttributes/verb"),
            group: String::new(),
            resource: String::new(),
            subresource: None,
            namespace: None,
            name: None,
            path: Some(str_at("/spec/nonResourceAttributes/path")),
        }
    } else {
        return Err(ApiError::invalid(
            t.kind,
            "",
            vec![Cause::required("spec.resourceAttributes")],
        ));
    };
    let subject = if t.kind.kind == "SubjectAccessReview" {
        let user = str_at("/spec/user");
        let mut groups: Vec<String> = review
            .pointer("/spec/groups")
            .and_then(Value::as_array)
            .map(|g| {
                g.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        if user.is_empty() && groups.is_empty() {
            return Err(ApiError::invalid(
                t.kind,
                "",
                vec![Cause::required("spec.user")],
            ));
        }
        // Ref: upstream adds system:authenticated for any named user in SAR evaluation via the authenticator;
        // callers pass the groups they saw, so keep them as given.
        groups.dedup();
        super::User { name: user, groups }
    } else {
        ctx.user.clone()
    };
    let allowed = super::rbac::authorize(&state.caches, &subject, &attrs);
    review["status"] = json!({"allowed": allowed});
    if allowed {
        review["status"]["reason"] = json!("allowed by RBAC");
    }
    review["apiVersion"] = json!(t.kind.api_version());
    review["kind"] = json!(t.kind.kind);
    Ok(json_response(201, &review))
}

/// Parses a stored value and stamps its resourceVersion.
pub(crate) fn object_of(kv: &KeyValue) -> Result<Value, ApiError> {
    stored_object(&kv.key, &kv.value, kv.mod_revision)
}

/// Parses the stored value of `key` and stamps `revision` as its resourceVersion.
pub(crate) fn stored_object(key: &str, value: &[u8], revision: i64) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(value)
        .map_err(|e| ApiError::internal(format!("stored object {key} is not JSON: {e}")))?;
    meta_mut(&mut v).insert("resourceVersion".into(), json!(revision.to_string()));
    Ok(v)
}

/// The JSON a client gets for a stored value: the stored bytes with `revision` spliced in as the
/// resourceVersion (no JSON tree), or — for bytes not of the plain shape the splice expects — parsed and encoded.
pub(crate) fn stored_json(key: &str, value: &[u8], revision: i64) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    append_stored_json(&mut out, key, value, revision)?;
    Ok(out)
}

/// [`stored_json`] appended to `out` (nothing appended on error).
pub(crate) fn append_stored_json(
    out: &mut Vec<u8>,
    key: &str,
    value: &[u8],
    revision: i64,
) -> Result<(), ApiError> {
    if super::stored::append_with_resource_version(out, value, revision) {
        return Ok(());
    }
    let obj = stored_object(key, value, revision)?;
    serde_json::to_writer(out, &obj)
        .map_err(|e| ApiError::internal(format!("cannot encode {key}: {e}")))
}

/// Serialises an object for storage (without resourceVersion: the store's mod revision is the truth).
fn to_stored(obj: &Value) -> Vec<u8> {
    super::stored::encode_for_store(obj).0
}

fn ns_of(t: &Target) -> Option<&str> {
    t.namespace.as_deref()
}

async fn read(state: &State, t: &Target, name: &str) -> Result<(Value, KeyValue), ApiError> {
    let kv = read_kv(state, t, name).await?;
    Ok((object_of(&kv)?, kv))
}

/// The stored object `name` of the target's kind and namespace, or 404.
async fn read_kv(state: &State, t: &Target, name: &str) -> Result<KeyValue, ApiError> {
    let key = t.kind.key(ns_of(t), name);
    match state.store.get(&key).await? {
        (Some(kv), _) => Ok(kv),
        (None, _) => Err(ApiError::not_found(t.kind, name)),
    }
}

fn body_object(ctx: &Ctx, kind: &ResourceKind) -> Result<Value, ApiError> {
    // kubectl ≥1.32's typed clients write protobuf (and do not fall back to JSON).
    if ctx
        .content_type
        .starts_with("application/vnd.kubernetes.protobuf")
    {
        return super::protobuf::decode(kind, &ctx.body);
    }
    let v: Value = serde_json::from_slice(&ctx.body).map_err(|e| {
        if ctx.content_type.contains("yaml") {
            ApiError::unsupported_media_type(&ctx.content_type)
        } else {
            ApiError::bad_request(format!("the request body is not valid JSON: {e}"))
        }
    })?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(v)
}

fn check_type(kind: &ResourceKind, obj: &Value) -> Result<(), ApiError> {
    if let Some(k) = obj.get("kind").and_then(Value::as_str) {
        if !k.is_empty() && k != kind.kind {
            return Err(ApiError::bad_request(format!(
                "the kind of the provided object ({k}) does not match the kind of the request ({})",
                kind.kind
            )));
        }
    }
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str) {
        if !av.is_empty() && av != kind.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                kind.api_version()
            )));
        }
    }
    Ok(())
}

/// Namespaced objects need an existing namespace that is not being terminated. Answered from the namespace cache;
/// a namespace the cache does not (yet) have is read from the store, as upstream's NamespaceLifecycle admission
/// falls back to a live lookup.
async fn check_namespace(
    state: &State,
    kind: &ResourceKind,
    ns: &str,
    name: &str,
) -> Result<(), ApiError> {
    let ns_kind = resources::find("", "v1", "namespaces")
        .ok_or_else(|| ApiError::internal("no namespace kind"))?;
    let key = ns_kind.key(None, ns);
    let terminating = match state.caches.namespaces.get(&key) {
        Some(cached) => cached.terminating,
        None => match state.store.get(&key).await? {
            (None, _) => return Err(ApiError::not_found(ns_kind, ns)),
            (Some(kv), _) => {
                let obj = object_of(&kv)?;
                meta(&obj)
                    .get("deletionTimestamp")
                    .is_some_and(|v| !v.is_null())
                    || obj.pointer("/status/phase").and_then(Value::as_str) == Some("Terminating")
            }
        },
    };
    if terminating {
        Err(ApiError::namespace_terminating(kind, name, ns))
    } else {
        Ok(())
    }
}

async fn get(state: &State, ctx: &Ctx, t: &Target, name: &str) -> Result<Response<Body>, ApiError> {
    if !ctx.wants_table() {
        let kv = read_kv(state, t, name).await?;
        return Ok(json_bytes_response(
            200,
            stored_json(&kv.key, &kv.value, kv.mod_revision)?,
        ));
    }
    let (obj, kv) = read(state, t, name).await?;
    Ok(json_response(
        200,
        &table::table(
            t.kind,
            &[obj],
            &kv.mod_revision.to_string(),
            None,
            ctx.query.get("includeObject"),
        ),
    ))
}

/// The continue token: where the next page starts and the revision of the first page (as upstream encodes it).
fn encode_continue(revision: i64, last_key: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": revision, "start": last_key});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str, prefix: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    if !start.starts_with(prefix) {
        return Err(bad());
    }
    Ok(start.to_string())
}

pub(crate) struct Selection {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selection {
    pub fn from_query(ctx: &Ctx, kind: &ResourceKind) -> Result<Self, ApiError> {
        let labels = LabelSelector::parse(ctx.query.get("labelSelector").unwrap_or_default())
            .map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(
            ctx.query.get("fieldSelector").unwrap_or_default(),
            kind.kind,
        )
        .map_err(ApiError::bad_request)?;
        Ok(Self { labels, fields })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }
}

/// One page of a list: the stored items (matching the selection), the list revision, the continue token and the
/// remaining count.
pub(crate) struct ListPage {
    pub items: Vec<KeyValue>,
    pub revision: i64,
    pub continue_token: Option<String>,
    pub remaining: Option<u64>,
}

/// Lists objects matching the selection, as upstream's list with `limit`/`continue`. Items stay in their stored
/// form (one parse per item only to apply a selector), so a caller can encode them one at a time.
pub(crate) async fn list_kvs(
    state: &State,
    kind: &ResourceKind,
    namespace: Option<&str>,
    sel: &Selection,
    limit: Option<usize>,
    continue_token: Option<&str>,
) -> Result<ListPage, ApiError> {
    let prefix = kind.prefix(namespace);
    let done = |items, revision| ListPage {
        items,
        revision,
        continue_token: None,
        remaining: None,
    };
    // A single named object: read it directly instead of scanning.
    if let (Some(name), true) = (sel.fields.single_name(), continue_token.is_none()) {
        if namespace.is_some() || !kind.namespaced {
            let (kv, rev) = state.store.get(&format!("{prefix}{name}")).await?;
            let items = match kv {
                Some(kv) if sel.matches(&object_of(&kv)?) => vec![kv],
                _ => vec![],
            };
            return Ok(done(items, rev));
        }
    }
    let mut start_after = match continue_token {
        Some(t) => Some(decode_continue(t, &prefix)?),
        None => None,
    };
    let want = limit.filter(|l| *l > 0);
    let mut items: Vec<KeyValue> = Vec::new();
    let mut revision = None;
    loop {
        let page = state
            .store
            .list(
                &prefix,
                &ListOptions {
                    limit: want
                        .map(|w| (w - items.len()).max(if sel.is_empty() { 1 } else { 500 })),
                    start_after: start_after.clone(),
                },
            )
            .await?;
        revision.get_or_insert(page.revision);
        let last_key = page.items.last().map(|kv| kv.key.clone());
        let page_len = page.items.len();
        let mut taken = 0;
        for kv in page.items {
            taken += 1;
            if sel.is_empty() || sel.matches(&object_of(&kv)?) {
                items.push(kv);
                if want.is_some_and(|w| items.len() >= w) {
                    break;
                }
            }
        }
        let full = want.is_some_and(|w| items.len() >= w);
        let revision = revision.unwrap_or(page.revision);
        if full {
            // More may follow: either the page had more keys after the one we stopped at, or the store has more.
            let after = (page_len - taken) as u64;
            if after > 0 || page.more {
                let stopped_at = items.last().map(|kv| kv.key.clone()).unwrap_or_default();
                let remaining = if sel.is_empty() {
                    page.remaining.map(|r| r + after)
                } else {
                    None
                };
                return Ok(ListPage {
                    items,
                    revision,
                    continue_token: Some(encode_continue(revision, &stopped_at)),
                    remaining,
                });
            }
            return Ok(done(items, revision));
        }
        if !page.more || last_key.is_none() {
            return Ok(done(items, revision));
        }
        start_after = last_key;
    }
}

/// Lists objects matching the selection: items, list revision, continue token, remaining count.
pub(crate) async fn list_objects(
    state: &State,
    kind: &ResourceKind,
    namespace: Option<&str>,
    sel: &Selection,
    limit: Option<usize>,
    continue_token: Option<&str>,
) -> Result<(Vec<Value>, i64, Option<String>, Option<u64>), ApiError> {
    let page = list_kvs(state, kind, namespace, sel, limit, continue_token).await?;
    let items = page
        .items
        .iter()
        .map(object_of)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((items, page.revision, page.continue_token, page.remaining))
}

/// Items encoded per chunk of a streamed list body.
const LIST_CHUNK: usize = 64;
/// Items read from the store per chunk of a full (unpaginated) list.
const STORE_LIST_CHUNK: usize = 256;

/// A list response encoded item by item from the stored bytes as the client reads it, so a list of 10k pods never
/// exists as one JSON tree or one buffer in the server (upstream 1.33 streams list encoding the same way). Its
/// `metadata` comes before `items`, as upstream writes it.
fn list_response(kind: &ResourceKind, page: ListPage) -> Response<Body> {
    let chunks = crate::store::into_chunks(page.items, LIST_CHUNK).map(Ok);
    list_body(
        kind,
        page.revision,
        page.continue_token,
        page.remaining,
        futures_util::stream::iter(chunks),
        None,
    )
}

/// The body of a list: its head, then each chunk of stored items (those `filter` admits, when given) with their
/// resourceVersions spliced in. A store error mid-way ends the body without closing the JSON, so the client
/// fails to decode it instead of taking a short list for the whole.
fn list_body(
    kind: &ResourceKind,
    revision: i64,
    continue_token: Option<String>,
    remaining: Option<u64>,
    chunks: impl futures_util::Stream<Item = Result<Vec<KeyValue>, StoreError>> + Send + 'static,
    filter: Option<Selection>,
) -> Response<Body> {
    use futures_util::StreamExt;
    let mut list_meta = json!({"resourceVersion": revision.to_string()});
    if let Some(c) = continue_token {
        list_meta["continue"] = json!(c);
    }
    if let Some(r) = remaining.filter(|r| *r > 0) {
        list_meta["remainingItemCount"] = json!(r);
    }
    let head = format!(
        "{{\"kind\":{},\"apiVersion\":{},\"metadata\":{},\"items\":[",
        json!(format!("{}List", kind.kind)),
        json!(kind.api_version()),
        list_meta
    );
    // Encoded on a task feeding a small channel: the client's reading paces the store read, and a client that
    // goes away stops it.
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(2);
    tokio::spawn(async move {
        let mut chunks = std::pin::pin!(chunks);
        let mut buf = head.into_bytes();
        let mut first = true;
        loop {
            match chunks.next().await {
                None => {
                    buf.extend_from_slice(b"]}");
                    let _ = tx.send(bytes::Bytes::from(buf)).await;
                    return;
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "a list failed while it was being sent; its body is cut short");
                    let _ = tx.send(bytes::Bytes::from(buf)).await;
                    return;
                }
                Some(Ok(kvs)) => {
                    for kv in kvs {
                        if let Some(sel) = &filter {
                            match object_of(&kv) {
                                Ok(obj) if sel.matches(&obj) => {}
                                Ok(_) => continue,
                                Err(e) => {
                                    tracing::error!(key = %kv.key, error = %e.message, "left a corrupt object out of a list");
                                    continue;
                                }
                            }
                        }
                        let mark = buf.len();
                        if !first {
                            buf.push(b',');
                        }
                        match append_stored_json(&mut buf, &kv.key, &kv.value, kv.mod_revision) {
                            Ok(()) => first = false,
                            // The status line is already sent: leave the object out and say so in the log.
                            Err(e) => {
                                buf.truncate(mark);
                                tracing::error!(key = %kv.key, error = %e.message, "left a corrupt object out of a list")
                            }
                        }
                    }
                }
            }
            if tx
                .send(bytes::Bytes::from(std::mem::take(&mut buf)))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| {
            (
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b)),
                rx,
            )
        })
    });
    let mut r = Response::new(http_body_util::BodyExt::boxed(
        http_body_util::StreamBody::new(body),
    ));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn list(state: &State, ctx: &Ctx, t: &Target) -> Result<Response<Body>, ApiError> {
    let sel = Selection::from_query(ctx, t.kind)?;
    let limit = match ctx.query.get("limit") {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        ),
        None => None,
    };
    // A whole list (no page asked for): streamed from one consistent store read, a chunk at a time.
    let whole = limit.unwrap_or(0) == 0
        && ctx.query.get("continue").is_none()
        && !ctx.wants_table()
        && sel.fields.single_name().is_none();
    if whole {
        let listed = state
            .store
            .list_chunked(&t.kind.prefix(ns_of(t)), STORE_LIST_CHUNK)
            .await?;
        let filter = (!sel.is_empty()).then_some(sel);
        return Ok(list_body(
            t.kind,
            listed.revision,
            None,
            None,
            listed.chunks,
            filter,
        ));
    }
    let page = list_kvs(
        state,
        t.kind,
        ns_of(t),
        &sel,
        limit,
        ctx.query.get("continue"),
    )
    .await?;
    if ctx.wants_table() {
        let items = page
            .items
            .iter()
            .map(object_of)
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(json_response(
            200,
            &table::table(
                t.kind,
                &items,
                &page.revision.to_string(),
                page.continue_token.as_deref(),
                ctx.query.get("includeObject"),
            ),
        ));
    }
    Ok(list_response(t.kind, page))
}

fn dry_run(ctx: &Ctx) -> bool {
    ctx.query.get("dryRun").is_some()
}

/// Validates and stores a new object; returns its JSON (with its resourceVersion) for the response, and any
/// warnings.
pub(crate) async fn create_object(
    state: &State,
    kind: &'static ResourceKind,
    namespace: Option<&str>,
    mut obj: Value,
    validation: FieldValidation,
    fields: Fields<'_>,
    dry: bool,
) -> Result<(Vec<u8>, Vec<String>), ApiError> {
    check_type(kind, &obj)?;
    if kind.namespaced {
        let body_ns = meta(&obj)
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(ns) = namespace {
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
    }
    // A name made from `generateName` may collide with an existing one; upstream (RetryGenerateName, GA in 1.32)
    // then tries fresh names, 8 attempts in all, instead of failing the create.
    let generate_prefix = meta(&obj)
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .is_empty()
        .then(|| meta(&obj).get("generateName").and_then(Value::as_str))
        .flatten()
        .filter(|p| !p.is_empty())
        .map(String::from);
    objects::prepare_create(kind, &mut obj, namespace);
    objects::apply_defaults(kind, &mut obj, true);
    let (not_ready, unreachable) = state.config.default_toleration_seconds;
    objects::default_tolerations(kind, &mut obj, not_ready, unreachable);
    let (mut obj, warnings) = decode(kind, obj, validation)?;
    let managed_fields = fields.record_encoded(kind, &mut obj);
    // Mutating admission (after the namespace lifecycle check, as upstream orders its plugins), then validation.
    let is_pod = kind.kind == "Pod";
    if let (true, Some(ns)) = (is_pod, namespace) {
        check_namespace(state, kind, ns, name_of(&obj)).await?;
        super::sa_admission::admit_pod(state, ns, &mut obj).await?;
    }
    let name = name_of(&obj).to_string();
    let causes = objects::validate(kind, &obj, state.config.node_ports);
    if !causes.is_empty() {
        return Err(ApiError::invalid(kind, &name, causes));
    }
    // Pods had theirs before admission.
    if let (true, false, Some(ns)) = (kind.namespaced, is_pod, namespace) {
        check_namespace(state, kind, ns, &name).await?;
    }
    let _alloc = if kind.kind == "Service" {
        let guard = state.alloc_lock.lock().await;
        allocate_service(state, kind, &mut obj, None).await?;
        Some(guard)
    } else {
        None
    };
    if dry {
        let (json, _) = super::stored::encode_for_store_with(&obj, managed_fields.as_deref());
        return Ok((json, warnings));
    }
    let json = store_new(
        &*state.store,
        kind,
        namespace,
        NewObject {
            obj,
            managed_fields: managed_fields.as_deref(),
        },
        generate_prefix.as_deref(),
        state.config.event_ttl,
        objects::random_suffix,
    )
    .await?;
    Ok((json, warnings))
}

/// A validated object on its way to the store, with its managedFields encoded apart
/// ([`fieldmanager::update_encoded`]; `None` when they are in the object or there are none).
struct NewObject<'a> {
    obj: Value,
    managed_fields: Option<&'a [u8]>,
}

/// Stores a validated new object and returns its JSON with its resourceVersion (the stored bytes plus the
/// revision: one JSON encoding per create). A name made from `generate_prefix` that is taken is replaced by the
/// prefix and a fresh `suffix()`, 8 attempts in all (upstream's RetryGenerateName).
async fn store_new(
    store: &dyn Store,
    kind: &ResourceKind,
    namespace: Option<&str>,
    new: NewObject<'_>,
    generate_prefix: Option<&str>,
    event_ttl: std::time::Duration,
    mut suffix: impl FnMut() -> String,
) -> Result<Vec<u8>, ApiError> {
    let NewObject {
        obj,
        managed_fields,
    } = new;
    const GENERATE_NAME_ATTEMPTS: usize = 8;
    let mut name = name_of(&obj).to_string();
    let (mut stored, mut metadata_at) = super::stored::encode_for_store_with(&obj, managed_fields);
    // The tree is freed here, before the store's await: after it the task may resume on another worker thread,
    // and freeing ~150 nodes allocated on a different thread cost as much as parsing them (profile of pod
    // creates). A retry under a fresh generated name starts again from the stored bytes instead.
    drop(obj);
    let mut attempt = 1;
    loop {
        let key = kind.key(namespace, &name);
        let retry_from = generate_prefix.map(|_| stored.clone());
        // Events expire (upstream `--event-ttl`, an etcd lease); everything else lives until deleted.
        let created = if kind.kind == "Event" {
            store.create_with_ttl(&key, stored, event_ttl).await
        } else {
            store.create(&key, stored).await
        };
        match (created, generate_prefix.zip(retry_from)) {
            // The store hands the stored bytes back: the answer is them with the revision put in.
            (Ok(kv), _) => {
                return match metadata_at {
                    Some(at) => {
                        let mut out = Vec::new();
                        super::stored::splice_resource_version(
                            &mut out,
                            &kv.value,
                            at,
                            kv.mod_revision,
                        );
                        Ok(out)
                    }
                    None => stored_json(&key, &kv.value, kv.mod_revision),
                }
            }
            (Err(StoreError::AlreadyExists { .. }), Some((prefix, retry_from)))
                if attempt < GENERATE_NAME_ATTEMPTS =>
            {
                attempt += 1;
                name = format!("{prefix}{}", suffix());
                let mut obj: Value = serde_json::from_slice(&retry_from).map_err(|e| {
                    ApiError::internal(format!("cannot re-read a new {}: {e}", kind.kind))
                })?;
                meta_mut(&mut obj).insert("name".into(), json!(name));
                (stored, metadata_at) = super::stored::encode_for_store(&obj);
            }
            (Err(e), _) => return Err(ApiError::from_store(kind, &name, e)),
        }
    }
}

/// NodeRestriction for a kubelet writing its own Node (labels and taints, [`rbac::refuse_node_self_write`]); other
/// users, kinds and subresources pass.
fn admit_node_write(
    ctx: &Ctx,
    t: &Target,
    old: Option<&Value>,
    new: &Value,
) -> Result<(), ApiError> {
    if t.kind.kind != "Node" || t.subresource.is_some() {
        return Ok(());
    }
    match super::rbac::refuse_node_self_write(&ctx.user, old, new) {
        Some(why) => Err(ApiError::forbidden(why)),
        None => Ok(()),
    }
}

async fn create(state: &State, ctx: &Ctx, t: &Target) -> Result<Response<Body>, ApiError> {
    let validation = FieldValidation::parse(ctx.query.get("fieldValidation"))?;
    let obj = body_object(ctx, t.kind)?;
    admit_node_write(ctx, t, None, &obj)?;
    let manager = manager_of(ctx, "CreateOptions")?;
    let fields = Fields::Update {
        manager: &manager,
        subresource: None,
    };
    let (json, warnings) = create_object(
        state,
        t.kind,
        ns_of(t),
        obj,
        validation,
        fields,
        dry_run(ctx),
    )
    .await?;
    Ok(with_warnings(json_bytes_response(201, json), &warnings))
}

/// Who is making an update: a client (system fields are carried over from the stored object) or the server
/// itself (graceful deletion, binding), which may set them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode<'a> {
    Client {
        subresource: Option<&'a str>,
        fields: Fields<'a>,
    },
    System,
}

/// How a client write's field ownership (`metadata.managedFields`) is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fields<'a> {
    /// An update: the changed fields move to `manager` (its entry names `subresource`).
    Update {
        manager: &'a str,
        subresource: Option<&'a str>,
    },
    /// A server-side apply, whose fields the field manager already recorded.
    Applied,
}

impl Fields<'_> {
    fn record(self, kind: &ResourceKind, live: Option<&Value>, new: &mut Value) {
        if let Fields::Update {
            manager,
            subresource,
        } = self
        {
            let api_version = kind.api_version();
            let scope = scope_of(kind, &api_version, subresource);
            fieldmanager::update(live, new, manager, scope);
        }
    }

    /// [`Fields::record`] for a new object on its way to the store: an update's managedFields come back encoded
    /// (and `new` has none) for [`super::stored::encode_for_store_with`]; an apply's stay in the object.
    fn record_encoded(self, kind: &ResourceKind, new: &mut Value) -> Option<Vec<u8>> {
        let Fields::Update {
            manager,
            subresource,
        } = self
        else {
            return None;
        };
        let api_version = kind.api_version();
        let scope = scope_of(kind, &api_version, subresource);
        fieldmanager::update_encoded(None, new, manager, scope)
    }
}

fn scope_of<'a>(
    kind: &ResourceKind,
    api_version: &'a str,
    subresource: Option<&'a str>,
) -> Scope<'a> {
    Scope {
        api_version,
        has_status: kind.has_status(),
        subresource,
    }
}

/// The manager of a client write: `fieldManager`, else the User-Agent's product; `options` names the request's
/// options kind for errors (`CreateOptions`, `UpdateOptions`, `PatchOptions`).
fn manager_of(ctx: &Ctx, options: &str) -> Result<String, ApiError> {
    let given = ctx.query.get("fieldManager").unwrap_or_default();
    // Ref: apimachinery `ValidateFieldManager`: at most 128 bytes, printable characters only.
    if given.len() > 128 {
        return Err(options_invalid(
            options,
            Cause {
                reason: "FieldValueTooLong",
                field: "fieldManager".into(),
                message: "Too long: may not be more than 128 bytes".into(),
            },
        ));
    }
    if let Some((i, c)) = given.char_indices().find(|(_, c)| c.is_control()) {
        return Err(options_invalid(
            options,
            Cause::invalid(
                "fieldManager",
                &json!(given),
                format!("invalid character {c:?} (at position {i})"),
            ),
        ));
    }
    Ok(fieldmanager::manager_name(Some(given), &ctx.user_agent))
}

/// Read-modify-write with optimistic concurrency: `f` builds the new object from the current one. Retries on a
/// lost race unless the client gave a resourceVersion precondition (then 409).
#[allow(clippy::too_many_arguments)] // Each is a distinct request property; a struct would only rename them.
pub(crate) async fn update_object(
    state: &State,
    kind: &'static ResourceKind,
    namespace: Option<&str>,
    name: &str,
    mode: Mode<'_>,
    validation: FieldValidation,
    dry: bool,
    mut f: impl FnMut(&Value) -> Result<Value, ApiError>,
) -> Result<(Value, Vec<String>), ApiError> {
    let key = kind.key(namespace, name);
    for _ in 0..RETRIES {
        let (kv, _) = state.store.get(&key).await?;
        let kv = kv.ok_or_else(|| ApiError::not_found(kind, name))?;
        let current = object_of(&kv)?;
        let mut new = f(&current)?;
        let precondition = meta(&new)
            .get("resourceVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(String::from);
        if let Some(rv) = &precondition {
            if mode != Mode::System && *rv != kv.mod_revision.to_string() {
                return Err(ApiError::modified(kind, name));
            }
        }
        check_type(kind, &new)?;
        if name_of(&new) != name && !name_of(&new).is_empty() {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                name_of(&new)
            )));
        }
        if let Mode::Client { subresource, .. } = mode {
            objects::prepare_update(kind, &mut new, &current, subresource);
        } else {
            meta_mut(&mut new).remove("resourceVersion");
        }
        objects::apply_defaults(kind, &mut new, false);
        let (mut new, warnings) = decode(kind, new, validation)?;
        let mut causes = objects::validate(kind, &new, state.config.node_ports);
        if let Mode::Client {
            subresource: None, ..
        } = mode
        {
            causes.extend(objects::validate_update(kind, &new, &current));
        }
        if let Mode::Client { fields, .. } = mode {
            fields.record(kind, Some(&current), &mut new);
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(kind, name, causes));
        }
        let _alloc = if kind.kind == "Service" {
            let guard = state.alloc_lock.lock().await;
            allocate_service(state, kind, &mut new, Some(&current)).await?;
            Some(guard)
        } else {
            None
        };
        // A client update that changes nothing is not written: no new resourceVersion and no watch event, so
        // re-applying a configuration is a no-op (Ref: storage `GuaranteedUpdate` returns the existing object
        // when the new data equals the old).
        if mode != Mode::System && same_object(&current, &new) {
            return Ok((current, warnings));
        }
        if dry {
            return Ok((new, warnings));
        }
        match state
            .store
            .update(&key, kv.mod_revision, to_stored(&new))
            .await
        {
            Ok(kv) => {
                let obj = object_of(&kv)?;
                finish_deletion_if_done(state, kind, &obj, &kv).await?;
                return Ok((obj, warnings));
            }
            Err(StoreError::Conflict { .. }) if precondition.is_none() || mode == Mode::System => {
                continue
            }
            Err(e) => return Err(ApiError::from_store(kind, name, e)),
        }
    }
    Err(ApiError::modified(kind, name))
}

/// Whether two versions of an object are the same, resourceVersion aside.
fn same_object(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        meta_mut(&mut v).remove("resourceVersion");
        v
    };
    strip(a) == strip(b)
}

/// An object being deleted whose finalizers are all gone and whose grace period is zero is removed.
async fn finish_deletion_if_done(
    state: &State,
    kind: &ResourceKind,
    obj: &Value,
    kv: &KeyValue,
) -> Result<(), ApiError> {
    let m = meta(obj);
    let deleting = m.get("deletionTimestamp").is_some_and(|v| !v.is_null());
    let no_finalizers = m
        .get("finalizers")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
        // A namespace also waits for its spec finalizers (`kubernetes`: the namespace controller).
        && (kind.kind != "Namespace"
            || obj
                .pointer("/spec/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty));
    let grace = m
        .get("deletionGracePeriodSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if deleting && no_finalizers && grace == 0 {
        match state.store.delete(&kv.key, Some(kv.mod_revision)).await {
            Ok(_) | Err(StoreError::NotFound { .. }) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(ApiError::from_store(kind, name_of(obj), e)),
        }
    }
    Ok(())
}

async fn update(
    state: &State,
    ctx: &Ctx,
    t: &Target,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let validation = FieldValidation::parse(ctx.query.get("fieldValidation"))?;
    let body = body_object(ctx, t.kind)?;
    let sub = t.subresource.as_deref();
    let manager = manager_of(ctx, "UpdateOptions")?;
    if sub == Some("scale") {
        let replicas = body
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let rv = meta(&body).get("resourceVersion").cloned();
        let (obj, _) = update_object(
            state,
            t.kind,
            ns_of(t),
            name,
            Mode::Client {
                subresource: None,
                fields: Fields::Update {
                    manager: &manager,
                    subresource: Some("scale"),
                },
            },
            FieldValidation::Ignore,
            dry_run(ctx),
            |cur| {
                let mut new = cur.clone();
                new["spec"]["replicas"] = json!(replicas);
                match &rv {
                    Some(rv) => meta_mut(&mut new).insert("resourceVersion".into(), rv.clone()),
                    None => meta_mut(&mut new).remove("resourceVersion"),
                };
                Ok(new)
            },
        )
        .await?;
        return Ok(json_response(200, &scale_of(t.kind, &obj)?));
    }
    let fields = Fields::Update {
        manager: &manager,
        subresource: sub,
    };
    let exists = state
        .store
        .get(&t.kind.key(ns_of(t), name))
        .await?
        .0
        .is_some();
    if !exists {
        if t.kind.create_on_update && sub.is_none() {
            return create_at_url(state, ctx, t, name, body, validation, fields).await;
        }
        return Err(ApiError::not_found(t.kind, name));
    }
    let (obj, warnings) = update_object(
        state,
        t.kind,
        ns_of(t),
        name,
        Mode::Client {
            subresource: sub,
            fields,
        },
        validation,
        dry_run(ctx),
        |cur| {
            admit_node_write(ctx, t, Some(cur), &body)?;
            Ok(body.clone())
        },
    )
    .await?;
    Ok(with_warnings(json_response(200, &obj), &warnings))
}

/// A PUT (create-on-update kinds) or server-side apply of a missing object: creates it, if its name is the URL's.
async fn create_at_url(
    state: &State,
    ctx: &Ctx,
    t: &Target,
    name: &str,
    obj: Value,
    validation: FieldValidation,
    fields: Fields<'_>,
) -> Result<Response<Body>, ApiError> {
    if name_of(&obj) != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            name_of(&obj)
        )));
    }
    admit_node_write(ctx, t, None, &obj)?;
    let (json, warnings) = create_object(
        state,
        t.kind,
        ns_of(t),
        obj,
        validation,
        fields,
        dry_run(ctx),
    )
    .await?;
    Ok(with_warnings(json_bytes_response(201, json), &warnings))
}

/// Request options validation errors (Ref: apiserver `ValidatePatchOptions` and friends): 422 on
/// `<options>.meta.k8s.io`.
fn options_invalid(options: &str, cause: Cause) -> ApiError {
    let message = format!(
        "{options}.meta.k8s.io \"\" is invalid: {}: {}",
        cause.field, cause.message
    );
    ApiError {
        code: 422,
        reason: "Invalid",
        message,
        details: Some(json!({
            "group": "meta.k8s.io",
            "kind": options,
            "causes": [{"reason": cause.reason, "message": cause.message, "field": cause.field}],
        })),
    }
}

/// The body of a PATCH: JSON, or YAML for server-side apply (`application/apply-patch+yaml`).
fn patch_body(ctx: &Ctx, ptype: patch::PatchType) -> Result<Value, ApiError> {
    match serde_json::from_slice(&ctx.body) {
        Ok(v) => Ok(v),
        Err(_) if ptype == patch::PatchType::Apply => serde_yaml_ng::from_slice(&ctx.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}"))),
        Err(e) => Err(ApiError::bad_request(format!(
            "the patch is not valid JSON: {e}"
        ))),
    }
}

async fn patch(
    state: &State,
    ctx: &Ctx,
    t: &Target,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let validation = FieldValidation::parse(ctx.query.get("fieldValidation"))?;
    let ptype = patch::PatchType::from_content_type(&ctx.content_type)
        .ok_or_else(|| ApiError::unsupported_media_type(&ctx.content_type))?;
    let body = patch_body(ctx, ptype)?;
    let sub = t.subresource.as_deref();
    let applying = ptype == patch::PatchType::Apply;
    let force = match ctx.query.get("force") {
        None => None,
        Some(f) => Some(
            f.parse::<bool>()
                .map_err(|_| ApiError::bad_request(format!("invalid force parameter {f:?}")))?,
        ),
    };
    if applying {
        if ctx.query.get("fieldManager").unwrap_or_default().is_empty() {
            return Err(options_invalid(
                "PatchOptions",
                Cause {
                    message: "Required value: is required for apply patch".into(),
                    ..Cause::required("fieldManager")
                },
            ));
        }
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "an apply configuration must be an object",
            ));
        }
    } else if force.is_some() {
        return Err(options_invalid(
            "PatchOptions",
            Cause::forbidden("force", "may not be specified for non-apply patch"),
        ));
    }
    let force = force.unwrap_or(false);
    let manager = manager_of(ctx, "PatchOptions")?;
    let api_version = t.kind.api_version();
    if sub == Some("scale") {
        let (obj, _) = update_object(
            state,
            t.kind,
            ns_of(t),
            name,
            Mode::Client {
                subresource: None,
                fields: if applying {
                    Fields::Applied
                } else {
                    Fields::Update {
                        manager: &manager,
                        subresource: Some("scale"),
                    }
                },
            },
            FieldValidation::Ignore,
            dry_run(ctx),
            |cur| {
                let mut new = if applying {
                    // An applied Scale owns the parent's `spec.replicas` (Ref: the scale subresource's
                    // managed-fields conversion to the parent's field paths).
                    let mut parent = json!({
                        "apiVersion": api_version,
                        "kind": t.kind.kind,
                        "metadata": {"name": name},
                    });
                    if let Some(r) = body.pointer("/spec/replicas") {
                        parent["spec"] = json!({"replicas": r});
                    }
                    let scope = scope_of(t.kind, &api_version, Some("scale"));
                    fieldmanager::apply(cur, &parent, &manager, force, scope)?
                } else {
                    let scale = scale_of(t.kind, cur)?;
                    let patched = patch::apply(ptype, &scale, &body)?;
                    let mut new = cur.clone();
                    new["spec"]["replicas"] = patched
                        .pointer("/spec/replicas")
                        .cloned()
                        .unwrap_or(json!(0));
                    new
                };
                meta_mut(&mut new).remove("resourceVersion");
                Ok(new)
            },
        )
        .await?;
        return Ok(json_response(200, &scale_of(t.kind, &obj)?));
    }
    let exists = state
        .store
        .get(&t.kind.key(ns_of(t), name))
        .await?
        .0
        .is_some();
    if !exists {
        if applying && sub.is_none() {
            // Server-side apply creates a missing object from the applied configuration.
            let scope = scope_of(t.kind, &api_version, None);
            let obj = fieldmanager::apply(&json!({}), &body, &manager, force, scope)?;
            return create_at_url(state, ctx, t, name, obj, validation, Fields::Applied).await;
        }
        return Err(ApiError::not_found(t.kind, name));
    }
    let fields = if applying {
        Fields::Applied
    } else {
        Fields::Update {
            manager: &manager,
            subresource: sub,
        }
    };
    let (obj, warnings) = update_object(
        state,
        t.kind,
        ns_of(t),
        name,
        Mode::Client {
            subresource: sub,
            fields,
        },
        validation,
        dry_run(ctx),
        |cur| {
            let mut new = if applying {
                let scope = scope_of(t.kind, &api_version, sub);
                fieldmanager::apply(cur, &body, &manager, force, scope)?
            } else {
                patch::apply(ptype, cur, &body)?
            };
            // A patch is checked against the version it carries, if any; otherwise applied to the latest.
            let patch_rv = body
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str);
            match patch_rv {
                Some(rv) => meta_mut(&mut new).insert("resourceVersion".into(), json!(rv)),
                None => meta_mut(&mut new).remove("resourceVersion"),
            };
            admit_node_write(ctx, t, Some(cur), &new)?;
            Ok(new)
        },
    )
    .await?;
    Ok(with_warnings(json_response(200, &obj), &warnings))
}

/// The autoscaling/v1 Scale view of a Deployment or ReplicaSet.
fn scale_of(kind: &ResourceKind, obj: &Value) -> Result<Value, ApiError> {
    let m = meta(obj);
    let selector = obj
        .pointer("/spec/selector")
        .map(LabelSelector::from_object)
        .transpose()
        .map_err(ApiError::internal)?
        .map(|s| s.to_string_form())
        .unwrap_or_default();
    let _ = kind;
    Ok(json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m.get("name"),
            "namespace": m.get("namespace"),
            "uid": m.get("uid"),
            "resourceVersion": m.get("resourceVersion"),
            "creationTimestamp": m.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector,
        },
    }))
}

/// `POST pods/<name>/binding`: assigns the pod to a node (what the scheduler does).
async fn bind(
    state: &State,
    ctx: &Ctx,
    t: &Target,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let body = body_object(ctx, t.kind)?;
    let node = body
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(
                resources::find("", "v1", "pods").unwrap_or(t.kind),
                name,
                vec![Cause::required("target.name")],
            )
        })?
        .to_string();
    update_object(state, t.kind, ns_of(t), name, Mode::System, FieldValidation::Ignore, false, |cur| {
        if meta(cur).get("deletionTimestamp").is_some_and(|v| !v.is_null()) {
            return Err(ApiError::conflict(t.kind, name, "pod is being deleted, cannot be assigned to a host"));
        }
        if let Some(existing) = cur.pointer("/spec/nodeName").and_then(Value::as_str).filter(|n| !n.is_empty()) {
            return Err(ApiError::conflict(
                t.kind,
                name,
                &format!("pod {name} is already assigned to node \"{existing}\""),
            ));
        }
        let mut new = cur.clone();
        new["spec"]["nodeName"] = json!(node);
        let conds = new["status"]
            .as_object_mut()
            .map(|s| s.entry("conditions").or_insert_with(|| json!([])));
        if let Some(Value::Array(c)) = conds {
            c.retain(|x| x.get("type").and_then(Value::as_str) != Some("PodScheduled"));
            c.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": objects::now()}));
        }
        Ok(new)
    })
    .await?;
    Ok(json_response(
        201,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

/// DeleteOptions from the body and query.
pub(crate) struct DeleteOptions {
    grace: Option<i64>,
    /// `Orphan` or `Foreground` add the garbage collector's finalizer; `Background` (the default for every kind
    /// served here) deletes at once and leaves the dependents to the garbage collector.
    propagation: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    dry: bool,
}

fn delete_options(ctx: &Ctx) -> Result<DeleteOptions, ApiError> {
    let body: Value = if ctx.body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&ctx.body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    let grace = body
        .get("gracePeriodSeconds")
        .and_then(Value::as_i64)
        .or_else(|| {
            ctx.query
                .get("gracePeriodSeconds")
                .and_then(|g| g.parse().ok())
        });
    let policy = body
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .or(ctx.query.get("propagationPolicy"));
    if let Some(p) = policy {
        if !matches!(p, "Orphan" | "Background" | "Foreground") {
            return Err(ApiError::bad_request(format!(
                "propagationPolicy {p:?} is invalid: supported values are Orphan, Background, Foreground"
            )));
        }
    }
    // The deprecated `orphanDependents` (Ref: DeleteOptions): true means Orphan, and it may not contradict the
    // policy.
    let orphan_dependents = body
        .get("orphanDependents")
        .and_then(Value::as_bool)
        .or_else(|| {
            ctx.query
                .get("orphanDependents")
                .and_then(|v| v.parse().ok())
        });
    let propagation = match (policy, orphan_dependents) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "orphanDependents and propagationPolicy may not both be set".to_string(),
            ))
        }
        (Some(p), None) => Some(p.to_string()),
        (None, Some(true)) => Some("Orphan".to_string()),
        (None, Some(false)) => Some("Background".to_string()),
        (None, None) => None,
    };
    Ok(DeleteOptions {
        grace,
        propagation,
        uid: body
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(String::from),
        resource_version: body
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from),
        dry: body
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
            || dry_run(ctx),
    })
}

/// Deletes one object with upstream semantics; returns what the client sees (the object).
pub(crate) async fn delete_object(
    state: &Arc<State>,
    kind: &'static ResourceKind,
    namespace: Option<&str>,
    name: &str,
    opts: &DeleteOptions,
) -> Result<Value, ApiError> {
    let key = kind.key(namespace, name);
    for _ in 0..RETRIES {
        let (kv, _) = state.store.get(&key).await?;
        let kv = kv.ok_or_else(|| ApiError::not_found(kind, name))?;
        let obj = object_of(&kv)?;
        let m = meta(&obj);
        if let Some(uid) = &opts.uid {
            let have = m.get("uid").and_then(Value::as_str).unwrap_or_default();
            if have != uid {
                return Err(ApiError::conflict(
                    kind,
                    name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"),
                ));
            }
        }
        if let Some(rv) = &opts.resource_version {
            if *rv != kv.mod_revision.to_string() {
                return Err(ApiError::conflict(
                    kind,
                    name,
                    &format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        kv.mod_revision
                    ),
                ));
            }
        }
        if opts.dry {
            return Ok(obj);
        }
        if kind.kind == "Namespace" {
            return delete_namespace(state, kind, name, obj, &kv).await;
        }
        let grace = if kind.kind == "Pod" {
            let scheduled = obj
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty());
            let finished = matches!(
                obj.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            );
            if !scheduled || finished {
                // No kubelet has to stop anything: upstream deletes unscheduled or finished pods at once.
                0
            } else {
                opts.grace
                    .or_else(|| {
                        obj.pointer("/spec/terminationGracePeriodSeconds")
                            .and_then(Value::as_i64)
                    })
                    .unwrap_or(30)
                    .max(0)
            }
        } else {
            0
        };
        let mut finalizers: Vec<Value> = m
            .get("finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let already = m.get("deletionTimestamp").is_some_and(|v| !v.is_null());
        // Orphan and Foreground propagation are carried out by the garbage collector, which removes its
        // finalizer when done (Ref: apiserver `deletionFinalizersForGarbageCollection`). The two exclude each
        // other; a later request may switch between them.
        let gc_finalizer = match opts.propagation.as_deref() {
            Some("Orphan") => Some(FINALIZER_ORPHAN),
            Some("Foreground") => Some(FINALIZER_FOREGROUND),
            _ => None,
        };
        let mut finalizers_changed = false;
        if let Some(f) = gc_finalizer {
            let before = finalizers.len();
            finalizers.retain(|x| {
                !matches!(x.as_str(), Some(FINALIZER_ORPHAN | FINALIZER_FOREGROUND))
                    || x.as_str() == Some(f)
            });
            if !finalizers.iter().any(|x| x.as_str() == Some(f)) {
                finalizers.push(json!(f));
            }
            finalizers_changed = finalizers.len() != before
                || m.get("finalizers").and_then(Value::as_array) != Some(&finalizers);
        } else if opts.propagation.as_deref() == Some("Background") && already {
            // Background on an object already waiting for the collector: drop the collector's finalizers.
            let before = finalizers.len();
            finalizers
                .retain(|x| !matches!(x.as_str(), Some(FINALIZER_ORPHAN | FINALIZER_FOREGROUND)));
            finalizers_changed = finalizers.len() != before;
        }
        let has_finalizers = !finalizers.is_empty();
        let current_grace = m.get("deletionGracePeriodSeconds").and_then(Value::as_i64);
        if grace > 0 || has_finalizers || finalizers_changed {
            if already && current_grace.is_some_and(|g| g <= grace) && !finalizers_changed {
                // Already being deleted with a shorter or equal grace period: nothing changes.
                return Ok(obj);
            }
            let mut new = obj.clone();
            let mm = meta_mut(&mut new);
            if finalizers_changed {
                mm.insert("finalizers".into(), json!(finalizers));
            }
            // A second request only shortens the grace period; it never moves the deletion later.
            if !already || current_grace.is_none_or(|g| grace < g) {
                mm.insert("deletionTimestamp".into(), json!(objects::now_plus(grace)));
                mm.insert("deletionGracePeriodSeconds".into(), json!(grace));
            }
            mm.remove("resourceVersion");
            match state
                .store
                .update(&key, kv.mod_revision, to_stored(&new))
                .await
            {
                Ok(kv) => {
                    let updated = object_of(&kv)?;
                    if !has_finalizers && grace == 0 {
                        finish_deletion_if_done(state, kind, &updated, &kv).await?;
                    }
                    if grace > 0 && !has_finalizers {
                        schedule_grace_expiry(
                            state.clone(),
                            key.clone(),
                            kv.mod_revision,
                            std::time::Duration::from_secs(grace as u64),
                        );
                    }
                    return Ok(updated);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ApiError::from_store(kind, name, e)),
            }
        }
        match state.store.delete(&key, Some(kv.mod_revision)).await {
            Ok(_) => return Ok(obj),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(ApiError::from_store(kind, name, e)),
        }
    }
    Err(ApiError::modified(kind, name))
}

/// Removes a gracefully deleted object when its grace period has passed and nothing else changed it (the kubelet
/// confirms earlier with a zero-grace delete once it has stopped the pod).
fn schedule_grace_expiry(
    state: Arc<State>,
    key: String,
    revision: i64,
    after: std::time::Duration,
) {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        match state.store.delete(&key, Some(revision)).await {
            Ok(_) => tracing::debug!(%key, "grace period over; removed"),
            Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot remove object after its grace period")
            }
        }
    });
}

/// After a restart: re-arms the grace-period expiry of pods that were being deleted (their deletionTimestamp is
/// the end of the grace period). Terminating namespaces are the namespace controller's to finish.
pub(crate) async fn resume_deletions(state: &Arc<State>) -> Result<(), StoreError> {
    if let Some(pods) = resources::find("", "v1", "pods") {
        for kv in state
            .store
            .list(&pods.prefix(None), &ListOptions::default())
            .await?
            .items
        {
            let Ok(obj) = object_of(&kv) else { continue };
            let m = meta(&obj);
            let Some(ts) = m.get("deletionTimestamp").and_then(Value::as_str) else {
                continue;
            };
            let grace = m
                .get("deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let finalizers = m
                .get("finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
            if grace <= 0 || finalizers {
                continue;
            }
            let left = ts
                .parse::<jiff::Timestamp>()
                .ok()
                .map(|t| t.duration_since(jiff::Timestamp::now()).as_secs().max(0) as u64)
                .unwrap_or(0);
            schedule_grace_expiry(
                state.clone(),
                kv.key.clone(),
                kv.mod_revision,
                std::time::Duration::from_secs(left),
            );
        }
    }
    Ok(())
}

/// Namespace deletion: mark it Terminating; the namespace controller deletes everything in it and then removes
/// its `kubernetes` spec finalizer (`namespaces/<name>/finalize`), after which the namespace goes away (Ref:
/// namespace registry `Delete`). A namespace without spec finalizers goes at once.
async fn delete_namespace(
    state: &Arc<State>,
    kind: &ResourceKind,
    name: &str,
    obj: Value,
    kv: &KeyValue,
) -> Result<Value, ApiError> {
    if matches!(name, "default" | "kube-system" | "kube-public") {
        return Err(ApiError::forbidden(format!(
            "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
        )));
    }
    let mut new = obj.clone();
    if meta(&obj)
        .get("deletionTimestamp")
        .is_none_or(Value::is_null)
    {
        meta_mut(&mut new).insert("deletionTimestamp".into(), json!(objects::now()));
        meta_mut(&mut new).insert("deletionGracePeriodSeconds".into(), json!(0));
    }
    if new.pointer("/status/phase").and_then(Value::as_str) != Some("Terminating") {
        new["status"]["phase"] = json!("Terminating");
    }
    meta_mut(&mut new).remove("resourceVersion");
    let kv = state
        .store
        .update(&kv.key, kv.mod_revision, to_stored(&new))
        .await
        .map_err(|e| ApiError::from_store(kind, name, e))?;
    let updated = object_of(&kv)?;
    finish_deletion_if_done(state, kind, &updated, &kv).await?;
    Ok(updated)
}

async fn delete(
    state: &Arc<State>,
    ctx: &Ctx,
    t: &Target,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let opts = delete_options(ctx)?;
    let obj = delete_object(state, t.kind, ns_of(t), name, &opts).await?;
    Ok(json_response(200, &obj))
}

async fn delete_collection(
    state: &Arc<State>,
    ctx: &Ctx,
    t: &Target,
) -> Result<Response<Body>, ApiError> {
    let opts = delete_options(ctx)?;
    let sel = Selection::from_query(ctx, t.kind)?;
    let (items, rev, _, _) = list_objects(state, t.kind, ns_of(t), &sel, None, None).await?;
    let mut deleted = Vec::new();
    for item in items {
        let ns = meta(&item)
            .get("namespace")
            .and_then(Value::as_str)
            .map(String::from);
        match delete_object(state, t.kind, ns.as_deref(), name_of(&item), &opts).await {
            Ok(o) => deleted.push(o),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(json_response(
        200,
        &json!({"kind": format!("{}List", t.kind.kind), "apiVersion": t.kind.api_version(),
            "metadata": {"resourceVersion": rev.to_string()}, "items": deleted}),
    ))
}

fn cidr_bounds(net: Ipv4Addr, prefix: u8) -> (u32, u32) {
    let base = u32::from(net) & (u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
    let size = 1u64 << (32 - u32::from(prefix.min(32)));
    (base, (u64::from(base) + size - 1) as u32)
}

/// Assigns a ClusterIP and NodePorts (upstream's service REST `Create`/`Update` allocators). Called with the
/// allocation lock held; in-use values are read from the stored services.
async fn allocate_service(
    state: &State,
    kind: &ResourceKind,
    obj: &mut Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let name = name_of(obj).to_string();
    let spec_type = obj
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    let all = state
        .store
        .list(&kind.prefix(None), &ListOptions::default())
        .await?;
    let own_key = kind.key(meta(obj).get("namespace").and_then(Value::as_str), &name);
    let mut used_ips = std::collections::HashSet::new();
    let mut used_ports = std::collections::HashSet::new();
    for kv in all.items.iter().filter(|kv| kv.key != own_key) {
        let Ok(o) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        if let Some(ip) = o.pointer("/spec/clusterIP").and_then(Value::as_str) {
            used_ips.insert(ip.to_string());
        }
        for p in o
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
                used_ports.insert(np);
            }
        }
    }
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    // ClusterIP: immutable once set; ExternalName services get none.
    let old_ip = old
        .and_then(|o| o.pointer("/spec/clusterIP"))
        .and_then(Value::as_str)
        .map(String::from);
    let mut ip = spec
        .get("clusterIP")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if let Some(old_ip) = &old_ip {
        if ip.is_empty() {
            ip = old_ip.clone();
        } else if ip != *old_ip {
            return Err(ApiError::invalid(
                kind,
                &name,
                vec![Cause::invalid(
                    "spec.clusterIPs[0]",
                    &json!(ip),
                    "may not change once set",
                )],
            ));
        }
    } else if spec_type == "ExternalName" {
        ip.clear();
    } else if ip.is_empty() {
        let (lo, hi) = cidr_bounds(state.config.service_cidr.0, state.config.service_cidr.1);
        let (first, last) = (lo + 1, hi.saturating_sub(1));
        let span = last.saturating_sub(first) + 1;
        // Random start, then the first free address (upstream picks at random from a bitmap).
        let r = u32::from_le_bytes(
            uuid::Uuid::new_v4().as_bytes()[..4]
                .try_into()
                .unwrap_or([0; 4]),
        );
        let found = (0..span.min(1 << 20))
            .map(|i| first + (r.wrapping_add(i) % span))
            // .1 is reserved for the `kubernetes` service.
            .filter(|a| *a != first || name == "kubernetes")
            .map(Ipv4Addr::from)
            .find(|a| !used_ips.contains(&a.to_string()));
        match found {
            Some(a) => ip = a.to_string(),
            None => {
                return Err(ApiError::internal(
                    "failed to allocate a serviceIP: range is full",
                ))
            }
        }
    } else if ip != "None" {
        let (lo, hi) = cidr_bounds(state.config.service_cidr.0, state.config.service_cidr.1);
        let parsed: Option<Ipv4Addr> = ip.parse().ok();
        let in_range = parsed.is_some_and(|a| u32::from(a) > lo && u32::from(a) < hi);
        if !in_range {
            return Err(ApiError::invalid(kind, &name, vec![Cause::invalid(
                "spec.clusterIPs",
                &json!([ip]),
                format!("failed to allocate IP {ip}: provided IP is not in the valid range. The range of valid IPs is {}/{}", state.config.service_cidr.0, state.config.service_cidr.1),
            )]));
        }
        if used_ips.contains(&ip) {
            return Err(ApiError::invalid(
                kind,
                &name,
                vec![Cause::invalid(
                    "spec.clusterIPs",
                    &json!([ip]),
                    format!("failed to allocate IP {ip}: provided IP is already allocated"),
                )],
            ));
        }
    }
    if !ip.is_empty() {
        spec.insert("clusterIP".into(), json!(ip));
        spec.insert("clusterIPs".into(), json!([ip]));
    }
    let needs_node_ports = matches!(spec_type.as_str(), "NodePort" | "LoadBalancer");
    let old_ports: Vec<Value> = old
        .and_then(|o| o.pointer("/spec/ports"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (np_lo, np_hi) = state.config.node_ports;
    let mut taken: std::collections::HashSet<i64> = used_ports;
    for (i, p) in spec
        .get_mut("ports")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let Some(p) = p.as_object_mut() else { continue };
        if !needs_node_ports {
            p.remove("nodePort");
            continue;
        }
        let given = p
            .get("nodePort")
            .and_then(Value::as_i64)
            .filter(|n| *n != 0);
        let keep = old_ports
            .iter()
            .find(|o| o.get("port") == p.get("port") && o.get("protocol") == p.get("protocol"))
            .and_then(|o| o.get("nodePort").and_then(Value::as_i64));
        let port = match given.or(keep) {
            Some(n) => {
                if taken.contains(&n) && Some(n) != keep {
                    return Err(ApiError::invalid(
                        kind,
                        &name,
                        vec![Cause::invalid(
                            format!("spec.ports[{i}].nodePort"),
                            &json!(n),
                            "provided port is already allocated",
                        )],
                    ));
                }
                n
            }
            None => {
                let span = i64::from(np_hi) - i64::from(np_lo) + 1;
                let r = i64::from(u16::from_le_bytes(
                    uuid::Uuid::new_v4().as_bytes()[..2]
                        .try_into()
                        .unwrap_or([0; 2]),
                ));
                (0..span)
                    .map(|k| i64::from(np_lo) + (r + k) % span)
                    .find(|n| !taken.contains(n))
                    .ok_or_else(|| {
                        ApiError::internal("failed to allocate a nodePort: range is full")
                    })?
            }
        };
        taken.insert(port);
        p.insert("nodePort".into(), json!(port));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::{EmbeddedOptions, EmbeddedStore};

    fn config_map(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": name, "namespace": "default", "generateName": "cfg-"}})
    }

    #[tokio::test]
    async fn a_taken_generated_name_is_replaced_until_a_free_one_is_found() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("store");
        let kind = resources::find("", "v1", "configmaps").expect("configmaps");
        let ttl = std::time::Duration::from_secs(3600);
        for taken in ["cfg-aaaaa", "cfg-bbbbb"] {
            store
                .create(&kind.key(Some("default"), taken), b"{}".to_vec())
                .await
                .expect("occupy a name");
        }
        // The first name and the first retry are taken; the second retry is free.
        let mut suffixes = ["bbbbb", "ccccc"].into_iter().map(String::from);
        let json = store_new(
            &store,
            kind,
            Some("default"),
            NewObject {
                obj: config_map("cfg-aaaaa"),
                managed_fields: Some(br#"[{"manager":"m"}]"#.as_slice()),
            },
            Some("cfg-"),
            ttl,
            || suffixes.next().unwrap_or_default(),
        )
        .await
        .expect("created under a free name");
        let created: Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(created["metadata"]["name"], "cfg-ccccc");
        assert!(created["metadata"]["resourceVersion"].is_string());
        // Managed fields encoded apart are written into the object.
        assert_eq!(created["metadata"]["managedFields"][0]["manager"], "m");
        let (kv, _) = store
            .get(&kind.key(Some("default"), "cfg-ccccc"))
            .await
            .expect("get");
        assert!(kv.is_some(), "stored under the name it answered with");

        // A name the client chose is never replaced, and generated names give up after 8 attempts.
        let err = store_new(
            &store,
            kind,
            Some("default"),
            NewObject {
                obj: config_map("cfg-aaaaa"),
                managed_fields: None,
            },
            None,
            ttl,
            || "zzzzz".into(),
        )
        .await
        .expect_err("a chosen name that is taken");
        assert_eq!(err.code, 409);
        let mut calls = 0;
        let err = store_new(
            &store,
            kind,
            Some("default"),
            NewObject {
                obj: config_map("cfg-aaaaa"),
                managed_fields: None,
            },
            Some("cfg-"),
            ttl,
            || {
                calls += 1;
                "aaaaa".into()
            },
        )
        .await
        .expect_err("every generated name taken");
        assert_eq!(err.code, 409);
        assert_eq!(calls, 7, "one name plus seven retries");
    }
}
