//! Loading and validating OCI bundles: `config.json` parsed with `oci-spec`, checked before anything is created so a
//! bad bundle changes nothing on the machine.
//!
//! Ref: OCI runtime spec, bundle.md and config.md / config-linux.md.

mod seccomp;

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

pub(crate) use seccomp::{compile as compile_seccomp, SeccompProgram};

/// The file name of a bundle's runtime configuration.
pub const CONFIG_FILE: &str = "config.json";

/// What is wrong with a bundle or a process description.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("bundle {path}: {source}")]
    Bundle { path: PathBuf, source: io::Error },
    #[error("config.json not found in bundle {bundle}")]
    MissingConfig { bundle: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} is not a valid OCI runtime config: {source}")]
    Spec {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "unknown namespace type {0:?} (known: mount, pid, network, ipc, uts, user, cgroup, time)"
    )]
    UnknownNamespace(String),
    #[error("namespace {0} listed more than once")]
    DuplicateNamespace(String),
    #[error("{0} namespaces are not supported by windlass-runtime")]
    UnsupportedNamespace(String),
    #[error("rootfs {path} does not exist or is not a directory")]
    MissingRootfs { path: PathBuf },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("seccomp: {0}")]
    Seccomp(String),
}

/// A loaded and validated bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The bundle directory, absolute.
    pub path: PathBuf,
    /// The parsed `config.json`.
    pub spec: Spec,
    /// `root.path` resolved against the bundle, absolute.
    pub rootfs: PathBuf,
}

/// Loads `<bundle>/config.json` and validates it (see [`validate`]).
pub fn load_bundle(bundle: &Path) -> Result<Bundle, OciError> {
    let path = fs::canonicalize(bundle).map_err(|source| OciError::Bundle {
        path: bundle.to_path_buf(),
        source,
    })?;
    let config = path.join(CONFIG_FILE);
    if !config.is_file() {
        return Err(OciError::MissingConfig { bundle: path });
    }
    let spec = load_spec(&config)?;
    let rootfs = rootfs_of(&spec, &path)?;
    validate(&spec)?;
    Ok(Bundle { path, spec, rootfs })
}

/// Parses a runtime config file, naming an unknown namespace type clearly rather than as a serde error.
pub fn load_spec(config: &Path) -> Result<Spec, OciError> {
    let text = fs::read_to_string(config).map_err(|source| OciError::Read {
        path: config.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| OciError::Json {
            path: config.to_path_buf(),
            source,
        })?;
    check_namespace_names(&value)?;
    serde_json::from_value(value).map_err(|source| OciError::Spec {
        path: config.to_path_buf(),
        source,
    })
}

/// Parses a `process.json` as `runc exec --process` takes it.
pub fn load_process(path: &Path) -> Result<Process, OciError> {
    let text = fs::read_to_string(path).map_err(|source| OciError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let process: Process = serde_json::from_str(&text).map_err(|source| OciError::Spec {
        path: path.to_path_buf(),
        source,
    })?;
    validate_process(&process)?;
    Ok(process)
}

fn check_namespace_names(value: &serde_json::Value) -> Result<(), OciError> {
    const KNOWN: [&str; 8] = [
        "mount", "pid", "network", "ipc", "uts", "user", "cgroup", "time",
    ];
    let Some(list) = value
        .pointer("/linux/namespaces")
        .and_then(|v| v.as_array())
    else {
        return Ok(());
    };
    let mut seen = HashSet::new();
    for ns in list {
        let typ = ns.get("type").and_then(|t| t.as_str()).unwrap_or_default();
        if !KNOWN.contains(&typ) {
            return Err(OciError::UnknownNamespace(typ.to_string()));
        }
        if !seen.insert(typ) {
            return Err(OciError::DuplicateNamespace(typ.to_string()));
        }
    }
    Ok(())
}

fn rootfs_of(spec: &Spec, bundle: &Path) -> Result<PathBuf, OciError> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| OciError::Invalid("root is missing".into()))?;
    let path = bundle.join(root.path());
    match fs::canonicalize(&path) {
        Ok(p) if p.is_dir() => Ok(p),
        _ => Err(OciError::MissingRootfs { path }),
    }
}

