//! The container's filesystem view, set up by the init inside its new mount namespace: propagation, the bind of
//! the rootfs, the spec's mounts, `/dev`, `pivot_root`, then masked and read-only paths and a read-only root.
//!
//! Ref: OCI runtime spec config.md#mounts and config-linux.md (devices, maskedPaths, readonlyPaths,
//! rootfsPropagation); runc's libcontainer/rootfs_linux.go for the order of operations and the fallbacks.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::{LinuxDeviceType, Mount, Spec};

use super::process::Failed;
use crate::oci::propagation_flag;

/// A v1 hierarchy (or the v2 tree) to bind into the container's cgroup mount.
#[derive(Debug, Clone)]
pub(crate) enum CgroupBind {
    /// Bind `source` (the container's cgroup directory on the host) at `<mount>/<name>` (`name` empty for v2).
    Dir { source: PathBuf, name: String },
    /// A symlink such as `cpu -> cpu,cpuacct`.
    Link { name: String, target: PathBuf },
}

/// What the init needs besides the spec, computed by the runtime before forking.
#[derive(Debug, Clone)]
pub(crate) struct RootfsPlan {
    pub(crate) rootfs: PathBuf,
    pub(crate) bundle: PathBuf,
    pub(crate) cgroup_binds: Vec<CgroupBind>,
}

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Failed {
    format!("{what}: {e}")
}

/// Joins `unsafe_path` under `root`, resolving symlinks as if `root` were `/`, so a symlink in an image cannot point
/// a mount outside the rootfs. Ref: the `securejoin` approach runc uses for mount destinations.
pub(crate) fn secure_join(root: &Path, unsafe_path: &Path) -> Result<PathBuf, Failed> {
    let mut pending: Vec<std::ffi::OsString> = unsafe_path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved
            .iter()
            .fold(root.to_path_buf(), |p, c| p.join(c))
            .join(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(format!(
                        "too many symlinks resolving {}",
                        unsafe_path.display()
                    ));
                }
                let target = fs::read_link(&candidate).map_err(|e| err(candidate.display(), e))?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(s) => pending.push(s.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(part),
        }
    }
    Ok(resolved.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// Mount options split into flags, propagation changes, data, and whether a recursive read-only was asked for.
#[derive(Debug)]
struct Options {
    flags: MsFlags,
    clear: MsFlags,
    propagation: Vec<MsFlags>,
    data: Vec<String>,
    recursive_ro: bool,
}

fn parse_options(options: &[String]) -> Options {
    let mut o = Options {
        flags: MsFlags::empty(),
        clear: MsFlags::empty(),
        propagation: Vec::new(),
        data: Vec::new(),
        recursive_ro: false,
    };
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "rro" => {
                o.recursive_ro = true;
                (MsFlags::MS_RDONLY, MsFlags::empty())
            }
            // Ref: runc ignores tmpcopyup unless it implements it; so do we.
            "tmpcopyup" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                if let Some(p) = propagation_flag(other) {
                    o.propagation.push(p);
                } else {
                    o.data.push(other.to_string());
                }
                (MsFlags::empty(), MsFlags::empty())
            }
        };
        o.flags.insert(set);
        o.flags.remove(clear);
        o.clear.insert(clear);
    }
    o
}

/// `mount_setattr(2)` with `AT_RECURSIVE`: makes a whole mount tree read-only (the `rro` option).
fn recursive_readonly(path: &Path) -> Result<(), Failed> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| err(path.display(), e))?;
    // SAFETY: a valid NUL-terminated path, a properly sized and initialised mount_attr that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(err(
            format!("mount_setattr(rro) {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn ensure_dir(p: &Path) -> Result<(), Failed> {
    fs::create_dir_all(p).map_err(|e| err(format!("mkdir {}", p.display()), e))
}

fn ensure_file(p: &Path) -> Result<(), Failed> {
    if let Some(parent) = p.parent() {
        ensure_dir(parent)?;
    }
    if !p.exists() {
        fs::File::create(p).map_err(|e| err(format!("create {}", p.display()), e))?;
    }
    Ok(())
}

fn do_mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), nix::errno::Errno> {
    mount(source, target, fstype, flags, data)
}

