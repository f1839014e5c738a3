//! Stored objects to response bytes without a JSON tree.
//!
//! The store holds each object as compact JSON without `metadata.resourceVersion` (the store's mod revision is
//! the truth). Every read — get, list items, watch events, the answer to a create — needs the same bytes with the
//! revision added. Parsing ~3 KB of pod into a `serde_json::Value` and encoding it again to add one field was
//! most of a list's time (10k pods) and of each watcher's cost per event; [`with_resource_version`] instead
//! finds the top-level `metadata` object with a structural scan and splices `"resourceVersion":"N"` in as its
//! first member. JSON object members are unordered, so clients see the same object.
//!
//! The scan checks the whole document's structure (strings, nesting, separators) but not the spelling of
//! numbers and literals; it gives up (returns `None`) on anything unexpected — no `metadata` object, a
//! `resourceVersion` already there, an escaped key where `metadata` could hide — and callers then take the
//! parse-and-encode path, which reports a corrupt object as such.

/// `value` (one stored JSON object) with `"resourceVersion":"<revision>"` as the first member of its top-level
/// `metadata`; `None` when the bytes are not the plain shape this expects.
#[cfg(test)]
pub(crate) fn with_resource_version(value: &[u8], revision: i64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    append_with_resource_version(&mut out, value, revision).then_some(out)
}

/// Appends `value` with its resourceVersion spliced in to `out`; false (and `out` untouched) when the bytes are
/// not the plain shape this expects.
pub(crate) fn append_with_resource_version(out: &mut Vec<u8>, value: &[u8], revision: i64) -> bool {
    let Some(at) = metadata_body_start(value) else {
        return false;
    };
    splice_resource_version(out, value, at, revision);
    true
}

/// An object as the store holds it: compact JSON without `metadata.resourceVersion` (byte for byte what
/// `serde_json::to_vec` gives for the object without that field), and — when the object has a `metadata`
/// object — the offset just after metadata's `{`, where [`splice_resource_version`] puts the revision back for
/// the response without scanning the bytes again.
pub(crate) fn encode_for_store(obj: &serde_json::Value) -> (Vec<u8>, Option<usize>) {
    encode_for_store_with(obj, None)
}

/// [`encode_for_store`] of an object whose `metadata.managedFields` are held apart, already encoded
/// (`managed_fields`, from [`super::fieldmanager::update_encoded`]): they are written in their place among
/// metadata's members, as if they were in the object.
pub(crate) fn encode_for_store_with(
    obj: &serde_json::Value,
    managed_fields: Option<&[u8]>,
) -> (Vec<u8>, Option<usize>) {
    use serde_json::Value;
    let Value::Object(top) = obj else {
        return (serde_json::to_vec(obj).unwrap_or_default(), None);
    };
    // Encoding a `Value` into a `Vec` cannot fail (its keys are strings; writing to memory does not fail).
    let mut out = Vec::with_capacity(4096);
    let mut at = None;
    out.push(b'{');
    for (i, (key, value)) in top.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut out, key);
        out.push(b':');
        match (key.as_str(), value) {
            ("metadata", Value::Object(meta)) => {
                out.push(b'{');
                at = Some(out.len());
                let mut first = true;
                let mut member = |out: &mut Vec<u8>, key: &str| {
                    if !first {
                        out.push(b',');
                    }
                    first = false;
                    let _ = serde_json::to_writer(&mut *out, key);
                    out.push(b':');
                };
                // Members are written in key order, as the map's own encoding has them.
                let mut managed = managed_fields;
                for (k, v) in meta {
                    if k == "resourceVersion" || (managed.is_some() && k == "managedFields") {
                        continue;
                    }
                    if let Some(json) = managed.filter(|_| k.as_str() > "managedFields") {
                        member(&mut out, "managedFields");
                        out.extend_from_slice(json);
                        managed = None;
                    }
                    member(&mut out, k);
                    let _ = serde_json::to_writer(&mut out, v);
                }
                if let Some(json) = managed {
                    member(&mut out, "managedFields");
                    out.extend_from_slice(json);
                }
                out.push(b'}');
            }
            _ => {
                let _ = serde_json::to_writer(&mut out, value);
            }
        }
    }
    out.push(b'}');
    (out, at)
}

