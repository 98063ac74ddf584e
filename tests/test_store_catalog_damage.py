"""A damaged catalog never returns wrong bytes: every read is the right bytes or an error.

Bits are flipped one at a time in a copy of a store's catalog.sqlite — sampled over every
class of position (each table's and index's leaf, interior and overflow pages, the header
page, free pages; each of the 8 bits of a byte) — and inside the page-map blobs themselves;
then everything a user can read is read the way the mount and ``snapfs cat`` read it
(:class:`SnapshotFS`): the listing, every snapshot's ``info.json``, every region's ``data``
and ``info.json``, ``mem`` over each region, and ``vmstate``. Each result is compared with
what the undamaged store returns. ``check --verify-data`` must not call a store OK when any
read differs from the truth or fails.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from snapfs.errors import SnapfsError
from snapfs.fs.model import FsError, SnapshotFS
from snapfs.fs.names import encode_name
from snapfs.store import RegionSpec, Store
from snapfs.store.store import FrameCache
from snapfs.stream import format as F
from tests.support.synthetic import write_synthetic

PAGE = 4096
CATALOG_FLIPS = 200
MAP_FLIPS = 100


def _build(store_dir: Path) -> None:
    """Three snapshots: a process-like one with holes and zero pages in two regions, its
    content-compared child, and a VM-like one whose vmstate carries device-state blobs."""
    with Store.open(store_dir) as store:
        write_synthetic(store, "base", 1, [700, 60])
        write_synthetic(store, "child", 1, [700, 60], version=1, parent="base", changed_fraction=0.2)
        w = store.begin_snapshot("vm", {"kind": "vm", "comm": "qemu", "qemu_stream": {
            "machine": "pc", "ram_section_id": 2}})
        i = w.add_region(RegionSpec("pc.ram", 0, 300 * PAGE, kind="ramblock"))
        img = np.random.default_rng(3).integers(0, 4, size=(300, PAGE), dtype=np.uint8)
        img[::5] = 0
        w.put_pages(i, 0, img.tobytes())
        w.put_blob("qemu.configuration", F.configuration("pc-i440fx-7.2"))
        w.put_blob("qemu.devices", bytes([F.SEC_EOF]) + b"device state " * 40)
        w.commit({"pause_ms": 2.0})
    conn = sqlite3.connect(store_dir / "catalog.sqlite")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")      # everything in the one file we damage
    conn.close()


class _Error:
    """A read that failed (what a user sees as an error)."""

    def __repr__(self) -> str:
        return "<error>"


ERROR = _Error()


# Decoded frames, shared by every damaged copy: their segments are the pristine ones, so this
# only saves decompressing the same frames 300 times (a reference the damage moved elsewhere
# misses the cache and is read and verified as usual).
FRAMES = FrameCache(capacity=4096)


def _read_all(store_dir: Path, names: list[str], paths: dict[str, list[str]]) -> tuple[dict, Counter]:
    """Everything readable, as {what: bytes/object or ERROR}, plus how many reads raised
    something other than a store or filesystem error (a traceback for the user)."""
    out: dict = {}
    crashes: Counter = Counter()

    def attempt(key, fn):
        try:
            out[key] = fn()
        except (SnapfsError, FsError):
            out[key] = ERROR
        except Exception as exc:   # noqa: BLE001 - counted: must not happen
            out[key] = ERROR
            crashes[f"{key}: {type(exc).__name__}: {exc}"] += 1

    try:
        store = Store.open(store_dir, create=False)
    except SnapfsError:
        return {}, crashes
    store.frame_cache = FRAMES
    with store:
        attempt("list", lambda: {s.name: (None if s.damaged else s.to_json()) for s in store.list_snapshots()})
        fs = None
        try:
            fs = SnapshotFS(store, store_dir=store_dir, max_open=4)
        except (SnapfsError, FsError):
            return out, crashes
        for name in names:
            attempt(("info", name), lambda: store.info(name).to_json())
            for path in paths[name]:
                attempt((name, path), lambda: _read_path(fs, name, path))
    return out, crashes


def _read_path(fs: SnapshotFS, name: str, path: str) -> bytes:
    if path.startswith("mem@"):
        offset, length = (int(x) for x in path[4:].split("+"))
        view = fs.file_view(fs.resolve(f"{encode_name(name)}/mem"))
        return view.read(offset, length)
    view = fs.file_view(fs.resolve(f"{encode_name(name)}/{path}"))
    return view.read(0, int(view.size))


def _paths(store_dir: Path) -> tuple[list[str], dict[str, list[str]]]:
    import json

    names, paths = [], {}
    with Store.open(store_dir, create=False) as store:
        fs = SnapshotFS(store, store_dir=store_dir)
        for info in store.list_snapshots():
            names.append(info.name)
            doc = json.loads(_read_path(fs, info.name, "info.json"))
            found = ["info.json", "vmstate"]
            for r in doc["regions"]:
                found += [f"ramblocks/{r['entry']}/data", f"ramblocks/{r['entry']}/info.json"]
                if r["mem_offset"] is not None:
                    found.append(f"mem@{r['mem_offset']}+{r['length']}")
            paths[info.name] = found
    return names, paths


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The undamaged store and everything read from it."""
    store_dir = tmp_path_factory.mktemp("pristine") / "store"
    _build(store_dir)
    names, paths = _paths(store_dir)
    truth, crashes = _read_all(store_dir, names, paths)
    assert not crashes and ERROR not in truth.values()
    assert len(names) == 3 and all(len(p) >= 5 for p in paths.values())
    return store_dir, names, paths, truth


