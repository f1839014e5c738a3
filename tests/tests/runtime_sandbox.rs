//! Privileged tests of pod sandboxes through the library API the kubelet uses: shared namespaces, CRI logs, exit
//! codes, graceful stop, adoption after a restart and complete cleanup.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use windlass_runtime::{ContainerConfig, SandboxConfig, SandboxManager, SandboxState, Status};
use windlass_tests::bundle::Bundle;
use windlass_tests::runtime::{cgroup_dirs, mounts_mentioning, unique_cgroup};
use windlass_tests::{require_privileged, unique_name, wait_for, workspace_binary};

/// A sandbox root removed (with every sandbox in it) on drop.
struct Pods {
    dir: tempfile::TempDir,
    mgr: SandboxManager,
}

impl Pods {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("windlass-pods-")
            .tempdir()
            .expect("dir");
        let mgr = SandboxManager::new(
            dir.path(),
            "/sys/fs/cgroup",
            workspace_binary("windlass-runtime"),
        );
        Self { dir, mgr }
    }

    fn sandbox(&self, hostname: &str, share_pid: bool) -> (String, String) {
        let id = unique_name("pod");
        let cg = unique_cgroup("pod");
        let info = self
            .mgr
            .create_sandbox(&SandboxConfig {
                id: id.clone(),
                hostname: hostname.into(),
                cgroup_parent: PathBuf::from(&cg),
                share_pid,
                ..Default::default()
            })
            .expect("create sandbox");
        assert_eq!(info.state, SandboxState::Ready);
        assert!(info.netns_path.exists());
        (id, cg)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    /// Creates and starts `script` as container `name`; returns its log path. The bundle lives until `bundles`
    /// drops.
    fn run(&self, pod: &str, name: &str, script: &str, bundles: &mut Vec<Bundle>) -> PathBuf {
        self.run_with(pod, name, script, bundles, |_| {})
    }

    fn run_with(
        &self,
        pod: &str,
        name: &str,
        script: &str,
        bundles: &mut Vec<Bundle>,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> PathBuf {
        let mut b = Bundle::busybox(&["sh", "-c", script]).expect("bundle");
        edit(b.config_mut());
        b.write_config().expect("config");
        let log = self.log_path(name);
        let info = self
            .mgr
            .create_container(
                pod,
                &ContainerConfig {
                    id: name.into(),
                    bundle: b.path().to_path_buf(),
                    log_path: log.clone(),
                },
            )
            .expect("create container");
        assert_eq!(info.status, Status::Created);
        self.mgr.start_container(pod, name).expect("start");
        bundles.push(b);
        log
    }

    fn wait_exit(&self, pod: &str, name: &str) -> i32 {
        wait_for(&format!("{name} to exit"), Duration::from_secs(20), || {
            let st = self.mgr.container_status(pod, name).expect("status");
            (st.status == Status::Stopped).then_some(())?;
            st.exit.map(|e| e.code)
        })
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        if let Ok(list) = self.mgr.list_sandboxes() {
            for sb in list {
                let _ = self.mgr.remove_sandbox(&sb.id);
            }
        }
    }
}

/// The (stream, tag, content) of each CRI log entry, checking the timestamps parse as RFC 3339.
fn log_entries(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut p = l.splitn(4, ' ');
            let ts = p.next().unwrap_or_default();
            assert!(
                ts.ends_with('Z') && ts.contains('T') && ts.len() == 30,
                "bad timestamp in {l:?}"
            );
            let stream = p.next().unwrap_or_default().to_string();
            let tag = p.next().unwrap_or_default().to_string();
            (stream, tag, p.next().unwrap_or_default().to_string())
        })
        .collect()
}

