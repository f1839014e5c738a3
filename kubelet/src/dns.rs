//! A pod's `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname`.
//!
//! Ref: upstream `pkg/kubelet/network/dns/dns.go` (`GetPodDNS`, `generateSearchesForDNSClusterFirst`,
//! `appendDNSConfig`, search-list limits) and `pkg/kubelet/kubelet_pods.go` (`managedHostsFileContent`,
//! `GeneratePodHostNameAndDomain`).

use k8s_openapi::api::core::v1::Pod;

/// Upstream `MaxDNSNameservers`, `MaxDNSSearchPaths`, `MaxDNSSearchListChars`.
pub const MAX_NAMESERVERS: usize = 3;
pub const MAX_SEARCH_PATHS: usize = 32;
pub const MAX_SEARCH_CHARS: usize = 2048;

/// A parsed or generated resolver configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    /// `name` or `name:value`.
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Parses a resolv.conf (`nameserver`, `search`/`domain`, `options`; `#`/`;` comments).
    pub fn parse(text: &str) -> Self {
        let mut c = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut fields = line.split_whitespace();
            match fields.next() {
                Some("nameserver") => c.nameservers.extend(fields.next().map(str::to_string)),
                // The last search/domain line wins, as in glibc.
                Some("search") | Some("domain") => {
                    c.searches = fields.map(str::to_string).collect()
                }
                Some("options") => c.options.extend(fields.map(str::to_string)),
                _ => {}
            }
        }
        c
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.searches.is_empty() {
            out.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for ns in &self.nameservers {
            out.push_str(&format!("nameserver {ns}\n"));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }
}

/// The node's DNS settings the kubelet was given.
#[derive(Debug, Clone, Default)]
pub struct DnsSettings {
    /// `--cluster-dns` (may be empty: ClusterFirst then falls back to Default, as upstream does).
    pub cluster_dns: Vec<String>,
    /// `--cluster-domain`.
    pub cluster_domain: String,
    /// The node's resolv.conf (what `Default` pods get).
    pub host: ResolvConf,
}

fn omit_duplicates(v: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    v.into_iter().filter(|s| seen.insert(s.clone())).collect()
}

fn option_name(o: &str) -> &str {
    o.split(':').next().unwrap_or(o)
}

/// The pod's resolv.conf per its `dnsPolicy` and `dnsConfig`.
pub fn pod_resolv_conf(pod: &Pod, s: &DnsSettings) -> ResolvConf {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst");
    // Upstream getPodDNSType: ClusterFirst on the host network means Default; ClusterFirstWithHostNet means
    // ClusterFirst everywhere; without cluster DNS, ClusterFirst falls back to Default.
    let cluster_first = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network,
        _ => false,
    } && !s.cluster_dns.is_empty();
    let mut conf = match policy {
        "None" => ResolvConf::default(),
        _ if cluster_first => {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            let d = &s.cluster_domain;
            let mut searches = vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.clone()];
            searches.extend(s.host.searches.iter().cloned());
            ResolvConf {
                nameservers: s.cluster_dns.clone(),
                searches: omit_duplicates(searches),
                options: vec!["ndots:5".into()],
            }
        }
        _ => s.host.clone(),
    };
    if let Some(cfg) = spec.and_then(|s| s.dns_config.as_ref()) {
        conf.nameservers
            .extend(cfg.nameservers.iter().flatten().cloned());
        conf.nameservers = omit_duplicates(std::mem::take(&mut conf.nameservers));
        conf.searches.extend(cfg.searches.iter().flatten().cloned());
        conf.searches = omit_duplicates(std::mem::take(&mut conf.searches));
        // Pod options replace same-named existing ones (upstream mergeDNSOptions).
        for o in cfg.options.iter().flatten() {
            let text = match &o.value {
                Some(v) => format!("{}:{v}", o.name.as_deref().unwrap_or("")),
                None => o.name.clone().unwrap_or_default(),
            };
            let name = o.name.as_deref().unwrap_or("");
            match conf.options.iter_mut().find(|e| option_name(e) == name) {
                Some(existing) => *existing = text,
                None => conf.options.push(text),
            }
        }
    }
    conf.nameservers.truncate(MAX_NAMESERVERS);
    // Upstream trims the search list to the kernel/libc limits and records an event.
    conf.searches.truncate(MAX_SEARCH_PATHS);
    while conf.searches.join(" ").len() > MAX_SEARCH_CHARS {
        conf.searches.pop();
    }
    conf
}

