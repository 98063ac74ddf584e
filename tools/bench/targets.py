"""Target processes for the bench: memwriter (tools/targets/memwriter.c) driven by signals.

A ``Target`` starts memwriter, waits for its ready line, and measures windows: ``window()``
asks for a report (SIGUSR1) and returns the stats since the previous one, so a method's run is
bracketed by two reports and the second one holds what the target suffered during it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools.targets import build


@dataclass
class TargetSpec:
    """How to run a memwriter: size, content mix, writers, write rate (pages/s, -1 = max)."""

    size: int
    rate: float
    threads: int = 1
    mix: tuple[int, int, int] = (30, 40, 30)
    access: str = "uniform"
    thp: bool = False
    idle_threads: int = 0      # threads waking every 10 ms (a JVM has hundreds)
    gc_rate: float = 0         # GC cycles/s over a pool of arenas (drop, re-allocate, copy)
    mappings: int = 0          # the region split into this many VMAs
    fork_dump: str | None = None  # where the fork peer's child writes the region (SIGHUP)

    def argv(self, binary: Path, handoff: str | None) -> list[str]:
        """The memwriter command line."""
        argv = [str(binary), "--size", str(self.size), "--threads", str(self.threads),
                "--rate", "max" if self.rate < 0 else str(self.rate),
                "--mix", ",".join(map(str, self.mix)), "--access", self.access]
        if self.thp:
            argv.append("--thp")
        if self.idle_threads:
            argv += ["--idle-threads", str(self.idle_threads)]
        if self.gc_rate:
            argv += ["--gc-rate", f"{self.gc_rate:g}"]
        if self.mappings > 1:
            argv += ["--mappings", str(self.mappings)]
        if self.fork_dump:
            argv += ["--fork-dump", self.fork_dump]
        if handoff:
            argv += ["--uffd-handoff", handoff]
        return argv

    @property
    def rate_label(self) -> str:
        """Human label of the write rate."""
        return "max" if self.rate < 0 else f"{int(self.rate)}"


@dataclass
class Window:
    """One memwriter report: what the target did and suffered since the previous report."""

    seconds: float
    writes: int
    writes_per_s: float
    max_stall_us: float
    slow_writes: int
    slow_p50_us: float | None
    slow_p99_us: float | None
    raw: dict = field(repr=False)
    # The window's longest stalls: (end, ms, who) with end in CLOCK_MONOTONIC seconds (the
    # clock of time.monotonic()); who = writer index, 1000 + idle thread, 3000 GC, 3001 fork.
    stalls: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def from_report(cls, r: dict) -> Window:
        """Parse a memwriter ``report`` line."""
        def opt(v: float) -> float | None:
            return None if v < 0 else v
        return cls(r["window_s"], r["writes"], r["writes_per_s"], r["max_stall_us"],
                   r["slow_writes"], opt(r["slow_p50_us"]), opt(r["slow_p99_us"]), r,
                   [tuple(x) for x in r.get("stalls", [])])


class TargetError(RuntimeError):
    """The target did not start or stopped answering."""


class Target:
    """A running memwriter. Use as a context manager; it is always terminated on exit."""

    def __init__(self, spec: TargetSpec, handoff: bool = True) -> None:
        self.spec = spec
        self._tmp = tempfile.TemporaryDirectory(prefix="snapfs-bench-")
        self.handoff_path = os.path.join(self._tmp.name, "uffd.sock") if handoff else None
        self.proc = subprocess.Popen(spec.argv(build("memwriter"), self.handoff_path),
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.pid = self.proc.pid
        self._lines: queue.Queue[dict | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.ready = self._next("ready", timeout=120)
        except BaseException:
            self.close()
            raise
        self.base = int(self.ready["base"], 16)
        self.size = int(self.ready["size"])
        self.nonzero_bytes = int(self.ready["nonzero_bytes"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._lines.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self._lines.put(None)

    def _next(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TargetError(f"memwriter pid {self.pid}: no '{event}' line in {timeout:.0f} s") from None
            if msg is None:
                raise TargetError(f"memwriter pid {self.pid} exited (code {self.proc.poll()})")
            if msg.get("event") == event:
                return msg

    def window(self, timeout: float = 30) -> Window:
        """Close the current measuring window and return its stats (SIGUSR1 → report)."""
        os.kill(self.pid, signal.SIGUSR1)
        return Window.from_report(self._next("report", timeout))

    def fork_save(self, timeout: float = 300) -> dict:
        """The fork peer: SIGHUP makes the target fork a child that writes the region out
        (spec.fork_dump); returns the target's "forked" line once the child is reaped."""
        os.kill(self.pid, signal.SIGHUP)
        return self._next("forked", timeout)

    def settle(self, seconds: float) -> Window:
        """Let the target run undisturbed for ``seconds``; return that window (the "before")."""
        self.window()
        time.sleep(seconds)
        return self.window()

    def huge_bytes(self) -> int:
        """Bytes of the target backed by transparent huge pages (AnonHugePages)."""
        try:
            for line in open(f"/proc/{self.pid}/smaps_rollup"):
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def close(self) -> None:
        """Terminate the target (SIGCONT first, in case a peer left it stopped)."""
        if self.proc.poll() is None:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._tmp.cleanup()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
