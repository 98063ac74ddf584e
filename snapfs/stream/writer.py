"""Random-access layout of a migration stream generated on the fly.

A :class:`StreamLayout` is a list of pieces with known sizes: literal bytes (header, section
framing, device state) and, per RAMBlock, a :class:`BlockRecords` piece: the block's ZERO and
PAGE records, described only by its page runs. The piece start offsets are kept in a sorted
list and each block keeps the byte position of every run, so a read at any offset costs two
bisections; nothing is materialised. Records are generated per read, vectorised with numpy
(headers computed and scattered in one go, page data copied into every payload by one call),
so a sequential read does no per-page or per-run Python work. Given a ``read_pages_into``
copier, page data goes from the decoded frames straight into the records, and
:meth:`StreamLayout.read_buffer` hands the generated records on as a memoryview: one copy of
each byte instead of four.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from snapfs.errors import StoreCorrupt
from snapfs.stream import format as F

# Bound on the records generated at once by one read (bounds the temporary index arrays).
_MAX_RECORDS = 8192
_DATA_RECORD = 8 + F.TARGET_PAGE_SIZE
_ZERO_RECORD = 8 + 1

ReadPages = Callable[[int, int, int], bytes]  # (region, byte offset, size) -> bytes
# (region, ascending pages, destination rows of TARGET_PAGE_SIZE uint8, row of each page) ->
# None: SnapshotReader.read_pages_into, copying straight from the decoded frames into the
# records' payloads (one copy, GIL released).
ReadPagesInto = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class Literal:
    """Fixed bytes."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, lo: int, hi: int, _read_pages: ReadPages, _read_into: ReadPagesInto | None = None) -> bytes:
        return self.data[lo:hi]


class BlockRecords:
    """All ``ram`` records of one RAMBlock: one per page of ``runs`` (ZERO or PAGE).

    ``runs`` are (first_page, npages, is_data), ascending. The first record names the block
    (counted idstr ``prefix`` after its header); every later one carries CONTINUE.
    """

    def __init__(self, region: int, prefix: bytes, runs: list[tuple[int, int, bool]]) -> None:
        self.region = region
        self.prefix = np.frombuffer(prefix, np.uint8)
        plen = len(prefix)
        arr = np.array(runs, dtype=np.int64).reshape(-1, 3)
        self.first = arr[:, 0]
        self.count = arr[:, 1]
        self.is_data = arr[:, 2].astype(bool)
        self.rec_size = np.where(self.is_data, _DATA_RECORD, _ZERO_RECORD).astype(np.int64)
        # Record index of each run's first record, and its byte position (the block's first
        # record is plen longer: every later position is shifted by plen).
        self.rec_start = np.concatenate(([0], np.cumsum(self.count)[:-1])) if len(runs) else self.count
        run_bytes = self.count * self.rec_size
        self.byte_start = np.concatenate(([0], np.cumsum(run_bytes)[:-1])) + plen if len(runs) else run_bytes
        self.records = int(self.count.sum())
        self.size = int(run_bytes.sum()) + (plen if len(runs) else 0)

    def _record_at(self, pos: int) -> int:
        """Index of the record containing byte ``pos`` (0 <= pos < size)."""
        r = int(np.searchsorted(self.byte_start, pos, "right")) - 1
        if r < 0:
            return 0  # inside the first record's prefix-extended header
        k = (pos - int(self.byte_start[r])) // int(self.rec_size[r])
        return int(self.rec_start[r]) + max(k, 0)

    def read(self, lo: int, hi: int, read_pages: ReadPages, read_into: ReadPagesInto | None = None
             ) -> bytes | memoryview:
        """Bytes [lo, hi) of the records: a memoryview of the generated array when one batch
        covers them (no further copy), else the batches joined."""
        out: list[memoryview] = []
        g0 = self._record_at(lo)
        g_end = self._record_at(hi - 1) + 1
        while g0 < g_end:
            g1 = min(g_end, g0 + _MAX_RECORDS)
            base, data = self._generate(g0, g1, read_pages, read_into)
            out.append(memoryview(data).toreadonly()[max(lo - base, 0) : max(min(hi - base, len(data)), 0)])
            g0 = g1
        return out[0] if len(out) == 1 else b"".join(out)

    def _generate(self, g0: int, g1: int, read_pages: ReadPages,
                  read_into: ReadPagesInto | None = None) -> tuple[int, np.ndarray]:
        """Records g0..g1-1: (byte position of record g0, their bytes)."""
        plen = len(self.prefix)
        g = np.arange(g0, g1, dtype=np.int64)
        r = np.searchsorted(self.rec_start, g, "right") - 1
        k = g - self.rec_start[r]
        pages = self.first[r] + k
        is_data = self.is_data[r]
        pos = self.byte_start[r] + k * self.rec_size[r]
        if g0 == 0:
            pos[0] = 0
        base = int(pos[0])
        end = int(pos[-1] + (_DATA_RECORD if is_data[-1] else _ZERO_RECORD)) + (plen if g1 == 1 else 0)
        rel = pos - base
        out = np.empty(end - base, dtype=np.uint8)

        flags = np.where(is_data, F.RAM_PAGE, F.RAM_ZERO) | F.RAM_CONTINUE
        if g0 == 0:
            flags[0] &= ~F.RAM_CONTINUE
        # Every header in one scatter: a big-endian u64 view of the bytes at each offset.
        headers = np.ndarray((len(out) - 7,), ">u8", out, strides=(1,))
        headers[rel] = (pages.astype(np.uint64) * np.uint64(F.TARGET_PAGE_SIZE)) | flags.astype(np.uint64)
        payload = rel + 8
        if g0 == 0:
            out[8 : 8 + plen] = self.prefix
            payload[0] += plen
        out[payload[~is_data]] = 0
        if is_data.any():
            # A 4096-byte row at every byte offset: each data record's payload is the row at
            # its offset, and the pages are copied there in one call, straight from the store.
            rows = as_strided(out, shape=(len(out) - F.TARGET_PAGE_SIZE + 1, F.TARGET_PAGE_SIZE),
                              strides=(1, 1))
            (read_into or _pages_reader(read_pages))(self.region, pages[is_data], rows, payload[is_data])
        return base, out


