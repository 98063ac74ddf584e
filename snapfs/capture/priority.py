"""Thread priorities during a capture: a write fault's round trip is ~50 us when the
writer gets a CPU back at once, and a millisecond or more when it waits behind the scan and
compression threads.

- :func:`fault_thread_priority`: the trio loop thread (SCHED_FIFO 1) and a short GIL switch
  interval for the whole capture;
- :func:`realtime_thread`: the thread serving faults, one level above the trio thread;
- :class:`Background`: the scan and compression threads run SCHED_IDLE, so that anything of
  the target's that wants a CPU gets it first; if that starves the capture (the machine is
  saturated), they fall back to an ordinary fair share (nice 5).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

import trio

# While capturing, a thread holding the GIL (scan bookkeeping, store hashing) must hand it
# over within this long when the fault thread wakes up (CPython's default is 5 ms).
GIL_SWITCH_INTERVAL = 50e-6
LOOP_PRIORITY = 1  # SCHED_FIFO level of the trio loop thread
FAULT_PRIORITY = 2  # the fault thread preempts the trio thread too
# Nice level of the scan and compression threads once they fall back to a fair share.
BACKGROUND_NICE = 5
# The starvation guard: below this progress over a window, SCHED_IDLE threads are taken to be
# starved (they get ~0.3% of a CPU against one busy thread; a capture normally claims
# hundreds of MB/s) and get a fair share instead.
STARVED_BYTES_PER_S = 16 << 20
GUARD_WINDOW_S = 1.0


@contextlib.contextmanager
def fault_thread_priority() -> Iterator[None]:
    """Run the calling thread (the trio loop) SCHED_FIFO for the block, and shorten the GIL
    switch interval so the fault thread gets the GIL quickly when a fault arrives.

    ``SCHED_RESET_ON_FORK`` makes threads created meanwhile (trio workers doing scan and
    compression) start as ordinary threads. Without the privilege only the GIL part applies.
    """
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
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


class Background:
    """Scheduling of one capture's scan and compression threads.

    Niced threads were not enough: this kernel (EEVDF, PREEMPT_NONE, HZ=250) often picks a
    niced thread over a writer just woken from a served fault (the writer ran just before it
    faulted, so its lag is slightly negative), and nothing re-picks until that thread blocks
    or its slice ends: the writer waited 1-2 ms. A SCHED_IDLE thread loses every such pick.
    Idle threads starve on a saturated machine, so :meth:`guard` watches the capture's
    progress and moves them to a fair share (nice 5) when it stalls.
    """

    def __init__(self) -> None:
        self.idle = True
        self.idle_until_s: float | None = None  # when the guard gave up on SCHED_IDLE
        self._lock = threading.Lock()
        self._saved: dict[int, tuple[int, int]] = {}  # tid -> (policy, nice) to restore

    @contextlib.contextmanager
    def thread(self) -> Iterator[None]:
        """Run the calling thread at the background priority for the block."""
        tid = threading.get_native_id()
        with self._lock:
            try:
                self._saved[tid] = (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))
            except OSError:
                yield
                return
            self._apply(tid)
        # Lowering our own priority does not make the kernel pick again: yield, so that a
        # target thread already waiting for this CPU gets it now rather than at the next tick.
        os.sched_yield()
        try:
            yield
        finally:
            with self._lock:
                policy, nice = self._saved.pop(tid)
                try:
                    os.sched_setscheduler(0, policy & ~os.SCHED_RESET_ON_FORK, os.sched_param(0))
                    os.setpriority(os.PRIO_PROCESS, 0, nice)
                except OSError:
                    pass  # unprivileged: may not raise its priority back

    def _apply(self, tid: int) -> None:
        try:
            if self.idle:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)
        except OSError:
            pass  # e.g. unprivileged and already SCHED_IDLE: keep what it has

    def to_fair_share(self) -> None:
        """Move the background threads (present and future) from SCHED_IDLE to nice 5."""
        with self._lock:
            self.idle = False
            for tid in self._saved:
                self._apply(tid)

    async def guard(self, progress: Callable[[], int], rate: float | None, done: trio.Event) -> None:
        """Run beside the scan until ``done``: if the capture claims less than
        ``STARVED_BYTES_PER_S`` (or a quarter of ``rate``) over a window, give its threads a
        fair share for the rest of it."""
        floor = STARVED_BYTES_PER_S if rate is None else min(STARVED_BYTES_PER_S, rate / 4)
        t0 = time.monotonic()
        last = progress()
        while self.idle:
            with trio.move_on_after(GUARD_WINDOW_S):
                await done.wait()
                return
            now = progress()
            if now - last < floor * GUARD_WINDOW_S:
                self.idle_until_s = round(time.monotonic() - t0, 3)
                self.to_fair_share()
            last = now


@contextlib.contextmanager
def _realtime(priority: int, flags: int) -> Iterator[None]:
    try:
        old_policy = os.sched_getscheduler(0)
        old_param = os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO | flags, os.sched_param(priority))
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
