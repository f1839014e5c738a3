//! What the scheduler needs to know about a pod, computed once per pod so the per-node loop only compares numbers
//! and short strings.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, NodeSelectorTerm, Pod, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::quantity::parse_scaled;
use super::SchedulerError;

/// Requests used for scoring when a container sets none, as upstream's `schedutil.DefaultMilliCPURequest` and
/// `DefaultMemoryRequest`: without them best-effort pods would all pile onto one node.
pub(crate) const DEFAULT_MILLI_CPU_REQUEST: i64 = 100;
pub(crate) const DEFAULT_MEMORY_REQUEST: i64 = 200 * 1024 * 1024;

/// Cpu (millicores) and memory (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Resources {
    pub(crate) milli_cpu: i64,
    pub(crate) memory: i64,
}

impl Resources {
    pub(crate) fn add(&mut self, o: Resources) {
        self.milli_cpu += o.milli_cpu;
        self.memory += o.memory;
    }
    pub(crate) fn sub(&mut self, o: Resources) {
        self.milli_cpu -= o.milli_cpu;
        self.memory -= o.memory;
    }
    fn max(self, o: Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu.max(o.milli_cpu),
            memory: self.memory.max(o.memory),
        }
    }
}

/// A host port a pod wants: protocol, host IP (`None` = all addresses) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostPort {
    pub(crate) protocol: String,
    pub(crate) ip: Option<String>,
    pub(crate) port: i32,
}

impl HostPort {
    /// Upstream `HostPortInfo.CheckConflict`: same protocol and port, and either side on 0.0.0.0 or the same IP.
    pub(crate) fn conflicts(&self, o: &HostPort) -> bool {
        self.port == o.port
            && self.protocol == o.protocol
            && match (&self.ip, &o.ip) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Requirement {
    key: String,
    op: Op,
}

/// One `NodeSelectorTerm`: all expressions and fields must match (terms are ORed by the caller).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Term {
    labels: Vec<Requirement>,
    /// `matchFields`: only `metadata.name` exists upstream.
    name: Vec<Requirement>,
}

impl Term {
    fn parse(t: &NodeSelectorTerm) -> Result<Term, SchedulerError> {
        let mut term = Term::default();
        for r in t.match_expressions.iter().flatten() {
            term.labels
                .push(parse_requirement(&r.key, &r.operator, r.values.as_deref())?);
        }
        for r in t.match_fields.iter().flatten() {
            if r.key != "metadata.name" {
                return Err(SchedulerError::InvalidSelector(format!(
                    "unsupported matchFields key {:?}",
                    r.key
                )));
            }
            let req = parse_requirement(&r.key, &r.operator, r.values.as_deref())?;
            if !matches!(req.op, Op::In(_) | Op::NotIn(_)) {
                return Err(SchedulerError::InvalidSelector(format!(
                    "matchFields supports only In and NotIn, got {:?}",
                    r.operator
                )));
            }
            term.name.push(req);
        }
        Ok(term)
    }

