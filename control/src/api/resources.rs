//! The one table of resource kinds the server serves. Discovery, OpenAPI, routing, storage keys, typed
//! validation and table printing are all driven by it.

use serde_json::Value;

/// A subresource of a kind.
#[derive(Debug)]
pub(crate) struct Subresource {
    pub name: &'static str,
    /// Kind of the subresource's body (e.g. `Scale`) and its group/version.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub verbs: &'static [&'static str],
}

/// A kind of resource.
pub(crate) struct ResourceKind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub verbs: &'static [&'static str],
    pub subresources: &'static [Subresource],
    /// The upstream etcd key prefix under `/registry/` (usually the plural; `services/specs`, `minions`, ...).
    pub store_prefix: &'static str,
    /// Decodes into the `k8s-openapi` type and re-encodes: type errors fail, unknown fields are dropped.
    /// `None`: the object already is what its type encodes to (the usual case), so no new tree was built.
    pub normalize: fn(&Value) -> Result<Option<Value>, serde_json::Error>,
    /// Adds this kind's schema (and what it references) to an OpenAPI generator; returns the schema name.
    pub schema: fn(&mut schemars::SchemaGenerator) -> String,
    /// `PUT` on a missing object creates it (upstream `AllowCreateOnUpdate`).
    pub create_on_update: bool,
}

impl std::fmt::Debug for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.qualified())
    }
}

impl ResourceKind {
    /// `apiVersion` of objects of this kind.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, `deployments.apps`: how upstream names a resource in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn subresource(&self, name: &str) -> Option<&'static Subresource> {
        self.subresources.iter().find(|s| s.name == name)
    }

    /// Whether this kind has a `status` subresource (then the main resource ignores status changes).
    pub fn has_status(&self) -> bool {
        self.subresource("status").is_some()
    }

    /// Store key prefix for a namespace (or all namespaces / cluster scope when `None`), ending in `/`.
    pub fn prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("/registry/{}/{ns}/", self.store_prefix),
            _ => format!("/registry/{}/", self.store_prefix),
        }
    }

    /// Store key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.prefix(namespace))
    }
}

fn normalize<T: serde::de::DeserializeOwned + serde::Serialize>(
    v: &Value,
) -> Result<Option<Value>, serde_json::Error> {
    // Deserialising from a reference spares a deep copy of the request body.
    let typed = T::deserialize(v)?;
    if super::typed_eq::encodes_to(&typed, v) {
        return Ok(None);
    }
    serde_json::to_value(typed).map(Some)
}

fn schema<T: schemars::JsonSchema>(generator: &mut schemars::SchemaGenerator) -> String {
    generator.subschema_for::<T>();
    T::schema_name().into_owned()
}

const RW: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

macro_rules! kind {
    ($ty:ty, $group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, $namespaced:expr,
     short: $short:expr, cat: $cat:expr, sub: $sub:expr, prefix: $prefix:expr, create_on_update: $cou:expr) => {
        ResourceKind {
            group: $group,
            version: $version,
            kind: $kind,
            plural: $plural,
            singular: $singular,
            namespaced: $namespaced,
            short_names: $short,
            categories: $cat,
            verbs: RW,
            subresources: $sub,
            store_prefix: $prefix,
            normalize: normalize::<$ty>,
            schema: schema::<$ty>,
            create_on_update: $cou,
        }
    };
}

const fn status(group: &'static str, version: &'static str, kind: &'static str) -> Subresource {
    Subresource {
        name: "status",
        group,
        version,
        kind,
        verbs: STATUS_VERBS,
    }
}

const SCALE: Subresource = Subresource {
    name: "scale",
    group: "autoscaling",
    version: "v1",
    kind: "Scale",
    verbs: STATUS_VERBS,
};

use k8s_openapi::api::rbac::v1 as rbac;
use k8s_openapi::api::{
    apps::v1 as apps, coordination::v1 as coord, core::v1 as core, discovery::v1 as disc,
};

