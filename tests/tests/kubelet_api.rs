//! Privileged tests of the kubelet API (`windlass_kubelet::server`): a pod sandbox run with the runtime's
//! `SandboxManager` under the names `layout` gives, the server started in-process against a real API server
//! (`windlass-control`, which answers its SubjectAccessReviews), and real clients: an HTTPS client with the cluster's
//! certificates, a WebSocket client speaking the channel protocol, and `kubectl` through the API server's proxy.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use windlass_kubelet::layout;
use windlass_kubelet::server::{KubeletServer, SarAuthorizer, ServerConfig};
use windlass_runtime::{ContainerConfig, SandboxConfig, SandboxManager, Status};
use windlass_tests::bundle::Bundle;
use windlass_tests::control::ControlPlane;
use windlass_tests::runtime::unique_cgroup;
use windlass_tests::{require_privileged, unique_name, wait_for, workspace_binary};

const NS: &str = "default";

/// A client identity: PEM certificate and key.
#[derive(Clone)]
struct Identity {
    cert: String,
    key: String,
}

impl Identity {
    fn from_files(cert: &Path, key: &Path) -> Self {
        Self {
            cert: std::fs::read_to_string(cert).expect("read cert"),
            key: std::fs::read_to_string(key).expect("read key"),
        }
    }

    /// The client certificate and key embedded in a kubeconfig written by `windlass-control issue-kubeconfig`.
    fn from_kubeconfig(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).expect("read kubeconfig");
        let field = |name: &str| {
            let line = text
                .lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .unwrap_or_else(|| panic!("{name} in {}", path.display()));
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(line.trim())
                    .expect("base64"),
            )
            .expect("PEM text")
        };
        Self {
            cert: field("client-certificate-data:"),
            key: field("client-key-data:"),
        }
    }
}

/// Issues a kubeconfig for `user` in `groups` from the control plane's CA.
fn issue_kubeconfig(cp: &ControlPlane, user: &str, groups: &[&str]) -> PathBuf {
    let out = cp
        .data_dir()
        .join(format!("{}.kubeconfig", user.replace(':', "_")));
    let mut cmd = Command::new(workspace_binary("windlass-control"));
    cmd.args(["issue-kubeconfig", "--data-dir"])
        .arg(cp.data_dir())
        .args(["--user", user, "--server", &cp.url(), "--out"])
        .arg(&out);
    for g in groups {
        cmd.args(["--group", g]);
    }
    windlass_tests::run_ok(&mut cmd);
    out
}

