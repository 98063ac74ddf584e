"""Per-open-file read state: sequential detection and read-ahead windows.

The kernel sends a sequential reader's requests (up to 1 MiB each) ahead of it, several at a
time, and they complete in any order. Decoding each request on its own means one worker thread
hop and one pass through the store per request, and re-decoding frames that straddle requests.
An :class:`OpenFile` that sees sequential *arrivals* fetches a larger window instead; the
adapter runs each window as one job in a worker thread, serves every request that falls in it
from that job's result, and starts the next windows while the current one is consumed, so
decoding overlaps with replying. Random reads are served exactly, with nothing kept. All
windows of a mount count against one :class:`WindowBudget`.

Sequential detection is done when a request arrives (:meth:`OpenFile.note`), in the order the
kernel sent the requests, not when they complete: completions of concurrent requests are
reordered.

Not thread-safe by design: the adapter mutates it only from the trio thread; only
:meth:`OpenFile.fetch` (pure, no state) runs in worker threads.
"""

from __future__ import annotations

from typing import Any, Callable

from snapfs.fs.views import is_immutable, is_streamed

WINDOW_MIN = 1 << 20
WINDOW_MAX = 4 << 20
WINDOW_BUDGET = 128 << 20  # all windows of all open files together (memory stays bounded)
MAX_INFLIGHT = 3  # windows decoded at once: decompression releases the GIL, and a third keeps
# both CPUs busy while a window waits for the GIL or the disk
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

    def take_anyway(self, n: int) -> None:
        """Reserve ``n`` bytes already checked to fit (:meth:`fits`)."""
        self.used += n

    def fits(self, n: int) -> bool:
        """Whether ``n`` more bytes fit."""
        return self.used + n <= self.limit

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
        self.streamed = is_streamed(view)
        self._segments: list[tuple[int, memoryview]] = []  # (offset, data), ascending
        self._expected = 0  # where a sequential reader's next request starts
        self._streak = 0  # consecutive sequential requests
        self._window = WINDOW_MIN
        self.inflight: list[tuple[int, int]] = []  # windows being fetched: (offset, length)
        self.closed = False

    @property
    def size(self) -> int:
        """The file size (fixed for immutable views)."""
        return int(self.view.size)

    @property
    def sequential(self) -> bool:
        """Whether the requests so far look like a sequential reader."""
        return self._streak >= 1

    def note(self, offset: int, size: int) -> None:
        """Record a request as it arrives (once per request, in arrival order)."""
        if offset == self._expected:
            self._streak += 1
            if self._streak > 4:
                self._window = min(self._window * 2, WINDOW_MAX)
        else:
            self._streak = 0
            self._window = WINDOW_MIN
        self._expected = offset + size

    def cached(self, offset: int, size: int) -> bytes | memoryview | None:
        """The requested bytes if held in a window, else None.

        A memoryview into the window where possible: pyfuse3 copies it into its reply anyway.
        """
        size = min(size, self.size - offset)
        if size <= 0:
            return b""
        for seg_off, data in self._segments:
            if seg_off <= offset and offset + size <= seg_off + len(data):
                return data[offset - seg_off : offset - seg_off + size]
        # A request straddling two adjacent windows.
        for (a_off, a), (b_off, b) in zip(self._segments, self._segments[1:]):
            if a_off <= offset < a_off + len(a) == b_off and offset + size <= b_off + len(b):
                return bytes(a[offset - a_off :]) + b[: offset + size - b_off]
        return None

    def plan(self, offset: int, size: int) -> tuple[int, int]:
        """The range to fetch for a request not cached: a whole window when reading sequentially."""
        if self.sequential and offset + size >= self._expected and self.budget.fits(self._window):
            return offset, max(size, min(self._window, self.size - offset))
        return offset, size

    def fetch(self, offset: int, size: int) -> bytes | memoryview:
        """Read from the view (runs in a worker thread; touches no state).

        Uses the view's ``read_buffer`` where it has one: a view of freshly generated bytes,
        handed to FUSE without another copy.
        """
        read = getattr(self.view, "read_buffer", None) or self.view.read
        return read(offset, size)

    def install(self, offset: int, data: bytes | memoryview, *, keep: bool) -> None:
        """Remember a fetched range (``keep``: it is a window worth keeping, budget allowing)."""
        if not keep or not data or self.closed:
            return
        self._drop(lambda s: s[0] == offset)
        if not self.budget.take(len(data)):
            return  # served, not kept: reads fall back to exact fetches
        self._segments.append((offset, memoryview(data)))
        self._segments.sort(key=lambda s: s[0])
        # Drop windows the reader has passed (requests up to ~4 MiB behind the newest one may
        # still be waiting for their reply), then the oldest beyond the bound.
        self._drop(lambda s: s[0] + len(s[1]) <= self._expected - WINDOW_MAX - (1 << 20))
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

    @staticmethod
    def part(data: bytes | memoryview, start: int, offset: int, size: int) -> bytes | memoryview | None:
        """Bytes ``[offset, offset+size)`` out of ``data`` fetched from ``start`` (no copy), or
        None unless ``data`` holds all of them (``size`` clipped to the file's end by the caller)."""
        rel = offset - start
        if rel < 0 or rel + size > len(data):
            return None
        if rel == 0 and len(data) == size:
            return data
        return memoryview(data)[rel : rel + size]

    def next_prefetch(self) -> tuple[int, int] | None:
        """The window to prefetch now, if reading sequentially and the data ahead runs short.

        The caller brackets its fetch with :meth:`begin_window` and :meth:`end_window`.
        """
        if self._streak < 2 or len(self.inflight) >= MAX_INFLIGHT or self.closed:
            return None
        ends = [off + len(d) for off, d in self._segments] + [off + n for off, n in self.inflight]
        end = max(ends, default=0)
        if end < self._expected:
            return None  # nothing fetched near the reader: its own requests start windows
        if end >= self.size or end - self._expected > self._window * MAX_INFLIGHT:
            return None
        if not self.budget.fits(self._window):
            return None
        return end, min(self._window, self.size - end)

    def begin_window(self, window: tuple[int, int]) -> None:
        """A fetch of ``window`` starts: it is in flight, and its bytes count against the budget
        (a window being decoded takes memory too)."""
        self.inflight.append(window)
        self.budget.take_anyway(window[1])

    def end_window(self, window: tuple[int, int]) -> None:
        """The fetch of ``window`` ended (installed, or failed)."""
        self.inflight.remove(window)
        self.budget.give(window[1])

    def inflight_covering(self, offset: int) -> tuple[int, int] | None:
        """The running fetch that will hold ``offset``, if any."""
        for off, n in self.inflight:
            if off <= offset < off + n:
                return off, n
        return None
