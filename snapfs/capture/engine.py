"""The trio capture engine: freeze, protect, resume, then save every populated page.

After the pause three things run in one nursery:

- the **fault path** (trio task): waits on the uffd with ``wait_readable``, reads messages in
  batches, copies each faulting page (a whole THP / hugetlb page when huge), claims it in the
  ledger and only then unprotects it, which wakes the writer. REMOVE/UNMAP/REMAP events save
  what is still intact of the affected range at once and report the rest as lost;
- the **scan** (one worker thread, GIL released in ``process_vm_readv``): walks the populated
  pages in 2 MiB-aligned chunks, reads a chunk, checks with ``PAGEMAP_SCAN`` that the pages
  it read were still write-protected (so still the freeze content), claims those not yet
  claimed, then unprotects the chunk. ``--rate`` throttles only this;
- **store workers**: compress and write through ``trio.to_thread`` with a limiter sized to
  the cores; buffers circulate through bounded channels, so memory stays bounded.

Pages first populated after the freeze are not in the ledger: never read, holes (zero).
"""

from __future__ import annotations

import collections
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from snapfs.capture import kernel as k
from snapfs.capture.freeze import FrozenTarget, frozen
from snapfs.capture.ledger import HUGE_PMD, LOST, SAVED, Ledger, runs_of
from snapfs.capture.maps import Vma, huge_page_sizes, read_maps
from snapfs.capture.memory import read_pages_robust
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.priority import fault_thread_priority
from snapfs.capture.protect import Prepared, protect_and_record
from snapfs.capture.ptrace import check_target
from snapfs.capture.uffd import Uffd
from snapfs.errors import TargetError

PAGE = k.PAGE_SIZE
CHUNK = 4 << 20  # scan chunk: a multiple of the 2 MiB THP size
FAULT_QUEUE_LIMIT = 64 << 20  # bytes of fault-saved pages waiting for the store


@dataclass
class CaptureOptions:
    """How to capture (see ``snapfs snapshot --help``)."""

    rate: float | None = None  # bytes/s for the background scan; None = unlimited
    include_readonly: bool = False
    parent: str | None = None
    workers: int = 0  # compression threads; 0 = number of CPUs


@dataclass
class Progress:
    """Passed to the ``progress`` callback about 5 times a second."""

    done_bytes: int
    total_bytes: int
    faults: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.done_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        r = self.rate
        return (self.total_bytes - self.done_bytes) / r if r > 0 else None


@dataclass
class CaptureResult:
    """What ``capture_process`` returns (the figures ``snapfs snapshot`` prints)."""

    name: str
    pid: int
    comm: str
    pause_ms: float
    duration_s: float
    resident_bytes: int
    zero_bytes: int
    stored_bytes: int
    faults: int
    regions: int
    warnings: list[str] = field(default_factory=list)
    info: Any = None  # the committed SnapshotInfo

    def to_json(self) -> dict:
        """The ``--json`` object."""
        return {
            "name": self.name,
            "pid": self.pid,
            "comm": self.comm,
            "pause_ms": round(self.pause_ms, 3),
            "duration_s": round(self.duration_s, 3),
            "resident_bytes": self.resident_bytes,
            "zero_bytes": self.zero_bytes,
            "stored_bytes": self.stored_bytes,
            "faults": self.faults,
            "regions": self.regions,
            "warnings": list(self.warnings),
        }


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def process_meta(pid: int, comm: str) -> dict:
    """pid, comm, exe, cmdline of the target for the snapshot's metadata."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    cmd = _read_text(f"/proc/{pid}/cmdline")
    cmdline = [a for a in cmd.split("\0")[:-1]] if cmd else None
    return {"pid": pid, "comm": comm, "exe": exe, "cmdline": cmdline, "kind": "process"}


def shared_with_others(pid: int, vmas: list[Vma]) -> set[tuple[tuple[int, int], int]]:
    """(dev, inode) of the target's shared writable mappings that another process maps too."""
    keys = {(v.dev, v.inode) for v in vmas if v.shared and v.writable and v.inode}
    if not keys:
        return set()
    found: set = set()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (pid, me):
            continue
        text = _read_text(f"/proc/{entry}/maps")
        if not text:
            continue
        for line in text.splitlines():
            parts = line.split(None, 5)
            if len(parts) < 5 or parts[1][3] != "s":
                continue
            major, minor = parts[3].split(":")
            key = ((int(major, 16), int(minor, 16)), int(parts[4]))
            if key in keys:
                found.add(key)
    return found