/// kubectl with `kubeconfig` instead of the admin's, `stdin` (if any) written to it.
fn kubectl_as(
    cp: &ControlPlane,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> std::process::Output {
    let mut c = cp.kubectl_cmd();
    c.env("KUBECONFIG", kubeconfig).args(args);
    let Some(text) = stdin else {
        return c.output().expect("kubectl");
    };
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    child.wait_with_output().expect("kubectl")
}

/// One node: a sandbox root under `layout::sandboxes_dir(root)`, the kubelet API server on loopback, and the API
/// server it asks.
struct Node {
    name: String,
    root: tempfile::TempDir,
    mgr: SandboxManager,
    cp: ControlPlane,
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    bundles: Vec<Bundle>,
}

impl Node {
    fn start() -> Self {
        windlass_tests::install_rustls_provider();
        let cp = ControlPlane::start();
        let name = unique_name("node");
        let root = tempfile::Builder::new()
            .prefix("windlass-kubelet-api-")
            .tempdir()
            .expect("root dir");
        let mgr = SandboxManager::new(
            layout::sandboxes_dir(root.path()),
            "/sys/fs/cgroup",
            workspace_binary("windlass-runtime"),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        // The kubelet's own credentials, as a node kubeconfig (system:node:<name>, group system:nodes).
        let kubeconfig = issue_kubeconfig(&cp, &format!("system:node:{name}"), &["system:nodes"]);
        let config = ServerConfig {
            node_name: name.clone(),
            node_ip: Some("127.0.0.1".parse().expect("ip")),
            listen: "127.0.0.1:0".parse().expect("addr"),
            root_dir: root.path().to_path_buf(),
            sandboxes: mgr.clone(),
            proc_root: PathBuf::from("/proc"),
            tls_cert_file: None,
            tls_private_key_file: None,
            client_ca_file: Some(cp.data_dir().join("pki/ca.crt")),
        };
        let addr = rt.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
            let kconf = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .expect("kube config");
            let client = kube::Client::try_from(kconf).expect("kube client");
            let server = KubeletServer::bind(config, Arc::new(SarAuthorizer::new(client)))
                .await
                .expect("bind kubelet API");
            let addr = server.local_addr().expect("local addr");
            tokio::spawn(server.run());
            addr
        });
        Self {
            name,
            root,
            mgr,
            cp,
            addr,
            rt,
            bundles: Vec::new(),
        }
    }

    fn admin(&self) -> Identity {
        let pki = self.cp.data_dir().join("pki");
        Identity::from_files(&pki.join("admin.crt"), &pki.join("admin.key"))
    }

    /// A pod sandbox labelled as the pod workers label it.
    fn pod(&self, name: &str, uid: &str) -> String {
        let id = layout::sandbox_id(uid, 0);
        let labels = HashMap::from([
            (layout::LABEL_POD_NAME.to_string(), name.to_string()),
            (layout::LABEL_POD_NAMESPACE.to_string(), NS.to_string()),
            (layout::LABEL_POD_UID.to_string(), uid.to_string()),
            (layout::LABEL_SANDBOX_ATTEMPT.to_string(), "0".to_string()),
        ]);
        self.mgr
            .create_sandbox(&SandboxConfig {
                id: id.clone(),
                hostname: name.into(),
                cgroup_parent: PathBuf::from(unique_cgroup("kapi")),
                labels,
                ..Default::default()
            })
            .expect("create sandbox");
        id
    }

    /// Runs instance `restart` of container `container` of pod `name`; returns the bundle's rootfs.
    fn run(
        &mut self,
        sandbox: &str,
        name: &str,
        uid: &str,
        container: &str,
        restart: u32,
        script: &str,
    ) -> PathBuf {
        let b = Bundle::busybox(&["sh", "-c", script]).expect("bundle");
        let id = layout::container_id(container, restart);
        self.mgr
            .create_container(
                sandbox,
                &ContainerConfig {
                    id: id.clone(),
                    bundle: b.path().to_path_buf(),
                    log_path: layout::container_log_path(
                        self.root.path(),
                        NS,
                        name,
                        uid,
                        container,
                        restart,
                    ),
                },
            )
            .expect("create container");
        self.mgr
            .start_container(sandbox, &id)
            .expect("start container");
        let rootfs = b.path().join("rootfs");
        self.bundles.push(b);
        rootfs
    }

    fn wait_exit(&self, sandbox: &str, id: &str) {
        wait_for(&format!("{id} to exit"), Duration::from_secs(20), || {
            let st = self.mgr.container_status(sandbox, id).ok()?;
            (st.status == Status::Stopped).then_some(())
        });
    }

    /// Waits until the container's log holds `text`.
    fn wait_log(&self, name: &str, uid: &str, container: &str, restart: u32, text: &str) {
        let path = layout::container_log_path(self.root.path(), NS, name, uid, container, restart);
        wait_for(
            &format!("{text:?} in {}", path.display()),
            Duration::from_secs(20),
            || {
                std::fs::read_to_string(&path)
                    .ok()?
                    .contains(text)
                    .then_some(())
            },
        );
    }

    fn tls(&self, who: Option<&Identity>) -> tokio_rustls::TlsConnector {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(TrustAny(provider)));
        let config = match who {
            Some(id) => {
                let certs: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(id.cert.as_bytes())
                        .collect::<Result<_, _>>()
                        .expect("cert");
                let key = PrivateKeyDer::from_pem_slice(id.key.as_bytes()).expect("key");
                builder
                    .with_client_auth_cert(certs, key)
                    .expect("client auth")
            }
            None => builder.with_no_client_auth(),
        };
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    async fn connect(
        &self,
        who: Option<&Identity>,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        self.tls(who)
            .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
            .await
            .expect("TLS handshake")
    }

    /// GET `path`: the status and the whole body.
    fn get(&self, who: Option<&Identity>, path: &str) -> (u16, String) {
        self.rt.block_on(async {
            let tls = self.connect(who).await;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .expect("http handshake");
            tokio::spawn(conn);
            let req = http::Request::get(path)
                .header("host", "127.0.0.1")
                .body(Empty::<Bytes>::new())
                .expect("request");
            let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
                .await
                .expect("response in time")
                .expect("response");
            let code = resp.status().as_u16();
            let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
                .await
                .expect("body in time")
                .expect("body")
                .to_bytes();
            (code, String::from_utf8_lossy(&body).into_owned())
        })
    }

    /// An exec (or attach) over WebSocket: sends `input` messages (already framed) after connecting and returns the
    /// stdout, stderr and the final status JSON.
    fn ws(
        &self,
        who: &Identity,
        path: &str,
        protocol: &str,
        input: Vec<Vec<u8>>,
    ) -> (String, String, serde_json::Value) {
        self.ws_then(who, path, protocol, input, || {})
    }

    /// Like [`Node::ws`], running `connected` once the upgrade was answered.
    fn ws_then(
        &self,
        who: &Identity,
        path: &str,
        protocol: &str,
        input: Vec<Vec<u8>>,
        connected: impl FnOnce(),
    ) -> (String, String, serde_json::Value) {
        self.rt.block_on(async {
            let tls = self.connect(Some(who)).await;
            let mut req = format!("wss://127.0.0.1:{}{path}", self.addr.port())
                .into_client_request()
                .expect("request");
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                http::HeaderValue::from_str(protocol).expect("header"),
            );
            let (mut ws, resp) = tokio_tungstenite::client_async(req, tls)
                .await
                .expect("WebSocket handshake");
            let chosen = resp
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            assert!(
                protocol.contains(&chosen) && !chosen.is_empty(),
                "negotiated {chosen:?}"
            );
            connected();
            for m in input {
                ws.send(Message::Binary(m.into())).await.expect("send");
            }
            let (mut out, mut err, mut status) = (Vec::new(), Vec::new(), serde_json::Value::Null);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let msg = tokio::time::timeout_at(deadline, ws.next())
                    .await
                    .expect("exec ended in time");
                match msg {
                    Some(Ok(Message::Binary(b))) if !b.is_empty() => match b[0] {
                        1 => out.extend_from_slice(&b[1..]),
                        2 => err.extend_from_slice(&b[1..]),
                        3 => status = serde_json::from_slice(&b[1..]).expect("status JSON"),
                        _ => {}
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    _ => {}
                }
            }
            (
                String::from_utf8_lossy(&out).into_owned(),
                String::from_utf8_lossy(&err).into_owned(),
                status,
            )
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(list) = self.mgr.list_sandboxes() {
            for sb in list {
                let _ = self.mgr.remove_sandbox(&sb.id);
            }
        }
    }
}

/// Tests talk to a server with a self-signed certificate, as the API server does by default.
#[derive(Debug)]
struct TrustAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for TrustAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn frame(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut v = vec![channel];
    v.extend_from_slice(data);
    v
}

/// The exec query for `cmd`.
fn exec_path(pod: &str, container: &str, cmd: &[&str], flags: &str) -> String {
    let mut q: Vec<String> = cmd
        .iter()
        .map(|c| {
            format!(
                "command={}",
                c.replace('%', "%25")
                    .replace(' ', "%20")
                    .replace('&', "%26")
                    .replace(';', "%3B")
                    .replace('>', "%3E")
                    .replace('=', "%3D")
            )
        })
        .collect();
    q.push(flags.to_string());
    format!("/exec/{NS}/{pod}/{container}?{}", q.join("&"))
}

/// A pod whose container `app` ran once (exited 3 after two lines) and runs again: two lines, then a third
/// once `/tmp/go` exists in its root filesystem.
fn restarted_pod(node: &mut Node, name: &str) -> (String, String, PathBuf) {
    let uid = unique_name("uid");
    let sb = node.pod(name, &uid);
    node.run(
        &sb,
        name,
        &uid,
        "app",
        0,
        "echo first-a; echo first-b; exit 3",
    );
    node.wait_exit(&sb, "app.0");
    let rootfs = node.run(
        &sb,
        name,
        &uid,
        "app",
        1,
        "echo second-a; echo second-b; while [ ! -f /tmp/go ]; do sleep 0.1; done; echo after-go; exec sleep 1000",
    );
    node.wait_log(name, &uid, "app", 1, "second-b");
    (sb, uid, rootfs)
}

#[test]
fn container_logs_honour_tail_since_timestamps_limit_and_previous() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let mut node = Node::start();
    let (_sb, _uid, _rootfs) = restarted_pod(&mut node, "logs");
    let admin = node.admin();
    let logs = |q: &str| node.get(Some(&admin), &format!("/containerLogs/{NS}/logs/app{q}"));
    assert_eq!(logs(""), (200, "second-a\nsecond-b\n".into()));
    assert_eq!(logs("?tailLines=1"), (200, "second-b\n".into()));
    assert_eq!(logs("?previous=true"), (200, "first-a\nfirst-b\n".into()));
    assert_eq!(logs("?limitBytes=8"), (200, "second-a".into()));
    assert_eq!(
        logs("?sinceTime=2999-01-01T00:00:00Z"),
        (200, String::new())
    );
    assert_eq!(logs("?sinceSeconds=3600").1, "second-a\nsecond-b\n");
    let (code, body) = logs("?timestamps=true&tailLines=1");
    assert_eq!(code, 200);
    let (ts, line) = body.trim_end().split_once(' ').expect("timestamp and line");
    assert!(ts.parse::<jiff::Timestamp>().is_ok(), "timestamp {ts:?}");
    assert_eq!(line, "second-b");
    // Unknown pods and containers are 404s; a bad option a 400.
    assert_eq!(
        node.get(Some(&admin), &format!("/containerLogs/{NS}/nope/app"))
            .0,
        404
    );
    assert_eq!(
        node.get(Some(&admin), &format!("/containerLogs/{NS}/logs/nope"))
            .0,
        404
    );
    assert_eq!(logs("?limitBytes=0").0, 400);
}

