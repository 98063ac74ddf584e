"""Tree snapshots in the store: shared objects stored once, process regions sharing their pages,
members read as process snapshots (snapfs/store/tree.py)."""

from __future__ import annotations

import numpy as np
import pytest

from snapfs.errors import StoreError
from snapfs.store import DATA, HOLE, RegionSpec
from snapfs.store.tree import members, shared_objects

PAGE = 4096


def _pages(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(1, 255, n * PAGE, dtype=np.uint8).tobytes()


def _write_tree(store, name="t", parent=None, obj=None):
    """An object of 64 pages (pages 10..19 holes), two processes: A maps object pages 0..31
    and has 8 private pages, B maps pages 16..63."""
    obj = obj if obj is not None else _pages(64, 1)
    w = store.begin_snapshot(name, {"kind": "tree", "created": 1.0}, parent)
    o = w.add_region(RegionSpec("shared/dev-zero-5", 0, 64 * PAGE, "rw-s", 0, "/dev/zero (deleted)", "shmem"))
    w.put_pages(o, 0, obj[: 10 * PAGE])
    w.put_pages(o, 20, obj[20 * PAGE:])
    a_heap = w.add_region(RegionSpec("10-a/heap", 0x1000000, 8 * PAGE, kind="heap"))
    a_sh = w.add_region(RegionSpec("10-a/zero-7f00", 0x7F0000000000, 32 * PAGE, "rw-s", 0, "/dev/zero (deleted)", "shmem"))
    b_sh = w.add_region(RegionSpec("11-b/zero-7f00", 0x7F0000100000, 48 * PAGE, "rw-s", 16 * PAGE, "/dev/zero (deleted)", "shmem"))
    w.put_pages(a_heap, 0, _pages(8, 2))
    w.share(a_sh, o, 0)
    w.share(b_sh, o, 16)
    with pytest.raises(StoreError):
        w.put_pages(a_sh, 0, bytes(PAGE))
    tree = {"root": {"pid": 10}, "shared": [{"entry": "dev-zero-5", "region": o, "mapped_by": [10, 11]}],
            "processes": [
                {"entry": "10-a", "pid": 10, "comm": "a", "regions": [a_heap, 2], "threads": {}},
                {"entry": "11-b", "pid": 11, "comm": "b", "regions": [b_sh, 1], "threads": {}},
            ]}
    return w.commit({"tree": tree}), obj


def test_shared_pages_are_stored_once_and_read_through_every_mapping(store):
    info, obj = _write_tree(store)
    assert info.kind == "tree"
    # 54 object pages + 8 private pages, once each, whatever maps them.
    assert info.resident_bytes == (54 + 8) * PAGE
    r = store.open_snapshot("t")
    a, b = members(r)
    assert [x.name for x in a.regions] == ["heap", "zero-7f00"] and a.info.pid == 10
    assert a.info.kind == "process" and a.info.name == "t/processes/10-a"
    assert a.read(1, 0, 32 * PAGE) == obj[: 10 * PAGE] + bytes(10 * PAGE) + obj[20 * PAGE: 32 * PAGE]
    assert b.read(0, 0, 48 * PAGE) == bytes(4 * PAGE) + obj[20 * PAGE:]
    assert list(b.runs(0))[0] == (0, 4, HOLE) and list(b.runs(0))[1][2] == DATA
    assert a.regions[1].meta["shares"] == {"region": "shared/dev-zero-5", "first_page": 0}
    ((desc, region),) = shared_objects(r)
    assert desc["entry"] == "dev-zero-5" and region.name == "shared/dev-zero-5"
    out = np.empty((48, PAGE), np.uint8)
    b.read_pages_into(0, 0, out)
    assert out.tobytes() == b.read(0, 0, 48 * PAGE)
    assert not store.check(verify_data=True)["problems"]


def test_a_child_tree_refers_to_its_parent_frames(store):
    first, obj = _write_tree(store, "t1")
    child, _ = _write_tree(store, "t2", parent="t1", obj=obj)
    assert child.stored_bytes < first.stored_bytes // 10  # unchanged pages refer to t1's frames
    a = members(store.open_snapshot("t2"))[0]
    assert a.read(1, 0, PAGE) == obj[:PAGE]
    store.remove(["t1"])
    store.gc()
    assert members(store.open_snapshot("t2"))[1].read(0, 4 * PAGE, PAGE) == obj[20 * PAGE: 21 * PAGE]


def test_a_region_cannot_share_a_sharing_region(store):
    w = store.begin_snapshot("x", {"kind": "tree"})
    o = w.add_region(RegionSpec("shared/o", 0, 4 * PAGE, kind="shmem"))
    s = w.add_region(RegionSpec("1-p/o", 0, 4 * PAGE, kind="shmem"))
    t = w.add_region(RegionSpec("2-q/o", 0, 4 * PAGE, kind="shmem"))
    w.share(s, o, 0)
    with pytest.raises(ValueError):
        w.share(t, s, 0)
    w.abort()
