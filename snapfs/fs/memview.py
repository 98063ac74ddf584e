"""``<snapshot>/mem``: every captured region in one sparse file.

Layout rule (``mem_offset`` of each region is also written in the snapshot's ``info.json``):

* Process snapshots: offset = virtual address, like ``/proc/PID/mem``. Regions that end above
  the largest file offset Linux allows (2**63 - 1: the ``[vsyscall]`` page) are left out of
  ``mem``; they stay readable under ``ramblocks/``.
* VM snapshots (kind ``vm``, regions are RAMBlocks whose ``start`` is not a guest address) and
  any snapshot whose regions overlap: the regions are laid end to end in region order, each
  starting on a 2 MiB boundary. QEMU lists ``pc.ram`` first, so below the PCI hole (3 GiB on
  ``pc``, 2 GiB on ``q35``) an offset in ``mem`` is the guest-physical address.

Bytes not covered by a region read as zeros; the file's size is the end of the last region.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

MAX_FILE_OFFSET = (1 << 63) - 1
VM_ALIGN = 2 << 20


def mem_layout(regions: Sequence[Any], kind: str) -> dict[int, int]:
    """Region index -> offset of the region in ``mem`` (regions left out are absent)."""
    ordered = sorted(regions, key=lambda r: r.start)
    overlap = any(a.start + a.length > b.start for a, b in zip(ordered, ordered[1:]))
    if kind != "vm" and not overlap:
        return {r.index: r.start for r in regions if r.start + r.length <= MAX_FILE_OFFSET}
    layout: dict[int, int] = {}
    pos = 0
    for r in regions:
        layout[r.index] = pos
        pos = -(-(pos + r.length) // VM_ALIGN) * VM_ALIGN
    return layout


class MemView:
    """The ``mem`` file of one snapshot (see the module docstring for the layout)."""

    def __init__(self, reader: Any, regions: Sequence[Any], kind: str) -> None:
        self._reader = reader
        self.layout = mem_layout(regions, kind)
        by_index = {r.index: r for r in regions}
        placed = sorted((off, by_index[i].length, i) for i, off in self.layout.items())
        self._placed = placed
        self._starts = [p[0] for p in placed]
        self.size = max((off + length for off, length, _ in placed), default=0)
        self.allocated = sum(by_index[i].data_pages * by_index[i].page_size for i in self.layout)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes at ``[offset, offset+size)``: region contents where captured, else zeros."""
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        pieces: list[tuple[int, int, int]] = []  # (mem offset, region index, length)
        for start, length, index in self._placed[i:]:
            if start >= end:
                break
            a, b = max(start, offset), min(start + length, end)
            if a < b:
                pieces.append((a, index, b - a))
        if len(pieces) == 1 and pieces[0][0] == offset and pieces[0][2] == end - offset:
            a, index, n = pieces[0]  # the common case: inside one region, no copy
            return self._reader.read(index, a - self.layout[index], n)
        buf = bytearray(end - offset)
        for a, index, n in pieces:
            buf[a - offset : a - offset + n] = self._reader.read(index, a - self.layout[index], n)
        return bytes(buf)

    def data_extents(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of the stored pages, ascending; the rest reads as zeros
        (``snapfs cat NAME mem > file`` writes only these)."""
        return [(start + off, n) for start, _length, index in self._placed
                for off, n in self._reader.data_extents(index)]
