"""``snapfs snapshot --every``: every child's pause, against a one-shot snapshot's of the same
target (goals.py: a child of a 1 GiB target with 1 % rewritten pauses <= 3 ms, any child <= 2x the one-shot).

- **memwriter**: the plan's size, not writing; before each child 1 % of its pages are
  rewritten from outside (process_vm_writev, content class kept), as readpaths.incremental
  does for one child;
- **python**: a Python process holding ``python_target_size`` of objects (lists, dicts,
  bytes: thousands of allocator arenas) that keeps replacing 0.1 % of them per second — what a user
  tried: a 300 MiB Python process paused 41-91 ms per child against 4.9 ms one-shot.

Pauses are snapfs's own figures: ``pause_ms`` (the stop), or ``switch_pause_ms`` when larger
(a child taken as a live capture also stops the target to switch to async tracking); the
one-shot is taken on the same target right after the series.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from tools.bench import kernel
from tools.bench.methods.snapfs_uffd import ROOT, Snapfs, snapfs_argv, snapfs_env
from tools.bench.plan import Plan
from tools.bench.targets import Target, TargetSpec

PAGE = 4096

_PYTHON_TARGET = textwrap.dedent("""
    import os, random, sys, time
    size = int(sys.argv[1])
    rnd = random.Random(1)
    objs = []
    made = 0
    while made < size:   # a Python heap: many small objects of every kind
        kind = rnd.randrange(3)
        if kind == 0:
            o = [rnd.random() for _ in range(64)]; made += 64 * 32
        elif kind == 1:
            o = {str(i): i for i in range(32)}; made += 32 * 100
        else:
            o = os.urandom(rnd.randrange(64, 4096)); made += len(o)
        objs.append(o)
    print("ready", flush=True)
    while True:          # keeps working: replaces ~0.1 % of its objects per second
        for _ in range(len(objs) // 10000):
            i = rnd.randrange(len(objs))
            objs[i] = [rnd.random() for _ in range(64)]
        time.sleep(0.1)
""")


def series(pid: int, store: Path, children: int, period: float, between=None) -> list[dict]:
    """``snapfs snapshot PID --every PERIOD``: the first snapshot and ``children`` children
    (``between(i)`` runs after each snapshot line); their JSON lines."""
    argv = [*snapfs_argv(), "snapshot", str(pid), "--json", "--store", str(store), "--name", "every",
            "--every", f"{period:g}s"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=snapfs_env(), cwd=ROOT)
    out = []
    try:
        assert proc.stdout is not None
        for i in range(children + 1):
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read().strip()[-300:] if proc.stderr else ""
                raise RuntimeError(f"snapfs snapshot --every stopped after {len(out)} snapshots: {err}")
            out.append(json.loads(line))
            if between is not None and i < children:
                between(i)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out


def _one_shot(target: Target, workdir: Path) -> dict:
    out = Snapfs().run(target, workdir)
    return {"pause_ms": out.tool_pause_ms, "duration_s": out.duration_s}


def memwriter_series(plan: Plan, workdir: Path, fraction: float = 0.01) -> dict:
    """The plan's memwriter (not writing): children with ``fraction`` of pages rewritten."""
    with Target(TargetSpec(size=plan.readpath_size, rate=0)) as target:
        npages = target.size // PAGE
        image = np.empty(target.size, dtype=np.uint8)
        kernel.process_vm_readv(target.pid, image, [(target.base, target.size)])
        pages = image.reshape(npages, PAGE)
        nonzero = np.flatnonzero(pages.view(np.uint64).any(axis=1))
        rng = np.random.default_rng(3)

        def rewrite(_i: int) -> None:
            chosen = np.sort(rng.choice(nonzero, size=max(1, int(npages * fraction)), replace=False))
            new = np.roll(pages[chosen], 8 * (_i + 1), axis=1)  # still non-zero, but changed
            for j, p in enumerate(chosen.tolist()):
                kernel.process_vm_writev(target.pid, new[j], [(target.base + p * PAGE, PAGE)])

        snaps = series(target.pid, workdir / "every-mw", plan.every_children, plan.every_period_s, rewrite)
        one = _one_shot(target, workdir)
    return _summary(snaps, one, f"memwriter {plan.readpath_size >> 20} MiB, {fraction:.0%} rewritten per child")


def python_series(plan: Plan, workdir: Path) -> dict:
    """A Python process of plan.python_target_size that keeps replacing objects."""
    proc = subprocess.Popen([sys.executable, "-c", _PYTHON_TARGET, str(plan.python_target_size)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the Python target did not start")

        snaps = series(proc.pid, workdir / "every-py", plan.every_children, plan.every_period_s / 2)
        one = Snapfs().snapshot(proc.pid, workdir)
        one_shot = {"pause_ms": one.tool_pause_ms, "duration_s": one.duration_s}
        with open(f"/proc/{proc.pid}/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        with open(f"/proc/{proc.pid}/maps") as f:
            vmas = sum(1 for _ in f)
    finally:
        proc.kill()
        proc.wait()
    return _summary(snaps, one_shot, f"Python process, {rss >> 20} MiB resident, {vmas} mappings")


def _stop_ms(snap: dict) -> float:
    """A snapshot's longest stop: its pause, or the stop that switched to async tracking
    after it (a live capture in continuous mode has both)."""
    return max(snap["pause_ms"], snap.get("switch_pause_ms") or 0.0)


def _summary(snaps: list[dict], one: dict, what: str) -> dict:
    children = snaps[1:]
    return {"target": what, "first": snaps[0], "children": children, "one_shot": one,
            "child_pause_ms": [_stop_ms(c) for c in children],
            "max_child_pause_ms": max(_stop_ms(c) for c in children) if children else None,
            "one_shot_pause_ms": one["pause_ms"]}


def run(plan: Plan, workdir: Path, log) -> dict:
    """Both series; a failing one is reported, the other still runs."""
    out = {}
    for key, fn in (("memwriter", memwriter_series), ("python", python_series)):
        try:
            out[key] = fn(plan, workdir)
            log(f"  --every {key}: child pauses {out[key]['child_pause_ms']} ms, one-shot "
                f"{out[key]['one_shot_pause_ms']:.2f} ms")
        except Exception as e:  # noqa: BLE001 - a section failing is reported, the rest still runs
            out[key] = {"skipped": f"failed: {type(e).__name__}: {e}"}
            log(f"  --every {key}: skipped ({out[key]['skipped']})")
    return out
