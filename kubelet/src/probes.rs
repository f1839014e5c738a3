//! Liveness, readiness and startup probes.
//!
//! Ref: upstream `pkg/kubelet/prober` (worker.go, prober.go) and `pkg/probe/{http,tcp,exec}`:
//! - a probe waits `initialDelaySeconds` after the container started, then runs every `periodSeconds`, each try
//!   bounded by `timeoutSeconds`; an error counts as a failure;
//! - the reported result flips only after `successThreshold` consecutive successes or `failureThreshold`
//!   consecutive failures; readiness starts as failed, liveness as passed, startup as unknown;
//! - while a startup probe has not succeeded, liveness and readiness are not run; once it succeeds it stops;
//! - a liveness or startup failure puts the probe on hold (the kubelet restarts the container, and a new container
//!   gets new probes);
//! - httpGet succeeds on status 200–399, tcpSocket on a completed connect, exec on exit code 0.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{Container, ContainerPort, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::watch;
use tokio::time::Instant;

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

/// One try's outcome; `Failure` carries what the kubelet puts in its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Success,
    Failure(String),
}

/// The probe settings with upstream defaults (period 10 s, timeout 1 s, success 1, failure 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Thresholds {
    pub fn of(kind: ProbeKind, p: &Probe) -> Self {
        let secs = |v: Option<i32>, default: u64| {
            Duration::from_secs(v.map_or(default, |v| v.max(0) as u64))
        };
        let positive =
            |v: Option<i32>, default: u32| v.filter(|v| *v > 0).map_or(default, |v| v as u32);
        Self {
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
            // Liveness and startup must use 1 (API validation); enforce it for static pods too.
            success_threshold: match kind {
                ProbeKind::Readiness => positive(p.success_threshold, 1),
                _ => 1,
            },
            failure_threshold: positive(p.failure_threshold, 3),
        }
    }
}

/// The threshold logic of one probe worker, fed one outcome at a time.
#[derive(Debug, Clone)]
pub struct ProbeState {
    kind: ProbeKind,
    thresholds: Thresholds,
    last: Option<bool>,
    run: u32,
    result: Option<bool>,
    on_hold: bool,
}

impl ProbeState {
    pub fn new(kind: ProbeKind, thresholds: Thresholds) -> Self {
        Self {
            kind,
            thresholds,
            last: None,
            run: 0,
            result: match kind {
                ProbeKind::Readiness => Some(false),
                ProbeKind::Liveness => Some(true),
                ProbeKind::Startup => None,
            },
            on_hold: false,
        }
    }

    /// The reported result (`None` for a startup probe that has not decided yet).
    pub fn result(&self) -> Option<bool> {
        self.result
    }

    /// Whether the worker stops probing: a liveness/startup failure, or a startup success.
    pub fn done(&self) -> bool {
        self.on_hold || (self.kind == ProbeKind::Startup && self.result == Some(true))
    }

    /// Records one outcome; returns the new reported result when it changed.
    pub fn record(&mut self, success: bool) -> Option<bool> {
        if self.done() {
            return None;
        }
        if self.last == Some(success) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(success);
            self.run = 1;
        }
        let threshold = if success {
            self.thresholds.success_threshold
        } else {
            self.thresholds.failure_threshold
        };
        if self.run < threshold {
            return None;
        }
        let changed = self.result != Some(success);
        self.result = Some(success);
        if !success && self.kind != ProbeKind::Readiness {
            self.on_hold = true;
            self.run = 0;
        }
        changed.then_some(success)
    }
}

/// Runs one try of a probe's handler.
pub trait Prober: Send + Sync + 'static {
    fn probe(&self, probe: &Probe, timeout: Duration) -> impl Future<Output = ProbeOutcome> + Send;
}

