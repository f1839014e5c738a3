//! Object semantics: system metadata, upstream defaults, decoding through the typed API, and validation.
//!
//! Ref: kubernetes `pkg/apis/core/v1/defaults.go`, `pkg/apis/apps/v1/defaults.go`, `pkg/apis/core/validation`,
//! `apimachinery/pkg/api/validation` (names, labels), and the registry strategies (`PrepareForCreate/Update`).

use serde_json::{json, Map, Value};

use super::resources::ResourceKind;
use super::selectors::LabelSelector;
use super::status::{ApiError, Cause};

/// Now as RFC 3339 with second precision, as `metav1.Time` serialises.
pub(crate) fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// RFC 3339 `secs` seconds from now.
pub(crate) fn now_plus(secs: i64) -> String {
    let t = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap_or_else(|_| jiff::Timestamp::now());
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub(crate) fn meta(obj: &Value) -> &Value {
    obj.get("metadata").unwrap_or(&Value::Null)
}

pub(crate) fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

pub(crate) fn name_of(obj: &Value) -> &str {
    meta(obj)
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Random suffix for `generateName` (upstream `utilrand.String(5)`: consonants and digits, no vowels).
pub(crate) fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(5)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// Fills in name (from `generateName`), uid, creationTimestamp, generation; clears fields clients may not set.
pub(crate) fn prepare_create(kind: &ResourceKind, obj: &mut Value, namespace: Option<&str>) {
    obj["apiVersion"] = json!(kind.api_version());
    obj["kind"] = json!(kind.kind);
    let m = meta_mut(obj);
    if m.get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .is_empty()
    {
        if let Some(prefix) = m.get("generateName").and_then(Value::as_str) {
            if !prefix.is_empty() {
                let name = format!("{prefix}{}", random_suffix());
                m.insert("name".into(), json!(name));
            }
        }
    }
    if kind.namespaced {
        if let Some(ns) = namespace {
            m.insert("namespace".into(), json!(ns));
        }
    } else {
        m.remove("namespace");
    }
    m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    m.insert("creationTimestamp".into(), json!(now()));
    for f in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
    ] {
        m.remove(f);
    }
    if tracks_generation(kind) {
        m.insert("generation".into(), json!(1));
    } else {
        m.remove("generation");
    }
}

/// Kinds whose strategies set `metadata.generation` and bump it on spec changes.
pub(crate) fn tracks_generation(kind: &ResourceKind) -> bool {
    matches!(kind.kind, "Deployment" | "ReplicaSet" | "Pod" | "Service")
}

/// Carries over what an update may not change, from the stored object; bumps generation on spec changes.
pub(crate) fn prepare_update(
    kind: &ResourceKind,
    new: &mut Value,
    old: &Value,
    subresource: Option<&str>,
) {
    new["apiVersion"] = json!(kind.api_version());
    new["kind"] = json!(kind.kind);
    match subresource {
        Some("status") => {
            // The status subresource changes status only (Ref: registry `statusStrategy.PrepareForUpdate`).
            let status = new.get("status").cloned();
            *new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            return;
        }
        Some("finalize") => {
            // `namespaces/<name>/finalize` changes `spec.finalizers` only (Ref: namespace `finalizeStrategy`).
            let finalizers = new.pointer("/spec/finalizers").cloned();
            *new = old.clone();
            match finalizers {
                Some(f) => new["spec"]["finalizers"] = f,
                None => {
                    if let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut) {
                        spec.remove("finalizers");
                    }
                }
            }
            return;
        }
        _ => {
            if kind.has_status() {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
        }
    }
    let old_meta = meta(old);
    let m = meta_mut(new);
    for f in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "namespace",
        "name",
        "generation",
    ] {
        match old_meta.get(f) {
            Some(v) => m.insert(f.into(), v.clone()),
            None => m.remove(f),
        };
    }
    m.remove("resourceVersion");
    if tracks_generation(kind) && new.get("spec") != old.get("spec") {
        let g = old_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            + 1;
        meta_mut(new).insert("generation".into(), json!(g));
    }
}

