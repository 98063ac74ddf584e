"""Read-side numbers: store reads, FUSE reads, the vmstate view, incremental snapshots.

Each section runs against a snapshot of a real memwriter taken with ``snapfs snapshot``, and
skips with a stated reason when its component is not there (yet). "Cold" means after
``echo 3 > /proc/sys/vm/drop_caches`` (root only; otherwise the section says it ran warm).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tools.bench import kernel
from tools.bench.every import series
from tools.bench.methods.snapfs_uffd import ROOT, snapfs_argv, snapfs_env
from tools.bench.plan import Plan
from tools.bench.targets import Target, TargetSpec

MiB = 1 << 20
PAGE = 4096
RANDOM_READS = 2000


def drop_caches() -> bool:
    """Empty the kernel page cache (root); False when not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _sequential(read: Callable[[int, int], bytes], size: int, chunk: int = MiB) -> float:
    """Bytes/s of reading ``[0, size)`` in ``chunk`` reads."""
    t0 = time.perf_counter()
    off = 0
    while off < size:
        n = len(read(off, min(chunk, size - off)))
        if n == 0:
            break
        off += n
    return off / (time.perf_counter() - t0)


def _random(read: Callable[[int, int], bytes], size: int, count: int = RANDOM_READS) -> dict:
    """Random 4 KiB reads: reads/s and latency percentiles."""
    rng = random.Random(1)
    offsets = [rng.randrange(size // PAGE) * PAGE for _ in range(count)]
    lat = []
    t0 = time.perf_counter()
    for off in offsets:
        s = time.perf_counter()
        read(off, PAGE)
        lat.append(time.perf_counter() - s)
    total = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100)
    return {"reads_per_s": count / total, "p50_us": q[49] * 1e6, "p99_us": q[98] * 1e6}


def _snapshot(pid: int, store: Path, name: str) -> dict:
    proc = subprocess.run([*snapfs_argv(), "snapshot", str(pid), "--json", "--store", str(store),
                           "--name", name], capture_output=True, text=True, env=snapfs_env(),
                          cwd=ROOT, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"snapfs snapshot failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return json.loads(proc.stdout)


def store_reads(store_dir: Path, name: str, base: int) -> dict:
    """SnapshotReader: sequential 1 MiB reads of the data region (cold, warm); random 4 KiB."""
    from snapfs.store import Store

    cold = drop_caches()
    store = Store.open(store_dir)
    try:
        reader = store.open_snapshot(name)
        region = next(r for r in reader.regions if r.start == base)
        read = lambda off, n: reader.read(region.index, off, n)  # noqa: E731
        seq_cold = _sequential(read, region.length)
        seq_warm = _sequential(read, region.length)
        drop_caches()
        reader = store.open_snapshot(name)
        rnd = _random(lambda off, n: reader.read(region.index, off, n), region.length)
    finally:
        store.close()
    return {"bytes": region.length, "cold": cold, "sequential_cold_Bps": seq_cold,
            "sequential_warm_Bps": seq_warm, "random_4k_cold": rnd}


def _file_reader(path: Path) -> tuple[int, Callable[[int, int], bytes | memoryview]]:
    """An fd and a pread function reading into one reused buffer, as cat and dd do (a fresh
    buffer per read would measure the allocator and this VM's page faults, not the file)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    buf = bytearray(MiB)
    view = memoryview(buf)

    def read(off: int, n: int) -> bytes | memoryview:
        if n > len(view):
            return os.pread(fd, n, off)
        return view[:os.preadv(fd, [view[:n]], off)]

    return fd, read


def _daemon_cpu(mnt: Path) -> Callable[[], float]:
    """CPU seconds (user + system) used so far by the daemon serving ``mnt`` (NaN if not found).

    Reported beside each FUSE figure: unlike MB/s, it hardly moves when other work shares the
    machine, so runs on a busy machine stay comparable.
    """
    pid = None
    spec_value = json.dumps(str(mnt.absolute())).encode()  # as it appears in the daemon's spec
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"snapfs.fs.daemon" in cmdline and spec_value in cmdline:
            pid = int(entry)
            break

    def used() -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, TypeError):
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    return used


def fuse_reads(store_dir: Path, name: str, base: int, mnt: Path) -> dict:
    """Through a real ``snapfs mount``: ramblocks/<block>/data and vmstate (with the daemon's
    CPU seconds for the cold sequential reads)."""
    if not os.path.exists("/dev/fuse"):
        return {"skipped": "no /dev/fuse"}
    mnt.mkdir(exist_ok=True)
    proc = subprocess.run([*snapfs_argv(), "mount", str(mnt), "--store", str(store_dir)],
                          capture_output=True, text=True, env=snapfs_env(), cwd=ROOT, timeout=120)
    if proc.returncode != 0:
        return {"skipped": f"snapfs mount failed: {(proc.stderr or proc.stdout).strip()[-300:]}"}
    try:
        info = json.loads((mnt / name / "info.json").read_text())
        block = next(r for r in info["regions"] if int(str(r["start"]), 0) == base)
        data = mnt / name / "ramblocks" / block.get("entry", block["name"]) / "data"
        size = data.stat().st_size
        out: dict = {"bytes": size, "block": block["name"]}
        daemon_cpu = _daemon_cpu(mnt)
        out["cold"] = drop_caches()
        fd, read = _file_reader(data)
        try:
            cpu0 = daemon_cpu()
            out["sequential_cold_Bps"] = _sequential(read, size)
            out["sequential_cold_daemon_cpu_s"] = daemon_cpu() - cpu0
            out["sequential_warm_Bps"] = _sequential(read, size)
        finally:
            os.close(fd)
        drop_caches()
        fd, read = _file_reader(data)
        try:
            out["random_4k_cold"] = _random(read, size)
        finally:
            os.close(fd)
        vm = mnt / name / "vmstate"
        if vm.exists():
            drop_caches()
            fd, read = _file_reader(vm)
            try:
                out["vmstate_bytes"] = vm.stat().st_size
                cpu0 = daemon_cpu()
                out["vmstate_sequential_Bps"] = _sequential(read, out["vmstate_bytes"])
                out["vmstate_daemon_cpu_s"] = daemon_cpu() - cpu0
            finally:
                os.close(fd)
        return out
    finally:
        subprocess.run([*snapfs_argv(), "umount", str(mnt)], capture_output=True, env=snapfs_env(),
                       cwd=ROOT, timeout=60)


def vmstate_view(store_dir: Path, name: str) -> dict:
    """The vmstate stream produced in-process (VmstateView), read sequentially."""
    from snapfs.store import Store
    from snapfs.stream.vmstate import VmstateView

    drop_caches()
    store = Store.open(store_dir)
    try:
        view = VmstateView(store.open_snapshot(name))
        return {"bytes": view.size, "sequential_Bps": _sequential(view.read, view.size)}
    finally:
        store.close()


def incremental(target: Target, store_dir: Path, fraction: float = 0.01) -> dict:
    """``snapfs snapshot --every``: a full snapshot, then ``fraction`` of the pages rewritten from
    outside (process_vm_writev, content class kept), then the incremental child."""
    # Choose and prepare the rewritten pages first (the target is not writing), so that between
    # the two snapshots only the writes themselves happen: well inside the period.
    npages = target.size // PAGE
    image = np.empty(target.size, dtype=np.uint8)
    kernel.process_vm_readv(target.pid, image, [(target.base, target.size)])
    pages = image.reshape(npages, PAGE)
    nonzero = np.flatnonzero(pages.view(np.uint64).any(axis=1))
    chosen = np.sort(np.random.default_rng(2).choice(nonzero, size=max(1, int(npages * fraction)), replace=False))
    new_pages = np.roll(pages[chosen], 8, axis=1)  # still non-zero, but changed
    del image, pages
    period = 6.0

    def rewrite(_i: int) -> None:
        t0 = time.monotonic()  # just after the first snapshot's line
        for i, p in enumerate(chosen.tolist()):
            kernel.process_vm_writev(target.pid, new_pages[i], [(target.base + p * PAGE, PAGE)])
        if time.monotonic() - t0 > period - 1.0:
            raise RuntimeError("rewriting the pages took too long: they may straddle the second snapshot")

    full, child = series(target.pid, store_dir, 1, period, rewrite)
    dirtied = len(chosen)
    return {"dirty_pages": dirtied, "dirty_fraction": dirtied / npages, "full": full, "child": child,
            "pause_ratio": child["pause_ms"] / full["pause_ms"] if full["pause_ms"] else None,
            "duration_ratio": child["duration_s"] / full["duration_s"] if full["duration_s"] else None,
            "stored_ratio": child["stored_bytes"] / full["stored_bytes"] if full["stored_bytes"] else None}


def _section(results: dict, key: str, log, fn: Callable[[], dict]) -> None:
    try:
        results[key] = fn()
    except ImportError as e:
        results[key] = {"skipped": f"component not available yet: {e}"}
    except Exception as e:  # noqa: BLE001 - a section failing is reported, the rest still runs
        results[key] = {"skipped": f"failed: {type(e).__name__}: {e}"}
    if "skipped" in results[key]:
        log(f"  {key}: skipped ({results[key]['skipped']})")
    else:
        log(f"  {key}: done")


def run(plan: Plan, workdir: Path, log) -> dict:
    """Every read-path section; a section that cannot run says why."""
    results: dict = {}
    try:
        import snapfs.store  # noqa: F401
    except ImportError as e:
        return {"all": {"skipped": f"snapfs.store not importable yet: {e}"}}
    store_dir = workdir / "read-store"
    with Target(TargetSpec(size=plan.readpath_size, rate=0)) as target:
        try:
            _snapshot(target.pid, store_dir, "read")
        except Exception as e:  # noqa: BLE001
            return {"all": {"skipped": f"could not take the snapshot to read: {e}"}}
        _section(results, "store", log, lambda: store_reads(store_dir, "read", target.base))
        _section(results, "fuse", log, lambda: fuse_reads(store_dir, "read", target.base, workdir / "mnt"))
        _section(results, "vmstate", log, lambda: vmstate_view(store_dir, "read"))
        _section(results, "incremental", log, lambda: incremental(target, workdir / "incr-store"))
    return results