/// Runs a command in a container for `exec` probes; the runtime implements it.
pub trait ExecRunner: Send + Sync + 'static {
    /// Runs `cmd` in the container; the exit code, or why it could not run.
    fn exec(
        &self,
        container_id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<i32, String>> + Send;

    /// Like [`ExecRunner::exec`], with the command's output (stdout then stderr), which upstream puts in the
    /// `Unhealthy` event of a failed exec probe. Runners that do not collect output return none.
    fn exec_output(
        &self,
        container_id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<(i32, String), String>> + Send {
        async move {
            self.exec(container_id, cmd, timeout)
                .await
                .map(|code| (code, String::new()))
        }
    }
}

/// An [`ExecRunner`] for when no runtime is connected: exec probes fail with that reason.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoExec;

impl ExecRunner for NoExec {
    async fn exec(&self, container_id: &str, _: &[String], _: Duration) -> Result<i32, String> {
        Err(format!("no runtime connected to exec in {container_id}"))
    }
}

/// The real prober: HTTP and TCP to the pod's IP, exec through the runtime.
#[derive(Debug, Clone)]
pub struct NetProber<E> {
    pub pod_ip: IpAddr,
    pub container_id: String,
    /// The container's ports, to resolve named probe ports.
    pub ports: Vec<ContainerPort>,
    pub exec: Arc<E>,
}

fn resolve_port(port: &IntOrString, ports: &[ContainerPort]) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("invalid port number: {n}")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("couldn't find port: {name}"))
        }
    }
}

impl<E: ExecRunner> Prober for NetProber<E> {
    async fn probe(&self, probe: &Probe, timeout: Duration) -> ProbeOutcome {
        if let Some(h) = &probe.http_get {
            let port = match resolve_port(&h.port, &self.ports) {
                Ok(p) => p,
                Err(e) => return ProbeOutcome::Failure(e),
            };
            let host = match h.host.as_deref().filter(|h| !h.is_empty()) {
                None => self.pod_ip,
                Some(h) => match h.parse::<IpAddr>() {
                    Ok(ip) => ip,
                    Err(_) => match tokio::net::lookup_host((h, port)).await {
                        Ok(mut addrs) => match addrs.next() {
                            Some(a) => a.ip(),
                            None => {
                                return ProbeOutcome::Failure(format!("no address for host {h}"))
                            }
                        },
                        Err(e) => return ProbeOutcome::Failure(format!("resolving {h}: {e}")),
                    },
                },
            };
            let scheme = match h.scheme.as_deref().unwrap_or("HTTP") {
                s if s.eq_ignore_ascii_case("HTTP") => Scheme::Http,
                s if s.eq_ignore_ascii_case("HTTPS") => Scheme::Https,
                other => return ProbeOutcome::Failure(format!("unsupported probe scheme {other}")),
            };
            let headers: Vec<(String, String)> = h
                .http_headers
                .iter()
                .flatten()
                .map(|hd| (hd.name.clone(), hd.value.clone()))
                .collect();
            let path = h.path.as_deref().unwrap_or("/");
            return http_get_with(scheme, SocketAddr::new(host, port), path, &headers, timeout)
                .await;
        }
        if let Some(t) = &probe.tcp_socket {
            let port = match resolve_port(&t.port, &self.ports) {
                Ok(p) => p,
                Err(e) => return ProbeOutcome::Failure(e),
            };
            let host = t
                .host
                .as_deref()
                .and_then(|h| h.parse::<IpAddr>().ok())
                .unwrap_or(self.pod_ip);
            return tcp_connect(SocketAddr::new(host, port), timeout).await;
        }
        if let Some(e) = &probe.exec {
            let cmd = e.command.clone().unwrap_or_default();
            return match tokio::time::timeout(
                timeout,
                self.exec.exec_output(&self.container_id, &cmd, timeout),
            )
            .await
            {
                Ok(Ok((0, _))) => ProbeOutcome::Success,
                // Upstream's message is the command's output; without any, say how it ended.
                Ok(Ok((code, output))) if output.trim().is_empty() => {
                    ProbeOutcome::Failure(format!("command {cmd:?} exited with {code}"))
                }
                Ok(Ok((_, output))) => ProbeOutcome::Failure(output.trim_end().to_string()),
                Ok(Err(e)) => ProbeOutcome::Failure(e),
                Err(_) => ProbeOutcome::Failure(format!("command {cmd:?} timed out")),
            };
        }
        if probe.grpc.is_some() {
            return ProbeOutcome::Failure("gRPC probes are not supported by this kubelet".into());
        }
        ProbeOutcome::Failure("probe has no handler".into())
    }
}

