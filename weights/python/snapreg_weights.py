"""Client of snapreg's weights service (`snapctl weights serve`), for Python workers.

No build step and no dependency beyond the standard library: the protocol is one JSON
line each way over a UNIX socket (a descriptor rides on the reply), memfd buffers are
mapped with libc's mmap and CUDA buffers through libcuda's virtual-memory API, both via
ctypes. torch is used only if you ask for tensors.

    import signal, snapreg_weights as sw
    client = sw.Client("/run/snapreg/weights.sock")
    bufs = sw.adopt_module(torch, model, client, "llama-1b")   # params now live in the service
    ... serve ...
    client.quiesce(bufs, signal.SIGUSR2)       # before `snapctl checkpoint --weights-service`
    sw.wait_for_resume()                       # `snapctl pull-restore` signals once weights are back
    client.resume(bufs)                        # same addresses: tensors and CUDA graphs stay valid

A worker never keeps a connection open (CRIU will not dump a socket connected to a
process outside the tree); each call is one connection.
"""

import ctypes
import json
import os
import signal
import socket as _socket
import threading
import time

DEFAULT_SOCKET = os.environ.get("SNAPCTL_WEIGHTS_SOCKET", "/run/snapreg/weights.sock")

# Linux mmap constants (x86_64 and aarch64 agree).
_PROT_NONE, _PROT_READ, _PROT_WRITE = 0, 1, 2
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 1, 2, 0x10, 0x20, 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value


class WeightsError(Exception):
    pass


def _call(path, request):
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            s.connect(path)
        except OSError as e:
            raise WeightsError(
                f"weights service at {path}: cannot connect ({e}): is `snapctl weights serve --socket {path}` running?"
            ) from None
        s.sendall(json.dumps(request).encode() + b"\n")
        data, fds, _, _ = _socket.recv_fds(s, 1 << 16, 1)
        while not data.endswith(b"\n"):
            more = s.recv(1 << 16)
            if not more:
                break
            data += more
    finally:
        s.close()
    reply = json.loads(data)
    if not reply.get("ok"):
        for fd in fds:
            os.close(fd)
        raise WeightsError(f"weights service at {path}: {reply.get('error', 'request refused')}")
    return reply, (fds[0] if fds else None)


# ---------------------------------------------------------------- memfd backend

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _mmap(addr, length, prot, flags, fd):
    p = _libc.mmap(addr, length, prot, flags, fd, 0)
    if p in (None, _MAP_FAILED):
        e = ctypes.get_errno()
        raise WeightsError(f"mmap of {length} bytes failed: {os.strerror(e)}")
    return p


class _Memfd:
    def reserve(self, length):
        return _mmap(None, length, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1)

    def map(self, fd, addr, length, writable):
        try:
            prot = _PROT_READ | (_PROT_WRITE if writable else 0)
            _mmap(addr, length, prot, _MAP_SHARED | _MAP_FIXED, fd)
        finally:
            os.close(fd)
        return None

    def unmap(self, addr, length, handle):
        # An empty reservation over the same range: the addresses stay ours.
        _mmap(addr, length, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED, -1)

    def free(self, addr, length):
        _libc.munmap(addr, length)


# ---------------------------------------------------------------- CUDA backend

class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", _Location), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", ctypes.c_ubyte * 8)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_POSIX_FD, _PINNED, _LOC_DEVICE, _ACCESS_READ, _ACCESS_RW = 1, 1, 1, 1, 3


