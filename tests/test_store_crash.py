"""Crash safety: SIGKILL a writer process at random instants; nothing partial ever shows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from snapfs.store import RegionSpec, Store
from tests.support.synthetic import expected_image, write_synthetic

PAGES = [1500, 200]
PAGE = 4096


def _spawn(store_dir, name, seed, version=0, parent=None):
    cmd = [sys.executable, "-m", "tests.support.synthetic", str(store_dir), name, "--seed", str(seed),
           "--pages", ",".join(map(str, PAGES)), "--version", str(version)]
    if parent:
        cmd += ["--parent", parent]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _digest(store, name):
    r = store.open_snapshot(name)
    return [r.read(i, 0, reg.length) for i, reg in enumerate(r.regions)]


def _crash_loop(store_dir, iterations, seed):
    store = Store.open(store_dir)
    write_synthetic(store, "base", 1, PAGES)
    base = _digest(store, "base")
    assert base == [expected_image(1, i, n) for i, n in enumerate(PAGES)]
    rng = np.random.default_rng(seed)
    # Calibrate: how long a writer runs after 'ready', so kills land inside the write.
    p = _spawn(store_dir, "calibrate", 7)
    assert p.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    p.wait()
    window = time.monotonic() - t0
    store.remove(["calibrate"])
    completed: dict[str, tuple[int, int]] = {}
    killed = 0
    # Run two writers at a time (different names, same store), as two captures would.
    for i in range(0, iterations, 2):
        procs = []
        for j in (i, i + 1):
            version = int(rng.integers(0, 3))
            parent = "base" if version and rng.random() < 0.7 else None
            procs.append((f"k{j}", 100 + j, version, _spawn(store_dir, f"k{j}", 100 + j, version, parent)))
        for name, s, v, p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        time.sleep(float(rng.uniform(0, window)))
        for name, s, v, p in procs:
            p.send_signal(signal.SIGKILL)
        survived = 0
        for name, s, v, p in procs:
            p.wait()
            out = p.stdout.read()
            if f"committed {name}" in out:
                completed[name] = (s, v)
                survived += 1
            else:
                killed += 1
        # The machine's load varies: keep the kill window around the writers' real duration.
        window *= {0: 1.15, 1: 1.0, 2: 0.8}[survived]
    # No partial snapshot listed: exactly base + the writers that reached their commit.
    listed = {s.name for s in store.list_snapshots()}
    assert listed - {"base"} >= set(completed)
    assert listed <= {"base"} | {f"k{j}" for j in range(iterations)}
    for name in listed - {"base"}:
        # A writer killed after its catalog commit but before printing is complete too.
        seed_, version = completed.get(name) or (100 + int(name[1:]), None)
        r = store.open_snapshot(name)
        imgs = [r.read(i, 0, reg.length) for i, reg in enumerate(r.regions)]
        candidates = [version] if version is not None else [0, 1, 2]
        assert any(imgs == [expected_image(seed_, i, n, v) for i, n in enumerate(PAGES)] for v in candidates)
    assert _digest(store, "base") == base
    report = store.check(verify_data=True)
    assert report["ok"], report["problems"]
    assert killed >= iterations // 3, (killed, window)
    garbage = report["garbage"]
    assert garbage["dead_pending"] or garbage["orphan_segment_files"] or garbage["unreferenced_segments"]
    result = store.gc()
    assert result["bytes_reclaimed"] > 0 or result["pending_removed"]
    report = store.check(verify_data=True)
    assert report["ok"]
    assert report["garbage"] == {"dead_pending": [], "unreferenced_segments": [],
                                 "orphan_segment_files": [], "unreferenced_frames": 0}
    assert os.listdir(store.locks_dir) == []
    pending = store.query("SELECT count(*) FROM snapshots WHERE state='pending'")[0][0]
    assert pending == 0
    assert _digest(store, "base") == base
    store.close()
    return killed, window


def test_sigkill_writer_at_random_instants(store_dir):
    _crash_loop(store_dir, 50, seed=1)


@pytest.mark.slow
def test_sigkill_writer_many_times(store_dir):
    _crash_loop(store_dir, 300, seed=2)


_GC_SCRIPT = """
import sys
from snapfs.store import RegionSpec, Store
store = Store.open(sys.argv[1], create=False)
print("ready", flush=True)
store.gc()
print("done", flush=True)
"""


def test_sigkill_gc_at_random_instants(store_dir):
    store = Store.open(store_dir)
    write_synthetic(store, "keep", 1, PAGES)
    keep = _digest(store, "keep")
    rng = np.random.default_rng(3)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for i in range(12):
        # Garbage of every kind: a removed parent (dead frames in a live segment, a dead
        # segment) and an abandoned capture.
        write_synthetic(store, f"p{i}", 10 + i, PAGES)
        write_synthetic(store, f"c{i}", 10 + i, PAGES, version=1, parent=f"p{i}", changed_fraction=1.0)
        store.remove([f"p{i}"])
        w = store.begin_snapshot(f"dead{i}", {})
        w.add_region(RegionSpec("a", 0, 64 * PAGE))
        w.put_pages(0, 0, os.urandom(64 * PAGE))
        w._release()                    # the lock goes away as if the process had died
        p = subprocess.Popen([sys.executable, "-c", _GC_SCRIPT, str(store_dir)], stdout=subprocess.PIPE,
                             text=True, env=env)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0, 0.05)))
        p.kill()
        p.wait()
        assert store.check()["ok"]
        assert _digest(store, "keep") == keep
        r = store.open_snapshot(f"c{i}")
        assert [r.read(j, 0, reg.length) for j, reg in enumerate(r.regions)] == [
            expected_image(10 + i, j, n, 1, changed_fraction=1.0) for j, n in enumerate(PAGES)]
        store.remove([f"c{i}"])
    store.gc()
    report = store.check(verify_data=True)
    assert report["ok"] and report["snapshots"] == 1
    assert report["garbage"] == {"dead_pending": [], "unreferenced_segments": [],
                                 "orphan_segment_files": [], "unreferenced_frames": 0}
    assert os.listdir(store.locks_dir) == []
    store.close()
