"""Scheduling of the capture's background threads: SCHED_IDLE while the machine has spare
CPU (a woken target always gets its CPU first), a fair share once the capture starves."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from snapfs.capture import CaptureOptions, capture_process
from snapfs.capture.priority import BACKGROUND_NICE, Background
from snapfs.store import Store
from tests.test_capture_support import Target, assert_released


def _policy() -> tuple[int, int]:
    return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)


def test_background_threads_idle_then_fair_share_then_restored():
    bg = Background()
    seen: dict[str, tuple[int, int]] = {}
    inside, switched = threading.Event(), threading.Event()

    def worker() -> None:
        before = _policy()
        with bg.thread():
            seen["idle"] = _policy()
            inside.set()
            switched.wait(10)
            seen["fair"] = _policy()  # moved by another thread while inside
        seen["after"] = _policy()
        seen["before"] = before

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    bg.to_fair_share()
    switched.set()
    t.join(10)
    assert seen["idle"][0] == os.SCHED_IDLE
    assert seen["fair"] == (os.SCHED_OTHER, BACKGROUND_NICE)
    assert seen["after"] == seen["before"]


async def test_capture_on_a_saturated_machine_gets_a_fair_share(store_dir):
    """Busy loops on every CPU starve SCHED_IDLE threads (~0.3% of a CPU each): the guard
    sees the scan stall and moves them to a fair share; the capture completes."""
    npages = 262144  # 256 MiB populated, never written during the capture: only the scan progresses
    hog = "while True: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(os.cpu_count() or 2)]
    try:
        with Target("populate", str(npages)) as t, Store.open(store_dir, create=True) as store:
            result = await capture_process(t.pid, store, "busy", CaptureOptions())
            meta = result.info.meta
            assert meta["idle_priority_until_s"] is not None
            assert meta["idle_priority_until_s"] >= 0.9
            assert result.resident_bytes >= npages // 4 * 4096
            assert result.duration_s < 30
            assert_released(t.pid)
    finally:
        for h in hogs:
            h.kill()
            h.wait()


async def test_capture_on_an_idle_machine_stays_idle_priority(store_dir):
    npages = 8192
    with Target("populate", str(npages)) as t, Store.open(store_dir, create=True) as store:
        result = await capture_process(t.pid, store, "quiet", CaptureOptions())
        assert result.info.meta["idle_priority_until_s"] is None
