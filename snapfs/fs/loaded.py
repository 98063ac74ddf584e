"""One opened snapshot: its reader and everything the mount derives from it.

Built on first access to anything inside the snapshot (the root listing needs only the
catalog's :class:`SnapshotInfo`), kept in a bounded LRU by :class:`snapfs.fs.model.SnapshotFS`.
Thread-safe: views are built once under a lock, reads go straight to the (thread-safe) reader.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

from snapfs.errors import SnapfsError
from snapfs.fs import inodes
from snapfs.fs.memview import MemView
from snapfs.fs.names import unique_entries
from snapfs.fs.views import PROVIDERS, BytesView, RegionDataView, ViewProvider
from snapfs.store.tree import MemberReader, is_tree, tree_meta

log = logging.getLogger(__name__)

REGION_JSON_CACHE = 64  # region info.json files kept encoded (each holds its extent list)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()


class LoadedSnapshot:
    """The reader of one snapshot plus its block entries, ``mem`` layout and views.

    A process-tree snapshot has no ``mem`` nor views of its own: its ``members`` (one
    LoadedSnapshot per process, over a :class:`~snapfs.store.tree.MemberReader`, made on first
    use) have them; its regions listed here are its shared objects."""

    def __init__(self, reader: Any, providers: list[tuple[int, ViewProvider]]) -> None:
        self.reader = reader
        self.info = reader.info
        self.regions = list(reader.regions)
        self.entries = unique_entries([r.name for r in self.regions])
        self.entry_index = {e: i for i, e in enumerate(self.entries)}
        self.is_tree = is_tree(self.info)
        self.mem = None if self.is_tree else MemView(reader, self.regions, self.info.kind)
        tree = tree_meta(self.info)
        self._member_docs = tree["processes"]
        self.member_entries = unique_entries([m["entry"] for m in self._member_docs])
        self.member_index = {e: i for i, e in enumerate(self.member_entries)}
        self._shared_docs = tree["shared"]
        self.shared_entries = unique_entries([o["entry"] for o in self._shared_docs])
        self.shared_regions = [o["region"] for o in self._shared_docs]
        self.shared_index = dict(zip(self.shared_entries, self.shared_regions))
        self._members: dict[int, LoadedSnapshot] = {}
        self._providers = providers if not self.is_tree else []  # (local, provider) whose module exists
        self._all_providers = providers
        self._lock = threading.Lock()
        self._provider_views: dict[int, Any] = {}  # local -> view (None: failed or not applicable)
        self._provider_locks = {local: threading.Lock() for local, _ in providers}
        self._info_json: BytesView | None = None
        self._region_json: OrderedDict[int, BytesView] = OrderedDict()

    # -- snapshot-level files --------------------------------------------------------------
    def extra_names(self) -> dict[int, str]:
        """``local -> name`` of the provider views listed for this snapshot, known
        without building them (a lookup of ``core`` builds no other view)."""
        return {local: p.name for local, p in self._providers if p.applies_to(self.info)}

    def provider_view(self, local: int) -> Any | None:
        """The view of provider node ``local``, built on first use (None if it does not apply
        or failed to build: logged, the rest of the snapshot stays readable; a
        :class:`DamagedView` if the store's metadata it needs is damaged: EIO, not ENOENT)."""
        provider = dict(self._providers).get(local)
        if provider is None or not provider.applies_to(self.info):
            return None
        with self._provider_locks[local]:  # one build per view; other views stay available
            if local not in self._provider_views:
                view = None
                factory = provider.load()
                if factory is not None:
                    try:
                        view = factory(self.reader)
                    except SnapfsError as exc:
                        log.error("view %s of snapshot %s: %s", provider.name, self.info.name, exc)
                        view = DamagedView(exc)
                    except Exception:
                        log.exception("view %s of snapshot %s failed", provider.name, self.info.name)
                self._provider_views[local] = view
            return self._provider_views[local]

    def info_json(self) -> BytesView:
        """``<snapshot>/info.json``: the snapshot's metadata, what its views say about
        themselves (``core``: how to open it) and its list of regions (for a tree: its
        processes and shared objects, each with the path of its directory)."""
        with self._lock:
            if self._info_json is not None:
                return self._info_json
        doc = self.info.to_json()
        for local, name in self.extra_names().items():
            provider = dict(self._providers)[local]
            view = self.provider_view(local) if provider.describes else None
            if view is not None:
                doc[name] = view.describe()
        if self.is_tree:
            tree = doc["meta"].pop("tree", {})
            doc["root"] = tree.get("root")
            doc["processes"] = [
                {"dir": f"processes/{e}", **{k: v for k, v in m.items() if k not in ("threads", "regions")}}
                for e, m in zip(self.member_entries, self._member_docs)]
            doc["shared"] = [{**o, **self._region_doc(o["region"]), "dir": f"shared/{e}"}
                             for e, o in zip(self.shared_entries, self._shared_docs)]
        else:
            doc["regions"] = [self._region_doc(i) for i in range(len(self.regions))]
        with self._lock:
            if self._info_json is None:
                self._info_json = BytesView(_json_bytes(doc))
            return self._info_json

    def member(self, index: int) -> "LoadedSnapshot | None":
        """Member ``index`` of a tree snapshot (None if there is no such member)."""
        if not 0 <= index < len(self._member_docs):
            return None
        with self._lock:
            found = self._members.get(index)
            if found is None:
                found = LoadedSnapshot(MemberReader(self.reader, self._member_docs[index]), self._all_providers)
                self._members[index] = found
            return found

    # -- regions ---------------------------------------------------------------------------
    def _region_doc(self, index: int) -> dict[str, Any]:
        r = self.regions[index]
        return {
            "name": r.name,
            "entry": self.entries[index],
            "start": r.start,
            "end": r.start + r.length,
            "length": r.length,
            "perms": r.perms,
            "offset": r.offset,
            "path": r.path,
            "kind": r.kind,
            "page_size": r.page_size,
            "data_pages": r.data_pages,
            "zero_pages": r.zero_pages,
            "mem_offset": self.mem.layout.get(index) if self.mem is not None else None,
        }

    def region_json(self, index: int) -> BytesView:
        """``ramblocks/<block>/info.json``: the region and its data extents ``[offset, length]``."""
        with self._lock:
            view = self._region_json.get(index)
            if view is not None:
                self._region_json.move_to_end(index)
                return view
        doc = self._region_doc(index)
        doc["meta"] = self.regions[index].meta
        # One extent per line: the list can be long, and grep/jq both cope with this form.
        extents = ",\n".join(f"    [{o}, {n}]" for o, n in self.reader.data_extents(index))
        head = json.dumps(doc, indent=2, default=str)[:-2]
        text = f'{head},\n  "data_extents": [\n{extents}\n  ]\n}}\n' if extents else \
            f'{head},\n  "data_extents": []\n}}\n'
        view = BytesView(text.encode())
        with self._lock:
            self._region_json[index] = view
            while len(self._region_json) > REGION_JSON_CACHE:
                self._region_json.popitem(last=False)
        return view

    def region_data(self, index: int) -> RegionDataView:
        """``ramblocks/<block>/data``."""
        return RegionDataView(self.reader, self.regions[index])

    def view(self, local: int) -> Any | None:
        """The file view of node ``local`` (see :mod:`snapfs.fs.inodes`), None if not a file."""
        if local == inodes.SNAP_INFO:
            return self.info_json()
        if local == inodes.MEM:
            return self.mem
        if inodes.PROVIDER_BASE <= local < inodes.REGION_BASE:
            return self.provider_view(local)
        if local >= inodes.REGION_BASE:
            index, part = inodes.split_region_local(local)
            if index >= len(self.regions):
                return None
            if part == inodes.REGION_DATA:
                return self.region_data(index)
            if part == inodes.REGION_INFO:
                return self.region_json(index)
        return None

    def close(self) -> None:
        """Close the reader if it can be closed."""
        close = getattr(self.reader, "close", None)
        if close is not None:
            close()


class DamagedView:
    """A view that could not be built from the store (a damaged blob or map): it stays in the
    tree, and asking its size (stat, open) raises the store's error, EIO through the mount."""

    def __init__(self, error: SnapfsError) -> None:
        self._error = error

    @property
    def size(self) -> int:
        raise self._error

    def read(self, offset: int, size: int) -> bytes:
        """Never returns bytes: the error."""
        raise self._error

    def describe(self) -> dict[str, Any]:
        """What info.json says of it."""
        return {"damaged": str(self._error)}


def provider_locals() -> list[tuple[int, ViewProvider]]:
    """``(local, provider)`` for every provider whose module exists in this installation."""
    return [(inodes.PROVIDER_BASE + i, p) for i, p in enumerate(PROVIDERS) if p.available()]
