# Shared by the GPU benchmarks (separated.sh, encrypted.sh): set-up on the device
# machine, a registry, the model, and the worker helpers. Source it after setting OUT
# and W if the defaults do not suit; it starts logging to $OUT/run.log.
S0=$(date +%s)
OUT="${OUT:-/tmp/snapreg-gpu}"
PRESET="${PRESET:-small}"
DEADLINE="${DEADLINE:-540}"
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
# ARCHIVE=FILE: OUT (without CRIU's images and logs) tarred into FILE every 15 s and
# once more after the run, however it ends: a device call cut off at its time limit
# still brings back what was measured (write FILE under the call's $OUT).
archive() {
  tar --exclude='*.img' --exclude=dump.log --exclude=restore.log -czf "$ARCHIVE.tmp" -C "$OUT" . 2>/dev/null &&
    mv "$ARCHIVE.tmp" "$ARCHIVE"
}
if [ -n "${ARCHIVE:-}" ]; then
  # A TERM to the whole group (timeout's) archives at once; the wait lets it in.
  (trap 'archive; exit' TERM; while kill -0 $$ 2>/dev/null; do sleep 15 & wait $!; archive; done; archive) &
fi
export PYTHONUNBUFFERED=1 SNAPCTL_LOG=info
left() { echo $((DEADLINE - ($(date +%s) - S0))); }
now() { date +%s.%N; }
el() { python3 -c "print(round($2-$1, 3))"; }
say() { echo "### $* ($(left) s left)"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
gone() { for _ in $(seq 400); do [ -e "/proc/$1" ] || return 0; sleep 0.05; done; }
waitfile() { # FILE SECONDS
  local n=$(( $2 * 20 )); for _ in $(seq $n); do [ -s "$1" ] && return 0; sleep 0.05; done; return 1; }
result() { echo "$1=$2" >>"$OUT/summary.env"; echo "RESULT $1=$2"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# CRIU_DEBS=.carry/criu43-debs: another CRIU for the whole run, local baseline included
# (gathered with SNAPREG_CRIU_SUITES=sid+experimental deploy/install-criu.sh --gather DIR)
CRIU="$(deploy/install-criu.sh --from "${CRIU_DEBS:-.carry/criu-debs}" | tail -n 1)"
"$CRIU" --version | head -1
export SNAPCTL_CRIU="$CRIU"
"$CRIU" --version >/dev/null 2>&1 || { echo "CRIU did not install; nothing measured"; exit 1; }
B=$PWD/.carry/bin
W="${W:-/var/tmp/snapreg-gpu}"
rm -rf "$W" /dev/shm/local /dev/shm/reg /dev/shm/cache-mem; mkdir -p "$W"
: >"$OUT/summary.env"

start_registry() { # DATA: a registry on DATA, at a free loopback port; sets REG,
  # REG_DATA and SNAPCTL_REGISTRY
  REG_DATA=$1
  "$B/snapreg" serve --anonymous admin --listen 127.0.0.1:0 --data "$1" >"$W/reg.out" 2>>"$W/reg.log" &
  REG=$!
  waitfile "$W/reg.out" 10
  export SNAPCTL_REGISTRY="http://$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "$W/reg.out")"
}
restart_registry() { kill -TERM "$REG"; gone "$REG"; rm -f "$W/reg.out"; start_registry "$REG_DATA"; }
registry_into_memory() { # the registry stopped, its data (index and store) copied into
  # /dev/shm/reg and served from there: a registry whose snapshot is hot in memory, as
  # one serving a fleet holds it (drop_caches on the node cannot evict it)
  kill -TERM "$REG"; gone "$REG"; rm -f "$W/reg.out"
  rm -rf /dev/shm/reg; cp -a "$W/reg" /dev/shm/reg
  start_registry /dev/shm/reg
}
start_registry "$W/reg"
python3 bench/gpu/hf/mkmodel.py "$W/model" --preset "$PRESET" 2>&1 | grep -v "Writing model shards" | tail -2
export TORCHINDUCTOR_CACHE_DIR="$W/ind" TRITON_CACHE_DIR="$W/ind/triton"

start_worker() { # CTL [env...]
  local ctl=$1; shift
  rm -rf "$ctl"; mkdir -p "$ctl"
  drop
  local t0; t0=$(now)
  env "$@" setsid python3 bench/gpu/hf/worker.py "$W/model" "$ctl" </dev/null >"$ctl.log" 2>&1 &
  PID=$!
  waitfile "$ctl/ready.json" "$(( $(left) - 30 ))" || { echo "worker not ready"; tail -30 "$ctl.log"; exit 1; }
  WALL=$(el "$t0" "$(now)")
}
answer() { # CTL -> prints done0.json; returns 1 unless tokens and logits are equal
  touch "$1/go0"
  waitfile "$1/done0.json" 120 || { echo "no answer"; tail -20 "$1.log"; return 1; }
  cat "$1/done0.json"; echo
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d.get('equal') and d.get('logits_equal') and d.get('big_batch_equal') else 1)" "$1/done0.json"
}
kill_worker() { # the whole tree: the worker is a session leader (setsid) and CRIU
  # restores its process group, so children it forked (compile workers) go with it
  kill -9 -- "-$PID" 2>/dev/null; kill -9 "$PID" 2>/dev/null; gone "$PID"
  for _ in $(seq 200); do pgrep -g "$PID" >/dev/null || return 0; sleep 0.05; done; }
machine_state() { # NAME: what a run leaves behind, after each restore: the registry's
  # CPU seconds so far and RSS, processes, memory available and in tmpfs (GB), dirty and under
  # writeback (MB), free disk under W (GB), load, GPU memory used (MiB), compaction;
  # a later restore slower than an earlier one is read against these
  local tck; tck=$(getconf CLK_TCK)
  result "${1}_registry_cpu_s" "$(awk -v t="$tck" '{printf "%.1f", ($14+$15)/t}' "/proc/$REG/stat" 2>/dev/null)"
  result "${1}_registry_rss_mib" "$(awk '/^VmRSS/{printf "%.0f", $2/1024}' "/proc/$REG/status" 2>/dev/null)"
  result "${1}_procs" "$(ps -e --no-headers | wc -l)"
  result "${1}_mem_available_gb" "$(awk '/^MemAvailable/{printf "%.1f", $2/1e6}' /proc/meminfo)"
  result "${1}_shmem_gb" "$(awk '/^Shmem:/{printf "%.1f", $2/1e6}' /proc/meminfo)"
  result "${1}_dirty_mb" "$(awk '/^(Dirty|Writeback):/{s+=$2} END{printf "%.0f", s/1e3}' /proc/meminfo)"
  result "${1}_disk_free_gb" "$(df -B1G --output=avail "$W" | tail -1 | tr -d ' ')"
  result "${1}_load1" "$(cut -d' ' -f1 /proc/loadavg)"
  # memory that fragments restore after restore makes the kernel compact, or fall
  # back from huge pages, on the allocation path: counters since boot
  local k; for k in compact_stall compact_fail thp_fault_fallback; do
    result "${1}_${k}" "$(awk -v k="$k" '$1 == k {print $2}' /proc/vmstat)"; done
  result "${1}_gpu_mem_mib" "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)"
}
restore_then_answer() { # NAME CTL LOGCOPY CMD...: CMD (a criu restore of the worker)
  # + CUDA restore, to the first answer; RESULT NAME_criu_restore_s, NAME_cuda_restore_s,
  # NAME_restore_s, NAME_first_answer_s, NAME_equal
  local name=$1 ctl=$2 log=$3; shift 3
  rm -f "$ctl/done0.json"; cp -p "$log" "$ctl.log"; drop
  local t0 t1 t2 t3; t0=$(now)
  "$@"
  t1=$(now)
  python3 bench/gpu/cuda_ckpt.py restore "$PID"
  t2=$(now)
  answer "$ctl" >/dev/null && result "${name}_equal" true || result "${name}_equal" false
  t3=$(now)
  result "${name}_criu_restore_s" "$(el "$t0" "$t1")"
  result "${name}_cuda_restore_s" "$(el "$t1" "$t2")"
  result "${name}_restore_s" "$(el "$t0" "$t2")"
  result "${name}_first_answer_s" "$(el "$t0" "$t3")"
  kill_worker
}
criu_from_dir() { "$CRIU" restore -D "$1" -d -o restore.log || tail -20 "$1/restore.log"; }
criu_from_ideal_streamer() { # DIR NAME: bench/pipe/stream_ceiling.py serving DIR
  python3 bench/pipe/stream_ceiling.py --images "$1" --work "/run/sc-$2" -- "$CRIU" restore -d -o restore.log | tee "$OUT/$2.json" || tail -20 "/run/sc-$2/restore.log"
}
local_restore() { # NAME CTL LOGCOPY: the baseline, criu restore from /dev/shm/local
  # (or LOCAL_DIR) + CUDA restore
  restore_then_answer "$1" "$2" "$3" criu_from_dir "${LOCAL_DIR:-/dev/shm/local}"
}
ceiling_restore() { # NAME CTL LOGCOPY: the same /dev/shm/local image through
  # `criu restore --stream` fed by an ideal streamer (bench/pipe/stream_ceiling.py,
  # every file spliced from /dev/shm) + CUDA restore: CRIU's streamed restore at best
  restore_then_answer "$1" "$2" "$3" criu_from_ideal_streamer /dev/shm/local "$1"
}
timed_restore() { # NAME CTL LOGCOPY CACHE REF [snapctl global flags...]
  # pull-restore REF (page cache dropped), then the first answer; RESULT NAME_restore_s,
  # NAME_first_answer_s, NAME_equal. LOGCOPY: the worker log as it was at the checkpoint.
  local name=$1 ctl=$2 log=$3 cache=$4 ref=$5; shift 5
  rm -f "$ctl/done0.json"; cp -p "$log" "$ctl.log"; drop
  local t0 t1 t2; t0=$(now)
  timeout 180 "$B/snapctl" --json "$@" --cache "$cache" pull-restore --detach "$ref" | tail -n 1 | tee -a "$OUT/restores.jsonl"
  t1=$(now)
  answer "$ctl" >/dev/null && result "${name}_equal" true || result "${name}_equal" false
  t2=$(now)
  result "${name}_restore_s" "$(el "$t0" "$t1")"
  result "${name}_first_answer_s" "$(el "$t0" "$t2")"
  kill_worker
}
account() { # NAME: snapctl's own account of rs-NAME.json into summary.env: CRIU's
  # restore, device memory in (a lazy fill puts it first), the CUDA restore after it,
  # the weights in (separated mode); when a lazy fill began, its workers' seconds
  # waiting for chunks and copying them in, its claims (one chunk each) and their
  # pieces, its page faults (zero-page ones among them) and their seconds waiting for
  # chunks; fetches that joined one in flight
  python3 - "$OUT/rs-$1.json" "$1" >>"$OUT/summary.env" <<'PY' || true
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); n = sys.argv[2]
l = r.get("lazy") or {}
for k, v in (("criu_restore_s", r.get("restore_seconds")), ("device_memory_in_s", l.get("device_memory_seconds")),
             ("cuda_restore_s", r.get("cuda_restore_seconds")), ("weights_in_s", (r.get("weights") or {}).get("in_at_seconds")),
             ("lazy_gb", round(l["lazy_bytes"] / 1e9, 2) if l else None),
             ("device_memory_lazy_gb", round(l["device_memory_bytes"] / 1e9, 2) if l else None), ("peak_rss_mib", (r.get("peak_rss_bytes") or 0) >> 20),
             ("faults", l.get("faults")), ("zero_faults", l.get("zero_faults")), ("fault_fetch_s", l.get("fault_fetch_seconds")),
             ("fill_started_s", l.get("fill_started_seconds")), ("fill_ended_s", l.get("fill_ended_seconds")), ("fill_fetch_worker_s", l.get("fill_fetch_seconds")),
             ("fill_copy_worker_s", l.get("fill_copy_seconds")), ("fill_claims", l.get("fill_claims")),
             ("fill_pieces", l.get("fill_pieces")), ("joined", (r.get("scheduler") or {}).get("joined"))):
    if v is not None:
        print(f"{n}_{k}={v}")
PY
}
lazy_restore() { # NAME CTL LOGCOPY CACHE REF [pull-restore flags...]
  # pull-restore --lazy REF in the background while the first answer is asked at once:
  # the tree answers before its last page is in. RESULT NAME_first_answer_s,
  # NAME_all_present_s (the command's end: every page in), NAME_equal. MEMORY=fill-first
  # (an A/B variant) runs --fill-first instead: every page in before the tree runs;
  # RESTORE_SNAPCTL=PATH restores with another snapctl build (a branch's, carried).
  local name=$1 ctl=$2 log=$3 cache=$4 ref=$5; shift 5
  rm -f "$ctl/done0.json" "$ctl/resumed.json"; cp -p "$log" "$ctl.log"; drop
  local t0 t1 t2; t0=$(now)
  timeout 180 "${RESTORE_SNAPCTL:-$B/snapctl}" --json --cache "$cache" pull-restore --detach "--${MEMORY:-lazy}" "$@" "$ref" >"$OUT/rs-$name.json" 2>"$OUT/rs-$name.err" &
  local rs=$!
  answer "$ctl" >/dev/null && result "${name}_equal" true || result "${name}_equal" false
  t1=$(now)
  wait "$rs"; tail -n 1 "$OUT/rs-$name.json" | tee -a "$OUT/restores.jsonl"; tail -n 3 "$OUT/rs-$name.err"
  t2=$(now)
  result "${name}_first_answer_s" "$(el "$t0" "$t1")"
  result "${name}_all_present_s" "$(el "$t0" "$t2")"
  account "$name"
  result "${name}_tree_procs" "$(pgrep -g "$PID" | wc -l)"
  kill_worker
  machine_state "$name"
}
trap 'kill -9 $REG 2>/dev/null; [ -n "${PID:-}" ] && kill -9 $PID 2>/dev/null' EXIT

