#!/usr/bin/env bash
# Runs every Windlass check and test, privileged tests included, as CI does: formatting, clippy, then the whole
# test suite with WINDLASS_REQUIRE_PRIVILEGED=1 (a privileged test that cannot run fails instead of skipping).
# Needs root on a Debian/Ubuntu host with a Rust toolchain; installs the packages it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
scripts/install-deps.sh

export WINDLASS_REQUIRE_PRIVILEGED=1
export CARGO_TERM_COLOR=never
# 2-core CI: keep test threads modest, privileged tests spawn processes and namespaces of their own.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"
# A clean clone gains nothing from incremental caches, and they would more than double the target directory
# (CI machines have run out of disk with them).
export CARGO_INCREMENTAL=0

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (binaries the end-to-end tests start, and the tests, with the same features as cargo test)"
# --tests makes this build resolve features exactly as `cargo test --workspace` does, so the test step reuses
# every artifact instead of compiling tokio, kube and our crates a second time with dev-dependency features.
cargo build --workspace --bins --tests --locked
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast
echo "== control-plane suites again, on the etcd backend (each API server gets its own etcd member)"
# --workspace (not -p windlass-tests) keeps the features, and so the build, of the step above.
WINDLASS_TEST_STORE=etcd cargo test --workspace --locked --no-fail-fast \
  --test control_kubectl --test control_kube_client --test control_rbac --test control_watch --test control_sa_tokens --test control_events --test control_controllers_apps --test control_server_side_apply