def _pages_reader(read_pages: ReadPages) -> ReadPagesInto:
    """A :data:`ReadPagesInto` built on ``read_pages`` (bytes per range): one read per run of
    consecutive pages. For layouts without a store reader (in-memory images, tests)."""

    def read_into(region: int, pages: np.ndarray, dest: np.ndarray, rows: np.ndarray) -> None:
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), len(pages)]):
            first = int(pages[a])
            data = read_pages(region, first * F.TARGET_PAGE_SIZE, (b - a) * F.TARGET_PAGE_SIZE)
            dest[rows[a:b]] = np.frombuffer(data, np.uint8).reshape(b - a, F.TARGET_PAGE_SIZE)

    return read_into


class DeferredBlock:
    """A :class:`BlockRecords` whose runs are loaded on its first read, from a page map that
    may turn out damaged: its size follows from the block's page counts (``records`` records,
    ``data_pages`` of them PAGE records), so the stream's layout is known without any map and
    a damaged map fails only the reads that need it."""

    def __init__(self, region: int, prefix: bytes, records: int, data_pages: int,
                 load_runs: Callable[[], list[tuple[int, int, bool]]]) -> None:
        self.region = region
        self._prefix = prefix
        self._load_runs = load_runs
        self.size = records * _ZERO_RECORD + data_pages * (_DATA_RECORD - _ZERO_RECORD) + len(prefix)
        self._records: BlockRecords | None = None
        self._lock = threading.Lock()

    def _loaded(self) -> BlockRecords:
        with self._lock:
            if self._records is None:
                records = BlockRecords(self.region, self._prefix, self._load_runs())
                if records.size != self.size:
                    raise StoreCorrupt(f"region {self.region}: its page map and its page counts "
                                       "disagree (a damaged catalog): run `snapfs check`")
                self._records = records
            return self._records

    def read(self, lo: int, hi: int, read_pages: ReadPages, read_into: ReadPagesInto | None = None
             ) -> bytes | memoryview:
        return (self._records or self._loaded()).read(lo, hi, read_pages, read_into)


Piece = Literal | BlockRecords | DeferredBlock


@dataclass(frozen=True)
class BlockRuns:
    """A RAMBlock to emit: its idstr, length, extra MEM_SIZE fields and page runs.

    ``runs`` are (first_page, npages, is_data) ascending and covering what should be sent;
    pages not covered are not sent at all. Or ``runs`` is a function returning them, called
    on the block's first read, and ``records`` and ``data_pages`` say how many pages they
    cover and how many of those are data (see :class:`DeferredBlock`).
    """

    region: int
    name: bytes
    length: int
    extra: bytes
    runs: Iterable[tuple[int, int, bool]] | Callable[[], list[tuple[int, int, bool]]]
    records: int | None = None
    data_pages: int | None = None