/// Appends `value` to `out` with `"resourceVersion":"<revision>"` inserted at `at`, the offset just after the
/// `{` of its top-level metadata (which has no resourceVersion member).
pub(crate) fn splice_resource_version(out: &mut Vec<u8>, value: &[u8], at: usize, revision: i64) {
    let Some((head, rest)) = value.split_at_checked(at) else {
        // Not an offset into `value`: callers pass one from [`encode_for_store`] or the scan, so this does not
        // happen; the bytes go out unchanged rather than cut.
        out.extend_from_slice(value);
        return;
    };
    let rv = revision.to_string();
    out.reserve(value.len() + rv.len() + 24);
    out.extend_from_slice(head);
    out.extend_from_slice(b"\"resourceVersion\":\"");
    out.extend_from_slice(rv.as_bytes());
    out.push(b'"');
    // An empty metadata object gets no separator.
    if skip_ws(rest, 0).is_some_and(|i| rest[i] != b'}') {
        out.push(b',');
    }
    out.extend_from_slice(rest);
}

/// Offset just after the `{` of the top-level `metadata` object, once the whole document scanned cleanly and
/// metadata has no `resourceVersion` member.
fn metadata_body_start(v: &[u8]) -> Option<usize> {
    let mut i = skip_ws(v, 0)?;
    if v[i] != b'{' {
        return None;
    }
    i += 1;
    let mut found = None;
    let mut first = true;
    loop {
        i = skip_ws(v, i)?;
        if v[i] == b'}' && first {
            i += 1;
            break;
        }
        let (key, after_key) = string(v, i)?;
        i = skip_ws(v, after_key)?;
        if v[i] != b':' {
            return None;
        }
        i = skip_ws(v, i + 1)?;
        if key.contains(&b'\\') {
            // `metadata` spelled with escapes: too unusual to handle here.
            return None;
        }
        if key == b"metadata" {
            if found.is_some() || v[i] != b'{' {
                return None;
            }
            found = Some(i + 1);
            i = object_without_resource_version(v, i)?;
        } else {
            i = skip_value(v, i)?;
        }
        first = false;
        i = skip_ws(v, i)?;
        match v[i] {
            b',' => i += 1,
            b'}' => {
                i += 1;
                break;
            }
            _ => return None,
        }
    }
    // Nothing but whitespace may follow the object.
    match skip_ws(v, i) {
        None => found,
        Some(_) => None,
    }
}

