//! Service-account tokens for projected volumes: requested through the API's TokenRequest for the pod's service
//! account, bound to the pod (name and UID), cached, and replaced once older than 80 % of their lifetime or 24 h,
//! whichever comes first (with up to 10 s of jitter), as upstream's token manager does. A failed refresh keeps
//! serving the cached token while it is still valid.
//!
//! Ref: upstream `pkg/kubelet/token/token_manager.go` (`GetServiceAccountToken`, `requiresRefresh`, `keyFunc`,
//! `DeleteServiceAccountToken`) and `pkg/volume/projected/projected.go` (`collectData`: audience, expiration,
//! `boundObjectRef`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::volumes::{token_expiration_seconds, TokenSource};

/// Upstream `maxTTL`: a token is replaced after a day even if it lives longer.
const MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Upstream `maxJitter`: refreshes are spread by up to this much (earlier, never later).
const MAX_JITTER: Duration = Duration::from_secs(10);
/// Upstream refreshes at 80 % of a token's lifetime.
pub const DEFAULT_REFRESH_FRACTION: f64 = 0.8;

/// What identifies one cached token (upstream `keyFunc`: name, namespace, audiences, expiration, bound object).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    namespace: String,
    service_account: String,
    audience: Option<String>,
    expiration_seconds: i64,
    pod_uid: String,
}

#[derive(Debug, Clone)]
struct Cached {
    token: String,
    expires: Timestamp,
    /// The lifetime asked for (`spec.expirationSeconds` of the answer).
    ttl_seconds: i64,
}

/// The node's token cache.
#[derive(Debug)]
pub(crate) struct TokenManager {
    cache: Mutex<HashMap<Key, Cached>>,
    refresh_fraction: f64,
}

/// Whether a token issued for `ttl_seconds` and expiring at `expires` must be replaced at `now`: once
/// `refresh_fraction` of its lifetime or [`MAX_AGE`] has passed since issue, less `jitter`.
pub(crate) fn requires_refresh(
    expires: Timestamp,
    ttl_seconds: i64,
    now: Timestamp,
    refresh_fraction: f64,
    jitter: Duration,
) -> bool {
    let jitter = jitter.as_millis() as i64;
    now.as_millisecond()
        > refresh_due_ms(expires, ttl_seconds, refresh_fraction).saturating_sub(jitter)
}

/// When (Unix milliseconds) a token issued for `ttl_seconds` and expiring at `expires` is due for replacement:
/// `refresh_fraction` of its lifetime or [`MAX_AGE`] after issue, whichever comes first.
fn refresh_due_ms(expires: Timestamp, ttl_seconds: i64, refresh_fraction: f64) -> i64 {
    // In milliseconds: no overflow for any lifetime the API allows (at most 2^32 s).
    let ttl_ms = ttl_seconds.saturating_mul(1000);
    let issued = expires.as_millisecond().saturating_sub(ttl_ms);
    let refresh_after = ((ttl_ms as f64) * refresh_fraction) as i64;
    issued.saturating_add(refresh_after.min(MAX_AGE.as_millis() as i64))
}

/// A random jitter below [`MAX_JITTER`] (std's randomly keyed hasher is random enough to spread refreshes).
fn jitter() -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_millis(r % MAX_JITTER.as_millis() as u64)
}

impl TokenManager {
    pub fn new(refresh_fraction: f64) -> Self {
        Self {
            cache: Mutex::new(HashMap::new()),
            refresh_fraction,
        }
    }

    /// A valid token for `key`: the cached one unless it is due for refresh, else a new one from the API (the
    /// cached one again if that fails and it has not expired).
    async fn get(&self, client: &Client, key: Key, pod_name: &str) -> Result<String, String> {
        let now = Timestamp::now();
        let cached = self
            .cache
            .lock()
            .map_err(|_| "token cache poisoned".to_string())?
            .get(&key)
            .cloned();
        if let Some(c) = &cached {
            if !requires_refresh(
                c.expires,
                c.ttl_seconds,
                now,
                self.refresh_fraction,
                jitter(),
            ) {
                return Ok(c.token.clone());
            }
        }
        match request(client, &key, pod_name).await {
            Ok(fresh) => {
                tracing::info!(namespace = %key.namespace, service_account = %key.service_account,
                    pod = %key.pod_uid, expires = %fresh.expires, "service account token issued");
                let token = fresh.token.clone();
                if let Ok(mut cache) = self.cache.lock() {
                    cache.insert(key, fresh);
                }
                Ok(token)
            }
            Err(e) => match cached.filter(|c| now < c.expires) {
                Some(c) => {
                    tracing::warn!(namespace = %key.namespace, service_account = %key.service_account,
                        error = %e, "token refresh failed; the current token is still valid");
                    Ok(c.token)
                }
                None => Err(e),
            },
        }
    }

    /// How long until the first of the pod's cached tokens is due for refresh (zero if one is due now), `None`
    /// when the pod has none. The pod's worker resyncs by then, so a rotated token reaches its volume promptly
    /// even though the pod's safety resync is a minute or more (upstream's volume manager remounts projected
    /// volumes on its own period for the same reason).
    pub fn next_refresh(&self, pod_uid: &str) -> Option<Duration> {
        let cache = self.cache.lock().ok()?;
        let now = Timestamp::now().as_millisecond();
        cache
            .iter()
            .filter(|(k, _)| k.pod_uid == pod_uid)
            .map(|(_, c)| {
                let due = refresh_due_ms(c.expires, c.ttl_seconds, self.refresh_fraction);
                Duration::from_millis(u64::try_from(due.saturating_sub(now)).unwrap_or(0))
            })
            .min()
    }

