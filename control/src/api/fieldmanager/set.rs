//! Field sets and their `FieldsV1` encoding.
//!
//! Ref: structured-merge-diff `fieldpath/serialize.go`, `serialize-pe.go`. A path element is `f:<field>` (a map
//! or struct field), `k:<json object>` (an associative list item by its key fields, sorted by name), `v:<json>`
//! (a set item by value) or `i:<index>`. In the encoding, each element is an object key; `{}` marks a member
//! leaf, and `".": {}` marks a member that also has members below it.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// One path element in its serialised form (`f:spec`, `k:{"name":"c"}`, `v:"x"`).
pub(crate) type Element = String;
/// A path from the object root.
pub(crate) type Path = Vec<Element>;

/// A set of field paths. Kept flat (sorted paths); the sets of one object are small.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Set(BTreeSet<Path>);

pub(crate) fn field(name: &str) -> Element {
    format!("f:{name}")
}

/// `k:{...}`: the key fields of an associative list item, sorted by name as structured-merge-diff's
/// `value.FieldList` is.
pub(crate) fn key(mut fields: Vec<(&str, Value)>) -> Element {
    fields.sort_by(|a, b| a.0.cmp(b.0));
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{}", Value::String((*k).to_string()), v))
        .collect();
    format!("k:{{{}}}", body.join(","))
}

/// `v:<json>`: a set item by value.
pub(crate) fn value(v: &Value) -> Element {
    format!("v:{v}")
}

impl Set {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, path: &[Element]) {
        // The root is never a member: upstream sets hold fields, not the object itself.
        if !path.is_empty() {
            self.0.insert(path.to_vec());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, path: &[Element]) -> bool {
        self.0.contains(path)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Path> {
        self.0.iter()
    }

    pub fn union(&self, other: &Set) -> Set {
        Set(self.0.union(&other.0).cloned().collect())
    }

    pub fn difference(&self, other: &Set) -> Set {
        Set(self.0.difference(&other.0).cloned().collect())
    }

    pub fn intersection(&self, other: &Set) -> Set {
        Set(self.0.intersection(&other.0).cloned().collect())
    }

    /// Whether some member lies strictly below `path`.
    pub fn has_descendant(&self, path: &[Element]) -> bool {
        self.0
            .range(path.to_vec()..)
            .take_while(|p| p.starts_with(path))
            .any(|p| p.len() > path.len())
    }

    /// Keeps the members for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&Path) -> bool) {
        self.0.retain(|p| keep(p));
    }

