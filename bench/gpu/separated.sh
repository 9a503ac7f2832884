#!/usr/bin/env bash
# GPU restore paths side by side, one run, registry on the same machine (the device
# machine; needs root, a GPU, torch + transformers, and .carry/bin/{snapctl,snapreg} +
# .carry/criu-debs as for run.sh). Worker: bench/gpu/hf/worker.py, a Llama with
# torch.compile and CUDA graphs (PRESET small: 134M params; medium: 1.26B).
#
#   cold start            the worker from nothing to its first answer
#   local                 criu restore from /dev/shm + CUDA restore (cuda-python), to first answer
#   transparent           snapctl pull-restore of the `checkpoint --cuda` snapshot (cold node cache)
#   separated             snapctl pull-restore of the `checkpoint --cuda --weights-service`
#                         snapshot into a freshly started weights service (weights from the registry)
#   separated, warm svc   the same with the weights still in the service (what a node that
#                         already serves the model pays)
#   transparent, warm     pull-restore from the node cache the first one filled (page
#                         cache dropped; its report goes to restores.jsonl)
#   checkpoint freeze     how long `checkpoint --cuda` keeps the worker frozen: by
#                         default (`--spool auto`: dumped into /dev/shm, pushed after
#                         release), and streamed (the restored worker checkpointed again
#                         with `--spool off`)
#   --lazy                transparent (right after the first transparent restore) and
#                         separated (fresh service) again with `pull-restore --lazy`:
#                         the first answer is asked while the pages still arrive; also
#                         the time until every page is in, and snapctl's account (device
#                         memory in, CUDA restore); the transparent one twice, the
#                         second from the node cache the first filled (LAZY=0 leaves
#                         these out)
#   stream ceiling        (STREAM_CEILING=1, the default) the local image through
#                         `criu restore --stream` fed by an ideal streamer
#                         (bench/pipe/stream_ceiling.py) + CUDA restore: CRIU's
#                         streamed restore at best, whatever feeds it
#   local, own disk       (LOCAL_DISK=1, the default) the local restore again from a copy
#                         of the image on this machine's disk, page cache dropped: what
#                         "restore from its own disk" costs here
#   registry in memory    (REG_MEM=1) after the first transparent restore the registry
#                         moves into /dev/shm (registry_into_memory) and the transparent
#                         pull-restore runs again into an empty node cache: the same
#                         footing as the local baseline, whose image is in /dev/shm;
#                         with LAZY=1 the lazy one too
#   node cache in memory  (MEM_CACHE=1) the warm transparent restore again from a copy of
#                         its node cache in /dev/shm
#   THP A/B               (THP_AB=1) the local restore and the in-memory node cache restore
#                         again with transparent huge pages set to `always` (the machine's
#                         setting is put back after)
#   plain spool           (PLAIN_SPOOL=1) the restored worker checkpointed again with
#                         `--spool /dev/shm/plain-spool`: the freeze into a directory of
#                         /dev/shm (small pages), against the first checkpoint's spool
#                         (a tmpfs of huge pages with HUGE_SPOOL=1)
#   arenas A/B            (RSS_AB=1) the transparent pull-restore again, into a fresh
#                         cache, with MALLOC_ARENA_MAX=128 (glibc's own limit on 16
#                         cores) instead of snapctl's cap of 4: the peak RSS either way
#   tuned                 (TUNED="SNAPCTL_CHUNK_CONNECTIONS=4 SNAPCTL_FETCH_MEMORY=256M", say)
#                         each restore from the registry in memory (transparent eager and
#                         --lazy with REG_MEM=1; separated eager and --lazy, fresh
#                         service) again right after itself with these settings:
#                         connections and fetch budget against the defaults, in one run
#   A/B                   (AB="name:K=V,K=V name2:K=V", REPS=2, AB_EAGER=0) after the rest,
#                         the separated --lazy restore (fresh service) once per variant
#                         with its settings exported, the variants in turn, REPS rounds;
#                         AB_EAGER=1 adds the eager one ("name:" alone: the defaults);
#                         FRESH_REGISTRY=1 in a variant restarts the registry (same
#                         data) before its restore; CACHE_DIR=DIR puts its node cache
#                         there (/dev/shm/cache-ab: no disk); COMPACT_MEMORY=1 compacts
#                         memory before it; MEMORY=fill-first restores with
#                         --fill-first instead of --lazy; RESTORE_SNAPCTL=PATH with
#                         another snapctl build. After each such restore the
#                         machine's state goes into the summary (machine_state)
# TRANSPARENT=0 leaves out every transparent pull-restore (the checkpoint and the local
# baseline stay): a shorter run of the separated restores.
# THP=always|madvise|never sets transparent huge pages for the whole run (put back at
# the end). SEPARATED=0 stops after the transparent paths; STREAMED=0 leaves out the
# streamed checkpoint. With REG_MEM=1 the later restores (the local baseline's pull and
# separated mode) are served from the registry in memory too.
#
# Every restore starts with the page cache dropped and must answer with exactly the
# tokens and logits the worker produced before its checkpoint. Results (JSON per step,
# summary.json, run.log) go to $OUT as they come; DEADLINE (s) stops the run early.
#   PRESET=small DEADLINE=540 OUT=/tmp/sep bash bench/gpu/separated.sh
# On the device machine add ARCHIVE=$OUT/sep.tgz (common.sh): a call cut off still
# brings back what it measured.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/snapreg-sep}" W=/var/tmp/snapreg-sep
. bench/gpu/common.sh
SOCK="$W/weights.sock"
start_service() {
  "$B/snapctl" --json weights serve --backend cuda --socket "$SOCK" >"$W/ws.out" 2>>"$W/ws.log" &
  WS=$!
  waitfile "$W/ws.out" 30 || { echo "weights service did not start"; cat "$W/ws.log"; }
}
start_service
fresh_service() { kill -9 "$WS"; gone "$WS"; start_service; }
TUNED="${TUNED:-}"
TRANSPARENT="${TRANSPARENT:-1}"
# TUNED's settings exported for what runs between tuned_on and tuned_off
tuned_on() { local kv; for kv in $TUNED; do export "$kv"; done; }
tuned_off() { local kv; for kv in $TUNED; do unset "${kv%%=*}"; done; }
[ "${HUGE_SPOOL:-0}" = 1 ] && export SNAPCTL_SPOOL_HUGE_PAGES=1
THP_FILE=/sys/kernel/mm/transparent_hugepage/enabled
THP_WAS=$(sed 's/.*\[\(.*\)\].*/\1/' "$THP_FILE")
result thp "${THP:-$THP_WAS}"
[ -n "${THP:-}" ] && echo "$THP" >"$THP_FILE"
trap 'kill -9 $REG $WS 2>/dev/null; [ -n "${PID:-}" ] && kill -9 $PID 2>/dev/null; echo "$THP_WAS" >"$THP_FILE"' EXIT

