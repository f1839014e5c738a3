#!/usr/bin/env bash
# Installs, builds and runs Windlass on this host, as far as it is built today:
#   1. the control plane: `windlass-control serve` (HTTPS API on 127.0.0.1:6443, embedded store), used by kubectl;
#   2. a demo app: a busybox httpd image built here, pushed to a local registry on loopback, pulled by
#      `windlass-runtime image pull`, given a pod network by `windlass-cni` and run by `windlass-runtime`.
# The demo node's network lives in its own network namespace (`windlass-node`), so this script changes nothing in
# the host's own routes, links or nftables. The kubelet that will tie 1 and 2 together is not wired yet.
#
#   sudo scripts/run.sh          # set up and start (idempotent: stops an earlier demo first)
#   sudo scripts/run.sh stop     # stop everything this script started and remove its state
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

STATE=${WINDLASS_DEMO_STATE:-/var/lib/windlass/demo}
RUNTIME_ROOT=${WINDLASS_DEMO_RUNTIME_ROOT:-/run/windlass/demo-runtime}
NODE_NS=windlass-node
POD_NS=windlass-demo-pod
POD_ID=demo-httpd
REGISTRY=127.0.0.1:${WINDLASS_DEMO_REGISTRY_PORT:-35000}
API_PORT=${WINDLASS_DEMO_API_PORT:-6443}
POD_SUBNET=10.244.0.0/24
# WINDLASS_BUILD_PROFILE=debug reuses the test build (faster to build, slower to run).
PROFILE=${WINDLASS_BUILD_PROFILE:-release}
BIN="$REPO/target/$PROFILE"

log() { printf '\n== %s\n' "$*"; }

stop() {
  log "stopping an earlier demo (if any)"
  # Stop with whichever build started it.
  local BIN=$BIN
  for dir in "$BIN" "$REPO/target/release" "$REPO/target/debug"; do
    if [ -x "$dir/windlass-runtime" ]; then BIN=$dir; break; fi
  done
  if [ -x "$BIN/windlass-runtime" ]; then
    "$BIN/windlass-runtime" --root "$RUNTIME_ROOT" delete --force "$POD_ID" 2>/dev/null || true
    "$BIN/windlass-runtime" image --store "$STATE/images" unbundle "$POD_ID" "$STATE/bundle" 2>/dev/null || true
  fi
  if [ -x "$BIN/windlass-cni" ] && [ -e "/run/netns/$POD_NS" ]; then
    ip netns exec "$NODE_NS" env CNI_COMMAND=DEL CNI_CONTAINERID="$POD_ID" CNI_NETNS="/run/netns/$POD_NS" \
      CNI_IFNAME=eth0 CNI_PATH="$BIN" "$BIN/windlass-cni" < "$STATE/cni.json" >/dev/null 2>&1 || true
  fi
  for pidfile in "$STATE/control.pid" "$STATE/registry.pid"; do
    if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; fi
  done
  ip netns delete "$POD_NS" 2>/dev/null || true
  ip netns delete "$NODE_NS" 2>/dev/null || true
}

if [ "${1:-}" = "stop" ]; then
  stop
  rm -rf "$STATE" "$RUNTIME_ROOT"
  echo "stopped"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "run.sh: run as root (sudo scripts/run.sh)" >&2; exit 1; }
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi

log "installing packages"
scripts/install-deps.sh

log "building ($PROFILE)"
if [ "$PROFILE" = release ]; then build_flags=(--release); else build_flags=(); fi
cargo build "${build_flags[@]}" --locked -p windlass-control -p windlass-runtime -p windlass-cni --bins

stop
mkdir -p "$STATE" "$RUNTIME_ROOT"

log "starting the control plane (windlass-control serve, embedded store)"
"$BIN/windlass-control" serve --data-dir "$STATE/control" --bind-address 127.0.0.1 --secure-port "$API_PORT" \
  --audit-log-path "$STATE/control/audit.log" >"$STATE/control.log" 2>&1 &
echo $! > "$STATE/control.pid"
export KUBECONFIG="$STATE/control/admin.kubeconfig"
for _ in $(seq 1 100); do
  if [ -f "$KUBECONFIG" ] && kubectl get namespaces >/dev/null 2>&1; then break; fi
  sleep 0.2
