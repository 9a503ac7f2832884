#!/bin/bash
# A/B under write pressure: node cache inserts inline (B: main 7b3f7ad) or behind the
# restore's readers (C: branch node-cache-behind 09bb78f), --lazy and --fill-first cold.
set -u
restore_dirty() { echo 20 > /proc/sys/vm/dirty_ratio; echo 10 > /proc/sys/vm/dirty_background_ratio; }
trap restore_dirty EXIT
echo 33554432 > /proc/sys/vm/dirty_bytes; echo 16777216 > /proc/sys/vm/dirty_background_bytes
for round in 1 2; do
  for v in B C; do
    echo "== throttled $v round $round"
    SNAPREG_BIN=/tmp/bin$v SNAPREG_BENCH_RUNS=/tmp/ncb-ab-runs/throttled-$v SNAPCTL_CRIU=/opt/snapreg-criu/bin/criu /tmp/bin$v/snapreg-bench restore --gib 2 --reps 2 --paths 0,4,6 --rss-gib "" 2>&1 | grep "^| \(criu\|snapctl\)"
  done
done
