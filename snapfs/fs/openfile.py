"""Per-open-file read state: sequential detection and read-ahead windows.

FUSE hands reads over in requests of at most 128 KiB (1 MiB once the mount raised its
read-ahead). Decoding each request on its own means one worker thread hop and one pass through
the store per request, and re-decoding frames that straddle requests. An :class:`OpenFile`
that sees sequential reads fetches a larger window instead and serves the following requests
from memory; the adapter prefetches the next windows in worker threads while the current one
is consumed, so decompression overlaps with the kernel's copying. Random reads are served
exactly, with nothing kept. All windows of a mount count against one :class:`WindowBudget`.

Not thread-safe by design: the adapter mutates it only from the trio thread; only
:meth:`OpenFile.fetch` (pure, no state) runs in worker threads.
"""

from __future__ import annotations

from typing import Any, Callable

from snapfs.fs.views import is_immutable

WINDOW_MIN = 1 << 20
WINDOW_MAX = 4 << 20
WINDOW_BUDGET = 128 << 20  # all windows of all open files together (memory stays bounded)
MAX_INFLIGHT = 2  # windows decoded in parallel: decompression releases the GIL
KEEP_SEGMENTS = 2 + MAX_INFLIGHT  # the current window, the one after it, and those arriving


class WindowBudget:
    """Bytes of windows held by all open files, against a limit (trio thread only)."""

    def __init__(self, limit: int = WINDOW_BUDGET) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes if they fit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        """Return ``n`` reserved bytes."""
        self.used -= n


class OpenFile:
    """One ``open()`` of a file view; windows count against ``budget`` (one per mount)."""

    def __init__(self, inode: int, view: Any, budget: WindowBudget | None = None) -> None:
        self.inode = inode
        self.view = view
        self.budget = budget or WindowBudget()
        self.immutable = is_immutable(view)
        self._segments: list[tuple[int, memoryview]] = []  # (offset, data), ascending
        self._expected = 0  # where a sequential reader reads next
        self._streak = 0  # consecutive sequential requests
        self._window = WINDOW_MIN
        self.inflight: list[tuple[int, int]] = []  # prefetches running: (offset, length)
        self.closed = False

    @property
    def size(self) -> int:
        """The file size (fixed for immutable views)."""
        return int(self.view.size)

    def cached(self, offset: int, size: int) -> bytes | memoryview | None:
        """The requested bytes if held in a window (noting the access), else None.

        A memoryview into the window where possible: pyfuse3 copies it into its reply anyway.
        """
        size = min(size, self.size - offset)
        if size <= 0:
            return b""
        for seg_off, data in self._segments:
            if seg_off <= offset and offset + size <= seg_off + len(data):
                self._note(offset, size)
                return data[offset - seg_off : offset - seg_off + size]
        # A request straddling two adjacent windows.
        for (a_off, a), (b_off, b) in zip(self._segments, self._segments[1:]):
            if a_off <= offset < a_off + len(a) == b_off and offset + size <= b_off + len(b):
                self._note(offset, size)
                return bytes(a[offset - a_off :]) + b[: offset + size - b_off]
        return None

    def plan(self, offset: int, size: int) -> tuple[int, int]:
        """The range to fetch for a request not cached: a whole window when reading sequentially."""
        fits = self.budget.used + self._window <= self.budget.limit
        if offset == self._expected and self._streak >= 1 and fits:
            return offset, max(size, self._window)
        return offset, size

    def fetch(self, offset: int, size: int) -> bytes:
        """Read from the view (runs in a worker thread; touches no state)."""
        return self.view.read(offset, size)

    def install(self, offset: int, data: bytes, *, keep: bool) -> None:
        """Remember a fetched range (``keep``: it is a window worth keeping, budget allowing)."""
        if not keep or not data or self.closed:
            return
        self._drop(lambda s: s[0] == offset)
        if not self.budget.take(len(data)):
            return  # served, not kept: reads fall back to exact fetches
        self._segments.append((offset, memoryview(data)))
        self._segments.sort(key=lambda s: s[0])
        # Drop windows the reader has passed, then the oldest beyond the bound.
        self._drop(lambda s: s[0] + len(s[1]) <= self._expected - (1 << 20))
        while len(self._segments) > KEEP_SEGMENTS:
            self.budget.give(len(self._segments.pop(0)[1]))

    def _drop(self, which: Callable[[tuple[int, memoryview]], bool]) -> None:
        for seg in [s for s in self._segments if which(s)]:
            self._segments.remove(seg)
            self.budget.give(len(seg[1]))

    def close(self) -> None:
        """Release every window (the file was closed; late prefetches are not kept)."""
        self.closed = True
        self._drop(lambda s: True)

    def take(self, offset: int, size: int, data: bytes) -> bytes | memoryview:
        """The requested part of freshly fetched ``data`` (fetched from ``offset``), noting it."""
        self._note(offset, min(size, len(data)))
        return memoryview(data)[:size] if len(data) > size else data

    def next_prefetch(self) -> tuple[int, int] | None:
        """The window to prefetch now, if reading sequentially and the data ahead runs short.

        The caller adds it to :attr:`inflight` while it runs and removes it when done.
        """
        if self._streak < 2 or len(self.inflight) >= MAX_INFLIGHT or not self._segments:
            return None
        end = max(off + len(d) for off, d in self._segments)
        end = max([end] + [off + n for off, n in self.inflight])
        if end >= self.size or end - self._expected > self._window * MAX_INFLIGHT:
            return None
        return end, min(self._window, self.size - end)

    def inflight_covering(self, offset: int) -> tuple[int, int] | None:
        """The running prefetch that will hold ``offset``, if any."""
        for off, n in self.inflight:
            if off <= offset < off + n:
                return off, n
        return None

    def _note(self, offset: int, size: int) -> None:
        if offset == self._expected:
            self._streak += 1
            if self._streak > 4:
                self._window = min(self._window * 2, WINDOW_MAX)
        else:
            self._streak = 0
            self._window = WINDOW_MIN
        self._expected = offset + size
