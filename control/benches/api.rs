//! API benchmark (issue 4): pod creates/s and list latency at 10k pods through `windlass-control serve` on the
//! embedded store and on etcd, next to raw etcd-client puts of the same stored JSON in the same run (to a plain
//! member, and to one serving TLS with client certificates as kube-apiserver's etcd does); watch fan-out
//! to 1,000 watchers next to 1,000 etcd watchers; and the server's RSS once it holds 10k pods.
//!
//! Clients: the `kube` crate (what our daemons and most controllers use), `BENCH_CONCURRENCY` concurrent creates
//! (default 64). Rounds interleave the targets so background load hits all alike; median and min–max over rounds.
//! After each round the bench waits until the target's processes are idle (`settle`), so work one defers (a
//! checkpoint, a backend commit) does not run during the next target's round.
//!
//! Run: `cargo bench -p windlass-control --bench api` (needs `etcd`; env `BENCH_PODS` (per round, default 2000),
//! `BENCH_ROUNDS` (5), `BENCH_CONCURRENCY` (64), `BENCH_WATCHERS` (1000), `BENCH_WATCH_EVENTS` (10),
//! `BENCH_H2_CONNECTIONS` (the thin HTTP/2 client's connections, default 4; etcd-client uses one),
//! `BENCH_CONTROLLERS` (the servers' `--controllers`; default `-scheduler`, which selects none: the API server
//! alone, as the benchmark asks; `*` runs the scheduler and every controller too — with no nodes the
//! scheduler then writes a FailedScheduling event per pod)).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::{Client, Config};
use windlass_tests::bench::{
    cpu_seconds, env_usize, machine_idle_seconds, rss_mib, settle, Spread,
};
use windlass_tests::{free_port, wait_for, ChildGuard};

/// A realistic pod as a user submits it (the server adds defaults, uid, timestamps).
fn pod(name: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "bench", "tier": "web"},
                     "annotations": {"bench.windlass.io/note": "a realistic annotation of some length"}},
        "spec": {"containers": [{
            "name": "web", "image": "registry.example:5000/web:1.2.3",
            "args": ["--port=8080", "--verbose"],
            "ports": [{"name": "http", "containerPort": 8080}],
            "env": [{"name": "MODE", "value": "production"}],
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}
        }]},
    }))
    .expect("pod")
}

struct Server {
    dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
    port: u16,
    process: ChildGuard,
}

impl Server {
    fn start(extra: &[String]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
        let process = ChildGuard::spawn(
            Command::new(env!("CARGO_BIN_EXE_windlass-control"))
                .args(["serve", "--bind-address", "127.0.0.1", "--secure-port"])
                .arg(port.to_string())
                .arg("--data-dir")
                .arg(dir.path())
                .arg(format!(
                    "--controllers={}",
                    std::env::var("BENCH_CONTROLLERS").unwrap_or_else(|_| "-scheduler".into())
                ))
                .args(extra)
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("start windlass-control");
        let kubeconfig = dir.path().join("admin.kubeconfig");
        wait_for("the API server to listen", Duration::from_secs(30), || {
            (kubeconfig.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
                .then_some(())
        });
        Self {
            dir,
            kubeconfig,
            port,
            process,
        }
    }

    async fn client(&self) -> Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kube config");
        Client::try_from(config).expect("kube client")
    }

    /// A thin HTTP/2 client (`conns` connections, TLS with the admin certificate): what client-go speaks, without
    /// kube-rs's typed encoding, so it sends pre-encoded bytes as the etcd-client peer does.
    async fn raw_client(&self, conns: usize) -> RawApi {
        use rustls_pki_types::pem::PemObject;
        let pki = self.dir.path().join("pki");
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(pki.join("ca.crt")).expect("ca") {
            roots.add(c.expect("ca pem")).expect("ca cert");
        }
        let cert: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(pki.join("admin.crt"))
            .expect("admin cert")
            .map(|c| c.expect("admin cert pem"))
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(pki.join("admin.key"))
            .expect("admin key");
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(cert, key)
            .expect("client config");
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let mut senders = Vec::new();
        for _ in 0..conns {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .expect("connect");
            tcp.set_nodelay(true).expect("nodelay");
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            let tls = connector.connect(name, tcp).await.expect("tls");
            let (sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tls),
            )
            .await
            .expect("h2 handshake");
            tokio::spawn(conn);
            senders.push(sender);
        }
        RawApi {
            senders,
            authority: format!("https://localhost:{}", self.port),
        }
    }

