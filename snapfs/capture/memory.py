"""Reading and writing another process's memory with ``process_vm_readv``/``writev`` (and
which pages of a shared file hold data).

Batched: one syscall carries up to ``IOV_MAX`` remote ranges. The GIL is released during the
call, so these run in worker threads beside the trio loop.
"""

from __future__ import annotations

import errno
import os

import numpy as np

from snapfs.capture.kernel import IOV_MAX, PAGE_SIZE, check, ffi, lib
from snapfs.errors import TargetError
from snapfs.ranges import positions_in_runs

# Longest piece one remote iovec asks the kernel to copy. process_vm_readv pins up to 1024
# pages of an iovec, then copies them with no preemption point; this kernel is PREEMPT_NONE,
# so a 4 MiB iovec kept a CPU for ~1 ms, and a target woken on that CPU (a served fault, a
# timer) waited that long. Pinning yields between pieces: 256 KiB bounds the wait to ~70 us.
MAX_COPY = 256 << 10


def prefaulted_buffer(size: int) -> bytearray:
    """A zeroed buffer whose pages are already mapped: a large bytearray is calloc'd, and its
    pages would otherwise fault in on first write — during a pause or on the fault path."""
    buf = bytearray(size)
    np.frombuffer(buf, np.uint8)[::PAGE_SIZE] = 0
    return buf

def _raise_target(err: OSError, pid: int) -> None:
    if err.errno == errno.ESRCH:
        raise TargetError(f"process {pid} exited") from None
    if err.errno == errno.EPERM:
        from snapfs.errors import PermissionDenied

        raise PermissionDenied(
            f"not permitted to access the memory of process {pid}: run as its user or as root"
        ) from None
    raise err


def readv_into(pid: int, buf, ranges, buf_offset: int = 0) -> int:
    """Copy remote ``ranges`` [(addr, length)] back to back into ``buf`` (a writable buffer)
    from ``buf_offset`` on. ``ranges``: a sequence of pairs or an (n, 2) integer array.

    Returns the number of bytes copied: less than the total when a range is not mapped any
    more (the copy stops at the first unreadable byte, as the kernel does).
    """
    remote_all = _split(np.asarray(ranges, dtype=np.int64).reshape(-1, 2)).view(np.uint64)
    view = ffi.from_buffer(buf, require_writable=True)
    local = ffi.new("struct iovec[1]")
    total = 0
    for i in range(0, len(remote_all), IOV_MAX):
        batch = remote_all[i : i + IOV_MAX]  # an array of struct iovec, built without a loop
        want = int(batch[:, 1].sum())
        local[0].iov_base = view + buf_offset + total
        local[0].iov_len = want
        remote = ffi.cast("struct iovec *", ffi.from_buffer(batch))
        try:
            got = check(lib.snapfs_process_vm_readv(pid, local, 1, remote, len(batch)), "process_vm_readv")
        except OSError as exc:
            if exc.errno == errno.EFAULT:
                return total
            _raise_target(exc, pid)
        total += got
        if got < want:
            return total
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
            got = check(lib.snapfs_process_vm_writev(pid, local, 1, remote, 1), "process_vm_writev")
        except OSError as exc:
            _raise_target(exc, pid)
        if got == 0:
            raise OSError(errno.EFAULT, f"process {pid}: {addr + done:#x} is not writable")
        done += got


def _split(ranges: np.ndarray) -> np.ndarray:
    """``ranges`` (n, 2) cut into pieces of at most :data:`MAX_COPY` bytes, in order."""
    lengths = ranges[:, 1]
    if not len(ranges) or int(lengths.max()) <= MAX_COPY:
        return np.ascontiguousarray(ranges)
    counts = np.maximum((lengths + MAX_COPY - 1) // MAX_COPY, 1)
    owner = np.repeat(np.arange(len(ranges)), counts)
    within = positions_in_runs(counts) * MAX_COPY
    out = np.empty((len(owner), 2), dtype=np.int64)
    out[:, 0] = ranges[owner, 0] + within
    out[:, 1] = np.minimum(MAX_COPY, lengths[owner] - within)
    return out


def read_pages_robust(pid: int, buf, ranges) -> np.ndarray:
    """Read page-aligned ``ranges`` (pairs or an (n, 2) array of addr, length) back to back
    into ``buf``; return a bool array, one per page, True where the page was read.
    Unreadable pages (unmapped meanwhile) are skipped, not fatal."""
    pending = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    npages = int(pending[:, 1].sum()) // PAGE_SIZE
    ok = np.zeros(npages, dtype=bool)
    page_cursor = 0
    while len(pending):
        want = int(pending[:, 1].sum())
        got = readv_into(pid, buf, pending, page_cursor * PAGE_SIZE)
        got_pages = got // PAGE_SIZE
        ok[page_cursor : page_cursor + got_pages] = True
        page_cursor += got_pages
        if got == want:
            break
        # Continue after the page that failed (it stays False).
        ends = np.cumsum(pending[:, 1])
        idx = int(np.searchsorted(ends, got_pages * PAGE_SIZE, side="right"))
        consumed = got_pages * PAGE_SIZE - (int(ends[idx - 1]) if idx else 0)
        addr, length = (int(x) for x in pending[idx])
        head = np.array([[addr + consumed + PAGE_SIZE, length - consumed - PAGE_SIZE]], dtype=np.int64)
        pending = np.concatenate([head if head[0, 1] > 0 else head[:0], pending[idx + 1 :]])
        page_cursor += 1  # the failing page stays False
    return ok


def file_data_ranges(fd: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Offsets in [lo, hi) a file holds data for (SEEK_DATA/SEEK_HOLE: for shmem, the pages in
    its page cache), page-aligned."""
    out: list[tuple[int, int]] = []
    pos = lo
    while pos < hi:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if data >= hi:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), hi)
        out.append((data // PAGE_SIZE * PAGE_SIZE, -(-hole // PAGE_SIZE) * PAGE_SIZE))
        pos = hole
    return out
