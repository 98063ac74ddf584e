"""Checksums of the catalog rows that decide what a read returns (format version 2).

Frames carry their own CRC (:mod:`._format`); everything else a read depends on lives in the
catalog: a snapshot's row (name, parent, created, the info JSON: what ``list``, ``info`` and
``info.json`` show), its region rows (name, address, length, page counts...) with the page map
that says where each page's bytes are (frame references), the per-page hashes an incremental
child trusts to reuse its parent's frames, and the blobs (a VM's device state inside
``vmstate``). SQLite verifies none of that: a flipped bit inside a record, an index entry that
points at another row, or a zstd blob that still decodes after damage silently yields other
values, and so other bytes.

So each of those rows carries ``crc``: the CRC32 of a canonical encoding of its table name and
every column that matters, its key included (a row returned for another key fails), and of the
CRC32 of each blob's *decoded* bytes (a blob that decodes to something else fails). Region rows
also keep ``map_crc`` apart, so a map loaded lazily long after the row can be checked against
the row verified at open. A mismatch is :class:`StoreCorrupt` naming what is damaged.

Format version 1 stores have no such columns. They are read unverified (with a warning), and
the first write (snapshot, incoming, rm, gc) upgrades them: the columns are added and filled in
from what is there, in one transaction (see :func:`upgrade`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from typing import Any

from snapfs.store._format import FrameError, crc32

log = logging.getLogger("snapfs.store")

SNAPSHOT_FIELDS = ("id", "name", "state", "parent_id", "parent_name", "created", "info")
REGION_FIELDS = ("snapshot_id", "idx", "name", "start", "length", "perms", "offset", "path", "kind",
                 "page_size", "data_pages", "zero_pages", "meta", "nruns", "map_crc")
HASH_FIELDS = ("snapshot_id", "region_idx", "chunk", "algo")
BLOB_FIELDS = ("snapshot_id", "name", "size")
# The columns format 2 adds (appended to the tables, so old and new catalogs look alike).
COLUMNS = (("snapshots", "crc"), ("regions", "map_crc"), ("regions", "crc"), ("hashes", "crc"),
           ("blobs", "crc"))


def row_crc(table: str, values: Sequence[Any]) -> int:
    """CRC32 of the canonical encoding of a row's values (ints, floats, text, None)."""
    doc = _ENCODER.encode([table, *values])
    return crc32(doc.encode("utf-8", "surrogatepass"))


def _tagged(value: Any) -> Any:
    # A BLOB where text or a number belongs (a damaged record header): encoded apart, so it
    # never equals the value it replaced.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"blob": bytes(value).hex()}
    raise TypeError(f"cannot checksum a {type(value).__name__}")


# json.dumps(..., separators=(",", ":"), ensure_ascii=False, default=_tagged), without making
# an encoder per call (a commit checksums two rows per region: 130 000 for 65 000 mappings).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_tagged)


def snapshot_crc(row: Any) -> int:
    """The checksum of a committed snapshot row (a mapping with :data:`SNAPSHOT_FIELDS`)."""
    return row_crc("snapshots", [row[f] for f in SNAPSHOT_FIELDS])


def region_crc(row: Any) -> int:
    """The checksum of a region row (a mapping with :data:`REGION_FIELDS`)."""
    return row_crc("regions", [row[f] for f in REGION_FIELDS])


def keyed_blob_crc(table: str, row: Any, fields: Sequence[str], raw: bytes) -> int:
    """The checksum of a row holding a compressed blob: its fields and its decoded bytes."""
    return row_crc(table, [*(row[f] for f in fields), crc32(raw)])


def map_crc(row: Any, checksums: bool) -> int | None:
    """The CRC a region's decoded map must have (None: unchecked, format 1). A format 2 row
    without one held a map that did not decode when the store was upgraded: damaged."""
    if not checksums:
        return None
    if row["map_crc"] is None:
        raise FrameError("no checksum: it did not decode when the store was upgraded")
    return row["map_crc"]


def has_checksums(conn: sqlite3.Connection) -> bool:
    """True if the catalog has format 2's checksum columns (all of them)."""
    have = {(t, r[1]) for t in {t for t, _ in COLUMNS}
            for r in conn.execute(f"PRAGMA table_info({t})").fetchall()}
    return all(c in have for c in COLUMNS)


def seal_snapshot(conn: sqlite3.Connection, snap_id: int) -> None:
    """Recompute the checksum of snapshot row ``snap_id`` from what it holds now (inside the
    transaction that changed it)."""
    row = conn.execute(f"SELECT {', '.join(SNAPSHOT_FIELDS)} FROM snapshots WHERE id=?", (snap_id,)).fetchone()
    conn.execute("UPDATE snapshots SET crc=? WHERE id=?", (snapshot_crc(row), snap_id))


def upgrade(conn: sqlite3.Connection, decode_map: Any, decompress: Any) -> int:
    """Format 1 -> 2 inside one transaction: add the checksum columns and fill them in over
    the rows as they are. A blob that does not decode gets no checksum (a map: NULL map_crc),
    which format 2 reports as damage. Also points children of snapshots removed under format 1 at no parent
    (listing the removed one in ``removed_parents``). Returns the number of rows checksummed."""
    for table, column in COLUMNS:
        if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})").fetchall()}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER")
    done = 0
    ids = {r[0] for r in conn.execute("SELECT id FROM snapshots").fetchall()}
    for row in conn.execute("SELECT id, parent_id, parent_name, info FROM snapshots "
                            "WHERE state='committed' AND parent_id IS NOT NULL").fetchall():
        if row["parent_id"] not in ids:
            info = json.loads(row["info"])
            info["removed_parents"] = [row["parent_name"], *info.get("removed_parents", [])]
            conn.execute("UPDATE snapshots SET parent_id=NULL, parent_name=NULL, info=? WHERE id=?",
                         (json.dumps(info), row["id"]))
    for row in conn.execute(f"SELECT {', '.join(REGION_FIELDS[:-1])}, map FROM regions").fetchall():
        try:
            crc = crc32(decode_map(row["map"], row["nruns"]).tobytes())
        except Exception:                       # noqa: BLE001 - damaged already: map_crc NULL
            crc = None
        values = {**dict(row), "map_crc": crc}
        conn.execute("UPDATE regions SET map_crc=?, crc=? WHERE snapshot_id=? AND idx=?",
                     (crc, region_crc(values), row["snapshot_id"], row["idx"]))
        done += 1
    for table, fields, key in (("hashes", HASH_FIELDS, ("snapshot_id", "region_idx", "chunk")),
                               ("blobs", BLOB_FIELDS, ("snapshot_id", "name"))):
        for row in conn.execute(f"SELECT {', '.join(fields)}, data FROM {table}").fetchall():
            try:
                raw = decompress(row["data"])
            except Exception:                   # noqa: BLE001 - damaged already: stays NULL
                continue
            conn.execute(f"UPDATE {table} SET crc=? WHERE {' AND '.join(f'{k}=?' for k in key)}",
                         (keyed_blob_crc(table, row, fields, raw), *(row[k] for k in key)))
            done += 1
    for (snap_id,) in conn.execute("SELECT id FROM snapshots WHERE state='committed'").fetchall():
        seal_snapshot(conn, snap_id)
        done += 1
    return done
