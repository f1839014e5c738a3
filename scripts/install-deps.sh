#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages Windlass's build, demo and tests need. Idempotent; needs root.
set -euo pipefail

PACKAGES=(
  # build (make: jemalloc, the API server's allocator, builds with it; libprotobuf-dev: the well-known .proto
  # files etcd-client's protos import, only a Recommends of protobuf-compiler)
  protobuf-compiler libprotobuf-dev pkg-config gcc make
  # runtime tests and peers
  busybox-static runc crun umoci skopeo docker-registry podman openssl
  # networking tests and peers
  iproute2 nftables iptables conntrack containernetworking-plugins
  # control plane peers
  etcd-server etcd-client
  # tooling
  jq hyperfine psmisc procps util-linux ca-certificates curl
  # demo (scripts/run.sh): a loopback-only forwarder to the API server in the node namespace
  socat
)

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (apt-get needs it)" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's docker-registry package starts a registry service on :5000 with htpasswd; tests run their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl stop docker-registry || true
fi
echo "install-deps: done"
