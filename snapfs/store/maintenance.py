"""gc and check: reclaiming unreferenced space and verifying the store.

gc works in one catalog transaction (BEGIN IMMEDIATE, so no writer commits meanwhile). It
punches holes for dead frames before committing (a crash leaves index rows of unreferenced
frames: punched again next time) and deletes whole segment files after committing (a crash
leaves files without rows: deleted next time). What is live comes from decoding every committed
page map, never from bookkeeping alone; a live writer's segments (flock held on its lock file)
and the segments it builds on (its parent's) are left alone; offsets of live frames never
move, so running readers are unaffected. A damaged page map stops gc: it cannot know what that
snapshot still needs.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import defaultdict
import sqlite3
from typing import TYPE_CHECKING, Any

import numpy as np

from snapfs.errors import StoreCorrupt

from snapfs.store import _integrity, _runs
from snapfs.store._format import (STORE_PAGE, SEGMENT_HEADER, FrameError, check_segment_header, decode_frame,
                                  decompress_blob)
from snapfs.store.model import DATA
from snapfs.store.segments import frame_keys, key_parts

if TYPE_CHECKING:
    from snapfs.store.store import Store

ORPHAN_LOCK_AGE_S = 60.0      # a *.tmp lock younger than this may belong to a writer starting up


def _live_frames_by_segment(store: Store, conn: sqlite3.Connection) -> dict[int, np.ndarray]:
    """seg -> (n, 2) array of (offset, length) of the frames some page map references, sorted.

    Every region row counts, whatever its snapshot row says (a damaged state must not free
    a snapshot's frames); a row or map that fails verification stops gc."""
    extra = "map_crc, crc" if store.checksums else "NULL AS map_crc, NULL AS crc"
    refs = []
    for row in conn.execute(f"SELECT {', '.join(_integrity.REGION_FIELDS[:-1])}, map, {extra} FROM regions"):
        try:
            if store.checksums and row["crc"] != _integrity.region_crc(row):
                raise FrameError("its region row's checksum does not match")
            runs = _runs.decode(row["map"], row["nruns"], _integrity.map_crc(row, store.checksums))
            _runs.validate(runs, row["length"] // STORE_PAGE)
        except (FrameError, TypeError) as exc:
            reason = exc.reason if isinstance(exc, FrameError) else "bad row"
            raise StoreCorrupt(f"a page map in store {store.path} is damaged ({reason}): gc reclaims "
                               "nothing until `snapfs check` is clean") from None
        d = runs[runs["kind"] == DATA]
        refs.append(np.stack([d["seg"].astype(np.int64), d["off"].astype(np.int64),
                              d["flen"].astype(np.int64)], axis=1))
    if not refs:
        return {}
    live = np.unique(np.concatenate(refs), axis=0)          # sorted by segment, then offset
    bounds = np.flatnonzero(np.diff(live[:, 0])) + 1
    return {int(part[0, 0]): part[:, 1:] for part in np.split(live, bounds) if len(part)}


def _overlaps_live(off: int, flen: int, live: np.ndarray) -> bool:
    """True if [off, off+flen) overlaps a live frame of its segment: a damaged frame index
    row must never make gc free bytes a snapshot still reads (the segment itself checks that
    the range holds one of its frames)."""
    if not len(live):
        return False
    i = int(np.searchsorted(live[:, 0], off, side="right"))
    return (i > 0 and live[i - 1, 0] + live[i - 1, 1] > off) or (i < len(live) and live[i, 0] < off + flen)


def gc(store: Store) -> dict[str, Any]:
    """Delete dead writers' leftovers and unreferenced frames; returns what was reclaimed.

    Keys: pending_removed (names), segments_deleted, frames_freed, bytes_reclaimed, live_writers.
    """
    delete_files: list[int] = []
    punch: list[tuple[int, int, int]] = []
    pending_removed: list[str] = []
    dead_locks: list[str] = []
    live_writers = 0
    reclaimed = 0
    with store.transaction() as conn:
        files = store.segments.listing()
        live_pending = set()
        for row in conn.execute("SELECT id, name, lock FROM snapshots WHERE state='pending'").fetchall():
            if store.writer_alive(row["lock"]):
                live_pending.add(row["id"])
                live_writers += 1
                continue
            pending_removed.append(row["name"])
            if row["lock"]:
                dead_locks.append(row["lock"])
            conn.execute("DELETE FROM snapshots WHERE id=?", (row["id"],))
            conn.execute("DELETE FROM seg_refs WHERE snapshot_id=?", (row["id"],))
        segs = {r["id"]: r for r in conn.execute("SELECT id, writer_id, state FROM segments").fetchall()}
        # What committed maps reference is the truth (decoded, not taken from seg_refs), plus
        # the segments live writers build on (their parent's, pinned in seg_refs at begin).
        live = _live_frames_by_segment(store, conn)
        building_on = {r[0] for r in conn.execute(
            "SELECT DISTINCT seg FROM seg_refs JOIN snapshots s ON s.id=snapshot_id "
            "WHERE s.state='pending'").fetchall()}
        referenced = set(live) | building_on
        for seg_id, seg in segs.items():
            # Never a referenced segment, whatever its row says; one whose state is neither
            # (a damaged row) is left alone.
            dead = seg_id not in referenced and (
                seg["state"] == "sealed" or (seg["state"] == "pending" and seg["writer_id"] not in live_pending))
            if dead:
                conn.execute("DELETE FROM segments WHERE id=?", (seg_id,))
                conn.execute("DELETE FROM frames WHERE seg=?", (seg_id,))
                delete_files.append(seg_id)
        delete_files += [seg_id for seg_id in files if seg_id not in segs]
        for seg_id in referenced - building_on:
            if seg_id not in segs:
                continue
            rows = np.array([tuple(r) for r in conn.execute("SELECT off, flen FROM frames WHERE seg=?",
                                                             (seg_id,)).fetchall()], np.int64).reshape(-1, 2)
            live_offs = live.get(seg_id, np.zeros((0, 2), np.int64))[:, 0]
            dead = rows[~np.isin(rows[:, 0], live_offs)].tolist()
            conn.executemany("DELETE FROM frames WHERE seg=? AND off=?", [(seg_id, o) for o, _ in dead])
            punch += [(seg_id, o, fl) for o, fl in dead]
        # Punch before committing: a crash in between leaves index rows of unreferenced frames,
        # which the next gc punches again (idempotent) instead of leaking their space.
        for seg_id, group in itertools.groupby(punch, key=lambda x: x[0]):
            seg_live = live.get(seg_id, np.zeros((0, 2), np.int64))
            reclaimed += store.segments.punch(seg_id, [(off, flen) for _, off, flen in group
                                                       if not _overlaps_live(off, flen, seg_live)])

    for seg_id in delete_files:
        reclaimed += store.segments.unlink(seg_id)
    for name in dead_locks:
        try:
            os.unlink(store.locks_dir / name)
        except FileNotFoundError:
            pass
    _remove_orphan_locks(store)
    with store.connection() as conn:      # fold gc's deletions into the database, never waiting
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    return {"pending_removed": pending_removed, "segments_deleted": len(delete_files),
            "frames_freed": len(punch), "bytes_reclaimed": reclaimed, "live_writers": live_writers}


def _remove_orphan_locks(store: Store) -> None:
    """Delete lock files of dead writers (e.g. killed between their commit and unlinking it)."""
    named = {r[0] for r in store.query("SELECT lock FROM snapshots WHERE lock IS NOT NULL")}
    now = time.time()
    for entry in os.scandir(store.locks_dir):
        try:
            if entry.name.endswith(".lock"):
                if entry.name not in named and not store.writer_alive(entry.name):
                    os.unlink(entry.path)
            elif now - entry.stat().st_mtime > ORPHAN_LOCK_AGE_S:
                os.unlink(entry.path)      # a *.tmp left by a writer that died while creating it
        except FileNotFoundError:
            pass


def check(store: Store, verify_data: bool = False) -> dict[str, Any]:
    """Verify the store: the catalog file, every snapshot, region, hash and blob row against its
    checksum, every page map (checksum, structure, references), the segments and the frame
    index; with ``verify_data`` also every referenced frame's CRC and decode.

    Returns {"ok", "problems": [{"what", "message", "segment", "offset", "snapshots",
    "regions"}], "notes", "snapshots", "regions", "frames", "frames_verified", "garbage": {...}}.
    ``what`` is one of catalog, snapshot, region, map, hashes, blob, segment, frame.
    """
    return _Check(store, verify_data).run()


class _Check:
    """One run of :func:`check`: each step a method, problems gathered as they are found."""

    def __init__(self, store: Store, verify_data: bool) -> None:
        self.store = store
        self.verify_data = verify_data
        self.problems: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.where: list[tuple[str, str]] = []       # rid -> (snapshot, region) of DATA runs
        self.pieces: list[tuple[np.ndarray, ...]] = []
        self.committed: dict[int, str] = {}          # verified snapshot rows: id -> name
        self.names: dict[int, str] = {}              # every non-pending row: id -> name shown
        self.region_total: dict[int, int] = {}       # verified snapshot -> its region count
        self.region_count = 0
        self.verified = 0

    def problem(self, what: str, message: str, **extra: Any) -> None:
        self.problems.append({"what": what, "message": message, **extra})

    def run(self) -> dict[str, Any]:
        self.catalog_file()
        with self.store.connection() as conn:
            conn.execute("BEGIN")     # one consistent read snapshot of the catalog
            try:
                self.read_tables(conn)
                self.snapshot_rows()
                self.regions_and_maps(conn)
                self.hashes_and_blobs(conn)
            finally:
                conn.execute("COMMIT")
        self.files = self.store.segments.listing()
        self.collect_references()
        self.segments()
        self.frame_index()
        if self.verify_data:
            self.frame_data()
        return {"ok": not self.problems, "problems": self.problems, "notes": self.notes,
                "snapshots": len(self.committed), "regions": self.region_count,
                "frames": len(self.frames), "frames_verified": self.verified, "garbage": self.garbage()}

    # -- the catalog ----------------------------------------------------------------------
    def catalog_file(self) -> None:
        """SQLite's own check, indexes against tables included (a damaged name index can
        return another snapshot's row)."""
        rows = self.store.query("PRAGMA integrity_check(20)")
        if [r[0] for r in rows] != ["ok"]:
            self.problem("catalog", "catalog integrity check failed: " + "; ".join(str(r[0]) for r in rows[:5]))
        if not self.store.checksums:
            self.notes.append("catalog format 1: its rows carry no checksums, so damage inside a row "
                              "may go unseen; the next snapshot, incoming, rm or gc adds them")

    def read_tables(self, conn: sqlite3.Connection) -> None:
        self.snaps = {r["id"]: r for r in conn.execute("SELECT * FROM snapshots").fetchall()}
        self.segs = {r["id"]: r for r in conn.execute("SELECT id, writer_id, state, size FROM segments").fetchall()}
        self.frames = np.array([tuple(r) for r in conn.execute(
            "SELECT seg, off, flen, npages FROM frames ORDER BY seg, off").fetchall()], np.int64).reshape(-1, 4)
        self.referenced_segs = {r[0] for r in conn.execute("SELECT DISTINCT seg FROM seg_refs").fetchall()}
        self.seg_refs: dict[int, set[int]] = defaultdict(set)
        for r in conn.execute("SELECT snapshot_id, seg FROM seg_refs").fetchall():
            self.seg_refs[r[0]].add(r[1])

    def snapshot_rows(self) -> None:
        """Every row that is not a capture in progress must verify as a committed snapshot."""
        for snap_id, row in self.snaps.items():
            if row["state"] == "pending":
                continue
            name = row["name"] if isinstance(row["name"], str) else f"damaged-row-{snap_id}"
            self.names[snap_id] = name
            try:
                info = self.store._checked_info(row)
            except StoreCorrupt as exc:
                self.problem("snapshot", str(exc), snapshots=[name])
                continue
            self.committed[snap_id] = name
            self.region_total[snap_id] = info.region_count

    def regions_and_maps(self, conn: sqlite3.Connection) -> None:
        """Region rows (checksum, count per snapshot) and their page maps (checksum,
        structure, segments recorded in seg_refs); gathers the DATA runs for the frame steps."""
        extra = "map_crc, crc" if self.store.checksums else "NULL AS map_crc, NULL AS crc"
        counts: dict[int, int] = defaultdict(int)
        for reg in conn.execute(f"SELECT {', '.join(_integrity.REGION_FIELDS[:-1])}, map, {extra} FROM regions"):
            self.region_count += 1
            snap_id = reg["snapshot_id"]
            snap = self.names.get(snap_id)
            if snap is None:
                self.problem("region", f"region row {reg['idx']} ({reg['name']!r}) belongs to no snapshot "
                             f"(id {snap_id}): the catalog is damaged")
                continue
            counts[snap_id] += 1
            label = dict(snapshots=[snap], regions=[f"{snap}:{reg['name']}"])
            if snap_id not in self.committed:
                continue                        # its snapshot row is reported already
            try:
                good = not self.store.checksums or reg["crc"] == _integrity.region_crc(reg)
            except TypeError:
                good = False
            if not good:
                self.problem("region", f"snapshot {snap!r} region {reg['idx']} ({reg['name']!r}): its "
                             "catalog row is damaged (checksum mismatch)", **label)
                continue
            try:
                runs = _runs.decode(reg["map"], reg["nruns"], _integrity.map_crc(reg, self.store.checksums))
                _runs.validate(runs, reg["length"] // STORE_PAGE, disjoint=True)
            except FrameError as exc:
                self.problem("map", f"snapshot {snap!r} region {reg['name']!r}: page map damaged ({exc.reason})",
                             **label)
                continue
            d = runs[runs["kind"] == DATA]
            unrecorded = set(np.unique(d["seg"]).tolist()) - self.seg_refs[snap_id]
            if unrecorded:
                self.problem("catalog", f"snapshot {snap!r} region {reg['name']!r} uses segments "
                             f"{sorted(unrecorded)} missing from its references (gc could delete them)", **label)
            self.where.append((snap, reg["name"]))
            self.pieces.append((d["seg"].astype(np.int64), d["off"].astype(np.int64), d["flen"].astype(np.int64),
                                d["slot"].astype(np.int64) + d["n"], np.full(len(d), len(self.where) - 1)))
        for snap_id, total in self.region_total.items():
            if counts[snap_id] != total:
                snap = self.committed[snap_id]
                self.problem("region", f"snapshot {snap!r}: the catalog holds {counts[snap_id]} of its "
                             f"{total} region rows", snapshots=[snap])

    def hashes_and_blobs(self, conn: sqlite3.Connection) -> None:
        """Page hashes (a child trusts them to reuse its parent's frames) and blobs (a VM's
        device state, part of its vmstate), each against its checksum."""
        crc = "crc" if self.store.checksums else "NULL AS crc"
        for table, fields, what in (("hashes", _integrity.HASH_FIELDS, "page hashes"),
                                    ("blobs", _integrity.BLOB_FIELDS, "blob")):
            for row in conn.execute(f"SELECT {', '.join(fields)}, data, {crc} FROM {table}"):
                snap = self.names.get(row["snapshot_id"])
                if snap is None:
                    continue                    # a removed snapshot's leftovers: harmless
                try:
                    raw = decompress_blob(row["data"])
                    good = not self.store.checksums or row["crc"] == _integrity.keyed_blob_crc(
                        table, row, fields, raw)
                except (FrameError, TypeError):
                    good = False
                if not good:
                    detail = (f"region {row['region_idx']} chunk {row['chunk']}: a child compared with "
                              "it stores those pages in full" if table == "hashes" else f"{row['name']!r}")
                    self.problem("hashes" if table == "hashes" else "blob",
                                 f"snapshot {snap!r}: {what} damaged ({detail})", snapshots=[snap])

    # -- segments and frames --------------------------------------------------------------
    def collect_references(self) -> None:
        """Every referenced frame once: its key (segments.frame_keys), length, furthest slot."""
        if self.pieces:
            self.seg_a, self.off_a, self.flen_a, self.slot_end, self.rid = (
                np.concatenate(x) for x in zip(*self.pieces))
        else:
            self.seg_a = self.off_a = self.flen_a = self.slot_end = self.rid = np.zeros(0, np.int64)
        self.keys = frame_keys(self.seg_a, self.off_a)
        self.fkeys = frame_keys(self.frames[:, 0], self.frames[:, 1])   # sorted (ORDER BY seg, off)
        self.ukeys, self.first = np.unique(self.keys, return_index=True)

    def affected(self, key: int) -> dict[str, Any]:
        who = [self.where[i] for i in np.unique(self.rid[self.keys == key]).tolist()]
        seg, off = key_parts(key)
        return {"segment": str(self.store.segments.path(seg)), "offset": off,
                "snapshots": sorted({s for s, _ in who}), "regions": sorted({f"{s}:{r}" for s, r in who})}

    def affected_segment(self, seg: int) -> dict[str, Any]:
        who = [self.where[i] for i in np.unique(self.rid[self.seg_a == seg]).tolist()]
        return {"segment": str(self.store.segments.path(seg)),
                "snapshots": sorted({s for s, _ in who}), "regions": sorted({f"{s}:{r}" for s, r in who})}

    def segments(self) -> None:
        """Every referenced segment is in the catalog, exists and starts with its header."""
        self.bad_segments: set[int] = set()
        for seg_id in sorted(set(np.unique(self.seg_a).tolist()) | self.referenced_segs):
            path = self.store.segments.path(seg_id)
            if seg_id not in self.segs:
                self.problem("segment", f"segment {seg_id} is referenced but not in the catalog",
                             **self.affected_segment(seg_id))
                self.bad_segments.add(seg_id)
            elif seg_id not in self.files:
                self.problem("segment", f"segment file {path} is missing", **self.affected_segment(seg_id))
                self.bad_segments.add(seg_id)
            else:
                try:
                    check_segment_header(self.store.segments.pread(seg_id, 0, SEGMENT_HEADER.size), seg_id)
                except (FrameError, StoreCorrupt) as exc:
                    self.problem("segment", f"segment {path}: {exc.reason}", **self.affected_segment(seg_id),
                                 offset=0)

    def frame_index(self) -> None:
        """Every referenced frame is in the frame index, agrees with it, fits its segment."""
        ukeys, first, fkeys = self.ukeys, self.first, self.fkeys
        pos = np.minimum(np.searchsorted(fkeys, ukeys), max(len(fkeys) - 1, 0))
        found = (fkeys[pos] == ukeys) if len(fkeys) else np.zeros(len(ukeys), bool)
        # Per unique frame: max slot end over its runs must fit, and every run must agree on flen.
        max_end = np.zeros(len(ukeys), np.int64)
        np.maximum.at(max_end, np.searchsorted(ukeys, self.keys), self.slot_end)
        consistent = found.copy()
        if len(fkeys):
            finfo = self.frames[:, 2:]                       # flen, npages
            consistent &= (finfo[pos, 0] == self.flen_a[first]) & (finfo[pos, 1] >= max_end)
        useg, uoff = key_parts(ukeys)
        sizes = np.array([self.files[sg].st_size if sg in self.files else 0 for sg in useg.tolist()], np.int64)
        in_bad = np.isin(useg, np.array(sorted(self.bad_segments), dtype=np.int64))
        truncated = consistent & ~in_bad & (uoff + self.flen_a[first] > sizes)
        for k in ukeys[~consistent & ~in_bad].tolist():
            self.problem("frame", f"frame {self.frame_name(k)} is referenced but missing or inconsistent "
                         "in the frame index", **self.affected(k))
        for k, fl, size in zip(ukeys[truncated].tolist(), self.flen_a[first][truncated].tolist(),
                               sizes[truncated].tolist()):
            self.problem("frame", f"frame {self.frame_name(k)} lies beyond the end of the segment "
                         f"({size} bytes): truncated", **self.affected(k))
        self.readable = consistent & ~in_bad & ~truncated

    def frame_data(self) -> None:
        """Read every referenced frame and check its CRC and decode."""
        todo = self.ukeys[self.readable]
        todo_flen = self.flen_a[self.first][self.readable]
        for k, fl in zip(todo.tolist(), todo_flen.tolist()):
            seg, off = key_parts(k)
            try:
                decode_frame(self.store.segments.pread(seg, off, fl), seg)
            except (FrameError, StoreCorrupt) as exc:
                self.problem("frame", f"frame {self.frame_name(k)}: {getattr(exc, 'reason', exc)}",
                             **self.affected(k))
            self.verified += 1

    def frame_name(self, key: int) -> str:
        """A frame as messages name it: SEGMENT_PATH@OFFSET."""
        seg, off = key_parts(key)
        return f"{self.store.segments.path(seg)}@{off}"

    def garbage(self) -> dict[str, Any]:
        """What gc would reclaim. (A removed parent is not garbage: a child's maps point
        straight at the frames it needs, and those were checked like any other.)"""
        return {
            "dead_pending": [r["name"] for r in self.snaps.values()
                             if r["state"] == "pending" and not self.store.writer_alive(r["lock"])],
            "unreferenced_segments": sorted(s for s, r in self.segs.items()
                                            if r["state"] == "sealed" and s not in self.referenced_segs),
            "orphan_segment_files": sorted(s for s in self.files if s not in self.segs),
            "unreferenced_frames": int(np.count_nonzero(~np.isin(self.fkeys, self.ukeys))),
        }
