"""The background scan: copies every page populated at the freeze, in a worker thread.

For each batch (populated pieces filling one 8 MiB buffer, cut on 2 MiB boundaries so huge
pages are not split; many small mappings share a batch): skip it if the fault path has
claimed all of it; read it with ``process_vm_readv`` (GIL released); check with
``PAGEMAP_SCAN`` that the pages read were still write-protected (so still the freeze
content); claim, under the ledger lock, those nobody claimed yet; only then unprotect them;
hand the buffer to the store workers. ``rate`` throttles only this, and only until
``rate_deadline`` seconds have passed: then the rest is copied at full speed (``late`` is
set), so a low rate never keeps the target write-protected for hours.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import trio

from snapfs.capture.context import PAGE, CaptureContext, still_frozen
from snapfs.capture.memory import read_pages_robust
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.priority import background_thread_priority

# A multiple of the 2 MiB THP size. Each batch costs two hand-offs with the trio thread, a
# PAGEMAP_SCAN, a claim, an unprotect and a store call: at 4 MiB a 1 GiB capture at 10k
# writes/s took 2.4-2.6 s and 3.7-4.1 CPU-s, at 8 MiB 1.7-2.2 s and 3.0-3.5 CPU-s (7
# interleaved pairs), with no change to the target's stalls; 16 MiB gained nothing more.
CHUNK = 8 << 20


class Scan:
    """One scan over the ledger; :meth:`run` is the body of its worker thread."""

    def __init__(self, ctx: CaptureContext, rate: float | None, unprotect: bool = True,
                 hot: np.ndarray | None = None, rate_deadline: float | None = None) -> None:
        self.ctx = ctx
        self.rate = rate
        self.rate_deadline = rate_deadline
        self.late = False  # the deadline passed: the rest went at full speed
        self.unprotect = unprotect  # False: chunks stay protected (continuous mode)
        # Pages written during pre-protection (sorted): their batches are copied first.
        self.hot = hot if hot is not None else np.empty(0, np.uint64)
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

    # The source of the pages: the target's memory. A tree capture's shared objects
    # override these (snapfs.capture.shared.ObjectScan).
    def _open_scanner(self) -> PagemapScanner | None:
        return PagemapScanner(self.ctx.pid)

    def _read(self, buf, spans: np.ndarray) -> np.ndarray:
        """Read ``spans`` ((n, 2): address, length) back to back into ``buf``; True per page read."""
        return read_pages_robust(self.ctx.pid, buf, spans)

    def _still_frozen(self, scanner: PagemapScanner, lo: np.ndarray, hi: np.ndarray, wp: np.ndarray) -> np.ndarray:
        """Per page of the batch's span [lo[0], hi[-1]): still its content at the freeze (see
        still_frozen). One PAGEMAP_SCAN for the whole batch (the gaps between its pieces are
        never read), VMA by VMA only where protected and unprotected regions mix."""
        span_lo, span_hi = int(lo[0]), int(hi[-1])
        if wp.all() or not wp.any():
            return still_frozen(scanner, span_lo, span_hi, bool(wp[0]))
        valid = np.zeros((span_hi - span_lo) // PAGE, bool)
        for x, y, w in zip(lo.tolist(), hi.tolist(), wp.tolist()):
            valid[(x - span_lo) // PAGE:(y - span_lo) // PAGE] = still_frozen(scanner, x, y, w)
        return valid

    def _release(self, lo: int, hi: int) -> None:
        """Unprotect [lo, hi) (claimed: saved), quietly if a mapping change is pending."""
        self.ctx.uffd.unprotect_quiet(lo, hi - lo)

    def _run(self, work_send, free_recv) -> None:
        ctx, led = self.ctx, self.ctx.ledger
        scanner = self._open_scanner()
        started = time.monotonic()
        scanned = 0
        plan = _Plan(ctx)
        wp_region = np.array([v.mode == "wp" for v in ctx.regions], bool)
        try:
            for first, last in plan.hot_first(plan.batches(), self.hot):
                if self.stop.is_set():
                    return
                a, b = int(plan.slot[first]), int(plan.slot[last - 1] + plan.npages[last - 1])
                if not (led.state[a:b] == 0).any():  # the fault path took it all
                    continue
                if self.rate and not self.late:
                    elapsed = time.monotonic() - started
                    ahead = scanned / self.rate - elapsed
                    if self.rate_deadline is not None:
                        if elapsed >= self.rate_deadline:
                            self.late = True
                            ahead = 0
                        ahead = min(ahead, self.rate_deadline - elapsed)
                    if ahead > 0 and self.stop.wait(ahead):
                        return
                lo, hi = plan.lo[first:last], plan.hi[first:last]
                size = (b - a) * PAGE
                pooled = size <= CHUNK  # else a 1 GiB hugetlb page: a buffer of its own
                buf = trio.from_thread.run(free_recv.receive) if pooled else bytearray(size)
                ok = self._read(buf, np.stack([lo, hi - lo], axis=1).astype(np.int64))
                wp = wp_region[plan.region[first:last]]
                valid = self._still_frozen(scanner, lo, hi, wp)
                rel = _page_offsets(lo - lo[0], plan.npages[first:last])
                mine = led.claim(a, b, ok & valid[rel])
                pieces = []
                pos = 0
                for ext, x, n in zip(plan.ext[first:last].tolist(), lo.tolist(),
                                     plan.npages[first:last].tolist()):
                    region, page = ctx.page_of(ext, x)
                    pieces.append((region, page, pos * PAGE, mine[pos:pos + n]))
                    pos += n
                if self.unprotect:
                    # Marked saved above, so unprotecting is safe. "busy" (an mmap change
                    # pending): they stay protected; a write to them reaches the fault
                    # path, which finds them saved and just unprotects. One call per run of
                    # adjacent pieces (a call across another VMA would fail).
                    for x, y in _adjacent(lo[wp], hi[wp]):
                        self._release(x, y)
                scanned += size
                ctx.done_bytes += int(mine.sum()) * PAGE
                trio.from_thread.run(work_send.send, (buf, pieces, pooled))
        finally:
            if scanner is not None:
                scanner.close()


class _Plan:
    """The ledger's extents cut into pieces that never cross a CHUNK boundary (or a huge
    page's), as arrays, grouped into batches of consecutive pieces that fill one CHUNK
    buffer. A batch's pieces have consecutive ledger slots (extents are laid out in address
    order), so its claim is one slice and its buffer maps page for page onto the slots.
    A target with tens of thousands of small mappings has as many extents: one buffer, one
    scan, one claim and one hand-off to the store per extent cost more than copying them."""

    def __init__(self, ctx: CaptureContext) -> None:
        led = ctx.ledger
        step = np.array([max(CHUNK, v.page_size) for v in ctx.regions], np.uint64)
        st, en, reg = led.ext_start, led.ext_end, led.ext_region
        if len(st):
            ext_step = step[reg]
            # Cut points: every step boundary strictly inside an extent.
            first_cut = (st // ext_step + np.uint64(1)) * ext_step
            ncuts = np.where(en > first_cut, (en - first_cut + ext_step - np.uint64(1)) // ext_step, 0).astype(np.int64)
            owner = np.repeat(np.arange(len(st)), ncuts + 1)
            k_in = np.arange(len(owner)) - np.repeat(np.cumsum(ncuts + 1) - (ncuts + 1), ncuts + 1)
            k_in = k_in.astype(np.uint64)
            lo = np.where(k_in == 0, st[owner], first_cut[owner] + (k_in - np.uint64(1)) * ext_step[owner])
            hi = np.minimum(first_cut[owner] + k_in * ext_step[owner], en[owner])
        else:
            owner = np.empty(0, np.int64)
            lo = hi = np.empty(0, np.uint64)
        self.lo, self.hi, self.ext = lo, hi, owner
        self.region = reg[owner] if len(owner) else np.empty(0, np.int32)
        self.npages = ((hi - lo) // np.uint64(PAGE)).astype(np.int64)
        self.slot = led.ext_base[owner] + ((lo - st[owner]) // np.uint64(PAGE)).astype(np.int64) \
            if len(owner) else np.empty(0, np.int64)

    def batches(self) -> Iterator[tuple[int, int]]:
        """[first, last) piece indices of each batch: at most CHUNK bytes (a bigger piece,
        a hugetlb page, alone), no gap of more than CHUNK between pieces."""
        n = len(self.lo)
        size = self.npages * PAGE
        i = 0
        while i < n:
            j = i + 1
            total = int(size[i])
            while j < n and total + int(size[j]) <= CHUNK and int(self.lo[j] - self.hi[j - 1]) <= CHUNK:
                total += int(size[j])
                j += 1
            yield i, j
            i = j


    def hot_first(self, batches, hot: np.ndarray) -> list[tuple[int, int]]:
        """``batches`` with those holding a ``hot`` page first (each group in address order):
        a page the target wrote while memory was being protected is likely written again
        soon, and once copied its next write does not fault."""
        batches = list(batches)
        if not len(hot) or not batches:
            return batches
        hits = np.searchsorted(hot, self.hi) - np.searchsorted(hot, self.lo)  # hot pages per piece
        per = np.r_[0, np.cumsum(hits)]
        first = np.array([b[0] for b in batches])
        last = np.array([b[1] for b in batches])
        is_hot = (per[last] - per[first]) > 0
        return [b for b, h in zip(batches, is_hot.tolist()) if h] + \
               [b for b, h in zip(batches, is_hot.tolist()) if not h]


def _page_offsets(rel_start: np.ndarray, npages: np.ndarray) -> np.ndarray:
    """Page indices (from the span's start) of every page of pieces starting ``rel_start``
    bytes into the span, ``npages`` long, in order."""
    total = int(npages.sum())
    base = np.repeat((rel_start // np.uint64(PAGE)).astype(np.int64), npages)
    return base + (np.arange(total) - np.repeat(np.cumsum(npages) - npages, npages))


def _adjacent(lo: np.ndarray, hi: np.ndarray) -> list[tuple[int, int]]:
    """Sorted disjoint ranges with touching ones merged."""
    if not len(lo):
        return []
    head = np.flatnonzero(np.r_[True, lo[1:] != hi[:-1]])
    last = np.r_[head[1:] - 1, len(lo) - 1]
    return list(zip(lo[head].tolist(), hi[last].tolist()))
