//! Server-side apply and field ownership (`metadata.managedFields`).
//!
//! Ref: kubernetes `staging/src/k8s.io/apimachinery/pkg/util/managedfields/internal` (the field manager chain:
//! strip metadata, managed-fields updater, last-applied handling) over structured-merge-diff's `merge.Updater`:
//! - Apply: the configuration is merged into the live object; its field set becomes the manager's set; fields
//!   the manager applied before and leaves out now are removed unless another manager owns them; a field the
//!   configuration changes that another manager owns is a conflict unless `force`, which moves it.
//! - Update (PUT, patches, subresources): the fields that changed move to the updating manager.

mod set;
mod typed;

use serde_json::{json, Map, Value};

use super::objects;
use super::status::ApiError;
use set::{Path, Set};

/// The annotation client-side `kubectl apply` keeps (Ref: `corev1.LastAppliedConfigAnnotation`).
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// At most this many Update entries are kept; older ones merge into [`ANCIENT_CHANGES`] (Ref:
/// `internal.DefaultMaxUpdateManagers`, `capManagersManager`).
const MAX_UPDATE_MANAGERS: usize = 10;
const ANCIENT_CHANGES: &str = "ancient-changes";
/// The manager whose client-side apply conflicts are forgiven (Ref: `lastAppliedManager` only acts for it).
const KUBECTL_SSA: &str = "kubectl";

#[derive(Debug, thiserror::Error)]
pub(crate) enum FieldManagerError {
    #[error("metadata.managedFields must be nil")]
    ManagedFieldsInApply,
    #[error("Incorrect version specified in apply patch. Specified patch version: {got}, expected: {expected}")]
    ApplyVersion { got: String, expected: String },
    #[error("{}", conflict_message(.0))]
    Conflicts(Vec<Conflict>),
    #[error("failed to decode managed fields: {0}")]
    DecodeManagedFields(String),
    #[error("{0}")]
    InvalidObject(String),
}

impl From<FieldManagerError> for ApiError {
    fn from(e: FieldManagerError) -> Self {
        let message = e.to_string();
        match e {
            FieldManagerError::Conflicts(conflicts) => ApiError {
                code: 409,
                reason: "Conflict",
                message,
                details: Some(json!({
                    "causes": conflicts.iter().map(|c| json!({
                        "reason": "FieldManagerConflict",
                        "message": format!("conflict with {}", c.manager),
                        "field": set::display(&c.path),
                    })).collect::<Vec<_>>(),
                })),
            },
            FieldManagerError::InvalidObject(_) => ApiError {
                code: 422,
                reason: "Invalid",
                message,
                details: None,
            },
            FieldManagerError::DecodeManagedFields(_) => ApiError::internal(message),
            _ => ApiError::bad_request(message),
        }
    }
}

/// One field owned by another manager that an apply would change.
#[derive(Debug)]
pub(crate) struct Conflict {
    /// The manager as upstream prints it: `"kubectl-scale" with subresource "scale" using apps/v1`.
    manager: String,
    path: Path,
}

/// Ref: `internal.NewConflictError` / `getConflictMessage`.
fn conflict_message(conflicts: &[Conflict]) -> String {
    if let [c] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            c.manager,
            set::display(&c.path)
        );
    }
    let mut managers: Vec<&str> = conflicts.iter().map(|c| c.manager.as_str()).collect();
    managers.sort_unstable();
    managers.dedup();
    let mut lines = Vec::new();
    for m in managers {
        lines.push(format!("conflicts with {m}:"));
        for c in conflicts.iter().filter(|c| c.manager == m) {
            lines.push(format!("- {}", set::display(&c.path)));
        }
    }
    format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        lines.join("\n")
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Operation {
    Apply,
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Self::Apply => "Apply",
            Self::Update => "Update",
        }
    }
}

/// One `managedFields` entry, decoded.
#[derive(Clone, Debug)]
struct Entry {
    manager: String,
    operation: Operation,
    api_version: String,
    time: Option<String>,
    subresource: Option<String>,
    set: Set,
}

impl Entry {
    /// Upstream keeps one entry per (manager, operation, subresource) (and API version for updates; one per
    /// kind here, as Windlass serves one version of each).
    fn is(&self, manager: &str, operation: Operation, subresource: Option<&str>) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
    }

    /// Ref: `internal.printManager`.
    fn printed(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if let Some(sub) = &self.subresource {
            s.push_str(&format!(" with subresource {sub:?}"));
        }
        if self.operation == Operation::Update {
            s.push_str(&format!(" using {}", self.api_version));
        }
        s
    }

    /// Built field by field: `json!` would copy the `fieldsV1` tree through `to_value`.
    fn into_json(self) -> Value {
        let mut e = Map::new();
        e.insert("manager".into(), Value::String(self.manager));
        e.insert(
            "operation".into(),
            Value::String(self.operation.as_str().into()),
        );
        e.insert("apiVersion".into(), Value::String(self.api_version));
        e.insert("fieldsType".into(), Value::String("FieldsV1".into()));
        e.insert("fieldsV1".into(), self.set.into_fields_v1());
        if let Some(t) = self.time {
            e.insert("time".into(), Value::String(t));
        }
        if let Some(s) = self.subresource {
            e.insert("subresource".into(), Value::String(s));
        }
        Value::Object(e)
    }
}

