#!/usr/bin/env bash
# Encryption at rest on the GPU restore path, one run (the device machine; needs what
# separated.sh needs). The hf worker is checkpointed twice with --cuda: plaintext with
# --leave-running, then under a tenant key; then each snapshot is pull-restored from a
# cold node cache, alternating plaintext / encrypted, REPS times each, page cache
# dropped before each. Every restore must answer with exactly the tokens and logits
# the worker produced before its checkpoints.
#   PRESET=medium REPS=2 DEADLINE=570 OUT=/tmp/enc bash bench/gpu/encrypted.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/snapreg-enc}" W=/var/tmp/snapreg-enc
REPS="${REPS:-2}"
. bench/gpu/common.sh
KEY="$W/tenant.key"
"$B/snapctl" key new --tenant bench "$KEY"

say "cold start ($PRESET)"
A=/tmp/ctl-a
start_worker "$A"
result cold_start_wall_s "$WALL"
# The restored worker reopens its log, and CRIU insists on the size it had at each
# checkpoint: keep a copy per snapshot to put back before its restores.
say "checkpoint --cuda --leave-running (plaintext)"
timeout 180 "$B/snapctl" --json checkpoint --cuda --leave-running --pid "$PID" "hf/$PRESET:plain" | tail -n 1 | tee "$OUT/ck-plain.json"
cp -p "$A.log" "$A.log.plain"
say "checkpoint --cuda (encrypted)"
timeout 180 "$B/snapctl" --json --key-file "$KEY" checkpoint --cuda --pid "$PID" "hf/$PRESET:encrypted" | tail -n 1 | tee "$OUT/ck-encrypted.json"
gone "$PID"
cp -p "$A.log" "$A.log.encrypted"

for rep in $(seq "$REPS"); do
  for mode in plain encrypted; do
    say "pull-restore $mode, rep $rep"
    key=(); [ "$mode" = encrypted ] && key=(--key-file "$KEY")
    timed_restore "${mode}_$rep" "$A" "$A.log.$mode" "$W/cache-$mode-$rep" "hf/$PRESET:$mode" "${key[@]}"
  done
done
say "done"
cat "$OUT/summary.env"
