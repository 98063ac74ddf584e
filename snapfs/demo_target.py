"""A small demo target for ``snapfs demo``: fills memory with a realistic mix, keeps writing.

Layout of its main buffer (``--mib`` MiB, anonymous memory): 30% zero pages, 40% text pages
that compress well and carry a findable marker, 30% random pages. After filling it prints
``ready <buffer address> <length>`` on stdout, then rewrites pages continuously (a counter in
the first 8 bytes of the page, plus a fresh random tail for random pages) at ``--rate`` pages
per second until killed.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time

import numpy as np

DEMO_PAGE = 4096  # the content mix's unit (one store page; any host page size holds whole ones)
MARKER = b"snapfs-demo-marker"


def fill(buf: mmap.mmap, npages: int, rng: np.random.Generator) -> np.ndarray:
    """Fill the buffer with the content mix; return the kind of each page (0 zero, 1 text, 2 random)."""
    kinds = rng.choice(np.array([0, 1, 2], dtype=np.uint8), size=npages, p=[0.3, 0.4, 0.3])
    pages = np.frombuffer(buf, dtype=np.uint8).reshape(npages, DEMO_PAGE)
    text = np.frombuffer((b"%s line of a well compressible demo page; " % MARKER) * 100, dtype=np.uint8)[:DEMO_PAGE]
    pages[kinds == 1] = text
    n_random = int((kinds == 2).sum())
    pages[kinds == 2] = rng.integers(0, 256, size=(n_random, DEMO_PAGE), dtype=np.uint8)
    return kinds


def main(argv: list[str] | None = None) -> int:
    """Run the demo target until killed."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--rate", type=int, default=20000, help="page writes per second")
    args = p.parse_args(argv)
    npages = args.mib * 256
    buf = mmap.mmap(-1, npages * DEMO_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    rng = np.random.default_rng(1234)
    kinds = fill(buf, npages, rng)
    addr = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    print(f"ready {addr:#x} {npages * DEMO_PAGE}", flush=True)
    written = np.flatnonzero(kinds != 0)
    counter = 0
    batch = max(1, args.rate // 100)
    while True:
        start = time.monotonic()
        for page in rng.choice(written, size=batch):
            counter += 1
            off = int(page) * DEMO_PAGE
            buf[off : off + 8] = counter.to_bytes(8, "little")
        time.sleep(max(0.0, 0.01 - (time.monotonic() - start)))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        os._exit(0)
