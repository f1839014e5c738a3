//! `pods/log`, `pods/exec`, `pods/attach` and `pods/portforward`: proxied to the kubelet of the pod's node (Ref:
//! kube-apiserver `pkg/registry/core/pod/rest/subresources.go` and `strategy.go` `LogLocation`/`ExecLocation`).
//! The kubelet is found from the Node (`InternalIP` and `status.daemonEndpoints.kubeletEndpoint.Port`); the API
//! server authenticates with its `kube-apiserver-kubelet-client` certificate and, as upstream without
//! `--kubelet-certificate-authority`, does not verify the kubelet's serving certificate. Logs stream through;
//! exec/attach/port-forward upgrade (WebSocket, or SPDY/3.1 for kubectl ≤ 1.29 and client-go's SPDY executor: any
//! `Upgrade` passes with the headers that negotiate it) and the two connections are then spliced.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;

use super::handlers::object_of;
use super::rbac;
use super::resources;
use super::status::ApiError;
use super::{error_response, Body, Query, State, User};
use crate::pki::PkiPaths;

/// The request headers passed to the kubelet: those that negotiate a WebSocket or SPDY upgrade and its stream
/// protocol (Ref: apimachinery `httpstream` `X-Stream-Protocol-Version`), and `Accept`.
const UPGRADE_HEADERS: [&str; 7] = [
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "x-stream-protocol-version",
    "accept",
];

/// The subresources proxied to kubelets.
pub(crate) const SUBRESOURCES: [&str; 4] = ["log", "exec", "attach", "portforward"];

/// `(namespace, pod, subresource)` when `path` is one of the proxied subresources.
pub(crate) fn target(path: &str) -> Option<(String, String, String)> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name, sub] if SUBRESOURCES.contains(sub) => {
            Some((ns.to_string(), name.to_string(), sub.to_string()))
        }
        _ => None,
    }
}