# ---- transparent
say "cold start ($PRESET)"
A=/tmp/ctl-a
start_worker "$A"
cat "$A/ready.json" | python3 -c "import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ('import_s','load_s','kv_alloc_s','compile_warmup_s','total_s','kv_gib','device_used_gib')})"
result cold_start_s "$(python3 -c "import json; print(json.load(open('$A/ready.json'))['total_s'])")"
result cold_start_wall_s "$WALL"
say "checkpoint --cuda"
timeout 180 "$B/snapctl" --json checkpoint --cuda --pid "$PID" "hf/$PRESET:transparent" | tail -n 1 | tee "$OUT/ck-transparent.json"
gone "$PID"
result transparent_freeze_ms "$(python3 -c "import json; print(json.load(open('$OUT/ck-transparent.json')).get('freeze_ms'))")"
result transparent_route "'$(python3 -c "import json; print(json.load(open('$OUT/ck-transparent.json'))['route']['reason'])")'"
# The restored worker reopens its log, and CRIU insists on the size it had: keep a copy
# to put back before each restore (every restore appends to it).
cp -p "$A.log" "$A.log.ck"
"$B/snapctl" --json inspect "hf/$PRESET:transparent" | tail -n 1 >"$OUT/inspect-transparent.json"

if [ "$TRANSPARENT" = 1 ]; then
  say "pull-restore, transparent"
  timed_restore transparent "$A" "$A.log.ck" "$W/cache-a" "hf/$PRESET:transparent"
