#!/usr/bin/env bash
# Installs, builds and runs a one-node Windlass cluster on this host, then deploys a demo app and reaches it:
#   control plane  windlass-control serve (API server on :6443, embedded store, scheduler, controllers)
#   node           windlass-kubelet (pods through windlass-runtime), windlass-cni daemon (pod network from the
#                  node's podCIDR), windlass-proxy (Services on nftables, cluster DNS on 10.96.0.10)
#   demo app       a Deployment of a busybox httpd image (built here, served from a local registry) behind a
#                  NodePort Service, reached by ClusterIP, by DNS name from a pod and by NodePort from a client.
# The node's network is its own network namespace (`windlass-node`, with a client namespace `windlass-client`
# cabled to it), so nothing changes in the host's routes, links or nftables. kubectl on the host reaches the API
# through a loopback-only forwarder on 127.0.0.1:6443.
#
#   sudo scripts/run.sh          # set up and start (idempotent: stops an earlier run first)
#   sudo scripts/run.sh stop     # stop everything this script started and remove its state
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

STATE=${WINDLASS_DEMO_STATE:-/var/lib/windlass/demo}
NODE_NS=windlass-node
CLIENT_NS=windlass-client
NODE_NAME=windlass-node
NODE_IP=10.250.0.1
CLIENT_IP=10.250.0.2
CGROUP_ROOT=/windlass-demo
REGISTRY=127.0.0.1:${WINDLASS_DEMO_REGISTRY_PORT:-35000}
API_PORT=${WINDLASS_DEMO_API_PORT:-6443}
# WINDLASS_BUILD_PROFILE=debug reuses the test build (faster to build, slower to run).
PROFILE=${WINDLASS_BUILD_PROFILE:-release}
BIN="$REPO/target/$PROFILE"

log() { printf '\n== %s\n' "$*"; }
in_node() { ip netns exec "$NODE_NS" "$@"; }
# Daemons join only the node's network namespace, not a private mount namespace as `ip netns exec` gives: the
# kubelet's mounts (pod network namespace pins, root filesystems) must be the host's, as a real kubelet's are.
# Called with `&` only: `exec` makes the background job's PID ($!) the daemon's own, for the pid files.
in_node_net() { exec nsenter --net="/run/netns/$NODE_NS" "$@"; }

stop() {
  log "stopping an earlier run (if any)"
  # Pods first, through the cluster itself while it runs (the kubelet stops them within their grace period).
  if [ -f "$STATE/kubelet.pid" ] && kill -0 "$(cat "$STATE/kubelet.pid")" 2>/dev/null; then
    KUBECONFIG="$STATE/control/admin.kubeconfig" timeout 60 ip netns exec "$NODE_NS" kubectl delete \
      deployments,replicasets,pods --all --all-namespaces --wait=true >/dev/null 2>&1 || true
  fi
  for name in kubelet proxy cni-daemon forwarder control registry; do
    [ -f "$STATE/$name.pid" ] || continue
    pid=$(cat "$STATE/$name.pid")
    kill "$pid" 2>/dev/null || continue
    # SIGTERM, then SIGKILL after 10 s.
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -f "$STATE"/*.pid
  # Whatever is left of pods (the cluster was gone or too slow): every process in the node's cgroups.
  for _ in 1 2 3; do
    cat /sys/fs/cgroup/*/"${CGROUP_ROOT#/}"/cgroup.procs /sys/fs/cgroup/*/"${CGROUP_ROOT#/}"/**/cgroup.procs \
      2>/dev/null | sort -u | xargs -r kill -9 2>/dev/null || true
    find /sys/fs/cgroup/*/"${CGROUP_ROOT#/}" -name cgroup.procs -exec cat {} + 2>/dev/null \
      | sort -u | xargs -r kill -9 2>/dev/null || true
    sleep 0.2
  done
  # Mounts the kubelet made below its root (pod volumes, root filesystems, network namespace pins).
  if [ -d "$STATE" ]; then
    awk -v p="$STATE/" 'index($2, p) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
  fi
  ip netns delete "$CLIENT_NS" 2>/dev/null || true
  ip netns delete "$NODE_NS" 2>/dev/null || true
  for hier in /sys/fs/cgroup/*/; do
    if [ -d "$hier${CGROUP_ROOT#/}" ]; then
      find "$hier${CGROUP_ROOT#/}" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    fi
  done
}

