"""The fault path: serves the target's write faults first, in the trio thread.

It waits on the uffd with ``wait_readable``, reads messages in batches and handles them in
order. A write fault on a page still pending is served by copying the page (it still holds
the freeze content: nobody unprotected it), claiming it in the ledger and only then
unprotecting it, which wakes the writer; a THP or hugetlb page is saved and unprotected
whole. REMOVE (madvise DONTNEED), UNMAP and REMAP (mremap) events save at once what is still
intact of the range (checked with ``PAGEMAP_SCAN`` after reading) and report the rest lost.

Saved pages go to a queue drained by :meth:`FaultPath.run_store` into the store; a page
leaves the queue only once written, so a cancelled flush loses nothing.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import errno
import os

import numpy as np
import trio

from snapfs.capture import kernel as k
from snapfs.capture.context import PAGE, CaptureContext, still_frozen
from snapfs.capture.ledger import HUGE_PMD, LOST
from snapfs.capture.memory import read_pages_robust
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.uffd import decode_messages
from snapfs.errors import TargetError

QUEUE_LIMIT = 64 << 20  # bytes of saved pages waiting for the store before faults wait
_RETRY_FIRST, _RETRY_MAX = 50e-6, 5e-3
_BATCH = 256  # uffd messages read at once
STORE_BATCH_DELAY = 5e-3  # seconds saved pages wait to be written with the next ones

# PyDLL: calls through it keep the GIL. The fault path's syscalls take a few us; releasing
# the GIL around each (as cffi, ctypes.CDLL, os.read and fcntl.ioctl do) means winning it
# back from the scan and store threads each time, up to a switch interval per call.
_libc = ctypes.PyDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _WriteProtect(ctypes.Structure):  # struct uffdio_writeprotect
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [
    ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
    ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong,
]  # fmt: skip
_libc.read.restype = ctypes.c_ssize_t
_libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.ioctl.restype = ctypes.c_int  # variadic: arguments passed as given (c_ulong, pointer)


class HotCalls:
    """The fault path's per-fault syscalls with the GIL held and preallocated arguments:
    read the uffd, read one page of the target, unprotect a range."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._page = ctypes.create_string_buffer(PAGE)
        self._local = _Iovec(ctypes.cast(self._page, ctypes.c_void_p), PAGE)
        self._remote = _Iovec(0, PAGE)
        self._msgs = ctypes.create_string_buffer(k.UFFD_MSG_SIZE * _BATCH)
        self._wp = _WriteProtect(0, 0, 0)
        self._wp_ref = ctypes.byref(self._wp)
        self._wp_req = ctypes.c_ulong(k.UFFDIO_WRITEPROTECT)

    def read_messages(self, fd: int) -> bytes:
        """Up to _BATCH raw messages from the (non-blocking) uffd; b"" if none."""
        got = _libc.read(fd, self._msgs, len(self._msgs))
        if got < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return b""
            raise OSError(err, f"read from userfaultfd: {os.strerror(err)}")
        return self._msgs.raw[:got]

    def read_page(self, addr: int) -> bytes | None:
        """The page at ``addr``, or None if it is not mapped any more."""
        self._remote.base = addr
        got = _libc.process_vm_readv(self.pid, self._local, 1, self._remote, 1, 0)
        if got != PAGE:
            if got < 0 and ctypes.get_errno() == errno.ESRCH:
                raise TargetError(f"process {self.pid} exited")
            return None
        return self._page.raw

    def unprotect(self, fd: int, lo: int, hi: int) -> str:
        """Unprotect [lo, hi) and wake its waiters: "ok", "busy" (EAGAIN: a mapping change
        is pending, retry) or "gone" (unmapped meanwhile, or the target is gone)."""
        self._wp.start, self._wp.len, self._wp.mode = lo, hi - lo, 0
        if _libc.ioctl(fd, self._wp_req, self._wp_ref) == 0:
            return "ok"
        err = ctypes.get_errno()
        if err == errno.EAGAIN:
            return "busy"
        if err in (errno.ENOENT, errno.EINVAL, errno.ENOMEM, errno.ESRCH, errno.EFAULT):
            return "gone"
        raise OSError(err, f"UFFDIO_WRITEPROTECT: {os.strerror(err)}")


