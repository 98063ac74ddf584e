"""The snapfs filesystem as plain code: tree, attributes, reads. No FUSE here.

Layout (the contract with users and ``docs/architecture.md``)::

    /<snapshot>/info.json                 metadata + region list (with each region's mem_offset)
    /<snapshot>/mem                       all regions in one sparse file (see memview)
    /<snapshot>/ramblocks/<block>/data    one sparse file per region
    /<snapshot>/ramblocks/<block>/info.json   region + data extents
    /<snapshot>/vmstate, /<snapshot>/core views from providers (see views), listed if present

A process-tree snapshot (kind ``tree``, :mod:`snapfs.store.tree`)::

    /<snapshot>/info.json                 the tree: root, processes, shared objects, figures
    /<snapshot>/processes/<pid>-<comm>/   one process, laid out as a process snapshot above
    /<snapshot>/shared/<object>/data      a shared object, stored once (each process's region
    /<snapshot>/shared/<object>/info.json   mapping it reads the same bytes)

The root follows the store: :meth:`SnapshotFS.refresh` compares ``store.generation()`` (cheap)
and re-lists only when it changed; it runs on lookups and listings of the root, never on reads.
A snapshot's reader is opened on first access to anything inside it and kept in a bounded LRU,
so memory does not grow with the number of snapshots. Inode numbers: :mod:`snapfs.fs.inodes`.

Thread-safe (the store and its readers are): the FUSE adapter calls it from worker threads. Errors: :class:`FsError` (an errno)
for lookups of things that do not exist; store errors (``StoreCorrupt``...) pass through.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from snapfs.errors import SnapfsError
from snapfs.fs import inodes
from snapfs.fs.loaded import LoadedSnapshot, provider_locals
from snapfs.fs.names import encode_name
from snapfs.fs.openfile import OpenFile, WindowBudget
from snapfs.fs.views import allocated_bytes

log = logging.getLogger(__name__)

MAX_OPEN_SNAPSHOTS = 8
BLOCK_SIZE = 4096


class FsError(Exception):
    """A filesystem-level failure carrying an errno (ENOENT, ENOTDIR, EISDIR...)."""

    def __init__(self, err: int, what: str = "") -> None:
        super().__init__(f"{os.strerror(err)}: {what}" if what else os.strerror(err))
        self.errno = err


@dataclass(frozen=True, slots=True)
class Attr:
    """Attributes of a node; ``allocated`` = bytes really held (``st_blocks`` * 512)."""

    inode: int
    mode: int
    nlink: int
    size: int
    allocated: int
    uid: int
    gid: int
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        """Whether this is a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def blocks(self) -> int:
        """``st_blocks`` (512-byte units)."""
        return -(-self.allocated // 512)


@dataclass(frozen=True, slots=True)
class Entry:
    """A directory entry: name, attributes, and the cursor that resumes after it."""

    name: str
    attr: Attr
    cursor: int


@dataclass(frozen=True, slots=True)
class _Listed:
    slot: int
    entry: str
    info: Any  # SnapshotInfo


class SnapshotFS:
    """The tree of every committed snapshot of ``store``."""

    def __init__(self, store: Any, *, max_open: int = MAX_OPEN_SNAPSHOTS,
                 store_dir: str | os.PathLike[str] | None = None) -> None:
        self.store = store
        self.max_open = max_open
        self.on_removed: Callable[[list[tuple[str, int]]], None] | None = None
        self._lock = threading.RLock()
        self._refresh_lock = threading.Lock()
        self._generation: Any = object()
        self._slots: dict[tuple[Any, ...], int] = {}  # snapshot identity -> slot, never reused
        self._next_slot = 1
        self._live: dict[int, _Listed] = {}
        self._by_entry: dict[str, int] = {}
        self._loaded: OrderedDict[int, LoadedSnapshot] = OrderedDict()
        self._loading: dict[int, threading.Lock] = {}
        self._providers = provider_locals()
        self._root_mtime_ns = time.time_ns()
        self._stored_bytes = 0
        self.window_budget = WindowBudget()
        # Owner and modes follow the store directory: files r--, dirs r-x where it grants rwx.
        st = os.stat(store_dir or getattr(store, "path"))
        self.uid, self.gid = st.st_uid, st.st_gid
        perms = stat.S_IMODE(st.st_mode)
        self._file_mode = stat.S_IFREG | (perms & 0o444) | 0o400
        self._dir_mode = stat.S_IFDIR | (perms & 0o555) | 0o500
        self.refresh()

    # -- the root: following the store -----------------------------------------------------
    def refresh(self) -> bool:
        """Re-list the store if its generation changed; True if it did.

        Calls ``on_removed([(entry, inode), ...])`` for snapshots that disappeared (the FUSE
        adapter uses it to drop the kernel's cached entries).
        """
        with self._refresh_lock:  # one at a time, so an older listing never replaces a newer one
            generation = self.store.generation()
            if generation == self._generation:
                return False
            infos = self.store.list_snapshots()
            removed = self._apply_listing(generation, infos)
        if removed and self.on_removed is not None:
            self.on_removed(removed)
        return True

    def _apply_listing(self, generation: Any, infos: list[Any]) -> list[tuple[str, int]]:
        removed: list[tuple[str, int]] = []
        with self._lock:
            live: dict[int, _Listed] = {}
            for info in infos:
                key = (info.id, info.name, info.created)
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._slots[key] = self._next_slot
                    self._next_slot += 1
                live[slot] = _Listed(slot, encode_name(info.name), info)
            for slot, old in self._live.items():
                if slot not in live:
                    removed.append((old.entry, inodes.pack(slot, inodes.SNAP_DIR)))
                    self._loaded.pop(slot, None)
                    self._loading.pop(slot, None)
            self._live = live
            self._by_entry = {listed.entry: slot for slot, listed in live.items()}
            self._generation = generation
            self._root_mtime_ns = time.time_ns()
            self._stored_bytes = sum(i.stored_bytes for i in infos)
        return removed

    def _listed(self, slot: int) -> _Listed:
        with self._lock:
            listed = self._live.get(slot)
        if listed is None:
            raise FsError(errno.ENOENT, "snapshot removed")
        return listed

    def loaded(self, slot: int) -> LoadedSnapshot:
        """The opened snapshot in ``slot``: opened now if not in the LRU (may block on I/O)."""
        with self._lock:
            found = self._loaded.get(slot)
            if found is not None:
                self._loaded.move_to_end(slot)
                return found
            gate = self._loading.setdefault(slot, threading.Lock())
        listed = self._listed(slot)
        with gate:  # one opener per snapshot; others wait for it
            with self._lock:
                found = self._loaded.get(slot)
            if found is not None:
                return found
            from snapfs.errors import SnapshotNotFound

            try:
                reader = self.store.open_snapshot(listed.info.name)
            except SnapshotNotFound:
                raise FsError(errno.ENOENT, listed.info.name) from None
            if reader.info.id != listed.info.id:  # removed and re-created meanwhile
                raise FsError(errno.ENOENT, listed.info.name)
            snap = LoadedSnapshot(reader, self._providers)
            with self._lock:
                if slot in self._live:
                    self._loaded[slot] = snap
                    while len(self._loaded) > self.max_open:
                        # Dropped, not closed: open files may still read through it.
                        self._loaded.popitem(last=False)
            return snap

    # -- attributes ------------------------------------------------------------------------
    def _dir(self, inode: int, nlink: int, mtime_ns: int) -> Attr:
        return Attr(inode, self._dir_mode, nlink, 0, 0, self.uid, self.gid, mtime_ns)

    def _file(self, inode: int, view: Any, mtime_ns: int) -> Attr:
        return Attr(inode, self._file_mode, 1, int(view.size), allocated_bytes(view),
                    self.uid, self.gid, mtime_ns)

    def _node(self, inode: int) -> tuple[int, int | None, int]:
        """``(slot, member, local)``: member is None for a snapshot's own nodes, else the
        index of the tree member the node belongs to and local is its local in that member."""
        slot, local = inodes.unpack(inode)
        member, local = inodes.split_member(local)
        return slot, member, local

    def _holder(self, slot: int, member: int | None) -> LoadedSnapshot:
        """The loaded snapshot, or the tree member, whose node it is."""
        snap = self.loaded(slot)
        if member is None:
            return snap
        found = snap.member(member)
        if found is None:
            raise FsError(errno.ENOENT, f"no member {member}")
        return found

    def _is_tree(self, slot: int, member: int | None) -> bool:
        return member is None and self._listed(slot).info.kind == "tree"

    def _shared_region(self, snap: LoadedSnapshot, local: int) -> tuple[int, int]:
        """``(region index, part)`` of a tree's node under ``shared/``; ENOENT for others."""
        index, part = inodes.split_region_local(local)
        if local < inodes.REGION_BASE or index not in snap.shared_regions:
            raise FsError(errno.ENOENT, f"local {local}")
        return index, part

    def getattr(self, inode: int) -> Attr:
        """Attributes of ``inode``; FsError(ENOENT) if it does not (or no longer) exist."""
        if inode == inodes.ROOT:
            with self._lock:
                return self._dir(inode, 2 + len(self._live), self._root_mtime_ns)
        slot, member, local = self._node(inode)
        listed = self._listed(slot)
        mtime = int(listed.info.created * 1e9)
        if self._is_tree(slot, member):
            return self._tree_getattr(inode, slot, local, mtime)
        if local == inodes.SNAP_DIR:
            if member is not None:
                self._holder(slot, member)  # ENOENT for a member that does not exist
            return self._dir(inode, 3, mtime)
        if local == inodes.RAMBLOCKS and member is None:
            return self._dir(inode, 2 + listed.info.region_count, mtime)
        snap = self._holder(slot, member)
        if local == inodes.RAMBLOCKS:
            return self._dir(inode, 2 + len(snap.regions), mtime)
        if local >= inodes.REGION_BASE:
            index, part = inodes.split_region_local(local)
            if index < len(snap.regions) and part == inodes.REGION_DIR:
                return self._dir(inode, 2, mtime)
        view = snap.view(local)
        if view is None:
            raise FsError(errno.ENOENT, f"inode {inode}")
        return self._file(inode, view, mtime)

    def _tree_getattr(self, inode: int, slot: int, local: int, mtime: int) -> Attr:
        """Attributes of a tree snapshot's own nodes: its directory, info.json, processes/,
        shared/ and the shared objects' nodes."""
        if local == inodes.SNAP_DIR:
            return self._dir(inode, 4, mtime)
        snap = self.loaded(slot)
        if local == inodes.PROCESSES:
            return self._dir(inode, 2 + len(snap.member_entries), mtime)
        if local == inodes.SHARED:
            return self._dir(inode, 2 + len(snap.shared_entries), mtime)
        if local == inodes.SNAP_INFO:
            return self._file(inode, snap.info_json(), mtime)
        _, part = self._shared_region(snap, local)
        if part == inodes.REGION_DIR:
            return self._dir(inode, 2, mtime)
        return self._file(inode, snap.view(local), mtime)

    # -- names -----------------------------------------------------------------------------
    def _children(self, inode: int) -> list[tuple[str, int]]:
        """``(name, local)`` of a directory inside a snapshot, in cursor order."""
        slot, member, local = self._node(inode)
        if self._is_tree(slot, member):
            return self._tree_children(inode, slot, local)
        base = 0 if member is None else inodes.member_base(member)
        return [(name, base | loc) for name, loc in self._process_children(inode, slot, member, local)]

    def _process_children(self, inode: int, slot: int, member: int | None, local: int) -> list[tuple[str, int]]:
        """Children of a process (or VM) snapshot's directory, locals within that snapshot."""
        if local == inodes.SNAP_DIR:
            snap = self._holder(slot, member)
            names = [("info.json", inodes.SNAP_INFO), ("ramblocks", inodes.RAMBLOCKS), ("mem", inodes.MEM)]
            names += [(name, loc) for loc, name in sorted(snap.extra_names().items())]
            return names
        if local == inodes.RAMBLOCKS:
            snap = self._holder(slot, member)
            return [(e, inodes.region_local(i, inodes.REGION_DIR)) for i, e in enumerate(snap.entries)]
        if local >= inodes.REGION_BASE:
            index, part = inodes.split_region_local(local)
            if part == inodes.REGION_DIR:
                return _region_children(index)
        self.getattr(inode)  # ENOENT if it does not exist at all
        raise FsError(errno.ENOTDIR, f"inode {inode}")

    def _tree_children(self, inode: int, slot: int, local: int) -> list[tuple[str, int]]:
        snap = self.loaded(slot)
        if local == inodes.SNAP_DIR:
            return [("info.json", inodes.SNAP_INFO), ("processes", inodes.PROCESSES), ("shared", inodes.SHARED)]
        if local == inodes.PROCESSES:
            return [(e, inodes.member_base(m) | inodes.SNAP_DIR) for m, e in enumerate(snap.member_entries)]
        if local == inodes.SHARED:
            return [(e, inodes.region_local(r, inodes.REGION_DIR))
                    for e, r in sorted(zip(snap.shared_entries, snap.shared_regions), key=lambda x: x[1])]
        if local >= inodes.REGION_BASE:
            index, part = self._shared_region(snap, local)
            if part == inodes.REGION_DIR:
                return _region_children(index)
        self.getattr(inode)
        raise FsError(errno.ENOTDIR, f"inode {inode}")

    def parent(self, inode: int) -> int:
        """The inode of the directory holding ``inode`` (the root for the root)."""
        if inode == inodes.ROOT:
            return inodes.ROOT
        slot, member, local = self._node(inode)
        if local == inodes.SNAP_DIR:
            return inodes.ROOT if member is None else inodes.pack(slot, inodes.PROCESSES)
        tree = self._is_tree(slot, member)
        base = 0 if member is None else inodes.member_base(member)
        if local >= inodes.REGION_BASE:
            index, part = inodes.split_region_local(local)
            if part == inodes.REGION_DIR:
                return inodes.pack(slot, inodes.SHARED if tree else base | inodes.RAMBLOCKS)
            return inodes.pack(slot, base | inodes.region_local(index, inodes.REGION_DIR))
        return inodes.pack(slot, base | inodes.SNAP_DIR)

    def lookup(self, parent: int, name: str) -> Attr:
        """Attributes of ``name`` in directory ``parent``; FsError(ENOENT) if absent."""
        if name == ".":
            return self.getattr(parent)
        if name == "..":
            return self.getattr(self.parent(parent))
        if parent == inodes.ROOT:
            self.refresh()
            with self._lock:
                slot = self._by_entry.get(name)
            if slot is None:
                raise FsError(errno.ENOENT, name)
            return self.getattr(inodes.pack(slot, inodes.SNAP_DIR))
        slot, member, local = self._node(parent)
        # Dict lookups: directories of many regions (or processes) stay fast.
        found: int | None = None
        if self._is_tree(slot, member) and local in (inodes.PROCESSES, inodes.SHARED):
            snap = self.loaded(slot)
            if local == inodes.PROCESSES:
                m = snap.member_index.get(name)
                found = None if m is None else inodes.member_base(m) | inodes.SNAP_DIR
            else:
                r = snap.shared_index.get(name)
                found = None if r is None else inodes.region_local(r, inodes.REGION_DIR)
            if found is None:
                raise FsError(errno.ENOENT, name)
        elif not self._is_tree(slot, member) and local == inodes.RAMBLOCKS:
            index = self._holder(slot, member).entry_index.get(name)
            if index is None:
                raise FsError(errno.ENOENT, name)
            base = 0 if member is None else inodes.member_base(member)
            found = base | inodes.region_local(index, inodes.REGION_DIR)
        else:
            found = next((loc for child, loc in self._children(parent) if child == name), None)
            if found is None:
                raise FsError(errno.ENOENT, name)
        return self.getattr(inodes.pack(slot, found))

    def readdir(self, inode: int, after: int = 0, limit: int = 1024) -> list[Entry]:
        """Up to ``limit`` entries of directory ``inode`` following cursor ``after`` (0: start).

        Cursors are stable: entries added or removed meanwhile never shift the others.
        """
        if inode == inodes.ROOT:
            with self._lock:
                slots = sorted(s for s in self._live if s > after)[:limit]
            out = []
            for slot in slots:
                try:
                    out.append(Entry(self._live[slot].entry,
                                     self.getattr(inodes.pack(slot, inodes.SNAP_DIR)), slot))
                except (FsError, KeyError):
                    continue  # removed while listing
            return out
        slot = inodes.unpack(inode)[0]
        children = [(n, loc) for n, loc in self._children(inode) if loc > after][:limit]
        out = []
        for name, loc in children:
            try:
                out.append(Entry(name, self.getattr(inodes.pack(slot, loc)), loc))
            except FsError:
                if not inodes.PROVIDER_BASE <= loc < inodes.REGION_BASE:
                    raise
                # A view that failed to build (logged): the rest of the snapshot stays listed.
            except SnapfsError as exc:
                # A file whose size depends on damaged metadata (a region's info.json, a view):
                # left out of the listing, so no made-up attributes get cached; looking it up
                # gives the error (EIO), and the rest of the directory stays readable.
                log.error("%s: %s", name, exc)
        return out

    def resolve(self, path: str) -> int:
        """The inode at ``path`` (relative to the mount's root, ``/``-separated entries)."""
        inode = inodes.ROOT
        for part in path.split("/"):
            if part:
                inode = self.lookup(inode, part).inode
        return inode

    # -- data ------------------------------------------------------------------------------
    def file_view(self, inode: int) -> Any:
        """The view behind regular file ``inode``; FsError EISDIR/ENOENT otherwise."""
        if self.getattr(inode).is_dir:
            raise FsError(errno.EISDIR, f"inode {inode}")
        slot, member, local = self._node(inode)
        view = self._holder(slot, member).view(local)
        if view is None:
            raise FsError(errno.ENOENT, f"inode {inode}")
        return view

    def open(self, inode: int) -> OpenFile:
        """An :class:`OpenFile` (sequential detection, windows) on file ``inode``."""
        return OpenFile(inode, self.file_view(inode), self.window_budget)

    def read(self, inode: int, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of file ``inode`` (short at end of file)."""
        return self.file_view(inode).read(offset, size)

    def statfs(self) -> dict[str, int]:
        """``statvfs`` figures: blocks = bytes the store holds; nothing free (read-only)."""
        self.refresh()
        with self._lock:
            files = sum(5 + 3 * listed.info.region_count for listed in self._live.values()) + 1
            stored = self._stored_bytes
        return {
            "f_bsize": BLOCK_SIZE, "f_frsize": BLOCK_SIZE,
            "f_blocks": -(-stored // BLOCK_SIZE), "f_bfree": 0, "f_bavail": 0,
            "f_files": files, "f_ffree": 0, "f_favail": 0, "f_namemax": 255,
        }

    def close(self) -> None:
        """Close every opened reader (the mount is going away)."""
        with self._lock:
            loaded = list(self._loaded.values())
            self._loaded.clear()
        for snap in loaded:
            snap.close()


def _region_children(index: int) -> list[tuple[str, int]]:
    """The entries of a region's directory (``ramblocks/<block>/``, ``shared/<object>/``)."""
    return [("data", inodes.region_local(index, inodes.REGION_DATA)),
            ("info.json", inodes.region_local(index, inodes.REGION_INFO))]
