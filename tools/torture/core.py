"""The tally every campaign adds to, the budget it is given, and the campaign registry."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Budget:
    """How much a campaign may do: ``positions`` fault positions per case (None: every one;
    for a bad-input campaign: flips or mutations per case, None: its default),
    ``random_kills`` kills at random delays per case, ``cases`` to run (None: all), and a
    wall-clock ``seconds`` limit (None: none) checked between runs."""

    positions: int | None = None
    random_kills: int = 5
    cases: list[str] | None = None
    seconds: float | None = None
    seed: int = 1
    started: float = field(default_factory=time.monotonic)

    def exhausted(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.started > self.seconds

    def wants(self, case: str) -> bool:
        return self.cases is None or case in self.cases


@dataclass
class Tally:
    """What the campaigns did; ``problems`` lists each harm or wrong read in one line."""

    cases: int = 0
    faults: int = 0
    harmed_targets: int = 0
    bad_inputs: int = 0
    wrong_reads: int = 0
    problems: list[str] = field(default_factory=list)

    def case(self) -> None:
        self.cases += 1

    def fault(self) -> None:
        self.faults += 1

    def harmed(self, why: str) -> None:
        self.harmed_targets += 1
        self.problems.append(f"HARMED: {why}")

    def bad_input(self) -> None:
        self.bad_inputs += 1

    def wrong_read(self, why: str) -> None:
        self.wrong_reads += 1
        self.problems.append(f"WRONG READ: {why}")

    @property
    def ok(self) -> bool:
        return self.harmed_targets == 0 and self.wrong_reads == 0

    def summary(self) -> str:
        return (f"cases {self.cases}, faults injected {self.faults}, targets harmed "
                f"{self.harmed_targets} (must be 0), bad inputs tried {self.bad_inputs}, "
                f"wrong reads {self.wrong_reads} (must be 0)")

    def to_json(self) -> dict:
        return {"cases": self.cases, "faults": self.faults, "harmed": self.harmed_targets,
                "bad_inputs": self.bad_inputs, "wrong_reads": self.wrong_reads,
                "problems": list(self.problems)}


Campaign = Callable[[Budget, Tally, Callable[[str], None]], None]
CAMPAIGNS: dict[str, tuple[str, Campaign]] = {}


def register(name: str, description: str) -> Callable[[Campaign], Campaign]:
    """Decorator: make a campaign function runnable as ``--campaign name``."""

    def add(fn: Campaign) -> Campaign:
        CAMPAIGNS[name] = (description, fn)
        return fn

    return add
