"""The stall rows: what the target itself suffers, by writer threads, THP and write rate.

- **matrix**: for every writer-thread count, THP off/on and write rate > 0, one target and on
  it snapfs and the fork peer (the target forks a child that writes its memory out), each row
  with the worst stall the target measured, the undisturbed window's, slow-write p50/p99,
  throughput during/before, and the capture phase each long stall fell in (memwriter logs
  stalls with their CLOCK_MONOTONIC end, snapfs reports its phases on the same clock);
- **jvm**: a JVM-like target (hundreds of idle threads waking every 10 ms, 16 mutators, a GC
  thread dropping, re-allocating and copying arenas), snapfs and fork;
- **mappings**: the same bytes in 65 000 mappings and in one, snapfs only;
- **throughput**: snapfs against stop-copy on 1 GiB and 4 GiB, interleaved, with CPU-seconds.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path

from tools.bench.methods import Method
from tools.bench.methods.fork import ForkSave
from tools.bench.methods.snapfs_uffd import Snapfs
from tools.bench.methods.stopcopy import StopCopy
from tools.bench.plan import GiB, Plan, rate_label
from tools.bench.targets import Target, TargetError, TargetSpec

# memwriter's "who" codes in its stall log
WHO_IDLE, WHO_GC, WHO_FORK = 1000, 3000, 3001


def who_label(who: int) -> str:
    """A stall's thread: writer N, idle thread, GC or the fork call."""
    if who >= WHO_FORK:
        return "fork()"
    if who >= WHO_GC:
        return "gc"
    if who >= WHO_IDLE:
        return "idle"
    return f"writer {who}"


def attribute(stalls: list, phases: dict | None, explain=None) -> list[dict]:
    """Each logged stall with the capture phase it overlaps most: start-up (the snapfs
    process importing), attach, preprotect, freeze, background (after the freeze until the
    capture ends), exit, or outside (none of them); with ``explain`` (a
    :meth:`~tools.bench.noise.NoiseSampler.explain`), also the host steal and kdamond time
    sampled during it."""
    out = []
    spans: list[tuple[str, float, float]] = []
    if phases:
        spans = [(name, *phases[name]) for name in ("attach", "preprotect", "freeze") if phases.get(name)]
        if phases.get("freeze") and phases.get("end"):
            spans.append(("background", phases["freeze"][1], phases["end"]))
        if phases.get("spawned") and phases.get("start"):  # Python start-up, imports
            spans.append(("start-up", phases["spawned"], phases["start"]))
        if phases.get("end") and phases.get("exited"):  # commit done: exit
            spans.append(("exit", phases["end"], phases["exited"]))
    for end, ms, who in stalls:
        start = end - ms / 1e3
        best, overlap = "outside", 0.0
        for name, lo, hi in spans:
            o = min(end, hi) - max(start, lo)
            if o > overlap:
                best, overlap = name, o
        row = {"ms": ms, "who": who_label(int(who)), "phase": best}
        noise = explain(end, ms) if explain is not None else None
        if noise:
            row.update(noise)
        out.append(row)
    return out


def host_ms(stall: dict) -> float:
    """How much of a stall the machine itself may have taken: host steal plus kdamond's CPU
    time sampled during it (upper bounds, see tools.bench.noise), at most the stall."""
    return min(stall["ms"], (stall.get("steal_ms") or 0) + (stall.get("kdamond_ms") or 0))


def worst_net_of_host(stalls: list[dict] | None) -> float | None:
    """The longest logged stall once the machine's share (:func:`host_ms`) is taken off it:
    what is left is the method's, the target's own threads' or the guest scheduler's."""
    if not stalls or not any("steal_ms" in s for s in stalls):
        return None
    return max(s["ms"] - host_ms(s) for s in stalls)


def _label(spec: TargetSpec) -> str:
    parts = [f"{spec.threads} writer{'s' if spec.threads > 1 else ''}", "THP" if spec.thp else "4K"]
    if spec.idle_threads:
        parts.append(f"+{spec.idle_threads} idle, GC {spec.gc_rate:g}/s")
    if spec.mappings > 1:
        parts.append(f"{spec.mappings} mappings")
    return ", ".join(parts)


def _rows_on(spec: TargetSpec, methods: list[Method], workdir: Path, plan: Plan, log, section: str,
             run_one) -> list[dict]:
    """Every method once on one fresh target; rows tagged with the target's shape."""
    rows = []
    log(f"{section}: {spec.size >> 20} MiB, {_label(spec)}, write rate {rate_label(spec.rate)}")
    try:
        with Target(spec) as target:
            huge = target.huge_bytes()
            for m in methods:
                try:
                    row = run_one(m, spec, target, workdir, plan, log)
                except TargetError as e:
                    row = {"method": m.name, "write_rate": spec.rate, "write_rate_label": rate_label(spec.rate),
                           "error": f"target stopped answering: {e}"}
                    rows.append(_tag(row, section, spec, huge))
                    break
                rows.append(_tag(row, section, spec, huge))
    except TargetError as e:
        rows.append(_tag({"method": "target", "write_rate": spec.rate, "write_rate_label": rate_label(spec.rate),
                          "error": str(e)}, section, spec, 0))
    return rows