done
kubectl version
kubectl get namespaces

log "building the demo image from busybox-static and serving it from a local registry on $REGISTRY"
work="$STATE/image-build"
rm -rf "$work"; mkdir -p "$work"
umoci init --layout "$work/layout"
umoci new --image "$work/layout:httpd"
umoci unpack --image "$work/layout:httpd" "$work/bundle" >/dev/null
mkdir -p "$work/bundle/rootfs/bin" "$work/bundle/rootfs/www"
cp /bin/busybox "$work/bundle/rootfs/bin/"
for applet in sh httpd hostname cat ls wget; do ln -sf busybox "$work/bundle/rootfs/bin/$applet"; done
echo "hello from a Windlass container" > "$work/bundle/rootfs/www/index.html"
umoci repack --image "$work/layout:httpd" "$work/bundle"
umoci config --image "$work/layout:httpd" --clear=config.entrypoint --config.entrypoint /bin/httpd \
  --config.cmd -f --config.cmd -p --config.cmd 8080 --config.cmd -h --config.cmd /www \
  --config.env PATH=/bin --architecture amd64 --os linux
cat > "$STATE/registry.yml" <<EOF
version: 0.1
storage:
  filesystem:
    rootdirectory: $STATE/registry
http:
  addr: $REGISTRY
EOF
docker-registry serve "$STATE/registry.yml" >"$STATE/registry.log" 2>&1 &
echo $! > "$STATE/registry.pid"
for _ in $(seq 1 100); do curl -fsS "http://$REGISTRY/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
skopeo copy --dest-tls-verify=false "oci:$work/layout:httpd" "docker://$REGISTRY/demo/httpd:v1"

log "pulling it with windlass-runtime"
"$BIN/windlass-runtime" image --store "$STATE/images" pull --insecure-registry "$REGISTRY" "$REGISTRY/demo/httpd:v1"
"$BIN/windlass-runtime" image --store "$STATE/images" list

log "pod network: node namespace $NODE_NS, pod namespace $POD_NS, windlass-cni ADD"
ip netns add "$NODE_NS"; ip -n "$NODE_NS" link set lo up
ip netns add "$POD_NS"
cat > "$STATE/cni.json" <<EOF
{"cniVersion":"1.0.0","name":"windlass","type":"windlass-cni","bridge":"windlass0","subnet":"$POD_SUBNET","dataDir":"$STATE/cni"}
EOF
result=$(ip netns exec "$NODE_NS" env CNI_COMMAND=ADD CNI_CONTAINERID="$POD_ID" CNI_NETNS="/run/netns/$POD_NS" \
  CNI_IFNAME=eth0 CNI_PATH="$BIN" "$BIN/windlass-cni" < "$STATE/cni.json")
pod_ip=$(echo "$result" | jq -r '.ips[0].address' | cut -d/ -f1)
echo "pod IP: $pod_ip"

log "running the demo container with windlass-runtime"
"$BIN/windlass-runtime" image --store "$STATE/images" bundle --netns "/run/netns/$POD_NS" --hostname "$POD_ID" \
  "$REGISTRY/demo/httpd:v1" "$POD_ID" "$STATE/bundle"
"$BIN/windlass-runtime" --root "$RUNTIME_ROOT" run --detach --bundle "$STATE/bundle" "$POD_ID" \
  </dev/null >"$STATE/container.log" 2>&1
"$BIN/windlass-runtime" --root "$RUNTIME_ROOT" list

log "reaching the demo app from the node: http://$pod_ip:8080/"
for _ in $(seq 1 50); do
  if out=$(ip netns exec "$NODE_NS" busybox wget -q -O - "http://$pod_ip:8080/" 2>/dev/null); then break; fi
  sleep 0.1
done
echo "${out:?the demo app did not answer}"

cat <<EOF

Windlass is running:
  API server   KUBECONFIG=$KUBECONFIG kubectl get namespaces
  demo app     sudo ip netns exec $NODE_NS busybox wget -q -O - http://$pod_ip:8080/
  container    sudo $BIN/windlass-runtime --root $RUNTIME_ROOT list
  stop         sudo scripts/run.sh stop
EOF
