//! The CNI commands: ADD, DEL, CHECK, GC, STATUS (VERSION needs no configuration and lives in [`run`]).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use crate::ipam::{Ipam, IpamError};
use crate::masq::{self, MasqError};
use crate::netlink::{block_on, in_netns, LinkError, Netlink};
use crate::spec::{
    wants_ip_version_field, Attachment, CniError, CniResult, Command, ErrorCode, Interface,
    Invocation, IpConfig, NetConf, Route, VersionReply, CNI_VERSION,
};

/// Prefix of host-side veth names; GC only ever deletes bridge ports with this prefix.
pub const HOST_VETH_PREFIX: &str = "wl";

/// Where the plugin finds the system (passed in so tests and several nodes on one machine can differ).
#[derive(Debug, Clone)]
pub struct PluginEnv {
    /// procfs mount, for `sys/net/ipv4/ip_forward` of the node namespace.
    pub proc_root: PathBuf,
}

impl Default for PluginEnv {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
        }
    }
}

/// What the binary prints and how it exits.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginOutput {
    pub stdout: String,
    pub exit_code: i32,
}

/// The host-side veth name for an attachment: `wl` + 8 hex digits of FNV-1a over `containerID/ifname`.
/// Deterministic, so DEL and GC find the link without any state, and ≤ 15 bytes.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    // Ref: FNV-1a 32-bit (offset basis 2166136261, prime 16777619).
    let mut hash: u32 = 0x811c_9dc5;
    for b in container_id
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(ifname.bytes())
    {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{HOST_VETH_PREFIX}{hash:08x}")
}

/// The bridge's MAC: `0a:58` + the gateway address (the convention of OVN-Kubernetes and others), locally
/// administered, unicast and the same on every ADD.
pub(crate) fn gateway_mac(gw: Ipv4Addr) -> [u8; 6] {
    let o = gw.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// Runs one plugin invocation: `env` reads `CNI_*` variables, `stdin` is the network configuration.
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: &[u8], sys: &PluginEnv) -> PluginOutput {
    let fallback_version = requested_version(stdin);
    let inv = match Invocation::from_env(env) {
        Ok(inv) => inv,
        Err(e) => return error_output(&e, &fallback_version),
    };
    debug!(command = ?inv.command, args = ?inv.args, path = ?inv.path, "CNI invocation");
    if inv.command == Command::Version {
        let reply = VersionReply::new(Some(fallback_version.as_str()));
        return PluginOutput {
            stdout: serde_json::to_string(&reply).unwrap_or_default(),
            exit_code: 0,
        };
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return error_output(&e, &fallback_version),
    };
    let outcome = match inv.command {
        Command::Add => add(&inv, &conf, sys).map(Some),
        Command::Del => del(&inv, &conf).map(|()| None),
        Command::Check => check(&inv, &conf).map(|()| None),
        Command::Gc => gc(&conf).map(|_| None),
        Command::Status => status(&conf).map(|()| None),
        Command::Version => Ok(None),
    };
    match outcome {
        Ok(Some(result)) => PluginOutput {
            stdout: serde_json::to_string(&result).unwrap_or_default(),
            exit_code: 0,
        },
        Ok(None) => PluginOutput {
            stdout: String::new(),
            exit_code: 0,
        },
        Err(e) => error_output(&e, &conf.cni_version),
    }
}

fn error_output(e: &CniError, version: &str) -> PluginOutput {
    warn!(code = e.code as u32, msg = %e.msg, details = %e.details, "CNI command failed");
    PluginOutput {
        stdout: serde_json::to_string(&e.reply(version)).unwrap_or_default(),
        exit_code: 1,
    }
}

/// The `cniVersion` of stdin if it is at least that readable, for error replies and VERSION.
fn requested_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .filter(|v| crate::spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| CNI_VERSION.to_string())
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> Self {
        match &e {
            IpamError::Exhausted { subnet, .. } => CniError::new(
                ErrorCode::RangeExhausted,
                format!("no IP addresses available in range {subnet}"),
                e.to_string(),
            ),
            _ => CniError::new(ErrorCode::IoFailure, "IPAM state failure", e.to_string()),
        }
    }
}

