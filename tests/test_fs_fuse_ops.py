"""The pyfuse3 adapter's request handling without a mount: errors become errnos, never crashes."""

from __future__ import annotations

import errno
import logging
import os

import pyfuse3
import pytest
import trio

from snapfs.errors import StoreCorrupt
from snapfs.fs import inodes
from snapfs.fs.fuse_ops import ROOT_TIMEOUT, STABLE_TIMEOUT, SnapfsOperations
from snapfs.fs.model import SnapshotFS
from snapfs.fs.openfile import WINDOW_MIN, OpenFile
from snapfs.store import Store
from snapfs.stream.vmstate import VmstateView
from tests.support.fs import process_snapshot


@pytest.fixture
def ops(store_dir):
    store = Store.open(store_dir)
    app = process_snapshot(store)
    yield SnapfsOperations(SnapshotFS(store)), app
    store.close()


async def test_lookup_getattr_read(ops):
    ops, app = ops
    snap = await ops.lookup(inodes.ROOT, b"app", None)
    assert snap.entry_timeout == ROOT_TIMEOUT
    rb = await ops.lookup(snap.st_ino, b"ramblocks", None)
    heap = await ops.lookup(rb.st_ino, b"heap", None)
    data = await ops.lookup(heap.st_ino, b"data", None)
    assert data.entry_timeout == STABLE_TIMEOUT and data.st_size == len(app[0].data)
    assert data.st_blksize == 1 << 20                  # cat and cp read 1 MiB at a time
    info = await ops.open(data.st_ino, os.O_RDONLY, None)
    assert info.keep_cache and not info.direct_io     # region data: the page cache serves re-reads
    vmstate = await ops.lookup(snap.st_ino, b"vmstate", None)
    vinfo = await ops.open(vmstate.st_ino, os.O_RDONLY, None)
    assert vinfo.direct_io and not vinfo.keep_cache   # a stream read once: straight to the reader
    await ops.release(vinfo.fh)
    got = b""
    while len(got) < data.st_size:  # sequential 128 KiB requests, as the kernel sends them
        got += await ops.read(info.fh, len(got), 128 * 1024)
    assert got == app[0].data
    await ops.release(info.fh)


async def test_errors_become_errnos(ops, monkeypatch, caplog):
    ops, _ = ops
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.lookup(inodes.ROOT, b"missing", None)
    assert exc.value.errno == errno.ENOENT
    snap = await ops.lookup(inodes.ROOT, b"app", None)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.open(snap.st_ino + inodes.SNAP_INFO, os.O_RDWR, None)
    assert exc.value.errno == errno.EROFS

    def corrupt(inode):
        raise StoreCorrupt("damaged frame in seg 1 at offset 0")

    def bug(inode):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(ops.fs, "getattr", corrupt)
    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.getattr(snap.st_ino, None)
    assert exc.value.errno == errno.EIO and "damaged frame" in caplog.text
    monkeypatch.setattr(ops.fs, "getattr", bug)
    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.getattr(snap.st_ino, None)
    assert exc.value.errno == errno.EIO
    assert "ZeroDivisionError" in caplog.text and "Traceback" in caplog.text


async def _read_like_the_kernel(ops, fh: int, size: int, chunk: int, in_flight: int) -> bytes:
    """Sequential requests sent ahead of the reader, ``in_flight`` at a time, answered in any
    order (the kernel's read-ahead), served with the daemon's nursery for background windows."""
    got: dict[int, bytes] = {}
    slots = trio.Semaphore(in_flight)

    async def one(off: int) -> None:
        try:
            got[off] = bytes(await ops.read(fh, off, chunk))
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        ops.nursery = nursery
        for off in range(0, size, chunk):
            await slots.acquire()
            nursery.start_soon(one, off)
    ops.nursery = None
    return b"".join(got[off] for off in sorted(got))


@pytest.mark.parametrize("path", ["ramblocks/anon-7f0000008000/data", "vmstate"])
async def test_concurrent_sequential_requests_share_windows(ops, monkeypatch, path):
    ops, app = ops
    fetched: list[int] = []
    fetch = OpenFile.fetch

    def counting(self, off, size):
        fetched.append(size)
        return fetch(self, off, size)

    monkeypatch.setattr(OpenFile, "fetch", counting)
    inode = ops.fs.resolve(f"app/{path}")
    size = ops.fs.getattr(inode).size
    if path == "vmstate":
        expect = VmstateView(ops.fs.store.open_snapshot("app")).read(0, size)
    else:
        expect = app[2].data
    info = await ops.open(inode, os.O_RDONLY, None)
    chunk = 128 * 1024
    assert await _read_like_the_kernel(ops, info.fh, size, chunk, in_flight=6) == expect
    assert len(fetched) < -(-size // chunk) / 2  # windows shared by requests, not one each
    assert max(fetched) >= WINDOW_MIN
    await ops.release(info.fh)
    assert ops.fs.window_budget.used == 0  # every window given back
    # One request at a time (no read-ahead): the same bytes.
    info = await ops.open(inode, os.O_RDONLY, None)
    assert await _read_like_the_kernel(ops, info.fh, size, chunk, in_flight=1) == expect
    await ops.release(info.fh)
