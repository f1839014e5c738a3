//! Service-account tokens: the `serviceaccounts/token` subresource (TokenRequest) signs short-lived JWTs, and the
//! authenticator accepts them while the service account (and the object the token is bound to) still exists.
//!
//! Ref: upstream `pkg/serviceaccount/claims.go` (claim layout, `kubernetes.io` private claims),
//! `pkg/registry/core/serviceaccount/storage/token.go` (TokenRequest defaults and checks) and
//! `pkg/serviceaccount/jwt.go` (validation). Tokens are ES256 over a P-256 key kept in `<data-dir>/pki/sa.key`, so
//! they survive restarts of the API server.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::status::{ApiError, Cause};
use super::{objects, resources, State, User};

/// Upstream's default `--service-account-issuer` shape; also the default audience (as `--api-audiences` defaults
/// to the issuer).
pub(crate) const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// `expirationSeconds` when the request gives none.
const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// Upstream refuses shorter tokens: "may not specify a duration less than 10 minutes".
const MIN_EXPIRATION_SECONDS: i64 = 600;
/// And longer than 2^32 seconds.
const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;
/// A token bound to a pod stays valid this long after the pod's deletion started (upstream's grace, so preStop
/// hooks can still call the API).
const DELETED_POD_GRACE_SECONDS: i64 = 60;

/// Why the signing key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a usable P-256 key: {message}")]
    Key { path: String, message: String },
}

/// A reference to an object a token names or is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ObjectRef {
    pub name: String,
    pub uid: String,
}

/// The `kubernetes.io` private claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<ObjectRef>,
}

/// A service-account token's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

/// Why a bearer token is not a valid service-account token (the caller then gets 401; the reason is logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("service account {0} no longer exists")]
    ServiceAccountGone(String),
    #[error("{kind} {name} the token is bound to no longer exists")]
    BoundObjectGone { kind: &'static str, name: String },
    #[error("store: {0}")]
    Store(String),
}

/// Signs and verifies service-account tokens.
pub(crate) struct TokenSigner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    issuer: String,
    key_id: String,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("issuer", &self.issuer)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// Loads `<pki_dir>/sa.key`, creating it (0600, written atomically) on first start.
    pub fn load_or_create(pki_dir: &Path, issuer: &str) -> Result<Self, SigningKeyError> {
        let path = pki_dir.join("sa.key");
        let shown = path.display().to_string();
        let io = |source| SigningKeyError::Io {
            path: shown.clone(),
            source,
        };
        let pem =
            match std::fs::read_to_string(&path) {
                Ok(p) => p,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                        .map_err(|e| SigningKeyError::Key {
                            path: shown.clone(),
                            message: e.to_string(),
                        })?;
                    let pem = key.serialize_pem();
                    write_private(&path, &pem).map_err(io)?;
                    pem
                }
                Err(e) => return Err(io(e)),
            };
        let bad = |message: String| SigningKeyError::Key {
            path: shown.clone(),
            message,
        };
        let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| bad(e.to_string()))?;
        let encoding = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let public = key.public_key_pem();
        let decoding =
            DecodingKey::from_ec_pem(public.as_bytes()).map_err(|e| bad(e.to_string()))?;
        // Upstream's key ID: a digest of the public key, so verifiers can pick the key.
        let key_id = {
            use base64::Engine as _;
            use sha2::Digest as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(
                rcgen::PublicKeyData::subject_public_key_info(&key),
            ))
        };
        Ok(Self {
            encoding,
            decoding,
            issuer: issuer.to_string(),
            key_id,
        })
    }

    fn sign(&self, claims: &Claims) -> Result<String, ApiError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| ApiError::internal(format!("cannot sign the token: {e}")))
    }

    /// Checks signature, issuer, audience and time; not whether the named objects still exist.
    fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.issuer]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // Time is checked below against our clock, with upstream's leeway of none for exp.
        v.validate_exp = false;
        v.validate_nbf = false;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let c = data.claims;
        if now >= c.exp {
            return Err(TokenError::Invalid("token has expired".into()));
        }
        if now < c.nbf {
            return Err(TokenError::Invalid("token is not valid yet".into()));
        }
        let expected = format!(
            "system:serviceaccount:{}:{}",
            c.kubernetes.namespace, c.kubernetes.serviceaccount.name
        );
        if c.sub != expected {
            return Err(TokenError::Invalid(
                "subject does not match the service account claim".into(),
            ));
        }
        Ok(c)
    }
}

