//! First-start PKI: a cluster CA, the API server's serving certificate and an admin client certificate, plus
//! `admin.kubeconfig`, so `windlass-control serve --data-dir DIR` needs no other flag (as `kubeadm init` does).
//!
//! Layout under the data directory: `pki/ca.{crt,key}`, `pki/apiserver.{crt,key}`, `pki/admin.{crt,key}`,
//! `pki/apiserver-kubelet-client.{crt,key}` (the API server's identity towards kubelets, CN
//! `kube-apiserver-kubelet-client` in `system:masters`, as kubeadm issues it),
//! `pki/controller-manager.{crt,key}` (CN `system:kube-controller-manager`), `pki/scheduler.{crt,key}` (CN
//! `system:kube-scheduler`) (keys mode 0600), and `admin.kubeconfig`, `controller-manager.kubeconfig`,
//! `scheduler.kubeconfig` (rewritten on every start so they name the current address). Existing files are
//! reused: the CA is created once and never replaced; component certificates missing from an older data
//! directory are issued from it.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// What went wrong setting up certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate certificate {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
}

/// The user name of the API server's client certificate towards kubelets (kubeadm's name).
pub const KUBELET_CLIENT_USER: &str = "kube-apiserver-kubelet-client";

/// Paths of the PEM files the server needs.
#[derive(Clone, Debug)]
pub struct PkiPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub admin_kubeconfig: PathBuf,
    /// The client certificate the API server presents to kubelets (logs, exec, port-forward).
    pub kubelet_client_cert: PathBuf,
    pub kubelet_client_key: PathBuf,
    /// Kubeconfig of the in-process controller manager (user `system:kube-controller-manager`).
    pub controller_manager_kubeconfig: PathBuf,
    /// Kubeconfig of the in-process scheduler (user `system:kube-scheduler`).
    pub scheduler_kubeconfig: PathBuf,
}

/// The in-process components with their own identity, as kubeadm gives them: (file stem, user / CN).
const COMPONENTS: [(&str, &str); 2] = [
    ("controller-manager", "system:kube-controller-manager"),
    ("scheduler", "system:kube-scheduler"),
];

impl PkiPaths {
    pub fn new(data_dir: &Path) -> Self {
        let pki = data_dir.join("pki");
        Self {
            ca_cert: pki.join("ca.crt"),
            ca_key: pki.join("ca.key"),
            serving_cert: pki.join("apiserver.crt"),
            serving_key: pki.join("apiserver.key"),
            admin_cert: pki.join("admin.crt"),
            admin_key: pki.join("admin.key"),
            admin_kubeconfig: data_dir.join("admin.kubeconfig"),
            kubelet_client_cert: pki.join("apiserver-kubelet-client.crt"),
            kubelet_client_key: pki.join("apiserver-kubelet-client.key"),
            controller_manager_kubeconfig: data_dir.join("controller-manager.kubeconfig"),
            scheduler_kubeconfig: data_dir.join("scheduler.kubeconfig"),
        }
    }
}

fn write(path: &Path, data: &str, mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    // Write to a temporary name and rename, so a crash never leaves a half-written key or kubeconfig.
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn gen(what: &'static str) -> impl Fn(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { what, source }
}

fn name(cn: &str, orgs: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for o in orgs {
        dn.push(DnType::OrganizationName, *o);
    }
    dn.push(DnType::CommonName, cn);
    dn
}

/// The host's own addresses and name, for the serving certificate's SANs.
pub fn host_sans() -> Vec<String> {
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            sans.push(h.to_string());
        }
    }
    if let Ok(addrs) = if_addrs::get_if_addrs() {
        sans.extend(addrs.into_iter().map(|a| a.ip().to_string()));
    }
    sans
}

