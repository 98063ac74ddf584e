"""The ``core`` view's layout on synthetic and real snapshots: segments match the regions,
file-backed holes are left to the files, stat reads no page data, PN_XNUM, VM snapshots have
no core, snapshots without the recorded state still open in gdb."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import struct
import subprocess

import numpy as np
import pytest
import trio

from snapfs.elfcore import elf
from snapfs.elfcore.state import BLOB, Mapping, ProcessStatus, encode_blob
from snapfs.fs.core import CoreView
from snapfs.fs.model import SnapshotFS
from snapfs.store import RegionSpec, Store
from snapfs.store.reader import SnapshotReader
from tests.conftest import snapfs_cmd
from tests.support.fs import PAGE, process_snapshot, vm_snapshot

_PHDR = struct.Struct("<IIQQQQQQ")


def program_headers(data: bytes) -> list[tuple]:
    """(type, flags, offset, vaddr, filesz, memsz) of every program header."""
    phoff, = struct.unpack_from("<Q", data, 32)
    phnum, = struct.unpack_from("<H", data, 56)
    if phnum == elf.PN_XNUM:
        shoff, = struct.unpack_from("<Q", data, 40)
        phnum = struct.unpack_from("<IIQQQQII", data, shoff)[7]
    out = []
    for i in range(phnum):
        t, f, off, vaddr, _p, filesz, memsz, _a = _PHDR.unpack_from(data, phoff + i * elf.PHDR_SIZE)
        out.append((t, f, off, vaddr, filesz, memsz))
    return out


def whole(view) -> bytes:
    return b"".join(view.read(off, 1 << 20) for off in range(0, view.size, 1 << 20))


def test_segments_hold_the_regions_bytes(store):
    regions = process_snapshot(store)
    view = CoreView(store.open_snapshot("app"))
    data = whole(view)
    assert len(data) == view.size and data[:4] == b"\x7fELF"
    loads = [p for p in program_headers(data) if p[0] == elf.PT_LOAD]
    mem = {}
    for _t, _f, off, vaddr, filesz, memsz in loads:
        assert off % PAGE == 0 and memsz % PAGE == 0
        if filesz:
            assert filesz == memsz
            mem[vaddr] = data[off : off + filesz]
    for r in regions:
        if r.kind == "file":
            # Only page 3 was captured: pages 0-2 and 4-7 are the file's (no data in the core).
            lib = [p for p in loads if r.start <= p[3] < r.start + len(r.data)]
            assert [(p[3] - r.start, p[4], p[5]) for p in lib] == [
                (0, 0, 3 * PAGE), (3 * PAGE, PAGE, PAGE), (4 * PAGE, 0, 4 * PAGE)]
            assert mem[r.start + 3 * PAGE] == r.data[3 * PAGE : 4 * PAGE]
        else:
            assert mem[r.start] == r.data, r.name
    # Sparse: st_blocks counts the headers and the stored pages, not the holes.
    assert view.allocated == view._head_size + sum(r.data_pages for r in regions) * PAGE
    extents = list(view.data_extents())
    rebuilt = bytearray(view.size)
    for off, n in extents:
        rebuilt[off : off + n] = view.read(off, n)
    assert bytes(rebuilt) == data


def test_vm_snapshots_have_no_core(store):
    process_snapshot(store)
    vm_snapshot(store)
    fs = SnapshotFS(store)
    assert "core" in [e.name for e in fs.readdir(fs.resolve("app"))]
    assert "core" not in [e.name for e in fs.readdir(fs.resolve("vm1"))]


def test_stat_and_open_read_no_page_data(store, monkeypatch):
    """A 64 GiB anonymous region: the size and layout come from the catalog; no frame is read
    and no page map loaded but the file-backed region's."""
    w = store.begin_snapshot("big", {"kind": "process", "pid": 1, "comm": "big", "exe": "/bin/big"})
    big = w.add_region(RegionSpec("anon-7f0000000000", 0x7F00_0000_0000, 64 << 30, "rw-p", kind="anon"))
    rng = np.random.default_rng(3)
    for first in range(0, (64 << 30) // PAGE, (1 << 30) // PAGE):
        w.put_pages(big, first, rng.integers(1, 255, 256 * PAGE, dtype=np.uint8).tobytes())
    lib = w.add_region(RegionSpec("x.so-7e0000000000", 0x7E00_0000_0000, 16 * PAGE, "r--p", 0, "/x.so",
                                  "file", meta={"holes": "file"}))
    w.put_pages(lib, 2, b"\1" * PAGE)
    w.put_blob(BLOB, encode_blob("x86_64", None, ProcessStatus(), [
        Mapping(0x7E00_0000_0000, 0x7E00_0001_0000, "r--p", 0, 9, "/x.so"),
        Mapping(0x7F00_0000_0000, 0x7F10_0000_0000, "rw-p", 0, 0, "")], {}))
    w.commit({})

    segment_reads, maps_loaded = [], []
    monkeypatch.setattr(store.segments, "pread", lambda *a: segment_reads.append(a))
    original = SnapshotReader._indexed_map
    monkeypatch.setattr(SnapshotReader, "_indexed_map",
                        lambda self, i: maps_loaded.append(self.regions[i].name) or original(self, i))
    fs = SnapshotFS(store)
    ino = fs.resolve("big/core")
    attr = fs.getattr(ino)
    opened = fs.open(ino)
    header = fs.read(ino, 0, 4096)
    assert header[:4] == b"\x7fELF"
    assert attr.size > 64 << 30 and attr.allocated < 300 << 20
    assert opened.size == attr.size
    assert segment_reads == [] and maps_loaded == ["x.so-7e0000000000"]


def test_more_mappings_than_program_headers_can_count(store):
    """70 000 mappings (a process can have 65 530 and more): e_phnum = PN_XNUM, the count in
    section header 0, as the kernel writes it; readelf agrees."""
    w = store.begin_snapshot("many", {"kind": "process", "pid": 1, "comm": "many"})
    idx = w.add_region(RegionSpec("anon-10000", 0x10000, PAGE, "rw-p"))
    w.put_pages(idx, 0, b"\7" * PAGE)
    maps = [Mapping(0x10000 + 2 * i * PAGE, 0x10000 + (2 * i + 1) * PAGE, "rw-p", 0, 0, "") for i in range(70000)]
    w.put_blob(BLOB, encode_blob("x86_64", None, ProcessStatus(), maps, {}))
    w.commit({})
    view = CoreView(store.open_snapshot("many"))
    data = whole(view)
    loads = [p for p in program_headers(data) if p[0] == elf.PT_LOAD]
    assert len(loads) == 70000 and struct.unpack_from("<H", data, 56)[0] == elf.PN_XNUM
    assert data[loads[0][2] : loads[0][2] + PAGE] == b"\7" * PAGE
    if shutil.which("readelf"):
        path = store.path / "many.core"
        path.write_bytes(data)
        out = subprocess.run(["readelf", "-h", str(path)], capture_output=True, text=True).stdout
        assert re.search(r"Number of program headers:\s+65535 \(70001\)", out), out


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is installed by tools/setup.sh")
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 register layout")
def test_a_snapshot_without_recorded_state_still_opens_in_gdb(store_dir):
    """Snapshots of older snapfs have registers but no core.state: gdb still opens the core,
    with every thread and its registers."""
    from snapfs.capture import CaptureOptions, capture_process
    from tests.support.capture import Target

    with Target("coretarget") as t:
        async def take():
            with Store.open(store_dir, create=True) as store:
                await capture_process(t.pid, store, "s", CaptureOptions())
        trio.run(take)
        exe = os.readlink(f"/proc/{t.pid}/exe")
    with sqlite3.connect(store_dir / "catalog.sqlite") as db:
        assert db.execute("DELETE FROM blobs WHERE name=?", (BLOB,)).rowcount == 1
    with Store.open(store_dir) as store:
        reader = store.open_snapshot("s")
        view = CoreView(reader)
        assert view.state.auxv is None and "older snapfs" in view.describe()["note"]
        core = store_dir.parent / "old.core"
        core.write_bytes(whole(view))
        threads = reader.info.meta["threads"]
    res = subprocess.run(["gdb", "-nx", "-batch", "-ex", "info threads", "-ex", "thread apply all info registers rip",
                          exe, str(core)], capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    for tid, rec in threads.items():
        assert f"LWP {tid}" in out, out
        assert f"0x{rec['regs']['rip']:x}" in out, out


def test_snapfs_cat_of_region_data_into_a_file_is_sparse(store, tmp_path):
    regions = process_snapshot(store)
    store.close()
    out = tmp_path / "heap"
    env = dict(os.environ, SNAPFS_STORE=str(store.path))
    with open(out, "wb") as f:
        res = subprocess.run(snapfs_cmd() + ["cat", "app", "ramblocks/heap/data"], stdout=f, env=env, timeout=120)
    assert res.returncode == 0
    assert out.read_bytes() == regions[0].data
    assert out.stat().st_blocks * 512 <= regions[0].data_pages * PAGE  # zero pages and holes skipped


def test_a_view_that_fails_to_build_leaves_the_snapshot_listed(store, monkeypatch):
    from snapfs.fs import core

    process_snapshot(store)

    def broken(self, reader):
        raise RuntimeError("a bug in a view")

    monkeypatch.setattr(core.CoreView, "__init__", broken)
    fs = SnapshotFS(store)
    assert [e.name for e in fs.readdir(fs.resolve("app"))] == ["info.json", "ramblocks", "mem", "vmstate"]
    assert b'"regions"' in fs.read(fs.resolve("app/info.json"), 0, 1 << 20)


def test_snapfs_cat_of_mem_into_a_file_is_sparse(store, tmp_path):
    """Into a file only the stored pages of ``mem`` are written (the rest stays holes); a
    filesystem that cannot hold a file that large gets a one-line error, not a traceback."""
    process_snapshot(store)
    # The same regions moved below 1 TiB (ext4 files end at 16 TiB).
    low = [r for r in process_snapshot(store, "shifted") if r.start < 1 << 47]
    w = store.begin_snapshot("low", {"kind": "process", "pid": 1})
    for r in low:
        r.start -= 0x5500_0000_0000 if r.start < 0x7F00_0000_0000 else 0x7EFF_0000_0000
        idx = w.add_region(RegionSpec(r.name, r.start, len(r.data), kind=r.kind))
        w.put_pages(idx, 0, r.data)
    w.commit({})
    store.close()
    env = dict(os.environ, SNAPFS_STORE=str(store.path))
    out = tmp_path / "mem"
    with open(out, "wb") as f:
        res = subprocess.run(snapfs_cmd() + ["cat", "low", "mem"], stdout=f, stderr=subprocess.PIPE,
                             env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    with open(out, "rb") as f:
        for r in low:
            f.seek(r.start)
            assert f.read(len(r.data)) == r.data
    assert out.stat().st_size == max(r.start + len(r.data) for r in low)
    assert out.stat().st_blocks * 512 <= sum(len(r.data) for r in low) + (1 << 20)
    with open(tmp_path / "all", "wb") as f:  # the stack at 0x7ffc... is past ext4's 16 TiB
        res = subprocess.run(snapfs_cmd() + ["cat", "app", "mem"], stdout=f, stderr=subprocess.PIPE,
                             env=env, timeout=120)
    err = res.stderr.decode()
    if res.returncode:
        assert res.returncode == 1 and "Traceback" not in err and "more than the destination" in err, err


def test_write_sparse_reads_close_extents_together(tmp_path):
    """Scattered extents are read a window at a time (not one read each), written at their
    offsets, and what lies between them stays a hole."""
    from snapfs.commands.mount import CAT_CHUNK, write_sparse

    rng = np.random.default_rng(7)
    size = 3 * CAT_CHUNK + 12345
    content = rng.integers(1, 256, size, dtype=np.uint8).tobytes()
    extents = [(0, 100), (4096, 3 * 4096), (CAT_CHUNK - 10, 20), (CAT_CHUNK + 8192, 2 * CAT_CHUNK),
               (size - 5, 5)]

    class View:
        reads: list[tuple[int, int]] = []

        def read(self, offset: int, n: int) -> bytes:
            self.reads.append((offset, n))
            assert n <= CAT_CHUNK
            return content[offset : offset + n]

    view = View()
    out = tmp_path / "out"
    with open(out, "wb") as f:
        f.write(b"head")
        f.flush()
        write_sparse(f.fileno(), view, size, iter(extents))
    got = out.read_bytes()[4:]
    expected = bytearray(size)
    for a, n in extents:
        expected[a : a + n] = content[a : a + n]
    assert len(got) == size and got == bytes(expected)
    assert len(view.reads) < len(extents) + 2  # the first two extents share one read
