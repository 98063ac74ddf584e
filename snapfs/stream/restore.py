"""``snapfs incoming --pid PID``: restore a live process's memory from a migration stream.

Order of operations (the target is touched last, and only if everything checks out):

1. the whole stream is read and validated into a page spool (:mod:`snapfs.stream.spool`);
2. every RAMBlock must match a region of the target by name (the capture package's naming:
   ``heap``, ``stack``, ``anon-<start>``, ``<file>-<start>``...) and by length; all
   mismatches are listed in one error;
3. every thread of the target is stopped (:func:`snapfs.capture.freeze.stopped`), the regions
   are checked again, the pages that differ are written, and the threads resume — whatever
   happens, leaving the block resumes them.

Pages the stream never sent are left alone (QEMU semantics: they keep the destination's
contents); pages sent as ZERO are zeroed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from snapfs.capture.freeze import stopped
from snapfs.capture.maps import Vma, classify, huge_page_sizes, read_maps
from snapfs.capture.memory import read_memory, write_memory
from snapfs.errors import TargetError
from snapfs.stream.reader import Limits, RamBlock
from snapfs.stream.spool import NOT_SENT, SpooledStream, spool_stream

PAGE = 4096


@dataclass
class RestoreResult:
    """What ``incoming --pid`` did (or, with ``dry_run``, would do)."""

    pid: int
    blocks: int
    pages_sent: int
    pages_written: int
    bytes_read: int
    dry_run: bool

    def to_json(self) -> dict:
        return dict(self.__dict__)


def target_regions(pid: int) -> dict[str, Vma]:
    """The target's regions by block name (every readable mapping, capture naming)."""
    vmas = classify(read_maps(pid), include_readonly=True, huge_sizes=huge_page_sizes(pid))
    return {v.name: v for v in vmas}


def match_blocks(pid: int, blocks: list[RamBlock], regions: dict[str, Vma]) -> list[Vma]:
    """The region for each block, or TargetError listing every block that does not match."""
    out: list[Vma] = []
    problems: list[str] = []
    for b in blocks:
        v = regions.get(b.name)
        if v is None:
            problems.append(f"block {b.name!r} has no region in the process")
        elif v.length != b.length:
            problems.append(f"block {b.name!r} is 0x{b.length:x} bytes but the region is 0x{v.length:x}")
        else:
            out.append(v)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise TargetError(f"stream does not match process {pid}: {shown}")
    return out


def restore_process(
    src: BinaryIO,
    pid: int,
    dry_run: bool = False,
    limits: Limits = Limits(),
    progress: Callable[[int], None] | None = None,
) -> RestoreResult:
    """Validate the stream ``src`` completely, then write its pages into process ``pid``."""
    target_regions(pid)  # fail fast (TargetError) before consuming the stream
    spooled = spool_stream(src, limits=limits, progress=progress)
    try:
        match_blocks(pid, spooled.blocks, target_regions(pid))
        sent = sum(spooled.spool.sent_pages(i) for i in range(len(spooled.blocks)))
        result = RestoreResult(pid, len(spooled.blocks), sent, 0, spooled.stream_bytes, dry_run)
        if dry_run:
            return result
        with stopped(pid):
            # Nothing moves while stopped: match again against the maps of this instant.
            vmas = match_blocks(pid, spooled.blocks, target_regions(pid))
            result.pages_written = _write_all(pid, spooled, vmas)
        return result
    finally:
        spooled.close()


def _write_all(pid: int, spooled: SpooledStream, vmas: list[Vma]) -> int:
    written = 0
    for bi, vma in enumerate(vmas):
        for first, states, pages in spooled.spool.batches(bi):
            addr = vma.start + first * PAGE
            current = np.frombuffer(read_memory(pid, addr, len(states) * PAGE), np.uint8)
            differ = (states != NOT_SENT) & (current.reshape(-1, PAGE) != pages).any(axis=1)
            for lo, hi in _runs(differ):
                _write(pid, addr + lo * PAGE, pages[lo:hi].tobytes())
                written += hi - lo
    return written


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) index ranges where ``mask`` is True."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _write(pid: int, addr: int, data: bytes) -> None:
    """process_vm_writev; for mappings the target may not write (text, RELRO) /proc/PID/mem."""
    try:
        write_memory(pid, addr, data)
        return
    except OSError as exc:
        if exc.errno != errno.EFAULT:
            raise
    fd = os.open(f"/proc/{pid}/mem", os.O_WRONLY)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], addr + done)
    finally:
        os.close(fd)
