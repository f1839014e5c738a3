//! HTTP endpoints: `/healthz`, `/metrics`, and the health-check node ports of `externalTrafficPolicy: Local`
//! Services (load balancers probe them to find nodes with local endpoints).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::model::ServiceName;

/// Failure to serve an HTTP endpoint.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server on {addr} failed: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Health-check node port → (Service, local endpoint count), published by the sync loop.
pub type HealthChecks = BTreeMap<u16, (ServiceName, usize)>;

async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    // Ref: kube-proxy's /healthz answers 200 with lastUpdated/currentTime while syncs succeed, 503 otherwise.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let body = serde_json::json!({
        "lastUpdated": m.last_success_unix(),
        "currentTime": now,
    })
    .to_string();
    let code = if m.healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
}

/// Binds `addr` now (so a bad address fails start-up) and returns the server future.
pub(crate) async fn bind(
    addr: SocketAddr,
    router: Router,
) -> Result<impl std::future::Future<Output = Result<(), HttpError>>, HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    info!(addr = %local, "serving HTTP");
    Ok(async move {
        axum::serve(listener, router)
            .await
            .map_err(|source| HttpError::Serve { addr, source })
    })
}

/// The router of `/healthz` (and `/livez`) for `--healthz-bind-address`.
pub(crate) fn healthz_router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .with_state(m)
}

/// The router of `/metrics` (and `/healthz`, as upstream's metrics server also has) for `--metrics-bind-address`.
pub(crate) fn metrics_router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(m)
}

async fn health_check(
    State((port, rx)): State<(u16, watch::Receiver<HealthChecks>)>,
) -> impl IntoResponse {
    let current = rx.borrow().get(&port).cloned();
    let Some((svc, local)) = current else {
        return (StatusCode::NOT_FOUND, String::new());
    };
    // Ref: kube-proxy's service health server: 200 with the local endpoint count, 503 when there is none.
    let body = serde_json::json!({
        "service": {"namespace": svc.namespace, "name": svc.name},
        "localEndpoints": local,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let code = if local > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

/// Keeps one listener per health-check node port in `rx`, on `bind_ip`, opening and closing them as it changes.
pub(crate) async fn run_health_checks(
    bind_ip: std::net::IpAddr,
    mut rx: watch::Receiver<HealthChecks>,
) {
    let mut servers: HashMap<u16, JoinHandle<()>> = HashMap::new();
    loop {
        let wanted: Vec<u16> = rx.borrow_and_update().keys().copied().collect();
        servers.retain(|port, task| {
            let keep = wanted.contains(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for port in wanted {
            if servers.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(bind_ip, port);
            let router = Router::new()
                .fallback(get(health_check))
                .with_state((port, rx.clone()));
            match bind(addr, router).await {
                Ok(server) => {
                    servers.insert(
                        port,
                        tokio::spawn(async move {
                            if let Err(e) = server.await {
                                warn!(error = %e, "health-check server stopped");
                            }
                        }),
                    );
                }
                Err(e) => warn!(error = %e, "cannot serve a health-check node port"),
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
