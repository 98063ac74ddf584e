"""Disk full and corruption: clear errors, nothing half-published, damage located."""

from __future__ import annotations

import os
import sqlite3
import subprocess

import numpy as np
import pytest

from snapfs.errors import StoreCorrupt, StoreError
from snapfs.store import RegionSpec, Store
from snapfs.store._format import FRAME_HEADER
from tests.support.synthetic import expected_image, write_synthetic

PAGE = 4096


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs, always unmounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_aborts_cleanly(small_fs):
    store = Store.open(small_fs / "store")
    write_synthetic(store, "early", 3, [1000])
    early = store.open_snapshot("early").read(0, 0, 1000 * PAGE)
    rng = np.random.default_rng(0)
    w = store.begin_snapshot("huge", {})
    idx = w.add_region(RegionSpec("anon", 0, 16384 * PAGE))   # 64 MiB of incompressible pages
    with pytest.raises(StoreError, match=rf"store {small_fs / 'store'} is out of disk space.*free space"):
        for p in range(0, 16384, 256):
            w.put_pages(idx, p, rng.integers(0, 256, size=256 * PAGE, dtype=np.uint8))
    with pytest.raises(StoreError, match="out of disk space"):
        w.commit()     # refused: the writer is failed; commit aborts it
    assert [s.name for s in store.list_snapshots()] == ["early"]
    assert store.open_snapshot("early").read(0, 0, 1000 * PAGE) == early == expected_image(3, 0, 1000)
    store.gc()
    report = store.check(verify_data=True)
    assert report["ok"] and report["garbage"]["orphan_segment_files"] == []
    # Space is back: a new snapshot fits again.
    write_synthetic(store, "after", 4, [1000])
    assert store.check(verify_data=True)["ok"]
    store.close()


def _frame_offsets(store, name):
    r = store.open_snapshot(name)
    rows = store.query("SELECT seg, off, flen FROM frames WHERE owner=? ORDER BY seg, off", (r.info.id,))
    return r, rows


