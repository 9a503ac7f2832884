#!/bin/bash
# The spool's pages, A/B: `criu dump --leave-running` of a process holding NONZERO_GIB
# of non-zero memory and ZERO_GIB of written zeros, alternated REPS times between a
# directory of /dev/shm (small pages) and a tmpfs mounted `huge=always` (what
# `snapctl checkpoint --spool auto` mounts, client/src/checkpoint/huge_spool.rs).
# Prints each dump's seconds; the process stays frozen for nearly all of it.
# Needs root and CRIU (CRIU=path, else installed from .carry/criu-debs as on the
# device machine). Run from the repository root:
#   NONZERO_GIB=6 ZERO_GIB=5 bash bench/spool/huge_tmpfs_ab.sh
set -u
NONZERO_GIB=${NONZERO_GIB:-6} ZERO_GIB=${ZERO_GIB:-5} REPS=${REPS:-3}
CRIU=${CRIU:-$(deploy/install-criu.sh --from .carry/criu-debs | tail -n 1)}
HUGE=/mnt/snapreg-huge-ab
gone() { for _ in $(seq 400); do [ -e "/proc/$1" ] || return 0; sleep 0.05; done; }
mkdir -p $HUGE && mount -t tmpfs -o "size=$(( (NONZERO_GIB + ZERO_GIB) * 2 ))g,huge=always" snapreg-huge-ab $HUGE
rm -f /tmp/snapreg-huge-ab.ready
setsid python3 -c "
import os, time
a = os.urandom(1 << 20) * ($NONZERO_GIB << 10)
b = bytearray(b'\x00') * ($ZERO_GIB << 30)
open('/tmp/snapreg-huge-ab.ready', 'w').write('1')
while True: time.sleep(0.05)
" </dev/null >/dev/null 2>&1 &
P=$!
for _ in $(seq 600); do [ -s /tmp/snapreg-huge-ab.ready ] && break; sleep 0.1; done
for rep in $(seq "$REPS"); do
  for dir in /dev/shm/snapreg-huge-ab $HUGE/sp; do
    rm -rf $dir; mkdir -p $dir
    t0=$(date +%s.%N)
    "$CRIU" dump -t $P -D $dir --leave-running -o dump.log || tail -5 $dir/dump.log
    t1=$(date +%s.%N)
    echo "rep=$rep dir=$dir dump_s=$(python3 -c "print(round($t1-$t0,3))") bytes=$(du -sb $dir | cut -f1)"
    rm -rf $dir
  done
done
kill -9 $P; gone $P; umount $HUGE; rmdir $HUGE; rm -f /tmp/snapreg-huge-ab.ready
