"""Continuous snapshots: stay attached and take each later snapshot as an incremental child.

The first snapshot is an ordinary capture in *continuous* mode: its scan leaves pages
protected, so when it ends the (sync) protection says exactly which pages were written
since its freeze. :func:`start_tracking` then stops the target once more (from a worker
thread, while the fault path keeps serving faults, so no thread stays blocked), records
those pages, and swaps the sync userfaultfd for an async one (``UFFD_FEATURE_WP_ASYNC``):
from then on the kernel itself unprotects a page on its first write, never blocking the
target, and ``PAGEMAP_SCAN`` reports it as ``PAGE_IS_WRITTEN``.

Each later snapshot (:func:`capture_next`) stops the target, asks ``PAGEMAP_SCAN`` which
pages are written, copies just those while stopped, re-protects them, resumes the target
and stores them; every other page is inherited from the parent without being read. The
pause grows with what changed, not with the memory size. A region that is new, changed
size, or cannot be tracked is copied whole. If snapfs dies, the kernel drops the async
protection with its last fd: the target never notices.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field

import numpy as np
import trio

from snapfs.capture import kernel as k
from snapfs.capture.context import CaptureContext
from snapfs.capture.engine import CaptureOptions, CaptureResult, region_spec
from snapfs.capture.freeze import stopped, take_userfaultfd
from snapfs.capture.maps import Vma, classify, read_maps
from snapfs.capture.memory import read_pages_robust
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.protect import Prepared
from snapfs.capture.ptrace import StoppedProcess, check_target, find_syscall_insn
from snapfs.capture.target_info import process_meta
from snapfs.capture.uffd import Uffd

PAGE = k.PAGE_SIZE
ASYNC_FEATURES = k.UFFD_FEATURE_WP_ASYNC | k.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
_POPULATED = dict(require=0, exclude=k.PAGE_IS_PFNZERO, anyof=k.PAGE_IS_PRESENT | k.PAGE_IS_SWAPPED)
_COALESCE = 64 << 10  # re-protect written ranges closer than this in one ioctl
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

    def close(self) -> None:
        """Stop tracking (the kernel drops the protection)."""
        self.uffd.close()


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


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge ranges closer than _COALESCE (re-protecting the gap between is harmless)."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and a - out[-1][1] <= _COALESCE:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _runs(pages: np.ndarray) -> np.ndarray:
    """(n, 2) array of (start address, length) runs of consecutive page addresses."""
    if not len(pages):
        return np.empty((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(pages) != PAGE) + 1
    first = pages[np.r_[0, breaks]]
    last = pages[np.r_[breaks - 1, len(pages) - 1]]
    return np.stack([first, last - first + PAGE], axis=1)


def _changed(found: np.ndarray, before: np.ndarray, tracked: bool) -> tuple[np.ndarray, np.ndarray]:
    """Split populated ranges into (changed runs, unchanged runs), vectorised per page.

    Changed: written since the last snapshot, or before tracking started (``before``, an
    (n, 2) array of [start, end) ranges), or anything in an untracked region."""
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


def _stopped_pass(tracking: Tracking):
    """While the target is stopped: find what changed, copy it, re-protect it."""
    pid = tracking.pid
    scanner = PagemapScanner(pid)
    try:
        with stopped(pid) as proc:
            t0 = time.monotonic()
            vmas = classify(read_maps(pid), include_readonly=tracking.options.include_readonly,
                            huge_sizes=tracking.huge_sizes)
            threads = proc.record_threads()
            copy_parts, inherit_parts = [], []  # (vma index, (n, 2) runs)
            rearm: list[tuple[Vma, list[tuple[int, int]], bool]] = []
            for i, v in enumerate(vmas):
                found = scanner.scan(v.start, v.end, **_POPULATED, report=k.PAGE_IS_WRITTEN)
                tracked = v.mode == "wp" and tracking.parent_regions.get(v.name) == v.length
                before = tracking.written_before.get(v.name, _NO_RANGES)
                changed, unchanged = _changed(found, before, tracked)
                copy_parts.append((i, changed))
                inherit_parts.append((i, unchanged))
                if v.mode == "wp":
                    written = _coalesce(_written(found))
                    present = int((found["end"] - found["start"]).sum()) if len(found) else 0
                    # One ioctl per range (~5 us) or one pass over every page (~80 ns each).
                    if len(written) * 5e-6 > present / PAGE * 80e-9:
                        written = [(v.start, v.end)]
                    if written or not tracked:
                        rearm.append((v, written, tracked))
            spans = np.concatenate([r for _, r in copy_parts]) if copy_parts else _NO_RANGES
            size = int(spans[:, 1].sum()) if len(spans) else 0
            if len(tracking.buffer) < size:  # reused across snapshots: no fresh-memory faults
                tracking.buffer = bytearray(size)
            buf = memoryview(tracking.buffer)[:size]
            ok = read_pages_robust(pid, buf, spans) if len(spans) else np.zeros(0, bool)
            for v, written, tracked in rearm:
                try:
                    if not tracked:
                        raise OSError(errno.ENOENT, "new or changed region")
                    for a, b in written:
                        tracking.uffd.protect(a, b - a, wp=True)
                except OSError:
                    tracking.uffd.unregister(v.start, v.length)
                    _arm(tracking.uffd, [v])
            pause_ms = (time.monotonic() - t0) * 1000.0
    finally:
        scanner.close()
    # The target runs again: the bookkeeping below is not part of the pause.
    copy = [(i, a, n) for i, runs in copy_parts for a, n in runs.tolist()]
    inherit = [(i, a, n) for i, runs in inherit_parts for a, n in runs.tolist()]
    return vmas, threads, copy, inherit, buf, ok, pause_ms


async def capture_next(tracking: Tracking, store, name: str) -> CaptureResult:
    """Take the next snapshot of a tracked target as an incremental child of the last one.

    The target is stopped while the pages written since the last snapshot are copied and
    re-protected. Raises TargetError if it is gone; on failure nothing is published.
    """
    pid = tracking.pid
    comm = check_target(pid)
    meta = process_meta(pid, comm)
    meta["created"] = time.time()
    writer = store.begin_snapshot(name, meta, tracking.parent)
    t_start = time.monotonic()
    try:
        vmas, threads, copy, inherit, buf, ok, pause_ms = _stopped_pass(tracking)
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
            for i, addr, n in inherit:
                writer.inherit(index[i], (addr - vmas[i].start) // PAGE, n // PAGE)

        await trio.to_thread.run_sync(store_all)
        duration = time.monotonic() - t_start
        info = writer.commit(
            {
                "pause_ms": pause_ms,
                "duration_s": duration,
                "faults": 0,
                "threads": threads,
                "tracked_incremental": True,
                "copied_bytes": len(buf),
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

    if written_bytes(tracking) <= STOPPED_COPY_LIMIT:
        return await capture_next(tracking, store, name)
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
