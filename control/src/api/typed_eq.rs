//! Whether a typed object encodes to a given JSON tree, answered without building the tree.
//!
//! Why: every write is decoded through its `k8s-openapi` type (type errors are 400s, unknown fields are dropped),
//! and re-encoding the typed object into a new `serde_json::Value` was the largest part of that round trip
//! (~5 % of the API server's CPU per pod create, plus freeing the tree). Almost every body a client sends is
//! already what its type encodes to, so the server first asks this serializer "would `to_value(typed)` equal
//! `expected`?" — a walk that allocates nothing on the usual path and stops at the first difference — and only
//! when the answer is no builds the new tree (and looks for the unknown fields it dropped).
//!
//! A yes means exactly `serde_json::to_value(typed)? == *expected`: every `Serializer` method below compares
//! what `serde_json`'s value serializer would produce for that call with the expected node (the unit tests check
//! the equivalence on mutated objects of several kinds). A no only costs the slow path, so the one encoding not
//! modelled — floating-point map keys, which no API type has — answers no.

use serde::ser::{self, Serialize};
use serde_json::{Map, Number, Value};

/// `serde_json::to_value(typed).is_ok_and(|v| v == *expected)`, without building the value (see the module
/// documentation for the one case that answers no conservatively).
pub(crate) fn encodes_to<T: Serialize + ?Sized>(typed: &T, expected: &Value) -> bool {
    typed.serialize(Expect(expected)).is_ok()
}

/// The encoding differs (or cannot be made); nothing more is known, nothing more is needed.
#[derive(Debug)]
pub(crate) struct Differs;

impl std::fmt::Display for Differs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the typed encoding differs")
    }
}

impl std::error::Error for Differs {}

impl ser::Error for Differs {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        Differs
    }
}

fn check(same: bool) -> Result<(), Differs> {
    if same {
        Ok(())
    } else {
        Err(Differs)
    }
}

/// Scalars whose `Value` form holds no heap data (numbers, bools) are compared by building that form.
fn same_scalar<T: Serialize>(v: T, expected: &Value) -> Result<(), Differs> {
    check(serde_json::to_value(v).is_ok_and(|v| v == *expected))
}

/// The serializer: one expected node.
struct Expect<'a>(&'a Value);

impl<'a> Expect<'a> {
    fn object(&self) -> Result<&'a Map<String, Value>, Differs> {
        self.0.as_object().ok_or(Differs)
    }

    /// `{variant: <inner>}`, how serde_json encodes a non-unit enum variant: the inner node.
    fn variant(&self, variant: &str) -> Result<&'a Value, Differs> {
        let map = self.object()?;
        match (map.len(), map.get(variant)) {
            (1, Some(inner)) => Ok(inner),
            _ => Err(Differs),
        }
    }
}