fn bind(source: &Path, target: &Path, o: &Options) -> Result<(), Failed> {
    let rec = o.flags & MsFlags::MS_REC;
    do_mount(Some(source), target, None, MsFlags::MS_BIND | rec, None).map_err(|e| {
        err(
            format!("bind {} on {}", source.display(), target.display()),
            e,
        )
    })?;
    let extra = o.flags - (MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
    if !extra.is_empty() {
        let base = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra;
        // In a user namespace the source's nosuid/nodev/noexec are locked and must be kept on a remount.
        // Ref: runc retries a bind remount with the locked flags when the first attempt gets EPERM.
        do_mount(None, target, None, base, None)
            .or_else(|e| match e {
                nix::errno::Errno::EPERM => {
                    do_mount(None, target, None, base | preserved_flags(target), None)
                }
                e => Err(e),
            })
            .map_err(|e| err(format!("remount {} with {extra:?}", target.display()), e))?;
    }
    Ok(())
}

fn mount_one(m: &Mount, plan: &RootfsPlan) -> Result<(), Failed> {
    let o = parse_options(m.options().as_deref().unwrap_or_default());
    let target = secure_join(&plan.rootfs, m.destination())?;
    let typ = m.typ().as_deref().unwrap_or("");
    let is_bind = o.flags.contains(MsFlags::MS_BIND) || typ == "bind";
    if is_bind {
        let src = m.source().clone().unwrap_or_default();
        let src = if src.is_absolute() {
            src
        } else {
            plan.bundle.join(src)
        };
        let meta =
            fs::metadata(&src).map_err(|e| err(format!("bind source {}", src.display()), e))?;
        if meta.is_dir() {
            ensure_dir(&target)?;
        } else {
            ensure_file(&target)?;
        }
        bind(&src, &target, &o)?;
    } else if typ == "cgroup" || typ == "cgroup2" {
        mount_cgroup(&target, &o, plan)?;
    } else {
        ensure_dir(&target)?;
        let data = o.data.join(",");
        let flags = o.flags - MsFlags::MS_REMOUNT;
        let source = m.source().clone().unwrap_or_else(|| PathBuf::from(typ));
        match do_mount(Some(&source), &target, Some(typ), flags, Some(&data)) {
            Ok(()) => {}
            // Ref: runc binds the host's /sys when sysfs cannot be mounted (no private network namespace), and the
            // host's /dev/mqueue when mqueue cannot (no private IPC namespace).
            Err(nix::errno::Errno::EPERM) if typ == "sysfs" || typ == "mqueue" => {
                let host = if typ == "sysfs" {
                    "/sys"
                } else {
                    "/dev/mqueue"
                };
                let mut o2 = parse_options(&["rbind".to_string()]);
                o2.flags |= flags
                    & (MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV
                        | MsFlags::MS_NOEXEC);
                bind(Path::new(host), &target, &o2)?;
            }
            Err(e) => {
                return Err(err(
                    format!("mount {typ} on {}", m.destination().display()),
                    e,
                ))
            }
        }
    }
    if o.recursive_ro {
        recursive_readonly(&target)?;
    }
    for p in &o.propagation {
        do_mount(None, &target, None, *p, None)
            .map_err(|e| err(format!("propagation {p:?} on {}", target.display()), e))?;
    }
    Ok(())
}

/// The cgroup mount: a tmpfs with the container's own cgroup directory of each hierarchy bound in (Ref: runc's
/// v1 `mountCgroupV1`, which binds the container's cgroup paths when there is no cgroup namespace to mount from).
fn mount_cgroup(target: &Path, o: &Options, plan: &RootfsPlan) -> Result<(), Failed> {
    ensure_dir(target)?;
    let ro = o.flags & MsFlags::MS_RDONLY;
    let base = o.flags & (MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
    let v2 = plan
        .cgroup_binds
        .iter()
        .any(|b| matches!(b, CgroupBind::Dir { name, .. } if name.is_empty()));
    if !v2 {
        do_mount(
            Some(Path::new("tmpfs")),
            target,
            Some("tmpfs"),
            base,
            Some("mode=755"),
        )
        .map_err(|e| err(format!("mount tmpfs on {}", target.display()), e))?;
    }
    let mut bind_opts = parse_options(&["rbind".to_string()]);
    bind_opts.flags |= base | ro;
    for b in &plan.cgroup_binds {
        match b {
            CgroupBind::Dir { source, name } => {
                let dst = if name.is_empty() {
                    target.to_path_buf()
                } else {
                    target.join(name)
                };
                ensure_dir(&dst)?;
                bind(source, &dst, &bind_opts)?;
            }
            CgroupBind::Link { name, target: to } => {
                let _ = symlink(to, target.join(name));
            }
        }
    }
    if !v2 && !ro.is_empty() {
        do_mount(
            None,
            target,
            None,
            MsFlags::MS_REMOUNT | base | ro,
            Some("mode=755"),
        )
        .map_err(|e| err(format!("remount {} read-only", target.display()), e))?;
    }
    Ok(())
}

/// Default devices every container gets. Ref: OCI runtime spec config-linux.md#default-devices.
const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn make_device(
    rootfs: &Path,
    path: &Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    owner: (u32, u32),
) -> Result<(), Failed> {
    let target = secure_join(rootfs, path)?;
    if let Some(parent) = target.parent() {
        ensure_dir(parent)?;
    }
    let _ = fs::remove_file(&target);
    match mknod(
        &target,
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    ) {
        Ok(()) => {
            nix::unistd::chown(&target, Some(owner.0.into()), Some(owner.1.into()))
                .map_err(|e| err(format!("chown {}", target.display()), e))?;
        }
        // Without mknod (e.g. a user namespace) bind the host's node instead, as runc does.
        Err(nix::errno::Errno::EPERM) => {
            ensure_file(&target)?;
            bind(path, &target, &parse_options(&["bind".to_string()]))?;
        }
        Err(e) => return Err(err(format!("mknod {}", target.display()), e)),
    }
    Ok(())
}

fn create_devices(spec: &Spec, plan: &RootfsPlan) -> Result<(), Failed> {
    let old = nix::sys::stat::umask(Mode::empty());
    let result = (|| {
        let mut configured: Vec<PathBuf> = Vec::new();
        if let Some(devs) = spec.linux().as_ref().and_then(|l| l.devices().clone()) {
            for d in devs {
                let kind = match d.typ() {
                    LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
                    LinuxDeviceType::B => SFlag::S_IFBLK,
                    LinuxDeviceType::P => SFlag::S_IFIFO,
                    LinuxDeviceType::A => continue,
                };
                let owner = (d.uid().unwrap_or(0), d.gid().unwrap_or(0));
                make_device(
                    &plan.rootfs,
                    d.path(),
                    kind,
                    d.major() as u64,
                    d.minor() as u64,
                    d.file_mode().unwrap_or(0o666),
                    owner,
                )?;
                configured.push(d.path().clone());
            }
        }
        for (name, major, minor) in DEFAULT_DEVICES {
            let path = Path::new("/dev").join(name);
            if !configured.contains(&path) {
                make_device(
                    &plan.rootfs,
                    &path,
                    SFlag::S_IFCHR,
                    major,
                    minor,
                    0o666,
                    (0, 0),
                )?;
            }
        }
        let dev = secure_join(&plan.rootfs, Path::new("/dev"))?;
        // Ref: runc's setupDevSymlinks.
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
        ] {
            let l = dev.join(link);
            if fs::symlink_metadata(&l).is_err() {
                symlink(target, &l).map_err(|e| err(format!("symlink {}", l.display()), e))?;
            }
        }
        if Path::new("/proc/kcore").exists() && fs::symlink_metadata(dev.join("core")).is_err() {
            let _ = symlink("/proc/kcore", dev.join("core"));
        }
        Ok(())
    })();
    nix::sys::stat::umask(old);
    result
}

/// Everything up to and including `pivot_root`; afterwards `/` is the container's root.
/// `before_pivot` runs once the mounts are in place (the createRuntime/createContainer hooks).
pub(crate) fn prepare(
    spec: &Spec,
    plan: &RootfsPlan,
    before_pivot: &mut dyn FnMut() -> Result<(), Failed>,
) -> Result<(), Failed> {
    let linux = spec.linux().clone().unwrap_or_default();
    let prop = linux.rootfs_propagation().clone().unwrap_or_default();
    // Ref: runc prepareRoot: default rslave so nothing we mount leaks to the host, rprivate when asked.
    let initial = match prop.as_str() {
        "private" | "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        _ => MsFlags::MS_SLAVE | MsFlags::MS_REC,
    };
    do_mount(None, Path::new("/"), None, initial, None).map_err(|e| err("make / slave", e))?;
    do_mount(
        Some(&plan.rootfs),
        &plan.rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .map_err(|e| err(format!("bind rootfs {}", plan.rootfs.display()), e))?;

    let mounts = spec.mounts().clone().unwrap_or_default();
    for m in &mounts {
        mount_one(m, plan)?;
    }
    let dev_is_bound = mounts.iter().any(|m| {
        m.destination() == Path::new("/dev")
            && m.options()
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|o| o == "bind" || o == "rbind")
    });
    if !dev_is_bound {
        create_devices(spec, plan)?;
    }

    before_pivot()?;
    // Ref: runc pivotRoot: pivot onto itself, then lazily detach the old root stacked underneath.
    nix::unistd::chdir(&plan.rootfs).map_err(|e| err("chdir rootfs", e))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| err("pivot_root", e))?;
    do_mount(
        None,
        Path::new("."),
        None,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None,
    )
    .map_err(|e| err("make old root slave", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| err("detach old root", e))?;
    nix::unistd::chdir("/").map_err(|e| err("chdir /", e))?;
    if let Some(flag) = propagation_flag(&prop) {
        do_mount(None, Path::new("/"), None, flag, None)
            .map_err(|e| err("rootfsPropagation", e))?;
    }
    Ok(())
}

fn preserved_flags(path: &Path) -> MsFlags {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let mut out = MsFlags::empty();
    if let Ok(st) = statvfs(path) {
        let f = st.flags();
        for (fs, ms) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        ] {
            if f.contains(fs) {
                out |= ms;
            }
        }
    }
    out
}

