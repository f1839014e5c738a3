//! Runs the selected controllers and the scheduler, behind leader election: only the leader runs them; losing
//! the lease stops them (their tasks are aborted, which drops their watches) and the process becomes a candidate
//! again. A controller that fails is restarted after a pause, as upstream's controllers retry internally.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::leader::{LeaderElection, LeaseSettings};
use super::{Context, ControllersConfig, CONTROLLERS, SCHEDULER};

/// Pause before a failed controller is started again.
const RESTART_DELAY: Duration = Duration::from_secs(5);

/// What `windlass-control serve` asks of the controller manager.
pub struct ManagerOptions {
    /// Names selected by `--controllers` (see [`super::select`]); may include [`SCHEDULER`].
    pub enabled: Vec<&'static str>,
    pub config: ControllersConfig,
    /// `None` disables leader election (`--leader-elect=false`): this process always leads.
    pub lease: Option<LeaseSettings>,
    /// Client authenticated as `system:kube-controller-manager` (also used for the lease).
    pub controller_client: kube::Client,
    /// Client authenticated as `system:kube-scheduler`.
    pub scheduler_client: kube::Client,
}

/// Why the manager stopped.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("cannot wait for termination signals: {0}")]
    Signal(std::io::Error),
}

/// Starts everything enabled; returns when nothing is left to run.
fn start_all(opts: &ManagerOptions, ctx: &Context) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for entry in CONTROLLERS
        .iter()
        .filter(|c| opts.enabled.contains(&c.name))
    {
        let ctx = ctx.clone();
        let name = entry.name;
        let start = entry.start;
        set.spawn(async move {
            loop {
                tracing::info!(controller = name, "starting controller");
                match start(ctx.clone()).await {
                    Ok(()) => {
                        tracing::info!(controller = name, "controller finished");
                        return;
                    }
                    Err(e) => tracing::error!(controller = name, error = %e, "controller failed; restarting"),
                }
                tokio::time::sleep(RESTART_DELAY).await;
            }
        });
    }
    if opts.enabled.contains(&SCHEDULER) {
        let client = opts.scheduler_client.clone();
        set.spawn(async move {
            loop {
                tracing::info!("starting scheduler");
                match crate::scheduler::run(client.clone()).await {
                    Ok(()) => return,
                    Err(e) => tracing::error!(error = %e, "scheduler failed; restarting"),
                }
                tokio::time::sleep(RESTART_DELAY).await;
            }
        });
    }
    set
}

/// Runs until SIGTERM/SIGINT; then releases the lease (if held) and returns.
pub async fn run(opts: ManagerOptions) -> Result<(), ManagerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ManagerError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ManagerError::Signal)?;
    let ctx = Context {
        client: opts.controller_client.clone(),
        config: Arc::new(opts.config.clone()),
    };
    tracing::info!(controllers = ?opts.enabled, "controller manager configured");
    let Some(settings) = opts.lease.clone() else {
        let mut set = start_all(&opts, &ctx);
        tokio::select! {
            _ = async { while set.join_next().await.is_some() {} std::future::pending::<()>().await } => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        return Ok(());
    };
    let mut election = LeaderElection::new(opts.controller_client.clone(), settings);
    loop {
        tracing::info!(identity = %election.settings().identity, "waiting to become the leader");
        tokio::select! {
            _ = election.acquire() => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
        tracing::info!(identity = %election.settings().identity, "became the leader; starting controllers");
        let mut set = start_all(&opts, &ctx);
        let stop = tokio::select! {
            _ = election.hold() => false,
            _ = term.recv() => true,
            _ = int.recv() => true,
        };
        // Stop every controller before anyone else may start theirs.
        set.shutdown().await;
        if stop {
            if let Err(e) = election.release().await {
                tracing::warn!(error = %e, "cannot release the lease");
            }
            return Ok(());
        }
        tracing::warn!("lost the lease; controllers stopped");
    }
}
