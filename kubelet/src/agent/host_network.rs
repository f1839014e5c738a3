//! Pods on the node's network (`hostNetwork: true`): no network namespace of their own and no CNI call. The
//! sandbox holder stays in the kubelet's network namespace, which is the node's; the pod's IPs are the node's;
//! its hostname is the node's name; its container ports are the node's ports.
//!
//! Ref: upstream `kuberuntime_sandbox.go` (`NamespaceMode_NODE` for the network), `kubelet_pods.go`
//! (`podIPs = hostIPs` for host-network pods, `managedHostsFileContent` from the node's `/etc/hosts`) and
//! `dns.go` (`ClusterFirst` falls back to `Default` on the host network, `ClusterFirstWithHostNet` does not).
//! The hosts file and resolv.conf live in [`crate::dns`].

use k8s_openapi::api::core::v1::Pod;

/// Whether the pod runs on the node's network.
pub(crate) fn enabled(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

/// A host-network pod's hostname: the node's (upstream uses the node's host name, which the kubelet's node name
/// defaults to).
pub(crate) fn hostname(node_name: &str) -> String {
    node_name.to_string()
}

/// A host-network pod's IPs: the node's.
pub(crate) fn pod_ips(node_ip: &str) -> Vec<String> {
    vec![node_ip.to_string()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    #[test]
    fn host_network_pods_take_the_nodes_name_and_address() {
        let mut pod = Pod::default();
        assert!(!enabled(&pod));
        pod.spec = Some(PodSpec {
            host_network: Some(true),
            ..Default::default()
        });
        assert!(enabled(&pod));
        assert_eq!(hostname("node-a"), "node-a");
        assert_eq!(pod_ips("10.0.0.5"), vec!["10.0.0.5".to_string()]);
    }
}