/// After sysctls are written: masked and read-only paths, then the read-only root. Runs after `pivot_root`.
pub(crate) fn finalize(spec: &Spec) -> Result<(), Failed> {
    let linux = spec.linux().clone().unwrap_or_default();
    for p in linux.readonly_paths().clone().unwrap_or_default() {
        let path = Path::new(&p);
        if !path.exists() {
            continue;
        }
        do_mount(
            Some(path),
            path,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )
        .map_err(|e| err(format!("bind readonly path {p}"), e))?;
        let flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_REC
            | preserved_flags(path);
        do_mount(None, path, None, flags, None)
            .map_err(|e| err(format!("remount {p} read-only"), e))?;
    }
    // Ref: config-linux.md#masked-paths: /dev/null over files, an empty read-only tmpfs over directories.
    for p in linux.masked_paths().clone().unwrap_or_default() {
        let path = Path::new(&p);
        let Ok(meta) = fs::metadata(path) else {
            continue;
        };
        let r = if meta.is_dir() {
            do_mount(
                Some(Path::new("tmpfs")),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None::<&str>,
            )
        } else {
            do_mount(
                Some(Path::new("/dev/null")),
                path,
                None,
                MsFlags::MS_BIND,
                None,
            )
        };
        r.map_err(|e| err(format!("mask {p}"), e))?;
    }
    if spec
        .root()
        .as_ref()
        .is_some_and(|r| r.readonly().unwrap_or(false))
    {
        let flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | preserved_flags(Path::new("/"));
        do_mount(None, Path::new("/"), None, flags, None)
            .map_err(|e| err("remount / read-only", e))?;
    }
    Ok(())
}

