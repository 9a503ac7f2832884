#!/usr/bin/env bash
# The end-to-end demo on the embedded defaults (local-disk object store, RocksDB
# index): installs what it needs, starts a registry, checkpoints a real process with
# CRIU, pushes the images, pushes a second run of the same program to show dedup,
# pulls the first snapshot back and restores the process from the pulled images; then
# checkpoints it straight into the registry and pull-restores it (twice: the second
# time from the node cache), then again encrypted under a tenant key (refused without
# it); last, a worker whose weights live in the node's weights service is checkpointed
# without them and restored with them filled from the registry.
# Needs root (CRIU).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-build-deps.sh
# After the build dependencies: env.sh puts ccache in front of the C/C++ compilers.
. scripts/env.sh
CRIU="$(deploy/install-criu.sh | tail -n 1)"
export SNAPCTL_CRIU="$CRIU"
cargo build --workspace --all-targets --locked >&2

work="$(mktemp -d /tmp/snapreg-demo.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
snapctl() { "$SNAPREG_BIN/snapctl" "$@"; }

say "starting snapreg (data in $work/registry)"
"$SNAPREG_BIN/snapreg" serve --listen 127.0.0.1:0 --oci-listen 127.0.0.1:0 --data "$work/registry" >"$work/snapreg.out" 2>"$work/snapreg.log" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/snapreg.out" ] && break; sleep 0.1; done
addr="$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "$work/snapreg.out")"
export SNAPCTL_REGISTRY="http://$addr"
oci="$(sed -n 's/.*"oci":"\([^"]*\)".*/\1/p' "$work/snapreg.out")"
echo "registry at $SNAPCTL_REGISTRY, its OCI distribution API at http://$oci" >&2

say "issue an access token for demo/* (the registry admits no anonymous callers)"
SNAPCTL_TOKEN="$("$SNAPREG_BIN/snapreg" token issue --data "$work/registry" --repo 'demo/*' --scope push --ttl 1h --name demo \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')"
export SNAPCTL_TOKEN
"$SNAPREG_BIN/snapreg" token ls --data "$work/registry" >&2

start_worker() { # dir pad_mib -> pid (256 MiB of seeded data, 64 MiB of zero pages)
  mkdir -p "$1"
  setsid "$SNAPREG_BIN/snapreg-testproc" hold --out "$1" --mib 256 --seed 7 --pad-mib "$2" --zero-mib 64 </dev/null >/dev/null 2>&1 &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do [ -s "$1/state" ] && break; sleep 0.1; done
  echo "$pid"
}
counter() { cut -d' ' -f1 "$1/state"; }
verify() { # dir pid: ask the worker to check its memory; wait for its verdict (up to 30 s)
  rm -f "$1/verify"
  kill -USR1 "$2"
  for _ in $(seq 300); do [ -s "$1/verify" ] && break; sleep 0.1; done
  cat "$1/verify"
}

say "run 1: a worker holding 256 MiB of state and a counter"
pid1="$(start_worker "$work/run1" 3)"
sleep 0.5
echo "pid $pid1, counter $(counter "$work/run1")" >&2
mkdir -p "$work/images1" "$work/images2"
"$CRIU" dump -t "$pid1" -D "$work/images1" -o dump.log
wait "$pid1" 2>/dev/null || true
echo "checkpointed; image: $(du -sh "$work/images1" | cut -f1)" >&2

say "push run 1"
snapctl push "$work/images1" demo/worker:run1

say "run 2 of the same program (data at other addresses): push shows the dedup"
pid2="$(start_worker "$work/run2" 17)"
"$CRIU" dump -t "$pid2" -D "$work/images2" -o dump.log
wait "$pid2" 2>/dev/null || true
snapctl --json push "$work/images2" demo/worker:run2 | tail -n 1 | tee "$work/push2.json"
python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print('second push sent %.1f%% of %d bytes' % (100*j['bytes_transferred']/j['bytes_total'], j['bytes_total']))" "$work/push2.json" >&2

say "inspect and ls"
snapctl inspect demo/worker:run1
snapctl ls demo/worker

say "pull run 1 into a new directory; restore the worker from it"
snapctl pull demo/worker:run1 "$work/pulled"
diff -r "$work/images1" "$work/pulled" && echo "pulled images are byte-identical" >&2
before="$(counter "$work/run1")"
"$CRIU" restore -D "$work/pulled" -d -o restore.log
sleep 1
after="$(counter "$work/run1")"
restored_pid="$(cut -d' ' -f2 "$work/run1/state")"
pids+=("$restored_pid")
echo "restored pid $restored_pid: counter $before at checkpoint, $after now" >&2
[ "$after" -gt "$before" ] || { echo "the restored worker is not counting" >&2; exit 1; }
echo "memory check after restore: $(verify "$work/run1" "$restored_pid")" >&2
grep -q '^ok' "$work/run1/verify"

say "checkpoint the running worker straight into the registry (no image on local disk)"
snapctl checkpoint --pid "$restored_pid" demo/worker:streamed
for _ in $(seq 100); do [ -e "/proc/$restored_pid" ] || break; sleep 0.05; done
frozen_at="$(counter "$work/run1")"

say "pull-restore it from the registry (through the node cache), twice"
export SNAPCTL_CACHE="$work/node-cache"
snapctl pull-restore --detach demo/worker:streamed
sleep 1
echo "counter $frozen_at at checkpoint, $(counter "$work/run1") now" >&2
[ "$(counter "$work/run1")" -gt "$frozen_at" ] || { echo "the restored worker is not counting" >&2; exit 1; }
kill -9 "$restored_pid"; for _ in $(seq 100); do [ -e "/proc/$restored_pid" ] || break; sleep 0.05; done
snapctl --json pull-restore --detach demo/worker:streamed | tail -n 1 | tee "$work/restore2.json"
python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print('second restore on this node: %d chunks from the registry, %d from the node cache' % (j['chunks_transferred'], j['chunks_cached']))" "$work/restore2.json" >&2
echo "memory check after the streamed round trip: $(verify "$work/run1" "$restored_pid")" >&2
grep -q '^ok' "$work/run1/verify"

say "the same snapshot as an OCI checkpoint image, for skopeo, podman and CRI-O"
skopeo inspect --raw --tls-verify=false --creds "demo:$SNAPCTL_TOKEN" "docker://$oci/demo/worker:streamed" \
  | tee "$work/oci-manifest.json" | python3 -m json.tool >&2
skopeo copy --quiet --src-tls-verify=false --src-creds "demo:$SNAPCTL_TOKEN" --dest-oci-accept-uncompressed-layers \
  "docker://$oci/demo/worker:streamed" "oci:$work/oci-image:streamed"
snapctl --json export demo/worker:streamed "oci:$work/exported" | tail -n 1 >"$work/export.json"
served="sha256:$(sha256sum "$work/oci-manifest.json" | cut -d' ' -f1)"
exported="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifest_digest"])' "$work/export.json")"
echo "served by the registry: $served; written by snapctl export: $exported" >&2
[ "$served" = "$exported" ] || { echo "export and the OCI listener disagree" >&2; exit 1; }
tar tf "$work/oci-image/blobs/sha256/$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"][0]["digest"][7:])' "$work/oci-manifest.json")" | head -n 5 >&2

