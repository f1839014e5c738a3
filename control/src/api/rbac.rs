//! RBAC authorization (Ref: kubernetes `plugin/pkg/auth/authorizer/rbac/rbac.go`) and the default roles
//! bootstrapped at start (Ref: `plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go`).
//!
//! Members of `system:masters` are allowed everything without consulting RBAC, as upstream's superuser group.
//! Otherwise a request is allowed when a ClusterRoleBinding, or a RoleBinding in the request's namespace, binds a
//! subject matching the user (User name, Group, or ServiceAccount `system:serviceaccount:<ns>:<name>`) to a role
//! with a rule covering the verb, API group, resource(/subresource) and name — or the non-resource path.
//!
//! Approximation: upstream builds `admin`/`edit`/`view` by label aggregation; here their rules are written out
//! (covering the kinds this server serves). Bindings and roles come from the API server's cache (`cache.rs`), kept
//! current by the store's watch, as upstream's authorizer reads them from informers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::rbac::v1::{PolicyRule, RoleRef, Subject};
use serde_json::{json, Value};

use super::cache::{Binding, Caches, Rules};
use super::handlers::object_of;
use super::resources;
use super::State;
use super::User;
use crate::store::StoreError;

/// What a request wants to do.
#[derive(Clone, Debug)]
pub(crate) struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Set for non-resource requests (`/version`, `/healthz`, ...).
    pub path: Option<String>,
}

impl Attributes {
    /// Upstream's Forbidden message.
    pub fn forbidden_message(&self, user: &User) -> String {
        if let Some(path) = &self.path {
            return format!(
                "forbidden: User \"{}\" cannot {} path \"{path}\"",
                user.name, self.verb
            );
        }
        let resource = match &self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.clone(),
        };
        let qualified = if self.group.is_empty() {
            resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        let subject = match &self.name {
            Some(n) => format!("{qualified} \"{n}\" is forbidden"),
            None => format!("{qualified} is forbidden"),
        };
        let scope = match &self.namespace {
            Some(ns) => format!(" in the namespace \"{ns}\""),
            None => " at the cluster scope".to_string(),
        };
        format!(
            "{subject}: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\"{scope}",
            user.name, self.verb, self.group
        )
    }
}

fn rule_allows(rule: &PolicyRule, a: &Attributes) -> bool {
    if !rule.verbs.iter().any(|v| v == "*" || *v == a.verb) {
        return false;
    }
    if let Some(path) = &a.path {
        return rule.non_resource_urls.iter().flatten().any(|p| {
            p == "*"
                || p == path
                || p.strip_suffix('*')
                    .is_some_and(|prefix| path.starts_with(prefix))
        });
    }
    if !rule
        .api_groups
        .iter()
        .flatten()
        .any(|g| g == "*" || *g == a.group)
    {
        return false;
    }
    let resource_ok = rule
        .resources
        .iter()
        .flatten()
        .any(|r| match &a.subresource {
            None => r == "*" || *r == a.resource,
            Some(s) => {
                r == "*"
                    || r.strip_prefix("*/") == Some(s.as_str())
                    || r.split_once('/') == Some((a.resource.as_str(), s.as_str()))
            }
        });
    if !resource_ok {
        return false;
    }
    match &rule.resource_names {
        Some(names) if !names.is_empty() => a.name.as_ref().is_some_and(|n| names.contains(n)),
        _ => true,
    }
}

fn subject_matches(s: &Subject, user: &User) -> bool {
    match s.kind.as_str() {
        "User" => s.name == user.name,
        "Group" => user.groups.contains(&s.name),
        "ServiceAccount" => user
            .name
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(ns, name)| {
                ns == s.namespace.as_deref().unwrap_or_default() && name == s.name
            }),
        _ => false,
    }
}

/// The rules of the role a binding refers to (a RoleBinding in `namespace` may name a Role there or a
/// ClusterRole; a ClusterRoleBinding only a ClusterRole).
fn role_rules(caches: &Caches, role_ref: &RoleRef, namespace: Option<&str>) -> Option<Arc<Rules>> {
    match (role_ref.kind.as_str(), namespace) {
        ("ClusterRole", _) => caches.cluster_roles.get(&format!(
            "{}{}",
            caches.cluster_roles.prefix(),
            role_ref.name
        )),
        ("Role", Some(ns)) => {
            caches
                .roles
                .get(&format!("{}{ns}/{}", caches.roles.prefix(), role_ref.name))
        }
        _ => None,
    }
}

