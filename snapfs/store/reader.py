"""SnapshotReader: random reads of a committed snapshot, run maps loaded lazily per region.

Decoded frames live in the store-wide :class:`FrameCache` (frames are shared by parents and
children, and a mount opens many readers: one bounded cache serves them all).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Iterator

import numpy as np

from snapfs.errors import SnapshotNotFound, StoreCorrupt
from snapfs.store import _integrity, _runs
from snapfs.store._format import STORE_PAGE, FrameError, decode_frame, decompress_blob
from snapfs.store.model import DATA, RegionInfo, SnapshotInfo
from snapfs.store.segments import frame_keys

# Up to this many runs, a range read loops over them in Python; more: vectorised over pages.
_FEW_RUNS = 8


class SnapshotReader:
    """Reads one committed snapshot. Thread-safe; holds a bounded cache of decoded frames."""

    def __init__(self, store: Any, info: SnapshotInfo, rows: list[Any]) -> None:
        """Built by Store.open_snapshot from the snapshot's info and its verified region rows
        (read together)."""
        self._store = store
        self.info = info
        self._rows = rows
        try:
            self.regions = [
                RegionInfo(index=r["idx"], name=r["name"], start=r["start"], length=r["length"],
                           perms=r["perms"], offset=r["offset"], path=r["path"], kind=r["kind"],
                           page_size=r["page_size"], data_pages=r["data_pages"],
                           zero_pages=r["zero_pages"], meta=json.loads(r["meta"]))
                for r in rows]
        except (TypeError, ValueError):          # format 1 rows are not checksummed
            raise StoreCorrupt(f"snapshot {info.name!r}: a region row is damaged: run `snapfs check`") from None
        # Per region, once loaded: (runs, run starts, run ends) as contiguous arrays.
        self._maps: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * len(self.regions)
        self._map_lock = threading.Lock()

    def _map(self, region_index: int) -> np.ndarray:
        return self._indexed_map(region_index)[0]

    def _indexed_map(self, region_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        entry = self._maps[region_index]
        if entry is None:
            with self._map_lock:
                entry = self._maps[region_index]
                if entry is None:
                    runs = self._store.load_map(self.info, self._rows[region_index])
                    entry = (runs, np.ascontiguousarray(runs["page"]).astype(np.int64),
                             _runs.ends_of(runs).astype(np.int64))
                    self._maps[region_index] = entry
        return entry

    def _check_not_removed(self) -> None:
        if not self._store.query("SELECT 1 FROM snapshots WHERE id=?", (self.info.id,)):
            raise SnapshotNotFound(f"snapshot {self.info.name!r} was removed from store "
                                   f"{self._store.path} while open")

    def _frame(self, seg: int, off: int, flen: int, region_index: int) -> bytes:
        data = self._store.frame_cache.get((seg, off))
        if data is not None:
            return data
        try:
            raw = self._store.segments.pread(seg, off, flen)
        except StoreCorrupt:
            self._check_not_removed()
            raise
        try:
            data, _ = decode_frame(raw, seg)
        except FrameError as exc:
            self._check_not_removed()       # gc may have reclaimed a removed snapshot's frames
            region = self.regions[region_index]
            raise StoreCorrupt(
                f"damaged frame in {self._store.segments.path(seg)} at offset {off} ({exc.reason}): "
                f"snapshot {self.info.name!r} region {region.name!r} cannot be read there; "
                "run `snapfs check --verify-data`") from None
        self._store.frame_cache.put((seg, off), data)
        return data

    def read(self, region_index: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of a region (short at its end); zeros for holes/zero pages.

        Raises StoreCorrupt when a frame covering the range is damaged (never wrong bytes).
        """
        region = self.regions[region_index]
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        size = min(size, region.length - offset)
        if size <= 0:
            return b""
        first = offset // STORE_PAGE
        last = (offset + size + STORE_PAGE - 1) // STORE_PAGE
        out = np.empty((last - first, STORE_PAGE), np.uint8)
        self.read_pages_into(region_index, first, out)
        start = offset - first * STORE_PAGE
        return out.reshape(-1)[start:start + size].tobytes()

    def read_pages_into(self, region_index: int, pages: int | np.ndarray, dest: np.ndarray,
                        rows: np.ndarray | None = None) -> None:
        """Copy pages of a region into rows of ``dest``, straight from the decoded frames.

        ``dest`` is a writable uint8 array of 4096-byte rows (strided, even overlapping, views
        welcome). With ``pages`` an int, ``dest`` receives pages ``pages..pages+len(dest)-1``,
        one per row. With ``pages`` an ascending array of page numbers, page ``pages[i]`` goes to
        ``dest[rows[i]]`` (the vmstate view fills its records' payloads this way). Holes and
        zero pages become zeros. One copy per byte; numpy releases the GIL while copying.
        Raises StoreCorrupt when a frame covering the range is damaged.
        """
        if isinstance(pages, (int, np.integer)):
            self._read_range(region_index, int(pages), dest)
            return
        if rows is None or len(rows) != len(pages):
            raise ValueError("pages given as an array need one row each")
        if len(pages) == 0:
            return
        self._scatter(region_index, np.asarray(pages, np.int64), dest, np.asarray(rows, np.int64))

    def _read_range(self, region_index: int, first: int, dest: np.ndarray) -> None:
        """Pages ``first..first+len(dest)-1`` into the rows of ``dest``."""
        count = dest.shape[0]
        runs, starts, ends = self._indexed_map(region_index)
        sel = _runs.overlapping(runs, first, first + count, ends, starts)
        if len(sel) > _FEW_RUNS:  # many runs: vectorised
            rows = np.arange(count, dtype=np.int64)
            self._scatter(region_index, rows + first, dest, rows, sel)
            return
        pos = first  # a few runs (small reads): a plain loop costs less than the set-up
        for page, n, _kind, slot, seg, off, flen in sel[sel["kind"] == DATA].tolist():
            lo, hi = max(page, first), min(page + n, first + count)
            if lo > pos:
                dest[pos - first:lo - first] = 0
            frame = self._frame(seg, off, flen, region_index)
            dest[lo - first:hi - first] = np.frombuffer(
                frame, np.uint8, count=(hi - lo) * STORE_PAGE, offset=(slot + lo - page) * STORE_PAGE
            ).reshape(-1, STORE_PAGE)
            pos = hi
        if pos < first + count:
            dest[pos - first:] = 0

    def _scatter(self, region_index: int, pages: np.ndarray, dest: np.ndarray, rows: np.ndarray,
                 sel: np.ndarray | None = None) -> None:
        """Page ``pages[i]`` (ascending) into ``dest[rows[i]]``; ``sel``: the runs overlapping
        them, if known."""
        if sel is None:
            runs, starts, ends = self._indexed_map(region_index)
            sel = _runs.overlapping(runs, int(pages[0]), int(pages[-1]) + 1, ends, starts)
        data = sel[sel["kind"] == DATA]
        # The DATA run holding each page (holes and zero pages are in none).
        run_first = data["page"].astype(np.int64)
        k = np.searchsorted(run_first, pages, "right") - 1
        inside = k >= 0
        inside[inside] = pages[inside] < (run_first + data["n"])[k[inside]]
        if not inside.all():
            _zero_rows(dest, rows[~inside])
            pages, rows, k = pages[inside], rows[inside], k[inside]
            if len(pages) == 0:
                return
        slot = data["slot"][k].astype(np.int64) + (pages - run_first[k])
        frame_key = frame_keys(data["seg"], data["off"])[k]
        # Python loops once per frame (32 pages), never per page or run: zero pages between
        # data pages cut a frame's pages into many short runs. Whether a frame's slots are
        # consecutive and its rows evenly spaced (then slices copy, without index arrays) is
        # worked out for all pages at once: counts of breaks, compared per frame.
        heads = np.flatnonzero(np.diff(frame_key, prepend=-1)).tolist()
        first_run = k[heads].tolist()
        slot_breaks = np.concatenate(([0], np.cumsum(np.diff(slot) != 1))).tolist()
        row_step = np.diff(rows)
        row_changes = np.concatenate(([0, 0], np.cumsum(row_step[1:] != row_step[:-1]))).tolist()
        slots, row_at = slot.tolist(), rows.tolist()
        segs, offs, flens = data["seg"].tolist(), data["off"].tolist(), data["flen"].tolist()
        for a, b, j in zip(heads, heads[1:] + [len(pages)], first_run):  # pages a..b-1: one frame
            frame = np.frombuffer(self._frame(segs[j], offs[j], flens[j], region_index),
                                  np.uint8).reshape(-1, STORE_PAGE)
            n, s0, r0 = b - a, slots[a], row_at[a]
            src = frame[s0:s0 + n] if slot_breaks[b - 1] == slot_breaks[a] else frame[slot[a:b]]
            step = row_at[a + 1] - r0 if n > 1 else 1
            if step > 0 and (n <= 2 or row_changes[b - 1] == row_changes[a + 1]):
                dest[r0:r0 + step * (n - 1) + 1:step] = src
            else:
                dest[rows[a:b]] = src

    def runs(self, region_index: int) -> Iterator[tuple[int, int, int]]:
        """(first_page, npages, kind) over the whole region, ascending; kind HOLE/ZERO/DATA."""
        region = self.regions[region_index]
        return _runs.iter_kinds(self._map(region_index), region.length // STORE_PAGE)

    def data_extents(self, region_index: int) -> list[tuple[int, int]]:
        """(offset, length) in bytes of the region's DATA runs."""
        return [(p * STORE_PAGE, n * STORE_PAGE) for p, n, k in self.runs(region_index) if k == DATA]

    def blob(self, name: str) -> bytes | None:
        """The blob ``name`` put by the writer, or None."""
        crc = "crc" if self._store.checksums else "NULL AS crc"
        rows = self._store.query(f"SELECT snapshot_id, name, size, data, {crc} FROM blobs "
                                 "WHERE snapshot_id=? AND name=?", (self.info.id, name))
        if not rows:
            return None
        row = rows[0]
        try:
            raw = decompress_blob(row["data"])
            if self._store.checksums and row["crc"] != _integrity.keyed_blob_crc(
                    "blobs", row, _integrity.BLOB_FIELDS, raw):
                raise FrameError("checksum mismatch")
        except (FrameError, TypeError) as exc:
            reason = exc.reason if isinstance(exc, FrameError) else "bad row"
            raise StoreCorrupt(f"snapshot {self.info.name!r}: blob {name!r} is damaged ({reason}): "
                               "run `snapfs check`") from None
        return raw

    def close(self) -> None:
        """Release the loaded page maps (the store owns files and the frame cache)."""
        with self._map_lock:
            self._maps = [None] * len(self.regions)

    def __enter__(self) -> "SnapshotReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _zero_rows(dest: np.ndarray, rows: np.ndarray) -> None:
    """``dest[rows] = 0``; one slice when ``rows`` are consecutive (a hole, a zero run)."""
    if len(rows) and int(rows[-1] - rows[0]) == len(rows) - 1:
        dest[int(rows[0]):int(rows[-1]) + 1] = 0
    else:
        dest[rows] = 0