/// `tcpSocket`: a completed connect within `timeout` (upstream pkg/probe/tcp).
pub async fn tcp_connect(addr: SocketAddr, timeout: Duration) -> ProbeOutcome {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => ProbeOutcome::Success,
        Ok(Err(e)) => ProbeOutcome::Failure(format!("dial tcp {addr}: {e}")),
        Err(_) => ProbeOutcome::Failure(format!("dial tcp {addr}: i/o timeout")),
    }
}

/// `http` or `https` for an `httpGet` probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    /// TLS without certificate verification, as upstream's prober (`InsecureSkipVerify`).
    Https,
}

/// `httpGet` over plain HTTP/1.1; see [`http_get_with`].
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> ProbeOutcome {
    http_get_with(Scheme::Http, addr, path, headers, timeout).await
}

/// `httpGet`: success on 200–399 within `timeout` (upstream pkg/probe/http). A `Host` header in `headers`
/// replaces the default; the User-Agent is `kube-probe/<version>` as upstream's.
pub async fn http_get_with(
    scheme: Scheme,
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> ProbeOutcome {
    match http_status(scheme, addr, path, headers, timeout).await {
        Ok((status, _)) if (200..400).contains(&status) => ProbeOutcome::Success,
        Ok((status, body)) => ProbeOutcome::Failure(format!(
            "HTTP probe failed with statuscode: {status} {body}"
        )),
        Err(e) => ProbeOutcome::Failure(e),
    }
}

/// One GET within `timeout`: the status code and up to 10 KiB of body, or why there was no response.
pub async fn http_status(
    scheme: Scheme,
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<(u16, String), String> {
    let url = match scheme {
        Scheme::Http => format!("http://{addr}{path}"),
        Scheme::Https => format!("https://{addr}{path}"),
    };
    let run = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("Get \"{url}\": dial tcp {addr}: {e}"))?;
        match scheme {
            Scheme::Http => request(tcp, &url, addr, path, headers).await,
            Scheme::Https => {
                let connector = tokio_rustls::TlsConnector::from(insecure_tls_config()?);
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("Get \"{url}\": tls: {e}"))?;
                request(tls, &url, addr, path, headers).await
            }
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "Get \"{url}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
        )),
    }
}

