#!/bin/bash
# Does a registry (or a node) get slower restore after restore? N pull-restore --lazy
# rounds of one CPU test process against one long-lived registry, node cache emptied
# and page cache dropped before each; per round: seconds to every page present, the
# lazy fill's fetch seconds, the registry's CPU seconds so far. The restored process
# is killed (its whole group) and gone before the next round.
#   N=12 MIB=1023 REG_DIR=/dev/shm/rounds-reg bash bench/rounds/lazy_rounds.sh
# Prints one line per round; the same lines go to bench/runs/lazy-rounds-<unix s>.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
T=$CARGO_TARGET_DIR/debug
N=${N:-12} MIB=${MIB:-1023} REG_DIR=${REG_DIR:-/dev/shm/rounds-reg}
CRIU=$(deploy/install-criu.sh | tail -n 1); export SNAPCTL_CRIU=$CRIU
W=$(mktemp -d /var/tmp/lazy-rounds.XXXXXX)
REG= PID=
cleanup() {
  [ -n "$PID" ] && { kill -9 -- "-$PID" 2>/dev/null; kill -9 "$PID" 2>/dev/null; }
  [ -n "$REG" ] && kill "$REG" 2>/dev/null
  rm -rf "$W" "$REG_DIR"
}
trap cleanup EXIT
rm -rf "$REG_DIR"
"$T/snapreg" serve --anonymous admin --listen 127.0.0.1:0 --data "$REG_DIR" >"$W/reg.out" 2>"$W/reg.log" &
REG=$!
for _ in $(seq 100); do [ -s "$W/reg.out" ] && break; sleep 0.1; done
export SNAPCTL_REGISTRY="http://$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "$W/reg.out")"
third=$((MIB / 3))
mkdir -p "$W/proc" "$W/img"
setsid "$T/snapreg-testproc" hold --out "$W/proc" --mib $third --pattern-mib $third --zero-mib $third \
  --seed 9 --pad-mib 0 --holes-kib 0 </dev/null >/dev/null 2>&1 &
PID=$!; disown
for _ in $(seq 600); do [ -e "$W/proc/state" ] && break; sleep 0.05; done
"$CRIU" dump -t "$PID" -D "$W/img" -o dump.log || { echo "criu dump failed"; exit 1; }
"$T/snapctl" --json push "$W/img" rounds/p:a >/dev/null || exit 1
out=bench/runs/lazy-rounds-$(date +%s).txt
echo "# $N rounds, ${MIB} MiB process, registry data in $REG_DIR ($(git rev-parse --short HEAD))" | tee "$out"
tck=$(getconf CLK_TCK)
for i in $(seq 1 "$N"); do
  rm -rf "$W/cache"; sync; echo 3 >/proc/sys/vm/drop_caches
  t0=$(date +%s.%N)
  "$T/snapctl" --json --cache "$W/cache" pull-restore --detach --lazy rounds/p:a >"$W/rs.json" 2>"$W/rs.err" ||
    { echo "round $i failed:"; tail -5 "$W/rs.err"; exit 1; }
  t1=$(date +%s.%N)
  python3 - "$W/rs.json" "$i" "$t0" "$t1" "$(awk -v t="$tck" '{printf "%.2f", ($14+$15)/t}' "/proc/$REG/stat")" <<'PY' | tee -a "$out"
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); l = r.get("lazy") or {}
print(f"round {sys.argv[2]}: all present {float(sys.argv[4]) - float(sys.argv[3]):.2f} s, "
      f"fill fetch {l.get('fill_fetch_seconds', 0):.1f} worker-s, registry CPU so far {sys.argv[5]} s")
PY
  kill -9 -- "-$PID" 2>/dev/null; kill -9 "$PID" 2>/dev/null
  for _ in $(seq 200); do [ -e "/proc/$PID" ] || break; sleep 0.05; done
done