static POD_SUBS: [Subresource; 6] = [
    status("", "v1", "Pod"),
    Subresource {
        name: "binding",
        group: "",
        version: "v1",
        kind: "Binding",
        verbs: &["create"],
    },
    // Proxied to the node's kubelet (`kubelet_proxy`), as upstream lists them.
    Subresource {
        name: "log",
        group: "",
        version: "v1",
        kind: "Pod",
        verbs: &["get"],
    },
    Subresource {
        name: "exec",
        group: "",
        version: "v1",
        kind: "PodExecOptions",
        verbs: &["create", "get"],
    },
    Subresource {
        name: "attach",
        group: "",
        version: "v1",
        kind: "PodAttachOptions",
        verbs: &["create", "get"],
    },
    Subresource {
        name: "portforward",
        group: "",
        version: "v1",
        kind: "PodPortForwardOptions",
        verbs: &["create", "get"],
    },
];
static SERVICE_ACCOUNT_SUBS: [Subresource; 1] = [Subresource {
    name: "token",
    group: "authentication.k8s.io",
    version: "v1",
    kind: "TokenRequest",
    verbs: &["create"],
}];
static NODE_SUBS: [Subresource; 1] = [status("", "v1", "Node")];
static SERVICE_SUBS: [Subresource; 1] = [status("", "v1", "Service")];
static NAMESPACE_SUBS: [Subresource; 2] = [
    status("", "v1", "Namespace"),
    // The namespace controller removes its `kubernetes` spec finalizer here once the namespace is empty.
    Subresource {
        name: "finalize",
        group: "",
        version: "v1",
        kind: "Namespace",
        verbs: &["update"],
    },
];
static DEPLOY_SUBS: [Subresource; 2] = [SCALE, status("apps", "v1", "Deployment")];
static RS_SUBS: [Subresource; 2] = [SCALE, status("apps", "v1", "ReplicaSet")];

