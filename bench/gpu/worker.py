# A CUDA worker for the GPU validation run: holds a seeded fp32 matrix on the GPU and a
# counter, and answers a "go" file with a GEMM over the matrix, so the run can check
# the restored process computes exactly what it computed before the checkpoint.
# It opens and closes its files each time (nothing for CRIU to reopen).
import json, os, sys, time
import torch

ctl, mib = sys.argv[1], int(sys.argv[2])
torch.manual_seed(7)
w = torch.randn(mib * (1 << 20) // 4 // 4096, 4096, device="cuda")
x = torch.ones(64, 4096, device="cuda")


def compute():
    return float((x @ w.T).double().sum())


ref = compute()
json.dump({"pid": os.getpid(), "ref": ref}, open(ctl + "/ready.json", "w"))
n = 0
while True:
    n += 1
    with open(ctl + "/state.tmp", "w") as f:
        f.write(f"{n}\n")
    os.rename(ctl + "/state.tmp", ctl + "/state")
    if os.path.exists(ctl + "/go"):
        os.remove(ctl + "/go")
        r = compute()
        json.dump({"result": r, "ref": ref, "same": r == ref}, open(ctl + "/done.json", "w"))
    time.sleep(0.05)
