#!/usr/bin/env bash
# Transparent mode on the device machine (needs what separated.sh needs): the hf worker
# checkpointed with --cuda, then restored by the local baseline (criu restore from
# /dev/shm + CUDA restore) and by pull-restore with a cold node cache, then twice more
# from the now warm node cache (what a node pays when a model it served scales from
# zero again), interleaved with the baseline; page cache dropped before each. Every
# restore must answer with exactly the pre-checkpoint tokens and logits.
#   PRESET=medium DEADLINE=570 OUT=/tmp/warm bash bench/gpu/warm.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/snapreg-warm}" W=/var/tmp/snapreg-warm
. bench/gpu/common.sh

say "cold start ($PRESET)"
A=/tmp/ctl-a
start_worker "$A"
result cold_start_wall_s "$WALL"
say "checkpoint --cuda"
timeout 180 "$B/snapctl" --json checkpoint --cuda --pid "$PID" "hf/$PRESET:t" | tail -n 1 | tee "$OUT/ck.json"
gone "$PID"
cp -p "$A.log" "$A.log.ck"
"$B/snapctl" --json pull "hf/$PRESET:t" /dev/shm/local | tail -n 1 >/dev/null

say "pull-restore, cold node cache"
timed_restore cold "$A" "$A.log.ck" "$W/cache" "hf/$PRESET:t"
for rep in 1 2; do
  say "local baseline, rep $rep"
  local_restore "local_$rep" "$A" "$A.log.ck"
  say "pull-restore, warm node cache, rep $rep"
  timed_restore "warm_$rep" "$A" "$A.log.ck" "$W/cache" "hf/$PRESET:t"
done
rm -rf /dev/shm/local
say "done"
cat "$OUT/summary.env"