def _damaged_copy(pristine_dir: Path, where: Path) -> Path:
    """A store sharing the pristine segments (read-only use) with its own catalog copy."""
    where.mkdir()
    shutil.copy2(pristine_dir / "config.json", where / "config.json")
    shutil.copy2(pristine_dir / "catalog.sqlite", where / "catalog.sqlite")
    os.symlink(pristine_dir / "segments", where / "segments")
    return where


def _judge(result: tuple[dict, Counter], truth: dict, store_dir: Path) -> tuple[int, int, bool]:
    """(wrong reads, failed reads, check says OK); asserts the rules."""
    got, crashes = result
    assert not crashes, crashes
    wrong = failed = 0
    for key, want in truth.items():
        have = got.get(key, ERROR)
        if have is ERROR:
            failed += 1
        elif key == "list":
            # A snapshot missing from the listing is an error for it (ENOENT), one listed as
            # damaged too; one listed with other values, or one that never existed, is wrong.
            for name, doc in have.items():
                if doc is None:
                    failed += 1
                elif truth["list"].get(name) != doc:
                    wrong += 1
            failed += len(set(truth["list"]) - set(have))
        elif have != want:
            wrong += 1
    try:
        with Store.open(store_dir, create=False) as store:
            ok = store.check(verify_data=True)["ok"]
    except SnapfsError:
        ok = False
    return wrong, failed, ok


def _page_classes(catalog: Path) -> dict[str, list[int]]:
    """Pages of the catalog by class: header page, each table/index by page type, free."""
    conn = sqlite3.connect(catalog)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    npages = conn.execute("PRAGMA page_count").fetchone()[0]
    classes: dict[str, list[int]] = {"header": [1]}
    seen = {1}
    for name, pageno, pagetype in conn.execute("SELECT name, pageno, pagetype FROM dbstat"):
        if pageno != 1:
            classes.setdefault(f"{name}:{pagetype}", []).append(pageno)
            seen.add(pageno)
    free = [p for p in range(1, npages + 1) if p not in seen]
    if free:
        classes["free"] = free
    conn.close()
    return {k: v for k, v in classes.items()}, page_size