/// The namespaces of a spec: which to create and which to join by path.
#[derive(Debug, Clone, Default)]
pub(crate) struct Namespaces {
    pub(crate) new: Vec<LinuxNamespaceType>,
    pub(crate) join: Vec<(LinuxNamespaceType, PathBuf)>,
}

impl Namespaces {
    pub(crate) fn of(spec: &Spec) -> Self {
        let mut out = Self::default();
        let list = spec.linux().as_ref().and_then(|l| l.namespaces().clone());
        for ns in list.unwrap_or_default() {
            match ns.path() {
                Some(p) if !p.as_os_str().is_empty() => out.join.push((ns.typ(), p.clone())),
                _ => out.new.push(ns.typ()),
            }
        }
        out
    }

    /// Whether the container has this namespace of its own or joins one (not the host's).
    pub(crate) fn has(&self, typ: LinuxNamespaceType) -> bool {
        self.new.contains(&typ) || self.join.iter().any(|(t, _)| *t == typ)
    }

    pub(crate) fn creates(&self, typ: LinuxNamespaceType) -> bool {
        self.new.contains(&typ)
    }
}

/// Checks what `config.json` asks for against what this runtime does, before anything is created.
pub fn validate(spec: &Spec) -> Result<(), OciError> {
    if !spec.version().starts_with("1.") {
        return Err(OciError::Invalid(format!(
            "unsupported ociVersion {:?} (want 1.x)",
            spec.version()
        )));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| OciError::Invalid("process is missing".into()))?;
    validate_process(process)?;
    let linux = spec
        .linux()
        .as_ref()
        .ok_or_else(|| OciError::Invalid("linux section is missing".into()))?;
    let ns = Namespaces::of(spec);
    for (typ, path) in &ns.join {
        if !path.exists() {
            return Err(OciError::Invalid(format!(
                "namespace {typ} path {} does not exist",
                path.display()
            )));
        }
    }
    if ns.has(LinuxNamespaceType::Time) {
        return Err(OciError::UnsupportedNamespace("time".into()));
    }
    let maps = |m: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
        m.as_ref().is_some_and(|m| !m.is_empty())
    };
    if ns.creates(LinuxNamespaceType::User)
        && !(maps(linux.uid_mappings()) && maps(linux.gid_mappings()))
    {
        return Err(OciError::Invalid(
            "a new user namespace needs linux.uidMappings and linux.gidMappings".into(),
        ));
    }
    if !ns.has(LinuxNamespaceType::Mount) {
        // Ref: runc's validator: pivot_root and the masked paths need a private mount namespace.
        return Err(OciError::Invalid(
            "a mount namespace is required to set up the rootfs".into(),
        ));
    }
    if (spec.hostname().as_deref().is_some_and(|h| !h.is_empty())
        || spec.domainname().as_deref().is_some_and(|h| !h.is_empty()))
        && !ns.creates(LinuxNamespaceType::Uts)
    {
        return Err(OciError::Invalid(
            "unable to set hostname without a private UTS namespace".into(),
        ));
    }
    for m in spec.mounts().as_deref().unwrap_or_default() {
        if !m.destination().is_absolute() {
            return Err(OciError::Invalid(format!(
                "mount destination {} is not absolute",
                m.destination().display()
            )));
        }
    }
    if let Some(sysctls) = linux.sysctl() {
        for key in sysctls.keys() {
            validate_sysctl(key, &ns)?;
        }
    }
    if let Some(p) = linux.rootfs_propagation() {
        if !p.is_empty() && propagation_flag(p).is_none() {
            return Err(OciError::Invalid(format!(
                "unknown rootfsPropagation {p:?}"
            )));
        }
    }
    if let Some(seccomp) = linux.seccomp() {
        compile_seccomp(seccomp)?;
    }
    Ok(())
}

