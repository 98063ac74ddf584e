"""Durability and file helpers: atomic small files, directory fsync, full writes, hole punching."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from cffi import FFI

from snapfs.errors import StoreError

_ffi = FFI()
_ffi.cdef("int fallocate(int fd, int mode, long offset, long len);")
_libc = _ffi.dlopen(None)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(path: Path) -> None:
    """fsync a directory so entries created/renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 0600) via tmp file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """os.pwrite until every byte is written (short writes happen near ENOSPC)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[n:]
        offset += n


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the blocks of [offset, offset+length) keeping the file size; False if unsupported."""
    rc = _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    if rc != 0:
        err = _ffi.errno
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise OSError(err, os.strerror(err))
    return True


def disk_full_error(store: Path, exc: BaseException) -> StoreError:
    """The StoreError a writer raises when the store's filesystem is full."""
    return StoreError(f"store {store} is out of disk space ({exc}): free space or use another --store")


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT OSErrors and SQLite's 'database or disk is full'."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL
    return "disk is full" in str(exc) or "database or disk is full" in str(exc)
