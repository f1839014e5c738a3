//! Privileged tests of single OCI containers through the runc-compatible `windlass-runtime` CLI: isolation,
//! process attributes, security settings, lifecycle and cleanup.

use std::time::Duration;

use serde_json::json;
use windlass_tests::bundle::Bundle;
use windlass_tests::runtime::{
    cgroup_dirs, mounts_mentioning, set_cgroup, unique_cgroup, RuntimeCli,
};
use windlass_tests::{require_privileged, unique_name, wait_for, ChildGuard};

fn bundle(script: &str) -> (Bundle, String) {
    let mut b = Bundle::busybox(&["sh", "-c", script]).expect("bundle");
    let cg = unique_cgroup("ct");
    set_cgroup(&mut b, &cg);
    b.write_config().expect("config");
    (b, cg)
}

fn edit(b: &mut Bundle, f: impl FnOnce(&mut serde_json::Value)) {
    f(b.config_mut());
    b.write_config().expect("config");
}

#[test]
fn a_container_is_pid_one_with_its_own_hostname_and_no_host_devices() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, _) = bundle("echo pid=$$; hostname; ls /dev");
    let (code, out, err) = rt.run(&b, &unique_name("iso"));
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("pid=1"));
    assert_eq!(lines.next(), Some("windlass"));
    let devs: Vec<&str> = lines.collect();
    for want in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue", "fd",
        "stdin",
    ] {
        assert!(devs.contains(&want), "/dev lacks {want}: {devs:?}");
    }
    for host_only in ["kmsg", "mem", "vda", "sda", "loop0", "console"] {
        assert!(
            !devs.contains(&host_only),
            "/dev shows host device {host_only}: {devs:?}"
        );
    }
}

#[test]
fn a_container_sees_only_its_own_mounts_and_leaves_none_on_the_host() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, _) = bundle("cat /proc/self/mountinfo");
    let rootfs = b.rootfs().to_string_lossy().into_owned();
    let (code, out, err) = rt.run(&b, &unique_name("mnt"));
    assert_eq!(code, 0, "{err}");
    let targets: Vec<&str> = out.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    assert!(targets.contains(&"/"), "{out}");
    assert!(
        targets.contains(&"/proc") && targets.contains(&"/dev/pts"),
        "{out}"
    );
    assert!(
        !targets
            .iter()
            .any(|t| t.starts_with("/work") || t.starts_with("/run/netns")),
        "host mounts leak: {out}"
    );
    assert!(
        mounts_mentioning(&rootfs).is_empty(),
        "the rootfs is still mounted on the host"
    );
}

#[test]
fn capabilities_are_dropped_to_the_configured_sets() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, _) = bundle(
        "grep -E '^Cap(Eff|Prm|Bnd|Inh)' /proc/self/status; grep NoNewPrivs /proc/self/status",
    );
    let (code, out, err) = rt.run(&b, &unique_name("cap"));
    assert_eq!(code, 0, "{err}");
    // CAP_AUDIT_WRITE (29), CAP_KILL (5) and CAP_NET_BIND_SERVICE (10), as in runc's default spec.
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert!(
            out.contains(&format!("{set}:\t0000000020000420")),
            "{set} wrong:\n{out}"
        );
    }
    assert!(out.contains("CapInh:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
}

#[test]
fn a_non_root_user_gets_no_effective_capabilities_but_its_uid_gid_and_groups() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("id -u; id -g; id -G; grep CapEff /proc/self/status; umask");
    edit(&mut b, |c| {
        c["process"]["user"] =
            json!({"uid": 65534, "gid": 65534, "additionalGids": [10, 20], "umask": 63});
    });
    let (code, out, err) = rt.run(&b, &unique_name("usr"));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "65534");
    assert_eq!(lines[1], "65534");
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["65534", "10", "20"],
        "{out}"
    );
    assert_eq!(lines[3], "CapEff:\t0000000000000000");
    assert_eq!(lines[4], "0077");
}

