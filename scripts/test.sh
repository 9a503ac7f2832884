#!/usr/bin/env bash
# The test command: installs what a fresh bookworm machine lacks (build packages,
# CRIU >= 4.2), checks formatting and lints, builds, and runs every test — unit tests,
# golden files, and the end-to-end suite against real registries and a real CRIU.
# Needs root (CRIU, and a tmpfs for the full-disk test).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-build-deps.sh
# After the build dependencies: env.sh puts ccache in front of the C/C++ compilers.
. scripts/env.sh
SNAPCTL_CRIU="$(deploy/install-criu.sh | tail -n 1)"
export SNAPCTL_CRIU
echo "using CRIU at $SNAPCTL_CRIU" >&2

# The S3-compatible server the e2e tests run the registry against (tests/tests/e2e/s3.rs).
# 0.14.1: later releases need a newer rustc than the toolchain here. Built in a
# throw-away target dir, kept under ~/.cache/snapreg/tools so CI runs reuse it.
S3S_FS_VERSION=0.14.1
SNAPREG_S3S_FS="${HOME:-/root}/.cache/snapreg/tools/bin/s3s-fs"
if ! "$SNAPREG_S3S_FS" --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
    s3s_target="$(mktemp -d)"
    CARGO_TARGET_DIR="$s3s_target" cargo install --locked --force "s3s-fs@$S3S_FS_VERSION" \
        --features binary --root "$(dirname "$(dirname "$SNAPREG_S3S_FS")")"
    rm -rf "$s3s_target"
fi
export SNAPREG_S3S_FS
echo "using s3s-fs at $SNAPREG_S3S_FS" >&2

cargo fmt --all --check
python3 scripts/check-imports.py proto/src registry/src client/src oci/src cli/src weights/src telemetry/src
cargo clippy --workspace --all-targets --locked -- -D warnings
# --all-targets: the same feature set as clippy and test, so RocksDB is compiled once
# (a --bins build unifies features differently and rebuilt it: 15 minutes cold).
cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads=2

# deploy/: Kubernetes manifests rendered and validated, the architecture picture
# rendered, systemd units verified, container images built without a registry pull
# and the registry image smoke-tested under podman.
scripts/check-deploy.sh

# Fuzzing: a short bounded run of every target in fuzz/ (cargo-fuzz on nightly, its
# own target dir under ~/.cache), seeded from fuzz/corpus/<target>; new inputs go to a
# scratch dir, never into the repo. Prints executions per target (docs/FAULTS.md).
scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
