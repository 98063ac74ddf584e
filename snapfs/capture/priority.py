"""Thread priorities during a capture: a write fault's round trip is ~50 us when the fault
thread runs at once, a scheduler tick (ms) when it waits behind the scan and compression
threads.

- :func:`fault_thread_priority`: the trio loop thread (SCHED_FIFO 1) and a short GIL switch
  interval for the whole capture;
- :func:`realtime_thread`: the thread serving faults, one level above the trio thread;
- :func:`background_thread_priority`: the scan and compression threads, niced so that a
  woken target (and the fault thread) preempt them at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# While capturing, a thread holding the GIL (scan bookkeeping, store hashing) must hand it
# over within this long when the fault thread wakes up (CPython's default is 5 ms).
GIL_SWITCH_INTERVAL = 50e-6
# A tree capture: one fault thread, store worker and drain per member, all wanting the GIL;
# at 50 us most of the time went to handing it over (futex waits and wake-ups: 4 members,
# 768 MiB, 39 CPU-s and 24 s; at 500 us 19 CPU-s and 12-13 s, worst stalls unchanged).
TREE_GIL_SWITCH_INTERVAL = 500e-6
LOOP_PRIORITY = 1  # SCHED_FIFO level of the trio loop thread
FAULT_PRIORITY = 2  # the fault thread preempts the trio thread too
# Nice level of the scan and compression threads. Not SCHED_IDLE: on a busy machine idle
# threads starve and the capture (the target's protected time) would stretch without end.
BACKGROUND_NICE = 5


@contextlib.contextmanager
def fault_thread_priority(switch_interval: float = GIL_SWITCH_INTERVAL) -> Iterator[None]:
    """Run the calling thread (the trio loop) SCHED_FIFO for the block, and shorten the GIL
    switch interval (to ``switch_interval``) so the fault thread gets the GIL quickly when a
    fault arrives.

    ``SCHED_RESET_ON_FORK`` makes threads created meanwhile (trio workers doing scan and
    compression) start as ordinary threads. Without the privilege only the GIL part applies.
    """
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval)
    try:
        with _realtime(LOOP_PRIORITY, os.SCHED_RESET_ON_FORK):
            yield
    finally:
        sys.setswitchinterval(old_interval)


@contextlib.contextmanager
def realtime_thread(priority: int = FAULT_PRIORITY) -> Iterator[None]:
    """Run the calling thread SCHED_FIFO at ``priority`` for the block (a reused worker
    thread gets its old policy back after). Without the privilege, nothing changes."""
    with _realtime(priority, 0):
        yield


def running_realtime() -> bool:
    """Whether the calling thread runs SCHED_FIFO: helper threads it hands work of a pause
    to should then run at :data:`LOOP_PRIORITY` too (ordinary, they wait for a CPU)."""
    return os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO


@contextlib.contextmanager
def background_thread_priority(nice: int = BACKGROUND_NICE) -> Iterator[None]:
    """Lower the calling thread's priority (``nice``) for the block: for scan and compression
    work, so the target and the fault thread preempt it when they wake."""
    try:
        old = os.getpriority(os.PRIO_PROCESS, 0)  # 0 = the calling thread on Linux
        os.setpriority(os.PRIO_PROCESS, 0, max(old, nice))
    except OSError:
        yield
        return
    try:
        yield
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, old)
        except OSError:
            pass


@contextlib.contextmanager
def realtime_thread_of(tid: int, priority: int = LOOP_PRIORITY) -> Iterator[None]:
    """:func:`realtime_thread` for another thread of snapfs (by native id), e.g. the ptrace
    tracer thread while a realtime thread waits on it for the whole freeze."""
    with _realtime(priority, 0, tid):
        yield


@contextlib.contextmanager
def _realtime(priority: int, flags: int, tid: int = 0) -> Iterator[None]:
    try:
        old_policy = os.sched_getscheduler(tid)
        old_param = os.sched_getparam(tid)
        os.sched_setscheduler(tid, os.SCHED_FIFO | flags, os.sched_param(priority))
    except (PermissionError, OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        try:
            os.sched_setscheduler(tid, old_policy & ~os.SCHED_RESET_ON_FORK, old_param)
        except OSError:
            pass
