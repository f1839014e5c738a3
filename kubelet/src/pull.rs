//! The kubelet's side of image pulls: whether to pull (`imagePullPolicy`), which credentials from
//! `imagePullSecrets` apply to an image, and the waiting reasons a failed pull leaves. The pull itself is the image
//! store's job.
//!
//! Ref: upstream `pkg/kubelet/images/image_manager.go` (`shouldPullImage`, `ErrImageNeverPull` message),
//! `pkg/apis/core/v1/defaults.go` (pull policy defaulting), `pkg/credentialprovider` (`.dockerconfigjson`
//! parsing and the keyring's registry matching: glob hosts, ports, path prefixes, Docker Hub aliases).

use std::collections::BTreeMap;

use base64::Engine;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `docker.io`, `127.0.0.1:5000`, ...
    pub registry: String,
    /// `library/busybox`, `test/busybox`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses like Docker's reference normalization: no registry means Docker Hub (`library/` for one-element
    /// names); the first element is a registry when it has a `.` or `:` or is `localhost`.
    pub fn parse(image: &str) -> Result<Self, String> {
        let image = image.trim();
        if image.is_empty() || image.contains(char::is_whitespace) {
            return Err(format!("invalid image reference {image:?}"));
        }
        let (rest, digest) = match image.split_once('@') {
            Some((r, d)) => (r, Some(d.to_string())),
            None => (image, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => ("docker.io".to_string(), rest.to_string()),
        };
        // A tag is after the last ':' of the last path element.
        let last = path.rsplit('/').next().unwrap_or(&path);
        let (repository, tag) = match last.rsplit_once(':') {
            Some((_, tag)) => (
                path[..path.len() - tag.len() - 1].to_string(),
                Some(tag.to_string()),
            ),
            None => (path.clone(), None),
        };
        let repository = if registry == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty() {
            return Err(format!("invalid image reference {image:?}"));
        }
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

/// The effective pull policy: the container's, or the API default (`Always` for `:latest` or untagged images
/// without a digest, `IfNotPresent` otherwise).
pub fn pull_policy<'a>(image: &str, policy: Option<&'a str>) -> &'a str {
    match policy.filter(|p| !p.is_empty()) {
        Some(p) => p,
        None => match ImageRef::parse(image) {
            Ok(r) if r.digest.is_none() && r.tag.as_deref().is_none_or(|t| t == "latest") => {
                "Always"
            }
            _ => "IfNotPresent",
        },
    }
}

/// Whether to pull; `Err` is the `ErrImageNeverPull` message.
pub fn should_pull(image: &str, policy: Option<&str>, present: bool) -> Result<bool, String> {
    match pull_policy(image, policy) {
        "Always" => Ok(true),
        "Never" if !present => Err(format!(
            "Container image \"{image}\" is not present with pull policy of Never"
        )),
        "Never" => Ok(false),
        _ => Ok(!present),
    }
}

/// One credential from a pull secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The key it was filed under (`registry.example.com`, `*.example.com`, `https://index.docker.io/v1/`).
    pub key: String,
    pub username: String,
    pub password: String,
}

/// Parses a `kubernetes.io/dockerconfigjson` secret's `.dockerconfigjson` (`{"auths": {...}}`) or a legacy
/// `kubernetes.io/dockercfg` `.dockercfg` (the map itself). Entries carry `username`/`password` or `auth`
/// (base64 `user:password`).
pub fn parse_docker_config(data: &[u8]) -> Result<Vec<Credential>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| format!("invalid docker config JSON: {e}"))?;
    let auths = v.get("auths").unwrap_or(&v);
    let obj = auths
        .as_object()
        .ok_or("docker config has no \"auths\" object")?;
    let mut out = Vec::new();
    for (key, entry) in obj {
        let s = |k: &str| {
            entry
                .get(k)
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .to_string()
        };
        let (mut username, mut password) = (s("username"), s("password"));
        let auth = s("auth");
        if !auth.is_empty() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| format!("auth for {key} is not base64: {e}"))?;
            let text = String::from_utf8_lossy(&decoded).into_owned();
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| format!("auth for {key} is not user:password"))?;
            username = u.to_string();
            password = p.to_string();
        }
        out.push(Credential {
            key: key.clone(),
            username,
            password,
        });
    }
    Ok(out)
}

/// Docker Hub's names for itself.
const DOCKER_HUB: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

/// `(host, port, path)` of a keyring key or an image's `registry/repository`.
fn split_key(key: &str) -> (String, String, String) {
    let key = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let (hostport, path) = key.split_once('/').unwrap_or((key, ""));
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => (h, p),
        _ => (hostport, ""),
    };
    (
        host.to_lowercase(),
        port.to_string(),
        path.trim_end_matches('/').to_string(),
    )
}

/// Host glob match per label (`*.example.com` matches `a.example.com`, not `a.b.example.com`).
fn host_matches(pattern: &str, host: &str) -> bool {
    let (p, h): (Vec<&str>, Vec<&str>) = (pattern.split('.').collect(), host.split('.').collect());
    p.len() == h.len() && p.iter().zip(&h).all(|(p, h)| *p == "*" || p == h)
}

