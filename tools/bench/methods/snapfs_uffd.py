"""snapfs itself (UFFD-WP live snapshot) through its CLI: ``snapfs snapshot PID --json``."""

from __future__ import annotations

import itertools
import resource
import json
import os
import shutil
import subprocess
import sys
import threading
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


class _PeakRss:
    """Samples a process's VmHWM (its peak RSS since exec) every 50 ms until stopped.

    wait4's ru_maxrss is no use here: it also counts the bench's own RSS, which the child
    carries until exec. VmHWM is a high-water mark, so sampling misses only the last interval.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.bytes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.bytes = max(self.bytes, int(line.split()[1]) * 1024)
        except OSError:
            pass

    def _run(self) -> None:
        while not self._done.wait(0.05):
            self._sample()

    def stop(self) -> None:
        """Stop sampling."""
        self._done.set()
        self._thread.join()


class Snapfs(Method):
    """One ``snapfs snapshot`` of the target into a fresh store, optionally with ``--rate``."""

    how = ("snapfs snapshot PID --json --store DIR [--rate R]: pause_ms (the freeze; the earlier short "
           "stop that takes the uffd is attach_pause_ms in results.json), duration_s, stored_bytes and "
           "faults from its JSON (duration = its duration_s; the command's wall time, Python start-up "
           "included, is wall_s in results.json)")

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
        return self.snapshot(target.pid, workdir)

    def snapshot(self, pid: int, workdir: Path) -> Outcome:
        """One snapshot of any process ``pid`` (``run`` without a memwriter)."""
        run = next(_RUNS)
        store = workdir / f"store-{run}"
        argv = [*snapfs_argv(), "snapshot", str(pid), "--json", "--store", str(store),
                "--name", f"bench-{run}"]
        if self.rate:
            argv += ["--rate", self.rate]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        spawned = time.monotonic()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=snapfs_env(), cwd=ROOT)
        peak = _PeakRss(proc.pid)
        try:
            stdout, stderr = proc.communicate(timeout=900)
        finally:
            peak.stop()
        t1 = time.perf_counter()
        exited = time.monotonic()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # only snapfs ended meanwhile
        cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        shutil.rmtree(store, ignore_errors=True)  # only the figures matter; keep disk use flat
        if proc.returncode != 0:
            tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"snapfs snapshot failed (exit {proc.returncode}): {tail[0]}")
        info = json.loads(stdout)
        phases = info.get("phases")
        if phases:  # the process's start-up (imports) and exit, on the same clock
            phases.update(spawned=spawned, exited=exited)
        return Outcome(float(info.get("duration_s") or (t1 - t0)), int(info["stored_bytes"]),
                       tool_pause_ms=float(info["pause_ms"]),
                       extra={"wall_s": round(t1 - t0, 4), "faults": info.get("faults"),
                              "attach_pause_ms": info.get("attach_pause_ms"),
                              "resident_bytes": info.get("resident_bytes"),
                              "zero_bytes": info.get("zero_bytes"),
                              "peak_rss_bytes": peak.bytes, "cpu_s": round(cpu_s, 3),
                              "phases": phases,
                              "warnings": info.get("warnings") or []})
