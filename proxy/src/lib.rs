//! Windlass service proxy: programs Kubernetes Services (ClusterIP, NodePort, externalIPs) into one nftables table.
//!
//! Layers: [`Model`] holds Services and EndpointSlices (converted from API objects by a [`ServiceSource`]);
//! [`Ruleset`] computes the table's desired contents from the model (see its module docs for the design);
//! [`Proxier`] diffs and applies them as atomic `nft -f` transactions; [`SyncLoop`] coalesces events into syncs;
//! [`run`] wires these to the HTTP endpoints (`/healthz`, `/metrics`, health-check node ports).

pub mod dns;
mod http;
mod kube_source;
mod metrics;
mod model;
mod nft;
mod ruleset;
mod source;
mod sync;

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::info;

pub use http::{HealthChecks, HttpError};
pub use kube_source::KubeSource;
pub use metrics::Metrics;
pub use model::{
    Backend, Endpoint, EndpointPort, EndpointSliceInfo, Model, ModelError, ModelEvent, Protocol,
    Service, ServiceName, ServicePort, SliceKey, TrafficPolicy, DEFAULT_AFFINITY_TIMEOUT_SECONDS,
};
pub use nft::{Conntrack, Nft, NftError};
pub use ruleset::{
    render_cleanup, Changes, Ruleset, RulesetConfig, RulesetStats, FAMILY, MASQUERADE_MARK, TABLE,
};
pub use source::{parse_list, FileSource, ServiceSource, SourceError};
pub use sync::{Proxier, SyncKind, SyncLoop, SyncReport, SyncTiming};

/// Everything [`run`] needs.
pub struct RunConfig {
    pub ruleset: RulesetConfig,
    pub nft: Nft,
    pub conntrack: Conntrack,
    pub metrics_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
    pub timing: SyncTiming,
}

/// Why the proxy stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the model source stopped")]
    SourceStopped,
}

/// Runs the proxy until the source ends or an HTTP server fails.
pub async fn run(config: RunConfig, source: Box<dyn ServiceSource>) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let healthz = http::bind(config.healthz_addr, http::healthz_router(metrics.clone())).await?;
    let metrics_srv =
        http::bind(config.metrics_addr, http::metrics_router(metrics.clone())).await?;
    let (hc_tx, hc_rx) = tokio::sync::watch::channel(HealthChecks::new());
    let hc_task = tokio::spawn(http::run_health_checks(
        std::net::IpAddr::from([0, 0, 0, 0]),
        hc_rx,
    ));

    let (tx, rx) = std::sync::mpsc::channel();
    let proxier = Proxier::new(config.ruleset, config.nft, config.conntrack, metrics);
    let sync_loop = SyncLoop {
        proxier,
        model: Model::new(),
        timing: config.timing,
        on_synced: Box::new(move |applied: &Ruleset| {
            hc_tx.send_if_modified(|cur| {
                let changed = *cur != applied.health_checks;
                if changed {
                    cur.clone_from(&applied.health_checks);
                }
                changed
            });
        }),
    };
    let sync_thread = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || sync_loop.run(rx))
        .map_err(|source| SourceError::Read {
            path: "<sync thread>".into(),
            source,
        })?;
    let source_task = tokio::task::spawn_blocking(move || source.run(tx));
    info!("proxy running");
    let result = tokio::select! {
        r = healthz => r.map_err(RunError::from),
        r = metrics_srv => r.map_err(RunError::from),
        r = source_task => match r {
            Ok(Ok(())) => Err(RunError::SourceStopped),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(RunError::SourceStopped),
        },
    };
    hc_task.abort();
    drop(sync_thread);
    result
}

/// `--cleanup`: deletes the proxy's table (if present) and nothing else.
pub fn cleanup(nft: &Nft) -> Result<(), NftError> {
    nft.apply(&render_cleanup())
}
