//! Field sets and their `FieldsV1` encoding.
//!
//! Ref: structured-merge-diff `fieldpath/serialize.go`, `serialize-pe.go`. A path element is `f:<field>` (a map
//! or struct field), `k:<json object>` (an associative list item by its key fields, sorted by name), `v:<json>`
//! (a set item by value) or `i:<index>`. In the encoding, each element is an object key; `{}` marks a member
//! leaf, and `".": {}` marks a member that also has members below it.

use std::cmp::Ordering;
use std::fmt::Write as _;

use serde_json::{Map, Value};

/// One path element in its serialised form (`f:spec`, `k:{"name":"c"}`, `v:"x"`).
pub(crate) type Element = String;
/// A path from the object root.
pub(crate) type Path = Vec<Element>;

/// A set of field paths, kept as a tree with one node per path element: shared prefixes are stored once, set
/// operations work node by node, and the `FieldsV1` encoding is a walk of the tree. A node's children are sorted
/// by element (so walks visit paths in the order of sorted paths) and never empty (every leaf is a member), so
/// two sets are equal exactly when their trees are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Set {
    /// Whether the path to this node is itself in the set (never true at the root: upstream sets hold fields,
    /// not the object itself).
    member: bool,
    children: Vec<(Element, Set)>,
}

pub(crate) fn field(name: &str) -> Element {
    let mut s = String::with_capacity(name.len() + 2);
    s.push_str("f:");
    s.push_str(name);
    s
}

/// `k:{...}`: the key fields of an associative list item, sorted by name as structured-merge-diff's
/// `value.FieldList` is. (The walks in `typed` build keys straight from the item.)
#[cfg(test)]
pub(crate) fn key(mut fields: Vec<(&str, Value)>) -> Element {
    fields.sort_by(|a, b| a.0.cmp(b.0));
    let mut s = String::from("k:{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        push_key_field(&mut s, k, v);
    }
    s.push('}');
    s
}

/// Appends `"name":<json>` to a `k:` element being built.
pub(crate) fn push_key_field(out: &mut String, name: &str, v: &Value) {
    if name.bytes().all(|b| b.is_ascii_alphanumeric()) {
        out.push('"');
        out.push_str(name);
        out.push('"');
    } else {
        // Writing into a String cannot fail.
        let _ = write!(out, "{}", Value::String(name.to_string()));
    }
    out.push(':');
    let _ = write!(out, "{v}");
}

/// `v:<json>`: a set item by value.
pub(crate) fn value(v: &Value) -> Element {
    format!("v:{v}")
}

impl Set {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the set has no paths.
    pub fn is_empty(&self) -> bool {
        !self.member && self.children.is_empty()
    }

    /// Marks the path to this node (the node a walk is building) as a member.
    pub fn mark(&mut self) {
        self.member = true;
    }

    /// Clears the member flag of this node; used on the root, which is never a member.
    pub fn unmark_self(&mut self) {
        self.member = false;
    }

    /// Puts `child` (the subtree below `el`) under this node, unless it is empty. Walks add children mostly in
    /// sorted order, which costs a push.
    pub fn attach(&mut self, el: Element, child: Set) {
        self.attach_hinted(el, child, 0);
    }

    /// [`Set::attach`] to a node that will likely get up to `hint` children.
    pub fn attach_hinted(&mut self, el: Element, child: Set, hint: usize) {
        if child.is_empty() {
            return;
        }
        if self.children.capacity() == 0 {
            self.children.reserve_exact(hint.max(1));
        }
        match self.children.last() {
            Some((last, _)) if *last >= el => match self.find(&el) {
                Ok(i) => self.children[i].1.absorb(child),
                Err(i) => self.children.insert(i, (el, child)),
            },
            _ => self.children.push((el, child)),
        }
    }

    fn find(&self, el: &str) -> Result<usize, usize> {
        self.children.binary_search_by(|(e, _)| e.as_str().cmp(el))
    }

    fn child(&self, el: &str) -> Option<&Set> {
        self.find(el).ok().map(|i| &self.children[i].1)
    }

    fn node(&self, path: &[Element]) -> Option<&Set> {
        path.iter().try_fold(self, |n, el| n.child(el))
    }

