"""The fault campaigns of ``python -m tools.torture`` on a small budget (the full sweep is
the tool): SIGKILL of snapfs at a spread of its ptrace calls and at random moments never
harms the target."""

from __future__ import annotations

import shutil

import pytest

from tools.torture.campaigns import CAMPAIGNS
from tools.torture.core import Budget, Tally

pytestmark = [pytest.mark.torture, pytest.mark.timeout(900)]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("case,positions", [("spin-4", 6), ("blocked", 6), ("blocked-sleep", 16)])
def test_capture_killed_at_any_moment(case, positions):
    # blocked-sleep: the leader sleeps in nanosleep (a restart-block call), so the attach must
    # inject into another thread; 16 positions cover the injection window.
    tally = Tally()
    lines: list[str] = []
    CAMPAIGNS["capture"][1](Budget(positions=positions, random_kills=2, cases=[case], seed=7), tally,
                            lines.append)
    assert tally.cases == 1 and tally.faults >= 5, lines
    assert tally.ok, "\n".join(tally.problems + lines)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_capture_killed_at_every_ptrace_call():
    tally = Tally()
    lines: list[str] = []
    CAMPAIGNS["capture"][1](Budget(positions=None, random_kills=5), tally, lines.append)
    assert tally.ok, "\n".join(tally.problems + lines)
