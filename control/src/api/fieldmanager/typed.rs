//! Walks over objects with the list and struct semantics of `api::schema`: the field set of an applied
//! configuration, the comparison of two objects, the merge of a configuration into a live object, and the
//! removal of fields.
//!
//! Ref: structured-merge-diff `typed/tofieldset.go`, `typed/compare.go`, `typed/merge.go`, `typed/remove.go`.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::set::{self, Element, Set};
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

/// The object keys from the root to the current node (list items add none), borrowed from the objects walked.
type Names<'v> = Vec<&'v str>;

fn list_type(names: &[&str], field: &str) -> ListType {
    let parents = &names[..names.len().saturating_sub(1)];
    schema::list_schema(parents, field).apply
}

fn object_is_atomic(node: Node<'_>) -> bool {
    match node {
        Node::Field(f) => schema::is_atomic_object(f),
        Node::Item { atomic } => atomic,
    }
}

/// The path element of an item of a list of type `lt`, or an error naming what is wrong with it.
fn item_element(lt: ListType, names: &[&str], item: &Value) -> Result<Element, String> {
    match lt {
        ListType::Set => Ok(set::value(item)),
        ListType::Map(keys) => {
            let Value::Object(m) = item else {
                return Err(format!(
                    ".{}: associative list item {item} is not an object",
                    names.join(".")
                ));
            };
            // Key fields in name order (`set::key`); the schema lists them sorted already.
            let mut sorted = [""; 4];
            let keys: &[&str] = if keys.is_sorted() || keys.len() > sorted.len() {
                keys
            } else {
                sorted[..keys.len()].copy_from_slice(keys);
                sorted[..keys.len()].sort_unstable();
                &sorted[..keys.len()]
            };
            let mut el = String::from("k:{");
            let mut any = false;
            for k in keys {
                let default;
                let v = match m.get(*k) {
                    Some(v) if !v.is_null() => v,
                    _ => match schema::key_default(k) {
                        Some(d) => {
                            default = Value::String(d.to_string());
                            &default
                        }
                        None => continue,
                    },
                };
                if any {
                    el.push(',');
                }
                any = true;
                set::push_key_field(&mut el, k, v);
            }
            if !any {
                return Err(format!(
                    ".{}: associative list with keys has an element that omits all key fields {keys:?}",
                    names.join(".")
                ));
            }
            el.push('}');
            Ok(el)
        }
        ListType::Atomic => Err(format!(".{} is an atomic list", names.join("."))),
    }
}

fn items_atomic(lt: ListType, field: &str) -> bool {
    lt == ListType::Set || schema::items_are_atomic(field)
}