/// Whether `user` may do `a`, from the API server's RBAC cache (no store reads).
pub(crate) fn authorize(caches: &Caches, user: &User, a: &Attributes) -> bool {
    if user.groups.iter().any(|g| g == "system:masters") {
        return true;
    }
    let allows = |binding: &Binding, ns: Option<&str>| {
        binding.subjects.iter().any(|s| subject_matches(s, user))
            && role_rules(caches, &binding.role_ref, ns)
                .is_some_and(|rules| rules.0.iter().any(|r| rule_allows(r, a)))
    };
    let cluster_prefix = caches.cluster_role_bindings.prefix().to_string();
    if caches
        .cluster_role_bindings
        .under(&cluster_prefix)
        .iter()
        .any(|b| allows(b, None))
    {
        return true;
    }
    if let Some(ns) = a.namespace.as_deref() {
        let prefix = format!("{}{ns}/", caches.role_bindings.prefix());
        if caches
            .role_bindings
            .under(&prefix)
            .iter()
            .any(|b| allows(b, Some(ns)))
        {
            return true;
        }
    }
    false
}

/// The node a kubelet's credentials name (`system:node:<name>` in group `system:nodes`), as upstream's Node
/// authorizer and NodeRestriction admission recognise kubelets.
pub(crate) fn node_of(user: &User) -> Option<&str> {
    let node = user.name.strip_prefix("system:node:")?;
    (!node.is_empty() && user.groups.iter().any(|g| g == "system:nodes")).then_some(node)
}

/// NodeRestriction (Ref: `plugin/pkg/admission/noderestriction`): a kubelet may write only its own Node and
/// Lease, and only pods bound to it: mirror pods it creates (see `mirror_pods`), statuses, deletions. Returns why
/// a request is refused. Tokens only for its pods' service accounts, bound to its pods ([`super::node_tokens`]).
/// Secrets and configMaps it may read only one at a time, and only those its pods use (the Node authorizer's
/// graph, [`super::node_graph`]); other reads are left to RBAC.
pub(crate) async fn node_restriction(
    state: &State,
    user: &User,
    a: &Attributes,
    body: &[u8],
) -> Result<Option<String>, StoreError> {
    let Some(node) = node_of(user) else {
        return Ok(None);
    };
    if a.path.is_some() || !a.group.is_empty() && a.group != "coordination.k8s.io" {
        return Ok(None);
    }
    if let (true, Some(what)) = (
        a.group.is_empty(),
        super::node_graph::Referenced::of_resource(&a.resource),
    ) {
        return super::node_graph::refuse_read(state, node, what, a).await;
    }
    if matches!(a.verb.as_str(), "get" | "list" | "watch") {
        return Ok(None);
    }
    let body_obj: Option<Value> = serde_json::from_slice(body).ok();
    let named = a.name.clone().or_else(|| {
        body_obj
            .as_ref()
            .and_then(|b| b.pointer("/metadata/name"))
            .and_then(Value::as_str)
            .map(String::from)
    });
    let refuse = |why: String| Ok(Some(format!("node \"{node}\" is not allowed to {why}")));
    match (a.group.as_str(), a.resource.as_str()) {
        ("", "serviceaccounts") if a.subresource.as_deref() == Some("token") => {
            super::node_tokens::refuse_token_request(state, node, &user.name, a, body).await
        }
        ("", "nodes") if named.as_deref() != Some(node) => {
            refuse(format!("modify node \"{}\"", named.unwrap_or_default()))
        }
        ("coordination.k8s.io", "leases")
            if a.namespace.as_deref() == Some("kube-node-lease")
                && named.as_deref() != Some(node) =>
        {
            refuse(format!("modify lease \"{}\"", named.unwrap_or_default()))
        }
        ("", "pods") if a.verb == "create" && a.subresource.is_none() => {
            let Some(pod) = body_obj.as_ref() else {
                return refuse("create pods it cannot read".into());
            };
            let node_uid = match resources::find("", "v1", "nodes") {
                Some(kind) => match state.store.get(&kind.key(None, node)).await?.0 {
                    Some(kv) => object_of(&kv).ok().and_then(|o| {
                        o.pointer("/metadata/uid")
                            .and_then(Value::as_str)
                            .map(String::from)
                    }),
                    None => None,
                },
                None => None,
            };
            Ok(super::mirror_pods::refuse_create(
                node,
                node_uid.as_deref(),
                pod,
            ))
        }
        // Ref: NodeRestriction allows a node only status updates (and eviction, deletion) of pods, not edits.
        ("", "pods")
            if matches!(a.verb.as_str(), "update" | "patch") && a.subresource.is_none() =>
        {
            refuse(format!(
                "{} pods: a node can only update pod status",
                a.verb
            ))
        }
        ("", "pods") => {
            let (Some(ns), Some(name)) = (a.namespace.as_deref(), a.name.as_deref()) else {
                return refuse(format!("{} pods across the cluster", a.verb));
            };
            let Some(kind) = resources::find("", "v1", "pods") else {
                return Ok(None);
            };
            let bound = match state.store.get(&kind.key(Some(ns), name)).await?.0 {
                Some(kv) => object_of(&kv).ok().and_then(|o| {
                    o.pointer("/spec/nodeName")
                        .and_then(Value::as_str)
                        .map(String::from)
                }),
                // Missing: the handler answers 404.
                None => return Ok(None),
            };
            if bound.as_deref() == Some(node) {
                Ok(None)
            } else {
                refuse(format!("{} pod {ns}/{name} bound to another node", a.verb))
            }
        }
        _ => Ok(None),
    }
}

