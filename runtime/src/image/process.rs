//! Image config + Kubernetes container → the process to run, the way the kubelet and CRI runtimes combine them.
//!
//! Ref: Kubernetes "Define a command and arguments for a container" (the Entrypoint/Cmd table): `command` replaces
//! the image Entrypoint *and* drops its Cmd; `args` alone replaces Cmd only. `$(VAR)` references in command and
//! args expand from the container's env (kubelet `expansion.Expand`: `$$` escapes, unknown names stay as written).
//! Env: image env first, container env overrides by name (containerd's `WithEnv`). User: `runAsUser`/`runAsGroup`
//! override the image `User`, whose name or uid is resolved through the rootfs `/etc/passwd` and `/etc/group`
//! (containerd `WithUser`/`WithUserID`/`WithAdditionalGIDs`).

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use super::config::ImageConfig;

/// The parts of a Kubernetes container that shape its process (a plain struct: the runtime has no k8s-openapi).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerProcessSpec {
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// Already-resolved env (valueFrom handled by the kubelet), in pod-spec order.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub run_as_user: Option<u32>,
    pub run_as_group: Option<u32>,
}

/// The process to put in the OCI runtime config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Why the process could not be derived.
#[derive(Debug, thiserror::Error)]
pub enum ProcessSpecError {
    #[error("neither the container nor the image specifies a command to run")]
    NoCommand,
    #[error("user `{user}` not found in the image's /etc/passwd")]
    UnknownUser { user: String },
    #[error("group `{group}` not found in the image's /etc/group")]
    UnknownGroup { group: String },
    #[error("working directory `{0}` is not absolute")]
    RelativeWorkingDir(String),
}

/// Merges `image` and `container` into a process; `rootfs` is read for `/etc/passwd` and `/etc/group`.
pub fn process_spec(
    image: &ImageConfig,
    container: &ContainerProcessSpec,
    rootfs: &Path,
) -> Result<ProcessSpec, ProcessSpecError> {
    let exec = image.config.clone().unwrap_or_default();

    // Env first: $(VAR) in command/args expands from the container's env (kubelet uses only the container's).
    let mut env: Vec<(String, String)> = exec
        .env
        .unwrap_or_default()
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.clone(), String::new()),
        })
        .collect();
    for (k, v) in &container.env {
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    let container_env: HashMap<&str, &str> = container
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let expand_all = |v: &[String]| {
        v.iter()
            .map(|s| expand(s, &container_env))
            .collect::<Vec<_>>()
    };

    let args = if !container.command.is_empty() {
        let mut a = expand_all(&container.command);
        a.extend(expand_all(&container.args));
        a
    } else {
        let mut a = exec.entrypoint.unwrap_or_default();
        if !container.args.is_empty() {
            a.extend(expand_all(&container.args));
        } else {
            a.extend(exec.cmd.unwrap_or_default());
        }
        a
    };
    if args.is_empty() {
        return Err(ProcessSpecError::NoCommand);
    }

    let cwd = container
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or(exec.working_dir.filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".to_string());
    if !cwd.starts_with('/') {
        return Err(ProcessSpecError::RelativeWorkingDir(cwd));
    }

    let passwd = fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let group = fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    let (uid, gid, user_name) = resolve_user(
        exec.user.as_deref().unwrap_or(""),
        container.run_as_user,
        container.run_as_group,
        &passwd,
        &group,
    )?;
    let additional_gids = supplementary_groups(user_name.as_deref(), gid, &group);

    // Like the kubelet/CRI: HOME from passwd if neither image nor pod set it.
    if !env.iter().any(|(k, _)| k == "HOME") {
        let home = passwd_entries(&passwd)
            .find(|e| e.uid == uid)
            .map(|e| e.home.to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "/".to_string());
        env.push(("HOME".into(), home));
    }

    Ok(ProcessSpec {
        args,
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd,
        uid,
        gid,
        additional_gids,
    })
}

/// Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` is a literal `$`, anything else stays as is.
pub fn expand(input: &str, env: &HashMap<&str, &str>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            match bytes[i + 1] {
                b'$' => {
                    out.push('$');
                    i += 2;
                    continue;
                }
                b'(' => {
                    if let Some(end) = input[i + 2..].find(')') {
                        let name = &input[i + 2..i + 2 + end];
                        match env.get(name) {
                            Some(v) => out.push_str(v),
                            None => out.push_str(&input[i..i + 3 + end]),
                        }
                        i += 3 + end;
                        continue;
                    }
                }
                _ => {}
            }
        }
        let ch_len = input[i..].chars().next().map(char::len_utf8).unwrap_or(1);
        out.push_str(&input[i..i + ch_len]);
        i += ch_len;
    }
    out
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// (name, gid, members) of each /etc/group line.
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// uid, gid and (if known) user name, from the image `User` (`name`, `uid`, `name:group`, `uid:gid`) and the pod's
/// runAsUser/runAsGroup, which win.
fn resolve_user(
    image_user: &str,
    run_as_user: Option<u32>,
    run_as_group: Option<u32>,
    passwd: &str,
    group: &str,
) -> Result<(u32, u32, Option<String>), ProcessSpecError> {
    let (user_part, group_part) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    let (uid, mut gid, name) = if let Some(uid) = run_as_user {
        // containerd WithUserID: the primary group comes from passwd for that uid, else 0.
        let entry = passwd_entries(passwd).find(|e| e.uid == uid);
        (
            uid,
            entry.as_ref().map(|e| e.gid).unwrap_or(0),
            entry.map(|e| e.name.to_string()),
        )
    } else if user_part.is_empty() {
        (0, 0, Some("root".to_string()))
    } else if let Ok(uid) = user_part.parse::<u32>() {
        let entry = passwd_entries(passwd).find(|e| e.uid == uid);
        (
            uid,
            entry.as_ref().map(|e| e.gid).unwrap_or(0),
            entry.map(|e| e.name.to_string()),
        )
    } else {
        let entry = passwd_entries(passwd)
            .find(|e| e.name == user_part)
            .ok_or_else(|| ProcessSpecError::UnknownUser {
                user: user_part.to_string(),
            })?;
        (entry.uid, entry.gid, Some(entry.name.to_string()))
    };
    if run_as_user.is_none() {
        if let Some(g) = group_part.filter(|g| !g.is_empty()) {
            gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => group_entries(group)
                    .find(|(n, _, _)| *n == g)
                    .map(|(_, id, _)| id)
                    .ok_or_else(|| ProcessSpecError::UnknownGroup {
                        group: g.to_string(),
                    })?,
            };
        }
    }
    if let Some(g) = run_as_group {
        gid = g;
    }
    Ok((uid, gid, name))
}

