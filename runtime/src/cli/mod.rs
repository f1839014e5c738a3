//! The runc-compatible commands behind the `windlass-runtime` binary; `main.rs` only parses arguments into these
//! calls and maps their errors to exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};

use std::os::fd::{AsFd, OwnedFd};

use serde::Serialize;

use crate::container::{
    become_subreaper, block_forwarded_signals, console_pair, copy_window_size, parse_signal,
    proxy_terminal, receive_pty, wait_forwarding, Console, ContainerError, CreateOptions,
    ExecOptions, RawTerminal, Runtime, Status,
};
use crate::oci;

fn console_for(socket: Option<PathBuf>) -> Console {
    socket.map(Console::Socket).unwrap_or_default()
}

/// `create --bundle B [--pid-file F] [--console-socket S] ID`
pub fn create(
    rt: &Runtime,
    id: &str,
    bundle: &Path,
    pid_file: Option<PathBuf>,
    console_socket: Option<PathBuf>,
) -> Result<(), ContainerError> {
    rt.create(
        id,
        bundle,
        CreateOptions {
            pid_file,
            console: console_for(console_socket),
        },
    )?;
    Ok(())
}

/// `start ID`
pub fn start(rt: &Runtime, id: &str) -> Result<(), ContainerError> {
    rt.start(id).map(|_| ())
}

/// `state ID`: the OCI state as indented JSON.
pub fn state(rt: &Runtime, id: &str) -> Result<String, ContainerError> {
    let st = rt.state(id)?;
    Ok(serde_json::to_string_pretty(&st).unwrap_or_default())
}

/// `kill ID [SIGNAL]` (default SIGTERM, as runc).
pub fn kill(rt: &Runtime, id: &str, signal: Option<&str>, all: bool) -> Result<(), ContainerError> {
    let sig = parse_signal(signal.unwrap_or("SIGTERM"))?;
    rt.kill(id, sig, all)
}

/// `update --resources FILE ID`: FILE holds `linux.resources` as JSON (`-` for stdin), as with runc.
pub fn update(rt: &Runtime, id: &str, resources: &Path) -> Result<(), ContainerError> {
    let text = if resources == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(resources)
    }
    .map_err(|source| ContainerError::Io {
        path: resources.to_path_buf(),
        source,
    })?;
    let res: oci_spec::runtime::LinuxResources =
        serde_json::from_str(&text).map_err(|source| oci::OciError::Spec {
            path: resources.to_path_buf(),
            source,
        })?;
    rt.update(id, &res)
}

/// `ps ID [--format table|json]`: the container's processes (host PIDs), as runc: JSON is the PID list, the
/// table is `ps -ef` filtered to them.
pub fn ps(rt: &Runtime, id: &str, json: bool) -> Result<String, ContainerError> {
    let pids: Vec<i32> = rt
        .cgroup(id)?
        .pids()?
        .into_iter()
        .map(|p| p.as_raw())
        .collect();
    if json {
        return Ok(serde_json::to_string(&pids).unwrap_or_default() + "\n");
    }
    let out = std::process::Command::new("ps")
        .arg("-ef")
        .output()
        .map_err(|source| ContainerError::Io {
            path: "ps".into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let mut result = lines.next().map(|h| format!("{h}\n")).unwrap_or_default();
    for line in lines {
        let pid = line
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok());
        if pid.is_some_and(|p| pids.contains(&p)) {
            result += line;
            result.push('\n');
        }
    }
    Ok(result)
}

/// `pause ID`
pub fn pause(rt: &Runtime, id: &str) -> Result<(), ContainerError> {
    rt.pause(id)
}

/// `resume ID`
pub fn resume(rt: &Runtime, id: &str) -> Result<(), ContainerError> {
    rt.resume(id)
}

/// `delete [--force] ID`
pub fn delete(rt: &Runtime, id: &str, force: bool) -> Result<(), ContainerError> {
    rt.delete(id, force)
}

#[derive(Serialize)]
struct ListEntry<'a> {
    #[serde(rename = "ociVersion")]
    oci_version: &'a str,
    id: &'a str,
    pid: i32,
    status: Status,
    bundle: &'a Path,
    rootfs: &'a Path,
    created: &'a str,
    owner: &'a str,
}

/// `list [--format table|json]`
pub fn list(rt: &Runtime, json: bool, quiet: bool) -> Result<String, ContainerError> {
    let states = rt.list()?;
    if quiet {
        return Ok(states.iter().map(|s| format!("{}\n", s.id)).collect());
    }
    if json {
        let entries: Vec<ListEntry<'_>> = states
            .iter()
            .map(|s| ListEntry {
                oci_version: &s.oci_version,
                id: &s.id,
                pid: s.pid,
                status: s.status,
                bundle: &s.bundle,
                rootfs: &s.rootfs,
                created: &s.created,
                owner: &s.owner,
            })
            .collect();
        return Ok(serde_json::to_string(&entries).unwrap_or_default() + "\n");
    }
    let mut out = format!(
        "{:<12} {:<8} {:<10} {:<40} {:<32} {}\n",
        "ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"
    );
    for s in states {
        out += &format!(
            "{:<12} {:<8} {:<10} {:<40} {:<32} {}\n",
            s.id,
            s.pid,
            s.status,
            s.bundle.display(),
            s.created,
            s.owner
        );
    }
    Ok(out)
}

