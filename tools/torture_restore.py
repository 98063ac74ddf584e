"""Fault sweep of ``snapfs incoming --pid``: SIGKILL snapfs at every ptrace call and every
process_vm_writev of a restore, and check the target each time.

A case (:class:`RestoreKillCase`) restores ptrchase (tools/targets/ptrchase.c: 6 threads, a
mutator rewriting a pointer ring at full speed, every thread verifying its invariants) from
a snapshot under ``strace -e inject=SYSCALL:signal=KILL:when=N``. The target must then be
alive and either running soundly (``untouched``: killed before the first write; or
``running``: every thread had its final state) or ``parked`` / ``partly parked`` (threads
waiting in pause() with every signal blocked: no half-written image runs). Then the same
restore, run again without faults, must finish it: the target continues from the snapshot's
state and finds nothing broken. Anything else raises AssertionError (a harmed target).

This module is the case list for ``tools/torture``: :func:`cases` yields every case of a
full sweep; ``python -m tools.torture_restore`` runs them and prints the figures.
``tests/test_restore_killed.py`` runs a sample in the suite.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ALL_BLOCKED = 0xFFFFFFFFFFFBFEFF  # every signal but SIGKILL and SIGSTOP (the kernel's view)
_PAUSE = 34


def _no_core() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a harmed target dies at once


class Target:
    """A running ptrchase, asked with a timeout (a parked one does not answer); used by the
    restore tests too."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, preexec_fn=_no_core)
        self.pid = self.proc.pid
        self._buf = b""
        # "ready <address of generation> <address of broken>"
        _, gen, broken = (self._line(10) or "? 0 0").split()
        self.gen_addr, self.broken_addr = int(gen, 16), int(broken, 16)

    def _line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def ask(self, cmd: str, timeout: float = 5) -> str | None:
        """The target's reply line, or None (no answer in time, or it is gone)."""
        try:
            self.proc.stdin.write(cmd.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        return self._line(timeout)

    def generation(self) -> tuple[int, int]:
        """(generation, broken) as the target reports them."""
        reply = self.ask("gen")
        assert reply, "the target does not answer"
        _, gen, _, broken = reply.split()
        return int(gen), int(broken)

    def parked_threads(self) -> tuple[int, int]:
        """(threads waiting in pause() with every signal blocked, all threads)."""
        parked = total = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            total += 1
            try:
                with open(f"/proc/{self.pid}/task/{tid}/syscall") as f:
                    nr = f.read().split()[0]
                with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                    blk = int(re.search(r"SigBlk:\s*([0-9a-f]+)", f.read())[1], 16)
            except (OSError, IndexError, TypeError):
                continue
            parked += nr == str(_PAUSE) and blk == _ALL_BLOCKED
        return parked, total

    def assert_sound(self, what: str) -> int:
        """The target runs, verifies itself clean and advances; returns its generation."""
        assert self.proc.poll() is None, f"{what}: target died ({self.proc.returncode})"
        check = self.ask("check")
        assert check and check.startswith("ok "), f"{what}: check answered {check!r}"
        g1 = self.ask("gen")
        time.sleep(0.05)
        g2 = self.ask("gen")
        assert g1 and g2 and g1.endswith("broken 0") and g2.endswith("broken 0"), (what, g1, g2)
        assert int(g2.split()[1]) > int(g1.split()[1]), f"{what}: the mutator does not run ({g1}, {g2})"
        return int(g1.split()[1])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class Prepared:
    target: Target
    stream: Path
    env: dict[str, str]


def snapfs_argv() -> list[str]:
    return [sys.executable, "-m", "snapfs"]


@contextlib.contextmanager
def prepared_target(workdir: Path, binary: Path) -> Iterator[Prepared]:
    """ptrchase running, a snapshot of it taken under full-speed mutation, its stream in a
    file; the target killed at the end."""
    env = dict(os.environ, SNAPFS_STORE=str(workdir / "store"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    target = Target(binary)
    try:
        time.sleep(0.2)
        subprocess.run([*snapfs_argv(), "snapshot", str(target.pid), "--name", "s"], env=env,
                       check=True, capture_output=True)
        stream = workdir / "s.vmstate"
        with open(stream, "wb") as out:
            subprocess.run([*snapfs_argv(), "cat", "s", "vmstate"], env=env, check=True, stdout=out)
        time.sleep(0.2)  # it runs on: the restore has pages to write
        yield Prepared(target, stream, env)
    finally:
        target.close()


def _incoming(p: Prepared, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    with open(p.stream, "rb") as src:
        return subprocess.run([*prefix, *snapfs_argv(), "incoming", "--pid", str(p.target.pid)],
                              stdin=src, env=p.env, capture_output=True, timeout=300)


def count_calls(p: Prepared, syscall: str, change: str | None = None) -> int:
    """How many ``syscall`` calls one full restore of the prepared target makes (after
    ``change``: a ptrchase command such as ``grow``, which gives the restore layout work)."""
    if change:
        p.target.ask(change)
    with tempfile.NamedTemporaryFile("r") as out:
        res = _incoming(p, ["strace", "-f", "-c", "-o", out.name, "-e", f"trace={syscall}"])
        assert res.returncode == 0, res.stderr
        m = re.search(rf"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?{syscall}$", out.read(), re.M)
    p.target.assert_sound("after the counting restore")
    return int(m[1]) if m else 0


@dataclass
class Outcome:
    syscall: str
    n: int
    state: str  # untouched, parked, partly parked
    detail: str = ""
    change: str | None = None


@dataclass
class RestoreKillCase:
    """SIGKILL snapfs at the ``n``-th ``syscall`` of a restore (of a target that first ran
    ptrchase command ``change``, e.g. ``grow``: layout work); check; finish with a rerun."""

    syscall: str
    n: int
    change: str | None = None

    def run(self, p: Prepared) -> Outcome:
        what = f"killed at {self.syscall} #{self.n}" + (f" after {self.change}" if self.change else "")
        if self.change:
            assert p.target.ask(self.change), f"{what}: the target does not answer"
        _incoming(p, ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={self.syscall}",
                      "-e", f"inject={self.syscall}:signal=KILL:when={self.n}"])
        t = p.target
        time.sleep(0.1)
        assert t.proc.poll() is None, f"{what}: the target died ({t.proc.returncode})"
        parked, total = t.parked_threads()
        if parked == 0:
            t.assert_sound(what)
            state = "untouched"
        else:
            state = "parked" if parked == total else "partly parked"
        again = _incoming(p)
        assert again.returncode == 0, f"{what}: the rerun failed: {again.stderr.decode()}"
        assert t.parked_threads()[0] == 0, f"{what}: threads still parked after the rerun"
        t.assert_sound(f"{what}, then restored again")
        return Outcome(self.syscall, self.n, state, f"{parked}/{total} parked", self.change)


def cases(p: Prepared) -> Iterator[RestoreKillCase]:
    """Every case of the full sweep: each ptrace call and each process_vm_writev, of a
    restore with memory and registers only, then of one that also restores the layout
    (the heap grown and 4 mappings added since the snapshot: munmap and brk injected)."""
    for change in (None, "grow"):
        for syscall in ("ptrace", "process_vm_writev"):
            for n in range(1, count_calls(p, syscall, change) + 1):
                yield RestoreKillCase(syscall, n, change)


def main() -> int:
    """The full sweep: every case of :func:`cases`, each change on a fresh target; a harmed
    target is replaced by a fresh one and the sweep goes on."""
    sys.path.insert(0, str(ROOT))
    from tools.targets import build

    outcomes, harmed = [], []
    for change in (None, "grow"):
        n, total = 1, None
        while total is None or n <= total:
            with tempfile.TemporaryDirectory(prefix="snapfs-torture-restore-") as d, \
                    prepared_target(Path(d), build("ptrchase")) as p:
                if total is None:
                    total = {s: count_calls(p, s, change) for s in ("ptrace", "process_vm_writev")}
                    todo = [(s, k) for s in total for k in range(1, total[s] + 1)]
                    total = len(todo)
                while n <= total:
                    syscall, k = todo[n - 1]
                    n += 1
                    try:
                        outcomes.append(RestoreKillCase(syscall, k, change).run(p))
                    except AssertionError as exc:
                        harmed.append(str(exc).splitlines()[0])
                        if p.target.proc.poll() is not None:
                            break  # a fresh target for the rest
    states: dict[str, int] = {}
    for o in outcomes:
        key = f"{o.state} ({o.syscall}{', ' + o.change if o.change else ''})"
        states[key] = states.get(key, 0) + 1
    print(f"restore kill sweep: {len(outcomes) + len(harmed)} cases, "
          f"{len(outcomes) + len(harmed)} faults injected, targets harmed: {len(harmed)}; "
          + ", ".join(f"{k}: {v}" for k, v in sorted(states.items())))
    for h in harmed:
        print("  HARMED", h)
    return 1 if harmed else 0


if __name__ == "__main__":
    raise SystemExit(main())