/// Labels a kubelet may set on its own Node (Ref: `k8s.io/kubelet/pkg/apis` `IsKubeletLabel`): these, and any
/// under the `kubelet.kubernetes.io` and `node.kubernetes.io` namespaces.
const KUBELET_LABELS: &[&str] = &[
    "kubernetes.io/hostname",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
];

fn label_namespace(label: &str) -> &str {
    label.split_once('/').map_or("", |(ns, _)| ns)
}

fn within(ns: &str, domain: &str) -> bool {
    ns == domain || ns.strip_suffix(domain).is_some_and(|p| p.ends_with('.'))
}

/// Whether a node may not set, change or remove this label on itself (Ref: NodeRestriction
/// `getForbiddenLabels`): `node-restriction.kubernetes.io/` ones (how admins mark nodes for workloads a node must
/// not claim, e.g. `node-role.kubernetes.io/...` selectors), and every other `kubernetes.io` / `k8s.io` label but
/// the kubelet's own.
pub(crate) fn forbidden_node_label(label: &str) -> bool {
    let ns = label_namespace(label);
    if ns == "node-restriction.kubernetes.io" {
        return true;
    }
    if KUBELET_LABELS.contains(&label)
        || within(ns, "kubelet.kubernetes.io")
        || within(ns, "node.kubernetes.io")
    {
        return false;
    }
    within(ns, "kubernetes.io") || within(ns, "k8s.io")
}

