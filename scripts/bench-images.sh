#!/usr/bin/env bash
# Pull + unpack of one multi-layer image from a local registry: Windlass vs `skopeo copy` + `umoci unpack`
# (vs `podman pull` into its own overlay storage when podman works here), interleaved in one run.
#
# Usage: scripts/bench-images.sh [RUNS] [OUT.md]     (default 10 runs, a file given as OUT; results are in BENCHMARKS.md)
#        BENCH_TMPFS=1 puts every tool's store on a tmpfs: on a shared, busy disk the writeback of other
#        processes dominates (and fsync makes whoever calls it pay for it); tmpfs measures the pull pipeline.
#        WINDLASS_FLAGS adds flags to `windlass-runtime image pull` (e.g. `--max-concurrent-layers 1`).
# Needs root, docker-registry, skopeo, umoci, busybox-static (podman optional); builds windlass in release mode.
# Everything lives in a temp dir; the registry listens on 127.0.0.1 only and is killed on exit.
set -euo pipefail

RUNS=${1:-10}
OUT=${2:-bench-images.md}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/windlass-bench-images.XXXXXX)
REG_PID=""
cleanup() {
    set +e  # clean up everything even when a step fails (a killed registry's `wait` returns non-zero)
    if [ -n "$REG_PID" ]; then kill "$REG_PID" 2>/dev/null; wait "$REG_PID" 2>/dev/null; fi
    # podman's overlay storage may leave mounts; unmount before removing.
    grep " $WORK/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

STORES="$WORK"
if [ "${BENCH_TMPFS:-0}" = 1 ]; then
    STORES="$WORK/tmpfs"; mkdir -p "$STORES"; mount -t tmpfs -o size=4g windlass-bench "$STORES"
fi

for tool in docker-registry skopeo umoci; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

echo "building windlass-runtime (release)..." >&2
(cd "$ROOT" && cargo build --release -q -p windlass-runtime)
WINDLASS="$ROOT/target/release/windlass-runtime"

# --- the image: 5 layers, ~60 MB unpacked, a mix of one big incompressible file, many small files and a whiteout.
L="$WORK/layout"
umoci init --layout "$L" >/dev/null
umoci new --image "$L:img" >/dev/null
B="$WORK/bundle"
# umoci repack diffs against the manifest the bundle was unpacked from, so unpack afresh for every layer.
layer() { # layer SHELL-SNIPPET: run it in the rootfs, repack as one more layer
    umoci unpack --image "$L:img" "$B" >/dev/null
    (cd "$B/rootfs" && eval "$1")
    umoci repack --image "$L:img" "$B" >/dev/null
    rm -rf "$B"
}
layer 'mkdir -p bin etc && cp /bin/busybox bin/ && for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "bin/$a"; done'
layer 'mkdir -p data/blob && head -c 24M /dev/urandom > data/blob/random.bin'
layer 'for d in $(seq 1 40); do mkdir -p data/small/$d; for f in $(seq 1 100); do printf "file %s/%s %0200d\n" $d $f 0 > data/small/$d/$f.txt; done; done'
layer 'mkdir -p usr/share usr/lib && cp -a /usr/share/zoneinfo usr/share/ && cp -aL /usr/lib/x86_64-linux-gnu/libc.so.6 usr/lib/ 2>/dev/null || true'
layer 'rm -rf data/small/1 data/blob/random.bin'
umoci config --image "$L:img" --clear=config.entrypoint --config.cmd /bin/sh --architecture amd64 --os linux >/dev/null
rm -rf "$B"

# --- the registry
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ADDR="127.0.0.1:$PORT"
cat > "$WORK/registry.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/registry
http:
  addr: $ADDR
YML
docker-registry serve "$WORK/registry.yml" > "$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
skopeo copy --quiet --dest-tls-verify=false "oci:$L:img" "docker://$ADDR/bench/img:v1"
REF="$ADDR/bench/img:v1"
LAYERS=$(skopeo inspect --tls-verify=false "docker://$REF" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["Layers"]))')
SIZE=$(du -sb "$WORK/registry" | cut -f1)

# --- podman, if it works here (own storage and config; never its default network)
PODMAN=0
PODMAN_NOTE="did not work here"
if [ "$STORES" != "$WORK" ]; then
    PODMAN_NOTE="skipped: its overlay storage hangs on tmpfs here"
    echo "podman: $PODMAN_NOTE" >&2
elif command -v podman >/dev/null; then
    mkdir -p "$WORK/podman"
    cat > "$WORK/podman/containers.conf" <<CONF
[engine]
runtime="runc"
cgroup_manager="cgroupfs"
events_logger="file"
[containers]
netns="none"
CONF
    export CONTAINERS_CONF="$WORK/podman/containers.conf"
    podman_pull() {
        timeout 300 podman --root "$1/root" --runroot "$1/run" --storage-driver overlay \
            pull --quiet --tls-verify=false "$REF" >/dev/null 2>"$WORK/podman.err"
    }
    if podman_pull "$WORK/podman/probe"; then PODMAN=1; else echo "podman pull failed; skipping it: $(tail -1 "$WORK/podman.err")" >&2; fi
    podman --root "$WORK/podman/probe/root" --runroot "$WORK/podman/probe/run" --storage-driver overlay system reset -f >/dev/null 2>&1 || true
