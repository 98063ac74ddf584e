"""Fault-thread priority: a write fault's round trip is ~50 us when the fault path runs at
once, a scheduler tick (ms) when it waits behind the scan and compression threads."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# While capturing, a thread holding the GIL (scan bookkeeping, store hashing) must hand it
# over within this long when the fault path wakes up (CPython's default is 5 ms).
GIL_SWITCH_INTERVAL = 50e-6


@contextlib.contextmanager
def fault_thread_priority() -> Iterator[None]:
    """Run the calling thread (the trio loop serving faults) SCHED_FIFO for the block, and
    shorten the GIL switch interval so it gets the GIL quickly when a fault arrives.

    ``SCHED_RESET_ON_FORK`` makes threads created meanwhile (trio workers doing scan and
    compression) start as ordinary threads. Without the privilege only the GIL part applies.
    """
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        with _realtime():
            yield
    finally:
        sys.setswitchinterval(old_interval)


@contextlib.contextmanager
def _realtime() -> Iterator[None]:
    try:
        old_policy = os.sched_getscheduler(0)
        old_param = os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(1))
    except (PermissionError, OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        try:
            os.sched_setscheduler(0, old_policy & ~os.SCHED_RESET_ON_FORK, old_param)
        except OSError:
            pass