    /// Upstream `nodeaffinity`: a term with no requirements matches no node.
    pub(crate) fn matches(&self, node_name: &str, labels: &BTreeMap<String, String>) -> bool {
        if self.labels.is_empty() && self.name.is_empty() {
            return false;
        }
        self.labels
            .iter()
            .all(|r| r.matches(labels.get(&r.key).map(String::as_str)))
            && self.name.iter().all(|r| r.matches(Some(node_name)))
    }
}

impl Requirement {
    fn matches(&self, value: Option<&str>) -> bool {
        match (&self.op, value) {
            (Op::In(vs), Some(v)) => vs.iter().any(|x| x == v),
            (Op::In(_), None) => false,
            // labels.Selector semantics: NotIn also matches nodes without the label.
            (Op::NotIn(vs), Some(v)) => !vs.iter().any(|x| x == v),
            (Op::NotIn(_), None) => true,
            (Op::Exists, v) => v.is_some(),
            (Op::DoesNotExist, v) => v.is_none(),
            (Op::Gt(n), Some(v)) => v.parse::<i64>().is_ok_and(|v| v > *n),
            (Op::Lt(n), Some(v)) => v.parse::<i64>().is_ok_and(|v| v < *n),
            (Op::Gt(_) | Op::Lt(_), None) => false,
        }
    }
}

fn parse_requirement(
    key: &str,
    operator: &str,
    values: Option<&[String]>,
) -> Result<Requirement, SchedulerError> {
    let values = values.unwrap_or_default();
    let bad =
        |why: &str| SchedulerError::InvalidSelector(format!("{key} {operator} {values:?}: {why}"));
    let single_int = || -> Result<i64, SchedulerError> {
        match values {
            [v] => v.parse().map_err(|_| bad("value must be an integer")),
            _ => Err(bad("exactly one value required")),
        }
    };
    let op = match operator {
        "In" | "NotIn" if values.is_empty() => return Err(bad("values must be non-empty")),
        "In" => Op::In(values.to_vec()),
        "NotIn" => Op::NotIn(values.to_vec()),
        "Exists" | "DoesNotExist" if !values.is_empty() => return Err(bad("values must be empty")),
        "Exists" => Op::Exists,
        "DoesNotExist" => Op::DoesNotExist,
        "Gt" => Op::Gt(single_int()?),
        "Lt" => Op::Lt(single_int()?),
        _ => return Err(bad("unknown operator")),
    };
    Ok(Requirement {
        key: key.to_owned(),
        op,
    })
}

/// Upstream `v1.Toleration.ToleratesTaint`.
pub(crate) fn tolerates(t: &Toleration, key: &str, value: &str, effect: &str) -> bool {
    if let Some(e) = t.effect.as_deref().filter(|e| !e.is_empty()) {
        if e != effect {
            return false;
        }
    }
    if let Some(k) = t.key.as_deref().filter(|k| !k.is_empty()) {
        if k != key {
            return false;
        }
    }
    match t.operator.as_deref().unwrap_or("Equal") {
        "" | "Equal" => t.value.as_deref().unwrap_or("") == value,
        "Exists" => true,
        _ => false,
    }
}

/// A pod as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct PodRequest {
    pub(crate) key: String,
    /// Requests as the fit filter counts them (upstream `computePodResourceRequest`).
    pub(crate) requests: Resources,
    /// Requests with per-container defaults for unset values, for least-allocated scoring.
    pub(crate) non_zero: Resources,
    pub(crate) host_ports: Vec<HostPort>,
    pub(crate) node_name: Option<String>,
    pub(crate) node_selector: Vec<(String, String)>,
    /// Required node affinity terms (ORed); `None` = no requirement.
    pub(crate) required: Option<Vec<Term>>,
    pub(crate) preferred: Vec<(i64, Term)>,
    pub(crate) tolerations: Vec<Toleration>,
    /// UID of the controlling owner (ownerReference with `controller: true`).
    pub(crate) owner: Option<String>,
}

impl PodRequest {
    /// Precomputes everything the filters and scores read. Fails on data the API server's validation would reject
    /// (bad quantities, unknown selector operators), naming the pod.
    pub fn from_pod(pod: &Pod) -> Result<PodRequest, SchedulerError> {
        let key = pod_key(pod);
        Self::build(pod, key.clone()).map_err(|e| SchedulerError::InvalidPod {
            pod: key,
            source: Box::new(e),
        })
    }

    /// `namespace/name` of the pod this was built from.
    pub fn key(&self) -> &str {
        &self.key
    }

