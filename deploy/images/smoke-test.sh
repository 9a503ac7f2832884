#!/usr/bin/env bash
# smoke-test.sh REGISTRY_IMAGE NODE_IMAGE: starts the registry image with podman
# (host network, a fresh data volume), pushes a snapshot through it and pulls it back
# with the host's snapctl, byte for byte; checks /readyz and /metrics on the way;
# stops it with SIGTERM and wants exit status 0 (the drain); then checks that the
# node image's snapctl and CRIU run. Cleans up its container, volume and files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/podman-env.sh"
registry_image=$1 node_image=$2
snapctl="${SNAPREG_BIN:-${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/snapreg-target}/debug}/snapctl"
work="$(mktemp -d)"
name="snapreg-smoke-$$"
cleanup() {
    podman rm -f "$name" >/dev/null 2>&1 || true
    podman volume rm -f "$name" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
podman volume create "$name" >/dev/null
podman run -d --name "$name" --network host -v "$name:/var/lib/snapreg" \
    -e SNAPREG_LISTEN="127.0.0.1:$port" -e SNAPREG_METRICS_LISTEN="127.0.0.1:$mport" \
    -e SNAPREG_ANONYMOUS=push -e SNAPREG_LOG_FORMAT=json "$registry_image" >/dev/null
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null && break
    sleep 0.2
done
curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null || { podman logs "$name" >&2; echo "smoke: registry never ready" >&2; exit 1; }
mkdir -p "$work/src"
head -c 8388608 /dev/urandom >"$work/src/pages.img"
echo core >"$work/src/core.img"
url="http://127.0.0.1:$port"
"$snapctl" --registry "$url" --json push "$work/src" smoke/app:v1 >"$work/push.json"
"$snapctl" --registry "$url" --json pull smoke/app:v1 "$work/out" >"$work/pull.json"
diff -r "$work/src" "$work/out"
received=$(curl -sf "http://127.0.0.1:$mport/metrics" | sed -n 's/^snapreg_chunks_received_bytes_total \([0-9]*\).*/\1/p')
[[ $received -gt 8000000 ]] || { echo "smoke: metrics show $received bytes received" >&2; exit 1; }
podman stop -t 30 "$name" >/dev/null
status=$(podman inspect --format '{{.State.ExitCode}}' "$name")
[[ $status == 0 ]] || { podman logs "$name" >&2; echo "smoke: registry exited $status on SIGTERM" >&2; exit 1; }
podman logs "$name" 2>&1 | tail -n 1 | python3 -c 'import json,sys; json.loads(sys.stdin.read())' \
    || { echo "smoke: the last log line is not JSON" >&2; exit 1; }
podman run --rm --network host "$node_image" --version >/dev/null
podman run --rm --network host --entrypoint /opt/snapreg-criu/bin/criu "$node_image" --version | grep -q '^Version: 4\.'
echo "smoke: registry image served a push and a pull ($(stat -c %s "$work/src/pages.img") bytes), drained on SIGTERM (exit 0); node image runs snapctl and CRIU"
