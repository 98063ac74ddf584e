"""Build-on-demand for the test and benchmark programs (targets, guests)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Sequence
from pathlib import Path


def cached_build(out: Path, inputs: Sequence[Path], make: Callable[[Path], None]) -> Path:
    """Return ``out``, first running ``make(tmp)`` to produce it if it is missing or older
    than any of ``inputs``. A lock serialises parallel builders; ``tmp`` is renamed over
    ``out`` only once ``make`` succeeded, so nobody ever runs a half-written binary."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        newest = max(p.stat().st_mtime for p in inputs)
        if not out.exists() or out.stat().st_mtime < newest:
            tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
            make(tmp)
            os.replace(tmp, out)
    return out