#[test]
fn followed_logs_stream_new_lines_and_end_when_the_container_exits() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let mut node = Node::start();
    let (sb, _uid, rootfs) = restarted_pod(&mut node, "follow");
    let admin = node.admin();
    let got = node.rt.block_on(async {
        let tls = node.connect(Some(&admin)).await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = http::Request::get(format!("/containerLogs/{NS}/follow/app?follow=true"))
            .header("host", "127.0.0.1")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = String::new();
        let mut triggered = false;
        let mut stopped = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        // The stream must deliver the old lines, then the new one, then end once the container is stopped.
        while let Some(frame) = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("log stream in time")
        {
            if let Ok(data) = frame.expect("frame").into_data() {
                got.push_str(&String::from_utf8_lossy(&data));
            }
            if got.contains("second-b") && !triggered {
                std::fs::write(rootfs.join("tmp/go"), "").expect("trigger");
                triggered = true;
            }
            if got.contains("after-go") && !stopped {
                let (mgr, sb) = (node.mgr.clone(), sb.clone());
                tokio::task::spawn_blocking(move || {
                    mgr.stop_container(&sb, "app.1", Duration::ZERO)
                })
                .await
                .expect("join")
                .expect("stop");
                stopped = true;
            }
        }
        got
    });
    assert_eq!(got, "second-a\nsecond-b\nafter-go\n");
}