def test_bit_flips_in_the_catalog_never_give_wrong_bytes(pristine, tmp_path):
    store_dir, names, paths, truth = pristine
    catalog = store_dir / "catalog.sqlite"
    classes, page_size = _page_classes(catalog)
    rng = np.random.default_rng(13)
    keys = sorted(classes)
    flips = []
    for n in range(CATALOG_FLIPS):        # round-robin over (page class, bit) pairs
        cls = keys[n % len(keys)]
        bit = (n // len(keys)) % 8
        page = int(rng.choice(classes[cls]))
        flips.append((cls, (page - 1) * page_size + int(rng.integers(0, page_size)), bit))
    tally = Counter()
    for n, (cls, offset, bit) in enumerate(flips):
        copy = _damaged_copy(store_dir, tmp_path / f"flip{n}")
        with open(copy / "catalog.sqlite", "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << bit)]))
        wrong, failed, ok = _judge(_read_all(copy, names, paths), truth, copy)
        assert wrong == 0, f"flip of bit {bit} at byte {offset} ({cls}): {wrong} wrong reads"
        assert not (ok and failed), f"flip at {offset} ({cls}): check says OK, {failed} reads failed"
        tally["reads failed" if failed else "reads right, check finds it" if not ok else "no effect"] += 1
        shutil.rmtree(copy)
    print(f"catalog flips: {dict(tally)} over {len(keys)} page classes x 8 bits")
    assert tally["reads failed"] > 0


def test_bit_flips_in_page_maps_never_give_wrong_bytes(pristine, tmp_path):
    """A flip inside a compressed page map (zstd may decode it to other runs, which nothing
    but the map's checksum can tell): the region's reads fail, the rest read right, vmstate
    stays listed and only its damaged block fails, and check names the region."""
    store_dir, names, paths, truth = pristine
    conn = sqlite3.connect(store_dir / "catalog.sqlite")
    maps = conn.execute("SELECT snapshot_id, idx, length(map) FROM regions").fetchall()
    conn.close()
    rng = np.random.default_rng(17)
    tally = Counter()
    for n in range(MAP_FLIPS):
        snap_id, idx, size = maps[n % len(maps)]
        offset, bit = int(rng.integers(0, size)), n % 8
        copy = _damaged_copy(store_dir, tmp_path / f"map{n}")
        conn = sqlite3.connect(copy / "catalog.sqlite")
        blob = bytearray(conn.execute("SELECT map FROM regions WHERE snapshot_id=? AND idx=?",
                                      (snap_id, idx)).fetchone()[0])
        blob[offset] ^= 1 << bit
        conn.execute("UPDATE regions SET map=? WHERE snapshot_id=? AND idx=?", (bytes(blob), snap_id, idx))
        conn.commit()
        conn.close()
        got = _read_all(copy, names, paths)
        wrong, failed, ok = _judge(got, truth, copy)
        assert wrong == 0, f"map flip {n}: {wrong} wrong reads"
        assert failed > 0 and not ok, f"map flip {n}: damage not seen (failed {failed}, check ok {ok})"
        # The damaged region's own files fail; vmstate is still there (its size is known
        # without the map); the listing and info are untouched.
        assert got[0]["list"] == truth["list"]
        tally["detected"] += 1
        shutil.rmtree(copy)
    assert tally["detected"] == MAP_FLIPS


def test_damaged_map_through_the_mount_is_eio_not_enoent(pristine, tmp_path, snapfs_env):
    """Through a real FUSE mount: a damaged map gives EIO for the region's data and for the
    parts of vmstate that need it; vmstate stays listed with its size; other regions read."""
    from tests.support.fs import mounted_store

    store_dir, names, paths, truth = pristine
    copy = _damaged_copy(store_dir, tmp_path / "mapdamage")
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

    store_dir, names, paths, truth = pristine
    copy = _damaged_copy(store_dir, tmp_path / "info")
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
