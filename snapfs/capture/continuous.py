"""Continuous snapshots: stay attached and take each later snapshot as an incremental child.

The first snapshot is an ordinary capture in *continuous* mode: its scan leaves pages
protected, so when it ends the (sync) protection says exactly which pages were written
since its freeze. :func:`start_tracking` then stops the target once more (from a worker
thread, while the fault path keeps serving faults, so no thread stays blocked), records
those pages, and swaps the sync userfaultfd for an async one (``UFFD_FEATURE_WP_ASYNC``):
from then on the kernel itself unprotects a page on its first write, never blocking the
target, and ``PAGEMAP_SCAN`` reports it as ``PAGE_IS_WRITTEN``.

Each later snapshot (:func:`capture_next`) works in two passes, so that the pause grows
with what is written *during the snapshot*, not with what changed since the last one:

1. **Pre-pass, target running** (:func:`prescan`): per tracked VMA one ``PAGEMAP_SCAN``
   with ``PM_SCAN_WP_MATCHING`` reports the populated pages with their written bit and
   re-protects the written ones in the same walk; those pages are then copied (batched
   ``process_vm_readv``). A page written after its re-protection shows as written again.
2. **Stop**: per anonymous VMA the pre-pass walked, a *probe* (:func:`_probe`): the
   kernel's fast "not write-protected" question (~0.3 ms per GiB: written pages, and
   entries emptied since), plus, on kernels that do not report a missing page table there
   (:func:`_holes_read_as_written`), a "nothing populated" question, so that memory the
   target dropped in whole page tables (``MADV_DONTNEED`` of 2 MiB, a huge page) is seen.
   Only the spots the probe found get a full walk (populated pages, written bit,
   re-protect); other VMAs get one full walk (~3 ms per GiB). The work on the pre-pass's
   VMAs starts at once in helper threads, beside the maps read (the target's cores are
   free). Only pages written since the pre-pass are copied: a page the pre-pass copied
   and that was not written since holds its value at the stop. This copy must happen
   inside the stop: in async mode a write to a re-protected page does not wait for anyone.

Every other populated page is inherited from the parent without being read, in one call
per region (``SnapshotWriter.inherit_ranges`` / ``put_scattered``). The pause is the stop, the maps read, the
probe, and copying what was written in the few milliseconds since the pre-pass. A region
that is new, changed size, or cannot be tracked is copied whole during the stop. If snapfs
dies, the kernel drops the async protection with its last fd: the target never notices.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import trio

from snapfs import ranges as rs
from snapfs.capture import coreinfo
from snapfs.capture import kernel as k
from snapfs.capture import procstate
from snapfs.capture.context import CaptureContext
from snapfs.capture.freeze import stopped, take_userfaultfd
from snapfs.capture.maps import Vma, classify, parse_maps, read_maps
from snapfs.capture.memory import prefaulted_buffer
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.protect import Prepared
from snapfs.capture.helpers import read_shared, share, started_pool, submit_helper
from snapfs.capture.priority import LOOP_PRIORITY, realtime_thread
from snapfs.capture.handle import ProcessHandle
from snapfs.capture.inject import find_gadgets
from snapfs.capture.ptrace import StoppedProcess, check_target
from snapfs.capture.relocated import save_private_pages
from snapfs.capture.target_info import process_meta
from snapfs.capture.types import CaptureOptions, CaptureResult, region_spec
from snapfs.capture.uffd import Uffd
from snapfs.elfcore.state import BLOB as CORE_BLOB
from snapfs.errors import TargetError

PAGE = k.PAGE_SIZE
ASYNC_FEATURES = k.UFFD_FEATURE_WP_ASYNC | k.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
_POPULATED = dict(require=0, exclude=k.PAGE_IS_PFNZERO, anyof=k.PAGE_IS_PRESENT | k.PAGE_IS_SWAPPED)
# The stop's scan and copy are split across this many threads (ioctl and process_vm_readv
# release the GIL; the target is stopped, so its cores are free).
SPLIT = max(1, min(4, os.cpu_count() or 1))
_SPLIT_MIN = 64 << 20  # VMAs larger than this are scanned in SPLIT address slices
_SPLIT_COPY = 4 << 20  # copies larger than this are split SPLIT ways
_SPLIT_EARLY = 2 << 30  # stop work costing more than probing this much is split SPLIT ways
# Above this much written memory a child is taken as a live capture (short pause, background
# copy) instead of copying while stopped; the store then keeps only changed pages.
STOPPED_COPY_LIMIT = 32 << 20
_STOP_BUFFER = 4 << 20  # the stop's copy buffer, touched before the stop


@dataclass
class Tracking:
    """An attached target whose writes are tracked since the last snapshot (``parent``)."""

    pid: int
    uffd: Uffd  # async write-protect mode
    options: CaptureOptions
    huge_sizes: dict[int, int]
    parent: str
    parent_regions: dict[str, int]  # name -> length of the parent's regions
    # Pages written between the parent's freeze and the start of async tracking:
    # (n, 2) arrays of [start, end) by region name.
    written_before: dict[str, np.ndarray] = field(default_factory=dict)
    buffer: bytearray = field(default_factory=bytearray)  # pages copied by the pre-pass
    stop_buffer: bytearray = field(default_factory=bytearray)  # pages copied while stopped
    last_stop_bytes: int = 0
    # The stop that switched from the capture's sync uffd to async tracking (a pause of its
    # own: the sync protection is dropped and all memory protected again inside it).
    switch_pause_ms: float = 0.0
    # Helper threads for the stop (scan and copy split across cores): made on first use.
    pool: ThreadPoolExecutor | None = None
    # The pinned target and the capture lock, held for the whole series.
    handle: ProcessHandle | None = None

    def close(self) -> None:
        """Stop tracking (the kernel drops the protection) and let go of the target."""
        self.uffd.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _written(found: np.ndarray) -> list[tuple[int, int]]:
    sel = found[(found["categories"] & k.PAGE_IS_WRITTEN) != 0]
    return list(zip(sel["start"].tolist(), sel["end"].tolist()))


def _as_ranges(pairs: list[tuple[int, int]]) -> np.ndarray:
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _arm(uffd: Uffd, vmas: list[Vma]) -> None:
    """Register and write-protect every protectable VMA in async mode (target stopped)."""
    for v in vmas:
        if v.mode != "wp":
            continue
        try:
            uffd.register_wp(v.start, v.length)
            uffd.protect(v.start, v.length, wp=True)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOTSUP, errno.ENOMEM):
                raise
            # Not trackable: it reads as all written, so it is copied whole each time.


async def start_tracking(
    ctx: CaptureContext, prep: Prepared, name: str, options: CaptureOptions, huge_sizes: dict,
    handle: ProcessHandle,
) -> Tracking:
    """At the end of a continuous-mode capture (fault path still running): record what was
    written since its freeze and switch to async tracking, in one more short stop. The
    tracking takes ``handle`` (the pinned target and its capture lock) over."""
    try:
        handle.gadgets = find_gadgets(ctx.pid)  # before the stop: the pause stays short
    except (TargetError, OSError):
        handle.gadgets = None  # searched for again once stopped

    def close_sync_uffd() -> None:  # in the trio thread: the fault path waits on this fd
        trio.lowlevel.notify_closing(ctx.uffd.fd)
        ctx.uffd.close()

    stop_ms = 0.0

    def switch() -> tuple[Uffd, dict]:
        nonlocal stop_ms
        proc = StoppedProcess(handle)
        t0 = time.monotonic()
        proc.stop()  # threads blocked on a sync fault stop once the fault path served it
        scanner = PagemapScanner(ctx.pid)
        new: Uffd | None = None
        try:
            written = {
                v.name: _as_ranges(
                    _written(scanner.scan(v.start, v.end, **_POPULATED, report=k.PAGE_IS_WRITTEN))
                )
                for v in prep.regions
                if v.mode == "wp"
            }
            trio.from_thread.run_sync(close_sync_uffd)
            new = Uffd(take_userfaultfd(proc))
            try:
                new.api(ASYNC_FEATURES)
            except OSError:
                new.api(k.UFFD_FEATURE_WP_ASYNC)
            vmas = classify(read_maps(ctx.pid), include_readonly=options.include_readonly,
                            huge_sizes=huge_sizes)
            _arm(new, vmas)
            return new, written
        except BaseException:
            if new is not None:
                new.close()
            raise
        finally:
            scanner.close()
            proc.release()
            stop_ms = (time.monotonic() - t0) * 1e3

    uffd, written = await trio.to_thread.run_sync(switch)
    return Tracking(
        pid=ctx.pid,
        uffd=uffd,
        options=options,
        huge_sizes=huge_sizes,
        parent=name,
        parent_regions={v.name: v.length for v in prep.regions},
        written_before=written,
        switch_pause_ms=stop_ms,
        handle=handle,
    )


def _ranges_of(found: np.ndarray, written: bool | None = None) -> np.ndarray:
    """A scan's result as ranges (only the written, or unwritten, ones if asked)."""
    if written is not None:
        found = found[((found["categories"] & k.PAGE_IS_WRITTEN) != 0) == written]
    return rs.norm(np.stack([found["start"].astype(np.int64), found["end"].astype(np.int64)], axis=1))


