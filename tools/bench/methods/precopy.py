"""Iterative pre-copy with dirty logging (what QEMU/CRIU-style live migration does).

Round 0 copies the whole data region while the target runs; each later round re-copies the
pages written meanwhile, until the remaining dirty set could be sent within ``max_downtime``
(at the copy rate measured so far) or ``max_rounds`` is reached; then a final stop-copy sends
the rest. Every copy goes into the image, duplicates included, as a migration stream would.

Dirty tracking on this kernel (no soft-dirty): a userfaultfd of the target in WP_ASYNC mode
(writes just clear the PTE's WP bit, no fault) plus PAGEMAP_SCAN with PAGE_IS_WRITTEN and
PM_SCAN_WP_MATCHING|PM_SCAN_CHECK_WPASYNC, which reports written pages and re-protects them in
one ioctl. The userfaultfd is injected into the target by snapfs's freeze
(``snapfs.capture.freeze.frozen``; see ``kernel.acquire_uffd``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from tools.bench import kernel
from tools.bench.copying import copy_ranges, page_runs, stopped
from tools.bench.methods import Method, Outcome
from tools.bench.sink import PAGE, ImageSink
from tools.bench.targets import Target


class PreCopy(Method):
    """Iterative pre-copy, UFFD WP_ASYNC + PAGEMAP_SCAN dirty tracking, final stop-copy."""

    name = "pre-copy"
    how = ("round 0 copies everything live; each round re-copies pages PAGEMAP_SCAN reports written "
           "(UFFD WP_ASYNC, re-protected by the same scan) until the rest fits the downtime "
           "budget or the round limit; then stop all threads, copy the rest, resume; every copy stored")

    def __init__(self, threads: int, max_rounds: int = 10, max_downtime_s: float = 0.05) -> None:
        self.threads = threads
        self.max_rounds = max_rounds
        self.max_downtime_s = max_downtime_s

    def available(self) -> str | None:
        if not os.path.exists("/proc/self/pagemap"):
            return "no /proc/self/pagemap"
        return None

    def run(self, target: Target, workdir: Path) -> Outcome:
        base, size, pid = target.base, target.size, target.pid
        npages = size // PAGE
        sink = ImageSink(str(workdir / "precopy.img"), self.threads)
        uffd, uffd_source = kernel.acquire_uffd(target.pid, target.handoff_path)
        scanner = kernel.PagemapScanner(pid)
        rounds: list[dict] = []
        try:
            kernel.uffd_api(uffd, kernel.UFFD_FEATURE_PAGEFAULT_FLAG_WP | kernel.UFFD_FEATURE_WP_ASYNC)
            kernel.uffd_register_wp(uffd, base, size)
            t0 = time.perf_counter()
            kernel.uffd_writeprotect(uffd, base, size, True)
            ranges = [(base, size)]
            copied = copied_time = 0.0
            while True:
                r0 = time.perf_counter()
                n = copy_ranges(pid, ranges, sink)
                sink.flush()
                copied += n
                copied_time += time.perf_counter() - r0
                rounds.append({"pages": n // PAGE, "seconds": round(time.perf_counter() - r0, 4)})
                ranges = scanner.written(base, base + size, reprotect=True)
                dirty = sum(length for _, length in ranges)
                rate = copied / copied_time if copied_time else float("inf")
                if dirty / rate <= self.max_downtime_s or len(rounds) >= self.max_rounds:
                    break
            # Final stop-copy: what the last scan found (already re-protected, not yet copied)
            # plus whatever was written since.
            p0 = time.perf_counter()
            with stopped(pid) as how:
                mask = np.zeros(npages, dtype=bool)
                for addr, length in ranges + scanner.written(base, base + size, reprotect=False):
                    first = (addr - base) // PAGE
                    mask[first : first + length // PAGE] = True
                n = copy_ranges(pid, page_runs(mask, base), sink)
                sink.flush()
            t1 = time.perf_counter()
            rounds.append({"pages": n // PAGE, "seconds": round(t1 - p0, 4), "final": True})
            return Outcome(t1 - t0, sink.image_bytes, tool_pause_ms=(t1 - p0) * 1e3,
                           extra={"rounds": len(rounds), "round_pages": [r["pages"] for r in rounds],
                                  "converged": len(rounds) - 1 < self.max_rounds,
                                  "stop": how, "uffd": uffd_source})
        finally:
            try:
                kernel.uffd_unregister(uffd, base, size)
            except OSError:
                pass
            os.close(uffd)
            scanner.close()
            sink.close()