def _tag(row: dict, section: str, spec: TargetSpec, huge: int) -> dict:
    row.update(section=section, threads=spec.threads, thp=spec.thp, size=spec.size, huge_bytes=huge,
               idle_threads=spec.idle_threads, gc_rate=spec.gc_rate, mappings=spec.mappings,
               shape=_label(spec))
    return row


def matrix(plan: Plan, workdir: Path, log, run_one) -> list[dict]:
    """snapfs and the fork peer at every thread count x THP x write rate (> 0)."""
    rows = []
    for threads in plan.thread_counts:
        for thp in plan.thp_modes:
            for rate in plan.matrix_rates or plan.rates:
                if rate == 0:
                    continue  # a target that does not write cannot time a stall
                spec = TargetSpec(size=plan.size, rate=rate, threads=threads, thp=thp,
                                  fork_dump=str(workdir / "fork.dump"))
                rows += _rows_on(spec, [Snapfs(), ForkSave()], workdir, plan, log, "matrix", run_one)
    return rows


def jvm(plan: Plan, workdir: Path, log, run_one) -> list[dict]:
    """The JVM-like target: snapfs and the fork peer."""
    spec = TargetSpec(size=plan.jvm_size, rate=plan.jvm_write_rate, threads=plan.jvm_writers,
                      idle_threads=plan.jvm_idle_threads, gc_rate=plan.jvm_gc_rate,
                      fork_dump=str(workdir / "fork.dump"))
    return _rows_on(spec, [Snapfs(), ForkSave()], workdir, plan, log, "jvm", run_one)


@contextlib.contextmanager
def _max_map_count(at_least: int) -> Iterator[None]:
    """vm.max_map_count raised for the block if needed (root), then put back."""
    path = Path("/proc/sys/vm/max_map_count")
    old = int(path.read_text())
    if old >= at_least:
        yield
        return
    path.write_text(f"{at_least}\n")
    try:
        yield
    finally:
        path.write_text(f"{old}\n")


def mappings(plan: Plan, workdir: Path, log, run_one) -> list[dict]:
    """The same bytes in plan.mappings VMAs and in one: snapfs only."""
    rows = []
    with _max_map_count(plan.mappings + 10000):
        for n in (plan.mappings, 1):
            spec = TargetSpec(size=plan.mappings_size, rate=plan.limit_write_rate, mappings=n)
            rows += _rows_on(spec, [Snapfs()], workdir, plan, log, "mappings", run_one)
    return rows


def throughput(plan: Plan, workdir: Path, log, run_one) -> list[dict]:
    """snapfs and stop-copy, alternating twice, on each plan.throughput_sizes target writing at
    the limit rate; rows carry CPU-seconds (stop-copy: the bench's own, measured around it)."""
    rows = []
    for size in plan.throughput_sizes:
        spec = TargetSpec(size=size, rate=plan.limit_write_rate)
        methods: list[Method] = []
        for _ in range(plan.throughput_rounds):
            methods += [Snapfs(), _TimedStopCopy(plan.compress_threads)]
        rows += _rows_on(spec, methods, workdir, plan, log, "throughput", run_one)
    return rows


class _TimedStopCopy(StopCopy):
    """StopCopy that also reports the CPU-seconds it used (this process's, around the run)."""

    def run(self, target: Target, workdir: Path):
        before = resource.getrusage(resource.RUSAGE_SELF)
        out = super().run(target, workdir)
        after = resource.getrusage(resource.RUSAGE_SELF)
        out.extra["cpu_s"] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 3)
        return out


def cpu_per_gib(row: dict) -> float | None:
    """CPU-seconds per GiB of the target's resident memory."""
    cpu = (row.get("extra") or {}).get("cpu_s")
    return cpu / (row["resident_bytes"] / GiB) if cpu is not None and row.get("resident_bytes") else None


SECTIONS = {"matrix": matrix, "jvm": jvm, "mappings": mappings, "throughput": throughput}


def run(plan: Plan, workdir: Path, log, run_one, only: set[str] | None = None) -> list[dict]:
    """Every section of this module the plan (and ``only``) asks for."""
    rows = []
    for name, fn in SECTIONS.items():
        if only is not None and name not in only:
            continue
        rows += fn(plan, workdir, log, run_one)
    return rows

