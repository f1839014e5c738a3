//! OpenAPI v3, generated from the kind table and `k8s-openapi`'s schemas (schemars, OpenAPI 3 settings).
//!
//! kubectl needs it for `create`/`apply` (it refuses to validate without it unless `--validate=false`) and for
//! `explain`. What it looks for: `GET /openapi/v3` listing group-versions with `serverRelativeURL`s; per
//! group-version, `components.schemas` carrying `x-kubernetes-group-version-kind`, and a PATCH operation per kind
//! with the same extension and a `fieldValidation` query parameter (then kubectl leaves validation to the server
//! and sends `fieldValidation=Strict`). `/openapi/v2` is answered 404, which kubectl ≥1.29 tolerates.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use serde_json::{json, Map, Value};

use super::discovery::GIT_VERSION;
use super::resources::{self, ResourceKind, KINDS};
use super::status::ApiError;
use super::{full, json_response, Body, State};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn gvk(k: &ResourceKind) -> Value {
    json!({"group": k.group, "version": k.version, "kind": k.kind})
}

fn operation(k: &ResourceKind, action: &str, schema: &str, with_body: bool) -> Value {
    let reference = json!({"$ref": format!("#/components/schemas/{schema}")});
    let mut op = json!({
        "operationId": format!("{action}{}", k.kind),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk(k),
        "parameters": [],
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}},
    });
    if matches!(action, "post" | "put" | "patch") {
        op["parameters"] = json!([
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true},
             "description": "When present, indicates that modifications should not be persisted."},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true},
             "description": "fieldManager is a name associated with the actor or entity that is making these changes."},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true},
             "description": "fieldValidation instructs the server on how to handle objects in the request containing unknown or duplicate fields. Valid values are: Ignore, Warn (default) and Strict."},
        ]);
    }
    if with_body {
        let body_schema = if action == "patch" {
            json!({"type": "object"})
        } else {
            reference
        };
        let types: &[&str] = if action == "patch" {
            &[
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
                "application/apply-patch+yaml",
            ]
        } else {
            &["application/json"]
        };
        let content: Map<String, Value> = types
            .iter()
            .map(|t| ((*t).to_string(), json!({"schema": body_schema})))
            .collect();
        op["requestBody"] = json!({"content": content, "required": true});
    }
    op
}

/// Renders every group-version's document once.
pub(crate) fn render() -> HashMap<String, Bytes> {
    let mut docs = HashMap::new();
    for (group, version) in resources::group_versions() {
        let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
        let mut names = Vec::new();
        for k in KINDS
            .iter()
            .filter(|k| k.group == group && k.version == version)
        {
            names.push((k, (k.schema)(&mut generator)));
        }
        let mut schemas = generator.take_definitions(true);
        add_patch_extensions(&mut schemas);
        let mut paths = Map::new();
        for (k, schema) in &names {
            if let Some(s) = schemas.get_mut(schema).and_then(Value::as_object_mut) {
                s.insert("x-kubernetes-group-version-kind".into(), json!([gvk(k)]));
            }
            let base = if k.group.is_empty() {
                format!("/api/{}", k.version)
            } else {
                format!("/apis/{}/{}", k.group, k.version)
            };
            let collection = if k.namespaced {
                format!("{base}/namespaces/{{namespace}}/{}", k.plural)
            } else {
                format!("{base}/{}", k.plural)
            };
            paths.insert(
                collection.clone(),
                json!({"get": operation(k, "list", schema, false), "post": operation(k, "post", schema, true)}),
            );
            paths.insert(
                format!("{collection}/{{name}}"),
                json!({
                    "get": operation(k, "get", schema, false),
                    "put": operation(k, "put", schema, true),
                    "patch": operation(k, "patch", schema, true),
                    "delete": operation(k, "delete", schema, false),
                }),
            );
        }
        let doc = json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": GIT_VERSION},
            "paths": paths,
            "components": {"schemas": schemas},
        });
        docs.insert(
            gv_path(group, version),
            Bytes::from(serde_json::to_vec(&doc).unwrap_or_default()),
        );
    }
    docs
}

/// Adds `x-kubernetes-patch-strategy`/`x-kubernetes-patch-merge-key` (the Go types' `patchStrategy` and
/// `patchMergeKey` tags, which k8s-openapi's schemas do not carry). kubectl computes strategic merge patches from
/// them: without them it treats every list as atomic and sends whole lists, so removals inside a merged list (an
/// env var dropped from one container) would be lost.
fn add_patch_extensions(schemas: &mut Map<String, Value>) {
    for (name, schema) in schemas.iter_mut() {
        let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
            continue;
        };
        for (field, prop) in props.iter_mut() {
            let Some(p) = prop.as_object_mut() else {
                continue;
            };
            let is_array = p.get("type").and_then(Value::as_str) == Some("array");
            let (strategy, key): (&str, Option<&str>) = match field.as_str() {
                "containers"
                | "initContainers"
                | "ephemeralContainers"
                | "env"
                | "imagePullSecrets"
                | "resourceClaims"
                | "schedulingGates" => ("merge", Some("name")),
                "volumes" if name.ends_with(".PodSpec") => ("merge,retainKeys", Some("name")),
                "volumeMounts" => ("merge", Some("mountPath")),
                "volumeDevices" => ("merge", Some("devicePath")),
                "ports"
                    if name.ends_with(".Container") || name.ends_with(".EphemeralContainer") =>
                {
                    ("merge", Some("containerPort"))
                }
                "ports" if name.ends_with(".ServiceSpec") => ("merge", Some("port")),
                "conditions" | "addresses" if name.ends_with("Status") => ("merge", Some("type")),
                "ownerReferences" => ("merge", Some("uid")),
                "hostAliases" => ("merge", Some("ip")),
                "taints" if name.ends_with(".NodeSpec") => ("merge", Some("key")),
                "topologySpreadConstraints" => ("merge", Some("topologyKey")),
                "finalizers" if name.ends_with(".ObjectMeta") => ("merge", None),
                "strategy" if name.ends_with(".DeploymentSpec") => ("retainKeys", None),
                _ => continue,
            };
            if !is_array && strategy != "retainKeys" {
                continue;
            }
            p.insert("x-kubernetes-patch-strategy".into(), json!(strategy));
            if let Some(k) = key {
                p.insert("x-kubernetes-patch-merge-key".into(), json!(k));
            }
        }
    }
}

fn hash(b: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    format!("{:016X}", h.finish())
}

pub(crate) fn index(state: &Arc<State>) -> Response<Body> {
    let mut paths = Map::new();
    let mut keys: Vec<&String> = state.openapi.keys().collect();
    keys.sort();
    for k in keys {
        let h = hash(&state.openapi[k]);
        paths.insert(
            k.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{k}?hash={h}")}),
        );
    }
    json_response(200, &json!({"paths": paths}))
}

pub(crate) fn document(state: &Arc<State>, path: &str) -> Result<Response<Body>, ApiError> {
    let doc = state
        .openapi
        .get(path)
        .ok_or_else(|| ApiError::path_not_found(&format!("/openapi/v3/{path}")))?;
    let mut r = Response::new(full(doc.clone()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(r)
}
