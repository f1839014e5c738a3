//! Kubernetes Events the kubelet records (`kubectl describe pod` shows them), with upstream's correlation:
//! - the same event again bumps `count` and `lastTimestamp` of the existing object instead of creating a new one;
//! - events that differ only in their message (a probe's output, say) are combined once ten distinct messages
//!   were seen within ten minutes: one event, message `(combined from similar events): <latest>`, whose count
//!   grows;
//! - a spam filter per involved object (a token bucket: 25 at once, then one per five minutes) drops what goes
//!   over; a dropped repeat still counts, so the next one sent carries the full count.
//!
//! Ref: client-go `tools/record` (`EventCorrelator`: `EventAggregator` with `defaultAggregateMaxEvents` 10 and
//! `defaultAggregateIntervalInSeconds` 600, `eventLogger.eventObserve` with key = source, involved object, type,
//! reason, message, `EventSourceObjectSpamFilter` with `defaultSpamBurst` 25 and `defaultSpamQPS` 1/300; event
//! name `<object>.<hex nanoseconds>`) and the kubelet's reasons in `pkg/kubelet/events`.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

/// Reasons the kubelet uses (upstream `pkg/kubelet/events`).
pub mod reasons {
    pub const PULLING: &str = "Pulling";
    pub const PULLED: &str = "Pulled";
    pub const FAILED: &str = "Failed";
    pub const BACK_OFF: &str = "BackOff";
    pub const CREATED: &str = "Created";
    pub const STARTED: &str = "Started";
    pub const KILLING: &str = "Killing";
    pub const UNHEALTHY: &str = "Unhealthy";
    pub const FAILED_MOUNT: &str = "FailedMount";
    pub const FAILED_CREATE_POD_SANDBOX: &str = "FailedCreatePodSandBox";
    pub const SANDBOX_CHANGED: &str = "SandboxChanged";
    pub const FAILED_PRE_STOP_HOOK: &str = "FailedPreStopHook";
    pub const FAILED_POST_START_HOOK: &str = "FailedPostStartHook";
    pub const INVALID_ENV_VAR_NAMES: &str = "InvalidEnvironmentVariableNames";
    pub const NODE_READY: &str = "NodeReady";
    pub const NODE_NOT_READY: &str = "NodeNotReady";
    pub const STARTING: &str = "Starting";
}

/// `Normal` or `Warning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// What to send to the API for one recorded event.
#[derive(Debug, Clone, PartialEq)]
pub enum EventAction {
    /// A new Event object.
    Create(Event),
    /// The existing Event with a higher count (upstream patches count/lastTimestamp/message).
    Update(Event),
}

/// A reference to a pod, or to one of its containers (`fieldPath: spec.containers{name}`).
pub fn pod_ref(pod: &Pod, container: Option<&str>) -> ObjectReference {
    let field_path = container.map(|c| {
        let is_init = pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|i| i.iter().any(|ic| ic.name == c));
        if is_init {
            format!("spec.initContainers{{{c}}}")
        } else {
            format!("spec.containers{{{c}}}")
        }
    });
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        uid: pod.metadata.uid.clone(),
        resource_version: pod.metadata.resource_version.clone(),
        field_path,
    }
}

/// The Node as an event's subject.
pub fn node_ref(node_name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node_name.into()),
        uid: Some(node_name.into()),
        ..Default::default()
    }
}

type Key = (
    String,
    String,
    String,
    String,
    String,
    EventType,
    String,
    String,
);

/// The involved object: kind, namespace, name, UID (the spam filter's key).
type ObjectKey = (String, String, String, String);

/// The aggregation key: the object, the type and the reason (not the container, not the message).
type AggregateKey = (ObjectKey, EventType, String);

/// Distinct messages seen for one [`AggregateKey`] in the current interval.
#[derive(Debug)]
struct Similar {
    messages: HashSet<String>,
    last: Timestamp,
}

/// Tokens left for one object.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Timestamp,
}

