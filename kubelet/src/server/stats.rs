//! `/stats/summary` (upstream's Summary API shape, `k8s.io/kubelet/pkg/apis/stats/v1alpha1`: node and per-pod
//! CPU and memory, from `/proc` and the containers' cgroups) and `/metrics` (Prometheus text).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value};
use windlass_runtime::SandboxManager;

use super::pods;
use crate::layout;

/// Previous CPU samples, so a second scrape can report `usageNanoCores` (cadvisor computes it the same way).
#[derive(Default)]
pub(crate) struct CpuRates(Mutex<HashMap<String, (Instant, u64)>>);

impl CpuRates {
    fn rate(&self, key: &str, now: Instant, usage_ns: u64) -> Option<u64> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let prev = m.insert(key.to_string(), (now, usage_ns));
        let (t, u) = prev?;
        let dt = now.duration_since(t).as_nanos();
        if dt == 0 || usage_ns < u {
            return None;
        }
        Some(((usage_ns - u) as u128 * 1_000_000_000 / dt) as u64)
    }
}

fn cpu(time: &str, usage_ns: u64, rate: Option<u64>) -> Value {
    let mut v = json!({"time": time, "usageCoreNanoSeconds": usage_ns});
    if let Some(r) = rate {
        v["usageNanoCores"] = json!(r);
    }
    v
}

/// Node CPU time in nanoseconds from `/proc/stat` (everything but idle and iowait).
pub(crate) fn node_cpu_ns(proc_root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join("stat")).ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100);
    Some(busy * (1_000_000_000 / hz))
}

/// `(total, available)` memory in bytes from `/proc/meminfo`.
pub(crate) fn node_memory(proc_root: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(proc_root.join("meminfo")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// The summary document.
pub(crate) fn summary(
    mgr: &SandboxManager,
    node_name: &str,
    proc_root: &Path,
    rates: &CpuRates,
) -> Result<Value, pods::LookupError> {
    let now = Instant::now();
    let time = jiff::Timestamp::now().to_string();
    let mut node = json!({"nodeName": node_name, "startTime": time});
    if let Some(ns) = node_cpu_ns(proc_root) {
        node["cpu"] = cpu(&time, ns, rates.rate("node", now, ns));
    }
    if let Some((total, avail)) = node_memory(proc_root) {
        let used = total.saturating_sub(avail);
        node["memory"] = json!({"time": time, "availableBytes": avail, "usageBytes": used,
            "workingSetBytes": used});
    }
    let mut pod_list = Vec::new();
    for pod in pods::list_pods(mgr)? {
        let mut containers = Vec::new();
        let (mut pod_cpu, mut pod_mem, mut pod_ws, mut pod_rss) = (0u64, 0u64, 0u64, 0u64);
        let mut start: Option<String> = None;
        for sb in &pod.sandboxes {
            start = start.or_else(|| Some(sb.created.clone()));
            let Ok(list) = mgr.list_containers(&sb.id) else {
                continue;
            };
            for c in list {
                if c.status != windlass_runtime::Status::Running {
                    continue;
                }
                let Some((name, _)) = layout::parse_container_id(&c.id) else {
                    continue;
                };
                let Ok(s) = mgr.container_stats(&sb.id, &c.id) else {
                    continue;
                };
                pod_cpu += s.cpu_usage_ns;
                pod_mem += s.memory_usage_bytes;
                pod_ws += s.memory_working_set_bytes;
                pod_rss += s.memory_rss_bytes;
                let key = format!("{}/{}", sb.id, c.id);
                containers.push(json!({
                    "name": name,
                    "startTime": c.created,
                    "cpu": cpu(&time, s.cpu_usage_ns, rates.rate(&key, now, s.cpu_usage_ns)),
                    "memory": {"time": time, "usageBytes": s.memory_usage_bytes,
                        "workingSetBytes": s.memory_working_set_bytes, "rssBytes": s.memory_rss_bytes,
                        "availableBytes": s.memory_limit_bytes.map(|l| l.saturating_sub(s.memory_working_set_bytes))},
                }));
            }
        }
        let key = format!("pod/{}", pod.uid);
        pod_list.push(json!({
            "podRef": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid},
            "startTime": start.unwrap_or_default(),
            "containers": containers,
            "cpu": cpu(&time, pod_cpu, rates.rate(&key, now, pod_cpu)),
            "memory": {"time": time, "usageBytes": pod_mem, "workingSetBytes": pod_ws, "rssBytes": pod_rss},
        }));
    }
    Ok(json!({"node": node, "pods": pod_list}))
}

/// Request counts by endpoint and code, for `/metrics`.
#[derive(Default)]
pub(crate) struct RequestCounts(Mutex<HashMap<(String, String, u16), u64>>);

impl RequestCounts {
    pub fn record(&self, method: &str, endpoint: &str, code: u16) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((method.to_string(), endpoint.to_string(), code))
            .or_default() += 1;
    }
}