fn write_private(path: &Path, data: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn now_unix() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Reads one object from the store as JSON, `None` when absent.
async fn get_object(
    state: &State,
    group: &str,
    plural: &str,
    namespace: Option<&str>,
    name: &str,
) -> Result<Option<Value>, TokenError> {
    let kind = resources::find(group, "v1", plural)
        .ok_or_else(|| TokenError::Store(format!("no kind {plural}")))?;
    match state.store.get(&kind.key(namespace, name)).await {
        Ok((Some(kv), _)) => serde_json::from_slice(&kv.value)
            .map(Some)
            .map_err(|e| TokenError::Store(e.to_string())),
        Ok((None, _)) => Ok(None),
        Err(e) => Err(TokenError::Store(e.to_string())),
    }
}

fn uid_of(obj: &Value) -> &str {
    obj.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The user a bearer token names, if it is a valid service-account token whose service account (and bound
/// object) still exist with the UIDs it was issued for.
pub(crate) async fn authenticate(state: &State, token: &str) -> Result<User, TokenError> {
    let claims = state.sa_tokens.verify(token, now_unix())?;
    let k = &claims.kubernetes;
    let ns = k.namespace.as_str();
    let gone = || TokenError::ServiceAccountGone(format!("{ns}/{}", k.serviceaccount.name));
    let sa_kind = resources::find("", "v1", "serviceaccounts")
        .ok_or_else(|| TokenError::Store("no kind serviceaccounts".into()))?;
    // From the cache (upstream's authenticator reads service accounts from an informer); one it does not have
    // yet is read from the store.
    let sa_key = sa_kind.key(Some(ns), &k.serviceaccount.name);
    let (uid, deleting) = match state.caches.service_accounts.get(&sa_key) {
        Some(sa) => (sa.uid.clone(), sa.deleting),
        None => {
            let sa = get_object(
                state,
                "",
                "serviceaccounts",
                Some(ns),
                &k.serviceaccount.name,
            )
            .await?
            .ok_or_else(gone)?;
            let deleting = sa
                .pointer("/metadata/deletionTimestamp")
                .is_some_and(|v| !v.is_null());
            (uid_of(&sa).to_string(), deleting)
        }
    };
    if uid != k.serviceaccount.uid || deleting {
        return Err(gone());
    }
    if let Some(pod) = &k.pod {
        let gone = || TokenError::BoundObjectGone {
            kind: "pod",
            name: format!("{ns}/{}", pod.name),
        };
        let obj = get_object(state, "", "pods", Some(ns), &pod.name)
            .await?
            .filter(|o| uid_of(o) == pod.uid)
            .ok_or_else(gone)?;
        let deleting_since = obj
            .pointer("/metadata/deletionTimestamp")
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<jiff::Timestamp>().ok());
        if deleting_since.is_some_and(|t| t.as_second() + DELETED_POD_GRACE_SECONDS < now_unix()) {
            return Err(gone());
        }
    }
    if let Some(secret) = &k.secret {
        get_object(state, "", "secrets", Some(ns), &secret.name)
            .await?
            .filter(|o| uid_of(o) == secret.uid)
            .ok_or_else(|| TokenError::BoundObjectGone {
                kind: "secret",
                name: format!("{ns}/{}", secret.name),
            })?;
    }
    if let Some(node) = &k.node {
        get_object(state, "", "nodes", None, &node.name)
            .await?
            .filter(|o| uid_of(o) == node.uid)
            .ok_or_else(|| TokenError::BoundObjectGone {
                kind: "node",
                name: node.name.clone(),
            })?;
    }
    Ok(User {
        name: claims.sub.clone(),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated".into(),
        ],
    })
}

/// Whether a bearer token has a JWT's shape (three base64url parts), so it is worth verifying as one.
pub(crate) fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("eyJ")
}

