//! The Kubernetes-compatible HTTPS API server.
//!
//! `server` accepts TLS connections (HTTP/1.1 and HTTP/2), authenticates the client certificate, and hands each
//! request to `route`, which splits the path the way upstream's `RequestInfoFactory` does and dispatches to
//! discovery, OpenAPI, or the generic resource handlers driven by [`resources::KINDS`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::store::Store;

mod auth;
mod bootstrap;
mod cache;
mod coalesce;
mod discovery;
mod fieldmanager;
mod handlers;
mod kubelet_proxy;
mod mirror_pods;
mod node_graph;
mod node_tokens;
mod objects;
mod openapi;
mod patch;
mod protobuf;
mod rbac;
pub(crate) mod resources;
mod sa_admission;
mod sa_token;
mod schema;
mod selectors;
mod server;
mod status;
mod stored;
mod table;
mod typed_eq;
mod watch;

pub use auth::User;
pub use server::{serve, ServeError};

use status::ApiError;

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// Largest request body accepted (upstream's limit is 3 MiB for most writes).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Settings of the API server.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Data directory (PKI and the embedded store live here).
    pub data_dir: PathBuf,
    /// Extra subject alternative names for the serving certificate.
    pub tls_sans: Vec<String>,
    /// Service ClusterIP range (IPv4 network and prefix length).
    pub service_cidr: (Ipv4Addr, u8),
    /// NodePort range, inclusive.
    pub node_ports: (u16, u16),
    /// Static bearer tokens (upstream `--token-auth-file` CSV: `token,user,uid,"group1,group2"`).
    pub token_auth_file: Option<PathBuf>,
    /// Where to append one JSON line per request (user, verb, resource, code).
    pub audit_log: Option<PathBuf>,
    /// How long Events are kept (upstream `--event-ttl`, 1 h).
    pub event_ttl: std::time::Duration,
    /// Tolerations for the not-ready and unreachable NoExecute taints given to new pods that have none
    /// (seconds; upstream's DefaultTolerationSeconds admission, 300 each).
    pub default_toleration_seconds: (i64, i64),
}

/// Shared server state.
pub(crate) struct State {
    /// The store, wrapped so that writes to cached objects are acknowledged once the caches have them.
    pub store: Arc<dyn Store>,
    /// RBAC roles and bindings and namespaces, kept current from the store's watch.
    pub caches: Arc<cache::Caches>,
    pub config: ApiConfig,
    /// Serialises ClusterIP/NodePort allocation with the create that records it.
    pub alloc_lock: tokio::sync::Mutex<()>,
    /// OpenAPI v3 documents by path (`api/v1`, `apis/apps/v1`), rendered once at start.
    pub openapi: HashMap<String, Bytes>,
    /// Static bearer tokens.
    pub tokens: HashMap<String, User>,
    /// The audit log, if enabled.
    pub audit: Option<std::sync::Mutex<std::fs::File>>,
    /// Signs and verifies service-account tokens.
    pub sa_tokens: sa_token::TokenSigner,
    /// TLS towards kubelets (the API server's kubelet client certificate), for the proxied pod subresources.
    pub kubelet_tls: Arc<rustls::ClientConfig>,
    /// Recent watch event lines, encoded once for all watchers.
    pub watch_lines: watch::SharedLines,
}

