"""The native fault loop (fastfault.c): build on demand, load with ctypes, share its ring.

The loop serves the common write fault (one 4 KiB page of a populated, non-huge extent)
without the GIL; :mod:`~snapfs.capture.faults` starts it in a worker thread and handles
everything it forwards. It is compiled with the system C compiler into a per-user cache
(``$XDG_CACHE_HOME/snapfs``, 0700) the first time it is needed; while that runs, or if no
compiler is available (or with ``SNAPFS_NO_NATIVE=1``), the Python fault thread serves
every fault (slower, same result).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from snapfs.capture import kernel as k
from snapfs.capture.ledger import Ledger
from snapfs.native import NativeLibrary

SOURCE = Path(__file__).with_name("fastfault.c")
RING_PAGES = 2048  # 8 MiB of saved pages between the loop and the store
HEAD, TAIL, FAULTS, ARMED = range(4)  # the shared counters (see fastfault.c)


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.snapfs_fault_loop
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int] * 5 + [ctypes.c_ulong] + [ctypes.c_void_p] * 4 + [
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_uint64, ctypes.c_void_p,
    ]  # fmt: skip


_native = NativeLibrary(SOURCE, _declare)  # CDLL: the loop blocks, so the GIL is released


def library() -> ctypes.CDLL | None:
    """The loaded native loop, or None if it is not built (yet): a first call starts the
    build in a background thread, so no capture waits for the compiler."""
    return _native.get()


def ensure_built(timeout: float | None = None) -> bool:
    """Build (waiting up to ``timeout``) and load the loop; True if available."""
    return _native.ensure_built(timeout)


_spare_rings: list[np.ndarray] = []


def new_ring() -> np.ndarray:
    """A ring of saved pages, every page touched (not on the fault path)."""
    pages = np.zeros((RING_PAGES, k.PAGE_SIZE), np.uint8)
    pages[:, 0] = 0
    return pages


def preallocate_ring() -> None:
    """Allocate the next capture's ring now (~2.5 ms; the engine does it before the freeze,
    since the fault path starts while the target is still stopped)."""
    if not _spare_rings:
        _spare_rings.append(new_ring())


class NativeLoop:
    """One run of the native loop over one uffd: its ring, counters and pipes."""

    def __init__(self, lib: ctypes.CDLL, pid: int, uffd: int, stop_fd: int, ledger: Ledger) -> None:
        self.lib = lib
        self.pid = pid
        self.uffd = uffd
        self.stop_fd = stop_fd
        self.ledger = ledger
        self.pages = _spare_rings.pop() if _spare_rings else new_ring()
        self.records = np.zeros((RING_PAGES, 2), np.uint64)  # (address, extent)
        self.counters = np.zeros(4, np.uint64)
        # Both ends non-blocking: the loop waits for room with ppoll, and gives up on stop.
        self.forward_r, self.forward_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.consumed = 0  # records handed to the store side (<= head)
        self.faults_seen = 0
        self._huge = ledger.ext_huge.astype(np.uint8)

    def run(self) -> int:
        """The loop itself (blocks until stop_fd is readable): 0 or -errno."""
        led = self.ledger
        ptr = lambda a: a.ctypes.data  # noqa: E731
        return self.lib.snapfs_fault_loop(
            self.uffd, self.stop_fd, self.forward_w, self.notify_fd, self.pid,
            k.UFFDIO_WRITEPROTECT, ptr(led.ext_start), ptr(led.ext_end), ptr(led.ext_base),
            ptr(self._huge), len(led.ext_start), ptr(led.state), led.lock.address,
            ptr(self.pages), ptr(self.records), RING_PAGES, ptr(self.counters),
        )  # fmt: skip

    def arm(self) -> None:
        """Ask for an eventfd write when the next record is published."""
        self.counters[ARMED] = 1

    def published(self) -> int:
        """Records published so far (head)."""
        return int(self.counters[HEAD])

    def take(self) -> list[tuple[int, int, int]]:
        """New records since the last call: (ring slot, address, extent)."""
        head = self.published()
        out = [
            (i % RING_PAGES, int(self.records[i % RING_PAGES, 0]), int(self.records[i % RING_PAGES, 1]))
            for i in range(self.consumed, head)
        ]
        self.consumed = head
        return out

    def page(self, slot: int) -> memoryview:
        """The saved page in ring ``slot`` (valid until released)."""
        return memoryview(self.pages[slot])

    def release(self, n: int) -> None:
        """``n`` more records are written to the store: their slots are free again."""
        self.counters[TAIL] = self.counters[TAIL] + np.uint64(n)

    def new_faults(self) -> int:
        """Faults the loop served since the last call."""
        total = int(self.counters[FAULTS])
        new, self.faults_seen = total - self.faults_seen, total
        return new

    def close(self) -> None:
        for fd in (self.forward_r, self.forward_w, self.notify_fd):
            os.close(fd)
