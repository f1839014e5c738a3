//! A container's environment and its `$(VAR)`-expanded command and args.
//!
//! Ref: upstream `pkg/kubelet/kubelet_pods.go` (`makeEnvironmentVariables`, `podFieldSelectorRuntimeValue`),
//! `third_party/forked/golang/expansion/expand.go` (`$(VAR)` with `$$` escaping, unknown references left as
//! written) and `pkg/api/v1/resource` (`ExtractContainerResourceValue`). A failure here is what the kubelet
//! reports as `CreateContainerConfigError`.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Container, ObjectFieldSelector, Pod, ResourceFieldSelector};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::quantity::Amount;

/// Why a container's environment (or a downward API file) cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("configmap \"{name}\" not found")]
    ConfigMapNotFound { namespace: String, name: String },
    #[error("couldn't find key {key} in ConfigMap {namespace}/{name}")]
    ConfigMapKeyNotFound {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("secret \"{name}\" not found")]
    SecretNotFound { namespace: String, name: String },
    #[error("couldn't find key {key} in Secret {namespace}/{name}")]
    SecretKeyNotFound {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("unsupported fieldRef path {path:?}")]
    UnsupportedFieldPath { path: String },
    #[error("unsupported resourceFieldRef {resource:?}")]
    UnsupportedResource { resource: String },
    #[error("resourceFieldRef names container {container:?}, which the pod does not have")]
    UnknownContainer { container: String },
    #[error("invalid quantity {value:?} in {what}")]
    InvalidQuantity { what: String, value: String },
    #[error("reading {kind} {namespace}/{name}: {message}")]
    Source {
        kind: &'static str,
        namespace: String,
        name: String,
        message: String,
    },
}

/// Where configMaps and secrets come from (the kubelet's API cache; a map in tests).
pub trait ConfigSource {
    /// The configMap's `data` and `binaryData` (as bytes), or `None` if it does not exist.
    fn config_map(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String>;
    /// The secret's `data`, or `None` if it does not exist.
    fn secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String>;
}

/// An in-memory [`ConfigSource`]: `(namespace, name) → data`.
#[derive(Debug, Clone, Default)]
pub struct MapSource {
    pub config_maps: HashMap<(String, String), BTreeMap<String, Vec<u8>>>,
    pub secrets: HashMap<(String, String), BTreeMap<String, Vec<u8>>>,
}

impl ConfigSource for MapSource {
    fn config_map(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        Ok(self.config_maps.get(&(ns.into(), name.into())).cloned())
    }
    fn secret(&self, ns: &str, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        Ok(self.secrets.get(&(ns.into(), name.into())).cloned())
    }
}

/// What the downward API may expose beyond the pod object.
#[derive(Debug, Clone, Default)]
pub struct PodContext {
    pub node_name: String,
    pub host_ips: Vec<String>,
    pub pod_ips: Vec<String>,
    /// Node allocatable cpu/memory/ephemeral-storage: what an unset limit reads as (upstream
    /// `defaultPodLimitsForDownwardAPI`).
    pub node_allocatable: BTreeMap<String, Quantity>,
}

/// Upstream `expansion.Expand`: `$(NAME)` is replaced by `lookup(NAME)` when known and left as written otherwise;
/// `$$` is a literal `$`; a `$` not starting a reference is kept.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let bytes = input.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < bytes.len() {
        if bytes[cursor] == b'$' && cursor + 1 < bytes.len() {
            out.extend_from_slice(&bytes[checkpoint..cursor]);
            let rest = &bytes[cursor + 1..];
            let advance = match rest[0] {
                b'$' => {
                    out.push(b'$');
                    1
                }
                b'(' => match rest.iter().position(|&b| b == b')') {
                    Some(close) => {
                        let name = String::from_utf8_lossy(&rest[1..close]);
                        match lookup(&name) {
                            Some(v) => out.extend_from_slice(v.as_bytes()),
                            None => {
                                out.extend_from_slice(b"$(");
                                out.extend_from_slice(name.as_bytes());
                                out.push(b')');
                            }
                        }
                        close + 1
                    }
                    None => {
                        out.extend_from_slice(b"$(");
                        1
                    }
                },
                other => {
                    out.push(b'$');
                    out.push(other);
                    1
                }
            };
            cursor += advance;
            checkpoint = cursor + 1;
        }
        cursor += 1;
    }
    out.extend_from_slice(&bytes[checkpoint.min(bytes.len())..]);
    String::from_utf8_lossy(&out).into_owned()
}

