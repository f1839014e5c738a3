//! What a kubelet may do with service-account tokens: request one (`create serviceaccounts/token`) only for a
//! service account that a pod bound to its node runs as, and only bound to such a pod.
//!
//! Ref: upstream's Node authorizer (`plugin/pkg/auth/authorizer/node`: a node may create tokens only for service
//! accounts on its graph, i.e. used by its pods) and NodeRestriction admission (`admitServiceAccount`: the request
//! must carry a `v1` Pod `boundObjectRef` with a UID, naming a pod scheduled on that node).

use serde_json::Value;

use super::handlers::object_of;
use super::rbac::Attributes;
use super::{resources, State};
use crate::store::{ListOptions, StoreError};

fn spec_str<'a>(pod: &'a Value, field: &str) -> &'a str {
    pod.get("spec")
        .and_then(|s| s.get(field))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Why kubelet `node` may not make this TokenRequest (`a` is `create serviceaccounts/token`), or `None`.
pub(crate) async fn refuse_token_request(
    state: &State,
    node: &str,
    user: &str,
    a: &Attributes,
    body: &[u8],
) -> Result<Option<String>, StoreError> {
    let (Some(ns), Some(sa)) = (a.namespace.as_deref(), a.name.as_deref()) else {
        return Ok(Some(format!(
            "node \"{node}\" is not allowed to request tokens across the cluster"
        )));
    };
    let forbidden = |why: &str| Some(format!("serviceaccounts \"{sa}\" is forbidden: {why}"));
    let Some(pods) = resources::find("", "v1", "pods") else {
        return Ok(None);
    };
    let request: Option<Value> = serde_json::from_slice(body)
        .ok()
        .or_else(|| super::protobuf::decode_token_request(body).ok());
    let field = |r: &Value, f: &str| {
        r.get(f)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let bound = request
        .as_ref()
        .and_then(|r| r.pointer("/spec/boundObjectRef"))
        .filter(|r| !r.is_null())
        .filter(|r| {
            field(r, "apiVersion") == "v1"
                && field(r, "kind") == "Pod"
                && !field(r, "name").is_empty()
        });
    let bound_pod = match bound {
        Some(b) => state
            .store
            .get(&pods.key(Some(ns), &field(b, "name")))
            .await?
            .0
            .and_then(|kv| object_of(&kv).ok()),
        None => None,
    };
    // The usual kubelet request (bound to one of its pods that runs as this service account) needs no list: that
    // pod is the relationship the Node authorizer looks for.
    let bound_here = bound_pod.as_ref().is_some_and(|p| {
        spec_str(p, "nodeName") == node && spec_str(p, "serviceAccountName") == sa
    });
    // Node authorizer: the service account must be used by a pod on this node.
    let related = bound_here
        || state
            .store
            .list(&pods.prefix(Some(ns)), &ListOptions::default())
            .await?
            .items
            .iter()
            .filter_map(|kv| object_of(kv).ok())
            .any(|p| spec_str(&p, "nodeName") == node && spec_str(&p, "serviceAccountName") == sa);
    if !related {
        return Ok(forbidden(&format!(
            "User \"{user}\" cannot create resource \"serviceaccounts/token\" in API group \"\" in the \
             namespace \"{ns}\": no relationship found between node '{node}' and this object"
        )));
    }
    // NodeRestriction: the token must be bound to one of this node's pods.
    let Some(bound) = bound else {
        return Ok(forbidden("node requested token not bound to a pod"));
    };
    let uid = field(bound, "uid");
    if uid.is_empty() {
        return Ok(forbidden(
            "node requested token with a pod binding without a uid",
        ));
    }
    // Missing: the token handler answers 404 for the pod.
    let Some(pod) = bound_pod else {
        return Ok(None);
    };
    let pod_uid = pod
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if pod_uid != uid {
        return Ok(forbidden(&format!(
            "the UID in the bound object reference ({uid}) does not match the UID in record. The object \
             might have been deleted and then recreated"
        )));
    }
    if spec_str(&pod, "nodeName") != node {
        return Ok(forbidden(
            "node requested token bound to a pod scheduled on a different node",
        ));
    }
    Ok(None)
}
