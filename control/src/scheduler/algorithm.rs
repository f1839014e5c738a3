//! Filter and score, as kube-scheduler's default profile does.
//!
//! Filters run in upstream's plugin order and stop at the first failing plugin per node (upstream's default,
//! `runAllFilters=false`): NodeUnschedulable, NodeName, TaintToleration, NodeAffinity (nodeSelector + required
//! affinity), NodePorts, NodeResourcesFit. Scores are each normalised to 0..=100 and weighted like the default
//! plugins: TaintToleration 3, NodeAffinity 2, spreading 2 (the weight of PodTopologySpread, whose system default
//! constraint spreads by hostname), NodeResourcesFit (LeastAllocated) 1, NodeResourcesBalancedAllocation 1. The
//! best total wins; ties are broken uniformly at random (upstream `selectHost`, reservoir sampling).
//!
//! Like upstream's `percentageOfNodesToScore`, filtering stops once enough feasible nodes are found (adaptive: 50%
//! minus 1% per 125 nodes, at least 5% and at least 100 nodes; every node below 100), starting where the previous
//! pod stopped so all nodes get their turn. [`Scheduler::set_percentage_of_nodes_to_score`] with 100 scores all.

use std::collections::BTreeMap;
use std::fmt;

use super::cache::{Cache, NodeInfo, TAINT_UNSCHEDULABLE};
use super::pod::{tolerates, PodRequest};

pub(crate) const MAX_NODE_SCORE: i64 = 100;
const WEIGHT_TAINT: i64 = 3;
const WEIGHT_AFFINITY: i64 = 2;
const WEIGHT_SPREAD: i64 = 2;
const WEIGHT_LEAST_ALLOCATED: i64 = 1;
const WEIGHT_BALANCED: i64 = 1;
const MIN_FEASIBLE_NODES_TO_FIND: usize = 100;
const MIN_FEASIBLE_NODES_PERCENTAGE: usize = 5;

/// Why a node was filtered out; turned into upstream's reason strings only when a pod fits nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    Unschedulable,
    NodeName,
    /// Node index and taint index of the first untolerated NoSchedule/NoExecute taint.
    Taint(u32, u32),
    Affinity,
    Ports,
    /// Bits: 1 too many pods, 2 cpu, 4 memory.
    Resources(u8),
}

/// A pod fits on no node: upstream `FitError`, printed like kube-scheduler's FailedScheduling message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FitError {
    pub num_all_nodes: usize,
    /// Reason → number of nodes rejected for it (one node may count under several resource reasons).
    pub reasons: BTreeMap<String, usize>,
}

impl fmt::Display for FitError {
    /// Upstream `FitError.Error`: `0/N nodes are available: ` then "count reason" strings sorted as strings,
    /// joined by ", ", ending with ".".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0/{} nodes are available:", self.num_all_nodes)?;
        let mut parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect();
        parts.sort();
        if !parts.is_empty() {
            write!(f, " {}.", parts.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for FitError {}

/// Why a pod could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// Upstream `ErrNoNodesAvailable`.
    #[error("no nodes available to schedule pods")]
    NoNodes,
    #[error(transparent)]
    Unfit(#[from] FitError),
}

/// Where a pod goes, and how much work it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub node: String,
    pub evaluated_nodes: usize,
    pub feasible_nodes: usize,
}

/// The scheduling algorithm with its reusable scratch buffers and tie-break randomness.
#[derive(Debug)]
pub struct Scheduler {
    percentage_of_nodes_to_score: Option<u8>,
    next_start: usize,
    rng: u64,
    feasible: Vec<u32>,
    raw: Vec<[i64; 5]>,
    rejects: Vec<Reject>,
}

impl Default for Scheduler {
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64);
        Scheduler::with_seed(seed)
    }
}

impl Scheduler {
    /// Deterministic tie-breaking for tests and benchmarks.
    pub fn with_seed(seed: u64) -> Scheduler {
        Scheduler {
            percentage_of_nodes_to_score: None,
            next_start: 0,
            rng: seed,
            feasible: Vec::new(),
            raw: Vec::new(),
            rejects: Vec::new(),
        }
    }

    /// Upstream `percentageOfNodesToScore`: `None` (or 0) is adaptive, 100 evaluates every node.
    pub fn set_percentage_of_nodes_to_score(&mut self, pct: Option<u8>) {
        self.percentage_of_nodes_to_score = pct.filter(|p| *p > 0).map(|p| p.min(100));
    }

    /// Upstream `numFeasibleNodesToFind`.
    fn feasible_to_find(&self, all: usize) -> usize {
        if all < MIN_FEASIBLE_NODES_TO_FIND || self.percentage_of_nodes_to_score == Some(100) {
            return all;
        }
        let pct = match self.percentage_of_nodes_to_score {
            Some(p) => usize::from(p),
            None => 50usize
                .saturating_sub(all / 125)
                .max(MIN_FEASIBLE_NODES_PERCENTAGE),
        };
        (all * pct / 100).max(MIN_FEASIBLE_NODES_TO_FIND)
    }