fi

if [ "$TRANSPARENT" = 1 ] && [ "${LAZY:-1}" = 1 ]; then
  say "pull-restore --lazy, transparent"
  lazy_restore transparent_lazy "$A" "$A.log.ck" "$W/cache-la" "hf/$PRESET:transparent"
  say "pull-restore --lazy, transparent, warm node cache (the lazy restore's): the fill without the registry"
  lazy_restore transparent_lazy_warm "$A" "$A.log.ck" "$W/cache-la" "hf/$PRESET:transparent"
fi

if [ "${PLAIN_SPOOL:-0}" = 1 ]; then
  say "pull-restore, transparent; then checkpoint --cuda --spool /dev/shm/plain-spool (the freeze on small pages)"
  rm -f "$A/done0.json"; cp -p "$A.log.ck" "$A.log"; drop
  timeout 180 "$B/snapctl" --json --cache "$W/cache-p" pull-restore --detach "hf/$PRESET:transparent" | tail -n 1 >/dev/null
  timeout 180 "$B/snapctl" --json checkpoint --cuda --spool /dev/shm/plain-spool --pid "$PID" "hf/$PRESET:plain-spool" | tail -n 1 | tee "$OUT/ck-plain-spool.json"
  gone "$PID"; rm -rf /dev/shm/plain-spool "$W/cache-p"
  result plain_spool_freeze_ms "$(python3 -c "import json; print(json.load(open('$OUT/ck-plain-spool.json')).get('freeze_ms'))")"
fi

if [ "${RSS_AB:-0}" = 1 ]; then
  say "pull-restore, transparent, MALLOC_ARENA_MAX=128"
  MALLOC_ARENA_MAX=128 timed_restore transparent_arenas128 "$A" "$A.log.ck" "$W/cache-a128" "hf/$PRESET:transparent"
  rm -rf "$W/cache-a128"
fi

if [ "${REG_MEM:-0}" = 1 ]; then
  say "the registry into memory"
  registry_into_memory
fi
if [ "${REG_MEM:-0}" = 1 ] && [ "$TRANSPARENT" = 1 ]; then
  say "pull-restore, transparent, registry in memory, empty node cache"
  timed_restore transparent_regmem "$A" "$A.log.ck" "$W/cache-rm" "hf/$PRESET:transparent"
  rm -rf "$W/cache-rm"
  if [ "${LAZY:-1}" = 1 ]; then
    say "pull-restore --lazy, transparent, registry in memory, empty node cache"
    lazy_restore transparent_lazy_regmem "$A" "$A.log.ck" "$W/cache-lrm" "hf/$PRESET:transparent"
    rm -rf "$W/cache-lrm"
  fi
  if [ -n "$TUNED" ]; then
    say "the same two with $TUNED"
    tuned_on
    timed_restore transparent_regmem_tuned "$A" "$A.log.ck" "$W/cache-rmt" "hf/$PRESET:transparent"
    [ "${LAZY:-1}" = 1 ] && lazy_restore transparent_lazy_regmem_tuned "$A" "$A.log.ck" "$W/cache-lrmt" "hf/$PRESET:transparent"
    tuned_off
    rm -rf "$W/cache-rmt" "$W/cache-lrmt"
  fi
fi

say "local criu restore + CUDA restore (baseline)"
"$B/snapctl" --json pull "hf/$PRESET:transparent" /dev/shm/local | tail -n 1 >/dev/null
local_restore local "$A" "$A.log.ck"
if [ "${LOCAL_DISK:-1}" = 1 ]; then
  say "local criu restore from this machine's disk (page cache dropped) + CUDA restore"
  rm -rf "$W/local-disk"; cp -a /dev/shm/local "$W/local-disk"; sync
  LOCAL_DIR="$W/local-disk" local_restore local_disk "$A" "$A.log.ck"
  rm -rf "$W/local-disk"
