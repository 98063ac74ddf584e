"""Store round trips: every page kind, random reads, odd put patterns, concurrency, metadata."""

from __future__ import annotations

import json
import os
import stat
import threading

import numpy as np
import pytest

from snapfs.errors import NameInUse, SnapshotNotFound, StoreError, UsageError
from snapfs.store import DATA, HOLE, ZERO, RegionSpec, Store
from tests.support.synthetic import expected_image, region_kinds, write_synthetic

PAGE = 4096


def _expected_runs(kinds: np.ndarray) -> list[tuple[int, int, int]]:
    out = []
    for p, k in enumerate(kinds.tolist()):
        if out and out[-1][2] == k:
            out[-1][1] += 1
        else:
            out.append([p, 1, k])
    return [tuple(x) for x in out]


def test_round_trip_all_kinds_and_random_reads(store):
    pages = [3000, 77]
    write_synthetic(store, "s1", seed=5, region_pages=pages, threads=2)
    r = store.open_snapshot("s1")
    assert [reg.length for reg in r.regions] == [p * PAGE for p in pages]
    rng = np.random.default_rng(0)
    for i, n in enumerate(pages):
        exp = expected_image(5, i, n)
        assert r.read(i, 0, n * PAGE) == exp
        for _ in range(300):
            off = int(rng.integers(0, n * PAGE))
            size = int(rng.choice([1, 4096, 65536, 131072, int(rng.integers(1, 300000))]))
            assert r.read(i, off, size) == exp[off:off + size]
        assert r.read(i, n * PAGE, 10) == b""
        kinds = region_kinds(n)
        assert list(r.runs(i)) == _expected_runs(kinds)
        assert r.regions[i].data_pages == int((kinds == DATA).sum())
        assert r.regions[i].zero_pages == int((kinds == ZERO).sum())
        ext = r.data_extents(i)
        assert sum(length for _, length in ext) == int((kinds == DATA).sum()) * PAGE
    assert r.blob("synthetic") == b"s1:5:0"
    assert r.blob("nope") is None
    info = store.info("s1")
    assert info.resident_bytes == sum(int((region_kinds(n) != HOLE).sum()) for n in pages) * PAGE
    assert 0 < info.stored_bytes < info.resident_bytes      # compressed, zero pages free
    assert info.pid == 4242 and info.comm == "synthetic" and info.pause_ms == 1.5
    assert info.region_count == 2 and info.parent is None
    json.dumps(info.to_json())


def test_single_page_puts_are_pooled_into_full_frames(store):
    npages = 640
    img = np.random.default_rng(1).integers(1, 255, size=(npages, PAGE), dtype=np.uint8)
    w = store.begin_snapshot("singles", {})
    idx = w.add_region(RegionSpec("heap", 0x400000, npages * PAGE, kind="heap"))
    for p in np.random.default_rng(2).permutation(npages).tolist():
        w.put_pages(idx, p, img[p].tobytes())
    w.commit()
    nframes = store.query("SELECT count(*) FROM frames")[0][0]
    assert nframes == npages // 32
    r = store.open_snapshot("singles")
    assert r.read(0, 0, npages * PAGE) == img.tobytes()
    assert list(r.runs(0)) == [(0, npages, DATA)]


def test_mask_zero_pages_holes_and_page_size_metadata(store):
    data = bytearray(8 * PAGE)
    data[0:PAGE] = b"\x01" * PAGE           # page 0 data, 1-2 zero, 3 masked out, 4..7 zero/data
    data[5 * PAGE:6 * PAGE] = b"\x07" * PAGE
    mask = np.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
    w = store.begin_snapshot("m", {"kind": "vm"})
    idx = w.add_region(RegionSpec("pc.ram", 0, 16 * PAGE, "rw-p", 0, None, "ramblock", 2 << 20, {"id": 1}))
    w.put_pages(idx, 2, data, mask)
    w.mark_lost(idx, 12, 2, "EFAULT")
    info = w.commit({"faults": 3})
    assert info.kind == "vm" and info.faults == 3
    assert any("EFAULT" in x for x in info.warnings)
    r = store.open_snapshot("m")
    assert r.regions[0].page_size == 2 << 20 and r.regions[0].meta["id"] == 1
    assert list(r.runs(0)) == [(0, 2, HOLE), (2, 1, DATA), (3, 2, ZERO), (5, 1, HOLE), (6, 1, ZERO),
                               (7, 1, DATA), (8, 2, ZERO), (10, 6, HOLE)]
    exp = bytearray(16 * PAGE)
    exp[2 * PAGE:3 * PAGE] = b"\x01" * PAGE
    exp[7 * PAGE:8 * PAGE] = b"\x07" * PAGE
    assert r.read(0, 0, 16 * PAGE) == bytes(exp)
    assert r.data_extents(0) == [(2 * PAGE, PAGE), (7 * PAGE, PAGE)]