impl Entry {
    /// Appends this entry's JSON to `out`: the bytes `serde_json` writes for [`Entry::into_json`] (members in
    /// key order), without building the tree.
    fn write_json(&self, out: &mut Vec<u8>) {
        // Writing strings into a Vec cannot fail.
        let string = |out: &mut Vec<u8>, key: &str, value: &str| {
            out.push(b'"');
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            let _ = serde_json::to_writer(&mut *out, value);
            out.push(b',');
        };
        out.push(b'{');
        string(out, "apiVersion", &self.api_version);
        string(out, "fieldsType", "FieldsV1");
        out.extend_from_slice(b"\"fieldsV1\":");
        self.set.write_fields_v1(out);
        out.push(b',');
        string(out, "manager", &self.manager);
        string(out, "operation", self.operation.as_str());
        if let Some(sub) = &self.subresource {
            string(out, "subresource", sub);
        }
        if let Some(t) = &self.time {
            string(out, "time", t);
        }
        // Every member above ends with a comma; the last one's becomes the closing brace.
        if let Some(last) = out.last_mut() {
            *last = b'}';
        }
    }
}

fn decode_entries(list: &[Value]) -> Result<Vec<Entry>, String> {
    let mut out: Vec<Entry> = Vec::with_capacity(list.len());
    for e in list {
        let mut entry = decode_entry(e)?;
        if let Some(v) = e.get("fieldsV1") {
            entry.set = Set::from_fields_v1(v)?;
        }
        push_entry(&mut out, entry)?;
    }
    Ok(out)
}

/// [`decode_entries`] of entries the caller gives up: their field sets are taken apart, not copied.
fn decode_owned_entries(list: Vec<Value>) -> Result<Vec<Entry>, String> {
    let mut out: Vec<Entry> = Vec::with_capacity(list.len());
    for mut e in list {
        let fields = e.as_object_mut().and_then(|m| m.remove("fieldsV1"));
        let mut entry = decode_entry(&e)?;
        if let Some(v) = fields {
            entry.set = Set::from_owned_fields_v1(v)?;
        }
        push_entry(&mut out, entry)?;
    }
    Ok(out)
}

/// One entry without its field set.
fn decode_entry(e: &Value) -> Result<Entry, String> {
    let s = |k: &str| e.get(k).and_then(Value::as_str).map(String::from);
    let manager = s("manager").unwrap_or_default();
    let operation = match s("operation").as_deref() {
        Some("Apply") => Operation::Apply,
        Some("Update") => Operation::Update,
        other => {
            return Err(format!(
                "unknown operation {other:?} of manager {manager:?}"
            ))
        }
    };
    if let Some(t) = s("fieldsType").filter(|t| t != "FieldsV1") {
        return Err(format!(
            "unsupported fieldsType {t:?} of manager {manager:?}"
        ));
    }
    Ok(Entry {
        manager,
        operation,
        api_version: s("apiVersion").unwrap_or_default(),
        time: s("time"),
        subresource: s("subresource").filter(|s| !s.is_empty()),
        set: Set::new(),
    })
}

fn push_entry(out: &mut Vec<Entry>, entry: Entry) -> Result<(), String> {
    if out.iter().any(|o| {
        o.is(
            &entry.manager,
            entry.operation,
            entry.subresource.as_deref(),
        )
    }) {
        return Err(format!("duplicate entry for manager {:?}", entry.manager));
    }
    out.push(entry);
    Ok(())
}

fn managed_fields(obj: &Value) -> Option<&Value> {
    objects::meta(obj).get("managedFields")
}

/// Writes `entries` into `obj`, sorted as upstream's `sortEncodedManagedFields` (operation, time, manager).
fn encode_entries(obj: &mut Value, mut entries: Vec<Entry>) {
    order_entries(&mut entries);
    let m = objects::meta_mut(obj);
    if entries.is_empty() {
        m.remove("managedFields");
    } else {
        m.insert(
            "managedFields".into(),
            Value::Array(entries.into_iter().map(Entry::into_json).collect()),
        );
    }
}

/// Drops empty entries and puts the rest in upstream's order.
fn order_entries(entries: &mut Vec<Entry>) {
    entries.retain(|e| !e.set.is_empty());
    entries.sort_by(|a, b| {
        (a.operation, &a.time, &a.manager, &a.subresource).cmp(&(
            b.operation,
            &b.time,
            &b.manager,
            &b.subresource,
        ))
    });
}

/// The `metadata.managedFields` JSON of `entries` (in upstream's order), or `None` when none has fields: the
/// bytes `serde_json` writes for what [`encode_entries`] puts in the object.
fn entries_json(mut entries: Vec<Entry>) -> Option<Vec<u8>> {
    order_entries(&mut entries);
    if entries.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(1024);
    out.push(b'[');
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        e.write_json(&mut out);
    }
    out.push(b']');
    Some(out)
}

/// The object without what field management ignores: its managed fields.
fn without_managed_fields(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
    }
    o
}