fi
if [ "${STREAM_CEILING:-1}" = 1 ]; then
  say "the same image through criu restore --stream and an ideal streamer + CUDA restore"
  ceiling_restore stream_ceiling "$A" "$A.log.ck"
fi
rm -rf /dev/shm/local

if [ "${STREAMED:-1}" = 1 ]; then
  say "pull-restore, transparent, warm node cache; then checkpoint --cuda --spool off (the freeze when the dump streams into the registry)"
  rm -f "$A/done0.json"; cp -p "$A.log.ck" "$A.log"; drop
  timeout 180 "$B/snapctl" --json --cache "$W/cache-a" pull-restore --detach "hf/$PRESET:transparent" | tail -n 1 | tee -a "$OUT/restores.jsonl" >/dev/null
  timeout 180 "$B/snapctl" --json checkpoint --cuda --spool off --pid "$PID" "hf/$PRESET:streamed" | tail -n 1 | tee "$OUT/ck-streamed.json"
  gone "$PID"
  result streamed_freeze_ms "$(python3 -c "import json; print(json.load(open('$OUT/ck-streamed.json')).get('freeze_ms'))")"
elif [ "$TRANSPARENT" = 1 ]; then
  say "pull-restore, transparent, warm node cache (the first restore's)"
  timed_restore transparent_warm "$A" "$A.log.ck" "$W/cache-a" "hf/$PRESET:transparent"
fi

if [ "${MEM_CACHE:-0}" = 1 ]; then
  say "pull-restore, transparent, the warm node cache copied into /dev/shm"
  rm -rf /dev/shm/cache-mem; cp -a "$W/cache-a" /dev/shm/cache-mem
  timed_restore transparent_memcache "$A" "$A.log.ck" /dev/shm/cache-mem "hf/$PRESET:transparent"
  rm -rf /dev/shm/cache-mem
fi

if [ "${THP_AB:-0}" = 1 ]; then
  echo always >"$THP_FILE"
  say "THP always: local criu restore + CUDA restore"
  "$B/snapctl" --json pull "hf/$PRESET:transparent" /dev/shm/local | tail -n 1 >/dev/null
  local_restore local_thp "$A" "$A.log.ck"
  rm -rf /dev/shm/local
  say "THP always: pull-restore, transparent, node cache in /dev/shm"
  cp -a "$W/cache-a" /dev/shm/cache-mem
  timed_restore transparent_memcache_thp "$A" "$A.log.ck" /dev/shm/cache-mem "hf/$PRESET:transparent"
  rm -rf /dev/shm/cache-mem
  echo "${THP:-$THP_WAS}" >"$THP_FILE"
fi

if [ "${SEPARATED:-1}" != 1 ]; then say "done (SEPARATED=0)"; cat "$OUT/summary.env"; exit 0; fi

# ---- separated
say "worker with its weights in the service"
Bc=/tmp/ctl-b
start_worker "$Bc" WORKER_WEIGHTS_SOCKET="$SOCK" WORKER_WEIGHTS_NAME="llama-$PRESET"
result separated_worker_start_wall_s "$WALL"
"$B/snapctl" --json weights ls --socket "$SOCK" | tail -n 1
touch "$Bc/quiesce"
waitfile "$Bc/quiesced.json" 30 && cat "$Bc/quiesced.json"; echo
say "checkpoint --cuda --weights-service"
timeout 180 "$B/snapctl" --json checkpoint --cuda --weights-service "$SOCK" --pid "$PID" "hf/$PRESET:separated" | tail -n 1 | tee "$OUT/ck-separated.json"
gone "$PID"
cp -p "$Bc.log" "$Bc.log.ck"
"$B/snapctl" --json inspect "hf/$PRESET:separated" | tail -n 1 | python3 -c "import json,sys; d=json.load(sys.stdin); d['criu'].pop('external_files'); print(json.dumps(d))" | tee "$OUT/inspect-separated.json"

