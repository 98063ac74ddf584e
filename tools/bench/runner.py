"""Runs a plan: floors, every method at every write rate on the same targets, QEMU, read paths."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tools.bench import every, floors, machine, noise, peers, readpaths, stalls, stopcost, tree
from tools.bench.methods import Method
from tools.bench.methods.gcore import Gcore
from tools.bench.methods.precopy import PreCopy
from tools.bench.methods.qemu_bg import QemuBackground
from tools.bench.methods.snapfs_uffd import Snapfs
from tools.bench.methods.stopcopy import StopCopy
from tools.bench.plan import Plan, rate_label
from tools.bench.targets import Target, TargetError, TargetSpec, Window

THROUGHPUT_RUNS = 3  # snapfs captures of the non-writing target for the throughput goal


class Log:
    """Progress lines on stderr with the elapsed time."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _row(method: Method, spec: TargetSpec, target: Target, before: Window, during: Window,
         outcome, error: str | None, explain=None) -> dict:
    writing = spec.rate != 0
    row = {
        "method": method.name, "write_rate": spec.rate, "write_rate_label": rate_label(spec.rate),
        "nonzero_bytes": target.nonzero_bytes, "resident_bytes": target.size, "error": error,
        "writes_per_s_before": before.writes_per_s, "writes_per_s_during": during.writes_per_s,
        "throughput_ratio": (during.writes_per_s / before.writes_per_s) if writing and before.writes_per_s else None,
        "target_max_stall_ms": during.max_stall_us / 1e3 if writing else None,
        "baseline_max_stall_ms": before.max_stall_us / 1e3 if writing else None,
        "slow_writes": during.slow_writes if writing else None,
        "slow_p50_us": during.slow_p50_us, "slow_p99_us": during.slow_p99_us,
        "slow_max_us": during.raw.get("slow_max_us") if during.slow_writes else None,
        "baseline_slow_writes": before.slow_writes if writing else None,
        # The capture phase each of the window's longest stalls fell in (stalls.attribute).
        "stalls": stalls.attribute(during.stalls[:8], (outcome.extra.get("phases") if outcome else None),
                                   explain) if writing else None,
        "baseline_stalls": stalls.attribute(before.stalls[:3], None) if writing else None,
        "writer_max_stall_ms": during.raw.get("writer_max_stall_us", 0) / 1e3 if writing else None,
        "idle_max_stall_ms": during.raw.get("idle_max_stall_us", 0) / 1e3 if writing else None,
        "gc_max_stall_ms": during.raw.get("gc_max_stall_us", 0) / 1e3 if writing else None,
    }
    if outcome is not None:
        # The target can only time a pause while it writes; at rate 0 the tool's own figure is used.
        pause = row["target_max_stall_ms"] if writing else outcome.tool_pause_ms
        row.update({
            "pause_ms": pause, "pause_source": "target" if writing else "tool",
            "tool_pause_ms": outcome.tool_pause_ms, "duration_s": outcome.duration_s,
            "image_bytes": outcome.image_bytes,
            "image_ratio": outcome.image_bytes / target.nonzero_bytes,
            "extra": outcome.extra,
        })
    return row


def _run_one(method: Method, spec: TargetSpec, target: Target, workdir: Path, plan: Plan, log: Log) -> dict:
    before = target.settle(plan.settle_s)
    outcome, error = None, None
    # Beside the run: what else held the CPUs during each stall (host steal, kdamond), and the
    # row's host steal in all.
    with noise.NoiseSampler() as sampler:
        try:
            outcome = method.run(target, workdir)
        except Exception as e:  # noqa: BLE001 - a failing peer is a result, not the end of the bench
            error = f"{type(e).__name__}: {e}"
        during = target.window()  # TargetError if the method left the target dead or stuck
    row = _row(method, spec, target, before, during, outcome, error, sampler.explain)
    row["host_steal_s"] = round(sampler.steal_s, 3)
    row["worst_net_of_host_ms"] = stalls.worst_net_of_host(row["stalls"])
    if error:
        log(f"  {method.name:<22} FAILED: {error}")
    else:
        log(f"  {method.name:<22} pause {row['pause_ms']:9.2f} ms ({row['pause_source']})  "
            f"duration {row['duration_s']:7.3f} s  image/nonzero {row['image_ratio']:.3f}")
    return row