impl<'a> ser::Serializer for Expect<'a> {
    type Ok = ();
    type Error = Differs;
    type SerializeSeq = Items<'a>;
    type SerializeTuple = Items<'a>;
    type SerializeTupleStruct = Items<'a>;
    type SerializeTupleVariant = Items<'a>;
    type SerializeMap = Entries<'a>;
    type SerializeStruct = Entries<'a>;
    type SerializeStructVariant = Entries<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), Differs> {
        check(self.0.as_bool() == Some(v))
    }

    fn serialize_i8(self, v: i8) -> Result<(), Differs> {
        self.serialize_i64(v.into())
    }

    fn serialize_i16(self, v: i16) -> Result<(), Differs> {
        self.serialize_i64(v.into())
    }

    fn serialize_i32(self, v: i32) -> Result<(), Differs> {
        self.serialize_i64(v.into())
    }

    fn serialize_i64(self, v: i64) -> Result<(), Differs> {
        check(matches!(self.0, Value::Number(n) if *n == Number::from(v)))
    }

    fn serialize_i128(self, v: i128) -> Result<(), Differs> {
        same_scalar(v, self.0)
    }

    fn serialize_u8(self, v: u8) -> Result<(), Differs> {
        self.serialize_u64(v.into())
    }

    fn serialize_u16(self, v: u16) -> Result<(), Differs> {
        self.serialize_u64(v.into())
    }

    fn serialize_u32(self, v: u32) -> Result<(), Differs> {
        self.serialize_u64(v.into())
    }

    fn serialize_u64(self, v: u64) -> Result<(), Differs> {
        check(matches!(self.0, Value::Number(n) if *n == Number::from(v)))
    }

    fn serialize_u128(self, v: u128) -> Result<(), Differs> {
        same_scalar(v, self.0)
    }

    fn serialize_f32(self, v: f32) -> Result<(), Differs> {
        same_scalar(v, self.0)
    }

    fn serialize_f64(self, v: f64) -> Result<(), Differs> {
        same_scalar(v, self.0)
    }

    fn serialize_char(self, v: char) -> Result<(), Differs> {
        let mut buf = [0u8; 4];
        self.serialize_str(v.encode_utf8(&mut buf))
    }

    fn serialize_str(self, v: &str) -> Result<(), Differs> {
        check(self.0.as_str() == Some(v))
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), Differs> {
        // serde_json encodes bytes as an array of numbers.
        let items = self.0.as_array().ok_or(Differs)?;
        check(
            items.len() == v.len()
                && items
                    .iter()
                    .zip(v)
                    .all(|(item, b)| item.as_u64() == Some(u64::from(*b))),
        )
    }

    fn serialize_none(self) -> Result<(), Differs> {
        check(self.0.is_null())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Differs> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), Differs> {
        check(self.0.is_null())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Differs> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), Differs> {
        self.serialize_str(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Differs> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Differs> {
        value.serialize(Expect(self.variant(variant)?))
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Items<'a>, Differs> {
        Ok(Items::new(self.0.as_array().ok_or(Differs)?))
    }

    fn serialize_tuple(self, len: usize) -> Result<Items<'a>, Differs> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Items<'a>, Differs> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Items<'a>, Differs> {
        Ok(Items::new(
            self.variant(variant)?.as_array().ok_or(Differs)?,
        ))
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Entries<'a>, Differs> {
        Ok(Entries::new(self.object()?))
    }

    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Entries<'a>, Differs> {
        // serde_json's private RawValue and arbitrary-precision Number structs are not used by the typed API.
        Ok(Entries::new(self.object()?))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Entries<'a>, Differs> {
        Ok(Entries::new(
            self.variant(variant)?.as_object().ok_or(Differs)?,
        ))
    }
}

/// The elements of an expected array, matched in order; all of them must be produced.
struct Items<'a> {
    rest: std::slice::Iter<'a, Value>,
}

impl<'a> Items<'a> {
    fn new(items: &'a [Value]) -> Self {
        Self { rest: items.iter() }
    }

    fn next<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Differs> {
        value.serialize(Expect(self.rest.next().ok_or(Differs)?))
    }

    fn finish(self) -> Result<(), Differs> {
        check(self.rest.len() == 0)
    }
}

/// The four sequence-like serde traits all feed [`Items`] the same way.
macro_rules! items_serializer {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for Items<'_> {
            type Ok = ();
            type Error = Differs;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Differs> {
                self.next(value)
            }

            fn end(self) -> Result<(), Differs> {
                self.finish()
            }
        }
    )*};
}

items_serializer!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

/// The members of an expected object, looked up by key. Every member must be produced exactly once: produced
/// keys are distinct in every type the API decodes (struct fields, `BTreeMap`s), and a repeated key — which
/// `to_value` would collapse — is counted twice, so it can only make the answer a safe "differs".
struct Entries<'a> {
    map: &'a Map<String, Value>,
    produced: usize,
    /// The member named by the last `serialize_key` (maps), or `None` if the map has no such key.
    pending: Option<&'a Value>,
}

impl<'a> Entries<'a> {
    fn new(map: &'a Map<String, Value>) -> Self {
        Self {
            map,
            produced: 0,
            pending: None,
        }
    }

    fn member<T: Serialize + ?Sized>(
        &mut self,
        expected: Option<&'a Value>,
        value: &T,
    ) -> Result<(), Differs> {
        self.produced += 1;
        value.serialize(Expect(expected.ok_or(Differs)?))
    }

    fn finish(self) -> Result<(), Differs> {
        check(self.produced == self.map.len())
    }
}

