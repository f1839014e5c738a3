//! Protobuf request bodies, for the typed clients in kubectl ≥1.32: `kubectl create namespace|configmap|secret|
//! serviceaccount|deployment|service|role|clusterrole|rolebinding|clusterrolebinding` and `kubectl auth can-i` send
//! `application/vnd.kubernetes.protobuf` and, unlike reads, have no JSON fallback.
//!
//! The envelope (Ref: apimachinery `runtime/serializer/protobuf`): the magic `k8s\0`, then a `runtime.Unknown`
//! whose `raw` is the object's own message. Objects are decoded with `k8s-pb`'s prost types and converted to the
//! JSON shape for the fields those generators set (metadata; data; container name/image/command/args/ports/env/
//! resources; service ports/selector/type; RBAC rules, subjects and roleRef). Other kinds get 415.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::core::v1 as core;
use k8s_pb::api::rbac::v1 as rbac;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use prost::Message;
use serde_json::{json, Map, Value};

use super::resources::ResourceKind;
use super::status::ApiError;

const MAGIC: &[u8] = b"k8s\0";

/// Go's protobuf encodes non-pointer fields even when zero; JSON (`omitempty`) leaves them out, so empty strings
/// are dropped here. Zero numbers and false are dropped by [`put_nz`] for fields that are not pointers in Go.
fn put<T: serde::Serialize>(m: &mut Map<String, Value>, key: &str, v: &Option<T>) {
    if let Some(v) = v {
        let v = json!(v);
        if v.as_str() != Some("") {
            m.insert(key.into(), v);
        }
    }
}

fn put_nz<T: serde::Serialize>(m: &mut Map<String, Value>, key: &str, v: &Option<T>) {
    if let Some(v) = v {
        let v = json!(v);
        if v != json!(0) && v != json!(false) && v.as_str() != Some("") {
            m.insert(key.into(), v);
        }
    }
}

fn put_vec<T: serde::Serialize>(m: &mut Map<String, Value>, key: &str, v: &[T]) {
    if !v.is_empty() {
        m.insert(key.into(), json!(v));
    }
}

fn put_map(m: &mut Map<String, Value>, key: &str, v: &BTreeMap<String, String>) {
    if !v.is_empty() {
        m.insert(key.into(), json!(v));
    }
}

fn put_bytes_map(m: &mut Map<String, Value>, key: &str, v: &BTreeMap<String, Vec<u8>>) {
    if !v.is_empty() {
        let enc: BTreeMap<&String, String> = v
            .iter()
            .map(|(k, b)| (k, base64::engine::general_purpose::STANDARD.encode(b)))
            .collect();
        m.insert(key.into(), json!(enc));
    }
}

fn object_meta(m: &Option<meta::ObjectMeta>) -> Value {
    let mut out = Map::new();
    if let Some(m) = m {
        put(&mut out, "name", &m.name);
        put(&mut out, "generateName", &m.generate_name);
        put(&mut out, "namespace", &m.namespace);
        put(&mut out, "resourceVersion", &m.resource_version);
        put_map(&mut out, "labels", &m.labels);
        put_map(&mut out, "annotations", &m.annotations);
        put_vec(&mut out, "finalizers", &m.finalizers);
        let owners: Vec<Value> = m
            .owner_references
            .iter()
            .map(|o| {
                let mut r = Map::new();
                put(&mut r, "apiVersion", &o.api_version);
                put(&mut r, "kind", &o.kind);
                put(&mut r, "name", &o.name);
                put(&mut r, "uid", &o.uid);
                put_nz(&mut r, "controller", &o.controller);
                put_nz(&mut r, "blockOwnerDeletion", &o.block_owner_deletion);
                Value::Object(r)
            })
            .collect();
        put_vec(&mut out, "ownerReferences", &owners);
    }
    Value::Object(out)
}

fn label_selector(s: &Option<meta::LabelSelector>) -> Option<Value> {
    s.as_ref().map(|s| {
        let mut out = Map::new();
        put_map(&mut out, "matchLabels", &s.match_labels);
        let exprs: Vec<Value> = s
            .match_expressions
            .iter()
            .map(|e| json!({"key": e.key, "operator": e.operator, "values": e.values}))
            .collect();
        put_vec(&mut out, "matchExpressions", &exprs);
        Value::Object(out)
    })
}

