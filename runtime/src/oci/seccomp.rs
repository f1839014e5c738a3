//! `linux.seccomp` compiled to classic BPF with `seccompiler`.
//!
//! seccompiler gives a filter one match action, while an OCI profile gives one per syscall group. The kernel runs
//! every installed filter and keeps the result of highest precedence (KILL_PROCESS > KILL_THREAD > TRAP > ERRNO >
//! TRACE > LOG > ALLOW; Ref: seccomp(2), "return values"), so a profile becomes:
//! - one filter per distinct non-default action, returning that action for its rules and ALLOW otherwise, and
//! - one filter returning ALLOW for every rule whose action is not the default, and the default action otherwise.
//!
//! A syscall matching a rule then gets that rule's action (everything else said ALLOW); any other syscall gets the
//! default. Names unknown to the syscall table are skipped with a warning, as runc does for names libseccomp lacks.

use std::collections::BTreeMap;

use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use serde_json::{json, Value};

use super::OciError;

/// The filters to install, in order, right before `execve`.
#[derive(Debug, Clone, Default)]
pub(crate) struct SeccompProgram {
    pub(crate) filters: Vec<seccompiler::BpfProgram>,
}

fn native_arch() -> Result<(seccompiler::TargetArch, Arch), OciError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok((seccompiler::TargetArch::x86_64, Arch::ScmpArchX86_64)),
        "aarch64" => Ok((seccompiler::TargetArch::aarch64, Arch::ScmpArchAarch64)),
        "riscv64" => Ok((seccompiler::TargetArch::riscv64, Arch::ScmpArchRiscv64)),
        other => Err(OciError::Seccomp(format!(
            "seccomp is not supported on architecture {other}"
        ))),
    }
}

/// seccompiler's JSON spelling of an action.
fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<Value, OciError> {
    let eperm = libc::EPERM as u32;
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            json!("kill_thread")
        }
        LinuxSeccompAction::ScmpActKillProcess => json!("kill_process"),
        LinuxSeccompAction::ScmpActTrap => json!("trap"),
        LinuxSeccompAction::ScmpActErrno => json!({"errno": errno.unwrap_or(eperm)}),
        LinuxSeccompAction::ScmpActTrace => json!({"trace": errno.unwrap_or(eperm)}),
        LinuxSeccompAction::ScmpActLog => json!("log"),
        LinuxSeccompAction::ScmpActAllow => json!("allow"),
        LinuxSeccompAction::ScmpActNotify => {
            return Err(OciError::Seccomp(
                "SCMP_ACT_NOTIFY (seccomp user notification) is not supported".into(),
            ))
        }
    })
}

fn operator(op: LinuxSeccompOperator, value: u64, value_two: Option<u64>) -> (Value, u64) {
    match op {
        LinuxSeccompOperator::ScmpCmpNe => (json!("ne"), value),
        LinuxSeccompOperator::ScmpCmpLt => (json!("lt"), value),
        LinuxSeccompOperator::ScmpCmpLe => (json!("le"), value),
        LinuxSeccompOperator::ScmpCmpEq => (json!("eq"), value),
        LinuxSeccompOperator::ScmpCmpGe => (json!("ge"), value),
        LinuxSeccompOperator::ScmpCmpGt => (json!("gt"), value),
        // Ref: libseccomp SCMP_CMP_MASKED_EQ: (arg & value) == valueTwo.
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            (json!({"masked_eq": value}), value_two.unwrap_or(0))
        }
    }
}