/// Quantities may be written as numbers in YAML (`cpu: 1`); the API accepts them, the typed decoder does not.
pub(crate) fn stringify_quantities(v: &mut Value, in_quantity_map: bool) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                if in_quantity_map {
                    if let Value::Number(n) = child {
                        *child = Value::String(n.to_string());
                        continue;
                    }
                }
                let q = matches!(
                    k.as_str(),
                    "limits"
                        | "requests"
                        | "capacity"
                        | "allocatable"
                        | "overhead"
                        | "hard"
                        | "used"
                );
                if k == "sizeLimit" {
                    if let Value::Number(n) = child {
                        *child = Value::String(n.to_string());
                        continue;
                    }
                }
                stringify_quantities(child, q);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| stringify_quantities(c, false)),
        _ => {}
    }
}

/// Paths present (non-null) in `orig` but absent from its typed round-trip: fields the schema does not declare.
/// Appends to `out` the paths of fields in `orig` that the typed round trip dropped. `path` is a scratch buffer
/// holding the current path (extended and truncated in place, so a clean object costs no allocations).
fn unknown_fields(orig: &Value, typed: &Value, path: &mut String, out: &mut Vec<String>) {
    let len = path.len();
    match (orig, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                match t.get(k) {
                    Some(tv) => {
                        if !path.is_empty() {
                            path.push('.');
                        }
                        path.push_str(k);
                        unknown_fields(v, tv, path, out);
                        path.truncate(len);
                    }
                    None if v.is_null() => {}
                    // Empty maps/lists may be dropped by the typed encoder without being unknown.
                    None if v.as_object().is_some_and(Map::is_empty)
                        || v.as_array().is_some_and(Vec::is_empty) => {}
                    None if path.is_empty() => out.push(k.clone()),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            for (i, (ov, tv)) in o.iter().zip(t).enumerate() {
                use std::fmt::Write;
                let _ = write!(path, "[{i}]");
                unknown_fields(ov, tv, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// How to treat unknown fields (`fieldValidation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(s: Option<&str>) -> Result<Self, ApiError> {
        match s {
            None | Some("") | Some("Warn") => Ok(Self::Warn),
            Some("Ignore") => Ok(Self::Ignore),
            Some("Strict") => Ok(Self::Strict),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation must be one of Ignore, Warn or Strict, got {other:?}"
            ))),
        }
    }
}

/// Decodes through the typed API: type errors are 400s, unknown fields are dropped (and reported or refused
/// according to `validation`). Returns the normalised object and warnings.
pub(crate) fn decode(
    kind: &ResourceKind,
    mut obj: Value,
    validation: FieldValidation,
) -> Result<(Value, Vec<String>), ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: the body is not a JSON object",
            kind.kind, kind.version, kind.kind
        )));
    }
    stringify_quantities(&mut obj, false);
    let typed = (kind.normalize)(&obj).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            kind.kind, kind.version, kind.kind
        ))
    })?;
    let Some(typed) = typed else {
        // Already in its typed form: nothing was dropped.
        return Ok((obj, Vec::new()));
    };
    let mut unknown = Vec::new();
    if validation != FieldValidation::Ignore {
        unknown_fields(&obj, &typed, &mut String::new(), &mut unknown);
    }
    let warnings: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    if validation == FieldValidation::Strict && !warnings.is_empty() {
        return Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            warnings.join(", ")
        )));
    }
    Ok((typed, warnings))
}

fn set_default(obj: &mut Map<String, Value>, key: &str, value: Value) {
    if obj.get(key).is_none_or(Value::is_null) {
        obj.insert(key.into(), value);
    }
}

fn image_pull_policy(image: &str) -> &'static str {
    // Ref: SetDefaults_Container: Always for `:latest` or no tag, otherwise IfNotPresent (digests count as tags).
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        return "IfNotPresent";
    }
    match last.split_once(':') {
        None => "Always",
        Some((_, "latest")) => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn default_containers(list: Option<&mut Value>) {
    for c in list.and_then(Value::as_array_mut).into_iter().flatten() {
        let Some(c) = c.as_object_mut() else { continue };
        let image = c
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        set_default(c, "imagePullPolicy", json!(image_pull_policy(&image)));
        set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
        set_default(c, "terminationMessagePolicy", json!("File"));
        set_default(c, "resources", json!({}));
        for p in c
            .get_mut("ports")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(p) = p.as_object_mut() {
                set_default(p, "protocol", json!("TCP"));
            }
        }
    }
}

