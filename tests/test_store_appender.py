"""Segment appends: O_DIRECT through staged blocks (or buffered), exact bytes, errors surface."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from snapfs.store import RegionSpec, Store
from snapfs.store import writer as writer_mod
from snapfs.store._appender import BUFFER_BYTES, Appender
from snapfs.store._fsutil import Writeback


def _pieces(rng: np.random.Generator) -> list[bytes]:
    """Buffers of awkward sizes: tiny, unaligned, one larger than a staging buffer."""
    sizes = [32, 1, 4095, 4097, 131_000, BUFFER_BYTES + 12_345, 7, 65_536, 300_001]
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


@pytest.mark.parametrize("direct", [True, False])
def test_appended_bytes_read_back_exactly(tmp_path, direct):
    rng = np.random.default_rng(7)
    path = tmp_path / "seg"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    wb = Writeback()
    try:
        app = Appender(fd, wb, direct=direct)
        assert app.direct is direct          # the store's filesystem (ext4/tmpfs) takes O_DIRECT
        pieces = _pieces(rng)
        for i in range(0, len(pieces), 2):
            app.append(app.end, pieces[i:i + 2])
        expected = b"".join(pieces)
        assert app.end == len(expected)
        app.finish()
        os.ftruncate(fd, app.end)            # what the writer's commit does
    finally:
        wb.close()
        os.close(fd)
    assert path.read_bytes() == expected


def test_append_must_continue_at_the_end(tmp_path):
    fd = os.open(tmp_path / "seg", os.O_RDWR | os.O_CREAT, 0o600)
    app = Appender(fd, Writeback())
    try:
        app.append(0, [b"x" * 100])
        with pytest.raises(ValueError, match="expected 100"):
            app.append(50, [b"y"])
    finally:
        app.close()
        os.close(fd)


def test_a_failed_background_write_is_raised(tmp_path):
    """The I/O thread's error reaches the appending thread (here: an fd opened read-only)."""
    path = tmp_path / "seg"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    app = Appender(fd, Writeback())
    try:
        with pytest.raises(OSError):
            for _ in range(8):                      # enough to hand buffers to the thread
                app.append(app.end, [bytes(BUFFER_BYTES)])
            app.finish()
    finally:
        app.close()
        os.close(fd)


def test_full_segments_rotate_and_read_back(tmp_path, monkeypatch):
    """A lane whose segment is full finishes it (its staged tail written) and opens another."""
    monkeypatch.setattr(writer_mod, "SEGMENT_MAX_BYTES", 3 << 20)
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 256, (4096, 4096), dtype=np.uint8)     # 16 MiB, incompressible
    store = Store.open(tmp_path / "store", create=True)
    try:
        w = store.begin_snapshot("s", {})
        idx = w.add_region(RegionSpec("heap", 0, len(pages) * 4096, kind="heap"))
        for first in range(0, len(pages), 512):
            w.put_pages(idx, first, pages[first:first + 512])
        w.commit()
        assert len(list((tmp_path / "store" / "segments").iterdir())) >= 5
        with store.open_snapshot("s") as r:
            assert r.read(0, 0, len(pages) * 4096) == pages.tobytes()
        assert store.check(verify_data=True)["problems"] == []
    finally:
        store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a ramfs")
def test_a_store_on_a_filesystem_without_o_direct(tmp_path):
    """ramfs refuses O_DIRECT: segments are then written through the page cache, same bytes."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        fd = os.open(mnt / "probe", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            assert not Appender(fd, Writeback()).direct
        finally:
            os.close(fd)
        pages = np.random.default_rng(5).integers(0, 256, (1024, 4096), dtype=np.uint8)
        pages[::3] = 0
        with Store.open(mnt / "store", create=True) as store:
            w = store.begin_snapshot("s", {})
            idx = w.add_region(RegionSpec("heap", 0, len(pages) * 4096, kind="heap"))
            for first in range(0, len(pages), 256):
                w.put_pages(idx, first, pages[first:first + 256])
            w.commit()
            with store.open_snapshot("s") as r:
                assert r.read(0, 0, len(pages) * 4096) == pages.tobytes()
            assert store.check(verify_data=True)["problems"] == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