    /// Picks a node for `pod` among the cache's nodes. Does not change the cache: call [`Cache::assume`] with the
    /// result once the pod is to be bound.
    pub fn schedule(
        &mut self,
        cache: &Cache,
        pod: &PodRequest,
    ) -> Result<Placement, ScheduleError> {
        let total = cache.nodes.len();
        let all = cache.node_count();
        if all == 0 {
            return Err(ScheduleError::NoNodes);
        }
        let want = self.feasible_to_find(all);
        self.feasible.clear();
        self.rejects.clear();
        let start = self.next_start % total;
        let mut visited = 0;
        for step in 0..total {
            let i = (start + step) % total;
            visited = step + 1;
            let node = &cache.nodes[i];
            if !node.present {
                continue;
            }
            match filter(pod, node, i) {
                None => {
                    self.feasible.push(i as u32);
                    if self.feasible.len() >= want {
                        break;
                    }
                }
                Some(r) => self.rejects.push(r),
            }
        }
        self.next_start = (start + visited) % total;
        if self.feasible.is_empty() {
            return Err(self.fit_error(cache, all).into());
        }
        let owner = pod.owner.as_deref().and_then(|o| cache.owner_id(o));
        let feasible = std::mem::take(&mut self.feasible);
        let best = self.score(cache, pod, owner, &feasible);
        let evaluated = feasible.len() + self.rejects.len();
        let placement = Placement {
            node: cache.nodes[best].name.clone(),
            evaluated_nodes: evaluated,
            feasible_nodes: feasible.len(),
        };
        self.feasible = feasible;
        Ok(placement)
    }

    fn score(
        &mut self,
        cache: &Cache,
        pod: &PodRequest,
        owner: Option<u32>,
        feasible: &[u32],
    ) -> usize {
        if feasible.len() == 1 {
            return feasible[0] as usize;
        }
        // Raw per-plugin scores first, then normalise the ones upstream normalises against the max over nodes.
        self.raw.clear();
        let (mut max_taint, mut max_aff, mut max_spread) = (0, 0, 0);
        let balanced_applies = pod.requests.milli_cpu > 0 || pod.requests.memory > 0;
        for &i in feasible {
            let n = &cache.nodes[i as usize];
            let taint = intolerable_prefer_no_schedule(pod, n);
            let aff: i64 = pod
                .preferred
                .iter()
                .filter(|(_, t)| t.matches(&n.name, &n.labels))
                .map(|(w, _)| *w)
                .sum();
            let spread = owner.map_or(0, |o| i64::from(n.owner_count(o)));
            max_taint = max_taint.max(taint);
            max_aff = max_aff.max(aff);
            max_spread = max_spread.max(spread);
            let least = least_allocated(pod, n);
            let balanced = if balanced_applies {
                balanced_allocation(pod, n)
            } else {
                0
            };
            self.raw.push([taint, aff, spread, least, balanced]);
        }
        let mut best_score = i64::MIN;
        let mut best = feasible[0] as usize;
        let mut ties = 0u64;
        for (k, &[taint, aff, spread, least, balanced]) in self.raw.iter().enumerate() {
            // TaintToleration: DefaultNormalizeScore(reverse) — fewer intolerable taints is better.
            let taint = if max_taint == 0 {
                MAX_NODE_SCORE
            } else {
                MAX_NODE_SCORE - taint * MAX_NODE_SCORE / max_taint
            };
            // NodeAffinity: DefaultNormalizeScore — all zero when no preferred term matches anywhere.
            let aff = if max_aff == 0 {
                0
            } else {
                aff * MAX_NODE_SCORE / max_aff
            };
            // Spreading (SelectorSpread's node part): fewer replicas of the same owner is better.
            let spread = if max_spread == 0 {
                MAX_NODE_SCORE
            } else {
                MAX_NODE_SCORE * (max_spread - spread) / max_spread
            };
            let total = WEIGHT_TAINT * taint
                + WEIGHT_AFFINITY * aff
                + WEIGHT_SPREAD * spread
                + WEIGHT_LEAST_ALLOCATED * least
                + WEIGHT_BALANCED * balanced;
            if total > best_score {
                best_score = total;
                best = feasible[k] as usize;
                ties = 1;
            } else if total == best_score {
                ties += 1;
                if next_random(&mut self.rng) % ties == 0 {
                    best = feasible[k] as usize;
                }
            }
        }
        best
    }

    fn fit_error(&self, cache: &Cache, all: usize) -> FitError {
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut bump = |r: String| *reasons.entry(r).or_insert(0) += 1;
        for r in &self.rejects {
            match *r {
                Reject::Unschedulable => bump("node(s) were unschedulable".into()),
                Reject::NodeName => bump("node(s) didn't match the requested node name".into()),
                Reject::Affinity => {
                    bump("node(s) didn't match Pod's node affinity/selector".into())
                }
                Reject::Ports => {
                    bump("node(s) didn't have free ports for the requested pod ports".into())
                }
                Reject::Taint(n, t) => {
                    let t = &cache.nodes[n as usize].taints[t as usize];
                    bump(format!(
                        "node(s) had untolerated taint {{{}: {}}}",
                        t.key, t.value
                    ));
                }
                Reject::Resources(bits) => {
                    if bits & 1 != 0 {
                        bump("Too many pods".into());
                    }
                    if bits & 2 != 0 {
                        bump("Insufficient cpu".into());
                    }
                    if bits & 4 != 0 {
                        bump("Insufficient memory".into());
                    }
                }
            }
        }
        FitError {
            num_all_nodes: all,
            reasons,
        }
    }
}

