"""The background scan: copies every page populated at the freeze, in a worker thread.

For each chunk (2 MiB-aligned so huge pages are not split): skip it if the fault path has
claimed all of it; read it with ``process_vm_readv`` (GIL released); check with
``PAGEMAP_SCAN`` that the pages read were still write-protected (so still the freeze
content); claim, under the ledger lock, those nobody claimed yet; only then unprotect the
chunk; hand the buffer to the store workers. ``rate`` throttles only this.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import trio

from snapfs.capture.context import PAGE, CaptureContext, still_frozen
from snapfs.capture.memory import read_pages_robust
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.priority import background_thread_priority

CHUNK = 4 << 20  # a multiple of the 2 MiB THP size


class Scan:
    """One scan over the ledger; :meth:`run` is the body of its worker thread."""

    def __init__(self, ctx: CaptureContext, rate: float | None, unprotect: bool = True) -> None:
        self.ctx = ctx
        self.rate = rate
        self.unprotect = unprotect  # False: chunks stay protected (continuous mode)
        self.stop = threading.Event()  # set on cancellation: ends a throttling sleep at once

    def run(self, work_send, free_recv) -> None:
        """Thread body. Takes CHUNK-sized buffers from ``free_recv`` and sends
        ``(buffer, pieces, pooled)`` to ``work_send``, where pieces are ``(store region,
        first page, offset, claimed mask)`` and ``pooled`` says the buffer goes back.
        Returns when done or when :attr:`stop` is set; raises trio.Cancelled if cancelled
        while waiting on a channel, TargetError if the target is gone."""
        # Niced: a target woken from a fault (and the fault threads) preempt the scan at once.
        with background_thread_priority():
            self._run(work_send, free_recv)

    def _run(self, work_send, free_recv) -> None:
        ctx, led = self.ctx, self.ctx.ledger
        scanner = PagemapScanner(ctx.pid)
        started = time.monotonic()
        scanned = 0
        try:
            for lo, hi, wp in self.chunks():
                if self.stop.is_set():
                    return
                live = []
                for ext, s, e in led.pieces(lo, hi):
                    a, b = led.slots(ext, s, e)
                    if (led.state[a:b] == 0).any():  # else the fault path took it all
                        live.append((ext, s, e, a, b))
                if not live:
                    continue
                if self.rate:
                    ahead = scanned / self.rate - (time.monotonic() - started)
                    if ahead > 0 and self.stop.wait(ahead):
                        return
                size = sum(e - s for _, s, e, _, _ in live)
                pooled = size <= CHUNK  # else a 1 GiB hugetlb page: a buffer of its own
                buf = trio.from_thread.run(free_recv.receive) if pooled else bytearray(size)
                ok = read_pages_robust(ctx.pid, buf, [(s, e - s) for _, s, e, _, _ in live])
                valid = still_frozen(scanner, lo, hi, wp)
                pieces = []
                pos = 0
                claimed = 0
                for ext, s, e, a, b in live:
                    n = b - a
                    rel = (s - lo) // PAGE
                    mine = led.claim(a, b, ok[pos : pos + n] & valid[rel : rel + n])
                    region, first = ctx.page_of(ext, s)
                    pieces.append((region, first, pos * PAGE, mine))
                    claimed += int(mine.sum())
                    pos += n
                if wp and self.unprotect:
                    # Marked saved above, so unprotecting is safe. "busy" (an mmap change
                    # pending): they stay protected; a write to them reaches the fault
                    # path, which finds them saved and just unprotects.
                    ctx.uffd.unprotect_quiet(lo, hi - lo)
                scanned += size
                ctx.done_bytes += claimed * PAGE
                trio.from_thread.run(work_send.send, (buf, pieces, pooled))
        finally:
            scanner.close()

    def chunks(self) -> Iterator[tuple[int, int, bool]]:
        """(lo, hi, write_protected) chunks: within one region, aligned to CHUNK (or to the
        region's huge page size), covering every extent of the ledger."""
        led = self.ctx.ledger
        regions = self.ctx.regions
        i = 0
        n = len(led.starts)
        while i < n:
            region = led.regions_of[i]
            v = regions[region]
            step = max(CHUNK, v.page_size)
            lo = led.starts[i] // step * step
            while i < n and led.regions_of[i] == region:
                lo = max(lo, led.starts[i] // step * step)
                hi = lo + step
                yield max(lo, v.start), min(hi, v.end), v.mode == "wp"
                lo = hi
                while i < n and led.regions_of[i] == region and led.ends[i] <= lo:
                    i += 1