impl ser::SerializeMap for Entries<'_> {
    type Ok = ();
    type Error = Differs;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Differs> {
        self.pending = key.serialize(KeyLookup(self.map))?;
        // A key the object lacks: the encodings differ.
        self.pending.map(|_| ()).ok_or(Differs)
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Differs> {
        let expected = self.pending.take();
        self.member(expected, value)
    }

    fn end(self) -> Result<(), Differs> {
        self.finish()
    }
}

/// Structs and struct variants name their members the same way.
macro_rules! struct_serializer {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Entries<'_> {
            type Ok = ();
            type Error = Differs;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), Differs> {
                let expected = self.map.get(key);
                self.member(expected, value)
            }

            fn end(self) -> Result<(), Differs> {
                self.finish()
            }
        }
    )*};
}

struct_serializer!(SerializeStruct, SerializeStructVariant);

/// Finds the member a map key names, with the key forms serde_json accepts (strings, and numbers, bools and
/// chars written as strings); anything else is a key serde_json cannot encode, so `to_value` would fail.
struct KeyLookup<'a>(&'a Map<String, Value>);

impl<'a> KeyLookup<'a> {
    fn get(&self, key: &str) -> Result<Option<&'a Value>, Differs> {
        Ok(self.0.get(key))
    }

    fn formatted(&self, key: impl std::fmt::Display) -> Result<Option<&'a Value>, Differs> {
        self.get(&key.to_string())
    }
}

/// Keys serde_json writes as their decimal (or `true`/`false`) text.
macro_rules! formatted_keys {
    ($($method:ident: $ty:ty),*) => {$(
        fn $method(self, v: $ty) -> Result<Option<&'a Value>, Differs> {
            self.formatted(v)
        }
    )*};
}

impl<'a> ser::Serializer for KeyLookup<'a> {
    type Ok = Option<&'a Value>;
    type Error = Differs;
    type SerializeSeq = ser::Impossible<Self::Ok, Differs>;
    type SerializeTuple = ser::Impossible<Self::Ok, Differs>;
    type SerializeTupleStruct = ser::Impossible<Self::Ok, Differs>;
    type SerializeTupleVariant = ser::Impossible<Self::Ok, Differs>;
    type SerializeMap = ser::Impossible<Self::Ok, Differs>;
    type SerializeStruct = ser::Impossible<Self::Ok, Differs>;
    type SerializeStructVariant = ser::Impossible<Self::Ok, Differs>;

    fn serialize_str(self, v: &str) -> Result<Self::Ok, Differs> {
        self.get(v)
    }

    fn serialize_char(self, v: char) -> Result<Self::Ok, Differs> {
        let mut buf = [0u8; 4];
        self.get(v.encode_utf8(&mut buf))
    }

    formatted_keys!(serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_i128: i128, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
        serialize_u64: u64, serialize_u128: u128);

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Self::Ok, Differs> {
        self.get(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Self::Ok, Differs> {
        value.serialize(self)
    }

    // Floats, bytes, units, options, sequences, maps and structs are not keys serde_json can write: `to_value`
    // fails on them, so "differs" is the right answer (the caller then takes the slow path, which reports it).
    fn serialize_f32(self, _v: f32) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }

    fn serialize_f64(self, _v: f64) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }

