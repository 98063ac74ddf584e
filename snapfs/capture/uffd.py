"""A userfaultfd held by snapfs (taken from the target): API handshake, WP registration,
(un)protection and batched message reads.

The fd belongs to the target's mm (the target created it), so every ioctl here acts on the
target's memory. snapfs holds the only reference: closing it (or dying) drops every
protection and wakes every blocked thread of the target.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterable

import numpy as np

from snapfs import ranges as rs
from snapfs.capture import kernel as k
from snapfs.capture.maps import Vma

# Features asked for in UFFDIO_API (the call fails if the kernel lacks one; protect.py then
# retries with the minimum).
WANTED_FEATURES = (
    k.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    | k.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    | k.UFFD_FEATURE_EVENT_REMOVE
    | k.UFFD_FEATURE_EVENT_UNMAP
    | k.UFFD_FEATURE_EVENT_REMAP
)

# Closing the uffd unregisters everything at once: the kernel walks every page table entry
# of the registered ranges to clear their WP bits while holding the target's mmap lock for
# writing, so each of its page faults meanwhile waits (a 3 GiB target: ~95 ms at close).
# Before closing, large ranges are unregistered this many bytes per call instead (~1 ms
# each; bounds aligned to it, so a transparent huge page is never split).
RELEASE_STEP = 32 << 20

# numpy view of struct uffd_msg, to decode a batch without a Python loop per field.
MSG_DTYPE = np.dtype(
    [("event", "u1"), ("r1", "u1"), ("r2", "<u2"), ("r3", "<u4"),
     ("a0", "<u8"), ("a1", "<u8"), ("a2", "<u8")]
)  # fmt: skip
assert MSG_DTYPE.itemsize == k.UFFD_MSG_SIZE


def decode_messages(data: bytes) -> np.ndarray:
    """A structured array (MSG_DTYPE) over raw uffd messages."""
    return np.frombuffer(data, dtype=MSG_DTYPE)


def unprotect_outcome(ret: int) -> str:
    """What an unprotect's UFFDIO_WRITEPROTECT returned (0 or -errno) means: "ok"; "busy"
    (EAGAIN: a mapping change is pending, retry once its event is read); "gone" (unmapped
    meanwhile, or the target is gone). Other errors raise ``OSError``."""
    if ret == 0:
        return "ok"
    if ret == -errno.EAGAIN:
        return "busy"
    if -ret in (errno.ENOENT, errno.EINVAL, errno.ENOMEM, errno.ESRCH, errno.EFAULT):
        return "gone"
    raise OSError(-ret, f"UFFDIO_WRITEPROTECT: {os.strerror(-ret)}")


class Uffd:
    """Owner of one userfaultfd (``fd`` is -1 once closed)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.features = 0
        self._tls = threading.local()  # one reusable ioctl argument per thread
        # Called by close() before the fd is closed: a thread using the fd stops first (the
        # number could otherwise be reused by the next open while that thread still polls it).
        self.before_close: list[Callable[[], None]] = []

    def api(self, wanted: int = WANTED_FEATURES) -> int:
        """UFFDIO_API handshake (once per fd) enabling ``wanted``; returns what the kernel
        reports back (every feature it supports)."""
        arg = k.ffi.new("struct uffdio_api *")
        arg.api = k.UFFD_API
        arg.features = wanted
        k.ioctl(self.fd, k.UFFDIO_API, arg)
        self.features = arg.features
        return self.features

    def register_wp(self, start: int, length: int) -> None:
        """Register one VMA's range in write-protect mode (raises ``OSError``)."""
        arg = k.ffi.new("struct uffdio_register *")
        arg.range.start = start
        arg.range.len = length
        arg.mode = k.UFFDIO_REGISTER_MODE_WP
        k.ioctl(self.fd, k.UFFDIO_REGISTER, arg)

    def unregister(self, start: int, length: int) -> None:
        """Unregister a range (ignores ranges that are gone)."""
        arg = k.ffi.new("struct uffdio_range *")
        arg.start = start
        arg.len = length
        try:
            k.ioctl(self.fd, k.UFFDIO_UNREGISTER, arg)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOMEM, errno.ESRCH):
                raise

    def _wp_arg(self):
        arg = getattr(self._tls, "wp_arg", None)
        if arg is None:
            arg = self._tls.wp_arg = k.ffi.new("struct uffdio_writeprotect *")
        return arg

    def protect(self, start: int, length: int, wp: bool, wake: bool = True) -> None:
        """Write-protect (``wp``) or unprotect a range; unprotecting wakes waiting threads."""
        arg = self._wp_arg()
        arg.range.start = start
        arg.range.len = length
        arg.mode = (k.UFFDIO_WRITEPROTECT_MODE_WP if wp else 0) | (
            0 if wake else k.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        )
        k.ioctl(self.fd, k.UFFDIO_WRITEPROTECT, arg)

    def protect_ranges(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Write-protect every [lo[i], hi[i]) in one C call; per range 0 or -errno."""
        lo = np.ascontiguousarray(lo, np.uint64)
        hi = np.ascontiguousarray(hi, np.uint64)
        res = np.zeros(len(lo), np.intc)
        if len(lo):
            k.lib.snapfs_writeprotect_ranges(self.fd, k.UFFDIO_WRITEPROTECT, k.ffi.from_buffer("uint64_t[]", lo),
                                             k.ffi.from_buffer("uint64_t[]", hi), len(lo),
                                             k.UFFDIO_WRITEPROTECT_MODE_WP, k.ffi.from_buffer("int[]", res))
        return res

    def unprotect_quiet(self, start: int, length: int) -> str:
        """Unprotect and wake. Returns ``"ok"``; ``"gone"`` if the range is no longer
        registered (unmapped meanwhile) or the target is gone; ``"busy"`` (EAGAIN) while the
        target is changing its mappings and the event saying so has not been read yet."""
        arg = self._wp_arg()
        arg.range.start, arg.range.len, arg.mode = start, length, 0
        return unprotect_outcome(k.lib.snapfs_ioctl(self.fd, k.UFFDIO_WRITEPROTECT, arg))

    def read_raw(self, max_msgs: int = 256) -> bytes:
        """Non-blocking read of up to ``max_msgs`` messages as raw bytes (b"" if none);
        decode with :func:`decode_messages` (or parse a single one by hand)."""
        try:
            return os.read(self.fd, k.UFFD_MSG_SIZE * max_msgs)
        except BlockingIOError:
            return b""

    def release(self, regions: Iterable[Vma], remapped: Iterable[tuple[int, int]] = ()) -> None:
        """Before :meth:`close` once every page is saved: unregister the large ones of the
        captured ``regions`` that this uffd registered ("wp" mode; not hugetlb, which has
        few entries to walk and cannot be cut anywhere) a step at a time, so that the close
        holds the target's mmap lock only briefly. Regions overlapping a range ``remapped``
        (unmapped or moved by the target meanwhile) are left alone: the kernel unregisters
        a range whichever uffd registered it, and the VMA there now may be another's."""
        ranges = [(v.start, v.end) for v in regions if v.mode == "wp" and v.page_size == k.PAGE_SIZE]
        for lo, hi in release_steps(ranges, remapped):
            self.unregister(lo, hi - lo)

    def close(self) -> None:
        """Close the fd: the kernel drops all protection and wakes the target."""
        if self.fd >= 0:
            for hook in list(self.before_close):
                hook()
            fd, self.fd = self.fd, -1
            os.close(fd)


def release_steps(ranges: list[tuple[int, int]], skip: Iterable[tuple[int, int]] = (),
                  step: int | None = None) -> list[tuple[int, int]]:
    """The pieces :meth:`Uffd.release` unregisters: ``ranges`` (less those overlapping one
    of ``skip``) joined where they touch (a gap may hold a VMA that cannot be unregistered),
    those longer than ``step`` (RELEASE_STEP) cut at multiples of it; shorter ones are left
    to the close."""
    step = step or RELEASE_STEP
    r = np.array(list(ranges), np.int64).reshape(-1, 2)
    sk = rs.norm(np.array(list(skip), np.int64).reshape(-1, 2))
    if len(sk) and len(r):
        # Skipped ranges disjoint and sorted: a range overlaps one iff the last that starts
        # before its end ends past its start (arrays: 65 000 mappings, thousands of munmaps).
        last = np.searchsorted(sk[:, 0], r[:, 1]) - 1
        r = r[(last < 0) | (sk[np.maximum(last, 0), 1] <= r[:, 0])]
    out: list[tuple[int, int]] = []
    for lo, hi in rs.norm(r).tolist():  # joined where they touch
        if hi - lo <= step:
            continue
        cut = list(range((lo // step + 1) * step, hi, step))
        out += list(zip([lo] + cut, cut + [hi]))
    return out