impl From<LinkError> for CniError {
    fn from(e: LinkError) -> Self {
        let code = match e.errno() {
            Some(libc::EBUSY) | Some(libc::EAGAIN) => ErrorCode::TryAgainLater,
            _ => ErrorCode::IoFailure,
        };
        CniError::new(code, "network setup failed", e.to_string())
    }
}

impl From<MasqError> for CniError {
    fn from(e: MasqError) -> Self {
        CniError::new(
            ErrorCode::IoFailure,
            "masquerade setup failed",
            e.to_string(),
        )
    }
}

fn ipam_for(conf: &NetConf) -> Ipam {
    Ipam::new(conf.data_dir.join(&conf.name), conf.subnet)
}

fn open_netns(path: &Path) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        let code = if e.kind() == io::ErrorKind::NotFound {
            ErrorCode::UnknownContainer
        } else {
            ErrorCode::IoFailure
        };
        CniError::new(
            code,
            format!("failed to open netns {}", path.display()),
            e.to_string(),
        )
    })
}

/// Ref: containernetworking/plugins bridge `enableIPForward` — the node must route between pods and the world.
fn enable_ip_forward(proc_root: &Path) -> Result<(), CniError> {
    let path = proc_root.join("sys/net/ipv4/ip_forward");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(&path, "1").map_err(|e| {
        CniError::new(
            ErrorCode::IoFailure,
            "cannot enable IP forwarding",
            format!("{}: {e}", path.display()),
        )
    })
}

/// The links an attachment consists of, as found or created.
struct Attached {
    bridge_mac: String,
    host_mac: String,
    pod_mac: String,
}

fn add(inv: &Invocation, conf: &NetConf, sys: &PluginEnv) -> Result<CniResult, CniError> {
    let netns_path = inv.netns.as_deref().unwrap_or(Path::new(""));
    let netns = open_netns(netns_path)?;
    let who = Attachment {
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
    };
    let host = host_veth_name(&who.container_id, &who.ifname);
    let span = tracing::info_span!("add", container = %who.container_id, ifname = %who.ifname, veth = %host);
    let _enter = span.enter();
    let ipam = ipam_for(conf);
    let (ip, fresh) = ipam.allocate(&who)?;
    debug!(%ip, fresh, "address allocated");
    let mut created_veth = false;
    let outcome = attach(inv, conf, sys, &netns, &host, ip, &mut created_veth);
    match outcome {
        Ok(links) => {
            info!(%ip, "pod attached");
            Ok(build_result(conf, inv, netns_path, ip, links))
        }
        Err(e) => {
            // Roll back what this call created so a failed ADD leaves nothing behind.
            if created_veth {
                if let Err(re) = block_on(async { Netlink::connect()?.delete_link(&host).await }) {
                    warn!(error = %re, "rollback: cannot delete veth");
                }
            }
            if fresh {
                if let Err(re) = ipam.release_ip(ip, &who) {
                    warn!(error = %re, "rollback: cannot release address");
                }
            }
            Err(e)
        }
    }
}

