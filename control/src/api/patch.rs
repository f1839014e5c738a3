//! PATCH: JSON patch (RFC 6902), JSON merge patch (RFC 7386), strategic merge patch, and server-side apply.
//!
//! Strategic merge patch follows apimachinery's `strategicpatch` package: lists with a patch merge key (in the Go
//! types' `patchMergeKey` tags; here a table by field name and context) merge element-wise by that key, other
//! lists are replaced; `null` deletes a field; directives `$patch: replace|delete|merge`, `$retainKeys`,
//! `$setElementOrder/<list>` and `$deleteFromPrimitiveList/<list>` are honoured.
//!
//! Which lists merge by which key comes from `api::schema`, shared with server-side apply (`api::fieldmanager`),
//! which handles `application/apply-patch+yaml`.

use serde_json::{Map, Value};

use super::schema;
use super::status::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let media = ct.split(';').next().unwrap_or_default().trim();
        match media {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

fn invalid(message: String) -> ApiError {
    ApiError {
        code: 422,
        reason: "Invalid",
        message,
        details: None,
    }
}

/// Applies `patch` to `current`, returning the patched object.
pub(crate) fn apply(ptype: PatchType, current: &Value, patch: &Value) -> Result<Value, ApiError> {
    let mut doc = current.clone();
    match ptype {
        PatchType::Json => {
            let p: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut doc, &p)
                .map_err(|e| invalid(format!("the JSON patch cannot be applied: {e}")))?;
        }
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            json_patch::merge(&mut doc, patch);
        }
        PatchType::Strategic => {
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "a strategic merge patch must be a JSON object",
                ));
            }
            doc = strategic_merge(current, patch, &mut Vec::new())?;
        }
        PatchType::Apply => {
            return Err(ApiError::internal(
                "server-side apply is handled by the field manager, not as a patch",
            ))
        }
    }
    Ok(doc)
}

/// The patch merge key of list `field` at `path` (the keys above it), from the Go types' `patchMergeKey` tags.
fn merge_key(path: &[String], field: &str) -> Option<&'static str> {
    schema::list_schema(path, field).patch_merge_key
}

/// Lists of scalars with `patchStrategy:"merge"` (union instead of replace).
fn merges_primitives(path: &[String], field: &str) -> bool {
    schema::list_schema(path, field).patch_merges_scalars
}

fn strategic_merge(
    original: &Value,
    patch: &Value,
    path: &mut Vec<String>,
) -> Result<Value, ApiError> {
    let (Some(orig), Some(p)) = (original.as_object(), patch.as_object()) else {
        return Ok(strip_directives(patch));
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => return Ok(strip_directives(patch)),
        Some("delete") => return Ok(Value::Null),
        Some("merge") | None => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown patch directive {other:?}"
            )))
        }
    }
    let mut out: Map<String, Value> = orig.clone();
    if let Some(retain) = p.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        out.retain(|k, _| keep.contains(&k.as_str()));
    }
    let mut orders: Vec<(String, Vec<Value>)> = Vec::new();
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            if let Some(list) = v.as_array() {
                orders.push((field.to_string(), list.clone()));
            }
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let remove: Vec<&Value> = v.as_array().map(|a| a.iter().collect()).unwrap_or_default();
            if let Some(Value::Array(list)) = out.get_mut(field) {
                list.retain(|x| !remove.contains(&x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            out.remove(k);
            continue;
        }
        let merged = match (out.get(k), v) {
            (Some(ov @ Value::Object(_)), Value::Object(_)) => {
                path.push(k.clone());
                let r = strategic_merge(ov, v, path);
                path.pop();
                r?
            }
            (Some(Value::Array(ol)), Value::Array(pl)) => merge_list(k, ol, pl, path)?,
            (None, Value::Array(pl)) => merge_list(k, &[], pl, path)?,
            (_, v) => strip_directives(v),
        };
        if merged.is_null() {
            out.remove(k);
        } else {
            out.insert(k.clone(), merged);
        }
    }
    for (field, order) in orders {
        if let Some(Value::Array(list)) = out.get_mut(&field) {
            let key = merge_key(path, &field);
            let same = |a: &Value, b: &Value| match key {
                Some(k) => a.get(k).is_some() && a.get(k) == b.get(k),
                None => a == b,
            };
            let mut ordered = Vec::with_capacity(list.len());
            for o in &order {
                if let Some(pos) = list.iter().position(|x| same(o, x)) {
                    ordered.push(list.remove(pos));
                }
            }
            ordered.append(list);
            *list = ordered;
        }
    }
    Ok(Value::Object(out))
}

