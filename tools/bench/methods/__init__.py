"""The snapshot methods compared by the bench, one module per peer.

Each method module has a ``Method`` subclass with ``name``, ``available() -> str | None`` (the
reason it cannot run, or None) and ``run(target, workdir) -> Outcome``. The runner brackets
every run with target windows, so the pause and throughput figures come from the target itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tools.bench.targets import Target


@dataclass
class Outcome:
    """What a method reports about one snapshot of a target."""

    duration_s: float                 # wall time of the whole snapshot, start to image complete
    image_bytes: int                  # bytes of the image (compressed data + index)
    tool_pause_ms: float | None = None  # the pause as the tool itself measures it, if it does
    extra: dict = field(default_factory=dict)


class Method:
    """A snapshot method; subclasses implement ``run``."""

    name = "?"
    how = ""  # one sentence: how its figures are measured

    def available(self) -> str | None:
        """None when the method can run here, else the reason it cannot."""
        return None

    def run(self, target: Target, workdir: Path) -> Outcome:
        """Snapshot ``target`` once; the image goes under ``workdir`` and may be deleted."""
        raise NotImplementedError
