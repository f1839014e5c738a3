//! The cluster zone: what `<svc>.<ns>.svc.<domain>`, `_<port>._<proto>.<svc>.<ns>.svc.<domain>` and
//! `<a-b-c-d>.<ns>.pod.<domain>` resolve to, computed from Services and EndpointSlices.
//!
//! Follows the Kubernetes DNS specification (kubernetes/dns `docs/specification.md`, schema 1.1.0) as CoreDNS's
//! `kubernetes` plugin implements it: a ClusterIP Service's A record is its ClusterIP; a headless Service's A
//! records are its ready endpoints' addresses; SRV records exist for named ports; pod names are the dashed IPv4
//! address (`pods insecure`, CoreDNS's default: any well-formed address answers). Every other name inside the
//! cluster domain is NXDOMAIN, so a pod's search path falls through to the next suffix.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use hickory_server::proto::rr::rdata::{A, CNAME, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};

use crate::model::{EndpointSliceInfo, ModelEvent, Protocol, Service, ServiceName, SliceKey};

/// The Services and EndpointSlices the DNS server answers from, kept up to date from [`ModelEvent`]s.
///
/// Kept separately from the dataplane's [`crate::Model`] because DNS needs what the rules do not (every ready
/// endpoint of headless Services, including those with no ports).
#[derive(Debug, Default)]
pub struct DnsModel {
    services: BTreeMap<ServiceName, Service>,
    slices: BTreeMap<SliceKey, EndpointSliceInfo>,
}

impl DnsModel {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn apply(&mut self, event: &ModelEvent) {
        match event {
            ModelEvent::ServiceUpsert(s) => {
                self.services.insert(s.name.clone(), s.clone());
            }
            ModelEvent::ServiceDelete(n) => {
                self.services.remove(n);
            }
            ModelEvent::SliceUpsert(k, s) => {
                self.slices.insert(k.clone(), s.clone());
            }
            ModelEvent::SliceDelete(k) => {
                self.slices.remove(k);
            }
            ModelEvent::Replace { services, slices } => {
                self.replace_services(services);
                self.replace_slices(slices);
            }
            ModelEvent::ReplaceServices(services) => self.replace_services(services),
            ModelEvent::ReplaceSlices(slices) => self.replace_slices(slices),
        }
    }

    fn replace_services(&mut self, services: &[Service]) {
        self.services = services
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
    }

    fn replace_slices(&mut self, slices: &[(SliceKey, EndpointSliceInfo)]) {
        self.slices = slices.iter().cloned().collect();
    }

    /// An immutable snapshot the server reads lock-free while the next one is built.
    pub fn snapshot(&self) -> Arc<ZoneData> {
        let mut services: HashMap<(String, String), ServiceRecords> = HashMap::new();
        for svc in self.services.values() {
            services.insert(
                key(&svc.name),
                ServiceRecords {
                    cluster_ips: svc.cluster_ips.clone(),
                    ports: svc
                        .ports
                        .iter()
                        .filter(|p| !p.name.is_empty())
                        .map(|p| (p.name.to_ascii_lowercase(), p.protocol, p.port))
                        .collect(),
                    endpoints: BTreeMap::new(),
                    external_name: svc.external_name.as_deref().and_then(|n| {
                        let mut name = Name::from_ascii(n).ok()?;
                        name.set_fqdn(true);
                        Some(name)
                    }),
                },
            );
        }
        for slice in self.slices.values() {
            let Some(rec) = services.get_mut(&key(&slice.service)) else {
                continue;
            };
            // Only ready endpoints are published, as CoreDNS does (publishNotReadyAddresses is not modelled).
            for e in slice.endpoints.iter().filter(|e| e.ready) {
                let ports = rec.endpoints.entry(e.address).or_default();
                ports.extend(
                    slice
                        .ports
                        .iter()
                        .filter(|p| !p.name.is_empty())
                        .map(|p| (p.name.to_ascii_lowercase(), p.protocol, p.port)),
                );
            }
        }
        Arc::new(ZoneData { services })
    }
}

fn key(n: &ServiceName) -> (String, String) {
    (
        n.namespace.to_ascii_lowercase(),
        n.name.to_ascii_lowercase(),
    )
}

type NamedPort = (String, Protocol, u16);

