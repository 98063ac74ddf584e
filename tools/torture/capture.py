"""The capture campaign: ``snapfs snapshot PID`` killed at every ptrace call and at random
moments, on targets running and blocked in system calls, with 1 and 4 threads."""

from __future__ import annotations

from pathlib import Path

from tools.torture.core import Budget, Tally, register
from tools.torture.sweep import FaultCase, sweep


def _snapshot(pid: int, workdir: Path) -> list[str]:
    return ["snapshot", str(pid)]


CASES = [
    FaultCase("spin-1", ("regcheck", "spin", "1"), _snapshot, signals=True),
    FaultCase("spin-4", ("regcheck", "spin", "4"), _snapshot, signals=True),
    # The leader blocked in read (injected into, re-executes its read), the others in
    # nanosleep, futex and poll.
    FaultCase("blocked", ("regcheck", "block"), _snapshot),
    # The leader in nanosleep: the injection goes to another thread.
    FaultCase("blocked-sleep", ("regcheck", "sleep"), _snapshot),
]


@register("capture", "snapfs snapshot killed at every ptrace call and at random moments")
def run(budget: Budget, tally: Tally, log) -> None:
    sweep(CASES, budget, tally, log)