fn attach(
    inv: &Invocation,
    conf: &NetConf,
    sys: &PluginEnv,
    netns: &File,
    host: &str,
    ip: Ipv4Addr,
    created_veth: &mut bool,
) -> Result<Attached, CniError> {
    let gw = conf.gateway();
    let prefix = conf.subnet.prefix_len();
    let ifname = inv.ifname.as_str();
    enable_ip_forward(&sys.proc_root)?;
    let host_side = block_on(async {
        let nl = Netlink::connect()?;
        let bridge = nl
            .ensure_bridge(&conf.bridge, gateway_mac(gw), conf.mtu)
            .await?;
        nl.add_address(bridge.index, gw, prefix).await?;
        // A repeated ADD finds its veth: keep it when its peer is still the pod's interface; otherwise it is a
        // leftover of a half-finished attachment and is replaced.
        let existing = nl.link(host).await?;
        let reuse = existing.is_some()
            && in_netns(netns, || {
                block_on(async { Netlink::connect()?.link(ifname).await })
            })?
            .is_some();
        if !reuse {
            if existing.is_some() {
                nl.delete_link(host).await?;
            }
            nl.create_veth(host, bridge.index, ifname, netns, conf.mtu)
                .await?;
            *created_veth = true;
        }
        let link = nl.require_link(host).await?;
        if link.controller != Some(bridge.index) || !link.up {
            let msg = rtnetlink::LinkUnspec::new_with_index(link.index)
                .controller(bridge.index)
                .up()
                .build();
            nl.set_link(msg, &format!("attach {host} to {}", conf.bridge))
                .await?;
        }
        nl.set_hairpin(link.index).await?;
        Ok((bridge, link))
    });
    let (bridge, host_link) = host_side.map_err(|e: LinkError| {
        if e.errno() == Some(libc::EEXIST) {
            CniError::new(
                ErrorCode::IoFailure,
                format!("container already has an interface named {ifname}"),
                e.to_string(),
            )
        } else {
            e.into()
        }
    })?;
    let pod_mac = in_netns(netns, || {
        block_on(async {
            let nl = Netlink::connect()?;
            let lo = nl.require_link("lo").await?;
            if !lo.up {
                nl.set_up(lo.index).await?;
            }
            let link = nl.require_link(ifname).await?;
            nl.add_address(link.index, ip, prefix).await?;
            if !link.up {
                nl.set_up(link.index).await?;
            }
            nl.replace_default_route(link.index, gw).await?;
            Ok(link.mac_string())
        })
    })?;
    if conf.ip_masq {
        ensure_masquerade_once(conf, sys, bridge.index)?;
    }
    Ok(Attached {
        bridge_mac: bridge.mac_string(),
        host_mac: host_link.mac_string(),
        pod_mac,
    })
}

/// Applies the subnet's masquerade unless this very bridge (same boot, namespace and ifindex) already got it.
///
/// One `nft -j -f -` costs ~20 ms, most of an ADD, and the rule is per subnet, not per pod: the stamp file
/// `<dataDir>/<network>/masquerade` records what was applied. A reboot, another namespace or a re-created bridge
/// changes the key and the batch is applied again; a failed apply writes no stamp, so the next ADD retries.
/// GC re-applies unconditionally, repairing a ruleset someone flushed.
fn ensure_masquerade_once(
    conf: &NetConf,
    sys: &PluginEnv,
    bridge_index: u32,
) -> Result<(), CniError> {
    use std::os::unix::fs::MetadataExt;
    let boot_id = std::fs::read_to_string(sys.proc_root.join("sys/kernel/random/boot_id"))
        .unwrap_or_default();
    let netns_ino = std::fs::metadata(sys.proc_root.join("self/ns/net"))
        .map(|m| m.ino())
        .unwrap_or_default();
    let key = format!(
        "{}/{netns_ino}/{bridge_index}/{}/{}",
        boot_id.trim(),
        conf.subnet,
        conf.cluster_cidr
    );
    let stamp = conf.data_dir.join(&conf.name).join("masquerade");
    if boot_id.is_empty()
        || netns_ino == 0
        || std::fs::read_to_string(&stamp).ok().as_deref() != Some(key.as_str())
    {
        masq::ensure_masquerade(conf.subnet, conf.cluster_cidr)?;
        if let Err(e) = std::fs::write(&stamp, &key) {
            warn!(path = %stamp.display(), error = %e, "cannot record the applied masquerade");
        }
    }
    Ok(())
}

fn build_result(
    conf: &NetConf,
    inv: &Invocation,
    netns: &Path,
    ip: Ipv4Addr,
    links: Attached,
) -> CniResult {
    let gw = conf.gateway();
    let address = Ipv4Net::new(ip, conf.subnet.prefix_len()).unwrap_or(conf.subnet);
    CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: conf.bridge.clone(),
                mac: links.bridge_mac,
                ..Interface::default()
            },
            Interface {
                name: host_veth_name(&inv.container_id, &inv.ifname),
                mac: links.host_mac,
                ..Interface::default()
            },
            Interface {
                name: inv.ifname.clone(),
                mac: links.pod_mac,
                mtu: conf.mtu,
                sandbox: netns.display().to_string(),
            },
        ],
        ips: vec![IpConfig {
            version: wants_ip_version_field(&conf.cni_version).then(|| "4".to_string()),
            address,
            gateway: Some(gw),
            interface: Some(2),
        }],
        routes: vec![Route {
            dst: Ipv4Net::default(),
            gw: Some(gw),
        }],
        dns: Default::default(),
    }
}

