"""The Store: opening/creating a store directory, the catalog connections, list/info/remove.

Writing lives in writer.py, reading in reader.py, gc/check in maintenance.py, segment files
in segments.py.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from snapfs.errors import NameInUse, SnapshotNotFound, StoreCorrupt, StoreError, UsageError
from snapfs.store import _integrity, _runs
from snapfs.store._format import STORE_PAGE, FrameError, decompress_blob
from snapfs.store._fsutil import disk_full_error, fsync_dir, is_disk_full, write_atomic
from snapfs.store.model import SnapshotInfo
from snapfs.store.segments import SegmentFiles

FORMAT_NAME = "snapfs-store"
FORMAT_VERSION = 2         # 2: catalog rows carry checksums (_integrity.py); 1 is upgraded on write
READABLE_VERSIONS = (1, 2)
DEFAULT_LEVEL = 1          # zstd level: level 1 keeps compression off the capture's critical path
CATALOG = "catalog.sqlite"
POOL_IDLE = 8              # idle catalog connections kept open
_SCHEMA = (Path(__file__).with_name("schema.sql")).read_text()
_OUR_ENTRIES = {"README", "config.json", CATALOG, CATALOG + "-wal",
                CATALOG + "-shm", CATALOG + "-journal", "segments", "locks"}
_REQUIRED = ("config.json", CATALOG, "segments")   # a store has all three
log = logging.getLogger("snapfs.store")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+-]{0,199}")

README_TEXT = """\
This directory is a snapfs page store: live memory snapshots of processes and VMs.
It holds process memory (possibly keys and passwords): keep it private (mode 0700).

  config.json     format name and version, compression level, frame size
  catalog.sqlite  SQLite catalog (WAL mode): snapshots, regions, run maps, frame index
  segments/       append-only data files of CRC-checked zstd frames (never edited in place)
  locks/          one lock file per capture in progress (flock held while it runs)

Use the snapfs command to read it: snapfs list, snapfs info NAME, snapfs mount DIR,
snapfs check --verify-data, snapfs rm NAME, snapfs gc. Do not edit files here by hand.
"""


def _store_entries(path: Path) -> set[str] | None:
    """Names in the directory ``path`` (None if it does not exist), temporary files aside."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise StoreError(f"{path} exists and is not a directory: choose another --store") from None
    except PermissionError as exc:
        raise StoreError(f"cannot read the store directory {path}: {exc.strerror}") from None
    return {n for n in names if not n.endswith(".tmp")}


def _creation_interrupted(path: Path, present: set[str]) -> bool:
    """True for a directory that a store creation left unfinished (config.json, written last,
    is missing) before anything was stored in it: only our entries, no segment files and no
    snapshot rows. Finishing it loses nothing; anything more is a damaged store."""
    if "config.json" in present or not present <= _OUR_ENTRIES:
        return False
    if "segments" in present and any(True for _ in os.scandir(path / "segments")):
        return False
    if CATALOG not in present:
        return True
    try:
        conn = sqlite3.connect((path / CATALOG).absolute().as_uri() + "?mode=rw", uri=True)
        try:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name='snapshots'").fetchone():
                return True    # the schema was never written
            return conn.execute("SELECT count(*) FROM snapshots").fetchone()[0] == 0
        finally:
            conn.close()
    except sqlite3.Error:
        return False       # an unreadable catalog is not ours to overwrite


_REGION_COLUMNS = ", ".join(_integrity.REGION_FIELDS[:-1])


