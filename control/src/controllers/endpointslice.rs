//! EndpointSlice controller: for every Service with a selector, `discovery.k8s.io/v1` EndpointSlices of its pods
//! with `ready`/`serving`/`terminating` conditions (terminating pods stay listed, as upstream does since 1.22, so
//! proxies can drain them). Pods are grouped by their resolved port set, one slice per group; a Service without
//! pods gets one empty slice. Ref: kube-controller-manager `endpointslice-controller`.
//!
//! Slices carry `kubernetes.io/service-name`, `endpointslice.kubernetes.io/managed-by:
//! endpointslice-controller.k8s.io` and a controller ownerReference to the Service; only slices with that
//! managed-by label are ever changed or deleted.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use super::endpoints::{backends, has_ports, labels, Backend, PortSet, RESYNC, RETRY};
use super::watch::{self, Tasks};
use super::{Context, ControllerError, ControllerFuture};

const NAME: &str = "endpointslice";
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub(crate) const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub(crate) const MANAGER: &str = "endpointslice-controller.k8s.io";

pub(crate) fn start(ctx: Context) -> ControllerFuture {
    Box::pin(run(ctx))
}

fn slice_name(svc: &str, ports: &PortSet) -> String {
    let mut h = Sha256::new();
    for (n, p, proto) in ports {
        h.update(format!("{n}/{p}/{proto};"));
    }
    let d = h.finalize();
    format!("{svc}-{:02x}{:02x}{:01x}", d[0], d[1], d[2] >> 4)
}

fn endpoint(svc: &Service, b: &Backend) -> Endpoint {
    let publish = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    Endpoint {
        addresses: vec![b.ip.clone()],
        conditions: Some(EndpointConditions {
            ready: Some(publish || (b.ready && !b.terminating)),
            serving: Some(publish || b.ready),
            terminating: Some(b.terminating),
        }),
        node_name: b.node.clone(),
        target_ref: Some(b.target.clone()),
        ..Default::default()
    }
}

/// The slices a Service should have, by name.
pub(crate) fn desired(svc: &Service, pods: &[Arc<Pod>]) -> Option<BTreeMap<String, EndpointSlice>> {
    let bs = backends(svc, pods)?;
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let mut groups: BTreeMap<PortSet, Vec<Endpoint>> = BTreeMap::new();
    for b in bs.iter().filter(|b| has_ports(svc, b)) {
        let mut ports = b.ports.clone();
        ports.sort();
        groups.entry(ports).or_default().push(endpoint(svc, b));
    }
    if groups.is_empty() {
        groups.insert(Vec::new(), Vec::new());
    }
    let mut l = labels(svc);
    l.insert(SERVICE_NAME_LABEL.into(), name.clone());
    l.insert(MANAGED_BY_LABEL.into(), MANAGER.into());
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: name.clone(),
        uid: svc.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    Some(
        groups
            .into_iter()
            .map(|(ports, endpoints)| {
                let slice_name = slice_name(&name, &ports);
                let slice = EndpointSlice {
                    metadata: ObjectMeta {
                        name: Some(slice_name.clone()),
                        namespace: Some(ns.clone()),
                        labels: Some(l.clone()),
                        owner_references: Some(vec![owner.clone()]),
                        ..Default::default()
                    },
                    address_type: "IPv4".into(),
                    endpoints: Some(endpoints),
                    ports: (!ports.is_empty()).then(|| {
                        ports
                            .into_iter()
                            .map(|(n, port, protocol)| EndpointPort {
                                name: Some(n),
                                port: Some(port),
                                protocol: Some(protocol),
                                app_protocol: None,
                            })
                            .collect()
                    }),
                };
                (slice_name, slice)
            })
            .collect(),
    )
}

/// Whether the stored slice already says what `want` says (ignoring reference fields the server may fill in).
fn same(have: &EndpointSlice, want: &EndpointSlice) -> bool {
    let mut eps = have.endpoints.clone().unwrap_or_default();
    for e in &mut eps {
        if let Some(t) = e.target_ref.as_mut() {
            t.api_version = None;
            t.resource_version = None;
            t.field_path = None;
        }
    }
    have.metadata.labels == want.metadata.labels
        && Some(eps) == want.endpoints
        && have.ports.clone().filter(|p| !p.is_empty()) == want.ports
        && have.address_type == want.address_type
}

