//! Endpoints controller: for every Service with a selector, an Endpoints object (same name) listing the
//! addresses of the selected pods, ready ones in `addresses`, not-ready ones in `notReadyAddresses`, with each
//! service port resolved against the pod (numeric or named `targetPort`). Terminating pods are left out, as
//! upstream does unless `publishNotReadyAddresses`. Ref: kube-controller-manager `endpoints-controller`.
//!
//! The pod selection and port resolution here are shared with the EndpointSlice controller.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
    ServicePort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use tokio::sync::Notify;

use super::watch::{self, Tasks};
use super::{Context, ControllerError, ControllerFuture};

const NAME: &str = "endpoints";
/// Label upstream (1.33) puts on the Endpoints the controller manages, so it only ever deletes its own.
pub(crate) const MANAGED_BY: &str = "endpoints.kubernetes.io/managed-by";
const MANAGER: &str = "endpoint-controller";
pub(crate) const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
pub(crate) const RESYNC: Duration = Duration::from_secs(30);
pub(crate) const RETRY: Duration = Duration::from_secs(1);

pub(crate) fn start(ctx: Context) -> ControllerFuture {
    Box::pin(run(ctx))
}

/// A pod's resolved ports: (name, port, protocol), sorted.
pub(crate) type PortSet = Vec<(String, i32, String)>;

/// A selected pod as both controllers see it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Backend {
    pub ip: String,
    pub node: Option<String>,
    pub target: ObjectReference,
    pub ready: bool,
    pub terminating: bool,
    /// Resolved ports, one per service port that resolved on this pod: (name, port, protocol).
    pub ports: Vec<(String, i32, String)>,
}

