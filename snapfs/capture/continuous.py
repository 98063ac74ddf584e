"""Continuous snapshots: stay attached and take each later snapshot as an incremental child.

The first snapshot is an ordinary capture in *continuous* mode: its scan leaves pages
protected, so when it ends the (sync) protection says exactly which pages were written
since its freeze. :func:`start_tracking` then stops the target once more (from a worker
thread, while the fault path keeps serving faults, so no thread stays blocked), records
those pages, and swaps the sync userfaultfd for an async one (``UFFD_FEATURE_WP_ASYNC``):
from then on the kernel itself unprotects a page on its first write, never blocking the
target, and ``PAGEMAP_SCAN`` reports it as ``PAGE_IS_WRITTEN``.

Each later snapshot (:func:`capture_next`) stops the target and, per VMA, runs one
``PAGEMAP_SCAN`` with ``PM_SCAN_WP_MATCHING``: the same walk reports the populated pages
with their written bit and re-protects the written ones (no ioctl per range). It then copies
the written pages with batched ``process_vm_readv`` and resumes the target; the scan and the
copy are split across cores (the target is stopped, its cores are free). The copy has to
happen inside the stop: in async mode a write to a re-protected page does not wait for
anyone, so a page copied after the resume could already hold a later value. Every other
page is inherited from the parent without being read. The pause grows with what changed
(~3 ms per GiB scanned plus ~1 ms per 4 MiB changed here), not with the memory size. A region
that is new, changed size, or cannot be tracked is copied whole. If snapfs dies, the kernel
drops the async protection with its last fd: the target never notices.
"""

from __future__ import annotations

import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import trio

from snapfs.capture import kernel as k
from snapfs.capture.context import CaptureContext
from snapfs.capture.engine import CaptureOptions, CaptureResult, region_spec
from snapfs.capture.freeze import stopped, take_userfaultfd
from snapfs.capture.maps import Vma, classify, read_maps
from snapfs.capture.memory import prefaulted_buffer, read_pages_robust
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.protect import Prepared
from snapfs.capture.ptrace import StoppedProcess, check_target, find_syscall_insn
from snapfs.capture.target_info import process_meta
from snapfs.capture.uffd import Uffd