def test_concurrent_puts_from_two_threads(store):
    npages = 4096
    img = np.random.default_rng(3).integers(0, 4, size=(npages, PAGE), dtype=np.uint8)
    w = store.begin_snapshot("threads", {})
    idx = w.add_region(RegionSpec("anon", 0, npages * PAGE))
    chunks = [(p, min(p + 37, npages)) for p in range(0, npages, 37)]

    def work(part):
        for a, b in part:
            w.put_pages(idx, a, memoryview(img[a:b]).cast("B"))

    t = threading.Thread(target=work, args=(chunks[1::2],))
    t.start()
    work(chunks[0::2])
    t.join()
    w.commit()
    assert store.open_snapshot("threads").read(0, 0, npages * PAGE) == img.tobytes()


def test_names_reserved_and_validated(store):
    w1 = store.begin_snapshot("same", {})
    with pytest.raises(NameInUse, match="being captured"):
        store.begin_snapshot("same", {})
    w2 = store.begin_snapshot("other", {})     # different names write concurrently
    w2.add_region(RegionSpec("a", 0, PAGE))
    w2.put_pages(0, 0, b"\x02" * PAGE)
    w2.commit()
    w1.abort()
    store.begin_snapshot("same", {}).commit()   # an aborted reservation frees the name
    with pytest.raises(NameInUse, match="already exists"):
        store.begin_snapshot("same", {})
    for bad in ("", "a/b", ".hidden", "-x", "x" * 300):
        with pytest.raises(UsageError):
            store.begin_snapshot(bad, {})
    with pytest.raises(SnapshotNotFound):
        store.begin_snapshot("child", {}, parent="missing")


def test_made_up_names_are_numbered_when_taken(store):
    """Two default names of the same second (<comm>-<pid>-<time>): the second capture gets
    <name>-2, then -3 while -2 is being captured; a user's own name still refuses."""
    store.begin_snapshot("p-1-T", {}).commit()
    live = store.begin_snapshot("p-1-T", {}, number_if_taken=True)
    assert live.name == "p-1-T-2"
    third = store.begin_snapshot("p-1-T", {}, number_if_taken=True)
    assert third.name == "p-1-T-3"
    third.commit()
    live.abort()
    assert store.begin_snapshot("p-1-T", {}, number_if_taken=True).name == "p-1-T-2"
    assert store.begin_snapshot("free", {}, number_if_taken=True).name == "free"
    with pytest.raises(NameInUse, match="already exists"):
        store.begin_snapshot("p-1-T", {})


def test_uncommitted_snapshots_are_invisible_and_generation_moves(store):
    g0 = store.generation()
    w = store.begin_snapshot("p", {})
    w.add_region(RegionSpec("a", 0, 4 * PAGE))
    w.put_pages(0, 0, b"\x05" * 4 * PAGE)
    assert store.list_snapshots() == [] and store.generation() == g0
    with pytest.raises(SnapshotNotFound):
        store.info("p")
    with pytest.raises(SnapshotNotFound):
        store.open_snapshot("p")
    w.abort()
    assert store.list_snapshots() == [] and os.listdir(store.segments.directory) == []
    write_synthetic(store, "q", 1, [50])
    g1 = store.generation()
    assert g1 != g0 and [s.name for s in store.list_snapshots()] == ["q"]
    store.remove(["q"])
    assert store.generation() != g1 and store.list_snapshots() == []
    with pytest.raises(SnapshotNotFound, match="nothing removed"):
        store.remove(["q"])


def test_exception_in_writer_context_aborts(store):
    with pytest.raises(RuntimeError):
        with store.begin_snapshot("boom", {}) as w:
            w.add_region(RegionSpec("a", 0, PAGE))
            w.put_pages(0, 0, b"\x01" * PAGE)
            raise RuntimeError("capture failed")
    assert store.list_snapshots() == []
    assert store.check()["garbage"]["dead_pending"] == []


