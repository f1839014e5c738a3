//! The CNI wire contract: network configuration on stdin, `CNI_*` environment, result and error JSON.
//!
//! Ref: containernetworking/cni SPEC.md (1.0.0, with 1.1's GC and STATUS).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The result format this plugin speaks natively.
pub const CNI_VERSION: &str = "1.0.0";

/// Versions accepted in `cniVersion` (and returned by VERSION). 0.3.x/0.4.0 results only differ in the
/// per-IP `version` field, 1.1.0 adds GC and STATUS.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Defaults of the configuration contract (see issue 7 and `/work/shared/DEFAULTS.md`).
pub const DEFAULT_BRIDGE: &str = "windlass0";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/windlass/cni";
pub const DEFAULT_CLUSTER_CIDR: &str = "10.244.0.0/16";

/// Well-known CNI error codes (SPEC.md "Error"), plus this plugin's own codes (100+ are plugin specific).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    IoFailure = 5,
    DecodeFailure = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// 1.1 STATUS: the plugin cannot service ADD requests.
    NotAvailable = 50,
    /// Plugin specific: every address of the subnet is allocated.
    RangeExhausted = 100,
    /// Plugin specific: CHECK found the attachment different from `prevResult`.
    CheckMismatch = 101,
}

/// The spec's error object, printed on stdout with a non-zero exit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CniErrorReply {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub details: String,
}

/// The plugin's error: a code for the runtime, a short message and the full cause chain as details.
#[derive(Debug, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn reply(&self, cni_version: &str) -> CniErrorReply {
        CniErrorReply {
            cni_version: cni_version.to_string(),
            code: self.code as u32,
            msg: self.msg.clone(),
            details: self.details.clone(),
        }
    }
}

/// Inter-node routing mode for the node agent (the plugin itself only records it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    HostGw,
    Vxlan,
}

/// One `{containerID, ifname}` pair of 1.1's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration exactly as read from stdin.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNetConf {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    bridge: Option<String>,
    subnet: Option<String>,
    data_dir: Option<PathBuf>,
    mtu: Option<u32>,
    mode: Option<Mode>,
    ip_masq: Option<bool>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

/// A validated network configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub bridge: String,
    /// The node's pod CIDR; `.1` is the gateway on the bridge.
    pub subnet: Ipv4Net,
    pub data_dir: PathBuf,
    pub mtu: Option<u32>,
    pub mode: Mode,
    pub ip_masq: bool,
    pub cluster_cidr: Ipv4Net,
    pub prev_result: Option<CniResult>,
    pub valid_attachments: Option<Vec<Attachment>>,
}