class FaultPath:
    """The fault-serving side of one capture."""

    def __init__(self, ctx: CaptureContext) -> None:
        self.ctx = ctx
        self.items: collections.deque = collections.deque()  # (region, first, data, mask)
        self.queued_bytes = 0
        self.item_ready = trio.Event()
        self.drained = trio.Event()
        self.busy: list[tuple[int, int]] = []  # unprotects refused with EAGAIN, to retry
        self.hot = HotCalls(ctx.pid)

    # ---------------------------------------------------------------- the loop
    async def run(self) -> None:
        """Serve faults until cancelled."""
        uffd = self.ctx.uffd
        scanner = PagemapScanner(self.ctx.pid)
        retry = _RETRY_FIRST
        try:
            while uffd.fd >= 0:  # closed: continuous mode switched to async tracking
                if self.queued_bytes > QUEUE_LIMIT:  # bounded memory: let the store catch up
                    self.drained = trio.Event()
                    await self.drained.wait()
                # An unprotect refused (EAGAIN) while the target changes its mappings works
                # once the event is read and the changing thread has run on; nothing signals
                # that moment, hence a short backoff while any is pending.
                try:
                    if self.busy:
                        with trio.move_on_after(retry):
                            await trio.lowlevel.wait_readable(uffd.fd)
                    else:  # no cancel scope per fault: it costs the trio thread more than
                        await trio.lowlevel.wait_readable(uffd.fd)  # the fault's syscalls
                except trio.ClosedResourceError:
                    return  # continuous mode switched to async tracking
                if uffd.fd < 0:
                    return
                raw = self.hot.read_messages(uffd.fd)
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
                retry = min(retry * 2, _RETRY_MAX) if self.busy else _RETRY_FIRST
        finally:
            scanner.close()

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
            if ev == k.UFFD_EVENT_REMOVE:
                self.range_changed(scanner, a0, a1, None, "madvise(DONTNEED/REMOVE)")
            elif ev == k.UFFD_EVENT_UNMAP:
                self.range_changed(scanner, a0, a1, None, "munmap")
            elif ev == k.UFFD_EVENT_REMAP:
                self.range_changed(scanner, a0, a0 + a2, a1, "mremap")
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
        if led.state[slot] == 0:
            data = self.hot.read_page(addr)
            if data is not None and led.claim_one(slot):
                region, first = ctx.page_of(ext, addr)
                self._queue(region, first, data, None)
                ctx.done_bytes += PAGE
        self._unprotect(addr, addr + PAGE)
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
            buf = bytearray(e - s)
            ok = read_pages_robust(ctx.pid, buf, [(src, e - s)])
            if scanner is not None:
                wp = ctx.regions[led.regions_of[ext]].mode == "wp"
                ok &= still_frozen(scanner, src, src + (e - s), wp)
            mine = led.claim(a, b, ok & pending)
            if mine.any():
                region, first = ctx.page_of(ext, s)
                self._queue(region, first, buf, mine)
                ctx.done_bytes += int(mine.sum()) * PAGE

    def range_changed(self, scanner, lo: int, hi: int, moved_to: int | None, what: str) -> None:
        """The target zapped, unmapped or moved [lo, hi): save what is intact, report the rest."""
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
    def _queue(self, region: int, first: int, data, mask: np.ndarray | None) -> None:
        self.items.append((region, first, data, mask))
        self.queued_bytes += len(data)
        self.item_ready.set()

    async def run_store(self, limiter: trio.CapacityLimiter) -> None:
        """Write queued pages to the store in batches, until cancelled."""
        while True:
            await self.item_ready.wait()
            # A worker-thread round trip per fault would cost the trio thread more than
            # serving the fault: let faults arriving meanwhile join this batch.
            await trio.sleep(STORE_BATCH_DELAY)
            self.item_ready = trio.Event()
            await self.flush(limiter)

    async def flush(self, limiter: trio.CapacityLimiter) -> None:
        """Write every queued page (items leave the queue only once written)."""
        while self.items:
            batch = list(self.items)
            await trio.to_thread.run_sync(self._put, batch, limiter=limiter)
            for _ in batch:
                self.items.popleft()
            self.queued_bytes -= sum(len(b[2]) for b in batch)
            self.drained.set()

    def _put(self, batch: list) -> None:
        for region, first, data, mask in batch:
            self.ctx.writer.put_pages(region, first, data, mask)
