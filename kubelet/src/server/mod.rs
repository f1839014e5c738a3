//! The kubelet API (upstream `pkg/kubelet/server`): HTTPS on `--port` (10250), client-certificate authentication,
//! authorization by `SubjectAccessReview`, and the endpoints the API server proxies to and monitoring scrapes:
//!
//! | path | what |
//! |---|---|
//! | `/containerLogs/{ns}/{pod}/{container}` | CRI logs decoded; `follow`, `tailLines`, `sinceSeconds`, `sinceTime`, `timestamps`, `previous`, `limitBytes` |
//! | `/exec/{ns}/{pod}[/{uid}]/{container}` | a process in the container over WebSocket (`v5`/`v4.channel.k8s.io`) or SPDY/3.1 (`v4.channel.k8s.io`), with or without a tty |
//! | `/attach/{ns}/{pod}[/{uid}]/{container}` | the container's output over the same channels (output only: the log shim owns stdin) |
//! | `/portForward/{ns}/{pod}[/{uid}]` | to the pod's localhost: `portforward.k8s.io` over SPDY/3.1, plain or tunnelled in WebSocket (kubectl), or `?ports=` over WebSocket channels (the `kube` crate) |
//! | `/stats/summary` | node and pod CPU/memory (Summary API) |
//! | `/healthz`, `/metrics` | liveness; Prometheus text |
//!
//! Containers are found from the runtime's state (sandbox labels and container IDs as [`crate::layout`] names them),
//! so the API needs nothing from the pod workers.
//!
//! Start it from the binary with [`serve`] (or [`KubeletServer::bind`] + [`KubeletServer::run`] to learn the bound
//! address first, as tests do).

mod auth;
mod exec;
mod logs;
mod pods;
mod portforward;
mod remotecommand;
mod spdy;
mod stats;
mod tls;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::Role;
use windlass_runtime::SandboxManager;

pub use auth::{Authorizer, AuthorizerError, Decision, NodeAttributes, SarAuthorizer, UserInfo};
pub use tls::TlsError;

use auth::CachingAuthorizer;
use pods::LookupError;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The kubelet API's flags (upstream names); the binary flattens them into its own.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerFlags {
    /// Serving certificate (PEM) of the kubelet API; without it a self-signed one is kept in --root-dir/pki.
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key of --tls-cert-file.
    #[arg(long)]
    pub tls_private_key_file: Option<PathBuf>,
    /// CA bundle that signs client certificates (the cluster CA, `<control data dir>/pki/ca.crt`); without it no
    /// client can authenticate.
    #[arg(long)]
    pub client_ca_file: Option<PathBuf>,
}

/// What the server needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub node_name: String,
    /// Put into the self-signed certificate's SANs.
    pub node_ip: Option<IpAddr>,
    pub listen: SocketAddr,
    /// `--root-dir`: log files and the self-signed certificate.
    pub root_dir: PathBuf,
    /// The pod sandboxes (root `layout::sandboxes_dir(root_dir)`).
    pub sandboxes: SandboxManager,
    /// `/proc`, for node stats.
    pub proc_root: PathBuf,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
}

impl ServerConfig {
    /// From the kubelet's configuration and flags: all addresses on `--port`, as upstream's `--address 0.0.0.0`.
    pub fn new(
        config: &crate::config::Config,
        flags: &ServerFlags,
        sandboxes: SandboxManager,
    ) -> Self {
        Self {
            node_name: config.node_name.clone(),
            node_ip: config.node_ip,
            listen: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), config.port),
            root_dir: config.root_dir.clone(),
            sandboxes,
            proc_root: PathBuf::from("/proc"),
            tls_cert_file: flags.tls_cert_file.clone(),
            tls_private_key_file: flags.tls_private_key_file.clone(),
            client_ca_file: flags.client_ca_file.clone(),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("--tls-cert-file and --tls-private-key-file must be given together")]
    HalfTls,
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct State {
    config: ServerConfig,
    authorizer: CachingAuthorizer,
    rates: stats::CpuRates,
    requests: stats::RequestCounts,
}

/// A bound kubelet API server.
pub struct KubeletServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
}