#[test]
fn env_cwd_and_rlimits_reach_the_process() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("echo $GREETING; pwd; ulimit -n; ulimit -Hn; ulimit -c");
    edit(&mut b, |c| {
        c["process"]["env"] = json!(["PATH=/bin", "GREETING=hello world"]);
        c["process"]["cwd"] = json!("/tmp");
        c["process"]["rlimits"] = json!([
            {"type": "RLIMIT_NOFILE", "soft": 256, "hard": 512},
            {"type": "RLIMIT_CORE", "soft": 0, "hard": 0}
        ]);
    });
    let (code, out, err) = rt.run(&b, &unique_name("env"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["hello world", "/tmp", "256", "512", "0"]
    );
}

#[test]
fn an_rlimit_above_the_hard_limit_is_clamped_and_the_container_still_runs() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("ulimit -Hn");
    edit(&mut b, |c| {
        c["process"]["rlimits"] =
            json!([{"type": "RLIMIT_NOFILE", "soft": 1048576, "hard": 1048576}]);
    });
    let (code, out, err) = rt.run(&b, &unique_name("rlim"));
    assert_eq!(code, 0, "{err}");
    let hard: u64 = out.trim().parse().expect("a number");
    assert!(hard <= 1048576 && hard > 0, "{out}");
}

#[test]
fn seccomp_denies_mkdir_with_eperm() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("mkdir /tmp/denied; echo rc=$?; touch /tmp/allowed && echo touched");
    edit(&mut b, |c| {
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
    });
    let (code, out, err) = rt.run(&b, &unique_name("sec"));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("Operation not permitted"),
        "mkdir was not denied: {out} {err}"
    );
    assert!(out.contains("rc=1") && out.contains("touched"), "{out}");
}

#[test]
fn an_allow_list_seccomp_profile_denies_everything_else() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("echo before; mkdir /tmp/x || echo mkdir-denied");
    // What busybox sh needs; mkdir is left out.
    let allowed = [
        "read",
        "write",
        "writev",
        "exit",
        "exit_group",
        "rt_sigaction",
        "rt_sigprocmask",
        "rt_sigreturn",
        "brk",
        "mmap",
        "munmap",
        "mprotect",
        "arch_prctl",
        "set_tid_address",
        "getpid",
        "getppid",
        "getuid",
        "geteuid",
        "getgid",
        "getegid",
        "execve",
        "fcntl",
        "dup2",
        "dup3",
        "close",
        "stat",
        "fstat",
        "lstat",
        "newfstatat",
        "statx",
        "wait4",
        "clone",
        "clone3",
        "fork",
        "vfork",
        "ioctl",
        "open",
        "openat",
        "access",
        "faccessat",
        "faccessat2",
        "getcwd",
        "chdir",
        "prlimit64",
        "set_robust_list",
        "rseq",
        "getrandom",
        "readlink",
        "lseek",
        "futex",
        "sigaltstack",
        "pipe",
        "pipe2",
        "poll",
        "ppoll",
        "uname",
    ];
    edit(&mut b, |c| {
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 1,
            "syscalls": [{"names": allowed.to_vec(), "action": "SCMP_ACT_ALLOW"}]
        });
    });
    let (code, out, err) = rt.run(&b, &unique_name("sal"));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("before") && out.contains("mkdir-denied"),
        "{out} {err}"
    );
}

#[test]
fn masked_paths_read_empty_and_readonly_paths_refuse_writes() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    // /proc/kcore does not exist on this kernel; /proc/keys and /proc/timer_list are masked files, /sys/firmware
    // a masked directory.
    let (b, _) = bundle(
        "echo keys=$(wc -c < /proc/keys); echo timers=$(wc -c < /proc/timer_list); \
         echo fw=$(ls -A /sys/firmware | wc -l); touch /sys/firmware/x 2>/dev/null || echo fw-ro; \
         echo 1 > /proc/sys/kernel/domainname 2>/dev/null || echo sys-ro; \
         echo x > /proc/sysrq-trigger 2>/dev/null || echo sysrq-ro",
    );
    let (code, out, err) = rt.run(&b, &unique_name("mask"));
    assert_eq!(code, 0, "{err}");
    for want in ["keys=0", "timers=0", "fw=0", "fw-ro", "sys-ro", "sysrq-ro"] {
        assert!(out.lines().any(|l| l == want), "missing {want}:\n{out}");
    }
}

