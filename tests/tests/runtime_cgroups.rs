//! Privileged tests of `windlass_runtime::cgroups` on the host's real cgroups (v1 here, v2 on Vagrant VMs).
//!
//! Each test works under its own `/sys/fs/cgroup/<controller>/windlass-test-<unique>/` subtree, owned by a
//! `CgroupTreeGuard` that kills what runs there and removes it even when the test panics. Processes are busybox
//! shells that wait for a line on stdin, so they are in the cgroup before they do the work under test.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use windlass_runtime::cgroups::{self, CgroupError, CgroupManager, CgroupVersion};
use windlass_tests::cgroup::CgroupTreeGuard;
use windlass_tests::{require_privileged, wait_for, ChildGuard};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn resources(json: &str) -> Result<LinuxResources, serde_json::Error> {
    serde_json::from_str(json)
}

/// A control file of the container's cgroup, wherever this host's cgroup version puts it.
fn control_file(
    root: &Path,
    version: CgroupVersion,
    controller: &str,
    cgroups_path: &Path,
    file: &str,
) -> PathBuf {
    let rel = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
    match version {
        CgroupVersion::V1 => root.join(controller).join(rel).join(file),
        CgroupVersion::V2 => root.join(rel).join(file),
    }
}

fn read_trimmed(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => s.trim().to_string(),
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    }
}

/// A cgroup made by the code under test inside the guard's subtree.
struct TestCgroup {
    guard: CgroupTreeGuard,
    version: CgroupVersion,
    path: PathBuf,
    manager: Box<dyn CgroupManager>,
}

impl TestCgroup {
    fn create(rel: &str) -> Result<Self, CgroupError> {
        let guard = CgroupTreeGuard::new();
        let version = cgroups::detect_version(guard.root())?;
        let path = guard.cgroups_path(rel);
        let manager = cgroups::create_manager(guard.root(), &path)?;
        manager.create()?;
        Ok(Self {
            guard,
            version,
            path,
            manager,
        })
    }

    fn file(&self, controller: &str, file: &str) -> PathBuf {
        control_file(
            self.guard.root(),
            self.version,
            controller,
            &self.path,
            file,
        )
    }

    /// Starts `busybox sh -c <script>` in the cgroup: the shell is moved in first, then told to go.
    fn spawn(&self, script: &str) -> Result<ChildGuard, Box<dyn std::error::Error>> {
        let mut child = ChildGuard::spawn(
            Command::new("busybox")
                .args(["sh", "-c", &format!("read go; {script}")])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )?;
        self.manager
            .add_task(Pid::from_raw(i32::try_from(child.id())?))?;
        let mut stdin = child.child_mut().stdin.take().ok_or("child has no stdin")?;
        stdin.write_all(b"go\n")?;
        Ok(child)
    }
}

/// Waits (bounded) for a child to exit and returns its status and output.
fn wait_exit(
    child: ChildGuard,
    timeout: Duration,
) -> Result<(ExitStatus, String, String), std::io::Error> {
    let mut child = child.into_inner();
    let status = wait_for("the process to exit", timeout, || {
        child.try_wait().ok().flatten()
    });
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut err)?;
    }
    Ok((status, out, err))
}