if [ "${1:-}" = "stop" ]; then
  stop
  rm -rf "$STATE"
  echo "stopped"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "run.sh: run as root (sudo scripts/run.sh)" >&2; exit 1; }
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi

log "installing packages"
scripts/install-deps.sh

log "building ($PROFILE)"
if [ "$PROFILE" = release ]; then build_flags=(--release); else build_flags=(); fi
cargo build "${build_flags[@]}" --locked -p windlass-control -p windlass-runtime -p windlass-cni \
  -p windlass-kubelet -p windlass-proxy --bins

stop
rm -rf "$STATE"
mkdir -p "$STATE"

log "node network namespace $NODE_NS ($NODE_IP) and a client namespace $CLIENT_NS ($CLIENT_IP)"
ip netns add "$NODE_NS"
ip netns add "$CLIENT_NS"
ip -n "$NODE_NS" link set lo up
ip -n "$CLIENT_NS" link set lo up
ip -n "$NODE_NS" link add eth0 type veth peer name eth0 netns "$CLIENT_NS"
ip -n "$NODE_NS" addr add "$NODE_IP/24" dev eth0
ip -n "$CLIENT_NS" addr add "$CLIENT_IP/24" dev eth0
ip -n "$NODE_NS" link set eth0 up
ip -n "$CLIENT_NS" link set eth0 up
# The node's default route points at the client side, so pods have a way "out" (to nothing beyond it).
ip -n "$NODE_NS" route add default via "$CLIENT_IP"

log "control plane: windlass-control serve (embedded store, scheduler, controllers)"
in_node_net "$BIN/windlass-control" serve --data-dir "$STATE/control" --bind-address 0.0.0.0 \
  --secure-port "$API_PORT" --tls-san "$NODE_IP" --audit-log-path "$STATE/control/audit.log" \
  >"$STATE/control.log" 2>&1 &
echo $! > "$STATE/control.pid"
export KUBECONFIG="$STATE/control/admin.kubeconfig"
for _ in $(seq 1 150); do
  if [ -f "$KUBECONFIG" ] && in_node kubectl get --raw /readyz >/dev/null 2>&1; then break; fi
  sleep 0.2
done
in_node kubectl get --raw /readyz >/dev/null
# kubectl on the host: 127.0.0.1:$API_PORT is forwarded into the node namespace (loopback only).
socat "TCP-LISTEN:$API_PORT,bind=127.0.0.1,reuseaddr,fork" \
  "EXEC:ip netns exec $NODE_NS socat STDIO TCP\:127.0.0.1\:$API_PORT" >"$STATE/forwarder.log" 2>&1 &
echo $! > "$STATE/forwarder.pid"
for _ in $(seq 1 50); do kubectl get --raw /readyz >/dev/null 2>&1 && break; sleep 0.1; done
kubectl version
in_node "$BIN/windlass-control" issue-kubeconfig --data-dir "$STATE/control" --user "system:node:$NODE_NAME" \
  --group system:nodes --server "https://127.0.0.1:$API_PORT" --out "$STATE/kubelet.kubeconfig" \
  2>/dev/null || cp "$KUBECONFIG" "$STATE/kubelet.kubeconfig"

log "the demo image (busybox httpd from busybox-static) in a registry on the node's $REGISTRY"
work="$STATE/image-build"
mkdir -p "$work"
umoci init --layout "$work/layout"
umoci new --image "$work/layout:httpd"
umoci unpack --image "$work/layout:httpd" "$work/bundle" >/dev/null
mkdir -p "$work/bundle/rootfs/bin" "$work/bundle/rootfs/www"
cp /bin/busybox "$work/bundle/rootfs/bin/"
for applet in sh httpd hostname cat ls wget nslookup; do ln -sf busybox "$work/bundle/rootfs/bin/$applet"; done
echo "hello from a Windlass pod" > "$work/bundle/rootfs/www/index.html"
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
in_node_net docker-registry serve "$STATE/registry.yml" >"$STATE/registry.log" 2>&1 &
echo $! > "$STATE/registry.pid"
for _ in $(seq 1 100); do in_node curl -fsS "http://$REGISTRY/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
in_node skopeo copy --dest-tls-verify=false "oci:$work/layout:httpd" "docker://$REGISTRY/demo/httpd:v1"

