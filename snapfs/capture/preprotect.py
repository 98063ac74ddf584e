"""Pre-protection: write-protect the target's memory while it still runs, so that
the freeze only has to re-protect what was written or populated since.

Write-protecting populated 4 KiB pages costs the kernel ~20 ms per GiB; done inside the
freeze it made the pause grow with the target's size. Here it is done before the freeze, in
a worker thread, while a trio task serves the write faults it causes. No fault of this phase
needs saving (the snapshot instant has not come yet): the page is unprotected at once and
the freeze's ``PAGEMAP_SCAN`` finds it again (``PAGE_IS_WRITTEN``) and re-protects it.
Events (DONTNEED, munmap, mremap) only need reading, which lets the target go on: the freeze
reads the maps and the page tables afresh.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import trio

from snapfs.capture import kernel as k
from snapfs.capture.faults import HotCalls, fork_event
from snapfs.capture.freeze import FrozenTarget, frozen_again
from snapfs.capture.handle import ProcessHandle
from snapfs.capture.kernel import ffi, lib
from snapfs.capture.maps import ClassifiedMaps, Vma
from snapfs.capture.pagemap import REGION_DTYPE, PagemapScanner
from snapfs.capture.uffd import Uffd, decode_messages, unprotect_outcome

PAGE = k.PAGE_SIZE
# Protect at most this much per ioctl: the call holds the target's mmap lock for reading, and
# a thread of the target calling mmap/munmap meanwhile waits for it (~1.2 ms per 64 MiB).
PROTECT_STEP = 64 << 20
_RETRY = 100e-6  # backoff while an unprotect is refused with EAGAIN (a mapping change pending)
_EAGAIN_PATIENCE = 5.0  # seconds
T = TypeVar("T")


@dataclass
class PreProtected:
    """What :func:`preprotect_regions` did."""

    protected_bytes: int = 0
    elapsed_ms: float = 0.0
    unprotectable: dict[int, str] = field(default_factory=dict)  # VMA start -> reason
    faults: int = 0  # write faults served (unprotect only) meanwhile
    # The maps the protection followed (their text at that time) and the [start, end) of
    # every VMA registered and protected, sorted.
    maps: ClassifiedMaps | None = None
    maps_text: str = ""
    protected: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.uint64))
    # The populated ranges of the protected VMAs (REGION_DTYPE, sorted), scanned right after
    # protecting them, one scan per run of VMAs. At the freeze these plus the pages found
    # WRITTEN are the populated pages of a VMA that is unchanged and untouched by events (a
    # scan for WRITTEN costs ~1/3 of a full one).
    populated: np.ndarray = field(default_factory=lambda: np.empty(0, REGION_DTYPE))
    # Ranges the target zapped, unmapped or moved meanwhile (from the uffd's events): the
    # freeze scans the VMAs they touch in full.
    changed: list[tuple[int, int]] = field(default_factory=list)
    # Pages the target wrote meanwhile (sorted, unique): likely written again soon after the
    # freeze, so the scan copies them first.
    hot: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    # The instant's work decided while the target still runs (a protect.InstantPlan; see
    # protect_then_freeze's ``plan``).
    plan: Any = None


def preprotect_regions(pid: int, uffd: Uffd, maps: ClassifiedMaps) -> PreProtected:
    """Register and write-protect every write-protect-mode region, then record its populated
    pages (blocking: run it in a worker thread). A run of adjacent such VMAs takes one
    register, one protect per PROTECT_STEP and one scan (a target with 65 000 mappings took
    ~200 000 ioctls one VMA at a time); a run the kernel refuses is done VMA by VMA. Regions
    the kernel refuses are listed in ``unprotectable``; the freeze copies them instead.
    Ranges unmapped meanwhile are skipped."""
    out = PreProtected(maps=maps, maps_text=maps.text)
    t0 = time.monotonic()
    scanner = PagemapScanner(pid)
    regions = maps.regions
    done: list[tuple[int, int]] = []
    found: list[np.ndarray] = []
    try:
        for lo, hi, first, last in maps.wp_runs():
            try:
                _retrying(uffd.register_wp, lo, hi - lo)
                members = [regions[first:last]]
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOTSUP,
                                     errno.ENOMEM, errno.ENOENT):
                    raise
                members = [[v] for v in _register_each(uffd, regions[first:last], out)]
            for vmas in members:
                a, b = vmas[0].start, vmas[-1].end
                try:
                    for lo, hi in _contiguous(vmas):  # a step with no VMA at all fails
                        for step in range(lo, hi, PROTECT_STEP):
                            _retrying(uffd.protect, step, min(PROTECT_STEP, hi - step), wp=True)
                except OSError as exc:
                    # ENOMEM/ENOENT: unmapped since the maps were read; EINVAL: remapped (a
                    # new VMA there, not registered: a PostgreSQL backend mapping memory
                    # failed whole tree captures under load). Either way the freeze sees the
                    # new layout, scans these VMAs in full and protects what is not.
                    if exc.errno not in (errno.ENOMEM, errno.ENOENT, errno.ESRCH, errno.EINVAL):
                        raise
                    continue
                found.append(populated_ranges(scanner, a, b))
                done += [(v.start, v.end) for v in vmas]
                out.protected_bytes += sum(v.length for v in vmas)
    finally:
        scanner.close()
    out.protected = np.array(sorted(done), np.uint64).reshape(-1, 2)
    if found:
        out.populated = np.concatenate(found)
    out.elapsed_ms = (time.monotonic() - t0) * 1000.0
    return out


def _contiguous(vmas: list[Vma]) -> list[tuple[int, int]]:
    """The address ranges the VMAs cover, adjacent ones merged."""
    out: list[list[int]] = []
    for v in vmas:
        if out and out[-1][1] == v.start:
            out[-1][1] = v.end
        else:
            out.append([v.start, v.end])
    return [(lo, hi) for lo, hi in out]


def _register_each(uffd: Uffd, vmas: list[Vma], out: PreProtected) -> list[Vma]:
    """Register VMAs one by one (a run the kernel refused whole); returns those registered.
    Refused ones go to ``out.unprotectable``; ones unmapped meanwhile are left out."""
    ok = []
    for v in vmas:
        try:
            _retrying(uffd.register_wp, v.start, v.length)
            ok.append(v)
        except OSError as exc:
            if exc.errno in (errno.ENOMEM, errno.ENOENT, errno.ESRCH):
                continue  # unmapped since the maps were read: the freeze sees the new layout
            if exc.errno not in (errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOTSUP):
                raise
            out.unprotectable[v.start] = exc.strerror or str(exc)
    return ok


def _retrying(call, *args, **kwargs) -> None:
    """``call`` again while it fails with EAGAIN: the target is changing its mappings and
    the event saying so is pending; the fault server reads it within microseconds."""
    delay = 50e-6
    deadline = time.monotonic() + _EAGAIN_PATIENCE
    while True:
        try:
            return call(*args, **kwargs)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5e-3)


def populated_ranges(scanner: PagemapScanner, start: int, end: int, report: int = 0,
                     require: int = 0) -> np.ndarray:
    """Present (or swapped) pages of [start, end) that are not the shared zero page, and have
    the ``require`` categories (``categories`` holds PAGE_IS_HUGE and the ``report`` bits)."""
    return scanner.scan(
        start,
        end,
        require=require,
        exclude=k.PAGE_IS_PFNZERO,
        anyof=k.PAGE_IS_PRESENT | k.PAGE_IS_SWAPPED,
        report=k.PAGE_IS_HUGE | report,
    )


class PreFaultServer:
    """Serves write faults during pre-protection: unprotect and wake, nothing saved.

    It must keep serving while the freeze stops the target: a thread whose fault is pending
    in kernel mode (a syscall writing to user memory) retries the fault instead of taking the
    ptrace stop, so it stops only once its fault is served. Once every thread is stopped the
    freeze calls :meth:`halt` (in the trio thread); from then on the server touches nothing.
    """

    def __init__(self, pid: int, uffd: Uffd, regions: list[Vma]) -> None:
        self.pid = pid
        self.uffd = uffd
        self.faults = 0
        self.halted = False
        self.changed: list[tuple[int, int]] = []  # ranges named by REMOVE/UNMAP/REMAP events
        self.written: list[int] = []  # page addresses the target wrote (one per fault)
        self.hot = HotCalls(pid)
        # hugetlb regions: a fault unprotects the whole huge page (a part would fail).
        huge = sorted((v.start, v.end, v.page_size) for v in regions if v.page_size != PAGE)
        self._huge = np.array(huge, np.uint64).reshape(-1, 3)

    def halt(self) -> None:
        """Stop serving at once (call from the trio thread): no unprotect after this."""
        self.halted = True

    async def run(self) -> None:
        """Serve faults until halted or cancelled (in a nursery beside the protection)."""
        scanner = PagemapScanner(self.pid)
        busy: list[tuple[int, int]] = []
        try:
            while not self.halted:
                if busy:
                    with trio.move_on_after(_RETRY):
                        await trio.lowlevel.wait_readable(self.uffd.fd)
                else:
                    await trio.lowlevel.wait_readable(self.uffd.fd)
                if self.halted:  # woken, but the freeze has begun meanwhile
                    return
                raw = self.hot.read_messages(self.uffd.fd)
                retry, busy = busy, []
                if raw:
                    msgs = decode_messages(raw)
                    self._note_events(msgs)
                    faults = msgs["a1"][msgs["event"] == k.UFFD_EVENT_PAGEFAULT] & ~np.uint64(PAGE - 1)
                    if len(faults):
                        self.written += faults.tolist()
                        self.faults += len(faults)
                        busy += self._unprotect_units(scanner, faults)
                for lo, hi in retry:
                    if self.hot.unprotect(self.uffd.fd, lo, hi) == "busy":
                        busy.append((lo, hi))
        finally:
            scanner.close()

    def _note_events(self, msgs: np.ndarray) -> None:
        for m in msgs[msgs["event"] != k.UFFD_EVENT_PAGEFAULT].tolist():
            ev, a0, a1, a2 = m[0], m[4], m[5], m[6]
            if ev == k.UFFD_EVENT_FORK:
                # A child born before the instant: its inherited protection is dropped (a
                # tree capture freezes and protects it with the others).
                fork_event(None, a0)
            elif ev in (k.UFFD_EVENT_REMOVE, k.UFFD_EVENT_UNMAP):
                self.changed.append((a0, a1))
            elif ev == k.UFFD_EVENT_REMAP:
                self.changed += [(a0, a0 + a2), (a1, a1 + a2)]

    def _unprotect_units(self, scanner: PagemapScanner, addrs: np.ndarray) -> list[tuple[int, int]]:
        """Unprotect the unit of each fault at ``addrs`` (page addresses): its page, or its
        whole huge page (unprotecting part of a THP would split it; part of a hugetlb page
        fails), in one C call for the batch: this runs in the realtime trio thread, and at
        ~25 us of Python per fault (a scan and an unprotect each) 16 writers at 100k
        writes/s kept it busy for 50 ms at a time, one CPU the target could not use.
        Returns the units refused for now (EAGAIN), to retry."""
        lo, hi = addrs.copy(), np.zeros(len(addrs), np.uint64)
        if len(self._huge):
            i = np.searchsorted(self._huge[:, 0], addrs, side="right") - 1
            inside = (i >= 0) & (addrs < self._huge[np.maximum(i, 0), 1])
            size = self._huge[i[inside], 2]
            lo[inside] = addrs[inside] // size * size
            hi[inside] = lo[inside] + size
        res = np.zeros(len(addrs), np.intc)
        k.check(lib.snapfs_unprotect_units(self.uffd.fd, k.UFFDIO_WRITEPROTECT, scanner.fd, k.PAGEMAP_SCAN,
                                           ffi.from_buffer("uint64_t[]", lo), ffi.from_buffer("uint64_t[]", hi),
                                           len(addrs), ffi.from_buffer("int[]", res)), "PAGEMAP_SCAN")
        busy = []
        for j in np.flatnonzero(res).tolist():
            if unprotect_outcome(int(res[j])) == "busy":
                busy.append((int(lo[j]), int(hi[j])))
        return busy


async def protect_then_freeze(
    pid: int,
    comm: str,
    uffd: Uffd,
    maps: ClassifiedMaps,
    at_instant: Callable[[FrozenTarget, PreProtected], T],
    meanwhile: Callable[[PreProtected], Awaitable[None]] | None = None,
    handle: ProcessHandle | None = None,
    plan: Callable[[PreProtected], Any] | None = None,
) -> tuple[PreProtected, FrozenTarget, T]:
    """Write-protect the captured regions of ``maps`` while the target runs (serving the faults this causes),
    then freeze it and call ``at_instant(frozen_target, pre)`` with every thread stopped and
    the fault server halted (``pre.changed`` complete); returns (pre, frozen target, its
    result). ``meanwhile`` runs between the two (tests make the target act there).
    ``handle``, the one the attach used, makes the freeze refuse a target that exec'd.
    ``plan(pre)``, run in a worker thread after pre-protection, gives ``pre.plan`` (a
    protect.InstantPlan): the freeze starts its scans once every thread is stopped (if no
    event changed a range) and compares the maps it reads with the plan's.

    The freeze runs in one worker thread (ptrace wants a single tracer thread) while the
    trio thread keeps serving faults until every thread is stopped.
    """
    server = PreFaultServer(pid, uffd, maps.regions)

    def freeze(pre: PreProtected) -> tuple[FrozenTarget, T]:
        def stopped() -> None:  # in this thread, once every thread of the target is stopped
            pre.changed = list(server.changed)  # complete: the server is halted
            if pre.plan is not None and not pre.changed:
                pre.plan.scan_ahead(pid)

        expect = pre.plan.expected_maps() if pre.plan is not None else None
        with frozen_again(handle or pid, comm, uffd, on_stopped=stopped, realtime=True, expect_maps=expect,
                          in_trio_when_stopped=server.halt) as ft:
            return ft, at_instant(ft, pre)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        pre = await trio.to_thread.run_sync(preprotect_regions, pid, uffd, maps)
        if plan is not None:
            pre.plan = await trio.to_thread.run_sync(plan, pre)
        if meanwhile is not None:
            await meanwhile(pre)
        ft, result = await trio.to_thread.run_sync(freeze, pre)
        nursery.cancel_scope.cancel()
    pre.faults = server.faults
    # Once resumed (the server is halted: the list is final): thousands of pages took
    # milliseconds of the pause here.
    pre.hot = np.unique(np.array(server.written, np.uint64))
    return pre, ft, result