/// NodeRestriction for a node writing its own Node object (`old` is `None` on create): it may not set, change
/// or remove the labels [`forbidden_node_label`] names, nor change its taints after registration (a node that
/// could would attract any workload; the node lifecycle controller owns those taints). Returns why not.
pub(crate) fn refuse_node_self_write(
    user: &User,
    old: Option<&Value>,
    new: &Value,
) -> Option<String> {
    let node = node_of(user)?;
    let labels = |o: &Value| -> BTreeMap<String, String> {
        o.pointer("/metadata/labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let new_labels = labels(new);
    let old_labels = old.map(labels).unwrap_or_default();
    let changed: BTreeSet<&String> = new_labels
        .iter()
        .filter(|(k, v)| old_labels.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .chain(old_labels.keys().filter(|k| !new_labels.contains_key(*k)))
        .filter(|k| forbidden_node_label(k))
        .collect();
    if !changed.is_empty() {
        let list = changed
            .into_iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        return Some(match old {
            None => format!("node \"{node}\" is not allowed to set the following labels: {list}"),
            Some(_) => format!("node \"{node}\" is not allowed to modify labels: {list}"),
        });
    }
    let taints = |o: &Value| o.pointer("/spec/taints").cloned().unwrap_or(Value::Null);
    let none = |t: &Value| t.is_null() || t.as_array().is_some_and(Vec::is_empty);
    if let Some(old) = old {
        let (was, is) = (taints(old), taints(new));
        if was != is && !(none(&was) && none(&is)) {
            return Some(format!("node \"{node}\" is not allowed to modify taints"));
        }
    }
    None
}

const READ: [&str; 3] = ["get", "list", "watch"];
const WRITE: [&str; 7] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
];

/// The default cluster roles and bindings, as `(kind plural, object)`.
pub(crate) fn bootstrap_objects() -> Vec<(&'static str, Value)> {
    let view_rules = json!([
        {"apiGroups": [""], "resources": ["pods", "pods/log", "pods/status", "services", "services/status",
            "endpoints", "configmaps", "serviceaccounts", "events", "namespaces", "namespaces/status",
            "persistentvolumeclaims", "replicationcontrollers", "limitranges", "resourcequotas"], "verbs": READ},
        {"apiGroups": ["apps"], "resources": ["deployments", "deployments/scale", "deployments/status",
            "replicasets", "replicasets/scale", "replicasets/status", "daemonsets", "statefulsets"], "verbs": READ},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": READ},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": READ},
    ]);
    let edit_rules = json!([
        {"apiGroups": [""], "resources": ["pods", "pods/attach", "pods/exec", "pods/portforward", "pods/proxy",
            "pods/eviction", "services", "endpoints", "configmaps", "secrets", "serviceaccounts",
            "persistentvolumeclaims", "replicationcontrollers", "events"], "verbs": WRITE.iter().chain(["watch"].iter()).collect::<Vec<_>>()},
        {"apiGroups": ["apps"], "resources": ["deployments", "deployments/scale", "replicasets",
            "replicasets/scale", "daemonsets", "statefulsets"], "verbs": WRITE.iter().chain(["watch"].iter()).collect::<Vec<_>>()},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": WRITE.iter().chain(["watch"].iter()).collect::<Vec<_>>()},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": WRITE.iter().chain(["watch"].iter()).collect::<Vec<_>>()},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": READ},
    ]);
    let mut edit_all: Vec<Value> = edit_rules.as_array().cloned().unwrap_or_default();
    edit_all.extend(view_rules.as_array().cloned().unwrap_or_default());
    let mut admin_all = edit_all.clone();
    admin_all.push(
        json!({"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
        "verbs": WRITE.iter().chain(["watch"].iter()).collect::<Vec<_>>()}),
    );
    admin_all.push(json!({"apiGroups": ["authorization.k8s.io"], "resources": ["localsubjectaccessreviews"], "verbs": ["create"]}));
    let role = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
            "rules": rules})
    };
    let binding = |name: &str, role: &str, group: &str| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}]})
    };
    let user_binding = |name: &str, user: &str| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})
    };
    // The in-process controller manager runs every controller under its own identity, so its role is the union
    // of upstream's per-controller roles (garbage collector and namespace controller: read, update and delete
    // anything; the others create in their groups).
    let controller_manager = json!([
        {"apiGroups": ["*"], "resources": ["*"],
            "verbs": ["get", "list", "watch", "patch", "update", "delete", "deletecollection"]},
        {"apiGroups": ["", "apps", "discovery.k8s.io", "coordination.k8s.io", "events.k8s.io", "policy", "batch"],
            "resources": ["*"], "verbs": ["create"]},
    ]);
    // Ref: upstream bootstrap policy `system:kube-scheduler`.
    let scheduler = json!([
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create", "get", "update"]},
        {"apiGroups": [""], "resources": ["endpoints"], "verbs": ["create", "get", "update"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": READ},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete", "get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["bindings", "pods/binding"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch", "update"]},
        {"apiGroups": [""], "resources": ["replicationcontrollers", "services", "namespaces",
            "persistentvolumeclaims", "persistentvolumes", "configmaps"], "verbs": READ},
        {"apiGroups": ["apps"], "resources": ["replicasets", "statefulsets"], "verbs": READ},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": READ},
    ]);
    // Ref: bootstrappolicy `controller_policy.go`: per-controller roles bound to the controllers' service accounts
    // in kube-system (used when kube-controller-manager runs with --use-service-account-credentials).
    let controller_binding = |controller: &str| {
        let name = format!("system:controller:{controller}");
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": controller, "namespace": "kube-system"}]})
    };
    let events_rule = json!({"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
        "verbs": ["create", "update", "patch"]});
    vec![
        (
            "clusterroles",
            role(
                "system:controller:root-ca-cert-publisher",
                json!([
                    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "update"]},
                    events_rule,
                ]),
            ),
        ),
        (
            "clusterrolebindings",
            controller_binding("root-ca-cert-publisher"),
        ),
        (
            "clusterroles",
            role("system:kube-controller-manager", controller_manager),
        ),
        ("clusterroles", role("system:kube-scheduler", scheduler)),
        (
            "clusterrolebindings",
            user_binding(
                "system:kube-controller-manager",
                "system:kube-controller-manager",
            ),
        ),
        (
            "clusterrolebindings",
            user_binding("system:kube-scheduler", "system:kube-scheduler"),
        ),
        (
            "clusterroles",
            role(
                "cluster-admin",
                json!([
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
            ),
        ),
        ("clusterroles", role("admin", Value::Array(admin_all))),
        ("clusterroles", role("edit", Value::Array(edit_all))),
        ("clusterroles", role("view", view_rules)),
        (
            "clusterroles",
            role(
                "system:discovery",
                json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*",
            "/healthz", "/livez", "/readyz", "/openapi", "/openapi/*", "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            "clusterroles",
            role(
                "system:basic-user",
                json!([{"apiGroups": ["authorization.k8s.io"],
            "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]),
            ),
        ),
        // Ref: bootstrappolicy `NodeRules()`; bound to group system:nodes below (upstream leaves that to the Node
        // authorizer), with `node_restriction` keeping each kubelet to its own Node, Lease and pods.
        (
            "clusterroles",
            role(
                "system:node",
                json!([
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews", "localsubjectaccessreviews"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["services"], "verbs": READ},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["create", "get", "list", "watch", "patch", "update"]},
            {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["get", "patch", "update"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch", "update"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete"]},
            {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["get", "patch", "update"]},
            {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": READ},
            {"apiGroups": [""], "resources": ["persistentvolumeclaims", "persistentvolumes", "endpoints"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update", "patch", "delete"]}]),
            ),
        ),
        // Ref: bootstrappolicy `system:kubelet-api-admin`: full use of the kubelet API (bind it to monitoring or
        // operators; the API server's own kubelet client is in system:masters).
        (
            "clusterroles",
            role(
                "system:kubelet-api-admin",
                json!([
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "proxy"]},
            {"apiGroups": [""], "resources": ["nodes/log", "nodes/metrics", "nodes/proxy", "nodes/stats"], "verbs": ["*"]}]),
            ),
        ),
        (
            "clusterrolebindings",
            binding("system:node", "system:node", "system:nodes"),
        ),
        (
            "clusterrolebindings",
            binding("cluster-admin", "cluster-admin", "system:masters"),
        ),
        (
            "clusterrolebindings",
            binding(
                "system:discovery",
                "system:discovery",
                "system:authenticated",
            ),
        ),
        (
            "clusterrolebindings",
            binding(
                "system:basic-user",
                "system:basic-user",
                "system:authenticated",
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_user(name: &str) -> User {
        User {
            name: format!("system:node:{name}"),
            groups: vec!["system:nodes".into()],
        }
    }

    #[test]
    fn a_node_keeps_to_the_kubelet_labels_as_upstream_node_restriction() {
        for allowed in [
            "kubernetes.io/hostname",
            "topology.kubernetes.io/zone",
            "kubelet.kubernetes.io/anything",
            "feature.node.kubernetes.io/cpu",
            "example.com/team",
            "app",
        ] {
            assert!(!forbidden_node_label(allowed), "{allowed}");
        }
        for forbidden in [
            "node-restriction.kubernetes.io/pool",
            "node-role.kubernetes.io/control-plane",
            "kubernetes.io/role",
            "x.k8s.io/y",
        ] {
            assert!(forbidden_node_label(forbidden), "{forbidden}");
        }
        // Suffix matching is by domain, not by string.
        assert!(!forbidden_node_label("notkubernetes.io/x"));
    }

    #[test]
    fn a_node_may_keep_but_not_change_restricted_labels_or_its_taints() {
        let n1 = node_user("n1");
        let old = json!({"metadata": {"labels": {"node-restriction.kubernetes.io/pool": "gpu", "a": "1"}},
            "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]}});
        let mut same = old.clone();
        same["metadata"]["labels"]["a"] = json!("2");
        assert_eq!(refuse_node_self_write(&n1, Some(&old), &same), None);
        let mut dropped = old.clone();
        dropped["metadata"]["labels"] = json!({"a": "1"});
        assert!(refuse_node_self_write(&n1, Some(&old), &dropped)
            .is_some_and(|w| w.contains("modify labels: node-restriction.kubernetes.io/pool")));
        let mut untainted = old.clone();
        untainted["spec"]["taints"] = json!([]);
        assert!(refuse_node_self_write(&n1, Some(&old), &untainted)
            .is_some_and(|w| w.contains("modify taints")));
        // Registering with taints (--register-with-taints) is allowed; other users are not restricted here.
        assert_eq!(
            refuse_node_self_write(&n1, None, &old).map(|w| w.contains("set the following labels")),
            Some(true)
        );
        let plain = json!({"metadata": {"labels": {"kubernetes.io/hostname": "n1"}}, "spec": {"taints": [{"key": "k"}]}});
        assert_eq!(refuse_node_self_write(&n1, None, &plain), None);
        let admin = User {
            name: "admin".into(),
            groups: vec!["system:masters".into()],
        };
        assert_eq!(refuse_node_self_write(&admin, Some(&old), &dropped), None);
    }

    fn attrs(
        verb: &str,
        group: &str,
        resource: &str,
        sub: Option<&str>,
        name: Option<&str>,
    ) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.map(String::from),
            namespace: Some("default".into()),
            name: name.map(String::from),
            path: None,
        }
    }

    fn policy(v: Value) -> PolicyRule {
        serde_json::from_value(v).expect("a PolicyRule")
    }

    #[test]
    fn rules_match_verbs_groups_resources_and_names() {
        let rule = policy(
            json!({"apiGroups": ["apps"], "resources": ["deployments", "deployments/scale"],
            "verbs": ["get", "patch"], "resourceNames": ["web"]}),
        );
        assert!(rule_allows(
            &rule,
            &attrs("get", "apps", "deployments", None, Some("web"))
        ));
        assert!(rule_allows(
            &rule,
            &attrs("patch", "apps", "deployments", Some("scale"), Some("web"))
        ));
        assert!(!rule_allows(
            &rule,
            &attrs("get", "apps", "deployments", None, Some("db"))
        ));
        assert!(!rule_allows(
            &rule,
            &attrs("delete", "apps", "deployments", None, Some("web"))
        ));
        assert!(!rule_allows(
            &rule,
            &attrs("get", "", "deployments", None, Some("web"))
        ));
        assert!(!rule_allows(
            &rule,
            &attrs("get", "apps", "deployments", Some("status"), Some("web"))
        ));
        let star = policy(json!({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}));
        assert!(rule_allows(
            &star,
            &attrs("delete", "x", "y", Some("z"), None)
        ));
        let urls = policy(json!({"nonResourceURLs": ["/apis/*", "/version"], "verbs": ["get"]}));
        let mut a = attrs("get", "", "", None, None);
        a.path = Some("/apis/apps/v1".into());
        assert!(rule_allows(&urls, &a));
        a.path = Some("/metrics".into());
        assert!(!rule_allows(&urls, &a));
    }
}