/// Creates whatever is missing of the CA, serving and admin certificates; (re)writes `admin.kubeconfig` for
/// `server_url`. `extra_sans` are added to the serving certificate when it is first created.
pub fn ensure(
    data_dir: &Path,
    extra_sans: &[String],
    server_url: &str,
) -> Result<PkiPaths, PkiError> {
    let paths = PkiPaths::new(data_dir);
    if !paths.ca_cert.exists() || !paths.ca_key.exists() {
        tracing::info!(dir = %data_dir.display(), "creating cluster CA and certificates");
        let ca_key = KeyPair::generate().map_err(gen("CA key"))?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = name("windlass-ca", &[]);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).map_err(gen("CA"))?;
        let issuer = Issuer::new(ca, ca_key);

        let mut sans: Vec<String> = host_sans();
        // The in-cluster `kubernetes` service name, as kubeadm puts it in the serving certificate.
        sans.extend(
            [
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ]
            .map(String::from),
        );
        sans.extend(extra_sans.iter().cloned());
        sans.sort();
        sans.dedup();
        let serving_key = KeyPair::generate().map_err(gen("serving key"))?;
        let mut serving = CertificateParams::new(sans).map_err(gen("serving"))?;
        serving.distinguished_name = name("windlass-apiserver", &[]);
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        serving.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let serving_cert = serving
            .signed_by(&serving_key, &issuer)
            .map_err(gen("serving"))?;

        let (admin_cert, admin_key) = client_cert(&issuer, "admin", &["system:masters"])?;

        write(&paths.ca_key, &issuer.key().serialize_pem(), 0o600)?;
        write(&paths.serving_key, &serving_key.serialize_pem(), 0o600)?;
        write(&paths.serving_cert, &serving_cert.pem(), 0o644)?;
        write(&paths.admin_key, &admin_key, 0o600)?;
        write(&paths.admin_cert, &admin_cert, 0o644)?;
        // The CA certificate last: its presence marks the set as complete.
        write(&paths.ca_cert, &ca_cert.pem(), 0o644)?;
    }
    if !paths.kubelet_client_cert.exists() || !paths.kubelet_client_key.exists() {
        // Also for a data directory made before this certificate existed: issue it from the CA.
        let ca_pem = read(&paths.ca_cert)?;
        let ca_key = KeyPair::from_pem(&read(&paths.ca_key)?).map_err(gen("CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(gen("CA"))?;
        let (cert, key) = client_cert(&issuer, KUBELET_CLIENT_USER, &["system:masters"])?;
        write(&paths.kubelet_client_key, &key, 0o600)?;
        write(&paths.kubelet_client_cert, &cert, 0o644)?;
    }
    let kubeconfig = kubeconfig(
        server_url,
        &read(&paths.ca_cert)?,
        &read(&paths.admin_cert)?,
        &read(&paths.admin_key)?,
        "admin",
    );
    write(&paths.admin_kubeconfig, &kubeconfig, 0o600)?;
    ensure_components(data_dir, &paths, server_url)?;
    Ok(paths)
}

/// Issues the controller manager's and scheduler's client certificates if missing and writes their kubeconfigs.
fn ensure_components(data_dir: &Path, paths: &PkiPaths, server_url: &str) -> Result<(), PkiError> {
    let ca_pem = read(&paths.ca_cert)?;
    for (stem, user) in COMPONENTS {
        let cert_path = data_dir.join("pki").join(format!("{stem}.crt"));
        let key_path = data_dir.join("pki").join(format!("{stem}.key"));
        if !cert_path.exists() || !key_path.exists() {
            let ca_key = KeyPair::from_pem(&read(&paths.ca_key)?).map_err(gen("CA key"))?;
            let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(gen("CA"))?;
            let (cert, key) = client_cert(&issuer, user, &[])?;
            write(&key_path, &key, 0o600)?;
            write(&cert_path, &cert, 0o644)?;
        }
        let kc = kubeconfig(
            server_url,
            &ca_pem,
            &read(&cert_path)?,
            &read(&key_path)?,
            user,
        );
        write(&data_dir.join(format!("{stem}.kubeconfig")), &kc, 0o600)?;
    }
    Ok(())
}

/// A client certificate (PEM cert, PEM key) for `user` in `groups`, signed by the CA.
fn client_cert(
    issuer: &Issuer<'_, KeyPair>,
    user: &str,
    groups: &[&str],
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(gen("client key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(user, groups);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params.signed_by(&key, issuer).map_err(gen("client"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues a client certificate for `user`/`groups` from the CA in `data_dir` and writes a kubeconfig for it.
pub fn issue_client_kubeconfig(
    data_dir: &Path,
    user: &str,
    groups: &[&str],
    server_url: &str,
    out: &Path,
) -> Result<(), PkiError> {
    let paths = PkiPaths::new(data_dir);
    let ca_pem = read(&paths.ca_cert)?;
    let ca_key = KeyPair::from_pem(&read(&paths.ca_key)?).map_err(gen("CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(gen("CA"))?;
    let (cert, key) = client_cert(&issuer, user, groups)?;
    write(
        out,
        &kubeconfig(server_url, &ca_pem, &cert, &key, user),
        0o600,
    )
}

fn kubeconfig(server: &str, ca: &str, cert: &str, key: &str, user: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: windlass
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {user}@windlass
  context:
    cluster: windlass
    user: {user}
current-context: {user}@windlass
",
        ca = b64(ca),
        cert = b64(cert),
        key = b64(key),
    )
}

/// The URL clients should use for a server bound to `bind` on `port` (loopback when bound to all addresses).
pub fn server_url(bind: IpAddr, port: u16) -> String {
    let host = if bind.is_unspecified() {
        "127.0.0.1".to_string()
    } else if bind.is_ipv6() {
        format!("[{bind}]")
    } else {
        bind.to_string()
    };
    format!("https://{host}:{port}")
}
