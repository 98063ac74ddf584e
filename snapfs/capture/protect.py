"""What the capture does while the target is stopped: classify its VMAs, write-protect the
populated pages not protected yet, record the populated pages, copy what cannot be protected.

Everything here runs inside the pause, so it is one pass over the maps with one
``PAGEMAP_SCAN`` per VMA, a register per VMA (a no-op when pre-protected) and write-protect
ioctls only for the pages that are not protected yet.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

import numpy as np

from snapfs.capture import kernel as k
from snapfs.capture.freeze import FrozenTarget
from snapfs.capture.ledger import Ledger
from snapfs.capture.maps import Vma, classify
from snapfs.capture.memory import read_pages_robust
from snapfs.capture.pagemap import REGION_DTYPE, PagemapScanner
from snapfs.capture.preprotect import PreProtected, populated_ranges
from snapfs.capture.uffd import WANTED_FEATURES

MINIMAL_FEATURES = k.UFFD_FEATURE_PAGEFAULT_FLAG_WP | k.UFFD_FEATURE_WP_HUGETLBFS_SHMEM


@dataclass
class CopiedPages:
    """Pages read while the target was stopped, stored after it resumed."""

    region: int
    first_page: int
    data: memoryview
    mask: np.ndarray  # pages actually read


@dataclass
class Prepared:
    """The result of :func:`protect_and_record`."""

    regions: list[Vma]
    ledger: Ledger
    copies: list[CopiedPages]
    features: int
    protect_ms: float
    reprotected_pages: int = 0  # pages protected during the freeze

    @property
    def copied_bytes(self) -> int:
        return sum(int(c.mask.sum()) for c in self.copies) * k.PAGE_SIZE


def _shmem_cached(pid: int, v: Vma) -> list[tuple[int, int]] | None:
    """Address ranges of a shmem VMA whose pages are in the file (page cache) — written
    through another mapping or with write() — whether or not the target has them mapped.
    None when ``/proc/PID/map_files`` is not accessible (it needs CAP_SYS_ADMIN)."""
    try:
        fd = os.open(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    out = []
    try:
        pos, end = v.offset, v.offset + v.length
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            lo = data // k.PAGE_SIZE * k.PAGE_SIZE
            out.append((v.start + lo - v.offset, v.start + hole - v.offset))
            pos = hole
    finally:
        os.close(fd)
    return out


def _subtract(ranges: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of sorted disjoint ``ranges`` not covered by sorted disjoint ``minus``."""
    out = []
    j = 0
    for lo, hi in ranges:
        while j < len(minus) and minus[j][1] <= lo:
            j += 1
        k_ = j
        cur = lo
        while k_ < len(minus) and minus[k_][0] < hi:
            if minus[k_][0] > cur:
                out.append((cur, minus[k_][0]))
            cur = max(cur, minus[k_][1])
            k_ += 1
        if cur < hi:
            out.append((cur, hi))
    return out


