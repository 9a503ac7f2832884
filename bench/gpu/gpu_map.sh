#!/usr/bin/env bash
# `pull-restore --gpu-map` on a GPU machine: the snapshot's GPU 0 mapped (by index, then
# by UUID) onto this host's GPU 0 through the CUDA restore's GPU pairs; the worker must
# compute its pre-checkpoint result. With one GPU only the identity map can be tried:
# it exercises the recorded UUIDs, the pairing and the driver's restore-args path.
# Needs .carry/ as run.sh. Output in $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/snapreg-gpumap}"
mkdir -p "$OUT"
CRIU="$(deploy/install-criu.sh --from .carry/criu-debs | tail -n 1)"
export SNAPCTL_CRIU="$CRIU"
B=.carry/bin
W="$(mktemp -d /tmp/gm.XXXXXX)"
"$B/snapreg" serve --anonymous admin --listen 127.0.0.1:0 --data "$W/reg" >"$W/reg.out" 2>"$W/reg.log" &
REG=$!
trap 'kill -9 $REG 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$W/reg.out" ] && break; sleep 0.1; done
export SNAPCTL_REGISTRY="http://$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "$W/reg.out")"
mkdir -p "$W/ctl"
setsid python3 bench/gpu/worker.py "$W/ctl" 256 </dev/null >"$W/worker.log" 2>&1 &
for _ in $(seq 600); do [ -s "$W/ctl/ready.json" ] && break; sleep 0.1; done
PID=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['pid'])" "$W/ctl/ready.json")
"$B/snapctl" --json checkpoint --cuda --pid "$PID" gpu/map:v1 | tail -n 1 >"$OUT/checkpoint.json"
for _ in $(seq 200); do [ -e "/proc/$PID" ] || break; sleep 0.05; done
"$B/snapctl" --json inspect gpu/map:v1 | tail -n 1 | python3 -c "import json,sys; print(json.dumps(json.load(sys.stdin)['compat']['gpu']))" | tee "$OUT/gpu-record.json"
UUID=$(python3 -c "import json; print(json.load(open('$OUT/gpu-record.json'))['devices'][0]['uuid'])")
cp -p "$W/worker.log" "$W/worker.log.ck"
for map in "0=0" "$UUID=$UUID"; do
  cp -p "$W/worker.log.ck" "$W/worker.log"
  rm -f "$W/ctl/done.json"
  "$B/snapctl" --json --cache "$W/cache" pull-restore --detach --gpu-map "$map" gpu/map:v1 | tail -n 1 >"$OUT/restore.json"
  python3 -c "import json; d=json.load(open('$OUT/restore.json')); print('restored with --gpu-map', '$map', 'cuda_restore_seconds', d.get('cuda_restore_seconds'), d.get('error',''))"
  touch "$W/ctl/go"
  for _ in $(seq 200); do [ -s "$W/ctl/done.json" ] && break; sleep 0.1; done
  echo "result: $(cat "$W/ctl/done.json")"
  kill -9 "$PID" 2>/dev/null || true
  for _ in $(seq 100); do [ -e "/proc/$PID" ] || break; sleep 0.05; done
done
# A map naming a GPU this host lacks is refused before CRIU starts (exit 2).
set +e
"$B/snapctl" --json pull-restore --detach --gpu-map 0=7 gpu/map:v1 >"$OUT/refused.json" 2>&1
echo "--gpu-map 0=7: exit $? $(tail -n 1 "$OUT/refused.json")"