#[test]
fn limits_applied_by_the_manager_are_in_the_kernels_control_files() -> TestResult {
    if !require_privileged(&["busybox"]) {
        return Ok(());
    }
    let cg = TestCgroup::create("pod/ctr")?;
    // Bad input is refused before anything is written.
    let err = cg.manager.apply(&resources(
        r#"{"memory":{"limit":67108864},"cpu":{"cpus":"0-x"}}"#,
    )?);
    assert!(
        matches!(err, Err(CgroupError::InvalidResources { .. })),
        "{err:?}"
    );
    // A well-formed value the kernel refuses (CPUs this machine does not have) names the file it failed on.
    let err = cg
        .manager
        .apply(&resources(r#"{"cpu":{"cpus":"0-4095"}}"#)?);
    assert!(
        matches!(err, Err(CgroupError::Write { ref path, .. }) if path.ends_with("cpuset.cpus")),
        "{err:?}"
    );

    cg.manager.apply(&resources(
        r#"{"memory":{"limit":67108864,"swap":67108864},
            "cpu":{"shares":512,"quota":50000,"period":100000,"cpus":"0","mems":"0"},
            "pids":{"limit":20}}"#,
    )?)?;
    let expected: &[(&str, &str, &str)] = match cg.version {
        CgroupVersion::V1 => &[
            ("memory", "memory.limit_in_bytes", "67108864"),
            ("memory", "memory.memsw.limit_in_bytes", "67108864"),
            ("cpu", "cpu.shares", "512"),
            ("cpu", "cpu.cfs_period_us", "100000"),
            ("cpu", "cpu.cfs_quota_us", "50000"),
            ("cpuset", "cpuset.cpus", "0"),
            ("cpuset", "cpuset.mems", "0"),
            ("pids", "pids.max", "20"),
        ],
        _ => &[
            ("memory", "memory.max", "67108864"),
            ("memory", "memory.swap.max", "0"),
            ("cpu", "cpu.weight", "20"),
            ("cpu", "cpu.max", "50000 100000"),
            ("cpuset", "cpuset.cpus", "0"),
            ("pids", "pids.max", "20"),
        ],
    };
    for (controller, file, value) in expected {
        if *file == "memory.memsw.limit_in_bytes" && !cg.file(controller, file).exists() {
            continue; // swap accounting off on this kernel
        }
        assert_eq!(read_trimmed(&cg.file(controller, file)), *value, "{file}");
    }

    // A process put in the cgroup is confined by it: the kernel lists the container's path for it.
    let child = cg.spawn("sleep 60")?;
    let proc_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id()))?;
    let rel = cg.path.to_string_lossy().to_string();
    assert!(
        proc_cgroup
            .lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&rel))
            || proc_cgroup.contains(&format!("0::{rel}")),
        "{rel} not in /proc/{}/cgroup:\n{proc_cgroup}",
        child.id()
    );
    assert_eq!(
        read_trimmed(&cg.file("cpuset", "cpuset.effective_cpus")),
        "0"
    );
    Ok(())
}

#[test]
fn stats_report_the_cpu_and_memory_a_process_in_the_cgroup_uses() -> TestResult {
    if !require_privileged(&["busybox"]) {
        return Ok(());
    }
    let cg = TestCgroup::create("pod/ctr")?;
    // Hold 4 MiB in a shell variable, then spin.
    let child = cg.spawn("x=$(head -c 4194304 /dev/zero | tr '\\0' a); while :; do :; done")?;
    let stats = wait_for(
        "4 MiB resident and 50 ms of CPU",
        Duration::from_secs(20),
        || {
            let s = cg.manager.stats().ok()?;
            // rss, not just usage: usage also counts the pipe's page cache before the shell holds the bytes.
            (s.cpu_usage_ns >= 50_000_000 && s.memory_rss_bytes >= 4 << 20).then_some(s)
        },
    );
    assert!(
        stats.memory_working_set_bytes > 0
            && stats.memory_working_set_bytes <= stats.memory_usage_bytes
    );
    assert!(stats.memory_rss_bytes >= 4 << 20, "{stats:?}");
    assert!(stats.pids_current >= 1, "{stats:?}");
    assert_eq!(stats.oom_kill_count.unwrap_or(0), 0);
    assert!(!cg.manager.oom_killed()?);
    let pid = Pid::from_raw(i32::try_from(child.id())?);
    assert!(cg.manager.pids()?.contains(&pid));
    Ok(())
}

