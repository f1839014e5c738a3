#!/usr/bin/env bash
# Memory of one `windlass-control serve` (embedded store, no controllers) holding N pods: RSS and peak (VmHWM)
# after N creates (curl, HTTP/2, 64 in flight, generateName), after one full list of all pods, after three more
# full lists, and 5 s later. Two binaries can be compared the same way (e.g. main's and a branch's):
#
# Usage: scripts/api-rss.sh BINARY [N] [PORT]     (default 10000 pods, port 27443)
# Needs curl and jq. Everything lives in a temp dir, removed on exit; the server listens on 127.0.0.1 only.
set -euo pipefail

BIN=${1:?usage: api-rss.sh BINARY [N] [PORT]}
N=${2:-10000}
PORT=${3:-27443}
D=$(mktemp -d /tmp/windlass-api-rss.XXXXXX)
PID=""
cleanup() {
    set +e
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; fi
    rm -rf "$D"
}
trap cleanup EXIT

"$BIN" serve --bind-address 127.0.0.1 --secure-port "$PORT" --data-dir "$D" --controllers=-scheduler ${SERVER_ARGS:-} \
    >"$D/server.log" 2>&1 &
PID=$!
TLS=(--cacert "$D/pki/ca.crt" --cert "$D/pki/admin.crt" --key "$D/pki/admin.key" -s)
URL=https://127.0.0.1:$PORT
for _ in $(seq 100); do
    if [ -f "$D/admin.kubeconfig" ] && curl "${TLS[@]}" -o /dev/null "$URL/healthz"; then break; fi
    sleep 0.3
done
curl "${TLS[@]}" -o /dev/null -X POST -H 'Content-Type: application/json' \
    -d '{"metadata":{"name":"bench"}}' "$URL/api/v1/namespaces"
# No controllers run, so the ServiceAccount admission plugin's `default` account is made here.
curl "${TLS[@]}" -o /dev/null -X POST -H 'Content-Type: application/json' \
    -d '{"metadata":{"name":"default"}}' "$URL/api/v1/namespaces/bench/serviceaccounts"
cat >"$D/pod.json" <<'EOF'
{"apiVersion":"v1","kind":"Pod","metadata":{"generateName":"pod-","labels":{"app":"bench","tier":"web"},"annotations":{"bench.windlass.io/note":"a realistic annotation of some length"}},"spec":{"containers":[{"name":"web","image":"registry.example:5000/web:1.2.3","args":["--port=8080","--verbose"],"ports":[{"name":"http","containerPort":8080}],"env":[{"name":"MODE","value":"production"}],"resources":{"requests":{"cpu":"100m","memory":"64Mi"},"limits":{"memory":"128Mi"}},"readinessProbe":{"httpGet":{"path":"/healthz","port":8080}}}]}}
EOF
for _ in $(seq "$N"); do
    printf 'url = %s/api/v1/namespaces/bench/pods\noutput = /dev/null\n' "$URL"
done >"$D/curl.cfg"
rss() { echo "$1: $(grep -E 'VmRSS|VmHWM' "/proc/$PID/status" | tr -s ' \t\n' ' ')"; }

rss "started"
# Server CPU (user + system, clock ticks) from /proc/PID/stat fields 14 and 15; the comm field has no spaces here.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
CPU0=$(cpu_ticks)
if [ -n "${PERF_OUT:-}" ]; then perf record -F 999 -g -p "$PID" -o "$PERF_OUT" 2>/dev/null & PERF=$!; fi
T0=$(date +%s.%N)
curl "${TLS[@]}" --parallel --parallel-max 64 --no-progress-meter -X POST -H 'Content-Type: application/json' \
    --data-binary @"$D/pod.json" -K "$D/curl.cfg"
T1=$(date +%s.%N)
CPU1=$(cpu_ticks)
echo "creates/s: $(echo "$N / ($T1 - $T0)" | bc -l | cut -c1-7)"
echo "server CPU per create: $(echo "($CPU1 - $CPU0) * 1000000 / $(getconf CLK_TCK) / $N" | bc) µs"
rss "after $N creates"
if [ -n "${PERF_OUT:-}" ]; then kill -INT "$PERF"; wait "$PERF" || true; fi
T0=$(date +%s.%N)
curl "${TLS[@]}" "$URL/api/v1/namespaces/bench/pods" -o "$D/list.json"
T1=$(date +%s.%N)
echo "full list: $(stat -c %s "$D/list.json") bytes, $(jq '.items|length' "$D/list.json") items, $(echo "$T1 - $T0" | bc -l | cut -c1-5) s"
rm -f "$D/list.json"
rss "after one full list"
for _ in 1 2 3; do curl "${TLS[@]}" -o /dev/null "$URL/api/v1/namespaces/bench/pods"; done
rss "after three more full lists"
sleep 5
rss "5 s later"
