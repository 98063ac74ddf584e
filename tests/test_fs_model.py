"""The filesystem model without FUSE: tree, attributes, reads, mem, names, store changes."""

from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import pytest

from snapfs.errors import StoreCorrupt
from snapfs.fs import inodes
from snapfs.fs.memview import VM_ALIGN
from snapfs.fs.model import FsError, SnapshotFS
from snapfs.fs.names import decode_name, encode_name, unique_entries
from snapfs.fs.openfile import MAX_INFLIGHT, WINDOW_MIN, OpenFile, WindowBudget
from snapfs.fs.views import BytesView
from tests.support.fs import MARKER, PAGE, TOP_START, process_snapshot, vm_snapshot, write_snapshot


@pytest.fixture
def app(store):
    return process_snapshot(store)


def names(fs: SnapshotFS, path: str) -> list[str]:
    return [e.name for e in fs.readdir(fs.resolve(path))]


def read_all(fs: SnapshotFS, path: str) -> bytes:
    ino = fs.resolve(path)
    return fs.read(ino, 0, fs.getattr(ino).size)


def test_tree(store, app):
    fs = SnapshotFS(store)
    assert names(fs, "") == ["app"]
    top = set(names(fs, "app"))
    assert {"info.json", "mem", "ramblocks"} <= top
    assert top <= {"info.json", "mem", "ramblocks", "vmstate", "core"}
    assert names(fs, "app/ramblocks") == ["heap", "lib%2Fx%25y.so-7f0000000000", "anon-7f0000008000",
                                          "stack", "top"]
    assert names(fs, "app/ramblocks/heap") == ["data", "info.json"]
    with pytest.raises(FsError) as exc:
        fs.resolve("app/nope")
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(FsError) as exc:
        fs.readdir(fs.resolve("app/mem"))
    assert exc.value.errno == errno.ENOTDIR
    assert fs.lookup(fs.resolve("app/ramblocks/heap"), "..").inode == fs.resolve("app/ramblocks")
    assert fs.lookup(fs.resolve("app"), "..").inode == inodes.ROOT


def test_attributes(store, app, store_dir):
    os.chmod(store_dir, 0o750)
    fs = SnapshotFS(store)
    info = store.info("app")
    st = os.stat(store_dir)
    heap = fs.getattr(fs.resolve("app/ramblocks/heap/data"))
    assert heap.size == 64 * PAGE
    assert heap.blocks * 512 == 44 * PAGE  # zero pages and holes hold nothing
    assert stat.S_IMODE(heap.mode) == 0o440 and stat.S_ISREG(heap.mode)
    assert (heap.uid, heap.gid) == (st.st_uid, st.st_gid)
    assert heap.mtime_ns == int(info.created * 1e9)
    d = fs.getattr(fs.resolve("app/ramblocks"))
    assert stat.S_ISDIR(d.mode) and stat.S_IMODE(d.mode) == 0o550
    assert d.nlink == 2 + 5
    lib = fs.getattr(fs.resolve("app/ramblocks/lib%2Fx%25y.so-7f0000000000/data"))
    assert (lib.size, lib.blocks) == (8 * PAGE, 8)
    # inode numbers are stable
    assert fs.resolve("app/ramblocks/stack/data") == fs.resolve("app/ramblocks/stack/data")
    assert fs.getattr(inodes.ROOT).nlink == 3


def test_region_reads_at_any_offset(store, app):
    fs = SnapshotFS(store)
    rng = np.random.default_rng(7)
    for i, region in enumerate(app):
        entry = unique_entries([r.name for r in app])[i]
        ino = fs.resolve(f"app/ramblocks/{entry}/data")
        assert fs.read(ino, 0, len(region.data) + 10) == region.data
        for _ in range(30):
            off = int(rng.integers(0, len(region.data)))
            size = int(rng.integers(1, 3 * PAGE))
            assert fs.read(ino, off, size) == region.data[off : off + size]
        assert fs.read(ino, len(region.data), 100) == b""