/// The credentials that apply to `image`, most specific key first (upstream's keyring lookup).
pub fn credentials_for(image: &ImageRef, creds: &[Credential]) -> Vec<Credential> {
    let (img_host, img_port, _) = split_key(&image.registry);
    let img_path = &image.repository;
    let mut matched: Vec<&Credential> = creds
        .iter()
        .filter(|c| {
            let (host, port, path) = split_key(&c.key);
            // "index.docker.io/v1" is Docker Hub's auth endpoint, not a repository path.
            let hub = DOCKER_HUB.contains(&host.as_str());
            let host_ok = if hub {
                DOCKER_HUB.contains(&img_host.as_str())
            } else {
                host_matches(&host, &img_host)
            };
            let path_ok = hub
                || path.is_empty()
                || img_path == &path
                || img_path.starts_with(&format!("{path}/"));
            host_ok && port == img_port && path_ok
        })
        .collect();
    matched.sort_by_key(|c| std::cmp::Reverse(c.key.len()));
    matched.into_iter().cloned().collect()
}

/// Pull secrets' credentials gathered from several secrets' data (`.dockerconfigjson` or `.dockercfg` keys).
pub fn credentials_from_secrets<'a>(
    secrets: impl IntoIterator<Item = &'a BTreeMap<String, Vec<u8>>>,
) -> Result<Vec<Credential>, String> {
    let mut out = Vec::new();
    for data in secrets {
        if let Some(d) = data
            .get(".dockerconfigjson")
            .or_else(|| data.get(".dockercfg"))
        {
            out.extend(parse_docker_config(d)?);
        }
    }
    Ok(out)
}

/// The waiting message upstream shows while backing off a failed pull.
pub fn image_pull_back_off_message(image: &str) -> String {
    format!("Back-off pulling image \"{image}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize_like_docker() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag),
            ("docker.io", "library/busybox", None)
        );
        let r = ImageRef::parse("127.0.0.1:5000/test/busybox:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "test/busybox")
        );
        assert_eq!(r.tag.as_deref(), Some("v1"));
        let r = ImageRef::parse("localhost/app@sha256:abc").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.digest.as_deref()),
            ("localhost", Some("sha256:abc"))
        );
        let r = ImageRef::parse("bitnami/nginx:1.25").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "bitnami/nginx")
        );
        assert!(ImageRef::parse("").is_err());
        assert!(ImageRef::parse("a b").is_err());
    }

    #[test]
    fn pull_policy_defaults_and_decisions_follow_upstream() {
        assert_eq!(pull_policy("busybox", None), "Always");
        assert_eq!(pull_policy("busybox:latest", None), "Always");
        assert_eq!(pull_policy("busybox:1.36", None), "IfNotPresent");
        assert_eq!(pull_policy("busybox@sha256:abc", None), "IfNotPresent");
        assert_eq!(pull_policy("busybox", Some("Never")), "Never");
        assert_eq!(should_pull("busybox:1", None, true), Ok(false));
        assert_eq!(should_pull("busybox:1", None, false), Ok(true));
        assert_eq!(should_pull("busybox:1", Some("Always"), true), Ok(true));
        assert_eq!(should_pull("busybox:1", Some("Never"), true), Ok(false));
        assert_eq!(
            should_pull("busybox:1", Some("Never"), false),
            Err("Container image \"busybox:1\" is not present with pull policy of Never".into())
        );
    }

    #[test]
    fn pull_secret_credentials_match_registries_like_the_keyring() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:pw2");
        let cfg = format!(
            r#"{{"auths":{{
                "https://index.docker.io/v1/":{{"username":"hub","password":"pw0"}},
                "127.0.0.1:5000":{{"username":"alice","password":"pw1"}},
                "127.0.0.1:5000/team":{{"auth":"{auth}"}},
                "*.example.com":{{"username":"wild","password":"pw3"}}
            }}}}"#
        );
        let secret = BTreeMap::from([(".dockerconfigjson".to_string(), cfg.into_bytes())]);
        let creds = credentials_from_secrets([&secret]).unwrap();
        assert_eq!(creds.len(), 4);
        let users = |image: &str| {
            credentials_for(&ImageRef::parse(image).unwrap(), &creds)
                .into_iter()
                .map(|c| c.username)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            users("127.0.0.1:5000/team/app:v1"),
            vec!["bob", "alice"],
            "most specific first"
        );
        assert_eq!(users("127.0.0.1:5000/other/app:v1"), vec!["alice"]);
        assert_eq!(
            users("127.0.0.1:5001/team/app"),
            Vec::<String>::new(),
            "port must match"
        );
        assert_eq!(users("busybox"), vec!["hub"]);
        assert_eq!(users("registry.example.com/x"), vec!["wild"]);
        assert_eq!(
            users("a.b.example.com/x"),
            Vec::<String>::new(),
            "one label per *"
        );
        assert!(parse_docker_config(br#"{"auths":{"r":{"auth":"!!"}}}"#).is_err());
    }
}