    /// The `FieldsV1` JSON of this set.
    pub fn to_fields_v1(&self) -> Value {
        let mut root = Map::new();
        for path in &self.0 {
            let mut node = &mut root;
            for (i, el) in path.iter().enumerate() {
                let child = node
                    .entry(el.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                let Value::Object(child) = child else {
                    unreachable!("nodes are only ever objects")
                };
                if i + 1 == path.len() {
                    // A member: mark it with "." once it has (or gets) children; see `finish` below.
                    child
                        .entry(".")
                        .or_insert_with(|| Value::Object(Map::new()));
                }
                node = child;
            }
        }
        finish(&mut root);
        Value::Object(root)
    }

    /// Parses `FieldsV1` JSON.
    pub fn from_fields_v1(v: &Value) -> Result<Set, String> {
        let mut set = Set::new();
        let Value::Object(m) = v else {
            return Err(format!("fieldsV1 must be an object, got {v}"));
        };
        parse(m, &mut Vec::new(), &mut set)?;
        Ok(set)
    }
}

/// A member without children is written `{}`, not `{".": {}}`.
fn finish(node: &mut Map<String, Value>) {
    for (k, child) in node.iter_mut() {
        if k == "." {
            continue;
        }
        if let Value::Object(c) = child {
            finish(c);
            if c.len() == 1 && c.contains_key(".") {
                c.clear();
            }
        }
    }
}

fn parse(m: &Map<String, Value>, path: &mut Path, set: &mut Set) -> Result<(), String> {
    for (k, child) in m {
        if k == "." {
            set.insert(path);
            continue;
        }
        let kind = k.get(..2).unwrap_or_default();
        if !matches!(kind, "f:" | "k:" | "v:" | "i:") {
            return Err(format!("unknown path element {k:?}"));
        }
        if matches!(kind, "k:" | "v:") {
            serde_json::from_str::<Value>(&k[2..])
                .map_err(|e| format!("path element {k:?} is not valid JSON: {e}"))?;
        }
        path.push(k.clone());
        match child {
            Value::Object(c) if c.is_empty() => set.insert(path),
            Value::Object(c) => parse(c, path, set)?,
            other => return Err(format!("path element {k:?} holds {other}, not an object")),
        }
        path.pop();
    }
    Ok(())
}

/// A path as upstream prints it in conflicts: `.spec.containers[name="c"].image`, `[="x"]`, `[0]`.
pub(crate) fn display(path: &[Element]) -> String {
    let mut out = String::new();
    for el in path {
        let (kind, rest) = (
            el.get(..2).unwrap_or_default(),
            el.get(2..).unwrap_or_default(),
        );
        match kind {
            "f:" => {
                out.push('.');
                out.push_str(rest);
            }
            "k:" => {
                let fields: Vec<String> = match serde_json::from_str::<Value>(rest) {
                    Ok(Value::Object(m)) => m.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                    _ => vec![rest.to_string()],
                };
                out.push_str(&format!("[{}]", fields.join(",")));
            }
            "v:" => out.push_str(&format!("[={rest}]")),
            "i:" => out.push_str(&format!("[{rest}]")),
            _ => out.push_str(el),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn p(els: &[&str]) -> Path {
        els.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fields_v1_marks_members_with_children_by_a_dot() {
        let mut s = Set::new();
        s.insert(&p(&["f:metadata", "f:labels", "f:app"]));
        s.insert(&p(&["f:metadata", "f:labels"]));
        s.insert(&p(&["f:spec", "f:replicas"]));
        let c = key(vec![("name", json!("nginx"))]);
        s.insert(&p(&["f:spec", "f:containers", &c]));
        s.insert(&p(&["f:spec", "f:containers", &c, "f:image"]));
        s.insert(&p(&["f:metadata", "f:finalizers", &value(&json!("a/b"))]));
        let v = s.to_fields_v1();
        assert_eq!(
            v,
            json!({
                "f:metadata": {"f:labels": {".": {}, "f:app": {}}, "f:finalizers": {"v:\"a/b\"": {}}},
                "f:spec": {"f:replicas": {}, "f:containers": {"k:{\"name\":\"nginx\"}": {".": {}, "f:image": {}}}},
            })
        );
        assert_eq!(Set::from_fields_v1(&v).expect("parses"), s);
    }

    #[test]
    fn keys_sort_their_fields_and_print_like_upstream() {
        let k = key(vec![
            ("protocol", json!("TCP")),
            ("containerPort", json!(80)),
        ]);
        assert_eq!(k, r#"k:{"containerPort":80,"protocol":"TCP"}"#);
        let path = p(&[
            "f:spec",
            "f:containers",
            r#"k:{"name":"web"}"#,
            "f:ports",
            &k,
        ]);
        assert_eq!(
            display(&path),
            r#".spec.containers[name="web"].ports[containerPort=80,protocol="TCP"]"#
        );
        assert_eq!(
            display(&p(&["f:metadata", "f:finalizers", r#"v:"x""#])),
            r#".metadata.finalizers[="x"]"#
        );
    }

    #[test]
    fn malformed_fields_v1_is_refused() {
        assert!(Set::from_fields_v1(&json!({"spec": {}})).is_err());
        assert!(Set::from_fields_v1(&json!({"f:spec": 1})).is_err());
        assert!(Set::from_fields_v1(&json!({"k:{nope": {}})).is_err());
    }

    #[test]
    fn descendants_are_found_below_but_not_beside_a_path() {
        let mut s = Set::new();
        s.insert(&p(&["f:spec", "f:replicasX"]));
        s.insert(&p(&["f:spec", "f:template", "f:spec"]));
        assert!(s.has_descendant(&p(&["f:spec", "f:template"])));
        assert!(!s.has_descendant(&p(&["f:spec", "f:replicas"])));
        assert!(!s.has_descendant(&p(&["f:spec", "f:template", "f:spec"])));
    }
}
