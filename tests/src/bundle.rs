//! OCI bundles built from Debian's `busybox-static`, the fixture every runtime test runs.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Where Debian's `busybox-static` puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Writes a minimal root filesystem into `rootfs`: `/bin/busybox`, a symlink per applet, and the usual empty
/// mount points (`/proc`, `/sys`, `/dev`, `/tmp`, `/etc`, `/www` with an `index.html`).
pub fn busybox_rootfs(rootfs: &Path) -> io::Result<()> {
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin)?;
    fs::copy(BUSYBOX, bin.join("busybox"))?;
    let list = std::process::Command::new(BUSYBOX).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let link = bin.join(applet);
        if !link.exists() {
            symlink("busybox", link)?;
        }
    }
    for dir in ["proc", "sys", "dev", "tmp", "etc", "root", "www"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    fs::write(rootfs.join("www/index.html"), "hi\n")?;
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

/// The default OCI runtime config for a bundle, shaped like `runc spec`'s output: new pid, ipc, uts, mount and
/// network namespaces, the default mounts, masked and read-only paths, and runc's default capabilities.
pub fn default_config(args: &[&str]) -> Value {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps, "ambient": caps
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "windlass",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// A bundle directory (`config.json` + `rootfs/`) in a temporary directory removed on drop.
pub struct Bundle {
    dir: tempfile::TempDir,
    config: Value,
}

impl Bundle {
    /// A busybox bundle whose process runs `args`.
    pub fn busybox(args: &[&str]) -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("windlass-bundle-")
            .tempdir()?;
        busybox_rootfs(&dir.path().join("rootfs"))?;
        let bundle = Self {
            dir,
            config: default_config(args),
        };
        bundle.write_config()?;
        Ok(bundle)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// The config as JSON, to change before [`Bundle::write_config`].
    pub fn config_mut(&mut self) -> &mut Value {
        &mut self.config
    }

    pub fn write_config(&self) -> io::Result<()> {
        let text = serde_json::to_string_pretty(&self.config).map_err(io::Error::other)?;
        fs::write(self.dir.path().join("config.json"), text)
    }
}
