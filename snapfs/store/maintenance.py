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

from snapfs.store import _runs
from snapfs.store._format import SEGMENT_HEADER, FrameError, check_segment_header, decode_frame
from snapfs.store._fsutil import punch_hole
from snapfs.store.model import DATA

if TYPE_CHECKING:
    from snapfs.store.store import Store

ORPHAN_LOCK_AGE_S = 60.0      # a *.tmp lock younger than this may belong to a writer starting up


def _segment_files(store: Store) -> dict[int, os.stat_result]:
    out = {}
    for entry in os.scandir(store.segments_dir):
        stem, _, ext = entry.name.partition(".")
        if ext == "seg" and stem.isdigit():
            out[int(stem)] = entry.stat()
    return out


def _live_frames_by_segment(store: Store, conn: sqlite3.Connection) -> dict[int, np.ndarray]:
    """seg -> sorted offsets of the frames that committed snapshots' maps reference."""
    keys = []
    for row in conn.execute("SELECT r.nruns, r.map FROM regions r JOIN snapshots s ON s.id=r.snapshot_id "
                            "WHERE s.state='committed'"):
        try:
            runs = _runs.decode(row["map"], row["nruns"])
        except FrameError as exc:
            raise StoreCorrupt(f"a page map in store {store.path} is damaged ({exc.reason}): gc reclaims "
                               "nothing until `snapfs check` is clean") from None
        d = runs[runs["kind"] == DATA]
        keys.append((d["seg"].astype(np.int64) << 40) | d["off"].astype(np.int64))
    if not keys:
        return {}
    ukeys = np.unique(np.concatenate(keys))
    segs = ukeys >> 40
    bounds = np.flatnonzero(np.diff(segs)) + 1
    return {int(part[0] >> 40): part & ((1 << 40) - 1) for part in np.split(ukeys, bounds) if len(part)}


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
        files = _segment_files(store)
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
            dead = (seg_id not in referenced if seg["state"] == "sealed"
                    else seg["writer_id"] not in live_pending)
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
            dead = rows[~np.isin(rows[:, 0], live.get(seg_id, np.zeros(0, np.int64)))].tolist()
            conn.executemany("DELETE FROM frames WHERE seg=? AND off=?", [(seg_id, o) for o, _ in dead])
            punch += [(seg_id, o, fl) for o, fl in dead]
        # Punch before committing: a crash in between leaves index rows of unreferenced frames,
        # which the next gc punches again (idempotent) instead of leaking their space.
        for seg_id, group in itertools.groupby(punch, key=lambda x: x[0]):
            try:
                fd = os.open(store.segment_path(seg_id), os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue            # check reports the missing segment; nothing to free here
            try:
                for _, off, flen in group:
                    if punch_hole(fd, off, flen):
                        reclaimed += flen
            finally:
                os.close(fd)

    for seg_id in delete_files:
        path = store.segment_path(seg_id)
        try:
            st = os.stat(path)
            os.unlink(path)
            reclaimed += st.st_blocks * 512
        except FileNotFoundError:
            pass
        store.forget_segment_fd(seg_id)
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
    """Verify the catalog (and with ``verify_data`` every referenced frame's CRC and decode).

    Returns {"ok", "problems": [{"what", "message", "segment", "offset", "snapshots",
    "regions"}], "snapshots", "regions", "frames", "frames_verified", "garbage": {...}}.
    """
    problems: list[dict[str, Any]] = []

    def problem(what: str, message: str, **extra: Any) -> None:
        problems.append({"what": what, "message": message, **extra})

    rows = store.query("PRAGMA quick_check")
    if [r[0] for r in rows] != ["ok"]:
        problem("catalog", "catalog integrity check failed: " + "; ".join(str(r[0]) for r in rows[:5]))

    with store.connection() as conn:
        conn.execute("BEGIN")     # one consistent read snapshot of the catalog
        snaps = {r["id"]: r for r in conn.execute("SELECT id, name, state, lock, parent_id, parent_name "
                                                  "FROM snapshots").fetchall()}
        committed = {i: r for i, r in snaps.items() if r["state"] == "committed"}
        segs = {r["id"]: r for r in conn.execute("SELECT id, writer_id, state, size FROM segments").fetchall()}
        frames = np.array([tuple(r) for r in conn.execute(
            "SELECT seg, off, flen, npages FROM frames ORDER BY seg, off").fetchall()], np.int64).reshape(-1, 4)
        referenced_segs = {r[0] for r in conn.execute("SELECT DISTINCT seg FROM seg_refs").fetchall()}
        regions = conn.execute("SELECT r.snapshot_id, r.idx, r.name, r.length, r.nruns, r.map FROM regions r "
                               "JOIN snapshots s ON s.id=r.snapshot_id WHERE s.state='committed'").fetchall()
        seg_refs: dict[int, set[int]] = defaultdict(set)
        for r in conn.execute("SELECT snapshot_id, seg FROM seg_refs").fetchall():
            seg_refs[r[0]].add(r[1])
        conn.execute("COMMIT")
    files = _segment_files(store)

    # Every DATA run of every committed map, as parallel arrays (vectorised checks below).
    where: list[tuple[str, str]] = []          # rid -> (snapshot, region)
    pieces = []
    for reg in regions:
        snap = committed[reg["snapshot_id"]]
        try:
            runs = _runs.decode(reg["map"], reg["nruns"])
        except FrameError as exc:
            problem("map", f"snapshot {snap['name']!r} region {reg['name']!r}: page map damaged ({exc.reason})",
                    snapshots=[snap["name"]], regions=[f"{snap['name']}:{reg['name']}"])
            continue
        starts = runs["page"].astype(np.int64)
        ends = starts + runs["n"]
        if len(runs) and (np.any(starts[1:] < ends[:-1]) or ends[-1] > reg["length"] // 4096
                          or np.any(runs["n"] == 0)):
            problem("map", f"snapshot {snap['name']!r} region {reg['name']!r}: page map overlaps or exceeds "
                    "the region", snapshots=[snap["name"]], regions=[f"{snap['name']}:{reg['name']}"])
        d = runs[runs["kind"] == DATA]
        unrecorded = set(np.unique(d["seg"]).tolist()) - seg_refs[reg["snapshot_id"]]
        if unrecorded:
            problem("catalog", f"snapshot {snap['name']!r} region {reg['name']!r} uses segments "
                    f"{sorted(unrecorded)} missing from its references (gc could delete them)",
                    snapshots=[snap["name"]], regions=[f"{snap['name']}:{reg['name']}"])
        where.append((snap["name"], reg["name"]))
        pieces.append((d["seg"].astype(np.int64), d["off"].astype(np.int64), d["flen"].astype(np.int64),
                       d["slot"].astype(np.int64) + d["n"], np.full(len(d), len(where) - 1)))
    if pieces:
        seg_a, off_a, flen_a, slot_end, rid = (np.concatenate(x) for x in zip(*pieces))
    else:
        seg_a = off_a = flen_a = slot_end = rid = np.zeros(0, np.int64)
    keys = (seg_a << 40) | off_a               # frame identity: segment id and offset
    fkeys = (frames[:, 0] << 40) | frames[:, 1]  # sorted (ORDER BY seg, off)
    finfo = frames[:, 2:]                       # flen, npages

    def affected(key: int) -> dict[str, Any]:
        who = [where[i] for i in np.unique(rid[keys == key]).tolist()]
        seg, off = key >> 40, key & ((1 << 40) - 1)
        return {"segment": str(store.segment_path(seg)), "offset": off,
                "snapshots": sorted({s for s, _ in who}), "regions": sorted({f"{s}:{r}" for s, r in who})}

    def affected_segment(seg: int) -> dict[str, Any]:
        who = [where[i] for i in np.unique(rid[seg_a == seg]).tolist()]
        return {"segment": str(store.segment_path(seg)),
                "snapshots": sorted({s for s, _ in who}), "regions": sorted({f"{s}:{r}" for s, r in who})}

    bad_segments: set[int] = set()
    for seg_id in sorted(set(np.unique(seg_a).tolist()) | referenced_segs):
        path = store.segment_path(seg_id)
        if seg_id not in segs:
            problem("segment", f"segment {seg_id} is referenced but not in the catalog", **affected_segment(seg_id))
            bad_segments.add(seg_id)
        elif seg_id not in files:
            problem("segment", f"segment file {path} is missing", **affected_segment(seg_id))
            bad_segments.add(seg_id)
        else:
            try:
                with open(path, "rb") as f:
                    check_segment_header(f.read(SEGMENT_HEADER.size), seg_id)
            except FrameError as exc:
                problem("segment", f"segment {path}: {exc.reason}", **affected_segment(seg_id), offset=0)

    ukeys, first = np.unique(keys, return_index=True)
    pos = np.minimum(np.searchsorted(fkeys, ukeys), max(len(fkeys) - 1, 0))
    found = (fkeys[pos] == ukeys) if len(fkeys) else np.zeros(len(ukeys), bool)
    # Per unique frame: max slot end over its runs must fit, and every run must agree on flen.
    max_end = np.zeros(len(ukeys), np.int64)
    np.maximum.at(max_end, np.searchsorted(ukeys, keys), slot_end)
    consistent = found.copy()
    if len(fkeys):
        consistent &= (finfo[pos, 0] == flen_a[first]) & (finfo[pos, 1] >= max_end)
    sizes = np.array([files[int(sg)].st_size if int(sg) in files else 0 for sg in (ukeys >> 40)], np.int64)
    in_bad = np.isin(ukeys >> 40, np.array(sorted(bad_segments), dtype=np.int64))
    truncated = consistent & ~in_bad & ((ukeys & ((1 << 40) - 1)) + flen_a[first] > sizes)
    for k in ukeys[~consistent & ~in_bad].tolist():
        problem("frame", f"frame {store.segment_path(k >> 40)}@{k & ((1 << 40) - 1)} is referenced but missing "
                "or inconsistent in the frame index", **affected(k))
    for k, fl, size in zip(ukeys[truncated].tolist(), flen_a[first][truncated].tolist(), sizes[truncated].tolist()):
        problem("frame", f"frame {store.segment_path(k >> 40)}@{k & ((1 << 40) - 1)} lies beyond the end of "
                f"the segment ({size} bytes): truncated", **affected(k))

    verified = 0
    if verify_data:
        todo = ukeys[consistent & ~in_bad & ~truncated]
        todo_flen = flen_a[first][consistent & ~in_bad & ~truncated]
        fds: dict[int, int] = {}
        try:
            for k, fl in zip(todo.tolist(), todo_flen.tolist()):
                seg, off = k >> 40, k & ((1 << 40) - 1)
                fd = fds.get(seg)
                if fd is None:
                    fd = fds[seg] = os.open(store.segment_path(seg), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    decode_frame(os.pread(fd, fl, off), seg)
                except FrameError as exc:
                    problem("frame", f"frame {store.segment_path(seg)}@{off}: {exc.reason}", **affected(k))
                verified += 1
        finally:
            for fd in fds.values():
                os.close(fd)

    # A removed parent is fine: a child's maps point straight at the frames it needs, and those
    # were checked above like any other.
    dead_pending = [r["name"] for r in snaps.values() if r["state"] == "pending" and not store.writer_alive(r["lock"])]
    garbage = {
        "dead_pending": dead_pending,
        "unreferenced_segments": sorted(s for s, r in segs.items() if r["state"] == "sealed" and s not in referenced_segs),
        "orphan_segment_files": sorted(s for s in files if s not in segs),
        "unreferenced_frames": int(np.count_nonzero(~np.isin(fkeys, ukeys))),
    }
    return {"ok": not problems, "problems": problems, "snapshots": len(committed), "regions": len(regions),
            "frames": len(frames), "frames_verified": verified, "garbage": garbage}
