"""Incremental snapshots: content comparison against the parent, inherit, parent removal."""

from __future__ import annotations

import numpy as np
import pytest

from snapfs.errors import StoreError
from snapfs.store import RegionSpec
from tests.support.synthetic import expected_image, write_synthetic

PAGE = 4096


def _incremental_one_percent(store, npages):
    full0 = write_synthetic(store, "v0", 11, [npages], threads=2)
    child = write_synthetic(store, "v1", 11, [npages], version=1, parent="v0", threads=2)
    full1 = write_synthetic(store, "v1-full", 11, [npages], version=1, threads=2)
    exp = expected_image(11, 0, npages, version=1)
    for name in ("v1", "v1-full"):
        assert store.open_snapshot(name).read(0, 0, npages * PAGE) == exp
    # 1% of the DATA pages changed, with fresh random (incompressible) content.
    assert child.parent == "v0"
    assert child.stored_bytes <= 0.03 * full1.stored_bytes + 64 * PAGE
    assert child.stored_bytes >= 0.005 * full1.stored_bytes
    assert child.shared_bytes >= 0.9 * full0.stored_bytes
    assert child.resident_bytes == full1.resident_bytes


def test_content_comparison_stores_only_changed_pages(store):
    _incremental_one_percent(store, 16384)      # 64 MiB


@pytest.mark.slow
def test_content_comparison_one_gib(store):
    _incremental_one_percent(store, 262144)


def test_chain_and_removing_parents_keeps_children_readable(store):
    n = 3000
    write_synthetic(store, "c0", 4, [n, 40])
    write_synthetic(store, "c1", 4, [n, 40], version=1, parent="c0")
    write_synthetic(store, "c2", 4, [n, 40], version=2, parent="c1")
    before = store.check(verify_data=True)
    assert before["ok"], before
    store.remove(["c0", "c1"])
    store.gc()
    r = store.open_snapshot("c2")
    # The chain now ends at c2; it says which ancestors were removed.
    assert (r.info.parent, r.info.removed_parents) == (None, ["c1", "c0"])
    for i, pages in enumerate((n, 40)):
        assert r.read(i, 0, pages * PAGE) == expected_image(4, i, pages, version=2)
    after = store.check(verify_data=True)
    assert after["ok"], after
    assert after["garbage"]["unreferenced_frames"] == 0
    # A grandchild still compares against c2's stored hashes.
    c3 = write_synthetic(store, "c3", 4, [n, 40], version=2, parent="c2")
    assert c3.stored_bytes < 4 * PAGE
    assert store.open_snapshot("c3").read(0, 0, n * PAGE) == expected_image(4, 0, n, version=2)


def test_inherit_references_parent_without_content(store):
    n = 1000
    img = np.random.default_rng(9).integers(0, 3, size=(n, PAGE), dtype=np.uint8)
    img[100:200] = 0
    w = store.begin_snapshot("base", {})
    idx = w.add_region(RegionSpec("heap", 0x1000, (n + 50) * PAGE, kind="heap"))
    w.put_pages(idx, 0, img.tobytes())
    w.commit()
    # The tracked child: pages 500..509 were written, the rest is unchanged.
    img2 = img.copy()
    img2[500:510] = 0x5A
    w = store.begin_snapshot("tracked", {}, parent="base")
    idx = w.add_region(RegionSpec("heap", 0x1000, (n + 50) * PAGE, kind="heap"))
    w.inherit(idx, 0, 500)
    w.put_pages(idx, 500, img2[500:510].tobytes())
    w.inherit(idx, 510, n + 50 - 510)
    other = w.add_region(RegionSpec("new", 0x900000, 4 * PAGE))
    with pytest.raises(StoreError, match="no counterpart"):
        w.inherit(other, 0, 4)
    info = w.commit()
    assert info.stored_bytes < 2 * PAGE
    r = store.open_snapshot("tracked")
    assert r.read(0, 0, (n + 50) * PAGE) == img2.tobytes() + bytes(50 * PAGE)
    assert list(r.runs(0)) == list(store.open_snapshot("base").runs(0))
    # A content-compared grandchild of the tracked snapshot finds its inherited hashes.
    w = store.begin_snapshot("compared", {}, parent="tracked")
    idx = w.add_region(RegionSpec("heap", 0x1000, (n + 50) * PAGE, kind="heap"))
    w.put_pages(idx, 0, img2.tobytes())
    assert w.commit().stored_bytes == 0


