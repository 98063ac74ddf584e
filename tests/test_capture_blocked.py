"""Threads blocked in read, poll, nanosleep, futex and epoll_wait when frozen resume exactly
as if never stopped (syscall-restart emulation), whichever of them snapfs injects into."""

from __future__ import annotations

import os

import pytest
import trio

from snapfs.capture import CaptureOptions, capture_process, stopped
from snapfs.store import Store
from tests.support.capture import Target, assert_released


@pytest.mark.parametrize("main_call", ["read", "poll", "nanosleep", "futex", "epoll"])
async def test_blocked_calls_resume_unchanged(store_dir, main_call):
    with Target("blocker", main_call) as t:
        with Store.open(store_dir, create=True) as store:
            for i in range(3):
                result = await capture_process(t.pid, store, f"s{i}", CaptureOptions())
                assert result.pause_ms > 0
                assert_released(t.pid)
        # The stop-only freeze must be just as transparent.
        with stopped(t.pid) as proc:
            # Every live thread (the nanosleep one may have finished under load).
            assert t.pid in proc.tids and len(proc.tids) == len(os.listdir(f"/proc/{t.pid}/task"))
        assert_released(t.pid)
        out, _ = t.proc.communicate("go\n", timeout=10)
        assert t.proc.returncode == 0, out
        for name in ("read", "poll", "nanosleep", "futex", "epoll"):
            assert f"ok {name}" in out, out


async def test_threads_born_and_dying_during_the_freeze(store_dir):
    """Threads are created and exit all the time: every capture still stops them all,
    and the target runs on afterwards."""
    import struct

    from snapfs.capture import read_memory

    with Target("churn", "4") as t:
        with Store.open(store_dir, create=True) as store:
            for i in range(5):
                result = await capture_process(t.pid, store, f"s{i}", CaptureOptions())
                threads = result.info.meta["threads"]
                assert str(t.pid) in threads and len(threads) >= 5
                assert_released(t.pid)
        before = struct.unpack("<Q", read_memory(t.pid, t.addr, 8))[0]
        await trio.sleep(0.2)
        after = struct.unpack("<Q", read_memory(t.pid, t.addr, 8))[0]
        assert after > before, "the target stopped making progress"
