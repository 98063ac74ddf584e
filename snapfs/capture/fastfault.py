"""The native fault loop (fastfault.c, compiled at install time into
``snapfs.capture._native``): run it and share its ring.

The loop serves the common write fault (one 4 KiB page of a populated, non-huge extent)
without the GIL; :mod:`~snapfs.capture.faults` starts it in a worker thread and handles
everything it forwards. With ``SNAPFS_NO_NATIVE=1`` the Python fault thread serves every
fault (slower, same result).
"""

from __future__ import annotations

import os

import numpy as np

from snapfs import native
from snapfs.capture import kernel as k
from snapfs.capture.kernel import ffi
from snapfs.capture.ledger import Ledger

RING_PAGES = 2048  # 8 MiB of saved pages between the loop and the trio side (copied out at once)
HEAD, TAIL, FAULTS, ARMED, WAITING = range(5)  # the shared counters (see fastfault.c)


def library():
    """The compiled loop (cffi ``lib``: its call releases the GIL), or None with
    ``SNAPFS_NO_NATIVE=1``."""
    return None if native.disabled() else k.lib


_spare_rings: list[np.ndarray] = []


def new_ring() -> np.ndarray:
    """A ring of saved pages, every page touched (not on the fault path)."""
    pages = np.zeros((RING_PAGES, k.PAGE_SIZE), np.uint8)
    pages[:, 0] = 0
    return pages


def preallocate_ring(count: int = 1) -> None:
    """Allocate the next capture's rings now (~2.5 ms each; the engine does it before the
    freeze, since the fault path starts while the target is still stopped; a tree capture
    needs one per process)."""
    while len(_spare_rings) < count:
        _spare_rings.append(new_ring())


class NativeLoop:
    """One run of the native loop over one uffd: its ring, counters and pipes."""

    def __init__(self, lib, pid: int, uffd: int, stop_fd: int, ledger: Ledger,
                 wait_when_full: bool = True) -> None:
        self.lib = lib
        self.wait_when_full = wait_when_full  # a full ring: wait for room (else forward)
        self.pid = pid
        self.uffd = uffd
        self.stop_fd = stop_fd
        self.ledger = ledger
        self.pages = _spare_rings.pop() if _spare_rings else new_ring()
        self.records = np.zeros((RING_PAGES, 2), np.uint64)  # (address, extent)
        self.counters = np.zeros(5, np.uint64)
        # Both ends non-blocking: the loop waits for room with ppoll, and gives up on stop.
        self.forward_r, self.forward_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.space_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # room again in a full ring
        self.consumed = 0  # records handed to the store side (<= head)
        self.faults_seen = 0
        self._huge = ledger.ext_huge.astype(np.uint8)
        self._counters_ptr = ffi.from_buffer("uint64_t[]", self.counters)

    def run(self) -> int:
        """The loop itself (blocks until stop_fd is readable): 0 or -errno."""
        led = self.ledger
        buf = ffi.from_buffer  # pointers into the arrays, which outlive the call
        return self.lib.snapfs_fault_loop(
            self.uffd, self.stop_fd, self.forward_w, self.notify_fd, self.space_fd,
            int(self.wait_when_full), self.pid,
            k.UFFDIO_WRITEPROTECT, buf("uint64_t[]", led.ext_start), buf("uint64_t[]", led.ext_end),
            buf("int64_t[]", led.ext_base), buf("uint8_t[]", self._huge), len(led.ext_start),
            led.c_state, led.lock,
            buf("uint8_t[]", self.pages), buf("uint64_t[]", self.records), RING_PAGES,
            buf("uint64_t[]", self.counters),
        )  # fmt: skip

    def arm(self) -> None:
        """Ask for an eventfd write when the next record is published."""
        self.counters[ARMED] = 1

    def published(self) -> int:
        """Records published so far (head)."""
        return int(self.counters[HEAD])

    def take(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The records published since the last call (at most ``limit``, oldest first), as
        arrays (addresses, extents, and their saved pages: (n, PAGE), one gather copy). Their
        ring slots are free again at once."""
        head = self.published()
        if limit is not None:
            head = min(head, self.consumed + max(limit, 0))
        slots = np.arange(self.consumed, head, dtype=np.intp) % RING_PAGES
        addrs, exts = self.records[slots, 0], self.records[slots, 1].astype(np.intp)
        pages = self.pages[slots]
        self.consumed = head
        # Every slot taken is copied: free again (and the loop woken if it waits for room).
        self.lib.snapfs_ring_taken(self._counters_ptr, head, self.space_fd)
        return addrs, exts, pages

    def unseen_faults(self) -> int:
        """Faults the loop served since the last :meth:`new_faults`, without consuming them."""
        return int(self.counters[FAULTS]) - self.faults_seen

    def new_faults(self) -> int:
        """Faults the loop served since the last call."""
        total = int(self.counters[FAULTS])
        new, self.faults_seen = total - self.faults_seen, total
        return new

    def close(self) -> None:
        for fd in (self.forward_r, self.forward_w, self.notify_fd, self.space_fd):
            os.close(fd)