/// Upstream `IsEnvVarName`: `[-._a-zA-Z][-._a-zA-Z0-9]*`.
pub fn is_env_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || "-._".contains(c))
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

/// An ordered environment: the first definition fixes the position, the last one the value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

impl Env {
    pub fn set(&mut self, name: String, value: String) {
        match self.index.get(&name) {
            Some(&i) => self.vars[i].1 = value,
            None => {
                self.index.insert(name.clone(), self.vars.len());
                self.vars.push((name, value));
            }
        }
    }
    pub fn get(&self, name: &str) -> Option<&str> {
        self.index.get(name).map(|&i| self.vars[i].1.as_str())
    }
    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }
    /// `NAME=value` strings, as an OCI process wants them.
    pub fn to_oci(&self) -> Vec<String> {
        self.vars.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
}

/// What [`container_env`] built: the environment, and `envFrom` keys skipped as invalid names (upstream records
/// an `InvalidEnvironmentVariableNames` event for them).
#[derive(Debug, Clone, Default)]
pub struct ResolvedEnv {
    pub env: Env,
    pub invalid_keys: Vec<String>,
}

fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

/// Which object a `configMapKeyRef` / `secretKeyRef` names (its errors name the kind).
#[derive(Clone, Copy)]
enum KeySource {
    ConfigMap,
    Secret,
}

/// The value of one key of a configMap or secret; `None` when the reference is optional and the object or key is
/// missing.
fn key_ref_value(
    source: &dyn ConfigSource,
    which: KeySource,
    ns: &str,
    name: &str,
    key: &str,
    optional: bool,
) -> Result<Option<String>, EnvError> {
    let (kind, data) = match which {
        KeySource::ConfigMap => ("configmap", source.config_map(ns, name)),
        KeySource::Secret => ("secret", source.secret(ns, name)),
    };
    let data = data.map_err(|message| EnvError::Source {
        kind,
        namespace: ns.into(),
        name: name.into(),
        message,
    })?;
    let (namespace, name) = (ns.to_string(), name.to_string());
    let Some(data) = data else {
        return match (optional, which) {
            (true, _) => Ok(None),
            (false, KeySource::ConfigMap) => Err(EnvError::ConfigMapNotFound { namespace, name }),
            (false, KeySource::Secret) => Err(EnvError::SecretNotFound { namespace, name }),
        };
    };
    let key = key.to_string();
    match (data.get(&key), optional, which) {
        (Some(v), _, _) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
        (None, true, _) => Ok(None),
        (None, false, KeySource::ConfigMap) => Err(EnvError::ConfigMapKeyNotFound {
            namespace,
            name,
            key,
        }),
        (None, false, KeySource::Secret) => Err(EnvError::SecretKeyNotFound {
            namespace,
            name,
            key,
        }),
    }
}