fn default_pod_spec(spec: &mut Value) {
    let Some(s) = spec.as_object_mut() else {
        return;
    };
    set_default(s, "restartPolicy", json!("Always"));
    set_default(s, "dnsPolicy", json!("ClusterFirst"));
    set_default(s, "terminationGracePeriodSeconds", json!(30));
    set_default(s, "schedulerName", json!("default-scheduler"));
    set_default(s, "securityContext", json!({}));
    set_default(s, "enableServiceLinks", json!(true));
    default_containers(s.get_mut("containers"));
    default_containers(s.get_mut("initContainers"));
}

/// The pod's QoS class (Ref: `pkg/apis/core/helper/qos`): Guaranteed when every container has equal cpu and
/// memory limits and requests, BestEffort when none has any, Burstable otherwise.
fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec
        .get("containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in &containers {
        let limits = c.pointer("/resources/limits");
        let requests = c.pointer("/resources/requests");
        for r in ["cpu", "memory"] {
            let l = limits.and_then(|l| l.get(r));
            let q = requests.and_then(|q| q.get(r)).or(l);
            if l.is_some() || q.is_some() {
                any = true;
            }
            if l.is_none() || l != q {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// The DefaultTolerationSeconds admission plugin: a new pod without its own NoExecute toleration for the
/// not-ready/unreachable taints gets one for `not_ready`/`unreachable` seconds (kube-apiserver's
/// `--default-not-ready-toleration-seconds`/`--default-unreachable-toleration-seconds`, 300 by default).
pub(crate) fn default_tolerations(
    kind: &ResourceKind,
    obj: &mut Value,
    not_ready: i64,
    unreachable: i64,
) {
    if kind.kind != "Pod" {
        return;
    }
    let Some(s) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let tol = s.entry("tolerations").or_insert_with(|| json!([]));
    if let Some(t) = tol.as_array_mut() {
        for (key, secs) in [
            ("node.kubernetes.io/not-ready", not_ready),
            ("node.kubernetes.io/unreachable", unreachable),
        ] {
            if !t
                .iter()
                .any(|x| x.get("key").and_then(Value::as_str) == Some(key))
            {
                t.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": secs}));
            }
        }
    }
}

/// Upstream defaults for a new object (and, for templates, on update too).
pub(crate) fn apply_defaults(kind: &ResourceKind, obj: &mut Value, creating: bool) {
    match kind.kind {
        "Pod" => {
            if let Some(spec) = obj.get_mut("spec") {
                default_pod_spec(spec);
            }
            if creating {
                let qos = obj.get("spec").map(qos_class).unwrap_or("BestEffort");
                obj["status"] = json!({"phase": "Pending", "qosClass": qos});
            }
        }
        "Deployment" | "ReplicaSet" => {
            if let Some(s) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                set_default(s, "replicas", json!(1));
                set_default(s, "revisionHistoryLimit", json!(10));
                if kind.kind == "Deployment" {
                    set_default(s, "progressDeadlineSeconds", json!(600));
                    set_default(s, "strategy", json!({"type": "RollingUpdate"}));
                    if let Some(st) = s.get_mut("strategy").and_then(Value::as_object_mut) {
                        if st.get("type").and_then(Value::as_str) == Some("RollingUpdate") {
                            set_default(
                                st,
                                "rollingUpdate",
                                json!({"maxUnavailable": "25%", "maxSurge": "25%"}),
                            );
                        }
                    }
                } else {
                    s.remove("revisionHistoryLimit");
                }
                if let Some(t) = s.get_mut("template").and_then(|t| t.get_mut("spec")) {
                    default_pod_spec(t);
                }
            }
            if creating {
                if let Some(o) = obj.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        "Service" => {
            if let Some(s) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                set_default(s, "type", json!("ClusterIP"));
                set_default(s, "sessionAffinity", json!("None"));
                let t = s
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if t != "ExternalName" {
                    set_default(s, "internalTrafficPolicy", json!("Cluster"));
                    set_default(s, "ipFamilies", json!(["IPv4"]));
                    set_default(s, "ipFamilyPolicy", json!("SingleStack"));
                }
                if t == "NodePort" || t == "LoadBalancer" {
                    set_default(s, "externalTrafficPolicy", json!("Cluster"));
                }
                for p in s
                    .get_mut("ports")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    if let Some(p) = p.as_object_mut() {
                        set_default(p, "protocol", json!("TCP"));
                        if let Some(port) = p.get("port").cloned() {
                            set_default(p, "targetPort", port);
                        }
                    }
                }
            }
            if creating && obj.get("status").is_none() {
                obj["status"] = json!({"loadBalancer": {}});
            }
        }
        "Namespace" => {
            if creating {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
                obj["status"] = json!({"phase": "Active"});
            }
            // Upstream labels every namespace with its name (NamespaceDefaultLabelName).
            let name = name_of(obj).to_string();
            let m = meta_mut(obj);
            let labels = m.entry("labels").or_insert_with(|| json!({}));
            if let Some(l) = labels.as_object_mut() {
                l.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
        }
        "Secret" => {
            if let Some(o) = obj.as_object_mut() {
                set_default(o, "type", json!("Opaque"));
            }
        }
        _ => {}
    }
}

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

pub(crate) fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
            && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric))
}

fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns1123_subdomain) && !name.is_empty() && is_label_value(name)
}

fn validate_meta(kind: &ResourceKind, obj: &Value, causes: &mut Vec<Cause>) {
    let m = meta(obj);
    let name = m.get("name").and_then(Value::as_str).unwrap_or_default();
    if name.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired",
            field: "metadata.name".into(),
            message: "Required value: name or generateName is required".into(),
        });
    } else {
        // Namespaces and services are DNS labels; most other names are DNS subdomains.
        let label = matches!(kind.kind, "Namespace" | "Service");
        if label && !is_dns1123_label(name) {
            causes.push(Cause::invalid(
                "metadata.name",
                &json!(name),
                DNS1123_LABEL_MSG,
            ));
        } else if !label
            && !matches!(
                kind.kind,
                "Event" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
            )
            && !is_dns1123_subdomain(name)
        {
            causes.push(Cause::invalid(
                "metadata.name",
                &json!(name),
                DNS1123_SUBDOMAIN_MSG,
            ));
        }
    }
    for (field, value_check) in [("labels", true), ("annotations", false)] {
        if let Some(map) = m.get(field).and_then(Value::as_object) {
            for (k, v) in map {
                if !is_qualified_name(k) {
                    causes.push(Cause::invalid(
                        format!("metadata.{field}"),
                        &json!(k),
                        "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                    ));
                }
                if value_check && !is_label_value(v.as_str().unwrap_or_default()) {
                    causes.push(Cause::invalid(
                        "metadata.labels".to_string(),
                        v,
                        "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                    ));
                }
            }
        }
    }
}

fn validate_containers(
    list: Option<&Value>,
    path: &str,
    required: bool,
    causes: &mut Vec<Cause>,
    names: &mut Vec<String>,
) {
    let items: &[Value] = list.and_then(Value::as_array).map_or(&[], Vec::as_slice);
    if required && items.is_empty() {
        causes.push(Cause::required(path));
    }
    for (i, c) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
        if name.is_empty() {
            causes.push(Cause::required(format!("{p}.name")));
        } else if !is_dns1123_label(name) {
            causes.push(Cause::invalid(
                format!("{p}.name"),
                &json!(name),
                DNS1123_LABEL_MSG,
            ));
        } else if names.iter().any(|n| n == name) {
            causes.push(Cause::duplicate(format!("{p}.name"), &json!(name)));
        } else {
            names.push(name.to_string());
        }
        if c.get("image")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .trim()
            .is_empty()
        {
            causes.push(Cause::required(format!("{p}.image")));
        }
        for (j, port) in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let cp = port
                .get("containerPort")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if !(1..=65535).contains(&cp) {
                causes.push(Cause::invalid(
                    format!("{p}.ports[{j}].containerPort"),
                    &json!(cp),
                    "must be between 1 and 65535, inclusive",
                ));
            }
            if let Some(proto) = port.get("protocol").and_then(Value::as_str) {
                if !matches!(proto, "TCP" | "UDP" | "SCTP") {
                    causes.push(Cause::not_supported(
                        format!("{p}.ports[{j}].protocol"),
                        &json!(proto),
                        &["SCTP", "TCP", "UDP"],
                    ));
                }
            }
        }
        if let Some(policy) = c.get("imagePullPolicy").and_then(Value::as_str) {
            if !matches!(policy, "Always" | "IfNotPresent" | "Never") {
                causes.push(Cause::not_supported(
                    format!("{p}.imagePullPolicy"),
                    &json!(policy),
                    &["Always", "IfNotPresent", "Never"],
                ));
            }
        }
    }
}

fn validate_pod_spec(spec: Option<&Value>, path: &str, causes: &mut Vec<Cause>) {
    let Some(spec) = spec else {
        causes.push(Cause::required(path));
        return;
    };
    let mut names = Vec::new();
    validate_containers(
        spec.get("containers"),
        &format!("{path}.containers"),
        true,
        causes,
        &mut names,
    );
    validate_containers(
        spec.get("initContainers"),
        &format!("{path}.initContainers"),
        false,
        causes,
        &mut names,
    );
    if let Some(rp) = spec.get("restartPolicy").and_then(Value::as_str) {
        if !matches!(rp, "Always" | "OnFailure" | "Never") {
            causes.push(Cause::not_supported(
                format!("{path}.restartPolicy"),
                &json!(rp),
                &["Always", "OnFailure", "Never"],
            ));
        }
    }
    if let Some(dp) = spec.get("dnsPolicy").and_then(Value::as_str) {
        if !matches!(
            dp,
            "ClusterFirst" | "ClusterFirstWithHostNet" | "Default" | "None"
        ) {
            causes.push(Cause::not_supported(
                format!("{path}.dnsPolicy"),
                &json!(dp),
                &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"],
            ));
        }
    }
    let mut vols: Vec<&str> = Vec::new();
    for (i, v) in spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let n = v.get("name").and_then(Value::as_str).unwrap_or_default();
        if n.is_empty() {
            causes.push(Cause::required(format!("{path}.volumes[{i}].name")));
        } else if vols.contains(&n) {
            causes.push(Cause::duplicate(
                format!("{path}.volumes[{i}].name"),
                &json!(n),
            ));
        } else {
            vols.push(n);
        }
    }
}

