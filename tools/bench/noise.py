"""What else held the CPUs while the target stalled: sampled beside every method's run.

A stall the target measures is not all the method's doing on this machine: the hypervisor
takes the vCPUs away (steal: 100-370 ms per 3-5 s row in a loaded bench run), and the
platform's DAMON thread (``kdamond``: a kernel thread doing its sampling and page-out in
chunks of up to ~9 ms, never preempted under ``preempt=none``; seen in a sched trace running
9 ms on the CPU a writer was queued on) takes a CPU. Every ``PERIOD`` seconds a thread of the
bench reads:

- ``/proc/stat``: steal per CPU (USER_HZ ticks, so 10 ms resolution);
- ``/proc/<kdamond>/schedstat``: the DAMON threads' time on a CPU (ns).

:meth:`NoiseSampler.explain` gives, for one logged stall, what grew between the last sample
before it and the first after it (so up to one period either side is counted too: an upper
bound, clipped to the stall's length): the most steal on one CPU and kdamond's CPU time.
(A stalled thread's own run-queue wait was sampled too at first, but with 4 writers on 2 CPUs
each writer waits half the time anyway: the margins of a 10 ms sample swamped the stall.)
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left, bisect_right
from pathlib import Path

PERIOD = 0.010  # s; steal has 10 ms resolution anyway, and the sampler must stay cheap


def _kdamond_pids() -> list[int]:
    """The kernel's DAMON threads (none where DAMON is not running)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().startswith("kdamond"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _read_runtime_ns(path: str) -> int:
    """The first field of a ``schedstat``: time on a CPU (ns); 0 once the thread is gone."""
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return 0


class NoiseSampler:
    """Samples host steal and kdamond's CPU time until stopped (a context manager)."""

    def __init__(self, period: float = PERIOD) -> None:
        self.period = period
        self._kdamond = [f"/proc/{p}/schedstat" for p in _kdamond_pids()]
        self.times: list[float] = []
        self.steal: list[list[int]] = []          # per sample, per CPU (ticks)
        self.kdamond_ns: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_ms = 1000 / os.sysconf("SC_CLK_TCK")

    def _sample(self, stat) -> None:
        stat.seek(0)
        cpus = [line.split() for line in stat.read().split(b"\n")[1:] if line.startswith(b"cpu")]
        self.steal.append([int(f[8]) for f in cpus])
        self.kdamond_ns.append(sum(_read_runtime_ns(p) for p in self._kdamond))
        self.times.append(time.monotonic())

    def _run(self, stat) -> None:
        while not self._stop.wait(self.period):
            self._sample(stat)

    def __enter__(self) -> NoiseSampler:
        # The first and last samples are taken here, so they bracket the block exactly.
        self._stat = open("/proc/stat", "rb", buffering=0)
        self._sample(self._stat)
        self._thread = threading.Thread(target=self._run, args=(self._stat,), name="bench-noise", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample(self._stat)
        self._stat.close()

    @property
    def steal_s(self) -> float:
        """Host steal over the whole sampled time, all CPUs together (the row's figure)."""
        if len(self.steal) < 2:
            return 0.0
        return (sum(self.steal[-1]) - sum(self.steal[0])) * self._tick_ms / 1e3

    def explain(self, end: float, ms: float) -> dict | None:
        """For a stall of ``ms`` ending at ``end`` (CLOCK_MONOTONIC s): ``steal_ms`` (the most
        on one CPU) and ``kdamond_ms``, each clipped to ``ms``. None outside the sampled time."""
        start = end - ms / 1e3
        lo = bisect_right(self.times, start) - 1
        hi = bisect_left(self.times, end)
        if lo < 0 or hi >= len(self.times):
            return None
        steal = max((b - a for a, b in zip(self.steal[lo], self.steal[hi])), default=0) * self._tick_ms
        kd = (self.kdamond_ns[hi] - self.kdamond_ns[lo]) / 1e6
        # Rounded first, then clipped: rounding a value clipped to 1.787 gave 1.79 > the stall.
        return {"steal_ms": min(round(max(steal, 0.0), 2), ms), "kdamond_ms": min(round(max(kd, 0.0), 2), ms)}
