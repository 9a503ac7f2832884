#!/bin/bash
# Does a registry (or a node) get slower restore after restore? N pull-restore --lazy
# rounds of one CPU test process against one long-lived registry, node cache emptied
# and page cache dropped before each; per round: seconds to every page present, the
# lazy fill's fetch seconds, the registry's CPU seconds so far and RSS. The restored process
# is killed (its whole group) and gone before the next round.
#   N=12 MIB=1023 REG_DIR=/dev/shm/rounds-reg bash bench/rounds/lazy_rounds.sh
# WEIGHTS_MIB=M: separated mode, as bench/gpu/separated.sh's A/B runs it on a GPU: the
# worker holds M MiB of weights from `snapctl weights serve` (memfd backend) and MIB of
# its own, is checkpointed without the weights, and every round restores it into a
# freshly started service.
# PROFILE="1 16": perf records the registry during those rounds; the top of each
# profile goes to bench/runs/lazy-rounds-<unix s>-perf-rN.txt.
# Prints one line per round; the same lines go to bench/runs/lazy-rounds-<unix s>.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
T=$CARGO_TARGET_DIR/debug
N=${N:-12} MIB=${MIB:-1023} REG_DIR=${REG_DIR:-/dev/shm/rounds-reg} WEIGHTS_MIB=${WEIGHTS_MIB:-0}
CRIU=$(deploy/install-criu.sh | tail -n 1); export SNAPCTL_CRIU=$CRIU
W=$(mktemp -d /var/tmp/lazy-rounds.XXXXXX)
REG= PID= WS=
cleanup() {
  [ -n "$PID" ] && { kill -9 -- "-$PID" 2>/dev/null; kill -9 "$PID" 2>/dev/null; }
  [ -n "$WS" ] && kill -9 "$WS" 2>/dev/null
  [ -n "$REG" ] && kill "$REG" 2>/dev/null
  rm -rf "$W" "$REG_DIR"
}
trap cleanup EXIT
gone() { for _ in $(seq 200); do [ -e "/proc/$1" ] || return 0; sleep 0.05; done; }
waitfile() { for _ in $(seq $(($2 * 20))); do [ -e "$1" ] && return 0; sleep 0.05; done; return 1; }
start_service() { # a fresh weights service on $W/ws.sock
  [ -n "$WS" ] && { kill -9 "$WS" 2>/dev/null; gone "$WS"; }
  rm -f "$W/ws.sock" "$W/ws.out"
  "$T/snapctl" --json weights serve --backend memfd --socket "$W/ws.sock" >"$W/ws.out" 2>/dev/null &
  WS=$!; disown
  waitfile "$W/ws.sock" 10 || { echo "the weights service did not start"; exit 1; }
}
rm -rf "$REG_DIR"
"$T/snapreg" serve --anonymous admin --listen 127.0.0.1:0 --data "$REG_DIR" >"$W/reg.out" 2>"$W/reg.log" &
REG=$!
for _ in $(seq 100); do [ -s "$W/reg.out" ] && break; sleep 0.1; done
export SNAPCTL_REGISTRY="http://$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "$W/reg.out")"
mkdir -p "$W/proc" "$W/img"
sep=()
if [ "$WEIGHTS_MIB" -gt 0 ]; then
  start_service
  sep=(--weights-service "$W/ws.sock")
  setsid "$T/snapreg-testproc" weights --out "$W/proc" --socket "$W/ws.sock" --name rounds/w \
    --mib "$WEIGHTS_MIB" --state-mib "$MIB" --seed 7 </dev/null >/dev/null 2>&1 &
  PID=$!; disown
  waitfile "$W/proc/result" 120 || { echo "the worker did not start"; exit 1; }
  touch "$W/proc/quiesce"; waitfile "$W/proc/quiesced" 30 || { echo "no quiesce"; exit 1; }
  "$T/snapctl" --json checkpoint --pid "$PID" "${sep[@]}" rounds/p:a >/dev/null || exit 1
else
  third=$((MIB / 3))
  setsid "$T/snapreg-testproc" hold --out "$W/proc" --mib $third --pattern-mib $third --zero-mib $third \
    --seed 9 --pad-mib 0 --holes-kib 0 </dev/null >/dev/null 2>&1 &
  PID=$!; disown
  waitfile "$W/proc/state" 30
  "$CRIU" dump -t "$PID" -D "$W/img" -o dump.log || { echo "criu dump failed"; exit 1; }
  "$T/snapctl" --json push "$W/img" rounds/p:a >/dev/null || exit 1
fi
gone "$PID"
out=bench/runs/lazy-rounds-$(date +%s).txt
echo "# $N rounds, ${MIB} MiB process, ${WEIGHTS_MIB} MiB weights, registry data in $REG_DIR ($(git rev-parse --short HEAD))" | tee "$out"
tck=$(getconf CLK_TCK)
for i in $(seq 1 "$N"); do
  [ "$WEIGHTS_MIB" -gt 0 ] && start_service
  rm -rf "$W/cache" "$W/proc/resumed"; sync; echo 3 >/proc/sys/vm/drop_caches
  perf_pid=
  if [[ " ${PROFILE:-} " == *" $i "* ]]; then
    perf record -q -F 499 -g -p "$REG" -o "$W/perf-$i.data" 2>/dev/null &
    perf_pid=$!; sleep 0.5
  fi
  t0=$(date +%s.%N)
  "$T/snapctl" --json --cache "$W/cache" pull-restore --detach --lazy "${sep[@]}" rounds/p:a >"$W/rs.json" 2>"$W/rs.err" ||
    { echo "round $i failed:"; tail -5 "$W/rs.err"; exit 1; }
  t1=$(date +%s.%N)
  python3 - "$W/rs.json" "$i" "$t0" "$t1" "$(awk -v t="$tck" '{printf "%.2f", ($14+$15)/t}' "/proc/$REG/stat")" \
    "$(awk '/^VmRSS/{printf "%.0f", $2/1024}' "/proc/$REG/status")" <<'PY' | tee -a "$out"
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); l = r.get("lazy") or {}
w = (r.get("weights") or {}).get("in_at_seconds")
print(f"round {sys.argv[2]}: all present {float(sys.argv[4]) - float(sys.argv[3]):.2f} s, "
      f"fill fetch {l.get('fill_fetch_seconds', 0):.1f} worker-s, "
      + (f"weights in {w:.2f} s, " if w is not None else "")
      + f"registry CPU so far {sys.argv[5]} s, RSS {sys.argv[6]} MiB")
PY
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid"; wait "$perf_pid"
    perf report -q -i "$W/perf-$i.data" --stdio --no-children --percent-limit 1 -g none 2>/dev/null |
      head -60 >"${out%.txt}-perf-r$i.txt"
  fi
  if [ "$WEIGHTS_MIB" -gt 0 ]; then
    waitfile "$W/proc/resumed" 60 || { echo "round $i: the restored worker did not resume"; exit 1; }
  fi
  kill -9 -- "-$PID" 2>/dev/null; kill -9 "$PID" 2>/dev/null
  gone "$PID"
done
