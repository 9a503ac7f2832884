# A Python worker of the weights service (memfd backend, no torch), for the end-to-end
# test of weights/python/snapreg_weights.py under a real CRIU:
#   python3 weights_worker.py SOCKET OUT_DIR NAME MIB
# Attaches NAME (or creates it and fills MIB MiB from a seed), then every 20 ms writes
# OUT_DIR/state "<counter> <pid>"; OUT_DIR/result "<address> <sha256 of the buffer>";
# OUT_DIR/quiesce -> quiesce, OUT_DIR/quiesced, wait for the resume signal, resume,
# OUT_DIR/result again and OUT_DIR/resumed.
import ctypes, hashlib, os, sys, time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "weights", "python"))
import snapreg_weights as sw

sock, out, name, mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = sw.Client(sock)
try:
    buf = client.attach(name)
except sw.WeightsError:
    buf = client.create(name, mib << 20)
    block = hashlib.sha256(b"seed").digest() * ((1 << 20) // 32)
    for i in range(mib):
        ctypes.memmove(buf.ptr + (i << 20), block[i % 32:] + block[: i % 32], 1 << 20)
    client.seal(name)


def write(fname, text):
    with open(os.path.join(out, fname + ".tmp"), "w") as f:
        f.write(text)
    os.rename(os.path.join(out, fname + ".tmp"), os.path.join(out, fname))


def report():
    digest = hashlib.sha256(ctypes.string_at(buf.ptr, buf.size)).hexdigest()
    write("result", f"{buf.ptr:#x} {digest}\n")


report()
n = 0
while True:
    n += 1
    write("state", f"{n} {os.getpid()}\n")
    if os.path.exists(os.path.join(out, "quiesce")):
        os.remove(os.path.join(out, "quiesce"))
        client.quiesce([buf])
        write("quiesced", f"{n}\n")
        sw.wait_for_resume()
        client.resume([buf])
        report()
        write("resumed", f"{n}\n")
    time.sleep(0.02)
