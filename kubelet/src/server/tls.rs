//! The kubelet API's TLS: a serving certificate from `--tls-cert-file`/`--tls-private-key-file`, or (as upstream
//! does without them) a self-signed one kept in `<root-dir>/pki/kubelet.{crt,key}`; client certificates verified
//! against `--client-ca-file` but optional at the TLS layer, so a request without one gets an HTTP 401.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// The TLS material could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("cannot make a self-signed serving certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path) -> impl Fn(String) -> TlsError + '_ {
    move |message| TlsError::File {
        path: path.to_path_buf(),
        message,
    }
}

/// `<root>/pki/kubelet.{crt,key}`, created once (Ref: upstream `--cert-dir` `kubelet.crt`/`kubelet.key`).
pub(crate) fn ensure_self_signed(
    root_dir: &Path,
    node_name: &str,
    node_ip: Option<IpAddr>,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let dir = root_dir.join("pki");
    let (crt, key) = (dir.join("kubelet.crt"), dir.join("kubelet.key"));
    if crt.is_file() && key.is_file() {
        return Ok((crt, key));
    }
    let mut sans = vec![node_name.to_string(), "localhost".to_string()];
    if let Some(ip) = node_ip {
        sans.push(ip.to_string());
    }
    sans.push("127.0.0.1".into());
    let kp = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let mut params =
        rcgen::CertificateParams::new(sans).map_err(|e| TlsError::Generate(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{node_name}@kubelet"));
    let cert = params
        .self_signed(&kp)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir)(e.to_string()))?;
    write_private(&key, &kp.serialize_pem())?;
    std::fs::write(&crt, cert.pem()).map_err(|e| file_err(&crt)(e.to_string()))?;
    tracing::info!(cert = %crt.display(), "created a self-signed kubelet serving certificate");
    Ok((crt, key))
}

fn write_private(path: &Path, data: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path)(e.to_string()))?;
    f.write_all(data.as_bytes())
        .map_err(|e| file_err(path)(e.to_string()))
}

/// The server configuration: HTTP/1.1 only (exec and attach upgrade the connection to WebSocket).
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert)(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert)(e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key)(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca)(e.to_string()))? {
                let c = c.map_err(|e| file_err(ca)(e.to_string()))?;
                roots.add(c).map_err(|e| file_err(ca)(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| file_err(ca)(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        // No client CA: nobody can authenticate, every request gets 401 (upstream with x509 auth off and
        // anonymous auth disabled).
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
