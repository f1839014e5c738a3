//! Objects every cluster starts with (as kube-apiserver's bootstrap controllers create them): the `default`,
//! `kube-system`, `kube-public` and `kube-node-lease` namespaces, the `kubernetes` service in `default` with
//! Endpoints and an EndpointSlice naming this server, and the default RBAC roles and bindings. Also the `kube-dns` Service in `kube-system` at the cluster DNS address (the
//! 10th address of the service range, 10.96.0.10 by default, as kubeadm computes it), which kubeadm creates with
//! its CoreDNS add-on: in Windlass cluster DNS is served by `windlass-proxy` on every node, on that address, so
//! the Service has no selector and no endpoints — it names the address for `kubectl get svc -n kube-system` and for
//! clients that look it up.

use serde_json::json;

use super::handlers::{create_object, update_object, Fields, Mode};
use super::objects::FieldValidation;
use super::resources;
use super::State;
use crate::store::StoreError;

/// The field manager of what the server creates itself (upstream's bootstrap controllers write as the
/// apiserver's user agent, `kube-apiserver`).
const BOOTSTRAP_MANAGER: &str = "windlass-control";

pub(crate) async fn run(state: &State) -> Result<(), StoreError> {
    let ns_kind = resources::find("", "v1", "namespaces")
        .ok_or(StoreError::Backend("no namespaces kind".into()))?;
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        ensure(state, ns_kind, None, obj).await?;
    }
    let svc = resources::find("", "v1", "services")
        .ok_or(StoreError::Backend("no services kind".into()))?;
    let (net, _) = state.config.service_cidr;
    let first = std::net::Ipv4Addr::from(u32::from(net) + 1);
    let obj = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"type": "ClusterIP", "clusterIP": first.to_string(), "sessionAffinity": "None",
                 "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": state.config.listen.port()}]},
    });
    ensure(state, svc, Some("default"), obj).await?;
    api_endpoints(state).await?;
    let dns_ip = std::net::Ipv4Addr::from(u32::from(net) + 10);
    let dns = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "labels": {
            "k8s-app": "kube-dns", "kubernetes.io/cluster-service": "true", "kubernetes.io/name": "KubeDNS"}},
        "spec": {"type": "ClusterIP", "clusterIP": dns_ip.to_string(), "sessionAffinity": "None",
                 "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                           {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]},
    });
    // A user Service may already hold the address (a cluster created before this default existed): the server
    // still starts, without the default.
    if let Err(e) = ensure(state, svc, Some("kube-system"), dns).await {
        tracing::warn!(error = %e, address = %dns_ip, "no kube-dns Service");
    }
    for (plural, obj) in super::rbac::bootstrap_objects() {
        let kind = resources::find("rbac.authorization.k8s.io", "v1", plural)
            .ok_or(StoreError::Backend(format!("no {plural} kind")))?;
        ensure(state, kind, None, obj).await?;
    }
    Ok(())
}

/// The address pods reach this server at: the bind address, or when bound to all addresses the host's first
/// non-loopback IPv4 address (upstream's `--advertise-address` default picks the default-route interface).
fn advertise_address(state: &State) -> std::net::Ipv4Addr {
    match state.config.listen.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() => ip,
        _ => if_addrs::get_if_addrs()
            .ok()
            .into_iter()
            .flatten()
            .filter(|a| !a.is_loopback())
            .find_map(|a| match a.ip() {
                std::net::IpAddr::V4(ip) => Some(ip),
                std::net::IpAddr::V6(_) => None,
            })
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST),
    }
}

/// Points the `kubernetes` Service at this API server, as kube-apiserver's endpoint reconciler does: Endpoints
/// (`endpointslice.kubernetes.io/skip-mirror`) and an EndpointSlice of the same name. Rewritten at every start
/// (the last server started wins; upstream's lease reconciler that lists every live server is not done).
async fn api_endpoints(state: &State) -> Result<(), StoreError> {
    let ip = advertise_address(state).to_string();
    let port = state.config.listen.port();
    let endpoints = json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "kubernetes", "namespace": "default",
            "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": [{"addresses": [{"ip": ip}], "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}],
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    });
    for (group, plural, obj, fields) in [
        ("", "endpoints", endpoints, &["subsets"][..]),
        (
            "discovery.k8s.io",
            "endpointslices",
            slice,
            &["endpoints", "ports"][..],
        ),
    ] {
        let kind = resources::find(group, "v1", plural)
            .ok_or(StoreError::Backend(format!("no {plural} kind")))?;
        if state
            .store
            .get(&kind.key(Some("default"), "kubernetes"))
            .await?
            .0
            .is_none()
        {
            ensure(state, kind, Some("default"), obj).await?;
            continue;
        }
        let result = update_object(
            state,
            kind,
            Some("default"),
            "kubernetes",
            Mode::System,
            FieldValidation::Strict,
            false,
            |cur| {
                let mut new = cur.clone();
                for f in fields {
                    new[*f] = obj[*f].clone();
                }
                Ok(new)
            },
        )
        .await;
        if let Err(e) = result {
            return Err(StoreError::Backend(format!(
                "cannot update {} kubernetes: {}",
                kind.kind, e.message
            )));
        }
    }
    Ok(())
}

async fn ensure(
    state: &State,
    kind: &'static resources::ResourceKind,
    ns: Option<&str>,
    obj: serde_json::Value,
) -> Result<(), StoreError> {
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if state.store.get(&kind.key(ns, &name)).await?.0.is_some() {
        return Ok(());
    }
    let fields = Fields::Update {
        manager: BOOTSTRAP_MANAGER,
        subresource: None,
    };
    match create_object(state, kind, ns, obj, FieldValidation::Strict, fields, false).await {
        Ok(_) => {
            tracing::info!(kind = kind.kind, %name, "bootstrapped");
            Ok(())
        }
        Err(e) if e.code == 409 => Ok(()),
        Err(e) => Err(StoreError::Backend(format!(
            "cannot create {} {name}: {}",
            kind.kind, e.message
        ))),
    }
}