def _throughput_runs(method: Method, row: dict, target: Target, workdir: Path, threads: int) -> None:
    """snapfs's duration on the non-writing target, 3 runs (the row's and 2 more), each
    followed by one pass of zstd alone over a copy of the same bytes: this machine's speed
    drifts by 2x over minutes, so the throughput goal compares the best of each side measured
    in the same minute (row keys ``duration_s_runs``, ``zstd_side_by_side``)."""
    data, _ = floors.read_region(target)
    runs = [row["duration_s"]]
    passes = [floors.zstd_alone(data, threads, passes=1)["Bps"]]
    for _ in range(THROUGHPUT_RUNS - 1):
        runs.append(method.run(target, workdir).duration_s)
        passes.append(floors.zstd_alone(data, threads, passes=1)["Bps"])
    row["duration_s_runs"] = runs
    row["zstd_side_by_side"] = {"Bps": max(passes), "pass_Bps": passes, "threads": threads}


SECTIONS = ("methods", "matrix", "jvm", "mappings", "throughput", "every", "qemu", "readpaths", "stopcost", "tree")


def run(plan: Plan, out_dir: Path, install_peers: bool = True, only: set[str] | None = None) -> dict:
    """Run every section of ``plan`` (or those in ``only``, see SECTIONS); return the results
    (also what results.json holds)."""
    def wanted(section: str) -> bool:
        return only is None or section in only

    log = Log()
    started = time.time()
    results: dict = {"plan": plan.to_json(), "machine": machine.describe(), "started": started,
                     "rows": [], "missing": {}, "floors": {}, "qemu": None, "readpaths": {},
                     "sections": sorted(only) if only else list(SECTIONS), "every": {}, "tree": None}
    peer_status = peers.ensure(install_peers)
    results["peers"] = peer_status
    for peer, st in peer_status.items():
        if st["status"] == "missing":
            results["missing"][peer] = st["reason"]
            log(f"peer {peer} missing: {st['reason']}")

    threads = plan.compress_threads
    methods: list[Method] = [Snapfs(), StopCopy(threads),
                             PreCopy(threads, plan.precopy_max_rounds, plan.precopy_max_downtime_s), Gcore()]
    limited = [Snapfs(r) for r in plan.snapfs_rate_limits]
    usable: list[Method] = []
    for m in methods + limited:
        reason = m.available()
        if reason:
            results["missing"][m.name] = reason
            log(f"method {m.name} not run: {reason}")
        else:
            usable.append(m)

    workdir = Path(tempfile.mkdtemp(prefix="snapfs-bench-", dir=out_dir))
    try:
        for rate in plan.rates if wanted("methods") else []:
            spec = TargetSpec(size=plan.size, rate=rate, threads=plan.writer_threads)
            log(f"target {plan.size >> 20} MiB, write rate {rate_label(rate)} pages/s")
            with Target(spec) as target:
                if not results["floors"]:  # on the first target (rate 0 in both plans)
                    results["floors"] = floors.measure(target, threads)
                    results["floors"]["target_write_rate"] = rate
                    f = results["floors"]
                    log(f"  floors: write-protect {f['write_protect'].get('protect_ms', float('nan')):.2f} ms, "
                        f"process_vm_readv {f['process_vm_readv']['reused_buffer_Bps'] / 1e9:.2f} GB/s, "
                        f"zstd x{threads} {f['zstd']['Bps'] / 1e9:.2f} GB/s")
                for m in usable:
                    if m in limited and rate != plan.limit_write_rate:
                        continue
                    try:
                        row = _run_one(m, spec, target, workdir, plan, log)
                        if rate == 0 and m.name == "snapfs" and not row.get("error"):
                            _throughput_runs(m, row, target, workdir, threads)
                        results["rows"].append(row)
                    except TargetError as e:
                        # The target is gone or stuck: record it, go on with a fresh target.
                        results["rows"].append({"method": m.name, "write_rate": rate,
                                                "write_rate_label": rate_label(rate),
                                                "error": f"target stopped answering: {e}"})
                        log(f"  {m.name:<22} FAILED: target stopped answering ({e}); next rate")
                        break
        snapfs = next((m for m in usable if m.name == "snapfs"), None)
        for label, overrides in plan.variants.items() if wanted("methods") else []:
            if snapfs is None:
                break
            spec = TargetSpec(size=plan.size, rate=plan.limit_write_rate, threads=plan.writer_threads)
            spec = dataclasses.replace(spec, **overrides)
            log(f"variant {label}: {spec.size >> 20} MiB, write rate {rate_label(spec.rate)}")
            with Target(spec) as target:
                variant = Snapfs()
                variant.name = f"snapfs [{label}]"
                extra = {"huge_bytes": target.huge_bytes()}
                if spec.thp:
                    try:
                        results["floors"]["write_protect_" + label] = floors.write_protect_ms(target)
                    except OSError as e:
                        results["floors"]["write_protect_" + label] = {"error": str(e)}
                try:
                    row = _run_one(variant, spec, target, workdir, plan, log)
                except TargetError as e:
                    row = {"method": variant.name, "write_rate": spec.rate,
                           "write_rate_label": rate_label(spec.rate), "error": f"target stopped answering: {e}"}
                row["variant"] = dict(overrides, **extra)
                results["rows"].append(row)
        if snapfs is not None:
            results["rows"] += stalls.run(plan, workdir, log, _run_one, only)
            if wanted("every"):
                log("--every children and one-shot pauses")
                results["every"] = every.run(plan, workdir, log)
        qemu = QemuBackground(plan.qemu_mem, plan.qemu_guest_rate)
        reason = qemu.available()
        if not wanted("qemu"):
            pass
        elif reason:
            results["missing"]["qemu background-snapshot"] = reason
            log(f"QEMU background-snapshot not run: {reason}")
        else:
            log(f"QEMU background-snapshot, guest {plan.qemu_mem >> 20} MiB")
            try:
                results["qemu"] = qemu.run_vm(workdir)
                q = results["qemu"]
                log(f"  qemu: total {q['total_s']:.3f} s, downtime {q['downtime_ms']} ms, "
                    f"{q['seconds_per_nonzero_gib']:.3f} s per GiB non-zero")
            except Exception as e:  # noqa: BLE001
                results["qemu"] = {"error": f"{type(e).__name__}: {e}"}
                log(f"  qemu FAILED: {e}")
        if wanted("readpaths"):
            log(f"read paths ({plan.readpath_size >> 20} MiB region)")
            results["readpaths"] = readpaths.run(plan, workdir, log)
        if wanted("stopcost"):
            log(f"stop cost by thread count ({plan.stopcost_size >> 20} MiB sleepers, "
                f"{'/'.join(str(n + 1) for n in plan.stopcost_threads)} threads)")
            results["stop_cost"] = stopcost.measure(plan.stopcost_size >> 20, tuple(plan.stopcost_threads),
                                                    plan.stopcost_rounds, log=log)
        if wanted("tree"):
            log(f"process tree: {plan.tree_procs} processes")
            results["tree"] = tree.run(plan, workdir, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = time.time() - started
    results["machine"]["loadavg_end"] = machine.loadavg()
    results["machine"]["steal_s_end"] = machine.steal_s()
    return results
