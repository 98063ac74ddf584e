"""The ``core`` view: a process snapshot as an ELF core file, generated while it is read.

``gdb EXE core`` shows every thread's backtrace, locals and globals as they were at the
snapshot instant. The layout follows the kernel's own core dumps (``fs/binfmt_elf.c``)::

    ELF header | PT_NOTE + one PT_LOAD per mapping | notes | pad to 4 KiB | segment data ...
    [| section header 0, only with 65535 program headers or more (PN_XNUM)]

One PT_LOAD per mapping at the snapshot instant, in address order. A captured region's segment
holds all of its bytes (``p_filesz`` = its length; never-populated and zero pages read as zeros
and are not stored: ``st_blocks`` counts only stored pages). Mappings snapfs does not capture
(code and other read-only file mappings, which gdb reads from the files named in NT_FILE;
guard pages; ``[vvar]``) get ``p_filesz`` 0, as the kernel's default ``coredump_filter`` does
for them. In a file-backed region a page that was not captured is the file's, not zero (a
``.data`` page never touched, the unchanged pages beside a library's RELRO): such runs become
PT_LOADs of their own with ``p_filesz`` 0, so gdb reads them from the file too. The notes come
from :mod:`snapfs.elfcore.notes`. VM snapshots have no ``core``.

Size and layout come from the catalog alone (region lengths and the recorded state, plus the
page maps of the few file-backed regions): opening or stat-ing ``core`` reads no page data.
Reads go straight to the store's reader (:class:`~snapfs.stream.writer.StreamLayout` pieces,
as ``vmstate``): page-aligned requests are copied once from the decoded frames.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from snapfs import elfcore
from snapfs.elfcore import elf, notes
from snapfs.elfcore.state import BLOB, CoreState, Mapping
from snapfs.store.model import HOLE, STORE_PAGE
from snapfs.stream.writer import Literal, StreamLayout

_PHDRS = np.dtype([("type", "<u4"), ("flags", "<u4"), ("offset", "<u8"), ("vaddr", "<u8"),
                   ("paddr", "<u8"), ("filesz", "<u8"), ("memsz", "<u8"), ("align", "<u8")])
assert _PHDRS.itemsize == elf.PHDR_SIZE


class RegionBytes:
    """A :class:`StreamLayout` piece: ``length`` bytes of one region from byte ``at``."""

    def __init__(self, region: int, length: int, at: int = 0) -> None:
        self.region = region
        self.size = length
        self.at = at

    def read(self, lo: int, hi: int, read_pages, read_into=None) -> bytes | memoryview:
        """Bytes ``[lo, hi)`` of the piece: page-aligned spans are copied once, straight from
        the decoded frames into a fresh buffer (a read-only view of it is returned)."""
        lo += self.at
        hi += self.at
        if lo % STORE_PAGE or hi % STORE_PAGE or read_into is None:
            return read_pages(self.region, lo, hi - lo)
        out = np.empty(((hi - lo) // STORE_PAGE, STORE_PAGE), np.uint8)
        read_into(self.region, lo // STORE_PAGE, out)
        return memoryview(out.reshape(-1)).toreadonly()


class CoreView:
    """A process snapshot as an ELF core: ``.size`` exact up front, ``.read(offset, size)``."""

    def __init__(self, reader: Any) -> None:
        self._reader = reader
        self.state = state = CoreState.from_snapshot(reader.info, reader.blob(BLOB))
        arch = elfcore.arch(state.arch)
        mappings = _mappings(reader.regions, state.mappings)
        segments = _segments(reader, mappings)
        note_bytes = notes.build(state, arch, mappings)

        phnum = 1 + len(segments)
        notes_at = elf.EHDR_SIZE + phnum * elf.PHDR_SIZE
        data_at = -(-(notes_at + len(note_bytes)) // elf.CORE_PAGE) * elf.CORE_PAGE
        seg = np.array([(s.start, s.end, s.flags, s.region is not None) for s in segments],
                       dtype=[("start", "<u8"), ("end", "<u8"), ("flags", "<u4"), ("data", "?")])
        filesz = np.where(seg["data"], seg["end"] - seg["start"], 0).astype(np.uint64)
        ph = np.zeros(phnum, _PHDRS)
        ph[0] = (elf.PT_NOTE, 0, notes_at, 0, 0, len(note_bytes), 0, elf.NOTE_ALIGN)
        load = ph[1:]
        load["type"] = elf.PT_LOAD
        load["flags"] = seg["flags"]
        load["vaddr"] = seg["start"]
        load["memsz"] = seg["end"] - seg["start"]
        load["filesz"] = filesz
        load["offset"] = data_at + np.concatenate(([0], np.cumsum(filesz)[:-1])).astype(np.uint64)
        load["align"] = elf.CORE_PAGE
        data_end = data_at + int(filesz.sum())
        head = b"".join((elf.ehdr(arch.ELF_MACHINE, phnum, shoff=data_end), ph.tobytes(),
                         note_bytes, bytes(data_at - notes_at - len(note_bytes))))
        tail = elf.extnum_shdr(phnum) if phnum >= elf.PN_XNUM else b""
        pieces: list[Any] = [Literal(head)]
        self._data_at: list[tuple[int, Segment]] = []  # (file offset, segment) holding data
        pos = data_at
        for s in segments:
            if s.region is not None:
                pieces.append(RegionBytes(s.region, s.end - s.start, s.at))
                self._data_at.append((pos, s))
                pos += s.end - s.start
        pieces.append(Literal(tail))
        self._head_size = len(head)
        self._tail = (data_end, len(tail))
        self._layout = StreamLayout(pieces, reader.read, reader.read_pages_into)
        self.size: int = self._layout.size
        self.segments = len(segments)
        self.allocated = len(head) + len(tail) + _stored_bytes(reader, segments)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the core file; short only at its end."""
        return self._layout.read(offset, size)

    def read_buffer(self, offset: int, size: int) -> bytes | memoryview:
        """Like :meth:`read`, but may return a read-only memoryview (one copy less: for FUSE)."""
        return self._layout.read_buffer(offset, size)

    def data_extents(self) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of the parts of the file that may hold non-zero bytes, in
        order (headers and notes, stored pages); everything else reads as zeros. Loads the
        page maps of the captured regions (for sparse copies, not for ``stat``)."""
        yield 0, self._head_size
        for at, s in self._data_at:
            for off, length in self._reader.data_extents(s.region):
                lo, hi = max(off, s.at), min(off + length, s.at + s.end - s.start)
                if lo < hi:
                    yield at + lo - s.at, hi - lo
        if self._tail[1]:
            yield self._tail

    def describe(self) -> dict[str, Any]:
        """The ``core`` entry of the snapshot's ``info.json``: how to open it."""
        exe = self.state.exe
        doc: dict[str, Any] = {
            "file": "core",
            "exe": exe,
            "open": f"gdb {shlex.quote(exe)} core" if exe else "gdb -c core",
            "threads": len(self.state.threads),
            "segments": self.segments,
        }
        if exe and exe.endswith(" (deleted)"):
            doc["note"] = ("the executable was deleted or replaced before the snapshot: give gdb "
                           "the same build of it")
        elif self.state.auxv is None:
            doc["note"] = ("taken by an older snapfs: no auxiliary vector, XSAVE state or "
                           "read-only mappings were recorded (gdb may not find the shared libraries)")
        return doc


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD: ``[start, end)``, with data from ``region`` at byte ``at`` (or none)."""

    start: int
    end: int
    flags: int
    region: int | None = None
    at: int = 0


def _mappings(regions: list[Any], recorded: list[Mapping] | None) -> list[Mapping]:
    """Every mapping at the snapshot instant, in address order: as recorded at the freeze,
    plus any region no recorded mapping covers (for older snapshots: the regions alone)."""
    out = list(recorded or [])
    starts = {m.start for m in out}
    for r in regions:
        if r.start not in starts:
            out.append(Mapping(r.start, r.start + r.length, r.perms, r.offset,
                               int((r.meta or {}).get("inode", 0)), r.path or ""))
    out.sort(key=lambda m: m.start)
    return out


def _segments(reader: Any, mappings: list[Mapping]) -> list[Segment]:
    """The PT_LOADs: one per mapping, with its region's bytes where it was captured. A
    file-backed region's holes (pages never populated, or left out as unchanged) are the
    file's bytes, not zeros: they become data-less PT_LOADs of their own, so gdb reads them
    from the file, and only those regions' page maps are loaded."""
    by_start = {r.start: r for r in reader.regions}
    out: list[Segment] = []
    for m in mappings:
        flags = elf.perms_flags(m.perms)
        r = by_start.get(m.start)
        if r is None or r.length != m.end - m.start:
            out.append(Segment(m.start, m.end, flags))
        elif r.kind != "file":
            out.append(Segment(m.start, m.end, flags, r.index))
        else:
            for first, n, captured in _captured_runs(reader.runs(r.index)):
                lo = m.start + first * STORE_PAGE
                out.append(Segment(lo, lo + n * STORE_PAGE, flags, r.index if captured else None, first * STORE_PAGE))
    return out


def _captured_runs(runs) -> Iterator[tuple[int, int, bool]]:
    """Store runs -> (first page, pages, captured): DATA and ZERO runs merged as captured."""
    cur: list = []
    for first, n, kind in runs:
        captured = kind != HOLE
        if cur and cur[2] == captured and cur[0] + cur[1] == first:
            cur[1] += n
            continue
        if cur:
            yield tuple(cur)
        cur = [first, n, captured]
    if cur:
        yield tuple(cur)


def _stored_bytes(reader: Any, segments: list[Segment]) -> int:
    """Bytes of stored pages under the segments (``st_blocks``), from the catalog's counts."""
    regions = {s.region for s in segments if s.region is not None}
    return sum(reader.regions[i].data_pages * reader.regions[i].page_size for i in regions)
