#!/usr/bin/env bash
# GPU validation on a CUDA host (the device machine): a torch worker holding a GPU
# matrix is checkpointed with `snapctl checkpoint --cuda` into a registry on the same
# machine, killed, brought back with `snapctl pull-restore --detach`, and must compute
# exactly its pre-checkpoint result. Expects .carry/bin/{snapctl,snapreg} (stripped
# builds) and .carry/criu-debs (deploy/install-criu.sh --gather). Results go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/snapreg-gpu}"
MIB="${MIB:-1024}"
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
CRIU="$(deploy/install-criu.sh --from .carry/criu-debs | tail -n 1)"
export SNAPCTL_CRIU="$CRIU"
B=.carry/bin
W="$(mktemp -d /tmp/g.XXXXXX)"
"$B/snapreg" serve --listen 127.0.0.1:0 --anonymous admin --data "$W/reg" >"$W/reg.out" 2>"$W/reg.log" &
REG=$!
trap 'kill -9 $REG 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$W/reg.out" ] && break; sleep 0.1; done
export SNAPCTL_REGISTRY="http://$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "$W/reg.out")"
mkdir -p "$W/ctl"
t0=$(date +%s.%N)
setsid python3 bench/gpu/worker.py "$W/ctl" "$MIB" </dev/null >"$W/worker.log" 2>&1 &
for _ in $(seq 1200); do [ -s "$W/ctl/ready.json" ] && break; sleep 0.1; done
echo "worker ready in $(python3 -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$t0") s: $(cat "$W/ctl/ready.json")"
PID=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['pid'])" "$W/ctl/ready.json")
sleep 1
"$B/snapctl" --json checkpoint --cuda --pid "$PID" gpu/worker:v1 | tail -n 1 | tee "$OUT/checkpoint.json"
for _ in $(seq 200); do [ -e "/proc/$PID" ] || break; sleep 0.05; done
at=$(cat "$W/ctl/state")
"$B/snapctl" --json inspect gpu/worker:v1 | tail -n 1 > "$OUT/inspect.json"
sync; echo 3 > /proc/sys/vm/drop_caches
"$B/snapctl" --json --cache "$W/cache" pull-restore --detach gpu/worker:v1 | tail -n 1 | tee "$OUT/restore.json"
sleep 1
echo "counter: $at at checkpoint, $(cat "$W/ctl/state") now"
touch "$W/ctl/go"
for _ in $(seq 200); do [ -s "$W/ctl/done.json" ] && break; sleep 0.1; done
cat "$W/ctl/done.json" | tee "$OUT/result.json"; echo
kill -9 "$PID" 2>/dev/null || true
for _ in $(seq 100); do [ -e "/proc/$PID" ] || break; sleep 0.05; done
# Second restore on the same node: every chunk from the node cache.
sync; echo 3 > /proc/sys/vm/drop_caches
"$B/snapctl" --json --cache "$W/cache" pull-restore --detach gpu/worker:v1 | tail -n 1 | tee "$OUT/restore2.json"
sleep 1
rm -f "$W/ctl/done.json"; touch "$W/ctl/go"
for _ in $(seq 200); do [ -s "$W/ctl/done.json" ] && break; sleep 0.1; done
cat "$W/ctl/done.json" | tee "$OUT/result2.json"; echo
kill -9 "$PID" 2>/dev/null || true
for _ in $(seq 100); do [ -e "/proc/$PID" ] || break; sleep 0.05; done

# Baseline, same worker: CUDA checkpoint from cuda-python, criu dump to a local
# directory, criu restore from it, CUDA restore from cuda-python.
rm -rf "$W/ctl"/*; mkdir -p "$W/local"
setsid python3 bench/gpu/worker.py "$W/ctl" "$MIB" </dev/null >"$W/worker2.log" 2>&1 &
for _ in $(seq 1200); do [ -s "$W/ctl/ready.json" ] && break; sleep 0.1; done
PID=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['pid'])" "$W/ctl/ready.json")
sleep 1
python3 bench/gpu/cuda_ckpt.py checkpoint "$PID"
"$CRIU" dump -t "$PID" -D "$W/local" -o dump.log
for _ in $(seq 200); do [ -e "/proc/$PID" ] || break; sleep 0.05; done
sync; echo 3 > /proc/sys/vm/drop_caches
python3 - "$CRIU" "$W/local" "$PID" <<'PY' | tee "$OUT/baseline.json"
import json, subprocess, sys, time
criu, d, pid = sys.argv[1:4]
t0 = time.time()
subprocess.run([criu, "restore", "-D", d, "-d", "-o", "restore.log"], check=True)
t1 = time.time()
out = subprocess.run(["python3", "bench/gpu/cuda_ckpt.py", "restore", pid], check=True, capture_output=True, text=True).stdout
t2 = time.time()
print(json.dumps({"local_criu_restore_s": round(t1 - t0, 3), "cuda_restore_process_s": round(t2 - t1, 3), "cuda_restore_detail": out.strip(), "total_s": round(t2 - t0, 3)}))
PY
rm -f "$W/ctl/done.json"; touch "$W/ctl/go"
for _ in $(seq 200); do [ -s "$W/ctl/done.json" ] && break; sleep 0.1; done
cat "$W/ctl/done.json" | tee "$OUT/result-baseline.json"; echo
kill -9 "$PID" 2>/dev/null || true
cp "$W/reg.log" "$OUT/" 2>/dev/null || true
ls /run/snapctl/ 2>/dev/null | tail -3
for d in $(ls -d /run/snapctl/* 2>/dev/null | tail -3); do cp "$d"/*.log "$OUT/" 2>/dev/null || true; done
