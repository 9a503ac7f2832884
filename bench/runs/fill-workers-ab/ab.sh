# 2-core A/B: snapctl before (16 fill workers on 2 cores) and after (one per scheduler fetch: 32)
T=/root/.cache/snapreg-target/debug
for round in 1 2; do for v in old new; do
  echo "== round $round $v"
  if [ $v = old ]; then BENCH=/tmp/oldbin/snapreg-bench; else BENCH=$T/snapreg-bench; fi
  SNAPREG_BENCH_RUNS=/tmp/fill-ab/$v-r$round SNAPCTL_CRIU=/opt/snapreg-criu/bin/criu $BENCH restore --gib 2 --reps 3 --paths 0,4
done; done