/// DEL: releases the address and deletes the veth (its peer in the pod goes with it). Everything that is
/// already gone counts as done; every step runs even if an earlier one failed, and all failures are reported.
fn del(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let who = Attachment {
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
    };
    let host = host_veth_name(&who.container_id, &who.ifname);
    let mut failures = Vec::new();
    match block_on(async { Netlink::connect()?.delete_link(&host).await }) {
        Ok(found) => debug!(veth = %host, found, "veth deleted"),
        Err(e) => failures.push(e.to_string()),
    }
    match ipam_for(conf).release(&who) {
        Ok(ips) => debug!(?ips, "addresses released"),
        Err(e) => failures.push(e.to_string()),
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::IoFailure,
            "DEL could not clean up everything",
            failures.join("; "),
        ))
    }
}

/// CHECK: the attachment still looks like `prevResult` says.
fn check(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "CHECK needs prevResult",
            "the runtime passed no prevResult",
        )
    })?;
    let mismatch = |what: String| {
        CniError::new(
            ErrorCode::CheckMismatch,
            "attachment does not match prevResult",
            what,
        )
    };
    let pod_index = prev
        .interfaces
        .iter()
        .position(|i| i.name == inv.ifname && !i.sandbox.is_empty())
        .ok_or_else(|| {
            mismatch(format!(
                "prevResult has no sandbox interface {}",
                inv.ifname
            ))
        })?;
    let ip = prev
        .ips
        .iter()
        .find(|c| c.interface == Some(pod_index))
        .map(|c| c.address)
        .ok_or_else(|| mismatch(format!("prevResult has no address for {}", inv.ifname)))?;
    let who = Attachment {
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
    };
    match ipam_for(conf).lookup(&who)? {
        Some(held) if held == ip.addr() => {}
        other => {
            return Err(mismatch(format!(
                "IPAM holds {other:?} for this container, prevResult says {ip}"
            )))
        }
    }
    let host = host_veth_name(&who.container_id, &who.ifname);
    let (bridge, link) = block_on(async {
        let nl = Netlink::connect()?;
        Ok((nl.link(&conf.bridge).await?, nl.link(&host).await?))
    })?;
    let bridge = bridge.ok_or_else(|| mismatch(format!("bridge {} is missing", conf.bridge)))?;
    let link = link.ok_or_else(|| mismatch(format!("host veth {host} is missing")))?;
    if link.controller != Some(bridge.index) || !link.up {
        return Err(mismatch(format!(
            "host veth {host} is down or not on bridge {}",
            conf.bridge
        )));
    }
    let netns = open_netns(inv.netns.as_deref().unwrap_or(Path::new("")))?;
    let gw = conf.gateway();
    let ifname = inv.ifname.clone();
    let pod = in_netns(&netns, || {
        block_on(async {
            let nl = Netlink::connect()?;
            let Some(link) = nl.link(&ifname).await? else {
                return Ok(None);
            };
            let addrs = nl.addresses(link.index).await?;
            let routes = nl.routes().await?;
            Ok(Some((link, addrs, routes)))
        })
    })?;
    let (pod_link, addrs, routes) =
        pod.ok_or_else(|| mismatch(format!("{} is missing in the sandbox", inv.ifname)))?;
    if !pod_link.up {
        return Err(mismatch(format!("{} is down", inv.ifname)));
    }
    if !addrs.contains(&(ip.addr(), ip.prefix_len())) {
        return Err(mismatch(format!("{} lacks address {ip}", inv.ifname)));
    }
    let has_default = routes.iter().any(|r| {
        r.prefix == 0 && r.gateway == Some(gw) && r.oif == Some(pod_link.index) && r.table == 254
    });
    if !has_default {
        return Err(mismatch(format!(
            "no default route via {gw} on {}",
            inv.ifname
        )));
    }
    Ok(())
}

