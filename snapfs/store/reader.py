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
from snapfs.store import _runs
from snapfs.store._format import PAGE, FrameError, decode_frame, decompress_blob
from snapfs.store.model import DATA, RegionInfo, SnapshotInfo



class SnapshotReader:
    """Reads one committed snapshot. Thread-safe; holds a bounded cache of decoded frames."""

    def __init__(self, store: Any, info: SnapshotInfo, rows: list[Any]) -> None:
        """Built by Store.open_snapshot from the snapshot's info and region rows (read together)."""
        self._store = store
        self.info = info
        self.regions = [
            RegionInfo(index=r["idx"], name=r["name"], start=r["start"], length=r["length"],
                       perms=r["perms"], offset=r["offset"], path=r["path"], kind=r["kind"],
                       page_size=r["page_size"], data_pages=r["data_pages"],
                       zero_pages=r["zero_pages"], meta=json.loads(r["meta"]))
            for r in rows]
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
                    rows = self._store.query("SELECT nruns, map FROM regions WHERE snapshot_id=? AND idx=?",
                                             (self.info.id, region_index))
                    region = self.regions[region_index]
                    if not rows:
                        self._check_not_removed()
                    try:
                        if not rows:
                            raise FrameError("region row missing")
                        runs = _runs.decode(rows[0]["map"], rows[0]["nruns"])
                    except FrameError as exc:
                        raise StoreCorrupt(f"snapshot {self.info.name!r} region {region.name!r}: page map "
                                           f"is damaged ({exc.reason}): run `snapfs check`") from None
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
            raw = self._store.read_segment(seg, off, flen)
        except StoreCorrupt:
            self._check_not_removed()
            raise
        try:
            data, _ = decode_frame(raw, seg)
        except FrameError as exc:
            self._check_not_removed()       # gc may have reclaimed a removed snapshot's frames
            region = self.regions[region_index]
            raise StoreCorrupt(
                f"damaged frame in {self._store.segment_path(seg)} at offset {off} ({exc.reason}): "
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
        first = offset // PAGE
        last = (offset + size + PAGE - 1) // PAGE
        out = np.empty((last - first, PAGE), np.uint8)
        self.read_pages_into(region_index, first, out)
        start = offset - first * PAGE
        return out.reshape(-1)[start:start + size].tobytes()

    def read_pages_into(self, region_index: int, first_page: int, dest: np.ndarray) -> None:
        """Fill ``dest`` (a writable ``(n, 4096)`` uint8 array) with pages ``first_page..+n``.

        One copy straight from the decoded frames (numpy releases the GIL while copying); zeros
        for holes and zero pages. For readers of large ranges (the vmstate view, FUSE).
        Raises StoreCorrupt when a frame covering the range is damaged.
        """
        last = first_page + dest.shape[0]
        runs, starts, ends = self._indexed_map(region_index)
        sel = _runs.overlapping(runs, first_page, last, ends, starts)
        pos = first_page
        for page, n, _kind, slot, seg, off, flen in sel[sel["kind"] == DATA].tolist():
            lo, hi = max(page, first_page), min(page + n, last)
            if lo > pos:
                dest[pos - first_page:lo - first_page] = 0
            frame = self._frame(seg, off, flen, region_index)
            dest[lo - first_page:hi - first_page] = np.frombuffer(
                frame, np.uint8, count=(hi - lo) * PAGE, offset=(slot + lo - page) * PAGE
            ).reshape(-1, PAGE)
            pos = hi
        if pos < last:
            dest[pos - first_page:] = 0

    def runs(self, region_index: int) -> Iterator[tuple[int, int, int]]:
        """(first_page, npages, kind) over the whole region, ascending; kind HOLE/ZERO/DATA."""
        region = self.regions[region_index]
        return _runs.iter_kinds(self._map(region_index), region.length // PAGE)

    def data_extents(self, region_index: int) -> list[tuple[int, int]]:
        """(offset, length) in bytes of the region's DATA runs."""
        return [(p * PAGE, n * PAGE) for p, n, k in self.runs(region_index) if k == DATA]

    def blob(self, name: str) -> bytes | None:
        """The blob ``name`` put by the writer, or None."""
        rows = self._store.query("SELECT data FROM blobs WHERE snapshot_id=? AND name=?", (self.info.id, name))
        if not rows:
            return None
        try:
            return decompress_blob(rows[0]["data"])
        except FrameError as exc:
            raise StoreCorrupt(f"snapshot {self.info.name!r}: blob {name!r} is damaged ({exc.reason})") from None

    def close(self) -> None:
        """Release the loaded page maps (the store owns files and the frame cache)."""
        with self._map_lock:
            self._maps = [None] * len(self.regions)

    def __enter__(self) -> "SnapshotReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