    /// Resident set size (and its peak) in MiB.
    fn rss_mib(&self) -> (f64, f64) {
        rss_mib(self.process.id())
    }
}

/// Creates pods `first..first + n` in `ns` with `concurrency` tasks; returns creates/s.
async fn create_pods(client: &Client, ns: &str, first: usize, n: usize, concurrency: usize) -> f64 {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    futures_util::stream::iter(first..first + n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &pod(&format!("pod-{i:06}")))
                    .await
                    .expect("create pod")
            }
        })
        .buffer_unordered(concurrency)
        .for_each(|_| async {})
        .await;
    n as f64 / start.elapsed().as_secs_f64()
}

/// HTTP/2 connections to one API server.
struct RawApi {
    senders: Vec<hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>>,
    authority: String,
}

/// Creates pods `first..first + n` in `ns` by POSTing their JSON (encoded before the clock starts, as the etcd
/// peer's value is) over `api`'s connections, `concurrency` at a time; every answer must be 201 and is read whole.
/// Returns creates/s.
async fn raw_api_creates(
    api: &RawApi,
    ns: &str,
    first: usize,
    n: usize,
    concurrency: usize,
) -> f64 {
    use http_body_util::BodyExt;
    let uri = format!("{}/api/v1/namespaces/{ns}/pods", api.authority);
    let bodies: Vec<bytes::Bytes> = (first..first + n)
        .map(|i| {
            serde_json::to_vec(&pod(&format!("pod-{i:06}")))
                .expect("json")
                .into()
        })
        .collect();
    let start = Instant::now();
    futures_util::stream::iter(bodies.into_iter().enumerate())
        .map(|(i, body)| {
            let mut sender = api.senders[i % api.senders.len()].clone();
            let req = http::Request::post(&uri)
                .header("content-type", "application/json")
                .header("accept", "application/json")
                .body(http_body_util::Full::new(body))
                .expect("request");
            async move {
                let resp = sender.send_request(req).await.expect("create pod");
                let status = resp.status();
                let body = resp.into_body().collect().await.expect("answer").to_bytes();
                assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
            }
        })
        .buffer_unordered(concurrency)
        .for_each(|_| async {})
        .await;
    n as f64 / start.elapsed().as_secs_f64()
}

/// Puts `n` copies of `value` under fresh keys straight into etcd; returns puts/s.
async fn raw_puts(
    client: &etcd_client::Client,
    round: &str,
    value: &[u8],
    n: usize,
    conc: usize,
) -> f64 {
    let start = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let mut kv = client.kv_client();
            let key = format!("/raw/pods/{round}/pod-{i:06}");
            let value = value.to_vec();
            async move { kv.put(key, value, None).await.expect("etcd put") }
        })
        .buffer_unordered(conc)
        .for_each(|_| async {})
        .await;
    n as f64 / start.elapsed().as_secs_f64()
}

async fn create_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("namespace");
    api.create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    // Pods are admitted only with their service account; with no controllers running, make the `default` one the
    // serviceaccount controller would.
    let sa: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}})).expect("sa");
    Api::<ServiceAccount>::namespaced(client.clone(), name)
        .create(&PostParams::default(), &sa)
        .await
        .map(|_| ())
        .or_else(|e| match e {
            kube::Error::Api(s) if s.code == 409 => Ok(()),
            e => Err(e),
        })
        .expect("create the default ServiceAccount");
}

/// Milliseconds for a full list of all pods in `ns`, in one response or in `limit`-sized pages (kubectl's 500).
async fn list_ms(client: &Client, ns: &str, limit: Option<u32>) -> (f64, usize) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    let mut total = 0;
    let mut lp = ListParams::default();
    if let Some(l) = limit {
        lp = lp.limit(l);
    }
    loop {
        let page = api.list(&lp).await.expect("list pods");
        total += page.items.len();
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    (start.elapsed().as_secs_f64() * 1000.0, total)
}

