"""Densely fragmented memory: every populated page reaches the store exactly once.

A mapping where every other page (or 3 of every 4) is populated makes ``PAGEMAP_SCAN``
fill its output vector several times; a snapshot of it must store each page once and
``snapfs check`` must find the store clean.
"""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from snapfs.capture import kernel as k
from snapfs.capture.pagemap import PagemapScanner
from snapfs.store import DATA, Store
from tests.conftest import snapfs_cmd

PAGE = 4096
SIZE = 64 << 20

# Maps 64 MiB (private anonymous, or shared like Python's mmap(-1)), writes 8 bytes into
# the pages where page % step != step - 1 (page number + 1), prints the mapping's address, then sleeps.
_TARGET = textwrap.dedent("""
    import mmap, sys, time
    step, shared = int(sys.argv[1]), sys.argv[2] == "shared"
    flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | mmap.MAP_ANONYMOUS
    m = mmap.mmap(-1, %d, flags=flags)
    for p in range(%d // 4096):
        if p %% step != step - 1:
            m[p * 4096:p * 4096 + 8] = (p + 1).to_bytes(8, "little")
    import ctypes
    print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m))), flush=True)
    time.sleep(600)
""") % (SIZE, SIZE)


def _written(step: int) -> np.ndarray:
    pages = np.arange(SIZE // PAGE)
    return pages[pages % step != step - 1]


def test_pagemap_scan_reports_each_page_once():
    """A scan whose output vector fills exactly at the end of the walk (every other page of
    64 MiB: 8192 ranges, two full vectors) reports every range once, in order."""
    m = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        base = np.frombuffer(m, np.uint8)
        addr = base.ctypes.data
        base[np.arange(0, SIZE, 2 * PAGE)] = 1
        scanner = PagemapScanner(__import__("os").getpid())
        try:
            found = scanner.scan(addr, addr + SIZE, require=k.PAGE_IS_PRESENT)
        finally:
            scanner.close()
        starts, ends = found["start"].astype(np.int64), found["end"].astype(np.int64)
        assert (starts[1:] >= ends[:-1]).all(), "ranges overlap or are out of order"
        assert int((ends - starts).sum()) // PAGE == SIZE // PAGE // 2
        del base
    finally:
        m.close()


@pytest.mark.parametrize("step,shared", [(2, "shared"), (4, "private"), (2, "private")])
def test_fragmented_snapshot_stores_each_page_once(snapfs_env, store_dir, step, shared):
    target = subprocess.Popen([sys.executable, "-c", _TARGET, str(step), shared],
                              stdout=subprocess.PIPE, text=True)
    try:
        addr = int(target.stdout.readline(), 16)
        out = subprocess.run([*snapfs_cmd(), "snapshot", str(target.pid), "--name", "frag", "--json"],
                             env=snapfs_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        json.loads(out.stdout)
    finally:
        target.kill()
        target.wait()
    check = subprocess.run([*snapfs_cmd(), "check", "--verify-data"], env=snapfs_env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    with Store.open(store_dir, create=False) as store:
        reader = store.open_snapshot("frag")
        (region,) = [r for r in reader.regions if r.start == addr]
        written = _written(step)
        runs = reader._map(region.index)
        data = runs[runs["kind"] == DATA]
        # Each written page stored once: the page map has exactly those pages, no more.
        assert int(data["n"].sum()) == region.data_pages == len(written)
        image = np.frombuffer(reader.read(region.index, 0, SIZE), np.uint64).reshape(-1, PAGE // 8)
        assert (image[written, 0] == written + 1).all()
        others = np.setdiff1d(np.arange(SIZE // PAGE), written)
        assert not image[others].any()


def test_grouped_scans_find_what_one_scan_per_mapping_finds():
    """The pause scans mappings lying close together (libraries' .data between their code)
    with one PAGEMAP_SCAN per group: each mapping gets exactly what its own scan finds."""
    import ctypes
    import os

    from snapfs.capture.maps import ClassifiedMaps, read_maps_text
    from snapfs.capture.preprotect import populated_ranges
    from snapfs.capture.protect import _scan_grouped

    keep, mine = [], set()  # private mappings with holes between their populated pages
    for i in range(6):
        m = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m[0:1] = m[5 * PAGE:5 * PAGE + 1] = m[(10 + i) * PAGE:(10 + i) * PAGE + 1] = b"x"
        keep.append(m)
        mine.add(ctypes.addressof(ctypes.c_char.from_buffer(m)))
    maps = ClassifiedMaps(read_maps_text(os.getpid()), include_readonly=True, huge_sizes={})
    scanner = PagemapScanner(os.getpid())
    try:
        grouped = _scan_grouped(scanner, maps, list(range(len(maps.regions))))
        # This process's other mappings change as it runs: compare only those made above
        # (adjacent ones may have merged into one VMA).
        checked = 0
        for i, v in enumerate(maps.regions):
            if not any(v.start <= a < v.end for a in mine):
                continue
            alone = populated_ranges(scanner, v.start, v.end)
            assert grouped[i].tolist() == alone.tolist(), v
            checked += 1
    finally:
        scanner.close()
        for m in keep:
            del m
        keep.clear()
    assert checked >= 1
    # Fewer scans than mappings: the groups span several of them.
    starts = maps.starts
    near = maps.mapped_bytes(maps.ends[:-1], starts[1:])
    assert (near <= (4 << 20)).any()