#[test]
fn exec_over_websocket_streams_stdio_and_reports_exit_codes_with_and_without_a_tty() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let mut node = Node::start();
    let uid = unique_name("uid");
    let sb = node.pod("exec", &uid);
    node.run(&sb, "exec", &uid, "app", 0, "exec sleep 1000");
    let admin = node.admin();

    let path = exec_path(
        "exec",
        "app",
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
        "stdout=1&stderr=1",
    );
    let (out, err, status) = node.ws(&admin, &path, "v5.channel.k8s.io", vec![]);
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "7");

    // stdin until the v5 close signal; v4 clients get the same Status.
    let path = exec_path("exec", "app", &["cat"], "stdin=1&stdout=1&stderr=1");
    let (out, _, status) = node.ws(
        &admin,
        &path,
        "v5.channel.k8s.io",
        vec![frame(0, b"hello\n"), vec![255, 0]],
    );
    assert_eq!(out, "hello\n");
    assert_eq!(status["status"], "Success", "{status}");
    let path = exec_path("exec", "app", &["true"], "stdout=1");
    assert_eq!(
        node.ws(&admin, &path, "v4.channel.k8s.io", vec![]).2["status"],
        "Success"
    );

    // A terminal: sized by a resize message, and the shell's exit code comes back.
    let path = exec_path("exec", "app", &["sh"], "stdin=1&stdout=1&tty=1");
    let (out, _, status) = node.ws(
        &admin,
        &path,
        "v5.channel.k8s.io",
        vec![
            frame(4, br#"{"Width":100,"Height":30}"#),
            frame(0, b"tty -s && echo is-a-tty; stty size; exit 5\n"),
        ],
    );
    assert!(out.contains("is-a-tty"), "{out:?}");
    assert!(out.contains("30 100"), "{out:?}");
    assert_eq!(status["details"]["causes"][0]["message"], "5", "{status}");

    // Without a WebSocket upgrade (SPDY clients) the kubelet says so instead of hanging.
    assert_eq!(node.get(Some(&admin), &path).0, 400);
}

#[test]
fn anonymous_callers_get_401_and_users_without_node_rights_get_403() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let node = Node::start();
    assert_eq!(node.get(None, "/healthz").0, 401);
    let bob = Identity::from_kubeconfig(&issue_kubeconfig(&node.cp, "bob", &["devs"]));
    let (code, body) = node.get(Some(&bob), "/healthz");
    assert_eq!(code, 403);
    assert!(
        body.contains("user=bob") && body.contains("subresource=proxy"),
        "{body}"
    );
    assert_eq!(node.get(Some(&bob), "/stats/summary").0, 403);
    // Bound to system:kubelet-api-admin, bob may use the API.
    node.cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "bob-kubelet",
        "--clusterrole=system:kubelet-api-admin",
        "--user=bob",
    ]);
    // The denial is cached for up to 30 s, so use another request attribute (stats) that was not asked before.
    assert_eq!(node.get(Some(&bob), "/metrics").0, 200);
    assert_eq!(
        node.get(Some(&node.admin()), "/healthz"),
        (200, "ok\n".into())
    );
}