#[test]
fn a_readonly_root_refuses_writes_but_tmpfs_mounts_accept_them() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) =
        bundle("touch /etc/x 2>/dev/null || echo root-ro; touch /dev/shm/y && echo shm-rw");
    edit(&mut b, |c| c["root"]["readonly"] = json!(true));
    let (code, out, err) = rt.run(&b, &unique_name("ro"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["root-ro", "shm-rw"]);
    assert!(!b.rootfs().join("etc/x").exists());
}

#[test]
fn bind_mounts_honour_ro_nosuid_noexec_and_recursive_read_only() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let host = tempfile::tempdir().expect("dir");
    std::fs::write(host.path().join("data"), "from-host\n").expect("write");
    std::fs::copy("/bin/busybox", host.path().join("bb")).expect("copy");
    let (mut b, _) = bundle(
        "cat /data/data; touch /data/new 2>/dev/null || echo ro; /data/bb true 2>/dev/null || echo noexec; \
         grep ' /data ' /proc/self/mountinfo | cut -d' ' -f6; touch /rw/new && echo rw",
    );
    let src = host.path().to_string_lossy().into_owned();
    edit(&mut b, |c| {
        let mounts = c["mounts"].as_array_mut().expect("mounts");
        mounts.push(
            json!({"destination": "/data", "type": "bind", "source": src,
                           "options": ["rbind", "rro", "nosuid", "noexec", "nodev"]}),
        );
        mounts.push(
            json!({"destination": "/rw", "type": "none", "source": src, "options": ["bind"]}),
        );
    });
    let (code, out, err) = rt.run(&b, &unique_name("bind"));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..3], ["from-host", "ro", "noexec"], "{out}");
    let opts = lines[3];
    for o in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(opts.split(',').any(|x| x == o), "{opts}");
    }
    assert_eq!(lines[4], "rw");
    assert!(host.path().join("new").exists());
}

#[test]
fn sysctls_and_domainname_apply_inside_the_container_only() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) =
        bundle("cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/domainname");
    edit(&mut b, |c| {
        c["linux"]["sysctl"] = json!({"net.ipv4.ip_unprivileged_port_start": "80"});
        c["domainname"] = json!("pod.example");
    });
    let (code, out, err) = rt.run(&b, &unique_name("sysctl"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["80", "pod.example"]);
    let host = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .expect("host sysctl");
    assert_ne!(host.trim(), "80");
}

#[test]
fn a_container_joins_an_existing_network_namespace_by_path() {
    if !require_privileged(&["/bin/busybox", "ip"]) {
        return;
    }
    let ns = windlass_tests::netns::NetnsGuard::new(&unique_name("rtn")).expect("netns");
    ns.exec(&["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"])
        .expect("addr");
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("ip -o addr show dev lo");
    let path = ns.path().to_string_lossy().into_owned();
    edit(&mut b, |c| {
        for n in c["linux"]["namespaces"].as_array_mut().expect("namespaces") {
            if n["type"] == "network" {
                n["path"] = json!(path);
            }
        }
    });
    let (code, out, err) = rt.run(&b, &unique_name("join"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("10.99.0.1"), "{out}");
}

#[test]
fn the_exit_code_of_the_process_is_the_exit_code_of_run() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, _) = bundle("exit 42");
    let (code, _, err) = rt.run(&b, &unique_name("exit"));
    assert_eq!(code, 42, "{err}");
    assert!(rt.state_dirs().is_empty(), "run must delete the container");
}