#[test]
fn two_containers_of_a_pod_talk_over_loopback_and_share_the_hostname() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let pods = Pods::new();
    let (pod, cg) = pods.sandbox("pod-a", false);
    let mut bundles = Vec::new();
    pods.run(
        &pod,
        "web",
        "hostname > /www/host; exec httpd -f -p 8080 -h /www",
        &mut bundles,
    );
    let client = pods.run(
        &pod,
        "client",
        "hostname; i=0; while [ $i -lt 100 ]; do wget -q -O - http://127.0.0.1:8080/ && break; \
         i=$((i+1)); sleep 0.1; done; wget -q -O - http://127.0.0.1:8080/host",
        &mut bundles,
    );
    assert_eq!(
        pods.wait_exit(&pod, "client"),
        0,
        "{:?}",
        log_entries(&client)
    );
    let lines: Vec<String> = log_entries(&client)
        .into_iter()
        .filter(|(s, t, _)| s == "stdout" && t == "F")
        .map(|(_, _, c)| c)
        .collect();
    // Its own hostname, the web server's page over 127.0.0.1, and the web server's hostname.
    assert_eq!(lines, ["pod-a", "hi", "pod-a"]);
    // Each container has its own PID namespace and rootfs: the web server is not visible to the client.
    let web = pods.mgr.container_status(&pod, "web").expect("web");
    assert_eq!(web.status, Status::Running);
    assert!(
        !cgroup_dirs(&format!("{cg}/web")).is_empty(),
        "container cgroup under the pod cgroup"
    );

    let root = pods.dir.path().to_string_lossy().into_owned();
    pods.mgr.remove_sandbox(&pod).expect("remove");
    assert!(pods.mgr.list_sandboxes().expect("list").is_empty());
    assert!(
        cgroup_dirs(&cg).is_empty(),
        "pod cgroup left: {:?}",
        cgroup_dirs(&cg)
    );
    assert!(
        mounts_mentioning(&root).is_empty(),
        "netns pin left mounted"
    );
    assert!(!pods.dir.path().join(&pod).exists());
    // Removal is idempotent.
    pods.mgr.remove_sandbox(&pod).expect("remove again");
}

#[test]
fn container_output_is_written_in_cri_log_format_with_partial_lines() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let pods = Pods::new();
    let (pod, _) = pods.sandbox("logs", false);
    let mut bundles = Vec::new();
    let log = pods.run(
        &pod,
        "talker",
        "echo out-1; echo err-1 >&2; head -c 20000 /dev/zero | tr '\\0' x; echo; printf tail; exit 3",
        &mut bundles,
    );
    assert_eq!(pods.wait_exit(&pod, "talker"), 3);
    let entries = log_entries(&log);
    assert!(
        entries.contains(&("stdout".into(), "F".into(), "out-1".into())),
        "{entries:?}"
    );
    assert!(
        entries.contains(&("stderr".into(), "F".into(), "err-1".into())),
        "{entries:?}"
    );
    let long: Vec<&(String, String, String)> = entries
        .iter()
        .filter(|(_, _, c)| c.starts_with("xxx"))
        .collect();
    assert_eq!(
        long.len(),
        2,
        "a 20000-byte line is one partial and one full entry"
    );
    assert_eq!((long[0].1.as_str(), long[0].2.len()), ("P", 16 * 1024));
    assert_eq!(
        (long[1].1.as_str(), long[0].2.len() + long[1].2.len()),
        ("F", 20000)
    );
    assert_eq!(entries.last().map(|e| e.2.as_str()), Some("tail"));
    let st = pods.mgr.container_status(&pod, "talker").expect("status");
    assert_eq!(st.log_path.as_deref(), Some(log.as_path()));
}

#[test]
fn stop_uses_sigterm_then_sigkill_after_the_grace_period() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let pods = Pods::new();
    let (pod, _) = pods.sandbox("stop", false);
    let mut bundles = Vec::new();
    let logs = [
        pods.run(
            &pod,
            "polite",
            "trap 'exit 0' TERM; echo trapped; while true; do sleep 0.05; done",
            &mut bundles,
        ),
        pods.run(
            &pod,
            "stubborn",
            "trap '' TERM; echo trapped; while true; do sleep 0.05; done",
            &mut bundles,
        ),
    ];
    for log in &logs {
        wait_for("the trap", Duration::from_secs(10), || {
            log_entries(log)
                .iter()
                .any(|e| e.2 == "trapped")
                .then_some(())
        });
    }
    let polite = pods
        .mgr
        .stop_container(&pod, "polite", Duration::from_secs(10))
        .expect("stop");
    assert_eq!(polite.exit.map(|e| e.code), Some(0));
    let started = std::time::Instant::now();
    let stubborn = pods
        .mgr
        .stop_container(&pod, "stubborn", Duration::from_millis(300))
        .expect("stop");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let exit = stubborn.exit.expect("exit recorded");
    assert_eq!((exit.code, exit.signal), (137, Some(9)));
    pods.mgr.remove_container(&pod, "polite").expect("remove");
    assert_eq!(pods.mgr.list_containers(&pod).expect("list").len(), 1);
}

#[test]
fn a_restarted_caller_adopts_running_sandboxes_and_containers() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let pods = Pods::new();
    let (pod, _) = pods.sandbox("adopt", false);
    let mut bundles = Vec::new();
    pods.run(&pod, "sleeper", "echo started; sleep 60", &mut bundles);
    // A new manager over the same state, as after a kubelet restart.
    let again = SandboxManager::new(
        pods.dir.path(),
        "/sys/fs/cgroup",
        workspace_binary("windlass-runtime"),
    );
    let list = again.list_sandboxes().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].id.as_str(), list[0].state),
        (pod.as_str(), SandboxState::Ready)
    );
    assert_eq!(list[0].hostname, "adopt");
    let containers = again.list_containers(&pod).expect("containers");
    assert_eq!(containers.len(), 1);
    assert_eq!(
        (containers[0].id.as_str(), containers[0].status),
        ("sleeper", Status::Running)
    );
    again
        .stop_sandbox(&pod, Duration::from_millis(100))
        .expect("stop");
    assert_eq!(
        again.sandbox(&pod).expect("sandbox").state,
        SandboxState::NotReady
    );
    let exit = again
        .container_status(&pod, "sleeper")
        .expect("status")
        .exit
        .expect("exit");
    assert_eq!(exit.code, 128 + 9);
}

