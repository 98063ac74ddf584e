"""Run maps: per region, where each page's bytes are.

A map is a numpy structured array of runs sorted by ``page``: a DATA run says pages
``page..page+n-1`` are slots ``slot..slot+n-1`` of the frame at (``seg``, ``off``) whose total
length is ``flen``; a ZERO run says the pages are all zero. Pages covered by no run are HOLES.
Stored in the catalog as one zstd-compressed blob per region (31 bytes per run before
compression: a fully populated 64 GiB region of contiguous pages is ~512 K runs, ~16 MB).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from snapfs.store._format import (FRAME_HEADER, FRAME_PAGES, SEGMENT_HEADER, FrameError, compress_blob,
                                  crc32, decompress_blob)
from snapfs.ranges import run_starts
from snapfs.store.model import DATA, HOLE, ZERO

RUN_DTYPE = np.dtype(
    [("page", "<u8"), ("n", "<u4"), ("kind", "u1"), ("slot", "<u2"),
     ("seg", "<u4"), ("off", "<u8"), ("flen", "<u4")]
)
assert RUN_DTYPE.itemsize == 31

EMPTY = np.zeros(0, RUN_DTYPE)


def make_runs(pages: np.ndarray, kind: int, seg: int = 0, off: int = 0, flen: int = 0,
              slots: np.ndarray | None = None) -> np.ndarray:
    """Runs for sorted-by-slot ``pages`` (one frame, or ZERO pages): breaks where not consecutive."""
    pages = np.asarray(pages, dtype=np.uint64)
    if len(pages) == 0:
        return EMPTY
    if slots is None:
        slots = np.arange(len(pages), dtype=np.int64) if kind == DATA else np.zeros(len(pages), np.int64)
    order = np.argsort(pages, kind="stable")
    pages = pages[order]
    slots = np.asarray(slots, dtype=np.int64)[order]
    brk = run_starts(pages)
    if kind == DATA:
        brk |= run_starts(slots)
    starts = np.flatnonzero(brk)
    out = np.zeros(len(starts), RUN_DTYPE)
    out["page"] = pages[starts]
    out["n"] = np.diff(np.append(starts, len(pages)))
    out["kind"] = kind
    if kind == DATA:
        out["slot"] = slots[starts]
        out["seg"], out["off"], out["flen"] = seg, off, flen
    return out


def _joined(maps: list[np.ndarray]) -> np.ndarray:
    """Run arrays back to back as (n, 31) bytes, writable. numpy copies, concatenates and
    gathers structured arrays field by field (~50 ns a run) and promotes their dtypes pairwise
    (~25 us an array: seconds for the maps of a target with tens of thousands of mappings);
    as plain bytes they go row by row, ~5x faster. Many small arrays join fastest as bytes
    objects, a few large ones as array views."""
    def exact(m: np.ndarray) -> np.ndarray:
        return m if m.dtype == RUN_DTYPE and m.flags.c_contiguous else np.ascontiguousarray(m, RUN_DTYPE)
    if len(maps) <= 16:
        flat = np.concatenate([exact(m).view(np.uint8) for m in maps]) if maps else np.zeros(0, np.uint8)
    else:
        flat = np.frombuffer(bytearray().join(exact(m).tobytes() for m in maps), np.uint8)
    return flat.reshape(-1, RUN_DTYPE.itemsize)


def _records(rows: np.ndarray) -> np.ndarray:
    """(n, 31) bytes as runs (a view)."""
    return rows.reshape(-1).view(RUN_DTYPE)


def finish(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate, sort and coalesce run arrays into a region's final map (a new array)."""
    rows = _joined(parts)
    if len(rows) == 0:
        return EMPTY
    rows = np.take(rows, np.argsort(_records(rows)["page"], kind="stable"), axis=0)
    runs = _records(rows)
    # Merge a run into its predecessor when it continues it exactly (same frame, next slot,
    # or both ZERO): done in one vectorised pass.
    end = runs["page"][:-1] + runs["n"][:-1]
    cont = (end == runs["page"][1:]) & (runs["kind"][1:] == runs["kind"][:-1])
    data_cont = (runs["seg"][1:] == runs["seg"][:-1]) & (runs["off"][1:] == runs["off"][:-1]) & (
        runs["slot"][1:].astype(np.int64) == runs["slot"][:-1].astype(np.int64) + runs["n"][:-1])
    cont &= (runs["kind"][1:] == ZERO) | data_cont
    if not cont.any():
        return runs
    head = np.ones(len(runs), bool)
    head[1:] = ~cont
    starts = np.flatnonzero(head)
    merged = _records(np.take(rows, starts, axis=0))
    merged["n"] = np.add.reduceat(runs["n"].astype(np.uint64), starts).astype(np.uint32)
    return merged


