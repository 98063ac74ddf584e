"""The fault path: serves the target's write faults first, in threads of its own.

The common fault (one 4 KiB page of a populated, non-huge extent) is served by the native
loop (:mod:`~snapfs.capture.fastfault`, SCHED_FIFO, no GIL: winning the GIL back from the
scan and store threads cost 50 us at the median and ms at the tail). It forwards everything
else to the Python fault thread, which serves every fault itself with ``SNAPFS_NO_NATIVE=1``.
That thread (SCHED_FIFO too) waits and reads messages in batches, and handles them in order;
each step that needs syscalls is one C call (:class:`HotCalls`: wait-and-read, one simple
fault's read-claim-unprotect), since every call releases the GIL and winning it back costs
up to a switch interval. Both stop when the capture is cancelled or the uffd is closed
(continuous mode switching to async tracking).

A write fault on a page still pending is served by copying the page (it still holds the
freeze content: nobody unprotected it), claiming it in the ledger and only then unprotecting
it, which wakes the writer; a THP or hugetlb page is saved and unprotected
whole. REMOVE (madvise DONTNEED), UNMAP and REMAP (mremap) events save at once what is still
intact of the range (checked with ``PAGEMAP_SCAN`` after reading) and report the rest lost.

Saved pages go to a queue drained by :meth:`FaultPath.run_store` (trio side) into the
store; a page leaves the queue only once written, so a cancelled flush loses nothing. The
native loop's pages are copied out of its ring as they are taken, up to the queue's limit
less ``PYTHON_HEADROOM`` (a tree member: half the limit, ``URGENT_BYTES``, the rest being
for its shared-object pages): past it they wait in the ring, and once the ring is full the
loop waits for room, so the writers wait for the store (a FLUSH_BYTES write at a time). The
queue has its own store worker (never waiting behind the scan's), stores every small item
of a flush with one ``put_pieces`` call, and runs un-niced once half full; what the Python
thread queues is bounded by ``QUEUE_LIMIT``: past it, its faults wait for the store.
Huge-page saves reuse warm 2 MiB buffers (reading into fresh memory costs ~10x more).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import math
import os
import threading

import numpy as np
import trio

from snapfs.capture import fastfault
from snapfs.capture import kernel as k
from snapfs.capture.context import PAGE, CaptureContext, still_frozen
from snapfs.capture.fastfault import NativeLoop
from snapfs.capture.kernel import ffi, lib
from snapfs.capture.ledger import HUGE_PMD, LOST, Ledger, runs_of
from snapfs.capture.memory import read_pages_robust
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.priority import BACKGROUND_NICE, background_thread_priority, realtime_thread
from snapfs.capture.uffd import decode_messages, unprotect_outcome
from snapfs.errors import TargetError
from snapfs.ranges import positions_in_runs

QUEUE_LIMIT = 64 << 20  # bytes of saved pages waiting for the store before faults wait
# Past this the queue is urgent: its flush runs un-niced, as the target will soon wait for
# it; in a tree member it is also where the drain leaves the loop's pages in its ring (the
# rest is for the Python thread's shared-object pages).
URGENT_BYTES = QUEUE_LIMIT // 2
# What the Python thread alone queues (events, huge pages) in a single-process capture:
# there the loop's pages may fill the queue up to QUEUE_LIMIT less this.
PYTHON_HEADROOM = 8 << 20
FLUSH_BYTES = 1 << 20  # written per worker-thread call: a full queue frees up sooner
HUGE_POOL = 16  # warm 2 MiB buffers kept for THP saves
_RETRY_FIRST, _RETRY_MAX = 50e-6, 5e-3
_BATCH = 256  # uffd messages read at once
# Seconds the native loop's saved pages gather before being taken, and then before being
# written with the next ones: each take and each store call costs a wake-up, a thread hand-off
# and numpy set-up (~0.2 and ~2 ms of CPU). At 2 and 5 ms they were 15-20% of a 1 GiB
# capture's CPU at 10k writes/s (0.75-1.2 of 4.8-6.5 CPU-s); at 10 and 30 ms, 0.35-0.57. The
# target never waits for either: the loop has already served its fault, a full ring (2048
# pages: ~40 ms of faults at the loop's top rate, ~30 us each) writes the drain's eventfd
# at once, and the store does not wait once its queue is urgent (the writers are about to
# wait for it).
DRAIN_DELAY = 10e-3
STORE_BATCH_DELAY = 30e-3
SCATTER_PAGES = 16  # saved items of at most this many pages are stored page by page, batched

class HotCalls:
    """The fault path's C calls, with preallocated buffers; each is one call of the compiled
    module, so one GIL release: wait for and read a batch of messages, serve one simple
    fault (read, claim, unprotect), unprotect a range. One instance per thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._msgs = ffi.new("char[]", k.UFFD_MSG_SIZE * _BATCH)
        self._msgs_view = ffi.buffer(self._msgs)
        self._page = ffi.new("uint8_t[]", PAGE)
        self._page_view = ffi.buffer(self._page)
        self._wp = ffi.new("struct uffdio_writeprotect *")

    def wait_messages(self, fd: int, stop_fd: int, timeout: float | None) -> bytes:
        """Wait until ``fd`` or ``stop_fd`` is readable (or ``timeout`` seconds), then read
        up to _BATCH raw messages from ``fd``; b"" if none."""
        ns = -1 if timeout is None else int(timeout * 1e9)
        got = lib.snapfs_wait_read(fd, stop_fd, ns, self._msgs, len(self._msgs_view))
        return self._messages(got)

    def read_messages(self, fd: int) -> bytes:
        """Up to _BATCH raw messages from the (non-blocking) uffd; b"" if none."""
        return self._messages(lib.snapfs_read(fd, self._msgs, len(self._msgs_view)))

    def _messages(self, got: int) -> bytes:
        if got == -errno.EAGAIN:
            return b""
        return self._msgs_view[: k.check(got, "read from userfaultfd")]

    def serve_page(self, uffd: int, addr: int, slot: int, ledger: Ledger) -> int:
        """Save (if pending; the copy is then :meth:`page`) and unprotect the 4 KiB page at
        ``addr``: flags ``SNAPFS_SAVED`` (this call claimed it), ``SNAPFS_BUSY`` (retry the
        unprotect)."""
        r = lib.snapfs_serve_page(self.pid, uffd, k.UFFDIO_WRITEPROTECT, addr, slot,
                                  ledger.c_state, ledger.lock, self._page)
        if r == -errno.ESRCH:
            raise TargetError(f"process {self.pid} exited")
        return k.check(r, "serving a write fault")

    def page(self) -> bytes:
        """The page the last :meth:`serve_page` saved."""
        return self._page_view[:]

    def unprotect(self, fd: int, lo: int, hi: int) -> str:
        """Unprotect [lo, hi) and wake its waiters: "ok", "busy" (EAGAIN: a mapping change
        is pending, retry) or "gone" (unmapped meanwhile, or the target is gone)."""
        self._wp.range.start, self._wp.range.len, self._wp.mode = lo, hi - lo, 0
        return unprotect_outcome(lib.snapfs_ioctl(fd, k.UFFDIO_WRITEPROTECT, self._wp))


