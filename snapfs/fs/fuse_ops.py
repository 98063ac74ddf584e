"""The pyfuse3 adapter: translates FUSE requests into :class:`SnapshotFS` calls. Thin on purpose.

* Every handler is wrapped: :class:`FsError` becomes its errno, a store error such as a corrupt
  frame EIO (logged on one line), anything unexpected EIO with a logged traceback. pyfuse3 tears the
  mount down on any other exception, so none escapes.
* Model calls that may block (opening a snapshot's index, decompression) run in worker threads;
  the trio thread only moves bytes. Sequential readers get windows prefetched in the background.
* Read-only: the mount is ``ro`` (``mount.fuse_options`` drops ``rw``), so the kernel answers
  EROFS to every modifying call before it reaches us; ``open`` for writing is refused too (a
  ``remount,rw`` by hand), and pyfuse3's defaults answer ENOSYS to the rest.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import threading
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3
import trio

from snapfs.errors import SnapfsError, SnapshotNotFound
from snapfs.fs import inodes
from snapfs.fs.model import Attr, FsError, SnapshotFS
from snapfs.fs.openfile import OpenFile

log = logging.getLogger(__name__)

# Snapshot contents never change: let the kernel cache names and attributes for long. The root
# changes as snapshots come and go: short timeouts there, plus explicit invalidation.
STABLE_TIMEOUT = 3600.0
ROOT_TIMEOUT = 1.0
# st_blksize: cat, cp and Python's open() size their reads by it (cat: 128 KiB at least). A
# 1 MiB read is one FUSE request (max_pages 256), where 128 KiB made eight: with vmstate read
# past the page cache, `cat vmstate` went from 540-630 to 720-905 MB/s cold.
IO_BLOCK = 1 << 20

T = TypeVar("T")


def _fuse_handler(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Map every failure of a handler to an errno; never let one end the mount."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> T:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except SnapshotNotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except (SnapfsError, OSError) as exc:  # StoreCorrupt, a segment removed by gc...: one line
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class _WindowJob:
    """A window being fetched: ``done`` is set when ``data`` is there (None: it failed)."""

    __slots__ = ("done", "data")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | memoryview | None = None


class SnapfsOperations(pyfuse3.Operations):
    """pyfuse3 operations over a :class:`SnapshotFS`.

    ``initialized`` is set once the kernel's INIT has been answered (the mount is usable).
    ``nursery`` (set by the daemon before serving) runs background prefetches; without one,
    reads are still correct, just not pipelined.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, fs: SnapshotFS, *, threads: int | None = None) -> None:
        super().__init__()
        self.fs = fs
        self.nursery: trio.Nursery | None = None
        self.initialized = trio.Event()
        # One worker per core: reads are CPU-bound (decompression, copies) and the kernel keeps
        # several requests in flight; more workers than cores only fight over the GIL (measured:
        # about 30% of the daemon's CPU went to futex hand-offs with 2 workers per core).
        self._limiter = trio.CapacityLimiter(threads or max(2, os.cpu_count() or 1))
        self._files: dict[int, OpenFile] = {}
        self._jobs: dict[tuple[int, int], _WindowJob] = {}  # (fh, window offset): running
        self._fh = itertools.count(1)
        self._invalidate_lock = threading.Lock()
        fs.on_removed = self._invalidate_removed

    def init(self) -> None:
        """The kernel's INIT is being answered: tasks woken by ``initialized`` run after the reply."""
        self.initialized.set()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _invalidate_removed(self, removed: list[tuple[str, int]]) -> None:
        # Called from worker threads; pyfuse3 starts its notify thread unguarded on first use.
        with self._invalidate_lock:
            self._invalidate(removed)

    def _invalidate(self, removed: list[tuple[str, int]]) -> None:
        for name, _inode in removed:
            try:
                # A plain invalidation (not a delete notification, which the kernel refuses with
                # ENOTEMPTY for a directory whose children it still caches).
                pyfuse3.invalidate_entry_async(inodes.ROOT, os.fsencode(name), ignore_enoent=True)
            except Exception:  # not mounted (tests), or the notify thread is gone
                log.debug("invalidate %s failed", name, exc_info=True)

    # -- attributes and names --------------------------------------------------------------
    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.inode
        e.generation = 0
        # The root and its entries change as snapshots come and go; nothing below them does.
        changing = attr.inode == inodes.ROOT or inodes.unpack(attr.inode)[1] == inodes.SNAP_DIR
        e.entry_timeout = e.attr_timeout = ROOT_TIMEOUT if changing else STABLE_TIMEOUT
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = 0
        e.st_size = attr.size
        e.st_blksize = IO_BLOCK
        e.st_blocks = attr.blocks
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = attr.mtime_ns
        return e

    @_fuse_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run(self.fs.lookup, parent_inode, os.fsdecode(name)))

    @_fuse_handler
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run(self.fs.getattr, inode))

    @_fuse_handler
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode == inodes.ROOT:
            await self._run(self.fs.refresh)
        attr = await self._run(self.fs.getattr, inode)
        if not attr.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_fuse_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        after = start_id
        while True:
            entries = await self._run(self.fs.readdir, fh, after)
            for entry in entries:
                if not pyfuse3.readdir_reply(token, os.fsencode(entry.name), self._entry(entry.attr),
                                             entry.cursor):
                    return
                after = entry.cursor
            if not entries:
                return

    @_fuse_handler
    async def releasedir(self, fh: int) -> None:
        return None

    @_fuse_handler
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        figures = await self._run(self.fs.statfs)
        data = pyfuse3.StatvfsData()
        for key, value in figures.items():
            setattr(data, key, value)
        return data

    # -- files -----------------------------------------------------------------------------
    @_fuse_handler
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        of = await self._run(self.fs.open, inode)
        fh = next(self._fh)
        self._files[fh] = of
        # Immutable files: the kernel page cache survives across opens (warm reads never reach
        # us). Views whose size may change bypass it, and so do streams (vmstate): read once,
        # they gain nothing from the cache, and filling it cost more than the decompression.
        direct = of.streamed or not of.immutable
        return pyfuse3.FileInfo(fh=fh, keep_cache=not direct, direct_io=direct)

    @_fuse_handler
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        of = self._files.get(fh)
        if of is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        of.note(off, size)
        size = min(size, of.size - off)
        if size <= 0:
            return b""
        data = of.cached(off, size)
        if data is None:
            window = of.inflight_covering(off)
            job = None if window is None else self._jobs.get((fh, window[0]))
            if window is None:
                start, length = of.plan(off, size)
                if length > size:  # a sequential reader: one job for this and the next requests
                    window = (start, length)
                    job = self._start_window(fh, of, window)
                    if self.nursery is None:  # no daemon nursery (tests): fetch it right here
                        await self._fetch_window(fh, of, window, job)
            self._start_prefetches(fh, of)
            if job is not None:
                await job.done.wait()
                if job.data is not None:  # served from the job's result even if not kept
                    data = of.part(job.data, window[0], off, size)
            if data is None:
                data = of.cached(off, size)
        if data is None:  # random reads (and a failed window: its error is reported here)
            data = await self._run(of.fetch, off, size)
        return data

    def _start_window(self, fh: int, of: OpenFile, window: tuple[int, int]) -> _WindowJob:
        """Fetch ``window`` in a worker thread (in the daemon's nursery: without one, the caller
        runs :meth:`_fetch_window`); requests inside it wait for the job returned."""
        job = self._jobs[(fh, window[0])] = _WindowJob()
        of.begin_window(window)
        if self.nursery is not None:
            self.nursery.start_soon(self._fetch_window, fh, of, window, job)
        return job

    def _start_prefetches(self, fh: int, of: OpenFile) -> None:
        if self.nursery is None:
            return
        while (window := of.next_prefetch()) is not None:
            self._start_window(fh, of, window)

    async def _fetch_window(self, fh: int, of: OpenFile, window: tuple[int, int], job: _WindowJob) -> None:
        try:
            job.data = await self._run(of.fetch, *window)
        except trio.Cancelled:
            raise
        except Exception as exc:  # the requests waiting fall back to exact reads, which report it
            log.debug("window %r of fh %d failed: %s", window, fh, exc)
        finally:
            of.end_window(window)
            del self._jobs[(fh, window[0])]
            job.done.set()
        if job.data is not None:
            of.install(window[0], job.data, keep=True)
            self._start_prefetches(fh, of)

    @_fuse_handler
    async def release(self, fh: int) -> None:
        of = self._files.pop(fh, None)
        if of is not None:
            of.close()

    @_fuse_handler
    async def flush(self, fh: int) -> None:
        return None

    @_fuse_handler
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

