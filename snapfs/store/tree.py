"""Process-tree snapshots in the store: one snapshot (kind ``tree``) holding several processes
and the shared memory they map, each shared object stored once.

A tree snapshot is an ordinary snapshot with a convention on its regions and metadata:

* every shared object (a SysV segment, a memfd, ``MAP_SHARED|MAP_ANONYMOUS`` memory inherited
  across fork, a tmpfs or ``/dev/shm`` file, a shared file mapping) is one region named
  ``shared/<entry>``, indexed by the object's page offsets;
* each process's regions follow, named ``<entry>/<VMA name>`` (``<entry>`` is
  ``<pid>-<comm>``), in ``[first, count]`` ranges; a process's window on a shared object is a region that
  *shares* the object's pages (:meth:`SnapshotWriter.share`): its ``data`` reads the object's
  bytes at the mapping's offset, nothing is stored twice;
* ``meta["tree"]`` describes the members: ``{"root": {...}, "processes": [{"entry", "pid",
  "ppid", "comm", "exe", "cmdline", "regions": [first, count] (or a list of such ranges),
  "threads", "pause_ms", "faults", "warnings", "exited"...}], "shared": [{"entry", "region",
  "key", "path", "kind", "mapped_by", ...}]}``; a member's blobs are ``<entry>/<name>``.

:func:`members` gives each process as a :class:`MemberReader`, which reads like the
:class:`~snapfs.store.SnapshotReader` of a process snapshot (``info``, ``regions`` indexed
from 0 under their VMA names, ``read``, ``read_pages_into``, ``runs``, ``data_extents``), so
every per-process view (``mem``, ``vmstate``, ``core``) works on a member unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from snapfs.store.model import RegionInfo, SnapshotInfo

TREE_KIND = "tree"
SHARED_PREFIX = "shared/"
PAGE = 4096


def is_tree(info: SnapshotInfo) -> bool:
    """Whether a snapshot holds a process tree."""
    return info.kind == TREE_KIND


def member_entry(pid: int, comm: str) -> str:
    """The name of a member (its directory under ``processes/``, its regions' prefix)."""
    safe = "".join(c if c.isalnum() or c in "._-+@:" else "_" for c in comm) or "process"
    return f"{pid}-{safe}"


def tree_meta(info: SnapshotInfo) -> dict[str, Any]:
    """The snapshot's ``meta["tree"]`` (empty lists for a snapshot that is not a tree)."""
    doc = info.meta.get("tree") if is_tree(info) else None
    return doc or {"processes": [], "shared": []}


class MemberReader:
    """One process of a tree snapshot, read as a process snapshot (thread-safe, like the tree's
    reader it wraps)."""

    def __init__(self, reader: Any, member: dict[str, Any]) -> None:
        self.tree = reader
        self.member = member
        self._index = member_regions(member)  # member's region i -> the tree's region index
        prefix = member["entry"] + "/"
        self.regions = [dataclasses.replace(reader.regions[t], index=i, name=reader.regions[t].name.removeprefix(prefix))
                        for i, t in enumerate(self._index)]
        pages = sum(r.data_pages + r.zero_pages for r in self.regions)
        zero = sum(r.zero_pages for r in self.regions)
        t = reader.info
        self.info = SnapshotInfo(
            id=t.id, name=f"{t.name}/processes/{member['entry']}", kind="process",
            pid=member.get("pid"), comm=member.get("comm"), exe=member.get("exe"),
            cmdline=member.get("cmdline"), created=t.created, pause_ms=member.get("pause_ms"),
            duration_s=t.duration_s, resident_bytes=pages * PAGE, zero_bytes=zero * PAGE,
            stored_bytes=0, shared_bytes=0, faults=int(member.get("faults", 0)), parent=t.parent,
            warnings=list(member.get("warnings", [])),
            meta={k: v for k, v in member.items() if k not in ("regions", "warnings")},
            region_count=len(self.regions),
        )

    def read(self, region_index: int, offset: int, size: int) -> bytes:
        """As :meth:`SnapshotReader.read` on the member's region ``region_index``."""
        return self.tree.read(self._index[region_index], offset, size)

    def read_pages_into(self, region_index: int, pages: Any, dest: np.ndarray, rows: Any = None) -> None:
        """As :meth:`SnapshotReader.read_pages_into`."""
        self.tree.read_pages_into(self._index[region_index], pages, dest, rows)

    def runs(self, region_index: int) -> Iterator[tuple[int, int, int]]:
        """As :meth:`SnapshotReader.runs`."""
        return self.tree.runs(self._index[region_index])

    def data_extents(self, region_index: int) -> list[tuple[int, int]]:
        """As :meth:`SnapshotReader.data_extents`."""
        return self.tree.data_extents(self._index[region_index])

    def blob(self, name: str) -> bytes | None:
        """The member's blob ``name`` (stored in the tree as ``<entry>/<name>``)."""
        return self.tree.blob(f"{self.member['entry']}/{name}")

    def close(self) -> None:
        """Nothing to close (the tree's reader is shared)."""


def member_regions(member: dict[str, Any]) -> list[int]:
    """The tree's region indices of a member, in its order: ``meta "regions"`` is one
    ``[first, count]`` range or a list of them (regions added after the first ones)."""
    spans = member["regions"]
    if spans and isinstance(spans[0], int):
        spans = [spans]
    return [i for first, count in spans for i in range(first, first + count)]


def members(reader: Any) -> list[MemberReader]:
    """Every process of a tree snapshot, in the order captured (``[]`` if not a tree)."""
    return [MemberReader(reader, m) for m in tree_meta(reader.info)["processes"]]


def shared_objects(reader: Any) -> list[tuple[dict[str, Any], RegionInfo]]:
    """``(description, region)`` of every shared object of a tree snapshot."""
    return [(obj, reader.regions[obj["region"]]) for obj in tree_meta(reader.info)["shared"]]