impl KubeletServer {
    /// Loads (or creates) the TLS material and binds the port.
    pub async fn bind(
        config: ServerConfig,
        authorizer: Arc<dyn Authorizer>,
    ) -> Result<Self, ServerError> {
        let (cert, key) = match (&config.tls_cert_file, &config.tls_private_key_file) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            (None, None) => {
                tls::ensure_self_signed(&config.root_dir, &config.node_name, config.node_ip)?
            }
            _ => return Err(ServerError::HalfTls),
        };
        if config.client_ca_file.is_none() {
            tracing::warn!("no --client-ca-file: every kubelet API request will be refused (401)");
        }
        let tls = tls::server_config(&cert, &key, config.client_ca_file.as_deref())?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Listen {
                    addr: config.listen,
                    source,
                })?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            state: Arc::new(State {
                config,
                authorizer: CachingAuthorizer::new(authorizer),
                rates: stats::CpuRates::default(),
                requests: stats::RequestCounts::default(),
            }),
        })
    }

    /// The bound address (the port when `listen` asked for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped.
    pub async fn run(self) {
        tracing::info!(address = ?self.listener.local_addr().ok(), "kubelet API serving");
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = self.acceptor.clone();
            let state = self.state.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                };
                let user = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| UserInfo::from_certificate(c));
                let service = service_fn(move |req| {
                    let state = state.clone();
                    let user = user.clone();
                    async move { Ok::<_, Infallible>(handle(state, req, user).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .with_upgrades();
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
    }
}

/// The Node's `status.daemonEndpoints` for a kubelet API on `port`: the API server proxies logs, exec and
/// port-forward to the Node's InternalIP at this port (upstream sets it at registration).
pub fn daemon_endpoints(port: u16) -> k8s_openapi::api::core::v1::NodeDaemonEndpoints {
    k8s_openapi::api::core::v1::NodeDaemonEndpoints {
        kubelet_endpoint: Some(k8s_openapi::api::core::v1::DaemonEndpoint {
            port: i32::from(port),
        }),
    }
}

/// Binds and serves the kubelet API until the task is dropped (what `windlass-kubelet` calls).
pub async fn serve(
    config: ServerConfig,
    authorizer: Arc<dyn Authorizer>,
) -> Result<(), ServerError> {
    KubeletServer::bind(config, authorizer).await?.run().await;
    Ok(())
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed_unsync()
}

fn text(code: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut msg = msg.into();
    if !msg.ends_with('\n') {
        msg.push('\n');
    }
    let mut r = Response::new(full(msg));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn lookup_response(e: &LookupError) -> Response<Body> {
    match e {
        LookupError::Runtime(_) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        LookupError::NoPrevious { .. } => text(StatusCode::BAD_REQUEST, e.to_string()),
        _ => text(StatusCode::NOT_FOUND, e.to_string()),
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    user: Option<UserInfo>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let endpoint = path
        .split('/')
        .find(|s| !s.is_empty())
        .unwrap_or("")
        .to_string();
    let resp = authorized(&state, req, user).await;
    state.requests.record(
        method.as_str(),
        &format!("/{endpoint}"),
        resp.status().as_u16(),
    );
    resp
}

async fn authorized(
    state: &Arc<State>,
    req: Request<Incoming>,
    user: Option<UserInfo>,
) -> Response<Body> {
    let Some(user) = user else {
        return text(StatusCode::UNAUTHORIZED, "Unauthorized");
    };
    let attrs =
        NodeAttributes::for_request(req.method(), req.uri().path(), &state.config.node_name);
    match state.authorizer.authorize(&user, &attrs).await {
        Ok(d) if d.allowed => {}
        Ok(_) => {
            // Ref: upstream's message from `pkg/kubelet/server/server.go` (authorization filter).
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "Forbidden (user={}, verb={}, resource=nodes, subresource={})",
                    user.name, attrs.verb, attrs.subresource
                ),
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, user = %user.name, "authorization failed");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "Authorization error");
        }
    }
    route(state, req).await
}

fn query_pairs(req: &Request<Incoming>) -> Vec<(String, String)> {
    form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

async fn route(state: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match parts.as_slice() {
        ["healthz"] if get => text(StatusCode::OK, "ok"),
        ["metrics"] if get => {
            let mgr = state.config.sandboxes.clone();
            let (node, proc_root) = (
                state.config.node_name.clone(),
                state.config.proc_root.clone(),
            );
            let st = state.clone();
            let body = tokio::task::spawn_blocking(move || {
                stats::metrics(&mgr, &node, &proc_root, &st.requests)
            })
            .await
            .unwrap_or_default();
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        ["stats", "summary"] if get => {
            let st = state.clone();
            let res = tokio::task::spawn_blocking(move || {
                stats::summary(
                    &st.config.sandboxes,
                    &st.config.node_name,
                    &st.config.proc_root,
                    &st.rates,
                )
            })
            .await;
            match res {
                Ok(Ok(v)) => {
                    let mut r = Response::new(full(serde_json::to_vec(&v).unwrap_or_default()));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    r
                }
                Ok(Err(e)) => lookup_response(&e),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        ["containerLogs", ns, pod, container] if get => {
            let (ns, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
            container_logs(state, &req, ns, pod, container).await
        }
        ["exec", ns, pod, container] | ["exec", ns, pod, _, container] => {
            let (ns, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
            exec(state, req, ns, pod, container, false).await
        }
        ["attach", ns, pod, container] | ["attach", ns, pod, _, container] => {
            let (ns, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
            exec(state, req, ns, pod, container, true).await
        }
        ["portForward", ns, pod] | ["portForward", ns, pod, _] => {
            let (ns, pod) = (ns.to_string(), pod.to_string());
            port_forward(state, req, ns, pod).await
        }
        _ => text(StatusCode::NOT_FOUND, format!("404 page not found: {path}")),
    }
}

async fn container_logs(
    state: &Arc<State>,
    req: &Request<Incoming>,
    ns: String,
    pod: String,
    container: String,
) -> Response<Body> {
    let opts = match logs::LogOptions::parse(&query_pairs(req), jiff::Timestamp::now()) {
        Ok(o) => o,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let mgr = state.config.sandboxes.clone();
    let root = state.config.root_dir.clone();
    let previous = opts.previous;
    let found = tokio::task::spawn_blocking(move || {
        let p = pods::find_pod(&mgr, &ns, &pod)?;
        let list = pods::instances(&mgr, &root, &p, &container)?;
        pods::pick(list, previous, &p, &container)
    })
    .await;
    let inst = match found {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => return lookup_response(&e),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if !logs::exists(&inst.log_path) {
        // Created but not started yet, or its log removed: upstream answers with an empty body too.
        return text(StatusCode::OK, "");
    }
    let mgr = state.config.sandboxes.clone();
    let (sb, id) = (
        inst.sandbox_id.clone(),
        inst.info.as_ref().map(|i| i.id.clone()).unwrap_or_default(),
    );
    let running = inst.running();
    let source = logs::LogSource {
        path: inst.log_path.clone(),
        running: Box::new(move || {
            running
                && mgr
                    .container_status(&sb, &id)
                    .is_ok_and(|c| c.status == windlass_runtime::Status::Running)
        }),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(logs::stream(source, opts, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// How a streaming request asked to switch protocols.
#[derive(Debug)]
enum Handshake {
    /// `Upgrade: websocket` with the subprotocol we answer with.
    WebSocket { protocol: &'static str, key: String },
    /// `Upgrade: SPDY/3.1` with the stream protocol we answer with.
    Spdy { protocol: &'static str },
}

impl Handshake {
    /// Checks the upgrade request: a WebSocket with one of `websocket_protocols`, or SPDY/3.1 offering one of
    /// `spdy_protocols` (Ref: apimachinery `httpstream.Handshake` and `spdy.UpgradeResponse`).
    #[allow(clippy::result_large_err)]
    fn accept(
        headers: &http::HeaderMap,
        what: &str,
        websocket_protocols: &[&'static str],
        spdy_protocols: &[&'static str],
    ) -> Result<Self, Response<Body>> {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        let upgrade = get("upgrade").to_ascii_lowercase();
        if upgrade.contains(&spdy::UPGRADE.to_ascii_lowercase()) {
            let offered: Vec<&str> = headers
                .get_all(spdy::PROTOCOL_HEADER)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if offered.is_empty() {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    "unable to upgrade: X-Stream-Protocol-Version is required",
                ));
            }
            return match spdy::negotiate(offered.iter().copied(), spdy_protocols) {
                Some(protocol) => Ok(Handshake::Spdy { protocol }),
                None => Err(text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server \
                         accepts {spdy_protocols:?}"
                    ),
                )),
            };
        }
        if upgrade != "websocket" {
            return Err(text(
                StatusCode::BAD_REQUEST,
                format!(
                    "{what} needs a connection upgrade: WebSocket ({}) or SPDY/3.1 ({})",
                    websocket_protocols.join(", "),
                    spdy_protocols.join(", ")
                ),
            ));
        }
        let offered = get("sec-websocket-protocol");
        let offered: Vec<&str> = offered.split(',').map(str::trim).collect();
        let Some(protocol) = websocket_protocols
            .iter()
            .find(|p| offered.contains(p))
            .copied()
        else {
            return Err(text(
                StatusCode::BAD_REQUEST,
                format!(
                    "no supported WebSocket subprotocol offered (want one of {})",
                    websocket_protocols.join(", ")
                ),
            ));
        };
        let key = get("sec-websocket-key").to_string();
        if key.is_empty() || get("sec-websocket-version") != "13" {
            return Err(text(StatusCode::BAD_REQUEST, "bad WebSocket handshake"));
        }
        Ok(Handshake::WebSocket { protocol, key })
    }

    fn transport(&self) -> &'static str {
        match self {
            Handshake::WebSocket { .. } => "WebSocket",
            Handshake::Spdy { .. } => spdy::UPGRADE,
        }
    }

    fn protocol(&self) -> &'static str {
        match self {
            Handshake::WebSocket { protocol, .. } | Handshake::Spdy { protocol } => protocol,
        }
    }

    /// The 101 answer.
    fn switching_protocols(&self) -> Response<Body> {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        match self {
            Handshake::WebSocket { protocol, key } => {
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                if let Ok(v) = HeaderValue::from_str(&accept) {
                    h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
                }
                h.insert(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(protocol),
                );
            }
            Handshake::Spdy { protocol } => {
                h.insert(header::UPGRADE, HeaderValue::from_static(spdy::UPGRADE));
                h.insert(spdy::PROTOCOL_HEADER, HeaderValue::from_static(protocol));
            }
        }
        r
    }
}

async fn exec(
    state: &Arc<State>,
    mut req: Request<Incoming>,
    ns: String,
    pod: String,
    container: String,
    attach: bool,
) -> Response<Body> {
    let what = if attach { "attach" } else { "exec" };
    let handshake = match Handshake::accept(
        req.headers(),
        what,
        &[remotecommand::V5, remotecommand::V4],
        remotecommand::SPDY_PROTOCOLS,
    ) {
        Ok(h) => h,
        Err(r) => return r,
    };
    let query = query_pairs(&req);
    let params = if attach {
        let mut q = query.clone();
        q.push(("command".into(), "attach".into()));
        exec::ExecParams::parse(&q)
    } else {
        exec::ExecParams::parse(&query)
    };
    let params = match params {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let mgr = state.config.sandboxes.clone();
    let root = state.config.root_dir.clone();
    let found = {
        let (ns, pod, container) = (ns.clone(), pod.clone(), container.clone());
        tokio::task::spawn_blocking(move || {
            pods::running_instance(&mgr, &root, &ns, &pod, &container)
        })
        .await
    };
    let (_pod, inst) = match found {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return lookup_response(&e),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let mgr = state.config.sandboxes.clone();
    let container_id = inst.info.as_ref().map(|i| i.id.clone()).unwrap_or_default();
    let sandbox_id = inst.sandbox_id.clone();
    let log_path = inst.log_path.clone();
    // Attach shows what is written from now on: fix "now" before answering, so nothing written after the client
    // saw the upgrade is missed.
    let start = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
    tracing::debug!(
        pod = %format!("{ns}/{pod}"),
        %container,
        transport = handshake.transport(),
        protocol = handshake.protocol(),
        tty = params.tty,
        stdin = params.stdin,
        "{what} session"
    );
    let response = handshake.switching_protocols();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "{what} upgrade failed");
                return;
            }
        };
        let channels = match handshake {
            Handshake::WebSocket { protocol, .. } => {
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    upgraded,
                    Role::Server,
                    None,
                )
                .await;
                remotecommand::websocket(ws, protocol)
            }
            Handshake::Spdy { .. } => {
                match remotecommand::spdy(spdy::over_io(upgraded), &params).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "{what} session ended before it started");
                        return;
                    }
                }
            }
        };
        if attach {
            exec::attach_session(
                channels,
                mgr,
                sandbox_id,
                container_id,
                log_path,
                start,
                params,
            )
            .await;
        } else {
            exec::session(channels, mgr, sandbox_id, container_id, params).await;
        }
    });
    response
}

async fn port_forward(
    state: &Arc<State>,
    mut req: Request<Incoming>,
    ns: String,
    pod: String,
) -> Response<Body> {
    // kubectl speaks SPDY (plain, or tunnelled in WebSocket); other clients (the kube crate) the channel protocol.
    let handshake = match Handshake::accept(
        req.headers(),
        "port-forward",
        &[spdy::TUNNEL_PROTOCOL, remotecommand::V5, remotecommand::V4],
        &[portforward::SPDY_PROTOCOL],
    ) {
        Ok(h) => h,
        Err(r) => return r,
    };
    let channel_ports = matches!(handshake, Handshake::WebSocket { protocol, .. } if protocol != spdy::TUNNEL_PROTOCOL);
    let ports = if channel_ports {
        match portforward::parse_ports(&query_pairs(&req)) {
            Ok(p) => p,
            Err(e) => return text(StatusCode::BAD_REQUEST, e),
        }
    } else {
        Vec::new()
    };
    let mgr = state.config.sandboxes.clone();
    let found = {
        let (ns, pod) = (ns.clone(), pod.clone());
        tokio::task::spawn_blocking(move || pods::find_pod(&mgr, &ns, &pod)).await
    };
    let pod_info = match found {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return lookup_response(&e),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let Some(sandbox) = pod_info
        .sandboxes
        .iter()
        .rev()
        .find(|s| s.state == windlass_runtime::SandboxState::Ready)
    else {
        return text(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{pod} has no running sandbox"),
        );
    };
    // A host-network pod listens in the node's namespace, which its holder is in.
    let netns = if sandbox.host_network {
        PathBuf::from(format!("/proc/{}/ns/net", sandbox.holder_pid))
    } else {
        sandbox.netns_path.clone()
    };
    let name = format!("{ns}/{pod}");
    tracing::debug!(
        pod = %name,
        transport = handshake.transport(),
        protocol = handshake.protocol(),
        "port-forward session"
    );
    let on_upgrade = hyper::upgrade::on(&mut req);
    let response = handshake.switching_protocols();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await.map(TokioIo::new) else {
            return;
        };
        match handshake {
            Handshake::Spdy { .. } => {
                portforward::spdy_session(spdy::over_io(upgraded), netns, name).await;
            }
            Handshake::WebSocket { protocol, .. } => {
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    upgraded,
                    Role::Server,
                    None,
                )
                .await;
                if protocol == spdy::TUNNEL_PROTOCOL {
                    portforward::spdy_session(spdy::over_websocket(ws), netns, name).await;
                } else {
                    portforward::session(ws, protocol, netns, name, ports).await;
                }
            }
        }
    });
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn exec_handshake(pairs: &[(&'static str, &'static str)]) -> Result<Handshake, StatusCode> {
        Handshake::accept(
            &headers(pairs),
            "exec",
            &[remotecommand::V5, remotecommand::V4],
            remotecommand::SPDY_PROTOCOLS,
        )
        .map_err(|r| r.status())
    }

    #[test]
    fn spdy_upgrades_pick_the_clients_first_protocol_we_speak_and_answer_with_it() {
        // What client-go's SPDY executor sends: one header per protocol, newest first.
        let h = exec_handshake(&[
            ("connection", "Upgrade"),
            ("upgrade", "SPDY/3.1"),
            ("x-stream-protocol-version", "v5.channel.k8s.io"),
            ("x-stream-protocol-version", "v4.channel.k8s.io"),
            ("x-stream-protocol-version", "v3.channel.k8s.io"),
        ])
        .unwrap();
        assert_eq!(
            (h.transport(), h.protocol()),
            ("SPDY/3.1", "v4.channel.k8s.io")
        );
        let r = h.switching_protocols();
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(r.headers()["upgrade"], "SPDY/3.1");
        assert_eq!(r.headers()["connection"], "Upgrade");
        assert_eq!(
            r.headers()["x-stream-protocol-version"],
            "v4.channel.k8s.io"
        );
        // Without an offer, or without one we speak: refused before upgrading.
        assert_eq!(
            exec_handshake(&[("upgrade", "SPDY/3.1")]).err(),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            exec_handshake(&[
                ("upgrade", "SPDY/3.1"),
                ("x-stream-protocol-version", "channel.k8s.io")
            ])
            .err(),
            Some(StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn websocket_upgrades_pick_the_newest_subprotocol_we_speak() {
        let h = exec_handshake(&[
            ("upgrade", "websocket"),
            (
                "sec-websocket-protocol",
                "v4.channel.k8s.io, v5.channel.k8s.io",
            ),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ])
        .unwrap();
        assert_eq!(
            (h.transport(), h.protocol()),
            ("WebSocket", "v5.channel.k8s.io")
        );
        let r = h.switching_protocols();
        // RFC 6455's example key and answer.
        assert_eq!(
            r.headers()["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(
            exec_handshake(&[("upgrade", "h2c")]).err(),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            exec_handshake(&[
                ("upgrade", "websocket"),
                ("sec-websocket-protocol", "base64.channel.k8s.io"),
                ("sec-websocket-key", "k"),
                ("sec-websocket-version", "13"),
            ])
            .err(),
            Some(StatusCode::BAD_REQUEST)
        );
    }
}