/// The container's environment: `envFrom` sources in order, then `env` entries in order, each `value` expanded
/// against what is defined before it and `service_env` (the service link variables).
pub fn container_env(
    pod: &Pod,
    container: &Container,
    ctx: &PodContext,
    source: &dyn ConfigSource,
    service_env: &BTreeMap<String, String>,
) -> Result<ResolvedEnv, EnvError> {
    let ns = namespace(pod);
    let mut out = ResolvedEnv::default();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or("");
        let data = if let Some(cm) = &from.config_map_ref {
            let name = cm.name.as_str();
            match source
                .config_map(ns, name)
                .map_err(|message| EnvError::Source {
                    kind: "configmap",
                    namespace: ns.into(),
                    name: name.into(),
                    message,
                })? {
                Some(d) => d,
                None if cm.optional == Some(true) => continue,
                None => {
                    return Err(EnvError::ConfigMapNotFound {
                        namespace: ns.into(),
                        name: name.into(),
                    })
                }
            }
        } else if let Some(s) = &from.secret_ref {
            let name = s.name.as_str();
            match source
                .secret(ns, name)
                .map_err(|message| EnvError::Source {
                    kind: "secret",
                    namespace: ns.into(),
                    name: name.into(),
                    message,
                })? {
                Some(d) => d,
                None if s.optional == Some(true) => continue,
                None => {
                    return Err(EnvError::SecretNotFound {
                        namespace: ns.into(),
                        name: name.into(),
                    })
                }
            }
        } else {
            continue;
        };
        for (k, v) in data {
            let key = format!("{prefix}{k}");
            if !is_env_var_name(&key) {
                out.invalid_keys.push(key);
                continue;
            }
            out.env.set(key, String::from_utf8_lossy(&v).into_owned());
        }
    }

    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => {
                let env = &out.env;
                let lookup = |n: &str| {
                    env.get(n)
                        .map(str::to_string)
                        .or_else(|| service_env.get(n).cloned())
                };
                expand(var.value.as_deref().unwrap_or(""), &lookup)
            }
            Some(from) => {
                if let Some(f) = &from.field_ref {
                    field_value(pod, ctx, f)?
                } else if let Some(r) = &from.resource_field_ref {
                    resource_value(pod, container, ctx, r)?
                } else if let Some(k) = &from.config_map_key_ref {
                    let optional = k.optional == Some(true);
                    match key_ref_value(
                        source,
                        KeySource::ConfigMap,
                        ns,
                        &k.name,
                        &k.key,
                        optional,
                    )? {
                        Some(v) => v,
                        None => continue,
                    }
                } else if let Some(k) = &from.secret_key_ref {
                    let optional = k.optional == Some(true);
                    match key_ref_value(source, KeySource::Secret, ns, &k.name, &k.key, optional)? {
                        Some(v) => v,
                        None => continue,
                    }
                } else {
                    String::new()
                }
            }
        };
        out.env.set(var.name.clone(), value);
    }
    // Then the service variables the container does not define itself (upstream `makeEnvironmentVariables`:
    // "Append service env vars" after the declared ones), so in-cluster clients find the API server.
    for (k, v) in service_env {
        if out.env.get(k).is_none() {
            out.env.set(k.clone(), v.clone());
        }
    }
    Ok(out)
}

/// The service environment variables a pod sees (upstream `getServiceEnvVarMap` + `envvars.FromServices`): every
/// service with a cluster IP in the pod's namespace when `enable_service_links` (the default), and always the
/// `kubernetes` service of `default` (what in-cluster clients read). For service `my-svc`:
/// `MY_SVC_SERVICE_HOST`, `MY_SVC_SERVICE_PORT` (first port), `MY_SVC_SERVICE_PORT_<NAME>` per named port, and
/// the Docker-link style `MY_SVC_PORT`, `MY_SVC_PORT_<port>_<PROTO>{,_PROTO,_PORT,_ADDR}`.
pub fn service_env(
    services: &[k8s_openapi::api::core::v1::Service],
    namespace: &str,
    enable_service_links: bool,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    // Upstream visits the namespace's services, then lets the master service win for its own name.
    let mut chosen: BTreeMap<String, &k8s_openapi::api::core::v1::Service> = BTreeMap::new();
    for svc in services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = svc.metadata.name.as_deref().unwrap_or("");
        let is_master = ns == "default" && name == "kubernetes";
        if is_master || (enable_service_links && ns == namespace && !chosen.contains_key(name)) {
            chosen.insert(name.to_string(), svc);
        }
    }
    for (name, svc) in chosen {
        let Some(spec) = &svc.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty() && *ip != "None")
        else {
            continue;
        };
        let prefix = name.to_uppercase().replace('-', "_");
        let ports = spec.ports.as_deref().unwrap_or_default();
        out.insert(format!("{prefix}_SERVICE_HOST"), ip.to_string());
        if let Some(first) = ports.first() {
            out.insert(format!("{prefix}_SERVICE_PORT"), first.port.to_string());
        }
        for p in ports {
            if let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.insert(
                    format!(
                        "{prefix}_SERVICE_PORT_{}",
                        pn.to_uppercase().replace('-', "_")
                    ),
                    p.port.to_string(),
                );
            }
        }
        for (i, p) in ports.iter().enumerate() {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            let url = format!("{}://{ip}:{}", proto.to_lowercase(), p.port);
            if i == 0 {
                out.insert(format!("{prefix}_PORT"), url.clone());
            }
            let base = format!("{prefix}_PORT_{}_{}", p.port, proto.to_uppercase());
            out.insert(format!("{base}_PROTO"), proto.to_lowercase());
            out.insert(format!("{base}_PORT"), p.port.to_string());
            out.insert(format!("{base}_ADDR"), ip.to_string());
            out.insert(base, url);
        }
    }
    out
}

