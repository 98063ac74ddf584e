"""The few kernel ABIs the bench's own peers need: process_vm_readv, userfaultfd ioctls, PAGEMAP_SCAN.

Kept apart from ``snapfs.capture`` on purpose: the peers (stop-copy, pre-copy, the floors) must
not depend on snapfs's engine, only on the kernel. ctypes and ``fcntl.ioctl`` release the GIL,
so copy threads run beside compression threads.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import os
import socket
from dataclasses import dataclass

import numpy as np

PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [
    ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
    ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong,
]
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = _libc.process_vm_readv.argtypes
IOV_MAX = 1024


def process_vm_readv(pid: int, buf: np.ndarray, remote: list[tuple[int, int]]) -> int:
    """Read the remote ranges ``[(addr, length)]`` of ``pid`` back to back into ``buf``.

    Returns the number of bytes read; raises OSError on failure (a short read is an error).
    """
    return _transfer(_libc.process_vm_readv, "process_vm_readv", pid, buf, remote)


def process_vm_writev(pid: int, buf: np.ndarray, remote: list[tuple[int, int]]) -> int:
    """Write ``buf`` back to back into the remote ranges of ``pid``; returns bytes written."""
    return _transfer(_libc.process_vm_writev, "process_vm_writev", pid, buf, remote)


def _transfer(fn, what: str, pid: int, buf: np.ndarray, remote: list[tuple[int, int]]) -> int:
    base = buf.ctypes.data
    total = 0
    for i in range(0, len(remote), IOV_MAX):
        part = remote[i : i + IOV_MAX]
        n = sum(length for _, length in part)
        local = _IoVec(base + total, n)
        rv = (_IoVec * len(part))(*[_IoVec(a, length) for a, length in part])
        got = fn(pid, ctypes.byref(local), 1, rv, len(part), 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}(pid {pid}): {os.strerror(err)}")
        if got != n:
            raise OSError(0, f"{what}(pid {pid}): short transfer {got} of {n} bytes")
        total += n
    return total


# ---- userfaultfd (linux/userfaultfd.h; features newer than the installed 6.1 headers) ----

def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


UFFD_API = 0xAA
UFFDIO_API = _iowr(0xAA, 0x3F, 24)
UFFDIO_REGISTER = _iowr(0xAA, 0x00, 32)
UFFDIO_UNREGISTER = (2 << 30) | (16 << 16) | (0xAA << 8) | 0x01  # _IOR
UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, 24)
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_WP_ASYNC = 1 << 15

# PAGEMAP_SCAN (linux/fs.h, 6.7+)
PAGEMAP_SCAN = _iowr(ord("f"), 16, 96)
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_PRESENT = 1 << 3


def uffd_api(uffd: int, features: int) -> None:
    """UFFDIO_API handshake with the requested features."""
    arg = np.array([UFFD_API, features, 0], dtype=np.uint64)
    fcntl.ioctl(uffd, UFFDIO_API, memoryview(arg).cast("B"))


def uffd_register_wp(uffd: int, start: int, length: int) -> None:
    """Register ``[start, start+length)`` of the uffd's mm for write-protect tracking."""
    arg = np.array([start, length, UFFDIO_REGISTER_MODE_WP, 0], dtype=np.uint64)
    fcntl.ioctl(uffd, UFFDIO_REGISTER, memoryview(arg).cast("B"))


def uffd_unregister(uffd: int, start: int, length: int) -> None:
    """Unregister a range (the kernel clears its write protection)."""
    arg = np.array([start, length], dtype=np.uint64)
    fcntl.ioctl(uffd, UFFDIO_UNREGISTER, memoryview(arg).cast("B"))


def uffd_writeprotect(uffd: int, start: int, length: int, protect: bool) -> None:
    """Write-protect (or unprotect, waking writers) a range."""
    arg = np.array([start, length, UFFDIO_WRITEPROTECT_MODE_WP if protect else 0], dtype=np.uint64)
    fcntl.ioctl(uffd, UFFDIO_WRITEPROTECT, memoryview(arg).cast("B"))


def receive_uffd(socket_path: str) -> int:
    """Take a fresh userfaultfd from a memwriter started with ``--uffd-handoff socket_path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(socket_path)
        fds = array.array("i")
        msg, anc, _flags, _addr = s.recvmsg(256, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: fds.itemsize])
        if not fds:
            raise OSError(0, f"target gave no userfaultfd: {msg[1:].decode(errors='replace')}")
        return fds[0]


def acquire_uffd(pid: int, handoff_path: str | None) -> tuple[int, str]:
    """A userfaultfd of ``pid``'s mm (no UFFDIO_API done yet) and where it came from.

    Prefers snapfs's own freeze (ptrace injection, ``snapfs.capture.freeze.frozen``), which
    works on any process; falls back to memwriter's ``--uffd-handoff`` socket when that package
    is not importable or fails.
    """
    reason = ""
    try:
        import trio

        from snapfs.capture.freeze import frozen
    except ImportError as e:
        reason = f"snapfs.capture.freeze not importable: {e}"
    else:
        async def take() -> int:
            async with frozen(pid) as target:
                fd = target.uffd.fd
                target.uffd.fd = -1  # ours now: the Uffd object must not close it
                return fd
        try:
            return trio.run(take), "snapfs.capture.freeze.frozen (ptrace injection)"
        except Exception as e:  # noqa: BLE001 - any failure: say why, use the fallback
            reason = f"snapfs freeze failed: {e}"
    if not handoff_path:
        raise OSError(0, f"no userfaultfd for pid {pid}: {reason}")
    return receive_uffd(handoff_path), f"memwriter --uffd-handoff ({reason})"


@dataclass
class PagemapScanner:
    """PAGEMAP_SCAN on /proc/PID/pagemap: find (and re-protect) pages written since the last scan."""

    pid: int
    max_regions: int = 65536

    def __post_init__(self) -> None:
        self.fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.vec = np.zeros((self.max_regions, 3), dtype=np.uint64)
        self.arg = np.zeros(12, dtype=np.uint64)

    def written(self, start: int, end: int, reprotect: bool) -> list[tuple[int, int]]:
        """Ranges ``(addr, length)`` in ``[start, end)`` written since protected.

        With ``reprotect`` the same ioctl write-protects them again (WP_ASYNC tracking), so the
        next scan reports only writes that happen after this one.
        """
        out: list[tuple[int, int]] = []
        flags = (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC) if reprotect else 0
        pos = start
        while pos < end:
            a = self.arg
            a[:] = [96, flags, pos, end, 0, self.vec.ctypes.data, self.max_regions, 0,
                    0, PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN]
            n = fcntl.ioctl(self.fd, PAGEMAP_SCAN, memoryview(a).cast("B"))
            if n:
                v = self.vec[:n]
                out.extend(zip(v[:, 0].tolist(), (v[:, 1] - v[:, 0]).tolist()))
            walk_end = int(a[4])
            if walk_end <= pos:
                break
            pos = walk_end
        return out

    def close(self) -> None:
        """Close the pagemap file."""
        os.close(self.fd)
