//! Privileged tests of the cgroup v2 backend on a real cgroup2 filesystem, also on this hybrid host.
//!
//! The test makes its own directory in the host's cgroup2 mount (`/sys/fs/cgroup` on a v2 host, the `unified`
//! mount of a hybrid v1 host) and passes it as the manager's cgroup root: a non-root cgroup2 directory has
//! `cgroup.controllers` like the real root, so the factory picks v2, and the host's own root is never written.
//! On the hybrid host no controller is enabled there, so this covers what v2 does without controllers: the
//! unified tree, moving processes, CPU usage from `cpu.stat`, `cgroup.freeze`, the missing-controller error and
//! destroy. Limits on v2 are covered by the fixture tests and by `runtime_cgroups.rs` on a v2 VM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use windlass_runtime::cgroups::{self, CgroupError, CgroupVersion};
use windlass_tests::cgroup::{CgroupTreeGuard, CGROUP_ROOT};
use windlass_tests::{require_privileged, wait_for, ChildGuard};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The host's cgroup2 mount point.
fn cgroup2_mount() -> PathBuf {
    let root = Path::new(CGROUP_ROOT);
    match cgroups::detect_version(root) {
        Ok(CgroupVersion::V2) => root.to_path_buf(),
        _ => root.join("unified"),
    }
}

#[test]
fn v2_backend_moves_freezes_measures_and_removes_on_a_real_cgroup2_tree() -> TestResult {
    if !require_privileged(&["busybox"]) {
        return Ok(());
    }
    let guard = CgroupTreeGuard::new();
    let mount = cgroup2_mount();
    assert!(
        mount.join("cgroup.controllers").is_file(),
        "no cgroup2 mount at {} (a v1-only host cannot run this test)",
        mount.display()
    );
    let root = mount.join(guard.top());
    std::fs::create_dir(&root)?;
    assert_eq!(cgroups::detect_version(&root)?, CgroupVersion::V2);

    let path = Path::new("/pod/burstable/ctr");
    let manager = cgroups::create_manager(&root, path)?;
    manager.create()?;
    let leaf = root.join("pod/burstable/ctr");
    assert!(leaf.join("cgroup.procs").is_file());

    // Without an enabled memory controller a limit cannot be honoured: say so, write nothing.
    let limits: LinuxResources = serde_json::from_str(r#"{"memory":{"limit":67108864}}"#)?;
    if !std::fs::read_to_string(leaf.join("cgroup.controllers"))?.contains("memory") {
        let err = manager.apply(&limits);
        assert!(
            matches!(err, Err(CgroupError::MissingController { ref controller, .. }) if controller == "memory"),
            "{err:?}"
        );
    }

    let mut child =
        ChildGuard::spawn(Command::new("busybox").args(["sh", "-c", "while :; do :; done"]))?;
    let pid = Pid::from_raw(i32::try_from(child.id())?);
    manager.add_task(pid)?;
    assert_eq!(manager.pids()?, vec![pid]);
    let proc_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    assert!(
        proc_cgroup.contains(&format!("0::/{}/pod/burstable/ctr", guard.top())),
        "{proc_cgroup}"
    );
    wait_for(
        "the loop's CPU time in cpu.stat",
        Duration::from_secs(10),
        || (manager.stats().ok()?.cpu_usage_ns > 10_000_000).then_some(()),
    );

    manager.freeze(true)?;
    assert!(std::fs::read_to_string(leaf.join("cgroup.events"))?.contains("frozen 1"));
    let frozen_at = manager.stats()?.cpu_usage_ns;
    // Asserting that nothing happens needs a stretch of time.
    std::thread::sleep(Duration::from_millis(300));
    let later = manager.stats()?.cpu_usage_ns;
    assert!(
        later - frozen_at < 5_000_000,
        "a frozen loop used {} ns",
        later - frozen_at
    );
    manager.freeze(false)?;
    wait_for("the thawed loop to run", Duration::from_secs(10), || {
        (manager.stats().ok()?.cpu_usage_ns > later + 10_000_000).then_some(())
    });

    // Destroy does not kill; once the process is gone everything create made goes, the given root stays.
    assert!(manager.destroy().is_err(), "a populated cgroup was removed");
    assert!(
        child.child_mut().try_wait()?.is_none(),
        "destroy killed the process"
    );
    child.child_mut().kill()?;
    child.child_mut().wait()?;
    cgroups::create_manager(&root, path)?.destroy()?;
    assert!(
        !root.join("pod").exists(),
        "parents made by create are left"
    );
    assert!(root.is_dir());
    Ok(())
}
