"""Durability and file helpers: atomic small files, directory fsync, full writes, hole punching."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from snapfs import native
from snapfs.errors import StoreError

_lib = native.load("snapfs.store._native").lib  # fallocate, sync_file_range: 0 or -errno
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
WRITEBACK_STEP = 32 << 20          # write back appended data in 32 MiB ranges
WRITE_CALL_BYTES = 256 << 10      # bytes per write syscall at most (see pwritev_all)
PREALLOC_STEP = 32 << 20           # preallocate appended files this far ahead
IOV_MAX = 1024

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


def preallocate(fd: int, offset: int, length: int) -> None:
    """Reserve blocks for [offset, offset+length) past EOF without changing the size (best effort).

    Appending into preallocated blocks skips the filesystem's per-write block allocation
    (ext4: ~5 instead of ~2 GB/s here). Failures are ignored: the write itself reports them.
    A later ftruncate to the written size gives the unused blocks back.
    """
    _lib.snapfs_fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)


def pwritev_all(fd: int, buffers: list[bytes | memoryview], offset: int) -> None:
    """Write ``buffers`` back to back at ``offset`` with few pwritev calls (handles short writes).

    At most WRITE_CALL_BYTES per call: the kernel copies a write into the page cache with no
    preemption point, and on a PREEMPT_NONE kernel a 3 MB write kept a CPU for ~2 ms while a
    thread of a snapshotted process, woken there, waited.
    """
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        batch, size = [], 0
        for v in views[:IOV_MAX]:
            if batch and size + len(v) > WRITE_CALL_BYTES:
                break
            batch.append(v)
            size += len(v)
        n = os.pwritev(fd, batch, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


class Writeback:
    """Writes appended file data back to disk in the background while more is being appended.

    Durability still comes from the caller's final fsync; this only leaves it little to do
    (a 500 MB segment otherwise costs its whole writeback at commit). One short-lived thread
    runs while there is work: sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER) over each range
    of at least WRITEBACK_STEP bytes that a caller reports as written. Errors are kept and
    returned by :meth:`close`: once reported here, the kernel would not report them to fsync.
    """

    def __init__(self, step: int = WRITEBACK_STEP) -> None:
        self._step = step
        self._cond = threading.Condition()
        self._flushed: dict[int, int] = {}      # fd -> bytes from 0 written back (or queued)
        self._todo: list[tuple[int, int, int]] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.error: OSError | None = None

    def written(self, fd: int, end: int) -> None:
        """Bytes [0, end) of ``fd`` are (about to be) complete: write them back if enough accrued."""
        with self._cond:
            start = self._flushed.get(fd, 0)
            if self._closed or end - start < self._step:
                return
            self._flushed[fd] = end
            self._todo.append((fd, start, end - start))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="snapfs-writeback", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
        while True:
            with self._cond:
                if not self._todo:
                    self._thread = None          # exit when idle: no thread outlives the work
                    self._cond.notify_all()
                    return
                fd, start, length = self._todo.pop(0)
            err = -_lib.snapfs_sync_file_range(fd, start, length, flags)
            if err:
                with self._cond:
                    if self.error is None and err not in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE):
                        self.error = OSError(err, os.strerror(err))

    def close(self) -> OSError | None:
        """Stop taking work, wait for the running writeback; return the first error, if any."""
        with self._cond:
            self._closed = True
            self._todo.clear()
            while self._thread is not None:
                self._cond.wait()
            return self.error


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the blocks of [offset, offset+length) keeping the file size; False if unsupported."""
    err = -_lib.snapfs_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    if err:
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
