"""Pre-protection (roadmap 7): memory protected while the target runs; what it writes or first
populates before the freeze is found and re-protected at the freeze, so the capture saves
the content at the freeze instant. Real kernel, real target (tools/targets/populate.c)."""

from __future__ import annotations

import trio

from snapfs.capture import kernel as k
from snapfs.capture.freeze import frozen, frozen_again
from snapfs.capture.maps import classify, read_maps
from snapfs.capture.pagemap import PagemapScanner
from snapfs.capture.preprotect import PreFaultServer, preprotect_regions
from snapfs.capture.protect import handshake, protect_and_record
from tests.test_capture_support import Target, assert_released

PAGE = 4096


async def test_writes_and_new_pages_before_the_freeze_are_reprotected():
    n = 4096
    with Target("populate", str(n)) as t:
        base, end = t.addr, t.addr + n * PAGE
        async with frozen(t.pid, record=False) as attach:
            uffd = attach.uffd
        try:
            features = handshake(uffd)
            regions = classify(read_maps(t.pid), include_readonly=False, huge_sizes={})
            server = PreFaultServer(t.pid, uffd, regions)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.run)
                pre = await trio.to_thread.run_sync(preprotect_regions, uffd, regions)
                assert pre.protected_bytes >= n * PAGE and not pre.unprotectable
                # Rewrites [0, N/8) (protected: each page faults, the server unprotects it)
                # and first populates [N/2, 3N/4) (no fault at all).
                assert await trio.to_thread.run_sync(t.send, "p") == "ok p"

                def at_the_instant():
                    halt = lambda: trio.from_thread.run_sync(server.halt)  # noqa: E731
                    with frozen_again(t.pid, "populate", uffd, on_stopped=halt) as ft:
                        return protect_and_record(
                            ft, include_readonly=False, huge_sizes={}, features=features
                        )

                prep = await trio.to_thread.run_sync(at_the_instant)
                assert server.halted
                nursery.cancel_scope.cancel()
            assert server.faults >= n // 8
            assert prep.reprotected_pages >= n // 8 + n // 4

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
            # quarter and the newly populated [N/2, 3N/4) (the zero-page quarter is a hole).
            led = prep.ledger
            recorded: set[int] = set()
            for lo, hi in zip(led.starts, led.ends):
                if base <= lo < end:
                    recorded.update(range((lo - base) // PAGE, (hi - base) // PAGE))
            assert recorded == set(range(0, n // 4)) | set(range(n // 2, 3 * n // 4))
        finally:
            uffd.close()
        assert_released(t.pid)