#[test]
fn containers_of_a_pod_with_a_shared_pid_namespace_see_each_other() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let pods = Pods::new();
    let (pod, _) = pods.sandbox("shared", true);
    let mut bundles = Vec::new();
    pods.run(&pod, "a", "exec sleep 60", &mut bundles);
    let log = pods.run(
        &pod,
        "b",
        "i=0; until ps -o args | grep -q '^sleep 60'; do i=$((i+1)); [ $i -gt 100 ] && exit 1; sleep 0.05; done; \
         echo saw-a; echo self=$$",
        &mut bundles,
    );
    assert_eq!(pods.wait_exit(&pod, "b"), 0, "{:?}", log_entries(&log));
    let out: Vec<String> = log_entries(&log).into_iter().map(|e| e.2).collect();
    assert_eq!(out[0], "saw-a");
    assert_ne!(out[1], "self=1", "PID 1 is the sandbox holder");
}

#[test]
fn a_container_killed_by_its_memory_limit_is_reported_as_oom_killed() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let pods = Pods::new();
    let (pod, _) = pods.sandbox("oom", false);
    let mut bundles = Vec::new();
    pods.run_with(
        &pod,
        "hog",
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        &mut bundles,
        |c| {
            c["linux"]["resources"]["memory"] =
                json!({"limit": 32 * 1024 * 1024, "swap": 32 * 1024 * 1024});
        },
    );
    pods.wait_exit(&pod, "hog");
    let exit = pods
        .mgr
        .container_status(&pod, "hog")
        .expect("status")
        .exit
        .expect("exit");
    assert!(exit.oom_killed, "{exit:?}");
    assert_eq!(exit.code, 137);
}

#[test]
fn a_container_in_a_missing_or_stopped_sandbox_is_refused() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let pods = Pods::new();
    let b = Bundle::busybox(&["true"]).expect("bundle");
    let cfg = ContainerConfig {
        id: "c".into(),
        bundle: b.path().to_path_buf(),
        log_path: pods.log_path("c"),
    };
    let err = pods
        .mgr
        .create_container("nope", &cfg)
        .expect_err("refused");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let (pod, _) = pods.sandbox("gone", false);
    pods.mgr.stop_sandbox(&pod, Duration::ZERO).expect("stop");
    let err = pods.mgr.create_container(&pod, &cfg).expect_err("refused");
    assert!(err.to_string().contains("not ready"), "{err}");
}

#[test]
fn exec_sync_collects_output_and_exit_code_and_enforces_the_timeout() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let pods = Pods::new();
    let (pod, _) = pods.sandbox("probe", false);
    let mut bundles = Vec::new();
    pods.run(
        &pod,
        "app",
        "echo ok > /tmp/health; exec sleep 60",
        &mut bundles,
    );
    let cmd = |s: &str| vec!["sh".to_string(), "-c".to_string(), s.to_string()];
    let r = wait_for("the health file", Duration::from_secs(10), || {
        let r = pods
            .mgr
            .exec_sync(
                &pod,
                "app",
                &cmd("cat /tmp/health; echo oops >&2; exit 4"),
                Duration::from_secs(10),
            )
            .expect("exec");
        (r.stdout == b"ok\n").then_some(r)
    });
    assert_eq!(
        (r.exit_code, r.stderr.as_slice(), r.timed_out),
        (4, &b"oops\n"[..], false)
    );
    let started = std::time::Instant::now();
    let slow = pods
        .mgr
        .exec_sync(&pod, "app", &cmd("sleep 30"), Duration::from_millis(300))
        .expect("exec");
    assert!(slow.timed_out);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the timeout did not kill the process"
    );
    let procs = pods.mgr.exec_sync(
        &pod,
        "app",
        &cmd("ps -o args | grep -c '^sleep 30'"),
        Duration::from_secs(10),
    );
    assert_eq!(
        procs.expect("exec").stdout,
        b"0\n",
        "the timed-out process must be gone"
    );
}

