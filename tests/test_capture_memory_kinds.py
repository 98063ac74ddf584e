"""THP, memfd/shmem and hugetlb regions, and a target that munmaps, madvise(DONTNEED)s and
mremaps memory during the capture: the image is right, or says which pages it lacks."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest

from snapfs.capture import CaptureOptions, capture_process
from snapfs.store import Store
from tests.support.capture import (
    Target,
    assert_released,
    check_oracle,
    region_image,
)


def _smaps_field(pid: int, addr: int, field: str) -> int:
    cur = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            cur = int(m.group(1), 16) <= addr < int(m.group(2), 16)
        elif cur and line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {addr:#x}")


async def _capture(t: Target, store_dir, **opts):
    store = Store.open(store_dir, create=True)
    result = await capture_process(t.pid, store, "s", CaptureOptions(**opts))
    return store, result


async def test_thp_region_captured_without_splitting(store_dir):
    npages = 16384  # 64 MiB = 32 huge pages
    with Target("oracle", str(npages), "2", "thp") as t:
        huge_before = _smaps_field(t.pid, t.addr, "AnonHugePages")
        if huge_before == 0:
            pytest.skip("the kernel gave the target no transparent huge pages")
        store, result = await _capture(t, store_dir)
        with store:
            check_oracle(region_image(store.open_snapshot("s"), t.addr, npages))
        assert result.faults > 0
        # Faults save and unprotect 4 KiB of a huge page (the kernel then maps it with page
        # table entries); after the capture snapfs maps them huge again.
        assert result.huge_restored_bytes > 0
        assert _smaps_field(t.pid, t.addr, "AnonHugePages") == huge_before
        assert_released(t.pid)


async def test_memfd_region_captured(store_dir):
    npages = 4096
    with Target("oracle", str(npages), "2", "memfd") as t:
        store, result = await _capture(t, store_dir)
        with store:
            reader = store.open_snapshot("s")
            reg = next(r for r in reader.regions if r.start == t.addr)
            assert reg.kind == "shmem" and "memfd:oracle" in reg.path
            check_oracle(region_image(reader, t.addr, npages))
        assert not result.warnings  # nobody else maps it
        assert_released(t.pid)


@pytest.fixture
def hugepages():
    path = Path("/proc/sys/vm/nr_hugepages")
    old = path.read_text().strip()
    try:
        path.write_text("64\n")
        if int(path.read_text()) < 16:
            pytest.skip("cannot reserve huge pages")
        yield
    finally:
        path.write_text(old + "\n")


async def test_hugetlb_region_captured(store_dir, hugepages):
    npages = 8192  # 32 MiB = 16 huge pages of 2 MiB
    with Target("oracle", str(npages), "2", "hugetlb") as t:
        store, result = await _capture(t, store_dir)
        with store:
            reader = store.open_snapshot("s")
            reg = next(r for r in reader.regions if r.start == t.addr)
            assert reg.kind == "hugetlb" and reg.page_size == 2 << 20
            check_oracle(region_image(reader, t.addr, npages))
        assert_released(t.pid)


def test_huge_page_sizes_asked_per_file_mapping_match_smaps(hugepages):
    """The hugetlb page sizes asked with PROCMAP_QUERY (file mappings only) are those smaps
    gives (which walks every page table)."""
    from snapfs.capture.maps import _smaps_page_sizes, huge_page_sizes

    with Target("oracle", "8192", "2", "hugetlb") as t:
        sizes = huge_page_sizes(t.pid)
        assert sizes.get(t.addr) == 2 << 20
        assert sizes == _smaps_page_sizes(t.pid)


async def test_unmap_dontneed_mremap_during_capture(store_dir):
    """The target madvise(DONTNEED)s, munmaps and mremaps parts of the oracle buffer right
    after the freeze: every page of the image is the freeze content or reported lost."""
    npages = 8192
    q = npages // 16
    affected = np.zeros(npages, bool)
    for lo in (npages // 4, npages // 2, npages * 3 // 4):
        affected[lo : lo + q] = True
    with Target("oracle", str(npages), "2") as t:
        replies: list[str] = []
        started: list[threading.Thread] = []

        def mutate() -> None:
            for cmd in "dur":
                replies.append(t.send(cmd))

        def on_progress(_p) -> None:
            if not started:  # just after the resume; from a thread: faults must be served
                started.append(threading.Thread(target=mutate))
                started[0].start()

        store = Store.open(store_dir, create=True)
        with store:
            result = await capture_process(
                t.pid, store, "s", CaptureOptions(rate=16 << 20), progress=on_progress
            )
            started[0].join(10)
            assert replies == ["ok d", "ok u", "ok r"]
            reader = store.open_snapshot("s")
            image = region_image(reader, t.addr, npages)
            reg = next(r for r in reader.regions if r.start <= t.addr < r.start + r.length)
            lost = np.zeros(npages, bool)
            base = (t.addr - reg.start) // 4096
            for first, count, _reason in reg.meta.get("lost", []):
                lost[first - base : first - base + count] = True
            # Every page not reported lost is exactly the freeze content (one instant)...
            check_oracle(image, skip=lost)
            # ...lost pages are only where the target changed its mappings, and read as holes.
            assert not (lost & ~affected).any(), "pages reported lost outside the changed ranges"
            assert not image[lost].any()
            if lost.any():
                assert any("not captured" in w for w in result.warnings)
        assert_released(t.pid)


async def test_fork_during_capture(store_dir):
    """The target forks children that overwrite their copy of the buffer: the parent's image
    is unaffected and still one instant."""
    npages = 8192
    with Target("oracle", str(npages), "2") as t:
        replies: list[str] = []
        started: list[threading.Thread] = []

        def fork_twice() -> None:
            replies.extend(t.send("f") for _ in range(2))

        def on_progress(_p) -> None:
            if not started:
                started.append(threading.Thread(target=fork_twice))
                started[0].start()

        with Store.open(store_dir, create=True) as store:
            await capture_process(t.pid, store, "s", CaptureOptions(rate=32 << 20), progress=on_progress)
            started[0].join(10)
            assert replies == ["ok f", "ok f"]
            check_oracle(region_image(store.open_snapshot("s"), t.addr, npages))
        assert_released(t.pid)


async def test_shmem_pages_not_mapped_by_the_target(store_dir):
    """memfd pages written with write() and never touched through the target's mapping are
    still its memory: captured with their freeze content although the target overwrites
    them through the mapping right after the freeze."""
    n = 512
    with Target("shmfile", str(n)) as t:
        replies: list[str] = []
        started: list[threading.Thread] = []

        def on_progress(_p) -> None:
            if not started:
                started.append(threading.Thread(target=lambda: replies.append(t.send("w"))))
                started[0].start()

        with Store.open(store_dir, create=True) as store:
            await capture_process(t.pid, store, "s", CaptureOptions(rate=1 << 20), progress=on_progress)
            started[0].join(10)
            assert replies == ["ok w"]
            reader = store.open_snapshot("s")
            reg = next(r for r in reader.regions if r.start == t.addr)
            data = np.frombuffer(reader.read(reg.index, 0, n * 4096), np.uint8).reshape(n, 4096)
            for p in range(n):
                want = (p % 251) + 1 if p % 2 == 0 else 0
                assert (data[p] == want).all(), f"page {p}"
        assert_released(t.pid)


async def test_shmem_mapped_by_another_process_is_reported(store_dir):
    """Writes by other processes cannot be write-protected: the snapshot says so."""
    import subprocess
    import sys

    npages = 256
    with Target("oracle", str(npages), "1", "memfd") as t:
        end = t.addr + npages * 4096
        other = subprocess.Popen(
            [sys.executable, "-c",
             "import mmap, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
             "m = mmap.mmap(fd, 0); print('mapped', flush=True); sys.stdin.read()",
             f"/proc/{t.pid}/map_files/{t.addr:x}-{end:x}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert other.stdout.readline().strip() == "mapped"
            with Store.open(store_dir, create=True) as store:
                result = await capture_process(t.pid, store, "s", CaptureOptions())
            assert any("also mapped by other processes" in w for w in result.warnings), result.warnings
        finally:
            other.kill()
            other.wait()
