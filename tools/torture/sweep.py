"""Fault sweeps: run a snapfs command against a self-verifying target, killing snapfs at every
ptrace call it makes (``strace -e inject=ptrace:signal=KILL:when=N``) and at random delays,
and check the target each time.

A :class:`FaultCase` says which target to start, which snapfs command to run on it (and what
to prepare first); :func:`sweep` does the rest. Targets speak regcheck's protocol on stdin /
stdout (``tools/targets/regcheck.c``): "ready" once started, ``c`` -> "ok c N" when every
check passed (a corruption makes it print FAIL and exit), ``s`` -> "ok s N" signals counted.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tools.targets import build
from tools.torture.core import Budget, Tally

ROOT = Path(__file__).resolve().parent.parent.parent
SIGNAL = signal.SIGRTMIN + 1  # counted by regcheck's spin mode


@dataclass
class FaultCase:
    """One target kind and one snapfs command to sweep faults over.

    ``command(pid, workdir)`` returns the snapfs arguments (after ``snapfs``);
    ``stdin(pid, workdir)`` an optional file for its standard input; ``setup(target,
    workdir)`` runs once per run before the command (e.g. take a snapshot to restore);
    ``signals``: send queued real-time signals to the target all through the run and check
    that every one arrived.
    """

    name: str
    target: tuple[str, ...]
    command: Callable[[int, Path], list[str]]
    stdin: Callable[[int, Path], Path | None] | None = None
    setup: Callable[[RunningTarget, Path], None] | None = None
    signals: bool = False
    env: dict[str, str] = field(default_factory=dict)


class RunningTarget:
    """A started target program speaking regcheck's protocol (killed on close)."""

    def __init__(self, argv: tuple[str, ...]) -> None:
        exe = build(argv[0])
        self.proc = subprocess.Popen([str(exe), *argv[1:]], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"target {argv} did not start: {line!r}")
        self.pid = self.proc.pid

    def ask(self, cmd: str) -> str:
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        return self.proc.stdout.readline().strip()

    def check(self, rounds: int = 2) -> str | None:
        """None if the target passes ``rounds`` checks, else what went wrong."""
        for _ in range(rounds):
            reply = self.ask("c")
            if not reply.startswith("ok c"):
                code = self.proc.poll()
                return reply or f"target died (status {code})"
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def released(pid: int, timeout: float = 3.0) -> str | None:
    """None if ``pid`` is untraced, has no stopped thread and holds no userfaultfd (waiting up
    to ``timeout`` for the kernel to detach a killed tracer), else what is wrong."""
    deadline = time.monotonic() + timeout
    while True:
        problem = _release_problem(pid)
        if problem is None or time.monotonic() > deadline:
            return problem
        time.sleep(0.01)


def _release_problem(pid: int) -> str | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "target is gone"
    tracer = next(line.split()[1] for line in status.splitlines() if line.startswith("TracerPid:"))
    if tracer != "0":
        return f"still traced by {tracer}"
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("t", "T"):
            return f"thread {tid} left stopped ({state})"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "userfaultfd" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                return f"a userfaultfd left in the target (fd {fd})"
        except OSError:
            pass
    return None


class _Signals:
    """Sends SIGRTMIN+1 to a process every millisecond until stopped; counts what was sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            try:
                os.kill(self.pid, SIGNAL)
            except ProcessLookupError:
                return
            self.sent += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.sent


def _env(case: FaultCase, workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["SNAPFS_STORE"] = str(workdir / "store")
    env.update(case.env)
    return env


def _run(case: FaultCase, workdir: Path, target: RunningTarget, strace: list[str] | None,
         kill_after: float | None = None) -> tuple[subprocess.CompletedProcess | None, float]:
    """Run the case's command on ``target`` (under ``strace`` options if given); with
    ``kill_after``, SIGKILL snapfs after that many seconds. Returns (result, seconds)."""
    argv = [sys.executable, "-m", "snapfs", *case.command(target.pid, workdir)]
    if strace is not None:
        argv = ["strace", "-f", "-qq", *strace, *argv]
    stdin_path = case.stdin(target.pid, workdir) if case.stdin else None
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, env=_env(case, workdir), cwd=ROOT, stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=kill_after if kill_after is not None else 300)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate()
        return subprocess.CompletedProcess(argv, proc.returncode, out, err), time.monotonic() - t0
    finally:
        if stdin is not subprocess.DEVNULL:
            stdin.close()


@contextlib.contextmanager
def _started(case: FaultCase) -> Iterator[tuple[RunningTarget, Path]]:
    """The case's target, set up, with a fresh work directory (both gone afterwards)."""
    with tempfile.TemporaryDirectory(prefix="snapfs-torture-") as tmp:
        workdir = Path(tmp)
        target = RunningTarget(case.target)
        try:
            if case.setup is not None:
                case.setup(target, workdir)
            yield target, workdir
        finally:
            target.close()