    /// Adds one path (the walks in `typed` build their sets node by node instead).
    #[cfg(test)]
    pub fn insert(&mut self, path: &[Element]) {
        // The root is never a member: upstream sets hold fields, not the object itself.
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        let i = match self.find(first) {
            Ok(i) => i,
            Err(i) => {
                self.children.insert(i, (first.clone(), Set::new()));
                i
            }
        };
        let child = &mut self.children[i].1;
        if rest.is_empty() {
            child.member = true;
        } else {
            child.insert(rest);
        }
    }

    pub fn contains(&self, path: &[Element]) -> bool {
        !path.is_empty() && self.node(path).is_some_and(|n| n.member)
    }

    /// The members as paths, sorted.
    pub fn iter(&self) -> impl Iterator<Item = Path> {
        let mut out = Vec::new();
        self.collect_paths(&mut Vec::new(), &mut out);
        out.into_iter()
    }

    fn collect_paths(&self, path: &mut Path, out: &mut Vec<Path>) {
        if self.member {
            out.push(path.clone());
        }
        for (el, child) in &self.children {
            path.push(el.clone());
            child.collect_paths(path, out);
            path.pop();
        }
    }

    /// Adds the members of `other` to this set.
    pub fn absorb(&mut self, other: Set) {
        self.member |= other.member;
        if other.children.is_empty() {
            return;
        }
        if self.children.is_empty() {
            self.children = other.children;
            return;
        }
        let mine = std::mem::take(&mut self.children);
        let mut out = Vec::with_capacity(mine.len().max(other.children.len()));
        let mut a = mine.into_iter().peekable();
        let mut b = other.children.into_iter().peekable();
        loop {
            let order = match (a.peek(), b.peek()) {
                (Some((x, _)), Some((y, _))) => x.cmp(y),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => break,
            };
            match order {
                Ordering::Less => out.extend(a.next()),
                Ordering::Greater => out.extend(b.next()),
                Ordering::Equal => {
                    if let (Some((el, mut x)), Some((_, y))) = (a.next(), b.next()) {
                        x.absorb(y);
                        out.push((el, x));
                    }
                }
            }
        }
        self.children = out;
    }

    /// Removes the members of `other` from this set.
    pub fn subtract(&mut self, other: &Set) {
        if other.member {
            self.member = false;
        }
        if other.children.is_empty() {
            return;
        }
        let mut theirs = other.children.iter().peekable();
        self.children.retain_mut(|(el, child)| {
            while theirs.next_if(|(o, _)| o < el).is_some() {}
            match theirs.peek() {
                Some((o, their)) if o == el => {
                    child.subtract(their);
                    !child.is_empty()
                }
                _ => true,
            }
        });
    }

    pub fn union(&self, other: &Set) -> Set {
        let mut out = self.clone();
        out.absorb(other.clone());
        out
    }

    pub fn difference(&self, other: &Set) -> Set {
        let mut out = self.clone();
        out.subtract(other);
        out
    }

    pub fn intersection(&self, other: &Set) -> Set {
        let mut out = Set {
            member: self.member && other.member,
            children: Vec::new(),
        };
        let mut theirs = other.children.iter().peekable();
        for (el, child) in &self.children {
            while theirs.next_if(|(o, _)| o < el).is_some() {}
            if let Some((o, their)) = theirs.peek() {
                if o == el {
                    let both = child.intersection(their);
                    if !both.is_empty() {
                        out.children.push((el.clone(), both));
                    }
                }
            }
        }
        out
    }

    /// Whether some member lies strictly below `path`.
    pub fn has_descendant(&self, path: &[Element]) -> bool {
        self.node(path).is_some_and(|n| !n.children.is_empty())
    }

    /// Drops `path` itself from the set, keeping what lies below it.
    pub fn remove_member(&mut self, path: &[&str]) {
        self.edit(path, &mut |n| n.member = false);
    }

    /// Drops `path` and everything below it.
    pub fn remove_subtree(&mut self, path: &[&str]) {
        self.edit(path, &mut |n| *n = Set::new());
    }

    /// Keeps only `path` and what lies below it.
    pub fn keep_subtree(&mut self, el: &str) {
        self.member = false;
        self.children.retain(|(e, _)| e == el);
    }

    /// Applies `f` to the node at `path`, if there is one, and drops the nodes it leaves empty.
    fn edit(&mut self, path: &[&str], f: &mut dyn FnMut(&mut Set)) {
        let Some((first, rest)) = path.split_first() else {
            f(self);
            return;
        };
        if let Ok(i) = self.find(first) {
            let child = &mut self.children[i].1;
            child.edit(rest, f);
            if child.is_empty() {
                self.children.remove(i);
            }
        }
    }

