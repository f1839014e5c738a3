//! Cluster DNS: pods resolve Services and pods by name; every other name goes to the node's upstream resolvers.
//!
//! The proxy's [`ServiceSource`] is wrapped in a [`DnsTee`], which keeps a [`DnsModel`] from the same events the
//! dataplane gets and publishes an immutable [`ZoneData`] snapshot on a `tokio::sync::watch` channel after each
//! burst; the server reads the latest snapshot per query, so the rules and DNS follow one watcher.
//!
//! Answers inside the cluster domain are authoritative (see [`zone`] for the names). Records carry a TTL of 30 s,
//! the CoreDNS `kubernetes` plugin's default `ttl`; a shorter TTL (5 s) makes Service changes visible sooner at
//! the price of more queries. Other names are forwarded with `hickory-resolver` to the `nameserver`s of a
//! resolv.conf (the node's own, passed in), whose cache honours the upstream TTLs (bounded by [`CACHE_SIZE`]).

mod address;
mod zone;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::Resolver;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::{RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo, Server};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::model::ModelEvent;
use crate::source::{ServiceSource, SourceError};

pub use address::remove_from_loopback;
pub use zone::{DnsModel, Zone, ZoneAnswer, ZoneData};

/// Records of the cluster zone live this long in clients' caches (CoreDNS kubernetes plugin default).
pub const DEFAULT_TTL: u32 = 30;
/// Entries the forwarding cache holds (CoreDNS's `cache` plugin defaults to 9984; a node-local server needs few).
pub const CACHE_SIZE: u64 = 1024;
/// How long a forwarded query may take before the client gets SERVFAIL. Stub resolvers give up after a few
/// seconds (busybox and musl ~5 s in total; glibc 5 s per try), so an upstream that never answers must turn into an
/// answer within that, not silence (CoreDNS's `forward` plugin likewise gives up on a read after 2 s).
const FORWARD_DEADLINE: Duration = Duration::from_secs(2);
/// How long a TCP client may stay idle before the connection is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Why the DNS server cannot run.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cluster domain {domain:?} is not a valid DNS name: {source}")]
    Domain {
        domain: String,
        source: hickory_server::proto::ProtoError,
    },
    #[error("cannot read upstream resolvers from {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("upstream resolvers in {path}: {message}")]
    Upstream { path: PathBuf, message: String },
    #[error("cannot bind DNS {proto} socket on {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot assign the cluster DNS address {ip} to lo: {message}")]
    Address {
        ip: std::net::Ipv4Addr,
        message: String,
    },
    #[error("DNS server failed: {0}")]
    Serve(String),
}

/// Where and how the DNS server answers.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// UDP and TCP address (the cluster DNS ClusterIP on the node, e.g. 10.96.0.10:53).
    pub bind: SocketAddr,
    /// Cluster domain (`cluster.local`).
    pub cluster_domain: String,
    pub ttl: u32,
    /// resolv.conf whose `nameserver`s receive every name outside the cluster domain; `None` answers them REFUSED.
    pub upstream_resolv_conf: Option<PathBuf>,
    /// Assign the bind address to `lo` first when the node does not have it (the cluster DNS ClusterIP).
    pub assign_address: bool,
}

/// Publishes [`ZoneData`] snapshots; the sending half lives in a [`DnsTee`].
pub fn zone_channel() -> (watch::Sender<Arc<ZoneData>>, watch::Receiver<Arc<ZoneData>>) {
    watch::channel(Arc::new(ZoneData::default()))
}

/// Wraps a [`ServiceSource`]: every event goes into a [`DnsModel`], whose snapshot is published once per burst of
/// events, and on to the proxy — without `served_here`, the address this node's DNS server answers on.
///
/// The `kube-dns` Service (10.96.0.10) has no endpoints: every node serves it itself, on that address assigned
/// locally. Programming it would make the dataplane reject DNS traffic as a Service without endpoints, so that
/// ClusterIP is left out of the rules, and queries to it reach the local server like NodeLocal DNSCache's (which
/// exempts its address from kube-proxy's DNAT with NOTRACK rules for the same reason).
pub struct DnsTee {
    pub inner: Box<dyn ServiceSource>,
    pub zone: watch::Sender<Arc<ZoneData>>,
    pub served_here: Option<std::net::Ipv4Addr>,
}

