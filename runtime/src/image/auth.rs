//! Registry credentials from a `dockerconfigjson` (the format of `imagePullSecrets` and `~/.docker/config.json`).
//!
//! Ref: Kubernetes `credentialprovider` (DockerConfigJSON): keys may be `host`, `host:port`, `https://host/v1/`
//! and the like; Docker Hub's key is `https://index.docker.io/v1/`. `auth` is base64(`user:password`) and wins over
//! `username`/`password`; `registrytoken`/`identitytoken` become bearer tokens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// Why a credentials file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse {path} as dockerconfigjson: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("credentials for `{registry}` in {path}: `auth` is not base64 of `user:password`")]
    BadAuthField { registry: String, path: PathBuf },
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, alias = "registrytoken")]
    registry_token: Option<String>,
    #[serde(default, alias = "identitytoken")]
    identity_token: Option<String>,
}

/// Credentials per registry host, loaded from one dockerconfigjson file.
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    by_host: HashMap<String, RegistryAuth>,
}

/// `https://index.docker.io/v1/` → `index.docker.io`; `registry.lab:5000` stays.
fn host_of(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    k.split('/').next().unwrap_or(k).to_string()
}

impl Credentials {
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let bytes = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&bytes, path)
    }

    /// Parses the bytes of a `kubernetes.io/dockerconfigjson` secret; `source` only names it in errors.
    pub fn from_json(bytes: &[u8], source: &Path) -> Result<Self, AuthError> {
        let path = source;
        // Accept both `{"auths": {...}}` and the legacy `.dockercfg` shape (the map itself).
        let parsed: DockerConfigJson = match serde_json::from_slice::<DockerConfigJson>(bytes) {
            Ok(c) if !c.auths.is_empty() => c,
            _ => DockerConfigJson {
                auths: serde_json::from_slice(bytes).map_err(|source| AuthError::Parse {
                    path: path.to_path_buf(),
                    source,
                })?,
            },
        };
        let mut by_host = HashMap::new();
        for (key, entry) in parsed.auths {
            let host = host_of(&key);
            let auth = if let Some(token) = entry.registry_token.or(entry.identity_token) {
                RegistryAuth::Bearer(token)
            } else if let Some(b64) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .ok()
                    .and_then(|d| String::from_utf8(d).ok())
                    .and_then(|s| {
                        s.split_once(':')
                            .map(|(u, p)| (u.to_string(), p.to_string()))
                    })
                    .ok_or_else(|| AuthError::BadAuthField {
                        registry: key.clone(),
                        path: path.to_path_buf(),
                    })?;
                RegistryAuth::Basic(decoded.0, decoded.1)
            } else if let (Some(u), Some(p)) = (entry.username, entry.password) {
                RegistryAuth::Basic(u, p)
            } else {
                continue;
            };
            by_host.insert(host, auth);
        }
        Ok(Self { by_host })
    }

    /// Adds `other`'s credentials; for a registry both name, the earlier (self) wins, as the kubelet tries
    /// imagePullSecrets in order.
    pub fn merge(&mut self, other: Credentials) {
        for (host, auth) in other.by_host {
            self.by_host.entry(host).or_insert(auth);
        }
    }

    /// Credentials for `registry` (as in a normalised reference, e.g. `docker.io` or `127.0.0.1:5000`).
    pub fn for_registry(&self, registry: &str) -> RegistryAuth {
        let aliases: &[&str] = if registry == "docker.io" || registry == "index.docker.io" {
            &["index.docker.io", "docker.io", "registry-1.docker.io"]
        } else {
            &[]
        };
        std::iter::once(registry)
            .chain(aliases.iter().copied())
            .find_map(|h| self.by_host.get(h).cloned())
            .unwrap_or(RegistryAuth::Anonymous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_field_and_hub_key_are_understood() {
        let json = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},
            "registry.lab:5000":{"username":"a","password":"b"}}}"#;
        let c = Credentials::from_json(json, Path::new("x")).expect("parse");
        assert_eq!(
            c.for_registry("docker.io"),
            RegistryAuth::Basic("user".into(), "pass".into())
        );
        assert_eq!(
            c.for_registry("registry.lab:5000"),
            RegistryAuth::Basic("a".into(), "b".into())
        );
        assert_eq!(c.for_registry("other"), RegistryAuth::Anonymous);
    }
}