/// Fields nobody owns (Ref: `internal.NewStripMetaManager`): the fields themselves, not what lies below them,
/// and all of `metadata.managedFields`.
fn strip(set: &mut Set) {
    const STRIPPED: &[&[&str]] = &[
        &["f:apiVersion"],
        &["f:kind"],
        &["f:metadata"],
        &["f:metadata", "f:name"],
        &["f:metadata", "f:namespace"],
        &["f:metadata", "f:creationTimestamp"],
        &["f:metadata", "f:selfLink"],
        &["f:metadata", "f:uid"],
        &["f:metadata", "f:clusterName"],
        &["f:metadata", "f:generation"],
        &["f:metadata", "f:resourceVersion"],
    ];
    for path in STRIPPED {
        set.remove_member(path);
    }
    set.remove_subtree(&["f:metadata", "f:managedFields"]);
}

/// Where a request writes: the main resource of a kind with a status subresource ignores status, the status
/// subresource everything else (Ref: the registry strategies' `GetResetFields`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scope<'a> {
    pub api_version: &'a str,
    pub has_status: bool,
    pub subresource: Option<&'a str>,
}

impl Scope<'_> {
    fn filter(&self, set: &mut Set) {
        strip(set);
        match self.subresource {
            Some("status") => set.keep_subtree("f:status"),
            _ if self.has_status => set.remove_subtree(&["f:status"]),
            _ => {}
        }
    }
}

/// The manager of an update: `fieldManager`, else the User-Agent up to its first `/` (Ref: the apiserver's
/// `managerOrUserAgent`/`prefixFromUserAgent`: `kubectl/v1.32 (linux/amd64)` → `kubectl`).
pub(crate) fn manager_name(field_manager: Option<&str>, user_agent: &str) -> String {
    match field_manager.filter(|m| !m.is_empty()) {
        Some(m) => m.to_string(),
        None => user_agent.split('/').next().unwrap_or_default().to_string(),
    }
}