class FaultPath:
    """The fault-serving side of one capture."""

    def __init__(self, ctx: CaptureContext) -> None:
        self.ctx = ctx
        # (store region, first page, data, mask, bytes), or (store region, page numbers
        # (int64 array, any order), their pages ((n, PAGE) array), None, bytes) for the
        # native loop's pages
        self.items: collections.deque = collections.deque()
        self.queued_bytes = 0
        self.item_ready = trio.Event()
        self.room = trio.Event()  # set (and replaced) whenever a flush freed queue room
        # The fault path's own store worker: it never waits behind the scan's for a slot.
        self._store_limiter = trio.CapacityLimiter(1)
        # Guards items/queued_bytes between the fault thread and the trio side; the fault
        # thread waits on it while the queue is over QUEUE_LIMIT.
        self.queue_cond = threading.Condition(threading.Lock())
        self.busy: list[tuple[int, int]] = []  # unprotects refused with EAGAIN, to retry
        self.hot = HotCalls(ctx.pid)
        self.huge_pool: list[bytearray] = []  # warm HUGE_PMD buffers for THP saves
        self._notified = False  # the trio side has been told about queued items
        self._token: trio.lowlevel.TrioToken | None = None
        self._stopping = False
        self._stop_fd = -1
        self._exited = threading.Event()  # the Python fault thread is not running
        self._native_exited = threading.Event()  # nor the native loop
        self._exited.set()
        self._native_exited.set()
        self._in_threads: set[int] = set()  # idents of the fault threads while they run
        self.native: NativeLoop | None = None
        self._region_start = np.asarray(ctx.ledger.region_starts, np.uint64)  # for _import_native
        # How far the native loop's pages may fill the queue (see _drain_native).
        self._drain_bound = URGENT_BYTES if ctx.shared is not None else QUEUE_LIMIT - PYTHON_HEADROOM

    # ---------------------------------------------------------------- the loop
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve faults until cancelled or the uffd is closed: the native loop (if built)
        serves the common case, the Python fault thread the rest (or everything). With
        ``nursery.start`` it returns once the serving threads are starting."""
        uffd = self.ctx.uffd
        if uffd.fd < 0:
            task_status.started()
            return
        self._token = trio.lowlevel.current_trio_token()
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        lib = fastfault.library()
        native = None
        try:
            if lib is not None:
                # A tree member's uffd also brings faults on shared objects' pages, which
                # only the Python thread serves: a loop waiting for room in its ring would
                # hold them back behind the store (a tree's worst stall per process: 80 ms
                # -> 135-539 ms). There, a full ring forwards to the Python thread.
                native = self.native = NativeLoop(lib, self.ctx.pid, uffd.fd, self._stop_fd, self.ctx.ledger,
                                                  wait_when_full=self.ctx.shared is None)
            uffd.before_close.append(self.stop)
            done = trio.Event()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._stop_on_cancel, done)
                    if native is not None:
                        nursery.start_soon(self._run_native, native)
                        nursery.start_soon(self._drain_native, native)
                    try:
                        fd = uffd.fd if native is None else native.forward_r
                        task_status.started()
                        await trio.to_thread.run_sync(self._serve_thread, fd, abandon_on_cancel=False)
                    finally:
                        done.set()
            finally:
                uffd.before_close.remove(self.stop)
        finally:
            if native is not None:
                self._import_native(native)  # pages it saved before stopping
                # Added once the Python fault thread is gone: it counts into ctx.faults too.
                self.ctx.faults += native.new_faults()
                native.close()
            os.close(self._stop_fd)
            self._stop_fd = -1

    def served(self) -> int:
        """Write faults served so far, the native loop's included (the progress line's; the
        native count joins ``ctx.faults`` only once the Python fault thread is gone)."""
        native = self.native
        return self.ctx.faults + (native.unseen_faults() if native is not None else 0)

    async def _stop_on_cancel(self, done: trio.Event) -> None:
        try:
            await done.wait()
        finally:
            self.stop()

    def stop(self) -> None:
        """Make the fault threads return, and wait until they no longer use the uffd (any
        thread; from a fault thread itself it only asks)."""
        with self.queue_cond:
            self._stopping = True
            self.queue_cond.notify_all()
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)
        if threading.get_ident() not in self._in_threads:
            self._exited.wait()
            self._native_exited.wait()

    async def _run_native(self, native: NativeLoop) -> None:
        await trio.to_thread.run_sync(self._native_thread, native, abandon_on_cancel=False)

    def _native_thread(self, native: NativeLoop) -> None:
        """Thread body: the native loop, until stopped."""
        self._native_exited.clear()  # before the check: stop() then waits for us
        self._in_threads.add(threading.get_ident())
        try:
            if self._stopping:
                return
            with realtime_thread():
                err = native.run()
            if err == -errno.ESRCH:
                raise TargetError(f"process {self.ctx.pid} exited")
            if err:
                raise OSError(-err, f"native fault loop: {os.strerror(-err)}")
        finally:
            self._in_threads.discard(threading.get_ident())
            self._native_exited.set()

    async def _drain_native(self, native: NativeLoop) -> None:
        """Hand the pages the native loop saved to the store side as they come."""
        while True:
            native.arm()
            # Bounded memory: past the drain's bound the loop's pages wait in its ring (once
            # it is full, the loop waits for room). Above it is headroom for what only the
            # Python thread serves (events; in a tree, half the limit for the shared objects'
            # pages: taking the loop's pages up to the whole limit left a tree member's
            # shared-page faults waiting for room for 0.5-1.4 s). Only what fits is taken,
            # so that each flush lets the loop go on at once rather than after the queue has
            # drained a whole ring (16 writers at 100k writes/s waited 70-130 ms for an 8 MiB
            # flush).
            while self.queued_bytes >= self._drain_bound:
                await self.room.wait()
            if native.published() == native.consumed:  # armed before this check: no lost wake-up
                await _woken(native.notify_fd)
                # The loop has already served the fault: let more saved pages gather
                # instead of waking this thread once per fault (~30 us each), unless the
                # ring fills meanwhile (the loop then writes notify_fd again).
                await _woken(native.notify_fd, DRAIN_DELAY)
            self._import_native(native, max(1, (self._drain_bound - self.queued_bytes) // PAGE))

    def _import_native(self, native: NativeLoop, limit: int | None = None) -> None:
        """Move (at most ``limit`` of) the pages the loop saved to the store queue, items of
        at most FLUSH_BYTES per region (arrays: this runs in the realtime trio thread, ~0.2
        us per page instead of ~5 us per page one by one), freeing their ring slots at once:
        slots held until the store had written them filled the ring whenever the store fell
        behind."""
        addrs, exts, pages = native.take(limit)
        if not len(addrs):
            return
        ctx, led = self.ctx, self.ctx.ledger
        regions = led.ext_region[exts]
        first = (addrs - self._region_start[regions]) >> np.uint64(k.PAGE_SHIFT)
        step = FLUSH_BYTES // PAGE
        for region in np.unique(regions).tolist():
            sel = np.flatnonzero(regions == region)
            for i in range(0, len(sel), step):
                part = sel[i:i + step]
                self._queue(ctx.region_index[region], first[part].astype(np.int64), pages[part], None)
        ctx.done_bytes += len(addrs) * PAGE
        self.item_ready.set()

    def _serve_thread(self, fd: int) -> None:
        """Thread body: serve the faults read from ``fd`` (the uffd, or the native loop's
        forwarding pipe) until stopped."""
        self._exited.clear()  # before the check: stop() then waits for us
        self._in_threads.add(threading.get_ident())
        scanner = None
        try:
            if self._stopping:
                return
            scanner = PagemapScanner(self.ctx.pid)
            retry = _RETRY_FIRST
            with realtime_thread():
                while not self._stopping:
                    if self.queued_bytes > QUEUE_LIMIT:  # bounded memory: let the store catch up
                        with self.queue_cond:
                            while self.queued_bytes > QUEUE_LIMIT and not self._stopping:
                                self.queue_cond.wait()
                        continue
                    # An unprotect refused (EAGAIN) while the target changes its mappings
                    # works once the event is read and the changing thread has run on;
                    # nothing signals that moment, hence a short backoff while any is pending.
                    raw = self.hot.wait_messages(fd, self._stop_fd, retry if self.busy else None)
                    if self._stopping and not raw:  # messages read are served even so
                        return
                    self.serve_ready(raw, scanner)
                    retry = min(retry * 2, _RETRY_MAX) if self.busy else _RETRY_FIRST
                    if self.items and not self._notified:
                        self._notified = True
                        self._token.run_sync_soon(self._wake_store)
        finally:
            if scanner is not None:
                scanner.close()
            self._in_threads.discard(threading.get_ident())
            self._exited.set()

    def serve_ready(self, raw: bytes, scanner: PagemapScanner) -> None:
        """Serve the messages read (``raw``, maybe none); retry refused unprotects."""
        if len(raw) == k.UFFD_MSG_SIZE and raw[0] == k.UFFD_EVENT_PAGEFAULT:
            # The common case, kept free of numpy: one write fault.
            addr = int.from_bytes(raw[16:24], "little") & ~(PAGE - 1)
            if not self._serve_one(addr):
                self.serve(np.array([addr], dtype=np.uint64))
        elif raw:
            self.handle(decode_messages(raw), scanner)
        busy, self.busy = self.busy, []
        for lo, hi in busy:
            self._unprotect(lo, hi)

    def _wake_store(self) -> None:  # in the trio thread
        self.item_ready.set()

    def handle(self, msgs: np.ndarray, scanner: PagemapScanner) -> None:
        """Handle a batch: events first, then faults.

        The kernel lets the target go on as soon as an event is read: after a REMOVE it
        zaps the range, and the fault queue is read before the event queue, so a fault in
        this batch may name a page zapped meanwhile. Hence events first (they save what is
        intact of their range), and faults of such a batch are served with the same check.
        """
        events = msgs["event"]
        is_fault = events == k.UFFD_EVENT_PAGEFAULT
        for m in msgs[~is_fault]:
            a0, a1, a2 = int(m["a0"]), int(m["a1"]), int(m["a2"])
            ev = int(m["event"])
            if ev == k.UFFD_EVENT_FORK:
                fork_event(self.ctx.on_fork, a0)
                continue
            if self.ctx.shared is not None:
                self.ctx.shared.event(self, ev, a0, a1, a2)
            if ev == k.UFFD_EVENT_REMOVE:
                self.range_changed(scanner, a0, a1, None, "madvise(DONTNEED/REMOVE)")
            elif ev == k.UFFD_EVENT_UNMAP:
                # Sent once the range is unmapped (munmap completes, then waits for this read):
                # nothing is left to save. Trying read it page by page, each failing: ~0.1 s
                # per 16 MiB unmapped, while every fault forwarded here waited.
                self.range_changed(scanner, a0, a1, None, "munmap", intact=False)
                self.ctx.remapped.append((a0, a1))
            elif ev == k.UFFD_EVENT_REMAP:
                self.range_changed(scanner, a0, a0 + a2, a1, "mremap")
                self.ctx.remapped += [(a0, a0 + a2), (a1, a1 + a2)]
        if is_fault.any():
            self.serve(msgs["a1"][is_fault], None if is_fault.all() else scanner)

    # ------------------------------------------------------------------ faults
    def serve(self, addrs: np.ndarray, scanner: PagemapScanner | None = None) -> None:
        """Serve write faults at ``addrs``: save what is pending, then unprotect. With
        ``scanner``, check the pages are still protected after reading them (see handle)."""
        if scanner is None and len(addrs) == 1 and self._serve_one(int(addrs[0]) & ~(PAGE - 1)):
            return
        seen: set[int] = set()
        for addr in np.unique(addrs & np.uint64((2**64 - 1) ^ (PAGE - 1))).tolist():
            lo, hi, ext = self._unit(addr)
            if lo in seen:
                continue
            seen.add(lo)
            if ext >= 0:
                self.save_now(lo, hi, scanner=scanner)
            elif self.ctx.shared is not None:
                self.ctx.shared.save(self, lo, hi)
            self._unprotect(lo, hi)
            self.ctx.faults += 1

    def _serve_one(self, addr: int) -> bool:
        """Fast path for the common fault: one 4 KiB page of a populated, non-huge extent
        (no numpy, preallocated buffers). False: not that case, use the general path."""
        ctx, led = self.ctx, self.ctx.ledger
        ext = led.find(addr)
        if ext < 0 or led.huge[ext]:
            return False
        slot = led.bases[ext] + ((addr - led.starts[ext]) >> k.PAGE_SHIFT)
        flags = self.hot.serve_page(ctx.uffd.fd, addr, slot, led)
        if flags & lib.SNAPFS_SAVED:
            region, first = ctx.page_of(ext, addr)
            self._queue(region, first, self.hot.page(), None)
            ctx.done_bytes += PAGE
        if flags & lib.SNAPFS_BUSY:
            self.busy.append((addr, addr + PAGE))
        ctx.faults += 1
        return True

    def _unit(self, addr: int) -> tuple[int, int, int]:
        """(lo, hi, extent) to save for a fault at ``addr``: a 4 KiB page, a whole THP or a
        whole hugetlb page (unprotecting part of a huge page would split it or fail)."""
        ctx, led = self.ctx, self.ctx.ledger
        ext = led.find(addr)
        size = PAGE
        if ext >= 0 and led.huge[ext]:
            size = max(HUGE_PMD, ctx.regions[led.regions_of[ext]].page_size)
        elif ext < 0:
            r = bisect.bisect_right(led.region_starts, addr) - 1
            if r >= 0 and addr < ctx.regions[r].end:
                size = ctx.regions[r].page_size
        lo = addr // size * size
        return lo, lo + size, ext

    def _unprotect(self, lo: int, hi: int) -> None:
        if self.hot.unprotect(self.ctx.uffd.fd, lo, hi) == "busy":
            self.busy.append((lo, hi))

    def save_now(self, lo: int, hi: int, moved_to: int | None = None,
                 scanner: PagemapScanner | None = None) -> None:
        """Save the pending pages of [lo, hi) right now, reading them at ``moved_to`` (plus
        offset) after an mremap. Without ``scanner`` the pages are known to be protected (a
        fault on them is pending); with it, only pages still present and protected after
        the read are kept."""
        ctx, led = self.ctx, self.ctx.ledger
        for ext, s, e in led.pieces(lo, hi):
            a, b = led.slots(ext, s, e)
            pending = led.state[a:b] == 0
            if not pending.any():
                continue
            src = s if moved_to is None else moved_to + (s - lo)
            if scanner is not None:
                # The kernel zaps (or moves) the range as soon as the event is read, so most of
                # it is usually gone already: read only what is still intact (a GC dropping
                # 16 MiB arenas had every one read whole, into fresh memory, for nothing).
                wp = ctx.regions[led.regions_of[ext]].mode == "wp"
                pending &= still_frozen(scanner, src, src + (e - s), wp)
                if not pending.any():
                    continue
            buf = self.huge_pool.pop() if e - s == HUGE_PMD and self.huge_pool else bytearray(e - s)
            if pending.all():
                ok = read_pages_robust(ctx.pid, buf, [(src, e - s)])
            else:  # only the runs still pending (a calloc'd buffer's other pages stay untouched)
                ok = np.zeros(len(pending), bool)
                view = memoryview(buf)
                for first, count in runs_of(pending):
                    ok[first:first + count] = read_pages_robust(
                        ctx.pid, view[first * PAGE:(first + count) * PAGE], [(src + first * PAGE, count * PAGE)])
            if scanner is not None:
                ok &= still_frozen(scanner, src, src + (e - s), wp)
            mine = led.claim(a, b, ok & pending)
            if mine.any():
                region, first = ctx.page_of(ext, s)
                self._queue(region, first, buf, mine)
                ctx.done_bytes += int(mine.sum()) * PAGE

    def range_changed(self, scanner, lo: int, hi: int, moved_to: int | None, what: str,
                      intact: bool = True) -> None:
        """The target zapped, unmapped or moved [lo, hi): save what is intact (unless told
        nothing is), report the rest."""
        if intact:
            self.save_now(lo, hi, moved_to, scanner)
        led = self.ctx.ledger
        lost = []
        for ext, s, e in led.pieces(lo, hi):
            a, b = led.slots(ext, s, e)
            mine = led.claim(a, b, np.ones(b - a, dtype=bool), state=LOST)
            if mine.any():
                lost.append(np.flatnonzero(mine) + a)
        if lost:
            self.ctx.mark_lost_slots(np.concatenate(lost), f"{what} by the target during the capture")

    # ------------------------------------------------------------ store side
    def queue(self, region: int, first: int, data, mask: np.ndarray | None = None) -> None:
        """Hand saved pages to the store side (written by :meth:`run_store`); from the fault
        threads, for pages saved on their behalf (a shared object's)."""
        self._queue(region, first, data, mask)
        self.ctx.done_bytes += len(data) // PAGE if mask is None else int(mask.sum())

    def _queue(self, region: int, first, data, mask: np.ndarray | None) -> None:
        size = data.nbytes if isinstance(data, np.ndarray) else len(data)
        with self.queue_cond:
            self.items.append((region, first, data, mask, size))
            self.queued_bytes += size

    @property
    def urgent(self) -> bool:
        """The queue is filling faster than the store writes it (see URGENT_BYTES)."""
        return self.queued_bytes >= URGENT_BYTES

    async def run_store(self) -> None:
        """Write queued pages to the store in batches, until cancelled."""
        while True:
            await self.item_ready.wait()
            # A worker-thread round trip per fault would cost more than serving the fault:
            # let faults arriving meanwhile join this batch.
            if not self.urgent:
                await trio.sleep(STORE_BATCH_DELAY)
            self.item_ready = trio.Event()
            self._notified = False  # items queued from now on notify again
            await self.flush()

    async def flush(self) -> None:
        """Write every queued page (items leave the queue only once written), FLUSH_BYTES
        at a time so that a fault thread waiting for room goes on early."""
        while True:
            with self.queue_cond:
                batch, size = [], 0
                for item in self.items:
                    if batch and size + item[4] > FLUSH_BYTES:
                        break
                    batch.append(item)
                    size += item[4]
            if not batch:
                return
            await trio.to_thread.run_sync(self._put, batch, limiter=self._store_limiter)
            with self.queue_cond:
                for _ in batch:
                    self.items.popleft()
                self.queued_bytes -= size
                self.queue_cond.notify_all()
            self.room.set()
            self.room = trio.Event()
            for item in batch:
                data = item[2]
                if len(data) == HUGE_PMD and type(data) is bytearray and len(self.huge_pool) < HUGE_POOL:
                    self.huge_pool.append(data)

    def _put(self, batch: list) -> None:
        writer = self.ctx.writer
        # Pages saved a few at a time (the common case: the native loop's single pages; a
        # forwarded fault's page with its mask) are gathered into one put. One small put
        # costs ~100-300 us of numpy set-up: under many writers the store fell behind the
        # faults, the queue filled and every writer waited for it (220-330 ms stalls).
        regs, pages, rows = [], [], []
        # Whole small items (a tree's shared-object faults: one page each, ~1 000/s per
        # member) only gather in lists here; their arrays are built once below (per-item
        # numpy calls cost ~30 us each, a quarter of a tree capture's GIL time).
        w_reg, w_first, w_count, w_data = [], [], [], []
        # Niced (a woken target preempts the compression) unless the target is about to wait
        # for this very write.
        with background_thread_priority(0 if self.urgent else BACKGROUND_NICE):
            for region, first, data, mask, size in batch:
                if isinstance(first, np.ndarray):  # the native loop's pages
                    p, r = first, data
                else:
                    n = size // PAGE
                    if n > SCATTER_PAGES:
                        writer.put_pages(region, first, data, mask)
                        continue
                    if mask is None:
                        w_reg.append(region)
                        w_first.append(first)
                        w_count.append(n)
                        w_data.append(data)
                        continue
                    sel = np.flatnonzero(mask)
                    p, r = sel + first, np.frombuffer(data, np.uint8).reshape(n, PAGE)[sel]
                regs.append(np.full(len(p), region, np.int64))
                pages.append(p)
                rows.append(r)
            if w_data:
                counts = np.array(w_count, np.int64)
                # Page numbers: each item's first, then +1 per page within the item.
                regs.append(np.repeat(np.array(w_reg, np.int64), counts))
                pages.append(np.repeat(np.array(w_first, np.int64), counts) + positions_in_runs(counts))
                rows.append(np.frombuffer(b"".join(w_data), np.uint8).reshape(-1, PAGE))
            if pages:
                # One put for every region (a target with 65 000 mappings faults in as many
                # regions), pages as one-page pieces in (region, page) order.
                reg, page = np.concatenate(regs), np.concatenate(pages)
                order = np.lexsort((page, reg))
                writer.put_pieces(reg[order], page[order], np.ones(len(order), np.int64),
                                  np.concatenate(rows)[order])


async def _woken(fd: int, timeout: float = math.inf) -> None:
    """Wait (at most ``timeout`` seconds) until eventfd ``fd`` is written, then clear it."""
    with trio.move_on_after(timeout):
        await trio.lowlevel.wait_readable(fd)
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)


def fork_event(on_fork, ufd: int) -> None:
    """A UFFD_EVENT_FORK message: the kernel installed the child's uffd in snapfs as fd
    ``ufd`` (low 32 bits of the message's first argument). Hand it to ``on_fork``, or close it
    (which drops every protection the child inherited)."""
    fd = ufd & 0xFFFFFFFF
    if on_fork is None:
        os.close(fd)
    else:
        on_fork(fd)
