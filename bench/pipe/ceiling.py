#!/usr/bin/env python3
"""How fast can CRIU's streamed restore take pages from a pipe, against reading them
from a file in /dev/shm (what a local `criu restore` does)?

CRIU's streamer page reader (criu/pagemap.c, maybe_read_page_img_streamer) read()s
each pagemap run whole from the pipe snapctl feeds, into freshly mapped anonymous
memory; a local restore preadv()s the same runs from pages-N.img. This reproduces
both readers on one process's worth of pages and feeds the pipe the ways snapctl can:
splice from a node-cache file in the page cache, or write from its own memory.

  python3 bench/pipe/ceiling.py --gib 2 --dir /var/tmp   # JSON lines on stdout

Each line: the feed, the pipe size asked for and the one granted (above
/proc/sys/fs/pipe-max-size F_SETPIPE_SZ is refused and the pipe keeps 64 KiB), the
reader's run length, and GB/s into the destination memory. Needs Python >= 3.10 (os.splice).
"""
import argparse, fcntl, json, mmap, os, threading, time

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032


def fresh(n):
    return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def make(path, size):
    if not (os.path.exists(path) and os.path.getsize(path) == size):
        with open(path, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
    with open(path, "rb") as f:  # into the page cache
        while f.read(1 << 24):
            pass


def pread(path, size, run):
    dst = fresh(size)
    mv, fd, off = memoryview(dst), os.open(path, os.O_RDONLY), 0
    t0 = time.monotonic()
    while off < size:
        off += os.preadv(fd, [mv[off:off + run]], off)
    dt = time.monotonic() - t0
    os.close(fd); mv.release(); dst.close()
    return dt


def piped(path, size, run, pipe_mib, feed):
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, pipe_mib << 20)
    except OSError:
        pass
    granted = fcntl.fcntl(w, F_GETPIPE_SZ)
    data = open(path, "rb").read() if feed == "write" else None

    def writer():
        fd, off = os.open(path, os.O_RDONLY), 0
        while off < size:
            if feed == "splice":
                off += os.splice(fd, w, size - off, offset_src=off)
            else:
                off += os.write(w, memoryview(data)[off:off + (2 << 20)])
        os.close(fd); os.close(w)

    dst = fresh(size)
    mv, off = memoryview(dst), 0
    th = threading.Thread(target=writer)
    t0 = time.monotonic()
    th.start()
    while off < size:  # CRIU's loop: read() until the run is whole
        end = min(off + run, size)
        while off < end:
            n = os.readv(r, [mv[off:end]])
            if n == 0:
                raise SystemExit("pipe ended early")
            off += n
    dt = time.monotonic() - t0
    th.join(); os.close(r); mv.release(); dst.close()
    return dt, granted


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--shm", default="/dev/shm")
    ap.add_argument("--pipes", default="1,16,64", help="pipe sizes to ask for, MiB")
    ap.add_argument("--runs", default="64,1024,65536", help="reader run lengths, KiB")
    a = ap.parse_args()
    size = int(a.gib * (1 << 30)) >> 20 << 20
    cached = os.path.join(a.dir, "ceiling.dat")
    shm = os.path.join(a.shm, "ceiling.dat")
    make(cached, size); make(shm, size)
    try:
        for run in [int(x) << 10 for x in a.runs.split(",")]:
            dt = pread(shm, size, run)
            print(json.dumps({"feed": "pread /dev/shm", "run_kib": run >> 10, "gb_s": round(size / dt / 1e9, 3)}), flush=True)
            for feed in ("splice", "write"):
                for mib in [int(x) for x in a.pipes.split(",")]:
                    dt, granted = piped(cached, size, run, mib, feed)
                    print(json.dumps({"feed": feed, "asked_mib": mib, "pipe_kib": granted >> 10, "run_kib": run >> 10, "gb_s": round(size / dt / 1e9, 3)}), flush=True)
    finally:
        os.unlink(shm)


if __name__ == "__main__":
    main()
