"""Physical floors measured on the same target in the same run.

- kernel write-protect: UFFDIO_WRITEPROTECT over the target's whole data region, from the
  bench with a userfaultfd of the target (sync WP mode, as snapfs uses), on a target that is
  not writing; the best of a few runs. snapfs's pause cannot be shorter than this.
- process_vm_readv: reading the data region in 1 MiB reads into a reused buffer.
- zstd alone: the region's bytes, zero pages skipped (numpy check), the rest compressed at
  level 1 in 128 KiB frames by ``threads`` threads; throughput counted over all resident bytes,
  as snapfs's capture throughput is.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zstandard

from tools.bench import kernel
from tools.bench.sink import FRAME_BYTES, PAGE, ZSTD_LEVEL, nonzero_pages
from tools.bench.targets import Target

MiB = 1 << 20


def write_protect_ms(target: Target, repeats: int = 3) -> dict:
    """Time UFFDIO_WRITEPROTECT (and unprotect) of the target's data region."""
    uffd, source = kernel.acquire_uffd(target.pid, target.handoff_path)
    protect, unprotect = [], []
    try:
        kernel.uffd_api(uffd, kernel.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        kernel.uffd_register_wp(uffd, target.base, target.size)
        for _ in range(repeats):
            t0 = time.perf_counter()
            kernel.uffd_writeprotect(uffd, target.base, target.size, True)
            t1 = time.perf_counter()
            kernel.uffd_writeprotect(uffd, target.base, target.size, False)
            t2 = time.perf_counter()
            protect.append((t1 - t0) * 1e3)
            unprotect.append((t2 - t1) * 1e3)
    finally:
        try:
            kernel.uffd_unregister(uffd, target.base, target.size)
        finally:
            os.close(uffd)
    return {"protect_ms": min(protect), "protect_ms_median": statistics.median(protect),
            "unprotect_ms": min(unprotect), "bytes": target.size, "uffd": source}


def read_region(target: Target) -> tuple[np.ndarray, dict]:
    """process_vm_readv throughput (reused 1 MiB buffer), plus one full copy of the region."""
    buf = np.empty(MiB, dtype=np.uint8)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for off in range(0, target.size, MiB):
            n = min(MiB, target.size - off)
            kernel.process_vm_readv(target.pid, buf[:n], [(target.base + off, n)])
        best = min(best, time.perf_counter() - t0)
    copy = np.empty(target.size, dtype=np.uint8)
    t0 = time.perf_counter()
    kernel.process_vm_readv(target.pid, copy, [(target.base, target.size)])
    fresh = time.perf_counter() - t0
    return copy, {"reused_buffer_Bps": target.size / best, "fresh_memory_Bps": target.size / fresh,
                  "bytes": target.size}


def zstd_alone(data: np.ndarray, threads: int, passes: int = 3) -> dict:
    """Compress ``data`` the way the bench's sinks do, with ``threads`` threads, no I/O; the
    best of ``passes`` (``pass_Bps`` lists every pass)."""
    local: dict[int, zstandard.ZstdCompressor] = {}

    def compress(chunk: np.ndarray) -> int:
        import threading
        c = local.setdefault(threading.get_ident(), zstandard.ZstdCompressor(level=ZSTD_LEVEL))
        return len(c.compress(chunk.tobytes()))

    times = []
    out = 0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(passes):  # best of N: a floor is what the machine can do, noise only slows it
            t0 = time.perf_counter()
            mask = nonzero_pages(data)
            pages = data.reshape(-1, PAGE)[mask].reshape(-1)
            out = sum(pool.map(compress, [pages[o : o + FRAME_BYTES] for o in range(0, len(pages), FRAME_BYTES)]))
            times.append(time.perf_counter() - t0)
    best = min(times)
    nz = int(mask.sum()) * PAGE
    return {"Bps": len(data) / best, "nonzero_Bps": nz / best, "threads": threads,
            "pass_Bps": [len(data) / t for t in times],
            "nonzero_bytes": nz, "compressed_bytes": out, "ratio": nz / out if out else None}


def measure(target: Target, threads: int) -> dict:
    """All floors on one (non-writing) target."""
    result: dict = {}
    try:
        result["write_protect"] = write_protect_ms(target)
    except OSError as e:
        result["write_protect"] = {"error": str(e)}
    data, result["process_vm_readv"] = read_region(target)
    result["zstd"] = zstd_alone(data, threads)
    return result
