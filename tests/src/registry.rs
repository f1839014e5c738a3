//! A private Debian `docker-registry` on 127.0.0.1 for image tests: its own config, storage and free port in a
//! temp dir, killed on drop. Optionally with TLS (a throwaway CA and server certificate made with `openssl`) and
//! htpasswd basic auth, which the registry only allows over TLS.

use std::fs;
use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{run_ok, wait_for, ChildGuard, TempDir};

/// Credentials and the CA a client must trust to reach a TLS registry.
pub struct RegistryTls {
    pub ca_pem: PathBuf,
    pub user: String,
    pub password: String,
}

/// A running registry.
pub struct Registry {
    // Field order: the process dies before its directory is removed.
    _child: ChildGuard,
    dir: TempDir,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    pub tls: Option<RegistryTls>,
    /// The `ip netns` name the registry listens in, if not the test's own namespace.
    netns: Option<String>,
}

fn free_port() -> io::Result<u16> {
    Ok(crate::free_port())
}

fn make_certs(dir: &Path) -> PathBuf {
    let ca_key = dir.join("ca.key");
    let ca = dir.join("ca.pem");
    let key = dir.join("server.key");
    let csr = dir.join("server.csr");
    let cert = dir.join("server.pem");
    let ext = dir.join("server.ext");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca)
            .args(["-days", "2", "-subj", "/CN=windlass test CA"]),
    );
    run_ok(
        Command::new("openssl")
            .arg("req")
            .args(ec)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .args(["-subj", "/CN=127.0.0.1"]),
    );
    // A CA-signed leaf: webpki refuses a self-signed CA certificate used as the server's own certificate.
    fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write openssl extensions");
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-CAcreateserial", "-days", "2", "-out"])
            .arg(&cert)
            .arg("-extfile")
            .arg(&ext),
    );
    ca
}

impl Registry {
    /// A plain-HTTP registry (pull with `--insecure-registry`).
    pub fn start() -> io::Result<Self> {
        Self::launch(None, None)
    }

    /// A plain-HTTP registry on the loopback of network namespace `netns` (an `ip netns` name), for a node that
    /// lives there; [`Registry::push`] then runs skopeo in that namespace too.
    pub fn start_in_netns(netns: &str) -> io::Result<Self> {
        Self::launch(None, Some(netns.to_string()))
    }

    fn command(netns: Option<&str>, program: &str) -> Command {
        match netns {
            None => Command::new(program),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
        }
    }

    /// A registry serving TLS with a fresh CA and requiring `user`/`password` (htpasswd, bcrypt).
    pub fn start_tls_auth(user: &str, password: &str) -> io::Result<Self> {
        Self::launch(Some((user, password)), None)
    }

    fn launch(auth: Option<(&str, &str)>, netns: Option<String>) -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("windlass-registry-")
            .tempdir()?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.path().join("storage");
        fs::create_dir(&storage)?;
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            storage.display()
        );
        let mut tls = None;
        if let Some((user, password)) = auth {
            let ca_pem = make_certs(dir.path());
            let hash = bcrypt::hash(password, 5).map_err(io::Error::other)?;
            fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n"))?;
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: windlass-test\n    path: {}\n",
                dir.path().join("server.pem").display(),
                dir.path().join("server.key").display(),
                dir.path().join("htpasswd").display()
            ));
            tls = Some(RegistryTls {
                ca_pem,
                user: user.into(),
                password: password.into(),
            });
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config)?;
        let log = fs::File::create(dir.path().join("registry.log"))?;
        let child = ChildGuard::spawn(
            Self::command(netns.as_deref(), "docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        wait_for(
            "the registry to listen",
            Duration::from_secs(20),
            || match &netns {
                None => TcpStream::connect(&addr).ok().map(drop),
                Some(ns) => crate::lab::in_netns(&Path::new("/run/netns").join(ns), || {
                    TcpStream::connect(&addr).ok().map(drop)
                })
                .ok()
                .flatten(),
            },
        );
        Ok(Self {
            _child: child,
            dir,
            addr,
            tls,
            netns,
        })
    }

    /// The registry's log (access log lines included).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many successful `GET`s of blob `digest` the registry served.
    pub fn blob_downloads(&self, digest: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                l.contains("\"GET /v2/")
                    && l.contains(&format!("/blobs/{digest} "))
                    && l.contains("\" 200 ")
            })
            .count()
    }

    /// Pushes `oci:<layout>:<tag>` to `<addr>/<repo_tag>` with skopeo (Docker schema2 when `v2s2`; `--all` so
    /// an index is pushed with every manifest).
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str, v2s2: bool) {
        let mut cmd = Self::command(self.netns.as_deref(), "skopeo");
        cmd.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"]);
        if v2s2 {
            cmd.args(["--format", "v2s2"]);
        }
        if let Some(tls) = &self.tls {
            cmd.arg("--dest-creds")
                .arg(format!("{}:{}", tls.user, tls.password));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.addr));
        run_ok(&mut cmd);
    }
}