class StreamLayout:
    """A stream as pieces; ``size`` exact up front, ``read(offset, size)`` anywhere."""

    def __init__(self, pieces: list[Piece], read_pages: ReadPages,
                 read_pages_into: ReadPagesInto | None = None) -> None:
        self._pieces = [p for p in pieces if p.size]
        self._starts: list[int] = []
        pos = 0
        for p in self._pieces:
            self._starts.append(pos)
            pos += p.size
        self.size = pos
        self._read_pages = read_pages
        self._read_into = read_pages_into

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the stream (short only at the end)."""
        data = self.read_buffer(offset, size)
        return data if isinstance(data, bytes) else bytes(data)

    def read_buffer(self, offset: int, size: int) -> bytes | memoryview:
        """Like :meth:`read`, but may return a read-only view of freshly generated records
        (saves a copy of every byte where the caller only hands the bytes on, e.g. to FUSE)."""
        end = min(offset + size, self.size)
        if offset < 0 or offset >= end:
            return b""
        i = bisect.bisect_right(self._starts, offset) - 1
        out = []
        pos = offset
        while pos < end:
            piece, start = self._pieces[i], self._starts[i]
            hi = min(end - start, piece.size)
            out.append(piece.read(pos - start, hi, self._read_pages, self._read_into))
            pos = start + hi
            i += 1
        return out[0] if len(out) == 1 else b"".join(out)

    def iter_chunks(self, chunk: int = 1 << 20) -> Iterable[bytes]:
        """The whole stream in order, ``chunk`` bytes at a time."""
        for off in range(0, self.size, chunk):
            yield self.read_buffer(off, chunk)


def ram_pieces(section_id: int, blocks: list[BlockRuns]) -> list[Piece]:
    """The ``ram`` START (RAMBlock list) and one PART per block with its ZERO/PAGE records."""
    pieces: list[Piece] = [
        Literal(
            F.section_start(section_id, F.RAM_IDSTR, F.RAM_INSTANCE, F.RAM_VERSION)
            + F.mem_size_list([(b.name, b.length, b.extra) for b in blocks])
            + F.EOS_RECORD
            + F.footer(section_id)
        )
    ]
    for b in blocks:
        if callable(b.runs):
            if b.records is None or b.data_pages is None:
                raise ValueError(f"block {b.name!r}: deferred runs need its record and data page counts")
            if not b.records:
                continue
            records: Piece = DeferredBlock(b.region, F.counted(b.name), b.records, b.data_pages, b.runs)
        else:
            runs = list(b.runs)
            if not runs:
                continue
            records = BlockRecords(b.region, F.counted(b.name), runs)
        pieces.append(Literal(F.section_part(section_id)))
        pieces.append(records)
        pieces.append(Literal(F.EOS_RECORD + F.footer(section_id)))
    return pieces


def merge_runs(runs: Iterable[tuple[int, int, int]], zero_kinds: tuple[int, ...] = (0, 1)) -> list[tuple[int, int, bool]]:
    """Store runs (first, n, kind) -> (first, n, is_data), holes and zero pages merged as ZERO."""
    out: list[tuple[int, int, bool]] = []
    for first, n, kind in runs:
        data = kind not in zero_kinds
        if out and out[-1][2] == data and out[-1][0] + out[-1][1] == first:
            out[-1] = (out[-1][0], out[-1][1] + n, data)
        else:
            out.append((first, n, data))
    return out



def image_layout(images: list[tuple[str, bytes]], machine: str = "none",
                 section_id: int = F.DEFAULT_RAM_SECTION_ID) -> StreamLayout:
    """A RAM-only stream of in-memory RAMBlock images (name, bytes): zero pages as ZERO records.

    For tools and tests that hold memory in hand (e.g. a region read from a stopped process).
    """
    blocks = []
    for i, (name, image) in enumerate(images):
        if len(image) % F.TARGET_PAGE_SIZE:
            raise ValueError(f"image {name!r}: {len(image)} bytes is not a multiple of 4096")
        pages = np.frombuffer(image, np.uint8).reshape(-1, F.TARGET_PAGE_SIZE)
        kinds = np.where(pages.any(axis=1), 2, 1)
        runs = [(int(p), 1, int(k)) for p, k in enumerate(kinds.tolist())]
        blocks.append(BlockRuns(i, name.encode(), len(image), b"", merge_runs(runs)))

    def read_pages(region: int, offset: int, size: int) -> bytes:
        return bytes(images[region][1][offset : offset + size])

    tail = bytes([F.SEC_EOF]) + F.vmdescription({"page_size": F.TARGET_PAGE_SIZE, "devices": []})
    pieces = [Literal(F.HEADER + F.configuration(machine)), *ram_pieces(section_id, blocks), Literal(tail)]
    return StreamLayout(pieces, read_pages)