/// Accepts any kubelet serving certificate (upstream's default without `--kubelet-certificate-authority`), while
/// still checking the handshake signatures.
#[derive(Debug)]
struct AnyKubeletCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyKubeletCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS client configuration towards kubelets, with the API server's kubelet client certificate.
pub(crate) fn client_config(paths: &PkiPaths) -> Result<rustls::ClientConfig, String> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&paths.kubelet_client_cert)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("{}: {e}", paths.kubelet_client_cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&paths.kubelet_client_key)
        .map_err(|e| format!("{}: {e}", paths.kubelet_client_key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyKubeletCert(provider)))
        .with_client_auth_cert(certs, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn bad_request(message: String) -> ApiError {
    ApiError {
        code: 400,
        reason: "BadRequest",
        message,
        details: None,
    }
}

/// The container a request means: the `container` parameter, else the `kubectl.kubernetes.io/default-container`
/// annotation, else the only container (Ref: upstream `validateContainer`).
fn container_of(pod: &Value, name: &str, requested: Option<&str>) -> Result<String, ApiError> {
    let names = |field: &str| -> Vec<String> {
        pod.pointer(&format!("/spec/{field}"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.get("name").and_then(Value::as_str).map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let containers = names("containers");
    let mut all = containers.clone();
    all.extend(names("initContainers"));
    all.extend(names("ephemeralContainers"));
    let chosen = match requested {
        Some(c) => c.to_string(),
        None => {
            let default = pod
                .pointer("/metadata/annotations/kubectl.kubernetes.io~1default-container")
                .and_then(Value::as_str);
            match (default, containers.as_slice()) {
                (Some(d), _) => d.to_string(),
                (None, [only]) => only.clone(),
                _ => {
                    return Err(bad_request(format!(
                        "a container name must be specified for pod {name}, choose one of: [{}]",
                        containers.join(" ")
                    )))
                }
            }
        }
    };
    if !all.contains(&chosen) {
        return Err(bad_request(format!(
            "container {chosen} is not valid for pod {name}"
        )));
    }
    Ok(chosen)
}

/// `(address, port)` of a Node's kubelet.
fn kubelet_address(node: &Value) -> Option<(String, u16)> {
    let addrs = node.pointer("/status/addresses")?.as_array()?;
    let pick = |t: &str| {
        addrs
            .iter()
            .find(|a| a.get("type").and_then(Value::as_str) == Some(t))
            .and_then(|a| a.get("address").and_then(Value::as_str))
    };
    let ip = pick("InternalIP")
        .or_else(|| pick("ExternalIP"))
        .or_else(|| pick("Hostname"))?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .unwrap_or(10250);
    Some((ip.to_string(), port))
}

async fn get_object(
    state: &State,
    plural: &str,
    ns: Option<&str>,
    name: &str,
) -> Result<Value, ApiError> {
    let kind = resources::find("", "v1", plural)
        .ok_or_else(|| ApiError::internal(format!("no {plural} kind")))?;
    match state.store.get(&kind.key(ns, name)).await?.0 {
        Some(kv) => object_of(&kv),
        None => Err(ApiError::not_found(kind, name)),
    }
}

/// Authorizes and proxies one request; `user` is already authenticated.
pub(crate) async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    user: User,
    ns: String,
    name: String,
    sub: String,
) -> Response<Body> {
    match proxy(&state, req, &user, &ns, &name, &sub).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn proxy(
    state: &Arc<State>,
    mut req: Request<Incoming>,
    user: &User,
    ns: &str,
    name: &str,
    sub: &str,
) -> Result<Response<Body>, ApiError> {
    // Ref: since 1.30 upstream requires `create` for exec/attach/portforward also when they arrive as a WebSocket
    // GET (AuthorizePodWebsocketUpgradeCreatePermission); logs are read with `get`.
    let verb = if sub == "log" { "get" } else { "create" };
    let attrs = rbac::Attributes {
        verb: verb.into(),
        group: String::new(),
        resource: "pods".into(),
        subresource: Some(sub.into()),
        namespace: Some(ns.into()),
        name: Some(name.into()),
        path: None,
    };
    if !rbac::authorize(&state.caches, user, &attrs) {
        let mut e = ApiError::forbidden(attrs.forbidden_message(user));
        e.details = Some(serde_json::json!({"name": name, "kind": "pods"}));
        return Err(e);
    }
    if sub != "log" && !matches!(*req.method(), Method::GET | Method::POST) {
        return Err(ApiError::method_not_allowed(format!(
            "pods/{sub} supports GET and POST"
        )));
    }
    let query = Query::parse(req.uri().query());
    let pod = get_object(state, "pods", Some(ns), name).await?;
    let node_name = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad_request(format!("pod {name} does not have a host assigned")))?
        .to_string();
    let node = get_object(state, "nodes", None, &node_name).await?;
    let (ip, port) = kubelet_address(&node).ok_or_else(|| {
        ApiError::internal(format!(
            "node {node_name} has no address to reach its kubelet"
        ))
    })?;
    // Every parameter but `container` goes to the kubelet as given (they share upstream's names).
    let rest: String = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("container="))
        .collect::<Vec<_>>()
        .join("&");
    let path = if sub == "portforward" {
        format!("/portForward/{ns}/{name}")
    } else {
        let container = container_of(&pod, name, query.get("container"))?;
        let prefix = match sub {
            "log" => "containerLogs",
            "exec" => "exec",
            _ => "attach",
        };
        format!("/{prefix}/{ns}/{name}/{container}")
    };
    let uri = if rest.is_empty() {
        path
    } else {
        format!("{path}?{rest}")
    };
    let host = if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    };
    let unavailable = |message: String| ApiError {
        code: 502,
        reason: "InternalError",
        message,
        details: None,
    };
    let tcp = tokio::net::TcpStream::connect(&host).await.map_err(|e| {
        unavailable(format!(
            "cannot reach the kubelet of node {node_name} at {host}: {e}"
        ))
    })?;
    let _ = tcp.set_nodelay(true);
    let server_name = ServerName::try_from(ip.clone())
        .map_err(|e| ApiError::internal(format!("kubelet address {ip}: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(state.kubelet_tls.clone())
        .connect(server_name, tcp)
        .await
        .map_err(|e| unavailable(format!("TLS to the kubelet at {host}: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| unavailable(format!("kubelet at {host}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "kubelet connection ended");
        }
    });
    let mut out = Request::builder()
        .method(req.method().clone())
        .uri(&uri)
        .header(header::HOST, &host);
    for h in UPGRADE_HEADERS {
        // Every value: SPDY clients offer each protocol in its own X-Stream-Protocol-Version header.
        for v in req.headers().get_all(h) {
            out = out.header(h, v.clone());
        }
    }
    let out = out
        .body(Empty::<Bytes>::new())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut resp = sender
        .send_request(out)
        .await
        .map_err(|e| unavailable(format!("kubelet at {host}: {e}")))?;
    let status = resp.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let client_upgrade = hyper::upgrade::on(&mut req);
        let kubelet_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(client), Ok(kubelet)) = (client_upgrade.await, kubelet_upgrade.await) else {
                tracing::debug!("stream upgrade failed");
                return;
            };
            let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(kubelet));
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
        });
        let mut r = Response::new(super::full(Bytes::new()));
        *r.status_mut() = status;
        for (k, v) in resp.headers() {
            r.headers_mut().append(k.clone(), v.clone());
        }
        return Ok(r);
    }
    // Anything else (logs, or the kubelet's refusal) streams back as the kubelet sent it.
    let headers = resp.headers().clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let mut body = resp.into_body();
    tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return };
            if let Ok(data) = frame.into_data() {
                if tx.send(data).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
    });
    if !status.is_success() {
        // The kubelet answers errors in plain text; clients expect a Status.
        let mut text = Vec::new();
        let mut s = Box::pin(stream);
        use futures_util::StreamExt;
        while let Some(Ok(f)) = s.next().await {
            if let Ok(d) = f.into_data() {
                text.extend_from_slice(&d);
                if text.len() > 64 * 1024 {
                    break;
                }
            }
        }
        let message = String::from_utf8_lossy(&text).trim().to_string();
        let (code, reason) = match status.as_u16() {
            400 => (400, "BadRequest"),
            401 | 403 => (500, "InternalError"),
            404 => (404, "NotFound"),
            _ => (500, "InternalError"),
        };
        return Err(ApiError {
            code,
            reason,
            message: if code == 500 {
                format!("kubelet of node {node_name}: {} {message}", status.as_u16())
            } else {
                message
            },
            details: None,
        });
    }
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        headers
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("text/plain")),
    );
    Ok(r)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_streaming_pod_subresources_are_proxied() {
        assert_eq!(
            target("/api/v1/namespaces/default/pods/web/log"),
            Some(("default".into(), "web".into(), "log".into()))
        );
        assert!(target("/api/v1/namespaces/default/pods/web/exec").is_some());
        assert!(target("/api/v1/namespaces/default/pods/web/status").is_none());
        assert!(target("/api/v1/namespaces/default/pods/web").is_none());
    }

    #[test]
    fn the_container_defaults_as_upstream_and_unknown_ones_are_refused() {
        let one = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(container_of(&one, "p", None).unwrap(), "a");
        let two = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}],
            "initContainers": [{"name": "init"}]}});
        let e = container_of(&two, "p", None).unwrap_err();
        assert!(e.message.contains("choose one of: [a b]"), "{}", e.message);
        assert_eq!(container_of(&two, "p", Some("init")).unwrap(), "init");
        assert!(container_of(&two, "p", Some("zz")).is_err());
        let annotated = json!({"metadata": {"annotations": {"kubectl.kubernetes.io/default-container": "b"}},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        assert_eq!(container_of(&annotated, "p", None).unwrap(), "b");
    }

    #[test]
    fn the_kubelet_is_found_at_the_nodes_internal_ip_and_daemon_port() {
        let node = json!({"status": {"addresses": [{"type": "Hostname", "address": "n1"},
            {"type": "InternalIP", "address": "10.0.0.5"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10251}}}});
        assert_eq!(kubelet_address(&node), Some(("10.0.0.5".into(), 10251)));
        let bare =
            json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.6"}]}});
        assert_eq!(kubelet_address(&bare), Some(("10.0.0.6".into(), 10250)));
        assert_eq!(kubelet_address(&json!({})), None);
    }
}