def _info_from_row(row: sqlite3.Row) -> SnapshotInfo:
    info = json.loads(row["info"])
    return SnapshotInfo(
        id=row["id"], name=row["name"], kind=info.get("kind", "process"), pid=info.get("pid"),
        comm=info.get("comm"), exe=info.get("exe"), cmdline=info.get("cmdline"),
        created=row["created"], pause_ms=info.get("pause_ms"), duration_s=info.get("duration_s"),
        resident_bytes=info.get("resident_bytes", 0), zero_bytes=info.get("zero_bytes", 0),
        stored_bytes=info.get("stored_bytes", 0), shared_bytes=info.get("shared_bytes", 0),
        faults=info.get("faults", 0), parent=row["parent_name"],
        warnings=list(info.get("warnings", [])), meta=dict(info.get("meta", {})),
        region_count=info.get("region_count", 0), removed_parents=list(info.get("removed_parents", [])),
    )


def _damaged_info(row: sqlite3.Row, reason: str) -> SnapshotInfo:
    """A listing entry for a snapshot row that failed verification: nothing in it is trusted
    but its name (when it is text), so that ``list`` and the mount can show it as damaged."""
    name = row["name"] if isinstance(row["name"], str) and row["name"] else f"damaged-row-{row['id']}"
    created = row["created"] if isinstance(row["created"], (int, float)) else 0.0
    return SnapshotInfo(id=int(row["id"]), name=name, kind="process", pid=None, comm=None, exe=None,
                        cmdline=None, created=float(created), pause_ms=None, duration_s=None,
                        resident_bytes=0, zero_bytes=0, stored_bytes=0, shared_bytes=0, faults=0,
                        parent=None, warnings=[], meta={}, region_count=0, damaged=reason)


