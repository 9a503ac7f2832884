#!/bin/bash
# A/B: node cache stored before (B: c7e5b19) or behind (C) the restore's readers,
# with the kernel's dirty limit at 32 MiB (a node whose disk is behind), then default.
set -u
restore_dirty() { echo 20 > /proc/sys/vm/dirty_ratio; echo 10 > /proc/sys/vm/dirty_background_ratio; }
trap restore_dirty EXIT
for mode in throttled default; do
  for round in 1 2; do
    for v in B C; do
      if [ $mode = throttled ]; then echo 33554432 > /proc/sys/vm/dirty_bytes; echo 16777216 > /proc/sys/vm/dirty_background_bytes; else restore_dirty; fi
      echo "== $mode $v round $round"
      SNAPREG_BIN=/tmp/bin$v SNAPREG_BENCH_RUNS=/tmp/cache-ab-runs/$mode-$v SNAPCTL_CRIU=/opt/snapreg-criu/bin/criu /tmp/bin$v/snapreg-bench restore --gib 2 --reps 2 --paths 0,1,4 --rss-gib 0.5 2>&1 | grep "^| \(criu\|snapctl\)"
    done
  done
  [ $mode = throttled ] && restore_dirty
done
