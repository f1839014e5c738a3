//! Discovery: legacy (`APIVersions`, `APIGroupList`, `APIGroup`, `APIResourceList`) and aggregated
//! (`apidiscovery.k8s.io` `v2` and `v2beta1`, chosen by the Accept header), all generated from the kind table.
//!
//! The Content-Type of an aggregated reply must name the version the client asked for: kubectl 1.27–1.29 only
//! understand v2beta1 and silently find no resources in a v2 reply.

use http::{header, HeaderValue, Response};
use serde_json::{json, Value};

use super::resources::{self, ResourceKind, KINDS};
use super::status::ApiError;
use super::{json_response, Body, Ctx};

/// The Kubernetes version this server reports (the API surface it follows).
pub(crate) const GIT_VERSION: &str = "v1.33.0-windlass";

pub(crate) fn version() -> Response<Body> {
    json_response(
        200,
        &json!({
            "major": "1",
            "minor": "33",
            "gitVersion": GIT_VERSION,
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "n/a (rust)",
            "compiler": "rustc",
            "platform": format!("linux/{}", if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" }),
        }),
    )
}

/// Which aggregated discovery version the client prefers, if any (first acceptable media range wins).
fn aggregated_version(accept: &str) -> Option<&'static str> {
    for range in accept.split(',') {
        let params: Vec<&str> = range.split(';').map(str::trim).collect();
        let media = params.first().copied().unwrap_or_default();
        if media != "application/json" && media != "*/*" {
            continue;
        }
        let has = |p: &str| params.contains(&p);
        if has("as=APIGroupDiscoveryList") && has("g=apidiscovery.k8s.io") {
            if has("v=v2") {
                return Some("v2");
            }
            if has("v=v2beta1") {
                return Some("v2beta1");
            }
            continue;
        }
        // Plain JSON (or anything else) first: legacy discovery.
        return None;
    }
    None
}

fn aggregated_response(version: &str, items: Vec<Value>) -> Response<Body> {
    let mut r = json_response(
        200,
        &json!({
            "kind": "APIGroupDiscoveryList",
            "apiVersion": format!("apidiscovery.k8s.io/{version}"),
            "metadata": {},
            "items": items,
        }),
    );
    let ct = format!("application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList");
    if let Ok(v) = HeaderValue::from_str(&ct) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn discovery_resource(k: &ResourceKind) -> Value {
    let mut r = json!({
        "resource": k.plural,
        "responseKind": {"group": k.group, "version": k.version, "kind": k.kind},
        "scope": if k.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": k.singular,
        "verbs": k.verbs,
    });
    if !k.short_names.is_empty() {
        r["shortNames"] = json!(k.short_names);
    }
    if !k.categories.is_empty() {
        r["categories"] = json!(k.categories);
    }
    if !k.subresources.is_empty() {
        r["subresources"] = json!(k
            .subresources
            .iter()
            .map(|s| json!({
                "subresource": s.name,
                "responseKind": {"group": s.group, "version": s.version, "kind": s.kind},
                "verbs": s.verbs,
            }))
            .collect::<Vec<_>>());
    }
    r
}

fn aggregated_group(group: &str) -> Value {
    let versions: Vec<Value> = resources::group_versions()
        .into_iter()
        .filter(|(g, _)| *g == group)
        .map(|(g, v)| {
            json!({
                "version": v,
                "freshness": "Current",
                "resources": KINDS.iter().filter(|k| k.group == g && k.version == v)
                    .map(discovery_resource).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"metadata": {"name": group, "creationTimestamp": null}, "versions": versions})
}

fn named_groups() -> Vec<&'static str> {
    let mut groups: Vec<&str> = Vec::new();
    for (g, _) in resources::group_versions() {
        if !g.is_empty() && !groups.contains(&g) {
            groups.push(g);
        }
    }
    groups
}

pub(crate) fn core_api(ctx: &Ctx) -> Response<Body> {
    if let Some(v) = aggregated_version(&ctx.accept) {
        return aggregated_response(v, vec![aggregated_group("")]);
    }
    json_response(
        200,
        &json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        }),
    )
}

fn api_group(g: &str) -> Value {
    let versions: Vec<Value> = resources::group_versions()
        .into_iter()
        .filter(|(gg, _)| *gg == g)
        .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    let preferred = versions.first().cloned().unwrap_or(json!({}));
    json!({"name": g, "versions": versions, "preferredVersion": preferred})
}

pub(crate) fn apis(ctx: &Ctx) -> Response<Body> {
    if let Some(v) = aggregated_version(&ctx.accept) {
        return aggregated_response(
            v,
            named_groups().into_iter().map(aggregated_group).collect(),
        );
    }
    json_response(
        200,
        &json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": named_groups().into_iter().map(api_group).collect::<Vec<_>>(),
        }),
    )
}

pub(crate) fn group(g: &str) -> Result<Response<Body>, ApiError> {
    if !named_groups().contains(&g) {
        return Err(ApiError::path_not_found(&format!("/apis/{g}")));
    }
    let mut v = api_group(g);
    v["kind"] = json!("APIGroup");
    v["apiVersion"] = json!("v1");
    Ok(json_response(200, &v))
}

/// `APIResourceList` for a group/version, with subresources as their own entries (`pods/status`).
pub(crate) fn resource_list(group: &str, version: &str) -> Option<Response<Body>> {
    let kinds: Vec<&ResourceKind> = KINDS
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .collect();
    if kinds.is_empty() {
        return None;
    }
    let mut list = Vec::new();
    for k in kinds {
        let mut r = json!({
            "name": k.plural,
            "singularName": k.singular,
            "namespaced": k.namespaced,
            "kind": k.kind,
            "verbs": k.verbs,
        });
        if !k.short_names.is_empty() {
            r["shortNames"] = json!(k.short_names);
        }
        if !k.categories.is_empty() {
            r["categories"] = json!(k.categories);
        }
        list.push(r);
        for s in k.subresources {
            let mut sr = json!({
                "name": format!("{}/{}", k.plural, s.name),
                "singularName": "",
                "namespaced": k.namespaced,
                "kind": s.kind,
                "verbs": s.verbs,
            });
            if s.group != k.group || s.version != k.version {
                sr["group"] = json!(s.group);
                sr["version"] = json!(s.version);
            }
            list.push(sr);
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json_response(
        200,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
    ))
}

#[cfg(test)]
mod tests {
    use super::aggregated_version;

    #[test]
    fn accept_header_picks_the_discovery_version() {
        let v2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(v2), Some("v2"));
        let old = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(old), Some("v2beta1"));
        assert_eq!(aggregated_version("application/json, */*"), None);
        assert_eq!(aggregated_version(""), None);
    }
}
