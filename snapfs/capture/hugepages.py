"""Transparent huge pages after a capture.

The fault path saves a THP 4 KiB at a time (saving 2 MiB per first write made the fault path
copy the whole target at high write rates: fault p99 of tens of ms). Unprotecting 4 KiB of a
THP makes the kernel map it with page table entries; the page stays huge, but the target
loses its huge TLB entry until khugepaged, which scans slowly, maps it huge again. Once the
capture is over and the protection gone, :func:`restore` asks the kernel to do it now
(``process_madvise(MADV_COLLAPSE)``) for the THP ranges of the freeze that are no longer
mapped huge. Best effort: a range the kernel will not collapse (memory, a page pinned or
freed meanwhile) stays as it is, as khugepaged would leave it.
"""

from __future__ import annotations

import errno
import os

import numpy as np

from snapfs.capture import kernel as k
from snapfs.capture.ledger import HUGE_PMD
from snapfs.capture.pagemap import PagemapScanner

MADV_COLLAPSE = 25


def split_since(pid: int, thp: np.ndarray) -> np.ndarray:
    """The 2 MiB units of ``thp`` ((n, 2) ranges mapped huge at the freeze) that are not
    mapped huge now, as (m, 2) ranges."""
    if not len(thp):
        return np.empty((0, 2), np.uint64)
    scanner = PagemapScanner(pid)
    try:
        units = []
        for lo, hi in thp.tolist():
            huge = scanner.scan(lo, hi, require=k.PAGE_IS_HUGE | k.PAGE_IS_PRESENT)
            mask = np.ones((hi - lo) // HUGE_PMD, bool)
            for s, e in zip(huge["start"].tolist(), huge["end"].tolist()):
                mask[(s - lo) // HUGE_PMD:(e - lo + HUGE_PMD - 1) // HUGE_PMD] = False
            units.append(lo + np.flatnonzero(mask).astype(np.uint64) * np.uint64(HUGE_PMD))
    finally:
        scanner.close()
    starts = np.concatenate(units) if units else np.empty(0, np.uint64)
    return np.stack([starts, starts + np.uint64(HUGE_PMD)], axis=1)


def restore(pid: int, thp: np.ndarray) -> int:
    """Map huge again what was huge at the freeze (``thp``) and is not now; returns the bytes
    the kernel collapsed (0 if it cannot: no privilege, kernel too old, target gone)."""
    todo = split_since(pid, thp)
    if not len(todo):
        return 0
    try:
        pidfd = k.pidfd_open(pid)
    except OSError:
        return 0
    done = 0
    iov = k.ffi.new("struct iovec[1]")
    try:
        # One range per call: the kernel collapses each 2 MiB unit of a range and reports an
        # error if any failed, so a failure never hides the other ranges' result.
        head = np.flatnonzero(np.r_[True, todo[1:, 0] != todo[:-1, 1]])
        last = np.r_[head[1:] - 1, len(todo) - 1]
        for lo, hi in zip(todo[head, 0].tolist(), todo[last, 1].tolist()):
            iov[0].iov_base = k.ffi.cast("void *", lo)
            iov[0].iov_len = hi - lo
            try:
                done += k.syscall("process_madvise", pidfd, int(k.ffi.cast("uintptr_t", iov)), 1, MADV_COLLAPSE, 0)
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.ENOSYS, errno.ESRCH, errno.EINVAL):
                    break  # not allowed or not supported here: khugepaged will do it
                # EAGAIN, ENOMEM, EFAULT: (part of) this range stays as it is
    finally:
        os.close(pidfd)
    return done
