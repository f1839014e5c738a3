//! TLS listener and HTTP/1.1 + HTTP/2 connection handling.

use std::collections::HashMap;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{bootstrap, openapi, ApiConfig, State, User};
use crate::pki::{self, PkiError};
use crate::store::{Store, StoreError};

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot load TLS material {path}: {message}")]
    Tls { path: String, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bootstrap the cluster objects: {0}")]
    Bootstrap(#[from] StoreError),
    #[error("invalid token file {path}: {message}")]
    TokenFile { path: String, message: String },
    #[error("service-account signing key: {0}")]
    SigningKey(#[from] super::sa_token::SigningKeyError),
    #[error("cannot open the audit log {path}: {source}")]
    AuditLog {
        path: String,
        source: std::io::Error,
    },
}

/// Reads an upstream-format static token file: `token,user,uid[,"group1,group2"]` per line.
fn load_tokens(path: &std::path::Path) -> Result<HashMap<String, User>, ServeError> {
    let err = |message: String| ServeError::TokenFile {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut tokens = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(4, ',');
        let token = fields.next().unwrap_or_default().trim();
        let user = fields.next().unwrap_or_default().trim();
        let _uid = fields.next();
        if token.is_empty() || user.is_empty() {
            return Err(err(format!(
                "line {}: expected token,user,uid[,groups]",
                i + 1
            )));
        }
        let mut groups: Vec<String> = fields
            .next()
            .map(|g| {
                g.trim()
                    .trim_matches('"')
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        groups.push("system:authenticated".into());
        tokens.insert(
            token.to_string(),
            User {
                name: user.to_string(),
                groups,
            },
        );
    }
    Ok(tokens)
}

fn tls_config(paths: &pki::PkiPaths) -> Result<rustls::ServerConfig, ServeError> {
    let tls_err = |path: &std::path::Path, message: String| ServeError::Tls {
        path: path.display().to_string(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.serving_cert)
        .map_err(|e| tls_err(&paths.serving_cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(&paths.serving_cert, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(&paths.serving_key)
        .map_err(|e| tls_err(&paths.serving_key, e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&paths.ca_cert)
        .map_err(|e| tls_err(&paths.ca_cert, e.to_string()))?
    {
        let ca = ca.map_err(|e| tls_err(&paths.ca_cert, e.to_string()))?;
        roots
            .add(ca)
            .map_err(|e| tls_err(&paths.ca_cert, e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Client certificates are optional at the TLS layer so that requests without one get a proper 401 Status
    // (and token authentication can be added); a certificate that is presented must chain to our CA.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls_err(&paths.ca_cert, e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&paths.serving_cert, e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(&paths.serving_cert, e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Runs the API server until the process is stopped.
pub async fn serve(config: ApiConfig, store: Arc<dyn Store>) -> Result<(), ServeError> {
    let url = pki::server_url(config.listen.ip(), config.listen.port());
    let paths = pki::ensure(&config.data_dir, &config.tls_sans, &url)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(&paths)?));
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    tracing::info!(backend = store.backend(), "using store backend");
    let tokens = match &config.token_auth_file {
        Some(p) => load_tokens(p)?,
        None => HashMap::new(),
    };
    let audit = match &config.audit_log {
        Some(p) => Some(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| ServeError::AuditLog {
                    path: p.display().to_string(),
                    source,
                })?,
        )),
        None => None,
    };
    let kubelet_tls = Arc::new(
        super::kubelet_proxy::client_config(&paths).map_err(|message| ServeError::Tls {
            path: paths.kubelet_client_cert.display().to_string(),
            message,
        })?,
    );
    // The caches list and watch the store itself; handlers write through `SyncedStore`, which acknowledges a
    // write to a cached object once the caches have it.
    let caches = super::cache::Caches::start(store.clone()).await;
    let store: Arc<dyn Store> = Arc::new(super::cache::SyncedStore {
        inner: store,
        caches: caches.clone(),
    });
    let state = Arc::new(State {
        kubelet_tls,
        store,
        caches,
        openapi: openapi::render(),
        alloc_lock: tokio::sync::Mutex::new(()),
        watch_lines: Default::default(),
        tokens,
        audit,
        sa_tokens: super::sa_token::TokenSigner::load_or_create(
            &config.data_dir.join("pki"),
            super::sa_token::DEFAULT_ISSUER,
        )?,
        config,
    });
    bootstrap::run(&state).await?;
    super::handlers::resume_deletions(&state).await?;
    tracing::info!(address = %state.config.listen, kubeconfig = %paths.admin_kubeconfig.display(), "serving");
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: log, back off briefly, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let mut tls = match acceptor.accept(super::coalesce::Coalescing::new(tcp)).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            // An HTTP/2 connection's TLS records go out through one buffer, written once per scheduling round
            // ([`super::coalesce`]), not one socket write per response.
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            tls.get_mut().0.gather(h2);
            let user = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| User::from_certificate(c));
            let service = service_fn(move |req| {
                let state = state.clone();
                let user = user.clone();
                async move { Ok::<_, std::convert::Infallible>(super::handle(state, req, user).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // With upgrades: exec/attach/port-forward switch the connection to WebSocket.
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