/// Distinct messages of similar events before they are combined (upstream `defaultAggregateMaxEvents`).
const AGGREGATE_MAX_EVENTS: usize = 10;
/// How long similar events are remembered for combining (upstream `defaultAggregateIntervalInSeconds`).
const AGGREGATE_INTERVAL_SECS: i64 = 600;
/// Events an object may get at once (upstream `defaultSpamBurst`).
const SPAM_BURST: f64 = 25.0;
/// Seconds per token after the burst (upstream `defaultSpamQPS` = 1/300).
const SPAM_REFILL_SECS: f64 = 300.0;

/// Records events for one kubelet, aggregating repeats; the caches are bounded (upstream's LRUs hold 4096).
#[derive(Debug)]
pub struct EventRecorder {
    node_name: String,
    seen: HashMap<Key, Event>,
    similar: HashMap<AggregateKey, Similar>,
    buckets: HashMap<ObjectKey, Bucket>,
    capacity: usize,
}

impl EventRecorder {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            seen: HashMap::new(),
            similar: HashMap::new(),
            buckets: HashMap::new(),
            capacity: 4096,
        }
    }

    /// Records one occurrence at `now`; what to send, or `None` when the spam filter drops it.
    pub fn record(
        &mut self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
        now: Timestamp,
    ) -> Option<EventAction> {
        let action = self.observe(object, type_, reason, message, now);
        self.allow(object, now).then_some(action)
    }

    /// Whether the object's bucket has a token left (taking it).
    fn allow(&mut self, object: &ObjectReference, now: Timestamp) -> bool {
        let key = object_key(object);
        if self.buckets.len() >= self.capacity && !self.buckets.contains_key(&key) {
            // A full bucket is what an object not seen for a while would have anyway.
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.at)
                .map(|(k, _)| k.clone())
            {
                self.buckets.remove(&oldest);
            }
        }
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens: SPAM_BURST,
            at: now,
        });
        let elapsed = now.duration_since(b.at).as_secs_f64().max(0.0);
        b.tokens = (b.tokens + elapsed / SPAM_REFILL_SECS).min(SPAM_BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Upstream's `EventAggregate` + `eventObserve`: the event as it should read, aggregated with what was seen.
    fn observe(
        &mut self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
        now: Timestamp,
    ) -> EventAction {
        let agg_key: AggregateKey = (object_key(object), type_, reason.to_string());
        if self.similar.len() >= self.capacity && !self.similar.contains_key(&agg_key) {
            if let Some(oldest) = self
                .similar
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone())
            {
                self.similar.remove(&oldest);
            }
        }
        let similar = self.similar.entry(agg_key).or_insert_with(|| Similar {
            messages: HashSet::new(),
            last: now,
        });
        if now.duration_since(similar.last).as_secs() > AGGREGATE_INTERVAL_SECS {
            similar.messages.clear();
        }
        similar.last = now;
        similar.messages.insert(message.to_string());
        let combined = similar.messages.len() >= AGGREGATE_MAX_EVENTS;
        if combined {
            // Keep the set at its limit, as upstream does, so it stays combined while similar events go on.
            if let Some(any) = similar.messages.iter().next().cloned() {
                similar.messages.remove(&any);
            }
        }
        let (field_path, key_message, message) = if combined {
            (
                String::new(),
                String::new(),
                format!("(combined from similar events): {message}"),
            )
        } else {
            (
                object.field_path.clone().unwrap_or_default(),
                message.to_string(),
                message.to_string(),
            )
        };
        let (kind, namespace, name, uid) = object_key(object);
        let key: Key = (
            kind,
            namespace,
            name,
            uid,
            field_path,
            type_,
            reason.to_string(),
            key_message,
        );
        let message = message.as_str();
        if let Some(existing) = self.seen.get_mut(&key) {
            existing.count = Some(existing.count.unwrap_or(1) + 1);
            existing.last_timestamp = Some(Time(now));
            existing.message = Some(message.into());
            existing.involved_object = object.clone();
            return EventAction::Update(existing.clone());
        }
        if self.seen.len() >= self.capacity {
            // Forget the stalest entry; a repeat of it just starts a new Event, as after upstream's LRU eviction.
            if let Some(oldest) = self
                .seen
                .iter()
                .min_by_key(|(_, e)| e.last_timestamp.as_ref().map(|t| t.0))
                .map(|(k, _)| k.clone())
            {
                self.seen.remove(&oldest);
            }
        }
        let name = format!(
            "{}.{:x}",
            object.name.as_deref().unwrap_or("unknown"),
            now.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(
                    object
                        .namespace
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| "default".into()),
                ),
                ..Default::default()
            },
            involved_object: object.clone(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(type_.as_str().into()),
            source: Some(EventSource {
                component: Some("kubelet".into()),
                host: Some(self.node_name.clone()),
            }),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            count: Some(1),
            reporting_component: Some("kubelet".into()),
            reporting_instance: Some(self.node_name.clone()),
            ..Default::default()
        };
        self.seen.insert(key, event.clone());
        EventAction::Create(event)
    }

    /// Forgets a deleted pod's events (keeps the cache small).
    pub fn forget_object(&mut self, uid: &str) {
        self.seen.retain(|k, _| k.3 != uid);
        self.similar.retain(|k, _| k.0 .3 != uid);
        self.buckets.retain(|k, _| k.3 != uid);
    }
}