/// Query parameters of a request (last value wins).
#[derive(Debug, Default)]
pub(crate) struct Query(HashMap<String, String>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        let mut m = HashMap::new();
        for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            m.insert(percent_decode(k), percent_decode(v));
        }
        Self(m)
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    pub fn flag(&self, k: &str) -> bool {
        matches!(self.0.get(k).map(String::as_str), Some("true" | "1" | ""))
            && self.0.contains_key(k)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A request after authentication, with what the handlers need.
pub(crate) struct Ctx {
    pub method: Method,
    pub path: String,
    pub query: Query,
    pub accept: String,
    pub content_type: String,
    pub body: Bytes,
    pub user: User,
    /// `User-Agent`: names the field manager of updates that give no `fieldManager`.
    pub user_agent: String,
}

impl Ctx {
    /// Whether the client asked for a server-side Table (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`).
    pub fn wants_table(&self) -> bool {
        self.accept.contains("as=Table")
    }
}

pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub(crate) fn json_response(code: u16, v: &Value) -> Response<Body> {
    json_bytes_response(code, serde_json::to_vec(v).unwrap_or_default())
}

/// A response whose body is already encoded JSON.
pub(crate) fn json_bytes_response(code: u16, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

/// Adds `Warning: 299 - "..."` headers, as upstream does for unknown fields under `fieldValidation=Warn`.
pub(crate) fn with_warnings(mut r: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        let v = format!("299 - \"{}\"", w.replace('"', "\\\""));
        if let Ok(v) = HeaderValue::from_str(&v) {
            r.headers_mut().append("Warning", v);
        }
    }
    r
}

/// Reads the request body (bounded), then routes.
pub(crate) async fn handle(
    state: Arc<State>,
    req: Request<hyper::body::Incoming>,
    user: Option<User>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let header = |h: header::HeaderName| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let path = parts.uri.path().to_string();
    // Client certificate first, then a bearer token: static, else a service-account JWT (upstream's union
    // authenticator stops at the first success).
    let mut user = user;
    if user.is_none() {
        let auth = header(header::AUTHORIZATION);
        if let Some(token) = auth.strip_prefix("Bearer ").map(str::trim) {
            user = state.tokens.get(token).cloned();
            if user.is_none() && sa_token::looks_like_jwt(token) {
                match sa_token::authenticate(&state, token).await {
                    Ok(u) => user = Some(u),
                    Err(e) => tracing::info!(error = %e, "service-account token refused"),
                }
            }
        }
    }
    let Some(user) = user else {
        // Health endpoints stay open to anonymous callers (upstream grants them via system:public-info-viewer).
        if matches!(path.as_str(), "/healthz" | "/livez" | "/readyz") {
            return plain(200, "ok");
        }
        return error_response(&ApiError::unauthorized());
    };
    // Logs, exec, attach and port-forward stream (and may upgrade the connection): proxied without reading a body.
    if let Some((ns, name, sub)) = kubelet_proxy::target(&path) {
        let method = parts.method.clone();
        let user_name = user.name.clone();
        let attrs = rbac::Attributes {
            verb: if sub == "log" { "get" } else { "create" }.into(),
            group: String::new(),
            resource: "pods".into(),
            subresource: Some(sub.clone()),
            namespace: Some(ns.clone()),
            name: Some(name.clone()),
            path: None,
        };
        let req = Request::from_parts(parts, body);
        let resp = kubelet_proxy::handle(state.clone(), req, user, ns, name, sub).await;
        let code = resp.status().as_u16();
        tracing::debug!(user = %user_name, verb = %method, path = %path, code, "request");
        if let Some(audit) = &state.audit {
            audit_line(audit, &user_name, &method, &path, Some(&attrs), code);
        }
        return resp;
    }
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    let body = match limited.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error_response(&ApiError {
                code: 413,
                reason: "RequestEntityTooLarge",
                message: format!("request body too large or unreadable: {e}"),
                details: None,
            })
        }
    };
    let ctx = Ctx {
        method: parts.method.clone(),
        query: Query::parse(parts.uri.query()),
        accept: header(header::ACCEPT),
        content_type: header(header::CONTENT_TYPE),
        user_agent: header(header::USER_AGENT),
        path,
        body,
        user,
    };
    let verb = ctx.method.clone();
    let path = ctx.path.clone();
    let user_name = ctx.user.name.clone();
    let (resp, attrs) = match route(&state, ctx).await {
        Ok(r) => r,
        Err((e, attrs)) => (error_response(&e), attrs),
    };
    let code = resp.status().as_u16();
    tracing::debug!(user = %user_name, verb = %verb, path = %path, code, "request");
    if let Some(audit) = &state.audit {
        audit_line(audit, &user_name, &verb, &path, attrs.as_ref(), code);
    }
    resp
}

