"""A synthetic snapshot writer: deterministic page images fed through SnapshotWriter.

Used by the store's tests (crash safety runs it as a process and SIGKILLs it) and by any test
that needs a populated store without a real capture (FUSE tests)::

    python -m tests.support.synthetic STORE NAME --seed 1 --pages 2048,300 [--version 1 --parent P]

Image of region r under seed s, version v: page p is a HOLE when p % 11 == 5, ZERO when
p % 7 == 3, else DATA (low-entropy bytes, every 13th page incompressible); each version 1..v
rewrites ``changed_fraction`` of the DATA pages. :func:`expected_image` gives the bytes a
reader must return (holes read as zeros).
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

import numpy as np

from snapfs.store.model import DATA, HOLE, ZERO, RegionSpec, SnapshotInfo

PAGE = 4096


def region_kinds(npages: int) -> np.ndarray:
    """HOLE/ZERO/DATA per page of a synthetic region."""
    p = np.arange(npages)
    kinds = np.full(npages, DATA, np.uint8)
    kinds[p % 7 == 3] = ZERO
    kinds[p % 11 == 5] = HOLE
    return kinds


def region_image(seed: int, region: int, npages: int, version: int = 0,
                 changed_fraction: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(pages as uint8 array (npages, 4096), kinds) of region ``region`` at ``version``."""
    kinds = region_kinds(npages)
    rng = np.random.default_rng([seed, region])
    img = rng.integers(0, 8, size=(npages, PAGE), dtype=np.uint8)
    noisy = np.flatnonzero(np.arange(npages) % 13 == 0)
    img[noisy] = rng.integers(0, 256, size=(len(noisy), PAGE), dtype=np.uint8)
    data_pages = np.flatnonzero(kinds == DATA)
    for v in range(1, version + 1):
        vrng = np.random.default_rng([seed, region, v])
        k = max(1, int(len(data_pages) * changed_fraction))
        changed = vrng.choice(data_pages, size=min(k, len(data_pages)), replace=False)
        img[changed] = vrng.integers(0, 256, size=(len(changed), PAGE), dtype=np.uint8)
    img[kinds != DATA] = 0
    return img, kinds


def expected_image(seed: int, region: int, npages: int, version: int = 0,
                   changed_fraction: float = 0.01) -> bytes:
    """The bytes a reader must return for the whole synthetic region."""
    return region_image(seed, region, npages, version, changed_fraction)[0].tobytes()


def write_synthetic(store: Any, name: str, seed: int, region_pages: list[int], version: int = 0,
                    parent: str | None = None, changed_fraction: float = 0.01, threads: int = 1,
                    meta: dict[str, Any] | None = None, on_begin: Any = None) -> SnapshotInfo:
    """Write a synthetic snapshot: pages in random-sized chunks (many single pages), shuffled.

    With ``threads`` > 1 the puts are spread over that many threads (as the capture engine does).
    """
    rng = np.random.default_rng([seed, version, 99])
    w = store.begin_snapshot(name, dict(meta or {"pid": 4242, "comm": "synthetic", "kind": "process"}),
                             parent=parent)
    with w:
        if on_begin is not None:
            on_begin()
        jobs = []
        for r, npages in enumerate(region_pages):
            idx = w.add_region(RegionSpec(f"region{r}", 0x10000000 * (r + 1), npages * PAGE, "rw-p",
                                          0, None, "anon", PAGE, {"synthetic": True}))
            img, kinds = region_image(seed, r, npages, version, changed_fraction)
            pos = 0
            while pos < npages:
                n = int(rng.choice([1, 1, 1, 3, 17, 64, 200]))
                n = min(n, npages - pos)
                jobs.append((idx, pos, img[pos:pos + n], kinds[pos:pos + n] != HOLE))
                pos += n
        order = rng.permutation(len(jobs))

        def work(part: np.ndarray) -> None:
            for j in part.tolist():
                idx, first, pages, mask = jobs[j]
                w.put_pages(idx, first, pages, mask)

        parts = np.array_split(order, threads)
        pool = [threading.Thread(target=work, args=(p,)) for p in parts[1:]]
        for t in pool:
            t.start()
        work(parts[0])
        for t in pool:
            t.join()
        w.put_blob("synthetic", f"{name}:{seed}:{version}".encode())
        return w.commit({"pause_ms": 1.5})


def main(argv: list[str] | None = None) -> int:
    """CLI: write one synthetic snapshot; prints 'ready' once begun, 'committed NAME' at the end."""
    ap = argparse.ArgumentParser(prog="python -m tests.support.synthetic")
    ap.add_argument("store")
    ap.add_argument("name")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pages", default="1024", help="pages per region, comma separated")
    ap.add_argument("--version", type=int, default=0)
    ap.add_argument("--parent")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from snapfs.store import Store
    store = Store.open(args.store)

    def ready() -> None:
        print("ready", flush=True)

    write_synthetic(store, args.name, args.seed, [int(x) for x in args.pages.split(",")],
                    args.version, args.parent, threads=args.threads, on_begin=ready)
    print(f"committed {args.name}", flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
