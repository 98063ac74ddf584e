"""Copy ranges of a target's memory with process_vm_readv into an ``ImageSink``, in batches."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import numpy as np

from tools.bench.kernel import process_vm_readv
from tools.bench.sink import PAGE, ImageSink

CHUNK_BYTES = 4 << 20


def copy_ranges(pid: int, ranges: list[tuple[int, int]], sink: ImageSink) -> int:
    """Copy ``[(addr, length)]`` (page-aligned) into the sink, 4 MiB per read; return bytes copied."""
    total = 0
    batch: list[tuple[int, int]] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes, total
        if batch:
            buf = np.empty(batch_bytes, dtype=np.uint8)  # fresh: the sink keeps it until compressed
            process_vm_readv(pid, buf, batch)
            sink.put(buf)
            total += batch_bytes
            batch, batch_bytes = [], 0

    for addr, length in ranges:
        while length > 0:
            take = min(length, CHUNK_BYTES - batch_bytes)
            batch.append((addr, take))
            batch_bytes += take
            addr += take
            length -= take
            if batch_bytes >= CHUNK_BYTES:
                flush()
    flush()
    return total


def page_runs(mask: np.ndarray, base: int) -> list[tuple[int, int]]:
    """Contiguous runs of True pages in ``mask`` as ``(addr, length)`` from ``base``."""
    m = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(m))
    starts, ends = edges[0::2], edges[1::2]
    return [(base + int(s) * PAGE, int(e - s) * PAGE) for s, e in zip(starts, ends)]


def _sigstop(pid: int) -> None:
    """Stop every thread of ``pid`` (our child) with SIGSTOP; return once the group stop is complete."""
    os.kill(pid, signal.SIGSTOP)
    while True:
        _, status = os.waitpid(pid, os.WUNTRACED)
        if os.WIFSTOPPED(status):
            return
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise RuntimeError(f"target {pid} ended while being stopped")


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[str]:
    """Stop every thread of ``pid`` for the block; yields how it was stopped.

    Uses snapfs's own stop (ptrace seize + interrupt of every thread, ``snapfs.capture.freeze
    .stopped``) when that package is importable, else SIGSTOP and a wait for the group stop
    (the target is the bench's child). Always resumes.
    """
    try:
        from snapfs.capture.freeze import stopped as snapfs_stopped
    except ImportError:
        snapfs_stopped = None
    if snapfs_stopped is not None:
        with snapfs_stopped(pid):
            yield "ptrace (snapfs.capture.freeze.stopped)"
        return
    _sigstop(pid)
    try:
        yield "SIGSTOP"
    finally:
        os.kill(pid, signal.SIGCONT)
