"""Pre-protection (roadmap 7): write-protect the target's memory while it still runs, so that
the freeze only has to re-protect what was written or populated since.

Write-protecting populated 4 KiB pages costs the kernel ~20 ms per GiB; done inside the
freeze it made the pause grow with the target's size. Here it is done before the freeze, in
a worker thread, while a trio task serves the write faults it causes. No fault of this phase
needs saving (the snapshot instant has not come yet): the page is unprotected at once and
the freeze's ``PAGEMAP_SCAN`` finds it again (``PAGE_IS_WRITTEN``) and re-protects it.
Events (DONTNEED, munmap, mremap) only need reading, which lets the target go on: the freeze
reads the maps and the page tables afresh.
"""

from __future__ import annotations

import bisect
import errno
import time
from dataclasses import dataclass, field

import trio

from snapfs.capture import kernel as k
from snapfs.capture.faults import HotCalls
from snapfs.capture.ledger import HUGE_PMD
from snapfs.capture.maps import Vma
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.uffd import Uffd, decode_messages

PAGE = k.PAGE_SIZE
# Protect at most this much per ioctl: the call holds the target's mmap lock for reading, and
# a thread of the target calling mmap/munmap meanwhile waits for it (~1.2 ms per 64 MiB).
PROTECT_STEP = 64 << 20
_RETRY = 100e-6  # backoff while an unprotect is refused with EAGAIN (a mapping change pending)


@dataclass
class PreProtected:
    """What :func:`preprotect_regions` did."""

    protected_bytes: int = 0
    elapsed_ms: float = 0.0
    unprotectable: dict[int, str] = field(default_factory=dict)  # VMA start -> reason
    faults: int = 0  # write faults served (unprotect only) meanwhile


def preprotect_regions(uffd: Uffd, regions: list[Vma]) -> PreProtected:
    """Register and write-protect every write-protect-mode region (blocking: run it in a
    worker thread). Regions the kernel refuses are listed in ``unprotectable``; the freeze
    copies them instead. Ranges unmapped meanwhile are skipped."""
    out = PreProtected()
    t0 = time.monotonic()
    for v in regions:
        if v.mode != "wp":
            continue
        try:
            uffd.register_wp(v.start, v.length)
            for lo in range(v.start, v.end, PROTECT_STEP):
                uffd.protect(lo, min(PROTECT_STEP, v.end - lo), wp=True)
            out.protected_bytes += v.length
        except OSError as exc:
            if exc.errno in (errno.ENOMEM, errno.ENOENT, errno.ESRCH):
                continue  # unmapped since the maps were read: the freeze sees the new layout
            if exc.errno not in (errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOTSUP):
                raise
            out.unprotectable[v.start] = exc.strerror or str(exc)
    out.elapsed_ms = (time.monotonic() - t0) * 1000.0
    return out


class PreFaultServer:
    """Serves write faults during pre-protection: unprotect and wake, nothing saved.

    It must keep serving while the freeze stops the target: a thread whose fault is pending
    in kernel mode (a syscall writing to user memory) retries the fault instead of taking the
    ptrace stop, so it stops only once its fault is served. Once every thread is stopped the
    freeze calls :meth:`halt` (in the trio thread); from then on the server touches nothing.
    """

    def __init__(self, pid: int, uffd: Uffd, regions: list[Vma]) -> None:
        self.pid = pid
        self.uffd = uffd
        self.faults = 0
        self.halted = False
        self.hot = HotCalls(pid)
        # hugetlb regions: a fault unprotects the whole huge page (a part would fail).
        huge = sorted((v.start, v.end, v.page_size) for v in regions if v.page_size != PAGE)
        self._huge_starts = [h[0] for h in huge]
        self._huge = huge

    def halt(self) -> None:
        """Stop serving at once (call from the trio thread): no unprotect after this."""
        self.halted = True

    async def run(self) -> None:
        """Serve faults until halted or cancelled (in a nursery beside the protection)."""
        scanner = PagemapScanner(self.pid)
        busy: list[tuple[int, int]] = []
        try:
            while not self.halted:
                if busy:
                    with trio.move_on_after(_RETRY):
                        await trio.lowlevel.wait_readable(self.uffd.fd)
                else:
                    await trio.lowlevel.wait_readable(self.uffd.fd)
                if self.halted:  # woken, but the freeze has begun meanwhile
                    return
                raw = self.hot.read_messages(self.uffd.fd)
                retry, busy = busy, []
                if raw:
                    msgs = decode_messages(raw)
                    faults = msgs["a1"][msgs["event"] == k.UFFD_EVENT_PAGEFAULT]
                    for addr in faults.tolist():
                        retry.append(self._unit(scanner, addr & ~(PAGE - 1)))
                        self.faults += 1
                for lo, hi in retry:
                    if self.hot.unprotect(self.uffd.fd, lo, hi) == "busy":
                        busy.append((lo, hi))
        finally:
            scanner.close()

    def _unit(self, scanner: PagemapScanner, addr: int) -> tuple[int, int]:
        """The range to unprotect for a fault at ``addr``: its page, or its whole huge page
        (unprotecting part of a THP would split it)."""
        i = bisect.bisect_right(self._huge_starts, addr) - 1
        if i >= 0 and addr < self._huge[i][1]:
            size = self._huge[i][2]
        else:
            found = scanner.scan(addr, addr + PAGE, require=k.PAGE_IS_HUGE)
            size = HUGE_PMD if len(found) else PAGE
        lo = addr // size * size
        return lo, lo + size