#[test]
fn a_container_goes_through_created_running_and_stopped() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, cg) = bundle("sleep 30");
    let id = unique_name("life");
    let pid_file = b.path().join("pid");
    let bundle_arg = b.path().to_string_lossy().into_owned();
    rt.ok(&[
        "create",
        "--bundle",
        &bundle_arg,
        "--pid-file",
        &pid_file.to_string_lossy(),
        &id,
    ]);
    assert_eq!(rt.status(&id).as_deref(), Some("created"));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let state: serde_json::Value = serde_json::from_str(&rt.ok(&["state", &id])).expect("json");
    assert_eq!(state["pid"], pid);
    assert_eq!(state["id"], id.as_str());
    assert_eq!(state["ociVersion"], "1.0.2");
    assert_eq!(
        state["bundle"],
        b.path()
            .canonicalize()
            .expect("bundle")
            .to_string_lossy()
            .as_ref()
    );
    assert!(
        !cgroup_dirs(&cg).is_empty(),
        "no cgroup for the created container"
    );
    let dup = rt.output(&["create", "--bundle", &bundle_arg, &id]);
    assert!(String::from_utf8_lossy(&dup.stderr).contains("container with id exists"));

    let list = rt.ok(&["list", "--format", "json"]);
    assert!(list.contains(&id), "{list}");

    rt.ok(&["start", &id]);
    assert_eq!(rt.status(&id).as_deref(), Some("running"));
    let again = rt.output(&["start", &id]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr)
        .contains("cannot start an already running container"));
    let refused = rt.output(&["delete", &id]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not stopped: running"));

    rt.ok(&["kill", &id, "KILL"]);
    wait_for("stopped", Duration::from_secs(10), || {
        (rt.status(&id).as_deref() == Some("stopped")).then_some(())
    });
    let dead = rt.output(&["kill", &id, "TERM"]);
    assert!(String::from_utf8_lossy(&dead.stderr).contains("container not running"));

    rt.ok(&["delete", &id]);
    assert_eq!(rt.status(&id), None);
    assert!(rt.state_dirs().is_empty());
    assert!(
        cgroup_dirs(&cg).is_empty(),
        "cgroup left behind: {:?}",
        cgroup_dirs(&cg)
    );
    assert!(mounts_mentioning(&b.rootfs().to_string_lossy()).is_empty());
    // Idempotent with --force, an error without.
    rt.ok(&["delete", "--force", &id]);
    let gone = rt.output(&["delete", &id]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("container does not exist"));
}

