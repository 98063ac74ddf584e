"""What the capture does while the target is stopped: classify its VMAs, write-protect the
populated pages not protected yet, record the populated pages, copy what cannot be protected.

It runs inside the pause, so it works on runs of VMAs and arrays, not VMA by VMA: a
``PAGEMAP_SCAN`` per run, a register only for VMAs new since pre-protection and
write-protect ioctls only for the pages that are not protected yet. What follows from the
maps and the pre-protection alone is decided before the pause (:class:`InstantPlan`).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from snapfs.capture import kernel as k
from snapfs.capture.freeze import FrozenTarget
from snapfs.capture.ledger import Ledger
from snapfs.capture.maps import ClassifiedMaps, Vma
from snapfs.capture.memory import file_data_ranges, prefaulted_buffer, read_pages_robust
from snapfs.capture.pagemap import REGION_DTYPE, PagemapScanner
from snapfs.capture.preprotect import PreProtected, populated_ranges
from snapfs.capture.helpers import read_shared, started_pool, submit_helper
from snapfs.capture.uffd import WANTED_FEATURES
from snapfs.ranges import positions_in_runs

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
    # Ranges mapped as transparent huge pages at the freeze ((n, 2), 2 MiB aligned): the fault
    # path saves them 4 KiB at a time, hugepages.restore maps them huge again after.
    thp: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.uint64))
    # Pages written since pre-protection, copied in the freeze instead of protected again
    # (see copy_written): pieces (region, first page, pages) in (region, page) order, their
    # pages back to back in ``written_data``; already claimed in the ledger.
    written: list[tuple[int, int, int]] = field(default_factory=list)
    written_data: memoryview | None = None

    @property
    def written_pages(self) -> int:
        return sum(n for _, _, n in self.written)

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
    try:
        return [(v.start + lo - v.offset, v.start + hi - v.offset)
                for lo, hi in file_data_ranges(fd, v.offset, v.offset + v.length)]
    finally:
        os.close(fd)


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


def _copy_all(pid: int, jobs: list[tuple[int, Vma, np.ndarray]], buffer: bytearray | None = None
              ) -> list[CopiedPages]:
    """Read the populated pages of every copy-mode region with one batched
    ``process_vm_readv`` (there are dozens: every library's ``.data``), into ``buffer`` if
    it is large enough: memory first touched inside the pause costs a page fault per page,
    a host fault on these VMs (a Python target's 1.3 MiB of .data: ~10-40 ms)."""
    spans = []  # (region, addr, length)
    for region, _v, ranges in jobs:
        for s, e in zip(ranges["start"].tolist(), ranges["end"].tolist()):
            spans.append((region, s, e - s))
    if not spans:
        return []
    size = sum(n for _, _, n in spans)
    buf = buffer if buffer is not None and len(buffer) >= size else bytearray(size)
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


# At most this much is prepared for copy-mode regions before the freeze (a larger copy
# allocates its buffer inside the pause).
COPY_BUFFER_MAX = 64 << 20


def copy_buffer_for(regions: list[Vma]) -> bytearray:
    """A buffer for the copy-mode regions among ``regions`` (the maps before the freeze),
    its pages touched now rather than inside the pause."""
    size = sum(v.length for v in regions if v.mode == "copy")
    return prefaulted_buffer(min(COPY_BUFFER_MAX, size + (size >> 2)))


def handshake(uffd) -> int:
    """UFFDIO_API on a fresh uffd: the wanted features, else the minimum; returns them."""
    try:
        return uffd.api(WANTED_FEATURES)
    except OSError:
        return uffd.api(MINIMAL_FEATURES)


# Written ranges closer than this are re-protected with one ioctl: protecting a page that is
# already protected costs ~80 ns, an extra ioctl a few us.
_COALESCE_GAP = 32 * k.PAGE_SIZE
# A run of VMAs with more VMAs to scan in full than this is scanned whole (one ioctl).
_FULL_SCAN_EACH = 16
# VMAs scanned in the pause with no more than this of other mappings between them are scanned
# with one ioctl: what lies between them (a thread stack's guard page, a library's code)
# costs the walk little, unmapped gaps nothing, and the pages found there are dropped by VMA.
# A 256-thread target has ~260 runs (each stack is one, between guard pages): one scan each
# was 2-4 ms of its pause; a PostgreSQL process has ~13 runs and ~42 libraries' .data to
# copy: one scan each was ~1 ms of the instant per process.
_SCAN_MERGE_BYTES = 4 << 20
_NO_RANGES = np.empty(0, dtype=REGION_DTYPE)


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


def _by_region(r: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    """Sorted disjoint ranges ``r`` cut at the bounds of the sorted disjoint VMAs
    [starts, ends): (start, end, categories, VMA index) of every non-empty piece, in order
    (a scan over a run of VMAs merges ranges across their bounds)."""
    if not len(r) or not len(starts):
        e = np.empty(0, np.uint64)
        return e, e, e, np.empty(0, np.int64)
    first = np.searchsorted(ends, r["start"], side="right")  # first VMA ending after the start
    last = np.searchsorted(starts, r["end"], side="left")    # VMAs starting before the end
    count = np.maximum(last - first, 0)
    ri = np.repeat(np.arange(len(r)), count)
    vi = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count) + np.repeat(first, count)
    lo = np.maximum(r["start"][ri], starts[vi])
    hi = np.minimum(r["end"][ri], ends[vi])
    keep = hi > lo
    return lo[keep], hi[keep], r["categories"][ri][keep], vi[keep]


def _as_ranges(lo: np.ndarray, hi: np.ndarray, cat: np.ndarray) -> np.ndarray:
    out = np.empty(len(lo), dtype=REGION_DTYPE)
    out["start"], out["end"], out["categories"] = lo, hi, cat
    return out


def _coalesce(lo: np.ndarray, hi: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted disjoint ranges merged across gaps of at most _COALESCE_GAP, never across a
    change of ``group`` (the VMA): their (lo, hi) arrays."""
    if not len(lo):
        return lo, hi
    head = np.flatnonzero(np.r_[True, (lo[1:] - hi[:-1] > _COALESCE_GAP) | (group[1:] != group[:-1])])
    last = np.r_[head[1:] - 1, len(lo) - 1]
    return lo[head], hi[last]


def _merge_extents(lo, hi, huge, region):
    """Adjacent pieces of one region with the same huge-ness merged (the scans also split
    them by the WRITTEN bit) — vectorised: a fragmented heap has tens of thousands."""
    if len(lo) > 1:
        head = np.flatnonzero(np.r_[True, (lo[1:] != hi[:-1]) | (huge[1:] != huge[:-1])
                                    | (region[1:] != region[:-1])])
        last = np.r_[head[1:] - 1, len(lo) - 1]
        lo, hi, huge, region = lo[head], hi[last], huge[head], region[head]
    return lo, hi, huge, region


# Maps text from which the scans run beside the freeze's reading of the maps (~1 300 VMAs).
SCAN_AHEAD_MAPS_BYTES = 64 << 10
# Mapped bytes in the written spans from which the instant's scans are split across the CPUs:
# scanning 1 GiB for written pages takes ~1.2 ms, handing half of it to a waiting pool thread
# ~0.1 ms.
SCAN_SPLIT_BYTES = 256 << 20
_SCAN_PARTS = max(1, min(4, os.cpu_count() or 1))
# Shares per CPU of a split scan, taken by whichever thread is free (see _SharedScan): the
# freeze thread joins once it has read the maps, which with 65 000 mappings takes 23-31 ms
# while the whole scan takes ~20; two fixed halves left it scanning its own for 9-14 ms more.
_SHARES_PER_PART = 2
_SCAN_ALIGN = 2 << 20  # split spans are cut on huge-page boundaries
# Pages written during pre-protection copied in the pause are split across the CPUs from
# this much (~600 scattered pages: ~1 ms to read).
COPY_SPLIT_BYTES = 1 << 20
_scan_pool: ThreadPoolExecutor | None = None
_scan_pool_lock = threading.Lock()


def warm_scan_pool() -> ThreadPoolExecutor:
    """The threads that run the instant's scans, started now (before a pause, not in it)."""
    global _scan_pool
    with _scan_pool_lock:
        if _scan_pool is None:
            _scan_pool = started_pool(_SCAN_PARTS, "snapfs-instant")
        return _scan_pool


def _scan_cuts(spans: list[tuple[int, int]], starts: np.ndarray, ends: np.ndarray, parts: int,
               align: int) -> list[int]:
    """Addresses that cut ``spans`` (sorted, each made of whole VMAs [starts, ends)) into
    ``parts`` shares of about the same mapped bytes: a scan's cost follows the VMAs it
    walks, not the gaps between them. Cuts fall on multiples of ``align`` (never inside a
    huge page)."""
    if not spans or parts < 2:
        return []
    span_lo = np.array([lo for lo, _ in spans], np.uint64)
    span_hi = np.array([hi for _, hi in spans], np.uint64)
    j = np.searchsorted(span_lo, starts, side="right") - 1
    inside = (j >= 0) & (ends <= span_hi[np.maximum(j, 0)])
    size = np.where(inside, ends - starts, 0).astype(np.int64)
    cum = np.cumsum(size)
    total = int(cum[-1]) if len(cum) else 0
    cuts = []
    for part in range(1, parts):
        want = total * part // parts
        i = int(np.searchsorted(cum, want, side="right"))
        if i >= len(cum):
            break
        at = int(starts[i]) + (want - (int(cum[i]) - int(size[i])))
        cuts.append(max(int(starts[i]), at // align * align))
    return sorted(set(cuts))


def _cut_spans(spans: list[tuple[int, int]], cuts: list[int]) -> list[list[tuple[int, int]]]:
    """``spans`` (sorted) grouped by the address ``cuts`` (a span across one is cut), in
    address order: the groups' results, one after the other, stay sorted."""
    groups: list[list[tuple[int, int]]] = [[] for _ in range(len(cuts) + 1)]
    bounds = [0, *cuts, 1 << 64]
    for lo, hi in spans:
        for g in range(len(groups)):
            a, b = max(lo, bounds[g]), min(hi, bounds[g + 1])
            if a < b:
                groups[g].append((a, b))
    return [g for g in groups if g]


def _read_split(pid: int, buf: bytearray, ranges: np.ndarray) -> np.ndarray:
    """:func:`read_pages_robust` of ``ranges`` ((n, 2): address, length) back to back into
    ``buf``, split across the CPUs when large and the pool runs (never started in a pause)."""
    pool = _scan_pool
    if pool is None or _SCAN_PARTS < 2 or len(ranges) < 2 or int(ranges[:, 1].sum()) < COPY_SPLIT_BYTES:
        return read_pages_robust(pid, buf, ranges)
    return read_shared(pool, pid, buf, ranges, _SCAN_PARTS)


class _SharedScan:
    """The scan-ahead's shares (spans, in address order), each taken by the first free
    thread: the pool's helpers from the stop on, the freeze thread once it has read the maps
    (:meth:`run` in each). Results stay in share order; a failed share fails the whole."""

    def __init__(self, pid: int, shares: list[list[tuple[int, int]]]) -> None:
        self.pid = pid
        self.shares = shares
        self.results: list[list[np.ndarray] | None] = [None] * len(shares)
        self.failed = False
        self.abandoned = False
        self.futures: list[Future] = []
        self._next = 0
        self._lock = threading.Lock()

    def _take(self) -> int | None:
        with self._lock:
            if self.abandoned or self.failed or self._next >= len(self.shares):
                return None
            self._next += 1
            return self._next - 1

    def run(self) -> None:
        """Scan shares until none is left (one pagemap file for all of them)."""
        i = self._take()
        if i is None:
            return
        try:
            scanner = PagemapScanner(self.pid)
        except Exception:  # noqa: BLE001 — the pause scans again and reports what failed
            self.failed = True
            return
        try:
            while i is not None:
                self.results[i] = [populated_ranges(scanner, lo, hi, require=k.PAGE_IS_WRITTEN)
                                   for lo, hi in self.shares[i]]
                i = self._take()
        except Exception:  # noqa: BLE001 — see above
            self.failed = True
        finally:
            scanner.close()


@dataclass
class InstantPlan:
    """What :func:`protect_and_record` does for one reading of the maps and one
    pre-protection, decided from them alone: the ranges to scan for pages written since, the
    VMAs to scan in full and register, and the populated pages pre-protection recorded, cut
    by VMA. With 65 000 mappings deciding it took ~20 ms of the pause and the scans ~25 ms:
    :func:`plan_instant` decides it before the freeze while the target runs, and
    :meth:`scan_ahead` runs the scans while the freeze reads the maps (the other CPU). The
    pause uses both only if the maps it reads are the same text and no event (DONTNEED,
    munmap, mremap) changed a range since; otherwise it decides afresh."""

    text: str                 # the maps text it was decided for
    is_shared: np.ndarray     # per region: a tree's shared object (see protect_and_record)
    known: np.ndarray         # per region: populated pages are pre-protection's + those written
    modes: np.ndarray         # per region: mode == "wp"
    written_spans: list[tuple[int, int]]  # scanned for PAGE_IS_WRITTEN, in address order
    full: list[tuple[int, int]]           # scanned in full: VMAs not known from pre-protection
    registers: list[tuple[range | list[int], tuple[int, int] | None]]  # VMAs to register (their run)
    base: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # pre's pieces of known VMAs (lo, hi, cat, vi)
    scan_cuts: list[int] = field(default_factory=list)  # where a split scan-ahead cuts written_spans
    _ahead: _SharedScan | None = None
    _text_bytes: bytes | None = None

    def scan_ahead(self, pid: int) -> None:
        """Start scanning ``written_spans`` in the pool's threads (read-only: the target is
        stopped and the fault server halted): when reading the maps takes longer than a
        hand-off (~0.1 ms; ~0.5 us per VMA to read), and split across the CPUs when the
        spans are large, in shares the freeze thread helps with once it has read the maps
        (:meth:`scanned`). At the calling (freeze) thread's realtime priority if it has one."""
        pool = _scan_pool
        if pool is None or len(self.text) < SCAN_AHEAD_MAPS_BYTES and not self.scan_cuts:
            return  # (a pool not started before the pause, see warm_scan_pool: not in it)
        work = self._ahead = _SharedScan(pid, _cut_spans(self.written_spans, self.scan_cuts))
        helpers = min(len(work.shares), max(1, _SCAN_PARTS - 1))
        work.futures = [submit_helper(pool, work.run) for _ in range(helpers)]

    def abandon(self) -> None:
        """The pause decides afresh (the maps or a range changed): the helpers take no more
        shares."""
        work, self._ahead = self._ahead, None
        if work is not None:
            work.abandoned = True

    def expected_maps(self) -> tuple[str, bytes]:
        """The maps text it was decided for and its bytes, for the freeze's reading of the
        maps to compare with (see :func:`~snapfs.capture.maps.read_maps_text`); encoded on
        the first call (call it before the freeze: ~1 ms for 65 000 mappings)."""
        if self._text_bytes is None:
            self._text_bytes = self.text.encode()
        return self.text, self._text_bytes

    def scanned(self) -> list[np.ndarray] | None:
        """The scan-ahead's results in address order, or None if it did not run or failed
        (the pause then scans again, and reports what failed). This thread scans the shares
        no helper has taken yet (all of them if no helper has started), then waits for the
        helpers."""
        work, self._ahead = self._ahead, None
        if work is None:
            return None
        work.run()
        for f in work.futures:
            try:
                f.result()
            except Exception:  # noqa: BLE001 — see _SharedScan.run
                work.failed = True
        if work.failed or any(r is None for r in work.results):
            return None
        return [a for share in work.results for a in share]


def plan_instant(maps: ClassifiedMaps, pre: PreProtected, changed: list[tuple[int, int]] = (),
                 shared: Callable[[Vma], bool] | None = None) -> InstantPlan:
    """Decide the instant's work for the VMAs of ``maps`` (see :class:`InstantPlan`) after
    ``pre`` and the events that changed the ranges ``changed``; ``shared`` as given to
    :func:`protect_and_record`. Marks the regions' shared and unprotectable modes (the
    same marks whenever it runs again)."""
    regions = maps.regions
    starts, ends = maps.starts, maps.ends
    n = len(regions)
    is_shared = np.array([shared(v) for v in regions], bool) if n and shared is not None else np.zeros(n, bool)
    for i in np.flatnonzero(is_shared).tolist():
        regions[i].meta["shared"] = True
    for start, reason in pre.unprotectable.items():
        i = int(np.searchsorted(starts, np.uint64(start)))
        if i < n and regions[i].start == start and regions[i].mode == "wp":
            regions[i].mode = "copy"
            regions[i].meta["unprotectable"] = reason
    # Unchanged since pre-protection: the same bounds were protected then, and no event
    # touched it since.
    prot = pre.protected
    j = np.minimum(np.searchsorted(prot[:, 0], starts), max(len(prot) - 1, 0))
    known = (prot[j, 0] == starts) & (prot[j, 1] == ends) if len(prot) else np.zeros(n, bool)
    for lo, hi in changed:
        known[np.searchsorted(ends, np.uint64(lo), side="right"):np.searchsorted(starts, np.uint64(hi))] = False

    # Per run of protectable VMAs: what was written or populated since pre-protection (one
    # scan, across near runs), and in full the VMAs not known from then (new, changed, or
    # no pre).
    modes = np.fromiter((v.mode == "wp" for v in regions), bool, n)
    unknown_all = modes & ~known
    spans: list[tuple[int, int]] = []
    full: list[tuple[int, int]] = []
    registers: list[tuple[range | list[int], tuple[int, int] | None]] = []
    runs = maps.wp_runs()
    # Unknown VMAs per run (what lies between runs is not in write-protect mode).
    has_unknown = (np.add.reduceat(unknown_all.astype(np.int64), [r[2] for r in runs]).tolist()
                   if runs else [])
    # Per run: little enough mapped between it and the previous one to scan them together.
    near = _near(maps, [r[1] for r in runs[:-1]], [r[0] for r in runs[1:]])
    span: tuple[int, int] | None = None  # known runs to scan together for written pages
    for (lo, hi, first, last), some, close in zip(runs, has_unknown, [False, *near]):
        if not some:
            if span is not None and close:
                span = (span[0], hi)
                continue
            if span is not None:
                spans.append(span)
            span = (lo, hi)
            continue
        if span is not None:  # spans stay sorted by address
            spans.append(span)
            span = None
        unknown = (np.flatnonzero(unknown_all[first:last]) + first).tolist()
        if len(unknown) > _FULL_SCAN_EACH or len(unknown) == last - first:
            full.append((lo, hi))
            registers.append((range(first, last), (lo, hi)))
            known[first:last] = False  # the full scan stands for the whole run
        else:
            spans.append((lo, hi))
            full += [(regions[i].start, regions[i].end) for i in unknown]
            registers.append((unknown, None))
    if span is not None:
        spans.append(span)
    # Populated pages known from pre-protection (known VMAs only). Not a tree's shared
    # mappings: their pages are recorded per object, and where a member maps only the pages
    # it touched these ranges are many (4 members sharing 256 MiB: ~5 ms of the instant per
    # member to merge them, for nothing).
    plo, phi, pcat, pvi = _by_region(pre.populated, starts, ends)
    sel = known[pvi] & ~is_shared[pvi]
    cuts: list[int] = []
    if _SCAN_PARTS > 1 and spans:
        in_spans = modes & known
        if int(np.sum((ends - starts)[in_spans], dtype=np.int64)) >= SCAN_SPLIT_BYTES:
            align = max(_SCAN_ALIGN, int(maps.page_sizes[in_spans].max()))
            cuts = _scan_cuts(spans, starts, ends, _SCAN_PARTS * _SHARES_PER_PART, align)
    return InstantPlan(text=maps.text, is_shared=is_shared, known=known, modes=modes, written_spans=spans,
                       full=full, registers=registers, base=(plo[sel], phi[sel], pcat[sel], pvi[sel]),
                       scan_cuts=cuts)


def _with_written(base, written, starts: np.ndarray):
    """The union of two sets of sorted disjoint pieces (lo, hi, cat, vi), none across a VMA
    bound: sorted, every page once, those in ``written`` with its categories and
    PAGE_IS_WRITTEN. Only the pieces of ``base`` a written one overlaps are cut (a few
    hundred among tens of thousands); the others are kept as they are."""
    blo, bhi, bcat, bvi = base
    wlo, whi, wcat, wvi = written
    if not len(wlo):
        return base
    if len(blo) > 4 * len(wlo):
        first = np.searchsorted(bhi, wlo, side="right")  # base pieces ending after its start
        last = np.searchsorted(blo, whi, side="left")    # ... and starting before its end
        some = last > first
        edge = np.zeros(len(blo) + 1, np.int64)
        np.add.at(edge, first[some], 1)
        np.add.at(edge, last[some], -1)
        cut = np.cumsum(edge[:-1]) > 0
    else:  # few: all of them
        cut = np.ones(len(blo), bool)
    merged = _union(_as_ranges(blo[cut], bhi[cut], bcat[cut]), _as_ranges(wlo, whi, wcat | k.PAGE_IS_WRITTEN))
    mlo, mhi, mcat = merged["start"], merged["end"], merged["categories"]
    mvi = np.searchsorted(starts, mlo, side="right") - 1
    keep = ~cut
    if not keep.any():
        return mlo, mhi, mcat, mvi
    rlo = blo[keep]
    at = np.searchsorted(rlo, mlo)
    return (np.insert(rlo, at, mlo), np.insert(bhi[keep], at, mhi), np.insert(bcat[keep], at, mcat),
            np.insert(bvi[keep], at, mvi))


def protect_and_record(
    ft: FrozenTarget,
    *,
    include_readonly: bool,
    huge_sizes: dict[int, int],
    features: int,
    pre: PreProtected | None = None,
    copy_buffer: bytearray | None = None,
    shared: Callable[[Vma], bool] | None = None,
    copy_written: bytearray | None = None,
) -> Prepared:
    """Run inside the freeze: protect, record populated pages, copy what cannot be protected.

    The uffd has had its handshake (``features``). With ``pre`` the memory was protected
    while the target ran (:mod:`~snapfs.capture.preprotect`): only pages populated but not
    protected (``PAGE_IS_WRITTEN``: written or first populated since) are protected here, and
    for VMAs unchanged since, the populated pages are those recorded then plus the written
    ones — so the cost follows what changed, not the target's size. Without ``pre`` every
    populated page is "written" and protected here. ``copy_buffer`` (pages already touched,
    see :func:`copy_buffer_for`) receives what is copied, if large enough.

    Nothing here is done VMA by VMA when the VMA is unchanged: the maps text is compared with
    the one pre-protection followed, runs of adjacent protectable VMAs (and runs with at most
    ``_SCAN_MERGE_BYTES`` of other mappings between them, such as thread stacks between guard
    pages; likewise the VMAs to copy) are scanned with one ``PAGEMAP_SCAN`` and re-protected
    with one ioctl per coalesced range, and the results
    are assigned to VMAs with array operations (65 000 mappings paused 2.1-2.4 s when each
    VMA took its own scan, register and Python bookkeeping). ``pre.plan`` (an
    :class:`InstantPlan` decided before the freeze, its scans perhaps run ahead) is used when
    still valid.

    ``shared`` (tree captures) names the VMAs that map an object several processes share:
    they are protected like the others, but their pages are recorded (or copied) once per
    object by the caller, so they get no ledger extent and no copy here (``meta["shared"]``).

    With ``copy_written`` (a buffer, pages already touched), the short runs of private
    4 KiB pages written since pre-protection are copied into it rather than protected again
    (:attr:`Prepared.written`), as far as it holds them: they are claimed in the ledger
    and stay writable. Not for continuous mode, where the protection records what changed.
    """
    t0 = time.monotonic()
    pre = pre or PreProtected()
    maps = pre.maps
    if maps is None:
        maps = ClassifiedMaps(ft.maps_text, include_readonly=include_readonly, huge_sizes=huge_sizes)
    else:
        maps.update(ft.maps_text)
    plan: InstantPlan | None = pre.plan
    if plan is not None and (ft.maps_text != plan.text or pre.changed):
        plan.abandon()
        plan = None
    ahead = plan.scanned() if plan is not None else None
    if plan is None:
        plan = plan_instant(maps, pre, pre.changed, shared)
    regions = maps.regions
    starts, ends = maps.starts, maps.ends
    n = len(regions)
    is_shared, known, modes = plan.is_shared, plan.known, plan.modes.copy()

    scanner = PagemapScanner(ft.pid)
    protected_pages = 0
    copy_jobs: list[tuple[int, Vma, np.ndarray]] = []
    try:
        # 1. What was written or populated since pre-protection, and in full the VMAs not
        # known from then (registered now).
        if ahead is None:
            ahead = [populated_ranges(scanner, lo, hi, require=k.PAGE_IS_WRITTEN) for lo, hi in plan.written_spans]
        full = [populated_ranges(scanner, lo, hi, k.PAGE_IS_WRITTEN) for lo, hi in plan.full]
        for members, run in plan.registers:
            _register_new(ft.uffd, [regions[i] for i in members], run=run)
        if plan.registers:  # a VMA whose register was refused is copied, not in the ledger
            modes = np.fromiter((v.mode == "wp" for v in regions), bool, n)
        base = plan.base
        if full:
            flo, fhi, fcat, fvi = _by_region(np.concatenate(full), starts, ends)
            order = np.argsort(np.concatenate([base[0], flo]), kind="stable")
            base = tuple(np.concatenate([b, f])[order] for b, f in zip(base, (flo, fhi, fcat, fvi)))
        lo, hi, cat, vi = _with_written(base, _by_region(np.concatenate([_NO_RANGES, *ahead]), starts, ends),
                                        starts)
        keep = modes[vi] if len(vi) else np.zeros(0, bool)
        lo, hi, cat, vi = lo[keep], hi[keep], cat[keep], vi[keep]

        # 2. Re-protect what is written: one ioctl per coalesced range within a VMA. Not across
        # VMAs: the kernel's cost is per VMA in the range (a TLB flush each), and with 65 000
        # small mappings, ranges coalesced across them covered every VMA (freeze 618 ms,
        # against 248 ms touching only the VMAs written since pre-protection; load ~15).
        is_written = (cat & k.PAGE_IS_WRITTEN) != 0
        page_sizes = maps.page_sizes
        copied = np.zeros(len(lo), bool)
        if copy_written is not None and is_written.any():
            copied = _copy_written(ft.pid, copy_written, lo, hi,
                                   is_written & ~is_shared[vi] & (page_sizes[vi] == k.PAGE_SIZE))
            is_written &= ~copied
        c_lo, c_hi, c_vi = lo[copied], hi[copied], vi[copied]
        t_lo, t_hi = _coalesce(lo[is_written], hi[is_written], vi[is_written])
        res = ft.uffd.protect_ranges(t_lo, t_hi)
        protected_pages += int(((t_hi - t_lo)[res == 0] // np.uint64(k.PAGE_SIZE)).sum())
        failed: set[int] = set()
        for j in np.flatnonzero(res).tolist():
            err = -int(res[j])
            if err not in (errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOTSUP, errno.ENOENT):
                raise OSError(err, f"UFFDIO_WRITEPROTECT: {os.strerror(err)}")
            failed |= _protect_each(ft.uffd, regions, starts, ends, int(t_lo[j]), int(t_hi[j]))
        for i in failed:  # cannot be write-protected: copy it now, stopped
            regions[i].mode = "copy"
            regions[i].meta["unprotectable"] = "write-protect refused"

        # 3. The VMAs handled one by one: copies, read-only, shmem pages not mapped. Only
        # those (a plain protected VMA needs nothing here): the others are most of a target
        # with tens of thousands of mappings, and two Python passes over all of them cost
        # ~10 ms of the pause.
        modes[list(failed)] = False  # modes stays each VMA's mode == "wp" from here on
        some = [(i, regions[i]) for i in np.flatnonzero(~modes | maps.shmem).tolist()]
        extra = []
        found = _scan_grouped(scanner, maps, [
            i for i, v in some
            if (v.mode == "copy" and v.kind != "vdso" and not is_shared[i]) or v.mode == "readonly"])
        for i, v in some:
            if v.mode == "wp" and v.kind == "shmem" and is_shared[i]:
                # A tree's shared object: its pages are recorded once per object, by offset,
                # by the caller; here only the empty entries need their markers, which the
                # pre-protection's whole-range protect installed in a VMA still known (else
                # an event made it unknown). Finding and protecting this member's unmapped
                # file pages range by range was ~70% of a tree's instant (4 members sharing
                # 256 MiB: ~70 ms of the pause).
                if not known[i]:
                    _protect_each(ft.uffd, regions, starts, ends, v.start, v.end)
            elif v.mode == "wp" and v.kind == "shmem":
                extra += _shmem_unmapped(ft, v, i, lo[vi == i], hi[vi == i])
            elif v.mode == "copy" and v.kind == "vdso":
                # The vdso's pages are the kernel's image, mapped on first use: one the
                # target never ran is not present, but it is not zero either.
                copy_jobs.append((i, v, np.array([(v.start, v.end, 0)], REGION_DTYPE)))
            elif v.mode == "copy" and not is_shared[i]:
                copy_jobs.append((i, v, found[i]))
            elif v.mode == "readonly":
                r = found[i]
                extra.append((r["start"], r["end"], r["categories"], np.full(len(r), i, np.int64)))
        if failed:
            keep = modes[vi]
            lo, hi, cat, vi = lo[keep], hi[keep], cat[keep], vi[keep]
        for elo, ehi, ecat, evi in extra:
            lo, hi, cat, vi = (np.concatenate([lo, elo]), np.concatenate([hi, ehi]),
                               np.concatenate([cat, ecat]), np.concatenate([vi, evi]))
        if is_shared.any():  # protected above; recorded once per object by the caller
            keep = ~is_shared[vi]
            lo, hi, cat, vi = lo[keep], hi[keep], cat[keep], vi[keep]
        if extra:  # else still sorted
            order = np.argsort(lo, kind="stable")
            lo, hi, cat, vi = lo[order], hi[order], cat[order], vi[order]
        # Only hugetlb pages are saved whole. A transparent huge page is saved 4 KiB at a time
        # like any other page: unprotecting 4 KiB of it makes the kernel map it with page
        # table entries (the page itself stays huge). Saving it whole on its first write
        # (2 MiB copied by the Python fault thread) put 18-37 ms on the fault round trip at
        # p99: at 10k writes/s every THP of a GiB is written within ~50 ms of the freeze, so
        # the fault path copied the whole target and waited for the store.
        huge = page_sizes[vi] != k.PAGE_SIZE
        is_thp = ((cat & k.PAGE_IS_HUGE) != 0) & ~huge
        thp = np.stack([lo[is_thp], hi[is_thp]], axis=1) if is_thp.any() else np.empty((0, 2), np.uint64)
        lo, hi, huge, vi = _merge_extents(lo, hi, huge, vi)
        copies = _copy_all(ft.pid, copy_jobs, copy_buffer)
    finally:
        scanner.close()
    ledger = Ledger(lo, hi, vi.astype(np.int32), huge, maps.starts)
    written, written_data = [], None
    if copied.any():
        # Not those of a VMA that could not be protected after all: copied whole above.
        ok = modes[c_vi]
        _compact(copy_written, (c_hi - c_lo).astype(np.int64), ok)
        if ok.any():
            written, written_data = _claim_written(ledger, maps.starts, copy_written, c_lo[ok], c_hi[ok], c_vi[ok])
    return Prepared(
        regions=regions,
        ledger=ledger,
        copies=copies,
        features=features,
        protect_ms=(time.monotonic() - t0) * 1000.0,
        reprotected_pages=protected_pages,
        thp=thp,
        written=written,
        written_data=written_data,
    )


def _near(maps: ClassifiedMaps, ends: list[int], starts: list[int]) -> list[bool]:
    """Per pair: at most _SCAN_MERGE_BYTES of mappings lie between ``ends[i]`` and ``starts[i]``."""
    if not len(ends):
        return []
    return (maps.mapped_bytes(ends, starts) <= _SCAN_MERGE_BYTES).tolist()


def _scan_grouped(scanner: PagemapScanner, maps: ClassifiedMaps, wanted: list[int]) -> dict[int, np.ndarray]:
    """The populated ranges of each of the regions ``wanted`` (ascending indices), with one
    scan per group of them no more than _SCAN_MERGE_BYTES of other mappings apart."""
    regions = maps.regions
    out: dict[int, np.ndarray] = {}
    if not wanted:
        return out
    idx = np.array(wanted, np.int64)
    starts, ends = maps.starts[idx], maps.ends[idx]
    # Groups start where the previous wanted region is too far.
    heads = [0] + [h + 1 for h, close in enumerate(_near(maps, ends[:-1], starts[1:])) if not close]
    for g, h in zip(heads, heads[1:] + [len(wanted)]):
        r = populated_ranges(scanner, regions[wanted[g]].start, regions[wanted[h - 1]].end)
        lo, hi, cat, vi = _by_region(r, starts[g:h], ends[g:h])
        cuts = np.searchsorted(vi, np.arange(h - g + 1)).tolist()  # vi ascends with addresses
        for j, a, b in zip(wanted[g:h], cuts, cuts[1:]):
            out[j] = _as_ranges(lo[a:b], hi[a:b], cat[a:b])
    return out


# Written runs of at most this many pages are copied in the freeze rather than protected
# again: a protect ioctl costs ~5 us whatever its length, a copied and claimed page ~4 us in
# one batch, and the pages written between pre-protection and the freeze are likely the ones
# written next (each a fault right after the resume). A target writing 10k random pages/s:
# ~180-350 single pages, their ioctls 0.65-1.16 ms of a 3.7-4.8 ms protect step.
COPY_WRITTEN_RUN = 16
# The buffer for them (prepared before the freeze). 65 000 mappings at 10k writes/s wrote
# more than 4 MiB of them: the rest took 460 protect ioctls, 33 ms (~70 us each there).
COPY_WRITTEN_MAX = 16 << 20


def _copy_written(pid: int, buf: bytearray, lo: np.ndarray, hi: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Copy the ranges ``cand`` selects (short ones only, as many as ``buf`` holds, in
    address order) back to back into ``buf``; True per range copied whole."""
    size = (hi - lo).astype(np.int64)
    cand = cand & (size <= COPY_WRITTEN_RUN * k.PAGE_SIZE)
    idx = np.flatnonzero(cand)
    idx = idx[np.cumsum(size[idx]) <= len(buf)]
    out = np.zeros(len(lo), bool)
    if not len(idx):
        return out
    ok = _read_split(pid, buf, np.stack([lo[idx], size[idx]], axis=1).astype(np.int64))
    counts = size[idx] // k.PAGE_SIZE
    # A range not read whole (cannot be, stopped) is protected again instead.
    whole = np.add.reduceat(ok, np.r_[0, np.cumsum(counts)[:-1]]) == counts
    out[idx[whole]] = True
    _compact(buf, size[idx], whole)
    return out


def _compact(buf: bytearray, sizes: np.ndarray, keep: np.ndarray) -> None:
    """``buf`` holds pieces of ``sizes`` bytes back to back: move those ``keep`` selects
    to its start, still back to back (a no-op when all are kept)."""
    if keep.all():
        return
    view = np.frombuffer(buf, np.uint8)
    starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
    kept = [view[a:a + n].copy() for a, n in zip(starts[keep].tolist(), sizes[keep].tolist())]
    if kept:
        joined = np.concatenate(kept)
        view[:len(joined)] = joined


def _claim_written(ledger: Ledger, region_starts: np.ndarray, buf: bytearray, lo: np.ndarray, hi: np.ndarray,
                   vi: np.ndarray) -> tuple[list[tuple[int, int, int]], memoryview]:
    """Claim the copied ranges in the (new) ledger; their pieces (region, first page,
    pages) and data."""
    counts = ((hi - lo) // np.uint64(k.PAGE_SIZE)).astype(np.int64)
    addrs = np.repeat(lo, counts) + (positions_in_runs(counts) * k.PAGE_SIZE).astype(np.uint64)
    ext = np.searchsorted(ledger.ext_end, addrs, side="right")
    slots = ledger.ext_base[ext] + ((addrs - ledger.ext_start[ext]) >> np.uint64(k.PAGE_SHIFT)).astype(np.int64)
    ledger.claim_new(slots)
    firsts = ((lo - region_starts[vi]) >> np.uint64(k.PAGE_SHIFT)).astype(np.int64)
    pieces = list(zip(vi.tolist(), firsts.tolist(), counts.tolist()))
    return pieces, memoryview(buf)[:int(counts.sum()) * k.PAGE_SIZE]


def _register_new(uffd, vmas: list[Vma], run: tuple[int, int] | None = None) -> None:
    """Register VMAs not known from pre-protection (a no-op for those registered already);
    with ``run``, first try the whole run in one call. A VMA the kernel refuses becomes a
    copy."""
    if run is not None:
        try:
            uffd.register_wp(run[0], run[1] - run[0])
            return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOTSUP):
                raise
    for v in vmas:
        if v.mode != "wp":
            continue
        try:
            uffd.register_wp(v.start, v.length)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOTSUP):
                raise
            v.mode = "copy"
            v.meta["unprotectable"] = exc.strerror


def _protect_each(uffd, regions: list[Vma], starts: np.ndarray, ends: np.ndarray, a: int, b: int) -> set[int]:
    """Protect [a, b) VMA by VMA (one of them refused a ranged call); returns the indices of
    the VMAs that cannot be write-protected."""
    failed = set()
    for i in range(int(np.searchsorted(ends, np.uint64(a), side="right")), int(np.searchsorted(starts, np.uint64(b)))):
        v = regions[i]
        try:
            uffd.protect(max(a, v.start), min(b, v.end) - max(a, v.start), wp=True)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOTSUP, errno.ENOENT):
                raise
            failed.add(i)
    return failed


def _shmem_unmapped(ft: FrozenTarget, v: Vma, i: int, lo: np.ndarray, hi: np.ndarray) -> list[tuple]:
    """File pages of a shmem VMA that the target has not mapped (written through another
    mapping or with write()): protected too (the uffd installs markers on empty entries), so
    they are saved like the others. Returns extents to add to the ledger."""
    cached = _shmem_cached(ft.pid, v)
    if cached is None:
        v.meta["unmapped_file_pages"] = "not checked (no access to map_files)"
        return []
    unmapped = _subtract(cached, list(zip(lo.tolist(), hi.tolist())))
    if not unmapped:
        return []
    try:
        for s, e in unmapped:
            ft.uffd.protect(s, e - s, wp=True)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOTSUP, errno.ENOENT):
            raise
        return []
    huge = v.page_size != k.PAGE_SIZE
    return [(np.array([s for s, _ in unmapped], np.uint64), np.array([e for _, e in unmapped], np.uint64),
             np.full(len(unmapped), k.PAGE_IS_HUGE if huge else 0, np.uint64), np.full(len(unmapped), i, np.int64))]