/// Compiles `linux.seccomp` for this machine's architecture.
pub(crate) fn compile(seccomp: &LinuxSeccomp) -> Result<SeccompProgram, OciError> {
    let (target, native) = native_arch()?;
    if let Some(archs) = seccomp.architectures() {
        if !archs.is_empty() && !archs.contains(&native) {
            return Err(OciError::Seccomp(format!(
                "architectures {archs:?} do not include this machine's {native:?}"
            )));
        }
    }
    for flag in seccomp.flags().as_deref().unwrap_or_default() {
        tracing::warn!(?flag, "seccomp filter flag ignored");
    }
    let default = action(seccomp.default_action(), seccomp.default_errno_ret())?;

    // action (as JSON text) -> rules; plus the union of every rule not using the default action.
    let mut by_action: BTreeMap<String, (Value, Vec<(String, Value)>)> = BTreeMap::new();
    let mut not_default: Vec<(String, Value)> = Vec::new();
    for group in seccomp.syscalls().as_deref().unwrap_or_default() {
        let act = action(group.action(), group.errno_ret())?;
        let mut args = Vec::new();
        for arg in group.args().as_deref().unwrap_or_default() {
            if arg.index() > 5 {
                return Err(OciError::Seccomp(format!(
                    "argument index {} > 5",
                    arg.index()
                )));
            }
            let (op, val) = operator(arg.op(), arg.value(), arg.value_two());
            args.push(json!({"index": arg.index(), "type": "qword", "op": op, "val": val}));
        }
        let args = Value::Array(args);
        for name in group.names() {
            if act == default {
                continue;
            }
            not_default.push((name.clone(), args.clone()));
            if act != json!("allow") {
                by_action
                    .entry(act.to_string())
                    .or_insert_with(|| (act.clone(), Vec::new()))
                    .1
                    .push((name.clone(), args.clone()));
            }
        }
    }

    let rules = |list: &[(String, Value)], skip: &[String]| -> Value {
        Value::Array(
            list.iter()
                .filter(|(name, _)| !skip.contains(name))
                .map(|(name, args)| {
                    if args.as_array().is_some_and(|a| a.is_empty()) {
                        json!({"syscall": name})
                    } else {
                        json!({"syscall": name, "args": args})
                    }
                })
                .collect(),
        )
    };

    let mut unknown: Vec<String> = Vec::new();
    // Each retry drops one unknown name; bounded by the number of names.
    for _ in 0..=not_default.len() {
        let mut filters = serde_json::Map::new();
        for (i, (act, list)) in by_action.values().enumerate() {
            let r = rules(list, &unknown);
            if r.as_array().is_some_and(|a| !a.is_empty()) {
                filters.insert(
                    format!("action{i}"),
                    json!({"mismatch_action": "allow", "match_action": act, "filter": r}),
                );
            }
        }
        if default != json!("allow") {
            filters.insert(
                "default".into(),
                json!({"mismatch_action": default, "match_action": "allow", "filter": rules(&not_default, &unknown)}),
            );
        }
        let text = Value::Object(filters).to_string();
        match seccompiler::compile_from_json(text.as_bytes(), target) {
            Ok(map) => {
                return Ok(SeccompProgram {
                    filters: map.into_values().filter(|p| !p.is_empty()).collect(),
                })
            }
            Err(e) => {
                let msg = e.to_string();
                // seccompiler's JSON error type is private; its message names the syscall.
                let name = msg
                    .split("Invalid syscall name: ")
                    .nth(1)
                    .and_then(|rest| rest.split(" for given arch").next())
                    .map(str::to_string);
                match name {
                    Some(name) if !unknown.contains(&name) => {
                        tracing::warn!(syscall = %name, "unknown syscall in seccomp profile ignored");
                        unknown.push(name);
                    }
                    _ => return Err(OciError::Seccomp(msg)),
                }
            }
        }
    }
    Err(OciError::Seccomp("cannot compile the profile".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).expect("profile parses")
    }

    #[test]
    fn a_deny_list_compiles_to_one_filter() {
        let p = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO"}]}"#,
        ))
        .expect("compiles");
        assert_eq!(p.filters.len(), 1);
    }

    #[test]
    fn an_allow_list_with_arguments_compiles() {
        let p = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["read","write","exit_group"],"action":"SCMP_ACT_ALLOW"},
                {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"}]},
                {"names":["ptrace"],"action":"SCMP_ACT_KILL_PROCESS"}]}"#,
        ))
        .expect("compiles");
        assert_eq!(p.filters.len(), 2);
    }

    #[test]
    fn unknown_syscall_names_are_skipped() {
        let p = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["no_such_call","mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#,
        ))
        .expect("compiles");
        assert_eq!(p.filters.len(), 1);
    }

    #[test]
    fn notify_is_refused_clearly() {
        let err = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        ))
        .expect_err("refused");
        assert!(err.to_string().contains("NOTIFY"), "{err}");
    }
}
