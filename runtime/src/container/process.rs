//! Process attributes applied right before `execve`, shared by a container's init and by `exec`: rlimits, umask,
//! user and groups, the five capability sets, `noNewPrivileges`, seccomp, the environment and the binary lookup.
//!
//! Runs in a forked child: no logging (the tracing subscriber's locks may be held by another thread of the parent),
//! warnings go back to the parent through the [`Reporter`].

use std::collections::HashSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability as Cap, CapsHashSet};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{Capabilities, PosixRlimitType, Process};

use super::sync::Reporter;
use crate::oci::SeccompProgram;

/// The default `PATH` when the process sets none (runc and Docker use the same).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub(crate) type Failed = String;

fn resource(t: PosixRlimitType) -> Option<Resource> {
    Some(match t {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    })
}

/// Sets the rlimits; raising a hard limit needs CAP_SYS_RESOURCE, which this machine's root lacks, so such a
/// failure is reported as a warning and the limit is clamped to the current hard limit instead.
pub(crate) fn apply_rlimits(process: &Process, report: &Reporter) -> Result<(), Failed> {
    for rl in process.rlimits().as_deref().unwrap_or_default() {
        let Some(res) = resource(rl.typ()) else {
            continue;
        };
        if let Err(e) = setrlimit(res, rl.soft(), rl.hard()) {
            if e != nix::errno::Errno::EPERM {
                return Err(format!("setrlimit {:?}: {e}", rl.typ()));
            }
            let (_, cur_hard) =
                nix::sys::resource::getrlimit(res).map_err(|e| format!("getrlimit: {e}"))?;
            let hard = rl.hard().min(cur_hard);
            let soft = rl.soft().min(hard);
            report.warn(&format!(
                "cannot raise {:?} to {}/{} (no CAP_SYS_RESOURCE): using {soft}/{hard}",
                rl.typ(),
                rl.soft(),
                rl.hard()
            ));
            setrlimit(res, soft, hard).map_err(|e| format!("setrlimit {:?}: {e}", rl.typ()))?;
        }
    }
    Ok(())
}

/// Writes `oomScoreAdj`; a negative value needs CAP_SYS_RESOURCE here, so a refusal is a warning.
pub(crate) fn apply_oom_score_adj(process: &Process, proc_self: &Path, report: &Reporter) {
    if let Some(adj) = process.oom_score_adj() {
        if let Err(e) = std::fs::write(proc_self.join("oom_score_adj"), adj.to_string()) {
            report.warn(&format!("cannot set oom_score_adj to {adj}: {e}"));
        }
    }
}

fn to_caps(set: Option<&Capabilities>, supported: &CapsHashSet, report: &Reporter) -> CapsHashSet {
    let mut out = HashSet::new();
    for c in set.into_iter().flatten() {
        match format!("CAP_{c}").parse::<Cap>() {
            Ok(cap) if supported.contains(&cap) => {
                out.insert(cap);
            }
            _ => report.warn(&format!(
                "capability CAP_{c} is not supported by this kernel: ignored"
            )),
        }
    }
    out
}

/// The credentials part: groups, gid, uid and capabilities. Ref: runc's finalizeNamespace / setupUser.
pub(crate) fn apply_user_and_caps(process: &Process, report: &Reporter) -> Result<(), Failed> {
    let supported = caps::runtime::thread_all_supported();
    // No `capabilities` means none at all (oci-spec's Default would instead give runc's default three).
    let sets = process.capabilities().as_ref();
    let set = |f: fn(&oci_spec::runtime::LinuxCapabilities) -> &Option<Capabilities>| {
        to_caps(sets.and_then(|c| f(c).as_ref()), &supported, report)
    };
    let bounding = set(|c| c.bounding());
    let effective = set(|c| c.effective());
    let permitted = set(|c| c.permitted());
    let inheritable = set(|c| c.inheritable());
    let ambient = set(|c| c.ambient());

    // The bounding set can only shrink, and needs CAP_SETPCAP, so it goes first.
    for cap in &supported {
        if !bounding.contains(cap) {
            caps::drop(None, CapSet::Bounding, *cap)
                .map_err(|e| format!("drop bounding {cap}: {e}"))?;
        }
    }
    // Keep the permitted set across setuid (it would otherwise be cleared for a non-root uid).
    nix::sys::prctl::set_keepcaps(true).map_err(|e| format!("prctl(PR_SET_KEEPCAPS): {e}"))?;
    let user = process.user();
    let groups: Vec<Gid> = user
        .additional_gids()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setresgid(
        Gid::from_raw(user.gid()),
        Gid::from_raw(user.gid()),
        Gid::from_raw(user.gid()),
    )
    .map_err(|e| format!("setgid {}: {e}", user.gid()))?;
    nix::unistd::setresuid(
        Uid::from_raw(user.uid()),
        Uid::from_raw(user.uid()),
        Uid::from_raw(user.uid()),
    )
    .map_err(|e| format!("setuid {}: {e}", user.uid()))?;
    nix::sys::prctl::set_keepcaps(false).map_err(|e| format!("prctl(PR_SET_KEEPCAPS): {e}"))?;

    // Effective must stay a subset of permitted at each step: shrink effective first, grow it last.
    let eff_now = caps::read(None, CapSet::Effective).unwrap_or_default();
    let eff_tmp: CapsHashSet = eff_now.intersection(&permitted).copied().collect();
    caps::set(None, CapSet::Effective, &eff_tmp).map_err(|e| format!("capset effective: {e}"))?;
    caps::set(None, CapSet::Inheritable, &inheritable)
        .map_err(|e| format!("capset inheritable: {e}"))?;
    caps::set(None, CapSet::Permitted, &permitted).map_err(|e| format!("capset permitted: {e}"))?;
    caps::set(None, CapSet::Effective, &effective).map_err(|e| format!("capset effective: {e}"))?;
    // Ambient capabilities must be in both permitted and inheritable (Ref: capabilities(7)).
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("clear ambient: {e}"))?;
    for cap in &ambient {
        // Ref: runc skips ambient capabilities the inheritable set does not allow, without failing.
        if permitted.contains(cap) && inheritable.contains(cap) {
            caps::raise(None, CapSet::Ambient, *cap)
                .map_err(|e| format!("raise ambient {cap}: {e}"))?;
        }
    }
    Ok(())
}

