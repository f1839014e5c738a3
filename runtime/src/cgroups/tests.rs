//! Manager tests on temp-dir fixtures laid out like `/sys/fs/cgroup` on v1 and v2 hosts. cgroupfs makes control
//! files appear with each `mkdir` and vanish with `rmdir`; the fixtures play that part by hand (`kernel_files`,
//! `kernel_rmdir_ready`).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use tempfile::TempDir;

use super::fs::is_marked_created;
use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const CONTAINER: &str = "/windlass/kubepods/burstable/pod1234/ctr";

fn kernel_files(dir: &Path, files: &[(&str, &str)]) -> std::io::Result<()> {
    for (name, content) in files {
        fs::write(dir.join(name), content)?;
    }
    Ok(())
}

/// Removes the regular files a test put in directories, as cgroupfs would on `rmdir`.
fn kernel_rmdir_ready(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            kernel_rmdir_ready(&entry.path())?;
        } else if entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn resources(json: &str) -> Result<LinuxResources, serde_json::Error> {
    serde_json::from_str(json)
}

fn read(path: PathBuf) -> String {
    fs::read_to_string(&path).unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// A v1 root like a typical distro's: `cpu` and `cpuacct` are symlinks to one `cpu,cpuacct` mount, and a
/// `windlass` parent already exists in cpuset with empty cpus/mems (made by someone else).
fn v1_root() -> std::io::Result<TempDir> {
    let root = tempfile::tempdir()?;
    let r = root.path();
    for h in [
        "cpuset",
        "cpu,cpuacct",
        "memory",
        "pids",
        "freezer",
        "systemd",
    ] {
        fs::create_dir(r.join(h))?;
    }
    symlink("cpu,cpuacct", r.join("cpu"))?;
    symlink("cpu,cpuacct", r.join("cpuacct"))?;
    kernel_files(
        &r.join("cpuset"),
        &[("cpuset.cpus", "0-3\n"), ("cpuset.mems", "0\n")],
    )?;
    fs::create_dir(r.join("cpuset/windlass"))?;
    kernel_files(
        &r.join("cpuset/windlass"),
        &[("cpuset.cpus", "\n"), ("cpuset.mems", "\n")],
    )?;
    Ok(root)
}

fn v1_leaf(root: &Path, hierarchy: &str) -> PathBuf {
    root.join(hierarchy).join(CONTAINER.trim_start_matches('/'))
}

fn v2_root() -> std::io::Result<TempDir> {
    let root = tempfile::tempdir()?;
    kernel_files(
        root.path(),
        &[
            (
                "cgroup.controllers",
                "cpuset cpu io memory hugetlb pids rdma misc\n",
            ),
            ("cgroup.subtree_control", "cpu memory\n"),
        ],
    )?;
    Ok(root)
}

fn v2_leaf(root: &Path) -> PathBuf {
    root.join(CONTAINER.trim_start_matches('/'))
}

#[test]
fn version_is_detected_from_the_root_layout() -> TestResult {
    let v1 = v1_root()?;
    assert_eq!(detect_version(v1.path())?, CgroupVersion::V1);
    // Hybrid: v1 controllers plus an (empty) cgroup2 mount at unified/ is driven as v1.
    fs::create_dir(v1.path().join("unified"))?;
    kernel_files(&v1.path().join("unified"), &[("cgroup.controllers", "\n")])?;
    assert_eq!(detect_version(v1.path())?, CgroupVersion::V1);
    assert_eq!(detect_version(v2_root()?.path())?, CgroupVersion::V2);
    let empty = tempfile::tempdir()?;
    assert!(matches!(
        detect_version(empty.path()),
        Err(CgroupError::NoCgroupFs { .. })
    ));
    assert!(matches!(
        create_manager(empty.path(), Path::new(CONTAINER)),
        Err(CgroupError::NoCgroupFs { .. })
    ));
    assert!(matches!(
        create_manager(v1.path(), Path::new("/a/../../b")),
        Err(CgroupError::InvalidPath { .. })
    ));
    Ok(())
}

#[test]
fn v1_create_makes_the_cgroup_in_every_hierarchy_and_fills_cpuset_parents() -> TestResult {
    let root = v1_root()?;
    let r = root.path();
    let manager = create_manager(r, Path::new(CONTAINER))?;
    manager.create()?;
    for h in [
        "cpuset",
        "cpu,cpuacct",
        "memory",
        "pids",
        "freezer",
        "systemd",
    ] {
        assert!(v1_leaf(r, h).is_dir(), "no cgroup in {h}");
        // Parents we made are marked; the pre-existing cpuset/windlass is not.
        assert!(
            is_marked_created(&r.join(h).join("windlass/kubepods")),
            "{h}"
        );
    }
    assert!(!is_marked_created(&r.join("cpuset/windlass")));
    assert!(is_marked_created(&r.join("memory/windlass")));
    // Empty cpusets refuse tasks: the existing parent got its parent's cpus and mems.
    assert_eq!(read(r.join("cpuset/windlass/cpuset.cpus")), "0-3");
    assert_eq!(read(r.join("cpuset/windlass/cpuset.mems")), "0");
    // Creating again is harmless.
    manager.create()?;
    Ok(())
}

#[test]
fn v1_apply_writes_converted_limits_into_each_controller() -> TestResult {
    let root = v1_root()?;
    let r = root.path();
    let manager = create_manager(r, Path::new(CONTAINER))?;
    manager.create()?;
    kernel_files(
        &v1_leaf(r, "memory"),
        &[
            ("memory.limit_in_bytes", "9223372036854771712\n"),
            ("memory.memsw.limit_in_bytes", "9223372036854771712\n"),
        ],
    )?;
    kernel_files(
        &v1_leaf(r, "cpu"),
        &[
            ("cpu.shares", "1024\n"),
            ("cpu.cfs_period_us", "100000\n"),
            ("cpu.cfs_quota_us", "-1\n"),
        ],
    )?;
    kernel_files(
        &v1_leaf(r, "cpuset"),
        &[("cpuset.cpus", ""), ("cpuset.mems", "")],
    )?;
    kernel_files(&v1_leaf(r, "pids"), &[("pids.max", "max\n")])?;

    manager.apply(&resources(
        r#"{"memory":{"limit":33554432,"swap":33554432},"cpu":{"shares":256,"quota":20000,"period":100000,
            "cpus":"1","mems":"0"},"pids":{"limit":10}}"#,
    )?)?;
    assert_eq!(
        read(v1_leaf(r, "memory").join("memory.limit_in_bytes")),
        "33554432"
    );
    assert_eq!(
        read(v1_leaf(r, "memory").join("memory.memsw.limit_in_bytes")),
        "33554432"
    );
    assert_eq!(read(v1_leaf(r, "cpuacct").join("cpu.shares")), "256");
    assert_eq!(read(v1_leaf(r, "cpu").join("cpu.cfs_quota_us")), "20000");
    assert_eq!(read(v1_leaf(r, "cpu").join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(v1_leaf(r, "cpuset").join("cpuset.cpus")), "1");
    assert_eq!(read(v1_leaf(r, "pids").join("pids.max")), "10");
    Ok(())
}

