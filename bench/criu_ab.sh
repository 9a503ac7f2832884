#!/bin/bash
# The CPU restore bench (snapreg-bench restore) under two CRIUs, alternated rep by rep
# on one machine, so both sides (the local `criu restore` baseline and snapctl's
# restores) are measured with each CRIU in the same run:
#   A=/opt/snapreg-criu/bin/criu B=/opt/criu43/bin/criu REPS=3 GIB=2 PATHS=1,3,4 \
#     bash bench/criu_ab.sh
# B comes from `SNAPREG_CRIU_PREFIX=/opt/criu43 SNAPREG_CRIU_SUITES=sid+experimental
# deploy/install-criu.sh` (CRIU 4.3 from Debian experimental). Raw JSON per rep and
# side under bench/runs/criu-ab-<unix s>/{a,b}/; the medians are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
A=${A:-/opt/snapreg-criu/bin/criu} B=${B:-/opt/criu43/bin/criu}
REPS=${REPS:-3} GIB=${GIB:-2} PATHS=${PATHS:-1,3,4}
out=$PWD/bench/runs/criu-ab-$(date +%s)
for side in a b; do mkdir -p "$out/$side"; done
{ echo "a: $A ($("$A" --version | head -1))"; echo "b: $B ($("$B" --version | head -1))"; } | tee "$out/criu.txt"
for rep in $(seq 1 "$REPS"); do
  for side in a b; do
    criu=$A; [ $side = b ] && criu=$B
    echo "### rep $rep, $side"
    SNAPCTL_CRIU=$criu SNAPREG_BENCH_RUNS="$out/$side" \
      "$CARGO_TARGET_DIR/debug/snapreg-bench" restore --gib "$GIB" --reps 1 --rss-gib x --paths "$PATHS" |
      grep -E "^\| (criu|snapctl)"
  done
done
python3 - "$out" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
side = {}
for s in ("a", "b"):
    for f in sorted(glob.glob(f"{out}/{s}/restore-*.json")):
        j = json.load(open(f))
        for n, fa, cs in zip(j["names"], j["first_answer_seconds"], j["command_seconds"]):
            if fa:
                side.setdefault(s, {}).setdefault(n, ([], []))
                side[s][n][0].extend(fa); side[s][n][1].extend(cs)
print("| restore path | A first answer (median) | B | B/A | A all present | B | B/A |")
print("|---|---|---|---|---|---|---|")
for n in side["a"]:
    a, b = side["a"][n], side["b"][n]
    fa, fb = statistics.median(a[0]), statistics.median(b[0])
    ca, cb = statistics.median(a[1]), statistics.median(b[1])
    print(f"| {n} | {fa:.2f} | {fb:.2f} | {fb/fa:.2f} | {ca:.2f} | {cb:.2f} | {cb/ca:.2f} |")
PY