def test_flipped_byte_in_frame_is_reported_and_reads_fail_cleanly(store_dir):
    store = Store.open(store_dir)
    write_synthetic(store, "good", 1, [800])
    write_synthetic(store, "bad", 2, [800])
    r, rows = _frame_offsets(store, "bad")
    seg, off, flen = rows[5]
    path = store.segments.path(seg)
    with open(path, "r+b") as f:
        f.seek(off + FRAME_HEADER.size + flen // 3)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    assert store.check()["ok"]          # the catalog alone is fine
    report = store.check(verify_data=True)
    assert not report["ok"]
    (prob,) = report["problems"]
    assert prob["segment"] == str(path) and prob["offset"] == off
    assert prob["snapshots"] == ["bad"] and prob["regions"] == ["bad:region0"]
    assert "checksum" in prob["message"]
    # Find the damaged page range through the map, read it -> StoreCorrupt; elsewhere fine.
    runs = r._map(0)
    hit = runs[(runs["seg"] == seg) & (runs["off"] == off)][0]
    exp = expected_image(2, 0, 800)
    with pytest.raises(StoreCorrupt, match=rf"damaged frame in {path} at offset {off}.*'bad'"):
        r.read(0, int(hit["page"]) * PAGE, PAGE)
    other = int(runs[(runs["kind"] == 2) & (runs["off"] != off)][0]["page"]) * PAGE
    assert r.read(0, other, PAGE) == exp[other:other + PAGE]
    assert store.open_snapshot("good").read(0, 0, 800 * PAGE) == expected_image(1, 0, 800)
    store.close()


def test_truncated_segment_is_reported(store_dir):
    store = Store.open(store_dir)
    write_synthetic(store, "good", 1, [800])
    write_synthetic(store, "cut", 2, [800])
    r, rows = _frame_offsets(store, "cut")
    seg = rows[0]["seg"]
    cut_at = rows[len(rows) // 2]["off"] + 10
    os.truncate(store.segments.path(seg), cut_at)
    report = store.check()
    assert not report["ok"]
    lost = [p for p in report["problems"] if "truncated" in p["message"]]
    assert len(lost) == len(rows) - len(rows) // 2
    assert all(p["snapshots"] == ["cut"] for p in lost)
    with pytest.raises(StoreCorrupt):
        r.read(0, 0, 800 * PAGE)
    assert store.open_snapshot("good").read(0, 0, 800 * PAGE) == expected_image(1, 0, 800)
    os.unlink(store.segments.path(seg))
    report = store.check()
    assert any("missing" in p["message"] for p in report["problems"])
    store.close()


def test_damaged_catalog(store_dir):
    store = Store.open(store_dir)
    write_synthetic(store, "a", 1, [300])
    write_synthetic(store, "b", 2, [300])
    store.close()
    # A damaged page map blob: check names the snapshot, reading it fails cleanly.
    conn = sqlite3.connect(store_dir / "catalog.sqlite")
    conn.execute("UPDATE regions SET map = x'00112233' WHERE snapshot_id = (SELECT id FROM snapshots WHERE name='b')")
    conn.commit()
    conn.close()
    store = Store.open(store_dir)
    report = store.check()
    assert [p["snapshots"] for p in report["problems"]] == [["b"]]
    with pytest.raises(StoreCorrupt, match="page map is damaged"):
        store.open_snapshot("b").read(0, 0, PAGE)
    with pytest.raises(StoreCorrupt, match="gc reclaims nothing"):
        store.gc()
    assert store.open_snapshot("a").read(0, 0, 300 * PAGE) == expected_image(1, 0, 300)
    store.close()
    # Garbage over the database header: open raises StoreCorrupt with a one-line message.
    with open(store_dir / "catalog.sqlite", "r+b") as f:
        f.write(b"\xde\xad" * 50)
    for name in ("catalog.sqlite-wal", "catalog.sqlite-shm"):
        if (store_dir / name).exists():
            os.unlink(store_dir / name)
    with pytest.raises(StoreCorrupt, match="catalog .* is damaged"):
        Store.open(store_dir)


def test_catalog_inconsistencies_are_reported(store_dir):
    store = Store.open(store_dir)
    write_synthetic(store, "a", 1, [300])
    write_synthetic(store, "b", 2, [300], version=1, parent=None)
    assert store.check(verify_data=True)["ok"]
    b_id = store.info("b").id
    seg, off = store.query("SELECT seg, off FROM frames WHERE owner=? LIMIT 1", (b_id,))[0]
    with store.transaction() as conn:
        conn.execute("DELETE FROM frames WHERE seg=? AND off=?", (seg, off))
        conn.execute("DELETE FROM seg_refs WHERE snapshot_id=?", (b_id,))
    report = store.check()
    messages = [p["message"] for p in report["problems"]]
    assert not report["ok"]
    assert any("missing from its references" in m for m in messages)
    assert any(f"@{off} is referenced but missing" in m for m in messages)
    assert all(p["snapshots"] == ["b"] for p in report["problems"])
    # gc trusts the maps, not the damaged references: b's data stays.
    store.gc()
    assert store.open_snapshot("b").read(0, 0, 300 * PAGE) == expected_image(2, 0, 300, version=1)
    store.close()


def test_commit_trims_segment_preallocation(store_dir):
    """Segments are preallocated ahead of the writes; a committed segment holds no more disk
    than its size (plus one block of rounding), and the data reads back."""
    store = Store.open(store_dir)
    write_synthetic(store, "big", 5, [20000])   # ~78 MiB of pages: several preallocation steps
    for seg in (store_dir / "segments").iterdir():
        st = seg.stat()
        assert st.st_blocks * 512 <= st.st_size + 4096, (seg, st.st_blocks * 512, st.st_size)
    got = store.open_snapshot("big").read(0, 0, 20000 * PAGE)
    assert got == expected_image(5, 0, 20000)
    store.close()