impl NetConf {
    /// Parses and validates stdin. Undecodable JSON is code 6, a semantically bad config code 7, an unsupported
    /// `cniVersion` code 1.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let raw: RawNetConf = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                ErrorCode::DecodeFailure,
                "failed to decode network configuration",
                e.to_string(),
            )
        })?;
        let invalid =
            |msg: &str, details: String| CniError::new(ErrorCode::InvalidConfig, msg, details);
        let cni_version = raw.cni_version.unwrap_or_else(|| "0.1.0".to_string());
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                "incompatible CNI version",
                format!(
                    "config version {cni_version} is not one of the supported {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let name = raw.name.filter(|n| !n.is_empty()).ok_or_else(|| {
            invalid(
                "network configuration has no name",
                "the \"name\" key is required".into(),
            )
        })?;
        // The name is a directory under dataDir: keep it to a single safe path component.
        if name.contains('/') || name == "." || name == ".." {
            return Err(invalid(
                "invalid network name",
                format!("{name:?} is not a valid directory name"),
            ));
        }
        if let Some(t) = &raw.plugin_type {
            if t.is_empty() {
                return Err(invalid(
                    "network configuration has an empty type",
                    String::new(),
                ));
            }
        }
        let bridge = raw.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        validate_ifname(&bridge).map_err(|d| invalid("invalid bridge name", d))?;
        let subnet_text = raw.subnet.ok_or_else(|| {
            invalid(
                "network configuration has no subnet",
                "the \"subnet\" key (the node's pod CIDR, e.g. 10.244.1.0/24) is required".into(),
            )
        })?;
        let subnet = parse_subnet(&subnet_text).map_err(|d| invalid("invalid subnet", d))?;
        let cluster_text = raw
            .cluster_cidr
            .unwrap_or_else(|| DEFAULT_CLUSTER_CIDR.to_string());
        let cluster_cidr: Ipv4Net = cluster_text
            .parse::<Ipv4Net>()
            .map(|n| n.trunc())
            .map_err(|e| invalid("invalid clusterCIDR", format!("{cluster_text:?}: {e}")))?;
        if let Some(mtu) = raw.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(invalid(
                    "invalid mtu",
                    format!("{mtu} is outside 68..=65535"),
                ));
            }
        }
        let prev_result = match raw.prev_result {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value::<CniResult>(v).map_err(|e| {
                CniError::new(
                    ErrorCode::DecodeFailure,
                    "failed to decode prevResult",
                    e.to_string(),
                )
            })?),
        };
        Ok(Self {
            cni_version,
            name,
            bridge,
            subnet,
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            mtu: raw.mtu,
            mode: raw.mode.unwrap_or_default(),
            ip_masq: raw.ip_masq.unwrap_or(true),
            cluster_cidr,
            prev_result,
            valid_attachments: raw.valid_attachments,
        })
    }

    /// The gateway: the subnet's first host address, assigned to the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }
}

/// A pod CIDR must leave room for the gateway and at least one pod: /30 or larger.
fn parse_subnet(text: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if net.prefix_len() > 30 {
        return Err(format!(
            "{text}: a /{} has no room for a gateway and a pod (use /30 or larger)",
            net.prefix_len()
        ));
    }
    Ok(net.trunc())
}

/// Linux interface names: 1-15 bytes, no '/', whitespace or ':' (dev_valid_name in net/core/dev.c).
pub(crate) fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} must be 1 to 15 bytes long"));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!(
            "{name:?} contains a character Linux does not allow in interface names"
        ));
    }
    Ok(())
}

/// The CNI operation requested in `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS` as `K=V` pairs (we accept and ignore them, as the reference plugins do for unknown keys).
    pub args: HashMap<String, String>,
    pub path: Vec<PathBuf>,
}

impl Invocation {
    /// Reads the environment through `get` (so tests need not touch the process environment).
    /// Missing or malformed variables are code 4.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let bad_env =
            |msg: String| CniError::new(ErrorCode::InvalidEnvironment, msg, String::new());
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some("GC") => Command::Gc,
            Some("STATUS") => Command::Status,
            Some(other) => return Err(bad_env(format!("unknown CNI_COMMAND {other:?}"))),
            None => return Err(bad_env("CNI_COMMAND is not set".into())),
        };
        let attachment_cmd = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = get("CNI_CONTAINERID").unwrap_or_default();
        if attachment_cmd {
            validate_container_id(&container_id).map_err(bad_env)?;
        }
        let ifname = get("CNI_IFNAME").unwrap_or_default();
        if attachment_cmd {
            validate_ifname(&ifname).map_err(|d| bad_env(format!("invalid CNI_IFNAME: {d}")))?;
        }
        let netns = get("CNI_NETNS")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        // Ref: SPEC.md — CNI_NETNS is required for ADD and CHECK, optional for DEL.
        if matches!(command, Command::Add | Command::Check) && netns.is_none() {
            return Err(bad_env("CNI_NETNS is not set".into()));
        }
        let args = get("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter(|kv| !kv.is_empty())
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => Ok((k.to_string(), v.to_string())),
                None => Err(bad_env(format!("CNI_ARGS entry {kv:?} is not KEY=VALUE"))),
            })
            .collect::<Result<_, _>>()?;
        let path = get("CNI_PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }
}

