"""Appending to one segment file: O_DIRECT writes of staged blocks, from a thread of its own.

Why not the page cache: a buffered append copies every byte into page-cache pages the kernel
must first allocate. On a VM that hands freed memory back to its host (virtio-balloon free
page reporting, as on this project's machines) those are fresh pages the host faults in one
by one: the ~500 MB of segments a captured GiB makes cost 0.16-0.86 CPU-s of buffered writes
(depending on how much free memory was still backed), then ~0.25 s of fsync at commit.
O_DIRECT writes of 1 MiB from reused buffers cost 0.06 CPU-s and leave fsync only the device
flush. They wait for the device, so they run in the appender's own thread: the compressing
thread only copies its frames into a staging buffer and goes on.

A segment is appended by one thread at a time (the writer's lanes) at increasing offsets. Full
1 MiB buffers go to the I/O thread; the partial last block stays staged until more arrives, or
until :meth:`Appender.finish` writes it padded with zeros (the writer's ftruncate to the real
size then drops the padding). Where O_DIRECT is refused (a filesystem without it, or an
alignment it does not accept) the appender writes through the page cache, with background
writeback, as it always did.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import threading

from snapfs.store._fsutil import Writeback, pwrite_all, pwritev_all

ALIGN = 4096                 # offset, length and address alignment of every direct write
BUFFER_BYTES = 1 << 20       # one direct write
BUFFERS = 4                  # staged + in flight per segment (bounds the memory)


class Appender:
    """Sequential writer of one segment file (one lane holds it at a time)."""

    def __init__(self, fd: int, writeback: Writeback, direct: bool = True) -> None:
        self.fd = fd
        self.end = 0                       # bytes appended so far (the file's logical size)
        self._writeback = writeback
        self._direct = direct and _set_direct(fd, True)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self._direct:
            self._free: queue.SimpleQueue = queue.SimpleQueue()
            for _ in range(BUFFERS - 1):
                self._free.put(mmap.mmap(-1, BUFFER_BYTES))
            self._todo: queue.SimpleQueue = queue.SimpleQueue()
            self._cur = mmap.mmap(-1, BUFFER_BYTES)
            self._cur_off = 0              # file offset of the current buffer's first byte
            self._fill = 0                 # bytes staged in it

    @property
    def direct(self) -> bool:
        """True while appends bypass the page cache."""
        return self._direct

    def append(self, offset: int, buffers: list) -> None:
        """Write ``buffers`` back to back at ``offset``, which must be the current end.
        Raises the error of an earlier background write (an OSError), if one failed."""
        if offset != self.end:
            raise ValueError(f"segment append at {offset}, expected {self.end}")
        self._raise_error()
        views = [memoryview(b).cast("B") for b in buffers]
        self.end += sum(len(v) for v in views)
        if not self._direct:
            pwritev_all(self.fd, views, offset)
            self._writeback.written(self.fd, self.end)
            return
        for v in views:
            while v:
                n = min(len(v), BUFFER_BYTES - self._fill)
                self._cur[self._fill:self._fill + n] = v[:n]
                self._fill += n
                v = v[n:]
                if self._fill == BUFFER_BYTES:
                    self._submit(BUFFER_BYTES)

    def finish(self) -> None:
        """Write everything still staged (the last block padded), wait for the I/O thread and
        raise its error, if any. Appending after this is an error."""
        if self._direct:
            if self._fill:
                padded = -(-self._fill // ALIGN) * ALIGN
                self._cur[self._fill:padded] = bytes(padded - self._fill)
                self._submit(padded)
        self.close()
        self._raise_error()

    def close(self) -> None:
        """Stop the I/O thread after the writes already handed to it (no more appends)."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None
        self._direct = False

    def _submit(self, nbytes: int) -> None:
        """Hand the first ``nbytes`` (whole blocks) of the current buffer to the I/O thread and
        continue in a free buffer with what is left staged."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="snapfs-segment-io", daemon=True)
            self._thread.start()
        nxt = self._free.get()             # waits while every buffer is in flight
        rest = self._fill - nbytes
        if rest > 0:
            nxt[:rest] = self._cur[nbytes:self._fill]
        self._todo.put((self._cur, nbytes, self._cur_off))
        self._cur, self._cur_off, self._fill = nxt, self._cur_off + nbytes, max(rest, 0)
        self._raise_error()

    def _run(self) -> None:
        """The I/O thread: write each handed-over buffer at its offset, then free it."""
        while (item := self._todo.get()) is not None:
            buf, nbytes, off = item
            try:
                if self._error is None:
                    self._write(memoryview(buf)[:nbytes], off)
            except BaseException as exc:  # kept for the appending thread; this one goes on
                self._error = exc         # freeing buffers, so no append waits for ever
            finally:
                self._free.put(buf)

    def _write(self, data: memoryview, off: int) -> None:
        try:
            pwrite_all(self.fd, data, off)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # The filesystem took O_DIRECT at open but not this write: the page cache it is,
            # for this write and the next (the appender keeps staging; that costs one copy).
            _set_direct(self.fd, False)
            pwrite_all(self.fd, data, off)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def _set_direct(fd: int, on: bool) -> bool:
    """Switch O_DIRECT on ``fd``; False when the filesystem refuses it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if on else (flags & ~os.O_DIRECT))
    except OSError:
        return False
    return on