class FrameCache:
    """A thread-safe LRU of decoded frames keyed by (segment, offset), bounded in frames."""

    def __init__(self, capacity: int = 256) -> None:      # 256 x 128 KiB = 32 MiB
        self.capacity = capacity
        self._data: collections.OrderedDict[tuple[int, int], bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> bytes | None:
        """The cached frame or None (marks it recently used)."""
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
            return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        """Insert a decoded frame, evicting the least recently used beyond capacity."""
        with self._lock:
            self._data[key] = data
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._data.clear()


class Store:
    """A page store directory. Thread-safe: each thread gets its own SQLite connection."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        self.path = path
        self.config = config
        self.level: int = int(config.get("compression_level", DEFAULT_LEVEL))
        self.segments = SegmentFiles(path / "segments")
        self.locks_dir = path / "locks"
        self._catalog_uri = (path / CATALOG).absolute().as_uri() + "?mode=rw"
        self.checksums = True          # catalog rows carry checksums (format 2): set by open()
        self._upgrade_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []      # pooled catalog connections
        self._lock = threading.Lock()
        self.frame_cache = FrameCache()
        self._closed = False

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike[str], create: bool = True,
             compression_level: int | None = None) -> "Store":
        """Open the store at ``path``; with ``create`` (writing commands only) make one there
        (mode 0700) if ``path`` is absent or an empty directory.

        Nothing is ever created otherwise: a directory holding some of the store's files but
        not all of config.json, catalog.sqlite and segments/ is a damaged store (StoreCorrupt),
        whatever ``create`` says, except that ``create`` finishes a creation that was
        interrupted before anything was stored. Raises StoreError when there is no store (and
        not ``create``), the directory holds other files, or the format version is another;
        StoreCorrupt when the store is incomplete or the catalog cannot be read.
        """
        path = Path(path)
        present = _store_entries(path)
        if present is None or not present or (create and _creation_interrupted(path, present)):
            if not create:
                raise StoreError(f"no snapfs store at {path}: take a snapshot first or pass --store DIR")
            cls._create(path, compression_level)
            present = set(_REQUIRED)
        elif not present & _OUR_ENTRIES:
            raise StoreError(f"{path} is not empty and is not a snapfs store: choose another --store")
        config = cls._read_config(path) if "config.json" in present else None
        if missing := [f for f in _REQUIRED if f not in present]:
            raise StoreCorrupt(
                f"store {path} is damaged: {', '.join(missing)} missing (it has "
                f"{', '.join(sorted(present & _OUR_ENTRIES))}): restore the store from a backup, "
                "or move it aside and use another --store")
        config = config or cls._read_config(path)
        if config.get("version") not in READABLE_VERSIONS:
            raise StoreError(
                f"store {path} has format version {config.get('version')}, this snapfs reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}: use a snapfs release matching the store, "
                "or another --store")
        store = cls(path, config)
        if compression_level is not None:
            store.level = compression_level
        try:
            with store.connection() as conn:
                conn.execute("SELECT value FROM counters WHERE name='generation'").fetchall()
                store.checksums = _integrity.has_checksums(conn)
        except BaseException:
            store.close()
            raise
        if config["version"] >= 2 and not store.checksums:
            store.close()
            raise StoreCorrupt(f"store {path} is damaged: config.json says format {config['version']} but "
                               "the catalog has no checksum columns: restore the catalog from a backup")
        if not store.checksums:
            log.warning("store %s has format version 1: its catalog has no checksums and is read "
                        "unverified; the next snapshot, incoming, rm or gc adds them", path)
        return store

    def _writable(self) -> None:
        """Before any write: upgrade a format 1 store to format 2 (catalog checksums), once.

        Every row is checksummed as it is now, in one transaction; config.json says 2 after it
        commits (a crash in between leaves a format 2 catalog that the next write finishes)."""
        if self.checksums and self.config.get("version") == FORMAT_VERSION:
            return
        with self._upgrade_lock:
            if not self.checksums:
                with self.transaction() as conn:
                    rows = _integrity.upgrade(conn, _runs.decode, decompress_blob)
                self.checksums = True
                log.warning("store %s upgraded to format version %d: %d catalog rows checksummed",
                            self.path, FORMAT_VERSION, rows)
            if self.config.get("version") != FORMAT_VERSION:
                config = {**self.config, "version": FORMAT_VERSION}
                write_atomic(self.path / "config.json", (json.dumps(config, indent=2) + "\n").encode())
                self.config = config

    @staticmethod
    def _read_config(path: Path) -> dict[str, Any]:
        """config.json, which must name our format (else this is not a store: StoreError)."""
        config_file = path / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise StoreCorrupt(f"store config {config_file} is unreadable ({exc}): restore it or use "
                               "another --store") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
            raise StoreError(f"{path} is not a snapfs store (config.json has no format {FORMAT_NAME!r})")
        return config

    @staticmethod
    def _create(path: Path, compression_level: int | None) -> None:
        old = os.umask(0o077)      # nothing we create may be readable by others, not even briefly
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                path.mkdir(mode=0o700, exist_ok=True)
            except PermissionError as exc:
                raise StoreError(f"cannot create store {path}: {exc.strerror}") from None
            os.chmod(path, 0o700)
            (path / "segments").mkdir(mode=0o700, exist_ok=True)
            (path / "locks").mkdir(mode=0o700, exist_ok=True)
            write_atomic(path / "README", README_TEXT.encode())
            fd = os.open(path / CATALOG, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            conn = sqlite3.connect(path / CATALOG, isolation_level=None, timeout=30.0)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
            finally:
                conn.close()
            config = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                      "compression_level": compression_level or DEFAULT_LEVEL,
                      "frame_size": 128 * 1024, "segment_max_bytes": 1 << 30}
            # config.json last: its presence marks a fully initialised store.
            write_atomic(path / "config.json", (json.dumps(config, indent=2) + "\n").encode())
            fsync_dir(path.parent)
        finally:
            os.umask(old)

    # ----------------------------------------------------------------- catalog access
    def _connect(self) -> sqlite3.Connection:
        old = os.umask(0o077)   # -wal/-shm may be created by this connect
        try:
            # mode=rw: never create the catalog (a missing one is damage, not a new store).
            conn = sqlite3.connect(self._catalog_uri, uri=True, isolation_level=None,
                                   check_same_thread=False, timeout=30.0)
        finally:
            os.umask(old)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """Borrow a catalog connection from the pool (one user at a time; any thread).

        A pool rather than one connection per thread: FUSE and trio worker threads come and
        go, and per-thread connections would pile up open files.
        """
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        with self._errors():
            if conn is None:
                conn = self._connect()
            try:
                yield conn
            finally:
                if conn.in_transaction:       # an error escaped mid-statement: start clean
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                with self._lock:
                    keep = not self._closed and len(self._idle) < POOL_IDLE
                    if keep:
                        self._idle.append(conn)
                if not keep:
                    conn.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate SQLite failures into StoreError/StoreCorrupt with one-line messages."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.path, exc) from None
            msg = str(exc)
            if isinstance(exc, sqlite3.OperationalError) and "locked" in msg:
                raise StoreError(f"store catalog {self.path / CATALOG} is busy ({msg}): retry") from None
            raise StoreCorrupt(f"store catalog {self.path / CATALOG} is damaged ({msg}): "
                               "run `snapfs check`; restore the catalog from a backup") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT on a pooled connection (ROLLBACK on error). Never nest."""
        with self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """Run one read query; returns all rows."""
        with self.connection() as conn:
            return conn.execute(sql, params).fetchall()

    # ----------------------------------------------------------------- files
    def new_lock(self) -> tuple[str, int]:
        """Create and flock a fresh writer lock file; returns (file name, fd).

        The file gets its ``.lock`` name only once flocked, so any ``*.lock`` whose flock is
        free belongs to a dead writer and gc may delete it at once.
        """
        base = uuid.uuid4().hex
        tmp, name = self.locks_dir / f"{base}.tmp", f"{base}.lock"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{os.getpid()}\n".encode())   # for humans: which process writes
            os.rename(tmp, self.locks_dir / name)
        except OSError:
            os.close(fd)
            os.unlink(tmp)
            raise
        return name, fd

    def writer_alive(self, lock_name: str | None) -> bool:
        """True while the writer that holds ``locks/<lock_name>`` runs (flock is released at death)."""
        if not lock_name:
            return False
        try:
            fd = os.open(self.locks_dir / lock_name, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # ----------------------------------------------------------------- catalog queries
    def generation(self) -> int:
        """A number that changes whenever the committed set changes (one indexed read)."""
        rows = self.query("SELECT value FROM counters WHERE name='generation'")
        return int(rows[0][0])

    def list_snapshots(self) -> list[SnapshotInfo]:
        """Committed snapshots, oldest first. A row that fails verification is listed too, as
        a SnapshotInfo whose ``damaged`` says why (opening it raises StoreCorrupt)."""
        out = []
        for row in self.query("SELECT * FROM snapshots WHERE state != 'pending' ORDER BY created, id"):
            try:
                out.append(self._checked_info(row))
            except StoreCorrupt as exc:
                out.append(_damaged_info(row, str(exc)))
        return out

    def _checked_info(self, row: sqlite3.Row, name: str | None = None) -> SnapshotInfo:
        """The SnapshotInfo of a committed snapshot row, verified against its checksum (and
        against ``name``, the name it was looked up by); StoreCorrupt otherwise."""
        label = name if name is not None else row["name"]
        if name is not None and row["name"] != name:
            raise StoreCorrupt(f"snapshot {name!r}: the catalog returned the row of {row['name']!r} "
                               "(its name index is damaged): run `snapfs check`; restore the catalog "
                               "from a backup")
        try:
            good = row["state"] == "committed" and (
                not self.checksums or row["crc"] == _integrity.snapshot_crc(row))
            info = _info_from_row(row) if good else None
        except (TypeError, ValueError, KeyError, AttributeError):
            info = None
        if info is None:
            raise StoreCorrupt(f"snapshot {label!r}: its catalog row is damaged (checksum mismatch): "
                               "run `snapfs check`; restore the catalog from a backup")
        return info

    def _lookup(self, conn: sqlite3.Connection, name: str) -> tuple[sqlite3.Row, SnapshotInfo]:
        """The verified row of committed snapshot ``name``: SnapshotNotFound if there is none,
        StoreCorrupt if every row found under that name fails verification."""
        rows = conn.execute("SELECT * FROM snapshots WHERE name=? AND state != 'pending'", (name,)).fetchall()
        if not rows:
            raise self._not_found(name)
        error = None
        for row in rows:              # one, unless damage made two rows share the name
            try:
                return row, self._checked_info(row, name)
            except StoreCorrupt as exc:
                error = error or exc
        raise error

    def _not_found(self, name: str) -> SnapshotNotFound:
        return SnapshotNotFound(f"no snapshot named {name!r} in store {self.path}: see `snapfs list`")

    def info(self, name: str) -> SnapshotInfo:
        """The SnapshotInfo of committed snapshot ``name`` (SnapshotNotFound otherwise;
        StoreCorrupt if its catalog row is damaged)."""
        with self.connection() as conn:
            return self._lookup(conn, name)[1]

    def region_rows(self, conn: sqlite3.Connection, info: SnapshotInfo) -> list[sqlite3.Row]:
        """The region rows of a verified snapshot, without their maps, each verified (the map
        itself is checked when loaded, against the row's ``map_crc``): StoreCorrupt if one is
        damaged or missing."""
        extra = "map_crc, crc" if self.checksums else "NULL AS map_crc, NULL AS crc"
        rows = conn.execute(f"SELECT {_REGION_COLUMNS}, {extra} FROM regions WHERE snapshot_id=? "
                            "ORDER BY idx", (info.id,)).fetchall()
        if len(rows) != info.region_count:
            raise StoreCorrupt(f"snapshot {info.name!r}: the catalog holds {len(rows)} of its "
                               f"{info.region_count} region rows: run `snapfs check`; restore the "
                               "catalog from a backup")
        for i, row in enumerate(rows):
            try:
                good = row["idx"] == i and row["snapshot_id"] == info.id and (
                    not self.checksums or row["crc"] == _integrity.region_crc(row))
            except TypeError:
                good = False
            if not good:
                raise StoreCorrupt(f"snapshot {info.name!r} region {i} ({row['name']!r}): its catalog "
                                   "row is damaged (checksum mismatch): run `snapfs check`; restore "
                                   "the catalog from a backup")
        return rows

    def load_map(self, info: SnapshotInfo, region: sqlite3.Row) -> np.ndarray:
        """The page map of a verified region row (see :meth:`region_rows`), checked against the
        row's ``map_crc`` and for structure. StoreCorrupt naming the region if it is damaged;
        SnapshotNotFound if the snapshot was removed meanwhile."""
        rows = self.query("SELECT map FROM regions WHERE snapshot_id=? AND idx=?", (info.id, region["idx"]))
        if not rows:
            if not self.query("SELECT 1 FROM snapshots WHERE id=?", (info.id,)):
                raise SnapshotNotFound(f"snapshot {info.name!r} was removed from store {self.path} "
                                       "while open")
        try:
            if not rows:
                raise FrameError("region row missing")
            runs = _runs.decode(rows[0]["map"], region["nruns"], _integrity.map_crc(region, self.checksums))
            _runs.validate(runs, region["length"] // STORE_PAGE)
        except FrameError as exc:
            raise StoreCorrupt(f"snapshot {info.name!r} region {region['name']!r}: page map is damaged "
                               f"({exc.reason}): run `snapfs check`") from None
        return runs

    def open_snapshot(self, name: str) -> "SnapshotReader":
        """A thread-safe reader of committed snapshot ``name``."""
        from snapfs.store.reader import SnapshotReader
        with self.connection() as conn:
            conn.execute("BEGIN")       # the row and its regions from one catalog state
            try:
                _, info = self._lookup(conn, name)
                regions = self.region_rows(conn, info)
            finally:
                conn.execute("COMMIT")
        return SnapshotReader(self, info, regions)

    def begin_snapshot(self, name: str, meta: dict[str, Any], parent: str | None = None, *,
                       number_if_taken: bool = False) -> "SnapshotWriter":
        """Reserve ``name`` and return a writer (NameInUse if taken or being captured).

        With ``parent`` (a committed snapshot), unchanged pages are stored as references.
        With ``number_if_taken`` (a name snapfs made up), a taken name becomes the first free
        ``<name>-2``, ``<name>-3``, ... instead (the writer's ``name``), chosen in the same
        transaction that reserves it.
        """
        from snapfs.store.writer import SnapshotWriter
        if not _NAME_RE.fullmatch(name) or name in (".", ".."):
            raise UsageError(f"bad snapshot name {name!r}: use letters, digits and ._:@+- "
                             "(at most 200, not starting with a dot or dash)")
        self._writable()
        try:
            lock_name, lock_fd = self.new_lock()
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.path, exc) from None
            raise StoreError(f"cannot create a lock file in {self.locks_dir}: {exc.strerror}") from None
        try:
            with self.transaction() as conn:
                parent_info, parent_regions = None, []
                if parent is not None:
                    # Checked inside the transaction: once our pending row names it, remove()
                    # refuses to delete it until this capture ends.
                    try:
                        _, parent_info = self._lookup(conn, parent)
                        parent_regions = self.region_rows(conn, parent_info)
                    except StoreCorrupt as exc:
                        raise StoreCorrupt(f"{exc}; take a full snapshot (no parent) meanwhile") from None
                old = conn.execute("SELECT id, state, lock FROM snapshots WHERE name=?", (name,)).fetchone()
                if old is not None and number_if_taken:
                    name, old = self._free_numbered(conn, name)
                if old is not None:
                    if old["state"] != "pending":
                        raise NameInUse(f"a snapshot named {name!r} already exists in {self.path}: "
                                        f"choose another name or `snapfs rm {name}`")
                    if self.writer_alive(old["lock"]):
                        raise NameInUse(f"a snapshot named {name!r} is being captured right now by "
                                        "another snapfs: choose another name or wait for it")
                    # A dead writer's reservation: release the name, leave its files to gc.
                    conn.execute("DELETE FROM snapshots WHERE id=?", (old["id"],))
                    conn.execute("DELETE FROM seg_refs WHERE snapshot_id=?", (old["id"],))
                cur = conn.execute(
                    "INSERT INTO snapshots(name, state, lock, parent_id, parent_name, created) "
                    "VALUES (?, 'pending', ?, ?, ?, ?)",
                    (name, lock_name, parent_info.id if parent_info else None, parent, time.time()))
                snap_id = int(cur.lastrowid)
                if parent_info is not None:
                    # Keep the parent's segments alive even if the parent is removed meanwhile.
                    conn.execute("INSERT INTO seg_refs SELECT ?, seg FROM seg_refs WHERE snapshot_id=?",
                                 (snap_id, parent_info.id))
        except BaseException:
            os.close(lock_fd)
            os.unlink(self.locks_dir / lock_name)
            raise
        return SnapshotWriter(self, snap_id, name, dict(meta), parent_info, parent_regions,
                              lock_name, lock_fd)

    def _free_numbered(self, conn: sqlite3.Connection, name: str) -> tuple[str, sqlite3.Row | None]:
        """The first ``<name>-N`` (N >= 2) with no row, or a dead writer's reservation of one
        (returned as the old row, released by the caller)."""
        n = 2
        while True:
            candidate = f"{name}-{n}"
            old = conn.execute("SELECT id, state, lock FROM snapshots WHERE name=?", (candidate,)).fetchone()
            if old is None or (old["state"] == "pending" and not self.writer_alive(old["lock"])):
                return candidate, old
            n += 1

    def remove(self, names: list[str] | tuple[str, ...] | str) -> None:
        """Remove committed snapshots (all or none); space is reclaimed by :meth:`gc`.

        Children stay readable: they reference frames, not their parent's rows. A child's
        ``parent`` becomes its nearest ancestor still in the store (or None) and the removed
        ones are listed in its ``removed_parents``.
        """
        if isinstance(names, str):
            names = [names]
        self._writable()
        with self.transaction() as conn:
            ids = []
            for name in names:
                # A damaged row may be removed too, but never a row that is not this name's.
                row = conn.execute("SELECT id, name FROM snapshots WHERE name=? AND state != 'pending'",
                                   (name,)).fetchone()
                if row is None or row["name"] != name:
                    raise SnapshotNotFound(f"no snapshot named {name!r} in store {self.path}: "
                                           "nothing removed; see `snapfs list`")
                ids.append(row["id"])
            for snap_id, name in zip(ids, names):
                for child in conn.execute("SELECT name, lock FROM snapshots WHERE state='pending' "
                                          "AND parent_id=?", (snap_id,)).fetchall():
                    if self.writer_alive(child["lock"]):
                        raise StoreError(f"snapshot {name!r} is the parent of capture {child['name']!r} "
                                         "in progress: nothing removed; retry when it finishes")
            self._repoint_children(conn, ids)
            for snap_id in ids:
                for table in ("regions", "hashes", "seg_refs", "blobs"):
                    conn.execute(f"DELETE FROM {table} WHERE snapshot_id=?", (snap_id,))
                conn.execute("DELETE FROM snapshots WHERE id=?", (snap_id,))
            conn.execute("UPDATE counters SET value=value+1 WHERE name='generation'")

    def _repoint_children(self, conn: sqlite3.Connection, ids: list[int]) -> None:
        """Children of snapshots being removed now name their nearest remaining ancestor as
        parent (or none), and list the removed ones in ``removed_parents``, nearest first.
        A child whose row is damaged is left as it is (rewriting it would certify the damage)."""
        marks = ",".join("?" * len(ids))
        gone = {r["id"]: r for r in conn.execute(
            f"SELECT id, name, parent_id, parent_name FROM snapshots WHERE id IN ({marks})", ids).fetchall()}
        children = conn.execute(
            f"SELECT * FROM snapshots WHERE state != 'pending' AND parent_id IN ({marks})", ids).fetchall()
        for child in children:
            if child["id"] in gone:
                continue
            try:
                self._checked_info(child)
            except StoreCorrupt:
                continue
            removed: list[str] = []
            parent_id, parent_name = child["parent_id"], None
            while parent_id in gone:
                removed.append(gone[parent_id]["name"])
                parent_id, parent_name = gone[parent_id]["parent_id"], gone[parent_id]["parent_name"]
            info = json.loads(child["info"])
            info["removed_parents"] = list(info.get("removed_parents", [])) + removed
            conn.execute("UPDATE snapshots SET parent_id=?, parent_name=?, info=? WHERE id=?",
                         (parent_id, parent_name, json.dumps(info), child["id"]))
            _integrity.seal_snapshot(conn, child["id"])

    def gc(self) -> dict[str, Any]:
        """Reclaim space no snapshot references; safe during mounts and captures. See maintenance.gc."""
        from snapfs.store.maintenance import gc
        self._writable()
        return gc(self)

    def check(self, verify_data: bool = False) -> dict[str, Any]:
        """Check catalog consistency (and every frame with ``verify_data``). See maintenance.check."""
        from snapfs.store.maintenance import check
        return check(self, verify_data)

    def close(self) -> None:
        """Close catalog connections and segment fds (readers of this store stop working)."""
        self._closed = True
        with self._lock:
            conns, self._idle = self._idle, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self.segments.close()
        self.frame_cache.clear()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