/// The Prometheus text exposition (format 0.0.4).
pub(crate) fn metrics(
    mgr: &SandboxManager,
    node_name: &str,
    proc_root: &Path,
    requests: &RequestCounts,
) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(String, f64)]| {
        out += &format!("# HELP {name} {help}\n# TYPE {name} gauge\n");
        for (labels, v) in samples {
            out += &format!("{name}{labels} {v}\n");
        }
    };
    gauge(
        "kubelet_node_name",
        "The node's name. The count is always 1.",
        &[(format!("{{node=\"{node_name}\"}}"), 1.0)],
    );
    let (mut running_pods, mut running, mut exited) = (0u64, 0u64, 0u64);
    if let Ok(list) = pods::list_pods(mgr) {
        for p in list {
            let mut any = false;
            for sb in &p.sandboxes {
                for c in mgr.list_containers(&sb.id).unwrap_or_default() {
                    if c.status == windlass_runtime::Status::Running {
                        running += 1;
                        any = true;
                    } else {
                        exited += 1;
                    }
                }
            }
            running_pods += u64::from(any);
        }
    }
    gauge(
        "kubelet_running_pods",
        "Number of pods that have a running pod sandbox",
        &[(String::new(), running_pods as f64)],
    );
    gauge(
        "kubelet_running_containers",
        "Number of containers currently running",
        &[
            ("{container_state=\"running\"}".into(), running as f64),
            ("{container_state=\"exited\"}".into(), exited as f64),
        ],
    );
    // Ref: the Prometheus client's standard process metrics.
    if let Ok(stat) = std::fs::read_to_string(proc_root.join("self/stat")) {
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<&str> = after.split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // Fields after the command: state(0) ... utime(11) stime(12) ... rss(21).
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            &[(String::new(), num(21) * page)],
        );
        out +=
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
                # TYPE process_cpu_seconds_total counter\n";
        out += &format!(
            "process_cpu_seconds_total {}\n",
            (num(11) + num(12)) / hz.max(1.0)
        );
    }
    out += "# HELP kubelet_http_requests_total Number of the http requests received since the server started\n\
            # TYPE kubelet_http_requests_total counter\n";
    let m = requests.0.lock().unwrap_or_else(|p| p.into_inner());
    let mut rows: Vec<_> = m.iter().collect();
    rows.sort();
    for ((method, endpoint, code), n) in rows {
        out += &format!(
            "kubelet_http_requests_total{{method=\"{method}\",path=\"{endpoint}\",code=\"{code}\"}} {n}\n"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_cpu_and_memory_come_from_proc() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("stat"),
            "cpu  100 0 50 1000 10 0 0 0 0 0\ncpu0 1 2 3\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("meminfo"),
            "MemTotal:       2000 kB\nMemFree: 1 kB\nMemAvailable:    500 kB\n",
        )
        .unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        assert_eq!(node_cpu_ns(dir.path()), Some(150 * (1_000_000_000 / hz)));
        assert_eq!(node_memory(dir.path()), Some((2000 * 1024, 500 * 1024)));
    }

    #[test]
    fn cpu_rates_need_two_samples() {
        let r = CpuRates::default();
        let t = Instant::now();
        assert_eq!(r.rate("x", t, 1_000), None);
        let later = t + std::time::Duration::from_secs(2);
        assert_eq!(r.rate("x", later, 1_000_001_000), Some(500_000_000));
    }
}
