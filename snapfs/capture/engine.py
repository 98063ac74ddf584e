"""The trio capture engine: protect, freeze, resume, then save every populated page.

:func:`capture_process` reserves the name in the store, then:

1. stops the target briefly to take a userfaultfd for its memory (:func:`~snapfs.capture.
   freeze.frozen`);
2. write-protects its memory while it runs (:mod:`~snapfs.capture.preprotect`), serving the
   faults this causes by unprotecting only;
3. freezes it (:func:`~snapfs.capture.freeze.frozen_again`: the snapshot instant), re-protects
   the pages written or populated since and records the populated pages
   (:mod:`~snapfs.capture.protect`), starts the fault path, resumes it — so the pause
   follows what the target wrote during step 2, not its size, and the target's first write
   after the resume is served at once;
4. runs in one nursery:

- the **fault path** (:mod:`~snapfs.capture.faults`: the native loop and a Python fault
  thread, supervised from this nursery; already started during step 3) serving write faults
  first;
- the **scan** (:mod:`~snapfs.capture.scan`, one worker thread) copying the rest;
- **store workers** compressing and writing through ``trio.to_thread`` with a limiter sized
  to the cores; buffers circulate through bounded channels, so memory stays bounded;
- a watcher on the target's pidfd (it exiting aborts the capture) and the progress ticker.

The invariant that keeps the image one instant: a page is claimed in the ledger (saved)
before it is unprotected, and whoever claims it first is the only one to store it. Pages
first populated after the freeze are not in the ledger: never read, holes (zero).
On any error or cancellation the uffd is closed (the target runs unhindered) and the writer
aborted: nothing is published.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.ma  # noqa: F401 - np.unique imports it on first use (~12 ms): not in a pause or a fault
import trio

from snapfs.capture import continuous, coreinfo, fastfault, hugepages, procstate
from snapfs.capture import kernel as k
from snapfs.capture.context import CaptureContext
from snapfs.capture.faults import FaultPath
from snapfs.capture.freeze import FrozenTarget, frozen
from snapfs.capture.ledger import LOST
from snapfs.capture.maps import ClassifiedMaps, huge_page_sizes, read_maps_text, parse_maps
from snapfs.capture.memory import prefaulted_buffer
from snapfs.capture.priority import background_thread_priority, fault_thread_priority
from snapfs.capture.preprotect import PreProtected, protect_then_freeze
from snapfs.capture.handle import ProcessHandle
from snapfs.capture.protect import (COPY_WRITTEN_MAX, InstantPlan, Prepared, copy_buffer_for, handshake,
                                    plan_instant, protect_and_record, warm_scan_pool)
from snapfs.capture.relocated import save_private_pages
from snapfs.capture.scan import CHUNK, Scan
from snapfs.capture.target_info import process_meta, shared_with_others
from snapfs.capture.types import CaptureOptions, CaptureResult, Progress, RecentRate, region_spec
from snapfs.capture.uffd import Uffd
from snapfs.elfcore.state import BLOB as CORE_BLOB
from snapfs.errors import SnapfsError, TargetError, reported_error

PAGE = k.PAGE_SIZE


def _gone_instead(handle: ProcessHandle, exc: BaseException) -> TargetError | None:
    """The TargetError to report instead of ``exc`` when the target exited, its PID was
    reused or it exec'd meanwhile (whatever kernel call noticed first: an ioctl on the uffd
    of its old address space, a /proc file gone...)."""
    if isinstance(exc, BaseExceptionGroup):
        if exc.split((SnapfsError, KeyboardInterrupt, trio.Cancelled))[0] is not None:
            return None
    elif isinstance(exc, (SnapfsError, KeyboardInterrupt, trio.Cancelled)):
        return None
    return handle.gone_error("the capture")


class _Capture:
    """One capture in progress (see the module docstring)."""

    def __init__(self, pid: int, store, name: str, options: CaptureOptions, progress) -> None:
        self.pid = pid
        self.store = store
        self.name = name
        self.options = options
        self.progress_cb: Callable[[Progress], None] | None = progress
        self.workers = options.workers or os.cpu_count() or 2
        self.limiter = trio.CapacityLimiter(self.workers)
        self.warnings: list[str] = []
        self.writer = None
        self.tracking = None
        self.handle: ProcessHandle | None = None  # the pinned target (capture_process)
        # The restore's record of the instant (snapfs.capture.procstate): the kernel state
        # read before the freeze and after the release, the threads' signal masks.
        self.state_before: dict | None = None
        self.state_after: dict | None = None
        self.thread_masks: dict = {}
        # Known before the freeze (run): huge page sizes, memory shared with other processes,
        # the scan's buffers.
        self.huge_sizes: dict[int, int] = {}
        self.shared: set = set()
        self.buffers: list[bytearray] = []
        # Made in the freeze (_start_faults): what it recorded, the capture context, the bytes
        # to save, the fault path (``fault_path``; ``ctx.faults`` counts the faults it served)
        # and the nursery, cancel scope and event it runs under.
        self.prep: Prepared | None = None
        self.ctx: CaptureContext | None = None
        self.total_bytes = 0
        self.fault_path: FaultPath | None = None
        self.fault_nursery: trio.Nursery | None = None
        self.fault_scope: trio.CancelScope | None = None
        self.faults_done = trio.Event()
        self.hot: Any = None  # pre-protection's hot pages (PreProtected.hot), scanned first
        self.t0 = 0.0  # when the background copy started (the progress's clock)
        # Recorded beside the background copy (_after_resume).
        self.core_record: tuple[dict, bytes] = ({}, b"")  # (meta["threads"], core.state blob)

    async def run(self) -> CaptureResult:
        # Pinned before anything is looked up; one capture at a time per process.
        handle = self.handle = ProcessHandle.open(self.pid)
        try:
            if handle.leader_exited:
                raise TargetError(
                    f"the main thread of process {self.pid} has exited while its other threads "
                    "run on: its memory cannot be read through /proc/PID, so snapfs cannot "
                    "snapshot it"
                )
            handle.lock_capture()
            try:
                return await self._run(handle)
            finally:
                gc.unfreeze()  # see _gc_settled
        except BaseException as exc:
            gone = _gone_instead(handle, exc)
            if gone is not None:
                raise gone from None
            raise
        finally:
            if self.tracking is None:
                handle.close()  # else the tracking holds it (and the lock) for the series

    async def _run(self, handle: ProcessHandle) -> CaptureResult:
        comm = handle.comm
        premaps = parse_maps(read_maps_text(self.pid))
        huge_sizes = self.huge_sizes = huge_page_sizes(self.pid, premaps)
        shared = shared_with_others(self.pid, premaps)
        meta = process_meta(self.pid, comm)
        meta["created"] = time.time()
        core_before = coreinfo.before_freeze(self.pid)
        writer = self.writer = self.store.begin_snapshot(self.name, meta, self.options.parent,
                                                          number_if_taken=self.options.number_if_taken)
        uffd: Uffd | None = None
        # The scan's buffers are allocated (and their pages touched) before the freeze: done
        # after the resume, it delayed the fault path by ~10 ms while the target was writing.
        self.buffers = [prefaulted_buffer(CHUNK) for _ in range(self.workers * 2 + 1)]
        _gc_settled()
        fastfault.preallocate_ring()
        self.shared = shared
        t_start = time.monotonic()
        try:
            # 1. A short stop only to take a uffd for the target's memory.
            # Only the injected thread needs to stop (the uffd belongs to the mm): the
            # attach costs the same for 1 thread or 300.
            async with frozen(handle, record=False, one_thread=True) as attach:
                uffd = attach.uffd
            features = handshake(uffd)
            self.state_before = await trio.to_thread.run_sync(procstate.read_state, self.pid)
            with fault_thread_priority():
                try:
                    # The fault path starts inside the freeze (see _start_faults), in this
                    # nursery; everything else in _background once the target runs again.
                    async with trio.open_nursery() as self.fault_nursery:
                        pre, ft, prep = await self._protect_and_freeze(uffd, comm, features, huge_sizes)
                        self.hot = pre.hot
                        # The captured regions are declared first, before any page reaches
                        # the store: region i is store index i (see _start_faults).
                        await trio.to_thread.run_sync(self._describe_regions, prep, self.shared)
                        _gc_settled()
                        self.fault_nursery.start_soon(self._read_state_after)
                        # 4. The target runs again: save every page recorded, faults first;
                        # beside it, what the core view needs (not delaying the scan: the
                        # sooner it ends, the fewer writes fault).
                        ctx = self.ctx
                        async with trio.open_nursery() as beside:
                            beside.start_soon(self._after_resume, core_before, ft, prep)
                            await self._background(ctx)
                        threads, core_blob = self.core_record
                except BaseExceptionGroup as eg:
                    raise reported_error(eg) from None
            # Every page is saved: drop the protection now (a step at a time, see release;
            # not when async tracking has taken the ranges over for the next snapshot).
            if self.tracking is None:
                uffd.release(self.ctx.regions, self.ctx.remapped)
            uffd.close()
            self._report_unsaved()
            duration = time.monotonic() - t_start
            writer.put_blob(CORE_BLOB, core_blob)
            writer.put_blob(procstate.STATE_BLOB, procstate.encode_record(
                procstate.bracket(self.state_before, self.state_after), ft.threads, self.thread_masks, ft.maps))
            info = writer.commit(
                {
                    "pause_ms": ft.pause_ms,
                    "duration_s": duration,
                    "faults": ctx.faults,
                    "warnings": self.warnings,
                    "threads": threads,
                    "protect_ms": prep.protect_ms,
                    "uffd_features": prep.features,
                    "attach_pause_ms": attach.pause_ms,
                    "preprotect_ms": pre.elapsed_ms,
                    "preprotect_faults": pre.faults,
                    "reprotected_pages": prep.reprotected_pages,
                    "written_copied_pages": prep.written_pages,
                }
            )
        except BaseException:
            if uffd is not None:
                uffd.close()
            if self.tracking is not None:
                self.tracking.close()
            writer.abort()
            raise
        # Published. Huge pages the fault path split are mapped huge again (best effort).
        try:
            huge_restored = await trio.to_thread.run_sync(hugepages.restore, self.pid, prep.thp)
        except (OSError, TargetError):  # the target is gone
            huge_restored = 0
        return CaptureResult(
            name=info.name,
            pid=self.pid,
            comm=comm,
            pause_ms=ft.pause_ms,
            attach_pause_ms=attach.pause_ms,
            duration_s=duration,
            resident_bytes=info.resident_bytes,
            zero_bytes=info.zero_bytes,
            stored_bytes=info.stored_bytes,
            faults=ctx.faults,
            region_count=info.region_count,
            warnings=list(info.warnings),
            info=info,
            tracking=self.tracking,
            huge_restored_bytes=huge_restored,
            switch_pause_ms=self.tracking.switch_pause_ms if self.tracking is not None else 0.0,
            phases={"start": t_start, "attach": [attach.stopped_at, attach.resumed_at],
                    "preprotect": [attach.resumed_at, ft.stopped_at],
                    "freeze": [ft.stopped_at, ft.resumed_at], "end": time.monotonic()},
        )

    async def _after_resume(self, core_before, ft: FrozenTarget, prep: Prepared) -> None:
        """What is recorded once the target runs again (``self.core_record``): the threads'
        names and the core view's records first (the names as close to the instant as
        possible), then the changed pages and ELF headers of read-only file mappings (see
        :mod:`snapfs.capture.coreinfo`, :mod:`snapfs.capture.relocated`)."""
        def record() -> tuple[dict, bytes]:
            with _no_gc():
                return coreinfo.record(self.pid, core_before, ft.maps, ft.threads)

        self.core_record = await trio.to_thread.run_sync(record)
        captured = {v.start for v in prep.regions}
        await trio.to_thread.run_sync(save_private_pages, self.pid, ft.maps, self.writer, captured,
                                      limiter=self.limiter)
        _gc_settled()  # the core view's records, kept until the commit

    async def _protect_and_freeze(self, uffd: Uffd, comm: str, features: int, huge_sizes):
        """Steps 2 and 3: write-protect the memory while the target runs, then freeze it and
        re-protect what changed meanwhile. Returns (PreProtected, FrozenTarget, Prepared)."""
        opts = self.options
        maps = ClassifiedMaps(
            read_maps_text(self.pid), include_readonly=opts.include_readonly, huge_sizes=huge_sizes
        )

        copy_buffer = copy_buffer_for(maps.regions)
        # Pages written during pre-protection are copied in the freeze (not in continuous
        # mode: there the protection records what changed since).
        written_buffer = None if opts.continuous else prefaulted_buffer(COPY_WRITTEN_MAX)
        _gc_settled()

        def at_instant(ft: FrozenTarget, pre: PreProtected) -> Prepared:
            self.thread_masks = ft.thread_masks  # read with the registers (complete once resumed)
            prep = protect_and_record(
                ft,
                include_readonly=opts.include_readonly,
                huge_sizes=huge_sizes,
                features=features,
                pre=pre,
                copy_buffer=copy_buffer,
                copy_written=written_buffer,
            )
            if pre.maps is not None and pre.maps.text == ft.maps_text:
                # The maps as parsed already (every line's Vma, also those not captured): the
                # core view and the restore record need them, and parsing 65 000 lines again
                # after the resume cost ~1 s of GIL beside the scan.
                ft._maps = pre.maps.layout
            # Resume only once the fault path serves: started after the resume, it took
            # 4-300 ms to come up (trio scheduling, the GIL) while the target's first
            # writes waited on protected pages — a stall longer than the pause itself.
            trio.from_thread.run(self._start_faults, uffd, prep)
            return prep

        def plan(pre: PreProtected) -> InstantPlan:
            warm_scan_pool()  # the threads of the instant's scans: started before the pause
            return plan_instant(pre.maps, pre)

        # The instant's work decided while the target still runs (see InstantPlan).
        return await protect_then_freeze(self.pid, comm, uffd, maps, at_instant, handle=self.handle, plan=plan)

    async def _read_state_after(self) -> None:
        """The kernel state again once the target runs (see procstate.bracket)."""
        self.state_after = await trio.to_thread.run_sync(procstate.read_state, self.pid)

    async def _start_faults(self, uffd: Uffd, prep: Prepared) -> None:
        """In the trio thread, while the target is still stopped: the capture context and
        the fault path (its threads starting) — the last step of the freeze."""
        self.prep = prep
        # The store's index of region i is i (add_region numbers them in call order; they
        # are declared first thing after the resume, before any page reaches the store:
        # 65 000 of them took ~0.2 s inside the pause).
        self.ctx = CaptureContext(
            pid=self.pid,
            uffd=uffd,
            ledger=prep.ledger,
            regions=prep.regions,
            region_index=list(range(len(prep.regions))),
            writer=self.writer,
        )
        self.total_bytes = prep.ledger.total_pages * PAGE + prep.copied_bytes
        self.fault_path = FaultPath(self.ctx)
        await self.fault_nursery.start(self._serve_faults)

    async def _serve_faults(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.CancelScope() as self.fault_scope:
                await self.fault_path.run(task_status=task_status)
        finally:
            self.faults_done.set()  # its last pages are queued: the final flush may run

    def _describe_regions(self, prep: Prepared, shared: set) -> None:
        """Declare every region to the writer, as index i for region i (see _start_faults);
        warn about memory other processes may write."""
        # One call: ~65 000 regions for a target with as many mappings.
        with _no_gc():
            first = self.writer.add_regions([region_spec(v) for v in prep.regions])
        if first != 0:
            raise RuntimeError("internal error: store region indices out of step with the capture's")
        for v in prep.regions:
            if (v.dev, v.inode) in shared and v.mode == "wp":
                self.warnings.append(
                    f"region {v.name} ({v.path}) is shared memory also mapped by other processes: "
                    "their writes during the capture are not write-protected and may show"
                )
            if v.mode == "copy" and "unprotectable" in v.meta and v.shared:
                self.warnings.append(
                    f"region {v.name} ({v.path}) is a shared file mapping: copied during the pause; "
                    "other processes writing the file may change it"
                )

    def _report_unsaved(self) -> None:
        """Pages never claimed (unreadable to the end): mark them lost."""
        led = self.ctx.ledger
        pending = np.flatnonzero(led.state == 0)
        if len(pending):
            led.state[pending] = LOST
            self.ctx.mark_lost_slots(pending, "could not be read (unmapped by the target?)")

    # ----------------------------------------------------------- background
    async def _background(self, ctx: CaptureContext) -> None:
        fault_path = self.fault_path  # already serving (started inside the freeze)
        # In continuous mode pages stay protected after the scan: the fault path unprotects
        # only what is written, so at the end the protection says what changed.
        scan = Scan(ctx, self.options.rate, unprotect=not self.options.continuous, hot=self.hot,
                    rate_deadline=self.options.rate_deadline)
        free_send, free_recv = trio.open_memory_channel[bytearray](len(self.buffers))
        for buf in self.buffers:
            free_send.send_nowait(buf)
        work_send, work_recv = trio.open_memory_channel[tuple](self.workers)
        self.t0 = time.monotonic()
        pidfd = os.dup(self.handle.pidfd)  # the pinned process, whatever its PID names now
        try:
            async with trio.open_nursery() as outer:
                # Tasks that live until the scan and the store work are done.
                outer.start_soon(self._watch_exit, pidfd)
                outer.start_soon(fault_path.run_store)
                if self.progress_cb is not None:
                    outer.start_soon(self._progress_loop)
                scan_done = trio.Event()
                async with trio.open_nursery() as inner:
                    inner.start_soon(_stop_thread_on_cancel, scan.stop, scan_done)
                    for _ in range(self.workers):
                        inner.start_soon(store_chunks, self.writer, self.limiter, work_recv.clone(),
                                         free_send.clone())
                    await self._store_copies()
                    async with work_send:  # closing it lets the workers drain, then end
                        await trio.to_thread.run_sync(
                            scan.run, work_send, free_recv, abandon_on_cancel=False
                        )
                    scan_done.set()
                    if scan.late:
                        self.warnings.append(
                            f"the background copy at {self.options.rate:.0f} bytes/s reached its "
                            f"{self.options.rate_deadline:g} s deadline: the rest was copied at full speed"
                        )
                    work_recv.close()
                if self.options.continuous:
                    # Switch to async tracking while the fault path still serves faults.
                    self.tracking = await continuous.start_tracking(
                        ctx, self.prep, self.name, self.options, self.huge_sizes, self.handle
                    )
                # Everything is claimed: stop serving faults (closing the uffd after this
                # wakes any writer), then write what the fault path saved.
                self.fault_scope.cancel()
                outer.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await self.faults_done.wait()
                await fault_path.flush()
        finally:
            os.close(pidfd)

    async def _watch_exit(self, pidfd: int) -> None:
        await trio.lowlevel.wait_readable(pidfd)
        raise TargetError(f"process {self.pid} exited during the capture: nothing published")

    async def _progress_loop(self) -> None:
        ctx, recent = self.ctx, RecentRate()
        while True:
            now, done = time.monotonic(), ctx.done_bytes
            self.progress_cb(Progress(done, self.total_bytes, self.fault_path.served(), now - self.t0,
                                      recent.add(now, done)))
            await trio.sleep(0.2)

    async def _store_copies(self) -> None:
        """Store what was copied during the pause (one worker-thread call for all)."""
        prep = self.prep
        copies, prep.copies = prep.copies, []
        written = prep.written
        # Saved in the pause: done from the start (before the first progress sample).
        self.ctx.done_bytes += (sum(int(c.mask.sum()) for c in copies) + prep.written_pages) * PAGE

        def put_all() -> None:
            for c in copies:
                if c.mask.any():
                    self.writer.put_pages(self.ctx.region_index[c.region], c.first_page, c.data, c.mask)
            if written:  # one call for all (hundreds of single pages)
                regions, firsts, counts = (np.array(x, np.int64) for x in zip(*written))
                index = np.asarray(self.ctx.region_index, np.int64)
                self.writer.put_pieces(index[regions], firsts, counts, prep.written_data)

        await trio.to_thread.run_sync(put_all, limiter=self.limiter)


def _gc_settled() -> None:
    """Move every object alive now out of reach of the cyclic garbage collector until the
    capture ends (``gc.unfreeze`` in :meth:`_Capture.run`). The capture's long-lived objects
    (a Vma, a RegionSpec and their dicts per mapping: about a million objects for 65 000
    mappings) made each full collection take 0.1-0.35 s, holding the GIL: the fault path's
    Python side stopped, the native loop's ring filled, and the target stalled as long.
    Costs nothing (the generations' lists are spliced); garbage among them waits until the
    end of the capture."""
    gc.freeze()


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No automatic collection while a step makes an object per mapping (tens of thousands,
    none in a cycle): a full collection meanwhile took 0.1-0.2 s, holding the GIL (see
    _gc_settled, which the engine calls after such steps)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


async def store_chunks(writer, limiter: trio.CapacityLimiter, work_recv, free_send) -> None:
    """A store worker: compress and write the scan's chunks (``(buffer, pieces, pooled)`` from
    ``work_recv``, see :meth:`Scan.run`) in worker threads; return pooled buffers after."""
    async with work_recv, free_send:
        async for buf, pieces, pooled in work_recv:
            await trio.to_thread.run_sync(_put_pieces, writer, buf, pieces, limiter=limiter)
            if pooled:
                await free_send.send(buf)


def _put_pieces(writer, buf: bytearray, pieces: list) -> None:
    """One scan batch into the store: its pieces lie back to back in ``buf`` (see
    :meth:`Scan.run`), so they go in one ``put_pieces`` call whatever their number (a batch
    of 4 KiB mappings holds hundreds); pieces out of (region, page) order one by one."""
    if not pieces:
        return
    view = memoryview(buf)
    regions = np.array([p[0] for p in pieces], np.int64)
    firsts = np.array([p[1] for p in pieces], np.int64)
    counts = np.array([len(p[3]) for p in pieces], np.int64)
    offs = np.array([p[2] for p in pieces], np.int64)
    # Niced: a woken writer of the target (and the fault threads) preempt compression.
    with background_thread_priority():
        ordered = len(pieces) == 1 or (
            (offs == (np.cumsum(counts) - counts) * PAGE).all()
            and ((regions[1:] > regions[:-1]) | ((regions[1:] == regions[:-1])
                                                  & (firsts[1:] >= firsts[:-1] + counts[:-1]))).all())
        if ordered and offs[0] == 0:
            total = int(counts.sum())
            writer.put_pieces(regions, firsts, counts, view[:total * PAGE],
                              np.concatenate([p[3] for p in pieces]))
            return
        for region, first_page, off, mask in pieces:
            if mask.any():
                writer.put_pages(region, first_page, view[off : off + len(mask) * PAGE], mask)


async def _stop_thread_on_cancel(stop, done: trio.Event) -> None:
    """Set ``stop`` (a threading.Event the scan thread checks, e.g. while throttling) as soon
    as this task is cancelled; return quietly once ``done``."""
    try:
        await done.wait()
    finally:
        stop.set()


async def capture_process(
    pid: int,
    store,
    name: str,
    options: CaptureOptions | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> CaptureResult:
    """Take a live point-in-time snapshot of process ``pid`` into ``store`` as ``name``.

    The target is stopped only for the freeze (``pause_ms``); afterwards it runs while the
    pages are saved. On any failure or cancellation the target is released at once and the
    snapshot is aborted (nothing published). Raises TargetError, PermissionDenied, NameInUse,
    StoreError.
    """
    return await _Capture(pid, store, name, options or CaptureOptions(), progress).run()


async def snapshot_next(tracking: continuous.Tracking, store, name: str, progress=None) -> CaptureResult:
    """The next snapshot of a continuous series: a tracked child
    (:func:`~snapfs.capture.continuous.capture_next`) when at most STOPPED_COPY_LIMIT
    changed (the copy buffer's bound), else a live capture in continuous mode (a new
    tracking replaces this one: use ``result.tracking``)."""
    try:
        pre = await trio.to_thread.run_sync(continuous.prescan, tracking)
        if pre.copy_bytes <= continuous.STOPPED_COPY_LIMIT:
            return await continuous.capture_next(tracking, store, name, pre)
    except BaseException as exc:
        # The target exited or exec'd: say so, whichever kernel call noticed it first.
        gone = _gone_instead(tracking.handle, exc) if tracking.handle is not None else None
        if gone is not None:
            raise gone from None
        raise
    parent = tracking.parent
    tracking.close()
    opts = CaptureOptions(
        rate=tracking.options.rate,
        rate_deadline=tracking.options.rate_deadline,
        include_readonly=tracking.options.include_readonly,
        parent=parent,
        workers=tracking.options.workers,
        continuous=True,
        number_if_taken=tracking.options.number_if_taken,
    )
    return await capture_process(tracking.pid, store, name, opts, progress)