/// splitmix64: tie-breaking needs speed and spread, not cryptographic strength.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// All filters in upstream's order; `None` means the node is feasible.
fn filter(pod: &PodRequest, n: &NodeInfo, index: usize) -> Option<Reject> {
    // NodeUnschedulable: cordoned nodes take only pods tolerating the unschedulable taint.
    if n.unschedulable
        && !pod
            .tolerations
            .iter()
            .any(|t| tolerates(t, TAINT_UNSCHEDULABLE, "", "NoSchedule"))
    {
        return Some(Reject::Unschedulable);
    }
    // NodeName.
    if pod.node_name.as_deref().is_some_and(|want| want != n.name) {
        return Some(Reject::NodeName);
    }
    // TaintToleration: the first NoSchedule/NoExecute taint no toleration covers.
    if n.has_hard_taints {
        for (ti, t) in n.taints.iter().enumerate() {
            if (t.effect == "NoSchedule" || t.effect == "NoExecute")
                && !pod
                    .tolerations
                    .iter()
                    .any(|tol| tolerates(tol, &t.key, &t.value, &t.effect))
            {
                return Some(Reject::Taint(index as u32, ti as u32));
            }
        }
    }
    // NodeAffinity: nodeSelector and required terms (ORed) must both match.
    if !pod
        .node_selector
        .iter()
        .all(|(k, v)| n.labels.get(k) == Some(v))
    {
        return Some(Reject::Affinity);
    }
    if let Some(terms) = &pod.required {
        if !terms.iter().any(|t| t.matches(&n.name, &n.labels)) {
            return Some(Reject::Affinity);
        }
    }
    // NodePorts.
    if pod
        .host_ports
        .iter()
        .any(|p| n.host_ports.iter().any(|q| p.conflicts(q)))
    {
        return Some(Reject::Ports);
    }
    // NodeResourcesFit: every shortage is reported, as upstream's Fits returns all insufficient resources.
    let mut bits = 0u8;
    if n.pod_count + 1 > n.allowed_pods {
        bits |= 1;
    }
    if pod.requests.milli_cpu > 0
        && pod.requests.milli_cpu > n.allocatable.milli_cpu - n.requested.milli_cpu
    {
        bits |= 2;
    }
    if pod.requests.memory > 0 && pod.requests.memory > n.allocatable.memory - n.requested.memory {
        bits |= 4;
    }
    if bits != 0 {
        return Some(Reject::Resources(bits));
    }
    None
}

fn intolerable_prefer_no_schedule(pod: &PodRequest, n: &NodeInfo) -> i64 {
    if !n.has_soft_taints {
        return 0;
    }
    n.taints
        .iter()
        .filter(|t| t.effect == "PreferNoSchedule")
        .filter(|t| {
            !pod.tolerations.iter().any(|tol| {
                // Upstream only counts tolerations with an empty or PreferNoSchedule effect here.
                tol.effect
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || e == "PreferNoSchedule")
                    && tolerates(tol, &t.key, &t.value, &t.effect)
            })
        })
        .count() as i64
}

/// Upstream `leastResourceScorer` over cpu and memory (weight 1 each) with non-zero requests.
fn least_allocated(pod: &PodRequest, n: &NodeInfo) -> i64 {
    let one = |requested: i64, capacity: i64| {
        if capacity <= 0 || requested > capacity {
            0
        } else {
            (capacity - requested) * MAX_NODE_SCORE / capacity
        }
    };
    let cpu = one(
        n.non_zero_requested.milli_cpu + pod.non_zero.milli_cpu,
        n.allocatable.milli_cpu,
    );
    let mem = one(
        n.non_zero_requested.memory + pod.non_zero.memory,
        n.allocatable.memory,
    );
    (cpu + mem) / 2
}

/// Upstream `balancedResourceScorer`: 100 × (1 − standard deviation of the requested fractions); for two
/// resources the deviation is |cpu − memory| / 2. Uses actual requests (upstream `useRequested`).
fn balanced_allocation(pod: &PodRequest, n: &NodeInfo) -> i64 {
    let frac = |requested: i64, capacity: i64| {
        if capacity <= 0 {
            return 1.0;
        }
        (requested as f64 / capacity as f64).min(1.0)
    };
    let cpu = frac(
        n.requested.milli_cpu + pod.requests.milli_cpu,
        n.allocatable.milli_cpu,
    );
    let mem = frac(
        n.requested.memory + pod.requests.memory,
        n.allocatable.memory,
    );
    let std = (cpu - mem).abs() / 2.0;
    ((1.0 - std) * MAX_NODE_SCORE as f64) as i64
}
