//! Kubernetes Events the kubelet records (`kubectl describe pod` shows them), with upstream's aggregation: the
//! same event again bumps `count` and `lastTimestamp` of the existing object instead of creating a new one.
//!
//! Ref: client-go `tools/record` (`EventCorrelator`, `eventObserve`: key = source, involved object, type, reason,
//! message; event name `<object>.<hex nanoseconds>`) and the kubelet's reasons in `pkg/kubelet/events`.

use std::collections::HashMap;

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

/// Records events for one kubelet, aggregating repeats; the cache is bounded (upstream's LRU holds 4096).
#[derive(Debug)]
pub struct EventRecorder {
    node_name: String,
    seen: HashMap<Key, Event>,
    capacity: usize,
}

impl EventRecorder {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            seen: HashMap::new(),
            capacity: 4096,
        }
    }

    /// Records one occurrence at `now`.
    pub fn record(
        &mut self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
        now: Timestamp,
    ) -> EventAction {
        let key: Key = (
            object.kind.clone().unwrap_or_default(),
            object.namespace.clone().unwrap_or_default(),
            object.name.clone().unwrap_or_default(),
            object.uid.clone().unwrap_or_default(),
            object.field_path.clone().unwrap_or_default(),
            type_,
            reason.to_string(),
            message.to_string(),
        );
        if let Some(existing) = self.seen.get_mut(&key) {
            existing.count = Some(existing.count.unwrap_or(1) + 1);
            existing.last_timestamp = Some(Time(now));
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
    }
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
        let EventAction::Create(first) = r.record(
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
        let EventAction::Update(again) = r.record(
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
            EventAction::Create(_)
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
            EventAction::Create(_)
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
        let EventAction::Create(e) = r.record(
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
}