fn validate_process(process: &Process) -> Result<(), OciError> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(OciError::Invalid("process.args must not be empty".into()));
    }
    if !process.cwd().is_absolute() {
        return Err(OciError::Invalid(format!(
            "process.cwd {} must be an absolute path",
            process.cwd().display()
        )));
    }
    for env in process.env().as_deref().unwrap_or_default() {
        if !env.contains('=') {
            return Err(OciError::Invalid(format!(
                "process.env entry {env:?} has no '='"
            )));
        }
    }
    Ok(())
}

/// The namespace a sysctl belongs to, if it is namespaced at all (a container may set only those).
/// Ref: runc libcontainer/configs/validate `sysctl`.
pub(crate) fn sysctl_namespace(key: &str) -> Option<LinuxNamespaceType> {
    const IPC: [&str; 8] = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    if key.contains("..") || key.contains('/') {
        return None;
    }
    if IPC.contains(&key) || key.starts_with("fs.mqueue.") {
        Some(LinuxNamespaceType::Ipc)
    } else if key.starts_with("net.") {
        Some(LinuxNamespaceType::Network)
    } else if key == "kernel.hostname" || key == "kernel.domainname" {
        Some(LinuxNamespaceType::Uts)
    } else {
        None
    }
}

fn validate_sysctl(key: &str, ns: &Namespaces) -> Result<(), OciError> {
    let ok = match sysctl_namespace(key) {
        Some(LinuxNamespaceType::Uts) => ns.creates(LinuxNamespaceType::Uts),
        Some(t) => ns.has(t),
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(OciError::Invalid(format!(
            "sysctl {key:?} is not in a separate kernel namespace"
        )))
    }
}

/// Maps a propagation name (`rootfsPropagation`, mount options) to its mount flags.
pub(crate) fn propagation_flag(name: &str) -> Option<nix::mount::MsFlags> {
    use nix::mount::MsFlags;
    Some(match name {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("rootfs")).expect("rootfs");
        fs::write(dir.path().join(CONFIG_FILE), config).expect("config");
        dir
    }

    const GOOD: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
        "process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"},
        "linux":{"namespaces":[{"type":"mount"},{"type":"pid"}]}}"#;

    #[test]
    fn a_minimal_bundle_loads() {
        let dir = bundle_with(GOOD);
        let b = load_bundle(dir.path()).expect("loads");
        assert!(b.rootfs.ends_with("rootfs"));
    }

    #[test]
    fn a_missing_config_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load_bundle(dir.path()).expect_err("fails");
        assert!(matches!(err, OciError::MissingConfig { .. }), "{err}");
    }

    #[test]
    fn an_unknown_namespace_type_is_named() {
        let dir = bundle_with(&GOOD.replace(r#"{"type":"pid"}"#, r#"{"type":"bogus"}"#));
        let err = load_bundle(dir.path()).expect_err("fails");
        assert!(err.to_string().contains("\"bogus\""), "{err}");
    }

    #[test]
    fn a_missing_rootfs_is_refused() {
        let dir = bundle_with(&GOOD.replace("\"rootfs\"", "\"nope\""));
        let err = load_bundle(dir.path()).expect_err("fails");
        assert!(matches!(err, OciError::MissingRootfs { .. }), "{err}");
    }

    #[test]
    fn invalid_json_is_refused() {
        let dir = bundle_with("{");
        let err = load_bundle(dir.path()).expect_err("fails");
        assert!(matches!(err, OciError::Json { .. }), "{err}");
    }

    #[test]
    fn a_host_sysctl_is_refused() {
        let dir = bundle_with(&GOOD.replace(
            r#""namespaces""#,
            r#""sysctl":{"vm.swappiness":"1"},"namespaces""#,
        ));
        let err = load_bundle(dir.path()).expect_err("fails");
        assert!(err.to_string().contains("vm.swappiness"), "{err}");
    }

    #[test]
    fn a_hostname_needs_a_uts_namespace() {
        let dir = bundle_with(&GOOD.replace(r#""root""#, r#""hostname":"x","root""#));
        let err = load_bundle(dir.path()).expect_err("fails");
        assert!(err.to_string().contains("UTS"), "{err}");
    }
}
