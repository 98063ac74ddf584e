"""Pre-protection: memory protected while the target runs; what it writes, first
populates or zaps before the freeze is found at the freeze (written pages re-protected), so
the capture saves the content at the freeze instant. Real kernel, real target
(tools/targets/populate.c)."""

from __future__ import annotations

import contextlib
import errno

import numpy as np
import pytest
import trio

from snapfs.capture import kernel as k
from snapfs.capture.freeze import frozen
from snapfs.capture.maps import ClassifiedMaps, read_maps_text
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.preprotect import protect_then_freeze
from snapfs.capture.protect import handshake, plan_instant, protect_and_record
from tests.support.capture import Target, assert_released

PAGE = 4096


@contextlib.asynccontextmanager
async def _attached(t: Target):
    """The target's uffd (handshake done: its features) and maps; the uffd closed after."""
    async with frozen(t.pid, record=False) as attach:
        uffd = attach.uffd
    try:
        maps = ClassifiedMaps(read_maps_text(t.pid), include_readonly=False, huge_sizes={})
        yield uffd, handshake(uffd), maps
    finally:
        uffd.close()


def _plan(pre):
    return plan_instant(pre.maps, pre)


def _split_scans(monkeypatch) -> None:
    """Split the instant's scans and copies across three threads even on a 16 MiB target."""
    from snapfs.capture import protect

    monkeypatch.setattr(protect, "SCAN_SPLIT_BYTES", 1 << 20)
    monkeypatch.setattr(protect, "COPY_SPLIT_BYTES", 1)
    monkeypatch.setattr(protect, "_SCAN_PARTS", 3)
    monkeypatch.setattr(protect, "_scan_pool", None)
    protect.warm_scan_pool()  # as the engine does before the pause