/// `command` and `args` with `$(VAR)` expanded against the container's environment (upstream
/// `ExpandContainerCommandAndArgs`).
pub fn expand_command_and_args(container: &Container, env: &Env) -> (Vec<String>, Vec<String>) {
    let lookup = |n: &str| env.get(n).map(str::to_string);
    let expand_all = |v: &Option<Vec<String>>| {
        v.iter()
            .flatten()
            .map(|s| expand(s, &lookup))
            .collect::<Vec<_>>()
    };
    (expand_all(&container.command), expand_all(&container.args))
}

/// Parses `metadata.labels['key']` into `("metadata.labels", "key")`.
fn subscripted(path: &str) -> Option<(&str, &str)> {
    let (base, rest) = path.split_once('[')?;
    let key = rest.strip_suffix(']')?;
    let key = key
        .strip_prefix('\'')
        .and_then(|k| k.strip_suffix('\''))
        .or_else(|| key.strip_prefix('"').and_then(|k| k.strip_suffix('"')))?;
    Some((base, key))
}

/// Labels or annotations as the downward API volume writes them: sorted `key="value"` lines.
pub fn format_map(map: &BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Go's `%q` for the common cases (quotes, backslashes, newlines, tabs).
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The value of a `fieldRef` (env and downward API volumes; whole `metadata.labels`/`annotations` are only
/// valid in volumes, which upstream validation enforces before we see them).
pub fn field_value(
    pod: &Pod,
    ctx: &PodContext,
    f: &ObjectFieldSelector,
) -> Result<String, EnvError> {
    let path = f.field_path.as_str();
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    if let Some((base, key)) = subscripted(path) {
        return match base {
            "metadata.labels" => Ok(labels.get(key).cloned().unwrap_or_default()),
            "metadata.annotations" => Ok(annotations.get(key).cloned().unwrap_or_default()),
            _ => Err(EnvError::UnsupportedFieldPath { path: path.into() }),
        };
    }
    let spec = pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
        "metadata.namespace" => namespace(pod).to_string(),
        "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(labels),
        "metadata.annotations" => format_map(annotations),
        "spec.nodeName" => spec
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| ctx.node_name.clone()),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" => ctx.host_ips.first().cloned().unwrap_or_default(),
        "status.hostIPs" => ctx.host_ips.join(","),
        "status.podIP" => ctx.pod_ips.first().cloned().unwrap_or_default(),
        "status.podIPs" => ctx.pod_ips.join(","),
        _ => return Err(EnvError::UnsupportedFieldPath { path: path.into() }),
    })
}

/// The value of a `resourceFieldRef` (upstream `ExtractContainerResourceValue`): cpu rounded up to whole
/// divisors of millicores, memory/ephemeral-storage rounded up to whole divisors of bytes; an unset limit reads as
/// node allocatable.
pub fn resource_value(
    pod: &Pod,
    current: &Container,
    ctx: &PodContext,
    r: &ResourceFieldSelector,
) -> Result<String, EnvError> {
    let container = match r.container_name.as_deref() {
        None | Some("") => current,
        Some(name) => pod
            .spec
            .iter()
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .find(|c| c.name == name)
            .ok_or_else(|| EnvError::UnknownContainer {
                container: name.into(),
            })?,
    };
    let (kind, resource) =
        r.resource
            .split_once('.')
            .ok_or_else(|| EnvError::UnsupportedResource {
                resource: r.resource.clone(),
            })?;
    let res = container.resources.as_ref();
    let list = match kind {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => {
            return Err(EnvError::UnsupportedResource {
                resource: r.resource.clone(),
            })
        }
    };
    if !matches!(resource, "cpu" | "memory" | "ephemeral-storage") {
        return Err(EnvError::UnsupportedResource {
            resource: r.resource.clone(),
        });
    }
    let parse = |q: &Quantity, what: &str| {
        Amount::of(q).map_err(|_| EnvError::InvalidQuantity {
            what: what.into(),
            value: q.0.clone(),
        })
    };
    let mut value = match list.and_then(|l| l.get(resource)) {
        Some(q) => parse(q, &r.resource)?,
        None if kind == "limits" => match ctx.node_allocatable.get(resource) {
            Some(q) => parse(q, "node allocatable")?,
            None => Amount::ZERO,
        },
        None => Amount::ZERO,
    };
    // Requests default to limits (API defaulting).
    if kind == "requests" && !value.is_positive() {
        if let Some(q) = res
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get(resource))
        {
            value = parse(q, &r.resource)?;
        }
    }
    let divisor = match &r.divisor {
        Some(d) if !d.0.is_empty() => parse(d, "divisor")?,
        _ => Amount::parse("1").map_err(|_| EnvError::InvalidQuantity {
            what: "divisor".into(),
            value: "1".into(),
        })?,
    };
    if !divisor.is_positive() {
        return Err(EnvError::InvalidQuantity {
            what: "divisor".into(),
            value: r.divisor.as_ref().map(|d| d.0.clone()).unwrap_or_default(),
        });
    }
    let n = if resource == "cpu" {
        ceil_div(value.milli_value(), divisor.milli_value())
    } else {
        ceil_div(value.value(), divisor.value())
    };
    Ok(n.to_string())
}