/// `POST serviceaccounts/<name>/token`: issues a token for the service account (Ref: upstream
/// `TokenREST.Create`).
pub(crate) async fn create_token(
    state: &State,
    namespace: &str,
    name: &str,
    body: Value,
) -> Result<Value, ApiError> {
    let tr_kind = resources::find("", "v1", "serviceaccounts")
        .ok_or_else(|| ApiError::internal("no serviceaccounts kind"))?;
    let invalid = |causes: Vec<Cause>| ApiError::invalid(tr_kind, name, causes);
    let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
    let expiration = match spec.get("expirationSeconds") {
        None | Some(Value::Null) => DEFAULT_EXPIRATION_SECONDS,
        Some(v) => v.as_i64().ok_or_else(|| {
            invalid(vec![Cause::invalid(
                "spec.expirationSeconds",
                v,
                "must be an integer",
            )])
        })?,
    };
    if expiration < MIN_EXPIRATION_SECONDS {
        return Err(invalid(vec![Cause::invalid(
            "spec.expirationSeconds",
            &json!(expiration),
            "may not specify a duration less than 10 minutes",
        )]));
    }
    if expiration > MAX_EXPIRATION_SECONDS {
        return Err(invalid(vec![Cause::invalid(
            "spec.expirationSeconds",
            &json!(expiration),
            "may not specify a duration larger than 2^32 seconds",
        )]));
    }
    let audiences: Vec<String> = match spec.get("audiences") {
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|v| v.as_str().map(String::from))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                invalid(vec![Cause::invalid(
                    "spec.audiences",
                    &json!(a),
                    "must be strings",
                )])
            })?,
        _ => vec![state.sa_tokens.issuer.clone()],
    };
    let sa = get_object(state, "", "serviceaccounts", Some(namespace), name)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| ApiError::not_found(tr_kind, name))?;
    let mut kubernetes = KubernetesClaims {
        namespace: namespace.to_string(),
        serviceaccount: ObjectRef {
            name: name.to_string(),
            uid: uid_of(&sa).to_string(),
        },
        pod: None,
        secret: None,
        node: None,
    };
    let mut bound = Value::Null;
    if let Some(r) = spec.get("boundObjectRef").filter(|r| !r.is_null()) {
        let kind = r.get("kind").and_then(Value::as_str).unwrap_or_default();
        let obj_name = r.get("name").and_then(Value::as_str).unwrap_or_default();
        let want_uid = r.get("uid").and_then(Value::as_str).unwrap_or_default();
        let (plural, ns) = match kind {
            "Pod" => ("pods", Some(namespace)),
            "Secret" => ("secrets", Some(namespace)),
            "Node" => ("nodes", None),
            other => {
                return Err(invalid(vec![Cause::not_supported(
                    "spec.boundObjectRef.kind",
                    &json!(other),
                    &["Pod", "Secret", "Node"],
                )]))
            }
        };
        let obj = get_object(state, "", plural, ns, obj_name)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .ok_or_else(|| {
                // Upstream answers 404 naming the bound object.
                resources::find("", "v1", plural)
                    .map(|k| ApiError::not_found(k, obj_name))
                    .unwrap_or_else(|| ApiError::not_found(tr_kind, obj_name))
            })?;
        let uid = uid_of(&obj).to_string();
        // Upstream `TokenREST.Create`: a pod-bound token only for the service account the pod runs as.
        let pod_sa = obj
            .pointer("/spec/serviceAccountName")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if kind == "Pod" && pod_sa != name {
            return Err(ApiError::bad_request(format!(
                "cannot bind token for serviceaccount \"{name}\" to pod running with different serviceaccount name."
            )));
        }
        if !want_uid.is_empty() && want_uid != uid {
            return Err(ApiError::conflict(
                tr_kind,
                name,
                &format!("the UID in the bound object reference ({want_uid}) does not match the {kind}'s ({uid})"),
            ));
        }
        let r = Some(ObjectRef {
            name: obj_name.to_string(),
            uid: uid.clone(),
        });
        match kind {
            "Pod" => kubernetes.pod = r,
            "Secret" => kubernetes.secret = r,
            _ => kubernetes.node = r,
        }
        bound = json!({"kind": kind, "apiVersion": "v1", "name": obj_name, "uid": uid});
    }
    let now = now_unix();
    let claims = Claims {
        iss: state.sa_tokens.issuer.clone(),
        sub: format!("system:serviceaccount:{namespace}:{name}"),
        aud: audiences.clone(),
        exp: now + expiration,
        iat: now,
        nbf: now,
        jti: uuid::Uuid::new_v4().to_string(),
        kubernetes,
    };
    let token = state.sa_tokens.sign(&claims)?;
    let expires = jiff::Timestamp::from_second(claims.exp)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    let mut spec_out = json!({"audiences": audiences, "expirationSeconds": expiration});
    if !bound.is_null() {
        spec_out["boundObjectRef"] = bound;
    }
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": objects::now()},
        "spec": spec_out,
        "status": {"token": token, "expirationTimestamp": expires},
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is its failure message
mod tests {
    use super::*;