#[test]
fn stats_and_metrics_report_the_running_pod() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let mut node = Node::start();
    let uid = unique_name("uid");
    let sb = node.pod("stats", &uid);
    node.run(&sb, "stats", &uid, "app", 0, "exec sleep 1000");
    let admin = node.admin();
    let (code, body) = node.get(Some(&admin), "/stats/summary");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("summary JSON");
    assert_eq!(v["node"]["nodeName"], node.name.as_str());
    assert!(
        v["node"]["memory"]["usageBytes"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );
    let pod = v["pods"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["podRef"]["uid"] == uid.as_str()))
        .unwrap_or_else(|| panic!("pod in {v}"));
    assert_eq!(pod["podRef"]["name"], "stats");
    assert_eq!(pod["containers"][0]["name"], "app");
    assert!(
        pod["containers"][0]["memory"]["usageBytes"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{pod}"
    );
    let (code, metrics) = node.get(Some(&admin), "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("kubelet_running_pods 1"), "{metrics}");
    assert!(
        metrics.contains("kubelet_running_containers{container_state=\"running\"} 1"),
        "{metrics}"
    );
}

/// Registers the Node and a Pod bound to it in the API server, as a kubelet and the scheduler would.
fn register(node: &Node, pod: &str) -> String {
    let cp = &node.cp;
    let manifest =
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name}});
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &manifest.to_string());
    let status = serde_json::json!({"status": {
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        // What the kubelet publishes (`server::daemon_endpoints`): {"kubeletEndpoint": {"Port": N}}.
        "daemonEndpoints": windlass_kubelet::server::daemon_endpoints(node.addr.port())}});
    cp.kubectl_ok(&[
        "patch",
        "node",
        &node.name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    let manifest = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": NS},
        "spec": {"nodeName": node.name, "containers": [{"name": "app", "image": "busybox"}]}});
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &manifest.to_string());
    cp.kubectl_ok(&["get", "pod", pod, "-o", "jsonpath={.metadata.uid}"])
}

