"""Read a whole migration stream into a temporary page spool before anything is committed.

QEMU precopy streams send a page several times (the last copy wins) while the store and a
restored process must take each page once, and a stream must be validated to its end before
a snapshot is published or a target touched. :func:`spool_stream` therefore parses the entire
stream, writing the latest copy of every page into a sparse temporary file at
``block base + page offset`` and tracking per page whether it was last sent as data or zero.

Memory stays bounded whatever the stream claims: page states live in lazily allocated chunks
(one byte per page actually sent, 32 KiB per 128 MiB of RAM touched); writes are coalesced
into buffers of at most 1 MiB.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from snapfs.errors import StreamError
from snapfs.stream import format as F
from snapfs.stream.reader import (
    EV_BLOCKS,
    EV_DEVICES,
    EV_END,
    EV_HEADER,
    EV_PAGE,
    EV_ZERO,
    Limits,
    RamBlock,
    StreamHeader,
    read_stream,
)

NOT_SENT, SENT_ZERO, SENT_DATA = 0, 1, 2
CHUNK_PAGES = 1 << 15
_FLUSH_BYTES = 1 << 20
PAGE = F.TARGET_PAGE_SIZE


class PageSpool:
    """The latest copy of each page of a set of RAMBlocks, in an unlinked sparse temp file."""

    def __init__(self, blocks: list[RamBlock], directory: str | os.PathLike | None = None) -> None:
        self.blocks = blocks
        self._file = tempfile.TemporaryFile(dir=directory, prefix="snapfs-spool-")
        self._fd = self._file.fileno()
        self._bases = []
        pos = 0
        for b in blocks:
            self._bases.append(pos)
            pos += b.length
        self._states: list[dict[int, np.ndarray]] = [{} for _ in blocks]
        self._pending: list[bytes | memoryview] = []
        self._pending_off = 0
        self._pending_end = -1
        self.data_records = 0
        self.zero_records = 0
        self.duplicates = 0

    def _state(self, block: int, page: int) -> tuple[np.ndarray, int]:
        chunks = self._states[block]
        key = page // CHUNK_PAGES
        arr = chunks.get(key)
        if arr is None:
            arr = chunks[key] = np.zeros(CHUNK_PAGES, np.uint8)
        return arr, page % CHUNK_PAGES

    def put_page(self, block: int, page: int, data: bytes | memoryview) -> None:
        """Record that ``page`` of ``block`` was sent with ``data`` (replacing earlier copies)."""
        arr, i = self._state(block, page)
        if arr[i]:
            self.duplicates += 1
        arr[i] = SENT_DATA
        self.data_records += 1
        off = self._bases[block] + page * PAGE
        if off != self._pending_end or len(self._pending) * PAGE >= _FLUSH_BYTES:
            self.flush()
            self._pending_off = off
        self._pending.append(data)
        self._pending_end = off + PAGE

    def put_zero(self, block: int, page: int) -> None:
        """Record that ``page`` of ``block`` was sent as a zero page."""
        arr, i = self._state(block, page)
        if arr[i]:
            self.duplicates += 1
        arr[i] = SENT_ZERO
        self.zero_records += 1

    def flush(self) -> None:
        """Write out coalesced pending pages."""
        if self._pending:
            total = len(self._pending) * PAGE
            done = os.pwritev(self._fd, self._pending, self._pending_off)
            if done < total:  # short write (rare): finish the rest plainly
                rest = b"".join(bytes(p) for p in self._pending)[done:]
                while rest:
                    n = os.pwrite(self._fd, rest, self._pending_off + done)
                    rest, done = rest[n:], done + n
            self._pending = []
        self._pending_end = -1

    def sent_pages(self, block: int) -> int:
        """How many distinct pages of ``block`` were sent."""
        return int(sum(np.count_nonzero(a) for a in self._states[block].values()))

    def batches(self, block: int, max_pages: int = 256) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first_page, states, pages) for every window of ``block`` holding sent pages.

        ``pages`` is a writable (n, 4096) uint8 array with zero-sent pages zeroed; ``states``
        says per page NOT_SENT / SENT_ZERO / SENT_DATA. Windows are ascending.
        """
        self.flush()
        npages_block = self.blocks[block].length // PAGE
        for key in sorted(self._states[block]):
            arr = self._states[block][key]
            for w in np.unique(np.flatnonzero(arr) // max_pages).tolist():
                lo = key * CHUNK_PAGES + w * max_pages
                n = min(max_pages, npages_block - lo)
                states = arr[w * max_pages : w * max_pages + n]
                raw = bytearray(n * PAGE)
                got = os.preadv(self._fd, [raw], self._bases[block] + lo * PAGE)
                del got  # a sparse tail beyond the file's end reads as the zeros already there
                pages = np.frombuffer(raw, np.uint8).reshape(n, PAGE)
                pages[states == SENT_ZERO] = 0
                yield lo, states, pages

    def close(self) -> None:
        """Drop the temporary file."""
        self._pending = []
        self._file.close()

    def __enter__(self) -> "PageSpool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class SpooledStream:
    """A fully read and validated stream: its header, RAMBlocks, pages and device state."""

    header: StreamHeader
    ram_section_id: int
    blocks: list[RamBlock]
    spool: PageSpool
    devices: bytes | None = None  # device FULL sections + EOF + VMDESC, verbatim
    vmdesc: bytes | None = None  # RAM-only streams: the trailing description
    stream_bytes: int = 0

    def close(self) -> None:
        self.spool.close()


class _CountingReader:
    """Counts the bytes read through it (for progress and the stream size)."""

    def __init__(self, src: BinaryIO, progress: Callable[[int], None] | None) -> None:
        self._src = src
        self.count = 0
        self._progress = progress

    def readinto(self, buf) -> int:
        n = self._src.readinto(buf) or 0
        self.count += n
        if self._progress is not None:
            self._progress(self.count)
        return n


def spool_stream(
    src: BinaryIO,
    directory: str | os.PathLike | None = None,
    limits: Limits = Limits(),
    progress: Callable[[int], None] | None = None,
) -> SpooledStream:
    """Read and validate all of ``src``; StreamError (nothing kept) on any malformed input."""
    counter = _CountingReader(src, progress)
    events = read_stream(counter, limits)
    header: StreamHeader | None = None
    spool: PageSpool | None = None
    section_id = F.DEFAULT_RAM_SECTION_ID
    blocks: list[RamBlock] = []
    try:
        for ev in events:
            kind = ev[0]
            if kind == EV_PAGE:
                spool.put_page(ev[1], ev[2], ev[3])  # type: ignore[union-attr]
            elif kind == EV_ZERO:
                spool.put_zero(ev[1], ev[2])  # type: ignore[union-attr]
            elif kind == EV_HEADER:
                header = ev[1]
            elif kind == EV_BLOCKS:
                section_id, blocks = ev[1], ev[2]
                spool = PageSpool(blocks, directory)
            elif kind in (EV_DEVICES, EV_END):
                if spool is None:
                    spool = PageSpool([], directory)
                spool.flush()
                assert header is not None
                return SpooledStream(
                    header=header,
                    ram_section_id=section_id,
                    blocks=blocks,
                    spool=spool,
                    devices=ev[1] if kind == EV_DEVICES else None,
                    vmdesc=ev[1] if kind == EV_END else None,
                    stream_bytes=counter.count,
                )
        raise StreamError("stream ended without an EOF section")  # pragma: no cover - reader raises first
    except BaseException:
        if spool is not None:
            spool.close()
        raise


def capture_pipe(fd: int, directory: str | os.PathLike | None = None, chunk: int = 1 << 20) -> BinaryIO:
    """Copy everything from pipe ``fd`` to an unlinked temporary file; return it at offset 0.

    Used while QEMU is writing a stream: ``splice`` moves pages kernel-side, so the writer is
    drained as cheaply as by ``cat > file`` and parsing happens afterwards, off QEMU's clock.
    """
    out = tempfile.TemporaryFile(dir=directory, prefix="snapfs-stream-")
    try:
        while True:
            try:
                n = os.splice(fd, out.fileno(), chunk)
            except OSError:  # not a pipe after all, or splice unsupported here
                data = os.read(fd, chunk)
                n = len(data)
                if n:
                    out.write(data)
            if not n:
                break
        out.flush()
        out.seek(0)
        return out
    except BaseException:
        out.close()
        raise