    fn serialize_bytes(self, _v: &[u8]) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }

    fn serialize_none(self) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }

    fn serialize_unit(self) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, Differs> {
        Err(Differs)
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, Differs> {
        Err(Differs)
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, Differs> {
        Err(Differs)
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, Differs> {
        Err(Differs)
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Differs> {
        Err(Differs)
    }

    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, Differs> {
        Err(Differs)
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, Differs> {
        Err(Differs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    /// Every variant of `seed` one edit away that a typed client could plausibly send: each member removed, set to
    /// null or given an unknown sibling; numbers as floats and strings; strings changed or made numbers; arrays
    /// shortened or with an item repeated.
    fn mutations(seed: &Value) -> Vec<Value> {
        fn walk(node: &Value, path: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
            out.push(path.clone());
            match node {
                Value::Object(m) => {
                    for (k, v) in m {
                        path.push(PathStep::Key(k.clone()));
                        walk(v, path, out);
                        path.pop();
                    }
                }
                Value::Array(a) => {
                    for (i, v) in a.iter().enumerate() {
                        path.push(PathStep::Index(i));
                        walk(v, path, out);
                        path.pop();
                    }
                }
                _ => {}
            }
        }
        fn at<'v>(root: &'v mut Value, path: &[PathStep]) -> &'v mut Value {
            path.iter().fold(root, |node, step| match step {
                PathStep::Key(k) => &mut node[k.as_str()],
                PathStep::Index(i) => &mut node[*i],
            })
        }
        let mut paths = Vec::new();
        walk(seed, &mut Vec::new(), &mut paths);
        let mut out = Vec::new();
        for path in &paths {
            let node = {
                let mut copy = seed.clone();
                at(&mut copy, path).clone()
            };
            let mut edit = |f: &dyn Fn(&mut Value)| {
                let mut copy = seed.clone();
                f(at(&mut copy, path));
                out.push(copy);
            };
            edit(&|v| *v = Value::Null);
            match &node {
                Value::Object(_) => {
                    edit(&|v| {
                        v["zzUnknown"] = json!(1);
                    });
                    edit(&|v| *v = json!({}));
                }
                Value::Array(items) if !items.is_empty() => {
                    edit(&|v| {
                        if let Some(a) = v.as_array_mut() {
                            a.pop();
                        }
                    });
                    edit(&|v| {
                        if let Some(a) = v.as_array_mut() {
                            let first = a[0].clone();
                            a.push(first);
                        }
                    });
                }
                Value::Number(n) => {
                    let f = n.as_f64().unwrap_or_default();
                    edit(&|v| *v = json!(f));
                    edit(&|v| *v = json!(f + 0.5));
                    edit(&|v| *v = json!(n.to_string()));
                }
                Value::String(s) => {
                    edit(&|v| *v = json!(format!("{s}x")));
                    edit(&|v| *v = json!(7));
                    edit(&|v| *v = json!(""));
                }
                Value::Bool(b) => edit(&|v| *v = json!(!b)),
                _ => {}
            }
            // Remove the member or item itself.
            if let Some((last, parent)) = path.split_last() {
                let mut copy = seed.clone();
                match (at(&mut copy, parent), last) {
                    (Value::Object(m), PathStep::Key(k)) => {
                        m.remove(k);
                    }
                    (Value::Array(a), PathStep::Index(i)) => {
                        a.remove(*i);
                    }
                    _ => {}
                }
                out.push(copy);
            }
        }
        out
    }

    #[derive(Clone)]
    enum PathStep {
        Key(String),
        Index(usize),
    }

    /// Checks `encodes_to` against `to_value` on the seed's typed form and on every mutation the type accepts;
    /// returns how many accepted bodies encode to themselves and how many do not.
    fn agrees_with_to_value<T: DeserializeOwned + Serialize>(seed: Value) -> (usize, usize) {
        let canonical =
            serde_json::to_value(serde_json::from_value::<T>(seed).expect("seed decodes"))
                .expect("seed encodes");
        let (mut same, mut different) = (0, 0);
        for body in std::iter::once(canonical.clone()).chain(mutations(&canonical)) {
            let Ok(typed) = T::deserialize(&body) else {
                continue;
            };
            let truth = serde_json::to_value(&typed).is_ok_and(|v| v == body);
            assert_eq!(
                encodes_to(&typed, &body),
                truth,
                "encodes_to disagrees with to_value for {body}"
            );
            if truth {
                same += 1;
            } else {
                different += 1;
            }
        }
        (same, different)
    }

    #[test]
    fn a_typed_object_encodes_to_a_body_exactly_when_to_value_says_so() {
        use k8s_openapi::api::{apps, coordination, core, discovery, rbac};
        let checks = [
            agrees_with_to_value::<core::v1::Pod>(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web", "namespace": "default", "uid": "0d7c", "generateName": "web-",
                    "creationTimestamp": "2026-11-24T07:00:00Z",
                    "labels": {"app": "web"}, "annotations": {"note": "x"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1",
                        "uid": "1", "controller": true, "blockOwnerDeletion": true}],
                    "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1",
                        "time": "2026-11-24T07:00:00Z", "fieldsType": "FieldsV1",
                        "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}}}]},
                "spec": {"containers": [{"name": "web", "image": "web:1", "args": ["--port=8080"],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "env": [{"name": "MODE", "value": "prod"},
                            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 5},
                    "livenessProbe": {"httpGet": {"path": "/", "port": "http"}},
                    "securityContext": {"runAsUser": 1000, "privileged": false}}],
                    "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoExecute",
                        "tolerationSeconds": 300}],
                    "volumes": [{"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}],
                    "restartPolicy": "Always", "terminationGracePeriodSeconds": 30},
                "status": {"phase": "Running", "podIP": "10.244.0.5",
                    "conditions": [{"type": "Ready", "status": "True",
                        "lastTransitionTime": "2026-11-24T07:00:01Z"}],
                    "startTime": "2026-11-24T07:00:00Z"}
            })),
            agrees_with_to_value::<core::v1::Service>(json!({
                "metadata": {"name": "web"},
                "spec": {"type": "NodePort", "selector": {"app": "web"}, "clusterIP": "10.96.0.10",
                    "ports": [{"port": 80, "targetPort": "http", "nodePort": 30080, "protocol": "TCP"}],
                    "sessionAffinity": "None", "ipFamilies": ["IPv4"]}
            })),
            agrees_with_to_value::<core::v1::Secret>(json!({
                "metadata": {"name": "s"}, "type": "Opaque",
                "data": {"password": "c2VjcmV0"}, "stringData": {"user": "admin"}
            })),
            agrees_with_to_value::<core::v1::Node>(json!({
                "metadata": {"name": "n1"},
                "spec": {"podCIDR": "10.244.1.0/24", "taints": [{"key": "k", "effect": "NoSchedule"}]},
                "status": {"capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                    "addresses": [{"type": "InternalIP", "address": "192.168.0.2"}],
                    "nodeInfo": {"architecture": "amd64", "bootID": "", "containerRuntimeVersion": "w",
                        "kernelVersion": "6", "kubeProxyVersion": "", "kubeletVersion": "v1",
                        "machineID": "", "operatingSystem": "linux", "osImage": "Debian",
                        "systemUUID": ""}}
            })),
            agrees_with_to_value::<apps::v1::Deployment>(json!({
                "metadata": {"name": "web", "generation": 3},
                "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                    "strategy": {"type": "RollingUpdate",
                        "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "web", "image": "web:1"}]}}},
                "status": {"replicas": 3, "readyReplicas": 2, "observedGeneration": 3}
            })),
            agrees_with_to_value::<core::v1::Event>(json!({
                "metadata": {"name": "e1", "namespace": "default"},
                "involvedObject": {"kind": "Pod", "name": "web"}, "reason": "Started",
                "eventTime": "2026-11-24T07:00:00.123456Z", "count": 2,
                "firstTimestamp": "2026-11-24T07:00:00Z", "type": "Normal"
            })),
            agrees_with_to_value::<coordination::v1::Lease>(json!({
                "metadata": {"name": "n1"},
                "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 40,
                    "renewTime": "2026-11-24T07:00:00.000001Z"}
            })),
            agrees_with_to_value::<discovery::v1::EndpointSlice>(json!({
                "metadata": {"name": "web-1"}, "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": true},
                    "nodeName": "n1"}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
            })),
            agrees_with_to_value::<rbac::v1::ClusterRole>(json!({
                "metadata": {"name": "r"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
            })),
        ];
        for (same, different) in checks {
            // Each kind has bodies on both sides, so neither answer is given blindly.
            assert!(
                same >= 1 && different >= 10,
                "{same} same, {different} different"
            );
        }
    }

    #[test]
    fn a_body_with_an_unknown_field_or_a_null_does_not_encode_to_itself() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}});
        let typed: ConfigMap = serde_json::from_value(body.clone()).expect("decodes");
        assert!(encodes_to(&typed, &body));
        let unknown = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"},
            "colour": "red"});
        let typed: ConfigMap = serde_json::from_value(unknown.clone()).expect("decodes");
        assert!(!encodes_to(&typed, &unknown));
        let null = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": null},
            "data": {"a": "1"}});
        let typed: ConfigMap = serde_json::from_value(null.clone()).expect("decodes");
        assert!(!encodes_to(&typed, &null));
    }
}