pub(crate) fn apply_no_new_privs(process: &Process) -> Result<(), Failed> {
    if process.no_new_privileges().unwrap_or(false) {
        nix::sys::prctl::set_no_new_privs()
            .map_err(|e| format!("prctl(PR_SET_NO_NEW_PRIVS): {e}"))?;
    }
    Ok(())
}

/// Installs the filters with seccomp(2) directly: seccompiler's `apply_filter` would also set no_new_privs, which
/// the spec leaves to `noNewPrivileges`. Without it the kernel requires CAP_SYS_ADMIN, still held at this point.
pub(crate) fn apply_seccomp(program: &SeccompProgram) -> Result<(), Failed> {
    #[repr(C)]
    struct SockFprog {
        len: libc::c_ushort,
        filter: *const seccompiler::sock_filter,
    }
    for filter in &program.filters {
        let len = libc::c_ushort::try_from(filter.len()).map_err(|_| {
            format!(
                "seccomp filter of {} instructions is too long",
                filter.len()
            )
        })?;
        let prog = SockFprog {
            len,
            filter: filter.as_ptr(),
        };
        // SAFETY: prog points at a live, correctly sized BPF program for the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0 as libc::c_uint,
                &prog as *const SockFprog,
            )
        };
        if rc != 0 {
            return Err(format!(
                "installing seccomp filter: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

pub(crate) fn apply_umask(process: &Process) {
    let mask = process.user().umask().unwrap_or(0o022);
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
}

/// Signal dispositions and the mask are inherited across exec: Rust ignores SIGPIPE and a foreground `run` blocks
/// the signals it forwards, so the container starts from the defaults.
pub(crate) fn reset_signals() {
    use nix::sys::signal::{
        sigaction, sigprocmask, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal,
    };
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no handler code; failures for special signals are harmless.
        let _ = unsafe { sigaction(sig, &dfl) };
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// The argv, envp and resolved binary of a process, built before the last steps so lookup errors are reported.
#[derive(Debug)]
pub(crate) struct Command {
    pub(crate) path: CString,
    pub(crate) argv: Vec<CString>,
    pub(crate) envp: Vec<CString>,
}

fn cstring(s: &str) -> Result<CString, Failed> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// Finds `args[0]` as `execvp` would, but in the container's `PATH` rather than ours.
pub(crate) fn prepare_command(process: &Process) -> Result<Command, Failed> {
    let args = process.args().clone().unwrap_or_default();
    let first = args.first().ok_or("process.args is empty")?;
    let mut env = process.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        // Ref: runc sets HOME from the container's /etc/passwd entry of the uid, or "/" (Kubernetes relies on it).
        env.push(format!("HOME={}", home_of(process.user().uid())));
    }
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_string();
    let binary: PathBuf = if first.contains('/') {
        let p = PathBuf::from(first);
        let p = if p.is_absolute() {
            p
        } else {
            process.cwd().join(p)
        };
        if !p.exists() {
            return Err(format!("exec: {first:?}: no such file or directory"));
        }
        p
    } else {
        path_var
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(first))
            .find(|p| is_executable(p))
            .ok_or_else(|| format!("exec: {first:?}: executable file not found in $PATH"))?
    };
    Ok(Command {
        path: CString::new(binary.as_os_str().as_bytes())
            .map_err(|_| "binary path contains NUL".to_string())?,
        argv: args.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?,
        envp: env.iter().map(|e| cstring(e)).collect::<Result<_, _>>()?,
    })
}

/// The home directory of `uid` in the container's /etc/passwd (read after pivot_root), or "/".
fn home_of(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && f[2].parse() == Ok(uid))
        .map(|f| f[5].to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".to_string())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub(crate) fn exec(cmd: &Command) -> Failed {
    match nix::unistd::execve(&cmd.path, &cmd.argv, &cmd.envp) {
        Err(e) => format!("exec {:?}: {e}", cmd.path),
        Ok(never) => match never {},
    }
}

/// Changes to `cwd`; Ref: runc retries after the user switch when root cannot enter it (e.g. root-squashed NFS).
pub(crate) fn chdir(process: &Process) -> Result<bool, Failed> {
    match nix::unistd::chdir(process.cwd()) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EACCES) => Ok(false),
        Err(e) => Err(format!("chdir to cwd {:?}: {e}", process.cwd())),
    }
}
