#!/usr/bin/env bash
# build.sh [--prebuilt]: builds localhost/snapreg-registry and localhost/snapreg-node
# (tag = the workspace version) from the Containerfiles here, FROM the local base
# (build-base.sh). --prebuilt takes the host's built binaries ($SNAPREG_BIN, default
# $CARGO_TARGET_DIR/debug) and CRIU .debs instead of compiling in the image; that is
# what CI runs. Prints the two image names on stdout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
. "$here/podman-env.sh"
base="$("$here/build-base.sh")"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)"
suffix=""
context="$root"
if [[ ${1:-} == --prebuilt ]]; then
    suffix="-prebuilt"
    bin="${SNAPREG_BIN:-${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/snapreg-target}/debug}"
    context="$(mktemp -d)"
    trap 'rm -rf "$context"' EXIT
    mkdir -p "$context/prebuilt" "$context/deploy"
    cp "$bin/snapreg" "$bin/snapctl" "$context/prebuilt/"
    strip "$context/prebuilt/snapreg" "$context/prebuilt/snapctl"
    "$root/deploy/install-criu.sh" --gather "$context/prebuilt/criu-debs" >/dev/null
    cp "$root/deploy/install-criu.sh" "$context/deploy/"
fi
# From source, the build stage fetches rustup and crates over HTTPS: it trusts the
# host's CA bundle for that (mounted, never in a layer), so a build behind an
# intercepting proxy whose CA only the host trusts works too.
ca=()
[[ -z $suffix && -f /etc/ssl/certs/ca-certificates.crt ]] \
    && ca=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
for part in registry node; do
    image="localhost/snapreg-$part:$version"
    podman build --network host "${ca[@]}" --build-arg "BASE=$base" --target "$part$suffix" \
        -f "$here/Containerfile.$part" -t "$image" "$context" >&2
    echo "$image"
done