#[test]
fn kill_delivers_signals_by_name_and_number() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, _) = bundle("trap 'echo got-usr1 > /tmp/sig' USR1; while true; do sleep 0.05; done");
    let id = unique_name("sig");
    rt.run_detached(&b, &id);
    // The trap must be installed before the signal: wait for the loop's first sleep.
    wait_for("the shell loop", Duration::from_secs(10), || {
        let out = rt.output(&["exec", &id, "--", "ps", "-o", "args"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("sleep 0.05")
            .then_some(())
    });
    rt.ok(&["kill", &id, "SIGUSR1"]);
    wait_for("the trap to run", Duration::from_secs(10), || {
        let out = rt.output(&["exec", &id, "--", "cat", "/tmp/sig"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("got-usr1")
            .then_some(())
    });
    assert_eq!(rt.status(&id).as_deref(), Some("running"));
    let bad = rt.output(&["kill", &id, "SIGNOPE"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown signal"));
    rt.ok(&["kill", &id, "9"]);
    wait_for("stopped", Duration::from_secs(10), || {
        (rt.status(&id).as_deref() == Some("stopped")).then_some(())
    });
    rt.ok(&["delete", &id]);
}

#[test]
fn a_foreground_run_reports_death_by_signal_as_128_plus_the_signal() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, _) = bundle("sleep 60");
    let id = unique_name("fg");
    let mut guard =
        ChildGuard::spawn(&mut rt.command(&["run", "--bundle", &b.path().to_string_lossy(), &id]))
            .expect("run");
    wait_for("running", Duration::from_secs(10), || {
        (rt.status(&id).as_deref() == Some("running")).then_some(())
    });
    rt.ok(&["kill", &id, "KILL"]);
    let status = guard.child_mut().wait().expect("wait");
    assert_eq!(status.code(), Some(137));
}

#[test]
fn a_foreground_run_forwards_sigterm_to_the_container() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, _) = bundle("trap 'exit 7' TERM; while true; do sleep 0.05; done");
    let id = unique_name("fwd");
    let mut guard =
        ChildGuard::spawn(&mut rt.command(&["run", "--bundle", &b.path().to_string_lossy(), &id]))
            .expect("run");
    wait_for("the shell loop", Duration::from_secs(10), || {
        let out = rt.output(&["exec", &id, "--", "ps", "-o", "args"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("sleep 0.05")
            .then_some(())
    });
    // SAFETY: kill(2) on the PID of a child we own.
    unsafe { libc::kill(guard.id() as i32, libc::SIGTERM) };
    let status = guard.child_mut().wait().expect("wait");
    assert_eq!(status.code(), Some(7));
}

#[test]
fn exec_runs_in_the_containers_namespaces_with_its_environment() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, cg) = bundle("echo inside > /tmp/marker; sleep 60");
    edit(&mut b, |c| {
        c["process"]["env"] = json!(["PATH=/bin", "A=1"])
    });
    let id = unique_name("exec");
    rt.run_detached(&b, &id);
    wait_for("marker", Duration::from_secs(10), || {
        rt.output(&["exec", &id, "--", "cat", "/tmp/marker"])
            .status
            .success()
            .then_some(())
    });
    let out = rt.ok(&[
        "exec",
        "--env",
        "B=2",
        "--cwd",
        "/tmp",
        &id,
        "--",
        "sh",
        "-c",
        "echo $A$B; pwd; hostname; cat marker; grep CapEff /proc/self/status; ps -o args | grep -c '^sleep 60'",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..5],
        [
            "12",
            "/tmp",
            "windlass",
            "inside",
            "CapEff:\t0000000020000420"
        ],
        "{out}"
    );
    assert_eq!(
        lines[5].trim(),
        "1",
        "the exec'd shell should see the container's processes: {out}"
    );
    let procs = std::fs::read_to_string(cgroup_dirs(&cg)[0].join("cgroup.procs")).expect("procs");
    assert!(!procs.trim().is_empty());
    let state: serde_json::Value = serde_json::from_str(&rt.ok(&["state", &id])).expect("state");
    let pids: Vec<i64> =
        serde_json::from_str(&rt.ok(&["ps", "--format", "json", &id])).expect("pids");
    assert_eq!(
        pids,
        [state["pid"].as_i64().expect("pid")],
        "only the init runs now"
    );
    let table = rt.ok(&["ps", &id]);
    assert!(
        table.starts_with("UID") && table.contains("sleep 60"),
        "{table}"
    );
    let code = rt
        .output(&["exec", &id, "--", "sh", "-c", "exit 3"])
        .status
        .code();
    assert_eq!(code, Some(3));
    let missing = rt.output(&["exec", &id, "--", "/no/such/binary"]);
    assert!(!missing.status.success());
    rt.ok(&["delete", "--force", &id]);
}

#[test]
fn a_terminal_container_gets_a_pty_in_the_foreground() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("tty; echo done");
    edit(&mut b, |c| c["process"]["terminal"] = json!(true));
    let (code, out, err) = rt.run(&b, &unique_name("tty"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("/dev/pts/0"), "{out:?}");
    assert!(out.contains("done"));
    // Detached without a console socket is refused, as runc does.
    let refused = rt.output(&[
        "create",
        "--bundle",
        &b.path().to_string_lossy(),
        &unique_name("tty"),
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("console socket"));
    assert!(rt.state_dirs().is_empty());
}

#[test]
fn a_failed_create_leaves_no_state_cgroup_or_mount() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, cg) = bundle("true");
    edit(&mut b, |c| {
        c["process"]["args"] = json!(["/bin/does-not-exist"])
    });
    let out = rt.output(&[
        "create",
        "--bundle",
        &b.path().to_string_lossy(),
        &unique_name("fail"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such file or directory"),
        "{out:?}"
    );
    assert!(
        rt.state_dirs().is_empty(),
        "state left: {:?}",
        rt.state_dirs()
    );
    assert!(cgroup_dirs(&cg).is_empty(), "cgroup left behind");
    assert!(mounts_mentioning(&b.rootfs().to_string_lossy()).is_empty());
}

#[test]
fn parallel_containers_do_not_collide() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let (mut b, _) = bundle(&format!("echo n={i}; hostname"));
            edit(&mut b, |c| c["hostname"] = json!(format!("box{i}")));
            let id = unique_name("par");
            let mut cmd = rt.command(&["run", "--bundle", &b.path().to_string_lossy(), &id]);
            std::thread::spawn(move || {
                let out = cmd.output().expect("run");
                drop(b);
                (i, out)
            })
        })
        .collect();
    for h in handles {
        let (i, out) = h.join().expect("thread");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("n={i}\nbox{i}\n")
        );
    }
    assert!(rt.state_dirs().is_empty());
}

