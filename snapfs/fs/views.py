"""File views: what a regular file of the mount is (size, allocated bytes, read).

Every file of the layout is a *view* over one snapshot's reader. The built-in ones live here
(:class:`BytesView` for the ``info.json`` files, :class:`RegionDataView` for
``ramblocks/<block>/data``); ``mem`` is :class:`snapfs.fs.memview.MemView`.

Snapshot-level views defined elsewhere (``vmstate``, ``core``) are *providers*: an entry in
:data:`PROVIDERS` names a module and a factory called with the snapshot's reader. The module is
imported on first use; a provider whose module does not exist is not listed. A provider names
the snapshots it applies to, from the catalog alone (``core``: process snapshots, not process
streams stored with ``incoming --name``), so a lookup builds no other view; each view is built
on its first use (a view that fails to build is logged and left out of listings). A provider
that ``describes`` itself adds its view's ``describe()`` dict to the snapshot's ``info.json``
under its name.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from snapfs.store.model import STORE_PAGE

log = logging.getLogger(__name__)


class FileView(Protocol):
    """A regular file: ``size`` exact before any read; ``read`` may run in a worker thread."""

    size: int

    def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` clipped to the file's end."""
        ...


def allocated_bytes(view: Any) -> int:
    """Bytes the view really holds (``st_blocks``): ``view.allocated`` if it says, else its size."""
    return int(getattr(view, "allocated", view.size))


def is_immutable(view: Any) -> bool:
    """Whether the kernel may keep the file's pages cached across opens (``keep_cache``)."""
    return not getattr(view, "size_may_change", False)


def is_streamed(view: Any) -> bool:
    """Whether the file is a stream read once from start to end (``vmstate``): the mount then
    hands each read to the daemon (FUSE ``direct_io``) instead of going through the page
    cache (see :mod:`snapfs.fs.fuse_ops`)."""
    return bool(getattr(view, "streamed", False))


class BytesView:
    """A small file held in memory (the ``info.json`` files)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.allocated = len(data)

    def read(self, offset: int, size: int) -> bytes:
        """A slice of the bytes."""
        return self.data[offset : offset + size]


class RegionDataView:
    """``ramblocks/<block>/data``: one region, offset 0 = the region's first byte."""

    def __init__(self, reader: Any, region: Any) -> None:
        self._reader = reader
        self._index = region.index
        self.size = region.length
        # Zero pages are stored as index entries only: they are holes to `du` as well.
        self.allocated = region.data_pages * region.page_size

    def read(self, offset: int, size: int) -> bytes:
        """Region bytes; zeros for holes and zero pages."""
        size = min(size, self.size - offset)
        if size <= 0:
            return b""
        return self._reader.read(self._index, offset, size)

    def data_extents(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of the stored pages; the rest reads as zeros (sparse copies)."""
        return self._reader.data_extents(self._index)

    def read_buffer(self, offset: int, size: int) -> bytes | memoryview:
        """Like :meth:`read`; page-aligned requests (all of FUSE's) are copied once, straight
        from the decoded frames into a fresh buffer handed on as a read-only memoryview."""
        size = min(size, self.size - offset)
        if size <= 0:
            return b""
        if offset % STORE_PAGE or size % STORE_PAGE:
            return self.read(offset, size)
        out = np.empty((size // STORE_PAGE, STORE_PAGE), np.uint8)
        self._reader.read_pages_into(self._index, offset // STORE_PAGE, out)
        return memoryview(out.reshape(-1)).toreadonly()


@dataclass(frozen=True)
class ViewProvider:
    """A snapshot-level file made by another module: ``<module>.<factory>(reader)``."""

    name: str
    module: str
    factory: str
    kinds: tuple[str, ...] = ("process", "vm")  # snapshot kinds it applies to
    describes: bool = False  # its view has describe(): a dict for the snapshot's info.json
    not_with_meta: tuple[str, ...] = ()  # metadata keys of snapshots it does not apply to

    def applies_to(self, info: Any) -> bool:
        """Whether a snapshot (its SnapshotInfo) has this view, known from the catalog alone."""
        meta = info.meta or {}
        return info.kind in self.kinds and not any(key in meta for key in self.not_with_meta)

    def available(self) -> bool:
        """Whether the module exists (checked without importing it)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def load(self) -> Callable[[Any], Any] | None:
        """The factory, imported now; ``None`` (logged) if the module fails to import."""
        try:
            return getattr(importlib.import_module(self.module), self.factory)
        except (ImportError, AttributeError):
            log.warning("view %s unavailable: %s.%s cannot be imported", self.name, self.module,
                        self.factory, exc_info=True)
            return None


# Order is the inode order of the snapshot directory's extra files; append only (inode
# numbers of a running mount depend on positions).
PROVIDERS: tuple[ViewProvider, ...] = (
    ViewProvider("vmstate", "snapfs.stream.vmstate", "VmstateView"),
    # A process stream stored with incoming --name (meta "qemu_stream") has RAMBlocks at no
    # real address and no recorded threads: no core.
    ViewProvider("core", "snapfs.fs.core", "CoreView", kinds=("process",), describes=True,
                 not_with_meta=("qemu_stream",)),
)
