"""What recording the threads costs inside the freeze, per thread and in total.

    python -m tools.bench.freeze_records [--threads 252] [--rounds 30]

Stops ``coretarget`` (4 busy/blocked threads + the main one + ``--threads`` idle ones) once
and times, interleaved round by round on the same stopped target:

- ``before``: what the freeze recorded until the core view (per thread: PTRACE_GETREGS,
  ``/proc/PID/task/TID/comm``, PTRACE_GETFPREGS);
- ``now``: :meth:`StoppedProcess.record_threads` (per thread: PTRACE_GETREGS and
  PTRACE_GETREGSET of the XSAVE area, the FXSAVE area derived from it);
- ``names``: the thread names, now read after the resume (:func:`coreinfo.thread_names`).

Prints the median and the worst round of each, in ms and µs per thread.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from snapfs.capture import arch
from snapfs.capture.coreinfo import thread_names
from snapfs.capture.freeze import stopped
from tools.targets import build


def _recorded_before_issue_15(proc) -> dict:
    """The per-thread work of ``record_threads`` before it read the XSAVE area (for comparison)."""
    out = {}
    for tid in list(proc.tids):
        regs = proc.get_regs(tid)
        with open(f"/proc/{proc.pid}/task/{tid}/comm") as f:
            comm = f.read().strip()
        out[str(tid)] = {"comm": comm, "regs": {n: int(getattr(regs, n)) for n in arch.REG_NAMES},
                         "fpregs": proc.get_fpregs(tid).hex()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.freeze_records", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=252, help="idle threads beside the 5 named ones")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)
    target = subprocess.Popen([str(build("coretarget")), str(args.threads)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout.readline().startswith("ready")
        times: dict[str, list[float]] = {"before": [], "now": [], "names": []}
        with stopped(target.pid) as proc:
            n = len(proc.tids)
            work = {"before": lambda: _recorded_before_issue_15(proc), "now": proc.record_threads,
                    "names": lambda: thread_names(target.pid, proc.tids)}
            for r in range(args.rounds):
                order = list(work) if r % 2 == 0 else list(reversed(work))
                for key in order:
                    t0 = time.perf_counter()
                    work[key]()
                    times[key].append((time.perf_counter() - t0) * 1e3)
        print(f"{n} threads, {args.rounds} rounds (ms in total; µs per thread)")
        for key, ts in times.items():
            med, worst = statistics.median(ts), max(ts)
            print(f"  {key:7s} median {med:7.3f} ms ({med * 1e3 / n:6.1f} µs/thread)   "
                  f"worst {worst:7.3f} ms ({worst * 1e3 / n:6.1f} µs/thread)")
    finally:
        target.kill()
        target.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