/// Every kind served, in discovery order.
pub(crate) static KINDS: [ResourceKind; 20] = [
    kind!(core::Namespace, "", "v1", "Namespace", "namespaces", "namespace", false,
        short: &["ns"], cat: &[], sub: &NAMESPACE_SUBS, prefix: "namespaces", create_on_update: false),
    kind!(core::Pod, "", "v1", "Pod", "pods", "pod", true,
        short: &["po"], cat: &["all"], sub: &POD_SUBS, prefix: "pods", create_on_update: false),
    kind!(core::Node, "", "v1", "Node", "nodes", "node", false,
        short: &["no"], cat: &[], sub: &NODE_SUBS, prefix: "minions", create_on_update: false),
    kind!(core::Service, "", "v1", "Service", "services", "service", true,
        short: &["svc"], cat: &["all"], sub: &SERVICE_SUBS, prefix: "services/specs", create_on_update: false),
    kind!(core::Endpoints, "", "v1", "Endpoints", "endpoints", "endpoints", true,
        short: &["ep"], cat: &[], sub: &[], prefix: "services/endpoints", create_on_update: true),
    kind!(core::ConfigMap, "", "v1", "ConfigMap", "configmaps", "configmap", true,
        short: &["cm"], cat: &[], sub: &[], prefix: "configmaps", create_on_update: false),
    kind!(core::Secret, "", "v1", "Secret", "secrets", "secret", true,
        short: &[], cat: &[], sub: &[], prefix: "secrets", create_on_update: false),
    kind!(core::Event, "", "v1", "Event", "events", "event", true,
        short: &["ev"], cat: &[], sub: &[], prefix: "events", create_on_update: true),
    kind!(core::ServiceAccount, "", "v1", "ServiceAccount", "serviceaccounts", "serviceaccount", true,
        short: &["sa"], cat: &[], sub: &SERVICE_ACCOUNT_SUBS, prefix: "serviceaccounts", create_on_update: false),
    kind!(apps::Deployment, "apps", "v1", "Deployment", "deployments", "deployment", true,
        short: &["deploy"], cat: &["all"], sub: &DEPLOY_SUBS, prefix: "deployments", create_on_update: false),
    kind!(apps::ReplicaSet, "apps", "v1", "ReplicaSet", "replicasets", "replicaset", true,
        short: &["rs"], cat: &["all"], sub: &RS_SUBS, prefix: "replicasets", create_on_update: false),
    kind!(disc::EndpointSlice, "discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", "endpointslice", true,
        short: &[], cat: &[], sub: &[], prefix: "endpointslices", create_on_update: false),
    kind!(coord::Lease, "coordination.k8s.io", "v1", "Lease", "leases", "lease", true,
        short: &[], cat: &[], sub: &[], prefix: "leases", create_on_update: true),
    kind!(rbac::Role, "rbac.authorization.k8s.io", "v1", "Role", "roles", "role", true,
        short: &[], cat: &[], sub: &[], prefix: "roles", create_on_update: true),
    kind!(rbac::RoleBinding, "rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", "rolebinding", true,
        short: &[], cat: &[], sub: &[], prefix: "rolebindings", create_on_update: true),
    kind!(rbac::ClusterRole, "rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", "clusterrole", false,
        short: &[], cat: &[], sub: &[], prefix: "clusterroles", create_on_update: true),
    kind!(rbac::ClusterRoleBinding, "rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings",
        "clusterrolebinding", false,
        short: &[], cat: &[], sub: &[], prefix: "clusterrolebindings", create_on_update: true),
    // Not stored: a request evaluated against RBAC (`kubectl auth can-i`).
    ResourceKind {
        group: "authorization.k8s.io",
        version: "v1",
        kind: "SelfSubjectAccessReview",
        plural: "selfsubjectaccessreviews",
        singular: "selfsubjectaccessreview",
        namespaced: false,
        short_names: &[],
        categories: &[],
        verbs: &["create"],
        subresources: &[],
        store_prefix: "selfsubjectaccessreviews",
        normalize: normalize::<k8s_openapi::api::authorization::v1::SelfSubjectAccessReview>,
        schema: schema::<k8s_openapi::api::authorization::v1::SelfSubjectAccessReview>,
        create_on_update: false,
    },
    // Not stored: who the caller is (`kubectl auth whoami`).
    ResourceKind {
        group: "authentication.k8s.io",
        version: "v1",
        kind: "SelfSubjectReview",
        plural: "selfsubjectreviews",
        singular: "selfsubjectreview",
        namespaced: false,
        short_names: &[],
        categories: &[],
        verbs: &["create"],
        subresources: &[],
        store_prefix: "selfsubjectreviews",
        normalize: normalize::<k8s_openapi::api::authentication::v1::SelfSubjectReview>,
        schema: schema::<k8s_openapi::api::authentication::v1::SelfSubjectReview>,
        create_on_update: false,
    },
    // Not stored: whether another user may do something (kubelets authorizing their API's callers).
    ResourceKind {
        group: "authorization.k8s.io",
        version: "v1",
        kind: "SubjectAccessReview",
        plural: "subjectaccessreviews",
        singular: "subjectaccessreview",
        namespaced: false,
        short_names: &[],
        categories: &[],
        verbs: &["create"],
        subresources: &[],
        store_prefix: "subjectaccessreviews",
        normalize: normalize::<k8s_openapi::api::authorization::v1::SubjectAccessReview>,
        schema: schema::<k8s_openapi::api::authorization::v1::SubjectAccessReview>,
        create_on_update: false,
    },
];

/// The kind served at `group`/`version`/`plural`.
pub(crate) fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceKind> {
    KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)
}

/// The group/versions served, in order, core first (`""`).
pub(crate) fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for k in &KINDS {
        if !out.contains(&(k.group, k.version)) {
            out.push((k.group, k.version));
        }
    }
    out
}