#[test]
fn pod_sysctls_apply_to_every_container_of_the_pod() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let pods = Pods::new();
    let id = unique_name("pod");
    let cg = unique_cgroup("pod");
    let mut cfg = SandboxConfig {
        id: id.clone(),
        hostname: "sysctl".into(),
        cgroup_parent: PathBuf::from(&cg),
        ..Default::default()
    };
    cfg.sysctls
        .insert("net.ipv4.ip_unprivileged_port_start".into(), "81".into());
    cfg.sysctls.insert("kernel.shmmni".into(), "1234".into());
    pods.mgr.create_sandbox(&cfg).expect("sandbox");
    let mut bundles = Vec::new();
    let log = pods.run(
        &id,
        "reader",
        "cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/shmmni",
        &mut bundles,
    );
    assert_eq!(pods.wait_exit(&id, "reader"), 0);
    let out: Vec<String> = log_entries(&log).into_iter().map(|e| e.2).collect();
    assert_eq!(out, ["81", "1234"]);
    let mut bad = cfg.clone();
    bad.id = unique_name("pod");
    bad.sysctls = [("vm.swappiness".to_string(), "1".to_string())].into();
    let err = pods
        .mgr
        .create_sandbox(&bad)
        .expect_err("host sysctl refused");
    assert!(err.to_string().contains("vm.swappiness"), "{err}");
    assert!(!pods.dir.path().join(&bad.id).exists());
}

#[test]
fn the_log_shim_reopens_its_file_after_rotation() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let pods = Pods::new();
    let (pod, _) = pods.sandbox("rotate", false);
    let mut bundles = Vec::new();
    let log = pods.run(
        &pod,
        "chatty",
        "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.02; done",
        &mut bundles,
    );
    wait_for("first lines", Duration::from_secs(10), || {
        (log_entries(&log).len() >= 3).then_some(())
    });
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    pods.mgr
        .reopen_container_log(&pod, "chatty")
        .expect("reopen");
    wait_for("lines in the new file", Duration::from_secs(10), || {
        (log_entries(&log).len() >= 3).then_some(())
    });
    let old: Vec<String> = log_entries(&rotated).into_iter().map(|e| e.2).collect();
    let new: Vec<String> = log_entries(&log).into_iter().map(|e| e.2).collect();
    // Nothing lost or repeated at the seam: the new file continues where the old one stopped.
    let last_old: u32 = old
        .last()
        .and_then(|l| l.strip_prefix("line"))
        .and_then(|n| n.parse().ok())
        .expect("n");
    let first_new: u32 = new[0]
        .strip_prefix("line")
        .and_then(|n| n.parse().ok())
        .expect("n");
    assert_eq!(
        first_new,
        last_old + 1,
        "old ends {:?}, new starts {:?}",
        old.last(),
        new.first()
    );
    pods.mgr
        .stop_container(&pod, "chatty", Duration::ZERO)
        .expect("stop");
    let err = pods
        .mgr
        .reopen_container_log(&pod, "chatty")
        .expect_err("stopped");
    assert!(err.to_string().contains("not running"), "{err}");
}

#[test]
fn a_duplicate_container_name_in_a_sandbox_is_refused_and_the_first_keeps_running() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let pods = Pods::new();
    let (pod, _) = pods.sandbox("dup", false);
    let mut bundles = Vec::new();
    let log = pods.run(&pod, "one", "echo first; exec sleep 60", &mut bundles);
    let b = Bundle::busybox(&["true"]).expect("bundle");
    let err = pods
        .mgr
        .create_container(
            &pod,
            &ContainerConfig {
                id: "one".into(),
                bundle: b.path().to_path_buf(),
                log_path: pods.log_path("other"),
            },
        )
        .expect_err("duplicate");
    assert!(err.to_string().contains("exists"), "{err}");
    let st = pods.mgr.container_status(&pod, "one").expect("status");
    assert_eq!(st.status, Status::Running);
    assert_eq!(st.log_path.as_deref(), Some(log.as_path()));
}

#[test]
fn container_stats_report_cpu_and_memory_of_a_busy_container() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let pods = Pods::new();
    let (pod, _) = pods.sandbox("stats", false);
    let mut bundles = Vec::new();
    // Hold ~8 MiB in a shell variable and burn some CPU.
    pods.run(
        &pod,
        "busy",
        "x=$(head -c 8000000 /dev/zero | tr '\\0' a); echo held; while true; do :; done",
        &mut bundles,
    );
    let stats = wait_for("cpu and memory usage", Duration::from_secs(20), || {
        let s = pods.mgr.container_stats(&pod, "busy").expect("stats");
        (s.cpu_usage_ns > 50_000_000 && s.memory_working_set_bytes > 8_000_000).then_some(s)
    });
    assert!(
        stats.memory_usage_bytes >= stats.memory_working_set_bytes,
        "{stats:?}"
    );
}