/// Starts `watchers` watches of pods in `ns` (spread over several clients), then creates `events` pods one at a
/// time and measures, per pod, the time until every watcher saw its ADDED event. Returns milliseconds per event.
async fn api_fanout(server: &Server, ns: &str, watchers: usize, events: usize) -> Vec<f64> {
    let clients: Vec<Client> = {
        let mut v = Vec::new();
        for _ in 0..watchers.div_ceil(100) {
            v.push(server.client().await);
        }
        v
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let api0: Api<Pod> = Api::namespaced(clients[0].clone(), ns);
    let rv = api0
        .list(&ListParams::default().limit(1))
        .await
        .expect("list")
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut tasks = Vec::new();
    for w in 0..watchers {
        let api: Api<Pod> = Api::namespaced(clients[w % clients.len()].clone(), ns);
        let (tx, rv) = (tx.clone(), rv.clone());
        tasks.push(tokio::spawn(async move {
            let mut stream = api
                .watch(&WatchParams::default().timeout(290), &rv)
                .await
                .expect("watch")
                .boxed();
            while let Ok(Some(ev)) = stream.try_next().await {
                if let WatchEvent::Added(p) = ev {
                    let _ = tx.send((p.metadata.name.unwrap_or_default(), Instant::now()));
                }
            }
        }));
    }
    // Let every watch get established before the first event (a watch from `rv` would replay it anyway).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut out = Vec::new();
    for e in 0..events {
        let name = format!("fan-{e}");
        let start = Instant::now();
        api0.create(&PostParams::default(), &pod(&name))
            .await
            .expect("create");
        let mut seen = 0;
        let mut last = start;
        while seen < watchers {
            let (n, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .expect("watch event within 60 s")
                .expect("watchers alive");
            if n == name {
                seen += 1;
                last = at;
            }
        }
        out.push((last - start).as_secs_f64() * 1000.0);
    }
    for t in tasks {
        t.abort();
    }
    out
}

/// The same fan-out straight on etcd: `watchers` etcd watches of one prefix, one put at a time.
async fn etcd_fanout(client: &etcd_client::Client, watchers: usize, events: usize) -> Vec<f64> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let mut wc = client.watch_client();
        let tx = tx.clone();
        let mut stream = wc
            .watch(
                "/fanout/",
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
            .expect("etcd watch");
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(resp)) = stream.message().await {
                for ev in resp.events() {
                    if let Some(kv) = ev.kv() {
                        let _ =
                            tx.send((kv.key_str().unwrap_or_default().to_string(), Instant::now()));
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let value = serde_json::to_vec(&pod("x")).expect("json");
    let mut kv = client.kv_client();
    let mut out = Vec::new();
    for e in 0..events {
        let key = format!("/fanout/fan-{e}");
        let start = Instant::now();
        kv.put(key.clone(), value.clone(), None).await.expect("put");
        let mut seen = 0;
        let mut last = start;
        while seen < watchers {
            let (k, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .expect("etcd watch event within 60 s")
                .expect("watchers alive");
            if k == key {
                seen += 1;
                last = at;
            }
        }
        out.push((last - start).as_secs_f64() * 1000.0);
    }
    for t in tasks {
        t.abort();
    }
    out
}

/// Lets this process (and the servers it starts) hold one socket per watcher.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass; failure leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n = env_usize("BENCH_PODS", 2000);
    let rounds = env_usize("BENCH_ROUNDS", 5);
    let conc = env_usize("BENCH_CONCURRENCY", 64);
    let watchers = env_usize("BENCH_WATCHERS", 1000);
    let events = env_usize("BENCH_WATCH_EVENTS", 10);
    if windlass_tests::which("etcd").is_none() {
        eprintln!("the API benchmark needs etcd (Debian: etcd-server)");
        std::process::exit(2);
    }
    windlass_tests::install_rustls_provider();
    raise_fd_limit();

    let cluster = windlass_tests::etcd::EtcdCluster::start(1).await;
    let endpoint = cluster.members[0].client_url.clone();
    let raw = etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .expect("etcd-client");
    // The same member as kube-apiserver deployments run it: clients over TLS with client certificates.
    let tls_cluster = windlass_tests::etcd::EtcdCluster::start_tls(1).await;
    let raw_tls = {
        let certs = tls_cluster.tls.as_ref().expect("TLS member");
        let read = |p: &std::path::Path| std::fs::read(p).expect("read etcd certificate");
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&certs.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&certs.client_cert),
                read(&certs.client_key),
            ));
        etcd_client::Client::connect(
            [tls_cluster.members[0].client_url.as_str()],
            Some(etcd_client::ConnectOptions::new().with_tls(tls)),
        )
        .await
        .expect("etcd-client over TLS")
    };
    let embedded = Server::start(&[]);
    let on_etcd = Server::start(&["--etcd-servers".into(), endpoint.clone()]);
    // A second embedded server for the thin HTTP/2 client, so each server holds the same pods.
    let embedded_h2 = Server::start(&[]);
    let (ce, cx) = (embedded.client().await, on_etcd.client().await);
    let h2 = embedded_h2
        .raw_client(env_usize("BENCH_H2_CONNECTIONS", 4))
        .await;
    create_namespace(&embedded_h2.client().await, "bench").await;
    for c in [&ce, &cx] {
        create_namespace(c, "bench").await;
        create_namespace(c, "fanout").await;
    }
    // The stored form of one pod, as the raw puts' value (what the API server writes for it).
    let stored = {
        let api: Api<Pod> = Api::namespaced(ce.clone(), "fanout");
        let p = api
            .create(&PostParams::default(), &pod("sample"))
            .await
            .expect("sample");
        api.delete("sample", &Default::default())
            .await
            .expect("delete sample");
        serde_json::to_vec(&p).expect("json")
    };
    eprintln!(
        "{n} pods x {rounds} rounds per target, concurrency {conc}; stored pod JSON {} bytes",
        stored.len()
    );

    let names = [
        "API, embedded store (kube client)",
        "API, etcd backend (kube client)",
        "API, embedded store (HTTP/2 client, same JSON bytes)",
        "raw etcd-client put (same JSON)",
        "raw etcd-client put over TLS with a client certificate (same JSON)",
    ];
    const RAW: usize = 3;
    const RAW_TLS: usize = 4;
    let mut creates: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    // Where the CPU goes per write, summed over rounds, for each target: the client (this process), the target's
    // API server, etcd, and the machine's idle time.
    let etcd_pid = cluster.members[0].pid().expect("etcd runs");
    let etcd_tls_pid = tls_cluster.members[0].pid().expect("etcd runs");
    let servers = [
        Some(embedded.process.id()),
        Some(on_etcd.process.id()),
        Some(embedded_h2.process.id()),
        None,
        None,
    ];
    // Each target's etcd: the TLS row has its own member.
    let etcds = [etcd_pid, etcd_pid, etcd_pid, etcd_pid, etcd_tls_pid];
    let sample = |server: Option<u32>, etcd: u32| {
        [
            cpu_seconds(std::process::id()),
            server.map_or(0.0, cpu_seconds),
            cpu_seconds(etcd),
            machine_idle_seconds(),
        ]
    };
    let mut cpu = vec![[0.0; 4]; names.len()];
    // The server's and etcd's CPU after each round, while the bench waits for them to settle.
    let mut deferred = vec![[0.0; 2]; names.len()];
    for round in 0..rounds {
        // Each round adds to the same namespace, so the last round runs with (rounds-1)*n pods already stored.
        let offset = round * n;
        for target in 0..names.len() {
            let before = sample(servers[target], etcds[target]);
            let rate = match target {
                0 => create_pods(&ce, "bench", offset, n, conc).await,
                1 => create_pods(&cx, "bench", offset, n, conc).await,
                2 => raw_api_creates(&h2, "bench", offset, n, conc).await,
                RAW => raw_puts(&raw, &round.to_string(), &stored, n, conc).await,
                _ => raw_puts(&raw_tls, &round.to_string(), &stored, n, conc).await,
            };
            creates[target].push(rate);
            let at_end = sample(servers[target], etcds[target]);
            for (i, end) in at_end.iter().enumerate() {
                cpu[target][i] += end - before[i];
            }
            // Work a target defers past its round (the embedded store's checkpoint of the round's writes, etcd's
            // backend commit) runs now, not in the next target's round; reported apart.
            settle(servers[target].into_iter().chain([etcds[target]])).await;
            let after = sample(servers[target], etcds[target]);
            for i in 0..2 {
                deferred[target][i] += after[i + 1] - at_end[i + 1];
            }
        }
        eprintln!(
            "round {round}: {} writes/s",
            creates
                .iter()
                .map(|c| format!("{:.0}", c[round]))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    let total = rounds * n;
    // Steady state with every pod stored, before any list.
    let rss_stored = [embedded.rss_mib(), on_etcd.rss_mib()];

    // List latency with `total` pods stored.
    let mut lists: Vec<(String, Vec<f64>)> = Vec::new();
    for (label, client) in [("embedded store", &ce), ("etcd backend", &cx)] {
        for (how, limit) in [
            ("one response", None),
            ("pages of 500 (kubectl)", Some(500)),
        ] {
            let mut v = Vec::new();
            for _ in 0..rounds {
                let (ms, got) = list_ms(client, "bench", limit).await;
                assert_eq!(got, total, "list returned every pod");
                v.push(ms);
            }
            lists.push((format!("{label}, {how}"), v));
        }
    }
    let rss = [embedded.rss_mib(), on_etcd.rss_mib()];

    let fan_api = api_fanout(&embedded, "fanout", watchers, events).await;
    let fan_etcd = etcd_fanout(&raw, watchers, events).await;

    // Report (Markdown, pasted into BENCHMARKS.md).
    let raw_median = Spread::of(creates[RAW].clone()).median;
    let raw_tls_median = Spread::of(creates[RAW_TLS].clone()).median;
    println!("### Pod creates ({n} per round, {rounds} rounds, {conc} concurrent clients; up to {total} pods stored)\n");
    println!("| target | median creates/s | min–max | vs raw etcd-client put | vs raw put over TLS |\n|---|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        let s = Spread::of(creates[i].clone());
        println!(
            "| {name} | {:.0} | {:.0}–{:.0} | {:.2}× | {:.2}× |",
            s.median,
            s.min,
            s.max,
            s.median / raw_median,
            s.median / raw_tls_median
        );
    }
    println!("\nCPU per write (µs, all rounds; user + system of each process and the machine's idle time on its {} \
        CPUs during the rounds; then windlass-control's and etcd's CPU while the bench waited ≥ 1.5 s after each \
        round for them to settle: deferred work such as checkpoints, plus their idle timers):\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()));
    println!("| target | client (bench process) | windlass-control | etcd | machine idle | windlass-control after | etcd after |\n|---|---|---|---|---|---|---|");
    let writes = total as f64;
    for ((name, c), d) in names.iter().zip(&cpu).zip(&deferred) {
        let us = |s: f64| s * 1e6 / writes;
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            us(c[0]),
            us(c[1]),
            us(c[2]),
            us(c[3]),
            us(d[0]),
            us(d[1])
        );
    }
    println!("\n### Listing {total} pods ({rounds} lists each)\n");
    println!("| store, list form | median (ms) | min–max (ms) |\n|---|---|---|");
    for (label, v) in &lists {
        let s = Spread::of(v.clone());
        println!("| {label} | {:.0} | {:.0}–{:.0} |", s.median, s.min, s.max);
    }
    println!("\n### Memory with {total} pods stored\n");
    println!(
        "| server | RSS after the creates (MiB) | RSS after the lists (MiB) | peak RSS (MiB) |\n|---|---|---|---|"
    );
    for (i, label) in ["embedded store", "etcd backend"].iter().enumerate() {
        println!(
            "| windlass-control, {label} | {:.0} | {:.0} | {:.0} |",
            rss_stored[i].0, rss[i].0, rss[i].1
        );
    }
    println!("\n### Watch fan-out: one pod create seen by {watchers} watchers ({events} events)\n");
    println!("| target | median (ms) | min–max (ms) | vs etcd |\n|---|---|---|---|");
    let (a, e) = (Spread::of(fan_api), Spread::of(fan_etcd));
    println!(
        "| API watch, embedded store ({watchers} kube-rs watches) | {:.1} | {:.1}–{:.1} | {:.2}× |",
        a.median,
        a.min,
        a.max,
        a.median / e.median
    );
    println!(
        "| etcd watch ({watchers} etcd-client watches) | {:.1} | {:.1}–{:.1} | 1.00× |",
        e.median, e.min, e.max
    );
}