/// The pod's hostname and domain (upstream `GeneratePodHostNameAndDomain`): `spec.hostname` or the pod name, cut
/// to 63 characters without a trailing `-`/`.`; domain `<subdomain>.<ns>.svc.<cluster-domain>` when a subdomain
/// is set.
pub fn hostname_and_domain(pod: &Pod, cluster_domain: &str) -> (String, Option<String>) {
    let spec = pod.spec.as_ref();
    let mut hostname = spec
        .and_then(|s| s.hostname.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default());
    if hostname.len() > 63 {
        hostname.truncate(63);
        while hostname.ends_with(['-', '.']) {
            hostname.pop();
        }
    }
    let domain = spec
        .and_then(|s| s.subdomain.as_deref())
        .filter(|d| !d.is_empty())
        .map(|sub| {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            format!("{sub}.{ns}.svc.{cluster_domain}")
        });
    (hostname, domain)
}

/// `/etc/hostname`: the FQDN when `setHostnameAsFQDN` and a domain exist.
pub fn hostname_file(pod: &Pod, cluster_domain: &str) -> String {
    let (host, domain) = hostname_and_domain(pod, cluster_domain);
    let fqdn = pod
        .spec
        .as_ref()
        .and_then(|s| s.set_hostname_as_fqdn)
        .unwrap_or(false);
    match domain {
        Some(d) if fqdn => format!("{host}.{d}\n"),
        _ => format!("{host}\n"),
    }
}

fn host_aliases(pod: &Pod) -> String {
    let aliases = pod.spec.as_ref().and_then(|s| s.host_aliases.as_ref());
    let mut out = String::new();
    if let Some(aliases) = aliases.filter(|a| !a.is_empty()) {
        out.push_str("\n# Entries added by HostAliases.\n");
        for a in aliases {
            let names = a.hostnames.iter().flatten().cloned().collect::<Vec<_>>();
            out.push_str(&format!("{}\t{}\n", a.ip, names.join("\t")));
        }
    }
    out
}

