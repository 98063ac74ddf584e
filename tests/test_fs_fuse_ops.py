"""The pyfuse3 adapter's request handling without a mount: errors become errnos, never crashes."""

from __future__ import annotations

import errno
import logging
import os

import pyfuse3
import pytest

from snapfs.errors import StoreCorrupt
from snapfs.fs import inodes
from snapfs.fs.fuse_ops import ROOT_TIMEOUT, STABLE_TIMEOUT, SnapfsOperations
from snapfs.fs.model import SnapshotFS
from snapfs.store import Store
from tests.test_fs_support import process_snapshot


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
    info = await ops.open(data.st_ino, os.O_RDONLY, None)
    assert info.keep_cache and not info.direct_io
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
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.mkdir(snap.st_ino, b"x", 0o755, None)
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
