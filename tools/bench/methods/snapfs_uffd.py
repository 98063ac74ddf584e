"""snapfs itself (UFFD-WP live snapshot) through its CLI: ``snapfs snapshot PID --json``."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools.bench.methods import Method, Outcome
from tools.bench.targets import Target

ROOT = Path(__file__).resolve().parents[3]
_RUNS = itertools.count(1)  # one fresh store per run, across every Snapfs instance


def snapfs_argv() -> list[str]:
    """The command that runs this checkout's snapfs."""
    return [sys.executable, "-m", "snapfs"]


def snapfs_env() -> dict[str, str]:
    """Environment with this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Snapfs(Method):
    """One ``snapfs snapshot`` of the target into a fresh store, optionally with ``--rate``."""

    how = ("snapfs snapshot PID --json --store DIR [--rate R]: pause_ms, duration_s, stored_bytes and "
           "faults from its JSON; duration = wall time of the command (includes Python start-up)")

    def __init__(self, rate: str | None = None) -> None:
        self.rate = rate
        self.name = "snapfs" if rate is None else f"snapfs --rate {rate}"

    def available(self) -> str | None:
        try:
            import snapfs.capture  # noqa: F401
        except ImportError as e:
            return f"snapfs.capture not importable yet ({e})"
        proc = subprocess.run([*snapfs_argv(), "snapshot", "--help"], capture_output=True,
                              text=True, env=snapfs_env(), cwd=ROOT, timeout=60)
        if proc.returncode != 0 or "--json" not in proc.stdout:
            return "`snapfs snapshot --json` is not available in this checkout yet"
        return None

    def run(self, target: Target, workdir: Path) -> Outcome:
        run = next(_RUNS)
        store = workdir / f"store-{run}"
        argv = [*snapfs_argv(), "snapshot", str(target.pid), "--json", "--store", str(store),
                "--name", f"bench-{run}"]
        if self.rate:
            argv += ["--rate", self.rate]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=snapfs_env(), cwd=ROOT,
                              timeout=900)
        t1 = time.perf_counter()
        shutil.rmtree(store, ignore_errors=True)  # only the figures matter; keep disk use flat
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"snapfs snapshot failed (exit {proc.returncode}): {tail[0]}")
        info = json.loads(proc.stdout)
        return Outcome(float(info.get("duration_s") or (t1 - t0)), int(info["stored_bytes"]),
                       tool_pause_ms=float(info["pause_ms"]),
                       extra={"wall_s": round(t1 - t0, 4), "faults": info.get("faults"),
                              "resident_bytes": info.get("resident_bytes"),
                              "zero_bytes": info.get("zero_bytes"),
                              "warnings": info.get("warnings") or []})