/// Appends one audit record: who did what to which resource, and the response code.
fn audit_line(
    audit: &std::sync::Mutex<std::fs::File>,
    user: &str,
    method: &Method,
    path: &str,
    attrs: Option<&rbac::Attributes>,
    code: u16,
) {
    use std::io::Write;
    let mut rec = serde_json::json!({
        "timestamp": objects::now(),
        "user": user,
        "method": method.as_str(),
        "path": path,
        "code": code,
    });
    if let Some(a) = attrs {
        rec["verb"] = serde_json::json!(a.verb);
        if a.path.is_none() {
            rec["resource"] = serde_json::json!(a.resource);
            rec["group"] = serde_json::json!(a.group);
            rec["subresource"] = serde_json::json!(a.subresource);
            rec["namespace"] = serde_json::json!(a.namespace);
            rec["name"] = serde_json::json!(a.name);
        }
    }
    let mut line = rec.to_string();
    line.push('\n');
    let mut f = audit.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = f.write_all(line.as_bytes()) {
        tracing::warn!(error = %e, "cannot write the audit log");
    }
}

pub(crate) fn plain(code: u16, text: &str) -> Response<Body> {
    let mut r = Response::new(full(text.to_string()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Where a resource request points.
#[derive(Debug)]
pub(crate) struct Target {
    pub kind: &'static resources::ResourceKind,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
    /// Legacy `/watch/` path prefix.
    pub watch_path: bool,
}

type Routed =
    Result<(Response<Body>, Option<rbac::Attributes>), (ApiError, Option<rbac::Attributes>)>;

/// Authorizes, then serves; returns the authorization attributes too, for the audit log.
async fn route(state: &Arc<State>, ctx: Ctx) -> Routed {
    let path = ctx.path.trim_end_matches('/').to_string();
    let attrs = match attributes(&ctx, &path) {
        Ok(a) => a,
        Err(e) => return Err((e, None)),
    };
    if !rbac::authorize(&state.caches, &ctx.user, &attrs) {
        let mut e = ApiError::forbidden(attrs.forbidden_message(&ctx.user));
        if attrs.path.is_none() {
            let mut d = serde_json::json!({"kind": attrs.resource});
            if let Some(n) = &attrs.name {
                d["name"] = serde_json::json!(n);
            }
            if !attrs.group.is_empty() {
                d["group"] = serde_json::json!(attrs.group);
            }
            e.details = Some(d);
        }
        return Err((e, Some(attrs)));
    }
    match rbac::node_restriction(state, &ctx.user, &attrs, &ctx.body).await {
        Ok(None) => {}
        Ok(Some(why)) => return Err((ApiError::forbidden(why), Some(attrs))),
        Err(e) => {
            return Err((
                ApiError::internal(format!("cannot authorize: {e}")),
                Some(attrs),
            ))
        }
    }
    match serve_request(state, ctx, &path).await {
        Ok(r) => Ok((r, Some(attrs))),
        Err(e) => Err((e, Some(attrs))),
    }
}

/// The authorization attributes of a request (Ref: apiserver `RequestInfoFactory`).
fn attributes(ctx: &Ctx, path: &str) -> Result<rbac::Attributes, ApiError> {
    let method_verb = match ctx.method {
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "get",
    };
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _v, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", g, _v, rest @ ..] if !rest.is_empty() => (*g, rest),
        _ => {
            return Ok(rbac::Attributes {
                verb: method_verb.to_lowercase(),
                group: String::new(),
                resource: String::new(),
                subresource: None,
                namespace: None,
                name: None,
                path: Some(if path.is_empty() {
                    "/".into()
                } else {
                    path.to_string()
                }),
            })
        }
    };
    let (watch_path, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let (namespace, rest): (Option<String>, &[&str]) = match rest {
        ["namespaces", ns, r @ ..] if !r.is_empty() && !matches!(r[0], "status" | "finalize") => {
            (Some((*ns).to_string()), r)
        }
        r => (None, r),
    };
    let (resource, name, sub) = match rest {
        [res] => (*res, None, None),
        [res, name] => (*res, Some((*name).to_string()), None),
        [res, name, sub, ..] => (*res, Some((*name).to_string()), Some((*sub).to_string())),
        [] => return Err(ApiError::path_not_found(path)),
    };
    // A namespace object's own namespace is itself (upstream sets it so RoleBindings can grant it).
    let namespace =
        namespace.or_else(|| (resource == "namespaces").then(|| name.clone()).flatten());
    let watching = watch_path || ctx.query.flag("watch");
    let verb = match (method_verb, name.is_some()) {
        ("get", _) if watching => "watch",
        ("get", false) => "list",
        ("delete", false) => "deletecollection",
        (v, _) => v,
    };
    // A list or watch narrowed to one object by `metadata.name` is authorized as a request on that object, so
    // RBAC `resourceNames` and the Node authorizer can allow it (Ref: RequestInfoFactory, for list and watch).
    let name = match (name, verb) {
        (None, "list" | "watch") => ctx
            .query
            .get("fieldSelector")
            .and_then(selectors::exact_name)
            .map(String::from),
        (name, _) => name,
    };
    Ok(rbac::Attributes {
        verb: verb.to_string(),
        group: group.to_string(),
        resource: resource.to_string(),
        subresource: sub,
        namespace,
        name,
        path: None,
    })
}

async fn serve_request(
    state: &Arc<State>,
    ctx: Ctx,
    path: &str,
) -> Result<Response<Body>, ApiError> {
    let path = path.to_string();
    match path.as_str() {
        "/healthz" | "/livez" | "/readyz" => return Ok(plain(200, "ok")),
        "/version" => return Ok(discovery::version()),
        "/api" => return Ok(discovery::core_api(&ctx)),
        "/apis" => return Ok(discovery::apis(&ctx)),
        "/openapi/v2" => return Err(ApiError::path_not_found(&path)),
        "/openapi/v3" => return Ok(openapi::index(state)),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/openapi/v3/") {
        return openapi::document(state, rest);
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        ["apis", g] => return discovery::group(g),
        _ => return Err(ApiError::path_not_found(&path)),
    };
    if rest.is_empty() {
        return discovery::resource_list(group, version)
            .ok_or_else(|| ApiError::path_not_found(&path));
    }
    let (watch_path, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let (namespace, rest): (Option<String>, &[&str]) = match rest {
        ["namespaces", ns, r @ ..] if !r.is_empty() && !matches!(r[0], "status" | "finalize") => {
            (Some((*ns).to_string()), r)
        }
        r => (None, r),
    };
    let (resource, name, sub) = match rest {
        [res] => (*res, None, None),
        [res, name] => (*res, Some((*name).to_string()), None),
        [res, name, sub] => (*res, Some((*name).to_string()), Some((*sub).to_string())),
        _ => return Err(ApiError::path_not_found(&path)),
    };
    let kind =
        resources::find(group, version, resource).ok_or_else(|| ApiError::path_not_found(&path))?;
    if namespace.is_some() && !kind.namespaced {
        return Err(ApiError::path_not_found(&path));
    }
    if let Some(s) = &sub {
        if kind.subresource(s).is_none() {
            return Err(ApiError::path_not_found(&path));
        }
    }
    let target = Target {
        kind,
        namespace,
        name,
        subresource: sub,
        watch_path,
    };
    handlers::dispatch(state, ctx, target).await
}