#[test]
fn kubectl_logs_and_exec_reach_the_pod_through_the_api_server() {
    if !require_privileged(&["/bin/busybox", "kubectl", "script"]) {
        return;
    }
    let mut node = Node::start();
    let uid = register(&node, "web");
    let sb = node.pod("web", &uid);
    node.run(
        &sb,
        "web",
        &uid,
        "app",
        0,
        "echo first-a; echo first-b; exit 3",
    );
    node.wait_exit(&sb, "app.0");
    let rootfs = node.run(
        &sb,
        "web",
        &uid,
        "app",
        1,
        "echo hello from web; while [ ! -f /tmp/go ]; do sleep 0.1; done; echo after-go; exec sleep 1000",
    );
    node.wait_log("web", &uid, "app", 1, "hello from web");
    let cp = &node.cp;
    assert_eq!(cp.kubectl_ok(&["logs", "web"]), "hello from web\n");
    assert_eq!(
        cp.kubectl_ok(&["logs", "web", "--previous"]),
        "first-a\nfirst-b\n"
    );
    assert_eq!(
        cp.kubectl_ok(&["logs", "web", "--tail=1", "-c", "app"]),
        "hello from web\n"
    );

    // `kubectl logs -f` prints new lines as they come.
    let mut follow = windlass_tests::ChildGuard::spawn(
        cp.kubectl_cmd()
            .args(["logs", "-f", "web"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )
    .expect("kubectl logs -f");
    let rx = follow.stdout_lines();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20))
            .expect("first line"),
        "hello from web"
    );
    std::fs::write(rootfs.join("tmp/go"), "").expect("trigger");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)).expect("new line"),
        "after-go"
    );
    drop(follow);

    // exec: output and the exit code, stdin, and a terminal (kubectl -it needs one: `script` gives it a pty).
    let out = cp.kubectl(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("oops"));
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cp.kubectl_stdin(&["exec", "-i", "web", "--", "cat"], "from stdin\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from stdin\n");
    assert!(out.status.success());
    let mut tty = cp
        .kubectl_cmd()
        .args([
            "exec",
            "-it",
            "web",
            "--",
            "sh",
            "-c",
            "tty -s && echo is-a-tty; exit 4",
        ])
        .output()
        .expect("kubectl");
    // Without a terminal on stdin kubectl falls back to no tty; under `script` it has one.
    assert!(!String::from_utf8_lossy(&tty.stdout).contains("is-a-tty"));
    let kubectl = format!(
        "KUBECONFIG={} kubectl exec -it web -- sh -c 'tty -s && echo is-a-tty; exit 4'",
        cp.kubeconfig().display()
    );
    tty = Command::new("script")
        .args(["-qec", &kubectl, "/dev/null"])
        .env("HOME", cp.data_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            // Keep script's stdin open until kubectl is done.
            let mut stdin = c.stdin.take();
            let out = c.wait_with_output();
            if let Some(s) = stdin.as_mut() {
                let _ = s.flush();
            }
            out
        })
        .expect("script");
    let text = String::from_utf8_lossy(&tty.stdout);
    assert!(
        text.contains("is-a-tty"),
        "{text:?} / {}",
        String::from_utf8_lossy(&tty.stderr)
    );
    assert_eq!(tty.status.code(), Some(4), "{text:?}");

    // The API server authorises the subresources with RBAC: a viewer may read logs but not exec.
    let viewer = issue_kubeconfig(cp, "viewer", &[]);
    cp.kubectl_ok(&[
        "create",
        "rolebinding",
        "viewer",
        "--clusterrole=view",
        "--user=viewer",
    ]);
    let as_viewer = |args: &[&str]| {
        cp.kubectl_cmd()
            .env("KUBECONFIG", &viewer)
            .args(args)
            .output()
            .expect("kubectl")
    };
    let out = as_viewer(&["logs", "web", "--tail=1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_viewer(&["exec", "web", "--", "true"]);
    assert!(!out.status.success());
    let mut err = String::new();
    out.stderr
        .as_slice()
        .read_to_string(&mut err)
        .expect("utf-8");
    assert!(
        err.contains("forbidden") || err.contains("Forbidden"),
        "{err}"
    );
}

#[test]
fn port_forward_through_the_api_server_reaches_the_pods_localhost() {
    if !require_privileged(&["/bin/busybox", "kubectl"]) {
        return;
    }
    let mut node = Node::start();
    let uid = register(&node, "pf");
    let sb = node.pod("pf", &uid);
    node.run(
        &sb,
        "pf",
        &uid,
        "app",
        0,
        "mkdir -p /www && echo served-from-pod > /www/index.html && echo listening && exec httpd -f -p 127.0.0.1:8080 -h /www",
    );
    node.wait_log("pf", &uid, "app", 0, "listening");
    let kubeconfig = node.cp.kubeconfig();
    let (response, refused) = node.rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("config");
        let client = kube::Client::try_from(config).expect("client");
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, NS);
        // httpd may need a moment after its first log line: retry the whole forward briefly.
        let mut response = String::new();
        for _ in 0..50 {
            let mut pf = pods.portforward("pf", &[8080]).await.expect("port-forward");
            let mut stream = pf.take_stream(8080).expect("stream");
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream
                .write_all(b"GET /index.html HTTP/1.0\r\nHost: pf\r\n\r\n")
                .await
                .expect("write");
            let mut buf = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
            drop(stream);
            pf.abort();
            response = String::from_utf8_lossy(&buf).into_owned();
            if response.contains("served-from-pod") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A port nothing listens on: the error channel says so.
        let mut pf = pods.portforward("pf", &[9]).await.expect("port-forward");
        let err = pf.take_error(9).expect("error channel");
        let refused = tokio::time::timeout(Duration::from_secs(10), err)
            .await
            .expect("error in time")
            .unwrap_or_default();
        pf.abort();
        (response, refused)
    });
    assert!(
        response.starts_with("HTTP/1.") && response.contains("served-from-pod"),
        "{response:?}"
    );
    assert!(refused.contains("error forwarding port 9"), "{refused:?}");

    // kubectl port-forward (SPDY tunnelled in WebSocket) wants a Running pod, then listens locally.
    node.cp.kubectl_ok(&[
        "patch",
        "pod",
        "pf",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running"}}"#,
    ]);
    let mut pf = windlass_tests::ChildGuard::spawn(
        node.cp
            .kubectl_cmd()
            .args([
                "port-forward",
                "pod/pf",
                ":8080",
                "--address",
                "127.0.0.1",
                "-v=6",
            ])
            .stdout(Stdio::piped())
            .stderr(
                std::fs::File::create(node.cp.data_dir().join("port-forward.log")).expect("log"),
            ),
    )
    .expect("kubectl port-forward");
    // Keep reading kubectl's stdout: it writes a line per connection, and a closed pipe would kill it.
    let lines = pf.stdout_lines();
    let line = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("kubectl port-forward listening");
    let local = windlass_tests::control::forwarded_local_port(&line);
    // Two connections in a row: each is its own pair of SPDY streams in the one session.
    for attempt in 0..2 {
        let mut conn =
            std::net::TcpStream::connect(("127.0.0.1", local)).expect("connect to kubectl");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        conn.write_all(b"GET /index.html HTTP/1.0\r\nHost: pf\r\n\r\n")
            .expect("request");
        let mut got = String::new();
        let _ = conn.read_to_string(&mut got);
        assert!(
            got.contains("served-from-pod"),
            "attempt {attempt}: {got:?}\nkubectl: {}",
            std::fs::read_to_string(node.cp.data_dir().join("port-forward.log"))
                .unwrap_or_default()
        );
    }
}