/// Writes `linux.sysctl` through the container's /proc/sys (after `pivot_root`, before /proc/sys is read-only).
pub(crate) fn apply_sysctls(spec: &Spec) -> Result<(), Failed> {
    let sysctls = spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().clone())
        .unwrap_or_default();
    for (key, value) in sysctls {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        fs::write(&path, &value).map_err(|e| err(format!("sysctl {key}={value}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_join_keeps_symlinks_inside_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir(root.join("real")).expect("dir");
        symlink("/etc", root.join("escape")).expect("link");
        symlink("../../..", root.join("real/up")).expect("link");
        assert_eq!(
            secure_join(root, Path::new("/escape/passwd")).expect("join"),
            root.join("etc/passwd")
        );
        assert_eq!(
            secure_join(root, Path::new("/real/up/x")).expect("join"),
            root.join("x")
        );
        assert_eq!(
            secure_join(root, Path::new("/../../a")).expect("join"),
            root.join("a")
        );
    }

    #[test]
    fn options_split_flags_from_data() {
        let o = parse_options(&[
            "nosuid".into(),
            "ro".into(),
            "mode=755".into(),
            "rprivate".into(),
            "rw".into(),
        ]);
        assert!(o.flags.contains(MsFlags::MS_NOSUID));
        assert!(!o.flags.contains(MsFlags::MS_RDONLY));
        assert_eq!(o.data, vec!["mode=755".to_string()]);
        assert_eq!(o.propagation.len(), 1);
    }
}
