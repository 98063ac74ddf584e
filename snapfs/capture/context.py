"""What the fault path, the scan and the store side share during one capture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from snapfs.capture import kernel as k
from snapfs.capture.ledger import Ledger, runs_of
from snapfs.capture.maps import Vma
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.uffd import Uffd

PAGE = k.PAGE_SIZE


@dataclass
class CaptureContext:
    """The target's uffd and ledger, the captured regions and where they go in the store."""

    pid: int
    uffd: Uffd
    ledger: Ledger
    regions: list[Vma]
    region_index: list[int]  # the store's region index for each of ``regions``
    writer: Any  # snapfs.store.SnapshotWriter
    done_bytes: int = 0  # pages claimed so far (progress)
    faults: int = 0  # write faults served
    # Ranges the target unmapped or moved during the capture: a VMA there now is not one
    # this uffd registered (an unregister would take it from whichever uffd has it).
    remapped: list[tuple[int, int]] = field(default_factory=list)
    # Tree captures (snapfs.capture.tree): the shared objects this process maps, whose pages
    # the fault path saves once per object (``shared.save(fault_path, lo, hi)``, and
    # ``shared.event(fault_path, event, a0, a1, a2)`` for REMOVE/UNMAP/REMAP), and what to do
    # with the uffd of a child forked during the capture (``on_fork(fd)``; None: close it,
    # which drops the child's protection).
    shared: Any = None
    on_fork: Any = None

    def page_of(self, ext: int, addr: int) -> tuple[int, int]:
        """(store region index, page number in that region) of ``addr`` in extent ``ext``."""
        region = self.ledger.regions_of[ext]
        return self.region_index[region], (addr - self.regions[region].start) >> k.PAGE_SHIFT

    def mark_lost_slots(self, slots: np.ndarray, reason: str) -> None:
        """Tell the writer that these ledger slots could not be captured."""
        led = self.ledger
        exts = np.searchsorted(led.ext_base, slots, side="right") - 1
        for ext in np.unique(exts).tolist():
            sel = slots[exts == ext] - int(led.ext_base[ext])
            mask = np.zeros(int(led.ext_base[ext + 1] - led.ext_base[ext]), dtype=bool)
            mask[sel] = True
            region, first = self.page_of(ext, int(led.ext_start[ext]))
            for s, n in runs_of(mask):
                self.writer.mark_lost(region, first + s, n, reason)


def still_frozen(scanner: PagemapScanner, lo: int, hi: int, wp: bool) -> np.ndarray:
    """Per page of [lo, hi): True if still present and (for write-protected regions) still
    protected, i.e. bytes read from it just before are its content at the freeze. A page
    unprotected since was saved first; a page zapped, unmapped or populated anew is not."""
    found = scanner.scan(
        lo,
        hi,
        require=0,
        exclude=(k.PAGE_IS_WRITTEN if wp else 0) | k.PAGE_IS_PFNZERO,
        anyof=k.PAGE_IS_PRESENT | k.PAGE_IS_SWAPPED,
    )
    valid = np.zeros((hi - lo) // PAGE, dtype=bool)
    for s, e in zip(found["start"].tolist(), found["end"].tolist()):
        valid[(s - lo) // PAGE : (e - lo) // PAGE] = True
    return valid
