"""The tree target's one-cut oracle can fail: a tree stopped with SIGSTOP reads as one instant,
the same tree read while it runs does not (tests/support/tree_oracle.py, tools/targets/treecounter.c)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from tests.support.tree_oracle import check_tree
from tests.support.tree import TreeTarget


def _image(pid: int, addr: int, npages: int) -> np.ndarray:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(addr)
        return np.frombuffer(f.read(npages * 4096), np.uint64).reshape(npages, 512)


def _read_tree(t: TreeTarget):
    shared = _image(t.worker_pids[0], t.shared_addr, t.shared_pages + 1)
    return shared, {w: _image(pid, t.private_addr[w], t.private_pages + 1)
                    for w, pid in enumerate(t.worker_pids)}


def test_oracle_accepts_a_stopped_tree_and_rejects_a_running_one():
    with TreeTarget(4, 2048, 1024) as t:
        time.sleep(0.3)
        for pid in t.worker_pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(0.05)
            m = check_tree(*_read_tree(t))
            assert m > 0
        finally:
            for pid in t.worker_pids:
                os.kill(pid, signal.SIGCONT)
        failures = 0
        for _ in range(5):
            try:
                check_tree(*_read_tree(t))
            except AssertionError:
                failures += 1
        assert failures >= 3, "reading a running tree should not look like one instant"
