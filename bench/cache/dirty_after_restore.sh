#!/bin/bash
# What a cold pull-restore leaves for the kernel to write back: a 2 GiB bench process
# (a third each of pattern, pad-free data and touched zeros, as `snapreg-bench restore`
# holds) checkpointed into a loopback registry, the page cache dropped, then
# `pull-restore --detach` into an empty node cache. Prints Dirty/Writeback from
# /proc/meminfo before and after, the command's seconds, the time from its return to
# the process's next tick (it rewrites DIR/state every 20 ms), and Dirty/Writeback
# each second for 3 s. Needs root and CRIU (SNAPCTL_CRIU); SNAPREG_BIN holds the
# binaries (default: the debug target dir). Run from anywhere:
#   SNAPCTL_CRIU=/opt/snapreg-criu/bin/criu bash bench/cache/dirty_after_restore.sh
set -u
B=${SNAPREG_BIN:-${CARGO_TARGET_DIR:-/root/.cache/snapreg-target}/debug}
W=/var/tmp/snapreg-dirty-probe
mem() { grep -E "^(Dirty|Writeback):" /proc/meminfo | tr -s ' \n' ' '; echo; }
rm -rf "$W"; mkdir -p "$W/out"
"$B/snapreg" serve --anonymous admin --listen 127.0.0.1:0 --data "$W/reg" >"$W/reg.out" 2>"$W/reg.log" &
REG=$!
trap 'kill -9 $REG $(cut -d" " -f2 "$W/out/state" 2>/dev/null) 2>/dev/null; sleep 0.5; rm -rf "$W"' EXIT
for _ in $(seq 100); do [ -s "$W/reg.out" ] && break; sleep 0.1; done
export SNAPCTL_REGISTRY="http://$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "$W/reg.out")"
setsid "$B/snapreg-testproc" hold --out "$W/out" --mib 683 --pattern-mib 683 --zero-mib 683 --seed 9 </dev/null >/dev/null 2>&1 &
for _ in $(seq 400); do [ -e "$W/out/state" ] && break; sleep 0.05; done
PID=$(cut -d' ' -f2 "$W/out/state")
"$B/snapctl" --json checkpoint --pid "$PID" probe/dirty:1 | tail -n 1 >/dev/null
for _ in $(seq 400); do [ -e "/proc/$PID" ] || break; sleep 0.05; done
sync; echo 3 >/proc/sys/vm/drop_caches
echo "before: $(mem)"
t0=$(date +%s.%N)
"$B/snapctl" --json --cache "$W/cache" pull-restore --detach probe/dirty:1 | tail -n 1 >"$W/restore.json"
t1=$(date +%s.%N)
echo "after:  $(mem)"
c0=$(cut -d' ' -f1 "$W/out/state")
for _ in $(seq 2000); do [ "$(cut -d' ' -f1 "$W/out/state" 2>/dev/null)" != "$c0" ] && break; sleep 0.005; done
t2=$(date +%s.%N)
python3 -c "import json; print('restore_s', round($t1 - $t0, 3), 'first_tick_after_s', round($t2 - $t1, 3), 'bytes_transferred', json.load(open('$W/restore.json'))['bytes_transferred'])"
for s in 1 2 3; do sleep 1; echo "+${s}s:    $(mem)"; done