log "node: windlass-cni daemon, windlass-proxy, windlass-kubelet"
mkdir -p "$STATE/cni/net.d"
in_node_net "$BIN/windlass-cni" daemon --kubeconfig "$KUBECONFIG" --node-name "$NODE_NAME" \
  --cni-conf-dir "$STATE/cni/net.d" --data-dir "$STATE/cni/data" >"$STATE/cni-daemon.log" 2>&1 &
echo $! > "$STATE/cni-daemon.pid"
in_node_net "$BIN/windlass-proxy" --kubeconfig "$KUBECONFIG" --node-name "$NODE_NAME" \
  --dns-bind-address 10.96.0.10:53 --healthz-bind-address 127.0.0.1:10256 >"$STATE/proxy.log" 2>&1 &
echo $! > "$STATE/proxy.pid"
in_node_net "$BIN/windlass-kubelet" --kubeconfig "$STATE/kubelet.kubeconfig" --node-name "$NODE_NAME" \
  --node-ip "$NODE_IP" --root-dir "$STATE/kubelet" --cgroup-root "$CGROUP_ROOT" \
  --cni-bin-dir "$BIN:/usr/lib/cni" --cni-conf-dir "$STATE/cni/net.d" --insecure-registry "$REGISTRY" \
  --runtime-binary "$BIN/windlass-runtime" --client-ca-file "$STATE/control/pki/ca.crt" \
  >"$STATE/kubelet.log" 2>&1 &
echo $! > "$STATE/kubelet.pid"
kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=120s
kubectl get nodes -o wide

log "demo app: a Deployment of 2 httpd pods behind a NodePort Service"
kubectl apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: hello
spec:
  replicas: 2
  selector:
    matchLabels: {app: hello}
  template:
    metadata:
      labels: {app: hello}
    spec:
      containers:
      - name: httpd
        image: $REGISTRY/demo/httpd:v1
        ports: [{containerPort: 8080, name: http}]
        readinessProbe:
          httpGet: {path: /, port: http}
          periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: hello
spec:
  type: NodePort
  selector: {app: hello}
  ports:
  - port: 80
    targetPort: http
    nodePort: 30080
EOF
kubectl rollout status deployment/hello --timeout=180s
kubectl get pods -o wide
kubectl get svc hello

cluster_ip=$(kubectl get svc hello -o jsonpath='{.spec.clusterIP}')
retry() { for _ in $(seq 1 50); do if out=$("$@" 2>/dev/null); then echo "$out"; return 0; fi; sleep 0.2; done; "$@"; }
log "reaching the demo app"
echo "by ClusterIP from the node:   $(retry in_node busybox wget -q -O - "http://$cluster_ip/")"
echo "by NodePort from the client:  $(retry ip netns exec "$CLIENT_NS" busybox wget -q -O - "http://$NODE_IP:30080/")"
pod=$(kubectl get pods -l app=hello -o jsonpath='{.items[0].metadata.name}')
echo "by DNS name from a pod:       $(retry kubectl exec "$pod" -- wget -q -O - http://hello.default.svc.cluster.local/)"

cat <<EOF

Windlass is running (state and logs in $STATE):
  kubectl        export KUBECONFIG=$KUBECONFIG; kubectl get pods -o wide
  demo app       sudo ip netns exec $CLIENT_NS busybox wget -q -O - http://$NODE_IP:30080/
  logs / exec    kubectl logs deploy/hello; kubectl exec -it deploy/hello -- sh
  stop           sudo scripts/run.sh stop
EOF