/// Ref: SPEC.md "Parameters": the container ID is alphanumeric plus `_`, `.` and `-`, not empty.
fn validate_container_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("CNI_CONTAINERID is not set".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "CNI_CONTAINERID {id:?} may only hold letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

/// A 1.0.0 ADD result (also the shape of `prevResult`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IpConfig {
    /// Only in 0.3.x/0.4.0 results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: Ipv4Net,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Route {
    pub dst: Ipv4Net,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The VERSION reply.
#[derive(Debug, Clone, Serialize)]
pub struct VersionReply {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<String>,
}

impl VersionReply {
    pub fn new(requested: Option<&str>) -> Self {
        let cni_version = requested
            .filter(|v| SUPPORTED_VERSIONS.contains(v))
            .unwrap_or(CNI_VERSION)
            .to_string();
        Self {
            cni_version,
            supported_versions: SUPPORTED_VERSIONS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Whether results for `version` carry the pre-1.0 per-IP `version` field.
pub(crate) fn wants_ip_version_field(version: &str) -> bool {
    version.starts_with("0.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(json: &str) -> Result<NetConf, CniError> {
        NetConf::parse(json.as_bytes())
    }

    #[test]
    fn defaults_fill_in_the_contract_keys() {
        let c = conf(
            r#"{"cniVersion":"1.0.0","name":"w","type":"windlass-cni","subnet":"10.244.1.7/24"}"#,
        )
        .expect("valid");
        assert_eq!(c.bridge, "windlass0");
        assert_eq!(c.subnet.to_string(), "10.244.1.0/24");
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/windlass/cni"));
        assert!(c.ip_masq);
        assert_eq!(c.cluster_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(c.mode, Mode::HostGw);
    }

    #[test]
    fn bad_json_is_a_decode_failure() {
        assert_eq!(
            conf("{not json").expect_err("must fail").code,
            ErrorCode::DecodeFailure
        );
    }

    #[test]
    fn a_missing_subnet_is_an_invalid_config() {
        let e = conf(r#"{"cniVersion":"1.0.0","name":"w","type":"windlass-cni"}"#)
            .expect_err("must fail");
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.msg.contains("subnet"));
    }

    #[test]
    fn a_slash_31_subnet_is_refused() {
        let e = conf(r#"{"cniVersion":"1.0.0","name":"w","subnet":"10.0.0.0/31"}"#)
            .expect_err("must fail");
        assert_eq!(e.code, ErrorCode::InvalidConfig);
    }

    #[test]
    fn an_unknown_version_is_incompatible() {
        let e = conf(r#"{"cniVersion":"9.9.9","name":"w","subnet":"10.0.0.0/24"}"#)
            .expect_err("must fail");
        assert_eq!(e.code, ErrorCode::IncompatibleVersion);
    }

    #[test]
    fn vxlan_mode_and_masquerade_switch_parse() {
        let c = conf(r#"{"cniVersion":"1.1.0","name":"w","subnet":"10.0.0.0/24","mode":"vxlan","ipMasq":false}"#)
            .expect("valid");
        assert_eq!(c.mode, Mode::Vxlan);
        assert!(!c.ip_masq);
    }

    #[test]
    fn environment_without_netns_is_refused_for_add_but_not_del() {
        let env = |cmd: &'static str| {
            move |k: &str| match k {
                "CNI_COMMAND" => Some(cmd.to_string()),
                "CNI_CONTAINERID" => Some("abc".to_string()),
                "CNI_IFNAME" => Some("eth0".to_string()),
                _ => None,
            }
        };
        assert_eq!(
            Invocation::from_env(env("ADD"))
                .expect_err("must fail")
                .code,
            ErrorCode::InvalidEnvironment
        );
        assert!(Invocation::from_env(env("DEL")).is_ok());
    }

    #[test]
    fn error_reply_has_the_spec_keys() {
        let e = CniError::new(ErrorCode::InvalidConfig, "bad", "worse");
        let v = serde_json::to_value(e.reply("1.0.0")).expect("serializes");
        assert_eq!(v["code"], 7);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["msg"], "bad");
        assert_eq!(v["details"], "worse");
    }
}
