//! How every Windlass component builds its Kubernetes API client: from a kubeconfig file, or (with none given)
//! from kube-rs's inference (in-cluster service account, then `$KUBECONFIG` / `~/.kube/config`), announcing
//! itself with a User-Agent.
//!
//! The User-Agent matters beyond logs: the API server records its product (`windlass-kubelet` of
//! `windlass-kubelet/v0.1.0`) as the field manager of writes that name none, as upstream's components send
//! `kubelet/v1.x ...`. kube-rs sends no User-Agent by itself.

use std::path::{Path, PathBuf};

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("no API server configuration (no kubeconfig given, not in a cluster, no default config): {0}")]
    NoConfig(String),
    #[error("{0:?} cannot be a User-Agent")]
    UserAgent(String),
    #[error("cannot build the API client: {0}")]
    Client(#[source] kube::Error),
}

/// The client configuration `kubeconfig` (or, when `None`, kube-rs's inference) gives, with the User-Agent
/// `<product>/v<version>` added.
pub async fn config(kubeconfig: Option<&Path>, product: &str) -> Result<kube::Config, ClientError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let err = |message: String| ClientError::Kubeconfig {
                path: path.to_path_buf(),
                message,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| err(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| ClientError::NoConfig(e.to_string()))?,
    };
    let user_agent = format!("{product}/v{}", env!("CARGO_PKG_VERSION"));
    let value = http::HeaderValue::from_str(&user_agent)
        .map_err(|_| ClientError::UserAgent(user_agent.clone()))?;
    config.headers.push((http::header::USER_AGENT, value));
    Ok(config)
}

/// A client from [`config`].
pub async fn client(kubeconfig: Option<&Path>, product: &str) -> Result<kube::Client, ClientError> {
    kube::Client::try_from(config(kubeconfig, product).await?).map_err(ClientError::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: \"https://127.0.0.1:6443\", insecure-skip-tls-verify: true}
users:
- name: u
  user: {token: abc}
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
";

    #[tokio::test]
    async fn the_product_and_version_become_the_user_agent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, KUBECONFIG).expect("write kubeconfig");
        let config = config(Some(&path), "windlass-test").await.expect("config");
        assert_eq!(config.cluster_url.to_string(), "https://127.0.0.1:6443/");
        let agents: Vec<_> = config
            .headers
            .iter()
            .filter(|(name, _)| name == http::header::USER_AGENT)
            .map(|(_, value)| value.to_str().expect("ASCII"))
            .collect();
        assert_eq!(
            agents,
            [concat!("windlass-test/v", env!("CARGO_PKG_VERSION"))]
        );
    }

    #[tokio::test]
    async fn a_missing_or_broken_kubeconfig_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("nope");
        match config(Some(&missing), "t").await {
            Err(ClientError::Kubeconfig { path, .. }) => assert_eq!(path, missing),
            other => panic!("expected a kubeconfig error, got {:?}", other.map(|_| ())),
        }
        let broken = dir.path().join("broken");
        std::fs::write(&broken, "current-context: [").expect("write");
        assert!(matches!(
            config(Some(&broken), "t").await,
            Err(ClientError::Kubeconfig { .. })
        ));
    }

    #[tokio::test]
    async fn a_product_that_is_no_header_value_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, KUBECONFIG).expect("write kubeconfig");
        assert!(matches!(
            config(Some(&path), "bad\nagent").await,
            Err(ClientError::UserAgent(_))
        ));
    }
}