def test_reader_sees_other_store_instance_commits_concurrently(store_dir):
    writer_store = Store.open(store_dir)
    reader_store = Store.open(store_dir)
    write_synthetic(writer_store, "base", 2, [500])
    r = reader_store.open_snapshot("base")
    exp = expected_image(2, 0, 500)
    errors = []
    stop = threading.Event()

    def reader():
        rng = np.random.default_rng(7)
        while not stop.is_set():
            off = int(rng.integers(0, 500 * PAGE))
            if r.read(0, off, 8192) != exp[off:off + 8192]:
                errors.append(off)
            reader_store.generation()
            reader_store.list_snapshots()

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        g = reader_store.generation()
        for i in range(3):
            write_synthetic(writer_store, f"n{i}", 3 + i, [400], threads=2)
        assert reader_store.generation() != g
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert [s.name for s in reader_store.list_snapshots()] == ["base", "n0", "n1", "n2"]
    writer_store.close()
    reader_store.close()


def test_permissions(store_dir):
    old = os.umask(0)       # even a permissive umask must not leak modes
    try:
        s = Store.open(store_dir)
        write_synthetic(s, "x", 1, [100])
        w = s.begin_snapshot("pending", {})
        w.add_region(RegionSpec("a", 0, 64 * PAGE))
        w.put_pages(0, 0, os.urandom(64 * PAGE))
        for root, dirs, files in os.walk(store_dir):
            assert stat.S_IMODE(os.stat(root).st_mode) == 0o700, root
            for f in files:
                assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600, f
        names = {f for _, _, fs in os.walk(store_dir) for f in fs}
        assert {"README", "config.json", "catalog.sqlite", "catalog.sqlite-wal"} <= names
        w.abort()
        s.close()
    finally:
        os.umask(old)


def test_open_errors(store_dir, tmp_path):
    with pytest.raises(StoreError, match="no snapfs store"):
        Store.open(store_dir, create=False)
    Store.open(store_dir).close()
    cfg = json.loads((store_dir / "config.json").read_text())
    cfg["version"] = 99
    (store_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StoreError, match="format version 99"):
        Store.open(store_dir)
    other = tmp_path / "notastore"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(StoreError, match="not a snapfs store"):
        Store.open(other)


def test_gc_leaves_live_writers_and_their_parents_alone(store):
    write_synthetic(store, "p", 1, [700])
    w = store.begin_snapshot("live", {}, parent="p")
    idx = w.add_region(RegionSpec("region0", 0x10000000, 700 * PAGE))
    img = np.frombuffer(expected_image(1, 0, 700, version=3), np.uint8).reshape(700, PAGE)
    w.put_pages(idx, 0, img[:400])
    result = store.gc()
    assert result["live_writers"] == 1 and result["pending_removed"] == []
    assert result["bytes_reclaimed"] == 0
    w.put_pages(idx, 400, img[400:])
    w.commit()
    assert store.open_snapshot("live").read(0, 0, 700 * PAGE) == img.tobytes()
    assert store.check(verify_data=True)["ok"]


def test_reading_a_snapshot_removed_while_open(store):
    write_synthetic(store, "gone", 1, [100])
    write_synthetic(store, "stays", 2, [100])
    r = store.open_snapshot("gone")
    store.remove(["gone"])
    with pytest.raises(SnapshotNotFound, match="removed"):
        r.read(0, 0, PAGE)
    assert store.open_snapshot("stays").read(0, 0, 100 * PAGE) == expected_image(2, 0, 100)


def test_sparse_64_gib_region(store):
    npages = 16 << 20                              # 64 GiB of address space, a few pages used
    rng = np.random.default_rng(11)
    puts = {0: 1, 5_000_001: 3, 10_485_760: 512, npages - 1: 1}
    content = {p: rng.integers(1, 256, size=n * PAGE, dtype=np.uint8).tobytes() for p, n in puts.items()}
    w = store.begin_snapshot("big", {})
    idx = w.add_region(RegionSpec("ram", 0, npages * PAGE, kind="ramblock"))
    for p, data in content.items():
        w.put_pages(idx, p, data)
    w.commit()
    r = store.open_snapshot("big")
    for p, data in content.items():
        assert r.read(0, p * PAGE, len(data)) == data
        if p:
            assert r.read(0, p * PAGE - 100, 50) == bytes(50)       # the hole before it
    assert r.read(0, 30 << 30, 8192) == bytes(8192)
    runs = list(r.runs(0))
    assert sum(n for _, n, _ in runs) == npages
    assert [(p, n) for p, n, k in runs if k == DATA] == sorted(puts.items())
    # A child compares against hash chunks far into the region and shares every page.
    w = store.begin_snapshot("big2", {}, parent="big")
    idx = w.add_region(RegionSpec("ram", 0, npages * PAGE, kind="ramblock"))
    for p, data in content.items():
        w.put_pages(idx, p, data)
    assert w.commit().stored_bytes == 0
    assert store.open_snapshot("big2").read(0, 10_485_760 * PAGE, 512 * PAGE) == content[10_485_760]


