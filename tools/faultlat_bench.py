"""Write-fault round-trip latency of the capture engine, as the target sees it.

    .venv/bin/python tools/faultlat_bench.py [--pages 65536] [--writes 2000] [--gap-us 200]
                                             [--runs 3] [--rate 0] [--workers 0]

Starts tools/targets/faultlat.c with ``--pages`` populated pages (65536 = 256 MiB), takes a
live snapshot of it into a temporary store and, as soon as the capture's background phase
starts, lets the target do ``--writes`` scattered one-byte writes ``--gap-us`` apart. The
target times each write itself; writes that hit a page the scan already unprotected take
well under 2 us and are not counted. Prints the target's p50/p90/p99/max per run.
``SNAPFS_NO_NATIVE=1`` measures the Python fault thread alone (no native fault loop); with
``FAULTLAT_TRACE=FILE`` the target also writes each slow write's address, start and duration.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapfs.capture import CaptureOptions, capture_process  # noqa: E402
from snapfs.store import Store  # noqa: E402
from tests.support.capture import Target  # noqa: E402


async def one_run(pages: int, writes: int, gap_us: int, rate: float | None, workers: int) -> dict:
    """One capture of a fresh faultlat target; the target's own latency figures."""
    with tempfile.TemporaryDirectory() as tmp, Target(
        "faultlat", str(pages), str(writes), str(gap_us)
    ) as target:
        started = False

        def progress(_p) -> None:
            nonlocal started
            if not started:  # the first call comes when the background phase starts
                started = True
                target.proc.stdin.write("go\n")
                target.proc.stdin.flush()

        with Store.open(Path(tmp) / "store", create=True) as store:
            result = await capture_process(
                target.pid, store, "bench", CaptureOptions(rate=rate, workers=workers), progress=progress
            )
        line = await trio.to_thread.run_sync(target.proc.stdout.readline)
        figures = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}
        figures["served"] = result.faults
        figures["capture_s"] = result.duration_s
        return figures


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=65536)
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--gap-us", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="compression threads (0: cores)")
    ap.add_argument("--rate", type=float, default=0, help="scan rate limit, bytes/s (0: none)")
    args = ap.parse_args()
    for i in range(args.runs):
        f = await one_run(args.pages, args.writes, args.gap_us, args.rate or None, args.workers)
        print(
            f"run {i + 1}: n={f.get('n', 0):.0f} p50={f.get('p50_us', 0):.1f}us "
            f"p90={f.get('p90_us', 0):.1f}us p99={f.get('p99_us', 0):.1f}us "
            f"max={f.get('max_us', 0):.1f}us served={f['served']} capture={f['capture_s']:.2f}s",
            flush=True,
        )


if __name__ == "__main__":
    trio.run(main)