fn quantities(m: &BTreeMap<String, k8s_pb::apimachinery::pkg::api::resource::Quantity>) -> Value {
    json!(m
        .iter()
        .map(|(k, q)| (k.clone(), q.string.clone().unwrap_or_default()))
        .collect::<BTreeMap<_, _>>())
}

fn container(c: &core::Container) -> Value {
    let mut out = Map::new();
    put(&mut out, "name", &c.name);
    put(&mut out, "image", &c.image);
    put_vec(&mut out, "command", &c.command);
    put_vec(&mut out, "args", &c.args);
    put(&mut out, "workingDir", &c.working_dir);
    put(&mut out, "imagePullPolicy", &c.image_pull_policy);
    let ports: Vec<Value> = c
        .ports
        .iter()
        .map(|p| {
            let mut r = Map::new();
            put(&mut r, "name", &p.name);
            put_nz(&mut r, "containerPort", &p.container_port);
            put_nz(&mut r, "hostPort", &p.host_port);
            put(&mut r, "protocol", &p.protocol);
            Value::Object(r)
        })
        .collect();
    put_vec(&mut out, "ports", &ports);
    let env: Vec<Value> = c
        .env
        .iter()
        .map(|e| {
            let mut r = Map::new();
            put(&mut r, "name", &e.name);
            put(&mut r, "value", &e.value);
            Value::Object(r)
        })
        .collect();
    put_vec(&mut out, "env", &env);
    if let Some(r) = &c.resources {
        let mut res = Map::new();
        if !r.limits.is_empty() {
            res.insert("limits".into(), quantities(&r.limits));
        }
        if !r.requests.is_empty() {
            res.insert("requests".into(), quantities(&r.requests));
        }
        out.insert("resources".into(), Value::Object(res));
    }
    Value::Object(out)
}

fn pod_spec(s: &Option<core::PodSpec>) -> Value {
    let mut out = Map::new();
    if let Some(s) = s {
        out.insert(
            "containers".into(),
            json!(s.containers.iter().map(container).collect::<Vec<_>>()),
        );
        let init: Vec<Value> = s.init_containers.iter().map(container).collect();
        put_vec(&mut out, "initContainers", &init);
        put(&mut out, "restartPolicy", &s.restart_policy);
        put(
            &mut out,
            "terminationGracePeriodSeconds",
            &s.termination_grace_period_seconds,
        );
        put(&mut out, "dnsPolicy", &s.dns_policy);
        put(&mut out, "serviceAccountName", &s.service_account_name);
        put(&mut out, "nodeName", &s.node_name);
        put_nz(&mut out, "hostNetwork", &s.host_network);
        put(&mut out, "schedulerName", &s.scheduler_name);
        put_map(&mut out, "nodeSelector", &s.node_selector);
    }
    Value::Object(out)
}

fn decode_err(kind: &ResourceKind, e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!(
        "{} in version \"{}\" cannot be handled as a {}: protobuf: {e}",
        kind.kind, kind.version, kind.kind
    ))
}

