"""Read-only file mappings the target changed: their private (copy-on-write) pages.

The dynamic linker writes into mappings of the executable and of every library before making
them read-only (RELRO: the GOT, relocated pointers, and ``.dynamic`` whose ``DT_DEBUG`` entry
is how a debugger finds the list of loaded libraries). Those pages differ from the files, so a
snapshot that leaves read-only file mappings out (the default) would give ``gdb`` the files'
bytes there: no shared libraries, wrong pointers. The kernel's core dumps keep them for the same
reason (a file mapping with anonymous pages is dumped).

Only the private pages are saved (``PAGEMAP_SCAN``: present and not file pages); the other
pages of the mapping are the file's, and stay holes marked so (region meta ``holes: "file"``:
the ``core`` view leaves them to the file, ``vmstate`` does not send them). The pages are read
after the target resumed, outside the pause: a read-only page cannot change without an
``mprotect`` first.
"""

from __future__ import annotations

import numpy as np

from snapfs.capture import kernel as k
from snapfs.capture.maps import Vma, file_region_name
from snapfs.capture.memory import read_pages_robust
from snapfs.capture.pagemap import PagemapScanner

PAGE = k.PAGE_SIZE
HOLES_META = {"holes": "file", "mode": "private-pages"}


def _candidate(v: Vma) -> bool:
    return v.is_file and v.readable and not v.writable and not v.shared


def save_private_pages(pid: int, vmas: list[Vma], writer, captured: set[int]) -> int:
    """Store, as one region each, the private pages of the read-only private file mappings in
    ``vmas`` (the maps at the snapshot instant) not captured already (``captured``: region
    starts). Blocking (a worker thread). Returns the bytes stored."""
    from snapfs.store import RegionSpec

    found = []
    try:
        scanner = PagemapScanner(pid)
    except OSError:
        return 0  # exited: the capture reports it
    try:
        for v in vmas:
            if not _candidate(v) or v.start in captured:
                continue
            try:
                ranges = scanner.scan(v.start, v.end, require=0,
                                      exclude=k.PAGE_IS_FILE | k.PAGE_IS_PFNZERO,
                                      anyof=k.PAGE_IS_PRESENT | k.PAGE_IS_SWAPPED)
            except OSError:
                continue  # unmapped meanwhile
            if len(ranges):
                found.append((v, ranges))
    finally:
        scanner.close()
    total = 0
    for v, ranges in found:
        spans = np.stack([ranges["start"], ranges["end"] - ranges["start"]], axis=1).astype(np.int64)
        buf = bytearray(int(spans[:, 1].sum()))
        ok = read_pages_robust(pid, buf, spans)
        if not ok.any():
            continue
        pages = np.concatenate([np.arange(s, s + n, PAGE) for s, n in spans.tolist()])
        index = writer.add_region(RegionSpec(
            name=file_region_name(v), start=v.start, length=v.length, perms=v.perms, offset=v.offset,
            path=v.path, kind="file",
            meta=dict(HOLES_META, dev=f"{v.dev[0]:x}:{v.dev[1]:x}", inode=v.inode)))
        writer.put_scattered(index, (pages - v.start) // PAGE, memoryview(buf), ok)
        total += int(ok.sum()) * PAGE
    return total