def test_parent_in_use_by_live_writer_cannot_be_removed(store):
    write_synthetic(store, "p", 1, [100])
    w = store.begin_snapshot("child", {}, parent="p")
    with pytest.raises(StoreError, match="parent of capture 'child'"):
        store.remove(["p"])
    w.abort()
    store.remove(["p"])
    assert store.list_snapshots() == []


def test_gc_punches_dead_frames_and_deletes_dead_segments(store):
    keep = np.random.default_rng(1).integers(0, 256, size=(64, PAGE), dtype=np.uint8)
    churn = np.random.default_rng(2).integers(0, 256, size=(256, PAGE), dtype=np.uint8)
    w = store.begin_snapshot("old", {})
    k = w.add_region(RegionSpec("keep", 0, 64 * PAGE))
    c = w.add_region(RegionSpec("churn", 1 << 30, 256 * PAGE))
    w.put_pages(k, 0, keep.tobytes())
    w.put_pages(c, 0, churn.tobytes())
    w.commit()
    (seg_file,) = store.segments.directory.iterdir()
    w = store.begin_snapshot("new", {}, parent="old")
    k = w.add_region(RegionSpec("keep", 0, 64 * PAGE))
    c = w.add_region(RegionSpec("churn", 1 << 30, 256 * PAGE))
    w.inherit(k, 0, 64)
    w.put_pages(c, 0, (churn ^ 0xFF).tobytes())
    w.commit()
    blocks_before = seg_file.stat().st_blocks
    assert store.gc()["bytes_reclaimed"] == 0       # everything still referenced
    store.remove(["old"])
    result = store.gc()
    assert result["frames_freed"] == 8 and result["bytes_reclaimed"] >= 256 * PAGE
    assert seg_file.exists() and seg_file.stat().st_blocks <= blocks_before - 256 * PAGE // 512 + 8 * 16  # partial edge blocks stay
    r = store.open_snapshot("new")
    assert r.read(0, 0, 64 * PAGE) == keep.tobytes()
    assert r.read(1, 0, 256 * PAGE) == (churn ^ 0xFF).tobytes()
    assert store.check(verify_data=True)["ok"]
    store.remove(["new"])
    result = store.gc()
    assert result["segments_deleted"] == 2 and list(store.segments.directory.iterdir()) == []
    final = store.check(verify_data=True)
    assert final["ok"] and final["frames"] == 0 and final["snapshots"] == 0


def test_page_hash_fallback_and_algorithm_mismatch(store, monkeypatch):
    from snapfs.store import _pagehash, writer
    img = np.random.default_rng(5).integers(0, 256, size=(64, PAGE), dtype=np.uint8)
    img[10] = img[20]
    view = memoryview(img).cast("B")
    fast = _pagehash.page_hashes(view, np.arange(64))
    monkeypatch.setattr(_pagehash, "_xxh3", None)
    slow = _pagehash.page_hashes(view, np.arange(64))
    for h in (fast, slow):
        assert h[10] == h[20] and len(set(h.tolist())) == 63 and np.all(h & np.uint64(1))
    monkeypatch.undo()
    w = store.begin_snapshot("a", {})
    w.add_region(RegionSpec("r", 0, 64 * PAGE))
    w.put_pages(0, 0, img)
    full = w.commit()
    # A writer hashing another way must not match anything: it stores every page.
    monkeypatch.setattr(writer, "ALGO", "other-64")
    w = store.begin_snapshot("b", {}, parent="a")
    w.add_region(RegionSpec("r", 0, 64 * PAGE))
    w.put_pages(0, 0, img)
    child = w.commit()
    assert child.stored_bytes == full.stored_bytes and child.shared_bytes == 0
    assert store.open_snapshot("b").read(0, 0, 64 * PAGE) == img.tobytes()