/// Server-side apply of `config` by `manager` onto `live` (an empty object when creating). Returns the new object
/// with its managed fields.
pub(crate) fn apply(
    live: &Value,
    config: &Value,
    manager: &str,
    force: bool,
    scope: Scope<'_>,
) -> Result<Value, FieldManagerError> {
    if managed_fields(config).is_some_and(|m| !m.is_null()) {
        return Err(FieldManagerError::ManagedFieldsInApply);
    }
    // An applied configuration names its version, which must be the one served (Ref: `structuredMergeManager.Apply`).
    let version = config
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if version != scope.api_version {
        return Err(FieldManagerError::ApplyVersion {
            got: version.to_string(),
            expected: scope.api_version.to_string(),
        });
    }
    let mut entries = match managed_fields(live).and_then(Value::as_array) {
        Some(list) => decode_entries(list).map_err(FieldManagerError::DecodeManagedFields)?,
        None => Vec::new(),
    };
    let live_clean = without_managed_fields(live);
    let mut config = config.clone();
    objects::stringify_quantities(&mut config, false);
    let merged = typed::merge(&live_clean, &config).map_err(FieldManagerError::InvalidObject)?;
    let mut applied = typed::field_set(&config).map_err(FieldManagerError::InvalidObject)?;
    scope.filter(&mut applied);

    let own = entries
        .iter()
        .position(|e| e.is(manager, Operation::Apply, scope.subresource));
    let previous = own.map(|i| entries.remove(i));
    let last = previous.as_ref().map(|e| e.set.clone()).unwrap_or_default();

    // Prune: what the manager applied last time and leaves out now goes, unless someone (the manager included)
    // still owns it or something below it (Ref: `Updater.prune`, `addBackOwnedItems`, `addBackDanglingItems`).
    let owned = entries
        .iter()
        .fold(applied.clone(), |acc, e| acc.union(&e.set));
    let mut pruned = merged;
    for path in last.difference(&owned).iter() {
        if !owned.has_descendant(&path) && !is_key_field(&path) {
            typed::remove(&mut pruned, &path);
        }
    }

    let mut cmp =
        typed::compare(Some(&live_clean), &pruned).map_err(FieldManagerError::InvalidObject)?;
    scope.filter(&mut cmp.added);
    scope.filter(&mut cmp.modified);
    scope.filter(&mut cmp.removed);
    let mut changed = cmp.added;
    changed.absorb(cmp.modified);
    let conflicts: Vec<Conflict> = entries
        .iter()
        .flat_map(|e| {
            e.set
                .intersection(&changed)
                .iter()
                .map(|path| Conflict {
                    manager: e.printed(),
                    path,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if !conflicts.is_empty() && !force {
        // Upgrading from client-side apply: conflicts on fields the last-applied annotation set to their
        // live values are the same intent, so kubectl's apply takes them (Ref: `lastAppliedManager.Apply`).
        let allowed = (manager == KUBECTL_SSA)
            .then(|| last_applied_fields(&live_clean))
            .flatten()
            .unwrap_or_default();
        let remaining: Vec<Conflict> = conflicts
            .into_iter()
            .filter(|c| !allowed.contains(&c.path))
            .collect();
        if !remaining.is_empty() {
            return Err(FieldManagerError::Conflicts(remaining));
        }
    }
    for e in &mut entries {
        e.set.subtract(&changed);
        e.set.subtract(&cmp.removed);
    }

    let unchanged = pruned == live_clean;
    let time = match (&previous, unchanged) {
        (Some(p), true) => p.time.clone(),
        _ => Some(objects::now()),
    };
    entries.push(Entry {
        manager: manager.to_string(),
        operation: Operation::Apply,
        api_version: scope.api_version.to_string(),
        time,
        subresource: scope.subresource.map(String::from),
        set: applied,
    });
    if manager == KUBECTL_SSA {
        sync_last_applied(&mut pruned, &config);
    }
    encode_entries(&mut pruned, entries);
    Ok(pruned)
}

/// Whether `path` is a key field of the list item it is in (`...[name="c"].name`): an item that stays keeps
/// its key, whoever owns the rest.
fn is_key_field(path: &[String]) -> bool {
    let [.., item, last] = path else {
        return false;
    };
    let (Some(key), Some(name)) = (item.strip_prefix("k:"), last.strip_prefix("f:")) else {
        return false;
    };
    serde_json::from_str::<Map<String, Value>>(key).is_ok_and(|k| k.contains_key(name))
}

/// The fields of the last-applied annotation that still hold the values it set (Ref:
/// `lastAppliedManager.allowedConflictsFromLastApplied`).
fn last_applied_fields(live: &Value) -> Option<Set> {
    let raw = objects::meta(live)
        .pointer(&format!("/annotations/{}", LAST_APPLIED.replace('/', "~1")))
        .and_then(Value::as_str)?;
    let mut last: Value = serde_json::from_str(raw).ok()?;
    if last.get("apiVersion") != live.get("apiVersion") {
        return None;
    }
    objects::stringify_quantities(&mut last, false);
    let set = typed::field_set(&last).ok()?;
    let cmp = typed::compare(Some(&last), live).ok()?;
    // Fields the live object added relative to the annotation are not in its set anyway; modified and removed
    // ones no longer hold the annotation's values.
    Some(set.difference(&cmp.modified).difference(&cmp.removed))
}

/// A kubectl server-side apply keeps an existing last-applied annotation in step, so going back to client-side
/// apply works (Ref: `lastAppliedUpdater`).
fn sync_last_applied(obj: &mut Value, config: &Value) {
    let has = objects::meta(obj)
        .get("annotations")
        .and_then(|a| a.get(LAST_APPLIED))
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    if !has {
        return;
    }
    let mut last = config.clone();
    if let Some(a) = last
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        a.remove(LAST_APPLIED);
    }
    if let Some(a) = objects::meta_mut(obj)
        .get_mut("annotations")
        .and_then(Value::as_object_mut)
    {
        a.insert(LAST_APPLIED.into(), Value::String(last.to_string()));
    }
}

/// Whether `list` asks to reset managed fields: empty, or one empty entry (Ref: `isResetManagedFields`).
fn is_reset(list: &[Value]) -> bool {
    list.is_empty() || (list.len() == 1 && list[0].as_object().is_some_and(Map::is_empty))
}

/// Records an update by `manager`: `live` is the stored object (None when creating), `new` the object about to
/// be stored; its `managedFields` are rewritten. Never fails: on undecodable input the live entries are kept
/// (Ref: `FieldManager.UpdateNoErrors`).
pub(crate) fn update(live: Option<&Value>, new: &mut Value, manager: &str, scope: Scope<'_>) {
    let entries = updated_entries(live, new, manager, scope);
    encode_entries(new, entries);
}

/// [`update`] for an object about to be encoded for storage: `new` is left without `metadata.managedFields`,
/// and their JSON is returned instead (`None`: no manager owns anything), for
/// [`crate::api::stored::encode_for_store`] to write in place. Spares building and freeing the `fieldsV1`
/// trees — ~40 % of a new pod's JSON nodes.
pub(crate) fn update_encoded(
    live: Option<&Value>,
    new: &mut Value,
    manager: &str,
    scope: Scope<'_>,
) -> Option<Vec<u8>> {
    // `updated_entries` took any requested managedFields out of `new`.
    entries_json(updated_entries(live, new, manager, scope))
}

/// The managedFields entries after `manager` wrote `new` over `live`; takes any requested managedFields out of
/// `new`.
fn updated_entries(
    live: Option<&Value>,
    new: &mut Value,
    manager: &str,
    scope: Scope<'_>,
) -> Vec<Entry> {
    let live_entries = || {
        live.and_then(managed_fields)
            .and_then(Value::as_array)
            .and_then(|l| decode_entries(l).ok())
            .unwrap_or_default()
    };
    // A client may write managedFields directly (kubectl's client-side to server-side apply upgrade does), but
    // not through a subresource; leaving them out keeps the stored ones.
    // Every way out writes `new`'s managedFields afresh, so the requested ones are taken out and taken apart.
    let requested = new
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .and_then(|m| m.remove("managedFields"));
    let mut entries = match (scope.subresource, requested) {
        (None, Some(Value::Array(list))) if is_reset(&list) => Vec::new(),
        (None, Some(Value::Array(list))) => {
            decode_owned_entries(list).unwrap_or_else(|_| live_entries())
        }
        _ => live_entries(),
    };
    // `compare` skips metadata.managedFields itself.
    let cmp = match typed::compare(live, new) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(manager, error = %e, "cannot compare objects; managed fields kept");
            return live_entries();
        }
    };
    let mut changed = cmp.added;
    changed.absorb(cmp.modified);
    let mut removed = cmp.removed;
    scope.filter(&mut changed);
    scope.filter(&mut removed);
    for e in &mut entries {
        e.set.subtract(&changed);
        e.set.subtract(&removed);
    }
    if !changed.is_empty() {
        match entries
            .iter_mut()
            .find(|e| e.is(manager, Operation::Update, scope.subresource))
        {
            Some(e) => {
                e.set.absorb(changed);
                e.time = Some(objects::now());
                e.api_version = scope.api_version.to_string();
            }
            None => entries.push(Entry {
                manager: manager.to_string(),
                operation: Operation::Update,
                api_version: scope.api_version.to_string(),
                time: Some(objects::now()),
                subresource: scope.subresource.map(String::from),
                set: changed,
            }),
        }
    }
    cap_update_managers(&mut entries);
    entries
}

/// Merges the oldest Update entries into one `ancient-changes` entry until at most [`MAX_UPDATE_MANAGERS`]
/// remain, so a stream of distinct updaters cannot grow an object without bound.
fn cap_update_managers(entries: &mut Vec<Entry>) {
    let is_bucket = |e: &Entry| e.is(ANCIENT_CHANGES, Operation::Update, None);
    while entries
        .iter()
        .filter(|e| e.operation == Operation::Update && !e.set.is_empty())
        .count()
        > MAX_UPDATE_MANAGERS
    {
        let oldest = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.operation == Operation::Update && !is_bucket(e))
            .min_by(|(_, a), (_, b)| (&a.time, &a.manager).cmp(&(&b.time, &b.manager)))
            .map(|(i, _)| i);
        let Some(oldest) = oldest else { return };
        let e = entries.remove(oldest);
        match entries.iter_mut().find(|b| is_bucket(b)) {
            Some(bucket) => {
                bucket.set.absorb(e.set);
                bucket.time = e.time;
            }
            None => entries.push(Entry {
                manager: ANCIENT_CHANGES.to_string(),
                subresource: None,
                ..e
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCOPE: Scope<'static> = Scope {
        api_version: "apps/v1",
        has_status: true,
        subresource: None,
    };

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "web", "image": image}]}}}})
    }

    fn managers(obj: &Value) -> Vec<(String, String)> {
        obj["metadata"]["managedFields"]
            .as_array()
            .map(|l| {
                l.iter()
                    .map(|e| {
                        (
                            e["manager"].as_str().unwrap_or_default().to_string(),
                            e["operation"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn scaled(obj: &Value, replicas: i64) -> Value {
        let mut new = obj.clone();
        new["spec"]["replicas"] = json!(replicas);
        let scope = Scope {
            subresource: Some("scale"),
            ..SCOPE
        };
        update(Some(obj), &mut new, "kubectl-scale", scope);
        new
    }

    #[test]
    fn apply_records_the_configuration_fields_for_the_manager() {
        let obj = apply(
            &json!({}),
            &deployment(2, "nginx:1"),
            "kubectl",
            false,
            SCOPE,
        )
        .expect("applies");
        assert_eq!(managers(&obj), vec![("kubectl".into(), "Apply".into())]);
        assert_eq!(
            obj["metadata"]["managedFields"][0]["fieldsV1"],
            json!({"f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {
                "k:{\"name\":\"web\"}": {".": {}, "f:image": {}, "f:name": {}}}}}}})
        );
    }

    #[test]
    fn changing_a_field_another_manager_owns_is_a_conflict_unless_forced() {
        let obj = apply(
            &json!({}),
            &deployment(2, "nginx:1"),
            "kubectl",
            false,
            SCOPE,
        )
        .expect("applies");
        let obj = scaled(&obj, 5);
        let err =
            apply(&obj, &deployment(3, "nginx:1"), "kubectl", false, SCOPE).expect_err("conflicts");
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"kubectl-scale\" with subresource \"scale\" using apps/v1: .spec.replicas"
        );
        let api: ApiError = err.into();
        assert_eq!(api.code, 409);
        assert_eq!(
            api.details.expect("details")["causes"][0]["field"],
            ".spec.replicas"
        );

        // Applying the value the other manager set is no conflict: both own it.
        let same =
            apply(&obj, &deployment(5, "nginx:1"), "kubectl", false, SCOPE).expect("same value");
        let owners: Vec<_> = same["metadata"]["managedFields"]
            .as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["fieldsV1"]["f:spec"].get("f:replicas").is_some())
            .map(|e| e["manager"].clone())
            .collect();
        assert_eq!(owners, vec![json!("kubectl"), json!("kubectl-scale")]);

        let forced =
            apply(&obj, &deployment(3, "nginx:1"), "kubectl", true, SCOPE).expect("forced");
        assert_eq!(forced["spec"]["replicas"], 3);
        assert_eq!(
            managers(&forced),
            vec![("kubectl".into(), "Apply".into())],
            "the scaler lost its only field"
        );
    }

    #[test]
    fn fields_left_out_of_a_new_apply_are_removed_unless_another_manager_owns_them() {
        let mut cfg = deployment(2, "nginx:1");
        cfg["metadata"]["labels"] = json!({"a": "1", "b": "2"});
        cfg["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .expect("list")
            .push(json!({"name": "side", "image": "busybox"}));
        let obj = apply(&json!({}), &cfg, "kubectl", false, SCOPE).expect("applies");
        // Another manager adds a container and co-owns label b.
        let other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"b": "2"}},
            "spec": {"template": {"spec": {"containers": [{"name": "extra", "image": "x"}]}}}});
        let obj = apply(&obj, &other, "other", false, SCOPE).expect("second manager");

        let mut next = deployment(2, "nginx:1");
        next["metadata"]["labels"] = json!({});
        let obj = apply(&obj, &next, "kubectl", false, SCOPE).expect("reapplies");
        assert_eq!(
            obj["metadata"]["labels"],
            json!({"b": "2"}),
            "label a goes, co-owned b stays"
        );
        let names: Vec<&str> = obj["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(
            names,
            vec!["web", "extra"],
            "side goes, the other manager's container stays"
        );
    }

    #[test]
    fn updates_take_changed_fields_from_other_managers_without_conflict() {
        let obj = apply(
            &json!({}),
            &deployment(2, "nginx:1"),
            "kubectl",
            false,
            SCOPE,
        )
        .expect("applies");
        let mut new = obj.clone();
        new["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:2");
        new["metadata"]["labels"] = json!({"x": "y"});
        update(Some(&obj), &mut new, "kubectl-edit", SCOPE);
        let entries = new["metadata"]["managedFields"]
            .as_array()
            .expect("entries");
        let edit = entries
            .iter()
            .find(|e| e["manager"] == "kubectl-edit")
            .expect("edit entry");
        assert_eq!(edit["operation"], "Update");
        assert_eq!(
            edit["fieldsV1"],
            json!({"f:metadata": {"f:labels": {".": {}, "f:x": {}}},
                "f:spec": {"f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {"f:image": {}}}}}}})
        );
        let apply_entry = entries
            .iter()
            .find(|e| e["manager"] == "kubectl")
            .expect("apply entry");
        assert!(
            apply_entry["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"]
                ["k:{\"name\":\"web\"}"]
                .get("f:image")
                .is_none()
        );
    }

    #[test]
    fn managed_fields_in_an_apply_are_refused_and_an_unchanged_update_records_nothing() {
        let mut cfg = deployment(1, "a");
        cfg["metadata"]["managedFields"] = json!([]);
        assert!(matches!(
            apply(&json!({}), &cfg, "m", false, SCOPE),
            Err(FieldManagerError::ManagedFieldsInApply)
        ));
        let obj = deployment(1, "a");
        let mut same = obj.clone();
        update(Some(&obj), &mut same, "noop", SCOPE);
        assert!(same["metadata"].get("managedFields").is_none());
    }

    #[test]
    fn client_side_apply_fields_are_taken_over_by_kubectl_server_side_apply() {
        let mut live = deployment(2, "nginx:1");
        let last = deployment(2, "nginx:1").to_string();
        live["metadata"]["annotations"] = json!({ LAST_APPLIED: last });
        let mut created = live.clone();
        update(None, &mut created, "kubectl-client-side-apply", SCOPE);
        let obj =
            apply(&created, &deployment(3, "nginx:1"), "kubectl", false, SCOPE).expect("upgrade");
        assert_eq!(obj["spec"]["replicas"], 3);
        let ann: Value = serde_json::from_str(
            obj["metadata"]["annotations"][LAST_APPLIED]
                .as_str()
                .expect("annotation"),
        )
        .expect("json");
        assert_eq!(
            ann["spec"]["replicas"], 3,
            "the annotation follows the apply"
        );
        let other = apply(&created, &deployment(3, "nginx:1"), "someone", false, SCOPE);
        assert!(matches!(other, Err(FieldManagerError::Conflicts(_))));
    }

    #[test]
    fn more_than_ten_updaters_merge_the_oldest_into_ancient_changes() {
        let mut obj = deployment(1, "a");
        for i in 0..12 {
            let mut new = obj.clone();
            new["metadata"]["labels"] = json!({ format!("l{i}"): "x" });
            new["metadata"]["labels"]
                .as_object_mut()
                .expect("labels")
                .extend(
                    obj["metadata"]["labels"]
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                );
            update(Some(&obj), &mut new, &format!("m{i:02}"), SCOPE);
            obj = new;
        }
        let names: Vec<String> = managers(&obj).into_iter().map(|(m, _)| m).collect();
        assert_eq!(names.len(), MAX_UPDATE_MANAGERS, "{names:?}");
        assert!(names.contains(&ANCIENT_CHANGES.to_string()), "{names:?}");
        assert!(!names.contains(&"m00".to_string()) && !names.contains(&"m01".to_string()));
        let bucket = obj["metadata"]["managedFields"]
            .as_array()
            .and_then(|l| l.iter().find(|e| e["manager"] == ANCIENT_CHANGES))
            .expect("bucket");
        assert_eq!(
            bucket["fieldsV1"]["f:metadata"]["f:labels"],
            json!({".": {}, "f:l0": {}, "f:l1": {}, "f:l2": {}}),
            "the three oldest updaters' fields"
        );
    }

    #[test]
    fn status_applies_own_status_only_and_main_applies_ignore_status() {
        let mut cfg = deployment(2, "a");
        cfg["status"] = json!({"replicas": 7});
        let obj = apply(&json!({}), &cfg, "kubectl", false, SCOPE).expect("applies");
        let main = &obj["metadata"]["managedFields"][0];
        assert!(main["fieldsV1"].get("f:status").is_none(), "{main}");
        let status_scope = Scope {
            subresource: Some("status"),
            ..SCOPE
        };
        let status_cfg = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "status": {"replicas": 3}});
        let obj = apply(&obj, &status_cfg, "ctrl", false, status_scope).expect("status apply");
        let e = obj["metadata"]["managedFields"]
            .as_array()
            .and_then(|l| l.iter().find(|e| e["manager"] == "ctrl"))
            .expect("ctrl entry");
        assert_eq!(e["subresource"], "status");
        assert_eq!(e["fieldsV1"], json!({"f:status": {"f:replicas": {}}}));
        let missing_version = json!({"kind": "Deployment", "metadata": {"name": "web"}});
        assert!(matches!(
            apply(&obj, &missing_version, "x", false, SCOPE),
            Err(FieldManagerError::ApplyVersion { .. })
        ));
    }

    #[test]
    fn an_item_another_manager_changed_keeps_its_key_when_the_applier_drops_it() {
        let mut cfg = deployment(1, "a");
        cfg["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .expect("list")
            .push(json!({"name": "side", "image": "s:1", "command": ["sleep"]}));
        let obj = apply(&json!({}), &cfg, "kubectl", false, SCOPE).expect("applies");
        let mut new = obj.clone();
        new["spec"]["template"]["spec"]["containers"][1]["image"] = json!("s:2");
        update(Some(&obj), &mut new, "editor", SCOPE);
        let obj = apply(&new, &deployment(1, "a"), "kubectl", false, SCOPE).expect("reapplies");
        assert_eq!(
            obj["spec"]["template"]["spec"]["containers"][1],
            json!({"name": "side", "image": "s:2"}),
            "the editor's image and the item's key stay; the applier's command goes"
        );
    }

    #[test]
    fn user_agent_names_the_manager_when_none_is_given() {
        assert_eq!(
            manager_name(None, "kube-controller-manager/v1.30.0 (linux/amd64)"),
            "kube-controller-manager"
        );
        assert_eq!(manager_name(Some(""), "kubectl/v1.32.0"), "kubectl");
        assert_eq!(
            manager_name(Some("kubectl-edit"), "kubectl/v1.32.0"),
            "kubectl-edit"
        );
    }
}

/// A realistic pod as the API server stores it, the golden `managedFields` of writes to it, and a timing
/// harness (`cargo test --release -p windlass-control --lib fieldmanager -- --ignored --nocapture`).
#[cfg(test)]
mod pod_tests {
    use super::*;

    const POD_SCOPE: Scope<'static> = Scope {
        api_version: "v1",
        has_status: true,
        subresource: None,
    };

    /// The pod of `control/benches/api.rs` after defaulting and the ServiceAccount and DefaultTolerationSeconds
    /// admission plugins.
    fn pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "bench-00042", "namespace": "default", "uid": "8d5e9c2a-1b7f-4c3e-9a0d-2f6b8e4c1a90",
                "resourceVersion": "1042", "creationTimestamp": "2026-11-24T05:00:00Z",
                "labels": {"app": "bench", "tier": "web"},
                "annotations": {"bench.windlass.io/note": "a realistic annotation of some length"}},
            "spec": {
                "containers": [{
                    "name": "web", "image": "registry.example:5000/web:1.2.3",
                    "args": ["--port=8080", "--verbose"],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "env": [{"name": "MODE", "value": "production"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                        "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                    "volumeMounts": [{"name": "kube-api-access-x7k2q", "readOnly": true,
                        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                }],
                "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "terminationGracePeriodSeconds": 30,
                "schedulerName": "default-scheduler", "securityContext": {}, "enableServiceLinks": true,
                "serviceAccountName": "default", "serviceAccount": "default",
                "tolerations": [
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                        "tolerationSeconds": 300},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                        "tolerationSeconds": 300},
                ],
                "volumes": [{"name": "kube-api-access-x7k2q", "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace",
                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
                ]}}],
            },
            "status": {"phase": "Pending", "qosClass": "Burstable"},
        })
    }

    fn created() -> Value {
        let mut p = pod();
        update(None, &mut p, "kubectl-create", POD_SCOPE);
        p
    }

    fn relabelled(live: &Value) -> Value {
        let mut new = live.clone();
        new["metadata"]["labels"]["tier"] = json!("db");
        new
    }

    /// The managed fields with their times blanked, as text.
    fn golden(obj: &Value) -> String {
        let mut mf = obj["metadata"]["managedFields"].clone();
        for e in mf.as_array_mut().into_iter().flatten() {
            if e.get("time").is_some() {
                e["time"] = json!("T");
            }
        }
        serde_json::to_string_pretty(&mf).unwrap_or_default()
    }

    /// A sequence of writes touching every path of the field manager: create, relabel, an editor changing the
    /// container and adding an item, the kubelet writing status, an apply taking over fields, and a PUT that
    /// removes a container field.
    fn history() -> Vec<Value> {
        let mut out = vec![created()];
        let mut next = relabelled(&out[0]);
        update(Some(&out[0]), &mut next, "kubectl-label", POD_SCOPE);
        out.push(next);

        let live = out[1].clone();
        let mut next = live.clone();
        next["spec"]["containers"][0]["image"] = json!("registry.example:5000/web:1.2.4");
        next["spec"]["containers"][0]["env"]
            .as_array_mut()
            .expect("env")
            .push(
                json!({"name": "EXTRA", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}),
            );
        next["spec"]["containers"]
            .as_array_mut()
            .expect("containers")
            .push(
                json!({"name": "side", "image": "busybox", "command": ["sleep", "inf"],
                "ports": [{"containerPort": 9090}]}),
            );
        next["metadata"]["finalizers"] = json!(["example.com/a", "example.com/b"]);
        update(Some(&live), &mut next, "kubectl-edit", POD_SCOPE);
        out.push(next);

        let live = out[2].clone();
        let mut next = live.clone();
        next["status"] = json!({"phase": "Running", "qosClass": "Burstable", "podIP": "10.0.0.5",
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"}],
            "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0}]});
        let status = Scope {
            subresource: Some("status"),
            ..POD_SCOPE
        };
        update(Some(&live), &mut next, "kubelet", status);
        out.push(next);

        let live = out[3].clone();
        let cfg = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bench-00042",
                "labels": {"tier": "db", "owner": "me"}},
            "spec": {"containers": [{"name": "web", "image": "registry.example:5000/web:1.2.5",
                "resources": {"limits": {"memory": "256Mi"}}}]}});
        out.push(apply(&live, &cfg, "kubectl", true, POD_SCOPE).expect("applies"));

        let live = out[4].clone();
        let mut next = live.clone();
        next["spec"]["containers"][0]
            .as_object_mut()
            .expect("container")
            .remove("readinessProbe");
        next["metadata"]["finalizers"] = json!(["example.com/b"]);
        update(Some(&live), &mut next, "kubectl-replace", POD_SCOPE);
        out.push(next);
        out
    }

    #[test]
    fn managed_fields_encoded_apart_are_the_bytes_the_object_would_hold() {
        use crate::api::stored::{encode_for_store, encode_for_store_with};
        for obj in history() {
            let list = obj["metadata"]["managedFields"]
                .as_array()
                .expect("entries");
            let apart = entries_json(decode_entries(list).expect("decodes")).expect("entries");
            assert_eq!(
                apart,
                serde_json::to_vec(&obj["metadata"]["managedFields"]).expect("encodes")
            );
            let mut without = obj.clone();
            without["metadata"]
                .as_object_mut()
                .map(|m| m.remove("managedFields"));
            assert_eq!(
                encode_for_store_with(&without, Some(&apart)),
                encode_for_store(&obj)
            );
        }
        // A create through `update_encoded` leaves the object without managedFields and returns the entry.
        let mut p = pod();
        let apart = update_encoded(None, &mut p, "kubectl-create", POD_SCOPE).expect("entry");
        assert!(p["metadata"].get("managedFields").is_none());
        let entries: Value = serde_json::from_slice(&apart).expect("JSON");
        assert_eq!(entries[0]["manager"], "kubectl-create");
        assert_eq!(
            entries[0]["fieldsV1"],
            created()["metadata"]["managedFields"][0]["fieldsV1"]
        );
    }

    #[test]
    fn managed_fields_of_a_pods_history_match_the_golden_output() {
        let got: Vec<String> = history().iter().map(golden).collect();
        let want: Vec<&str> = include_str!("testdata/pod_history.golden")
            .split("\n----\n")
            .collect();
        if std::env::var_os("WINDLASS_BLESS").is_some() {
            let text = got.join("\n----\n");
            std::fs::write(
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/src/api/fieldmanager/testdata/pod_history.golden"
                ),
                text,
            )
            .expect("writes the golden file");
            return;
        }
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "write {i} of the history");
        }
    }

    fn time_per_op(what: &str, n: u32, mut op: impl FnMut()) {
        for _ in 0..n / 10 {
            op();
        }
        let start = std::time::Instant::now();
        for _ in 0..n {
            op();
        }
        let ns = start.elapsed().as_nanos() / u128::from(n);
        println!("{what}: {ns} ns/op");
    }

    #[test]
    #[ignore = "timing harness, run in release with --ignored --nocapture"]
    fn time_creating_and_relabelling_a_pod() {
        let p = pod();
        time_per_op("create (live = None)", 20_000, || {
            let mut new = p.clone();
            update(None, &mut new, "kubectl-create", POD_SCOPE);
            std::hint::black_box(&new);
        });
        time_per_op("clone of the pod alone", 20_000, || {
            std::hint::black_box(p.clone());
        });
        let live = created();
        let next = relabelled(&live);
        time_per_op("update of one label (live = Some)", 20_000, || {
            let mut new = next.clone();
            update(Some(&live), &mut new, "kubectl-label", POD_SCOPE);
            std::hint::black_box(&new);
        });
        time_per_op("clone of the updated pod alone", 20_000, || {
            std::hint::black_box(next.clone());
        });
        let hist = history();
        let (live, mut next) = (hist[5].clone(), hist[5].clone());
        next["metadata"]["labels"]["tier"] = json!("cache");
        time_per_op("update of one label, six managers", 20_000, || {
            let mut new = next.clone();
            update(Some(&live), &mut new, "kubectl-label", POD_SCOPE);
            std::hint::black_box(&new);
        });
    }
}
