"""The restore campaign: ``snapfs incoming --pid`` killed at every ptrace and
process_vm_writev call of a restore (the case list of ``tools/torture_restore.py``), counted
in the common tally."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from tools.torture.core import Budget, Tally, register
from tools.torture.sweep import choose


@register("restore", "snapfs incoming --pid killed at every ptrace / process_vm_writev call")
def run(budget: Budget, tally: Tally, log) -> None:
    from tools.targets import build
    from tools.torture_restore import RestoreKillCase, count_calls, prepared_target

    rng = random.Random(budget.seed)
    for change in (None, "grow"):
        name = "restore" + (f"-{change}" if change else "")
        if not budget.wants(name) or budget.exhausted():
            continue
        tally.case()
        todo: list[tuple[str, int]] | None = None
        before = tally.harmed_targets
        while todo is None or todo:
            with tempfile.TemporaryDirectory(prefix="snapfs-torture-restore-") as d, \
                    prepared_target(Path(d), build("ptrchase")) as p:
                if todo is None:
                    every = [(s, k) for s in ("ptrace", "process_vm_writev")
                             for k in range(1, count_calls(p, s, change) + 1)]
                    todo = [every[i - 1] for i in choose(len(every), budget.positions, rng)]
                    log(f"{name}: {len(every)} calls per restore; killing snapfs at {len(todo)} of them")
                while todo and not budget.exhausted():
                    syscall, k = todo.pop(0)
                    tally.fault()
                    try:
                        RestoreKillCase(syscall, k, change).run(p)
                    except AssertionError as exc:
                        tally.harmed(f"{name} kill at {syscall} call {k}: {str(exc).splitlines()[0]}")
                        if p.target.proc.poll() is not None:
                            break  # a fresh target for the rest
                if budget.exhausted():
                    todo = []
        log(f"{name}: harmed {tally.harmed_targets - before}")