def _copy_all(pid: int, jobs: list[tuple[int, Vma, np.ndarray]]) -> list[CopiedPages]:
    """Read the populated pages of every copy-mode region with one batched
    ``process_vm_readv`` (there are dozens: every library's ``.data``)."""
    spans = []  # (region, addr, length)
    for region, _v, ranges in jobs:
        for s, e in zip(ranges["start"].tolist(), ranges["end"].tolist()):
            spans.append((region, s, e - s))
    if not spans:
        return []
    buf = bytearray(sum(n for _, _, n in spans))
    ok = read_pages_robust(pid, buf, [(a, n) for _, a, n in spans])
    view = memoryview(buf)
    starts = {region: v.start for region, v, _ in jobs}
    out = []
    pos = 0
    for region, addr, n in spans:
        p = pos // k.PAGE_SIZE
        out.append(
            CopiedPages(region, (addr - starts[region]) // k.PAGE_SIZE, view[pos : pos + n],
                        ok[p : p + n // k.PAGE_SIZE])
        )
        pos += n
    return out


def handshake(uffd) -> int:
    """UFFDIO_API on a fresh uffd: the wanted features, else the minimum; returns them."""
    try:
        return uffd.api(WANTED_FEATURES)
    except OSError:
        return uffd.api(MINIMAL_FEATURES)


# Written ranges closer than this are re-protected with one ioctl: protecting a page that is
# already protected costs ~80 ns, an extra ioctl a few us.
_COALESCE_GAP = 32 * k.PAGE_SIZE


def _touches(changed: list[tuple[int, int]], v: Vma) -> bool:
    return any(lo < v.end and hi > v.start for lo, hi in changed)


def _union(known: np.ndarray, written: np.ndarray) -> np.ndarray:
    """Sorted ranges covering both inputs; a range keeps the WRITTEN bit if it came from
    ``written`` (overlaps are cut so every page has exactly one range)."""
    if not len(written):
        return known
    if not len(known):
        return written
    # Page-granular sweep over the boundaries: few ranges each, so this stays small.
    # (np.unique would import numpy.ma on first use: 16 ms, inside the pause.)
    edges = np.sort(np.concatenate([known["start"], known["end"], written["start"], written["end"]]))
    edges = edges[np.r_[True, edges[1:] != edges[:-1]]]
    lo, hi = edges[:-1], edges[1:]

    def cover(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.searchsorted(r["start"], lo, side="right") - 1
        ok = (i >= 0) & (lo < r["end"][np.maximum(i, 0)])
        return ok, np.where(ok, r["categories"][np.maximum(i, 0)], 0)

    in_k, cat_k = cover(known)
    in_w, cat_w = cover(written)
    keep = in_k | in_w
    out = np.empty(int(keep.sum()), dtype=REGION_DTYPE)
    out["start"], out["end"] = lo[keep], hi[keep]
    out["categories"] = np.where(in_w, cat_w | k.PAGE_IS_WRITTEN, cat_k)[keep]
    return out


def _extents(region: int, ranges: np.ndarray, huge_region: bool):
    """(starts, ends, regions, huge) of a region's populated ranges, adjacent ranges with the
    same huge-ness merged (the scan splits them by the WRITTEN bit too) — vectorised: a
    fragmented heap has tens of thousands of ranges, and this runs inside the freeze."""
    st, en = ranges["start"], ranges["end"]
    hg = (ranges["categories"] & k.PAGE_IS_HUGE) != 0
    if huge_region:
        hg[:] = True
    if len(st) > 1:
        head = np.flatnonzero(np.r_[True, (st[1:] != en[:-1]) | (hg[1:] != hg[:-1])])
        last = np.r_[head[1:] - 1, len(st) - 1]
        st, en, hg = st[head], en[last], hg[head]
    return st, en, np.full(len(st), region, np.int32), hg


def _coalesce(ranges: np.ndarray) -> list[tuple[int, int]]:
    """Sorted disjoint ranges merged across gaps of at most _COALESCE_GAP."""
    if not len(ranges):
        return []
    st, en = ranges["start"], ranges["end"]
    head = np.flatnonzero(np.r_[True, st[1:] - en[:-1] > _COALESCE_GAP])
    last = np.r_[head[1:] - 1, len(st) - 1]
    return list(zip(st[head].tolist(), en[last].tolist()))


def protect_and_record(
    ft: FrozenTarget,
    *,
    include_readonly: bool,
    huge_sizes: dict[int, int],
    features: int,
    pre: PreProtected | None = None,
) -> Prepared:
    """Run inside the freeze: protect, record populated pages, copy what cannot be protected.

    The uffd has had its handshake (``features``). With ``pre`` the memory was protected
    while the target ran (:mod:`~snapfs.capture.preprotect`): registering is then a no-op,
    only pages populated but not protected (``PAGE_IS_WRITTEN``: written or first populated
    since) are protected here, and for VMAs unchanged since, the populated pages are those
    recorded then plus the written ones — so the cost follows what changed, not the
    target's size. Without ``pre`` every populated page is "written" and protected here.
    """
    t0 = time.monotonic()
    pre = pre or PreProtected()
    unprotectable = pre.unprotectable
    regions = classify(ft.maps, include_readonly=include_readonly, huge_sizes=huge_sizes)
    extents: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # per region
    copy_jobs: list[tuple[int, Vma, np.ndarray]] = []
    kept: list[Vma] = []
    scanner = PagemapScanner(ft.pid)
    protected_pages = 0
    try:
        for v in regions:
            if v.mode == "wp" and v.start in unprotectable:
                v.mode = "copy"
                v.meta["unprotectable"] = unprotectable[v.start]
            known = pre.populated.get((v.start, v.end)) if v.mode == "wp" else None
            if known is not None and not _touches(pre.changed, v):
                ranges = _union(known, populated_ranges(scanner, v, require=k.PAGE_IS_WRITTEN))
            else:
                ranges = populated_ranges(scanner, v, k.PAGE_IS_WRITTEN if v.mode == "wp" else 0)
            idx = len(kept)
            unmapped: list[tuple[int, int]] = []
            if v.kind == "shmem" and v.mode == "wp":
                # File pages the target has not mapped (written through another mapping or
                # with write()): protected too (the uffd installs markers on empty entries),
                # so they are saved like the others.
                cached = _shmem_cached(ft.pid, v)
                if cached is None:
                    v.meta["unmapped_file_pages"] = "not checked (no access to map_files)"
                else:
                    present = list(zip(ranges["start"].tolist(), ranges["end"].tolist()))
                    unmapped = _subtract(cached, present)
            if v.mode == "wp" and (len(ranges) or unmapped):
                written = ranges[(ranges["categories"] & k.PAGE_IS_WRITTEN) != 0]
                todo = _coalesce(written) + unmapped
                try:
                    ft.uffd.register_wp(v.start, v.length)  # no-op if pre-protected
                    for s, e in todo:
                        ft.uffd.protect(s, e - s, wp=True)
                        protected_pages += (e - s) // k.PAGE_SIZE
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOTSUP):
                        raise
                    v.mode = "copy"  # cannot be write-protected: copy it now, stopped
                    v.meta["unprotectable"] = exc.strerror
            if v.mode == "copy":
                copy_jobs.append((idx, v, ranges))
            else:
                huge_region = v.page_size != k.PAGE_SIZE
                extents.append(_extents(idx, ranges, huge_region))
                if unmapped:
                    extents.append((
                        np.array([s for s, _ in unmapped], np.uint64),
                        np.array([e for _, e in unmapped], np.uint64),
                        np.full(len(unmapped), idx, np.int32),
                        np.full(len(unmapped), huge_region, bool),
                    ))
            kept.append(v)
        copies = _copy_all(ft.pid, copy_jobs)
    finally:
        scanner.close()
    cols = [np.concatenate([e[i] for e in extents]) if extents else np.empty(0, dt)
            for i, dt in enumerate((np.uint64, np.uint64, np.int32, bool))]
    ledger = Ledger(*cols, [v.start for v in kept])
    return Prepared(
        regions=kept,
        ledger=ledger,
        copies=copies,
        features=features,
        protect_ms=(time.monotonic() - t0) * 1000.0,
        reprotected_pages=protected_pages,
    )
