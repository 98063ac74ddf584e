"""Plain data types of the store contract: RegionSpec (input), RegionInfo and SnapshotInfo."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

HOLE, ZERO, DATA = 0, 1, 2
# The store's page: every region is kept in 4 KiB pages, whatever the host's page size (a
# 64 KiB-page aarch64 host stores 16 of them per host page). Not the host's page size: that
# is snapfs.capture.kernel.PAGE_SIZE.
STORE_PAGE = 4096
REGION_KINDS = ("heap", "stack", "anon", "file", "shmem", "hugetlb", "vdso", "ramblock")


@dataclass(frozen=True)
class RegionSpec:
    """A region a writer is about to fill: a VMA or a RAMBlock (``length`` a multiple of 4 KiB)."""

    name: str
    start: int
    length: int
    perms: str = "rw-p"
    offset: int = 0
    path: str | None = None
    kind: str = "anon"
    page_size: int = 4096
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RegionInfo:
    """A committed region: its spec plus page counts."""

    index: int
    name: str
    start: int
    length: int
    perms: str
    offset: int
    path: str | None
    kind: str
    page_size: int
    data_pages: int
    zero_pages: int
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SnapshotInfo:
    """What ``list``/``info`` show about a committed snapshot.

    ``stored_bytes`` counts frames this snapshot wrote; ``shared_bytes`` frames it refers to
    that an ancestor wrote. ``resident_bytes`` = captured pages (data + zero) * 4 KiB.
    ``parent`` is the nearest ancestor still in the store; ``removed_parents`` the ancestors
    removed between it and this snapshot, nearest first (this snapshot keeps the pages it
    shares with them).
    """

    id: int
    name: str
    kind: str
    pid: int | None
    comm: str | None
    exe: str | None
    cmdline: list[str] | None
    created: float
    pause_ms: float | None
    duration_s: float | None
    resident_bytes: int
    zero_bytes: int
    stored_bytes: int
    shared_bytes: int
    faults: int
    parent: str | None
    warnings: list[str]
    meta: dict[str, Any]
    region_count: int
    removed_parents: list[str] = field(default_factory=list)
    damaged: str | None = None     # listing only: why this snapshot's catalog row failed verification

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)
