"""The mount's layout of a process-tree snapshot: processes/<pid>-<comm>/ as process snapshots,
shared/<object>/ stored once (snapfs/fs/model.py, snapfs/store/tree.py)."""

from __future__ import annotations

import errno
import json

import pytest

from snapfs.fs.model import FsError, SnapshotFS
from tests.test_store_tree import PAGE, _write_tree


def _read(fs: SnapshotFS, path: str) -> bytes:
    inode = fs.resolve(path)
    return fs.read(inode, 0, fs.getattr(inode).size)


def _ls(fs: SnapshotFS, path: str) -> list[str]:
    return [e.name for e in fs.readdir(fs.resolve(path))]


def test_tree_layout(store, store_dir):
    _, obj = _write_tree(store)
    fs = SnapshotFS(store, store_dir=store_dir)
    assert _ls(fs, "t") == ["info.json", "processes", "shared"]
    assert _ls(fs, "t/processes") == ["10-a", "11-b"]
    assert _ls(fs, "t/shared") == ["dev-zero-5"]
    assert _ls(fs, "t/processes/10-a")[:3] == ["info.json", "ramblocks", "mem"]
    assert "vmstate" in _ls(fs, "t/processes/10-a")
    assert _ls(fs, "t/processes/10-a/ramblocks") == ["heap", "zero-7f00"]
    shared = _read(fs, "t/shared/dev-zero-5/data")
    assert shared == obj[: 10 * PAGE] + bytes(10 * PAGE) + obj[20 * PAGE:]
    assert _read(fs, "t/processes/10-a/ramblocks/zero-7f00/data") == shared[: 32 * PAGE]
    assert _read(fs, "t/processes/11-b/ramblocks/zero-7f00/data") == shared[16 * PAGE:]
    # mem is addressed by the process's own virtual addresses.
    mem = fs.resolve("t/processes/11-b/mem")
    assert fs.read(mem, 0x7F0000100000 + 4 * PAGE, PAGE) == shared[20 * PAGE: 21 * PAGE]
    doc = json.loads(_read(fs, "t/info.json"))
    assert doc["kind"] == "tree" and [p["dir"] for p in doc["processes"]] == ["processes/10-a", "processes/11-b"]
    assert doc["shared"][0]["dir"] == "shared/dev-zero-5" and doc["shared"][0]["mapped_by"] == [10, 11]
    member = json.loads(_read(fs, "t/processes/10-a/info.json"))
    assert member["pid"] == 10 and member["kind"] == "process"
    assert [r["name"] for r in member["regions"]] == ["heap", "zero-7f00"]
    region = json.loads(_read(fs, "t/processes/11-b/ramblocks/zero-7f00/info.json"))
    assert region["meta"]["shares"] == {"region": "shared/dev-zero-5", "first_page": 16}
    vmstate = fs.resolve("t/processes/10-a/vmstate")
    assert fs.getattr(vmstate).size > 30 * PAGE  # 8 heap + 22 shared data pages


def test_tree_parents_and_missing_names(store, store_dir):
    _write_tree(store)
    fs = SnapshotFS(store, store_dir=store_dir)
    data = fs.resolve("t/processes/11-b/ramblocks/zero-7f00/data")
    chain = []
    inode = data
    while inode != 1:
        inode = fs.parent(inode)
        chain.append(inode)
    assert chain == [fs.resolve(p) for p in ("t/processes/11-b/ramblocks/zero-7f00", "t/processes/11-b/ramblocks",
                                             "t/processes/11-b", "t/processes", "t")] + [1]
    assert fs.parent(fs.resolve("t/shared/dev-zero-5/data")) == fs.resolve("t/shared/dev-zero-5")
    assert fs.parent(fs.resolve("t/shared/dev-zero-5")) == fs.resolve("t/shared")
    assert fs.lookup(fs.resolve("t/processes/10-a"), "..").inode == fs.resolve("t/processes")
    for path in ("t/processes/12-c", "t/shared/heap", "t/ramblocks", "t/mem", "t/processes/10-a/shared"):
        with pytest.raises(FsError) as e:
            fs.resolve(path)
        assert e.value.errno == errno.ENOENT
    # A member region's node is not reachable from the tree's own directory.
    with pytest.raises(FsError):
        fs.getattr(fs.resolve("t") + 16 + 3 * 1 + 1)