def test_page_hashes_are_xxh3_of_each_page(monkeypatch):
    """Stored hashes of snapshots written by any snapfs version are compared with each other:
    known XXH3-64 values (low bit set), the same for a page whichever call hashes it."""
    from snapfs.store import _pagehash
    if not _pagehash._xxh3:
        pytest.skip("no libxxhash on this system")
    img = np.random.default_rng(9).integers(0, 256, size=(300, PAGE), dtype=np.uint8)
    img[7] = 0
    img[8] = np.tile(np.arange(256, dtype=np.uint8), 16)
    view = memoryview(img).cast("B")
    pages = np.array([0, 7, 8, 150, 151, 299] + list(range(20, 60)))
    hashes = _pagehash.page_hashes(view, pages)
    assert hashes[1] == 0x93D76FE148C689BB and hashes[2] == 0xEB4B7C3707879151
    assert hashes.tolist() == [_pagehash.page_hash_list(view, [int(p)])[0] for p in pages]
    assert _pagehash.page_hash_list(view, pages.tolist()) == hashes.tolist()
    with pytest.raises(IndexError):
        _pagehash.page_hashes(view, np.array([300] * 20))


def test_inherit_ranges_equals_one_inherit_per_range(store):
    """The batched call gives the same child as one inherit() per range, in any order."""
    write_synthetic(store, "parent", 7, [3000])
    spec = store.open_snapshot("parent").regions[0]
    ranges = [(2000, 500), (0, 100), (150, 850), (2600, 400)]   # unsorted, gaps between
    for name, batched in (("one-by-one", False), ("batched", True)):
        w = store.begin_snapshot(name, {}, parent="parent")
        idx = w.add_region(RegionSpec(spec.name, spec.start, spec.length, spec.perms))
        if batched:
            w.inherit_ranges(idx, [f for f, _ in ranges], [n for _, n in ranges])
        else:
            for f, n in ranges:
                w.inherit(idx, f, n)
        w.commit()
    parent = store.open_snapshot("parent").read(0, 0, 3000 * PAGE)
    expected = bytearray(3000 * PAGE)
    for f, n in ranges:
        expected[f * PAGE:(f + n) * PAGE] = parent[f * PAGE:(f + n) * PAGE]
    reference = list(store.open_snapshot("one-by-one").runs(0))
    assert len(reference) > 1
    for name in ("one-by-one", "batched"):
        r = store.open_snapshot(name)
        assert r.read(0, 0, 3000 * PAGE) == bytes(expected)
        assert list(r.runs(0)) == reference