#[test]
fn v1_apply_changes_nothing_when_a_control_file_is_missing() -> TestResult {
    let root = v1_root()?;
    let r = root.path();
    let manager = create_manager(r, Path::new(CONTAINER))?;
    manager.create()?;
    kernel_files(
        &v1_leaf(r, "memory"),
        &[("memory.limit_in_bytes", "9223372036854771712\n")],
    )?;
    // pids.max is missing (say, an old kernel): the memory limit must not be written either.
    let err = manager.apply(&resources(
        r#"{"memory":{"limit":1048576},"pids":{"limit":5}}"#,
    )?);
    assert!(
        matches!(err, Err(CgroupError::MissingFile { ref path }) if path.ends_with("pids.max")),
        "{err:?}"
    );
    assert_eq!(
        read(v1_leaf(r, "memory").join("memory.limit_in_bytes")),
        "9223372036854771712\n"
    );
    // Bad values are refused the same way.
    let err = manager.apply(&resources(r#"{"memory":{"limit":-5}}"#)?);
    assert!(
        matches!(err, Err(CgroupError::InvalidResources { .. })),
        "{err:?}"
    );
    assert_eq!(
        read(v1_leaf(r, "memory").join("memory.limit_in_bytes")),
        "9223372036854771712\n"
    );
    Ok(())
}

#[test]
fn v1_stats_oom_and_pids_are_read_from_the_controller_files() -> TestResult {
    let root = v1_root()?;
    let r = root.path();
    let manager = create_manager(r, Path::new(CONTAINER))?;
    manager.create()?;
    assert!(
        !manager.oom_killed()?,
        "no oom_control yet means no OOM kill"
    );
    kernel_files(
        &v1_leaf(r, "cpuacct"),
        &[
            ("cpuacct.usage", "5000000\n"),
            ("cpuacct.usage_user", "3000000\n"),
            ("cpuacct.usage_sys", "2000000\n"),
            (
                "cpu.stat",
                "nr_periods 10\nnr_throttled 4\nthrottled_time 123456\n",
            ),
        ],
    )?;
    kernel_files(
        &v1_leaf(r, "memory"),
        &[
            ("memory.usage_in_bytes", "10485760\n"),
            ("memory.limit_in_bytes", "9223372036854771712\n"),
            (
                "memory.stat",
                "cache 1\nrss 2\ninactive_file 3\ntotal_cache 4194304\ntotal_rss 6291456\ntotal_inactive_file 1048576\n",
            ),
            ("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"),
        ],
    )?;
    kernel_files(
        &v1_leaf(r, "pids"),
        &[
            ("pids.current", "3\n"),
            ("pids.max", "max\n"),
            ("cgroup.procs", "100\n101\n"),
        ],
    )?;
    fs::create_dir(v1_leaf(r, "pids").join("sub"))?;
    kernel_files(
        &v1_leaf(r, "pids").join("sub"),
        &[("cgroup.procs", "102\n")],
    )?;

    let stats = manager.stats()?;
    assert_eq!(stats.cpu_usage_ns, 5_000_000);
    assert_eq!(stats.cpu_user_ns, Some(3_000_000));
    assert_eq!(stats.cpu_system_ns, Some(2_000_000));
    assert_eq!(
        (
            stats.cpu_periods,
            stats.cpu_throttled_periods,
            stats.cpu_throttled_ns
        ),
        (10, 4, 123_456)
    );
    assert_eq!(stats.memory_usage_bytes, 10_485_760);
    assert_eq!(stats.memory_working_set_bytes, 10_485_760 - 1_048_576);
    assert_eq!(stats.memory_rss_bytes, 6_291_456);
    assert_eq!(stats.memory_cache_bytes, 4_194_304);
    assert_eq!(
        stats.memory_limit_bytes, None,
        "v1's huge default limit means unlimited"
    );
    assert_eq!((stats.pids_current, stats.pids_limit), (3, None));
    assert_eq!(stats.oom_kill_count, Some(2));
    assert!(manager.oom_killed()?);
    let mut pids = manager.pids()?;
    pids.sort();
    assert_eq!(pids, [100, 101, 102].map(Pid::from_raw));

    // Before Linux 4.13 there is no oom_kill line; memory.failcnt is the fallback.
    kernel_files(
        &v1_leaf(r, "memory"),
        &[
            ("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\n"),
            ("memory.failcnt", "0\n"),
        ],
    )?;
    assert!(!manager.oom_killed()?);
    assert_eq!(manager.stats()?.oom_kill_count, None);
    Ok(())
}

#[test]
fn v1_freeze_writes_the_freezer_state() -> TestResult {
    let root = v1_root()?;
    let r = root.path();
    let manager = create_manager(r, Path::new(CONTAINER))?;
    manager.create()?;
    kernel_files(&v1_leaf(r, "freezer"), &[("freezer.state", "THAWED\n")])?;
    manager.freeze(true)?;
    assert_eq!(read(v1_leaf(r, "freezer").join("freezer.state")), "FROZEN");
    manager.freeze(false)?;
    assert_eq!(read(v1_leaf(r, "freezer").join("freezer.state")), "THAWED");
    Ok(())
}

#[test]
fn v1_destroy_by_a_rebuilt_manager_removes_only_what_create_made() -> TestResult {
    let root = v1_root()?;
    let r = root.path();
    // An administrator's cgroup next to ours must survive.
    fs::create_dir_all(r.join("memory/windlass/system"))?;
    create_manager(r, Path::new(CONTAINER))?.create()?;
    let sibling = "/windlass/kubepods/burstable/pod1234/ctr2";
    create_manager(r, Path::new(sibling))?.create()?;

    // A restarted runtime knows only (root, path).
    create_manager(r, Path::new(CONTAINER))?.destroy()?;
    assert!(!v1_leaf(r, "memory").exists());
    assert!(
        r.join("memory/windlass/kubepods/burstable/pod1234")
            .is_dir(),
        "the sibling still uses the pod cgroup"
    );

    create_manager(r, Path::new(sibling))?.destroy()?;
    for h in ["cpu,cpuacct", "pids", "freezer", "systemd"] {
        assert!(
            !r.join(h).join("windlass").exists(),
            "{h}/windlass was made by create and is empty"
        );
    }
    // cpuset/windlass existed before; memory/windlass holds someone else's cgroup.
    assert!(r.join("cpuset/windlass").is_dir());
    assert!(!r.join("cpuset/windlass/kubepods").exists());
    assert!(r.join("memory/windlass/system").is_dir());
    assert!(!r.join("memory/windlass/kubepods").exists());
    // Idempotent.
    create_manager(r, Path::new(sibling))?.destroy()?;
    Ok(())
}

#[test]
fn v1_destroy_goes_on_after_failures_and_reports_them_all() -> TestResult {
    let root = v1_root()?;
    let r = root.path();
    let manager = create_manager(r, Path::new(CONTAINER))?;
    manager.create()?;
    // Two hierarchies cannot be removed (a plain directory with a file says ENOTEMPTY, like a busy cgroup).
    kernel_files(&v1_leaf(r, "memory"), &[("memory.usage_in_bytes", "1\n")])?;
    kernel_files(&v1_leaf(r, "pids"), &[("pids.current", "1\n")])?;
    match manager.destroy() {
        Err(CgroupError::Destroy { errors, .. }) => assert_eq!(errors.len(), 2, "{errors:?}"),
        other => panic!("expected a Destroy error, got {other:?}"),
    }
    assert!(
        !v1_leaf(r, "freezer").exists(),
        "other hierarchies are still cleaned up"
    );
    assert!(!r.join("freezer/windlass").exists());
    assert!(v1_leaf(r, "memory").is_dir());
    kernel_rmdir_ready(&v1_leaf(r, "memory"))?;
    kernel_rmdir_ready(&v1_leaf(r, "pids"))?;
    manager.destroy()?;
    assert!(!r.join("memory/windlass").exists() && !r.join("pids/windlass").exists());
    Ok(())
}

#[test]
fn v2_create_enables_controllers_top_down() -> TestResult {
    let root = v2_root()?;
    let r = root.path();
    let manager = create_manager(r, Path::new(CONTAINER))?;
    manager.create()?;
    assert!(v2_leaf(r).is_dir());
    assert!(is_marked_created(
        &r.join("windlass/kubepods/burstable/pod1234")
    ));
    assert!(!is_marked_created(&v2_leaf(r)));
    // cpu and memory were already on; the rest is added (the fixture file keeps what was written last).
    assert_eq!(
        read(r.join("cgroup.subtree_control")),
        "+cpuset +io +hugetlb +pids +rdma +misc"
    );
    Ok(())
}

#[test]
fn v2_apply_converts_oci_values_into_unified_files() -> TestResult {
    let root = v2_root()?;
    let r = root.path();
    let manager = create_manager(r, Path::new(CONTAINER))?;
    manager.create()?;
    let leaf = v2_leaf(r);
    kernel_files(
        &leaf,
        &[
            ("cgroup.controllers", "cpuset cpu memory pids\n"),
            ("memory.max", "max\n"),
            ("memory.swap.max", "max\n"),
            ("cpu.weight", "100\n"),
            ("cpu.max", "max 100000\n"),
            ("cpuset.cpus", "\n"),
            ("pids.max", "max\n"),
        ],
    )?;
    manager.apply(&resources(
        r#"{"memory":{"limit":67108864,"swap":67108864},"cpu":{"shares":2048,"quota":150000,"period":100000,
            "cpus":"0-1"},"pids":{"limit":64}}"#,
    )?)?;
    assert_eq!(read(leaf.join("memory.max")), "67108864");
    assert_eq!(
        read(leaf.join("memory.swap.max")),
        "0",
        "memory+swap equal to memory means no swap"
    );
    assert_eq!(read(leaf.join("cpu.weight")), "79");
    assert_eq!(read(leaf.join("cpu.max")), "150000 100000");
    assert_eq!(read(leaf.join("cpuset.cpus")), "0-1");
    assert_eq!(read(leaf.join("pids.max")), "64");

    // A controller the parent did not enable for us: refused, nothing written.
    kernel_files(&leaf, &[("cgroup.controllers", "cpu memory\n")])?;
    fs::remove_file(leaf.join("pids.max"))?;
    let err = manager.apply(&resources(
        r#"{"memory":{"limit":1048576},"pids":{"limit":5}}"#,
    )?);
    assert!(
        matches!(err, Err(CgroupError::MissingController { ref controller, .. }) if controller == "pids"),
        "{err:?}"
    );
    assert_eq!(read(leaf.join("memory.max")), "67108864");

    // No swap accounting: "no swap" needs no memory.swap.max, a real swap allowance does.
    fs::remove_file(leaf.join("memory.swap.max"))?;
    manager.apply(&resources(
        r#"{"memory":{"limit":1048576,"swap":1048576}}"#,
    )?)?;
    assert_eq!(read(leaf.join("memory.max")), "1048576");
    let err = manager.apply(&resources(
        r#"{"memory":{"limit":1048576,"swap":2097152}}"#,
    )?);
    assert!(
        matches!(err, Err(CgroupError::MissingFile { .. })),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn v2_stats_oom_and_freeze_use_the_unified_files() -> TestResult {
    let root = v2_root()?;
    let r = root.path();
    let manager = create_manager(r, Path::new(CONTAINER))?;
    manager.create()?;
    let leaf = v2_leaf(r);
    kernel_files(
        &leaf,
        &[
            (
                "cpu.stat",
                "usage_usec 7000\nuser_usec 4000\nsystem_usec 3000\nnr_periods 5\nnr_throttled 1\nthrottled_usec 20\n",
            ),
            ("memory.current", "20971520\n"),
            ("memory.max", "33554432\n"),
            ("memory.stat", "anon 8388608\nfile 6291456\ninactive_file 2097152\n"),
            ("memory.events", "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n"),
            ("pids.current", "2\n"),
            ("pids.max", "10\n"),
            ("cgroup.procs", "200\n"),
            ("cgroup.freeze", "0\n"),
            ("cgroup.events", "populated 1\nfrozen 1\n"),
        ],
    )?;
    let stats = manager.stats()?;
    assert_eq!(stats.cpu_usage_ns, 7_000_000);
    assert_eq!(
        (stats.cpu_user_ns, stats.cpu_system_ns),
        (Some(4_000_000), Some(3_000_000))
    );
    assert_eq!(
        (
            stats.cpu_periods,
            stats.cpu_throttled_periods,
            stats.cpu_throttled_ns
        ),
        (5, 1, 20_000)
    );
    assert_eq!(stats.memory_usage_bytes, 20_971_520);
    assert_eq!(stats.memory_working_set_bytes, 20_971_520 - 2_097_152);
    assert_eq!(
        (stats.memory_rss_bytes, stats.memory_cache_bytes),
        (8_388_608, 6_291_456)
    );
    assert_eq!(stats.memory_limit_bytes, Some(33_554_432));
    assert_eq!((stats.pids_current, stats.pids_limit), (2, Some(10)));
    assert_eq!(stats.oom_kill_count, Some(1));
    assert!(manager.oom_killed()?);
    assert_eq!(manager.pids()?, vec![Pid::from_raw(200)]);

    // The fixture's cgroup.events says frozen, so freezing returns at once.
    manager.freeze(true)?;
    assert_eq!(read(leaf.join("cgroup.freeze")), "1");
    Ok(())
}

#[test]
fn v2_destroy_removes_the_cgroup_and_the_parents_create_made() -> TestResult {
    let root = v2_root()?;
    let r = root.path();
    fs::create_dir(r.join("windlass"))?; // made by someone else: stays
    let manager = create_manager(r, Path::new(CONTAINER))?;
    manager.create()?;
    create_manager(r, Path::new(CONTAINER))?.destroy()?;
    assert!(!r.join("windlass/kubepods").exists());
    assert!(r.join("windlass").is_dir());
    assert!(matches!(manager.stats(), Err(CgroupError::NotFound { .. })));
    assert!(matches!(manager.pids(), Err(CgroupError::NotFound { .. })));
    Ok(())
}

#[test]
fn fake_manager_records_what_the_lifecycle_did() -> TestResult {
    let fake = FakeCgroupManager::new();
    let boxed: Box<dyn CgroupManager> = Box::new(fake.clone());
    boxed.create()?;
    boxed.add_task(Pid::from_raw(42))?;
    boxed.apply(&resources(r#"{"pids":{"limit":3}}"#)?)?;
    fake.state().oom_killed = true;
    assert!(boxed.oom_killed()?);
    boxed.destroy()?;
    let state = fake.state();
    assert!(state.destroyed);
    assert_eq!(state.applied.len(), 1);
    Ok(())
}
