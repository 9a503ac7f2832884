#!/usr/bin/env bash
# The fill benches on the GPU machine's host (16 cores): how fast memory goes back
# into a process (`snapreg-bench fill`: read(2) from a pipe as CRIU's streamed restore
# does, UFFDIO_COPY and memcpy from 1-16 threads), and a real CRIU lazy restore whose
# pages are filled by UFFDIO_COPY from many threads against eager `criu restore` and
# CRIU's own daemon (`snapreg-bench lazy-fill`), bench/RESULTS.md "Below CRIU's floor".
# Expects .carry/bin/{snapreg-bench,snapreg-testproc} (stripped release builds) and
# .carry/criu-debs. Raw JSON and the tables go to $OUT. About a minute at GIB=4.
#   OUT=/tmp/fill GIB=4 bash bench/gpu/fill.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/snapreg-fill}" GIB="${GIB:-4}"
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
nproc; uname -r; cat /sys/kernel/mm/transparent_hugepage/enabled
SNAPCTL_CRIU="${SNAPCTL_CRIU:-$(deploy/install-criu.sh --from .carry/criu-debs | tail -n 1)}"
export SNAPCTL_CRIU SNAPREG_BIN=$PWD/.carry/bin SNAPREG_BENCH_RUNS=$OUT
"$SNAPCTL_CRIU" --version >/dev/null 2>&1 || { echo "CRIU did not install; nothing measured"; exit 1; }
.carry/bin/snapreg-bench fill --gib "$GIB" --reps 3 --threads 1,2,4,8,16
for t in 16 4; do
  .carry/bin/snapreg-bench lazy-fill --gib "$GIB" --reps 3 --threads "$t"
done