def _one(case: FaultCase, tally: Tally, log, label: str, strace: list[str] | None,
         kill_after: float | None = None) -> subprocess.CompletedProcess | None:
    """One run with one fault; checks the target after it."""
    with _started(case) as (target, workdir):
        sender = _Signals(target.pid) if case.signals else None
        try:
            result, _ = _run(case, workdir, target, strace, kill_after)
        finally:
            sent = sender.stop() if sender is not None else None
        killed = result.returncode == -signal.SIGKILL
        if killed:
            tally.fault()
        problem = released(target.pid) or target.check()
        if problem is None and sent is not None:
            time.sleep(0.05)
            got = target.ask("s")
            if got != f"ok s {sent}":
                problem = f"signals: sent {sent}, target reports {got!r}"
        if problem is None and not killed and result.returncode not in (0, 3):
            problem = f"snapfs exited {result.returncode}: {result.stderr.strip()[-300:]}"
        if problem is not None:
            tally.harmed(f"{case.name} {label}: {problem}")
            log(f"  {label}: HARMED: {problem}")
        return result


def count_positions(case: FaultCase) -> tuple[int, float]:
    """(ptrace calls of one fault-free run, its duration in seconds), from a run under strace."""
    with _started(case) as (target, workdir):
        log = workdir / "ptrace.log"
        result, _ = _run(case, workdir, target, ["-o", str(log), "-e", "trace=ptrace"])
        if result.returncode != 0:
            raise RuntimeError(f"{case.name}: fault-free run failed: {result.stderr.strip()}")
        per_thread: dict[str, int] = {}
        for line in log.read_text().splitlines():
            if "ptrace(" in line:
                tid = line.split(None, 1)[0]
                per_thread[tid] = per_thread.get(tid, 0) + 1
        _, seconds = _run(case, workdir, target, None)
        return max(per_thread.values(), default=0), seconds


def choose(total: int, wanted: int | None, rng: random.Random) -> list[int]:
    """Positions 1..total, or ``wanted`` of them: the first and last, evenly spread, and
    random ones."""
    if wanted is None or wanted >= total:
        return list(range(1, total + 1))
    spread = {1, total} | {1 + round(i * (total - 1) / max(wanted // 2, 1)) for i in range(wanted // 2)}
    rest = [p for p in range(1, total + 1) if p not in spread]
    picked = sorted(spread | set(rng.sample(rest, max(0, min(len(rest), wanted - len(spread))))))
    return picked[:wanted] if len(picked) > wanted else picked


def sweep(cases: list[FaultCase], budget: Budget, tally: Tally, log: Callable[[str], None]) -> None:
    """For each case: SIGKILL of snapfs at every (or ``budget.positions``) ptrace call, then
    at ``budget.random_kills`` random delays; the target is checked after every run."""
    rng = random.Random(budget.seed)
    for case in cases:
        if not budget.wants(case.name) or budget.exhausted():
            continue
        tally.case()
        total, seconds = count_positions(case)
        positions = choose(total, budget.positions, rng)
        log(f"{case.name}: {total} ptrace calls per run ({seconds:.1f} s); killing snapfs at "
            f"{len(positions)} of them and at {budget.random_kills} random moments")
        before = tally.harmed_targets
        for n in positions:
            if budget.exhausted():
                break
            _one(case, tally, log, f"kill at ptrace call {n}",
                 ["-o", "/dev/null", "-e", "trace=ptrace", "-e", f"inject=ptrace:signal=KILL:when={n}"])
        for _ in range(budget.random_kills):
            if budget.exhausted():
                break
            delay = rng.uniform(0.0, seconds)
            _one(case, tally, log, f"kill after {delay:.3f} s", None, kill_after=delay)
        log(f"{case.name}: harmed {tally.harmed_targets - before}")