/// The fields an applied configuration sets (upstream `ToFieldSet`).
pub(crate) fn field_set(obj: &Value) -> Result<Set, String> {
    let mut out = Set::new();
    if let Value::Object(m) = obj {
        object_fields(m, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

fn object_fields<'v>(
    m: &'v Map<String, Value>,
    names: &mut Names<'v>,
    out: &mut Set,
) -> Result<(), String> {
    for (k, child) in m {
        names.push(k);
        let mut sub = Set::new();
        let r = value_fields(Node::Field(k), child, names, &mut sub);
        names.pop();
        r?;
        out.attach_hinted(set::field(k), sub, m.len());
    }
    Ok(())
}

/// Records the fields of `v` into `out`, the set node of `v`'s own path.
fn value_fields<'v>(
    node: Node<'_>,
    v: &'v Value,
    names: &mut Names<'v>,
    out: &mut Set,
) -> Result<(), String> {
    match (v, node) {
        (Value::Object(m), _) if m.is_empty() || object_is_atomic(node) => out.mark(),
        (Value::Object(m), _) => object_fields(m, names, out)?,
        (Value::Array(items), Node::Field(f)) => {
            let lt = list_type(names, f);
            if lt == ListType::Atomic {
                out.mark();
                return Ok(());
            }
            let atomic = items_atomic(lt, f);
            for item in items {
                let el = item_element(lt, names, item)?;
                let mut sub = Set::new();
                sub.mark();
                value_fields(Node::Item { atomic }, item, names, &mut sub)?;
                out.attach(el, sub);
            }
        }
        _ => out.mark(),
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

impl Comparison {
    /// Puts the comparison of a child node under `el`; the element is only built when something changed.
    fn attach(&mut self, el: impl FnOnce() -> Element, child: Comparison, hint: usize) {
        let parts = [
            (&mut self.added, child.added),
            (&mut self.modified, child.modified),
            (&mut self.removed, child.removed),
        ];
        let mut left = parts.iter().filter(|(_, c)| !c.is_empty()).count();
        if left == 0 {
            return;
        }
        let mut el = el();
        for (parent, c) in parts {
            if c.is_empty() {
                continue;
            }
            left -= 1;
            let el = if left == 0 {
                std::mem::take(&mut el)
            } else {
                el.clone()
            };
            parent.attach_hinted(el, c, hint);
        }
    }
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
        &mut cmp,
    )?;
    // The root is never a member.
    cmp.added.unmark_self();
    cmp.modified.unmark_self();
    cmp.removed.unmark_self();
    Ok(cmp)
}

fn leaf(l: Option<&Value>, r: Option<&Value>, cmp: &mut Comparison) {
    match (l, r) {
        (None, Some(_)) => cmp.added.mark(),
        (Some(_), None) => cmp.removed.mark(),
        (Some(a), Some(b)) if a != b => cmp.modified.mark(),
        _ => {}
    }
}

/// The items of a keyed or set list by element, in first-seen order (later duplicates ignored), with an index
/// sorted by element for lookups.
struct Items<'v> {
    order: Vec<(Element, &'v Value)>,
    sorted: Vec<usize>,
}

impl<'v> Items<'v> {
    fn new(lt: ListType, names: &[&str], items: &'v [Value]) -> Result<Self, String> {
        let mut order = Vec::with_capacity(items.len());
        for item in items {
            order.push((item_element(lt, names, item)?, item));
        }
        let mut sorted: Vec<usize> = (0..order.len()).collect();
        if order.len() > 1 {
            // Stable: of equal elements the first seen comes first, and dedup keeps it.
            sorted.sort_by(|a, b| order[*a].0.cmp(&order[*b].0));
            sorted.dedup_by(|a, b| order[*a].0 == order[*b].0);
            if sorted.len() < order.len() {
                let mut keep = vec![false; order.len()];
                for i in &sorted {
                    keep[*i] = true;
                }
                let mut i = 0;
                order.retain(|_| {
                    i += 1;
                    keep[i - 1]
                });
                sorted = (0..order.len()).collect();
                sorted.sort_by(|a, b| order[*a].0.cmp(&order[*b].0));
            }
        }
        Ok(Self { order, sorted })
    }

    fn get(&self, el: &str) -> Option<&'v Value> {
        self.sorted
            .binary_search_by(|i| self.order[*i].0.as_str().cmp(el))
            .ok()
            .map(|i| self.order[self.sorted[i]].1)
    }

    fn contains(&self, el: &str) -> bool {
        self.get(el).is_some()
    }
}

/// The fields of two objects by name, in name order: a merge of the two maps, which iterate in key order
/// (serde_json's `Map` is a `BTreeMap` without its `preserve_order` feature; a test below checks).
fn zip_fields<'v>(
    l: Option<&'v Map<String, Value>>,
    r: Option<&'v Map<String, Value>>,
) -> impl Iterator<Item = (&'v String, Option<&'v Value>, Option<&'v Value>)> {
    let mut l = l.into_iter().flatten().peekable();
    let mut r = r.into_iter().flatten().peekable();
    std::iter::from_fn(move || {
        let order = match (l.peek(), r.peek()) {
            (Some((a, _)), Some((b, _))) => a.cmp(b),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => return None,
        };
        match order {
            std::cmp::Ordering::Less => l.next().map(|(k, v)| (k, Some(v), None)),
            std::cmp::Ordering::Greater => r.next().map(|(k, v)| (k, None, Some(v))),
            std::cmp::Ordering::Equal => {
                let (k, lv) = l.next()?;
                r.next().map(|(_, rv)| (k, Some(lv), Some(rv)))
            }
        }
    })
}

