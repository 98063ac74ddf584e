"""The benchmark suite runs end to end (`--quick`) and writes well-formed outputs; memwriter
(the target program every bench and many tests use) does what it promises.

The bench test checks shapes, not numbers: every method appears at every write rate or is
listed as not run with a reason; every row has its figures or an error; the report, the JSON
and the PNGs are there and parse.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096


def _start(binary: Path, *args: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([str(binary), *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline())
    assert ready["event"] == "ready"
    return proc, ready


def _next(proc: subprocess.Popen, event: str) -> dict:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        assert line, f"memwriter exited before a {event!r} line"
        msg = json.loads(line)
        if msg["event"] == event:
            return msg


def _read_region(pid: int, ready: dict) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(int(ready["base"], 16))
        return f.read(ready["size"])


def test_memwriter_fills_the_mix_and_reports(target_bin):
    proc, ready = _start(target_bin("memwriter"), "--size", "16M", "--threads", "2", "--rate", "50000")
    try:
        assert ready["pages"] == 4096
        assert ready["zero_pages"] + ready["text_pages"] + ready["random_pages"] == ready["pages"]
        for key, pct in (("zero_pages", 30), ("text_pages", 40), ("random_pages", 30)):
            assert abs(ready[key] / ready["pages"] * 100 - pct) < 4, (key, ready)
        mem = np.frombuffer(_read_region(proc.pid, ready), dtype=np.uint8).reshape(-1, PAGE)
        nonzero = int(mem.any(axis=1).sum())
        assert nonzero * PAGE == ready["nonzero_bytes"]
        time.sleep(0.3)
        proc.send_signal(signal.SIGUSR1)
        rep = _next(proc, "report")
        assert rep["reason"] == "usr1" and len(rep["threads"]) == 2
        # Paced by deadlines: never faster than asked (load can only slow it; how close it
        # gets to the rate is the bench's business).
        assert 0 < rep["writes_per_s"] <= 50000 * 1.1, rep["writes_per_s"]
        assert rep["max_stall_us"] > 0 and rep["total"]["writes"] == rep["writes"]
        # Writes keep every page in its class: the non-zero count does not move.
        mem = np.frombuffer(_read_region(proc.pid, ready), dtype=np.uint8).reshape(-1, PAGE)
        assert int(mem.any(axis=1).sum()) == nonzero
    finally:
        proc.send_signal(signal.SIGTERM)
        final = _next(proc, "report")
        proc.wait(timeout=10)
    assert final["reason"] == "sigterm" and proc.returncode == 0


def test_memwriter_quiesce_dump_and_seq_oracle(target_bin, tmp_path):
    dump = tmp_path / "dump"
    proc, ready = _start(target_bin("memwriter"), "--size", "8M", "--threads", "2", "--rate", "max",
                         "--access", "seq", "--dump", str(dump))
    try:
        time.sleep(0.3)
        proc.send_signal(signal.SIGUSR2)
        paused = _next(proc, "paused")
        assert paused["dump_error"] == ""
        mem = _read_region(proc.pid, ready)
        assert dump.read_bytes() == mem  # quiesced: nothing moves
        counters = np.frombuffer(mem, dtype=np.uint64).reshape(-1, PAGE // 8)[:, 0].astype(np.int64)
        n = ready["pages"]
        for t in range(2):  # each thread's slice shows exactly one cut
            s = counters[n * t // 2 : n * (t + 1) // 2]
            assert int((np.diff(s) != 1).sum()) == 1
        proc.send_signal(signal.SIGUSR2)
        _next(proc, "resumed")
        time.sleep(0.1)
        assert _read_region(proc.pid, ready) != mem  # writing again
    finally:
        proc.kill()
        proc.wait()


def test_memwriter_rejects_bad_options(target_bin):
    proc = subprocess.run([str(target_bin("memwriter")), "--mix", "50,50,50"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--mix" in proc.stderr


@pytest.mark.timeout(900)  # a few minutes on a quiet machine; several suites at once take longer
def test_bench_quick_outputs_are_well_formed(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    plan = results["plan"]
    assert plan["mode"] == "quick"
    expected = {"snapfs", "stop-copy", "pre-copy", "gcore"}
    missing = results["missing"]
    assert all(isinstance(v, str) and v for v in missing.values())
    for method in expected:
        rates = {r["write_rate"] for r in results["rows"] if r["method"] == method}
        # Never silently skipped: either it ran at every rate or the reason is stated.
        assert rates == set(plan["rates"]) or method in missing, (method, rates, missing)
    numeric = ("pause_ms", "duration_s", "image_bytes", "image_ratio")
    for row in results["rows"]:
        if row["error"]:
            assert isinstance(row["error"], str)
            continue
        for key in numeric:
            assert isinstance(row[key], (int, float)) and row[key] >= 0, (key, row)
        assert row["pause_source"] in ("target", "tool")
        if row["write_rate"] != 0:
            assert row["throughput_ratio"] is not None and row["pause_source"] == "target"

    idle = [r for r in results["rows"] if r["method"] == "snapfs" and r["write_rate"] == 0 and not r["error"]]
    assert idle and len(idle[0]["duration_s_runs"]) == 3  # best of 3, like the zstd floor
    side = idle[0]["zstd_side_by_side"]                     # zstd measured between the captures
    assert len(side["pass_Bps"]) == 3 and side["Bps"] == max(side["pass_Bps"]) > 0

    floors = results["floors"]
    assert {"write_protect", "process_vm_readv", "zstd"} <= set(floors)
    assert floors["zstd"]["Bps"] > 0 and floors["process_vm_readv"]["reused_buffer_Bps"] > 0

    q = results["qemu"]
    assert q is not None or "qemu background-snapshot" in missing
    if q is not None and "error" not in q:
        assert q["accel"] in ("kvm", "tcg") and q["total_s"] > 0 and q["image_bytes"] > 0

    # Every read path is in the tree: each section ran (FUSE may only be missing) with its figures.
    reads = results["readpaths"]
    assert set(reads) == {"store", "fuse", "vmstate", "incremental"}, reads
    assert reads["store"]["sequential_warm_Bps"] > 0 and reads["store"]["random_4k_cold"]["reads_per_s"] > 0
    assert reads["vmstate"]["bytes"] > 0 and reads["vmstate"]["sequential_Bps"] > 0
    fuse = reads["fuse"]
    assert fuse.get("skipped") == "no /dev/fuse" or (fuse["sequential_warm_Bps"] > 0
                                                      and fuse["vmstate_sequential_Bps"] > 0), fuse
    incr = reads["incremental"]
    assert incr["dirty_pages"] > 0 and 0 < incr["stored_ratio"] < 1, incr  # the child stores only what changed

    goals = results["goals"]
    assert len(goals) == 15
    for g in goals:  # a verdict, or the reason there is none
        assert g["goal"] and g["measured"] and g["pass"] in (True, False, None), g
        assert g["pass"] is not None or g["note"], g
    # The stall goals are judged row by row; a goal passes only if every row it judged does.
    per_row = [g for g in goals if "rows" in g]
    assert len(per_row) == 6
    for g in per_row:
        judged = [r["pass"] for r in g["rows"] if r["pass"] is not None]
        assert g["pass"] == (all(judged) if judged else None), g

    sc = results["stop_cost"]  # stop cost by thread count, beside the C floor
    assert sc["threads_low"] == 1 and sc["threads_high"] == 256 and sc["ratio"] > 0
    for row in sc["summary"].values():
        assert row["attach_freeze_ms"] > 0 and row["floor_stop_ms"] > 0 and row["floor_resume_ms"] > 0

    # The stall sections: every row the target's worst stall beside its undisturbed window.
    sections = {r.get("section") for r in results["rows"]}
    assert {"matrix", "jvm", "mappings", "throughput"} <= sections
    matrix = [r for r in results["rows"] if r.get("section") == "matrix" and not r["error"]]
    assert {(r["threads"], r["thp"], r["method"]) for r in matrix} == {
        (t, thp, m) for t in plan["thread_counts"] for thp in (False, True) for m in ("snapfs", "fork")}
    for r in matrix:
        assert r["pause_ms"] >= 0 and r["baseline_max_stall_ms"] >= 0 and isinstance(r["stalls"], list)
        assert all(s["phase"] in ("start-up", "attach", "preprotect", "freeze", "background", "exit", "outside")
                   for s in r["stalls"])
        for s in r["stalls"]:  # the machine's share, sampled beside the run: within the stall
            assert 0 <= s.get("steal_ms", 0) <= s["ms"] and 0 <= s.get("kdamond_ms", 0) <= s["ms"], s
        if r["method"] == "snapfs":
            phases = r["extra"]["phases"]
            assert phases["attach"][0] <= phases["attach"][1] <= phases["freeze"][0] <= phases["freeze"][1]
            assert r["extra"]["cpu_s"] > 0
        else:
            assert r["tool_pause_ms"] > 0  # fork() as the target timed it
    assert any("steal_ms" in s for r in matrix for s in r["stalls"])
    for key in ("memwriter", "python"):
        e = results["every"][key]
        assert "skipped" in e or len(e["child_pause_ms"]) == plan["every_children"], (key, e)

    md = (out / "results.md").read_text()
    for heading in ("## Goals (snapfs)", "## Physical floors", "## Snapshot of a writing process",
                    "## QEMU background-snapshot", "## How each figure is measured",
                    "## What the target suffers", "## `--every` pauses"):
        assert heading in md
    assert "python -m tools.bench --quick" in md
    for png in ("image_vs_rate.png", "duration_vs_rate.png", "pause_by_method.png", "stall_by_threads.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"({png})" in md


def test_noise_sampler_explains_only_what_it_sampled():
    from tools.bench.noise import NoiseSampler
    from tools.bench.stalls import host_ms, worst_net_of_host

    t0 = time.monotonic()
    with NoiseSampler(period=0.005) as sampler:
        time.sleep(0.1)
    t1 = time.monotonic()
    assert len(sampler.times) >= 5 and sampler.times == sorted(sampler.times)
    for ms in (20.0, 1.787, 0.0031):  # clipped to the stall, also once rounded
        mid = sampler.explain((t0 + t1) / 2, ms)
        assert mid is not None and 0 <= mid["steal_ms"] <= ms and 0 <= mid["kdamond_ms"] <= ms
    assert sampler.explain(t0 - 1.0, 5.0) is None and sampler.explain(t1 + 1.0, 5.0) is None
    # Known samples: 10 ms of steal on CPU 0 and 9 ms of kdamond around a 1.787 ms stall.
    known = NoiseSampler()
    known.times, known.steal, known.kdamond_ns = [0.0, 0.01, 0.02], [[0, 0], [0, 0], [1, 0]], [0, 5_000_000, 9_000_000]
    assert known.explain(0.015, 1.787) == {"steal_ms": 1.787, "kdamond_ms": 1.787}
    assert known.explain(0.019, 18.0) == {"steal_ms": 10.0, "kdamond_ms": 9.0}
    assert known.steal_s == 0.01  # the row's host steal: all CPUs, first to last sample
    stalls = [{"ms": 30.0, "steal_ms": 20.0, "kdamond_ms": 4.0}, {"ms": 9.0, "steal_ms": 0.0, "kdamond_ms": 0.0}]
    assert host_ms(stalls[0]) == 24.0 and worst_net_of_host(stalls) == 9.0
    assert worst_net_of_host([{"ms": 3.0}]) is None  # not sampled: no figure


def test_precopy_dirty_tracking_gives_the_image_at_the_stop():
    """The pre-copy peer's tracking (UFFD WP_ASYNC + PAGEMAP_SCAN re-protect) is right: copy all,
    re-copy what the scans report, final copy while stopped == the memory at the stop, and the
    seq oracle shows one cut per writer."""
    from tools.bench import kernel
    from tools.bench.copying import page_runs, stopped
    from tools.bench.targets import Target, TargetSpec

    with Target(TargetSpec(size=16 << 20, rate=200000, threads=2, access="seq")) as t:
        time.sleep(0.3)  # every writer finishes a first pass over its slice
        base, size, pid, n = t.base, t.size, t.pid, t.size // PAGE
        image = np.zeros((n, PAGE), dtype=np.uint8)

        def copy(ranges):
            for addr, length in ranges:
                buf = np.empty(length, dtype=np.uint8)
                kernel.process_vm_readv(pid, buf, [(addr, length)])
                image[(addr - base) // PAGE : (addr - base + length) // PAGE] = buf.reshape(-1, PAGE)

        uffd, _ = kernel.acquire_uffd(pid, t.handoff_path)
        scanner = kernel.PagemapScanner(pid)
        try:
            kernel.uffd_api(uffd, kernel.UFFD_FEATURE_PAGEFAULT_FLAG_WP | kernel.UFFD_FEATURE_WP_ASYNC)
            kernel.uffd_register_wp(uffd, base, size)
            kernel.uffd_writeprotect(uffd, base, size, True)
            copy([(base, size)])
            dirty = []
            for _ in range(3):
                dirty = scanner.written(base, base + size, reprotect=True)
                assert dirty, "a writer at 200k pages/s dirtied nothing?"
                copy(dirty)
            with stopped(pid):
                mask = np.zeros(n, dtype=bool)
                for addr, length in scanner.written(base, base + size, reprotect=False):
                    mask[(addr - base) // PAGE : (addr - base + length) // PAGE] = True
                copy(page_runs(mask, base))
                truth = np.empty(size, dtype=np.uint8)
                kernel.process_vm_readv(pid, truth, [(base, size)])
        finally:
            kernel.uffd_unregister(uffd, base, size)
            os.close(uffd)
            scanner.close()
        assert np.array_equal(image.reshape(-1), truth)
        counters = image.view(np.uint64)[:, 0].astype(np.int64)
        for th in range(2):
            assert int((np.diff(counters[n * th // 2 : n * (th + 1) // 2]) != 1).sum()) == 1
        assert t.alive()
