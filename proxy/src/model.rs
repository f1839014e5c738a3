//! The proxy's in-memory view of the cluster: Services and their EndpointSlices, reduced to what the dataplane needs.
//!
//! The kube watcher (or any [`crate::ServiceSource`]) converts API objects with [`Service::from_k8s`] and
//! [`EndpointSliceInfo::from_k8s`] and stores them in a [`Model`]; the ruleset is computed from the model alone, so
//! everything below the watcher is testable without an API server.
//!
//! Only IPv4 is programmed for now (table family `ip`); IPv6 addresses in Services and slices are kept out of the
//! model rather than rejected, so dual-stack objects still work for their IPv4 half.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discoveryv1;

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds`. Ref: Kubernetes API, `ClientIPConfig` (10800 = 3 h).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

/// The label an EndpointSlice carries naming its Service. Ref: discovery.k8s.io/v1, `kubernetes.io/service-name`.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why an API object cannot be turned into proxy state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("object has no {field}")]
    MissingField { field: &'static str },
    #[error("service {service}: {field} {value:?} is not valid: {why}")]
    InvalidService {
        service: ServiceName,
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("endpoint slice {namespace}/{slice}: {field} {value:?} is not valid: {why}")]
    InvalidSlice {
        namespace: String,
        slice: String,
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

/// `namespace/name` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl ServiceName {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Transport protocol of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The name nftables uses for it (`meta l4proto tcp`).
    pub fn nft_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Parses the API spelling; an absent protocol means TCP (the API default).
    fn parse(s: Option<&str>) -> Option<Self> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster (the default for both policies).
    #[default]
    Cluster,
    /// Only endpoints on this node; the client's source address is kept.
    Local,
}

impl TrafficPolicy {
    fn parse(s: Option<&str>) -> Option<Self> {
        match s {
            None | Some("") | Some("Cluster") => Some(TrafficPolicy::Cluster),
            Some("Local") => Some(TrafficPolicy::Local),
            _ => None,
        }
    }
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// The port's name; matched against EndpointSlice port names (the slice controller resolves named target ports).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A Service as the proxy programs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: ServiceName,
    /// IPv4 ClusterIPs; empty for headless and ExternalName Services, which the proxy does not program.
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// `Some(timeout_seconds)` for `sessionAffinity: ClientIP`.
    pub affinity_timeout: Option<u32>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    pub external_ips: Vec<Ipv4Addr>,
    pub health_check_node_port: Option<u16>,
    /// `spec.externalName` of an ExternalName Service: DNS answers a CNAME to it; the dataplane programs nothing.
    pub external_name: Option<String>,
}

/// One endpoint address of an EndpointSlice with its conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
}

/// A slice's port: name, protocol and the number the endpoints listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// An EndpointSlice reduced to its Service, ports and IPv4 endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    pub service: ServiceName,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

fn port_u16(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

impl Service {
    /// Converts an API Service. Headless (`clusterIP: None`) and ExternalName Services convert to a Service without
    /// ClusterIPs (nothing to program); malformed fields are an error naming the Service and field.
    pub fn from_k8s(svc: &corev1::Service) -> Result<Self, ModelError> {
        let name = ServiceName {
            namespace: svc
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_string()),
            name: svc.metadata.name.clone().ok_or(ModelError::MissingField {
                field: "metadata.name",
            })?,
        };
        let spec = svc
            .spec
            .as_ref()
            .ok_or(ModelError::MissingField { field: "spec" })?;
        let invalid = |field, value: &str, why| ModelError::InvalidService {
            service: name.clone(),
            field,
            value: value.to_string(),
            why,
        };
        let external_name = spec.type_.as_deref() == Some("ExternalName");
        // `clusterIPs` supersedes `clusterIP` (its first element is the same address). Ref: ServiceSpec docs.
        let mut raw_ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
        if raw_ips.is_empty() {
            raw_ips.extend(spec.cluster_ip.clone());
        }
        let mut cluster_ips = Vec::new();
        if !external_name {
            for ip in &raw_ips {
                if ip.is_empty() || ip == "None" {
                    continue;
                }
                match ip.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(v4)) => cluster_ips.push(v4),
                    Ok(std::net::IpAddr::V6(_)) => {}
                    Err(_) => return Err(invalid("spec.clusterIPs", ip, "not an IP address")),
                }
            }
        }
        let mut external_ips = Vec::new();
        for ip in spec.external_ips.iter().flatten() {
            match ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(v4)) => external_ips.push(v4),
                Ok(std::net::IpAddr::V6(_)) => {}
                Err(_) => return Err(invalid("spec.externalIPs", ip, "not an IP address")),
            }
        }
        let mut ports = Vec::new();
        for p in spec.ports.iter().flatten() {
            let protocol = Protocol::parse(p.protocol.as_deref()).ok_or_else(|| {
                invalid(
                    "spec.ports[].protocol",
                    p.protocol.as_deref().unwrap_or(""),
                    "must be TCP, UDP or SCTP",
                )
            })?;
            let port = port_u16(p.port).ok_or_else(|| {
                invalid("spec.ports[].port", &p.port.to_string(), "must be 1-65535")
            })?;
            let node_port = match p.node_port {
                None | Some(0) => None,
                Some(n) => Some(port_u16(n).ok_or_else(|| {
                    invalid("spec.ports[].nodePort", &n.to_string(), "must be 1-65535")
                })?),
            };
            ports.push(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol,
                port,
                node_port,
            });
        }
        let affinity_timeout = match spec.session_affinity.as_deref() {
            None | Some("") | Some("None") => None,
            Some("ClientIP") => {
                let t = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                match t {
                    None => Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS),
                    // Ref: API validation: 0 < timeoutSeconds <= 86400.
                    Some(t) if (1..=86_400).contains(&t) => Some(t as u32),
                    Some(t) => {
                        return Err(invalid(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            &t.to_string(),
                            "must be 1-86400",
                        ))
                    }
                }
            }
            Some(other) => {
                return Err(invalid(
                    "spec.sessionAffinity",
                    other,
                    "must be None or ClientIP",
                ))
            }
        };
        let external_traffic_policy = TrafficPolicy::parse(spec.external_traffic_policy.as_deref())
            .ok_or_else(|| {
                invalid(
                    "spec.externalTrafficPolicy",
                    spec.external_traffic_policy.as_deref().unwrap_or(""),
                    "must be Cluster or Local",
                )
            })?;
        let internal_traffic_policy = TrafficPolicy::parse(spec.internal_traffic_policy.as_deref())
            .ok_or_else(|| {
                invalid(
                    "spec.internalTrafficPolicy",
                    spec.internal_traffic_policy.as_deref().unwrap_or(""),
                    "must be Cluster or Local",
                )
            })?;
        let health_check_node_port = match spec.health_check_node_port {
            None | Some(0) => None,
            Some(n) => Some(port_u16(n).ok_or_else(|| {
                invalid(
                    "spec.healthCheckNodePort",
                    &n.to_string(),
                    "must be 1-65535",
                )
            })?),
        };
        if external_name {
            // Ref: kube-proxy skips ExternalName Services altogether (no ClusterIP, NodePorts or externalIPs);
            // they exist only in DNS.
            let target = spec
                .external_name
                .as_deref()
                .map(|n| n.trim_end_matches('.'))
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    invalid("spec.externalName", "", "required for type ExternalName")
                })?;
            return Ok(Service {
                name,
                cluster_ips: vec![],
                ports: ports
                    .into_iter()
                    .map(|p| ServicePort {
                        node_port: None,
                        ..p
                    })
                    .collect(),
                affinity_timeout: None,
                external_traffic_policy: TrafficPolicy::Cluster,
                internal_traffic_policy: TrafficPolicy::Cluster,
                external_ips: vec![],
                health_check_node_port: None,
                external_name: Some(target.to_string()),
            });
        }
        Ok(Service {
            name,
            cluster_ips,
            ports,
            affinity_timeout,
            external_traffic_policy,
            internal_traffic_policy,
            external_ips,
            health_check_node_port,
            external_name: None,
        })
    }
}

impl EndpointSliceInfo {
    /// Converts an API EndpointSlice. Returns `Ok(None)` for slices the proxy ignores: IPv6/FQDN slices and slices not
    /// owned by a Service (no `kubernetes.io/service-name` label).
    pub fn from_k8s(slice: &discoveryv1::EndpointSlice) -> Result<Option<Self>, ModelError> {
        if slice.address_type != "IPv4" {
            return Ok(None);
        }
        let namespace = slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let slice_name = slice.metadata.name.clone().unwrap_or_default();
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            return Ok(None);
        };
        let invalid = |field, value: String, why| ModelError::InvalidSlice {
            namespace: namespace.clone(),
            slice: slice_name.clone(),
            field,
            value,
            why,
        };
        let mut ports = Vec::new();
        for p in slice.ports.iter().flatten() {
            let protocol = Protocol::parse(p.protocol.as_deref()).ok_or_else(|| {
                invalid(
                    "ports[].protocol",
                    p.protocol.clone().unwrap_or_default(),
                    "must be TCP, UDP or SCTP",
                )
            })?;
            // A port without a number means "all ports" and is not usable by a proxy. Ref: EndpointPort docs.
            let Some(port) = p.port else { continue };
            let port = port_u16(port)
                .ok_or_else(|| invalid("ports[].port", port.to_string(), "must be 1-65535"))?;
            ports.push(EndpointPort {
                name: p.name.clone().unwrap_or_default(),
                protocol,
                port,
            });
        }
        let mut endpoints = Vec::new();
        for e in slice.endpoints.iter().flatten() {
            let conditions = e.conditions.clone().unwrap_or_default();
            // Ref: EndpointConditions: nil `ready` means ready; nil `serving` follows `ready`; nil `terminating` is false.
            let ready = conditions.ready.unwrap_or(true);
            let serving = conditions.serving.unwrap_or(ready);
            let terminating = conditions.terminating.unwrap_or(false);
            // Only the first address is used; the API says consumers must assume all addresses are fungible.
            let Some(addr) = e.addresses.first() else {
                continue;
            };
            let address = addr.parse::<Ipv4Addr>().map_err(|_| {
                invalid("endpoints[].addresses", addr.clone(), "not an IPv4 address")
            })?;
            endpoints.push(Endpoint {
                address,
                ready,
                serving,
                terminating,
                node_name: e.node_name.clone(),
            });
        }
        Ok(Some(EndpointSliceInfo {
            service: ServiceName {
                namespace,
                name: service.clone(),
            },
            ports,
            endpoints,
        }))
    }
}

/// Key of an EndpointSlice in the model: namespace and slice name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SliceKey {
    pub namespace: String,
    pub name: String,
}

/// A change the watcher reports; applied to the [`Model`] in order.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelEvent {
    ServiceUpsert(Service),
    ServiceDelete(ServiceName),
    SliceUpsert(SliceKey, EndpointSliceInfo),
    SliceDelete(SliceKey),
    /// Replace everything (a watcher's initial list or relist).
    Replace {
        services: Vec<Service>,
        slices: Vec<(SliceKey, EndpointSliceInfo)>,
    },
    /// Replace all Services (a re-list of Services only).
    ReplaceServices(Vec<Service>),
    /// Replace all EndpointSlices (a re-list of slices only).
    ReplaceSlices(Vec<(SliceKey, EndpointSliceInfo)>),
}

/// An endpoint as a frontend uses it: address, target port, and whether it is on this node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    pub address: Ipv4Addr,
    pub port: u16,
    /// On this node (`nodeName` matches).
    pub local: bool,
    /// On this node or of unknown node (no `nodeName`): such an endpoint may be a client of its own Service here.
    pub maybe_local: bool,
}

/// All Services and EndpointSlices the proxy knows.
#[derive(Debug, Clone, Default)]
pub struct Model {
    services: BTreeMap<ServiceName, Service>,
    slices: BTreeMap<SliceKey, EndpointSliceInfo>,
    /// Index: the slices of each Service, so computing a Service's backends does not scan every slice.
    slices_of: BTreeMap<ServiceName, BTreeSet<SliceKey>>,
    /// Services whose rules may have changed since the last [`Model::take_dirty`].
    dirty: BTreeSet<ServiceName>,
}

impl Model {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn apply(&mut self, event: ModelEvent) {
        match event {
            ModelEvent::ServiceUpsert(s) => {
                self.dirty.insert(s.name.clone());
                self.services.insert(s.name.clone(), s);
            }
            ModelEvent::ServiceDelete(n) => {
                self.services.remove(&n);
                self.dirty.insert(n);
            }
            ModelEvent::SliceUpsert(k, s) => self.upsert_slice(k, s),
            ModelEvent::SliceDelete(k) => self.delete_slice(&k),
            ModelEvent::Replace { services, slices } => {
                self.replace_services(services);
                self.replace_slices(slices);
            }
            ModelEvent::ReplaceServices(services) => self.replace_services(services),
            ModelEvent::ReplaceSlices(slices) => self.replace_slices(slices),
        }
    }

    fn replace_services(&mut self, services: Vec<Service>) {
        self.dirty.extend(self.services.keys().cloned());
        self.services = services.into_iter().map(|s| (s.name.clone(), s)).collect();
        self.dirty.extend(self.services.keys().cloned());
    }

    fn replace_slices(&mut self, slices: Vec<(SliceKey, EndpointSliceInfo)>) {
        self.dirty.extend(self.slices_of.keys().cloned());
        self.slices.clear();
        self.slices_of.clear();
        for (k, s) in slices {
            self.upsert_slice(k, s);
        }
    }

    fn delete_slice(&mut self, key: &SliceKey) {
        if let Some(old) = self.slices.remove(key) {
            self.dirty.insert(old.service.clone());
            if let Some(set) = self.slices_of.get_mut(&old.service) {
                set.remove(key);
                if set.is_empty() {
                    self.slices_of.remove(&old.service);
                }
            }
        }
    }

    fn upsert_slice(&mut self, key: SliceKey, slice: EndpointSliceInfo) {
        // A slice's label may have moved it to another Service: drop the old index entry first.
        self.delete_slice(&key);
        self.dirty.insert(slice.service.clone());
        self.slices_of
            .entry(slice.service.clone())
            .or_default()
            .insert(key.clone());
        self.slices.insert(key, slice);
    }

    /// The Services changed (added, updated, deleted, or their slices changed) since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<ServiceName> {
        std::mem::take(&mut self.dirty)
    }

    pub fn service(&self, name: &ServiceName) -> Option<&Service> {
        self.services.get(name)
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The usable backends of `port` of `service`, as the dataplane should pick among them.
    ///
    /// Ready endpoints are used; when none is ready, serving-and-terminating ones are the fallback so a rolling
    /// update does not drop traffic. Ref: KEP-1669 (ProxyTerminatingEndpoints). Addresses listed in several slices
    /// count once. The result is sorted, so the slot numbering is stable across syncs.
    pub fn backends(
        &self,
        service: &ServiceName,
        port: &ServicePort,
        node_name: &str,
    ) -> Vec<Backend> {
        let mut ready = BTreeMap::new();
        let mut fallback = BTreeMap::new();
        for slice in self
            .slices_of
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
        {
            let Some(target) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
            else {
                continue;
            };
            for e in &slice.endpoints {
                let b = Backend {
                    address: e.address,
                    port: target.port,
                    local: e.node_name.as_deref() == Some(node_name),
                    maybe_local: e.node_name.as_deref().is_none_or(|n| n == node_name),
                };
                if e.ready {
                    ready.insert(e.address, b);
                } else if e.serving && e.terminating {
                    fallback.insert(e.address, b);
                }
            }
        }
        let chosen = if ready.is_empty() { fallback } else { ready };
        chosen.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_json(v: serde_json::Value) -> corev1::Service {
        serde_json::from_value(v).expect("valid Service JSON")
    }

    fn slice_json(v: serde_json::Value) -> discoveryv1::EndpointSlice {
        serde_json::from_value(v).expect("valid EndpointSlice JSON")
    }

    #[test]
    fn a_full_service_converts_with_every_field_the_dataplane_uses() {
        let svc = service_json(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00::20"],
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "web", "nodePort": 30080},
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "sig", "port": 9000, "protocol": "SCTP"}
                ],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "externalTrafficPolicy": "Local",
                "internalTrafficPolicy": "Local",
                "externalIPs": ["192.0.2.7"],
                "healthCheckNodePort": 31000
            }
        }));
        let s = Service::from_k8s(&svc).expect("converts");
        assert_eq!(s.name, ServiceName::new("shop", "web"));
        assert_eq!(s.cluster_ips, vec![Ipv4Addr::new(10, 96, 0, 20)]);
        assert_eq!(
            s.ports,
            vec![
                ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: Some(30080)
                },
                ServicePort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                    node_port: None
                },
                ServicePort {
                    name: "sig".into(),
                    protocol: Protocol::Sctp,
                    port: 9000,
                    node_port: None
                },
            ]
        );
        assert_eq!(s.affinity_timeout, Some(60));
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(s.internal_traffic_policy, TrafficPolicy::Local);
        assert_eq!(s.external_ips, vec![Ipv4Addr::new(192, 0, 2, 7)]);
        assert_eq!(s.health_check_node_port, Some(31000));
    }

    #[test]
    fn defaults_follow_the_api_defaults() {
        let s = Service::from_k8s(&service_json(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 443}], "sessionAffinity": "ClientIP"}
        })))
        .expect("converts");
        assert_eq!(s.name.namespace, "default");
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
        assert_eq!(s.ports[0].name, "");
        assert_eq!(s.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS));
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Cluster);
    }

    #[test]
    fn headless_and_external_name_services_have_nothing_to_program() {
        for spec in [
            serde_json::json!({"clusterIP": "None", "ports": [{"port": 80}]}),
            serde_json::json!({"type": "ExternalName", "externalName": "example.com"}),
        ] {
            let s = Service::from_k8s(&service_json(
                serde_json::json!({"metadata": {"name": "h"}, "spec": spec}),
            ))
            .expect("converts");
            assert!(s.cluster_ips.is_empty(), "{s:?}");
        }
        let s = Service::from_k8s(&service_json(
            serde_json::json!({"metadata": {"name": "x"}, "spec":
            {"type": "ExternalName", "externalName": "db.example.com.", "externalIPs": ["1.2.3.4"],
             "ports": [{"port": 5432, "nodePort": 30001}]}}),
        ))
        .expect("converts");
        assert_eq!(s.external_name.as_deref(), Some("db.example.com"));
        assert!(
            s.external_ips.is_empty() && s.ports[0].node_port.is_none(),
            "{s:?}"
        );
    }

    #[test]
    fn malformed_services_are_errors_naming_the_field() {
        let cases = [
            (
                serde_json::json!({"clusterIP": "10.96.0.300"}),
                "spec.clusterIPs",
            ),
            (
                serde_json::json!({"clusterIP": "10.96.0.3", "ports": [{"port": 80, "protocol": "ICMP"}]}),
                "spec.ports[].protocol",
            ),
            (
                serde_json::json!({"clusterIP": "10.96.0.3", "ports": [{"port": 70000}]}),
                "spec.ports[].port",
            ),
            (
                serde_json::json!({"clusterIP": "10.96.0.3", "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            ),
            (
                serde_json::json!({"clusterIP": "10.96.0.3", "externalTrafficPolicy": "Nearby"}),
                "spec.externalTrafficPolicy",
            ),
        ];
        for (spec, want) in cases {
            let err = Service::from_k8s(&service_json(
                serde_json::json!({"metadata": {"name": "bad", "namespace": "x"}, "spec": spec}),
            ))
            .expect_err("must be rejected");
            match &err {
                ModelError::InvalidService { field, service, .. } => {
                    assert_eq!(*field, want);
                    assert_eq!(service.to_string(), "x/bad");
                }
                other => panic!("unexpected error {other:?}"),
            }
        }
        assert_eq!(
            Service::from_k8s(&service_json(
                serde_json::json!({"metadata": {"name": "n"}})
            )),
            Err(ModelError::MissingField { field: "spec" })
        );
    }

    #[test]
    fn slices_convert_with_conditions_defaulted_as_the_api_says() {
        let slice = slice_json(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web-abc",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.244.1.5"], "nodeName": "n1"},
                {"addresses": ["10.244.2.5"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.3.5"], "conditions": {"ready": false}}
            ]
        }));
        let info = EndpointSliceInfo::from_k8s(&slice)
            .expect("converts")
            .expect("is a service slice");
        assert_eq!(info.service, ServiceName::new("shop", "web"));
        assert_eq!(info.ports.len(), 2);
        assert_eq!(info.ports[1].protocol, Protocol::Udp);
        let e = &info.endpoints;
        assert!(e[0].ready && e[0].serving && !e[0].terminating);
        assert_eq!(e[0].node_name.as_deref(), Some("n1"));
        assert!(!e[1].ready && e[1].serving && e[1].terminating);
        assert!(!e[2].ready && !e[2].serving);
    }

    #[test]
    fn ipv6_and_unowned_slices_are_ignored_and_bad_addresses_rejected() {
        let v6 = slice_json(serde_json::json!({
            "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv6", "endpoints": [{"addresses": ["fd00::1"]}]
        }));
        assert_eq!(EndpointSliceInfo::from_k8s(&v6), Ok(None));
        let unowned = slice_json(serde_json::json!({
            "metadata": {"name": "s"}, "addressType": "IPv4", "endpoints": []
        }));
        assert_eq!(EndpointSliceInfo::from_k8s(&unowned), Ok(None));
        let bad = slice_json(serde_json::json!({
            "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1"]}]
        }));
        assert!(matches!(
            EndpointSliceInfo::from_k8s(&bad),
            Err(ModelError::InvalidSlice {
                field: "endpoints[].addresses",
                ..
            })
        ));
    }

    fn ep(a: [u8; 4], ready: bool, serving: bool, terminating: bool, node: &str) -> Endpoint {
        Endpoint {
            address: Ipv4Addr::from(a),
            ready,
            serving,
            terminating,
            node_name: Some(node.to_string()),
        }
    }

    #[test]
    fn backends_prefer_ready_endpoints_and_fall_back_to_serving_terminating_ones() {
        let name = ServiceName::new("ns", "web");
        let port = ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
        };
        let slice = |endpoints| EndpointSliceInfo {
            service: name.clone(),
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints,
        };
        let key = |n: &str| SliceKey {
            namespace: "ns".into(),
            name: n.into(),
        };
        let mut m = Model::new();
        m.apply(ModelEvent::SliceUpsert(
            key("a"),
            slice(vec![
                ep([10, 0, 0, 2], true, true, false, "n1"),
                ep([10, 0, 0, 3], false, true, true, "n2"),
            ]),
        ));
        // The same address in a second slice counts once; a slice of another Service is not used.
        m.apply(ModelEvent::SliceUpsert(
            key("b"),
            slice(vec![ep([10, 0, 0, 2], true, true, false, "n1")]),
        ));
        let mut other = slice(vec![ep([10, 0, 0, 9], true, true, false, "n1")]);
        other.service = ServiceName::new("ns", "other");
        m.apply(ModelEvent::SliceUpsert(key("c"), other));
        let b = m.backends(&name, &port, "n1");
        assert_eq!(
            b,
            vec![Backend {
                address: Ipv4Addr::new(10, 0, 0, 2),
                port: 8080,
                local: true,
                maybe_local: true,
            }]
        );
        // With the ready endpoint gone, the serving-terminating one takes over.
        m.apply(ModelEvent::SliceDelete(key("a")));
        m.apply(ModelEvent::SliceUpsert(
            key("b"),
            slice(vec![
                ep([10, 0, 0, 2], false, false, true, "n1"),
                ep([10, 0, 0, 3], false, true, true, "n2"),
            ]),
        ));
        let b = m.backends(&name, &port, "n1");
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].address, Ipv4Addr::new(10, 0, 0, 3));
        assert!(!b[0].local);
        // A port name the slice does not carry has no backends.
        let other_port = ServicePort {
            name: "metrics".into(),
            ..port
        };
        assert!(m.backends(&name, &other_port, "n1").is_empty());
    }

    #[test]
    fn a_slice_relabelled_to_another_service_moves_its_endpoints_and_marks_both_dirty() {
        let port = ServicePort {
            name: "".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
        };
        let info = |svc: &str| EndpointSliceInfo {
            service: ServiceName::new("ns", svc),
            ports: vec![EndpointPort {
                name: "".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints: vec![ep([10, 0, 0, 2], true, true, false, "n1")],
        };
        let key = SliceKey {
            namespace: "ns".into(),
            name: "s".into(),
        };
        let mut m = Model::new();
        m.apply(ModelEvent::SliceUpsert(key.clone(), info("a")));
        m.take_dirty();
        m.apply(ModelEvent::SliceUpsert(key, info("b")));
        let dirty = m.take_dirty();
        assert!(
            dirty.contains(&ServiceName::new("ns", "a"))
                && dirty.contains(&ServiceName::new("ns", "b"))
        );
        assert!(m
            .backends(&ServiceName::new("ns", "a"), &port, "n1")
            .is_empty());
        assert_eq!(
            m.backends(&ServiceName::new("ns", "b"), &port, "n1").len(),
            1
        );
    }
}