fn merge_list(
    field: &str,
    original: &[Value],
    patch: &[Value],
    path: &mut Vec<String>,
) -> Result<Value, ApiError> {
    if patch
        .iter()
        .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        let kept: Vec<Value> = patch
            .iter()
            .filter(|e| e.get("$patch").is_none())
            .map(strip_directives)
            .collect();
        return Ok(Value::Array(kept));
    }
    if merges_primitives(path, field) {
        let mut out = original.to_vec();
        for v in patch {
            if !out.contains(v) {
                out.push(v.clone());
            }
        }
        return Ok(Value::Array(out));
    }
    let Some(key) = merge_key(path, field) else {
        return Ok(Value::Array(patch.iter().map(strip_directives).collect()));
    };
    let mut out = original.to_vec();
    path.push(field.to_string());
    for pe in patch {
        let Some(kv) = pe.get(key) else {
            path.pop();
            return Err(ApiError::bad_request(format!(
                "map: {pe} does not contain declared merge key: {key}"
            )));
        };
        let pos = out.iter().position(|oe| oe.get(key) == Some(kv));
        let delete = pe.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => {
                let merged = strategic_merge(&out[i], pe, path)?;
                out[i] = merged;
            }
            (None, false) => out.push(strip_directives(pe)),
        }
    }
    path.pop();
    Ok(Value::Array(out))
}

/// A patch value with directives removed (for values that replace rather than merge).
fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn smp(orig: Value, patch: Value) -> Value {
        strategic_merge(&orig, &patch, &mut Vec::new()).expect("patch applies")
    }

    #[test]
    fn containers_merge_by_name_and_keep_order() {
        let orig = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}]}});
        let patch = json!({"spec": {
            "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
            "containers": [{"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}]}]}});
        let out = smp(orig, patch);
        let cs = out["spec"]["containers"].as_array().expect("list");
        assert_eq!(cs[0]["name"], "b");
        assert_eq!(cs[1]["image"], "a:2");
        assert_eq!(
            cs[1]["env"].as_array().expect("env").len(),
            2,
            "env merges by name"
        );
    }

    #[test]
    fn directives_delete_replace_and_null() {
        let orig = json!({"metadata": {"labels": {"a": "1", "b": "2"}},
            "spec": {"containers": [{"name": "a", "ports": [{"containerPort": 80}, {"containerPort": 81}]}],
                     "args": ["x"]}});
        let patch = json!({"metadata": {"labels": {"a": null}},
            "spec": {"containers": [{"name": "a", "ports": [{"containerPort": 81, "$patch": "delete"}]}],
                     "args": ["y", "z"]}});
        let out = smp(orig, patch);
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(
            out["spec"]["containers"][0]["ports"],
            json!([{"containerPort": 80}])
        );
        assert_eq!(
            out["spec"]["args"],
            json!(["y", "z"]),
            "lists without a merge key are replaced"
        );
        let replaced = smp(
            json!({"spec": {"selector": {"a": "1", "b": "2"}}}),
            json!({"spec": {"selector": {"$patch": "replace", "c": "3"}}}),
        );
        assert_eq!(replaced["spec"]["selector"], json!({"c": "3"}));
        let retained = smp(
            json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}}),
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
        );
        assert_eq!(retained["spec"]["strategy"], json!({"type": "Recreate"}));
    }
}
