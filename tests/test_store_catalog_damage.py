"""A damaged catalog never returns wrong bytes: every read is the right bytes or an error.

The store-damage campaign of ``python -m tools.torture`` (see
``tools/torture/catalog_damage.py``: bit flips in catalog.sqlite pages of every class and in
the page-map blobs, everything read through :class:`SnapshotFS` and compared with the
undamaged store) at its default size, plus damage seen through a real mount and the CLI.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections import Counter

import pytest

from tools.torture.catalog_damage import (
    ERROR, MAP_FLIPS, catalog_flip_problem, catalog_flips, damaged_copy, flip_catalog, flip_map,
    map_flip_problem, map_flips, outcome,
)
from tools.torture.catalog_damage import pristine as build_pristine


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The undamaged store and everything read from it."""
    p = build_pristine(tmp_path_factory.mktemp("pristine") / "store")
    assert not p.crashes and ERROR not in p.truth.values()
    assert len(p.names) == 3 and all(len(paths) >= 5 for paths in p.paths.values())
    return p


def test_bit_flips_in_the_catalog_never_give_wrong_bytes(pristine, tmp_path):
    flips, nclasses = catalog_flips(pristine.store_dir / "catalog.sqlite")
    tally = Counter()
    for n, (cls, offset, bit) in enumerate(flips):
        verdict = flip_catalog(pristine, tmp_path / f"flip{n}", offset, bit)
        problem = catalog_flip_problem(verdict)
        assert problem is None, f"flip of bit {bit} at byte {offset} ({cls}): {problem}"
        tally[outcome(verdict)] += 1
    print(f"catalog flips: {dict(tally)} over {nclasses} page classes x 8 bits")
    assert tally["reads failed"] > 0


def test_bit_flips_in_page_maps_never_give_wrong_bytes(pristine, tmp_path):
    """A flip inside a compressed page map (zstd may decode it to other runs, which nothing
    but the map's checksum can tell): the region's reads fail, the rest read right, vmstate
    stays listed and only its damaged block fails, check names the region, and the listing
    and info are untouched."""
    detected = 0
    for n, (snap_id, idx, offset, bit) in enumerate(map_flips(pristine.store_dir / "catalog.sqlite")):
        verdict, got = flip_map(pristine, tmp_path / f"map{n}", snap_id, idx, offset, bit)
        problem = map_flip_problem(verdict, got, pristine.truth)
        assert problem is None, f"map flip {n}: {problem}"
        detected += 1
    assert detected == MAP_FLIPS


def test_damaged_map_through_the_mount_is_eio_not_enoent(pristine, tmp_path, snapfs_env):
    """Through a real FUSE mount: a damaged map gives EIO for the region's data and for the
    parts of vmstate that need it; vmstate stays listed with its size; other regions read."""
    from tests.support.fs import mounted_store

    store_dir, truth = pristine.store_dir, pristine.truth
    copy = damaged_copy(store_dir, tmp_path / "mapdamage")
    conn = sqlite3.connect(copy / "catalog.sqlite")
    snap_id = conn.execute("SELECT id FROM snapshots WHERE name='base'").fetchone()[0]
    conn.execute("UPDATE regions SET map=x'28b52ffd00' WHERE snapshot_id=? AND idx=0", (snap_id,))
    conn.commit()
    conn.close()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted_store(mnt, {**snapfs_env, "SNAPFS_STORE": str(copy)}, tmp_path / "mount.log"):
        base = mnt / "base"
        assert "vmstate" in os.listdir(base)
        assert os.stat(base / "vmstate").st_size == len(truth[("base", "vmstate")])
        entries = sorted(os.listdir(base / "ramblocks"))
        with pytest.raises(OSError) as exc:
            (base / "ramblocks" / entries[0] / "data").read_bytes()
        assert exc.value.errno == errno.EIO
        assert (base / "ramblocks" / entries[1] / "data").read_bytes() == truth[("base", f"ramblocks/{entries[1]}/data")]
        with open(base / "vmstate", "rb") as f:
            with pytest.raises(OSError) as exc:
                f.read()
        assert exc.value.errno == errno.EIO
        assert (mnt / "child" / "vmstate").read_bytes() == truth[("child", "vmstate")]


def test_a_changed_info_is_damage_everywhere(pristine, tmp_path, capsys):
    """What info.json shows is checksummed: a row whose info changed (a flip inside its
    JSON that still parses) is listed as damaged, cannot be opened, and check reports it."""
    from snapfs.cli import main

    store_dir = pristine.store_dir
    copy = damaged_copy(store_dir, tmp_path / "info")
    conn = sqlite3.connect(copy / "catalog.sqlite")
    conn.execute("UPDATE snapshots SET info=replace(info, '\"pause_ms\": 1.5', '\"pause_ms\": 1.7') "
                 "WHERE name='child'")
    assert conn.total_changes == 1
    conn.commit()
    conn.close()
    store = ["--store", str(copy)]
    assert main(["list", *store]) == 6
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["base", "child", "vm"]
    assert "child" in out and "DAMAGED" in out and "snapshot 'child': its catalog row is damaged" in err
    assert main(["info", *store, "child"]) == 6
    assert main(["info", *store, "base"]) == 0
    assert main(["cat", *store, "child", "info.json"]) == 6
    assert main(["check", "--verify-data", *store]) == 6
    out = capsys.readouterr().out
    assert "snapshot: snapshot 'child': its catalog row is damaged" in out
