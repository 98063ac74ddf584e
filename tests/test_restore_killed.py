"""A restore killed half-way never leaves a half-restored process running.

snapfs is SIGKILLed at its N-th ptrace call (or N-th process_vm_writev) by strace's fault
injection while it restores ptrchase (6 threads, a mutator at full speed). Whatever N, the
target is then either running soundly (killed before anything was written, or after every
thread got its final state), or parked (every thread waiting in pause() with every signal
blocked); and running the same restore again always finishes it: the target continues
from the snapshot's state and finds nothing broken.

The in-suite sweep samples N across the whole restore; ``tools/torture_restore.py`` runs
every N (the case list for tools/torture).
"""

from __future__ import annotations

import shutil

import pytest

from tools.torture_restore import RestoreKillCase, count_calls, prepared_target

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")


@pytest.fixture
def prepared(tmp_path, target_bin):
    with prepared_target(tmp_path, target_bin("ptrchase")) as p:
        yield p


def test_killed_at_sampled_ptrace_calls_never_runs_a_half_restored_image(prepared):
    total = count_calls(prepared, "ptrace")
    assert total > 40, total  # the sweep below reaches every phase of the restore
    outcomes = []
    for n in sorted({1, 5, 13, 20, 30, total // 2, total - 10, total - 3, total - 1}):
        outcomes.append(RestoreKillCase("ptrace", n).run(prepared))
    states = {o.state for o in outcomes}
    assert "untouched" in states and states & {"parked", "partly parked"}, outcomes


def test_killed_while_writing_memory_is_parked_and_finished_by_a_rerun(prepared):
    writes = count_calls(prepared, "process_vm_writev")
    assert writes >= 1
    for n in sorted({1, max(1, writes // 2), writes}):
        outcome = RestoreKillCase("process_vm_writev", n).run(prepared)
        assert outcome.state == "parked", outcome