def test_open_segment_fds_are_bounded(store, monkeypatch):
    from snapfs.store import segments
    monkeypatch.setattr(segments, "OPEN_SEGMENTS", 3)
    for i in range(8):
        write_synthetic(store, f"s{i}", i, [40])
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        for i in range(8):
            assert store.open_snapshot(f"s{i}").read(0, 0, 40 * PAGE) == expected_image(i, 0, 40)
    assert len(store.segments._fds) <= 3
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 3


def test_run_compaction_keeps_every_page(store, monkeypatch):
    from snapfs.store import writer
    monkeypatch.setattr(writer, "COMPACT_PARTS", 3)
    monkeypatch.setattr(writer, "COMPACT_ZEROS", 5)
    write_synthetic(store, "base", 8, [2000, 50])
    child = write_synthetic(store, "child", 8, [2000, 50], version=1, parent="base")
    assert child.shared_bytes > 0
    for name, version in (("base", 0), ("child", 1)):
        r = store.open_snapshot(name)
        for i, n in enumerate((2000, 50)):
            assert r.read(i, 0, n * PAGE) == expected_image(8, i, n, version)
            assert list(r.runs(i)) == _expected_runs(region_kinds(n))


def test_capped_merges_from_concurrent_puts_keep_every_page(store, monkeypatch):
    """Run pieces merged outside the writer's lock by two threads putting single pages at
    once, never into more than MERGE_MAX_RUNS: every page is still where it was put."""
    from snapfs.store import writer
    monkeypatch.setattr(writer, "COMPACT_PARTS", 3)
    monkeypatch.setattr(writer, "COMPACT_RUNS", 5)
    monkeypatch.setattr(writer, "MERGE_MAX_RUNS", 64)
    npages = 3000
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, size=(npages, PAGE), dtype=np.uint8)
    zero = rng.random(npages) < 0.3
    data[zero] = 0
    w = store.begin_snapshot("threads", {})
    idx = w.add_region(RegionSpec("ram", 0, npages * PAGE))
    order = rng.permutation(npages)          # scattered pages, as write faults come
    threads = [threading.Thread(target=lambda pages=pages: [w.put_pages(idx, p, data[p].tobytes())
                                                             for p in pages.tolist()])
               for pages in (order[: npages // 2], order[npages // 2:])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = [len(m) for m in w._merged]
    assert len(merged) > 1 and sum(merged) > 64   # the cap took effect...
    w.commit()
    r = store.open_snapshot("threads")
    assert r.read(0, 0, npages * PAGE) == data.tobytes()   # ...and lost nothing
    kinds = np.full(npages, HOLE)
    for page, n, kind in ((x[0], x[1], x[2]) for x in r.runs(0)):
        kinds[page:page + n] = kind
    assert (kinds == np.where(zero, ZERO, DATA)).all()


def _many_small_regions(w, sizes):
    return [w.add_region(RegionSpec(f"r{i}", i << 24, n * PAGE)) for i, n in enumerate(sizes)]


def test_put_pieces_of_many_regions_equals_one_put_per_piece(store):
    """put_pieces (a scan batch across hundreds of small mappings) stores exactly what one
    put_pages per piece does: bytes, runs, page counts, and hashes a child matches against."""
    rng = np.random.default_rng(11)
    sizes = rng.integers(1, 10, size=400).tolist()
    data = [rng.integers(0, 256, size=(n, PAGE), dtype=np.uint8) for n in sizes]
    for arr in data:
        arr[rng.random(len(arr)) < 0.3] = 0                     # zero pages among them
    masks = [rng.random(n) < 0.8 for n in sizes]
    for name in ("pieces", "each"):
        w = store.begin_snapshot(name, {})
        idx = _many_small_regions(w, sizes)
        if name == "each":
            for i, arr, m in zip(idx, data, masks):
                w.put_pages(i, 0, arr.tobytes(), m)
        else:
            for lo in range(0, len(sizes), 97):                   # batches of pieces
                sel = range(lo, min(lo + 97, len(sizes)))
                w.put_pieces([idx[i] for i in sel], [0] * len(sel), [sizes[i] for i in sel],
                             b"".join(data[i].tobytes() for i in sel), np.concatenate([masks[i] for i in sel]))
        # The pages left out by the masks, one by one (the fault path's single pages).
        for i, m in zip(idx, masks):
            for p in np.flatnonzero(~m).tolist():
                w.put_pages(i, p, data[i][p].tobytes())
        w.commit()
    a, b = store.open_snapshot("pieces"), store.open_snapshot("each")
    for i, n in enumerate(sizes):
        assert a.read(i, 0, n * PAGE) == data[i].tobytes() == b.read(i, 0, n * PAGE)
        assert list(a.runs(i)) == list(b.runs(i))
        assert (a.regions[i].data_pages, a.regions[i].zero_pages) == (b.regions[i].data_pages, b.regions[i].zero_pages)
    assert store.info("pieces").resident_bytes == store.info("each").resident_bytes
    # A child with the same content stores nothing new: every page matches its parent's hash.
    w = store.begin_snapshot("child", {}, parent="pieces")
    idx = _many_small_regions(w, sizes)
    w.put_pieces(idx, [0] * len(idx), sizes, b"".join(arr.tobytes() for arr in data))
    child = w.commit()
    assert child.stored_bytes == 0 and child.shared_bytes > 0
    r = store.open_snapshot("child")
    assert all(r.read(i, 0, n * PAGE) == data[i].tobytes() for i, n in enumerate(sizes))


def test_put_pieces_refuses_bad_pieces(store):
    from snapfs.store.writer import PageGivenTwice

    w = store.begin_snapshot("bad", {})
    idx = _many_small_regions(w, [4, 4, 4])
    page = bytes(range(256)) * 16
    with pytest.raises(ValueError, match="outside"):
        w.put_pieces([idx[0]], [2], [3], page * 3)
    with pytest.raises(ValueError, match="ascending"):
        w.put_pieces([idx[1], idx[0]], [0, 0], [1, 1], page * 2)
    with pytest.raises(ValueError, match="bytes"):
        w.put_pieces([idx[0]], [0], [2], page)
    w.put_pieces([idx[0], idx[2]], [0, 1], [2, 3], page * 5)
    with pytest.raises(PageGivenTwice, match="page 3 of region 'r2'"):
        w.put_pieces([idx[1], idx[2]], [0, 3], [1, 1], page * 2)
    w.abort()


def test_a_page_given_twice_is_refused_loudly(store):
    """Each page reaches the writer at most once: a second put (whole, masked, scattered,
    single page, or inherited) is an internal error that aborts the snapshot."""
    from snapfs.store.writer import PageGivenTwice

    pages = np.random.default_rng(5).integers(0, 256, size=(64, PAGE), dtype=np.uint8)
    attempts = {
        "put": lambda w, i: w.put_pages(i, 40, pages[:10].tobytes()),
        "masked": lambda w, i: w.put_pages(i, 0, pages.tobytes(), np.arange(64) == 63),
        "scattered": lambda w, i: w.put_scattered(i, [2, 50, 60], pages[:3].tobytes()),
        "single": lambda w, i: w.put_pages(i, 49, pages[0].tobytes()),
        "zero": lambda w, i: w.put_pages(i, 45, bytes(PAGE)),
    }
    for what, again in attempts.items():
        w = store.begin_snapshot(f"twice-{what}", {})
        i = w.add_region(RegionSpec("anon", 0, 128 * PAGE))
        w.put_pages(i, 30, pages[:20].tobytes())       # pages 30..49
        w.put_scattered(i, [60, 63], pages[:2].tobytes())
        with pytest.raises(PageGivenTwice, match=f"page .* of region 'anon' was handed to the store twice"):
            again(w, i)
        with pytest.raises(PageGivenTwice):
            w.commit()
        assert store.list_snapshots() == []
    # Pages not given before are fine, however they arrive.
    w = store.begin_snapshot("once", {})
    i = w.add_region(RegionSpec("anon", 0, 128 * PAGE))
    w.put_pages(i, 30, pages[:20].tobytes())
    w.put_pages(i, 0, pages[:30].tobytes(), np.arange(30) % 2 == 0)
    w.put_pages(i, 1, pages[0].tobytes())
    w.put_scattered(i, [3, 5, 100], pages[:3].tobytes())
    w.commit()
    # An inherited page cannot be put again either.
    w = store.begin_snapshot("child", {}, parent="once")
    i = w.add_region(RegionSpec("anon", 0, 128 * PAGE))
    w.inherit(i, 0, 64)
    with pytest.raises(PageGivenTwice, match="page 63 "):
        w.put_pages(i, 63, pages[:2].tobytes())
    w.abort()


def test_pages_lost_before_their_region_is_declared_are_kept(store):
    """A capture numbers its regions in the pause and declares them after the resume; the
    fault path may report pages the target unmapped in between (a JVM-like target's GC made
    this an IndexError and a traceback)."""
    w = store.begin_snapshot("early", {"kind": "process"})
    w.mark_lost(1, 3, 2, "munmap by the target during the capture")
    a = w.add_region(RegionSpec("a", 0, 4 * PAGE, "rw-p", 0, None, "anon"))
    b = w.add_region(RegionSpec("b", 16 * PAGE, 8 * PAGE, "rw-p", 0, None, "anon"))
    assert (a, b) == (0, 1)
    w.put_pages(b, 0, b"\x05" * (3 * PAGE))
    info = w.commit()
    assert [x for x in info.warnings if "munmap by the target" in x], info.warnings
    r = store.open_snapshot("early")
    assert r.regions[1].meta["lost"] == [[3, 2, "munmap by the target during the capture"]]
    assert list(r.runs(1)) == [(0, 3, DATA), (3, 5, HOLE)]


def test_pages_lost_in_a_region_never_declared_fail_the_commit(store):
    w = store.begin_snapshot("never", {"kind": "process"})
    w.add_region(RegionSpec("a", 0, 4 * PAGE, "rw-p", 0, None, "anon"))
    w.mark_lost(5, 0, 1, "EFAULT")
    with pytest.raises(StoreError, match="never declared"):
        w.commit()


def _frames_input() -> memoryview:
    """Six 128 KiB frames: random (stored raw), zeros, text, random with a zero half, a
    repeated page, random again."""
    rng = np.random.default_rng(11)
    frame = 32 * PAGE
    data = np.zeros((6, frame), np.uint8)
    data[0] = rng.integers(0, 256, frame)
    data[2] = np.frombuffer((b"snapfs frame %d\n" * 20000)[:frame], np.uint8)
    data[3, :frame // 2] = rng.integers(0, 256, frame // 2)
    data[4] = np.tile(rng.integers(0, 256, PAGE).astype(np.uint8), 32)
    data[5] = rng.integers(0, 256, frame)
    return memoryview(data.tobytes())


def test_frames_compressed_in_one_call_match_frame_by_frame(monkeypatch):
    """The batched compression (two calls without the GIL) gives every frame the codec, CRC
    and bytes the frame-by-frame path gives, and its payloads decode to the input."""
    from snapfs.store import _format
    if not _format._multi:
        pytest.skip("no batch compression in this python-zstandard, or no libdeflate")
    raw = _frames_input()
    frame = 32 * PAGE
    single = [_format.compress_payload(raw[f * frame:(f + 1) * frame], 1) for f in range(6)]
    batched = _format.compress_frames(raw, frame, 1)
    assert [c for c, _, _ in batched] == [c for c, _, _ in single] == [0, 1, 1, 1, 1, 0]
    assert [(c, bytes(p), crc) for c, p, crc in batched] == [(c, bytes(p), crc) for c, p, crc in single]
    for f, (codec, payload, crc) in enumerate(batched):
        assert crc == _format.crc32(payload)
        page_bytes = bytes(payload) if codec == _format.CODEC_RAW else _format._decompressor().decompress(payload)
        assert page_bytes == raw[f * frame:(f + 1) * frame]
    monkeypatch.setattr(_format, "_multi", False)
    assert [(c, bytes(p), crc) for c, p, crc in _format.compress_frames(raw, frame, 1)] == \
        [(c, bytes(p), crc) for c, p, crc in single]
    with pytest.raises(ValueError):
        _format.compress_frames(raw[:frame + 1], frame, 1)


def test_store_reads_back_frames_compressed_in_one_call(store):
    """Whole frames written through the batched compression read back, in a fresh reader,
    byte for byte; the store's check verifies every frame."""
    raw = _frames_input()
    w = store.begin_snapshot("frames", {})
    w.add_region(RegionSpec("r", 0, len(raw)))
    w.put_pages(0, 0, np.frombuffer(raw, np.uint8))
    w.commit()
    assert store.open_snapshot("frames").read(0, 0, len(raw)) == bytes(raw)
    assert store.check(verify_data=True)["ok"]
