#!/usr/bin/env bash
# Installs the system packages building snapreg needs on a Debian-family machine:
# libclang (bindgen, for librocksdb-sys) and a C++ compiler (RocksDB itself). protoc
# is not among them: proto/build.rs uses the vendored protoc-bin-vendored crate.
# python3 runs the end-to-end test of the weights service's Python client; ccache lets
# cargo's check and build modes share one compile of RocksDB (scripts/env.sh).
# nginx-light is the stock Debian server the written-files end-to-end test checkpoints
# (tests/tests/e2e/writable_files.rs); any nginx package already installed will do.
# skopeo and podman are the OCI clients no one here wrote that the OCI listener's
# end-to-end tests drive (tests/tests/e2e/oci.rs); busybox-static is the whole root
# file system of the container podman checkpoints there (no image pull needed).
# Idempotent: installs only what is missing.
set -euo pipefail

need=()
for pkg in libclang-dev clang g++ make python3 ccache skopeo podman runc busybox-static; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
[ -x /usr/sbin/nginx ] || need+=(nginx-light)
if ((${#need[@]})); then
  echo "installing build dependencies: ${need[*]}" >&2
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need[@]}" >&2
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
