//! Walks over objects with the list and struct semantics of `api::schema`: the field set of an applied
//! configuration, the comparison of two objects, the merge of a configuration into a live object, and the
//! removal of fields.
//!
//! Ref: structured-merge-diff `typed/tofieldset.go`, `typed/compare.go`, `typed/merge.go`, `typed/remove.go`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::set::{self, Element, Path, Set};
use crate::api::schema::{self, ListType};

/// Where a node sits: a field of an object (by name) or an item of a list.
#[derive(Clone, Copy)]
enum Node<'a> {
    Field(&'a str),
    /// An item of list `field`: whether it is owned whole (scalars in sets, atomic structs).
    Item {
        atomic: bool,
    },
}

/// The object keys from the root to the current node (list items add none).
type Names = Vec<String>;

fn list_type(names: &Names, field: &str) -> ListType {
    let parents = &names[..names.len().saturating_sub(1)];
    schema::list_schema(parents, field).apply
}

fn object_is_atomic(node: Node<'_>) -> bool {
    match node {
        Node::Field(f) => schema::is_atomic_object(f),
        Node::Item { atomic } => atomic,
    }
}

/// The path element of a list item, or an error naming what is wrong with it.
fn item_element(names: &Names, field: &str, item: &Value) -> Result<Element, String> {
    match list_type(names, field) {
        ListType::Set => Ok(set::value(item)),
        ListType::Map(keys) => {
            let Value::Object(m) = item else {
                return Err(format!(
                    ".{}: associative list item {item} is not an object",
                    names.join(".")
                ));
            };
            let mut fields = Vec::new();
            for k in keys {
                match m.get(*k) {
                    Some(v) if !v.is_null() => fields.push((*k, v.clone())),
                    _ => {
                        if let Some(d) = schema::key_default(k) {
                            fields.push((*k, Value::String(d.to_string())));
                        }
                    }
                }
            }
            if fields.is_empty() {
                return Err(format!(
                    ".{}: associative list with keys has an element that omits all key fields {keys:?}",
                    names.join(".")
                ));
            }
            Ok(set::key(fields))
        }
        ListType::Atomic => Err(format!(".{} is an atomic list", names.join("."))),
    }
}

fn items_atomic(names: &Names, field: &str) -> bool {
    list_type(names, field) == ListType::Set || schema::items_are_atomic(field)
}