/// `run --bundle B [--detach] ID`: create + start; in the foreground, wait with signals forwarded, delete, and
/// return the container's exit code (128 + signal if killed).
pub fn run(
    rt: &Runtime,
    id: &str,
    bundle: &Path,
    detach: bool,
    pid_file: Option<PathBuf>,
    console_socket: Option<PathBuf>,
) -> Result<i32, ContainerError> {
    // Before creating, so the init (our grandchild) is reparented to us and its exit status is ours to read.
    become_subreaper()?;
    let sfd = if detach {
        None
    } else {
        Some(block_forwarded_signals()?)
    };
    let b = oci::load_bundle(bundle)?;
    let terminal = b
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let (console, local) = if terminal && console_socket.is_none() && !detach {
        let (c, l) = console_pair()?;
        (c, Some(l))
    } else {
        (console_for(console_socket), None)
    };
    let st = rt.create_from(id, b, CreateOptions { pid_file, console })?;
    let (output, master, _raw) = match &local {
        Some(l) => match receive_pty(l) {
            Ok(master) => attach_terminal(master),
            Err(e) => {
                let _ = rt.delete(id, true);
                return Err(e);
            }
        },
        None => (None, None, None),
    };
    if let Err(e) = rt.start(id) {
        let _ = rt.delete(id, true);
        return Err(e);
    }
    let Some(sfd) = sfd else { return Ok(0) };
    let pid = nix::unistd::Pid::from_raw(st.pid);
    let result = wait_forwarding(pid, &sfd, master.as_ref().map(|m| m.as_fd()));
    if let Ok(exit) = &result {
        let _ = rt.record_exit(id, exit);
    }
    let deleted = rt.delete(id, true);
    if let Some(out) = output {
        let _ = out.join();
    }
    let _ = std::io::stdout().flush();
    let exit = result?;
    deleted?;
    Ok(exit.code)
}

type Attached = (
    Option<std::thread::JoinHandle<()>>,
    Option<OwnedFd>,
    Option<RawTerminal>,
);

/// Sizes the pty like our terminal, puts our terminal in raw mode and starts copying; keeps a handle on the
/// master for later resizes.
fn attach_terminal(master: OwnedFd) -> Attached {
    copy_window_size(master.as_fd());
    let resize = master.try_clone().ok();
    let raw = RawTerminal::enable();
    (proxy_terminal(master), resize, raw)
}

/// Parses runc's `--user uid[:gid]` (numeric, as runc without a passwd lookup).
fn parse_user(text: &str) -> Result<(u32, Option<u32>), ContainerError> {
    let bad = || oci::OciError::Invalid(format!("--user {text:?}: want uid[:gid] (numbers)"));
    let (u, g) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    let uid = u.parse().map_err(|_| bad())?;
    let gid = g.map(|g| g.parse().map_err(|_| bad())).transpose()?;
    Ok((uid, gid))
}

/// Arguments of `exec`.
#[derive(Debug, Default)]
pub struct ExecArgs {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    /// `uid[:gid]`
    pub user: Option<String>,
    pub additional_gids: Vec<u32>,
    pub tty: bool,
    pub process: Option<PathBuf>,
    pub detach: bool,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
}

/// `exec ID -- CMD...` (or `--process process.json`): returns the process's exit code unless detached.
pub fn exec(rt: &Runtime, id: &str, a: ExecArgs) -> Result<i32, ContainerError> {
    become_subreaper()?;
    let sfd = if a.detach {
        None
    } else {
        Some(block_forwarded_signals()?)
    };
    let process = a.process.as_deref().map(oci::load_process).transpose()?;
    let tty = process
        .as_ref()
        .map_or(a.tty, |p| p.terminal().unwrap_or(false));
    let (console, local) = if tty && a.console_socket.is_none() && !a.detach {
        let (c, l) = console_pair()?;
        (c, Some(l))
    } else {
        (console_for(a.console_socket), None)
    };
    let user = a.user.as_deref().map(parse_user).transpose()?;
    let pid = rt.exec(
        id,
        ExecOptions {
            process,
            args: a.args,
            env: a.env,
            cwd: a.cwd,
            user,
            additional_gids: a.additional_gids,
            tty,
            console,
            pid_file: a.pid_file,
        },
    )?;
    let (output, master, _raw) = match &local {
        Some(l) => attach_terminal(receive_pty(l)?),
        None => (None, None, None),
    };
    let Some(sfd) = sfd else { return Ok(0) };
    let exit = wait_forwarding(pid, &sfd, master.as_ref().map(|m| m.as_fd()))?;
    if let Some(out) = output {
        let _ = out.join();
    }
    Ok(exit.code)
}