/// Removes `ip` from the ClusterIPs of the Services in `event`.
fn without_cluster_ip(mut event: ModelEvent, ip: std::net::Ipv4Addr) -> ModelEvent {
    let strip = |s: &mut crate::model::Service| s.cluster_ips.retain(|c| *c != ip);
    match &mut event {
        ModelEvent::ServiceUpsert(s) => strip(s),
        ModelEvent::Replace { services, .. } | ModelEvent::ReplaceServices(services) => {
            services.iter_mut().for_each(strip)
        }
        _ => {}
    }
    event
}

impl ServiceSource for DnsTee {
    fn run(self: Box<Self>, events: Sender<ModelEvent>) -> Result<(), SourceError> {
        let (tx, rx) = mpsc::channel::<ModelEvent>();
        let zone = self.zone;
        let served_here = self.served_here;
        let forward = std::thread::Builder::new()
            .name("dns-model".into())
            .spawn(move || {
                let mut model = DnsModel::new();
                while let Ok(ev) = rx.recv() {
                    let mut batch = vec![ev];
                    batch.extend(rx.try_iter());
                    for ev in batch {
                        model.apply(&ev);
                        let ev = match served_here {
                            Some(ip) => without_cluster_ip(ev, ip),
                            None => ev,
                        };
                        if events.send(ev).is_err() {
                            return;
                        }
                    }
                    zone.send_replace(model.snapshot());
                }
            })
            .map_err(|source| SourceError::Read {
                path: "<dns-model thread>".into(),
                source,
            })?;
        let result = self.inner.run(tx);
        // The sender went with `inner`: the thread drains what is left and ends.
        let _ = forward.join();
        result
    }
}

/// Forwards names outside the cluster domain, with a TTL-respecting cache.
struct Forwarder {
    resolver: Resolver<TokioRuntimeProvider>,
}

impl Forwarder {
    fn from_resolv_conf(path: &PathBuf) -> Result<Self, DnsError> {
        let data = std::fs::read(path).map_err(|source| DnsError::ResolvConf {
            path: path.clone(),
            source,
        })?;
        let upstream = |message: String| DnsError::Upstream {
            path: path.clone(),
            message,
        };
        let (config, mut opts) = hickory_resolver::system_conf::parse_resolv_conf(&data)
            .map_err(|e| upstream(e.to_string()))?;
        // The node's search list must not apply: a pod's resolver already expanded the name it asks for.
        let config = ResolverConfig::from_parts(None, vec![], config.name_servers().to_vec());
        opts.ndots = 0;
        opts.cache_size = CACHE_SIZE;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = true;
        let resolver = Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| upstream(e.to_string()))?;
        Ok(Self { resolver })
    }
}

/// Answers one query: the cluster zone from the latest snapshot, the rest through the forwarder.
pub(crate) struct Handler {
    zone: Zone,
    data: watch::Receiver<Arc<ZoneData>>,
    forwarder: Option<Forwarder>,
}

struct Reply {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

impl Reply {
    fn code(code: ResponseCode) -> Self {
        Self {
            code,
            authoritative: false,
            answers: vec![],
            authorities: vec![],
            additionals: vec![],
        }
    }
}

impl Handler {
    async fn answer(&self, request: &Request) -> Reply {
        let Ok(info) = request.request_info() else {
            return Reply::code(ResponseCode::FormErr);
        };
        // The original spelling: answers repeat the name as asked (clients using 0x20 case randomisation check it).
        let qname = info.query.original().name().clone();
        let qtype = info.query.query_type();
        let data = self.data.borrow().clone();
        match self.zone.lookup(&data, &qname, qtype) {
            ZoneAnswer::Found {
                mut answers,
                additionals,
            } => {
                if qtype != RecordType::CNAME {
                    self.chase_cname(&data, qtype, &mut answers).await;
                }
                let authorities = if answers.is_empty() {
                    vec![self.zone.soa()]
                } else {
                    vec![]
                };
                Reply {
                    code: ResponseCode::NoError,
                    authoritative: true,
                    answers,
                    authorities,
                    additionals,
                }
            }
            ZoneAnswer::NxDomain => Reply {
                code: ResponseCode::NXDomain,
                authoritative: true,
                answers: vec![],
                authorities: vec![self.zone.soa()],
                additionals: vec![],
            },
            ZoneAnswer::NotInZone => self.forward(qname, qtype).await,
        }
    }

