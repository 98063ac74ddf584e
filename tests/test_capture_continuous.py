"""Continuous snapshots (``--every``): after the first capture, writes are tracked with
async write-protection; each later snapshot copies only what changed (while the target is
stopped) and inherits the rest from its parent, and is still exactly one instant."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from snapfs.capture import CaptureOptions, capture_process, snapshot_next
from snapfs.capture.continuous import capture_next, written_bytes
from snapfs.store import Store
from tests.support.capture import Target, assert_released, check_oracle, region_image


async def test_chain_of_tracked_snapshots_is_each_one_instant(store_dir):
    npages = 8192
    with Target("oracle", str(npages), "2") as t:
        with Store.open(store_dir, create=True) as store:
            first = await capture_process(t.pid, store, "c0", CaptureOptions(continuous=True))
            tracking = first.tracking
            try:
                names = ["c0"]
                for i in range(1, 4):
                    r = await capture_next(tracking, store, f"c{i}")
                    names.append(r.name)
                    assert r.info.parent == names[-2]
            finally:
                tracking.close()
            for n in names:
                check_oracle(region_image(store.open_snapshot(n), t.addr, npages))
        assert_released(t.pid)


async def test_unchanged_memory_is_inherited_not_read(store_dir):
    n = 8192
    with Target("populate", str(n)) as t:
        with Store.open(store_dir, create=True) as store:
            first = await capture_process(t.pid, store, "p0", CaptureOptions(continuous=True))
            tracking = first.tracking
            try:
                quiet = await capture_next(tracking, store, "p1")
                # The scan that found the written pages also re-protected them: an idle
                # target has (almost) nothing written afterwards.
                assert written_bytes(tracking) < 256 << 10
                # Now the target writes N/8 old pages and populates N/4 new ones.
                assert t.send("p") == "ok p"
                assert written_bytes(tracking) >= (n // 8 + n // 4) * 4096
                busy = await capture_next(tracking, store, "p2")
                assert written_bytes(tracking) < 256 << 10
                again = await capture_next(tracking, store, "p3")  # nothing new: all inherited
            finally:
                tracking.close()
            assert quiet.info.meta["copied_bytes"] < 512 << 10  # a few stack/libc pages
            assert again.info.meta["copied_bytes"] < 512 << 10
            timing = busy.info.meta["timing_ms"]
            assert {"stop_ms", "scan_ms", "copy_ms", "store_ms"} <= timing.keys()
            assert sum(timing[x] for x in ("stop_ms", "scan_ms", "copy_ms")) <= busy.pause_ms
            copied = busy.info.meta["copied_bytes"]
            assert (n // 8 + n // 4) * 4096 <= copied < (n // 8 + n // 4) * 4096 + (1 << 20)
            a = region_image(store.open_snapshot("p1"), t.addr, n)
            b = region_image(store.open_snapshot("p2"), t.addr, n)
            pattern = (np.arange(n // 4) % 251 + 1).astype(np.uint64) * np.uint64(0x0101010101010101)
            assert (a[: n // 4] == pattern[:, None]).all() and not a[n // 4 :].any()
            ee = np.uint64(0xEEEEEEEEEEEEEEEE)
            assert (b[: n // 8] == ee).all() and (b[n // 8 : n // 4] == pattern[n // 8 :, None]).all()
            assert not b[n // 4 : n // 2].any() and (b[n // 2 : 3 * n // 4] == ee).all()
            assert not b[3 * n // 4 :].any()
            assert (region_image(store.open_snapshot("p3"), t.addr, n) == b).all()
        assert_released(t.pid)


async def test_large_changes_fall_back_to_a_live_capture(store_dir, monkeypatch):
    """When much memory changed, the next child is a live capture (short pause) rather than
    a copy while stopped; the series goes on with a fresh tracking."""
    from snapfs.capture import continuous

    monkeypatch.setattr(continuous, "STOPPED_COPY_LIMIT", 1 << 20)
    npages = 4096
    with Target("oracle", str(npages), "1") as t:
        with Store.open(store_dir, create=True) as store:
            r = await capture_process(t.pid, store, "f0", CaptureOptions(continuous=True))
            try:
                for i in range(1, 3):
                    r = await snapshot_next(r.tracking, store, f"f{i}")
                    assert r.info.parent == f"f{i - 1}"
                    assert "tracked_incremental" not in r.info.meta  # the live path
            finally:
                r.tracking.close()
            for n in ("f0", "f1", "f2"):
                check_oracle(region_image(store.open_snapshot(n), t.addr, npages))
        assert_released(t.pid)


async def test_partly_written_memory_children_are_one_instant(store_dir, monkeypatch):
    """A paced writer: each child mixes pages copied while stopped with pages inherited
    from its parent, and must still show exactly one instant (the region scanned and
    copied in parallel slices)."""
    from snapfs.capture import continuous

    monkeypatch.setattr(continuous, "_SPLIT_MIN", 1 << 20)
    monkeypatch.setattr(continuous, "SPLIT", 3)  # uneven slices, a pool even on 1 core
    monkeypatch.setattr(continuous, "_SPLIT_COPY", 64 << 10)
    monkeypatch.setattr(continuous, "_SPLIT_EARLY", 1 << 20)
    npages = 8192
    with Target("oracle", str(npages), "2", "anon", "plain", "3000") as t:
        with Store.open(store_dir, create=True) as store:
            first = await capture_process(t.pid, store, "m0", CaptureOptions(continuous=True))
            tracking = first.tracking
            names = ["m0"]
            try:
                for i in range(1, 4):
                    await trio.sleep(0.2)
                    r = await capture_next(tracking, store, f"m{i}")
                    names.append(r.name)
                    copied = r.info.meta["copied_bytes"]
                    assert 0 < copied < npages * 4096 // 2  # partly copied, partly inherited
                    assert r.info.shared_bytes > 0
            finally:
                tracking.close()
            instants = [check_oracle(region_image(store.open_snapshot(n), t.addr, npages)) for n in names]
            assert instants == sorted(instants) and len(set(instants)) == len(instants)
        assert_released(t.pid)


def _before_the_stop(monkeypatch, action) -> None:
    """Run ``action`` after the pre-pass copied its pages, just before the target is stopped."""
    from snapfs.capture import continuous

    stopped_pass = continuous._stopped_pass

    def late(*args):
        action()
        return stopped_pass(*args)

    monkeypatch.setattr(continuous, "_stopped_pass", late)


@pytest.mark.parametrize("kind", ["anon", "thp"])
@pytest.mark.parametrize("holes_written", [True, False], ids=["kernel-as-is", "ask-for-holes"])
async def test_memory_dropped_between_prepass_and_stop_reads_as_zeros(store_dir, monkeypatch, kind,
                                                                     holes_written):
    """The target drops 2 MiB (a whole page table or huge page) after the pre-pass copied
    it and before the stop: the child must show zeros there, not the copied bytes (the
    stop's probe sees memory gone even without its page table), whether the kernel reports
    such holes as written or the probe asks for them."""
    from snapfs.capture import continuous

    if not holes_written:
        monkeypatch.setattr(continuous, "_holes_read_as_written", lambda: False)
    npages = 8192
    q = npages // 16
    dropped = np.zeros(npages, bool)
    dropped[npages // 4 : npages // 4 + q] = True
    with Target("oracle", str(npages), "1", kind, "plain", "2000") as t:
        with Store.open(store_dir, create=True) as store:
            first = await capture_process(t.pid, store, "z0", CaptureOptions(continuous=True))
            tracking = first.tracking
            try:
                await capture_next(tracking, store, "z1")
                # Rewrite the soon-dropped block so the pre-pass copies it.
                with open(f"/proc/{t.pid}/mem", "r+b", buffering=0) as mem:
                    mem.seek(t.addr + npages // 4 * 4096)
                    mem.write(b"\x5a" * (q * 4096))
                replies = []
                _before_the_stop(monkeypatch, lambda: replies.append(t.send("d")))
                r = await capture_next(tracking, store, "z2")
                assert replies == ["ok d"]
            finally:
                tracking.close()
            assert r.info.meta["copied_bytes"] >= q * 4096  # the pre-pass did copy it
            image = region_image(store.open_snapshot("z2"), t.addr, npages)
            assert not image[dropped].any(), "dropped memory shows the pre-pass's copy"
            check_oracle(image, skip=dropped)
            assert r.info.meta["timing_ms"]["probed_vmas"] >= 1
        assert_released(t.pid)


async def test_written_after_the_prepass_copy_is_taken_at_the_stop(store_dir, monkeypatch):
    """Pages the pre-pass copied and the target rewrote before the stop are copied again
    during the stop; the others come from the pre-pass's copy."""
    n = 8192

    def rewrite() -> None:
        with open(f"/proc/{t.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(t.addr)
            mem.write(b"\x33" * (16 * 4096))

    with Target("populate", str(n)) as t:
        with Store.open(store_dir, create=True) as store:
            first = await capture_process(t.pid, store, "w0", CaptureOptions(continuous=True))
            tracking = first.tracking
            try:
                assert t.send("p") == "ok p"  # writes [0, N/8) and populates [N/2, 3N/4)
                _before_the_stop(monkeypatch, rewrite)
                r = await capture_next(tracking, store, "w1")
            finally:
                tracking.close()
            img = region_image(store.open_snapshot("w1"), t.addr, n)
            ee, x33 = np.uint64(0xEEEEEEEEEEEEEEEE), np.uint64(0x3333333333333333)
            assert (img[:16] == x33).all() and (img[16 : n // 8] == ee).all()
            assert not img[n // 4 : n // 2].any() and (img[n // 2 : 3 * n // 4] == ee).all()
            timing = r.info.meta["timing_ms"]
            # The pre-pass copied what was written since w0; the stop only the rewritten
            # pages (and small untracked mappings).
            assert r.info.meta["copied_bytes"] >= (n // 8 + n // 4 + 16) * 4096
            assert 16 * 4096 <= timing["stop_copied_bytes"] < 16 * 4096 + (1 << 20)
        assert_released(t.pid)


async def test_a_failed_child_does_not_lose_what_was_written(store_dir, monkeypatch):
    """A child that fails after its passes re-protected the written pages (here: storing
    fails) publishes nothing, and the next child still takes those pages."""
    from snapfs.capture import continuous

    n = 8192
    with Target("populate", str(n)) as t:
        with Store.open(store_dir, create=True) as store:
            first = await capture_process(t.pid, store, "f0", CaptureOptions(continuous=True))
            tracking = first.tracking
            try:
                assert t.send("p") == "ok p"
                real_store = continuous._store

                def failing_store(*args):
                    raise OSError(28, "No space left on device (test)")

                monkeypatch.setattr(continuous, "_store", failing_store)
                with pytest.raises(OSError, match="test"):
                    await capture_next(tracking, store, "f1")
                assert [s.name for s in store.list_snapshots()] == ["f0"]
                monkeypatch.setattr(continuous, "_store", real_store)
                r = await capture_next(tracking, store, "f1")
                assert r.info.parent == "f0"
            finally:
                tracking.close()
            img = region_image(store.open_snapshot("f1"), t.addr, n)
            ee = np.uint64(0xEEEEEEEEEEEEEEEE)
            assert (img[: n // 8] == ee).all() and (img[n // 2 : 3 * n // 4] == ee).all()
        assert_released(t.pid)
