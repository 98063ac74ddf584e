"""Pages populated after the freeze read as zero (never read), never-touched pages are holes,
and the snapshot does not grow the target's RSS."""

from __future__ import annotations

import threading

import numpy as np

from snapfs.capture import CaptureOptions, capture_process
from snapfs.store import DATA, HOLE, Store
from tests.support.capture import Target, assert_released, rss_kib


async def test_populated_after_freeze_reads_zero_and_rss_does_not_grow(store_dir):
    n = 4096
    with Target("populate", str(n)) as t:
        rss_before = rss_kib(t.pid, t.addr)
        assert rss_before == n // 4 * 4  # the written quarter only (zero-page reads are free)
        replies: list[str] = []

        def populate_now() -> None:
            replies.append(t.send("p"))

        started: list[threading.Thread] = []

        def on_progress(_p) -> None:
            # First call = just after the target resumed. Command it from a thread: the
            # trio loop must keep serving the faults the command causes.
            if not started:
                th = threading.Thread(target=populate_now)
                th.start()
                started.append(th)

        with Store.open(store_dir, create=True) as store:
            result = await capture_process(
                t.pid, store, "s", CaptureOptions(rate=4 << 20), progress=on_progress
            )
            started[0].join(10)
            assert replies == ["ok p"]
            reader = store.open_snapshot("s")
            reg = next(r for r in reader.regions if r.start == t.addr)
            data = np.frombuffer(reader.read(reg.index, 0, n * 4096), np.uint8).reshape(n, 4096)
            pattern = (np.arange(n // 4) % 251 + 1).astype(np.uint8)
            # Written before the freeze (even the pages overwritten meanwhile): the old bytes.
            assert (data[: n // 4] == pattern[:, None]).all()
            # Read-only touched, populated after the freeze, never touched: zero.
            assert not data[n // 4 :].any()
            runs = list(reader.runs(reg.index))
            holes = np.zeros(n, bool)
            for first, count, kind in runs:
                if kind == HOLE:
                    holes[first : first + count] = True
                if kind == DATA:
                    assert first + count <= n // 4
            assert holes[n // 2 :].all(), "pages populated after the freeze must be holes"
            assert result.faults >= 1
        # The target populated N/4 pages itself; the snapshot added nothing.
        assert rss_kib(t.pid, t.addr) == rss_before + n // 4 * 4
        assert_released(t.pid)