/// Groups in /etc/group that list `user` as a member (besides the primary group), sorted.
fn supplementary_groups(user: Option<&str>, primary: u32, group: &str) -> Vec<u32> {
    let Some(user) = user else { return Vec::new() };
    let mut gids: Vec<u32> = group_entries(group)
        .filter(|(_, gid, members)| *gid != primary && members.contains(&user))
        .map(|(_, gid, _)| gid)
        .collect();
    gids.sort_unstable();
    gids.dedup();
    gids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::config::ExecConfig;

    fn image(entrypoint: &[&str], cmd: &[&str], user: &str) -> ImageConfig {
        let v = |s: &[&str]| Some(s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        ImageConfig {
            config: Some(ExecConfig {
                entrypoint: v(entrypoint).filter(|e| !e.is_empty()),
                cmd: v(cmd).filter(|c| !c.is_empty()),
                env: Some(vec!["PATH=/bin".into(), "A=image".into()]),
                working_dir: Some("/srv".into()),
                user: Some(user.into()),
                stop_signal: None,
            }),
            ..Default::default()
        }
    }

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(d.path().join("etc")).expect("mkdir");
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nweb:x:101:102:web:/home/web:/bin/sh\n",
        )
        .expect("write");
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\nweb:x:102:\nlogs:x:7:web,other\n",
        )
        .expect("write");
        d
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn command_replaces_entrypoint_and_drops_cmd() {
        let r = rootfs();
        let c = ContainerProcessSpec {
            command: s(&["/bin/echo"]),
            ..Default::default()
        };
        let p = process_spec(&image(&["/ep"], &["cmd1"], ""), &c, r.path()).expect("spec");
        assert_eq!(p.args, s(&["/bin/echo"]));
    }

    #[test]
    fn args_alone_replace_only_cmd() {
        let r = rootfs();
        let c = ContainerProcessSpec {
            args: s(&["x", "y"]),
            ..Default::default()
        };
        let p = process_spec(&image(&["/ep"], &["cmd1"], ""), &c, r.path()).expect("spec");
        assert_eq!(p.args, s(&["/ep", "x", "y"]));
        let p = process_spec(
            &image(&["/ep"], &["cmd1"], ""),
            &Default::default(),
            r.path(),
        )
        .expect("spec");
        assert_eq!(p.args, s(&["/ep", "cmd1"]));
    }

    #[test]
    fn container_env_wins_by_name_and_expands_in_args() {
        let r = rootfs();
        let c = ContainerProcessSpec {
            command: s(&["echo", "$(A)", "$$(A)", "$(NOPE)"]),
            env: vec![("A".into(), "pod".into()), ("B".into(), "b".into())],
            working_dir: Some("/work".into()),
            ..Default::default()
        };
        let p = process_spec(&image(&[], &["cmd"], ""), &c, r.path()).expect("spec");
        assert_eq!(p.args, s(&["echo", "pod", "$(A)", "$(NOPE)"]));
        assert_eq!(p.env, s(&["PATH=/bin", "A=pod", "B=b", "HOME=/root"]));
        assert_eq!(p.cwd, "/work");
    }

    #[test]
    fn image_user_name_is_resolved_and_run_as_overrides_it() {
        let r = rootfs();
        let p =
            process_spec(&image(&[], &["c"], "web"), &Default::default(), r.path()).expect("spec");
        assert_eq!(
            (p.uid, p.gid, p.additional_gids.clone()),
            (101, 102, vec![7])
        );
        assert_eq!(p.cwd, "/srv");
        let c = ContainerProcessSpec {
            run_as_user: Some(1000),
            run_as_group: Some(3000),
            ..Default::default()
        };
        let p = process_spec(&image(&[], &["c"], "web"), &c, r.path()).expect("spec");
        assert_eq!((p.uid, p.gid), (1000, 3000));
        let p = process_spec(
            &image(&[], &["c"], "web:logs"),
            &Default::default(),
            r.path(),
        )
        .expect("spec");
        assert_eq!((p.uid, p.gid), (101, 7));
        assert!(matches!(
            process_spec(&image(&[], &["c"], "ghost"), &Default::default(), r.path()),
            Err(ProcessSpecError::UnknownUser { .. })
        ));
    }

    #[test]
    fn nothing_to_run_is_an_error() {
        let r = rootfs();
        assert!(matches!(
            process_spec(&image(&[], &[], ""), &Default::default(), r.path()),
            Err(ProcessSpecError::NoCommand)
        ));
    }
}