#[test]
fn attach_streams_the_containers_output_and_refuses_stdin() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let mut node = Node::start();
    let uid = unique_name("uid");
    let sb = node.pod("att", &uid);
    let rootfs = node.run(
        &sb,
        "att",
        &uid,
        "app",
        0,
        "echo before; while [ ! -f /tmp/go ]; do sleep 0.1; done; echo to-out; echo to-err >&2; sleep 0.3; exit 0",
    );
    node.wait_log("att", &uid, "app", 0, "before");
    let admin = node.admin();
    // The output is triggered once the attach request was answered.
    let go = rootfs.join("tmp/go");
    let (out, err, status) = node.ws_then(
        &admin,
        &format!("/attach/{NS}/att/app?stdout=1&stderr=1"),
        "v5.channel.k8s.io",
        vec![],
        move || std::fs::write(go, "").expect("trigger"),
    );
    assert_eq!((out.as_str(), err.as_str()), ("to-out\n", "to-err\n"));
    assert_eq!(status["status"], "Success", "{status}");
    node.wait_exit(&sb, "app.0");
    let uid2 = unique_name("uid");
    let sb2 = node.pod("att2", &uid2);
    node.run(&sb2, "att2", &uid2, "app", 0, "exec sleep 1000");
    let (_, _, status) = node.ws(
        &admin,
        &format!("/attach/{NS}/att2/app?stdin=1&stdout=1"),
        "v4.channel.k8s.io",
        vec![],
    );
    assert_eq!(status["status"], "Failure", "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("stdin"),
        "{status}"
    );
}