PAGE = k.PAGE_SIZE
ASYNC_FEATURES = k.UFFD_FEATURE_WP_ASYNC | k.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
_POPULATED = dict(require=0, exclude=k.PAGE_IS_PFNZERO, anyof=k.PAGE_IS_PRESENT | k.PAGE_IS_SWAPPED)
# The stop's scan and copy are split across this many threads (ioctl and process_vm_readv
# release the GIL; the target is stopped, so its cores are free).
SPLIT = max(1, min(4, os.cpu_count() or 1))
_SPLIT_MIN = 64 << 20  # VMAs larger than this are scanned in SPLIT address slices
# Above this much written memory a child is taken as a live capture (short pause, background
# copy) instead of copying while stopped; the store then keeps only changed pages.
STOPPED_COPY_LIMIT = 32 << 20


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
    buffer: bytearray = field(default_factory=bytearray)  # pages copied while stopped
    # Helper threads for the stop (scan and copy split across cores): made on first use.
    pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop tracking (the kernel drops the protection)."""
        self.uffd.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


_NO_RANGES = np.empty((0, 2), dtype=np.int64)


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
    ctx: CaptureContext, prep: Prepared, name: str, options: CaptureOptions, huge_sizes: dict
) -> Tracking:
    """At the end of a continuous-mode capture (fault path still running): record what was
    written since its freeze and switch to async tracking, in one more short stop."""
    insn = find_syscall_insn(ctx.pid)

    def close_sync_uffd() -> None:  # in the trio thread: the fault path waits on this fd
        trio.lowlevel.notify_closing(ctx.uffd.fd)
        ctx.uffd.close()

    def switch() -> tuple[Uffd, dict]:
        # All ptrace requests of this stop come from this one worker thread.
        proc = StoppedProcess(ctx.pid)
        proc.syscall_insn = insn
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

    uffd, written = await trio.to_thread.run_sync(switch)
    return Tracking(
        pid=ctx.pid,
        uffd=uffd,
        options=options,
        huge_sizes=huge_sizes,
        parent=name,
        parent_regions={v.name: v.length for v in prep.regions},
        written_before=written,
    )


def _runs(pages: np.ndarray) -> np.ndarray:
    """(n, 2) array of (start address, length) runs of consecutive page addresses."""
    if not len(pages):
        return np.empty((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(pages) != PAGE) + 1
    first = pages[np.r_[0, breaks]]
    last = pages[np.r_[breaks - 1, len(pages) - 1]]
    return np.stack([first, last - first + PAGE], axis=1)


def _merge(runs: np.ndarray) -> np.ndarray:
    """Join (start, length) runs that touch (a scan splits ranges where other bits differ)."""
    if len(runs) < 2:
        return runs
    ends = runs[:, 0] + runs[:, 1]
    head = np.ones(len(runs), bool)
    head[1:] = runs[1:, 0] != ends[:-1]
    starts = np.flatnonzero(head)
    last = np.r_[starts[1:], len(runs)] - 1
    return np.stack([runs[starts, 0], ends[last] - runs[starts, 0]], axis=1)


def _changed(found: np.ndarray, before: np.ndarray, tracked: bool) -> tuple[np.ndarray, np.ndarray]:
    """Split populated ranges into (changed runs, unchanged runs), vectorised per page.

    Changed: written since the last snapshot, or before tracking started (``before``, an
    (n, 2) array of [start, end) ranges), or anything in an untracked region."""
    if tracked and not len(before):  # the usual case: the scan's ranges are the runs
        s = found["start"].astype(np.int64)
        lengths = found["end"].astype(np.int64) - s
        dirty = (found["categories"] & k.PAGE_IS_WRITTEN) != 0
        return (_merge(np.stack([s[dirty], lengths[dirty]], axis=1)),
                _merge(np.stack([s[~dirty], lengths[~dirty]], axis=1)))
    s = found["start"].astype(np.int64)
    n = (found["end"].astype(np.int64) - s) // PAGE
    total = int(n.sum())
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    pages = np.repeat(s, n) + offsets * PAGE
    if not tracked:
        return _runs(pages), _runs(pages[:0])
    dirty = np.repeat((found["categories"] & k.PAGE_IS_WRITTEN) != 0, n)
    if len(before):
        idx = np.searchsorted(before[:, 0], pages, side="right") - 1
        dirty |= (idx >= 0) & (pages < before[np.maximum(idx, 0), 1])
    return _runs(pages[dirty]), _runs(pages[~dirty])


_WP_SCAN = k.PM_SCAN_WP_MATCHING | k.PM_SCAN_CHECK_WPASYNC


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


def _slices(vmas: list[Vma], parts: int) -> list[list[tuple[int, int, int]]]:
    """(vma index, start, end) pieces dealt to ``parts`` workers, balanced by size: large
    VMAs are cut into ``parts`` slices (on huge-page boundaries)."""
    pieces = []
    for i, v in enumerate(vmas):
        if parts > 1 and v.length >= _SPLIT_MIN:
            step = -(-v.length // parts // v.page_size) * v.page_size
            pieces += [(i, a, min(a + step, v.end)) for a in range(v.start, v.end, step)]
        else:
            pieces.append((i, v.start, v.end))
    load = [0] * parts
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(parts)]
    for piece in sorted(pieces, key=lambda p: p[1] - p[2]):  # largest first
        w = load.index(min(load))
        out[w].append(piece)
        load[w] += piece[2] - piece[1]
    return out


def _scan_all(tracking: Tracking, vmas: list[Vma], tracked: list[bool]
              ) -> tuple[list[np.ndarray], list[bool]]:
    """Scan (and re-protect) every VMA, SPLIT ways in parallel; per VMA: (ranges, reprotected)."""
    def work(pieces: list[tuple[int, int, int]]) -> list[tuple[int, int, np.ndarray, bool]]:
        scanner = PagemapScanner(tracking.pid)
        try:
            return [(i, a, *_scan_and_reprotect(scanner, a, b, tracked[i])) for i, a, b in pieces]
        finally:
            scanner.close()

    results = _parallel(tracking, work, _slices(vmas, SPLIT))
    by_vma: dict[int, list[tuple[int, np.ndarray, bool]]] = {}
    for i, a, found, wp in (r for part in results for r in part):
        by_vma.setdefault(i, []).append((a, found, wp))
    found_all, reprotected = [], []
    for i in range(len(vmas)):
        got = sorted(by_vma[i], key=lambda x: x[0])
        found_all.append(np.concatenate([f for _, f, _ in got]) if len(got) > 1 else got[0][1])
        reprotected.append(all(wp for _, _, wp in got))
    return found_all, reprotected


def _copy_all(tracking: Tracking, buf: memoryview, spans: np.ndarray) -> np.ndarray:
    """Read ``spans`` back to back into ``buf``, SPLIT ways in parallel; True per page read."""
    if not len(spans):
        return np.zeros(0, bool)
    cuts = [len(spans) * j // SPLIT for j in range(SPLIT + 1)]
    offsets = np.r_[0, np.cumsum(spans[:, 1])]
    jobs = [(buf[int(offsets[a]) : int(offsets[b])], spans[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]
    parts = _parallel(tracking, lambda job: read_pages_robust(tracking.pid, job[0], job[1]), jobs)
    return np.concatenate(parts)


def _warm_pool(tracking: Tracking) -> None:
    """Start the helper threads before the stop (not inside the pause)."""
    if SPLIT > 1 and tracking.pool is None:
        tracking.pool = ThreadPoolExecutor(SPLIT - 1, thread_name_prefix="snapfs-stop")
        for f in [tracking.pool.submit(time.sleep, 0.001) for _ in range(SPLIT - 1)]:
            f.result()


def _parallel(tracking: Tracking, fn, jobs: list) -> list:
    """``[fn(job) for job in jobs]``, the first in this thread and the rest in the pool."""
    if len(jobs) <= 1:
        return [fn(j) for j in jobs]
    _warm_pool(tracking)
    futures = [tracking.pool.submit(fn, j) for j in jobs[1:]]
    first = fn(jobs[0])
    return [first] + [f.result() for f in futures]


def _stopped_pass(tracking: Tracking):
    """While the target is stopped: find what changed and re-protect it (one PAGEMAP_SCAN
    per VMA), copy it (one batched ``process_vm_readv``). Everything else waits for the resume."""
    pid = tracking.pid
    _warm_pool(tracking)
    t_stop = time.monotonic()
    with stopped(pid) as proc:
        t0 = time.monotonic()
        vmas = classify(read_maps(pid), include_readonly=tracking.options.include_readonly,
                        huge_sizes=tracking.huge_sizes)
        threads = proc.record_threads()
        t1 = time.monotonic()
        tracked = [v.mode == "wp" and tracking.parent_regions.get(v.name) == v.length for v in vmas]
        found_all, reprotected = _scan_all(tracking, vmas, tracked)
        copy_parts, inherit_parts = [], []  # (vma index, (n, 2) runs)
        for i, v in enumerate(vmas):
            before = tracking.written_before.get(v.name, _NO_RANGES)
            changed, unchanged = _changed(found_all[i], before, tracked[i])
            copy_parts.append((i, changed))
            inherit_parts.append((i, unchanged))
        rearm = [v for v, wp in zip(vmas, reprotected) if v.mode == "wp" and not wp]
        t2 = time.monotonic()
        spans = np.concatenate([r for _, r in copy_parts]) if copy_parts else _NO_RANGES
        size = int(spans[:, 1].sum()) if len(spans) else 0
        if len(tracking.buffer) < size:  # reused across snapshots: no fresh-memory faults
            tracking.buffer = bytearray(size)
        buf = memoryview(tracking.buffer)[:size]
        ok = _copy_all(tracking, buf, spans)
        t3 = time.monotonic()
        for v in rearm:  # new, resized or unregistered: track it from now on
            try:
                tracking.uffd.unregister(v.start, v.length)
            except OSError:
                pass
            _arm(tracking.uffd, [v])
        t4 = time.monotonic()
    t5 = time.monotonic()
    pause_ms = (t5 - t_stop) * 1000.0
    times = {"stop_ms": (t0 - t_stop) * 1e3, "maps_threads_ms": (t1 - t0) * 1e3,
             "scan_ms": (t2 - t1) * 1e3, "copy_ms": (t3 - t2) * 1e3,
             "rearm_ms": (t4 - t3) * 1e3, "resume_ms": (t5 - t4) * 1e3}
    # The target runs again: the bookkeeping below is not part of the pause.
    copy = [(i, a, n) for i, runs in copy_parts for a, n in runs.tolist()]
    inherit = [(i, a, n) for i, runs in inherit_parts for a, n in runs.tolist()]
    return vmas, threads, copy, inherit, buf, ok, pause_ms, times


def _reserve(tracking: Tracking, expected: int) -> None:
    """Grow the copy buffer to hold ``expected`` bytes (plus slack for writes still to come)
    and touch every page of it now, so the copy during the stop takes no faults of ours."""
    want = expected + expected // 4 + (1 << 20)
    if len(tracking.buffer) < want:
        tracking.buffer = prefaulted_buffer(want)


async def capture_next(tracking: Tracking, store, name: str, expected: int | None = None) -> CaptureResult:
    """Take the next snapshot of a tracked target as an incremental child of the last one.

    The target is stopped while the pages written since the last snapshot are copied and
    re-protected. ``expected``: bytes written so far (:func:`written_bytes`), to size the copy
    buffer before the stop. Raises TargetError if it is gone; on failure nothing is published.
    """
    pid = tracking.pid
    comm = check_target(pid)
    meta = process_meta(pid, comm)
    meta["created"] = time.time()
    writer = store.begin_snapshot(name, meta, tracking.parent)
    t_start = time.monotonic()
    try:
        _reserve(tracking, written_bytes(tracking) if expected is None else expected)
        vmas, threads, copy, inherit, buf, ok, pause_ms, times = _stopped_pass(tracking)
        t_resumed = time.monotonic()
        # The target runs again; store what was copied and inherit the rest.
        index = [writer.add_region(region_spec(v)) for v in vmas]

        def store_all() -> None:
            view = memoryview(buf)
            pos = 0
            for i, addr, n in copy:
                p = pos // PAGE
                mask = ok[p : p + n // PAGE]
                if mask.any():
                    writer.put_pages(index[i], (addr - vmas[i].start) // PAGE, view[pos : pos + n], mask)
                pos += n
            t_put = time.monotonic()
            by_region: dict[int, tuple[list[int], list[int]]] = {}
            for i, addr, n in inherit:
                firsts, counts = by_region.setdefault(i, ([], []))
                firsts.append((addr - vmas[i].start) // PAGE)
                counts.append(n // PAGE)
            for i, (firsts, counts) in by_region.items():
                writer.inherit_ranges(index[i], firsts, counts)
            times["put_ms"] = (t_put - t_resumed) * 1e3
            times["inherit_ms"] = (time.monotonic() - t_put) * 1e3
            times["inherit_calls"] = len(inherit)
            times["put_calls"] = len(copy)

        await trio.to_thread.run_sync(store_all)
        t_stored = time.monotonic()
        times["store_ms"] = (t_stored - t_resumed) * 1e3
        duration = t_stored - t_start
        info = writer.commit(
            {
                "pause_ms": pause_ms,
                "duration_s": duration,
                "faults": 0,
                "threads": threads,
                "tracked_incremental": True,
                "copied_bytes": len(buf),
                "timing_ms": {key: round(val, 3) for key, val in times.items()},
            }
        )
    except BaseException:
        writer.abort()
        raise
    tracking.parent = info.name
    tracking.parent_regions = {v.name: v.length for v in vmas}
    tracking.written_before = {}
    return CaptureResult(
        name=info.name,
        pid=pid,
        comm=comm,
        pause_ms=pause_ms,
        duration_s=duration,
        resident_bytes=info.resident_bytes,
        zero_bytes=info.zero_bytes,
        stored_bytes=info.stored_bytes,
        faults=0,
        regions=info.region_count,
        warnings=list(info.warnings),
        info=info,
        tracking=tracking,
    )


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


async def snapshot_next(tracking: Tracking, store, name: str, progress=None) -> CaptureResult:
    """The next snapshot of a continuous series: copied while stopped when little changed
    (:func:`capture_next`), else a live capture in continuous mode (a new tracking replaces
    this one: use ``result.tracking``)."""
    from snapfs.capture.engine import capture_process

    expected = written_bytes(tracking)
    if expected <= STOPPED_COPY_LIMIT:
        return await capture_next(tracking, store, name, expected)
    parent = tracking.parent
    tracking.close()
    opts = CaptureOptions(
        rate=tracking.options.rate,
        include_readonly=tracking.options.include_readonly,
        parent=parent,
        workers=tracking.options.workers,
        continuous=True,
    )
    return await capture_process(tracking.pid, store, name, opts, progress)