async fn run(ctx: Context) -> Result<(), ControllerError> {
    let wake = Arc::new(Notify::new());
    let (services, t1) = watch::cache(Api::<Service>::all(ctx.client.clone()), wake.clone());
    let (pods, t2) = watch::cache(Api::<Pod>::all(ctx.client.clone()), wake.clone());
    let (slices, t3) = watch::cache(Api::<EndpointSlice>::all(ctx.client.clone()), wake.clone());
    let _tasks = Tasks(vec![t1, t2, t3]);
    watch::ready(NAME, &services).await?;
    watch::ready(NAME, &pods).await?;
    watch::ready(NAME, &slices).await?;
    loop {
        let pods_now = pods.state();
        let current: BTreeMap<(String, String), Arc<EndpointSlice>> = slices
            .state()
            .into_iter()
            .filter(|s| s.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGER))
            .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), s))
            .collect();
        let mut wanted: HashSet<(String, String)> = HashSet::new();
        let mut ok = true;
        for svc in services.state() {
            let Some(want) = desired(&svc, &pods_now) else {
                continue;
            };
            let ns = svc.namespace().unwrap_or_default();
            let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
            for (name, slice) in want {
                wanted.insert((ns.clone(), name.clone()));
                let result = match current.get(&(ns.clone(), name.clone())) {
                    Some(have) if same(have, &slice) => continue,
                    Some(have) => {
                        let mut new = slice.clone();
                        new.metadata.resource_version = have.resource_version();
                        api.replace(&name, &PostParams::default(), &new)
                            .await
                            .map(|_| ())
                    }
                    None => api.create(&PostParams::default(), &slice).await.map(|_| ()),
                };
                if let Err(e) = result {
                    ok = false;
                    tracing::debug!(slice = %format!("{ns}/{name}"), error = %e, "cannot write endpointslice; retrying");
                }
            }
        }
        for (ns, name) in current.keys() {
            if !wanted.contains(&(ns.clone(), name.clone())) {
                let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), ns);
                if let Err(e) = api.delete(name, &DeleteParams::default()).await {
                    if !watch::is_status(&e, 404) {
                        ok = false;
                    }
                }
            }
        }
        let _ = tokio::time::timeout(if ok { RESYNC } else { RETRY }, wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, terminating: bool, port: i32) -> Arc<Pod> {
        let mut p = json!({"metadata": {"name": name, "namespace": "ns", "uid": name, "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": port}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}});
        if terminating {
            p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        Arc::new(serde_json::from_value(p).expect("pod"))
    }

    fn svc() -> Service {
        serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "ns", "uid": "svc-uid"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}))
        .expect("svc")
    }

    #[test]
    fn conditions_follow_readiness_and_termination_and_ports_group_slices() {
        let pods = [
            pod("a", "10.0.0.1", true, false, 8080),
            pod("b", "10.0.0.2", false, false, 8080),
            pod("c", "10.0.0.3", true, true, 8080),
            pod("d", "10.0.0.4", true, false, 9090),
        ];
        let slices = desired(&svc(), &pods).expect("selector");
        assert_eq!(slices.len(), 2, "two port sets, two slices");
        let by_port: BTreeMap<i32, &EndpointSlice> = slices
            .values()
            .map(|s| (s.ports.as_ref().and_then(|p| p[0].port).unwrap_or(0), s))
            .collect();
        let s8080 = serde_json::to_value(by_port[&8080]).expect("json");
        let conds: Vec<_> = s8080["endpoints"]
            .as_array()
            .expect("eps")
            .iter()
            .map(|e| e["conditions"].clone())
            .collect();
        assert_eq!(
            conds,
            [
                json!({"ready": true, "serving": true, "terminating": false}),
                json!({"ready": false, "serving": false, "terminating": false}),
                json!({"ready": false, "serving": true, "terminating": true}),
            ]
        );
        assert_eq!(s8080["metadata"]["labels"][SERVICE_NAME_LABEL], "web");
        assert_eq!(s8080["metadata"]["labels"][MANAGED_BY_LABEL], MANAGER);
        assert_eq!(s8080["metadata"]["ownerReferences"][0]["uid"], "svc-uid");
    }

    #[test]
    fn a_service_without_pods_gets_one_empty_slice() {
        let slices = desired(&svc(), &[]).expect("selector");
        assert_eq!(slices.len(), 1);
        assert!(slices
            .values()
            .all(|s| s.endpoints.as_ref().is_some_and(Vec::is_empty)));
    }
}