#[test]
fn a_node_may_write_only_its_own_node_lease_and_pods() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let kubeconfig = issue_kubeconfig(&cp, "system:node:n1", &["system:nodes"]);
    let as_node = |args: &[&str], stdin: Option<&str>| kubectl_as(&cp, &kubeconfig, args, stdin);
    let node = |name: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
            .to_string()
    };
    // NodeRestriction: a node may not give itself labels that steer workloads to it.
    let mut claiming: serde_json::Value = serde_json::from_str(&node("n1")).expect("node");
    claiming["metadata"]["labels"] = serde_json::json!({
        "kubernetes.io/hostname": "n1", "node-role.kubernetes.io/control-plane": ""});
    let out = as_node(&["create", "-f", "-"], Some(&claiming.to_string()));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "is not allowed to set the following labels: node-role.kubernetes.io/control-plane"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_node(&["create", "-f", "-"], Some(&node("n1")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for label in [
        "node-restriction.kubernetes.io/pool=gpu",
        "node-role.kubernetes.io/control-plane=",
    ] {
        let out = as_node(&["label", "node", "n1", label], None);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("is not allowed to modify labels"),
            "{label}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = as_node(&["label", "node", "n1", "node.kubernetes.io/ok=1"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_node(&["taint", "node", "n1", "dedicated=me:NoSchedule"], None);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not allowed to modify taints"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The admin labels and taints nodes; the node may then leave those alone, but not remove them.
    cp.kubectl_ok(&[
        "label",
        "node",
        "n1",
        "node-restriction.kubernetes.io/pool=gpu",
    ]);
    let out = as_node(
        &[
            "label",
            "node",
            "n1",
            "node-restriction.kubernetes.io/pool-",
        ],
        None,
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not allowed to modify labels"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_node(&["create", "-f", "-"], Some(&node("n2")));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not allowed to modify node \"n2\""));
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &node("n2"));
    let out = as_node(&["label", "node", "n2", "x=y"], None);
    assert!(!out.status.success(), "a node relabelled another node");
    let out = as_node(&["label", "node", "n1", "x=y"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Pods: only those bound to it (mirror pods, statuses, deletions). NodeRestriction admits only mirror pods
    // owned by the node itself that reference no other API object.
    let n1_uid = cp.kubectl_ok(&["get", "node", "n1", "-o", "jsonpath={.metadata.uid}"]);
    let mirror = |name: &str, node: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS,
                "annotations": {"kubernetes.io/config.mirror": "h1"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": n1_uid.trim(), "controller": true}]},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}})
    };
    let pod = |name: &str, node: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}})
        .to_string()
    };
    let out = as_node(
        &["create", "-f", "-"],
        Some(&mirror("mine", "n1").to_string()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_node(&["create", "-f", "-"], Some(&pod("plain", "n1")));
    assert!(
        !out.status.success(),
        "a node created a pod that is not a mirror pod"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("can only create mirror pods"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut with_secret = mirror("secretive", "n1");
    with_secret["spec"]["volumes"] =
        serde_json::json!([{"name": "s", "secret": {"secretName": "x"}}]);
    let out = as_node(&["create", "-f", "-"], Some(&with_secret.to_string()));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("can not create pods that reference secrets"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_node(
        &["create", "-f", "-"],
        Some(&mirror("theirs", "n2").to_string()),
    );
    assert!(
        !out.status.success(),
        "a node created a pod bound elsewhere"
    );
    let out = as_node(&["label", "pod", "mine", "x=y"], None);
    assert!(
        !out.status.success(),
        "a node edited a pod's spec or metadata"
    );
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &pod("theirs", "n2"));
    let status = r#"{"status":{"phase":"Running"}}"#;
    let out = as_node(
        &[
            "patch",
            "pod",
            "theirs",
            "--subresource=status",
            "--type=merge",
            "-p",
            status,
        ],
        None,
    );
    assert!(
        !out.status.success(),
        "a node patched another node's pod status"
    );
    let out = as_node(
        &[
            "patch",
            "pod",
            "mine",
            "--subresource=status",
            "--type=merge",
            "-p",
            status,
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It may read what RBAC's system:node grants, but not secrets' writes or other users' rights.
    assert!(as_node(&["get", "pods", "-A"], None).status.success());
    assert!(!as_node(&["delete", "pod", "theirs"], None).status.success());
    // It may delete its own mirror pods.
    assert!(as_node(&["delete", "pod", "mine", "--wait=false"], None)
        .status
        .success());
}

#[test]
fn a_node_reads_only_the_secrets_and_config_maps_its_own_pods_use() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let kubeconfig = issue_kubeconfig(&cp, "system:node:n1", &["system:nodes"]);
    let as_node = |args: &[&str]| kubectl_as(&cp, &kubeconfig, args, None);
    let refused = |out: &std::process::Output, why: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "allowed; wanted a refusal for {why}");
        assert!(err.contains(why), "{err}");
    };
    for name in ["used", "theirs", "later"] {
        cp.kubectl_ok(&["create", "secret", "generic", name, "--from-literal=k=v"]);
        cp.kubectl_ok(&["create", "configmap", name, "--from-literal=k=v"]);
    }
    // A pod bound to n1 uses the secret through a volume and the configMap through envFrom; one bound to n2 uses
    // the others.
    let pod = |name: &str, node: &str, uses: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
            "spec": {"nodeName": node,
                "volumes": [{"name": "s", "secret": {"secretName": uses}}],
                "containers": [{"name": "c", "image": "busybox",
                    "envFrom": [{"configMapRef": {"name": uses}}]}]}})
        .to_string()
    };
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &pod("p1", "n1", "used"));
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &pod("p2", "n2", "theirs"));

    for kind in ["secret", "configmap"] {
        let out = as_node(&["get", kind, "used", "-o", "name"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        refused(
            &as_node(&["get", kind, "theirs"]),
            "no relationship found between node \"n1\" and this object",
        );
        refused(
            &as_node(&["get", kind]),
            "can only read individual resources of this type",
        );
        refused(
            &as_node(&["get", kind, "-A"]),
            "can only read individual resources of this type",
        );
        // A list narrowed to one name (what a kubelet's watch-based secret manager sends) is a read of that one.
        let out = as_node(&[
            "get",
            kind,
            "--field-selector",
            "metadata.name=used",
            "-o",
            "name",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{kind}/used")
        );
        refused(
            &as_node(&["get", kind, "--field-selector", "metadata.name=theirs"]),
            "no relationship found",
        );
    }
    refused(
        &as_node(&["delete", "secret", "used"]),
        "cannot delete resource \"secrets\"",
    );

    // A pod bound a moment ago opens its secret at once; deleting it closes it again.
    refused(
        &as_node(&["get", "secret", "later"]),
        "no relationship found",
    );
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &pod("p3", "n1", "later"));
    let out = as_node(&["get", "secret", "later", "-o", "name"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cp.kubectl_ok(&["delete", "pod", "p3", "--grace-period=0", "--force"]);
    wait_for(
        "the deleted pod's secret to be refused to the node",
        Duration::from_secs(10),
        || (!as_node(&["get", "secret", "later"]).status.success()).then_some(()),
    );
    // The admin is not a node: it reads everything.
    cp.kubectl_ok(&["get", "secret", "theirs"]);
}
