//! Resource limits from `linux.resources`, applied through the cgroup manager and visible to the container,
//! and pause/resume through the freezer.

use serde_json::json;
use windlass_tests::bundle::Bundle;
use windlass_tests::runtime::{cgroup_dirs, set_cgroup, unique_cgroup, RuntimeCli};

use windlass_tests::{require_privileged, unique_name};

fn limited(script: &str, resources: serde_json::Value) -> (Bundle, String) {
    let mut b = Bundle::busybox(&["sh", "-c", script]).expect("bundle");
    let cg = unique_cgroup("lim");
    set_cgroup(&mut b, &cg);
    b.config_mut()["linux"]["resources"] = resources;
    b.write_config().expect("config");
    (b, cg)
}

#[test]
fn the_pids_limit_stops_a_fork_bomb() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, cg) = limited("exec sleep 60", json!({"pids": {"limit": 8}}));
    let id = unique_name("pids");
    rt.run_detached(&b, &id);
    // busybox sh gives up when a fork fails, so the bomb runs in an exec'd shell while PID 1 lives on.
    let bomb = rt.output(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "for i in $(seq 30); do sleep 60 & done",
    ]);
    let stderr = String::from_utf8_lossy(&bomb.stderr);
    assert!(
        stderr.contains("can't fork"),
        "the limit should refuse forks: {stderr}"
    );
    let current = std::path::Path::new("/sys/fs/cgroup/pids")
        .join(cg.trim_start_matches('/'))
        .join("pids.current");
    // The shell forked until the limit (8 tasks, transient helpers and not yet reaped zombies included) refused
    // more, and has exited (exec waited for it): PID 1 and the sleeps that fitted remain.
    let n: u32 = std::fs::read_to_string(&current)
        .expect("pids.current")
        .trim()
        .parse()
        .expect("number");
    assert!(
        (2..=7).contains(&n),
        "pids.max=8: expected PID 1 plus some sleeps, got {n} tasks"
    );
    rt.ok(&["delete", "--force", &id]);
    assert!(cgroup_dirs(&cg).is_empty());
}

#[test]
fn cpu_quota_and_memory_limit_are_visible_inside_the_container() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, _) = limited(
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us \
             /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null \
         || cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/memory.max",
        json!({"cpu": {"quota": 50000, "period": 100000}, "memory": {"limit": 33554432}}),
    );
    let (code, out, err) = rt.run(&b, &unique_name("cpu"));
    assert_eq!(code, 0, "{err}");
    let values: Vec<&str> = out.split_whitespace().collect();
    // cgroup v1 (this machine: quota, period, limit) or v2 (cpu.max holds quota and period).
    assert_eq!(values, ["50000", "100000", "33554432"], "{out}");
}

#[test]
fn a_process_over_its_memory_limit_is_killed() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, cg) = limited(
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        json!({"memory": {"limit": 33554432, "swap": 33554432}}),
    );
    let (code, out, _) = rt.run(&b, &unique_name("oom"));
    assert_eq!(code, 137, "the shell should be OOM-killed: {out}");
    assert!(!out.contains("survived"));
    assert!(cgroup_dirs(&cg).is_empty());
}

#[test]
fn update_changes_the_limits_of_a_running_container() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, cg) = limited("exec sleep 60", json!({"pids": {"limit": 20}}));
    let id = unique_name("upd");
    rt.run_detached(&b, &id);
    let max = std::path::Path::new("/sys/fs/cgroup/pids")
        .join(cg.trim_start_matches('/'))
        .join("pids.max");
    assert_eq!(
        std::fs::read_to_string(&max).expect("pids.max").trim(),
        "20"
    );
    let res = b.path().join("resources.json");
    std::fs::write(&res, json!({"pids": {"limit": 5}}).to_string()).expect("write");
    rt.ok(&["update", "--resources", &res.to_string_lossy(), &id]);
    assert_eq!(std::fs::read_to_string(&max).expect("pids.max").trim(), "5");
    std::fs::write(&res, "{not json").expect("write");
    let bad = rt.output(&["update", "--resources", &res.to_string_lossy(), &id]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&max).expect("pids.max").trim(), "5");
    rt.ok(&["delete", "--force", &id]);
}

#[test]
fn pause_freezes_and_resume_thaws_a_container() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, cg) = limited("exec sleep 60", json!({}));
    let id = unique_name("pause");
    rt.run_detached(&b, &id);
    let freezer = std::path::Path::new("/sys/fs/cgroup/freezer")
        .join(cg.trim_start_matches('/'))
        .join("freezer.state");
    let status = || {
        let v: serde_json::Value = serde_json::from_str(&rt.ok(&["state", &id])).expect("state");
        v["status"].as_str().unwrap_or_default().to_string()
    };
    rt.ok(&["pause", &id]);
    assert_eq!(status(), "paused");
    assert_eq!(
        std::fs::read_to_string(&freezer).expect("freezer").trim(),
        "FROZEN"
    );
    let again = rt.output(&["pause", &id]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already paused"));
    rt.ok(&["resume", &id]);
    assert_eq!(status(), "running");
    assert_eq!(
        std::fs::read_to_string(&freezer).expect("freezer").trim(),
        "THAWED"
    );
    let not_paused = rt.output(&["resume", &id]);
    assert!(String::from_utf8_lossy(&not_paused.stderr).contains("container not paused"));
    rt.ok(&["pause", &id]);
    let refused = rt.output(&["delete", &id]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not stopped: paused"));
    rt.ok(&["delete", "--force", &id]);
    assert!(
        cgroup_dirs(&cg).is_empty(),
        "a paused container must still be cleaned up"
    );
}