    /// The `FieldsV1` JSON of this set.
    #[cfg(test)]
    pub fn to_fields_v1(&self) -> Value {
        self.clone().into_fields_v1()
    }

    /// The `FieldsV1` JSON of this set, reusing the set's elements as the keys. A member without children is
    /// written `{}`, one with children marks itself with `".": {}`.
    pub fn into_fields_v1(self) -> Value {
        Value::Object(self.into_fields_v1_map())
    }

    fn into_fields_v1_map(self) -> Map<String, Value> {
        let mut m = Map::new();
        if self.member && !self.children.is_empty() {
            m.insert(".".into(), Value::Object(Map::new()));
        }
        for (el, child) in self.children {
            m.insert(el, Value::Object(child.into_fields_v1_map()));
        }
        m
    }

    /// Appends the `FieldsV1` JSON of this set to `out`: the bytes `serde_json` writes for
    /// [`Set::into_fields_v1`] (children are kept in key order, and `"."` sorts before every element), without
    /// building that tree.
    pub fn write_fields_v1(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        let mut first = true;
        if self.member && !self.children.is_empty() {
            out.extend_from_slice(b"\".\":{}");
            first = false;
        }
        for (el, child) in &self.children {
            if !first {
                out.push(b',');
            }
            first = false;
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, el);
            out.push(b':');
            child.write_fields_v1(out);
        }
        out.push(b'}');
    }

    /// Parses `FieldsV1` JSON.
    pub fn from_fields_v1(v: &Value) -> Result<Set, String> {
        let Value::Object(m) = v else {
            return Err(format!("fieldsV1 must be an object, got {v}"));
        };
        let mut set = parse(m)?;
        set.member = false;
        Ok(set)
    }

    /// [`Set::from_fields_v1`] of JSON the caller gives up: its keys become the set's elements.
    pub fn from_owned_fields_v1(v: Value) -> Result<Set, String> {
        let Value::Object(m) = v else {
            return Err(format!("fieldsV1 must be an object, got {v}"));
        };
        let mut set = parse_owned(m)?;
        set.member = false;
        Ok(set)
    }
}

/// Checks a `FieldsV1` key is a path element: `f:`, `i:`, or `k:`/`v:` with valid JSON.
fn check_element(k: &str) -> Result<(), String> {
    let kind = k.get(..2).unwrap_or_default();
    if !matches!(kind, "f:" | "k:" | "v:" | "i:") {
        return Err(format!("unknown path element {k:?}"));
    }
    if matches!(kind, "k:" | "v:") {
        serde_json::from_str::<serde::de::IgnoredAny>(&k[2..])
            .map_err(|e| format!("path element {k:?} is not valid JSON: {e}"))?;
    }
    Ok(())
}

const LEAF: Set = Set {
    member: true,
    children: Vec::new(),
};

fn parse(m: &Map<String, Value>) -> Result<Set, String> {
    let mut node = Set::new();
    for (k, child) in m {
        if k == "." {
            node.member = true;
            continue;
        }
        check_element(k)?;
        let sub = match child {
            Value::Object(c) if c.is_empty() => LEAF,
            Value::Object(c) => parse(c)?,
            other => return Err(format!("path element {k:?} holds {other}, not an object")),
        };
        node.attach(k.clone(), sub);
    }
    Ok(node)
}

fn parse_owned(m: Map<String, Value>) -> Result<Set, String> {
    let mut node = Set::new();
    for (k, child) in m {
        if k == "." {
            node.member = true;
            continue;
        }
        check_element(&k)?;
        let sub = match child {
            Value::Object(c) if c.is_empty() => LEAF,
            Value::Object(c) => parse_owned(c)?,
            other => return Err(format!("path element {k:?} holds {other}, not an object")),
        };
        node.attach(k, sub);
    }
    Ok(node)
}

