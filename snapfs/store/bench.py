"""Store micro-benchmark: write, incremental, cold sequential and random reads.

    python -m snapfs.store.bench [--size 1G] [--dir /var/tmp] [--threads 2]

Writes a synthetic memory image (every 5th page zero, every 17th incompressible, the rest
low-entropy) through SnapshotWriter from ``--threads`` threads, then a child with 1% of the pages
changed (content comparison), then reads the full snapshot back after dropping the page cache
(needs root; otherwise the reads are warm and say so). Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

import numpy as np

from snapfs.store import RegionSpec, Store
from snapfs.units import format_rate, parse_size

PAGE = 4096
CHUNK = 512          # pages per put (2 MiB), as the capture's scan hands them over


def _image(npages: int, rng: np.random.Generator) -> np.ndarray:
    img = np.empty((npages, PAGE), np.uint8)
    block = rng.integers(0, 16, size=(4096, PAGE), dtype=np.uint8)
    for i in range(0, npages, 4096):
        img[i:i + 4096] = block[:min(4096, npages - i)]
    img[::5] = 0
    noisy = img[::17]
    img[::17] = rng.integers(0, 256, size=noisy.shape, dtype=np.uint8)
    return img


def _write(store: Store, name: str, img: np.ndarray, threads: int, parent: str | None = None) -> tuple[float, float]:
    t0 = time.monotonic()
    w = store.begin_snapshot(name, {}, parent=parent)
    idx = w.add_region(RegionSpec("heap", 0, len(img) * PAGE, kind="heap"))
    chunks = list(range(0, len(img), CHUNK))

    def work(part: list[int]) -> None:
        for c in part:
            w.put_pages(idx, c, img[c:c + CHUNK])

    pool = [threading.Thread(target=work, args=(chunks[k::threads],)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    t1 = time.monotonic()
    w.commit()
    return t1 - t0, time.monotonic() - t0


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the results."""
    ap = argparse.ArgumentParser(prog="python -m snapfs.store.bench")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default=None, help="where to create the temporary store")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    npages = size // PAGE
    rng = np.random.default_rng(1)
    img = _image(npages, rng)
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        store = Store.open(os.path.join(root, "store"))
        put_s, total_s = _write(store, "full", img, args.threads)
        info = store.info("full")
        print(f"full write: {format_rate(size / total_s)} ({total_s:.2f} s, puts {put_s:.2f} s, "
              f"{args.threads} threads), stored {info.stored_bytes / size:.1%} of {args.size}")
        changed = rng.choice(npages, npages // 100, replace=False)
        img[changed] = rng.integers(0, 256, size=(len(changed), PAGE), dtype=np.uint8)
        _, child_s = _write(store, "child", img, args.threads, parent="full")
        child = store.info("child")
        print(f"incremental (1% changed, content comparison): {child_s:.2f} s = {child_s / total_s:.0%} "
              f"of full, stored {child.stored_bytes / info.stored_bytes:.1%} of full")
        store.close()
        cold = _drop_caches()
        store = Store.open(os.path.join(root, "store"))
        r = store.open_snapshot("full")
        t0 = time.monotonic()
        for off in range(0, size, 128 * 1024):
            r.read(0, off, 128 * 1024)
        seq = size / (time.monotonic() - t0)
        store.close()
        cold = _drop_caches() and cold
        store = Store.open(os.path.join(root, "store"))
        r = store.open_snapshot("full")
        offsets = (rng.integers(0, npages, 20000) * PAGE).tolist()
        t0 = time.monotonic()
        for off in offsets:
            r.read(0, off, PAGE)
        rnd = len(offsets) / (time.monotonic() - t0)
        store.close()
        temp = "cold" if cold else "WARM (not root: page cache not dropped)"
        print(f"sequential 128 KiB reads, {temp}: {format_rate(seq)}")
        print(f"random 4 KiB reads, {temp}: {rnd:,.0f} reads/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