    fn claims(now: i64) -> Claims {
        Claims {
            iss: DEFAULT_ISSUER.into(),
            sub: "system:serviceaccount:default:robot".into(),
            aud: vec![DEFAULT_ISSUER.into()],
            exp: now + 600,
            iat: now,
            nbf: now,
            jti: "j".into(),
            kubernetes: KubernetesClaims {
                namespace: "default".into(),
                serviceaccount: ObjectRef {
                    name: "robot".into(),
                    uid: "u".into(),
                },
                pod: None,
                secret: None,
                node: None,
            },
        }
    }

    #[test]
    fn tokens_verify_until_they_expire_and_only_with_our_key() {
        let dir = tempfile::tempdir().unwrap();
        let signer = TokenSigner::load_or_create(dir.path(), DEFAULT_ISSUER).unwrap();
        let now = 1_700_000_000;
        let token = signer.sign(&claims(now)).unwrap();
        assert!(looks_like_jwt(&token));
        assert_eq!(signer.verify(&token, now + 1).unwrap(), claims(now));
        assert!(matches!(
            signer.verify(&token, now + 600),
            Err(TokenError::Invalid(m)) if m.contains("expired")
        ));
        // The key survives a restart; another data dir's key does not verify it.
        let again = TokenSigner::load_or_create(dir.path(), DEFAULT_ISSUER).unwrap();
        assert!(again.verify(&token, now + 1).is_ok());
        let other_dir = tempfile::tempdir().unwrap();
        let other = TokenSigner::load_or_create(other_dir.path(), DEFAULT_ISSUER).unwrap();
        assert!(other.verify(&token, now + 1).is_err());
        // A tampered payload fails the signature.
        let parts: Vec<&str> = token.split('.').collect();
        let mut forged_claims = claims(now);
        forged_claims.sub = "system:serviceaccount:kube-system:admin".into();
        forged_claims.kubernetes.namespace = "kube-system".into();
        forged_claims.kubernetes.serviceaccount.name = "admin".into();
        let payload = {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::to_vec(&forged_claims).unwrap())
        };
        let forged = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert!(signer.verify(&forged, now + 1).is_err());
    }

    #[test]
    fn a_token_for_another_audience_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let signer = TokenSigner::load_or_create(dir.path(), DEFAULT_ISSUER).unwrap();
        let now = 1_700_000_000;
        let mut c = claims(now);
        c.aud = vec!["vault".into()];
        let token = signer.sign(&c).unwrap();
        assert!(signer.verify(&token, now + 1).is_err());
    }
}