@pytest.mark.parametrize("plan", [None, _plan, "split"], ids=["decided-in-pause", "decided-before", "split-scans"])
@pytest.mark.parametrize("zap", [False, True], ids=["unchanged-vma", "zapped-range"])
async def test_writes_and_new_pages_before_the_freeze_are_reprotected(zap, plan, monkeypatch):
    """Unchanged VMA: populated = recorded after protecting + found WRITTEN at the freeze.
    With a DONTNEED meanwhile the VMA is scanned in full at the freeze. The same whether
    the instant's work was decided (and its scans run ahead, split across threads or not)
    before the freeze or in it (an event voids a plan decided before)."""
    split = plan == "split"
    if split:
        _split_scans(monkeypatch)
        plan = _plan
    n = 4096
    with Target("populate", str(n)) as t:
        base, end = t.addr, t.addr + n * PAGE
        async with _attached(t) as (uffd, features, maps):
            async def meanwhile(pre) -> None:
                assert pre.protected_bytes >= n * PAGE and not pre.unprotectable
                # Rewrites [0, N/8) (protected: each page faults, the server unprotects it),
                # first populates [N/2, 3N/4) (no fault at all), then maybe zaps [N/8, N/4):
                # the server reads the REMOVE event, the freeze rescans that VMA in full.
                assert await trio.to_thread.run_sync(t.send, "p") == "ok p"
                if zap:
                    assert await trio.to_thread.run_sync(t.send, "d") == "ok d"

            def at_instant(ft, pre):
                return protect_and_record(
                    ft, include_readonly=False, huge_sizes={}, features=features, pre=pre
                )

            pre, _ft, prep = await protect_then_freeze(
                t.pid, "populate", uffd, maps, at_instant, meanwhile, plan=plan
            )
            assert (pre.plan is not None) == (plan is not None)
            if split:  # the scans ran ahead in shares for three threads
                assert len(pre.plan.scan_cuts) >= 2
            assert pre.faults >= n // 8
            assert prep.reprotected_pages >= n // 8 + n // 4
            zapped = (base + n // 8 * PAGE, base + n // 4 * PAGE)
            assert (zapped in pre.changed) == zap and len(pre.changed) == zap

            scanner = PagemapScanner(t.pid)
            try:
                # Nothing populated in the buffer is left unprotected...
                written = scanner.scan(
                    base, end, require=k.PAGE_IS_WRITTEN | k.PAGE_IS_PRESENT,
                    exclude=k.PAGE_IS_PFNZERO,
                )
                assert len(written) == 0
            finally:
                scanner.close()
            # ...and the ledger holds exactly the pages populated at the freeze: the first
            # quarter (an eighth if zapped) and the newly populated [N/2, 3N/4); the zero-page
            # quarter is a hole.
            led = prep.ledger
            recorded: set[int] = set()
            for lo, hi in zip(led.starts, led.ends):
                if base <= lo < end:
                    recorded.update(range((lo - base) // PAGE, (hi - base) // PAGE))
            first = n // 8 if zap else n // 4
            assert recorded == set(range(0, first)) | set(range(n // 2, 3 * n // 4))
        assert_released(t.pid)


async def test_mapping_made_after_the_plan_is_captured_at_the_freeze():
    """A plan decided before the freeze knows the maps of then: a mapping made after it
    (no uffd event tells) voids it at the freeze, which then registers, protects and
    records the new mapping like any other."""
    n = 4096
    with Target("populate", str(n)) as t:
        async with _attached(t) as (uffd, features, maps):
            made = []

            async def meanwhile(pre) -> None:
                assert pre.plan is not None
                reply = await trio.to_thread.run_sync(t.send, "n")
                made.append(int(reply.split("addr=")[1], 16))

            def at_instant(ft, pre):
                return protect_and_record(ft, include_readonly=False, huge_sizes={}, features=features, pre=pre)

            pre, ft, prep = await protect_then_freeze(t.pid, "populate", uffd, maps, at_instant, meanwhile,
                                                      plan=_plan)
            assert pre.plan.text != ft.maps_text and not pre.changed
            lo, hi = made[0], made[0] + n // 8 * PAGE
            scanner = PagemapScanner(t.pid)
            try:  # protected at the freeze: nothing there is writable
                written = scanner.scan(lo, hi, require=k.PAGE_IS_WRITTEN | k.PAGE_IS_PRESENT)
            finally:
                scanner.close()
            assert len(written) == 0
            led = prep.ledger
            recorded = sum(min(int(b), hi) - max(int(a), lo) for a, b in zip(led.starts, led.ends)
                           if a < hi and b > lo)
            assert recorded == hi - lo
        assert_released(t.pid)


@pytest.mark.parametrize("split", [False, True], ids=["one-thread", "split-copy"])
async def test_scattered_pages_written_before_the_freeze_are_copied_in_it(split, monkeypatch):
    """Single pages written during pre-protection (the ones written next) are copied in the
    freeze with their content at the instant, claimed in the ledger and left writable, not
    protected again (a protect ioctl each was ~half of a 1 GiB target's pause); the same
    when the copy is split across threads."""
    from snapfs.capture.ledger import SAVED
    from snapfs.capture.memory import prefaulted_buffer
    from snapfs.capture.protect import COPY_WRITTEN_MAX

    if split:
        _split_scans(monkeypatch)
    n = 4096
    with Target("populate", str(n)) as t:
        base = t.addr
        async with _attached(t) as (uffd, features, maps):
            async def meanwhile(pre) -> None:
                assert await trio.to_thread.run_sync(t.send, "s") == "ok s"

            def at_instant(ft, pre):
                return protect_and_record(ft, include_readonly=False, huge_sizes={}, features=features,
                                          pre=pre, copy_written=prefaulted_buffer(COPY_WRITTEN_MAX))

            pre, _ft, prep = await protect_then_freeze(t.pid, "populate", uffd, maps, at_instant, meanwhile)
            pages = list(range(0, n // 4, 8))
            assert pre.faults >= len(pages) and prep.reprotected_pages == 0
            region = next(i for i, v in enumerate(prep.regions) if v.start <= base < v.end)
            first = (base - prep.regions[region].start) // PAGE
            # (Other pieces: what else the target wrote meanwhile, its stack say.)
            offs = np.cumsum([0] + [c for _, _, c in prep.written])
            mine = [(i, w) for i, w in enumerate(prep.written) if w[0] == region]
            assert [w for _, w in mine] == [(region, first + p, 1) for p in pages]
            data = prep.written_data
            assert all(bytes(data[offs[i] * PAGE:offs[i + 1] * PAGE]) == b"\xaa" * PAGE for i, _ in mine)
            led = prep.ledger
            for p in pages:
                ext = led.find(base + p * PAGE)
                assert led.state[led.slots(ext, base + p * PAGE, base + (p + 1) * PAGE)[0]] == SAVED
            scanner = PagemapScanner(t.pid)
            try:  # left writable: exactly those pages
                written = scanner.scan(base, base + n * PAGE, require=k.PAGE_IS_WRITTEN | k.PAGE_IS_PRESENT,
                                       exclude=k.PAGE_IS_PFNZERO)
            finally:
                scanner.close()
            assert [(int(a) - base) // PAGE for a in written["start"]] == pages
            assert all(int(b) - int(a) == PAGE for a, b in zip(written["start"], written["end"]))
        assert_released(t.pid)


async def test_range_remapped_before_it_is_protected(store_dir, monkeypatch):
    """A VMA replaced between the register and the protect (a new, unregistered mapping in
    its place: EINVAL) is left to the freeze, which scans it in full and protects it: the
    capture commits one instant (a PostgreSQL tree capture under load failed on it)."""
    from snapfs.capture import CaptureOptions, capture_process
    from snapfs.capture.uffd import Uffd
    from snapfs.store import Store
    from tests.support.capture import check_oracle, region_image

    refused = []
    protect = Uffd.protect

    def once_einval(self, start, length, wp, **kw):
        if wp and not refused:
            refused.append(start)
            raise OSError(errno.EINVAL, "ioctl UFFDIO_WRITEPROTECT: Invalid argument")
        return protect(self, start, length, wp, **kw)

    monkeypatch.setattr(Uffd, "protect", once_einval)
    npages = 4096
    with Target("oracle", str(npages), "2") as t:
        with Store.open(store_dir, create=True) as store:
            await capture_process(t.pid, store, "s", CaptureOptions())
            check_oracle(region_image(store.open_snapshot("s"), t.addr, npages))
        assert refused
        assert_released(t.pid)


def test_a_vma_the_kernel_refuses_to_register_is_recorded():
    """EINVAL from UFFDIO_REGISTER is the kernel refusing that VMA (not one unmapped
    meanwhile: ENOMEM/ENOENT): it goes to ``unprotectable`` so the freeze copies it."""
    from snapfs.capture.maps import Vma
    from snapfs.capture.preprotect import PreProtected, _register_each

    class Refusing:  # only the call under test: the kernel's answer for such a VMA
        def register_wp(self, start, length):
            raise OSError(errno.EINVAL, "Invalid argument")

    out = PreProtected()
    vma = Vma(0x10000, 0x20000, "rw-p", 0, (0, 0), 0, "")
    assert _register_each(Refusing(), [vma], out) == []
    assert out.unprotectable == {0x10000: "Invalid argument"}
