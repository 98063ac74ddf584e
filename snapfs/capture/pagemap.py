"""``PAGEMAP_SCAN`` on ``/proc/PID/pagemap``: which pages of a range are present, huge,
zero-pfn, or written (no longer write-protected) — one ioctl per range, no per-page reads."""

from __future__ import annotations

import os

import numpy as np

from snapfs.capture import kernel as k
from snapfs.errors import TargetError

_VEC_LEN = 4096
REGION_DTYPE = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])


class PagemapScanner:
    """Owns an fd on ``/proc/PID/pagemap``; :meth:`scan` returns matching ranges."""

    def __init__(self, pid: int) -> None:
        try:
            self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            # A fault thread starting as the target exits: a clear error, not a traceback.
            raise TargetError(f"process {pid} exited") from None
        self._vec = k.ffi.new("struct page_region[]", _VEC_LEN)
        self._vec_np = np.frombuffer(k.ffi.buffer(self._vec), dtype=REGION_DTYPE)
        self._arg = k.ffi.new("struct pm_scan_arg *")

    def scan(
        self,
        start: int,
        end: int,
        *,
        require: int,
        exclude: int = 0,
        anyof: int = 0,
        report: int = 0,
        flags: int = 0,
    ) -> np.ndarray:
        """Ranges of [start, end) whose pages have all ``require`` categories and none of
        ``exclude`` (and at least one of ``anyof`` if given); ``categories`` holds the ``report`` bits (adjacent pages with equal
        reported bits are merged). Returns a structured array (start, end, categories).

        ``flags`` are ``PM_SCAN_*`` flags: with ``PM_SCAN_WP_MATCHING`` the same walk also
        write-protects (async uffd) the matching pages that are written."""
        arg = self._arg
        out = []
        pos = start
        done = start  # every match below this address has been reported
        while pos < end:
            arg.size = k.ffi.sizeof("struct pm_scan_arg")
            arg.flags = flags
            arg.start = pos
            arg.end = end
            arg.walk_end = 0
            arg.vec = int(k.ffi.cast("uintptr_t", self._vec))
            arg.vec_len = _VEC_LEN
            arg.max_pages = 0
            arg.category_inverted = exclude
            arg.category_mask = require | exclude
            arg.category_anyof_mask = anyof
            arg.return_mask = report | require | exclude | anyof
            n = k.ioctl(self.fd, k.PAGEMAP_SCAN, arg)
            found = self._vec_np[:n].copy()
            if n and int(found["start"][0]) < done:
                # Already reported by the previous call (see below): keep only what is new.
                found = found[found["end"] > done]
                found["start"] = np.maximum(found["start"], np.uint64(done))
            if len(found):
                out.append(found)
                done = int(found["end"][-1])
            # The kernel leaves walk_end at its last buffer-full stop when the walk then
            # finishes: a call that fills ``vec`` exactly at the end of the walk reports a
            # walk_end behind its last range (a fragmented 64 MiB mapping: its last 4 MiB
            # reported twice, so those pages were saved twice). Resume after what was seen.
            walk_end = max(int(arg.walk_end), done)
            if walk_end <= pos or walk_end >= end or n < _VEC_LEN:
                break
            pos = walk_end
        if not out:
            return np.empty(0, dtype=REGION_DTYPE)
        return np.concatenate(out)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
