"""Stop cost against thread count (issue 12, goal 2): attach + freeze of a many-thread target
against a 1-thread target of the same size, beside the C floor of stopping and resuming every
thread with ptrace.

``python -m tools.bench.stopcost [--size MIB] [--threads 0,255] [--rounds N] [--json FILE]``

Targets are ``tools/targets/sleepers.c`` (SIZE MiB written, N idle threads + the main one).
Each round measures, interleaved over the thread counts:

- ``capture``: a real capture (``capture_process``): ``attach_ms`` (the short stop that takes a
  userfaultfd) and ``freeze_ms`` (the snapshot instant), as the capture reports them;
- ``stop``: snapfs's stop alone (``snapfs.capture.freeze.stopped``): stop, resume;
- ``floor``: ``tools/bench/stopfloor.c``: PTRACE_SEIZE + PTRACE_INTERRUPT every thread, wait
  for all, then PTRACE_DETACH all, in C.

Reported: medians per thread count, and the goal's ratio (attach + freeze of the most threads
over that of 1 thread; goal <= 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.buildcache import cached_build
from tools.targets import build

HERE = Path(__file__).resolve().parent
BUILD = HERE.parent.parent / "build" / "bench"


def floor_binary() -> Path:
    src = HERE / "stopfloor.c"

    def compile_to(tmp: Path) -> None:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(src)], check=True)

    return cached_build(BUILD / "stopfloor", [src], compile_to)


class Sleepers:
    """A sleepers process (killed on close)."""

    def __init__(self, size_mib: int, threads: int) -> None:
        self.proc = subprocess.Popen([str(build("sleepers")), str(size_mib), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), line
        self.pid = self.proc.pid
        self.threads = threads + 1

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _capture(pid: int) -> dict:
    import trio

    from snapfs.capture import CaptureOptions, capture_process
    from snapfs.store import Store

    async def run():
        with tempfile.TemporaryDirectory(prefix="snapfs-stopcost-") as tmp:
            with Store.open(Path(tmp) / "store", create=True) as store:
                return await capture_process(pid, store, "s", CaptureOptions())

    r = trio.run(run)
    return {"attach_ms": r.attach_pause_ms, "freeze_ms": r.pause_ms,
            "attach_freeze_ms": r.attach_pause_ms + r.pause_ms}


def _stop_only(pid: int) -> dict:
    from snapfs.capture.freeze import stopped

    t0 = time.monotonic()
    with stopped(pid) as proc:
        t1 = time.monotonic()
        group = proc.group
    t2 = group.released_at or time.monotonic()
    return {"stop_ms": (t1 - t0) * 1e3, "resume_ms": (t2 - t1) * 1e3}


def _floor(pid: int) -> dict:
    out = subprocess.run([str(floor_binary()), str(pid), "1"], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.splitlines()[-1])
    return {"stop_ms": row["stop_ms"], "resume_ms": row["resume_ms"], "threads": row["threads"]}


def measure(size_mib: int = 256, threads: tuple[int, ...] = (0, 255), rounds: int = 5,
            log=print) -> dict:
    """Run the rounds; returns {"rows": [...], "summary": {...}}."""
    targets = {n: Sleepers(size_mib, n) for n in threads}
    rows = []
    try:
        for _ in range(1):  # warm-up: first captures build caches, fault in buffers
            for t in targets.values():
                _capture(t.pid)
        for r in range(rounds):
            for n, t in targets.items():
                row = {"round": r, "threads": t.threads, "capture": _capture(t.pid),
                       "stop": _stop_only(t.pid), "floor": _floor(t.pid)}
                rows.append(row)
                log(f"  {t.threads:4d} threads: attach {row['capture']['attach_ms']:.2f} + freeze "
                    f"{row['capture']['freeze_ms']:.2f} ms; stop {row['stop']['stop_ms']:.2f} + resume "
                    f"{row['stop']['resume_ms']:.2f} ms; floor {row['floor']['stop_ms']:.2f} + "
                    f"{row['floor']['resume_ms']:.2f} ms")
    finally:
        for t in targets.values():
            t.close()
    summary = {}
    for n in sorted({row["threads"] for row in rows}):
        mine = [row for row in rows if row["threads"] == n]

        def med(part: str, key: str) -> float:
            return statistics.median(row[part][key] for row in mine)

        summary[n] = {
            "attach_ms": med("capture", "attach_ms"),
            "freeze_ms": med("capture", "freeze_ms"),
            "attach_freeze_ms": med("capture", "attach_freeze_ms"),
            "attach_freeze_max_ms": max(row["capture"]["attach_freeze_ms"] for row in mine),
            # The least of the rounds: what the stop costs when nothing else ran meanwhile
            # (on a loaded machine the median mostly measures the other load).
            "attach_freeze_min_ms": min(row["capture"]["attach_freeze_ms"] for row in mine),
            "stop_ms": med("stop", "stop_ms"),
            "resume_ms": med("stop", "resume_ms"),
            "floor_stop_ms": med("floor", "stop_ms"),
            "floor_resume_ms": med("floor", "resume_ms"),
        }
    lo, hi = min(summary), max(summary)
    ratio = summary[hi]["attach_freeze_ms"] / summary[lo]["attach_freeze_ms"] if lo != hi else None
    return {"size_mib": size_mib, "rounds": rounds, "rows": rows,
            "summary": {str(k): v for k, v in summary.items()},
            "ratio": ratio, "threads_low": lo, "threads_high": hi}


def report(result: dict) -> str:
    """A markdown table of the summary."""
    lines = [f"Stop cost by thread count ({result['size_mib']} MiB target, median of "
             f"{result['rounds']} interleaved rounds; ms)", "",
             "| threads | attach | freeze | attach + freeze (min-max) | snapfs stop / resume | C floor stop / resume |",
             "|---:|---:|---:|---:|---:|---:|"]
    for n, s in result["summary"].items():
        lines.append(f"| {n} | {s['attach_ms']:.2f} | {s['freeze_ms']:.2f} | {s['attach_freeze_ms']:.2f} "
                     f"({s['attach_freeze_min_ms']:.2f}-{s['attach_freeze_max_ms']:.2f}) | "
                     f"{s['stop_ms']:.2f} / {s['resume_ms']:.2f} | "
                     f"{s['floor_stop_ms']:.2f} / {s['floor_resume_ms']:.2f} |")
    if result["ratio"] is not None:
        ok = "met" if result["ratio"] <= 2 else "not met"
        lines += ["", f"attach + freeze, {result['threads_high']} threads / {result['threads_low']} "
                      f"thread: x{result['ratio']:.2f} (goal <= 2: {ok})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.stopcost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="target size in MiB (default 256)")
    p.add_argument("--threads", default="0,255", help="extra idle threads per target (default 0,255)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    result = measure(args.size, tuple(int(x) for x in args.threads.split(",")), args.rounds)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