#[test]
fn exec_takes_a_whole_process_json_and_a_tty() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, _) = bundle("exec sleep 60");
    let id = unique_name("proc");
    rt.run_detached(&b, &id);
    let process = b.path().join("process.json");
    std::fs::write(
        &process,
        json!({
            "user": {"uid": 65534, "gid": 65534},
            "args": ["sh", "-c", "id -u; echo $X; pwd; grep CapEff /proc/self/status"],
            "env": ["PATH=/bin", "X=from-json"],
            "cwd": "/www"
        })
        .to_string(),
    )
    .expect("process.json");
    let out = rt.ok(&["exec", "--process", &process.to_string_lossy(), &id]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["65534", "from-json", "/www", "CapEff:\t0000000000000000"]
    );
    let as_user = rt.ok(&[
        "exec",
        "--user",
        "65534:65534",
        "-g",
        "7",
        &id,
        "--",
        "sh",
        "-c",
        "id -u; id -G",
    ]);
    assert_eq!(as_user.lines().collect::<Vec<_>>(), ["65534", "65534 7"]);
    let bad = rt.output(&["exec", "--user", "nobody", &id, "--", "true"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("uid[:gid]"));
    let tty = rt.ok(&["exec", "--tty", &id, "--", "tty"]);
    assert!(tty.trim().starts_with("/dev/pts/"), "{tty:?}");
    rt.ok(&["delete", "--force", &id]);
}

#[test]
fn a_console_socket_receives_the_pty_master_as_with_runc() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("echo via-pty; tty");
    edit(&mut b, |c| c["process"]["terminal"] = json!(true));
    let sock_dir = tempfile::tempdir().expect("dir");
    let sock = sock_dir.path().join("console.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let receiver = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let master = windlass_runtime::receive_pty(&stream).expect("pty master");
        let mut f = std::fs::File::from(master);
        let mut out = Vec::new();
        // Reading ends with EIO once the container's side of the pty is closed.
        let mut buf = [0u8; 1024];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let id = unique_name("csock");
    rt.ok(&[
        "create",
        "--bundle",
        &b.path().to_string_lossy(),
        "--console-socket",
        &sock.to_string_lossy(),
        &id,
    ]);
    rt.ok(&["start", &id]);
    let out = receiver.join().expect("receiver");
    assert!(
        out.contains("via-pty") && out.contains("/dev/pts/0"),
        "{out:?}"
    );
    rt.ok(&["delete", "--force", &id]);
}

#[test]
fn a_user_namespace_maps_container_root_to_an_unprivileged_host_uid() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle(
        "id -u; cat /proc/self/uid_map /proc/self/gid_map; hostname; echo pid=$$; \
         touch /etc/owned-by-host-root 2>/dev/null || echo denied; grep CapEff /proc/self/status",
    );
    edit(&mut b, |c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
            .push(json!({"type": "user"}));
        c["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
        c["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
    });
    // The mapped root must be able to reach the rootfs (a tempdir is 0700).
    std::fs::set_permissions(b.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (code, out, err) = rt.run(&b, &unique_name("userns"));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<String> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        lines[..6],
        [
            "0",
            "0 200000 65536",
            "0 200000 65536",
            "windlass",
            "pid=1",
            "denied"
        ],
        "{out}"
    );
    // Root of the user namespace keeps only the configured capabilities.
    assert_eq!(lines[6], "CapEff: 0000000020000420");
    assert!(!b.rootfs().join("etc/owned-by-host-root").exists());

    // exec joins the user namespace too.
    edit(&mut b, |c| c["process"]["args"] = json!(["sleep", "60"]));
    let id = unique_name("userns");
    rt.run_detached(&b, &id);
    let out = rt.ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "id -u; cat /proc/self/uid_map",
    ]);
    let got: Vec<String> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(got, ["0", "0 200000 65536"]);
    rt.ok(&["delete", "--force", &id]);
}

