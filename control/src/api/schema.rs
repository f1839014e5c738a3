//! What the Go types' merge tags say about lists and structs of the built-in kinds, in one table for both
//! strategic merge patch (`patchMergeKey`/`patchStrategy`) and server-side apply (`listType`/`listMapKey`,
//! `structType`/`mapType`).
//!
//! Ref: kubernetes `staging/src/k8s.io/api/core/v1/types.go` and `apps/v1/types.go`; structured-merge-diff turns
//! a `patchStrategy:"merge"` list without `listType` into an associative list keyed by its merge key (or a set for
//! scalars), which is why most rows carry the same key for both.

/// How server-side apply treats a list (`x-kubernetes-list-type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListType {
    /// `map`: items are owned individually, identified by these key fields.
    Map(&'static [&'static str]),
    /// `set`: scalar items owned individually by value.
    Set,
    /// `atomic`: the list is one value.
    Atomic,
}

/// The semantics of list `field` whose parent object sits at `parents` (the object keys from the root, list
/// items not counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ListSchema {
    pub apply: ListType,
    /// The strategic merge patch key (`patchMergeKey`), for lists of objects with `patchStrategy:"merge"`.
    pub patch_merge_key: Option<&'static str>,
    /// `patchStrategy:"merge"` on a list of scalars: a patch's items are added, not substituted.
    pub patch_merges_scalars: bool,
}

const fn keyed(keys: &'static [&'static str], merge_key: &'static str) -> ListSchema {
    ListSchema {
        apply: ListType::Map(keys),
        patch_merge_key: Some(merge_key),
        patch_merges_scalars: false,
    }
}

const ATOMIC: ListSchema = ListSchema {
    apply: ListType::Atomic,
    patch_merge_key: None,
    patch_merges_scalars: false,
};

fn in_container<S: AsRef<str>>(parents: &[S]) -> bool {
    parents.iter().any(|p| {
        matches!(
            p.as_ref(),
            "containers" | "initContainers" | "ephemeralContainers"
        )
    })
}

fn is_path<S: AsRef<str>>(parents: &[S], want: &[&str]) -> bool {
    parents.iter().map(AsRef::as_ref).eq(want.iter().copied())
}

/// Generic over the name type: field management walks borrowed names, patches owned ones.
pub(crate) fn list_schema<S: AsRef<str>>(parents: &[S], field: &str) -> ListSchema {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => keyed(&["name"], "name"),
        "volumeMounts" => keyed(&["mountPath"], "mountPath"),
        "volumeDevices" => keyed(&["devicePath"], "devicePath"),
        // Container ports: `+listMapKey=containerPort +listMapKey=protocol`, patch key containerPort.
        "ports" if in_container(parents) => keyed(&["containerPort", "protocol"], "containerPort"),
        // ServiceSpec.Ports: `+listMapKey=port +listMapKey=protocol`, patch key port.
        "ports" if is_path(parents, &["spec"]) => keyed(&["port", "protocol"], "port"),
        "conditions" => keyed(&["type"], "type"),
        "ownerReferences" => keyed(&["uid"], "uid"),
        "hostAliases" => keyed(&["ip"], "ip"),
        "topologySpreadConstraints" => keyed(&["topologyKey", "whenUnsatisfiable"], "topologyKey"),
        // NodeStatus.Addresses and NodeSpec.Taints merge by key in patches but are atomic for apply.
        "addresses" => ListSchema {
            patch_merge_key: Some("type"),
            ..ATOMIC
        },
        "taints" => ListSchema {
            patch_merge_key: Some("key"),
            ..ATOMIC
        },
        // ObjectMeta.Finalizers: `+listType=set`, `patchStrategy:"merge"`; NamespaceSpec.Finalizers is atomic
        // for apply (patches of it have always unioned here too).
        "finalizers" => ListSchema {
            apply: if is_path(parents, &["metadata"]) {
                ListType::Set
            } else {
                ListType::Atomic
            },
            patch_merge_key: None,
            patch_merges_scalars: true,
        },
        _ => ATOMIC,
    }
}

/// A key field's value when an item leaves it out: the schema default structured-merge-diff fills in
/// (`protocol` defaults to TCP in container and service ports).
pub(crate) fn key_default(field: &str) -> Option<&'static str> {
    (field == "protocol").then_some("TCP")
}

/// Structs and maps owned as a whole (`+structType=atomic`, `+mapType=atomic`): label selectors (and a Service's
/// selector map), key/field references, node selectors in affinity, and owner references.
pub(crate) fn is_atomic_object(field: &str) -> bool {
    matches!(
        field,
        "selector"
            | "podSelector"
            | "namespaceSelector"
            | "labelSelector"
            | "secretKeyRef"
            | "configMapKeyRef"
            | "fieldRef"
            | "resourceFieldRef"
            | "requiredDuringSchedulingIgnoredDuringExecution"
    )
}

/// Whether list items of `field` are atomic structs (only the item itself is owned).
pub(crate) fn items_are_atomic(field: &str) -> bool {
    matches!(field, "ownerReferences" | "imagePullSecrets")
}

/// Fields an empty Go object already has: non-pointer structs, and `containers` (serialised without
/// `omitempty`). Creating an object does not "add" them, as upstream's comparison against a zero object of the
/// kind records for updates.
pub(crate) fn always_present(field: &str) -> bool {
    matches!(
        field,
        "metadata"
            | "spec"
            | "status"
            | "template"
            | "strategy"
            | "updateStrategy"
            | "jobTemplate"
            | "containers"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(parents: &[&str], field: &str) -> ListSchema {
        let parents: Vec<String> = parents.iter().map(|p| p.to_string()).collect();
        list_schema(&parents, field)
    }

    #[test]
    fn ports_are_keyed_by_where_they_are() {
        let container = at(&["spec", "template", "spec", "containers"], "ports");
        assert_eq!(
            container.apply,
            ListType::Map(&["containerPort", "protocol"])
        );
        assert_eq!(container.patch_merge_key, Some("containerPort"));
        let service = at(&["spec"], "ports");
        assert_eq!(service.apply, ListType::Map(&["port", "protocol"]));
        assert_eq!(service.patch_merge_key, Some("port"));
        // EndpointSlice ports sit at the top level and are atomic.
        assert_eq!(at(&[], "ports"), ATOMIC);
    }

    #[test]
    fn finalizers_are_a_set_in_metadata_and_tolerations_are_atomic() {
        let meta = at(&["metadata"], "finalizers");
        assert_eq!(meta.apply, ListType::Set);
        assert!(meta.patch_merges_scalars);
        assert_eq!(at(&["spec"], "finalizers").apply, ListType::Atomic);
        assert_eq!(at(&["spec", "template", "spec"], "tolerations"), ATOMIC);
        assert_eq!(at(&["spec"], "taints").apply, ListType::Atomic);
        assert_eq!(at(&["spec"], "taints").patch_merge_key, Some("key"));
    }
}