/// `/etc/hosts` (upstream `managedHostsFileContent`). Host-network pods get the node's file (`node_hosts`) plus
/// their host aliases.
pub fn hosts_file(pod: &Pod, pod_ips: &[String], cluster_domain: &str, node_hosts: &str) -> String {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    if host_network {
        let mut out = String::from("# Kubernetes-managed hosts file (host network).\n");
        out.push_str(node_hosts);
        if !node_hosts.is_empty() && !node_hosts.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&host_aliases(pod));
        return out;
    }
    let (host, domain) = hostname_and_domain(pod, cluster_domain);
    let mut out = String::from(
        "# Kubernetes-managed hosts file.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    for ip in pod_ips {
        match &domain {
            Some(d) => out.push_str(&format!("{ip}\t{host}.{d}\t{host}\n")),
            None => out.push_str(&format!("{ip}\t{host}\n")),
        }
    }
    out.push_str(&host_aliases(pod));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{HostAlias, PodDNSConfig, PodDNSConfigOption, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(policy: Option<&str>, host_network: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                dns_policy: policy.map(str::to_string),
                host_network: Some(host_network),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn settings() -> DnsSettings {
        DnsSettings {
            cluster_dns: vec!["10.96.0.10".into()],
            cluster_domain: "cluster.local".into(),
            host: ResolvConf::parse(
                "# generated\nnameserver 192.168.1.1\nnameserver 192.168.1.2 ; x\nsearch lan example.com\noptions edns0 timeout:2\n",
            ),
        }
    }

    #[test]
    fn cluster_first_uses_the_cluster_dns_and_namespace_searches() {
        let c = pod_resolv_conf(&pod(None, false), &settings());
        assert_eq!(
            c.render(),
            "search shop.svc.cluster.local svc.cluster.local cluster.local lan example.com\n\
             nameserver 10.96.0.10\n\
             options ndots:5\n"
        );
    }

    #[test]
    fn default_and_host_network_pods_get_the_node_resolver() {
        let s = settings();
        assert_eq!(pod_resolv_conf(&pod(Some("Default"), false), &s), s.host);
        assert_eq!(
            pod_resolv_conf(&pod(Some("ClusterFirst"), true), &s),
            s.host
        );
        let c = pod_resolv_conf(&pod(Some("ClusterFirstWithHostNet"), true), &s);
        assert_eq!(c.nameservers, vec!["10.96.0.10"]);
        let mut no_cluster_dns = settings();
        no_cluster_dns.cluster_dns.clear();
        assert_eq!(pod_resolv_conf(&pod(None, false), &no_cluster_dns), s.host);
    }

    #[test]
    fn policy_none_takes_only_the_pod_dns_config_which_merges_otherwise() {
        let mut p = pod(Some("None"), false);
        let cfg = PodDNSConfig {
            nameservers: Some(vec!["1.1.1.1".into()]),
            searches: Some(vec!["my.dns.search".into()]),
            options: Some(vec![
                PodDNSConfigOption {
                    name: Some("ndots".into()),
                    value: Some("2".into()),
                },
                PodDNSConfigOption {
                    name: Some("edns0".into()),
                    value: None,
                },
            ]),
        };
        p.spec.as_mut().unwrap().dns_config = Some(cfg.clone());
        assert_eq!(
            pod_resolv_conf(&p, &settings()).render(),
            "search my.dns.search\nnameserver 1.1.1.1\noptions ndots:2 edns0\n"
        );
        let mut p = pod(None, false);
        p.spec.as_mut().unwrap().dns_config = Some(cfg);
        let c = pod_resolv_conf(&p, &settings());
        assert_eq!(c.nameservers, vec!["10.96.0.10", "1.1.1.1"]);
        assert_eq!(c.searches.last().unwrap(), "my.dns.search");
        assert_eq!(
            c.options,
            vec!["ndots:2", "edns0"],
            "pod ndots replaces the default"
        );
    }

    #[test]
    fn limits_trim_nameservers_and_searches() {
        let mut s = settings();
        s.host.searches = (0..40).map(|i| format!("d{i}.example")).collect();
        s.cluster_dns = vec!["1.1.1.1".into()];
        let mut p = pod(None, false);
        p.spec.as_mut().unwrap().dns_config = Some(PodDNSConfig {
            nameservers: Some(vec!["2.2.2.2".into(), "3.3.3.3".into(), "4.4.4.4".into()]),
            ..Default::default()
        });
        let c = pod_resolv_conf(&p, &s);
        assert_eq!(c.nameservers.len(), 3);
        assert_eq!(c.searches.len(), 32);
    }

    #[test]
    fn hosts_lists_localhost_the_pod_and_its_aliases() {
        let mut p = pod(None, false);
        let spec = p.spec.as_mut().unwrap();
        spec.hostname = Some("web-0".into());
        spec.subdomain = Some("web".into());
        spec.host_aliases = Some(vec![HostAlias {
            ip: "10.1.2.3".into(),
            hostnames: Some(vec!["foo.local".into(), "bar.local".into()]),
        }]);
        let hosts = hosts_file(&p, &["10.244.1.5".into()], "cluster.local", "");
        assert!(hosts.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"));
        assert!(
            hosts.contains("\n10.244.1.5\tweb-0.web.shop.svc.cluster.local\tweb-0\n"),
            "{hosts}"
        );
        assert!(
            hosts.ends_with("# Entries added by HostAliases.\n10.1.2.3\tfoo.local\tbar.local\n"),
            "{hosts}"
        );
        let plain = hosts_file(
            &pod(None, false),
            &["10.244.1.6".into()],
            "cluster.local",
            "",
        );
        assert!(plain.contains("\n10.244.1.6\tweb\n"));
        let hostnet = hosts_file(
            &pod(None, true),
            &[],
            "cluster.local",
            "127.0.0.1 localhost\n",
        );
        assert_eq!(
            hostnet,
            "# Kubernetes-managed hosts file (host network).\n127.0.0.1 localhost\n"
        );
    }

    #[test]
    fn hostname_is_the_pod_name_cut_to_63_chars_or_the_fqdn_when_asked() {
        let mut p = pod(None, false);
        p.metadata.name = Some(format!("{}-{}", "a".repeat(62), "b"));
        let (h, d) = hostname_and_domain(&p, "cluster.local");
        assert_eq!(h, "a".repeat(62), "cut at 63 then trailing '-' dropped");
        assert_eq!(d, None);
        let mut p = pod(None, false);
        p.spec.as_mut().unwrap().subdomain = Some("svc1".into());
        p.spec.as_mut().unwrap().set_hostname_as_fqdn = Some(true);
        assert_eq!(
            hostname_file(&p, "cluster.local"),
            "web.svc1.shop.svc.cluster.local\n"
        );
        assert_eq!(hostname_file(&pod(None, false), "cluster.local"), "web\n");
    }
}
