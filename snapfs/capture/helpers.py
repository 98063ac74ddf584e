"""Helper threads for the work of a pause: started before it (starting a thread costs
~0.2-0.45 ms, not to be paid with the target stopped), handed shares of that work at the
calling thread's priority, so that both CPUs work while the target is stopped.

- :func:`started_pool`: a thread pool whose threads already run;
- :func:`submit_helper`: one job in a pool, SCHED_FIFO if the caller runs so;
- :func:`share`: jobs split between the calling thread (the first) and a pool;
- :func:`read_shared`: ``read_pages_robust`` of many ranges, in shares of about equal bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from snapfs.capture.memory import read_pages_robust
from snapfs.capture.priority import LOOP_PRIORITY, realtime_thread, running_realtime

T = TypeVar("T")
J = TypeVar("J")


def started_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads, all started now."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
    for f in [pool.submit(time.sleep, 0.001) for _ in range(threads)]:
        f.result()
    return pool


def _realtime(fn: Callable[..., T], *args: Any) -> T:
    with realtime_thread(LOOP_PRIORITY):
        return fn(*args)


def submit_helper(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> Future:
    """``fn(*args)`` in ``pool``, SCHED_FIFO (:data:`LOOP_PRIORITY`) if the calling thread
    runs so: an ordinary helper waits for a CPU behind the pause's realtime threads."""
    if running_realtime():
        return pool.submit(_realtime, fn, *args)
    return pool.submit(fn, *args)


def share(pool: ThreadPoolExecutor, fn: Callable[[J], T], jobs: list[J]) -> list[T]:
    """``[fn(job) for job in jobs]``: the first in this thread, the others in ``pool``
    (:func:`submit_helper`)."""
    if len(jobs) <= 1:
        return [fn(j) for j in jobs]
    futures = [submit_helper(pool, fn, j) for j in jobs[1:]]
    first = fn(jobs[0])
    return [first] + [f.result() for f in futures]


def read_shared(pool: ThreadPoolExecutor, pid: int, buf, pairs: np.ndarray, parts: int) -> np.ndarray:
    """:func:`read_pages_robust` of ``pairs`` ((n, 2): address, length) back to back into
    ``buf``, in ``parts`` shares of about equal bytes (:func:`share`); True per page read."""
    ends = np.cumsum(pairs[:, 1])
    total = int(ends[-1]) if len(ends) else 0
    cuts = np.searchsorted(ends, [total * j // parts for j in range(1, parts)], side="right")
    bounds = sorted({0, len(pairs), *[int(c) for c in cuts if 0 < c < len(pairs)]})
    offsets = np.r_[0, ends]
    view = memoryview(buf)
    jobs = [(view[int(offsets[a]):int(offsets[b])], pairs[a:b]) for a, b in zip(bounds, bounds[1:])]
    got = share(pool, lambda job: read_pages_robust(pid, job[0], job[1]), jobs)
    return np.concatenate(got) if got else np.zeros(0, bool)