#[test]
fn a_new_user_namespace_without_id_maps_is_refused() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("true");
    edit(&mut b, |c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
            .push(json!({"type": "user"}));
    });
    let out = rt.output(&[
        "create",
        "--bundle",
        &b.path().to_string_lossy(),
        &unique_name("nomap"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("uidMappings"));
    assert!(rt.state_dirs().is_empty());
}

#[test]
fn a_cgroup_namespace_hides_the_host_cgroup_path() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, cg) = bundle("grep -E ':(memory|pids):' /proc/self/cgroup");
    edit(&mut b, |c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
            .push(json!({"type": "cgroup"}));
    });
    let (code, out, err) = rt.run(&b, &unique_name("cgns"));
    assert_eq!(code, 0, "{err}");
    for line in out.lines() {
        assert!(
            line.ends_with(":/"),
            "the container should see itself at its cgroup root: {out}"
        );
    }
    assert!(!out.contains(&cg));
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[test]
fn seccomp_argument_conditions_deny_only_matching_calls() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    // socket(AF_INET6, ...) is denied; AF_INET and AF_NETLINK sockets still work.
    let (mut b, _) = bundle(
        "wget -q -O- http://[::1]:1/ 2>&1; ip -o link show lo | cut -d: -f2; wget -q -O- http://127.0.0.1:1/ 2>&1; true",
    );
    edit(&mut b, |c| {
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{
                "names": ["socket"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 97,
                "args": [{"index": 0, "value": 10, "op": "SCMP_CMP_EQ"}]
            }]
        });
    });
    let (code, out, err) = rt.run(&b, &unique_name("secarg"));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert!(lines[0].contains("Address family not supported"), "{out}");
    assert_eq!(lines[1], "lo", "{out}");
    // The socket is created; connecting fails (loopback is down in a fresh network namespace).
    assert!(
        lines[2].contains("can't connect"),
        "an AF_INET socket must work: {out}"
    );
}

