"""The store-damage campaign: a damaged catalog never returns wrong bytes.

Bits are flipped one at a time in a copy of a store's catalog.sqlite — sampled over every
class of position (each table's and index's leaf, interior and overflow pages, the header
page, free pages; each of the 8 bits of a byte) — and inside the page-map blobs themselves;
then everything a user can read is read the way the mount and ``snapfs cat`` read it
(:class:`SnapshotFS`): the listing, every snapshot's ``info.json``, every region's ``data``
and ``info.json``, ``mem`` over each region, and ``vmstate``. Each result is compared with
what the undamaged store returns: every read must be the right bytes or an error, and
``check --verify-data`` must not call a store OK when any read fails.
``tests/test_store_catalog_damage.py`` runs the default draw.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from snapfs.errors import SnapfsError
from snapfs.fs.model import FsError, SnapshotFS
from snapfs.fs.names import encode_name
from snapfs.store import RegionSpec, Store
from snapfs.store.store import FrameCache
from snapfs.stream import format as F
from tests.support.synthetic import write_synthetic
from tools.torture.core import Budget, Tally, register

PAGE = 4096
CATALOG_FLIPS = 200
MAP_FLIPS = 100
CATALOG_SEED = 13
MAP_SEED = 17


def build(store_dir: Path) -> None:
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


def read_all(store_dir: Path, names: list[str], paths: dict[str, list[str]]) -> tuple[dict, Counter]:
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


@dataclass
class Pristine:
    """The undamaged store, what it holds, and everything read from it (the truth)."""

    store_dir: Path
    names: list[str]
    paths: dict[str, list[str]]
    truth: dict
    crashes: Counter


def pristine(store_dir: Path) -> Pristine:
    """Build the undamaged store at ``store_dir`` and read everything from it."""
    build(store_dir)
    names, paths = _paths(store_dir)
    truth, crashes = read_all(store_dir, names, paths)
    return Pristine(store_dir, names, paths, truth, crashes)


def damaged_copy(pristine_dir: Path, where: Path) -> Path:
    """A store sharing the pristine segments (read-only use) with its own catalog copy."""
    where.mkdir()
    shutil.copy2(pristine_dir / "config.json", where / "config.json")
    shutil.copy2(pristine_dir / "catalog.sqlite", where / "catalog.sqlite")
    os.symlink(pristine_dir / "segments", where / "segments")
    return where


@dataclass
class Verdict:
    """One damaged copy judged against the truth."""

    wrong: int           # reads that returned other bytes than the truth (must be 0)
    failed: int          # reads that gave an error
    check_ok: bool       # ``check --verify-data`` called the store OK
    crashes: Counter     # reads that raised something unexpected (must be empty)


def judge(result: tuple[dict, Counter], truth: dict, store_dir: Path) -> Verdict:
    """Compare what a damaged copy read (``read_all``'s result) with the truth."""
    got, crashes = result
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
    return Verdict(wrong, failed, ok, crashes)


def _page_classes(catalog: Path) -> tuple[dict[str, list[int]], int]:
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
    return classes, page_size


def catalog_flips(catalog: Path, count: int = CATALOG_FLIPS,
                  seed: int = CATALOG_SEED) -> tuple[list[tuple[str, int, int]], int]:
    """``count`` (page class, byte offset, bit) flips, round-robin over (page class, bit)
    pairs, and how many page classes there are."""
    classes, page_size = _page_classes(catalog)
    rng = np.random.default_rng(seed)
    keys = sorted(classes)
    flips = []
    for n in range(count):
        cls = keys[n % len(keys)]
        bit = (n // len(keys)) % 8
        page = int(rng.choice(classes[cls]))
        flips.append((cls, (page - 1) * page_size + int(rng.integers(0, page_size)), bit))
    return flips, len(keys)


def flip_catalog(p: Pristine, where: Path, offset: int, bit: int) -> Verdict:
    """Flip one bit of a catalog copy at ``where``, read everything, judge, clean up."""
    copy = damaged_copy(p.store_dir, where)
    try:
        with open(copy / "catalog.sqlite", "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << bit)]))
        return judge(read_all(copy, p.names, p.paths), p.truth, copy)
    finally:
        shutil.rmtree(copy)


def catalog_flip_problem(v: Verdict) -> str | None:
    """What is wrong with a catalog flip's verdict (None: nothing)."""
    if v.crashes:
        return f"unexpected exceptions: {dict(v.crashes)}"
    if v.wrong:
        return f"{v.wrong} wrong reads"
    if v.check_ok and v.failed:
        return f"check says OK, {v.failed} reads failed"
    return None


def outcome(v: Verdict) -> str:
    """How a flip came out, for the per-campaign counts."""
    return "reads failed" if v.failed else "reads right, check finds it" if not v.check_ok else "no effect"


def map_flips(catalog: Path, count: int = MAP_FLIPS,
              seed: int = MAP_SEED) -> list[tuple[int, int, int, int]]:
    """``count`` (snapshot id, region idx, byte offset, bit) flips inside page-map blobs,
    round-robin over the regions and bits."""
    conn = sqlite3.connect(catalog)
    maps = conn.execute("SELECT snapshot_id, idx, length(map) FROM regions").fetchall()
    conn.close()
    rng = np.random.default_rng(seed)
    flips = []
    for n in range(count):
        snap_id, idx, size = maps[n % len(maps)]
        flips.append((snap_id, idx, int(rng.integers(0, size)), n % 8))
    return flips


def flip_map(p: Pristine, where: Path, snap_id: int, idx: int, offset: int,
             bit: int) -> tuple[Verdict, dict]:
    """Flip one bit of a region's page map in a copy at ``where``; the verdict and what was
    read."""
    copy = damaged_copy(p.store_dir, where)
    try:
        conn = sqlite3.connect(copy / "catalog.sqlite")
        blob = bytearray(conn.execute("SELECT map FROM regions WHERE snapshot_id=? AND idx=?",
                                      (snap_id, idx)).fetchone()[0])
        blob[offset] ^= 1 << bit
        conn.execute("UPDATE regions SET map=? WHERE snapshot_id=? AND idx=?", (bytes(blob), snap_id, idx))
        conn.commit()
        conn.close()
        got = read_all(copy, p.names, p.paths)
        return judge(got, p.truth, copy), got[0]
    finally:
        shutil.rmtree(copy)


def map_flip_problem(v: Verdict, got: dict, truth: dict) -> str | None:
    """What is wrong with a page-map flip's verdict: besides no wrong reads, the damage must
    be seen (the region's reads fail, check says so) and the listing stays untouched."""
    if v.crashes:
        return f"unexpected exceptions: {dict(v.crashes)}"
    if v.wrong:
        return f"{v.wrong} wrong reads"
    if not v.failed or v.check_ok:
        return f"damage not seen (failed {v.failed}, check ok {v.check_ok})"
    if got.get("list") != truth["list"]:
        return "the listing changed"
    return None


@register("store-damage", "bit flips in catalog.sqlite pages (by class) and in page maps; "
          "every read must be right or an error")
def run(budget: Budget, tally: Tally, log) -> None:
    """Cases ``catalog`` and ``maps``; ``positions`` flips each (default 200 and 100), drawn
    with ``seed`` (1: the suite's draw)."""
    with tempfile.TemporaryDirectory(prefix="snapfs-store-damage-") as tmp:
        p = pristine(Path(tmp) / "store")
        if p.crashes or ERROR in p.truth.values():
            tally.wrong_read(f"the undamaged store does not read back: {dict(p.crashes)}")
            return
        if budget.wants("catalog"):
            tally.case()
            flips, nclasses = catalog_flips(p.store_dir / "catalog.sqlite",
                                            budget.positions or CATALOG_FLIPS,
                                            CATALOG_SEED + budget.seed - 1)
            counts: Counter = Counter()
            for n, (cls, offset, bit) in enumerate(flips):
                if budget.exhausted():
                    break
                tally.bad_input()
                v = flip_catalog(p, Path(tmp) / f"flip{n}", offset, bit)
                if problem := catalog_flip_problem(v):
                    tally.wrong_read(f"catalog flip of bit {bit} at byte {offset} ({cls}): {problem}")
                counts[outcome(v)] += 1
            log(f"catalog flips: {dict(counts)} over {nclasses} page classes x 8 bits")
        if budget.wants("maps"):
            tally.case()
            counts = Counter()
            for n, (snap_id, idx, offset, bit) in enumerate(map_flips(
                    p.store_dir / "catalog.sqlite", budget.positions or MAP_FLIPS, MAP_SEED + budget.seed - 1)):
                if budget.exhausted():
                    break
                tally.bad_input()
                v, got = flip_map(p, Path(tmp) / f"map{n}", snap_id, idx, offset, bit)
                if problem := map_flip_problem(v, got, p.truth):
                    tally.wrong_read(f"page-map flip {n} (snapshot {snap_id} region {idx}): {problem}")
                counts[outcome(v)] += 1
            log(f"page-map flips: {dict(counts)}")