separated_restore() { # NAME CACHE: pull-restore of the separated snapshot into the
  # weights service as it is (fresh_service first for one that must fill it from the
  # registry), to the first answer; the report goes to rs-NAME.json
  local name=$1 cache=$2 t0 t1 t2
  rm -f "$Bc/done0.json" "$Bc/resumed.json"; cp -p "$Bc.log.ck" "$Bc.log"; drop
  t0=$(now)
  timeout 180 "$B/snapctl" --json --cache "$cache" pull-restore --detach --weights-service "$SOCK" "hf/$PRESET:separated" | tail -n 1 | tee "$OUT/rs-$name.json"
  t1=$(now)
  waitfile "$Bc/resumed.json" 60 && cat "$Bc/resumed.json"; echo
  answer "$Bc" && result "${name}_equal" true || result "${name}_equal" false
  t2=$(now)
  result "${name}_restore_s" "$(el "$t0" "$t1")"
  result "${name}_first_answer_s" "$(el "$t0" "$t2")"
  account "$name"
  kill_worker
}
say "pull-restore, separated, fresh weights service (weights from the registry)"
fresh_service; separated_restore separated "$W/cache-b"
if [ -n "$TUNED" ]; then
  say "the same with $TUNED"
  fresh_service; tuned_on; separated_restore separated_tuned "$W/cache-bt"; tuned_off
  rm -rf "$W/cache-bt"
fi

say "pull-restore, separated, weights already in the service"
separated_restore separated_warm "$W/cache-c"

if [ "${LAZY:-1}" = 1 ]; then
  say "pull-restore --lazy, separated, fresh weights service"
  fresh_service
  lazy_restore separated_lazy "$Bc" "$Bc.log.ck" "$W/cache-lb" "hf/$PRESET:separated" --weights-service "$SOCK"
  if [ -n "$TUNED" ]; then
    say "the same with $TUNED"
    fresh_service
    tuned_on
    lazy_restore separated_lazy_tuned "$Bc" "$Bc.log.ck" "$W/cache-lbt" "hf/$PRESET:separated" --weights-service "$SOCK"
    tuned_off
  fi
fi

if [ -n "${AB:-}" ]; then
  # AB="name:K=V,K=V name2:…": each variant's settings exported for one separated
  # --lazy restore (fresh service; with AB_EAGER=1 an eager one too), the variants in
  # turn, REPS rounds: ab_NAME_rN_lazy, ab_NAME_rN_eager
  for rep in $(seq 1 "${REPS:-2}"); do
    for v in $AB; do
      [ "$(left)" -gt 25 ] || { say "A/B stopped at the deadline"; break 2; }
      name=${v%%:*} kvs=${v#*:}
      for kv in ${kvs//,/ }; do export "$kv"; done
      say "A/B round $rep, $name ($kvs): pull-restore --lazy, separated, fresh weights service"
      [ "${FRESH_REGISTRY:-0}" = 1 ] && restart_registry
      [ "${COMPACT_MEMORY:-0}" = 1 ] && echo 1 >/proc/sys/vm/compact_memory
      fresh_service
      lazy_restore "ab_${name}_r${rep}_lazy" "$Bc" "$Bc.log.ck" "${CACHE_DIR:-$W/cache-ab}" "hf/$PRESET:separated" --weights-service "$SOCK"
      rm -rf "${CACHE_DIR:-$W/cache-ab}"
      if [ "${AB_EAGER:-0}" = 1 ]; then
        say "A/B round $rep, $name ($kvs): pull-restore, separated, fresh weights service"
        fresh_service; separated_restore "ab_${name}_r${rep}_eager" "${CACHE_DIR:-$W/cache-ab}"
        rm -rf "${CACHE_DIR:-$W/cache-ab}"
      fi
      for kv in ${kvs//,/ }; do unset "${kv%%=*}"; done
    done
  done
fi

ps -eo pid,ppid,pgid,stat,etimes,time,rss,args --sort=-time | cut -c1-200 | head -40 >"$OUT/ps-end.txt"
cp "$W/ws.log" "$W/reg.log" "$A.log" "$Bc.log" "$OUT/" 2>/dev/null
for d in $(ls -td /run/snapctl/* 2>/dev/null | head -4); do cp "$d"/*.log "$OUT/" 2>/dev/null; done
say "done"
cat "$OUT/summary.env"
