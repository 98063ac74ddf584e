"""The ledger: which pages were populated at the freeze, and which of them are saved.

Shared by the fault path (its Python thread and its native loop, see fastfault.py) and the
scan (worker thread) under one lock, a pthread mutex that the native loop takes too: claims
run in C under it (ledger.c), one call per claim. A page is *claimed* (state 1) by whoever
saves it first, always before that page is unprotected; the other party then drops its copy.
Pages that could not be captured are claimed as lost (state 2). Only populated pages have an
entry, so a sparse 64 GiB reservation costs nothing.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence

import numpy as np

from snapfs.capture.kernel import PAGE_SHIFT, ffi, lib
from snapfs.ranges import runs_of  # noqa: F401 - the fault path takes it from here, with the ledger

PENDING, SAVED, LOST = 0, 1, 2
HUGE_PMD = 2 << 20  # a transparent huge page on x86_64 and 4 KiB-page aarch64


def _listed(array: str) -> functools.cached_property:
    """A plain-list copy of the ledger's numpy array ``array``, made on first use."""
    return functools.cached_property(lambda self: getattr(self, array).tolist())


class Ledger:
    """Populated pages at the freeze and their state; see the module docstring."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray, regions: np.ndarray,
                 huge: np.ndarray, region_starts: Sequence[int]) -> None:
        """Extents as parallel arrays: address range, index in the capture's region list, and
        whether it is THP-mapped or in a hugetlb region (no Python object per extent: a
        fragmented heap has tens of thousands, and the ledger is built inside the freeze)."""
        order = np.argsort(starts, kind="stable")
        n = len(order)
        self.ext_start = np.asarray(starts, np.uint64)[order]
        self.ext_end = np.asarray(ends, np.uint64)[order]
        self.ext_region = np.asarray(regions, np.int32)[order]
        self.ext_huge = np.asarray(huge, bool)[order]
        npages = (self.ext_end - self.ext_start) >> np.uint64(PAGE_SHIFT)
        self.ext_base = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(npages, out=self.ext_base[1:])
        self.state = np.zeros(int(self.ext_base[-1]), dtype=np.uint8)
        self.region_starts = region_starts
        mutex = lib.snapfs_mutex_new()
        if mutex == ffi.NULL:
            raise MemoryError("ledger lock")
        self.lock = ffi.gc(mutex, lib.snapfs_mutex_free)  # the pthread mutex, for the C side
        self.c_state = ffi.from_buffer("uint8_t[]", self.state)  # (keeps state alive)

    # Plain lists for the fault path's per-fault lookups (bisect beats numpy calls there),
    # made on first use: the ledger is built inside the freeze, and for 65 000 extents the
    # five lists took 5-8 ms of it.
    starts = _listed("ext_start")
    ends = _listed("ext_end")
    bases = _listed("ext_base")
    huge = _listed("ext_huge")
    regions_of = _listed("ext_region")

    @property
    def total_pages(self) -> int:
        return len(self.state)

    def find(self, addr: int) -> int:
        """Index of the extent holding ``addr``, or -1."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.ends[i]:
            return i
        return -1

    def claim_new(self, slots: np.ndarray) -> None:
        """Mark ``slots`` saved in a ledger no other thread uses yet (built in the freeze,
        the fault path not started): no lock, no pass over the slots between them."""
        if (self.state[slots] != PENDING).any():
            raise RuntimeError("internal error: pages saved in the freeze were already claimed")
        self.state[slots] = SAVED

    def claim_one(self, slot: int) -> bool:
        """Claim one page (the fault path's common case); True if this call claimed it."""
        return lib.snapfs_claim_one(self.c_state, slot, self.lock) == 1

    def overlapping(self, lo: int, hi: int) -> range:
        """Indices of extents intersecting [lo, hi)."""
        first = int(np.searchsorted(self.ext_end, np.uint64(lo), side="right"))
        last = int(np.searchsorted(self.ext_start, np.uint64(hi), side="left"))
        return range(first, max(first, last))

    def slots(self, ext: int, lo: int, hi: int) -> tuple[int, int]:
        """State-array slice [a, b) for addresses [lo, hi) clipped to extent ``ext``."""
        s, e = int(self.ext_start[ext]), int(self.ext_end[ext])
        lo, hi = max(lo, s), min(hi, e)
        base = int(self.ext_base[ext])
        if hi <= lo:
            return base, base
        return base + ((lo - s) >> PAGE_SHIFT), base + ((hi - s) >> PAGE_SHIFT)

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``(extent, start addr, end addr)`` of populated memory within [lo, hi)."""
        out = []
        for i in self.overlapping(lo, hi):
            s, e = max(lo, int(self.ext_start[i])), min(hi, int(self.ext_end[i]))
            if s < e:
                out.append((i, s, e))
        return out

    def claim(self, a: int, b: int, ok: np.ndarray, state: int = SAVED) -> np.ndarray:
        """Under the lock: among slots [a, b), those PENDING with ``ok`` become ``state``.
        Returns the bool mask (length b-a) of slots claimed by this call."""
        mine = np.empty(b - a, bool)
        if b > a:
            okb = ffi.from_buffer("uint8_t[]", np.ascontiguousarray(ok, bool))
            lib.snapfs_claim(self.c_state + a, b - a, okb, state, self.lock, ffi.from_buffer("uint8_t[]", mine))
        return mine

