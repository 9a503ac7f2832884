# Baseline for bench/gpu/run.sh: NVIDIA's checkpoint API driven from cuda-python, one
# process per call (what a node does without snapctl). Prints the API calls' own time.
import sys, time
from cuda.bindings import driver as cu

op, pid = sys.argv[1], int(sys.argv[2])


def ok(r, what):
    err = r[0] if isinstance(r, tuple) else r
    if err != cu.CUresult.CUDA_SUCCESS:
        sys.exit(f"{what} failed: {err}")


t_init = time.time()
ok(cu.cuInit(0), "cuInit")
t = time.time()
if op == "checkpoint":
    ok(cu.cuCheckpointProcessLock(pid, None), "lock")
    ok(cu.cuCheckpointProcessCheckpoint(pid, None), "checkpoint")
else:
    ok(cu.cuCheckpointProcessRestore(pid, None), "restore")
    ok(cu.cuCheckpointProcessUnlock(pid, None), "unlock")
print(f"{op}: cuInit {t - t_init:.3f}s, api {time.time() - t:.3f}s")
