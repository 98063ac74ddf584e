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
from snapfs.capture.ledger import Extent, Ledger
from snapfs.capture.maps import Vma, classify
from snapfs.capture.memory import read_pages_robust
from snapfs.capture.pagemap import PagemapScanner
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


def _populated(scanner: PagemapScanner, v: Vma, report: int = 0) -> np.ndarray:
    """Present (or swapped) pages of a VMA that are not the shared zero page (``categories``
    holds PAGE_IS_HUGE and the ``report`` bits)."""
    return scanner.scan(
        v.start,
        v.end,
        require=0,
        exclude=k.PAGE_IS_PFNZERO,
        anyof=k.PAGE_IS_PRESENT | k.PAGE_IS_SWAPPED,
        report=k.PAGE_IS_HUGE | report,
    )


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


def _coalesce(starts: list[int], ends: list[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in zip(starts, ends):
        if out and s - out[-1][1] <= _COALESCE_GAP:
            out[-1][1] = e
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def protect_and_record(
    ft: FrozenTarget,
    *,
    include_readonly: bool,
    huge_sizes: dict[int, int],
    features: int,
    unprotectable: dict[int, str] | None = None,
) -> Prepared:
    """Run inside the freeze: protect, record populated pages, copy what cannot be protected.

    The uffd has had its handshake (``features``). Memory may already be protected (see
    :mod:`~snapfs.capture.preprotect`): registering is then a no-op, and only pages that are
    populated but not protected (``PAGE_IS_WRITTEN``: written or first populated since) are
    protected here, so the cost follows what changed, not the target's size. Without
    pre-protection every populated page is "written" and gets protected here.
    ``unprotectable`` names VMAs (by start) the kernel refused to protect earlier.
    """
    t0 = time.monotonic()
    unprotectable = unprotectable or {}
    regions = classify(ft.maps, include_readonly=include_readonly, huge_sizes=huge_sizes)
    extents: list[Extent] = []
    copy_jobs: list[tuple[int, Vma, np.ndarray]] = []
    kept: list[Vma] = []
    scanner = PagemapScanner(ft.pid)
    protected_pages = 0
    try:
        for v in regions:
            if v.mode == "wp" and v.start in unprotectable:
                v.mode = "copy"
                v.meta["unprotectable"] = unprotectable[v.start]
            ranges = _populated(scanner, v, k.PAGE_IS_WRITTEN if v.mode == "wp" else 0)
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
                todo = _coalesce(written["start"].tolist(), written["end"].tolist()) + unmapped
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
                for s, e, cat in zip(
                    ranges["start"].tolist(), ranges["end"].tolist(), ranges["categories"].tolist()
                ):
                    huge = huge_region or bool(cat & k.PAGE_IS_HUGE)
                    last = extents[-1] if extents else None
                    if last and last.region == idx and last.end == s and last.huge == huge:
                        last.end = e  # split only by the WRITTEN bit: one extent
                    else:
                        extents.append(Extent(idx, s, e, huge))
                for s, e in unmapped:
                    extents.append(Extent(idx, s, e, huge_region))
            kept.append(v)
        copies = _copy_all(ft.pid, copy_jobs)
    finally:
        scanner.close()
    ledger = Ledger(extents, [v.start for v in kept])
    return Prepared(
        regions=kept,
        ledger=ledger,
        copies=copies,
        features=features,
        protect_ms=(time.monotonic() - t0) * 1000.0,
        reprotected_pages=protected_pages,
    )