fi

ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
# Dirty pages from the previous run (and other work on the machine) make whoever fsyncs next pay for them:
# flush before every timed command, and rotate which tool goes first.
settle() { sync; sleep 0.3; }
declare -a T_W T_S T_P
run_windlass() {
    settle; local t; t=$(date +%s%N)
    # shellcheck disable=SC2086 # WINDLASS_FLAGS is a list of extra pull flags
    "$WINDLASS" image pull --store "$1/windlass" --insecure-registry "$ADDR" ${WINDLASS_FLAGS:-} "$REF" >/dev/null 2>"$1/windlass.err"
    T_W+=("$(ms "$t")")
}
run_skopeo() {
    settle; local t; t=$(date +%s%N)
    skopeo copy --quiet --src-tls-verify=false "docker://$REF" "oci:$1/skopeo:img"
    umoci unpack --image "$1/skopeo:img" "$1/bundle" >/dev/null
    T_S+=("$(ms "$t")")
}
run_podman() {
    [ "$PODMAN" = 1 ] || return 0
    settle; local t; t=$(date +%s%N)
    podman_pull "$1/podman"
    T_P+=("$(ms "$t")")
    podman --root "$1/podman/root" --runroot "$1/podman/run" --storage-driver overlay system reset -f >/dev/null 2>&1 || true
}
for i in $(seq 1 "$RUNS"); do
    d="$STORES/run$i"; mkdir -p "$d"
    case $((i % 3)) in
        1) run_windlass "$d"; run_skopeo "$d"; run_podman "$d" ;;
        2) run_skopeo "$d"; run_podman "$d"; run_windlass "$d" ;;
        0) run_podman "$d"; run_windlass "$d"; run_skopeo "$d" ;;
    esac
    if [ "$i" = 1 ]; then
        n_w=$(find "$d/windlass/layers" -mindepth 1 -not -type c | wc -l)
        n_u=$(find "$d/bundle/rootfs" -mindepth 1 | wc -l)
        echo "entries: windlass layer dirs $n_w (all layers, unmerged), umoci rootfs $n_u (merged)" >&2
    fi
    rm -rf "$d"
    echo "run $i: windlass ${T_W[-1]} ms, skopeo+umoci ${T_S[-1]} ms${T_P:+, podman ${T_P[-1]:-} ms}" >&2
done

stats() { # prints "median min max"
    printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; print m, a[1], a[NR]}'
}
read -r W_MED W_MIN W_MAX <<<"$(stats "${T_W[@]}")"
read -r S_MED S_MIN S_MAX <<<"$(stats "${T_S[@]}")"
RATIO=$(awk -v a="$S_MED" -v b="$W_MED" 'BEGIN {printf "%.2f", a/b}')
{
    echo "## Images: pull + unpack of a ${LAYERS}-layer image from a local registry"
    echo
    echo "\`BENCH_TMPFS=${BENCH_TMPFS:-0} scripts/bench-images.sh $RUNS\` on $(date -u +%Y-%m-%d), $(nproc) cores (shared), kernel $(uname -r);"
    if [ "$STORES" = "$WORK" ]; then echo "stores on the ext4 disk."; else echo "stores on tmpfs."; fi
    echo "Image: busybox, 24 MB random file, 4000 small files, zoneinfo + libc, a whiteout layer;"
    echo "$((SIZE / 1024 / 1024)) MB in the registry (gzip). Registry: Debian docker-registry on 127.0.0.1 (plain HTTP)."
    echo "Each run starts from an empty store; tools interleaved (order rotated) per run, \`sync\` before each; wall-clock ms."
    echo
    echo "| tool | median | min | max | vs windlass |"
    echo "|---|---:|---:|---:|---:|"
    echo "| windlass \`image pull\` (release) | $W_MED | $W_MIN | $W_MAX | 1.00 |"
    echo "| \`skopeo copy\` + \`umoci unpack\` | $S_MED | $S_MIN | $S_MAX | $RATIO |"
    if [ "$PODMAN" = 1 ]; then
        read -r P_MED P_MIN P_MAX <<<"$(stats "${T_P[@]}")"
        echo "| \`podman pull\` (overlay, own storage) | $P_MED | $P_MIN | $P_MAX | $(awk -v a="$P_MED" -v b="$W_MED" 'BEGIN {printf "%.2f", a/b}') |"
    else
        echo "| \`podman pull\` | n/a ($PODMAN_NOTE) | | | |"
    fi
    echo
    echo "Ratio = peer median / windlass median (> 1: windlass is faster). Windlass downloads and unpacks layers"
    echo "concurrently (3 at a time) into per-layer directories (overlay form, no merge); umoci applies layers one"
    echo "after another into one merged rootfs; podman applies them into its overlay layer store."
} > "$OUT"
cat "$OUT"
