"""Read-only file mappings: the pages the target changed in them, and their ELF headers.

The dynamic linker writes into mappings of the executable and of every library before making
them read-only (RELRO: the GOT, relocated pointers, and ``.dynamic`` whose ``DT_DEBUG`` entry
is how a debugger finds the list of loaded libraries). Those pages differ from the files, so a
snapshot that leaves read-only file mappings out (the default) would give ``gdb`` the files'
bytes there: no shared libraries, wrong pointers. The kernel's core dumps keep them for the same
reason (a file mapping with anonymous pages is dumped). The kernel also keeps the first page of
every mapped ELF file (``coredump_filter`` bit 4): its header and build-id note, with which a
debugger checks that the executable and libraries it is given are the ones that ran; so
does this.

Only those pages are saved (``PAGEMAP_SCAN``: present and not file pages; plus the header page
of a mapping at file offset 0 that starts with the ELF magic); the other pages of the mapping
are the file's, and stay holes marked so (region meta ``holes: "file"``: the ``core`` view
leaves them to the file, ``vmstate`` does not send them). The pages are read after the target
resumed, outside the pause: a read-only page cannot change without an ``mprotect`` first.
"""

from __future__ import annotations

import numpy as np

from snapfs.capture import kernel as k
from snapfs.capture.maps import Vma, file_region_name
from snapfs.capture.memory import read_pages_robust
from snapfs.capture.pagemap import PagemapScanner

PAGE = k.PAGE_SIZE
HOLES_META = {"holes": "file", "mode": "private-pages"}
ELF_MAGIC = b"\x7fELF"


def _candidate(v: Vma) -> bool:
    return v.is_file and v.readable and not v.writable and not v.shared


def _pages_to_save(scanner: PagemapScanner, v: Vma) -> tuple[np.ndarray, bool]:
    """(ascending page numbers to read, whether page 0 is there only as a possible header)."""
    ranges = scanner.scan(v.start, v.end, require=0, exclude=k.PAGE_IS_FILE | k.PAGE_IS_PFNZERO,
                          anyof=k.PAGE_IS_PRESENT | k.PAGE_IS_SWAPPED)
    pages = np.concatenate([np.arange((s - v.start) // PAGE, (e - v.start) // PAGE)
                            for s, e in zip(ranges["start"].tolist(), ranges["end"].tolist())]
                           + [np.zeros(0, np.int64)]).astype(np.int64)
    header_only = v.offset == 0 and (len(pages) == 0 or pages[0] != 0)
    if header_only:
        pages = np.concatenate(([0], pages))
    return pages, header_only


def save_private_pages(pid: int, vmas: list[Vma], writer, captured: set[int]) -> int:
    """Store, as one region each, the changed pages and ELF header page of the read-only
    private file mappings in ``vmas`` (the maps at the snapshot instant) not captured already
    (``captured``: region starts). Blocking (a worker thread). Returns the bytes stored."""
    from snapfs.store import RegionSpec

    try:
        scanner = PagemapScanner(pid)
    except OSError:
        return 0  # exited: the capture reports it
    found = []
    try:
        for v in vmas:
            if not _candidate(v) or v.start in captured:
                continue
            try:
                pages, header_only = _pages_to_save(scanner, v)
            except OSError:
                continue  # unmapped meanwhile
            if len(pages):
                found.append((v, pages, header_only))
    finally:
        scanner.close()
    total = 0
    for v, pages, header_only in found:
        buf = bytearray(len(pages) * PAGE)
        runs = np.split(pages, np.flatnonzero(np.diff(pages) != 1) + 1)
        ok = read_pages_robust(pid, buf, [(v.start + int(r[0]) * PAGE, len(r) * PAGE) for r in runs])
        if header_only and not buf.startswith(ELF_MAGIC):
            ok[0] = False  # not an ELF file: its first page is the file's like the rest
        if not ok.any():
            continue
        index = writer.add_region(RegionSpec(
            name=file_region_name(v), start=v.start, length=v.length, perms=v.perms, offset=v.offset,
            path=v.path, kind="file",
            meta=dict(HOLES_META, dev=f"{v.dev[0]:x}:{v.dev[1]:x}", inode=v.inode)))
        writer.put_scattered(index, pages, memoryview(buf), ok)
        total += int(ok.sum()) * PAGE
    return total
