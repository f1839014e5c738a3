//! Which unscheduled pod to try next, and when to retry one that fit nowhere — upstream's `PriorityQueue`
//! reduced to FIFO order (no priority classes yet).
//!
//! A pod that failed goes to the unschedulable set with its attempt count. Retrying it blindly would burn cpu
//! and spam events, so (as upstream) it moves back only when the cluster changes (a node added or updated, a pod
//! deleted: [`SchedulingQueue::cluster_changed`]) and its backoff has passed (1 s doubling to 10 s, upstream's
//! `podInitialBackoffSeconds`/`podMaxBackoffSeconds`), or after 5 minutes regardless
//! (`podMaxInUnschedulablePodsDuration`), in case the change was missed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_IN_UNSCHEDULABLE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
struct Failed {
    attempts: u32,
    failed_at: Instant,
}

/// Pods waiting to be scheduled, keyed by `namespace/name`.
#[derive(Debug, Default)]
pub struct SchedulingQueue {
    active: VecDeque<String>,
    queued: HashSet<String>,
    /// Failed pods eligible again once their backoff has passed.
    backoff: HashMap<String, Failed>,
    /// Failed pods waiting for a cluster change.
    unschedulable: HashMap<String, Failed>,
    attempts: HashMap<String, u32>,
}

/// Upstream `calculateBackoffDuration`: initial × 2^(attempts−1), capped.
pub fn backoff_for(attempts: u32) -> Duration {
    let shift = attempts.saturating_sub(1).min(16);
    INITIAL_BACKOFF.saturating_mul(1 << shift).min(MAX_BACKOFF)
}

impl SchedulingQueue {
    pub fn new() -> SchedulingQueue {
        SchedulingQueue::default()
    }

    /// A new or changed unscheduled pod: try it (again) soon. An update to a failed pod may make it fit, so it
    /// is retried like upstream does on pod updates, subject to backoff.
    pub fn add(&mut self, key: &str, now: Instant) {
        if let Some(f) = self.unschedulable.remove(key) {
            self.backoff.insert(key.to_owned(), f);
            self.flush(now);
            return;
        }
        if self.backoff.contains_key(key) {
            return;
        }
        if self.queued.insert(key.to_owned()) {
            self.active.push_back(key.to_owned());
        }
    }

    /// The pod was bound, deleted or got a node elsewhere: forget it.
    pub fn forget(&mut self, key: &str) {
        if self.queued.remove(key) {
            self.active.retain(|k| k != key);
        }
        self.backoff.remove(key);
        self.unschedulable.remove(key);
        self.attempts.remove(key);
    }

    /// Next pod to schedule, after moving pods whose backoff (or unschedulable timeout) has expired.
    pub fn pop(&mut self, now: Instant) -> Option<String> {
        self.flush(now);
        let key = self.active.pop_front()?;
        self.queued.remove(&key);
        Some(key)
    }

    /// The pod fit nowhere (or binding failed): park it until the cluster changes.
    pub fn failed(&mut self, key: &str, now: Instant) {
        let attempts = self.attempts.entry(key.to_owned()).or_insert(0);
        *attempts += 1;
        self.unschedulable.insert(
            key.to_owned(),
            Failed {
                attempts: *attempts,
                failed_at: now,
            },
        );
    }

    /// A node appeared or changed, or a pod went away: every parked pod may fit now.
    pub fn cluster_changed(&mut self, now: Instant) {
        let parked: Vec<_> = self.unschedulable.drain().collect();
        self.backoff.extend(parked);
        self.flush(now);
    }

    /// When the next backed-off pod becomes eligible, for the loop's timer.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let b = self
            .backoff
            .values()
            .map(|f| f.failed_at + backoff_for(f.attempts));
        let u = self
            .unschedulable
            .values()
            .map(|f| f.failed_at + MAX_IN_UNSCHEDULABLE);
        b.chain(u).min()
    }

    fn flush(&mut self, now: Instant) {
        let ready: Vec<String> = self
            .backoff
            .iter()
            .filter(|(_, f)| f.failed_at + backoff_for(f.attempts) <= now)
            .map(|(k, _)| k.clone())
            .chain(
                self.unschedulable
                    .iter()
                    .filter(|(_, f)| f.failed_at + MAX_IN_UNSCHEDULABLE <= now)
                    .map(|(k, _)| k.clone()),
            )
            .collect();
        for k in ready {
            self.backoff.remove(&k);
            self.unschedulable.remove(&k);
            if self.queued.insert(k.clone()) {
                self.active.push_back(k);
            }
        }
    }

    /// Pods in any state.
    pub fn len(&self) -> usize {
        self.active.len() + self.backoff.len() + self.unschedulable.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_up_to_ten() {
        let secs: Vec<u64> = (1..=6).map(|a| backoff_for(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn pods_come_out_in_arrival_order_once_each() {
        let now = Instant::now();
        let mut q = SchedulingQueue::new();
        q.add("ns/a", now);
        q.add("ns/b", now);
        q.add("ns/a", now);
        assert_eq!(q.pop(now).as_deref(), Some("ns/a"));
        assert_eq!(q.pop(now).as_deref(), Some("ns/b"));
        assert_eq!(q.pop(now), None);
    }

    #[test]
    fn failed_pod_waits_for_a_cluster_change_and_its_backoff() {
        let t0 = Instant::now();
        let mut q = SchedulingQueue::new();
        q.add("ns/a", t0);
        assert_eq!(q.pop(t0).as_deref(), Some("ns/a"));
        q.failed("ns/a", t0);
        assert_eq!(
            q.pop(t0 + Duration::from_secs(30)),
            None,
            "no change, no retry"
        );
        q.cluster_changed(t0 + Duration::from_millis(500));
        assert_eq!(
            q.pop(t0 + Duration::from_millis(900)),
            None,
            "still in its 1 s backoff"
        );
        assert_eq!(q.pop(t0 + Duration::from_secs(1)).as_deref(), Some("ns/a"));
        // Second failure: 2 s backoff.
        let t1 = t0 + Duration::from_secs(1);
        q.failed("ns/a", t1);
        q.cluster_changed(t1);
        assert_eq!(q.next_wakeup(), Some(t1 + Duration::from_secs(2)));
        assert_eq!(q.pop(t1 + Duration::from_secs(1)), None);
        assert_eq!(q.pop(t1 + Duration::from_secs(2)).as_deref(), Some("ns/a"));
    }

    #[test]
    fn parked_pods_are_retried_after_five_minutes_without_any_change() {
        let t0 = Instant::now();
        let mut q = SchedulingQueue::new();
        q.failed("ns/a", t0);
        assert_eq!(q.pop(t0 + Duration::from_secs(299)), None);
        assert_eq!(q.pop(t0 + MAX_IN_UNSCHEDULABLE).as_deref(), Some("ns/a"));
    }

    #[test]
    fn forgotten_pods_leave_every_state() {
        let t0 = Instant::now();
        let mut q = SchedulingQueue::new();
        q.add("ns/a", t0);
        q.failed("ns/b", t0);
        q.forget("ns/a");
        q.forget("ns/b");
        assert!(q.is_empty());
        assert_eq!(q.pop(t0 + MAX_IN_UNSCHEDULABLE), None);
    }
}