say "encryption at rest: checkpoint under a tenant key; without it nothing restores"
snapctl key new --tenant demo "$work/demo.key"
snapctl --key-file "$work/demo.key" checkpoint --pid "$restored_pid" demo/worker:encrypted
for _ in $(seq 100); do [ -e "/proc/$restored_pid" ] || break; sleep 0.05; done
frozen_at="$(counter "$work/run1")"
snapctl inspect demo/worker:encrypted | grep encrypted >&2
if snapctl pull-restore --detach demo/worker:encrypted 2>"$work/nokey.err"; then
  echo "restored without its key" >&2; exit 1
fi
echo "without the key (exit 6): $(cat "$work/nokey.err")" >&2
snapctl --key-file "$work/demo.key" pull-restore --detach demo/worker:encrypted
sleep 1
echo "with the key: counter $frozen_at at checkpoint, $(counter "$work/run1") now" >&2
[ "$(counter "$work/run1")" -gt "$frozen_at" ] || { echo "the restored worker is not counting" >&2; exit 1; }
echo "memory check: $(verify "$work/run1" "$restored_pid")" >&2
grep -q '^ok' "$work/run1/verify"

say "separated mode: weights in the node's weights service, apart from the process"
start_weights() {
  "$SNAPREG_BIN/snapctl" --json weights serve --backend memfd --socket "$work/weights.sock" >"$work/weights.out" 2>>"$work/weights.log" &
  weights_pid=$!
  pids+=("$weights_pid")
  for _ in $(seq 100); do [ -s "$work/weights.out" ] && break; sleep 0.1; done
}
start_weights
mkdir -p "$work/w"
setsid "$SNAPREG_BIN/snapreg-testproc" weights --out "$work/w" --socket "$work/weights.sock" \
  --name demo/layers --mib 512 --state-mib 32 --seed 5 </dev/null >/dev/null 2>&1 &
wpid=$!
pids+=("$wpid")
for _ in $(seq 200); do [ -s "$work/w/result" ] && break; sleep 0.1; done
echo "worker $wpid attached 512 MiB of weights; its result: $(cut -d' ' -f2 "$work/w/result")" >&2
touch "$work/w/quiesce"
for _ in $(seq 100); do [ -s "$work/w/quiesced" ] && break; sleep 0.1; done
snapctl checkpoint --weights-service "$work/weights.sock" --pid "$wpid" demo/separated:v1
for _ in $(seq 100); do [ -e "/proc/$wpid" ] || break; sleep 0.05; done
snapctl --json inspect demo/separated:v1 | tail -n 1 | python3 -c \
  "import json,sys; print('layers: ' + ', '.join('%s %d MB' % (l['kind'], l['bytes'] >> 20) for l in json.load(sys.stdin)['layers']))" >&2
kill -9 "$weights_pid"; for _ in $(seq 100); do [ -e "/proc/$weights_pid" ] || break; sleep 0.05; done
start_weights   # a fresh service: the weights come back from the registry
before="$(cut -d' ' -f1,2 "$work/w/result")"
snapctl --json pull-restore --detach --weights-service "$work/weights.sock" demo/separated:v1 | tail -n 1 \
  | python3 -c "import json,sys; j=json.load(sys.stdin); print('restored; weights filled: %d MB in %.2f s while CRIU restored the process' % (j['weights']['bytes_filled'] >> 20, j['weights']['seconds']))" >&2
for _ in $(seq 300); do [ -s "$work/w/resumed" ] && break; sleep 0.1; done
after="$(cut -d' ' -f1,2 "$work/w/result")"
echo "weights address and result before: $before; after: $after" >&2
[ "$before" = "$after" ] || { echo "the restored worker computes something else" >&2; exit 1; }
say "demo finished"
