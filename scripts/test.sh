#!/usr/bin/env bash
# The test command: installs what a fresh bookworm machine lacks (build packages,
# CRIU >= 4.2), checks formatting and lints, builds, and runs every test — unit tests,
# golden files, and the end-to-end suite against real registries and a real CRIU.
# Needs root (CRIU, and a tmpfs for the full-disk test).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

deploy/install-build-deps.sh
SNAPCTL_CRIU="$(deploy/install-criu.sh | tail -n 1)"
export SNAPCTL_CRIU
echo "using CRIU at $SNAPCTL_CRIU" >&2

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# --all-targets: the same feature set as clippy and test, so RocksDB is compiled once
# (a --bins build unifies features differently and rebuilt it: 15 minutes cold).
cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads=2

# Fuzzing: a short bounded run of every target in fuzz/ (cargo-fuzz on nightly, its
# own target dir under ~/.cache), seeded from fuzz/corpus/<target>; new inputs go to a
# scratch dir, never into the repo. Prints executions per target (docs/FAULTS.md).
scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