#[test]
fn a_process_over_the_memory_limit_is_oom_killed_and_reported() -> TestResult {
    if !require_privileged(&["busybox"]) {
        return Ok(());
    }
    let cg = TestCgroup::create("pod/ctr")?;
    cg.manager.apply(&resources(
        r#"{"memory":{"limit":33554432,"swap":33554432}}"#,
    )?)?;
    assert!(
        !cg.manager.oom_killed()?,
        "a fresh cgroup reports no OOM kill"
    );
    // The shell holds 128 MiB in a variable: four times its limit.
    let child = cg.spawn("x=$(head -c 134217728 /dev/zero | tr '\\0' a); echo survived")?;
    let (status, out, _) = wait_exit(child, Duration::from_secs(60))?;
    assert!(!out.contains("survived"), "the shell survived: {status:?}");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "not killed by the OOM killer: {status:?}"
    );
    assert!(
        cg.manager.oom_killed()?,
        "oom_killed() is false after {status:?}"
    );
    let stats = cg.manager.stats()?;
    assert!(stats.oom_kill_count.unwrap_or(1) >= 1, "{stats:?}");
    Ok(())
}

#[test]
fn fork_fails_once_the_pids_limit_is_reached() -> TestResult {
    if !require_privileged(&["busybox"]) {
        return Ok(());
    }
    let cg = TestCgroup::create("pod/ctr")?;
    cg.manager.apply(&resources(r#"{"pids":{"limit":4}}"#)?)?;
    let child = cg.spawn(
        "for i in 1 2 3 4 5 6 7 8; do sleep 60 >/dev/null 2>&1 </dev/null & done; echo started; sleep 60 >/dev/null 2>&1 </dev/null",
    )?;
    // The shell and three sleeps fill the limit; the remaining forks fail.
    let pids = wait_for(
        "the shell to try all its forks",
        Duration::from_secs(10),
        || {
            let events = std::fs::read_to_string(cg.file("pids", "pids.events")).ok()?;
            let failed: u64 = events
                .lines()
                .find_map(|l| l.strip_prefix("max "))?
                .trim()
                .parse()
                .ok()?;
            (failed > 0).then(|| cg.manager.pids().ok()).flatten()
        },
    );
    assert!(
        pids.len() <= 4,
        "{} processes under a limit of 4: {pids:?}",
        pids.len()
    );
    assert_eq!(cg.manager.stats()?.pids_limit, Some(4));
    let mut child = child;
    child.child_mut().kill()?;
    child.child_mut().wait()?;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.child_mut().stderr.take() {
        pipe.read_to_string(&mut stderr)?;
    }
    assert!(
        stderr.contains("fork"),
        "no fork failure reported by the shell: {stderr:?}"
    );
    Ok(())
}

#[test]
fn freezing_stops_the_processes_and_thawing_resumes_them() -> TestResult {
    if !require_privileged(&["busybox"]) {
        return Ok(());
    }
    let cg = TestCgroup::create("pod/ctr")?;
    let _child = cg.spawn("while :; do :; done")?;
    wait_for("the loop to use CPU", Duration::from_secs(10), || {
        (cg.manager.stats().ok()?.cpu_usage_ns > 10_000_000).then_some(())
    });
    cg.manager.freeze(true)?;
    let frozen_at = cg.manager.stats()?.cpu_usage_ns;
    // Asserting that nothing happens needs a stretch of time; 300 ms of a spinning loop is ~300 ms of CPU.
    std::thread::sleep(Duration::from_millis(300));
    let later = cg.manager.stats()?.cpu_usage_ns;
    assert!(
        later - frozen_at < 5_000_000,
        "a frozen loop used {} ns of CPU",
        later - frozen_at
    );
    match cg.version {
        CgroupVersion::V1 => {
            assert_eq!(read_trimmed(&cg.file("freezer", "freezer.state")), "FROZEN")
        }
        _ => assert!(read_trimmed(&cg.file("", "cgroup.events")).contains("frozen 1")),
    }
    cg.manager.freeze(false)?;
    wait_for(
        "the thawed loop to use CPU again",
        Duration::from_secs(10),
        || (cg.manager.stats().ok()?.cpu_usage_ns > later + 10_000_000).then_some(()),
    );
    Ok(())
}

#[test]
fn destroy_never_kills_and_then_leaves_no_cgroup_in_any_controller() -> TestResult {
    if !require_privileged(&["busybox"]) {
        return Ok(());
    }
    let guard = CgroupTreeGuard::new();
    let root = guard.root().to_path_buf();
    // A pod cgroup made first (as a sandbox would), then a container below it with parents of its own.
    let pod_path = guard.cgroups_path("pod");
    let ctr_path = guard.cgroups_path("pod/burstable/ctr");
    let pod = cgroups::create_manager(&root, &pod_path)?;
    pod.create()?;
    let ctr = cgroups::create_manager(&root, &ctr_path)?;
    ctr.create()?;
    ctr.apply(&resources(
        r#"{"memory":{"limit":67108864},"pids":{"limit":10}}"#,
    )?)?;
    let version = cgroups::detect_version(&root)?;
    let mut child = ChildGuard::spawn(Command::new("busybox").args(["sleep", "60"]))?;
    ctr.add_task(Pid::from_raw(i32::try_from(child.id())?))?;

    // Destroy does not kill: a cgroup with a live process is reported busy, and the process lives on.
    match ctr.destroy() {
        Err(CgroupError::Destroy { errors, .. }) => assert!(!errors.is_empty()),
        other => panic!("destroying a populated cgroup gave {other:?}"),
    }
    assert!(
        child.child_mut().try_wait()?.is_none(),
        "destroy killed the process"
    );

    child.child_mut().kill()?;
    child.child_mut().wait()?;
    // A restarted runtime rebuilds the manager from (root, path) and still cleans up what create made.
    cgroups::create_manager(&root, &ctr_path)?.destroy()?;
    let pod_dir = control_file(&root, version, "memory", &pod_path, "");
    assert!(
        pod_dir.is_dir(),
        "the pod cgroup was made by someone else and must stay"
    );
    assert!(
        !pod_dir.join("burstable").exists(),
        "the parent the container's create made is gone"
    );

    pod.destroy()?;
    assert_eq!(
        guard.leftovers(),
        Vec::<PathBuf>::new(),
        "cgroup directories left behind"
    );
    // Destroying again is harmless.
    pod.destroy()?;
    Ok(())
}

#[test]
fn a_cpu_quota_throttles_a_spinning_process() -> TestResult {
    if !require_privileged(&["busybox"]) {
        return Ok(());
    }
    let cg = TestCgroup::create("pod/ctr")?;
    // 10 ms of CPU per 100 ms period: a spinning loop gets about a tenth of one CPU.
    cg.manager
        .apply(&resources(r#"{"cpu":{"quota":10000,"period":100000}}"#)?)?;
    let _child = cg.spawn("while :; do :; done")?;
    let start = wait_for("the loop to run", Duration::from_secs(10), || {
        let s = cg.manager.stats().ok()?;
        (s.cpu_usage_ns > 0).then_some(s)
    });
    let started = std::time::Instant::now();
    let end = wait_for(
        "the kernel to throttle the loop",
        Duration::from_secs(10),
        || {
            let s = cg.manager.stats().ok()?;
            (s.cpu_throttled_periods >= 5 && started.elapsed() >= Duration::from_millis(500))
                .then_some(s)
        },
    );
    let wall = started.elapsed().as_nanos() as u64;
    let used = end.cpu_usage_ns - start.cpu_usage_ns;
    // Allow for the period boundaries; unthrottled the loop would use the whole wall time.
    assert!(
        used < wall / 4,
        "the loop used {used} ns of CPU in {wall} ns under a 10% quota ({end:?})"
    );
    assert!(end.cpu_throttled_ns > 0, "{end:?}");
    Ok(())
}
