"""SnapshotWriter: turns pages into frames in this writer's own segments, publishes atomically.

Threads: ``put_pages`` may run concurrently in several threads. Zero detection, hashing and
compression run in the calling thread without locks (zstd, CRC and pwrite release the GIL);
only the segment offset reservation and small bookkeeping appends take a lock. A large put
gathers its data pages once, compresses up to BATCH_FRAMES frames, reserves their space in one
step, appends them to the lane's segment and records their runs in one vectorised pass: the
Python work per put stays small, so two put threads do not serialise on the GIL. Small puts
(single pages, THPs) are pooled in one bounded buffer until a full 128 KiB frame is ready.
Segments are appended with O_DIRECT from a thread of their own (:mod:`._appender`), so commit's
fsync has little left.

Page-level bookkeeping (pages handed over, hashes, runs) lives in one page space for all
regions (see ``_Region.base``), so ``put_pieces`` stores pieces of hundreds of regions in
one pass and commit cuts the maps of tens of thousands of regions out of one sorted array.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from snapfs.errors import StoreCorrupt, StoreError
from snapfs.ranges import positions_in_runs
from snapfs.store import _integrity, _runs
from snapfs.store._format import (FRAME_HEADER, FRAME_PAGES, STORE_PAGE, SEGMENT_MAX_BYTES, FrameError,
                                  compress_blob, compress_frames, compress_payload, decompress_blob,
                                  frame_header)
from snapfs.store._fsutil import PREALLOC_STEP, disk_full_error, is_disk_full
from snapfs.store._pagehash import ALGO, page_hash_list, page_hashes
from snapfs.store.model import DATA, REGION_KINDS, ZERO, RegionSpec, SnapshotInfo
from snapfs.store.segments import NewSegment, frame_keys

BATCH_FRAMES = 32             # frames compressed, reserved and written together (4 MiB raw)
HASH_CHUNK = 1 << 20          # pages per stored hash chunk (8 MiB of hashes)
# Pages per in-memory piece of the page hashes (8 KiB; a scan chunk's 1024 pages fall in one
# piece): memory follows the pages put, not the region's size. A stream claiming a 1 TiB block
# with one page per 128 MiB cost 1.7 GiB with whole 8 MiB chunks (numpy backs those with huge
# pages), 0.37 GiB with 32 KiB pieces.
MAP_PIECE = 1 << 10
GIVEN_PIECE = 1 << 15         # pages per piece of the hand-over bitmap (4 KiB; 1 TiB: 32 MiB)
SMALL_PUT = 8                 # puts of at most this many pages take the per-page path
ZERO_PAGE = bytes(STORE_PAGE)
COMPACT_PARTS = 1024          # merge a region's run pieces beyond this many...
COMPACT_ZEROS = 65536         # ...or this many zero pages from small puts...
COMPACT_RUNS = 1 << 14        # ...or this many runs (~1.5 ms to merge)
# Merges stop growing at this many runs (~3 ms each): a merge runs in whichever thread put
# last, often the fault path's; merging the whole map there (300 000 runs after 87 000
# faults, under the writer's lock) took 40 ms, and every writer of the target waited on it.
MERGE_MAX_RUNS = 1 << 15
WRITE_LANES = 2               # segments open for appending at once (one per compression thread)
_INFO_KEYS = ("kind", "pid", "comm", "exe", "cmdline", "pause_ms", "duration_s", "faults")


@dataclass
class _Region:
    spec: RegionSpec
    npages: int
    parent_idx: int | None
    # Where the region's pages sit in the writer's page space: page p of the region is page
    # base + p there. Regions follow each other with a one-page gap, so no run crosses one.
    base: int = 0
    lost: list[tuple[int, int, str]] = field(default_factory=list)
    shares: tuple[int, int] | None = None                     # (source region, first page)


class PageGivenTwice(RuntimeError):
    """A caller handed the writer a page it already had (the contract says at most once).

    A bug in the caller, not an expected condition: the snapshot is aborted, and the error
    is not a SnapfsError so that it is reported loudly (with its traceback)."""


class SnapshotWriter:
    """Writes one snapshot; see docs/architecture.md for the contract.

    Use as a context manager or call :meth:`commit` / :meth:`abort` exactly once. A writer that
    dies without either leaves a pending row that gc reclaims (its lock file is no longer held).
    """

    def __init__(self, store: Any, snap_id: int, name: str, meta: dict[str, Any],
                 parent: SnapshotInfo | None, parent_regions: list[Any], lock_name: str,
                 lock_fd: int) -> None:
        """Built by Store.begin_snapshot: ``parent`` and its region rows are verified."""
        self._store = store
        self.id = snap_id
        self.name = name
        self._meta = meta
        self._parent = parent
        self._parent_regions = parent_regions
        self._lock_name = lock_name
        self._lock_fd = lock_fd
        self._started = time.time()
        self._regions: list[_Region] = []
        # Every region's pages live in one page space (see _Region.base), so the page-level
        # bookkeeping is one set of arrays, not one per region: a put of pieces of thousands
        # of small regions, and commit's page maps, are a few vectorised passes.
        self._next_base = 0
        self._bases = np.zeros(0, np.int64)     # _Region.base of each region, for lookups
        self._npages = np.zeros(0, np.int64)    # and its pages...
        self._sharing = np.zeros(0, bool)       # ...and whether it shares another's
        self._parts: list[np.ndarray] = []      # recent run pieces (writer page space), unsorted
        self._parts_runs = 0                    # how many runs they hold
        self._merged: list[np.ndarray] = []     # sorted runs (sizes decreasing up to MERGE_MAX_RUNS)
        self._zero_pending: list[int] = []      # zero pages from small puts (writer page space)
        self._hashes: dict[int, np.ndarray] = {}  # page hashes, per MAP_PIECE pages
        self._given: dict[int, np.ndarray] = {}   # bitmap of pages handed over, per GIVEN_PIECE
        # The parent's regions by (name, length) and (name, length, start): add_region's match.
        self._parent_by_shape: dict[tuple, list[int]] = {}
        for r in parent_regions:
            self._parent_by_shape.setdefault((r["name"], r["length"]), []).append(r["idx"])
            self._parent_by_shape.setdefault((r["name"], r["length"], r["start"]), []).append(r["idx"])
        # Lost pages reported for a region not declared yet (a capture numbers its regions in
        # the pause and declares them after the resume; the fault path may see the target
        # unmap memory in between): recorded once the region is declared.
        self._early_lost: list[tuple[int, int, int, str]] = []
        self._lock = threading.Lock()          # bookkeeping (regions, frames, segments)
        self._buf_lock = threading.Lock()      # the small-put pooling buffer
        self._buf = bytearray()
        self._buf_pages: list[int] = []        # page (writer page space) of each pooled page
        # One open segment per lane; a thread writes through a lane it holds alone. Two
        # threads appending to one file serialise on the inode lock (ext4 holds it for the
        # whole buffered copy) and the waiter spins on it: ~5% of a capture's CPU.
        self._lanes: list[NewSegment | None] = [None] * WRITE_LANES
        self._free_lanes = list(range(WRITE_LANES))
        self._lane_cond = threading.Condition(self._lock)
        self._segments = store.segments.writing()
        self._frames: list[tuple[int, int, int, int]] = []          # seg, off, flen, npages
        self._blobs: dict[str, bytes] = {}
        self._warnings: list[str] = []
        self._failed: BaseException | None = None
        self._done = False
        # idx -> (runs, ends, starts): ends/starts as contiguous int64 for fast searches
        self._parent_maps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._parent_hashes: dict[tuple[int, int], np.ndarray] = {}

    # ----------------------------------------------------------------- regions
    def add_region(self, spec: RegionSpec) -> int:
        """Declare a region; returns its index for put_pages/inherit/mark_lost."""
        return self.add_regions([spec])

    def add_regions(self, specs: list[RegionSpec]) -> int:
        """Declare regions in order (one call for a capture's tens of thousands of mappings);
        returns the index of the first (the others follow it)."""
        new = []
        base = None
        for spec in specs:
            if spec.length <= 0 or spec.length % STORE_PAGE:
                raise ValueError(f"region {spec.name!r}: length {spec.length} is not a positive multiple of 4096")
            if spec.kind not in REGION_KINDS:
                raise ValueError(f"region {spec.name!r}: kind {spec.kind!r} not one of {REGION_KINDS}")
            parent_idx = None
            if self._parent_by_shape:
                exact = self._parent_by_shape.get((spec.name, spec.length, spec.start))
                same = self._parent_by_shape.get((spec.name, spec.length), [])
                if exact:
                    parent_idx = exact[0]
                elif len(same) == 1:
                    parent_idx = same[0]
            new.append((spec, spec.length // STORE_PAGE, parent_idx))
        with self._lock:
            first = len(self._regions)
            base = self._next_base
            for spec, npages, parent_idx in new:
                self._regions.append(_Region(spec, npages, parent_idx, base))
                base += npages + 1
            self._next_base = base
            end = len(self._regions)
            now = [m for m in self._early_lost if first <= m[0] < end]
            if now:
                self._early_lost = [m for m in self._early_lost if not first <= m[0] < end]
        for m in now:
            self.mark_lost(*m)
        return first

    def share(self, idx: int, source_idx: int, source_first_page: int) -> None:
        """Region ``idx`` holds the bytes of region ``source_idx`` from page
        ``source_first_page`` on: memory several processes map (a process's window on a
        shared object), stored once. Its page map is the source's, clipped and shifted, made
        at commit; nothing is put into ``idx`` itself, and its pages count once (in the
        source) in the snapshot's resident bytes."""
        self._region_check_open()
        reg, src = self._regions[idx], self._regions[source_idx]
        if idx == source_idx or src.shares is not None:
            raise ValueError(f"region {reg.spec.name!r} can only share a region that holds its own pages")
        if source_first_page < 0:
            raise ValueError(f"region {reg.spec.name!r}: negative first page {source_first_page}")
        with self._lock:
            if self._holds_pages(reg):
                raise StoreError(f"region {reg.spec.name!r} already holds pages: it cannot share others")
            reg.shares = (source_idx, source_first_page)
            self._sharing = np.zeros(0, bool)  # rebuilt by _region_arrays

    def _holds_pages(self, reg: _Region) -> bool:
        """Whether any page of ``reg`` was handed over (call with _lock held)."""
        lo, hi = reg.base, reg.base + reg.npages
        for piece, bits in self._given.items():
            a, b = max(lo, piece * GIVEN_PIECE), min(hi, (piece + 1) * GIVEN_PIECE)
            if a < b and np.unpackbits(bits, bitorder="little")[a - piece * GIVEN_PIECE:b - piece * GIVEN_PIECE].any():
                return True
        return False

    def _region_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(base, pages, shares another) of every region declared, as arrays."""
        with self._lock:
            if len(self._bases) != len(self._regions) or len(self._sharing) != len(self._regions):
                self._bases = np.array([r.base for r in self._regions], np.int64)
                self._npages = np.array([r.npages for r in self._regions], np.int64)
                self._sharing = np.array([r.shares is not None for r in self._regions], bool)
            return self._bases, self._npages, self._sharing

    def _locate_page(self, gpage: int) -> tuple[_Region, int]:
        """(region, page in it) of a page of the writer's page space."""
        reg = self._regions[bisect.bisect_right(self._regions, gpage, key=lambda r: r.base) - 1]
        return reg, gpage - reg.base

    def _region(self, idx: int, first_page: int, npages: int) -> _Region:
        if self._done:
            raise StoreError(f"snapshot {self.name!r} writer is already committed or aborted")
        if self._failed is not None:
            raise self._failed
        reg = self._regions[idx]
        if reg.shares is not None:
            raise StoreError(f"region {reg.spec.name!r} shares another region's pages: nothing is put into it")
        if first_page < 0 or first_page + npages > reg.npages:
            raise ValueError(f"region {reg.spec.name!r}: pages {first_page}+{npages} outside 0..{reg.npages}")
        return reg

    # ----------------------------------------------------------------- parent lookups
    def _parent_map(self, pidx: int) -> np.ndarray:
        return self._parent_indexed_map(pidx)[0]

    def _parent_locate(self, pidx: int, pages: np.ndarray) -> np.ndarray:
        """Runs referring to the parent's bytes of (sorted, DATA-in-parent) ``pages``."""
        runs, ends, _ = self._parent_indexed_map(pidx)
        return _runs.locate(runs, pages, ends)

    def _parent_indexed_map(self, pidx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        entry = self._parent_maps.get(pidx)
        if entry is None:
            try:
                runs = self._store.load_map(self._parent, self._parent_regions[pidx])
            except StoreCorrupt as exc:
                raise StoreCorrupt(f"parent {exc}; take a full snapshot (no parent) meanwhile") from None
            entry = self._parent_maps[pidx] = (runs, _runs.ends_of(runs).astype(np.int64),
                                               runs["page"].astype(np.int64))
        return entry

    def _parent_hash_chunk(self, pidx: int, chunk: int) -> np.ndarray:
        """The parent's page hashes for one chunk of region ``pidx``: empty (nothing matches,
        every page is stored) if it has none under our algorithm, or if they are damaged -
        then with a warning: the snapshot is still right, only bigger."""
        crc = "crc" if self._store.checksums else "NULL AS crc"
        rows = self._store.query(
            f"SELECT snapshot_id, region_idx, chunk, algo, data, {crc} FROM hashes "
            "WHERE snapshot_id=? AND region_idx=? AND chunk=? AND algo=?",
            (self._parent.id, pidx, chunk, ALGO))
        if not rows:
            return np.zeros(0, np.uint64)
        length = min(HASH_CHUNK, self._parent_regions[pidx]["length"] // STORE_PAGE - chunk * HASH_CHUNK)
        try:
            raw = decompress_blob(rows[0]["data"])
            good = len(raw) == 8 * length and (not self._store.checksums or rows[0]["crc"] == (
                _integrity.keyed_blob_crc("hashes", rows[0], _integrity.HASH_FIELDS, raw)))
        except FrameError:
            good = False
        if not good:
            with self._lock:
                self._warnings.append(
                    f"region {self._parent_regions[pidx]['name']}: the page hashes of parent "
                    f"{self._parent.name!r} are damaged: pages {chunk * HASH_CHUNK}.. compared with "
                    "nothing and stored in full (run `snapfs check`)")
            return np.zeros(0, np.uint64)
        return np.frombuffer(raw, "<u8")

    def _parent_hash(self, pidx: int, pages: np.ndarray) -> np.ndarray:
        out = np.zeros(len(pages), np.uint64)
        chunks = pages // HASH_CHUNK
        for chunk in np.unique(chunks).tolist():
            arr = self._parent_hashes.get((pidx, chunk))
            if arr is None:
                arr = self._parent_hashes[(pidx, chunk)] = self._parent_hash_chunk(pidx, chunk)
            sel = chunks == chunk
            local = pages[sel] - chunk * HASH_CHUNK
            if len(arr):
                out[sel] = arr[local]
        return out

    def _hash_piece(self, piece: int) -> np.ndarray:
        """This writer's hashes of pages [piece*MAP_PIECE, ...) of its page space (allocated
        lazily)."""
        arr = self._hashes.get(piece)
        if arr is None:
            with self._lock:
                arr = self._hashes.setdefault(piece, np.zeros(MAP_PIECE, np.uint64))
        return arr

    def _set_hashes(self, gpages: np.ndarray, values: np.ndarray) -> None:
        """Record the hashes of ascending pages ``gpages`` (writer page space)."""
        if len(gpages) == 0:
            return
        gpages = gpages.astype(np.int64, copy=False)
        lo, hi = int(gpages[0]) // MAP_PIECE, int(gpages[-1]) // MAP_PIECE
        if lo == hi:                                  # the usual case: one piece, no masks
            self._hash_piece(lo)[gpages - lo * MAP_PIECE] = values
            return
        # Ascending: each piece's pages are one slice.
        pieces = gpages // MAP_PIECE
        cuts = np.flatnonzero(np.diff(pieces)) + 1
        for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(gpages)].tolist()):
            piece = int(pieces[a])
            self._hash_piece(piece)[gpages[a:b] - piece * MAP_PIECE] = values[a:b]

    def _hash_chunks(self, reg: _Region, pieces: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(chunk, hashes) of every stored hash chunk (HASH_CHUNK pages of the region) holding
        a hash, from the in-memory pieces (``pieces``: their numbers, sorted) one at a time."""
        lo, hi = reg.base, reg.base + reg.npages
        if reg.npages <= HASH_CHUNK and lo // MAP_PIECE == (hi - 1) // MAP_PIECE:
            # The usual small region: one slice of one piece.
            arr = self._hashes.get(lo // MAP_PIECE)
            if arr is not None:
                arr = arr[lo % MAP_PIECE:lo % MAP_PIECE + reg.npages]
                if arr.any():
                    yield 0, arr
            return
        first = int(np.searchsorted(pieces, lo // MAP_PIECE))
        last = int(np.searchsorted(pieces, (hi - 1) // MAP_PIECE, side="right"))
        if first == last:
            return
        for chunk in range((reg.npages + HASH_CHUNK - 1) // HASH_CHUNK):
            c_lo = lo + chunk * HASH_CHUNK
            c_hi = min(c_lo + HASH_CHUNK, hi)
            out = None
            for piece in pieces[first:last].tolist():
                p_lo = piece * MAP_PIECE
                a, b = max(c_lo, p_lo), min(c_hi, p_lo + MAP_PIECE)
                if a >= b:
                    continue
                arr = self._hashes[piece][a - p_lo:b - p_lo]
                if arr.any():
                    if out is None:
                        out = np.zeros(c_hi - c_lo, np.uint64)
                    out[a - c_lo:b - c_lo] = arr
            if out is not None:
                yield chunk, out

    def _hand_over(self, gpages: np.ndarray) -> None:
        """Record that ``gpages`` (ascending, unique; writer page space) were put or inherited;
        raise :class:`PageGivenTwice` (and fail the writer) for a page already handed over."""
        if len(gpages) == 0:
            return
        gpages = gpages.astype(np.int64, copy=False)
        lo, hi = int(gpages[0]) // GIVEN_PIECE, int(gpages[-1]) // GIVEN_PIECE
        if lo == hi:                                            # the usual case
            spans = [(lo, 0, len(gpages))]
        else:
            pieces = gpages // GIVEN_PIECE
            cuts = np.flatnonzero(np.diff(pieces)) + 1
            starts = np.r_[0, cuts]
            spans = list(zip(pieces[starts].tolist(), starts.tolist(), np.r_[cuts, len(gpages)].tolist()))
        with self._lock:
            for piece, a, b in spans:
                mine = gpages[a:b]
                given = self._given.get(piece)
                if given is None:
                    given = self._given[piece] = np.zeros(GIVEN_PIECE // 8, np.uint8)
                local = mine - piece * GIVEN_PIECE
                byte, bit = local >> 3, (np.uint8(1) << (local & 7).astype(np.uint8))
                again = (given[byte] & bit) != 0
                if again.any():
                    reg, page = self._locate_page(int(mine[np.argmax(again)]))
                    self._failed = PageGivenTwice(
                        f"internal error: page {page} of region {reg.spec.name!r} was handed to the "
                        f"store twice ({int(again.sum())} pages of this call were): snapshot "
                        f"{self.name!r} aborted; please report this bug")
                    raise self._failed
                # Ascending pages: the bits of each byte are gathered with one reduceat.
                first = np.flatnonzero(np.diff(byte, prepend=-1))
                given[byte[first]] |= np.bitwise_or.reduceat(bit, first)

    def _hand_over_few(self, gpages: list[int]) -> None:
        """:meth:`_hand_over` for a few pages (the fault path's): bit by bit, no numpy set-up."""
        with self._lock:
            for g in gpages:
                piece, local = divmod(g, GIVEN_PIECE)
                given = self._given.get(piece)
                if given is None:
                    given = self._given[piece] = np.zeros(GIVEN_PIECE // 8, np.uint8)
                byte, bit = local >> 3, 1 << (local & 7)
                old = int(given[byte])
                if old & bit:
                    reg, page = self._locate_page(g)
                    self._failed = PageGivenTwice(
                        f"internal error: page {page} of region {reg.spec.name!r} was handed to the "
                        f"store twice: snapshot {self.name!r} aborted; please report this bug")
                    raise self._failed
                given[byte] = old | bit

    def _add_runs(self, parts: list[np.ndarray], zeros: list[int] | None = None) -> None:
        """Add run pieces (writer page space) and zero pages; compact when there are many."""
        with self._lock:
            for p in parts:
                if len(p):
                    self._parts.append(p)
                    self._parts_runs += len(p)
            if zeros:
                self._zero_pending += zeros
        self._compact()

    @staticmethod
    def _shifted(runs: np.ndarray, base: int) -> np.ndarray:
        """Runs of a region's pages moved into the writer's page space."""
        if len(runs) and base:
            runs = runs.copy()
            runs["page"] += np.uint64(base)
        return runs

    # ----------------------------------------------------------------- putting pages
    def put_pages(self, idx: int, first_page: int, data: Any, mask: np.ndarray | None = None) -> None:
        """Store pages ``first_page..`` of region ``idx`` from ``data`` (n*4096 bytes).

        Zero pages become index entries; with ``mask`` only True pages are stored; with a
        parent, pages whose hash equals the parent's same page refer to the parent's frame.
        """
        view = memoryview(data).cast("B")
        n = len(view) // STORE_PAGE
        if len(view) != n * STORE_PAGE:
            raise ValueError(f"put_pages: {len(view)} bytes is not a multiple of 4096")
        reg = self._region(idx, first_page, n)
        if n == 0:
            return
        if n <= SMALL_PUT:
            self._put_small(idx, reg, first_page, view, n, mask)
            return
        self._put(idx, reg, np.arange(first_page, first_page + n, dtype=np.int64), view, mask, "put_pages")

    def put_scattered(self, idx: int, pages: Any, data: Any, mask: Any = None) -> None:
        """Store pages ``pages`` (ascending page numbers of region ``idx``) from ``data``
        (``len(pages)`` * 4096 bytes, in that order); with ``mask`` only True pages are stored.
        Same semantics as ``put_pages`` (zero pages as index entries, pages equal to the
        parent's same page refer to its frame), in one pass whatever the number of pages:
        a tracked child's few thousand scattered changed pages are one call, not thousands."""
        pages = np.asarray(pages, dtype=np.int64)
        view = memoryview(data).cast("B")
        n = len(pages)
        if len(view) != n * STORE_PAGE:
            raise ValueError(f"put_scattered: {len(view)} bytes for {n} pages")
        if n == 0:
            return
        reg = self._region(idx, int(pages[0]), 0)
        if int(pages[-1]) >= reg.npages or (n > 1 and (np.diff(pages) <= 0).any()):
            raise ValueError(f"region {reg.spec.name!r}: pages must be ascending, unique and inside "
                             f"0..{reg.npages}")
        self._put(idx, reg, pages, view, mask, "put_scattered")

    def put_pieces(self, regions: Any, first_pages: Any, npages: Any, data: Any, mask: Any = None) -> None:
        """Store pieces of several regions in one call: piece i is pages ``first_pages[i]``
        .. of region ``regions[i]``, ``npages[i]`` long; ``data`` holds every piece's pages back
        to back in that order; with ``mask`` (one entry per page) only True pages are stored.
        Pieces must be in ascending (region, page) order and disjoint. Same semantics as
        ``put_pages`` for each piece, in a few vectorised passes whatever the number of
        pieces: the background scan's 4 MiB batch of a target with tens of thousands of small
        mappings holds hundreds of them (one put each cost ~50 us of Python)."""
        regs = np.asarray(regions, dtype=np.int64)
        firsts = np.asarray(first_pages, dtype=np.int64)
        counts = np.asarray(npages, dtype=np.int64)
        view = memoryview(data).cast("B")
        n = int(counts.sum()) if len(counts) else 0
        if len(view) != n * STORE_PAGE or not (len(regs) == len(firsts) == len(counts)):
            raise ValueError(f"put_pieces: {len(view)} bytes for {n} pages in {len(regs)} pieces")
        if n == 0:
            return
        self._region_check_open()
        bases, npages_of, sharing = self._region_arrays()
        if (regs < 0).any() or (regs >= len(bases)).any():
            raise IndexError(f"put_pieces: region index outside 0..{len(bases) - 1}")
        bad = (firsts < 0) | (counts < 0) | (firsts + counts > npages_of[regs])
        if bad.any():
            reg = self._regions[int(regs[np.argmax(bad)])]
            i = int(np.argmax(bad))
            raise ValueError(f"region {reg.spec.name!r}: pages {firsts[i]}+{counts[i]} outside 0..{reg.npages}")
        if sharing[regs].any():
            reg = self._regions[int(regs[np.argmax(sharing[regs])])]
            raise StoreError(f"region {reg.spec.name!r} shares another region's pages: nothing is put into it")
        starts = bases[regs] + firsts
        if len(starts) > 1 and (starts[1:] < starts[:-1] + counts[:-1]).any():
            raise ValueError("put_pieces: pieces must be in ascending (region, page) order and disjoint")
        # Each page's place within its piece, for the pieces' page numbers below.
        within = positions_in_runs(counts)
        if any(self._regions[r].parent_idx is not None for r in np.unique(regs).tolist()):
            # Compared with a parent region by region (a continuous series' child): one
            # scattered put per region (the fault path's single pages are one piece each).
            page_regs = np.repeat(regs, counts)
            pages = np.repeat(firsts, counts) + within
            rows = np.frombuffer(view, np.uint8).reshape(n, STORE_PAGE)
            keep = None if mask is None else np.asarray(mask, bool)
            for r in np.unique(regs).tolist():
                sel = np.flatnonzero(page_regs == r)
                self.put_scattered(r, pages[sel], rows[sel], None if keep is None else keep[sel])
            return
        self._put_global(np.repeat(starts, counts) + within, view, mask, None, "put_pieces")

    def _put_small(self, idx: int, reg: _Region, first_page: int, view: memoryview, n: int,
                   mask: Any) -> None:
        """put_pages for a few pages (the fault path): plain Python beats numpy's set-up cost."""
        keep = range(n) if mask is None else [i for i in range(n) if mask[i]]
        base = reg.base + first_page
        self._hand_over_few([base + i for i in keep])
        data = [i for i in keep if view[i * STORE_PAGE:(i + 1) * STORE_PAGE] != ZERO_PAGE]
        if len(data) < len(keep):
            self._add_runs([], [base + i for i in keep if i not in data])
        if not data:
            return
        hashes = page_hash_list(view, data)
        for i, h in zip(data, hashes):
            page = base + i
            self._hash_piece(page // MAP_PIECE)[page % MAP_PIECE] = h
        if reg.parent_idx is not None:
            pages = np.array([first_page + i for i in data], np.uint64)
            same = self._parent_hash(reg.parent_idx, pages) == np.array(hashes, np.uint64)
            if same.any():
                self._add_runs([self._shifted(self._parent_locate(reg.parent_idx, pages[same]), reg.base)])
                data = [i for i, s in zip(data, same.tolist()) if not s]
                if not data:
                    return
        raw = view if len(data) == n else b"".join(view[i * STORE_PAGE:(i + 1) * STORE_PAGE] for i in data)
        self._pool(raw, [base + i for i in data])

    def _put(self, idx: int, reg: _Region, pages: np.ndarray, view: memoryview, mask: Any,
             caller: str) -> None:
        """The pipeline of every put but the smallest: ``view`` holds pages ``pages`` (int64,
        ascending, unique, inside the region) in that order; with ``mask`` only True ones are
        stored."""
        self._put_global(pages + reg.base, view, mask, reg if reg.parent_idx is not None else None, caller)

    def _put_global(self, gpages: np.ndarray, view: memoryview, mask: Any, parent_of: _Region | None,
                    caller: str) -> None:
        """``view`` holds pages ``gpages`` (int64, ascending, unique; writer page space) in that
        order; with ``mask`` only True ones are stored. Whole-put numpy passes: hand over, zero
        pages to index entries, hashes, pages equal to the parent's (all pages of
        ``parent_of``, which has one) to references, then the rest to frames."""
        n = len(gpages)
        sel = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
        if sel.shape != (n,):
            raise ValueError(f"{caller}: mask has shape {sel.shape}, expected ({n},)")
        self._hand_over(gpages[sel])
        words = np.frombuffer(view, "<u8").reshape(n, STORE_PAGE // 8)
        nonzero = np.bitwise_or.reduce(words, axis=1) != 0     # ~1.6x faster than any()
        zero_idx = np.flatnonzero(sel & ~nonzero)
        data_idx = np.flatnonzero(sel & nonzero)
        hashes = page_hashes(view, data_idx)
        data_pages = gpages[data_idx]
        self._set_hashes(data_pages, hashes)
        parts = [_runs.make_runs(gpages[zero_idx].astype(np.uint64), ZERO)]
        if parent_of is not None and len(data_idx):
            local = (data_pages - parent_of.base).astype(np.uint64)
            same = self._parent_hash(parent_of.parent_idx, local) == hashes
            if same.any():
                parts.append(self._shifted(self._parent_locate(parent_of.parent_idx, local[same]), parent_of.base))
                data_idx, data_pages = data_idx[~same], data_pages[~same]
        self._add_runs(parts)
        self._store_pages(view, words, data_idx, data_pages.astype(np.uint64))

    def _store_pages(self, view: memoryview, words: np.ndarray, data_idx: np.ndarray,
                     pages: np.ndarray) -> None:
        """Write the pages at rows ``data_idx`` of ``view`` (pages ``pages`` of the writer's page
        space): whole frames straight to a segment, the remainder into the small-put pool."""
        k = len(data_idx)
        full = k - k % FRAME_PAGES
        if full:
            lo = int(data_idx[0])
            if int(data_idx[full - 1]) - lo == full - 1:
                src = view[lo * STORE_PAGE:(lo + full) * STORE_PAGE]       # contiguous: no copy
            else:                                                       # one gather for the put
                src = memoryview(np.take(words, data_idx[:full], axis=0)).cast("B")
            step = BATCH_FRAMES * FRAME_PAGES
            for b in range(0, full, step):
                end = min(b + step, full)
                self._write_frames(src[b * STORE_PAGE:end * STORE_PAGE], pages[b:end])
        if k > full:      # the remainder joins the small-put pool (frames shared across puts)
            rest = data_idx[full:]
            self._pool(words[rest].tobytes(), pages[full:].tolist())

    def _write_frames(self, raw: memoryview, pages: np.ndarray) -> None:
        """Write whole frames of ascending ``pages`` (writer page space; ``raw``, in page
        order) back to back. Pages of different regions are never consecutive there, so
        a run never crosses from one region into the next."""
        nframes = len(pages) // FRAME_PAGES
        fbytes = FRAME_PAGES * STORE_PAGE
        level = self._store.level
        comp = compress_frames(raw[:nframes * fbytes], fbytes, level)
        flens = np.array([FRAME_HEADER.size + len(payload) for _, payload, _ in comp], np.int64)
        total = int(flens.sum())
        try:
            with self._lane() as lane:
                seg, off = self._reserve(lane, total)
                iov: list[bytes | memoryview] = []
                for codec, payload, pcrc in comp:
                    iov += (frame_header(codec, len(payload), pcrc, FRAME_PAGES, seg.id), payload)
                seg.append(off, iov)
        except (OSError, StoreError) as exc:
            self._fail(exc)
            raise self._failed from None
        offs = off + np.concatenate(([0], np.cumsum(flens[:-1])))
        # Runs of all frames at once: break where pages stop being consecutive or a frame starts.
        k = len(pages)
        slot = np.arange(k) % FRAME_PAGES
        brk = np.ones(k, bool)
        brk[1:] = (np.diff(pages.astype(np.int64)) != 1) | (slot[1:] == 0)
        starts = np.flatnonzero(brk)
        runs = np.zeros(len(starts), _runs.RUN_DTYPE)
        runs["page"] = pages[starts]
        runs["n"] = np.diff(np.append(starts, k))
        runs["kind"] = DATA
        runs["slot"] = slot[starts]
        runs["seg"] = seg.id
        runs["off"] = offs[starts // FRAME_PAGES]
        runs["flen"] = flens[starts // FRAME_PAGES]
        with self._lock:
            self._frames += [(seg.id, o, fl, FRAME_PAGES) for o, fl in zip(offs.tolist(), flens.tolist())]
            self._parts.append(runs)
            self._parts_runs += len(runs)
        self._compact()

    @contextlib.contextmanager
    def _lane(self) -> Iterator[int]:
        """Hold a write lane (waits while every lane is in use)."""
        with self._lane_cond:
            while not self._free_lanes:
                self._lane_cond.wait()
            lane = self._free_lanes.pop()
        try:
            yield lane
        finally:
            with self._lane_cond:
                self._free_lanes.append(lane)
                self._lane_cond.notify()

    def _reserve(self, lane: int, nbytes: int) -> tuple[NewSegment, int]:
        """Reserve ``nbytes`` at the end of ``lane``'s segment (rotating it when full).

        Blocks are preallocated PREALLOC_STEP ahead of the end: appends then skip the
        filesystem's block allocation; commit trims what was not used.
        """
        full = None
        with self._lock:
            seg = self._lanes[lane]
            if seg is None or seg.size + nbytes > SEGMENT_MAX_BYTES:
                full = seg
                seg = self._lanes[lane] = self._new_segment()
            off = seg.size
            seg.size += nbytes
            grow_to = 0
            if seg.size > seg.prealloc:
                grow_to = seg.prealloc = seg.size + PREALLOC_STEP
        if full is not None:
            full.finish()                  # this lane's thread was its only appender
        if grow_to:
            seg.preallocate(off, grow_to - off)
        return seg, off

    def _pool(self, raw: bytes | memoryview, pages: list[int]) -> None:
        """Add pages (writer page space) to the shared small-put buffer; write out every full
        frame it yields."""
        ready = []
        with self._buf_lock:
            self._buf += raw
            self._buf_pages += pages
            while len(self._buf_pages) >= FRAME_PAGES:
                ready.append(self._take_buffer(FRAME_PAGES))
        for frame in ready:
            self._write_frame(*frame)

    def _take_buffer(self, npages: int) -> tuple[bytes, np.ndarray]:
        """Detach the first ``npages`` pooled pages (call with _buf_lock held)."""
        raw = bytes(memoryview(self._buf)[:npages * STORE_PAGE])
        del self._buf[:npages * STORE_PAGE]
        pages = np.array(self._buf_pages[:npages], np.uint64)
        del self._buf_pages[:npages]
        return raw, pages

    def _write_frame(self, raw: bytes | memoryview, pages: np.ndarray) -> None:
        npages = len(pages)
        codec, payload, pcrc = compress_payload(raw, self._store.level)
        flen = FRAME_HEADER.size + len(payload)
        try:
            with self._lane() as lane:
                seg, off = self._reserve(lane, flen)
                header = frame_header(codec, len(payload), pcrc, npages, seg.id)
                seg.append(off, [header, payload])
        except (OSError, StoreError) as exc:
            self._fail(exc)
            raise self._failed from None
        runs = _runs.make_runs(pages, DATA, seg.id, off, flen, np.arange(npages))
        with self._lock:
            self._frames.append((seg.id, off, flen, npages))
            self._parts.append(runs)
            self._parts_runs += len(runs)
        self._compact()

    def _compact(self) -> None:
        """Merge the pending run pieces once there are many (call without _lock held).

        Keeps writer memory proportional to the number of runs, not to the number of puts.
        The merging itself is done outside the lock: the caller may be a niced compression
        thread, which would otherwise hold every other put (the fault path's too) behind it.
        Commit merges whatever arrays _merged holds, in any order.
        """
        with self._lock:
            if (len(self._parts) <= COMPACT_PARTS and len(self._zero_pending) <= COMPACT_ZEROS
                    and self._parts_runs <= COMPACT_RUNS):
                return
            parts, zeros = self._parts, self._zero_pending
            self._parts, self._parts_runs, self._zero_pending = [], 0, []
        new = _runs.finish(parts + [_runs.make_runs(np.array(zeros, np.uint64), ZERO)])
        # Merge like a binary counter so each run is re-sorted O(log n) times overall, but
        # never into more than MERGE_MAX_RUNS: the cost of one merge stays bounded.
        while True:
            with self._lock:
                if not (self._merged and len(self._merged[-1]) <= 2 * len(new)
                        and len(self._merged[-1]) + len(new) <= MERGE_MAX_RUNS):
                    self._merged.append(new)
                    return
                other = self._merged.pop()
            new = _runs.finish([other, new])

    def _fail(self, exc: BaseException) -> None:
        """Mark the writer failed; on a full disk give the space back at once.

        Segment files are truncated rather than closed: other threads may still hold their fds.
        """
        if isinstance(exc, StoreError):
            self._failed = exc
        elif is_disk_full(exc):
            self._failed = disk_full_error(self._store.path, exc)
        else:
            self._failed = StoreError(f"writing to store {self._store.path} failed: {exc}")
        if is_disk_full(exc) or "out of disk space" in str(self._failed):
            self._segments.give_back_space()

    def _new_segment(self) -> NewSegment:
        """Open a new segment file (call with _lock held); registered before it exists."""
        with self._store.transaction() as conn:
            cur = conn.execute("INSERT INTO segments(writer_id, state) VALUES (?, 'pending')", (self.id,))
            seg_id = int(cur.lastrowid)
        return self._segments.create(seg_id)

    def inherit(self, idx: int, first_page: int, npages: int) -> None:
        """Pages unchanged since the parent: refer to the parent's entries without reading them."""
        self.inherit_ranges(idx, [first_page], [npages])

    def inherit_ranges(self, idx: int, first_pages: Any, npages: Any) -> None:
        """Several ranges of pages unchanged since the parent (disjoint, any order), in one
        vectorised pass (what a tracked incremental does between scattered dirty pages):
        every range clipped from the parent's map at once, one hash update, one compaction."""
        firsts = np.asarray(first_pages, dtype=np.int64)
        counts = np.asarray(npages, dtype=np.int64)
        keep = counts > 0
        firsts, counts = firsts[keep], counts[keep]
        if len(firsts) == 0:
            return
        order = np.argsort(firsts, kind="stable")
        firsts, counts = firsts[order], counts[order]
        reg = self._region(idx, int(firsts[0]), 0)
        lasts = firsts + counts
        if int(lasts[-1]) > reg.npages or int(lasts.max()) > reg.npages or (firsts[1:] < lasts[:-1]).any():
            raise ValueError(f"region {reg.spec.name!r}: inherited ranges must be disjoint and "
                             f"inside 0..{reg.npages}")
        if reg.parent_idx is None:
            raise StoreError(f"region {reg.spec.name!r} has no counterpart in parent "
                             f"{self._parent.name if self._parent else None!r}: cannot inherit")
        runs, ends, starts = self._parent_indexed_map(reg.parent_idx)
        part = _runs.clip_many(runs, firsts, lasts, ends, starts)
        # Every inherited page keeps the parent's hash (a grandchild compares against them).
        offsets = np.repeat(firsts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
        pages = np.arange(int(counts.sum()), dtype=np.int64) + offsets
        self._hand_over(pages + reg.base)
        self._set_hashes(pages + reg.base, self._parent_hash(reg.parent_idx, pages.astype(np.uint64)))
        self._add_runs([self._shifted(part, reg.base)])

    def mark_lost(self, idx: int, first_page: int, npages: int, reason: str) -> None:
        """Record pages that could not be captured (they read as holes); becomes a warning.
        A region not declared yet gets them when it is."""
        with self._lock:
            if idx >= len(self._regions) and not self._done:
                self._early_lost.append((idx, first_page, npages, reason))
                return
        reg = self._region(idx, first_page, npages)
        with self._lock:
            reg.lost.append((first_page, npages, reason))

    def _lost_warnings(self) -> list[str]:
        """Warnings for the pages marked lost: one per region and reason, or one per reason
        when many regions lost pages for it (a process that exits mid-capture loses pages in
        hundreds of ranges; the ranges themselves stay in each region's ``meta["lost"]``)."""
        by_reason: dict[str, list[tuple[_Region, int, int, int]]] = {}
        for reg in self._regions:
            per: dict[str, list[tuple[int, int]]] = {}
            for first, n, reason in reg.lost:
                per.setdefault(reason, []).append((first, n))
            for reason, ranges in per.items():
                by_reason.setdefault(reason, []).append(
                    (reg, sum(n for _, n in ranges), len(ranges), min(f for f, _ in ranges)))
        out = []
        for reason, regs in by_reason.items():
            if len(regs) > 3:
                names = ", ".join(r.spec.name for r, *_ in regs[:3])
                out.append(f"{sum(n for _, n, _, _ in regs)} pages in {len(regs)} regions ({names}, ...) "
                           f"not captured: {reason}")
                continue
            for reg, total, count, first in regs:
                where = f"from page {first}" if count == 1 else f"in {count} ranges from page {first}"
                out.append(f"region {reg.spec.name} ({reg.spec.start:#x}): {total} pages {where} "
                           f"not captured: {reason}")
        return out

    def put_blob(self, name: str, data: bytes) -> None:
        """Attach opaque bytes (VM device state...) to the snapshot."""
        self._region_check_open()
        self._blobs[name] = bytes(data)

    def _region_check_open(self) -> None:
        if self._done:
            raise StoreError(f"snapshot {self.name!r} writer is already committed or aborted")
        if self._failed is not None:
            raise self._failed

    # ----------------------------------------------------------------- publishing
    def commit(self, meta_updates: dict[str, Any] | None = None) -> SnapshotInfo:
        """Make every byte durable, then publish the snapshot in one catalog transaction.

        On any failure (including an earlier failed put) the writer is aborted and the error raised.
        """
        if self._failed is not None and not self._done:
            self.abort()
            raise self._failed
        self._region_check_open()
        if self._early_lost:
            self.abort()
            raise StoreError(f"internal error: pages marked lost in region {self._early_lost[0][0]}, "
                             "which was never declared")
        try:
            return self._commit(meta_updates or {})
        except BaseException:
            self.abort()
            raise

    def _commit(self, meta_updates: dict[str, Any]) -> SnapshotInfo:
        """commit's steps, in order: nothing is published before every byte is durable, and
        everything is encoded before the catalog transaction (it blocks other writers')."""
        self._write_pool_tail()
        self._seal_segments()
        maps = self._page_maps()
        # A shared window's pages count once, in the region that holds them.
        owned = [runs for reg, runs in zip(self._regions, maps) if reg.shares is None]
        all_runs = _runs.concat(owned)
        info, created = self._info(all_runs, meta_updates)
        # Hundreds of thousands of row objects, none in a cycle: a collection pass over them
        # (and everything else alive) would only slow this down.
        collecting = gc.isenabled()
        gc.disable()
        try:
            rows = self._catalog_rows(maps)
        finally:
            if collecting:
                gc.enable()
        ref_segs = np.unique(all_runs["seg"][all_runs["kind"] == DATA]).tolist()
        self._publish(rows, info, created, ref_segs)
        self._done = True
        self._release()
        return self._store.info(self.name)

    def _write_pool_tail(self) -> None:
        """The small-put pool's last pages become one (short) frame."""
        with self._buf_lock:
            tail = self._take_buffer(len(self._buf_pages)) if self._buf_pages else None
        if tail is not None:
            self._write_frame(*tail)

    def _seal_segments(self) -> None:
        try:
            self._segments.seal()
        except OSError as exc:
            raise (disk_full_error(self._store.path, exc) if is_disk_full(exc) else
                   StoreError(f"syncing store {self._store.path} failed: {exc}")) from None

    def _page_maps(self) -> list[np.ndarray]:
        """Each region's final page map: the run pieces merged and sorted in one pass over
        the writer's page space, then cut at the regions' bounds and renumbered from each
        region's first page; a region that shares another's pages gets its window on the
        source's map."""
        runs = _runs.finish(self._merged + self._parts +
                            [_runs.make_runs(np.array(self._zero_pending, np.uint64), ZERO)])
        bases, _, _ = self._region_arrays()
        if len(runs):
            owner = np.searchsorted(bases, runs["page"].astype(np.int64), side="right") - 1
            runs["page"] -= bases[owner].astype(np.uint64)
            cuts = np.searchsorted(owner, np.arange(1, len(bases)))
        else:
            cuts = np.zeros(max(len(bases) - 1, 0), np.int64)
        maps = np.split(runs, cuts) if len(bases) else []
        for i, reg in enumerate(self._regions):
            if reg.shares is not None:
                maps[i] = _shared_window(maps[reg.shares[0]], reg.shares[1], reg.npages)
        return maps

    def _info(self, all_runs: np.ndarray,
              meta_updates: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
        """The snapshot row's info (sizes, warnings, the caller's metadata) from the runs of
        every region that holds its own pages, and its creation time if the caller gave one
        (the capture's freeze time)."""
        n = all_runs["n"].astype(np.int64)
        data_pages = int(n[all_runs["kind"] == DATA].sum())
        zero_pages = int(n[all_runs["kind"] == ZERO].sum())
        # The frames the snapshot references: stored (written by this writer) or shared.
        d = all_runs[all_runs["kind"] == DATA]
        keys, first = np.unique(frame_keys(d["seg"], d["off"]), return_index=True)
        flens = d["flen"][first].astype(np.int64)
        frames = np.array(self._frames, dtype=np.int64).reshape(-1, 4)
        is_own = np.isin(keys, frame_keys(frames[:, 0], frames[:, 1]))
        merged = {**self._meta, **meta_updates}
        warnings = self._warnings + self._lost_warnings() + list(merged.pop("warnings", []))
        created = merged.pop("created", None)       # the capture's own freeze time, if given
        info = {k: merged.pop(k) for k in _INFO_KEYS if k in merged}
        info.setdefault("kind", "process")
        info.setdefault("duration_s", time.time() - self._started)
        info.update(resident_bytes=(data_pages + zero_pages) * STORE_PAGE,
                    zero_bytes=zero_pages * STORE_PAGE, stored_bytes=int(flens[is_own].sum()),
                    shared_bytes=int(flens[~is_own].sum()), warnings=warnings, meta=merged,
                    region_count=len(self._regions))
        info.setdefault("faults", 0)
        return info, created

    def _catalog_rows(self, maps: list[np.ndarray]) -> dict[str, list[dict[str, Any]]]:
        """The region, hash and blob rows, encoded and checksummed (see _integrity.py)."""
        region_rows, hash_rows, blob_rows = [], [], []
        pieces = np.array(sorted(self._hashes), np.int64)
        # Every region's data and zero pages in one pass (tens of thousands of regions).
        owner = np.repeat(np.arange(len(maps)), [len(m) for m in maps])
        every = _runs.concat(maps)
        n = every["n"].astype(np.int64)
        counts = [np.bincount(owner, weights=np.where(every["kind"] == kind, n, 0),
                              minlength=len(maps)).astype(np.int64).tolist() for kind in (DATA, ZERO)]
        for i, (reg, runs) in enumerate(zip(self._regions, maps)):
            spec = reg.spec
            meta = dict(spec.meta)
            if reg.lost:
                meta["lost"] = [list(x) for x in reg.lost]
            if reg.shares is not None:
                meta["shares"] = {"region": self._regions[reg.shares[0]].spec.name,
                                  "first_page": reg.shares[1]}
            blob, map_crc = _runs.encode(runs)
            row = dict(zip(_integrity.REGION_FIELDS, (
                self.id, i, spec.name, int(spec.start), int(spec.length), spec.perms, int(spec.offset),
                spec.path, spec.kind, int(spec.page_size), counts[0][i], counts[1][i],
                json.dumps(meta), len(runs), map_crc)))
            region_rows.append({**row, "map": blob, "crc": _integrity.region_crc(row)})
            for chunk, arr in self._hash_chunks(reg, pieces):
                row = {"snapshot_id": self.id, "region_idx": i, "chunk": chunk, "algo": ALGO}
                raw = arr.tobytes()
                hash_rows.append({**row, "data": compress_blob(raw), "crc": _integrity.keyed_blob_crc(
                    "hashes", row, _integrity.HASH_FIELDS, raw)})
        for name, raw in self._blobs.items():
            row = {"snapshot_id": self.id, "name": name, "size": len(raw)}
            blob_rows.append({**row, "data": compress_blob(raw), "crc": _integrity.keyed_blob_crc(
                "blobs", row, _integrity.BLOB_FIELDS, raw)})
        return {"regions": region_rows, "hashes": hash_rows, "blobs": blob_rows}

    def _publish(self, rows: dict[str, list[dict[str, Any]]], info: dict[str, Any],
                 created: float | None, ref_segs: list[int]) -> None:
        """One catalog transaction: the frames and sealed segments, the rows, the segment
        references, then the snapshot row flips from pending to committed."""
        with self._store.transaction() as conn:
            conn.executemany("INSERT INTO frames(seg, off, flen, npages, owner) VALUES (?,?,?,?,?)",
                             [(s, o, fl, np_, self.id) for s, o, fl, np_ in self._frames])
            conn.executemany("UPDATE segments SET state='sealed', size=? WHERE id=?",
                             [(seg.size, seg.id) for seg in self._segments.created])
            for table, table_rows in rows.items():
                if table_rows:
                    conn.executemany(f"INSERT INTO {table}({', '.join(table_rows[0])}) "
                                     f"VALUES ({', '.join(':' + k for k in table_rows[0])})", table_rows)
            conn.execute("DELETE FROM seg_refs WHERE snapshot_id=?", (self.id,))
            conn.executemany("INSERT INTO seg_refs VALUES (?,?)", [(self.id, s) for s in ref_segs])
            cur = conn.execute("UPDATE snapshots SET state='committed', lock=NULL, info=?, "
                               "created=coalesce(?, created) WHERE id=? AND state='pending'",
                               (json.dumps(info), created, self.id))
            if cur.rowcount != 1:
                raise StoreError(f"snapshot {self.name!r}: its reservation vanished from the catalog; "
                                 "nothing published")
            _integrity.seal_snapshot(conn, self.id)
            conn.execute("UPDATE counters SET value=value+1 WHERE name='generation'")

    def abort(self) -> None:
        """Discard everything written: nothing becomes visible; files are deleted now or by gc."""
        if self._done:
            return
        self._done = True
        self._segments.discard()
        try:
            with self._store.transaction() as conn:
                conn.execute("DELETE FROM snapshots WHERE id=? AND state='pending'", (self.id,))
                conn.execute("DELETE FROM seg_refs WHERE snapshot_id=?", (self.id,))
                conn.execute("DELETE FROM segments WHERE writer_id=? AND state='pending'", (self.id,))
        except StoreError:
            pass  # e.g. disk still full: the pending row is reclaimed by gc once our lock is gone
        self._release()

    def _release(self) -> None:
        self._segments.close()
        if self._lock_fd >= 0:
            try:
                os.unlink(self._store.locks_dir / self._lock_name)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> "SnapshotWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is not None or not self._done:
            self.abort()


def _shared_window(source: np.ndarray, first: int, npages: int) -> np.ndarray:
    """The runs of pages [first, first+npages) of a source map, renumbered from 0."""
    window = _runs.clip(source, first, first + npages)
    window["page"] -= np.uint64(first)
    return window