def concat(maps: list[np.ndarray]) -> np.ndarray:
    """Run arrays concatenated (a new array)."""
    return _records(_joined(maps)) if maps else EMPTY


def encode(runs: np.ndarray) -> tuple[bytes, int]:
    """Serialise a map for the catalog: (compressed blob, CRC32 of the raw runs)."""
    # (ascontiguousarray converts even a matching structured array field by field: slow for
    # the tens of thousands of small maps of a target with as many mappings)
    raw = runs.tobytes() if runs.dtype == RUN_DTYPE else np.ascontiguousarray(runs, RUN_DTYPE).tobytes()
    return compress_blob(raw), crc32(raw)


def decode(blob: bytes, count: int, crc: int | None = None) -> np.ndarray:
    """Inverse of :func:`encode`; raises FrameError when the blob is damaged: it does not
    decode, has not ``count`` runs, or (given ``crc``) its runs are not the ones written."""
    raw = decompress_blob(blob)
    if len(raw) != count * RUN_DTYPE.itemsize:
        raise FrameError("run map length mismatch")
    if crc is not None and crc32(raw) != crc:
        raise FrameError("checksum mismatch")
    return np.frombuffer(raw, RUN_DTYPE)


def validate(runs: np.ndarray, npages: int, disjoint: bool = False) -> None:
    """Raise FrameError unless ``runs`` is a well-formed map of a region of ``npages`` pages:
    known kinds, no empty run, sorted, inside the region, DATA slots inside one frame and
    frame references that can exist. With ``disjoint`` runs must not overlap either (maps
    written before PAGEMAP_SCAN's duplicates were fixed may repeat a page; reads take one)."""
    if len(runs) == 0:
        return
    kind, n = runs["kind"], runs["n"].astype(np.int64)
    starts = runs["page"].astype(np.int64)
    ends = starts + n
    data = kind == DATA
    if not ((kind == ZERO) | data).all() or (n <= 0).any():
        raise FrameError("a run has no pages or an unknown kind")
    if (np.diff(starts) < 0).any() or (runs["page"] >= np.uint64(1 << 52)).any():
        raise FrameError("runs out of order")
    if disjoint and (starts[1:] < ends[:-1]).any():
        raise FrameError("runs overlap (a page mapped twice)")
    if int(ends.max()) > npages:
        raise FrameError("a run lies beyond the end of the region")
    if data.any():
        d = runs[data]
        if ((d["slot"].astype(np.int64) + d["n"]) > FRAME_PAGES).any() or \
                (d["flen"] <= FRAME_HEADER.size).any() or (d["off"] < SEGMENT_HEADER.size).any():
            raise FrameError("a frame reference is impossible")


def ends_of(runs: np.ndarray) -> np.ndarray:
    """End page (exclusive) of every run, for :func:`overlapping` (compute once per map)."""
    return runs["page"] + runs["n"]


def overlapping(runs: np.ndarray, first: int, last: int, ends: np.ndarray | None = None,
                starts: np.ndarray | None = None) -> np.ndarray:
    """The runs that intersect pages [first, last) (runs sorted, non-overlapping).

    Pass precomputed ``ends`` (and ``starts`` = runs["page"] as a contiguous array) on hot paths.
    """
    if len(runs) == 0:
        return runs
    if ends is None:
        ends = ends_of(runs)
    if starts is None:
        starts = runs["page"]
    lo = int(np.searchsorted(ends, first, side="right"))
    hi = int(np.searchsorted(starts, last, side="left"))
    return runs[lo:hi]


def clip(runs: np.ndarray, first: int, last: int, ends: np.ndarray | None = None,
         starts: np.ndarray | None = None) -> np.ndarray:
    """Runs cut to pages [first, last) (DATA slots shifted accordingly).

    ``ends``/``starts`` as for :func:`overlapping`, precomputed on hot paths."""
    sel = overlapping(runs, first, last, ends, starts).copy()
    if len(sel) == 0:
        return sel
    start = sel["page"].astype(np.int64)
    end = start + sel["n"]
    new_start = np.maximum(start, first)
    new_end = np.minimum(end, last)
    shift = new_start - start
    data = sel["kind"] == DATA
    sel["slot"][data] = (sel["slot"][data].astype(np.int64) + shift[data]).astype(np.uint16)
    sel["page"] = new_start
    sel["n"] = new_end - new_start
    return sel


