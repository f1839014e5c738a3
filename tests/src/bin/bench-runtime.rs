//! Same-run benchmark of `windlass-runtime` against `runc` and `crun` (issue 2): create+start+wait+delete of a
//! `true` container from one busybox bundle, interleaved, reporting medians, spread and ratios.
//!
//! crun refuses this machine's hybrid cgroup layout, so the whole benchmark re-executes itself inside a private
//! mount namespace without the `unified` cgroup2 mount and times every runtime there (testbed notes).
//!
//! Usage (root): `cargo run --release -p windlass-tests --bin bench-runtime -- [RUNS] [OUT.md]`

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use windlass_tests::bench::{markdown_table, Samples};
use windlass_tests::bundle::Bundle;

const IN_NS: &str = "WINDLASS_BENCH_IN_PRIVATE_MOUNT_NS";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if std::env::var_os(IN_NS).is_none() {
        let status = Command::new("unshare")
            .args(["-m", "--propagation", "private", "--"])
            .args(&args)
            .env(IN_NS, "1")
            .status()
            .unwrap_or_else(|e| fail(&format!("cannot run unshare: {e}")));
        std::process::exit(status.code().unwrap_or(1));
    }
    // Only inside our private mount namespace: crun cannot run with the hybrid `unified` mount present.
    let _ = Command::new("umount")
        .arg("/sys/fs/cgroup/unified")
        .status();

    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(30);
    let out_path = args.get(2).map(PathBuf::from);

    let windlass = windlass_tests::workspace_binary("windlass-runtime");
    let runtimes: Vec<(String, PathBuf)> = vec![
        ("windlass-runtime".into(), windlass),
        ("crun".into(), PathBuf::from("crun")),
        ("runc".into(), PathBuf::from("runc")),
    ];

    let mut bundle =
        Bundle::busybox(&["/bin/true"]).unwrap_or_else(|e| fail(&format!("bundle: {e}")));
    // Each runtime gets its own cgroup per run (below), never a shared one.
    bundle.config_mut()["linux"]["cgroupsPath"] = serde_json::Value::Null;
    bundle
        .write_config()
        .unwrap_or_else(|e| fail(&format!("config: {e}")));
    let state_root = tempfile::tempdir().unwrap_or_else(|e| fail(&format!("tempdir: {e}")));

    let mut run_samples: Vec<Samples> = runtimes
        .iter()
        .map(|(n, _)| Samples::new(&format!("{n} run")))
        .collect();
    let mut lifecycle_samples: Vec<Samples> = runtimes
        .iter()
        .map(|(n, _)| Samples::new(&format!("{n} create+start+wait+delete")))
        .collect();

    // Warm-up: page cache, binaries, and a first failure reported before any timing.
    for (name, bin) in &runtimes {
        let root = state_root.path().join(name);
        time_run(bin, &root, bundle.path(), &format!("warm-{name}"))
            .unwrap_or_else(|e| fail(&format!("{name} cannot run the bundle: {e}")));
    }

    for i in 0..runs {
        // Rotate the order every iteration so no runtime always goes first (cache, CPU frequency).
        for k in 0..runtimes.len() {
            let r = (i + k) % runtimes.len();
            let (name, bin) = &runtimes[r];
            let root = state_root.path().join(name);
            let id = format!("bench-{name}-{i}");
            match time_run(bin, &root, bundle.path(), &id) {
                Ok(d) => run_samples[r].push(d),
                Err(e) => fail(&format!("{name} run #{i}: {e}")),
            }
            let id = format!("bench-lc-{name}-{i}");
            match time_lifecycle(bin, &root, bundle.path(), &id) {
                Ok(d) => lifecycle_samples[r].push(d),
                Err(e) => fail(&format!("{name} lifecycle #{i}: {e}")),
            }
        }
    }

    let mut report = String::new();
    report.push_str(&format!(
        "Runtime: a busybox `true` container, one bundle, {runs} interleaved runs per runtime, \
         inside one private mount namespace without the cgroup2 `unified` mount (so crun runs).\n\n"
    ));
    report.push_str("`run` (one command):\n\n");
    let run_refs: Vec<&Samples> = run_samples.iter().collect();
    report.push_str(&markdown_table(&run_refs, &run_samples[1]));
    report.push_str("\nSeparate `create`, `start`, `state` until stopped, `delete`:\n\n");
    let lc_refs: Vec<&Samples> = lifecycle_samples.iter().collect();
    report.push_str(&markdown_table(&lc_refs, &lifecycle_samples[1]));
    println!("{report}");
    if let Some(p) = out_path {
        if let Err(e) = std::fs::write(&p, &report) {
            fail(&format!("cannot write {}: {e}", p.display()));
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("bench-runtime: {msg}");
    std::process::exit(1)
}

fn runtime_cmd(bin: &Path, root: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--root")
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn checked(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn time_run(bin: &Path, root: &Path, bundle: &Path, id: &str) -> Result<Duration, String> {
    let start = Instant::now();
    checked(
        runtime_cmd(bin, root)
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(id),
    )?;
    let elapsed = start.elapsed();
    // `run` deletes the container when it exits; a leftover would be a runtime bug, cleaned up untimed.
    let _ = runtime_cmd(bin, root)
        .args(["delete", "--force", id])
        .stderr(Stdio::null())
        .status();
    Ok(elapsed)
}

fn time_lifecycle(bin: &Path, root: &Path, bundle: &Path, id: &str) -> Result<Duration, String> {
    let start = Instant::now();
    // The created container inherits create's stdio and holds it until it exits: a pipe here would make waiting
    // for create's output wait for the container, which waits for `start`. Give it files instead.
    let stderr = tempfile::tempfile().map_err(|e| format!("stderr file: {e}"))?;
    let status = runtime_cmd(bin, root)
        .arg("create")
        .arg("--bundle")
        .arg(bundle)
        .arg(id)
        .stderr(
            stderr
                .try_clone()
                .map_err(|e| format!("stderr file: {e}"))?,
        )
        .status()
        .map_err(|e| format!("create {id}: {e}"))?;
    if !status.success() {
        let mut msg = String::new();
        let mut f = stderr;
        let _ = std::io::Seek::rewind(&mut f);
        let _ = std::io::Read::read_to_string(&mut f, &mut msg);
        return Err(format!("create {id} exited {status}: {msg}"));
    }
    checked(runtime_cmd(bin, root).args(["start", id]))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = checked(
            runtime_cmd(bin, root)
                .args(["state", id])
                .stdout(Stdio::piped()),
        )?;
        if state.contains("\"stopped\"") {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{id} not stopped after 10 s: {state}"));
        }
    }
    checked(runtime_cmd(bin, root).args(["delete", id]))?;
    Ok(start.elapsed())
}