#[test]
fn lifecycle_hooks_run_at_their_stages_with_the_state_on_stdin() {
    if !require_privileged(&["/bin/busybox", "sh"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let out = tempfile::tempdir().expect("dir");
    let dir = out.path().to_string_lossy().into_owned();
    let (mut b, _) = bundle("exec sleep 60");
    let hook = |target: String| json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {target}")]});
    edit(&mut b, |c| {
        c["hooks"] = json!({
            "createRuntime": [hook(format!("{dir}/createRuntime.json"))],
            "createContainer": [hook(format!("{dir}/createContainer.json"))],
            // Runs inside the container, after pivot_root: the path is in its rootfs.
            "startContainer": [hook("/tmp/startContainer.json".into())],
            "poststart": [hook(format!("{dir}/poststart.json"))],
            "poststop": [hook(format!("{dir}/poststop.json"))]
        });
    });
    let read = |path: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .expect("state json")
    };
    let id = unique_name("hook");
    rt.ok(&["create", "--bundle", &b.path().to_string_lossy(), &id]);
    let pid = serde_json::from_str::<serde_json::Value>(&rt.ok(&["state", &id])).expect("state")
        ["pid"]
        .clone();
    let created = read(out.path().join("createRuntime.json"));
    assert_eq!(
        (created["id"].as_str(), &created["pid"]),
        (Some(id.as_str()), &pid)
    );
    assert_eq!(created["status"], "creating");
    assert_eq!(read(out.path().join("createContainer.json"))["pid"], pid);
    assert!(!out.path().join("poststart.json").exists());

    rt.ok(&["start", &id]);
    assert_eq!(read(out.path().join("poststart.json"))["status"], "running");
    wait_for("startContainer", Duration::from_secs(10), || {
        b.rootfs()
            .join("tmp/startContainer.json")
            .exists()
            .then_some(())
    });
    rt.ok(&["delete", "--force", &id]);
    let stopped = read(out.path().join("poststop.json"));
    assert_eq!(
        (stopped["status"].as_str(), stopped["id"].as_str()),
        (Some("stopped"), Some(id.as_str()))
    );
}

#[test]
fn a_failing_create_runtime_hook_fails_create_and_leaves_nothing() {
    if !require_privileged(&["/bin/busybox", "sh"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, cg) = bundle("true");
    edit(&mut b, |c| {
        c["hooks"] = json!({"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "echo no network >&2; exit 3"]}]});
    });
    let out = rt.output(&[
        "create",
        "--bundle",
        &b.path().to_string_lossy(),
        &unique_name("hookf"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("createRuntime") && stderr.contains("no network"),
        "{stderr}"
    );
    assert!(rt.state_dirs().is_empty());
    assert!(cgroup_dirs(&cg).is_empty());
}

#[test]
fn configured_devices_appear_with_their_mode_and_owner() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) =
        bundle("stat -c '%F %t:%T %a %u:%g' /dev/myfull; head -c 4 /dev/myfull | wc -c");
    edit(&mut b, |c| {
        c["linux"]["devices"] = json!([
            {"path": "/dev/myfull", "type": "c", "major": 1, "minor": 7, "fileMode": 0o640, "uid": 0, "gid": 10}
        ]);
    });
    let (code, out, err) = rt.run(&b, &unique_name("dev"));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines, ["character special file 1:7 640 0:10", "4"], "{out}");
}

#[test]
fn oom_score_adj_is_applied_and_a_refused_negative_value_is_only_a_warning() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("cat /proc/self/oom_score_adj");
    edit(&mut b, |c| c["process"]["oomScoreAdj"] = json!(500));
    let (code, out, err) = rt.run(&b, &unique_name("oom"));
    assert_eq!((code, out.trim()), (0, "500"), "{err}");
    // Lowering below the caller's value needs CAP_SYS_RESOURCE, which root lacks on these machines.
    edit(&mut b, |c| c["process"]["oomScoreAdj"] = json!(-999));
    let (code, out, err) = rt.run(&b, &unique_name("oom"));
    assert_eq!(code, 0, "{err}");
    let own = std::fs::read_to_string("/proc/self/oom_score_adj").expect("own");
    let got: i32 = out.trim().parse().expect("number");
    assert!(
        got == -999
            || (got == own.trim().parse::<i32>().expect("n") && err.contains("oom_score_adj")),
        "{out} {err}"
    );
}

#[test]
fn seccomp_also_applies_without_no_new_privileges() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("mkdir /tmp/denied 2>&1; grep NoNewPrivs /proc/self/status");
    edit(&mut b, |c| {
        c["process"]["noNewPrivileges"] = json!(false);
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
        });
    });
    let (code, out, err) = rt.run(&b, &unique_name("secnnp"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(out.contains("NoNewPrivs:\t0"), "{out}");
}

#[test]
fn a_missing_cwd_is_created_and_home_comes_from_etc_passwd() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("pwd; echo $HOME");
    edit(&mut b, |c| {
        c["process"]["cwd"] = json!("/work/dir");
        c["root"]["readonly"] = json!(true);
    });
    let (code, out, err) = rt.run(&b, &unique_name("cwd"));
    assert_eq!(code, 0, "{err}");
    // uid 0 is root:/root in the fixture's /etc/passwd.
    assert_eq!(out.lines().collect::<Vec<_>>(), ["/work/dir", "/root"]);
    edit(&mut b, |c| {
        c["process"]["user"] = json!({"uid": 4242, "gid": 4242});
        c["process"]["env"] = json!(["PATH=/bin"]);
    });
    let (code, out, err) = rt.run(&b, &unique_name("cwd"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["/work/dir", "/"],
        "an unknown uid gets HOME=/"
    );
}

#[test]
fn a_foreground_terminal_gets_the_callers_window_size() {
    if !require_privileged(&["/bin/busybox", "script", "stty"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, _) = bundle("stty size");
    edit(&mut b, |c| c["process"]["terminal"] = json!(true));
    // `script` gives the runtime a terminal of its own; stty sizes it first.
    let inner = format!(
        "stty rows 31 cols 97; {} --root {} run --bundle {} {}",
        windlass_tests::workspace_binary("windlass-runtime").display(),
        rt.root().display(),
        b.path().display(),
        unique_name("winsz")
    );
    let out = windlass_tests::run_ok(std::process::Command::new("script").args([
        "-qec",
        &inner,
        "/dev/null",
    ]));
    assert!(out.contains("31 97"), "{out:?}");
}

#[test]
fn a_cgroup_in_use_by_another_container_is_refused_without_harming_it() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (first, cg) = bundle("exec sleep 60");
    let id = unique_name("cgu");
    rt.run_detached(&first, &id);
    let (mut second, _) = bundle("true");
    edit(&mut second, |c| c["linux"]["cgroupsPath"] = json!(cg));
    let out = rt.output(&[
        "create",
        "--bundle",
        &second.path().to_string_lossy(),
        &unique_name("cgu"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already in use"),
        "{out:?}"
    );
    assert_eq!(rt.status(&id).as_deref(), Some("running"));
    assert!(!cgroup_dirs(&cg).is_empty());
    assert_eq!(rt.state_dirs(), vec![id.clone()]);
    rt.ok(&["delete", "--force", &id]);
}