def clip_many(runs: np.ndarray, firsts: np.ndarray, lasts: np.ndarray, ends: np.ndarray | None = None,
              starts: np.ndarray | None = None) -> np.ndarray:
    """:func:`clip` for many page ranges [firsts[i], lasts[i]) at once, in one vectorised pass
    (a tracked child inherits thousands of ranges between its scattered dirty pages).

    Ranges must be ascending and disjoint; the result is then non-overlapping, sorted
    unless some runs are cut (those come last)."""
    firsts = np.asarray(firsts, dtype=np.int64)
    lasts = np.asarray(lasts, dtype=np.int64)
    if len(runs) == 0 or len(firsts) == 0:
        return EMPTY
    if ends is None:
        ends = ends_of(runs).astype(np.int64)
    if starts is None:
        starts = runs["page"].astype(np.int64)
    # Runs lying wholly inside one range are kept as they are (the usual case when the
    # ranges are everything but a few pages): one selection, no per-field arithmetic.
    r = np.searchsorted(firsts, starts, side="right") - 1
    whole = (r >= 0) & (ends <= lasts[np.maximum(r, 0)])
    if whole.all():
        return runs.copy()
    cut = _clip_each(runs[~whole], firsts, lasts, ends[~whole], starts[~whole])
    return np.concatenate([runs[whole], cut]) if whole.any() else cut


def _clip_each(runs: np.ndarray, firsts: np.ndarray, lasts: np.ndarray, ends: np.ndarray,
               starts: np.ndarray) -> np.ndarray:
    """Every (run, range) intersection, clipped (the general case of :func:`clip_many`)."""
    lo = np.searchsorted(ends, firsts, side="right")
    hi = np.searchsorted(starts, lasts, side="left")
    count = np.maximum(hi - lo, 0)
    total = int(count.sum())
    if total == 0:
        return EMPTY
    which = np.repeat(np.arange(len(firsts)), count)            # range of each output run
    src = np.arange(total) - np.repeat(np.cumsum(count) - count, count) + np.repeat(lo, count)
    sel = runs[src]                                              # fancy indexing: a copy
    start = sel["page"].astype(np.int64)
    new_start = np.maximum(start, firsts[which])
    new_end = np.minimum(start + sel["n"], lasts[which])
    data = sel["kind"] == DATA
    sel["slot"][data] = (sel["slot"][data].astype(np.int64) + (new_start - start)[data]).astype(np.uint16)
    sel["page"] = new_start
    sel["n"] = new_end - new_start
    return sel


def locate(runs: np.ndarray, pages: np.ndarray, ends: np.ndarray | None = None) -> np.ndarray:
    """Runs pointing at the parent's bytes for sorted ``pages``, all DATA in ``runs``.

    Consecutive pages inside the same parent run become one run (no per-page records).
    ``ends`` = :func:`ends_of` (runs) as int64, precomputed by callers that locate often.
    """
    if len(pages) == 0:
        return EMPTY
    pages = pages.astype(np.int64)
    if ends is None:
        ends = ends_of(runs).astype(np.int64)
    src = np.searchsorted(ends, pages, side="right")
    brk = np.ones(len(pages), bool)
    brk[1:] = (np.diff(pages) != 1) | (np.diff(src) != 0)
    starts = np.flatnonzero(brk)
    out = runs[src[starts]].copy()
    first = pages[starts]
    out["slot"] = (out["slot"].astype(np.int64) + first - out["page"].astype(np.int64)).astype(np.uint16)
    out["page"] = first
    out["n"] = np.diff(np.append(starts, len(pages)))
    return out


def iter_kinds(runs: np.ndarray, npages: int) -> Iterator[tuple[int, int, int]]:
    """(first_page, npages, kind) covering [0, npages), HOLEs included, same kinds coalesced."""
    cur_start, cur_n, cur_kind = 0, 0, HOLE
    pos = 0
    pieces = zip(runs["page"].tolist(), runs["n"].tolist(), runs["kind"].tolist())
    for page, n, kind in pieces:
        for start, length, k in ((pos, page - pos, HOLE), (page, n, kind)):
            if length <= 0:
                continue
            if k == cur_kind and cur_start + cur_n == start:
                cur_n += length
            else:
                if cur_n:
                    yield cur_start, cur_n, cur_kind
                cur_start, cur_n, cur_kind = start, length, k
        pos = page + n
    if npages > pos:
        if cur_kind == HOLE and cur_start + cur_n == pos:
            cur_n += npages - pos
        else:
            if cur_n:
                yield cur_start, cur_n, cur_kind
            cur_start, cur_n, cur_kind = pos, npages - pos, HOLE
    if cur_n:
        yield cur_start, cur_n, cur_kind