/// The fields an applied configuration sets (upstream `ToFieldSet`).
pub(crate) fn field_set(obj: &Value) -> Result<Set, String> {
    let mut out = Set::new();
    if let Value::Object(m) = obj {
        object_fields(m, &mut Vec::new(), &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

fn object_fields(
    m: &Map<String, Value>,
    path: &mut Path,
    names: &mut Names,
    out: &mut Set,
) -> Result<(), String> {
    for (k, child) in m {
        path.push(set::field(k));
        names.push(k.clone());
        let r = value_fields(Node::Field(k), child, path, names, out);
        names.pop();
        path.pop();
        r?;
    }
    Ok(())
}

fn value_fields(
    node: Node<'_>,
    v: &Value,
    path: &mut Path,
    names: &mut Names,
    out: &mut Set,
) -> Result<(), String> {
    match (v, node) {
        (Value::Object(m), _) if m.is_empty() || object_is_atomic(node) => out.insert(path),
        (Value::Object(m), _) => object_fields(m, path, names, out)?,
        (Value::Array(items), Node::Field(f)) => {
            if list_type(names, f) == ListType::Atomic {
                out.insert(path);
                return Ok(());
            }
            let atomic = items_atomic(names, f);
            for item in items {
                path.push(item_element(names, f, item)?);
                out.insert(path);
                value_fields(Node::Item { atomic }, item, path, names, out)?;
                path.pop();
            }
        }
        _ => out.insert(path),
    }
    Ok(())
}

/// What changed between two objects (upstream `Comparison`).
#[derive(Debug, Default)]
pub(crate) struct Comparison {
    pub added: Set,
    pub modified: Set,
    pub removed: Set,
}

/// Compares `old` (None: the object is being created) with `new`.
pub(crate) fn compare(old: Option<&Value>, new: &Value) -> Result<Comparison, String> {
    let mut cmp = Comparison::default();
    let empty = Value::Object(Map::new());
    compare_node(
        Node::Item { atomic: false },
        Some(old.unwrap_or(&empty)),
        Some(new),
        &mut Vec::new(),
        &mut Vec::new(),
        &mut cmp,
    )?;
    Ok(cmp)
}

fn leaf(l: Option<&Value>, r: Option<&Value>, path: &Path, cmp: &mut Comparison) {
    match (l, r) {
        (None, Some(_)) => cmp.added.insert(path),
        (Some(_), None) => cmp.removed.insert(path),
        (Some(a), Some(b)) if a != b => cmp.modified.insert(path),
        _ => {}
    }
}

/// Items of a keyed or set list by element, in first-seen order (later duplicates ignored).
fn index_items<'v>(
    names: &Names,
    field: &str,
    items: &'v [Value],
) -> Result<(Vec<Element>, BTreeMap<Element, &'v Value>), String> {
    let mut order = Vec::new();
    let mut by = BTreeMap::new();
    for item in items {
        let el = item_element(names, field, item)?;
        if !by.contains_key(&el) {
            by.insert(el.clone(), item);
            order.push(el);
        }
    }
    Ok((order, by))
}

fn compare_node(
    node: Node<'_>,
    l: Option<&Value>,
    r: Option<&Value>,
    path: &mut Path,
    names: &mut Names,
    cmp: &mut Comparison,
) -> Result<(), String> {
    let shape_ok = |v: Option<&Value>, f: &dyn Fn(&Value) -> bool| v.is_none_or(f);
    if shape_ok(l, &Value::is_object) && shape_ok(r, &Value::is_object) {
        let (lm, rm) = (l.and_then(Value::as_object), r.and_then(Value::as_object));
        let empty = lm.is_none_or(Map::is_empty) && rm.is_none_or(Map::is_empty);
        if object_is_atomic(node) || empty {
            leaf(l, r, path, cmp);
            return Ok(());
        }
        let keys: BTreeSet<&String> = lm.into_iter().chain(rm).flat_map(Map::keys).collect();
        for k in keys {
            // Field management never tracks the object's own managedFields (upstream strips them), so the
            // callers need not copy the objects to drop them first.
            if k == "managedFields" && names.len() == 1 && names[0] == "metadata" {
                continue;
            }
            path.push(set::field(k));
            names.push(k.clone());
            let res = compare_node(
                Node::Field(k),
                lm.and_then(|m| m.get(k)),
                rm.and_then(|m| m.get(k)),
                path,
                names,
                cmp,
            );
            names.pop();
            path.pop();
            res?;
        }
    } else if let (true, true, Node::Field(f)) = (
        shape_ok(l, &Value::is_array),
        shape_ok(r, &Value::is_array),
        node,
    ) {
        let (la, ra) = (l.and_then(Value::as_array), r.and_then(Value::as_array));
        let empty = la.is_none_or(Vec::is_empty) && ra.is_none_or(Vec::is_empty);
        if list_type(names, f) == ListType::Atomic || empty {
            leaf(l, r, path, cmp);
            return Ok(());
        }
        let (lorder, lby) = index_items(names, f, la.map(Vec::as_slice).unwrap_or_default())?;
        let (rorder, rby) = index_items(names, f, ra.map(Vec::as_slice).unwrap_or_default())?;
        let atomic = items_atomic(names, f);
        let mut seen = BTreeSet::new();
        for el in lorder.iter().chain(&rorder) {
            if !seen.insert(el) {
                continue;
            }
            path.push(el.clone());
            let res = compare_node(
                Node::Item { atomic },
                lby.get(el).copied(),
                rby.get(el).copied(),
                path,
                names,
                cmp,
            );
            path.pop();
            res?;
        }
    } else {
        leaf(l, r, path, cmp);
        return Ok(());
    }
    // A map or list that appears or disappears as a whole is itself added or removed, except the non-pointer
    // structs an empty Go object already has (see `schema::always_present`).
    match (l, r) {
        (None, Some(_)) if !matches!(node, Node::Field(f) if schema::always_present(f)) => {
            cmp.added.insert(path)
        }
        (Some(_), None) => cmp.removed.insert(path),
        _ => {}
    }
    Ok(())
}

/// Merges an applied configuration into the live object (upstream `TypedValue.Merge`): the configuration wins
/// for scalars and atomic values; maps merge by field, associative lists and sets by item.
pub(crate) fn merge(live: &Value, config: &Value) -> Result<Value, String> {
    merge_node(
        Node::Item { atomic: false },
        Some(live),
        config,
        &mut Vec::new(),
    )
}

fn merge_node(
    node: Node<'_>,
    l: Option<&Value>,
    r: &Value,
    names: &mut Names,
) -> Result<Value, String> {
    match (l, r, node) {
        (None | Some(Value::Object(_)), Value::Object(rm), _) if !object_is_atomic(node) => {
            // A new map is still walked: duplicate keys below it are refused.
            let lm = l.and_then(Value::as_object);
            let mut out = lm.cloned().unwrap_or_default();
            for (k, rv) in rm {
                names.push(k.clone());
                let merged = merge_node(Node::Field(k), lm.and_then(|m| m.get(k)), rv, names);
                names.pop();
                out.insert(k.clone(), merged?);
            }
            Ok(Value::Object(out))
        }
        (Some(Value::Array(la)), Value::Array(ra), Node::Field(f))
            if list_type(names, f) != ListType::Atomic =>
        {
            merge_list(names, f, la, ra).map(Value::Array)
        }
        (None, Value::Array(ra), Node::Field(f)) if list_type(names, f) != ListType::Atomic => {
            // Duplicate keys in a configuration are refused even when nothing is merged.
            merge_list(names, f, &[], ra).map(Value::Array)
        }
        _ => Ok(r.clone()),
    }
}

/// Upstream's list merge order: shared items follow the configuration's order, live-only items keep their
/// place relative to them, new items come where the configuration puts them.
fn merge_list(
    names: &mut Names,
    field: &str,
    live: &[Value],
    config: &[Value],
) -> Result<Vec<Value>, String> {
    let (lpes, lby) = index_items(names, field, live)?;
    let mut rpes = Vec::new();
    let mut rby: BTreeMap<Element, &Value> = BTreeMap::new();
    for item in config {
        let el = item_element(names, field, item)?;
        if rby.insert(el.clone(), item).is_some() {
            return Err(format!(
                ".{}: duplicate entries for key {}",
                names.join("."),
                set::display(&[el])
            ));
        }
        rpes.push(el);
    }
    let atomic = items_atomic(names, field);
    let item = |el: &Element, names: &mut Names| -> Result<Value, String> {
        match rby.get(el) {
            Some(r) => merge_node(Node::Item { atomic }, lby.get(el).copied(), r, names),
            None => Ok(lby.get(el).copied().cloned().unwrap_or(Value::Null)),
        }
    };
    let mut shared = rpes.iter().filter(|e| lby.contains_key(*e));
    let mut next_shared = shared.next();
    let mut merged_rhs = BTreeSet::new();
    let mut out = Vec::with_capacity(lpes.len().max(rpes.len()));
    let (mut li, mut ri) = (0, 0);
    while li < lpes.len() || ri < rpes.len() {
        if li < lpes.len() && ri < rpes.len() {
            let pe = &lpes[li];
            if *pe == rpes[ri] {
                merged_rhs.insert(pe.clone());
                out.push(item(pe, names)?);
                li += 1;
                ri += 1;
                next_shared = shared.next();
                continue;
            }
            if rby.contains_key(pe) && next_shared.is_some_and(|n| n != pe) {
                li += 1;
                continue;
            }
        }
        if li < lpes.len() {
            let pe = &lpes[li];
            if !rby.contains_key(pe) {
                out.push(item(pe, names)?);
                li += 1;
                continue;
            } else if merged_rhs.contains(pe) {
                li += 1;
            }
        }
        if ri < rpes.len() {
            let pe = &rpes[ri];
            merged_rhs.insert(pe.clone());
            out.push(item(pe, names)?);
            ri += 1;
            if next_shared == Some(pe) {
                next_shared = shared.next();
            }
        }
    }
    Ok(out)
}

/// Removes the node at `path` from `obj`, if it is there.
pub(crate) fn remove(obj: &mut Value, path: &[Element]) {
    remove_at(obj, path, &mut Vec::new());
}

fn remove_at(v: &mut Value, path: &[Element], names: &mut Names) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(name) = first.strip_prefix("f:") else {
        return;
    };
    let Value::Object(m) = v else { return };
    if rest.is_empty() {
        m.remove(name);
        return;
    }
    let Some(child) = m.get_mut(name) else { return };
    names.push(name.to_string());
    match child {
        Value::Object(_) => remove_at(child, rest, names),
        Value::Array(items) => {
            let (el, below) = (&rest[0], &rest[1..]);
            let pos = items
                .iter()
                .position(|i| item_element(names, name, i).is_ok_and(|e| e == *el));
            if let Some(pos) = pos {
                if below.is_empty() {
                    items.remove(pos);
                } else {
                    remove_at(&mut items[pos], below, names);
                }
            }
        }
        _ => {}
    }
    names.pop();
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn paths(s: &Set) -> Vec<String> {
        s.iter().map(|p| set::display(p)).collect()
    }

    #[test]
    fn field_set_of_a_deployment_owns_items_by_key_and_atomic_values_whole() {
        let cfg = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}, "finalizers": ["a/b"]},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                "template": {"spec": {"containers": [{"name": "web", "image": "nginx",
                    "ports": [{"containerPort": 80}], "command": ["sh", "-c"]}]}}}});
        let s = field_set(&cfg).expect("field set");
        let got = paths(&s);
        for want in [
            ".metadata.labels.app",
            r#".metadata.finalizers[="a/b"]"#,
            ".spec.replicas",
            ".spec.selector",
            r#".spec.template.spec.containers[name="web"]"#,
            r#".spec.template.spec.containers[name="web"].image"#,
            r#".spec.template.spec.containers[name="web"].command"#,
            r#".spec.template.spec.containers[name="web"].ports[containerPort=80,protocol="TCP"]"#,
            r#".spec.template.spec.containers[name="web"].ports[containerPort=80,protocol="TCP"].containerPort"#,
        ] {
            assert!(
                got.contains(&want.to_string()),
                "{want} missing from {got:#?}"
            );
        }
        assert!(!got.contains(&".spec.selector.matchLabels".to_string()));
        assert!(
            !got.contains(&".spec".to_string()),
            "structs are not members themselves"
        );
    }

    #[test]
    fn comparison_reports_added_modified_and_removed_fields() {
        let old = json!({"metadata": {"labels": {"a": "1", "b": "2"}},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "x", "image": "i:1"}]}}}});
        let new = json!({"metadata": {"labels": {"a": "1", "c": "3"}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [
                {"name": "x", "image": "i:1"}, {"name": "y", "image": "j"}]}}}});
        let c = compare(Some(&old), &new).expect("compares");
        assert_eq!(paths(&c.modified), vec![".spec.replicas"]);
        assert_eq!(paths(&c.removed), vec![".metadata.labels.b"]);
        assert_eq!(
            paths(&c.added),
            vec![
                ".metadata.labels.c",
                r#".spec.template.spec.containers[name="y"]"#,
                r#".spec.template.spec.containers[name="y"].image"#,
                r#".spec.template.spec.containers[name="y"].name"#,
            ]
        );
    }

    #[test]
    fn creating_adds_pointer_fields_but_not_the_structs_every_object_has() {
        let new = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"replicas": 1}});
        let c = compare(None, &new).expect("compares");
        assert_eq!(
            paths(&c.added),
            vec![".metadata.labels", ".metadata.labels.a", ".spec.replicas"]
        );
    }

    #[test]
    fn merge_keeps_live_items_and_follows_the_configuration_order() {
        let live = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "imagePullPolicy": "Always"}, {"name": "b", "image": "b:1"}],
            "args": ["x"]}});
        let cfg = json!({"spec": {"containers": [{"name": "c", "image": "c:1"}, {"name": "a", "image": "a:2"}],
            "args": ["y"]}});
        let m = merge(&live, &cfg).expect("merges");
        let names: Vec<&str> = m["spec"]["containers"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, vec!["c", "a", "b"]);
        assert_eq!(m["spec"]["containers"][1]["image"], "a:2");
        assert_eq!(m["spec"]["containers"][1]["imagePullPolicy"], "Always");
        assert_eq!(m["spec"]["args"], json!(["y"]), "atomic lists are replaced");
    }

    #[test]
    fn duplicate_keys_in_a_configuration_are_refused() {
        let cfg = json!({"spec": {"containers": [{"name": "a"}, {"name": "a"}]}});
        let err = merge(&json!({}), &cfg).expect_err("duplicates");
        assert!(err.contains("duplicate entries"), "{err}");
    }

    #[test]
    fn remove_finds_list_items_by_key() {
        let mut obj = json!({"spec": {"containers": [{"name": "a", "env": [{"name": "X"}, {"name": "Y"}]}]},
            "metadata": {"finalizers": ["f1", "f2"]}});
        remove(
            &mut obj,
            &[
                "f:spec".into(),
                "f:containers".into(),
                r#"k:{"name":"a"}"#.into(),
                "f:env".into(),
                r#"k:{"name":"X"}"#.into(),
            ],
        );
        remove(
            &mut obj,
            &[
                "f:metadata".into(),
                "f:finalizers".into(),
                r#"v:"f2""#.into(),
            ],
        );
        assert_eq!(obj["spec"]["containers"][0]["env"], json!([{"name": "Y"}]));
        assert_eq!(obj["metadata"]["finalizers"], json!(["f1"]));
    }
}
