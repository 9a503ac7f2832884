cd /work/main
mkdir -p /tmp/conn-ab
for round in 1 2; do for c in 1 4; do
  echo "== round $round connections $c"
  SNAPCTL_CHUNK_CONNECTIONS=$c SNAPREG_BENCH_RUNS=/tmp/conn-ab/c$c-r$round SNAPCTL_CRIU=/opt/snapreg-criu/bin/criu /root/.cache/snapreg-target/debug/snapreg-bench restore --gib 2 --reps 3 --paths 0,1,4
done; done