fn ceil_div(a: i64, b: i64) -> i64 {
    if b == 0 {
        return 0;
    }
    let q = a / b;
    if a % b != 0 && ((a > 0) == (b > 0)) {
        q + 1
    } else {
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource, PodSpec,
        ResourceRequirements, SecretKeySelector,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn vars<'a>(lookup: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |n| {
            lookup
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn expansion_follows_upstream_rules() {
        let l = vars(&[("A", "a"), ("B", "b"), ("EMPTY", "")]);
        let cases = [
            ("$(A)", "a"),
            ("x$(A)y$(B)z", "xaybz"),
            ("$$(A)", "$(A)"),
            ("$$$(A)", "$a"),
            ("$(UNKNOWN)", "$(UNKNOWN)"),
            ("$(A", "$(A"),
            ("$A", "$A"),
            ("a$", "a$"),
            ("$(EMPTY)x", "x"),
            ("$()", "$()"),
            ("$$", "$"),
            ("héllo $(A) wörld", "héllo a wörld"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, &l), want, "{input}");
        }
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                uid: Some("u-1".into()),
                labels: Some([("app".to_string(), "web".to_string())].into()),
                annotations: Some([("note".to_string(), "say \"hi\"".to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                service_account_name: Some("sa".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ctx() -> PodContext {
        PodContext {
            node_name: "node-a".into(),
            host_ips: vec!["192.168.1.10".into()],
            pod_ips: vec!["10.244.1.5".into(), "fd00::5".into()],
            node_allocatable: [
                ("cpu".to_string(), Quantity("2".into())),
                ("memory".to_string(), Quantity("4Gi".into())),
            ]
            .into(),
        }
    }

    fn env(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            ..Default::default()
        }
    }

    fn env_from(name: &str, from: EnvVarSource) -> EnvVar {
        EnvVar {
            name: name.into(),
            value_from: Some(from),
            ..Default::default()
        }
    }

    fn field(path: &str) -> EnvVarSource {
        EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn source() -> MapSource {
        let mut s = MapSource::default();
        s.config_maps.insert(
            ("shop".into(), "cfg".into()),
            [
                ("LEVEL".to_string(), b"debug".to_vec()),
                ("bad key".to_string(), b"x".to_vec()),
            ]
            .into(),
        );
        s.secrets.insert(
            ("shop".into(), "creds".into()),
            [("password".to_string(), b"s3cret".to_vec())].into(),
        );
        s
    }

    #[test]
    fn values_refs_and_expansion_build_the_environment_in_order() {
        let p = pod();
        let c = Container {
            name: "app".into(),
            env_from: Some(vec![EnvFromSource {
                prefix: Some("CFG_".into()),
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cfg".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            env: Some(vec![
                env_from("POD", field("metadata.name")),
                env_from("NS", field("metadata.namespace")),
                env_from("APP", field("metadata.labels['app']")),
                env_from("NODE", field("spec.nodeName")),
                env_from("IP", field("status.podIP")),
                env_from("IPS", field("status.podIPs")),
                env_from("HOST", field("status.hostIP")),
                env_from("SA", field("spec.serviceAccountName")),
                env_from(
                    "PASS",
                    EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "creds".into(),
                            key: "password".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ),
                env("URL", "http://$(POD).$(NS):$(PORT)/$$(POD)"),
                env("PORT", "80"),
                env("SVC", "$(SVC_HOST)"),
            ]),
            command: Some(vec!["/bin/echo".into(), "$(URL)".into()]),
            args: Some(vec![
                "$(CFG_LEVEL)".into(),
                "$$(PASS)".into(),
                "$(NOPE)".into(),
            ]),
            ..Default::default()
        };
        let services = [("SVC_HOST".to_string(), "10.96.0.1".to_string())].into();
        let r = container_env(&p, &c, &ctx(), &source(), &services).unwrap();
        let e = &r.env;
        assert_eq!(r.invalid_keys, vec!["CFG_bad key"]);
        assert_eq!(e.get("CFG_LEVEL"), Some("debug"));
        assert_eq!(e.get("POD"), Some("web"));
        assert_eq!(e.get("NS"), Some("shop"));
        assert_eq!(e.get("APP"), Some("web"));
        assert_eq!(e.get("NODE"), Some("node-a"));
        assert_eq!(e.get("IP"), Some("10.244.1.5"));
        assert_eq!(e.get("IPS"), Some("10.244.1.5,fd00::5"));
        assert_eq!(e.get("HOST"), Some("192.168.1.10"));
        assert_eq!(e.get("SA"), Some("sa"));
        assert_eq!(e.get("PASS"), Some("s3cret"));
        assert_eq!(
            e.get("URL"),
            Some("http://web.shop:$(PORT)/$(POD)"),
            "PORT is defined after URL"
        );
        assert_eq!(e.get("SVC"), Some("10.96.0.1"));
        assert_eq!(e.vars()[0].0, "CFG_LEVEL", "envFrom first");
        assert_eq!(
            e.vars().last().map(|(k, v)| (k.as_str(), v.as_str())),
            Some(("SVC_HOST", "10.96.0.1")),
            "service variables last"
        );
        let (cmd, args) = expand_command_and_args(&c, e);
        assert_eq!(cmd, vec!["/bin/echo", "http://web.shop:$(PORT)/$(POD)"]);
        assert_eq!(args, vec!["debug", "$(PASS)", "$(NOPE)"]);
    }

    #[test]
    fn missing_required_keys_are_config_errors_and_optional_ones_are_skipped() {
        let p = pod();
        let key_ref = |name: &str, key: &str, optional: Option<bool>| {
            env_from(
                "X",
                EnvVarSource {
                    config_map_key_ref: Some(ConfigMapKeySelector {
                        name: name.into(),
                        key: key.into(),
                        optional,
                    }),
                    ..Default::default()
                },
            )
        };
        let with = |v: EnvVar| Container {
            name: "c".into(),
            env: Some(vec![v]),
            ..Default::default()
        };
        let none = BTreeMap::new();
        let err = container_env(
            &p,
            &with(key_ref("cfg", "NOPE", None)),
            &ctx(),
            &source(),
            &none,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "couldn't find key NOPE in ConfigMap shop/cfg"
        );
        let err = container_env(
            &p,
            &with(key_ref("gone", "K", None)),
            &ctx(),
            &source(),
            &none,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "configmap \"gone\" not found");
        let ok = container_env(
            &p,
            &with(key_ref("gone", "K", Some(true))),
            &ctx(),
            &source(),
            &none,
        )
        .unwrap();
        assert_eq!(ok.env.get("X"), None);
        let ok = container_env(
            &p,
            &with(key_ref("cfg", "NOPE", Some(true))),
            &ctx(),
            &source(),
            &none,
        )
        .unwrap();
        assert_eq!(ok.env.get("X"), None);
        let secret = env_from(
            "S",
            EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: "creds".into(),
                    key: "user".into(),
                    optional: None,
                }),
                ..Default::default()
            },
        );
        let err = container_env(&p, &with(secret), &ctx(), &source(), &none).unwrap_err();
        assert!(matches!(err, EnvError::SecretKeyNotFound { .. }), "{err}");
        let bad = container_env(
            &p,
            &with(env_from("F", field("spec.nope"))),
            &ctx(),
            &source(),
            &none,
        )
        .unwrap_err();
        assert!(matches!(bad, EnvError::UnsupportedFieldPath { .. }));
    }

    #[test]
    fn resource_field_refs_round_up_by_divisor_and_default_to_node_allocatable() {
        let p = pod();
        let c = Container {
            name: "c".into(),
            resources: Some(ResourceRequirements {
                requests: Some([("cpu".to_string(), Quantity("250m".into()))].into()),
                limits: Some([("memory".to_string(), Quantity("100Mi".into()))].into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = |resource: &str, divisor: Option<&str>| {
            resource_value(
                &p,
                &c,
                &ctx(),
                &ResourceFieldSelector {
                    resource: resource.into(),
                    divisor: divisor.map(|d| Quantity(d.into())),
                    container_name: None,
                },
            )
        };
        assert_eq!(
            r("requests.cpu", None).unwrap(),
            "1",
            "250m rounds up to 1 core"
        );
        assert_eq!(r("requests.cpu", Some("1m")).unwrap(), "250");
        assert_eq!(r("limits.memory", Some("1Mi")).unwrap(), "100");
        assert_eq!(r("limits.memory", None).unwrap(), "104857600");
        assert_eq!(r("limits.cpu", None).unwrap(), "2", "node allocatable");
        assert_eq!(
            r("requests.memory", Some("1Mi")).unwrap(),
            "100",
            "request defaults to limit"
        );
        assert!(r("limits.gpu", None).is_err());
    }

    #[test]
    fn labels_and_annotations_render_like_the_downward_api_volume() {
        let p = pod();
        let sel = |path: &str| ObjectFieldSelector {
            field_path: path.into(),
            ..Default::default()
        };
        assert_eq!(
            field_value(&p, &ctx(), &sel("metadata.labels")).unwrap(),
            "app=\"web\""
        );
        assert_eq!(
            field_value(&p, &ctx(), &sel("metadata.annotations")).unwrap(),
            "note=\"say \\\"hi\\\"\""
        );
        assert_eq!(
            field_value(&p, &ctx(), &sel("metadata.uid")).unwrap(),
            "u-1"
        );
    }

    #[test]
    fn service_links_and_the_master_service_become_env_vars() {
        use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
        let svc = |ns: &str, name: &str, ip: &str, ports: Vec<(Option<&str>, i32)>| Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ports: Some(
                    ports
                        .into_iter()
                        .map(|(n, p)| ServicePort {
                            name: n.map(str::to_string),
                            port: p,
                            protocol: Some("TCP".into()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let services = vec![
            svc(
                "default",
                "kubernetes",
                "10.96.0.1",
                vec![(Some("https"), 443)],
            ),
            svc(
                "shop",
                "my-db",
                "10.96.3.4",
                vec![(Some("sql"), 5432), (None, 9187)],
            ),
            svc("shop", "headless", "None", vec![(None, 80)]),
            svc("other", "elsewhere", "10.96.9.9", vec![(None, 80)]),
        ];
        let env = service_env(&services, "shop", true);
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.96.0.1");
        assert_eq!(env["KUBERNETES_SERVICE_PORT"], "443");
        assert_eq!(env["KUBERNETES_SERVICE_PORT_HTTPS"], "443");
        assert_eq!(env["KUBERNETES_PORT"], "tcp://10.96.0.1:443");
        assert_eq!(env["KUBERNETES_PORT_443_TCP_ADDR"], "10.96.0.1");
        assert_eq!(env["MY_DB_SERVICE_HOST"], "10.96.3.4");
        assert_eq!(env["MY_DB_SERVICE_PORT"], "5432");
        assert_eq!(env["MY_DB_SERVICE_PORT_SQL"], "5432");
        assert_eq!(env["MY_DB_PORT_9187_TCP"], "tcp://10.96.3.4:9187");
        assert_eq!(env["MY_DB_PORT_5432_TCP_PROTO"], "tcp");
        assert!(!env
            .keys()
            .any(|k| k.starts_with("HEADLESS") || k.starts_with("ELSEWHERE")));
        let no_links = service_env(&services, "shop", false);
        assert!(no_links.contains_key("KUBERNETES_SERVICE_HOST"));
        assert!(!no_links.contains_key("MY_DB_SERVICE_HOST"));
    }

    #[test]
    fn env_var_names_are_validated() {
        assert!(is_env_var_name("A_b.c-1"));
        assert!(is_env_var_name("_x"));
        assert!(!is_env_var_name("1A"));
        assert!(!is_env_var_name("a b"));
        assert!(!is_env_var_name(""));
    }
}
