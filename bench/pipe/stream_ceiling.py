#!/usr/bin/env python3
"""An ideal image streamer: CRIU's streamed restore fed from a local image directory.

snapctl serves `criu restore --stream` from the chunk stack: fetches, verifies,
node-cache checks. This serves the same protocol with none of that, every file
spliced from a directory (in the page cache or /dev/shm) into the pipe CRIU hands
over, so that `criu restore --stream` of an image can be timed against
`criu restore -D` of the very same files: how fast CRIU's streamed restore can go at
all, whatever feeds it.

  python3 bench/pipe/stream_ceiling.py --images /dev/shm/local --work /tmp/sc -- \\
      /opt/snapreg-criu/bin/criu restore -d -o restore.log

The command after `--` is CRIU's, without -D and --stream (added here: -D is the work
dir, which holds the socket and the log). Prints one JSON line: CRIU's exit code, its
seconds, bytes served, and the largest file's serving time.

Protocol (shared/CRIU-STREAM.md §2, §4): CRIU connects once to
<work>/streamer-serve.sock; per file a u32-LE-framed request (field 1: the name),
a framed reply (field 1: exists, always present), then for an existing file one
byte with the pipe's write end as SCM_RIGHTS. EOF on the socket: no more files.
"""
import argparse, array, fcntl, json, os, socket, subprocess, sys, threading, time

F_SETPIPE_SZ = 1031


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            return None
        buf += got
    return buf


def request_name(body):
    # field 1 (tag 0x0a), a varint length, the UTF-8 name
    assert body[0] == 0x0A, body
    n, shift, i = 0, 0, 1
    while True:
        b = body[i]
        n |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            break
        shift += 7
    return body[i : i + n].decode()


def recv_fd(sock):
    fds = array.array("i")
    _, anc, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: fds.itemsize])
    return fds[0]


def serve_file(path, pipe, stats):
    t0 = time.monotonic()
    sent = 0
    try:
        fcntl.fcntl(pipe, F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            while sent < size:
                n = os.splice(f.fileno(), pipe, min(size - sent, 1 << 20), offset_src=sent)
                if n == 0:
                    break
                sent += n
    except BrokenPipeError:
        pass
    finally:
        os.close(pipe)
    stats.append((os.path.basename(path), sent, time.monotonic() - t0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("criu", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = [c for c in a.criu if c != "--"]
    os.makedirs(a.work, exist_ok=True)
    sock_path = os.path.join(a.work, "streamer-serve.sock")
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(sock_path)
    lst.listen(1)
    t0 = time.monotonic()
    criu = subprocess.Popen(cmd[:2] + ["-D", a.work, "--stream"] + cmd[2:])
    lst.settimeout(60)
    conn, _ = lst.accept()
    stats, threads = [], []
    while True:
        head = read_exact(conn, 4)
        if head is None:
            break
        body = read_exact(conn, int.from_bytes(head, "little"))
        name = request_name(body)
        path = os.path.join(a.images, name)
        exists = os.path.isfile(path)
        conn.sendall(b"\x02\x00\x00\x00\x08" + (b"\x01" if exists else b"\x00"))
        if exists:
            t = threading.Thread(target=serve_file, args=(path, recv_fd(conn), stats))
            t.start()
            threads.append(t)
    rc = criu.wait()
    seconds = time.monotonic() - t0
    for t in threads:
        t.join()
    largest = max(stats, key=lambda s: s[1], default=("", 0, 0.0))
    print(json.dumps({
        "criu_rc": rc,
        "criu_seconds": round(seconds, 3),
        "files": len(stats),
        "bytes": sum(s[1] for s in stats),
        "largest": {"file": largest[0], "bytes": largest[1], "seconds": round(largest[2], 3)},
    }))
    sys.exit(0 if rc == 0 else 1)


if __name__ == "__main__":
    main()