fn object_key(object: &ObjectReference) -> ObjectKey {
    (
        object.kind.clone().unwrap_or_default(),
        object.namespace.clone().unwrap_or_default(),
        object.name.clone().unwrap_or_default(),
        object.uid.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                init_containers: Some(vec![k8s_openapi::api::core::v1::Container {
                    name: "setup".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    #[test]
    fn repeats_are_aggregated_into_one_event_with_a_count() {
        let mut r = EventRecorder::new("node-a");
        let obj = pod_ref(&pod(), Some("app"));
        assert_eq!(obj.field_path.as_deref(), Some("spec.containers{app}"));
        let Some(EventAction::Create(first)) = r.record(
            &obj,
            EventType::Warning,
            reasons::BACK_OFF,
            "Back-off restarting failed container",
            ts(0),
        ) else {
            panic!("first occurrence creates");
        };
        assert_eq!(first.metadata.namespace.as_deref(), Some("shop"));
        assert!(first.metadata.name.as_deref().unwrap().starts_with("web."));
        assert_eq!(
            first.source.as_ref().unwrap().host.as_deref(),
            Some("node-a")
        );
        assert_eq!(first.type_.as_deref(), Some("Warning"));
        let Some(EventAction::Update(again)) = r.record(
            &obj,
            EventType::Warning,
            reasons::BACK_OFF,
            "Back-off restarting failed container",
            ts(30),
        ) else {
            panic!("a repeat updates");
        };
        assert_eq!(again.metadata.name, first.metadata.name);
        assert_eq!(again.count, Some(2));
        assert_eq!(again.first_timestamp, Some(Time(ts(0))));
        assert_eq!(again.last_timestamp, Some(Time(ts(30))));
        assert!(matches!(
            r.record(
                &obj,
                EventType::Normal,
                reasons::STARTED,
                "Started container app",
                ts(31)
            ),
            Some(EventAction::Create(_))
        ));
        r.forget_object("u1");
        assert!(matches!(
            r.record(
                &obj,
                EventType::Warning,
                reasons::BACK_OFF,
                "Back-off restarting failed container",
                ts(40)
            ),
            Some(EventAction::Create(_))
        ));
    }

    #[test]
    fn init_containers_and_nodes_are_referenced_like_upstream() {
        assert_eq!(
            pod_ref(&pod(), Some("setup")).field_path.as_deref(),
            Some("spec.initContainers{setup}")
        );
        let n = node_ref("node-a");
        assert_eq!(
            (n.kind.as_deref(), n.name.as_deref()),
            (Some("Node"), Some("node-a"))
        );
        let mut r = EventRecorder::new("node-a");
        let Some(EventAction::Create(e)) = r.record(
            &n,
            EventType::Normal,
            reasons::NODE_READY,
            "Node node-a status is now: NodeReady",
            ts(0),
        ) else {
            panic!()
        };
        assert_eq!(e.metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn the_cache_stays_bounded() {
        let mut r = EventRecorder::new("n");
        r.capacity = 3;
        let obj = pod_ref(&pod(), None);
        for i in 0..10 {
            r.record(&obj, EventType::Normal, "R", &format!("m{i}"), ts(i));
        }
        assert_eq!(r.seen.len(), 3);
    }

    #[test]
    fn probe_failures_with_changing_output_are_combined_after_ten_messages() {
        let mut r = EventRecorder::new("n");
        let obj = pod_ref(&pod(), Some("app"));
        let mut names = HashSet::new();
        for i in 0..9 {
            let msg = format!("Liveness probe failed: took {i} ms");
            let Some(EventAction::Create(e)) =
                r.record(&obj, EventType::Warning, reasons::UNHEALTHY, &msg, ts(i))
            else {
                panic!("distinct messages are distinct events at first");
            };
            names.insert(e.metadata.name.unwrap());
        }
        assert_eq!(names.len(), 9);
        let Some(EventAction::Create(combined)) = r.record(
            &obj,
            EventType::Warning,
            reasons::UNHEALTHY,
            "Liveness probe failed: took 9 ms",
            ts(9),
        ) else {
            panic!("the tenth distinct message starts the combined event");
        };
        assert_eq!(
            combined.message.as_deref(),
            Some("(combined from similar events): Liveness probe failed: took 9 ms")
        );
        let Some(EventAction::Update(more)) = r.record(
            &obj,
            EventType::Warning,
            reasons::UNHEALTHY,
            "Liveness probe failed: took 10 ms",
            ts(10),
        ) else {
            panic!("further similar events bump the combined one");
        };
        assert_eq!(more.metadata.name, combined.metadata.name);
        assert_eq!(more.count, Some(2));
        assert!(more.message.unwrap().ends_with("took 10 ms"));
        // Ten minutes later the similarity is forgotten.
        assert!(matches!(
            r.record(
                &obj,
                EventType::Warning,
                reasons::UNHEALTHY,
                "Liveness probe failed: took 11 ms",
                ts(10 + 601 + 3600),
            ),
            Some(EventAction::Create(e)) if !e.message.as_deref().unwrap_or_default().starts_with("(combined")
        ));
    }

    #[test]
    fn an_object_gets_25_events_at_once_then_one_per_five_minutes_and_counts_keep_going() {
        let mut r = EventRecorder::new("n");
        let obj = pod_ref(&pod(), Some("app"));
        let msg = "Readiness probe failed: connection refused";
        let sent = (0..40)
            .filter(|i| {
                r.record(&obj, EventType::Warning, reasons::UNHEALTHY, msg, ts(*i))
                    .is_some()
            })
            .count();
        assert_eq!(sent, 25, "the burst, then nothing within 40 s");
        // Five minutes on, one more goes out, carrying every occurrence so far.
        let Some(EventAction::Update(e)) = r.record(
            &obj,
            EventType::Warning,
            reasons::UNHEALTHY,
            msg,
            ts(40 + 300),
        ) else {
            panic!("a token came back after five minutes");
        };
        assert_eq!(e.count, Some(41));
        assert!(r
            .record(&obj, EventType::Warning, reasons::UNHEALTHY, msg, ts(341))
            .is_none());
        // Other objects have buckets of their own.
        let mut other = pod();
        other.metadata.uid = Some("u2".into());
        assert!(r
            .record(
                &pod_ref(&other, None),
                EventType::Normal,
                reasons::STARTED,
                "Started",
                ts(341)
            )
            .is_some());
    }
}