/// Decodes a protobuf-encoded object of `kind` into its JSON form.
pub(crate) fn decode(kind: &ResourceKind, body: &[u8]) -> Result<Value, ApiError> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| decode_err(kind, "missing the k8s protobuf magic prefix"))?;
    let unknown = k8s_pb::apimachinery::pkg::runtime::Unknown::decode(rest)
        .map_err(|e| decode_err(kind, e))?;
    let raw = unknown.raw.unwrap_or_default();
    let raw = raw.as_slice();
    let d = |e: prost::DecodeError| decode_err(kind, e);
    let mut obj = match kind.kind {
        "Namespace" => {
            let n = core::Namespace::decode(raw).map_err(d)?;
            json!({"metadata": object_meta(&n.metadata)})
        }
        "ConfigMap" => {
            let c = core::ConfigMap::decode(raw).map_err(d)?;
            let mut out = Map::new();
            out.insert("metadata".into(), object_meta(&c.metadata));
            put_map(&mut out, "data", &c.data);
            put_bytes_map(&mut out, "binaryData", &c.binary_data);
            put(&mut out, "immutable", &c.immutable);
            Value::Object(out)
        }
        "Secret" => {
            let s = core::Secret::decode(raw).map_err(d)?;
            let mut out = Map::new();
            out.insert("metadata".into(), object_meta(&s.metadata));
            put_bytes_map(&mut out, "data", &s.data);
            put_map(&mut out, "stringData", &s.string_data);
            put(&mut out, "type", &s.r#type);
            put(&mut out, "immutable", &s.immutable);
            Value::Object(out)
        }
        "ServiceAccount" => {
            let s = core::ServiceAccount::decode(raw).map_err(d)?;
            let mut out = Map::new();
            out.insert("metadata".into(), object_meta(&s.metadata));
            put(
                &mut out,
                "automountServiceAccountToken",
                &s.automount_service_account_token,
            );
            Value::Object(out)
        }
        "Service" => {
            let s = core::Service::decode(raw).map_err(d)?;
            let mut spec = Map::new();
            if let Some(sp) = &s.spec {
                let ports: Vec<Value> = sp
                    .ports
                    .iter()
                    .map(|p| {
                        let mut r = Map::new();
                        put(&mut r, "name", &p.name);
                        put(&mut r, "protocol", &p.protocol);
                        put_nz(&mut r, "port", &p.port);
                        put_nz(&mut r, "nodePort", &p.node_port);
                        if let Some(t) = &p.target_port {
                            // IntOrString: type 0 = int, 1 = string.
                            let v = if t.r#type == Some(1) {
                                json!(t.str_val.clone().unwrap_or_default())
                            } else {
                                json!(t.int_val.unwrap_or_default())
                            };
                            r.insert("targetPort".into(), v);
                        }
                        Value::Object(r)
                    })
                    .collect();
                put_vec(&mut spec, "ports", &ports);
                put_map(&mut spec, "selector", &sp.selector);
                put(&mut spec, "clusterIP", &sp.cluster_ip);
                put(&mut spec, "type", &sp.r#type);
                put(&mut spec, "externalName", &sp.external_name);
                put(&mut spec, "sessionAffinity", &sp.session_affinity);
                put_vec(&mut spec, "externalIPs", &sp.external_ips);
            }
            json!({"metadata": object_meta(&s.metadata), "spec": spec})
        }
        "Deployment" => {
            let dep = apps::Deployment::decode(raw).map_err(d)?;
            let mut spec = Map::new();
            if let Some(sp) = &dep.spec {
                put(&mut spec, "replicas", &sp.replicas);
                if let Some(sel) = label_selector(&sp.selector) {
                    spec.insert("selector".into(), sel);
                }
                if let Some(t) = &sp.template {
                    spec.insert(
                        "template".into(),
                        json!({"metadata": object_meta(&t.metadata), "spec": pod_spec(&t.spec)}),
                    );
                }
                if let Some(st) = sp.strategy.as_ref().and_then(|s| s.r#type.clone()) {
                    spec.insert("strategy".into(), json!({"type": st}));
                }
                put_nz(&mut spec, "minReadySeconds", &sp.min_ready_seconds);
                put(
                    &mut spec,
                    "revisionHistoryLimit",
                    &sp.revision_history_limit,
                );
                put(&mut spec, "paused", &sp.paused);
                put(
                    &mut spec,
                    "progressDeadlineSeconds",
                    &sp.progress_deadline_seconds,
                );
            }
            json!({"metadata": object_meta(&dep.metadata), "spec": spec})
        }
        "Role" | "ClusterRole" => {
            let (m, rules) = if kind.kind == "Role" {
                let r = rbac::Role::decode(raw).map_err(d)?;
                (r.metadata, r.rules)
            } else {
                let r = rbac::ClusterRole::decode(raw).map_err(d)?;
                (r.metadata, r.rules)
            };
            let rules: Vec<Value> = rules
                .iter()
                .map(|r| {
                    let mut o = Map::new();
                    o.insert("verbs".into(), json!(r.verbs));
                    put_vec(&mut o, "apiGroups", &r.api_groups);
                    put_vec(&mut o, "resources", &r.resources);
                    put_vec(&mut o, "resourceNames", &r.resource_names);
                    put_vec(&mut o, "nonResourceURLs", &r.non_resource_ur_ls);
                    Value::Object(o)
                })
                .collect();
            json!({"metadata": object_meta(&m), "rules": rules})
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            let (m, subjects, role_ref) = if kind.kind == "RoleBinding" {
                let r = rbac::RoleBinding::decode(raw).map_err(d)?;
                (r.metadata, r.subjects, r.role_ref)
            } else {
                let r = rbac::ClusterRoleBinding::decode(raw).map_err(d)?;
                (r.metadata, r.subjects, r.role_ref)
            };
            let subjects: Vec<Value> = subjects
                .iter()
                .map(|s| {
                    let mut o = Map::new();
                    put(&mut o, "kind", &s.kind);
                    put(&mut o, "apiGroup", &s.api_group);
                    put(&mut o, "name", &s.name);
                    put(&mut o, "namespace", &s.namespace);
                    Value::Object(o)
                })
                .collect();
            let role_ref = role_ref
                .map(|r| json!({"apiGroup": r.api_group, "kind": r.kind, "name": r.name}))
                .unwrap_or(json!({}));
            json!({"metadata": object_meta(&m), "subjects": subjects, "roleRef": role_ref})
        }
        "SelfSubjectAccessReview" => {
            let r =
                k8s_pb::api::authorization::v1::SelfSubjectAccessReview::decode(raw).map_err(d)?;
            let mut spec = Map::new();
            if let Some(sp) = &r.spec {
                if let Some(a) = &sp.resource_attributes {
                    let mut o = Map::new();
                    put(&mut o, "namespace", &a.namespace);
                    put(&mut o, "verb", &a.verb);
                    put(&mut o, "group", &a.group);
                    put(&mut o, "version", &a.version);
                    put(&mut o, "resource", &a.resource);
                    put(&mut o, "subresource", &a.subresource);
                    put(&mut o, "name", &a.name);
                    spec.insert("resourceAttributes".into(), Value::Object(o));
                }
                if let Some(a) = &sp.non_resource_attributes {
                    let mut o = Map::new();
                    put(&mut o, "path", &a.path);
                    put(&mut o, "verb", &a.verb);
                    spec.insert("nonResourceAttributes".into(), Value::Object(o));
                }
            }
            json!({"metadata": object_meta(&r.metadata), "spec": spec})
        }
        _ => {
            return Err(ApiError::unsupported_media_type(
                "application/vnd.kubernetes.protobuf",
            ))
        }
    };
    obj["apiVersion"] = json!(kind.api_version());
    obj["kind"] = json!(kind.kind);
    Ok(obj)
}