fn is_headless(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

/// Upstream `podutil.FindPort`: a numeric targetPort is used as is; a named one is looked up among the pod's
/// container ports with the same protocol; no targetPort means the service port.
pub(crate) fn resolve_port(pod: &Pod, sp: &ServicePort) -> Option<i32> {
    let protocol = sp.protocol.as_deref().unwrap_or("TCP");
    match &sp.target_port {
        None => Some(sp.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            if let Ok(n) = name.parse::<i32>() {
                return Some(n);
            }
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find_map(|p| {
                    (p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol)
                        .then_some(p.container_port)
                })
        }
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// The pods a Service selects, with addresses and resolved ports, sorted by IP. `None` for a Service without a
/// selector (its endpoints are managed by hand).
pub(crate) fn backends(svc: &Service, pods: &[Arc<Pod>]) -> Option<Vec<Backend>> {
    let spec = svc.spec.as_ref()?;
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    let mut out: Vec<Backend> = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
        .filter(|p| {
            let labels = p.metadata.labels.as_ref();
            selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .filter_map(|p| {
            let ip = p
                .status
                .as_ref()?
                .pod_ip
                .clone()
                .filter(|ip| !ip.is_empty())?;
            let ports = spec
                .ports
                .iter()
                .flatten()
                .filter_map(|sp| {
                    let port = resolve_port(p, sp)?;
                    Some((
                        sp.name.clone().unwrap_or_default(),
                        port,
                        sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    ))
                })
                .collect();
            Some(Backend {
                ip,
                node: p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .filter(|n| !n.is_empty()),
                target: ObjectReference {
                    kind: Some("Pod".into()),
                    namespace: p.metadata.namespace.clone(),
                    name: p.metadata.name.clone(),
                    uid: p.metadata.uid.clone(),
                    ..Default::default()
                },
                ready: pod_ready(p),
                terminating: p.metadata.deletion_timestamp.is_some(),
                ports,
            })
        })
        .collect();
    out.sort_by(|a, b| a.ip.cmp(&b.ip));
    Some(out)
}

/// Whether a pod with these ports belongs in the service's endpoints: it must resolve at least one port, except
/// for a headless service without ports (upstream publishes bare addresses then).
pub(crate) fn has_ports(svc: &Service, b: &Backend) -> bool {
    !b.ports.is_empty()
        || (is_headless(svc)
            && svc
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .is_none_or(|p| p.is_empty()))
}

/// The desired `subsets`: pods grouped by their resolved port set (upstream repacks the same way).
pub(crate) fn subsets(svc: &Service, backends: &[Backend]) -> Vec<EndpointSubset> {
    let publish_not_ready = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut groups: BTreeMap<PortSet, (Vec<EndpointAddress>, Vec<EndpointAddress>)> =
        BTreeMap::new();
    for b in backends.iter().filter(|b| has_ports(svc, b)) {
        if b.terminating && !publish_not_ready {
            continue;
        }
        let addr = EndpointAddress {
            ip: b.ip.clone(),
            node_name: b.node.clone(),
            target_ref: Some(b.target.clone()),
            hostname: None,
        };
        let mut ports = b.ports.clone();
        ports.sort();
        let entry = groups.entry(ports).or_default();
        if b.ready || publish_not_ready {
            entry.0.push(addr);
        } else {
            entry.1.push(addr);
        }
    }
    groups
        .into_iter()
        .map(|(ports, (ready, not_ready))| EndpointSubset {
            addresses: (!ready.is_empty()).then_some(ready),
            not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
            ports: (!ports.is_empty()).then(|| {
                ports
                    .into_iter()
                    .map(|(name, port, protocol)| EndpointPort {
                        name: (!name.is_empty()).then_some(name),
                        port,
                        protocol: Some(protocol),
                        app_protocol: None,
                    })
                    .collect()
            }),
        })
        .collect()
}

/// Labels of a managed object: the service's own, plus the headless marker.
pub(crate) fn labels(svc: &Service) -> BTreeMap<String, String> {
    let mut l = svc.metadata.labels.clone().unwrap_or_default();
    if is_headless(svc) {
        l.insert(HEADLESS_LABEL.into(), String::new());
    }
    l
}

/// The subsets as written back by the server, reduced to the fields this controller sets, so that a server
/// that fills in extra reference fields does not make us rewrite the object forever.
pub(crate) fn normalize(subsets: Option<Vec<EndpointSubset>>) -> Option<Vec<EndpointSubset>> {
    let strip = |a: &mut EndpointAddress| {
        if let Some(t) = a.target_ref.as_mut() {
            t.api_version = None;
            t.resource_version = None;
            t.field_path = None;
        }
    };
    let mut subsets = subsets.filter(|s| !s.is_empty())?;
    for s in &mut subsets {
        s.addresses.iter_mut().flatten().for_each(strip);
        s.not_ready_addresses.iter_mut().flatten().for_each(strip);
        s.addresses = s.addresses.take().filter(|a| !a.is_empty());
        s.not_ready_addresses = s.not_ready_addresses.take().filter(|a| !a.is_empty());
        s.ports = s.ports.take().filter(|p| !p.is_empty());
    }
    Some(subsets)
}

async fn run(ctx: Context) -> Result<(), ControllerError> {
    let wake = Arc::new(Notify::new());
    let (services, t1) = watch::cache(Api::<Service>::all(ctx.client.clone()), wake.clone());
    let (pods, t2) = watch::cache(Api::<Pod>::all(ctx.client.clone()), wake.clone());
    let (endpoints, t3) = watch::cache(Api::<Endpoints>::all(ctx.client.clone()), wake.clone());
    let _tasks = Tasks(vec![t1, t2, t3]);
    watch::ready(NAME, &services).await?;
    watch::ready(NAME, &pods).await?;
    watch::ready(NAME, &endpoints).await?;
    loop {
        let pods_now = pods.state();
        let current: BTreeMap<(String, String), Arc<Endpoints>> = endpoints
            .state()
            .into_iter()
            .map(|e| ((e.namespace().unwrap_or_default(), e.name_any()), e))
            .collect();
        let mut ok = true;
        let mut wanted: HashSet<(String, String)> = HashSet::new();
        for svc in services.state() {
            let Some(bs) = backends(&svc, &pods_now) else {
                continue;
            };
            let ns = svc.namespace().unwrap_or_default();
            let name = svc.name_any();
            wanted.insert((ns.clone(), name.clone()));
            let subsets = subsets(&svc, &bs);
            let mut labels = labels(&svc);
            labels.insert(MANAGED_BY.into(), MANAGER.into());
            let desired = Endpoints {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(labels),
                    ..Default::default()
                },
                subsets: (!subsets.is_empty()).then_some(subsets),
            };
            let api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &ns);
            let result = match current.get(&(ns.clone(), name.clone())) {
                Some(cur) => {
                    if cur.metadata.labels == desired.metadata.labels
                        && normalize(cur.subsets.clone()) == desired.subsets
                    {
                        continue;
                    }
                    let mut new = desired.clone();
                    new.metadata.resource_version = cur.resource_version();
                    api.replace(&name, &PostParams::default(), &new)
                        .await
                        .map(|_| ())
                }
                None => api
                    .create(&PostParams::default(), &desired)
                    .await
                    .map(|_| ()),
            };
            match result {
                Ok(()) => tracing::debug!(service = %format!("{ns}/{name}"), "endpoints updated"),
                Err(e) => {
                    ok = false;
                    tracing::debug!(service = %format!("{ns}/{name}"), error = %e, "cannot write endpoints; retrying");
                }
            }
        }
        // Endpoints we manage whose Service is gone (or lost its selector).
        for ((ns, name), ep) in &current {
            let ours = ep.labels().get(MANAGED_BY).map(String::as_str) == Some(MANAGER);
            if ours && !wanted.contains(&(ns.clone(), name.clone())) {
                let api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), ns);
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
    use serde_json::{json, Value};

    use super::*;

    fn svc(spec: Value) -> Service {
        serde_json::from_value(
            json!({"metadata": {"name": "web", "namespace": "ns"}, "spec": spec}),
        )
        .expect("svc")
    }

    fn pod(name: &str, ip: &str, ready: bool, terminating: bool) -> Arc<Pod> {
        let mut p = json!({"metadata": {"name": name, "namespace": "ns", "uid": name, "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}});
        if terminating {
            p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        Arc::new(serde_json::from_value(p).expect("pod"))
    }

    #[test]
    fn ready_pods_are_addresses_not_ready_ones_are_not_and_terminating_ones_are_left_out() {
        let s = svc(json!({"selector": {"app": "web"}, "ports": [
            {"name": "http", "port": 80, "targetPort": "http"}, {"name": "metrics", "port": 9090, "targetPort": 9100}]}));
        let pods = [
            pod("a", "10.0.0.2", true, false),
            pod("b", "10.0.0.1", false, false),
            pod("c", "10.0.0.3", true, true),
        ];
        let bs = backends(&s, &pods).expect("selector");
        assert_eq!(
            bs.iter().map(|b| b.ip.as_str()).collect::<Vec<_>>(),
            ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        );
        let subsets = subsets(&s, &bs);
        assert_eq!(subsets.len(), 1);
        let got = serde_json::to_value(&subsets[0]).expect("json");
        assert_eq!(got["addresses"][0]["ip"], "10.0.0.2");
        assert_eq!(got["addresses"].as_array().map(Vec::len), Some(1));
        assert_eq!(got["notReadyAddresses"][0]["ip"], "10.0.0.1");
        assert_eq!(
            got["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "metrics", "port": 9100, "protocol": "TCP"}])
        );
    }

    #[test]
    fn a_named_port_the_pod_lacks_is_skipped_and_selectorless_services_are_ignored() {
        let s =
            svc(json!({"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "grpc"}]}));
        let bs = backends(&s, &[pod("a", "10.0.0.2", true, false)]).expect("selector");
        assert!(bs[0].ports.is_empty());
        assert!(subsets(&s, &bs).is_empty());
        assert!(backends(&svc(json!({"ports": [{"port": 80}]})), &[]).is_none());
    }

    #[test]
    fn server_filled_reference_fields_do_not_count_as_a_difference() {
        let s = svc(json!({"selector": {"app": "web"}, "ports": [{"port": 80}]}));
        let want = subsets(
            &s,
            &backends(&s, &[pod("a", "10.0.0.2", true, false)]).expect("selector"),
        );
        let mut have = want.clone();
        if let Some(t) = have[0]
            .addresses
            .as_mut()
            .and_then(|a| a[0].target_ref.as_mut())
        {
            t.resource_version = Some("7".into());
        }
        assert_eq!(normalize(Some(have)), Some(want));
    }
}