fn validate_workload(kind: &ResourceKind, obj: &Value, causes: &mut Vec<Cause>) {
    let spec = obj.get("spec");
    if let Some(r) = spec.and_then(|s| s.get("replicas")).and_then(Value::as_i64) {
        if r < 0 {
            causes.push(Cause::invalid(
                "spec.replicas",
                &json!(r),
                "must be greater than or equal to 0",
            ));
        }
    }
    let selector = spec.and_then(|s| s.get("selector"));
    let labels = spec
        .and_then(|s| s.pointer("/template/metadata/labels"))
        .cloned();
    match selector {
        None => causes.push(Cause::required("spec.selector")),
        Some(sel) => match LabelSelector::from_object(sel) {
            Err(e) => causes.push(Cause::invalid("spec.selector", sel, e)),
            Ok(s) if s.is_empty() => causes.push(Cause::invalid(
                "spec.selector",
                sel,
                "empty selector is invalid for deployment",
            )),
            Ok(s) => {
                let probe = json!({"metadata": {"labels": labels.clone().unwrap_or(json!({}))}});
                if !s.matches(&probe) {
                    causes.push(Cause::invalid(
                        "spec.template.metadata.labels",
                        &labels.unwrap_or(json!({})),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
        },
    }
    validate_pod_spec(
        spec.and_then(|s| s.pointer("/template/spec")),
        "spec.template.spec",
        causes,
    );
    if let Some(rp) = spec
        .and_then(|s| s.pointer("/template/spec/restartPolicy"))
        .and_then(Value::as_str)
    {
        if rp != "Always" {
            causes.push(Cause::not_supported(
                "spec.template.spec.restartPolicy",
                &json!(rp),
                &["Always"],
            ));
        }
    }
    let _ = kind;
}

fn validate_service(obj: &Value, node_ports: (u16, u16), causes: &mut Vec<Cause>) {
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    let t = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    if !matches!(
        t,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        causes.push(Cause::not_supported(
            "spec.type",
            &json!(t),
            &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
        ));
    }
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    let ports = spec
        .get("ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if ports.is_empty() && !headless && t != "ExternalName" {
        causes.push(Cause::required("spec.ports"));
    }
    if t == "ExternalName"
        && spec
            .get("externalName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty()
    {
        causes.push(Cause::required("spec.externalName"));
    }
    let mut names = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
        if !(1..=65535).contains(&port) {
            causes.push(Cause::invalid(
                format!("spec.ports[{i}].port"),
                &json!(port),
                "must be between 1 and 65535, inclusive",
            ));
        }
        let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            causes.push(Cause::required(format!("spec.ports[{i}].name")));
        } else if !name.is_empty() && names.contains(&name) {
            causes.push(Cause::duplicate(
                format!("spec.ports[{i}].name"),
                &json!(name),
            ));
        }
        names.push(name);
        if let Some(proto) = p.get("protocol").and_then(Value::as_str) {
            if !matches!(proto, "TCP" | "UDP" | "SCTP") {
                causes.push(Cause::not_supported(
                    format!("spec.ports[{i}].protocol"),
                    &json!(proto),
                    &["SCTP", "TCP", "UDP"],
                ));
            }
        }
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
            if t == "ClusterIP" && np != 0 {
                causes.push(Cause::forbidden(
                    format!("spec.ports[{i}].nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                ));
            } else if np != 0 && !(i64::from(node_ports.0)..=i64::from(node_ports.1)).contains(&np)
            {
                causes.push(Cause::invalid(
                    format!("spec.ports[{i}].nodePort"),
                    &json!(np),
                    format!("provided port is not in the valid range. The range of valid ports is {}-{}", node_ports.0, node_ports.1),
                ));
            }
        }
    }
}

fn validate_data_keys(obj: &Value, causes: &mut Vec<Cause>) {
    for field in ["data", "binaryData", "stringData"] {
        for k in obj
            .get(field)
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|m| m.keys())
        {
            let ok = !k.is_empty()
                && k.len() <= 253
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !ok {
                causes.push(Cause::invalid(
                    format!("{field}[{k}]"),
                    &json!(k),
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                ));
            }
        }
    }
}

/// Validates an object about to be stored; an empty list means valid.
pub(crate) fn validate(kind: &ResourceKind, obj: &Value, node_ports: (u16, u16)) -> Vec<Cause> {
    let mut causes = Vec::new();
    validate_meta(kind, obj, &mut causes);
    match kind.kind {
        "Pod" => validate_pod_spec(obj.get("spec"), "spec", &mut causes),
        "Deployment" | "ReplicaSet" => validate_workload(kind, obj, &mut causes),
        "Service" => validate_service(obj, node_ports, &mut causes),
        "ConfigMap" | "Secret" => validate_data_keys(obj, &mut causes),
        _ => {}
    }
    causes
}

/// The pod spec with the fields an update may change blanked out (Ref: `ValidatePodUpdate`: images,
/// activeDeadlineSeconds, tolerations additions, terminationGracePeriodSeconds, schedulingGates removal).
fn pod_spec_mutable_masked(spec: Option<&Value>) -> Value {
    let mut s = spec.cloned().unwrap_or(json!({}));
    for list in ["containers", "initContainers"] {
        for c in s
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(c) = c.as_object_mut() {
                c.remove("image");
            }
        }
    }
    if let Some(o) = s.as_object_mut() {
        for f in [
            "activeDeadlineSeconds",
            "tolerations",
            "terminationGracePeriodSeconds",
            "schedulingGates",
        ] {
            o.remove(f);
        }
    }
    s
}

/// Checks what a client update may not change (immutable fields), beyond what [`validate`] checks.
// One arm per kind reads better than guards spread over the match.
#[allow(clippy::collapsible_match)]
pub(crate) fn validate_update(kind: &ResourceKind, new: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    match kind.kind {
        "Pod" => {
            if pod_spec_mutable_masked(new.get("spec")) != pod_spec_mutable_masked(old.get("spec"))
            {
                causes.push(Cause::forbidden(
                    "spec",
                    "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
                ));
            }
        }
        "Deployment" | "ReplicaSet" => {
            let (n, o) = (new.pointer("/spec/selector"), old.pointer("/spec/selector"));
            if n != o {
                causes.push(Cause::invalid(
                    "spec.selector",
                    n.unwrap_or(&Value::Null),
                    "field is immutable",
                ));
            }
        }
        "ConfigMap" | "Secret" => {
            if old.get("immutable").and_then(Value::as_bool) == Some(true)
                && (new.get("data") != old.get("data")
                    || new.get("binaryData") != old.get("binaryData"))
            {
                causes.push(Cause::forbidden(
                    "data",
                    "field is immutable when `immutable` is set",
                ));
            }
        }
        _ => {}
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_pull_policy_follows_the_tag() {
        assert_eq!(image_pull_policy("nginx"), "Always");
        assert_eq!(image_pull_policy("nginx:latest"), "Always");
        assert_eq!(image_pull_policy("nginx:1.25"), "IfNotPresent");
        assert_eq!(image_pull_policy("localhost:5000/nginx"), "Always");
        assert_eq!(image_pull_policy("localhost:5000/nginx:1"), "IfNotPresent");
        assert_eq!(image_pull_policy("nginx@sha256:abc"), "IfNotPresent");
    }

    #[test]
    fn dns_names_are_checked_as_rfc_1123() {
        assert!(is_dns1123_label("web-1"));
        assert!(!is_dns1123_label("Web"));
        assert!(!is_dns1123_label("-a"));
        assert!(is_dns1123_subdomain("a.b-c.d"));
        assert!(!is_dns1123_subdomain("a..b"));
    }
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    /// The pod of the API benchmark, as a client sends it.
    fn submitted_pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "pod-", "labels": {"app": "bench"}},
            "spec": {"containers": [{"name": "web", "image": "registry.example:5000/web:1.2.3",
                "ports": [{"name": "http", "containerPort": 8080}],
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}]}})
    }

    #[test]
    fn a_defaulted_new_pod_is_already_in_its_typed_form() {
        let kind = crate::api::resources::find("", "v1", "pods").expect("pods");
        let mut pod = submitted_pod();
        prepare_create(kind, &mut pod, Some("default"));
        apply_defaults(kind, &mut pod, true);
        default_tolerations(kind, &mut pod, 300, 300);
        // `None`: the round trip found nothing to change, so the create path builds no second tree.
        assert_eq!((kind.normalize)(&pod).expect("decodes"), None);
        let (decoded, warnings) =
            decode(kind, pod.clone(), FieldValidation::Strict).expect("decodes");
        assert_eq!(decoded, pod);
        assert!(warnings.is_empty());
    }

    #[test]
    fn unknown_fields_and_nulls_are_still_dropped_and_reported() {
        let kind = crate::api::resources::find("", "v1", "pods").expect("pods");
        let mut pod = submitted_pod();
        pod["spec"]["colour"] = json!("red");
        pod["metadata"]["annotations"] = Value::Null;
        let (decoded, warnings) = decode(kind, pod, FieldValidation::Warn).expect("decodes");
        assert_eq!(warnings, vec!["unknown field \"spec.colour\"".to_string()]);
        assert!(decoded["spec"].get("colour").is_none());
        assert!(decoded["metadata"].get("annotations").is_none());
        let mut pod = submitted_pod();
        pod["spec"]["colour"] = json!("red");
        assert!(decode(kind, pod, FieldValidation::Strict).is_err());
    }
}