/// Skips the object at `i` (which starts with `{`), refusing one with a `resourceVersion` member.
fn object_without_resource_version(v: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    let mut first = true;
    loop {
        i = skip_ws(v, i)?;
        if v[i] == b'}' && first {
            return Some(i + 1);
        }
        let (key, after_key) = string(v, i)?;
        if key == b"resourceVersion" || key.contains(&b'\\') {
            return None;
        }
        i = skip_ws(v, after_key)?;
        if v[i] != b':' {
            return None;
        }
        i = skip_value(v, skip_ws(v, i + 1)?)?;
        first = false;
        i = skip_ws(v, i)?;
        match v[i] {
            b',' => i += 1,
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// The first non-whitespace offset at or after `i`; `None` at the end.
fn skip_ws(v: &[u8], mut i: usize) -> Option<usize> {
    while i < v.len() {
        match v[i] {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            _ => return Some(i),
        }
    }
    None
}

/// The raw contents of the string at `i` and the offset after its closing quote.
fn string(v: &[u8], i: usize) -> Option<(&[u8], usize)> {
    if v.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    while j < v.len() {
        match v[j] {
            b'"' => return Some((&v[i + 1..j], j + 1)),
            b'\\' => j += 2,
            // Control characters must be escaped inside JSON strings.
            c if c < 0x20 => return None,
            _ => j += 1,
        }
    }
    None
}

/// The offset after the value starting at `i`.
fn skip_value(v: &[u8], i: usize) -> Option<usize> {
    match *v.get(i)? {
        b'"' => string(v, i).map(|(_, end)| end),
        b'{' | b'[' => skip_container(v, i),
        _ => {
            // A number or a literal: up to the next separator.
            let mut j = i;
            while j < v.len() && !matches!(v[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                if matches!(v[j], b'"' | b'{' | b'[' | b':') {
                    return None;
                }
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// The offset after the object or array at `i`, checking that brackets pair up and members are separated.
fn skip_container(v: &[u8], i: usize) -> Option<usize> {
    let (close, is_object) = match v[i] {
        b'{' => (b'}', true),
        _ => (b']', false),
    };
    let mut j = skip_ws(v, i + 1)?;
    if v[j] == close {
        return Some(j + 1);
    }
    loop {
        if is_object {
            let (_, after_key) = string(v, j)?;
            j = skip_ws(v, after_key)?;
            if v[j] != b':' {
                return None;
            }
            j = skip_ws(v, j + 1)?;
        }
        j = skip_ws(v, skip_value(v, j)?)?;
        match v[j] {
            b',' => j = skip_ws(v, j + 1)?,
            c if c == close => return Some(j + 1),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn spliced(v: &Value, rev: i64) -> Value {
        let bytes = serde_json::to_vec(v).expect("encode");
        let out = with_resource_version(&bytes, rev).expect("splice");
        serde_json::from_slice(&out).expect("spliced bytes are JSON")
    }

    #[test]
    fn the_revision_lands_in_metadata_and_nothing_else_changes() {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"a": "b"}, "annotations": {"x": "{\"metadata\":{}}"}},
            "spec": {"containers": [{"name": "c", "args": ["a,b", "}"], "ports": [{"containerPort": 80}]}],
                     "priority": -1.5e3, "enableServiceLinks": true, "x": null},
        });
        let out = spliced(&pod, 42);
        let mut expected = pod.clone();
        expected["metadata"]["resourceVersion"] = json!("42");
        assert_eq!(out, expected);
    }

    #[test]
    fn an_object_is_stored_without_its_resource_version_and_answered_with_the_new_one() {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "resourceVersion": "9", "labels": {"a\"b": "c"}},
            "spec": {"containers": [{"name": "c", "args": ["}"]}], "x": null, "n": -1.5e3},
        });
        let (stored, at) = encode_for_store(&pod);
        let mut without = pod.clone();
        without["metadata"]
            .as_object_mut()
            .map(|m| m.remove("resourceVersion"));
        // Byte for byte what the generic encoder writes, so stored objects look as before.
        assert_eq!(stored, serde_json::to_vec(&without).expect("encode"));
        let mut answer = Vec::new();
        splice_resource_version(&mut answer, &stored, at.expect("has metadata"), 42);
        // The same bytes the scan of a stored object gives.
        assert_eq!(Some(answer), with_resource_version(&stored, 42));
        for other in [
            json!({"metadata": {"resourceVersion": "1"}}),
            json!({"kind": "X"}),
            json!([1]),
        ] {
            let (stored, at) = encode_for_store(&other);
            let mut without = other.clone();
            if let Some(m) = without.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            assert_eq!(stored, serde_json::to_vec(&without).expect("encode"));
            assert_eq!(at.is_some(), other.get("metadata").is_some());
        }
    }

    #[test]
    fn empty_metadata_and_whitespace_are_handled() {
        assert_eq!(
            spliced(&json!({"metadata": {}}), 7),
            json!({"metadata": {"resourceVersion": "7"}})
        );
        let raw = b" { \"kind\" : \"X\" , \"metadata\" : { } } ";
        let out = with_resource_version(raw, 3).expect("splice");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(
            v,
            json!({"kind": "X", "metadata": {"resourceVersion": "3"}})
        );
    }

    #[test]
    fn unexpected_shapes_fall_back_to_parsing() {
        for raw in [
            &br#"{"kind":"X"}"#[..],
            br#"{"metadata":{"resourceVersion":"1"}}"#,
            br#"{"metadata":[]}"#,
            br#"{"metadata":{"name":"a"}"#,
            br#"{"metadata":{"name":"a"}} x"#,
            br#"{"metadata":{"name":"a"},"spec":{"a":[1,2}}"#,
            br#"{"metadata":{"name":"a"},"spec":{"a" 1}}"#,
            br#"{"metadata":{},"metadata":{}}"#,
            br#"{"\u006detadata":{}}"#,
            br#"[]"#,
            b"",
        ] {
            assert!(
                with_resource_version(raw, 1).is_none(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
