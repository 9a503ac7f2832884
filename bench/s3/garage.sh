#!/usr/bin/env bash
# The S3 suite (tests/tests/e2e/s3.rs: push, pull, pull-restore, GC, two instances on
# one bucket, reindex, direct URLs) on a 3-node Garage cluster on loopback: what a
# fleet would run instead of the single-node s3s-fs CI uses.
#
# Installs Garage (crates.io `garage`, ~15 min to build on 2 cores, ~2 GB of build
# files, removed afterwards) under ~/.cache/snapreg/tools, starts three nodes with
# replication factor 3, creates a bucket and a key, and runs the suite against it
# through SNAPREG_TEST_S3_* (support.rs `S3Server`). Garage ignores If-None-Match on
# PUT; snapreg needs no conditional writes (tag records are append-only objects).
#
# Run on 2026-11-23 (2-core build machine): Garage 2.5.0 built in 9 min 30 s, and the
# four S3 tests passed against the 3-node cluster (bench/RESULTS.md).
#
# Usage: bench/s3/garage.sh   (as root, for CRIU)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh

GARAGE_VERSION=2.5.0
TOOLS="${HOME:-/root}/.cache/snapreg/tools"
GARAGE="$TOOLS/bin/garage"
if ! "$GARAGE" --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
    build="$(mktemp -d)"
    CARGO_TARGET_DIR="$build" cargo install --locked --force "garage@$GARAGE_VERSION" --root "$TOOLS"
    rm -rf "$build"
fi

work="$(mktemp -d /var/tmp/snapreg-garage.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

secret="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
for i in 1 2 3; do
    mkdir -p "$work/n$i/meta" "$work/n$i/data"
    cat >"$work/n$i.toml" <<EOF
metadata_dir = "$work/n$i/meta"
data_dir = "$work/n$i/data"
db_engine = "lmdb"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:39${i}1"
rpc_public_addr = "127.0.0.1:39${i}1"
rpc_secret = "$secret"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:39${i}0"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:39${i}3"
EOF
    RUST_LOG=warn "$GARAGE" -c "$work/n$i.toml" server >"$work/n$i.log" 2>&1 &
    pids+=($!)
done
g() { "$GARAGE" -c "$work/n1.toml" "$@"; }
for _ in $(seq 100); do g status >/dev/null 2>&1 && break; sleep 0.2; done

# Join the three nodes, one zone each, 1 GB of capacity, and apply the layout.
for i in 2 3; do g node connect "$("$GARAGE" -c "$work/n$i.toml" node id -q)"; done
for i in 1 2 3; do
    id="$("$GARAGE" -c "$work/n$i.toml" node id -q | cut -d@ -f1)"
    g layout assign -z "dc$i" -c 1G "$id"
done
g layout apply --version 1
for _ in $(seq 100); do g bucket create snaps >/dev/null 2>&1 && break; sleep 0.2; done
keys="$(g key create snapreg)"
key_id="$(awk '/Key ID/ {print $NF}' <<<"$keys")"
key_secret="$(awk '/Secret key/ {print $NF}' <<<"$keys")"
g bucket allow --read --write --owner snaps --key snapreg

export SNAPREG_TEST_S3_ENDPOINT="http://127.0.0.1:3910"
export SNAPREG_TEST_S3_ACCESS_KEY="$key_id"
export SNAPREG_TEST_S3_SECRET_KEY="$key_secret"
export SNAPREG_TEST_S3_BUCKET=snaps
export SNAPREG_TEST_S3_REGION=us-east-1
SNAPCTL_CRIU="${SNAPCTL_CRIU:-$(deploy/install-criu.sh | tail -n 1)}"
export SNAPCTL_CRIU
cargo build --workspace --all-targets --locked
cargo test --workspace --locked --test e2e s3:: -- --test-threads=1
