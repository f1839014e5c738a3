//! Who may use the kubelet API. Authentication: client certificates signed by `--client-ca-file` (CN is the user,
//! each O a group), anonymous requests refused. Authorization as upstream's `Webhook` mode (Ref: kubelet
//! `pkg/kubelet/server/auth.go`): every request maps to the attributes `<verb> nodes/<subresource> <node name>`
//! and the API server decides with a `SubjectAccessReview`; decisions are cached briefly (upstream's defaults:
//! 5 minutes for allowed, 30 seconds for denied).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use x509_parser::prelude::{FromDer, X509Certificate};

const ALLOWED_TTL: Duration = Duration::from_secs(300);
const DENIED_TTL: Duration = Duration::from_secs(30);
/// Entries kept at most; the cache is cleared when full (callers are few: the API server, monitoring).
const CACHE_MAX: usize = 4096;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    /// The user of a verified client certificate (DER).
    pub(crate) fn from_certificate(der: &[u8]) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let subject = cert.subject();
        let name = subject.iter_common_name().next()?.as_str().ok()?;
        if name.is_empty() {
            return None;
        }
        let mut groups: Vec<String> = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(String::from))
            .collect();
        groups.push("system:authenticated".into());
        Some(Self {
            name: name.to_string(),
            groups,
        })
    }
}

/// What a kubelet API request does, in authorization terms: `verb` on `nodes/<subresource>` named `node`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeAttributes {
    pub verb: String,
    pub node: String,
    pub subresource: String,
}

impl NodeAttributes {
    /// Upstream's mapping: the HTTP method gives the verb; the path the subresource (`/stats/*` → `stats`,
    /// `/metrics*` → `metrics`, `/logs/*` → `log`, everything else — logs of containers, exec, attach,
    /// port-forward, healthz — → `proxy`).
    pub fn for_request(method: &http::Method, path: &str, node: &str) -> Self {
        let verb = match *method {
            http::Method::POST => "create",
            http::Method::PUT => "update",
            http::Method::PATCH => "patch",
            http::Method::DELETE => "delete",
            _ => "get",
        };
        let under = |p: &str| path == p || path.starts_with(&format!("{p}/"));
        let subresource = if under("/stats") {
            "stats"
        } else if under("/metrics") {
            "metrics"
        } else if under("/logs") {
            "log"
        } else if under("/spec") {
            "spec"
        } else {
            "proxy"
        };
        Self {
            verb: verb.into(),
            node: node.into(),
            subresource: subresource.into(),
        }
    }
}

/// An authorization decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

/// The authorizer could not decide (the API server is unreachable, ...).
#[derive(Debug, thiserror::Error)]
#[error("authorization failed: {0}")]
pub struct AuthorizerError(pub String);

/// Decides whether a user may do something to this node.
#[async_trait::async_trait]
pub trait Authorizer: Send + Sync {
    async fn authorize(
        &self,
        user: &UserInfo,
        attrs: &NodeAttributes,
    ) -> Result<Decision, AuthorizerError>;
}

/// Upstream's webhook mode: asks the API server with a `SubjectAccessReview`.
pub struct SarAuthorizer {
    client: kube::Client,
}

impl SarAuthorizer {
    /// `client` authenticates as this kubelet (it needs `create subjectaccessreviews`, which `system:node` has).
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

#[async_trait::async_trait]
impl Authorizer for SarAuthorizer {
    async fn authorize(
        &self,
        user: &UserInfo,
        attrs: &NodeAttributes,
    ) -> Result<Decision, AuthorizerError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                groups: Some(user.groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(attrs.verb.clone()),
                    group: Some(String::new()),
                    version: Some("v1".into()),
                    resource: Some("nodes".into()),
                    subresource: Some(attrs.subresource.clone()),
                    name: Some(attrs.node.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: kube::Api<SubjectAccessReview> = kube::Api::all(self.client.clone());
        let done = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| AuthorizerError(e.to_string()))?;
        let status = done.status.unwrap_or_default();
        Ok(Decision {
            allowed: status.allowed && !status.denied.unwrap_or(false),
            reason: status.reason.unwrap_or_default(),
        })
    }
}

/// Caches another authorizer's decisions (errors are not cached).
pub(crate) struct CachingAuthorizer {
    inner: std::sync::Arc<dyn Authorizer>,
    cache: Mutex<HashMap<(UserInfo, NodeAttributes), (Decision, Instant)>>,
}

impl CachingAuthorizer {
    pub fn new(inner: std::sync::Arc<dyn Authorizer>) -> Self {
        Self {
            inner,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn authorize(
        &self,
        user: &UserInfo,
        attrs: &NodeAttributes,
    ) -> Result<Decision, AuthorizerError> {
        let key = (user.clone(), attrs.clone());
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((d, at)) = cache.get(&key) {
                let ttl = if d.allowed { ALLOWED_TTL } else { DENIED_TTL };
                if at.elapsed() < ttl {
                    return Ok(d.clone());
                }
            }
        }
        let d = self.inner.authorize(user, attrs).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, (d.clone(), Instant::now()));
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn paths_map_to_upstreams_node_subresources() {
        let a = |m: http::Method, p: &str| {
            let a = NodeAttributes::for_request(&m, p, "n1");
            (a.verb, a.subresource)
        };
        assert_eq!(
            a(http::Method::GET, "/stats/summary"),
            ("get".into(), "stats".into())
        );
        assert_eq!(
            a(http::Method::GET, "/metrics"),
            ("get".into(), "metrics".into())
        );
        assert_eq!(
            a(http::Method::GET, "/containerLogs/ns/p/c"),
            ("get".into(), "proxy".into())
        );
        assert_eq!(
            a(http::Method::POST, "/exec/ns/p/c"),
            ("create".into(), "proxy".into())
        );
        assert_eq!(
            a(http::Method::GET, "/logs/messages"),
            ("get".into(), "log".into())
        );
        assert_eq!(
            a(http::Method::GET, "/statsx"),
            ("get".into(), "proxy".into())
        );
    }

    struct Counting(AtomicUsize);

    #[async_trait::async_trait]
    impl Authorizer for Counting {
        async fn authorize(
            &self,
            user: &UserInfo,
            _: &NodeAttributes,
        ) -> Result<Decision, AuthorizerError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(Decision {
                allowed: user.name == "admin",
                reason: String::new(),
            })
        }
    }

    #[tokio::test]
    async fn decisions_are_cached_per_user_and_attributes() {
        let inner = Arc::new(Counting(AtomicUsize::new(0)));
        let c = CachingAuthorizer::new(inner.clone());
        let admin = UserInfo {
            name: "admin".into(),
            groups: vec![],
        };
        let bob = UserInfo {
            name: "bob".into(),
            groups: vec![],
        };
        let attrs = NodeAttributes::for_request(&http::Method::GET, "/healthz", "n1");
        assert!(c.authorize(&admin, &attrs).await.unwrap().allowed);
        assert!(c.authorize(&admin, &attrs).await.unwrap().allowed);
        assert!(!c.authorize(&bob, &attrs).await.unwrap().allowed);
        assert!(!c.authorize(&bob, &attrs).await.unwrap().allowed);
        assert_eq!(inner.0.load(Ordering::SeqCst), 2);
    }
}