    fn build(pod: &Pod, key: String) -> Result<PodRequest, SchedulerError> {
        let spec = pod.spec.as_ref().ok_or(SchedulerError::MissingSpec)?;
        let (requests, non_zero) = pod_requests(
            &spec.containers,
            spec.init_containers.as_deref(),
            spec.overhead.as_ref(),
        )?;
        let restartable_init = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always"));
        let mut host_ports = Vec::new();
        for c in spec.containers.iter().chain(restartable_init) {
            for p in c.ports.iter().flatten() {
                let Some(port) = p.host_port.filter(|p| *p > 0) else {
                    continue;
                };
                let ip = p
                    .host_ip
                    .clone()
                    .filter(|ip| !ip.is_empty() && ip != "0.0.0.0");
                host_ports.push(HostPort {
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    ip,
                    port,
                });
            }
        }
        let node_affinity = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref());
        let required = node_affinity
            .and_then(|na| {
                na.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .map(|ns| {
                ns.node_selector_terms
                    .iter()
                    .map(Term::parse)
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let preferred = node_affinity
            .and_then(|na| {
                na.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .into_iter()
            .flatten()
            .map(|p| Ok((i64::from(p.weight), Term::parse(&p.preference)?)))
            .collect::<Result<Vec<_>, SchedulerError>>()?;
        let owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .map(|o| o.uid.clone());
        Ok(PodRequest {
            key,
            requests,
            non_zero,
            host_ports,
            node_name: spec.node_name.clone().filter(|n| !n.is_empty()),
            node_selector: spec
                .node_selector
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            required,
            preferred,
            tolerations: spec.tolerations.clone().unwrap_or_default(),
            owner,
        })
    }
}

pub(crate) fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

fn container_requests(c: &Container) -> Result<(Resources, Resources), SchedulerError> {
    let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
    let get = |name: &str, scale: u32| -> Result<Option<i64>, SchedulerError> {
        requests
            .and_then(|r| r.get(name))
            .map(|q| parse_scaled(&q.0, scale))
            .transpose()
    };
    let cpu = get("cpu", 3)?;
    let mem = get("memory", 0)?;
    let req = Resources {
        milli_cpu: cpu.unwrap_or(0),
        memory: mem.unwrap_or(0),
    };
    let non_zero = Resources {
        milli_cpu: cpu.unwrap_or(DEFAULT_MILLI_CPU_REQUEST),
        memory: mem.unwrap_or(DEFAULT_MEMORY_REQUEST),
    };
    Ok((req, non_zero))
}

/// Upstream `resourcehelper.PodRequests`: the sum over app containers plus restartable (sidecar) init containers,
/// or the largest single init-container phase if that is bigger (an init container runs alone, next to the
/// sidecars started before it), plus the pod overhead.
fn pod_requests(
    containers: &[Container],
    init: Option<&[Container]>,
    overhead: Option<&BTreeMap<String, Quantity>>,
) -> Result<(Resources, Resources), SchedulerError> {
    let mut sum = (Resources::default(), Resources::default());
    for c in containers {
        let (r, nz) = container_requests(c)?;
        sum.0.add(r);
        sum.1.add(nz);
    }
    let mut sidecars = (Resources::default(), Resources::default());
    let mut init_max = (Resources::default(), Resources::default());
    for c in init.unwrap_or_default() {
        let (r, nz) = container_requests(c)?;
        if c.restart_policy.as_deref() == Some("Always") {
            sidecars.0.add(r);
            sidecars.1.add(nz);
            init_max = (init_max.0.max(sidecars.0), init_max.1.max(sidecars.1));
        } else {
            let (mut phase, mut phase_nz) = sidecars;
            phase.add(r);
            phase_nz.add(nz);
            init_max = (init_max.0.max(phase), init_max.1.max(phase_nz));
        }
    }
    sum.0.add(sidecars.0);
    sum.1.add(sidecars.1);
    let (mut req, mut nz) = (sum.0.max(init_max.0), sum.1.max(init_max.1));
    if let Some(o) = overhead {
        let get =
            |name: &str, scale: u32| o.get(name).map(|q| parse_scaled(&q.0, scale)).transpose();
        let extra = Resources {
            milli_cpu: get("cpu", 3)?.unwrap_or(0),
            memory: get("memory", 0)?.unwrap_or(0),
        };
        req.add(extra);
        nz.add(extra);
    }
    Ok((req, nz))
}