def test_info_json(store, app):
    fs = SnapshotFS(store)
    doc = json.loads(read_all(fs, "app/info.json"))
    assert doc["name"] == "app" and doc["pid"] == 4242 and doc["kind"] == "process"
    assert [r["name"] for r in doc["regions"]] == [r.name for r in app]
    heap = json.loads(read_all(fs, "app/ramblocks/heap/info.json"))
    assert heap["start"] == app[0].start and heap["end"] == app[0].start + 64 * PAGE
    assert heap["kind"] == "heap" and heap["perms"] == "rw-p"
    assert heap["data_extents"] == [[0, 10 * PAGE], [30 * PAGE, 34 * PAGE]]
    lib = json.loads(read_all(fs, "app/ramblocks/lib%2Fx%25y.so-7f0000000000/info.json"))
    assert lib["name"] == "lib/x%y.so-7f0000000000" and lib["path"] == "/usr/lib/x%y.so"
    assert lib["data_extents"] == [[3 * PAGE, PAGE]]


def test_mem_is_the_address_space(store, app):
    fs = SnapshotFS(store)
    ino = fs.resolve("app/mem")
    attr = fs.getattr(ino)
    stack = app[3]
    assert attr.size == stack.start + len(stack.data)  # the top region is left out
    assert attr.blocks * 512 == (44 + 1 + 1024 + 16) * PAGE
    for region in app[:4]:
        assert fs.read(ino, region.start, len(region.data)) == region.data
    # Straddles the library and the adjacent anonymous region.
    lib, anon = app[1], app[2]
    assert fs.read(ino, anon.start - 100, 200) == lib.data[-100:] + anon.data[:100]
    # Spans a gap: zeros between regions, and past the heap's end.
    heap = app[0]
    end = heap.start + len(heap.data)
    assert fs.read(ino, end - 50, 150) == heap.data[-50:] + bytes(100)
    assert fs.read(ino, 0x1000, 4096) == bytes(4096)
    assert MARKER in fs.read(ino, stack.start, len(stack.data))
    assert fs.read(ino, TOP_START, 10) == b""  # beyond the end of mem
    info = json.loads(read_all(fs, "app/info.json"))
    assert info["regions"][4]["mem_offset"] is None
    assert info["regions"][0]["mem_offset"] == heap.start