async fn request<S>(
    stream: S,
    url: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> Result<(u16, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::get(path)
        .header(
            "User-Agent",
            concat!("kube-probe/windlass-", env!("CARGO_PKG_VERSION")),
        )
        .header("Accept", "*/*");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("Host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let status = resp.status().as_u16();
    // Upstream reads at most 10 KiB of the body for the event message.
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    conn.abort();
    let mut text = String::from_utf8_lossy(&body[..body.len().min(10 * 1024)]).into_owned();
    text.truncate(text.trim_end().len());
    Ok((status, text))
}

/// A TLS client that accepts any server certificate (signatures are still checked), like upstream's probes.
fn insecure_tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a container's probes currently say. `None` means "no such probe": the status code treats a running
/// container without a startup probe as started, and without a readiness probe as ready.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeStatus {
    pub started: Option<bool>,
    pub ready: Option<bool>,
    /// The liveness (or startup) probe failed its threshold: the kubelet must kill and restart the container.
    pub needs_restart: Option<String>,
}

/// The probe workers of one running container; dropping it stops them.
#[derive(Debug)]
pub struct ContainerProbes {
    status: watch::Receiver<ProbeStatus>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ContainerProbes {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl ContainerProbes {
    /// Starts the container's probes; `started_at` is when the container started (initial delays count from it).
    pub fn spawn<P: Prober>(container: &Container, prober: Arc<P>, started_at: Instant) -> Self {
        Self::spawn_with_events(container, prober, started_at, |_, _| {})
    }

    /// [`ContainerProbes::spawn`], calling `on_failure` with the probe and its output after every failed try (the
    /// kubelet's `Unhealthy` events: upstream records one per failure, not only when the threshold is reached).
    pub fn spawn_with_events<P: Prober>(
        container: &Container,
        prober: Arc<P>,
        started_at: Instant,
        on_failure: impl Fn(ProbeKind, &str) + Send + Sync + 'static,
    ) -> Self {
        let on_failure: Arc<FailureHook> = Arc::new(on_failure);
        let initial = ProbeStatus {
            started: container.startup_probe.as_ref().map(|_| false),
            ready: container.readiness_probe.as_ref().map(|_| false),
            needs_restart: None,
        };
        let (tx, rx) = watch::channel(initial);
        let tx = Arc::new(tx);
        let mut tasks = Vec::new();
        let probes = [
            (ProbeKind::Startup, container.startup_probe.clone()),
            (ProbeKind::Liveness, container.liveness_probe.clone()),
            (ProbeKind::Readiness, container.readiness_probe.clone()),
        ];
        for (kind, probe) in probes {
            let Some(probe) = probe else { continue };
            let (tx, prober, gate) = (tx.clone(), prober.clone(), rx.clone());
            let on_failure = on_failure.clone();
            tasks.push(tokio::spawn(async move {
                run_worker(kind, probe, prober, started_at, gate, tx, on_failure).await;
            }));
        }
        Self { status: rx, tasks }
    }

    /// The current status.
    pub fn status(&self) -> ProbeStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every change (the pod worker waits on it to resync promptly).
    pub fn watch(&self) -> watch::Receiver<ProbeStatus> {
        self.status.clone()
    }
}

/// Called with the probe and its output after each failed try.
type FailureHook = dyn Fn(ProbeKind, &str) + Send + Sync;

async fn run_worker<P: Prober>(
    kind: ProbeKind,
    probe: Probe,
    prober: Arc<P>,
    started_at: Instant,
    mut gate: watch::Receiver<ProbeStatus>,
    tx: Arc<watch::Sender<ProbeStatus>>,
    on_failure: Arc<FailureHook>,
) {
    let th = Thresholds::of(kind, &probe);
    let mut state = ProbeState::new(kind, th);
    tokio::time::sleep_until(started_at + th.initial_delay).await;
    let mut tick = tokio::time::interval(th.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Liveness and readiness wait for the startup probe (upstream: not probed until started).
        let gated = kind != ProbeKind::Startup && gate.borrow().started == Some(false);
        if gated {
            if gate.wait_for(|s| s.started != Some(false)).await.is_err() {
                return;
            }
            tick.reset();
            continue;
        }
        let outcome = prober.probe(&probe, th.timeout).await;
        let (success, message) = match &outcome {
            ProbeOutcome::Success => (true, String::new()),
            ProbeOutcome::Failure(m) => (false, m.clone()),
        };
        if !success {
            tracing::debug!(?kind, %message, "probe failed");
            on_failure(kind, &message);
        }
        if let Some(result) = state.record(success) {
            tx.send_modify(|s| match kind {
                ProbeKind::Startup if result => s.started = Some(true),
                ProbeKind::Readiness => s.ready = Some(result),
                ProbeKind::Startup | ProbeKind::Liveness if !result => {
                    let what = if kind == ProbeKind::Startup {
                        "Startup"
                    } else {
                        "Liveness"
                    };
                    s.needs_restart = Some(format!("{what} probe failed: {message}"));
                }
                _ => {}
            });
        }
        if state.done() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ExecAction, HTTPGetAction, HTTPHeader, TCPSocketAction};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    fn th(success: u32, failure: u32) -> Thresholds {
        Thresholds {
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    #[test]
    fn results_flip_only_after_consecutive_thresholds() {
        let mut r = ProbeState::new(ProbeKind::Readiness, th(2, 3));
        assert_eq!(r.result(), Some(false), "readiness starts failed");
        assert_eq!(r.record(true), None);
        assert_eq!(r.record(true), Some(true));
        assert_eq!(r.record(false), None);
        assert_eq!(r.record(true), None, "a success resets the failure run");
        assert_eq!(r.record(false), None);
        assert_eq!(r.record(false), None);
        assert_eq!(r.record(false), Some(false));
        assert!(!r.done(), "readiness keeps probing after failing");
        let mut l = ProbeState::new(ProbeKind::Liveness, th(1, 2));
        assert_eq!(l.result(), Some(true), "liveness starts passed");
        assert_eq!(l.record(false), None);
        assert_eq!(l.record(false), Some(false));
        assert!(
            l.done(),
            "liveness failure holds until the container is replaced"
        );
        let mut s = ProbeState::new(ProbeKind::Startup, th(1, 3));
        assert_eq!(s.result(), None);
        assert_eq!(s.record(true), Some(true));
        assert!(s.done(), "startup stops once it succeeded");
    }

    #[test]
    fn thresholds_default_like_upstream() {
        let t = Thresholds::of(
            ProbeKind::Liveness,
            &Probe {
                success_threshold: Some(5),
                ..Default::default()
            },
        );
        assert_eq!(
            t,
            Thresholds {
                initial_delay: Duration::ZERO,
                period: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                success_threshold: 1,
                failure_threshold: 3,
            }
        );
    }

    /// Answers from a script: outcome per call, recording when each call happened.
    struct Scripted {
        outcomes: Mutex<Vec<bool>>,
        calls: Mutex<Vec<Duration>>,
        start: Instant,
        count: AtomicU32,
    }

    impl Scripted {
        fn new(outcomes: Vec<bool>) -> Arc<Self> {
            Arc::new(Self {
                outcomes: Mutex::new(outcomes),
                calls: Mutex::new(Vec::new()),
                start: Instant::now(),
                count: AtomicU32::new(0),
            })
        }
        fn calls(&self) -> Vec<u64> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .map(|d| d.as_secs())
                .collect()
        }
    }

    impl Prober for Scripted {
        async fn probe(&self, probe: &Probe, _: Duration) -> ProbeOutcome {
            self.count.fetch_add(1, Ordering::Relaxed);
            let name = probe
                .exec
                .as_ref()
                .and_then(|e| e.command.clone())
                .unwrap_or_default()
                .join(" ");
            self.calls.lock().unwrap().push(self.start.elapsed());
            let mut o = self.outcomes.lock().unwrap();
            let ok = if o.is_empty() { true } else { o.remove(0) };
            if ok {
                ProbeOutcome::Success
            } else {
                ProbeOutcome::Failure(format!("{name} failed"))
            }
        }
    }

    fn probe(initial: i32, period: i32, failure: i32) -> Probe {
        Probe {
            exec: Some(ExecAction {
                command: Some(vec!["check".into()]),
            }),
            initial_delay_seconds: Some(initial),
            period_seconds: Some(period),
            failure_threshold: Some(failure),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_waits_its_initial_delay_then_asks_for_a_restart_after_failure_threshold() {
        let prober = Scripted::new(vec![true, false, false, false]);
        let c = Container {
            liveness_probe: Some(probe(15, 10, 3)),
            ..Default::default()
        };
        let probes = ContainerProbes::spawn(&c, prober.clone(), Instant::now());
        let mut w = probes.watch();
        let s = w
            .wait_for(|s| s.needs_restart.is_some())
            .await
            .unwrap()
            .clone();
        assert_eq!(prober.calls(), vec![15, 25, 35, 45]);
        assert_eq!(
            s.needs_restart.as_deref(),
            Some("Liveness probe failed: check failed")
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            prober.count.load(Ordering::Relaxed),
            4,
            "on hold after the failure"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_is_gated_by_the_startup_probe_and_follows_its_thresholds() {
        let prober = Scripted::new(vec![false, false, true]);
        let mut readiness = probe(0, 5, 1);
        readiness.exec = Some(ExecAction {
            command: Some(vec!["ready".into()]),
        });
        let c = Container {
            startup_probe: Some(probe(0, 2, 30)),
            readiness_probe: Some(readiness),
            ..Default::default()
        };
        let probes = ContainerProbes::spawn(&c, prober.clone(), Instant::now());
        assert_eq!(
            probes.status(),
            ProbeStatus {
                started: Some(false),
                ready: Some(false),
                needs_restart: None
            }
        );
        let mut w = probes.watch();
        w.wait_for(|s| s.started == Some(true)).await.unwrap();
        // startup: t=0 fail, t=2 fail, t=4 success; readiness did not run before that.
        assert_eq!(prober.calls(), vec![0, 2, 4]);
        w.wait_for(|s| s.ready == Some(true)).await.unwrap();
        let calls = prober.calls();
        assert_eq!(calls.len(), 4);
        assert!(
            calls[3] >= 4,
            "readiness ran only after startup succeeded: {calls:?}"
        );
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(prober.calls().len() >= 7, "readiness keeps probing");
        assert!(probes.status().needs_restart.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_startup_probe_that_never_succeeds_asks_for_a_restart() {
        let prober = Scripted::new(vec![false; 10]);
        let c = Container {
            startup_probe: Some(probe(0, 1, 3)),
            liveness_probe: Some(probe(0, 1, 1)),
            ..Default::default()
        };
        let probes = ContainerProbes::spawn(&c, prober.clone(), Instant::now());
        let mut w = probes.watch();
        let s = w
            .wait_for(|s| s.needs_restart.is_some())
            .await
            .unwrap()
            .clone();
        assert!(s.needs_restart.unwrap().starts_with("Startup probe failed"));
        assert_eq!(prober.calls(), vec![0, 1, 2], "liveness never ran");
    }

    async fn http_server(
        status: u16,
    ) -> (
        SocketAddr,
        Arc<Mutex<Vec<String>>>,
        tokio::task::JoinHandle<()>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                seen2
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let body = "nope";
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        (addr, seen, task)
    }

    fn net(ip: IpAddr, ports: Vec<ContainerPort>) -> NetProber<NoExec> {
        NetProber {
            pod_ip: ip,
            container_id: "c1".into(),
            ports,
            exec: Arc::new(NoExec),
        }
    }

    #[tokio::test]
    async fn http_get_succeeds_on_2xx_3xx_and_sends_path_and_headers() {
        let (addr, seen, task) = http_server(204).await;
        let p = Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz?x=1".into()),
                port: IntOrString::String("web".into()),
                http_headers: Some(vec![HTTPHeader {
                    name: "X-Check".into(),
                    value: "yes".into(),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ports = vec![ContainerPort {
            name: Some("web".into()),
            container_port: addr.port() as i32,
            ..Default::default()
        }];
        let out = net(addr.ip(), ports)
            .probe(&p, Duration::from_secs(2))
            .await;
        assert_eq!(out, ProbeOutcome::Success);
        let req = seen.lock().unwrap()[0].clone();
        assert!(req.starts_with("GET /healthz?x=1 HTTP/1.1\r\n"), "{req}");
        assert!(req.to_lowercase().contains("x-check: yes"), "{req}");
        assert!(
            req.to_lowercase().contains("user-agent: kube-probe/"),
            "{req}"
        );
        task.abort();

        let (addr, _, task) = http_server(302).await;
        assert_eq!(
            http_get(addr, "/", &[], Duration::from_secs(2)).await,
            ProbeOutcome::Success
        );
        task.abort();
    }

    #[tokio::test]
    async fn http_get_fails_on_4xx_5xx_refused_and_timeout() {
        let (addr, _, task) = http_server(503).await;
        let out = http_get(addr, "/", &[], Duration::from_secs(2)).await;
        assert_eq!(
            out,
            ProbeOutcome::Failure("HTTP probe failed with statuscode: 503 nope".into())
        );
        task.abort();
        // A listener that never answers: the timeout fires.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let started = std::time::Instant::now();
        let out = http_get(addr, "/", &[], Duration::from_millis(300)).await;
        assert!(
            matches!(out, ProbeOutcome::Failure(ref m) if m.contains("deadline")),
            "{out:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(silent);
        let out = http_get(addr, "/", &[], Duration::from_secs(1)).await;
        assert!(
            matches!(out, ProbeOutcome::Failure(ref m) if m.contains("dial tcp")),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn https_probes_accept_a_self_signed_certificate() {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("k.pem"), dir.path().join("c.pem"));
        let ok = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
            ])
            .args(["-subj", "/CN=pod"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let certs = vec![CertificateDer::from_pem_file(&cert).unwrap()];
        let key = PrivateKeyDer::from_pem_file(&key).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    continue;
                };
                let mut buf = vec![0u8; 4096];
                let n = tls.read(&mut buf).await.unwrap_or(0);
                let code = if String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ") {
                    200
                } else {
                    500
                };
                let resp =
                    format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        let t = Duration::from_secs(5);
        assert_eq!(
            http_get_with(Scheme::Https, addr, "/ok", &[], t).await,
            ProbeOutcome::Success
        );
        assert!(matches!(
            http_get_with(Scheme::Https, addr, "/bad", &[], t).await,
            ProbeOutcome::Failure(ref m) if m.contains("statuscode: 500")
        ));
        // Plain HTTP to a TLS port fails rather than hangs.
        assert!(matches!(
            http_get(addr, "/ok", &[], t).await,
            ProbeOutcome::Failure(_)
        ));
        task.abort();
    }

    #[tokio::test]
    async fn tcp_socket_succeeds_on_connect_and_names_a_missing_port() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let p = |port: IntOrString| Probe {
            tcp_socket: Some(TCPSocketAction { port, host: None }),
            ..Default::default()
        };
        let n = net("127.0.0.1".parse().unwrap(), vec![]);
        assert_eq!(
            n.probe(&p(IntOrString::Int(port as i32)), Duration::from_secs(1))
                .await,
            ProbeOutcome::Success
        );
        drop(l);
        assert!(matches!(
            n.probe(&p(IntOrString::Int(port as i32)), Duration::from_secs(1))
                .await,
            ProbeOutcome::Failure(_)
        ));
        assert_eq!(
            n.probe(
                &p(IntOrString::String("metrics".into())),
                Duration::from_secs(1)
            )
            .await,
            ProbeOutcome::Failure("couldn't find port: metrics".into())
        );
    }

    struct FakeExec;
    impl ExecRunner for FakeExec {
        async fn exec(&self, id: &str, cmd: &[String], _: Duration) -> Result<i32, String> {
            assert_eq!(id, "c1");
            Ok(if cmd == ["true"] { 0 } else { 1 })
        }
    }

    #[tokio::test]
    async fn exec_probes_go_through_the_runtime_and_succeed_on_exit_zero() {
        let n = NetProber {
            pod_ip: "127.0.0.1".parse().unwrap(),
            container_id: "c1".into(),
            ports: vec![],
            exec: Arc::new(FakeExec),
        };
        let p = |c: &str| Probe {
            exec: Some(ExecAction {
                command: Some(vec![c.into()]),
            }),
            ..Default::default()
        };
        assert_eq!(
            n.probe(&p("true"), Duration::from_secs(1)).await,
            ProbeOutcome::Success
        );
        assert_eq!(
            n.probe(&p("false"), Duration::from_secs(1)).await,
            ProbeOutcome::Failure("command [\"false\"] exited with 1".into())
        );
    }
}