#[derive(Debug, Clone, PartialEq, Eq)]
struct ServiceRecords {
    /// Empty for headless and ExternalName Services.
    cluster_ips: Vec<Ipv4Addr>,
    ports: Vec<NamedPort>,
    /// Ready endpoint addresses with their named ports.
    endpoints: BTreeMap<Ipv4Addr, BTreeSet<NamedPort>>,
    /// An ExternalName Service's target: its name is a CNAME to it.
    external_name: Option<Name>,
}

/// One snapshot of the cluster zone's data.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ZoneData {
    services: HashMap<(String, String), ServiceRecords>,
}

/// The cluster zone's answer to one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneAnswer {
    /// The name is not in the cluster domain: forward it.
    NotInZone,
    /// The name does not exist (authoritative NXDOMAIN, with the zone's SOA).
    NxDomain,
    /// The name exists; `answers` may be empty (NODATA: another type exists, e.g. AAAA for an IPv4 Service).
    Found {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
}

/// Names the cluster zone answers for: the cluster domain, and the TTL of every record.
#[derive(Debug, Clone)]
pub struct Zone {
    domain: Name,
    domain_labels: Vec<String>,
    ttl: u32,
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
        Protocol::Sctp => "_sctp",
    }
}

fn dashed(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}-{}-{}-{}", o[0], o[1], o[2], o[3])
}

/// `a-b-c-d` → a.b.c.d (no leading zeros, like the Kubernetes spec's dashed form).
fn parse_dashed(label: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = label.split('-').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    for (o, p) in octets.iter_mut().zip(&parts) {
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = p.parse().ok()?;
    }
    Some(Ipv4Addr::from(octets))
}

impl Zone {
    /// `domain` like `cluster.local` (trailing dot optional); `ttl` in seconds for every answer.
    pub fn new(domain: &str, ttl: u32) -> Result<Self, hickory_server::proto::ProtoError> {
        let mut domain = Name::from_ascii(domain)?.to_lowercase();
        domain.set_fqdn(true);
        let domain_labels = domain
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        Ok(Self {
            domain,
            domain_labels,
            ttl,
        })
    }

