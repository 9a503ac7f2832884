#!/bin/bash
# A/B: the snapctl before (one piece per claim) and after (one chunk per claim), alternated.
T=/root/.cache/snapreg-target/debug  # /tmp/ab/{before,after}: snapctl + snapreg of 988a3a8 and of this change, the same testproc
for run in 1 2; do
  for v in before after; do
    echo "== run $run $v $(date +%T)"
    SNAPREG_BIN=/tmp/ab/$v SNAPREG_BENCH_RUNS=/tmp/ab/runs-$v SNAPCTL_CRIU=/opt/snapreg-criu/bin/criu $T/snapreg-bench restore --gib 2 --reps 3 --paths 4 --holes-kib 64 --rss-gib ""
  done
done
echo done