def _collapse(eg: BaseExceptionGroup) -> BaseException:
    """The error to report from a nursery's group: a SnapfsError (target exited, store full)
    first, else KeyboardInterrupt, else the group itself."""
    from snapfs.errors import SnapfsError

    for kind in (SnapfsError, KeyboardInterrupt):
        match, _ = eg.split(kind)
        if match is not None:
            leaf = match
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf
    return eg


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
        self.faults = 0
        self.done_bytes = 0
        self.warnings: list[str] = []
        self.writer = None
        self.stop_scan = threading.Event()
        self.fault_items: collections.deque = collections.deque()
        self.fault_queued_bytes = 0
        self.fault_item_ready = trio.Event()
        self.fault_drained = trio.Event()
        self.busy_units: list[tuple[int, int]] = []  # unprotects to retry (EAGAIN)

    # ------------------------------------------------------------------ run
    async def run(self) -> CaptureResult:
        comm = check_target(self.pid)
        premaps = read_maps(self.pid)
        huge_sizes = huge_page_sizes(self.pid)
        shared = shared_with_others(self.pid, premaps)
        meta = process_meta(self.pid, comm)
        meta["created"] = time.time()
        writer = self.store.begin_snapshot(self.name, meta, self.options.parent)
        self.writer = writer
        uffd: Uffd | None = None
        t_start = time.monotonic()
        try:
            async with frozen(self.pid) as ft:
                uffd = ft.uffd
                prep = protect_and_record(
                    ft, include_readonly=self.options.include_readonly, huge_sizes=huge_sizes
                )
            pause_ms = ft.pause_ms
            self.prep = prep
            self.uffd = uffd
            self.ledger: Ledger = prep.ledger
            self._describe_regions(prep, shared)
            with fault_thread_priority():
                try:
                    await self._background(ft)
                except BaseExceptionGroup as eg:
                    raise _collapse(eg) from None
            self._report_unsaved()
            duration = time.monotonic() - t_start
            info = writer.commit(
                {
                    "pause_ms": pause_ms,
                    "duration_s": duration,
                    "faults": self.faults,
                    "warnings": self.warnings,
                    "threads": ft.threads,
                    "protect_ms": prep.protect_ms,
                    "uffd_features": prep.features,
                }
            )
        except BaseException:
            if uffd is not None:
                uffd.close()
            writer.abort()
            raise
        finally:
            if uffd is not None:
                uffd.close()
        return CaptureResult(
            name=info.name,
            pid=self.pid,
            comm=comm,
            pause_ms=pause_ms,
            duration_s=duration,
            resident_bytes=info.resident_bytes,
            zero_bytes=info.zero_bytes,
            stored_bytes=info.stored_bytes,
            faults=self.faults,
            regions=info.region_count,
            warnings=list(info.warnings),
            info=info,
        )

    def _describe_regions(self, prep: Prepared, shared: set) -> None:
        from snapfs.store import RegionSpec

        self.region_index: list[int] = []
        for v in prep.regions:
            meta = dict(v.meta, mode=v.mode)
            if v.inode:
                meta.update(dev=f"{v.dev[0]:x}:{v.dev[1]:x}", inode=v.inode)
            spec = RegionSpec(
                name=v.name,
                start=v.start,
                length=v.length,
                perms=v.perms,
                offset=v.offset,
                path=v.path or None,
                kind=v.kind,
                page_size=v.page_size,
                meta=meta,
            )
            self.region_index.append(self.writer.add_region(spec))
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
        self.total_bytes = (prep.ledger.total_pages * PAGE) + prep.copied_bytes

    def _report_unsaved(self) -> None:
        """Pages never claimed (unreadable to the end): mark them lost."""
        led = self.ledger
        pending = np.flatnonzero(led.state == 0)
        if not len(pending):
            return
        led.state[pending] = LOST
        self._mark_lost_slots(pending, "could not be read (unmapped by the target?)")

    def _mark_lost_slots(self, slots: np.ndarray, reason: str) -> None:
        led = self.ledger
        exts = np.searchsorted(led.ext_base, slots, side="right") - 1
        for ext in np.unique(exts).tolist():
            sel = slots[exts == ext] - int(led.ext_base[ext])
            mask = np.zeros(int(led.ext_base[ext + 1] - led.ext_base[ext]), dtype=bool)
            mask[sel] = True
            region = int(led.ext_region[ext])
            v = self.prep.regions[region]
            first = (int(led.ext_start[ext]) - v.start) // PAGE
            for s, n in runs_of(mask):
                self.writer.mark_lost(self.region_index[region], first + s, n, reason)

    # ----------------------------------------------------------- background
    async def _background(self, ft: FrozenTarget) -> None:
        nbuf = self.workers * 2 + 1
        free_send, free_recv = trio.open_memory_channel[bytearray](nbuf)
        for _ in range(nbuf):
            free_send.send_nowait(bytearray(CHUNK))
        work_send, work_recv = trio.open_memory_channel[tuple](self.workers)
        self.t0 = time.monotonic()
        pidfd = k.pidfd_open(self.pid)
        try:
            async with trio.open_nursery() as outer:
                # Tasks that live until the scan and the store work are done.
                outer.start_soon(self._watch_exit, pidfd)
                outer.start_soon(self._fault_loop)
                outer.start_soon(self._fault_store)
                if self.progress_cb is not None:
                    outer.start_soon(self._progress_loop)
                async with trio.open_nursery() as inner:
                    for _ in range(self.workers):
                        inner.start_soon(self._store_worker, work_recv.clone(), free_send.clone())
                    await self._store_copies()
                    try:
                        async with work_send:
                            await trio.to_thread.run_sync(
                                self._scan_thread, work_send, free_recv, abandon_on_cancel=False
                            )
                    finally:
                        self.stop_scan.set()
                    work_recv.close()
                # Everything is claimed; stop listening, then flush the fault-saved pages.
                outer.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await self._flush_fault_items()
        finally:
            os.close(pidfd)

    async def _watch_exit(self, pidfd: int) -> None:
        await trio.lowlevel.wait_readable(pidfd)
        raise TargetError(f"process {self.pid} exited during the capture: nothing published")

    async def _progress_loop(self) -> None:
        while True:
            self.progress_cb(
                Progress(self.done_bytes, self.total_bytes, self.faults, time.monotonic() - self.t0)
            )
            await trio.sleep(0.2)

    async def _store_copies(self) -> None:
        for c in self.prep.copies:
            if c.mask.any():
                await trio.to_thread.run_sync(
                    self.writer.put_pages,
                    self.region_index[c.region],
                    c.first_page,
                    c.data,
                    c.mask,
                    limiter=self.limiter,
                )
            self.done_bytes += int(c.mask.sum()) * PAGE
        self.prep.copies = []

    async def _store_worker(self, work_recv, free_send) -> None:
        async with work_recv, free_send:
            async for buf, pieces in work_recv:
                await trio.to_thread.run_sync(self._put_pieces, buf, pieces, limiter=self.limiter)
                await free_send.send(buf)

    def _put_pieces(self, buf: bytearray, pieces: list) -> None:
        view = memoryview(buf)
        for region, first_page, off, mask in pieces:
            if mask.any():
                n = len(mask)
                self.writer.put_pages(region, first_page, view[off : off + n * PAGE], mask)

    # ------------------------------------------------------------- the scan
    def _scan_thread(self, work_send, free_recv) -> None:
        """Worker thread: read, validate, claim, unprotect, hand over (see module doc)."""
        led = self.ledger
        scanner = PagemapScanner(self.pid)
        rate = self.options.rate
        started = time.monotonic()
        scanned = 0
        try:
            for lo, hi, wp in self._chunks():
                if self.stop_scan.is_set():
                    return
                pieces = led.pieces(lo, hi)
                # Skip what the fault path has claimed already.
                live = []
                for ext, s, e in pieces:
                    a, b = led.slots(ext, s, e)
                    if (led.state[a:b] == 0).any():
                        live.append((ext, s, e, a, b))
                if not live:
                    continue
                if rate:
                    ahead = scanned / rate - (time.monotonic() - started)
                    if ahead > 0 and self.stop_scan.wait(ahead):
                        return
                size = sum(e - s for _, s, e, _, _ in live)
                buf = trio.from_thread.run(free_recv.receive)
                if len(buf) < size:
                    buf = bytearray(size)
                ok = read_pages_robust(self.pid, buf, [(s, e - s) for _, s, e, _, _ in live])
                valid = self._still_frozen(scanner, lo, hi, wp)
                out = []
                pos = 0
                for ext, s, e, a, b in live:
                    n = b - a
                    rel = (s - lo) // PAGE
                    mine = led.claim(a, b, ok[pos : pos + n] & valid[rel : rel + n])
                    region = int(led.ext_region[ext])
                    first = (s - self.prep.regions[region].start) // PAGE
                    out.append((self.region_index[region], first, pos * PAGE, mine))
                    pos += n
                if wp:
                    # "busy": an mmap change is pending; the pages stay protected and a write
                    # to them goes through the fault path, which finds them saved.
                    self.uffd.unprotect_quiet(lo, hi - lo)
                scanned += size
                self.done_bytes += size
                trio.from_thread.run(work_send.send, (buf, out))
        finally:
            scanner.close()

    def _chunks(self):
        """(lo, hi, write_protected) scan chunks: within one region, aligned to CHUNK (or to
        the region's huge page size), covering every extent."""
        led = self.ledger
        regions = self.prep.regions
        i = 0
        n = len(led.ext_start)
        while i < n:
            region = int(led.ext_region[i])
            v = regions[region]
            step = max(CHUNK, v.page_size)
            lo = int(led.ext_start[i]) // step * step
            # Walk this region's extents chunk by chunk.
            while i < n and int(led.ext_region[i]) == region:
                lo = max(lo, int(led.ext_start[i]) // step * step)
                hi = lo + step
                yield max(lo, v.start), min(hi, v.end), v.mode == "wp"
                lo = hi
                while i < n and int(led.ext_region[i]) == region and int(led.ext_end[i]) <= lo:
                    i += 1

    def _still_frozen(self, scanner: PagemapScanner, lo: int, hi: int, wp: bool) -> np.ndarray:
        """Per page of [lo, hi): True if still present and (for protected regions) still
        write-protected, i.e. the bytes just read are the freeze content."""
        found = scanner.scan(
            lo,
            hi,
            require=0,
            exclude=(k.PAGE_IS_WRITTEN if wp else 0) | k.PAGE_IS_PFNZERO,
            anyof=k.PAGE_IS_PRESENT | k.PAGE_IS_SWAPPED,
        )
        valid = np.zeros((hi - lo) // PAGE, dtype=bool)
        for s, e in zip(found["start"].tolist(), found["end"].tolist()):
            valid[(s - lo) // PAGE : (e - lo) // PAGE] = True
        return valid

    # -------------------------------------------------------- the fault path
    async def _fault_loop(self) -> None:
        uffd = self.uffd
        scanner = PagemapScanner(self.pid)
        retry_delay = 50e-6
        try:
            while True:
                if self.fault_queued_bytes > FAULT_QUEUE_LIMIT:
                    self.fault_drained = trio.Event()
                    await self.fault_drained.wait()
                # Unprotects refused (EAGAIN) while the target changes its mappings are
                # retried once the event is read and the kernel has finished the change
                # (it clears its flag only after the changing thread runs again): short
                # backoff, since nothing else signals that moment.
                timeout = retry_delay if self.busy_units else float("inf")
                with trio.move_on_after(timeout):
                    await trio.lowlevel.wait_readable(uffd.fd)
                msgs = uffd.read_messages()
                if len(msgs):
                    self._handle_messages(msgs, scanner)
                busy, self.busy_units = self.busy_units, []
                for lo, hi in busy:
                    self._unprotect(lo, hi)
                retry_delay = min(retry_delay * 2, 0.005) if self.busy_units else 50e-6
        finally:
            scanner.close()

    def _handle_messages(self, msgs: np.ndarray, scanner: PagemapScanner) -> None:
        """Handle a batch in order (an event changes what later faults mean)."""
        events = msgs["event"]
        i = 0
        n = len(msgs)
        while i < n:
            if events[i] == k.UFFD_EVENT_PAGEFAULT:
                j = i
                while j < n and events[j] == k.UFFD_EVENT_PAGEFAULT:
                    j += 1
                self._serve_faults(msgs["a1"][i:j])
                i = j
                continue
            m = msgs[i]
            ev = int(m["event"])
            if ev == k.UFFD_EVENT_REMOVE:
                self._range_changed(scanner, int(m["a0"]), int(m["a1"]), None, "madvise(DONTNEED/REMOVE)")
            elif ev == k.UFFD_EVENT_UNMAP:
                self._range_changed(scanner, int(m["a0"]), int(m["a1"]), None, "munmap")
            elif ev == k.UFFD_EVENT_REMAP:
                frm, to, ln = int(m["a0"]), int(m["a1"]), int(m["a2"])
                self._range_changed(scanner, frm, frm + ln, to, "mremap")
            i += 1

    def _unit(self, addr: int) -> tuple[int, int, int]:
        """(lo, hi, extent) of what to save for a fault at ``addr``: a 4 KiB page, a whole
        THP, or a whole hugetlb page."""
        led = self.ledger
        ext = led.find(addr)
        size = PAGE
        if ext >= 0 and led.ext_huge[ext]:
            size = max(HUGE_PMD, self.prep.regions[int(led.ext_region[ext])].page_size)
        elif ext < 0:
            import bisect

            r = bisect.bisect_right(led.region_starts, addr) - 1
            if r >= 0 and addr < self.prep.regions[r].end:
                size = self.prep.regions[r].page_size
        lo = addr // size * size
        return lo, lo + size, ext

    def _serve_faults(self, addrs: np.ndarray) -> None:
        led = self.ledger
        seen: set[int] = set()
        units = []
        for addr in np.unique(addrs & np.uint64(~(PAGE - 1) & (2**64 - 1))).tolist():
            lo, hi, ext = self._unit(addr)
            if lo in seen:
                continue
            seen.add(lo)
            units.append((lo, hi, ext))
        for lo, hi, ext in units:
            if ext >= 0:
                self._save_now(lo, hi, None, "fault")
            self._unprotect(lo, hi)
            self.faults += 1

    def _unprotect(self, lo: int, hi: int) -> None:
        if self.uffd.unprotect_quiet(lo, hi - lo) == "busy":
            self.busy_units.append((lo, hi))

    def _save_now(self, lo: int, hi: int, moved_to: int | None, why: str,
                  scanner: PagemapScanner | None = None) -> None:
        """Save the pending pages of [lo, hi) from the target right now (in the loop).

        Pages are read at ``moved_to`` (+ offset) after an mremap. Without ``scanner`` the
        pages are known to be still protected (a WP fault on them is pending); with it, what
        was read is kept only where the pages are still present and protected.
        """
        led = self.ledger
        for ext, s, e in led.pieces(lo, hi):
            a, b = led.slots(ext, s, e)
            pending = led.state[a:b] == 0
            if not pending.any():
                continue
            src = s if moved_to is None else moved_to + (s - lo)
            buf = bytearray(e - s)
            ok = read_pages_robust(self.pid, buf, [(src, e - s)])
            if scanner is not None:
                region = self.prep.regions[int(led.ext_region[ext])]
                ok &= self._still_frozen(scanner, src, src + (e - s), region.mode == "wp")
            mine = led.claim(a, b, ok & pending)
            if mine.any():
                region = int(led.ext_region[ext])
                first = (s - self.prep.regions[region].start) // PAGE
                self._queue_fault_item(self.region_index[region], first, buf, mine)
                self.done_bytes += int(mine.sum()) * PAGE

    def _range_changed(self, scanner, lo: int, hi: int, moved_to: int | None, what: str) -> None:
        """The target unmapped/zapped/moved [lo, hi): save what is intact, report the rest."""
        self._save_now(lo, hi, moved_to, what, scanner)
        led = self.ledger
        lost = []
        for ext, s, e in led.pieces(lo, hi):
            a, b = led.slots(ext, s, e)
            mine = led.claim(a, b, np.ones(b - a, dtype=bool), state=LOST)
            if mine.any():
                lost.append(np.flatnonzero(mine) + a)
        if lost:
            self._mark_lost_slots(np.concatenate(lost), f"{what} by the target during the capture")

    def _queue_fault_item(self, region: int, first: int, buf: bytearray, mask: np.ndarray) -> None:
        self.fault_items.append((region, first, buf, mask))
        self.fault_queued_bytes += len(buf)
        self.fault_item_ready.set()

    async def _fault_store(self) -> None:
        while True:
            await self.fault_item_ready.wait()
            self.fault_item_ready = trio.Event()
            await self._flush_fault_items()

    async def _flush_fault_items(self) -> None:
        # Items leave the queue only once written: a cancelled flush loses nothing.
        while self.fault_items:
            batch = list(self.fault_items)
            await trio.to_thread.run_sync(self._put_fault_batch, batch, limiter=self.limiter)
            for _ in batch:
                self.fault_items.popleft()
            self.fault_queued_bytes -= sum(len(b[2]) for b in batch)
            self.fault_drained.set()

    def _put_fault_batch(self, batch: list) -> None:
        for region, first, buf, mask in batch:
            self.writer.put_pages(region, first, buf, mask)


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
