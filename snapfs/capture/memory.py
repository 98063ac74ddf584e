"""Reading and writing another process's memory with ``process_vm_readv``/``writev``.

Batched: one syscall carries up to ``IOV_MAX`` remote ranges. The GIL is released during the
call, so these run in worker threads beside the trio loop.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

import numpy as np

from snapfs.capture.kernel import IOV_MAX, PAGE_SIZE, check, ffi, libc
from snapfs.errors import TargetError


def _raise_target(err: OSError, pid: int) -> None:
    if err.errno == errno.ESRCH:
        raise TargetError(f"process {pid} exited") from None
    if err.errno == errno.EPERM:
        from snapfs.errors import PermissionDenied

        raise PermissionDenied(
            f"not permitted to access the memory of process {pid}: run as its user or as root"
        ) from None
    raise err


def readv_into(pid: int, buf, ranges: Sequence[tuple[int, int]], buf_offset: int = 0) -> int:
    """Copy remote ``ranges`` [(addr, length)] back to back into ``buf`` (a writable buffer).

    Returns the number of bytes copied: less than the total when a range is not mapped any
    more (the copy stops at the first unreadable byte, as the kernel does).
    """
    view = ffi.from_buffer(buf, require_writable=True)
    total = 0
    i = 0
    while i < len(ranges):
        batch = ranges[i : i + IOV_MAX]
        n = len(batch)
        local = ffi.new("struct iovec[]", n)
        remote = ffi.new("struct iovec[]", n)
        want = 0
        for j, (addr, length) in enumerate(batch):
            local[j].iov_base = view + buf_offset + total + want
            local[j].iov_len = length
            remote[j].iov_base = ffi.cast("void *", addr)
            remote[j].iov_len = length
            want += length
        try:
            got = check(libc.process_vm_readv(pid, local, n, remote, n, 0), "process_vm_readv")
        except OSError as exc:
            if exc.errno == errno.EFAULT:
                return total
            _raise_target(exc, pid)
        total += got
        if got < want:
            return total
        i += n
    return total


def read_memory(pid: int, addr: int, size: int) -> bytes:
    """Read ``size`` bytes at ``addr`` of process ``pid``.

    Raises ``OSError(EFAULT)`` if any part is not mapped, :class:`TargetError` if the
    process is gone.
    """
    buf = bytearray(size)
    got = readv_into(pid, buf, [(addr, size)]) if size else 0
    if got != size:
        raise OSError(errno.EFAULT, f"process {pid}: {addr + got:#x} is not readable")
    return bytes(buf)


def write_memory(pid: int, addr: int, data: bytes) -> None:
    """Write ``data`` at ``addr`` of process ``pid`` (``process_vm_writev``; the mapping must
    be writable by the target). Raises ``OSError(EFAULT)`` on a partial write."""
    if not data:
        return
    src = ffi.from_buffer(data)
    done = 0
    while done < len(data):
        local = ffi.new("struct iovec[1]")
        remote = ffi.new("struct iovec[1]")
        local[0].iov_base = src + done
        local[0].iov_len = len(data) - done
        remote[0].iov_base = ffi.cast("void *", addr + done)
        remote[0].iov_len = len(data) - done
        try:
            got = check(libc.process_vm_writev(pid, local, 1, remote, 1, 0), "process_vm_writev")
        except OSError as exc:
            _raise_target(exc, pid)
        if got == 0:
            raise OSError(errno.EFAULT, f"process {pid}: {addr + done:#x} is not writable")
        done += got


def read_pages_robust(pid: int, buf: np.ndarray, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Read page-aligned ``ranges`` back to back into ``buf``; return a bool array, one per
    page, True where the page was read. Unreadable pages (unmapped meanwhile) are skipped,
    not fatal."""
    npages = sum(length for _, length in ranges) // PAGE_SIZE
    ok = np.zeros(npages, dtype=bool)
    # Flatten to per-range cursor: retry after the first unreadable page.
    page_cursor = 0
    pending = list(ranges)
    while pending:
        got = readv_into(pid, buf, pending, page_cursor * PAGE_SIZE)
        got_pages = got // PAGE_SIZE
        ok[page_cursor : page_cursor + got_pages] = True
        page_cursor += got_pages
        # Continue after the page that failed (it stays False).
        if got == sum(length for _, length in pending):
            break
        idx = 0
        consumed = got_pages * PAGE_SIZE
        while consumed >= pending[idx][1]:
            consumed -= pending[idx][1]
            idx += 1
        addr, length = pending[idx]
        head = (addr + consumed + PAGE_SIZE, length - consumed - PAGE_SIZE)
        pending = ([head] if head[1] > 0 else []) + list(pending[idx + 1 :])
        page_cursor += 1  # the failing page stays False
    return ok


class PageReader:
    """Reads single pages with preallocated iovecs (the fault path's hot call)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._buf = ffi.new("char[]", PAGE_SIZE)
        self._local = ffi.new("struct iovec[1]")
        self._remote = ffi.new("struct iovec[1]")
        self._local[0].iov_base = self._buf
        self._local[0].iov_len = PAGE_SIZE
        self._remote[0].iov_len = PAGE_SIZE
        self._view = ffi.buffer(self._buf)

    def read(self, addr: int) -> bytes | None:
        """The page at ``addr``, or None if it is not mapped any more."""
        self._remote[0].iov_base = ffi.cast("void *", addr)
        got = libc.process_vm_readv(self.pid, self._local, 1, self._remote, 1, 0)
        if got != PAGE_SIZE:
            if got < 0 and ffi.errno == errno.ESRCH:
                raise TargetError(f"process {self.pid} exited")
            return None
        return self._view[:]