/// A path as upstream prints it in conflicts: `.spec.containers[name="c"].image`, `[="x"]`, `[0]`.
pub(crate) fn display(path: impl AsRef<[Element]>) -> String {
    let mut out = String::new();
    for el in path.as_ref() {
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
            display(p(&["f:metadata", "f:finalizers", r#"v:"x""#])),
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

    /// The flat representation the tree replaced, as a reference for the set operations.
    type Flat = std::collections::BTreeSet<Path>;

    /// The encoding of the flat representation: a JSON tree built from the sorted paths.
    fn flat_fields_v1(set: &Flat) -> Value {
        fn finish(node: &mut Map<String, Value>) {
            for (k, child) in node.iter_mut() {
                if let (false, Value::Object(c)) = (k == ".", child) {
                    finish(c);
                    if c.len() == 1 && c.contains_key(".") {
                        c.clear();
                    }
                }
            }
        }
        let mut root = Map::new();
        for path in set {
            let mut node = &mut root;
            for (i, el) in path.iter().enumerate() {
                let child = node.entry(el.clone()).or_insert_with(|| json!({}));
                let Value::Object(child) = child else {
                    unreachable!("nodes are objects")
                };
                if i + 1 == path.len() {
                    child.entry(".").or_insert_with(|| json!({}));
                }
                node = child;
            }
        }
        finish(&mut root);
        Value::Object(root)
    }

    /// A small xorshift generator: the test needs variety, not quality.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }

        fn path(&mut self) -> Path {
            const ELEMENTS: &[&str] = &[
                "f:metadata",
                "f:status",
                "f:a",
                "f:ab",
                "f:b",
                r#"k:{"name":"x"}"#,
                r#"k:{"name":"y"}"#,
                r#"v:"z""#,
                "i:0",
            ];
            let len = 1 + self.below(4);
            (0..len)
                .map(|_| ELEMENTS[self.below(ELEMENTS.len())].to_string())
                .collect()
        }

        fn sets(&mut self) -> (Set, Flat) {
            let (mut set, mut flat) = (Set::new(), Flat::new());
            for _ in 0..self.below(24) {
                let p = self.path();
                set.insert(&p);
                flat.insert(p);
            }
            (set, flat)
        }
    }

    fn paths(s: &Set) -> Vec<Path> {
        s.iter().collect()
    }

    #[test]
    fn tree_sets_behave_like_sets_of_sorted_paths() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let (a, fa) = rng.sets();
            let (b, fb) = rng.sets();
            assert_eq!(paths(&a), fa.iter().cloned().collect::<Vec<_>>());
            assert_eq!(a.is_empty(), fa.is_empty());
            let want = |f: Flat| f.into_iter().collect::<Vec<_>>();
            assert_eq!(paths(&a.union(&b)), want(fa.union(&fb).cloned().collect()));
            assert_eq!(
                paths(&a.difference(&b)),
                want(fa.difference(&fb).cloned().collect())
            );
            assert_eq!(
                paths(&a.intersection(&b)),
                want(fa.intersection(&fb).cloned().collect())
            );
            let mut absorbed = a.clone();
            absorbed.absorb(b.clone());
            assert_eq!(absorbed, a.union(&b), "absorb is union");
            let mut subtracted = a.clone();
            subtracted.subtract(&b);
            assert_eq!(subtracted, a.difference(&b), "subtract is difference");
            for _ in 0..8 {
                let p = rng.path();
                assert_eq!(a.contains(&p), fa.contains(&p), "{p:?}");
                let below = fa.iter().any(|q| q.len() > p.len() && q.starts_with(&p));
                assert_eq!(a.has_descendant(&p), below, "{p:?}");
                let strs: Vec<&str> = p.iter().map(String::as_str).collect();
                let mut m = a.clone();
                m.remove_member(&strs);
                let mut fm = fa.clone();
                fm.remove(&p);
                assert_eq!(paths(&m), want(fm), "remove_member {p:?}");
                let mut m = a.clone();
                m.remove_subtree(&strs);
                let mut fm = fa.clone();
                fm.retain(|q| !q.starts_with(&p));
                assert_eq!(paths(&m), want(fm), "remove_subtree {p:?}");
                let mut m = a.clone();
                m.keep_subtree(&p[0]);
                let mut fm = fa.clone();
                fm.retain(|q| q[0] == p[0]);
                assert_eq!(paths(&m), want(fm), "keep_subtree {p:?}");
            }
            let encoded = a.to_fields_v1();
            assert_eq!(encoded, flat_fields_v1(&fa));
            assert_eq!(Set::from_fields_v1(&encoded).expect("parses"), a);
            // Equal sets are equal trees, however they were built.
            let mut reversed = Set::new();
            for p in fa.iter().rev() {
                reversed.insert(p);
            }
            assert_eq!(reversed, a);
        }
    }
}
