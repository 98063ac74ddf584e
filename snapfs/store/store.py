"""The Store: opening/creating a store directory, the catalog connections, list/info/remove.

Writing lives in writer.py, reading in reader.py, gc/check in maintenance.py.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from snapfs.errors import NameInUse, SnapshotNotFound, StoreCorrupt, StoreError, UsageError
from snapfs.store._fsutil import disk_full_error, fsync_dir, is_disk_full, write_atomic
from snapfs.store.model import SnapshotInfo

FORMAT_NAME = "snapfs-store"
FORMAT_VERSION = 1
DEFAULT_LEVEL = 1          # zstd level: level 1 keeps compression off the capture's critical path
CATALOG = "catalog.sqlite"
POOL_IDLE = 8              # idle catalog connections kept open
OPEN_SEGMENTS = 64         # segment fds kept open for readers (LRU)
_SCHEMA = (Path(__file__).with_name("schema.sql")).read_text()
_OUR_ENTRIES = {"README", "config.json", CATALOG, CATALOG + "-wal",
                CATALOG + "-shm", CATALOG + "-journal", "segments", "locks"}
_REQUIRED = ("config.json", CATALOG, "segments")   # a store has all three
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
        self.segments_dir = path / "segments"
        self.locks_dir = path / "locks"
        self._catalog_uri = (path / CATALOG).absolute().as_uri() + "?mode=rw"
        self._idle: list[sqlite3.Connection] = []      # pooled catalog connections
        self._lock = threading.Lock()
        self._seg_fds: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # seg -> [fd, users]
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
        if config.get("version") != FORMAT_VERSION:
            raise StoreError(
                f"store {path} has format version {config.get('version')}, this snapfs reads version "
                f"{FORMAT_VERSION}: use a snapfs release matching the store, or another --store")
        store = cls(path, config)
        if compression_level is not None:
            store.level = compression_level
        store.query("SELECT value FROM counters WHERE name='generation'")
        return store

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
    def segment_path(self, seg: int) -> Path:
        """Path of segment ``seg``."""
        return self.segments_dir / f"{seg:010d}.seg"

    def read_segment(self, seg: int, offset: int, length: int) -> bytes:
        """pread from segment ``seg`` through a bounded cache of open fds.

        StoreCorrupt if the segment file is missing. An fd is only closed (LRU eviction, or
        gc deleting the segment) when no read is using it, so fd numbers are never reused
        under a running pread.
        """
        with self._lock:
            entry = self._seg_fds.get(seg)
            if entry is None:
                try:
                    fd = os.open(self.segment_path(seg), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise StoreCorrupt(f"segment {self.segment_path(seg)} is missing: "
                                       "run `snapfs check` to see which snapshots are affected") from None
                entry = self._seg_fds[seg] = [fd, 0]
                self._evict_fds()
            self._seg_fds.move_to_end(seg)
            entry[1] += 1
        try:
            return os.pread(entry[0], length, offset)
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0 and self._seg_fds.get(seg) is not entry:
                    os.close(entry[0])          # evicted or forgotten while we read

    def _evict_fds(self) -> None:
        """Close least recently used idle fds beyond OPEN_SEGMENTS (call with _lock held)."""
        for seg in list(self._seg_fds):
            if len(self._seg_fds) <= OPEN_SEGMENTS:
                break
            entry = self._seg_fds[seg]
            if entry[1] == 0:
                del self._seg_fds[seg]
                os.close(entry[0])

    def forget_segment_fd(self, seg: int) -> None:
        """Close our fd of a segment gc deleted (once no read uses it)."""
        with self._lock:
            entry = self._seg_fds.pop(seg, None)
            if entry is not None and entry[1] == 0:
                os.close(entry[0])

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
        """Committed snapshots, oldest first."""
        rows = self.query("SELECT * FROM snapshots WHERE state='committed' ORDER BY created, id")
        return [_info_from_row(r) for r in rows]

    def _row(self, name: str) -> sqlite3.Row:
        rows = self.query("SELECT * FROM snapshots WHERE name=? AND state='committed'", (name,))
        if not rows:
            raise self._not_found(name)
        return rows[0]

    def _not_found(self, name: str) -> SnapshotNotFound:
        return SnapshotNotFound(f"no snapshot named {name!r} in store {self.path}: see `snapfs list`")

    def info(self, name: str) -> SnapshotInfo:
        """The SnapshotInfo of committed snapshot ``name`` (SnapshotNotFound otherwise)."""
        return _info_from_row(self._row(name))

    def open_snapshot(self, name: str) -> "SnapshotReader":
        """A thread-safe reader of committed snapshot ``name``."""
        from snapfs.store.reader import SnapshotReader
        with self.connection() as conn:
            conn.execute("BEGIN")       # the row and its regions from one catalog state
            row = conn.execute("SELECT * FROM snapshots WHERE name=? AND state='committed'", (name,)).fetchone()
            regions = conn.execute(
                "SELECT idx, name, start, length, perms, offset, path, kind, page_size, data_pages, "
                "zero_pages, meta FROM regions WHERE snapshot_id=? ORDER BY idx",
                (row["id"] if row else -1,)).fetchall()
            conn.execute("COMMIT")
        if row is None:
            raise self._not_found(name)
        return SnapshotReader(self, _info_from_row(row), regions)

    def begin_snapshot(self, name: str, meta: dict[str, Any], parent: str | None = None) -> "SnapshotWriter":
        """Reserve ``name`` and return a writer (NameInUse if taken or being captured).

        With ``parent`` (a committed snapshot), unchanged pages are stored as references.
        """
        from snapfs.store.writer import SnapshotWriter
        if not _NAME_RE.fullmatch(name) or name in (".", ".."):
            raise UsageError(f"bad snapshot name {name!r}: use letters, digits and ._:@+- "
                             "(at most 200, not starting with a dot or dash)")
        try:
            lock_name, lock_fd = self.new_lock()
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.path, exc) from None
            raise StoreError(f"cannot create a lock file in {self.locks_dir}: {exc.strerror}") from None
        try:
            with self.transaction() as conn:
                parent_row = None
                if parent is not None:
                    # Checked inside the transaction: once our pending row names it, remove()
                    # refuses to delete it until this capture ends.
                    parent_row = conn.execute("SELECT * FROM snapshots WHERE name=? AND state='committed'",
                                              (parent,)).fetchone()
                    if parent_row is None:
                        raise self._not_found(parent)
                old = conn.execute("SELECT id, state, lock FROM snapshots WHERE name=?", (name,)).fetchone()
                if old is not None:
                    if old["state"] == "committed":
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
                    (name, lock_name, parent_row["id"] if parent_row else None, parent, time.time()))
                snap_id = int(cur.lastrowid)
                if parent_row is not None:
                    # Keep the parent's segments alive even if the parent is removed meanwhile.
                    conn.execute("INSERT INTO seg_refs SELECT ?, seg FROM seg_refs WHERE snapshot_id=?",
                                 (snap_id, parent_row["id"]))
        except BaseException:
            os.close(lock_fd)
            os.unlink(self.locks_dir / lock_name)
            raise
        return SnapshotWriter(self, snap_id, name, dict(meta), parent_row, lock_name, lock_fd)

    def remove(self, names: list[str] | tuple[str, ...] | str) -> None:
        """Remove committed snapshots (all or none); space is reclaimed by :meth:`gc`.

        Children stay readable: they reference frames, not their parent's rows. A child's
        ``parent`` becomes its nearest ancestor still in the store (or None) and the removed
        ones are listed in its ``removed_parents``.
        """
        if isinstance(names, str):
            names = [names]
        with self.transaction() as conn:
            ids = []
            for name in names:
                row = conn.execute("SELECT id FROM snapshots WHERE name=? AND state='committed'",
                                   (name,)).fetchone()
                if row is None:
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

    @staticmethod
    def _repoint_children(conn: sqlite3.Connection, ids: list[int]) -> None:
        """Children of snapshots being removed now name their nearest remaining ancestor as
        parent (or none), and list the removed ones in ``removed_parents``, nearest first."""
        gone = {r["id"]: r for r in conn.execute(
            f"SELECT id, name, parent_id, parent_name FROM snapshots WHERE id IN ({','.join('?' * len(ids))})",
            ids).fetchall()}
        children = conn.execute(
            f"SELECT id, parent_id, info FROM snapshots WHERE state='committed' AND parent_id IN "
            f"({','.join('?' * len(ids))})", ids).fetchall()
        for child in children:
            if child["id"] in gone:
                continue
            removed: list[str] = []
            parent_id, parent_name = child["parent_id"], None
            while parent_id in gone:
                removed.append(gone[parent_id]["name"])
                parent_id, parent_name = gone[parent_id]["parent_id"], gone[parent_id]["parent_name"]
            info = json.loads(child["info"])
            info["removed_parents"] = list(info.get("removed_parents", [])) + removed
            conn.execute("UPDATE snapshots SET parent_id=?, parent_name=?, info=? WHERE id=?",
                         (parent_id, parent_name if parent_id is not None else None, json.dumps(info),
                          child["id"]))

    def gc(self) -> dict[str, Any]:
        """Reclaim space no snapshot references; safe during mounts and captures. See maintenance.gc."""
        from snapfs.store.maintenance import gc
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
            fds, self._seg_fds = self._seg_fds, collections.OrderedDict()
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        for fd, _ in fds.values():
            os.close(fd)
        self.frame_cache.clear()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