class _Cuda:
    def __init__(self, device):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError:
            raise WeightsError("no NVIDIA driver: libcuda.so.1 cannot be loaded on this host") from None
        self.device = device
        self._ck(self.lib.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self._ck(self.lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
        ctx = ctypes.c_void_p()
        # The primary context: the one torch uses, so tensors over our mappings work.
        self._ck(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        self.ctx = ctx
        prop = _AllocationProp(type=_PINNED, requestedHandleTypes=_POSIX_FD,
                               location=_Location(_LOC_DEVICE, device))
        g = ctypes.c_size_t()
        self._ck(self.lib.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(prop), 0), "granularity")
        self.granularity = max(g.value, 1)

    def _ck(self, rc, what):
        if rc != 0:
            raise WeightsError(f"CUDA: {what} failed with CUDA error {rc}")

    def _current(self):
        self._ck(self.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def reserve(self, length):
        self._current()
        va = ctypes.c_uint64()
        self._ck(self.lib.cuMemAddressReserve(ctypes.byref(va), ctypes.c_size_t(length),
                                              ctypes.c_size_t(self.granularity), ctypes.c_uint64(0),
                                              ctypes.c_uint64(0)), "cuMemAddressReserve")
        return va.value

    def map(self, fd, addr, length, writable):
        self._current()
        h = ctypes.c_uint64()
        try:
            self._ck(self.lib.cuMemImportFromShareableHandle(ctypes.byref(h), ctypes.c_void_p(fd), _POSIX_FD),
                     "cuMemImportFromShareableHandle")
        finally:
            os.close(fd)
        self._ck(self.lib.cuMemMap(ctypes.c_uint64(addr), ctypes.c_size_t(length), ctypes.c_size_t(0), h,
                                   ctypes.c_uint64(0)), "cuMemMap")
        access = _AccessDesc(_Location(_LOC_DEVICE, self.device), _ACCESS_RW if writable else _ACCESS_READ)
        self._ck(self.lib.cuMemSetAccess(ctypes.c_uint64(addr), ctypes.c_size_t(length), ctypes.byref(access),
                                         ctypes.c_size_t(1)), "cuMemSetAccess")
        return h

    def unmap(self, addr, length, handle):
        # Unmapped *and* released: imported memory left behind makes the CUDA restore
        # fail (NOT_SUPPORTED) and the process hang.
        self._current()
        self._ck(self.lib.cuMemUnmap(ctypes.c_uint64(addr), ctypes.c_size_t(length)), "cuMemUnmap")
        self._ck(self.lib.cuMemRelease(handle), "cuMemRelease")

    def free(self, addr, length):
        self._current()
        self.lib.cuMemAddressFree(ctypes.c_uint64(addr), ctypes.c_size_t(length))


_backends = {}


def _backend(kind, device):
    key = (kind, device)
    if key not in _backends:
        _backends[key] = _Memfd() if kind == "memfd" else _Cuda(device)
    return _backends[key]


# ---------------------------------------------------------------- buffers

class Buffer:
    """A weight buffer mapped into this process at an address range it reserved."""

    def __init__(self, info, backend, device, fd, writable):
        self.name = info["name"]
        self.size = info["size"]
        self.alloc_size = info["alloc_size"]
        self.backend = backend
        self.device = device
        self.writable = writable
        self._b = _backend(backend, device)
        self.ptr = self._b.reserve(self.alloc_size)
        self._handle = self._b.map(fd, self.ptr, self.alloc_size, writable)
        self.mapped = True

    def _remap(self, fd):
        self._handle = self._b.map(fd, self.ptr, self.alloc_size, self.writable)
        self.mapped = True

    def _unmap(self):
        if self.mapped:
            self._b.unmap(self.ptr, self.alloc_size, self._handle)
            self._handle = None
            self.mapped = False

    def tensor(self, torch, dtype, shape, offset=0):
        """A tensor over bytes [offset, offset + numel * itemsize) of the buffer, no copy."""
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > self.size:
            raise WeightsError(f"{nbytes} bytes at {offset} do not fit buffer {self.name} ({self.size} bytes)")
        if self.backend == "cuda":
            raw = torch.as_tensor(_CudaArray(self.ptr + offset, nbytes), device=f"cuda:{self.device}")
        else:
            raw = torch.frombuffer((ctypes.c_ubyte * nbytes).from_address(self.ptr + offset), dtype=torch.uint8)
        return raw.view(dtype).view(shape)


class _CudaArray:
    def __init__(self, ptr, nbytes):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


class Client:
    def __init__(self, socket_path=DEFAULT_SOCKET):
        self.socket = socket_path

    def list(self):
        return _call(self.socket, {"op": "list"})[0]

    def _mapped(self, request, writable):
        reply, fd = _call(self.socket, request)
        if fd is None:
            raise WeightsError("the weights service sent no descriptor")
        return Buffer(reply["buffer"], reply["backend"], reply.get("device", 0), fd, writable)

    def create(self, name, size):
        """A new buffer, mapped writable and leased to this process; seal() it when filled."""
        return self._mapped({"op": "create", "name": name, "size": size}, True)

    def attach(self, name, wait=0.0):
        """An existing buffer, mapped read-only; waits up to `wait` seconds for it to be sealed."""
        return self._mapped({"op": "attach", "name": name, "wait_ms": int(wait * 1000)}, False)

    def seal(self, name):
        return _call(self.socket, {"op": "seal", "name": name})[0]

    def quiesce(self, buffers, resume_signal=signal.SIGUSR2):
        """Unmaps the buffers (their address ranges stay reserved) and releases them.
        Make sure no kernel is still reading them (torch.cuda.synchronize()) first."""
        install_resume_handler(resume_signal)
        for b in buffers:
            b._unmap()
        _call(self.socket, {"op": "release", "names": [b.name for b in buffers],
                            "resume_signal": int(resume_signal)})

    def resume(self, buffers, wait=300.0):
        """Maps each buffer again at the address it had before quiesce()."""
        for b in buffers:
            reply, fd = _call(self.socket, {"op": "attach", "name": b.name, "writable": b.writable,
                                            "wait_ms": int(wait * 1000)})
            if reply["buffer"]["alloc_size"] != b.alloc_size:
                os.close(fd)
                raise WeightsError(f"buffer {b.name} came back with another size")
            b._remap(fd)


_resumed = threading.Event()


def install_resume_handler(sig=signal.SIGUSR2):
    """Python runs signal handlers on the main thread, so whichever thread the kernel
    picks, the signal only sets an event (and never kills the process)."""
    signal.signal(sig, lambda *_: _resumed.set())


def wait_for_resume(timeout=None):
    """Blocks until `snapctl pull-restore` signals that the weights are back."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not _resumed.is_set():
        if deadline is not None and time.monotonic() > deadline:
            return False
        _resumed.wait(0.05)
    _resumed.clear()
    return True


def adopt_module(torch, module, client, name, align=256):
    """Moves every parameter of `module` into one service buffer named `name` (created
    and filled here, or attached when another worker already filled it) and points
    the parameters at it. Returns the buffers to pass to quiesce()/resume()."""
    params = []
    seen = set()
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            params.append(p)
    offsets, total = [], 0
    for p in params:
        total = (total + align - 1) // align * align
        offsets.append(total)
        total += p.numel() * p.element_size()
    existing = {b["name"]: b for b in client.list().get("buffers", [])}
    if name in existing and existing[name]["sealed"] and existing[name]["size"] == total:
        buf, fill = client.attach(name), False
    else:
        buf, fill = client.create(name, total), True
    with torch.no_grad():
        for p, off in zip(params, offsets):
            view = buf.tensor(torch, p.dtype, tuple(p.shape), off)
            if fill:
                view.copy_(p.data)
            p.data = view
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    if fill:
        client.seal(name)
    return [buf]