    /// Drops the pod's tokens (upstream `DeleteServiceAccountToken` when a pod is removed).
    pub fn forget_pod(&self, pod_uid: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|k, _| k.pod_uid != pod_uid);
        }
    }

    /// Tokens for every serviceAccountToken projection of `pod`, ready for the (synchronous) volume setup.
    pub async fn for_pod(&self, client: &Client, pod: &Pod) -> PodTokens {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default");
        let mut out = PodTokens::default();
        let projections = pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter_map(|v| v.projected.as_ref())
            .flat_map(|p| p.sources.iter().flatten())
            .filter_map(|s| s.service_account_token.as_ref());
        for p in projections {
            let key = Key {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
                audience: p.audience.clone().filter(|a| !a.is_empty()),
                expiration_seconds: token_expiration_seconds(p),
                pod_uid: uid.to_string(),
            };
            let slot = (
                key.service_account.clone(),
                key.audience.clone(),
                key.expiration_seconds,
            );
            if out.tokens.contains_key(&slot) {
                continue;
            }
            let result = self.get(client, key, name).await;
            out.tokens.insert(slot, result);
        }
        out
    }
}

/// POSTs the TokenRequest, bound to the pod.
async fn request(client: &Client, key: &Key, pod_name: &str) -> Result<Cached, String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &key.namespace);
    let tr = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: key.audience.clone().map(|a| vec![a]),
            expiration_seconds: Some(key.expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod_name.to_string()),
                uid: Some(key.pod_uid.clone()),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = api
        .create_token_request(&key.service_account, &PostParams::default(), &tr)
        .await
        .map_err(|e| e.to_string())?;
    let status = answer
        .status
        .ok_or_else(|| "the TokenRequest answer has no status".to_string())?;
    let (Some(token), Some(expires)) = (status.token, status.expiration_timestamp) else {
        return Err("the TokenRequest answer has no token or expiration".into());
    };
    Ok(Cached {
        token,
        expires: expires.0,
        ttl_seconds: answer
            .spec
            .and_then(|s| s.expiration_seconds)
            .unwrap_or(key.expiration_seconds),
    })
}

/// One pod's tokens (or why each could not be had), by (service account, audience, expiration).
#[derive(Debug, Default)]
pub(crate) struct PodTokens {
    tokens: HashMap<(String, Option<String>, i64), Result<String, String>>,
}

impl TokenSource for PodTokens {
    fn service_account_token(
        &self,
        _namespace: &str,
        service_account: &str,
        audience: Option<&str>,
        expiration_seconds: i64,
    ) -> Result<Vec<u8>, String> {
        let slot = (
            service_account.to_string(),
            audience.filter(|a| !a.is_empty()).map(String::from),
            expiration_seconds,
        );
        match self.tokens.get(&slot) {
            Some(Ok(t)) => Ok(t.clone().into_bytes()),
            Some(Err(e)) => Err(e.clone()),
            None => Err("no token was requested for this projection".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn a_token_is_refreshed_after_80_percent_of_its_life_or_a_day() {
        let f = DEFAULT_REFRESH_FRACTION;
        let none = Duration::ZERO;
        // One hour token issued at 0: due at 48 min.
        let exp = at(3600);
        assert!(!requires_refresh(exp, 3600, at(2879), f, none));
        assert!(requires_refresh(exp, 3600, at(2881), f, none));
        // Jitter makes it due earlier, never later.
        assert!(requires_refresh(
            exp,
            3600,
            at(2875),
            f,
            Duration::from_secs(10)
        ));
        // A year-long token is still replaced after a day.
        let year = 365 * 24 * 3600;
        assert!(!requires_refresh(at(year), year, at(86_399), f, none));
        assert!(requires_refresh(at(year), year, at(86_401), f, none));
        // A smaller fraction (the test knob) refreshes sooner.
        assert!(requires_refresh(at(600), 600, at(7), 0.01, none));
    }

    #[test]
    fn the_next_refresh_is_when_the_pods_first_token_is_due() {
        let tokens = TokenManager::new(0.8);
        assert_eq!(tokens.next_refresh("pod-a"), None);
        let key = |pod: &str, exp: i64| Key {
            namespace: "ns".into(),
            service_account: "default".into(),
            audience: None,
            expiration_seconds: exp,
            pod_uid: pod.into(),
        };
        let issued_now = |ttl: i64| Cached {
            token: "t".into(),
            expires: Timestamp::now() + jiff::SignedDuration::from_secs(ttl),
            ttl_seconds: ttl,
        };
        if let Ok(mut cache) = tokens.cache.lock() {
            cache.insert(key("pod-a", 3607), issued_now(3607));
            cache.insert(key("pod-a", 600), issued_now(600));
            cache.insert(key("pod-b", 600), issued_now(100_000));
        }
        // 80 % of the 600 s token: about 480 s from now.
        let due = tokens.next_refresh("pod-a").expect("pod-a has tokens");
        assert!(
            due > Duration::from_secs(470) && due <= Duration::from_secs(480),
            "{due:?}"
        );
        tokens.forget_pod("pod-a");
        assert_eq!(tokens.next_refresh("pod-a"), None);
        assert!(tokens.next_refresh("pod-b").is_some());
    }

    #[test]
    fn pod_tokens_answer_only_for_what_was_requested() {
        let mut t = PodTokens::default();
        t.tokens
            .insert(("default".into(), None, 3607), Ok("tok".into()));
        t.tokens.insert(
            ("default".into(), Some("vault".into()), 600),
            Err("denied".into()),
        );
        assert_eq!(
            t.service_account_token("ns", "default", None, 3607),
            Ok(b"tok".to_vec())
        );
        assert_eq!(
            t.service_account_token("ns", "default", Some("vault"), 600),
            Err("denied".into())
        );
        assert!(t.service_account_token("ns", "other", None, 3607).is_err());
    }
}