    /// An answer ending in a CNAME (an ExternalName Service) gets the target's records appended, from the zone or
    /// from upstream, as a recursive server answers (CoreDNS's kubernetes plugin does the same for
    /// ExternalName). Stub resolvers such as musl's and busybox's do not chase CNAMEs themselves. One level only:
    /// an ExternalName pointing at another ExternalName is answered with both CNAMEs and no address.
    async fn chase_cname(&self, data: &ZoneData, qtype: RecordType, answers: &mut Vec<Record>) {
        let Some(RData::CNAME(target)) = answers.last().map(|r| &r.data) else {
            return;
        };
        let target = target.0.clone();
        match self.zone.lookup(data, &target, qtype) {
            ZoneAnswer::Found { answers: more, .. } => answers.extend(more),
            ZoneAnswer::NxDomain => {}
            ZoneAnswer::NotInZone => {
                if let Some(fwd) = &self.forwarder {
                    if let Ok(Ok(lookup)) =
                        tokio::time::timeout(FORWARD_DEADLINE, fwd.resolver.lookup(target, qtype))
                            .await
                    {
                        answers.extend(lookup.answers().iter().cloned());
                    }
                }
            }
        }
    }

    async fn forward(&self, qname: hickory_server::proto::rr::Name, qtype: RecordType) -> Reply {
        let Some(fwd) = &self.forwarder else {
            return Reply::code(ResponseCode::Refused);
        };
        let lookup =
            tokio::time::timeout(FORWARD_DEADLINE, fwd.resolver.lookup(qname.clone(), qtype)).await;
        let Ok(lookup) = lookup else {
            debug!(name = %qname, "upstream did not answer in time");
            return Reply::code(ResponseCode::ServFail);
        };
        match lookup {
            Ok(lookup) => Reply {
                code: ResponseCode::NoError,
                authoritative: false,
                answers: lookup.answers().to_vec(),
                authorities: vec![],
                additionals: vec![],
            },
            Err(e) if e.is_no_records_found() => {
                let code = if e.is_nx_domain() {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                };
                let authorities = e
                    .into_soa()
                    .map(|soa| vec![soa.into_record_of_rdata()])
                    .unwrap_or_default();
                Reply {
                    authorities,
                    ..Reply::code(code)
                }
            }
            Err(e) => {
                debug!(name = %qname, error = %e, "upstream lookup failed");
                Reply::code(ResponseCode::ServFail)
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let reply = self.answer(request).await;
        let mut md = Metadata::response_from_request(&request.metadata);
        md.authoritative = reply.authoritative;
        md.recursion_available = self.forwarder.is_some();
        md.response_code = reply.code;
        // Echo EDNS so UDP answers may exceed 512 bytes (large headless Services); RFC 6891.
        let resp_edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().max(512));
            e
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &resp_edns {
            builder.edns(e);
        }
        let response = builder.build(
            md,
            reply.answers.iter(),
            reply.authorities.iter(),
            std::iter::empty(),
            reply.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                warn!(error = %e, "cannot send DNS response");
                let mut md = Metadata::response_from_request(&request.metadata);
                md.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: md,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// Binds UDP and TCP on `config.bind` and answers until a socket fails. Reads the newest snapshot of `zone`
/// for every query.
pub async fn serve(
    config: DnsConfig,
    zone: watch::Receiver<Arc<ZoneData>>,
) -> Result<(), DnsError> {
    let zone_names =
        Zone::new(&config.cluster_domain, config.ttl).map_err(|source| DnsError::Domain {
            domain: config.cluster_domain.clone(),
            source,
        })?;
    let forwarder = match &config.upstream_resolv_conf {
        Some(path) => Some(Forwarder::from_resolv_conf(path)?),
        None => None,
    };
    if config.assign_address {
        if let SocketAddr::V4(v4) = config.bind {
            address::ensure_on_loopback(*v4.ip()).await?;
        }
    }
    let udp = UdpSocket::bind(config.bind)
        .await
        .map_err(|source| DnsError::Bind {
            proto: "UDP",
            addr: config.bind,
            source,
        })?;
    let tcp = TcpListener::bind(config.bind)
        .await
        .map_err(|source| DnsError::Bind {
            proto: "TCP",
            addr: config.bind,
            source,
        })?;
    let mut server = Server::new(Handler {
        zone: zone_names,
        data: zone,
        forwarder,
    });
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE, 64);
    info!(addr = %config.bind, domain = %config.cluster_domain, ttl = config.ttl, "cluster DNS serving");
    server
        .block_until_done()
        .await
        .map_err(|e| DnsError::Serve(e.to_string()))
}

/// DNS names and record types as [`Zone::lookup`] takes them, so callers need not depend on hickory directly.
pub use hickory_server::proto::rr::{Name as DnsName, RecordType as DnsRecordType};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Service, ServiceName, TrafficPolicy};
    use hickory_server::proto::rr::{Name, RecordType};

    struct Fixed(Vec<ModelEvent>);

    impl ServiceSource for Fixed {
        fn run(self: Box<Self>, events: Sender<ModelEvent>) -> Result<(), SourceError> {
            for ev in self.0 {
                let _ = events.send(ev);
            }
            Ok(())
        }
    }

    fn svc(name: &str) -> Service {
        Service {
            name: ServiceName::new("ns", name),
            cluster_ips: vec![std::net::Ipv4Addr::new(10, 96, 0, 1)],
            ports: vec![],
            affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_ips: vec![],
            health_check_node_port: None,
            external_name: None,
        }
    }

    #[test]
    fn the_tee_passes_every_event_on_and_publishes_the_resulting_zone() {
        let events = vec![
            ModelEvent::ServiceUpsert(svc("a")),
            ModelEvent::ServiceUpsert(svc("b")),
            ModelEvent::ServiceDelete(ServiceName::new("ns", "a")),
        ];
        let (tx, rx) = zone_channel();
        let tee = Box::new(DnsTee {
            inner: Box::new(Fixed(events.clone())),
            zone: tx,
            served_here: None,
        });
        let (out_tx, out_rx) = mpsc::channel();
        tee.run(out_tx).expect("tee runs");
        assert_eq!(out_rx.try_iter().collect::<Vec<_>>(), events);
        let zone = Zone::new("cluster.local", DEFAULT_TTL).expect("domain");
        let data = rx.borrow().clone();
        let q = |n: &str| zone.lookup(&data, &Name::from_ascii(n).expect("name"), RecordType::A);
        assert_eq!(q("a.ns.svc.cluster.local."), ZoneAnswer::NxDomain);
        assert!(
            matches!(q("b.ns.svc.cluster.local."), ZoneAnswer::Found { ref answers, .. } if answers.len() == 1)
        );
    }

    #[test]
    fn the_address_served_here_is_kept_from_the_dataplane_but_resolves_in_dns() {
        let dns_ip = std::net::Ipv4Addr::new(10, 96, 0, 1);
        let (tx, rx) = zone_channel();
        let tee = Box::new(DnsTee {
            inner: Box::new(Fixed(vec![ModelEvent::ServiceUpsert(svc("kube-dns"))])),
            zone: tx,
            served_here: Some(dns_ip),
        });
        let (out_tx, out_rx) = mpsc::channel();
        tee.run(out_tx).expect("tee runs");
        match out_rx.try_iter().collect::<Vec<_>>().as_slice() {
            [ModelEvent::ServiceUpsert(s)] => assert!(s.cluster_ips.is_empty(), "{s:?}"),
            other => panic!("{other:?}"),
        }
        let zone = Zone::new("cluster.local", DEFAULT_TTL).expect("domain");
        let data = rx.borrow().clone();
        let name = Name::from_ascii("kube-dns.ns.svc.cluster.local.").expect("name");
        assert!(matches!(
            zone.lookup(&data, &name, RecordType::A),
            ZoneAnswer::Found { ref answers, .. } if answers.len() == 1
        ));
    }
}