/// Decodes a protobuf `authentication.k8s.io/v1` TokenRequest (the body of `serviceaccounts/<name>/token`, which
/// kubectl's typed client writes as protobuf) into its JSON form.
pub(crate) fn decode_token_request(body: &[u8]) -> Result<Value, ApiError> {
    let bad = |e: &dyn std::fmt::Display| {
        ApiError::bad_request(format!(
            "TokenRequest in version \"v1\" cannot be handled as a TokenRequest: protobuf: {e}"
        ))
    };
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad(&"missing the k8s protobuf magic prefix"))?;
    let unknown = k8s_pb::apimachinery::pkg::runtime::Unknown::decode(rest).map_err(|e| bad(&e))?;
    let raw = unknown.raw.unwrap_or_default();
    let tr = k8s_pb::api::authentication::v1::TokenRequest::decode(raw.as_slice())
        .map_err(|e| bad(&e))?;
    let mut spec = Map::new();
    if let Some(s) = &tr.spec {
        put_vec(&mut spec, "audiences", &s.audiences);
        put(&mut spec, "expirationSeconds", &s.expiration_seconds);
        if let Some(r) = &s.bound_object_ref {
            let mut b = Map::new();
            put(&mut b, "kind", &r.kind);
            put(&mut b, "apiVersion", &r.api_version);
            put(&mut b, "name", &r.name);
            put(&mut b, "uid", &r.u_id);
            spec.insert("boundObjectRef".into(), Value::Object(b));
        }
    }
    Ok(json!({"metadata": object_meta(&tr.metadata), "spec": spec}))
}