def test_vm_mem_concatenates_ramblocks(store):
    ram, rom = vm_snapshot(store)
    fs = SnapshotFS(store)
    assert names(fs, "vm1/ramblocks") == ["pc.ram", "%2From@etc%2Facpi%2Ftables"]
    ino = fs.resolve("vm1/mem")
    rom_off = -(-len(ram.data) // VM_ALIGN) * VM_ALIGN
    assert fs.getattr(ino).size == rom_off + len(rom.data)
    assert fs.read(ino, 0, len(ram.data)) == ram.data
    assert fs.read(ino, rom_off, len(rom.data)) == rom.data
    assert fs.read(ino, len(ram.data), rom_off - len(ram.data)) == bytes(rom_off - len(ram.data))
    doc = json.loads(read_all(fs, "vm1/info.json"))
    assert [r["mem_offset"] for r in doc["regions"]] == [0, rom_off]
    assert read_all(fs, "vm1/ramblocks/%2From@etc%2Facpi%2Ftables/data") == rom.data


def test_names_round_trip():
    for name in ["heap", "/rom@etc/acpi/tables", "50%/x", "a\x00b", "", ".", ".."]:
        entry = encode_name(name)
        assert "/" not in entry and "\x00" not in entry and entry not in ("", ".", "..")
        assert decode_name(entry) == name
    assert unique_entries(["a", "a", "x" * 300]) == ["a", "a~1", "x" * 253 + "~2"]


def test_snapshots_appear_and_disappear(store, app):
    fs = SnapshotFS(store)
    removed = []
    fs.on_removed = removed.extend
    old_data = fs.resolve("app/ramblocks/heap/data")
    process_snapshot(store, "second", seed=3)
    assert names(fs, "") == ["app"]  # listing alone uses what the last root lookup saw
    fs.lookup(inodes.ROOT, "second")
    assert names(fs, "") == ["app", "second"]
    store.remove(["app"])
    with pytest.raises(FsError):
        fs.lookup(inodes.ROOT, "app")
    assert removed == [("app", inodes.pack(1, 0))]
    with pytest.raises(FsError) as exc:
        fs.getattr(old_data)
    assert exc.value.errno == errno.ENOENT
    process_snapshot(store, "app", seed=4)  # same name, new snapshot: new inodes
    new_data = fs.resolve("app/ramblocks/heap/data")
    assert new_data != old_data
    assert names(fs, "") == ["second", "app"]


def test_readdir_cursors_are_stable(store, app):
    process_snapshot(store, "b", seed=5)
    process_snapshot(store, "c", seed=6)
    fs = SnapshotFS(store)
    first = fs.readdir(inodes.ROOT, 0, limit=1)
    assert [e.name for e in first] == ["app"]
    store.remove(["b"])  # removal between two readdir calls shifts nothing
    process_snapshot(store, "d", seed=8)
    fs.refresh()
    rest = fs.readdir(inodes.ROOT, first[0].cursor)
    assert [e.name for e in rest] == ["c", "d"]
    ram = fs.resolve("app/ramblocks")
    got, after = [], 0
    while batch := fs.readdir(ram, after, limit=2):
        got += [e.name for e in batch]
        after = batch[-1].cursor
    assert got == names(fs, "app/ramblocks")


def test_readers_are_bounded_and_lazy(store):
    for i in range(5):
        write_snapshot(store, f"s{i}", [])
    fs = SnapshotFS(store, max_open=2)
    assert len(fs.readdir(inodes.ROOT)) == 5
    assert len(fs._loaded) == 0  # listing the root opens nothing
    for i in range(5):
        fs.readdir(fs.resolve(f"s{i}"))
    assert len(fs._loaded) == 2


def test_listing_many_snapshots_is_one_catalog_query(store, monkeypatch):
    """``ls -l`` of a thousand snapshots costs one catalog listing: no snapshot is opened (no
    page map or region row read) to list or stat them. (Its speed is the bench's business.)"""
    for i in range(1000):
        write_snapshot(store, f"snap-{i:04d}", [])
    calls = {"list": 0, "open": 0}

    def counting(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(store, "list_snapshots", counting("list", store.list_snapshots))
    monkeypatch.setattr(store, "open_snapshot", counting("open", store.open_snapshot))
    fs = SnapshotFS(store)
    entries = fs.readdir(inodes.ROOT, 0, limit=10_000)
    assert len(entries) == 1000
    for entry in entries:
        assert stat.S_ISDIR(fs.lookup(inodes.ROOT, entry.name).mode)
    assert calls == {"list": 1, "open": 0}
    assert len(fs._loaded) == 0


def test_corrupt_frame_raises_store_corrupt(store, app, store_dir):
    fs = SnapshotFS(store)
    ino = fs.resolve("app/ramblocks/anon-7f0000008000/data")
    segments = sorted((store_dir / "segments").iterdir())
    with open(segments[0], "r+b") as f:  # flip bytes in the middle of the big region's frames
        f.seek(os.path.getsize(segments[0]) // 2)
        chunk = f.read(64)
        f.seek(-64, 1)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(StoreCorrupt):
        fs.read(ino, 0, len(app[2].data))
    # The other regions' frames are intact and still read.
    assert fs.read(fs.resolve("app/ramblocks/stack/data"), 0, 16 * PAGE) == app[3].data


def _serve(of: OpenFile, pos: int, chunk: int, fetched: list[int]) -> bytes | memoryview:
    """One request the way the adapter serves it, without the concurrency."""
    of.note(pos, chunk)
    chunk = min(chunk, of.size - pos)
    got = of.cached(pos, chunk)
    if got is None:
        start, length = of.plan(pos, chunk)
        fetched.append(length)
        buf = of.fetch(start, length)
        of.install(start, buf, keep=length > chunk)
        got = of.part(buf, start, pos, chunk)
    return got


def test_open_file_windows_sequential_reads():
    data = bytes(np.random.default_rng(1).integers(0, 256, 6 << 20, dtype=np.uint8))
    view = BytesView(data)
    of = OpenFile(5, view)
    chunk = 128 * 1024
    fetched: list[int] = []
    for pos in range(0, len(data), chunk):
        assert _serve(of, pos, chunk, fetched) == data[pos : pos + chunk]
        window = of.next_prefetch()
        if window is not None:
            of.install(window[0], of.fetch(*window), keep=True)
    assert len(fetched) < 6  # windows, not one fetch per request
    assert max(fetched) >= WINDOW_MIN
    assert 0 < of.budget.used <= 4 * (4 << 20)
    of.close()
    assert of.budget.used == 0
    # A budget too small for a window: reads are still right, nothing is kept.
    small = OpenFile(5, view, WindowBudget(64 * 1024))
    fetched = []
    for pos in range(0, 2 << 20, chunk):
        assert _serve(small, pos, chunk, fetched) == data[pos : pos + chunk]
    assert set(fetched) == {chunk}  # no window fetched only to be thrown away
    assert small.budget.used == 0
    # Random access: exact reads, nothing kept.
    of2 = OpenFile(5, view)
    of2.note(4096, 10)
    assert of2.cached(4096, 10) is None
    assert of2.plan(4096, 10) == (4096, 10)
    assert of2.cached(len(data) + 5, 10) == b""


def test_open_file_sequential_detection_survives_concurrent_requests():
    """The kernel sends a sequential reader's next requests before the first is answered:
    detection follows arrivals, and requests inside a running window wait for it."""
    data = bytes(np.random.default_rng(2).integers(0, 256, 16 << 20, dtype=np.uint8))
    of = OpenFile(5, BytesView(data))
    mib = 1 << 20
    of.note(0, mib)
    assert of.plan(0, mib) == (0, mib)  # the first request: exact
    of.note(mib, mib)  # arrives while the first is still being fetched
    start, length = of.plan(mib, mib)
    assert (start, length) == (mib, WINDOW_MIN) and length >= mib
    of.begin_window((start, length))
    ahead = of.next_prefetch()  # the next window starts before anyone asks for it
    assert ahead == (start + length, WINDOW_MIN)
    of.begin_window(ahead)
    while (more := of.next_prefetch()) is not None:
        assert more[0] == of.inflight[-1][0] + of.inflight[-1][1]  # each right after the last
        of.begin_window(more)
    assert len(of.inflight) == MAX_INFLIGHT  # at most MAX_INFLIGHT windows at once
    of.note(2 * mib, mib)  # the kernel's next request falls in the prefetched window
    assert of.inflight_covering(2 * mib) == ahead
    assert of.inflight_covering(mib + 10) == (start, length)
    of.end_window((start, length))
    buf = of.fetch(start, length)
    of.install(start, buf, keep=True)
    assert of.part(buf, start, mib, mib) == data[mib : 2 * mib]
    assert of.part(buf, start, 0, mib) is None  # not inside the window
    assert of.cached(mib, mib) == data[mib : 2 * mib]


def test_vmstate_view_is_served_when_its_module_exists(store, app):
    vmstate = pytest.importorskip("snapfs.stream.vmstate")
    fs = SnapshotFS(store)
    ino = fs.resolve("app/vmstate")
    expected = vmstate.VmstateView(store.open_snapshot("app"))
    assert fs.getattr(ino).size == expected.size
    assert fs.read(ino, 0, expected.size) == expected.read(0, expected.size)


class ExtraView:
    """A provider view used to check the provider hook (as ``core`` will be added)."""

    def __init__(self, reader):
        self.size = 5
        self.name = reader.info.name

    def read(self, offset, size):
        return b"extra"[offset : offset + size]


def test_view_providers_are_listed_only_if_their_module_exists(store, app, monkeypatch):
    from snapfs.fs import loaded, views

    monkeypatch.setattr(loaded, "PROVIDERS", (
        views.ViewProvider("extra", "tests.test_fs_model", "ExtraView"),
        views.ViewProvider("core", "snapfs.no_such_module", "CoreView"),
    ))
    fs = SnapshotFS(store)
    assert sorted(names(fs, "app")) == ["extra", "info.json", "mem", "ramblocks"]
    assert read_all(fs, "app/extra") == b"extra"
    assert fs.resolve("app/extra") == inodes.pack(1, inodes.PROVIDER_BASE)


def test_mem_random_reads_match_the_regions(store, app):
    fs = SnapshotFS(store)
    ino = fs.resolve("app/mem")
    placed = [r for r in app if r.start + len(r.data) < 1 << 63]

    end = fs.getattr(ino).size

    def expected(offset: int, size: int) -> bytes:
        size = max(0, min(size, end - offset))  # short at the end of mem
        out = bytearray(size)
        for r in placed:
            a, b = max(offset, r.start), min(offset + size, r.start + len(r.data))
            if a < b:
                out[a - offset : b - offset] = r.data[a - r.start : b - r.start]
        return bytes(out)

    rng = np.random.default_rng(11)
    lib, anon = app[1], app[2]
    for _ in range(60):
        r = placed[int(rng.integers(0, len(placed)))]
        offset = r.start + int(rng.integers(-3 * PAGE, len(r.data) + 3 * PAGE))
        size = int(rng.integers(1, 300_000))
        assert fs.read(ino, offset, size) == expected(offset, size), (hex(offset), size)
    # one read across the library and the whole adjacent region
    assert fs.read(ino, lib.start, len(lib.data) + len(anon.data)) == lib.data + anon.data