# ---------------------------------------------------------------- the scans
_WP_SCAN = k.PM_SCAN_WP_MATCHING | k.PM_SCAN_CHECK_WPASYNC
_BLOCK = 2 << 20   # slices of a split walk start on these boundaries (huge pages)


def _scan_and_reprotect(scanner: PagemapScanner, start: int, end: int, tracked: bool
                        ) -> tuple[np.ndarray, bool]:
    """Populated ranges of [start, end) with their ``PAGE_IS_WRITTEN`` bit; in a tracked
    region the same walk re-protects the written pages (``PM_SCAN_WP_MATCHING``: no ioctl
    per range). Returns (ranges, reprotected)."""
    if tracked:
        try:
            return scanner.scan(start, end, **_POPULATED, report=k.PAGE_IS_WRITTEN, flags=_WP_SCAN), True
        except OSError as exc:  # EPERM: not registered in async mode (it could not be armed)
            if exc.errno not in (errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            # A walk that failed part way (EINVAL: a partial huge page) may have re-protected
            # pages it did not report: count every page as written (copied whole, re-armed).
            found = scanner.scan(start, end, **_POPULATED, report=k.PAGE_IS_WRITTEN)
            found["categories"] |= k.PAGE_IS_WRITTEN
            return found, False
    return scanner.scan(start, end, **_POPULATED, report=k.PAGE_IS_WRITTEN), False


_MAX_SPOTS = 64   # walks per VMA over the spots a probe found


def _probe(scanner: PagemapScanner, start: int, end: int) -> tuple[np.ndarray | None, np.ndarray]:
    """Cheap questions instead of a full walk (~0.3 + 0.7 ms per GiB, against ~3 ms): which
    entries are not write-protected (written pages, and empty entries inside page tables:
    the kernel's fast path, which reports no per-page categories and protects nothing),
    and, unless that already covers it (:func:`_holes_read_as_written`), where nothing is
    populated (memory dropped in whole page tables has no entry left to be unprotected).
    Returns (unprotected, empty); unprotected is None if the range is not (all) tracked in
    async mode any more."""
    try:
        found = scanner.scan(start, end, require=k.PAGE_IS_WRITTEN, report=k.PAGE_IS_WRITTEN,
                             flags=k.PM_SCAN_CHECK_WPASYNC)
        unprotected = _ranges_of(found)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        unprotected = None
    if _holes_read_as_written():
        return unprotected, rs.EMPTY
    empty = scanner.scan(start, end, require=0, exclude=k.PAGE_IS_PRESENT | k.PAGE_IS_SWAPPED)
    return unprotected, _ranges_of(empty)


@functools.cache
def _holes_read_as_written() -> bool:
    """Whether this kernel's ``PAGEMAP_SCAN`` reports a range with no page table in an
    async write-protected VMA as written (a 2026 fix to ``pagemap_scan_pte_hole``, marked
    for stable; older kernels skip such ranges): then the fast question alone also finds
    memory dropped in whole page tables. Tried once on snapfs's own memory (an untouched,
    registered 4 MiB mapping); False when it cannot be tried."""
    try:
        uffd = Uffd(k.syscall("userfaultfd", os.O_CLOEXEC | os.O_NONBLOCK))
    except OSError:
        return False
    area = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    scanner = None
    try:
        uffd.api(k.UFFD_FEATURE_WP_ASYNC)
        base = int(k.ffi.cast("uintptr_t", k.ffi.from_buffer(area)))
        block = -(-base // _BLOCK) * _BLOCK  # a 2 MiB block inside: no page table under it
        uffd.register_wp(base, 4 << 20)
        scanner = PagemapScanner(os.getpid())
        found = scanner.scan(block, block + _BLOCK, require=k.PAGE_IS_WRITTEN, report=k.PAGE_IS_WRITTEN,
                             flags=k.PM_SCAN_CHECK_WPASYNC)
        return rs.nbytes(_ranges_of(found)) == _BLOCK
    except OSError:
        return False
    finally:
        if scanner is not None:
            scanner.close()
        uffd.close()
        area.close()


def _probe_eligible(v: Vma) -> bool:
    """Private anonymous memory in base pages: no PTE markers there (snapfs never protects
    unpopulated anonymous entries), so 'populated' is exactly 'not empty', and an empty entry
    shows as not protected."""
    return v.mode == "wp" and v.kind in ("heap", "stack", "anon") and not v.shared and v.page_size == PAGE


PROBE, REPROTECT, SCAN = "probe", "reprotect", "scan"


class _Walk(NamedTuple):
    """One piece of the stop's page-table work over [start, end): ``how`` is PROBE (the fast
    questions of :func:`_probe`), REPROTECT (a full walk of a tracked VMA, re-protecting
    what was written) or SCAN (a full walk of an untracked one). ``key`` is what the result
    belongs to (a pre-pass VMA's (start, end, name), or a VMA's index at the stop); a split
    cuts on multiples of ``align``. (A tuple: a stop may make tens of thousands.)"""

    key: Any
    start: int
    end: int
    how: str
    align: int

    def run(self, scanner: PagemapScanner) -> tuple:
        """A probe's (unprotected, empty) or a full walk's (found, reprotected)."""
        if self.how == PROBE:
            return _probe(scanner, self.start, self.end)
        return _scan_and_reprotect(scanner, self.start, self.end, self.how == REPROTECT)


def _slices(walks: list[_Walk], parts: int) -> list[list[_Walk]]:
    """The walks dealt to ``parts`` workers, balanced by size: large ones are cut into
    ``parts`` slices (on huge-page boundaries)."""
    pieces = []
    for w in walks:
        align = max(w.align, _BLOCK)
        if parts > 1 and w.end - w.start >= _SPLIT_MIN:
            step = -(-(w.end - w.start) // parts // align) * align
            pieces += [w._replace(start=x, end=min(x + step, w.end), align=align)
                       for x in range(w.start, w.end, step)]
        else:
            pieces.append(w)
    load = [0] * parts
    out: list[list[_Walk]] = [[] for _ in range(parts)]
    for w in sorted(pieces, key=lambda w: w.start - w.end):  # largest first
        n = load.index(min(load))
        out[n].append(w)
        load[n] += w.end - w.start
    return [o for o in out if o]


def _run_walks(scanner: PagemapScanner, walks: list[_Walk]) -> list[tuple[_Walk, tuple]]:
    """Each walk with its result (:meth:`_Walk.run`)."""
    return [(w, w.run(scanner)) for w in walks]


# ---------------------------------------------------------------- the pre-pass
@dataclass
class Prepass:
    """What the pre-pass (target running) did: the tracked VMAs it walked, the pages whose
    written state it took (re-protected them), and the pages to copy before the stop (those,
    and the pages written before tracking started, if populated)."""

    walked: dict[tuple[int, int, str], int]  # (start, end, name) -> page size, per VMA walked
    probe: set[tuple[int, int, str]]  # walked VMAs the stop may probe (_probe_eligible)
    consumed: np.ndarray   # ranges whose written state this pass took
    copy: np.ndarray       # ranges to copy before the stop
    scan_ms: float
    consumed_by_name: dict[str, np.ndarray] = field(default_factory=dict)  # the same, per VMA

    @property
    def copy_bytes(self) -> int:
        """Bytes the pre-pass copies."""
        return rs.nbytes(self.copy)


def prescan(tracking: Tracking) -> Prepass:
    """Walk every tracked VMA while the target runs (blocking; a worker thread): one
    ``PAGEMAP_SCAN`` per VMA reports its populated pages and re-protects the written ones,
    so whatever is written after shows again at the stop."""
    t0 = time.monotonic()
    pid = tracking.pid
    _holes_read_as_written()  # tried once, here rather than inside the first stop
    vmas = classify(read_maps(pid), include_readonly=tracking.options.include_readonly,
                    huge_sizes=tracking.huge_sizes)
    walked: dict[tuple[int, int, str], int] = {}
    probe: set[tuple[int, int, str]] = set()
    consumed, copy = [], []
    by_name: dict[str, np.ndarray] = {}
    scanner = PagemapScanner(pid)
    try:
        for v in vmas:
            if v.mode != "wp" or tracking.parent_regions.get(v.name) != v.length:
                continue  # new or resized: copied whole at the stop
            found, reprotected = _scan_and_reprotect(scanner, v.start, v.end, True)
            if not reprotected:  # left to the stop; whatever this walk re-protected is taken
                consumed.append(np.array([[v.start, v.end]], dtype=np.int64))
                by_name[v.name] = consumed[-1]
                continue
            populated = _ranges_of(found)
            written = _ranges_of(found, written=True)
            before = tracking.written_before.get(v.name, rs.EMPTY)
            walked[(v.start, v.end, v.name)] = v.page_size
            by_name[v.name] = written
            if _probe_eligible(v):
                probe.add((v.start, v.end, v.name))
            consumed.append(written)
            copy.append(rs.intersect(rs.union(written, before), populated))
    finally:
        scanner.close()
    return Prepass(walked, probe, rs.union(*consumed), rs.union(*copy), (time.monotonic() - t0) * 1e3, by_name)


# ---------------------------------------------------------------- the stop
@dataclass
class _StopResult:
    vmas: list[Vma]
    threads: dict
    tracked: list[bool]
    found: list[np.ndarray]      # per VMA: populated ranges at the stop
    written: list[np.ndarray]    # per VMA: written since the pre-pass (tracked VMAs)
    copied: np.ndarray           # ranges copied during the stop, back to back in ``buf``
    buf: memoryview
    ok: np.ndarray               # per page of ``copied``: read
    pause_ms: float
    times: dict
    maps_text: str               # /proc/PID/maps at the stop (every mapping, for the core view)
    thread_masks: dict = field(default_factory=dict)  # signal masks (threadstate)


def _early_cost(early: list[_Walk]) -> int:
    """The stop's first work, in bytes of fast probe (~0.3 ms per GiB): a full walk costs
    ten times that, a probe that also asks for holes three times."""
    probe = 1 if _holes_read_as_written() else 3
    return sum((w.end - w.start) * (probe if w.how == PROBE else 10) for w in early)


def _maps_text(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise TargetError(f"process {pid} exited") from None


def _classified_maps(tracking: Tracking) -> tuple[str, list[Vma]]:
    """The maps text and its VMAs, read just before the stop: the stop re-reads only the
    text and classifies it again only if it changed."""
    text = _maps_text(tracking.pid)
    return text, classify(parse_maps(text), include_readonly=tracking.options.include_readonly,
                          huge_sizes=tracking.huge_sizes)


def _stopped_pass(tracking: Tracking, pre: Prepass, precopied: np.ndarray, scanners: list,
                  maps_before: tuple[str, list[Vma]]) -> _StopResult:
    """While the target is stopped: find the populated pages and what was written since the
    pre-pass, re-protect that, and copy only it (and pages the pre-pass could not copy).
    Everything else was copied before the stop (and not written since) or is inherited.

    Anonymous VMAs the pre-pass walked are probed (:func:`_probe`), then walked only over
    the spots not protected; other VMAs get one full walk. When there is much of it, the
    work on the pre-pass's VMAs starts at once in helper threads, beside the maps read; a
    VMA that changed meanwhile is walked again once the maps are known."""
    need = rs.subtract(rs.union(pre.consumed, *tracking.written_before.values()), precopied)
    early = _deal_early_walks(pre)  # planned before the stop: they depend on the pre-pass only
    _warm_pool(tracking)
    # SCHED_FIFO while the target is stopped (when allowed): on a busy machine, other work
    # (and the target's own threads, woken one by one at the release) would otherwise
    # preempt this thread and stretch the pause by scheduler ticks.
    with realtime_thread(LOOP_PRIORITY):
        return _stopped_pass_rt(tracking, early, need, scanners, maps_before)


@dataclass
class _Stop:
    """The stop pass's working state, filled in by its steps (:func:`_stopped_pass_rt`)."""

    tracking: Tracking
    need: np.ndarray  # ranges to copy if populated, whatever they show (see _stopped_pass)
    scanners: list
    vmas: list[Vma] = field(default_factory=list)
    tracked: list[bool] = field(default_factory=list)  # per VMA: walked as tracked (re-protected)
    walks: dict[int, list[tuple]] = field(default_factory=dict)  # per VMA: (start, found, reprotected)
    probed: dict[int, tuple] = field(default_factory=dict)  # per VMA: (empty ranges, spots walked)
    late: list[_Walk] = field(default_factory=list)  # walks left once the maps are known

    def run_walks(self, parts: list[list[_Walk]]) -> list[list[tuple[_Walk, tuple]]]:
        """Each part's walks with its own scanner, the first in this thread."""
        return _parallel(self.tracking, lambda job: _run_walks(self.scanners[job[0]], job[1]),
                         list(enumerate(parts)))


def _stopped_pass_rt(tracking: Tracking, early_jobs: list[list[_Walk]], need: np.ndarray, scanners: list,
                     maps_before: tuple[str, list[Vma]]) -> _StopResult:
    """The stop, step by step: the early walks start in the helpers while this thread reads
    the maps and records the threads; then it takes its share; the walks are matched to the
    VMAs and the rest planned (:func:`_plan_walks`) and run; the results assembled; what
    changed copied; new VMAs armed; the target released."""
    st = _Stop(tracking, need, scanners)
    t_stop = time.monotonic()
    thread_masks: dict[str, int] = {}
    with stopped(tracking.handle or tracking.pid) as proc:
        t0 = time.monotonic()
        t_stop = proc.group.paused_since(t_stop)
        last_share, helpers = _start_early_walks(st, early_jobs)
        # Registers and signal masks are read by the tracer thread while this one reads
        # the maps (complete once released).
        threads = proc.record_threads(wait=False, masks=thread_masks)
        text, st.vmas = _maps_at_stop(tracking, maps_before)
        t1 = time.monotonic()
        done = _run_walks(scanners[0], last_share)
        for f in helpers:
            done += f.result()
        t_early = time.monotonic()
        _plan_walks(st, done)
        _run_late_walks(st)
        found, written, changed, rearm = _assemble(st)
        t2 = time.monotonic()
        spans, buf, ok = _copy_changed(tracking, changed)
        t3 = time.monotonic()
        _rearm(tracking, rearm)
        t4 = time.monotonic()
    t5 = proc.group.released_at or time.monotonic()
    times = {"stop_ms": (t0 - t_stop) * 1e3, "maps_threads_ms": (t1 - t0) * 1e3,
             "scan_ms": (t2 - t1) * 1e3, "scan_wait_ms": (t_early - t1) * 1e3,
             "copy_ms": (t3 - t2) * 1e3, "rearm_ms": (t4 - t3) * 1e3, "resume_ms": (t5 - t4) * 1e3,
             "probed_vmas": len(st.probed), "stop_copied_bytes": len(buf)}
    return _StopResult(st.vmas, threads, st.tracked, found, written, spans, buf, ok,
                       (t5 - t_stop) * 1e3, times, text, thread_masks)


def _deal_early_walks(pre: Prepass) -> list[list[_Walk]]:
    """The stop's first work: the walks of the VMAs the pre-pass walked (a probe where
    eligible), dealt to the helper threads and this one (the last share)."""
    early = [_Walk(key, key[0], key[1], PROBE if key in pre.probe else REPROTECT, size)
             for key, size in pre.walked.items()]
    # Little work is done by this thread alone: a hand-off would cost more than it saves.
    return _slices(early, SPLIT if _early_cost(early) >= _SPLIT_EARLY else 1)


def _start_early_walks(st: _Stop, jobs: list[list[_Walk]]) -> tuple[list[_Walk], list]:
    """The first step, before the maps are read: the early walks start in the helper
    threads. Returns the share this thread walks once the maps are read, and the helpers'
    futures."""
    futures = [submit_helper(st.tracking.pool, _run_walks, st.scanners[1 + j], job)
               for j, job in enumerate(jobs[:-1])]
    return (jobs[-1] if jobs else []), futures


def _maps_at_stop(tracking: Tracking, maps_before: tuple[str, list[Vma]]) -> tuple[str, list[Vma]]:
    """The maps text at the stop and its VMAs (classified again only if the text changed
    since just before the stop, which is rare)."""
    text = _maps_text(tracking.pid)
    if text == maps_before[0]:
        return text, maps_before[1]
    return text, classify(parse_maps(text), include_readonly=tracking.options.include_readonly,
                          huge_sizes=tracking.huge_sizes)


def _plan_walks(st: _Stop, done: list[tuple[_Walk, tuple]]) -> None:
    """Match the early walks to the VMAs at the stop. A probed VMA gets full walks only
    over the spots its probe found (and ``need``); a VMA the early walks missed (new,
    changed, or its probe could not answer) one full walk. Early full walks of VMAs that
    changed since re-protected pages nobody will see as written again: they join ``need``."""
    tracking, need = st.tracking, st.need
    early: dict[Any, list[tuple[_Walk, tuple]]] = {}
    for w, result in done:
        early.setdefault(w.key, []).append((w, result))
    st.tracked = [v.mode == "wp" and tracking.parent_regions.get(v.name) == v.length for v in st.vmas]
    for i, v in enumerate(st.vmas):
        got = early.pop((v.start, v.end, v.name), None)
        if got is not None and got[0][0].how == PROBE:
            if all(unprotected is not None for _, (unprotected, _) in got):
                spots = [unprotected for _, (unprotected, _) in got if len(unprotected)]
                if len(need):
                    spots.append(rs.clip(need, v.start, v.end))
                spots = rs.coarsen(rs.union(*spots), _MAX_SPOTS)
                st.probed[i] = (rs.union(*[empty for _, (_, empty) in got]), spots)
                st.late += [_Walk(i, int(a), int(b), REPROTECT, PAGE) for a, b in spots]
                continue
        elif got is not None:
            st.walks[i] = [(w.start, *result) for w, result in got]
            continue
        st.late.append(_Walk(i, v.start, v.end, REPROTECT if st.tracked[i] else SCAN, v.page_size))
    stray = [_ranges_of(result[0], written=True) for got in early.values()
             for w, result in got if w.how != PROBE]
    st.need = rs.union(need, *stray)


def _run_late_walks(st: _Stop) -> None:
    """The walks planned once the maps were known, split across the helpers when large."""
    # Spots are small: handing them to another thread costs more than walking them.
    parts = SPLIT if sum(w.end - w.start for w in st.late) >= _SPLIT_MIN else 1
    for part in st.run_walks(_slices(st.late, parts)):
        for w, (found, reprotected) in part:
            st.walks.setdefault(w.key, []).append((w.start, found, reprotected))


def _assemble(st: _Stop) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[Vma]]:
    """Per VMA: the populated ranges at the stop and those written since the pre-pass; the
    ranges to copy now; the VMAs to register again (new, resized, or not re-protected)."""
    found_all, written_all, changed, rearm = [], [], [], []
    for i, v in enumerate(st.vmas):
        found = written = rs.EMPTY
        got = st.walks.get(i, [])
        if got:
            # All its walks' results at once (a probed VMA can have 64 spot walks: ranges
            # made per walk cost ~40 us each, 3-7 ms of a Python target's child pause).
            every = np.concatenate([f for _, f, _ in got]) if len(got) > 1 else got[0][1]
            found = _ranges_of(every)
            written = _ranges_of(every, written=True)
            if v.mode == "wp" and not all(wp for _, _, wp in got):
                rearm.append(v)
            changed.append(rs.union(written, rs.intersect(found, rs.clip(st.need, v.start, v.end)))
                           if st.tracked[i] else found)
        if i in st.probed:  # outside the spots: populated unless empty, and unchanged
            empty, spots = st.probed[i]
            whole = np.array([[v.start, v.end]], dtype=np.int64)
            if len(empty) or len(spots):
                whole = rs.union(rs.subtract(rs.subtract(whole, empty), spots), found)
            found = whole
        found_all.append(found)
        written_all.append(written)
    return found_all, written_all, changed, rearm


def _copy_changed(tracking: Tracking, changed: list[np.ndarray]) -> tuple[np.ndarray, memoryview, np.ndarray]:
    """Copy the changed ranges into the stop's buffer: (ranges, data, read ok per page)."""
    spans = rs.union(*changed) if changed else rs.EMPTY
    size = rs.nbytes(spans)
    store = tracking.stop_buffer  # sized before the stop; rarely too small
    if len(store) < size:  # e.g. a new large mapping, copied whole: kept only if small
        store = bytearray(size)
        if size <= STOPPED_COPY_LIMIT:
            tracking.stop_buffer = store
    buf = memoryview(store)[:size]
    return spans, buf, _copy_all(tracking, buf, spans)


def _rearm(tracking: Tracking, vmas: list[Vma]) -> None:
    """New, resized or unregistered VMAs: tracked from now on."""
    for v in vmas:
        try:
            tracking.uffd.unregister(v.start, v.length)
        except OSError:
            pass
        _arm(tracking.uffd, [v])


def _copy_all(tracking: Tracking, buf: memoryview, spans: np.ndarray) -> np.ndarray:
    """Read ``spans`` ([start, end) ranges) back to back into ``buf``, SPLIT ways in
    parallel; True per page read."""
    if not len(spans):
        return np.zeros(0, bool)
    pairs = np.stack([spans[:, 0], spans[:, 1] - spans[:, 0]], axis=1)
    parts = SPLIT if rs.nbytes(spans) >= _SPLIT_COPY else 1  # a hand-off costs ~0.1 ms
    return read_shared(_warm_pool(tracking), tracking.pid, buf, pairs, parts)


def _warm_pool(tracking: Tracking) -> ThreadPoolExecutor:
    """The helper threads, started before the stop (not inside the pause)."""
    if tracking.pool is None:
        tracking.pool = started_pool(max(1, SPLIT - 1), "snapfs-stop")  # the caller takes a share
    return tracking.pool


def _parallel(tracking: Tracking, fn, jobs: list) -> list:
    """``[fn(job) for job in jobs]``, the first in this thread and the rest in the pool
    (at this thread's priority if it runs realtime)."""
    return share(_warm_pool(tracking), fn, jobs) if len(jobs) > 1 else [fn(j) for j in jobs]


# ---------------------------------------------------------------- one child
def _precopy(tracking: Tracking, pre: Prepass) -> tuple[np.ndarray, np.ndarray, memoryview]:
    """Copy the pre-pass's pages while the target runs: (page addresses, read ok, data)."""
    size = pre.copy_bytes
    if len(tracking.buffer) < size:
        tracking.buffer = prefaulted_buffer(size + size // 4)
    buf = memoryview(tracking.buffer)[:size]
    ok = _copy_all(tracking, buf, pre.copy)
    return rs.starts_every(pre.copy, PAGE), ok, buf


def _store(writer, index: list[int], stop: _StopResult, pre_pages: np.ndarray, pre_ok: np.ndarray,
           pre_buf: memoryview) -> dict:
    """Put the changed pages (copied at the stop, or before it and not written since) and
    inherit every other populated page from the parent: one call of each per region."""
    t0 = time.monotonic()
    stop_pages = rs.starts_every(stop.copied, PAGE)
    precopied = rs.ranges_of_values(pre_pages[pre_ok], PAGE)
    inherit_calls = put_pages = 0
    t_inherit = 0.0
    for i, v in enumerate(stop.vmas):
        a, b = np.searchsorted(stop_pages, [v.start, v.end])
        if b > a:
            writer.put_scattered(index[i], (stop_pages[a:b] - v.start) // PAGE,
                          stop.buf[a * PAGE:b * PAGE], stop.ok[a:b])
            put_pages += int(stop.ok[a:b].sum())
        if not stop.tracked[i]:
            continue
        from_stop = rs.ranges_of_values(stop_pages[a:b], PAGE)
        from_pre = rs.subtract(rs.intersect(rs.clip(precopied, v.start, v.end), stop.found[i]),
                             rs.union(stop.written[i], from_stop))
        a, b = np.searchsorted(pre_pages, [v.start, v.end])
        if len(from_pre):
            mask = pre_ok[a:b] & rs.contains(from_pre, pre_pages[a:b])
            writer.put_scattered(index[i], (pre_pages[a:b] - v.start) // PAGE,
                          pre_buf[a * PAGE:b * PAGE], mask)
            put_pages += int(mask.sum())
        t1 = time.monotonic()
        keep = rs.subtract(rs.subtract(stop.found[i], from_stop), from_pre)
        if len(keep):
            writer.inherit_ranges(index[i], (keep[:, 0] - v.start) // PAGE, (keep[:, 1] - keep[:, 0]) // PAGE)
            inherit_calls += len(keep)
        t_inherit += time.monotonic() - t1
    total = (time.monotonic() - t0) * 1e3
    return {"put_ms": total - t_inherit * 1e3, "inherit_ms": t_inherit * 1e3,
            "inherit_ranges": inherit_calls, "put_pages": put_pages}


async def capture_next(tracking: Tracking, store, name: str, pre: Prepass | None = None) -> CaptureResult:
    """Take the next snapshot of a tracked target as an incremental child of the last one.

    While the target runs: :func:`prescan` (unless given) re-protects what was written since
    the last snapshot and that is copied. Then the target is stopped only to copy and
    re-protect what was written since the pre-pass. Raises TargetError if it is gone; on
    failure nothing is published.
    """
    pid = tracking.pid
    comm = check_target(pid)
    meta = process_meta(pid, comm)
    meta["created"] = time.time()
    core_before = coreinfo.before_freeze(pid)
    writer = store.begin_snapshot(name, meta, tracking.parent, number_if_taken=tracking.options.number_if_taken)
    t_start = time.monotonic()
    stop: _StopResult | None = None
    stopping = False
    try:
        if pre is None:
            pre = await trio.to_thread.run_sync(prescan, tracking)
        t_pre = time.monotonic()

        def before_stop():
            pages, ok, buf = _precopy(tracking, pre)
            # The stop copies what is written meanwhile (and memory new since the parent):
            # its buffer's pages are touched now, not inside the pause.
            want = max(_STOP_BUFFER, min(2 * tracking.last_stop_bytes, STOPPED_COPY_LIMIT))
            if len(tracking.stop_buffer) < want:
                tracking.stop_buffer = prefaulted_buffer(want)
            scanners = [PagemapScanner(pid) for _ in range(SPLIT + 1)]
            return pages, ok, buf, scanners, _classified_maps(tracking)

        pre_pages, pre_ok, pre_buf, scanners, maps_before = await trio.to_thread.run_sync(before_stop)
        state_before = await trio.to_thread.run_sync(procstate.read_state, pid)
        try:
            t_copied = time.monotonic()
            precopied = rs.ranges_of_values(pre_pages[pre_ok], PAGE)
            stopping = True
            stop = await trio.to_thread.run_sync(_stopped_pass, tracking, pre, precopied, scanners,
                                                 maps_before)
        finally:
            for s in scanners:
                s.close()
        t_resumed = time.monotonic()
        state_after = await trio.to_thread.run_sync(procstate.read_state, pid)
        writer.put_blob(procstate.STATE_BLOB, procstate.encode_record(
            procstate.bracket(state_before, state_after), stop.threads, stop.thread_masks,
            parse_maps(stop.maps_text)))
        # The target runs again; store what was copied and inherit the rest.
        index = [writer.add_region(region_spec(v)) for v in stop.vmas]
        threads, core_blob = await trio.to_thread.run_sync(_after_stop, pid, core_before, stop, writer)
        writer.put_blob(CORE_BLOB, core_blob)
        times = dict(stop.times)
        times.update(await trio.to_thread.run_sync(_store, writer, index, stop, pre_pages, pre_ok, pre_buf))
        t_stored = time.monotonic()
        times.update(prescan_ms=pre.scan_ms, precopy_ms=(t_copied - t_pre) * 1e3,
                     store_ms=(t_stored - t_resumed) * 1e3)
        duration = t_stored - t_start
        copied = int(pre_ok.sum() + stop.ok.sum()) * PAGE
        info = await trio.to_thread.run_sync(lambda: writer.commit({
            "pause_ms": stop.pause_ms,
            "duration_s": duration,
            "faults": 0,
            "threads": threads,
            "tracked_incremental": True,
            "copied_bytes": copied,
            "timing_ms": {key: round(val, 3) for key, val in times.items()},
        }))
    except BaseException:
        writer.abort()
        if pre is not None:
            _keep_written(tracking, pre, stop, stopping)
        raise
    tracking.parent = info.name
    tracking.parent_regions = {v.name: v.length for v in stop.vmas}
    tracking.written_before = {}
    tracking.last_stop_bytes = len(stop.buf)
    return CaptureResult(
        name=info.name,
        pid=pid,
        comm=comm,
        pause_ms=stop.pause_ms,
        duration_s=duration,
        resident_bytes=info.resident_bytes,
        zero_bytes=info.zero_bytes,
        stored_bytes=info.stored_bytes,
        faults=0,
        region_count=info.region_count,
        warnings=list(info.warnings),
        info=info,
        tracking=tracking,
        copied_bytes=copied,
        parent=info.parent,
    )


def _after_stop(pid: int, core_before, stop: _StopResult, writer) -> tuple[dict, bytes]:
    """After the stop (a worker thread): the core view's records and the changed pages and
    ELF headers of read-only file mappings, as the first snapshot's engine does."""
    maps = parse_maps(stop.maps_text)
    record = coreinfo.record(pid, core_before, maps, stop.threads)  # thread names first
    save_private_pages(pid, maps, writer, {v.start for v in stop.vmas})
    return record


def _keep_written(tracking: Tracking, pre: Prepass, stop: _StopResult | None, stopping: bool) -> None:
    """A child failed after its passes re-protected pages written since the parent: those
    must still count as written for the next child (``written_before``), or it would
    inherit the parent's old bytes for them. A stop that failed part way re-protected an
    unknown part: its VMAs count as written whole."""
    add = dict(pre.consumed_by_name)
    if stop is not None:
        for v, written in zip(stop.vmas, stop.written):
            if len(written):
                add[v.name] = rs.union(add.get(v.name, rs.EMPTY), written)
    elif stopping:
        for start, end, name in pre.walked:
            add[name] = np.array([[start, end]], dtype=np.int64)
    for name, ranges in add.items():
        tracking.written_before[name] = rs.union(tracking.written_before.get(name, rs.EMPTY), ranges)


def written_bytes(tracking: Tracking) -> int:
    """How much tracked memory has been written since the last snapshot (no stop needed:
    the figure only grows until the next one)."""
    scanner = PagemapScanner(tracking.pid)
    total = sum(int((r[:, 1] - r[:, 0]).sum()) for r in tracking.written_before.values())
    try:
        vmas = classify(read_maps(tracking.pid), include_readonly=tracking.options.include_readonly,
                        huge_sizes=tracking.huge_sizes)
        for v in vmas:
            found = scanner.scan(v.start, v.end, require=k.PAGE_IS_WRITTEN | k.PAGE_IS_PRESENT,
                                 exclude=k.PAGE_IS_PFNZERO)
            total += int((found["end"] - found["start"]).sum()) if len(found) else 0
    finally:
        scanner.close()
    return total