def test_tracked_child_batched_equals_per_range_calls(store):
    """put_scattered + inherit_ranges (one call each per region) give the same child as one
    put_pages per changed page and one inherit_ranges per range: same bytes, runs, stored
    and shared bytes, and hashes a grandchild can compare against."""
    from snapfs.store._runs import clip, clip_many

    n = 6000
    rng = np.random.default_rng(5)
    img = rng.integers(0, 3, size=(n, PAGE), dtype=np.uint8)
    img[::4] = 0
    w = store.begin_snapshot("base", {})
    idx = w.add_region(RegionSpec("heap", 0x10000, (n + 100) * PAGE, kind="heap"))
    w.put_pages(idx, 0, img.tobytes())
    w.commit()
    dirty = np.sort(rng.choice(n, 300, replace=False))
    dirty[:40] = np.arange(1000, 1040)            # a run long enough for whole frames
    dirty = np.unique(dirty)
    new = rng.integers(0, 255, size=(len(dirty), PAGE), dtype=np.uint8)
    new[::5] = 0                                   # zero pages: index entries only
    new[1::7] = img[dirty[1::7]]                   # same as the parent: shares its frame
    mask = np.ones(len(dirty), bool)
    mask[::11] = False                             # not stored: holes in the child
    expected = np.zeros((n + 100, PAGE), np.uint8)
    expected[:n] = img
    expected[dirty[mask]] = new[mask]
    expected[dirty[~mask]] = 0
    clean = np.ones(n + 100, bool)
    clean[dirty] = False
    clean[n:] = False                              # never populated: holes
    edges = np.flatnonzero(np.diff(np.r_[0, clean.astype(np.int8), 0]))
    firsts, lasts = edges[::2], edges[1::2]
    for name, batched in (("per-range", False), ("batched", True)):
        w = store.begin_snapshot(name, {}, parent="base")
        idx = w.add_region(RegionSpec("heap", 0x10000, (n + 100) * PAGE, kind="heap"))
        if batched:
            w.put_scattered(idx, dirty, new, mask)
            w.inherit_ranges(idx, firsts[::-1], (lasts - firsts)[::-1])  # any order
        else:
            for p, page, keep in zip(dirty.tolist(), new, mask.tolist()):
                if keep:
                    w.put_pages(idx, p, page.tobytes())
            for f, l in zip(firsts.tolist(), lasts.tolist()):
                w.inherit_ranges(idx, [f], [l - f])
        w.commit()
    a, b = store.info("per-range"), store.info("batched")
    assert (a.stored_bytes, a.shared_bytes, a.resident_bytes) == (b.stored_bytes, b.shared_bytes, b.resident_bytes)
    assert list(store.open_snapshot("batched").runs(0)) == list(store.open_snapshot("per-range").runs(0))
    for name in ("per-range", "batched"):
        assert store.open_snapshot(name).read(0, 0, (n + 100) * PAGE) == expected.tobytes()
        g = write_synthetic_like(store, name + "-again", name, expected)
        assert g.stored_bytes == 0                 # every page matched the parent's hashes
    assert store.check(verify_data=True)["ok"]
    # clip_many is clip for each range (runs wholly inside a range come first).
    runs = store.open_snapshot("base")._map(0)
    pieces = np.concatenate([clip(runs, f, l) for f, l in zip(firsts.tolist(), lasts.tolist())])
    many = clip_many(runs, firsts, lasts)
    assert (np.sort(many, order="page") == pieces).all()
    w = store.begin_snapshot("bad", {}, parent="base")
    idx = w.add_region(RegionSpec("heap", 0x10000, (n + 100) * PAGE, kind="heap"))
    with pytest.raises(ValueError, match="ascending"):
        w.put_scattered(idx, [5, 3], bytes(2 * PAGE))
    with pytest.raises(ValueError, match="disjoint"):
        w.inherit_ranges(idx, [10, 0], [5, 20])
    w.abort()


def write_synthetic_like(store, name: str, parent: str, image: np.ndarray):
    """A content-comparison child of ``parent`` holding ``image`` (one region)."""
    w = store.begin_snapshot(name, {}, parent=parent)
    idx = w.add_region(RegionSpec("heap", 0x10000, image.shape[0] * PAGE, kind="heap"))
    w.put_pages(idx, 0, image.tobytes())
    return w.commit()


def test_removing_a_parent_repoints_its_children(store):
    """After `rm PARENT` a child names its nearest remaining ancestor (and the removed ones)."""
    write_synthetic(store, "g", 4, [200])
    write_synthetic(store, "p", 4, [200], version=1, parent="g")
    write_synthetic(store, "c", 4, [200], version=2, parent="p")
    write_synthetic(store, "d", 4, [200], version=2, parent="p")
    store.remove("p")
    for name in ("c", "d"):
        info = store.info(name)
        assert (info.parent, info.removed_parents) == ("g", ["p"])
    assert store.info("g").removed_parents == []
    # The name is free again: a new 'p' is not mistaken for c's parent.
    write_synthetic(store, "p", 5, [200])
    store.remove("g")
    assert (store.info("c").parent, store.info("c").removed_parents) == (None, ["p", "g"])
    assert store.info("c").to_json()["removed_parents"] == ["p", "g"]
    assert store.open_snapshot("c").read(0, 0, 200 * PAGE) == expected_image(4, 0, 200, version=2)
    # A grandchild taken from c after all that names c only.
    write_synthetic(store, "e", 4, [200], version=2, parent="c")
    assert (store.info("e").parent, store.info("e").removed_parents) == ("c", [])
    assert store.check(verify_data=True)["ok"]
