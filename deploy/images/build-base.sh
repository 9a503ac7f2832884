#!/usr/bin/env bash
# build-base.sh: the base image every snapreg image starts FROM, made here from
# Debian's own packages (mmdebstrap, minbase bookworm + ca-certificates + libstdc++)
# and imported into podman's local storage. No base image is pulled from a container
# registry. Cached: the root file system tarball lives in ~/.cache/snapreg/images and
# is rebuilt only when this script changes; the image only when the tarball does.
# Prints the image name on stdout.
set -euo pipefail
cd "$(dirname "$0")"
. ./podman-env.sh
readonly IMAGE=localhost/snapreg-base:bookworm
CACHE="${HOME:-/root}/.cache/snapreg/images"
mkdir -p "$CACHE"
stamp="$(sha256sum build-base.sh | cut -c1-16)"
tar="$CACHE/base-$stamp.tar"
if [[ ! -s $tar ]]; then
    echo "build-base: mmdebstrap bookworm -> $tar" >&2
    mmdebstrap --variant=minbase --include=ca-certificates,libstdc++6 --mode=root --format=tar \
        bookworm "$tar.partial" >&2
    mv "$tar.partial" "$tar"
fi
if [[ "$(podman image inspect --format '{{index .Labels "snapreg.base"}}' "$IMAGE" 2>/dev/null)" != "$stamp" ]]; then
    podman import --change "LABEL snapreg.base=$stamp" "$tar" "$IMAGE" >&2
fi
echo "$IMAGE"