    pub fn domain(&self) -> &Name {
        &self.domain
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    /// The zone's SOA, sent in the authority section of negative answers so resolvers cache them for `ttl`
    /// (RFC 2308). Values as CoreDNS's kubernetes plugin uses (refresh 7200, retry 1800, expire 86400).
    pub fn soa(&self) -> Record {
        let mname = Name::from_ascii("ns.dns")
            .and_then(|n| n.append_domain(&self.domain))
            .unwrap_or_else(|_| self.domain.clone());
        let rname = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&self.domain))
            .unwrap_or_else(|_| self.domain.clone());
        Record::from_rdata(
            self.domain.clone(),
            self.ttl,
            RData::SOA(SOA::new(mname, rname, 1, 7200, 1800, 86400, self.ttl)),
        )
    }

    fn name_in_zone(&self, labels: &[&str]) -> Option<Name> {
        let mut s = labels.join(".");
        s.push('.');
        s.push_str(&self.domain.to_ascii());
        Name::from_ascii(s).ok()
    }

    /// Answers `qtype` for `qname` from `data`. Matching is case-insensitive (RFC 4343); answers carry `qname`
    /// as asked.
    pub fn lookup(&self, data: &ZoneData, qname: &Name, qtype: RecordType) -> ZoneAnswer {
        let lower = qname.to_lowercase();
        let labels: Vec<String> = lower
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let n = self.domain_labels.len();
        if labels.len() < n || labels[labels.len() - n..] != self.domain_labels[..] {
            return ZoneAnswer::NotInZone;
        }
        let rel: Vec<&str> = labels[..labels.len() - n]
            .iter()
            .map(String::as_str)
            .collect();
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        let a = |ip: Ipv4Addr| Record::from_rdata(qname.clone(), self.ttl, RData::A(A(ip)));
        match rel.as_slice() {
            // The apex: it exists (SOA/NS), nothing else to answer.
            [] => {
                if qtype == RecordType::SOA {
                    answers.push(self.soa());
                }
            }
            // <a-b-c-d>.<ns>.pod.<domain>
            [ip, _ns, "pod"] => {
                let Some(ip) = parse_dashed(ip) else {
                    return ZoneAnswer::NxDomain;
                };
                if qtype == RecordType::A {
                    answers.push(a(ip));
                }
            }
            // <svc>.<ns>.svc.<domain>
            [svc, ns, "svc"] => {
                let Some(rec) = data.services.get(&(ns.to_string(), svc.to_string())) else {
                    return ZoneAnswer::NxDomain;
                };
                // Ref: Kubernetes DNS spec 2.4: an ExternalName Service's name is a CNAME to `spec.externalName`,
                // whatever type is asked (RFC 1034 3.6.2); the server chases the target (see `Handler`).
                if let Some(target) = &rec.external_name {
                    answers.push(Record::from_rdata(
                        qname.clone(),
                        self.ttl,
                        RData::CNAME(CNAME(target.clone())),
                    ));
                    return ZoneAnswer::Found {
                        answers,
                        additionals,
                    };
                }
                match qtype {
                    RecordType::A => {
                        answers.extend(Self::service_ips(rec).into_iter().map(a));
                    }
                    // A port-less SRV query lists every named port (CoreDNS does the same).
                    RecordType::SRV => {
                        for (port, proto, _) in &rec.ports {
                            self.push_srv(
                                rec,
                                svc,
                                ns,
                                port,
                                *proto,
                                qname,
                                &mut answers,
                                &mut additionals,
                            );
                        }
                    }
                    _ => {}
                }
            }
            // _<port>._<proto>.<svc>.<ns>.svc.<domain>
            [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
                let Some(rec) = data.services.get(&(ns.to_string(), svc.to_string())) else {
                    return ZoneAnswer::NxDomain;
                };
                let port = &port[1..];
                let Some((_, proto, _)) = rec
                    .ports
                    .iter()
                    .find(|(n, p, _)| n == port && proto_label(*p) == *proto)
                else {
                    return ZoneAnswer::NxDomain;
                };
                if qtype == RecordType::SRV {
                    self.push_srv(
                        rec,
                        svc,
                        ns,
                        port,
                        *proto,
                        qname,
                        &mut answers,
                        &mut additionals,
                    );
                }
            }
            // <a-b-c-d>.<svc>.<ns>.svc.<domain>: a headless Service's endpoint (the SRV targets below).
            [ep, svc, ns, "svc"] => {
                let Some(rec) = data.services.get(&(ns.to_string(), svc.to_string())) else {
                    return ZoneAnswer::NxDomain;
                };
                let Some(ip) = parse_dashed(ep)
                    .filter(|ip| rec.cluster_ips.is_empty() && rec.endpoints.contains_key(ip))
                else {
                    return ZoneAnswer::NxDomain;
                };
                if qtype == RecordType::A {
                    answers.push(a(ip));
                }
            }
            _ => return ZoneAnswer::NxDomain,
        }
        ZoneAnswer::Found {
            answers,
            additionals,
        }
    }

    fn service_ips(rec: &ServiceRecords) -> Vec<Ipv4Addr> {
        if rec.cluster_ips.is_empty() {
            rec.endpoints.keys().copied().collect()
        } else {
            rec.cluster_ips.clone()
        }
    }

    /// SRV for one named port: a ClusterIP Service points at its own name and Service port; a headless one at
    /// each ready endpoint (`<a-b-c-d>.<svc>.<ns>.svc.<domain>`) and its target port. The targets' A records go
    /// in the additional section, so clients need no second query.
    #[allow(clippy::too_many_arguments)]
    fn push_srv(
        &self,
        rec: &ServiceRecords,
        svc: &str,
        ns: &str,
        port: &str,
        proto: Protocol,
        qname: &Name,
        answers: &mut Vec<Record>,
        additionals: &mut Vec<Record>,
    ) {
        let srv = |target: Name, p: u16| {
            Record::from_rdata(
                qname.clone(),
                self.ttl,
                RData::SRV(SRV::new(0, 100, p, target)),
            )
        };
        if rec.cluster_ips.is_empty() {
            for (ip, ports) in &rec.endpoints {
                let Some((_, _, p)) = ports.iter().find(|(n, pr, _)| n == port && *pr == proto)
                else {
                    continue;
                };
                let d = dashed(*ip);
                let Some(target) = self.name_in_zone(&[&d, svc, ns, "svc"]) else {
                    continue;
                };
                answers.push(srv(target.clone(), *p));
                additionals.push(Record::from_rdata(target, self.ttl, RData::A(A(*ip))));
            }
        } else {
            let Some((_, _, p)) = rec
                .ports
                .iter()
                .find(|(n, pr, _)| n == port && *pr == proto)
            else {
                return;
            };
            let Some(target) = self.name_in_zone(&[svc, ns, "svc"]) else {
                return;
            };
            answers.push(srv(target.clone(), *p));
            for ip in &rec.cluster_ips {
                additionals.push(Record::from_rdata(
                    target.clone(),
                    self.ttl,
                    RData::A(A(*ip)),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, EndpointPort, ServicePort, TrafficPolicy};

    fn service(ns: &str, name: &str, ips: &[[u8; 4]], ports: &[(&str, Protocol, u16)]) -> Service {
        Service {
            name: ServiceName::new(ns, name),
            cluster_ips: ips.iter().map(|o| Ipv4Addr::from(*o)).collect(),
            ports: ports
                .iter()
                .map(|(n, p, port)| ServicePort {
                    name: n.to_string(),
                    protocol: *p,
                    port: *port,
                    node_port: None,
                })
                .collect(),
            affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_ips: vec![],
            health_check_node_port: None,
            external_name: None,
        }
    }

    fn slice(
        ns: &str,
        name: &str,
        svc: &str,
        ports: &[(&str, Protocol, u16)],
        eps: &[([u8; 4], bool)],
    ) -> (SliceKey, EndpointSliceInfo) {
        (
            SliceKey {
                namespace: ns.into(),
                name: name.into(),
            },
            EndpointSliceInfo {
                service: ServiceName::new(ns, svc),
                ports: ports
                    .iter()
                    .map(|(n, p, port)| EndpointPort {
                        name: n.to_string(),
                        protocol: *p,
                        port: *port,
                    })
                    .collect(),
                endpoints: eps
                    .iter()
                    .map(|(o, ready)| Endpoint {
                        address: Ipv4Addr::from(*o),
                        ready: *ready,
                        serving: *ready,
                        terminating: false,
                        node_name: None,
                    })
                    .collect(),
            },
        )
    }

    /// shop/web: ClusterIP 10.96.0.20 with named ports http/TCP 80 and dns/UDP 53;
    /// shop/db: headless with two ready endpoints and one not ready, port pg/TCP 5432.
    fn fixture() -> (Zone, Arc<ZoneData>) {
        let mut m = DnsModel::new();
        m.apply(&ModelEvent::Replace {
            services: vec![
                service(
                    "shop",
                    "web",
                    &[[10, 96, 0, 20]],
                    &[("http", Protocol::Tcp, 80), ("dns", Protocol::Udp, 53)],
                ),
                service("shop", "db", &[], &[("pg", Protocol::Tcp, 5432)]),
            ],
            slices: vec![
                slice(
                    "shop",
                    "web-1",
                    "web",
                    &[("http", Protocol::Tcp, 8080)],
                    &[([10, 244, 1, 5], true)],
                ),
                slice(
                    "shop",
                    "db-1",
                    "db",
                    &[("pg", Protocol::Tcp, 15432)],
                    &[
                        ([10, 244, 1, 7], true),
                        ([10, 244, 2, 8], true),
                        ([10, 244, 2, 9], false),
                    ],
                ),
            ],
        });
        (
            Zone::new("cluster.local", 30).expect("valid domain"),
            m.snapshot(),
        )
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("valid name")
    }

    fn a_records(ans: &ZoneAnswer) -> Vec<Ipv4Addr> {
        match ans {
            ZoneAnswer::Found { answers, .. } => answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect(),
            other => panic!("expected records, got {other:?}"),
        }
    }

    #[test]
    fn a_cluster_ip_service_name_resolves_to_its_cluster_ip_with_the_zone_ttl() {
        let (z, d) = fixture();
        let ans = z.lookup(&d, &name("web.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(a_records(&ans), vec![Ipv4Addr::new(10, 96, 0, 20)]);
        let ZoneAnswer::Found { answers, .. } = ans else {
            unreachable!()
        };
        assert_eq!(answers[0].ttl, 30);
        assert_eq!(answers[0].name, name("web.shop.svc.cluster.local."));
    }

    #[test]
    fn an_external_name_service_is_a_cname_to_its_target_for_every_type() {
        let mut m = DnsModel::new();
        let mut svc = service("shop", "pay", &[], &[("https", Protocol::Tcp, 443)]);
        svc.external_name = Some("pay.example.com".into());
        m.apply(&ModelEvent::ServiceUpsert(svc));
        let (z, d) = (Zone::new("cluster.local", 30).expect("zone"), m.snapshot());
        for qtype in [RecordType::A, RecordType::AAAA, RecordType::CNAME] {
            match z.lookup(&d, &name("pay.shop.svc.cluster.local."), qtype) {
                ZoneAnswer::Found { answers, .. } => {
                    assert_eq!(answers.len(), 1, "{answers:?}");
                    assert_eq!(
                        answers[0].data,
                        RData::CNAME(CNAME(name("pay.example.com.")))
                    );
                }
                other => panic!("{qtype}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_headless_service_name_resolves_to_its_ready_endpoints_only() {
        let (z, d) = fixture();
        let ans = z.lookup(&d, &name("db.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(
            a_records(&ans),
            vec![Ipv4Addr::new(10, 244, 1, 7), Ipv4Addr::new(10, 244, 2, 8)]
        );
    }

    #[test]
    fn srv_of_a_named_port_points_at_the_service_name_and_port() {
        let (z, d) = fixture();
        let ans = z.lookup(
            &d,
            &name("_http._tcp.web.shop.svc.cluster.local."),
            RecordType::SRV,
        );
        let ZoneAnswer::Found {
            answers,
            additionals,
        } = ans
        else {
            panic!("expected SRV")
        };
        assert_eq!(answers.len(), 1);
        let RData::SRV(srv) = &answers[0].data else {
            panic!("not SRV")
        };
        assert_eq!(srv.port, 80);
        assert_eq!(srv.target, name("web.shop.svc.cluster.local."));
        assert_eq!(additionals.len(), 1);
        // The wrong protocol is no such name.
        assert_eq!(
            z.lookup(
                &d,
                &name("_http._udp.web.shop.svc.cluster.local."),
                RecordType::SRV
            ),
            ZoneAnswer::NxDomain
        );
        let udp = z.lookup(
            &d,
            &name("_dns._udp.web.shop.svc.cluster.local."),
            RecordType::SRV,
        );
        assert!(matches!(udp, ZoneAnswer::Found { ref answers, .. } if answers.len() == 1));
    }

    #[test]
    fn srv_of_a_headless_service_lists_each_ready_endpoint_with_its_target_port() {
        let (z, d) = fixture();
        let ans = z.lookup(
            &d,
            &name("_pg._tcp.db.shop.svc.cluster.local."),
            RecordType::SRV,
        );
        let ZoneAnswer::Found {
            answers,
            additionals,
        } = ans
        else {
            panic!("expected SRV")
        };
        let targets: Vec<(String, u16)> = answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.target.to_ascii(), s.port)),
                _ => None,
            })
            .collect();
        assert_eq!(
            targets,
            vec![
                ("10-244-1-7.db.shop.svc.cluster.local.".to_string(), 15432),
                ("10-244-2-8.db.shop.svc.cluster.local.".to_string(), 15432)
            ]
        );
        assert_eq!(additionals.len(), 2);
        // The targets resolve.
        let ep = z.lookup(
            &d,
            &name("10-244-2-8.db.shop.svc.cluster.local."),
            RecordType::A,
        );
        assert_eq!(a_records(&ep), vec![Ipv4Addr::new(10, 244, 2, 8)]);
        // A not-ready endpoint has no name.
        assert_eq!(
            z.lookup(
                &d,
                &name("10-244-2-9.db.shop.svc.cluster.local."),
                RecordType::A
            ),
            ZoneAnswer::NxDomain
        );
    }

    #[test]
    fn a_pod_name_resolves_to_the_address_it_spells() {
        let (z, d) = fixture();
        let ans = z.lookup(
            &d,
            &name("10-244-3-4.shop.pod.cluster.local."),
            RecordType::A,
        );
        assert_eq!(a_records(&ans), vec![Ipv4Addr::new(10, 244, 3, 4)]);
        for bad in [
            "10-244-3.shop.pod.cluster.local.",
            "10-244-3-400.shop.pod.cluster.local.",
        ] {
            assert_eq!(
                z.lookup(&d, &name(bad), RecordType::A),
                ZoneAnswer::NxDomain,
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_names_in_the_cluster_domain_are_nxdomain() {
        let (z, d) = fixture();
        for n in [
            "nope.shop.svc.cluster.local.",
            "web.other.svc.cluster.local.",
            "shop.svc.cluster.local.",
            "_nope._tcp.web.shop.svc.cluster.local.",
            "a.b.c.d.e.f.cluster.local.",
        ] {
            assert_eq!(
                z.lookup(&d, &name(n), RecordType::A),
                ZoneAnswer::NxDomain,
                "{n}"
            );
        }
    }

    #[test]
    fn an_aaaa_query_for_an_ipv4_service_is_nodata_not_nxdomain() {
        let (z, d) = fixture();
        let ans = z.lookup(&d, &name("web.shop.svc.cluster.local."), RecordType::AAAA);
        assert_eq!(
            ans,
            ZoneAnswer::Found {
                answers: vec![],
                additionals: vec![]
            }
        );
    }

    #[test]
    fn names_match_case_insensitively_and_answers_keep_the_asked_case() {
        let (z, d) = fixture();
        let q = name("WeB.ShOp.SVC.Cluster.LOCAL.");
        let ans = z.lookup(&d, &q, RecordType::A);
        assert_eq!(a_records(&ans), vec![Ipv4Addr::new(10, 96, 0, 20)]);
        let ZoneAnswer::Found { answers, .. } = ans else {
            unreachable!()
        };
        assert_eq!(answers[0].name.to_ascii(), "WeB.ShOp.SVC.Cluster.LOCAL.");
    }

    #[test]
    fn search_path_expansions_of_a_short_name_find_only_the_right_suffix() {
        // A pod in "shop" with `search shop.svc.cluster.local svc.cluster.local cluster.local` and ndots:5 asks
        // these in order for "web" and for "web.shop"; the first existing one must be the Service.
        let (z, d) = fixture();
        let q = |s: &str| z.lookup(&d, &name(s), RecordType::A);
        assert_eq!(
            a_records(&q("web.shop.svc.cluster.local.")),
            vec![Ipv4Addr::new(10, 96, 0, 20)]
        );
        assert_eq!(q("web.shop.shop.svc.cluster.local."), ZoneAnswer::NxDomain);
        assert_eq!(
            a_records(&q("web.shop.svc.cluster.local.")),
            vec![Ipv4Addr::new(10, 96, 0, 20)]
        );
        // A fully qualified name tried with a suffix appended is not found, so the resolver falls back to it.
        assert_eq!(
            q("web.shop.svc.cluster.local.shop.svc.cluster.local."),
            ZoneAnswer::NxDomain
        );
        assert_eq!(q("example.com.svc.cluster.local."), ZoneAnswer::NxDomain);
        assert_eq!(q("example.com.cluster.local."), ZoneAnswer::NxDomain);
        // ... and the bare outside name is not ours: it is forwarded.
        assert_eq!(q("example.com."), ZoneAnswer::NotInZone);
        assert_eq!(q("local."), ZoneAnswer::NotInZone);
    }

    #[test]
    fn deleting_a_service_removes_its_name_from_the_next_snapshot() {
        let (z, d) = fixture();
        let mut m = DnsModel::new();
        m.apply(&ModelEvent::ServiceUpsert(service(
            "a",
            "s",
            &[[10, 96, 1, 1]],
            &[],
        )));
        let before = m.snapshot();
        m.apply(&ModelEvent::ServiceDelete(ServiceName::new("a", "s")));
        let after = m.snapshot();
        let q = name("s.a.svc.cluster.local.");
        assert_eq!(
            a_records(&z.lookup(&before, &q, RecordType::A)),
            vec![Ipv4Addr::new(10, 96, 1, 1)]
        );
        assert_eq!(z.lookup(&after, &q, RecordType::A), ZoneAnswer::NxDomain);
        drop(d);
    }

    #[test]
    fn a_custom_cluster_domain_is_honoured() {
        let (_, d) = fixture();
        let z = Zone::new("corp.example", 5).expect("valid domain");
        let ans = z.lookup(&d, &name("web.shop.svc.corp.example."), RecordType::A);
        assert_eq!(a_records(&ans), vec![Ipv4Addr::new(10, 96, 0, 20)]);
        assert_eq!(
            z.lookup(&d, &name("web.shop.svc.cluster.local."), RecordType::A),
            ZoneAnswer::NotInZone
        );
    }
}