fn compare_node<'v>(
    node: Node<'_>,
    l: Option<&'v Value>,
    r: Option<&'v Value>,
    names: &mut Names<'v>,
    cmp: &mut Comparison,
) -> Result<(), String> {
    let shape_ok = |v: Option<&Value>, f: &dyn Fn(&Value) -> bool| v.is_none_or(f);
    if shape_ok(l, &Value::is_object) && shape_ok(r, &Value::is_object) {
        let (lm, rm) = (l.and_then(Value::as_object), r.and_then(Value::as_object));
        let empty = lm.is_none_or(Map::is_empty) && rm.is_none_or(Map::is_empty);
        if object_is_atomic(node) || empty {
            leaf(l, r, cmp);
            return Ok(());
        }
        let hint = lm.map_or(0, Map::len).max(rm.map_or(0, Map::len));
        for (k, lv, rv) in zip_fields(lm, rm) {
            // Field management never tracks the object's own managedFields (upstream strips them), so the
            // callers need not copy the objects to drop them first.
            if k == "managedFields" && names.len() == 1 && names[0] == "metadata" {
                continue;
            }
            names.push(k);
            let mut child = Comparison::default();
            let res = compare_node(Node::Field(k), lv, rv, names, &mut child);
            names.pop();
            res?;
            cmp.attach(|| set::field(k), child, hint);
        }
    } else if let (true, true, Node::Field(f)) = (
        shape_ok(l, &Value::is_array),
        shape_ok(r, &Value::is_array),
        node,
    ) {
        let (la, ra) = (l.and_then(Value::as_array), r.and_then(Value::as_array));
        let empty = la.is_none_or(Vec::is_empty) && ra.is_none_or(Vec::is_empty);
        let lt = list_type(names, f);
        if lt == ListType::Atomic || empty {
            leaf(l, r, cmp);
            return Ok(());
        }
        let litems = Items::new(lt, names, la.map(Vec::as_slice).unwrap_or_default())?;
        let ritems = Items::new(lt, names, ra.map(Vec::as_slice).unwrap_or_default())?;
        let atomic = items_atomic(lt, f);
        let hint = litems.order.len().max(ritems.order.len());
        let from_left = litems
            .order
            .iter()
            .map(|(el, lv)| (el, Some(*lv), ritems.get(el)));
        let from_right = ritems
            .order
            .iter()
            .filter(|(el, _)| !litems.contains(el))
            .map(|(el, rv)| (el, None, Some(*rv)));
        for (el, lv, rv) in from_left.chain(from_right) {
            let mut child = Comparison::default();
            compare_node(Node::Item { atomic }, lv, rv, names, &mut child)?;
            cmp.attach(|| el.clone(), child, hint);
        }
    } else {
        leaf(l, r, cmp);
        return Ok(());
    }
    // A map or list that appears or disappears as a whole is itself added or removed, except the non-pointer
    // structs an empty Go object already has (see `schema::always_present`).
    match (l, r) {
        (None, Some(_)) if !matches!(node, Node::Field(f) if schema::always_present(f)) => {
            cmp.added.mark()
        }
        (Some(_), None) => cmp.removed.mark(),
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

fn merge_node<'v>(
    node: Node<'_>,
    l: Option<&Value>,
    r: &'v Value,
    names: &mut Names<'v>,
) -> Result<Value, String> {
    match (l, r, node) {
        (None | Some(Value::Object(_)), Value::Object(rm), _) if !object_is_atomic(node) => {
            // A new map is still walked: duplicate keys below it are refused.
            let lm = l.and_then(Value::as_object);
            let mut out = lm.cloned().unwrap_or_default();
            for (k, rv) in rm {
                names.push(k);
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
fn merge_list<'v>(
    names: &mut Names<'v>,
    field: &str,
    live: &[Value],
    config: &'v [Value],
) -> Result<Vec<Value>, String> {
    let lt = list_type(names, field);
    let litems = Items::new(lt, names, live)?;
    let lpes: Vec<&Element> = litems.order.iter().map(|(el, _)| el).collect();
    let mut rpes = Vec::new();
    let mut rby: std::collections::BTreeMap<Element, &Value> = std::collections::BTreeMap::new();
    for item in config {
        let el = item_element(lt, names, item)?;
        if rby.insert(el.clone(), item).is_some() {
            return Err(format!(
                ".{}: duplicate entries for key {}",
                names.join("."),
                set::display([el])
            ));
        }
        rpes.push(el);
    }
    let atomic = items_atomic(lt, field);
    let item = |el: &Element, names: &mut Names<'v>| -> Result<Value, String> {
        match rby.get(el) {
            Some(r) => merge_node(Node::Item { atomic }, litems.get(el), r, names),
            None => Ok(litems.get(el).cloned().unwrap_or(Value::Null)),
        }
    };
    let mut shared = rpes.iter().filter(|e| litems.contains(e));
    let mut next_shared = shared.next();
    let mut merged_rhs = BTreeSet::new();
    let mut out = Vec::with_capacity(lpes.len().max(rpes.len()));
    let (mut li, mut ri) = (0, 0);
    while li < lpes.len() || ri < rpes.len() {
        if li < lpes.len() && ri < rpes.len() {
            let pe = lpes[li];
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
            let pe = lpes[li];
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

fn remove_at<'p>(v: &mut Value, path: &'p [Element], names: &mut Names<'p>) {
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
    names.push(name);
    match child {
        Value::Object(_) => remove_at(child, rest, names),
        Value::Array(items) => {
            let (el, below) = (&rest[0], &rest[1..]);
            let lt = list_type(names, name);
            let pos = items
                .iter()
                .position(|i| item_element(lt, names, i).is_ok_and(|e| e == *el));
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
        s.iter().map(set::display).collect()
    }

    #[test]
    fn json_objects_iterate_in_key_order_as_the_comparison_assumes() {
        let v: Value =
            serde_json::from_str(r#"{"b": 1, "a": 2, "c": {"z": 1, "y": 2}}"#).expect("json");
        let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["a", "b", "c"]);
        let mut m = Map::new();
        m.insert("z".into(), Value::Null);
        m.insert("a".into(), Value::Null);
        assert!(m.keys().is_sorted());
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