/// What garbage collection removed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GcReport {
    pub released: Vec<Ipv4Addr>,
    pub deleted_links: Vec<String>,
}

/// 1.1 GC: everything not in `cni.dev/valid-attachments` is released.
fn gc(conf: &NetConf) -> Result<GcReport, CniError> {
    let valid = conf.valid_attachments.as_deref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "GC needs cni.dev/valid-attachments",
            "the runtime passed no list of valid attachments",
        )
    })?;
    garbage_collect(conf, valid)
}

/// Releases the addresses and deletes the bridge ports of every attachment of this network that is not in
/// `valid` (the kubelet's live pods): recovers what a crashed runtime or a lost DEL leaked.
pub fn garbage_collect(conf: &NetConf, valid: &[Attachment]) -> Result<GcReport, CniError> {
    let keep: HashSet<&Attachment> = valid.iter().collect();
    let keep_links: HashSet<String> = valid
        .iter()
        .map(|a| host_veth_name(&a.container_id, &a.ifname))
        .collect();
    let released = ipam_for(conf).retain(|a| keep.contains(a))?;
    if conf.ip_masq {
        masq::ensure_masquerade(conf.subnet, conf.cluster_cidr)?;
    }
    let bridge_name = conf.bridge.clone();
    let deleted_links = block_on(async {
        let nl = Netlink::connect()?;
        let Some(bridge) = nl.link(&bridge_name).await? else {
            return Ok(Vec::new());
        };
        let mut deleted = Vec::new();
        for link in nl.links().await? {
            if link.controller == Some(bridge.index)
                && link.name.starts_with(HOST_VETH_PREFIX)
                && !keep_links.contains(&link.name)
                && nl.delete_link(&link.name).await?
            {
                deleted.push(link.name);
            }
        }
        Ok(deleted)
    })?;
    info!(?released, ?deleted_links, "garbage collected");
    Ok(GcReport {
        released,
        deleted_links,
    })
}

/// Like [`garbage_collect`] keyed by container ID only (any interface of a live container is kept).
pub fn release_leaked(
    conf: &NetConf,
    live_container_ids: &HashSet<String>,
) -> Result<GcReport, CniError> {
    let valid: Vec<Attachment> = ipam_for(conf)
        .allocations()?
        .into_values()
        .filter(|a| live_container_ids.contains(&a.container_id))
        .collect();
    garbage_collect(conf, &valid)
}

/// 1.1 STATUS: ready when the IPAM state is usable and has a free address.
fn status(conf: &NetConf) -> Result<(), CniError> {
    let ipam = ipam_for(conf);
    let unavailable =
        |details: String| CniError::new(ErrorCode::NotAvailable, "plugin not available", details);
    std::fs::create_dir_all(ipam.dir())
        .map_err(|e| unavailable(format!("{}: {e}", ipam.dir().display())))?;
    let used = ipam
        .allocations()
        .map_err(|e| unavailable(e.to_string()))?
        .len();
    if used >= ipam.capacity() {
        return Err(unavailable(format!(
            "all {} addresses of {} are allocated",
            used, conf.subnet
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_deterministic_short_and_distinct() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_eq!(a.len(), 10);
        assert!(a.starts_with("wl"));
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(a, host_veth_name("abd", "eth0"));
    }

    #[test]
    fn version_needs_no_config() {
        let out = run(
            |k| (k == "CNI_COMMAND").then(|| "VERSION".to_string()),
            b"",
            &PluginEnv::default(),
        );
        assert_eq!(out.exit_code, 0);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["supportedVersions"]
            .as_array()
            .expect("list")
            .iter()
            .any(|x| x == "1.1.0"));
    }

    #[test]
    fn bad_json_gives_code_6_on_stdout() {
        let out = run(
            |k| match k {
                "CNI_COMMAND" => Some("ADD".into()),
                "CNI_CONTAINERID" => Some("c1".into()),
                "CNI_IFNAME" => Some("eth0".into()),
                "CNI_NETNS" => Some("/nonexistent".into()),
                _ => None,
            },
            b"{",
            &PluginEnv::default(),
        );
        assert_eq!(out.exit_code, 1);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        assert_eq!(v["code"], 6);
    }
}
