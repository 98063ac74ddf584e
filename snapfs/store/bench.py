"""Store micro-benchmark: write path against zstd alone, incremental, cold reads.

    python -m snapfs.store.bench [--size 1G] [--dir /var/tmp] [--threads 2]

Builds a synthetic memory image (pages at random: 30% zero, 40% low-entropy, 30% random bytes),
then measures, best of ``--repeat``:

* zstd alone: the same 2 MiB chunks handed to the same ``--threads`` threads, each doing only
  the unavoidable work (zero check, gather of the non-zero pages, zstd in 128 KiB frames at the
  store's level; no hashing, CRC or I/O) - the floor the write path is judged against;
* the full write through SnapshotWriter.put_pages from ``--threads`` threads, then commit
  (fsync included), both as a rate over all bytes and as a fraction of zstd alone;

then a child with 1% of the pages changed (content comparison), then reads the full snapshot
back after dropping the page cache (needs root; otherwise the reads are warm and say so).
Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

import numpy as np
import zstandard

from snapfs.store import RegionSpec, Store
from snapfs.units import format_rate, parse_size

PAGE = 4096
CHUNK = 512          # pages per put (2 MiB), as the capture's scan hands them over


def _image(npages: int, rng: np.random.Generator) -> np.ndarray:
    """30% zero pages, 40% low-entropy (compressible), 30% random bytes, placed at random."""
    img = np.empty((npages, PAGE), np.uint8)
    block = rng.integers(0, 16, size=(4096, PAGE), dtype=np.uint8)
    for i in range(0, npages, 4096):
        img[i:i + 4096] = block[:min(4096, npages - i)]
    kind = rng.random(npages)
    img[kind < 0.3] = 0
    noisy = np.flatnonzero(kind >= 0.7)
    for i in range(0, len(noisy), 4096):
        sel = noisy[i:i + 4096]
        img[sel] = rng.integers(0, 256, size=(len(sel), PAGE), dtype=np.uint8)
    return img


def _run_threads(img: np.ndarray, threads: int, work: "callable") -> None:
    """Call ``work(first_page)`` for every CHUNK of ``img``, chunks dealt round-robin to threads."""
    chunks = list(range(0, len(img), CHUNK))

    def loop(part: list[int]) -> None:
        for c in part:
            work(c)

    pool = [threading.Thread(target=loop, args=(chunks[k::threads],)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def _zstd_alone(img: np.ndarray, threads: int, level: int) -> tuple[float, float]:
    """(wall, process CPU) seconds zstd alone needs for ``img``: zero check, gather, 128 KiB
    frames; no I/O. CPU seconds are what to compare on a busy machine."""
    local = threading.local()
    frame = 32 * PAGE

    def work(c: int) -> None:
        cctx = getattr(local, "cctx", None)
        if cctx is None:
            cctx = local.cctx = zstandard.ZstdCompressor(level=level)
        pages = img[c:c + CHUNK]
        data = memoryview(pages[np.bitwise_or.reduce(pages.view("<u8"), axis=1) != 0]).cast("B")
        for o in range(0, len(data), frame):
            cctx.compress(data[o:o + frame])

    t0, c0 = time.monotonic(), time.process_time()
    _run_threads(img, threads, work)
    return time.monotonic() - t0, time.process_time() - c0


def _write(store: Store, name: str, img: np.ndarray, threads: int,
           parent: str | None = None) -> tuple[float, float, float]:
    """(seconds of put_pages, seconds including commit, process CPU seconds of the puts)."""
    t0, c0 = time.monotonic(), time.process_time()
    w = store.begin_snapshot(name, {}, parent=parent)
    idx = w.add_region(RegionSpec("heap", 0, len(img) * PAGE, kind="heap"))
    _run_threads(img, threads, lambda c: w.put_pages(idx, c, img[c:c + CHUNK]))
    t1, c1 = time.monotonic(), time.process_time()
    w.commit()
    return t1 - t0, time.monotonic() - t0, c1 - c0


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
    ap.add_argument("--repeat", type=int, default=3, help="best of N for the write measurements")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    npages = size // PAGE
    rng = np.random.default_rng(1)
    img = _image(npages, rng)
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        store = Store.open(os.path.join(root, "store"))
        zstd_s = zstd_cpu = put_s = total_s = put_cpu = float("inf")
        for i in range(max(1, args.repeat)):       # best of N: noise only ever slows things down
            z, zc = _zstd_alone(img, args.threads, store.level)
            zstd_s, zstd_cpu = min(zstd_s, z), min(zstd_cpu, zc)
            if i:
                store.remove("full")
                store.gc()
            p, t, pc = _write(store, "full", img, args.threads)
            put_s, total_s, put_cpu = min(put_s, p), min(total_s, t), min(put_cpu, pc)
        info = store.info("full")
        print(f"zstd alone (level {store.level}, 128 KiB frames, zero pages skipped, {args.threads} threads): "
              f"{format_rate(size / zstd_s)} ({zstd_s:.2f} s)")
        print(f"full write puts: {format_rate(size / put_s)} ({put_s:.2f} s) = x{zstd_s / put_s:.2f} of zstd "
              f"alone")
        print(f"full write with commit: {format_rate(size / total_s)} ({total_s:.2f} s, commit "
              f"{total_s - put_s:.2f} s) = x{zstd_s / total_s:.2f} of zstd alone, "
              f"stored {info.stored_bytes / size:.1%} of {args.size}")
        print(f"CPU seconds (robust on a busy machine): zstd alone {zstd_cpu:.2f} s, puts {put_cpu:.2f} s "
              f"= x{zstd_cpu / put_cpu:.2f}")
        changed = rng.choice(npages, npages // 100, replace=False)
        img[changed] = rng.integers(0, 256, size=(len(changed), PAGE), dtype=np.uint8)
        _, child_s, _ = _write(store, "child", img, args.threads, parent="full")
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
