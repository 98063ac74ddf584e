"""The end of a capture: large registered ranges are unregistered a step at a time before
the uffd is closed (closing walks every entry under the target's mmap lock for writing), and
the target's VMAs come back as they were. Real kernel, real target (tools/targets/oracle.c)."""

from __future__ import annotations

from snapfs.capture import CaptureOptions, capture_process
from snapfs.capture import uffd as uffd_mod
from snapfs.capture.uffd import release_steps
from snapfs.store import Store
from tests.support.capture import Target, assert_released, check_oracle, region_image

MiB = 1 << 20


def test_release_steps_join_touching_ranges_and_cut_at_aligned_bounds():
    base = 0x7F0000000000
    steps = release_steps([(base + 40 * MiB, base + 100 * MiB), (base - 3 * MiB, base + 40 * MiB),
                           (base + 200 * MiB, base + 210 * MiB)], step=32 * MiB)
    # One range of 103 MiB (the two touch), cut where addresses are multiples of 32 MiB; the
    # 10 MiB range apart is left to the close.
    assert steps == [(base - 3 * MiB, base), (base, base + 32 * MiB), (base + 32 * MiB, base + 64 * MiB),
                     (base + 64 * MiB, base + 96 * MiB), (base + 96 * MiB, base + 100 * MiB)]
    assert release_steps([(base, base + 32 * MiB)], step=32 * MiB) == []
    # A range the target unmapped or moved meanwhile is not this capture's to unregister.
    assert release_steps([(base, base + 64 * MiB), (base + 96 * MiB, base + 160 * MiB)],
                         skip=[(base + 100 * MiB, base + 101 * MiB)], step=32 * MiB) == [
        (base, base + 32 * MiB), (base + 32 * MiB, base + 64 * MiB)]


def _vma_of(pid: int, addr: int) -> tuple[int, int]:
    for line in open(f"/proc/{pid}/maps"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return lo, hi
    raise AssertionError(f"no VMA at {addr:#x}")


async def test_release_unregisters_step_by_step_and_the_vma_merges_back(store_dir, monkeypatch):
    """Two writers keep writing; with 1 MiB steps the 16 MiB region is split by the first
    unregister (the kernel did it) and is one VMA again after the capture."""
    npages = 4096
    monkeypatch.setattr(uffd_mod, "RELEASE_STEP", MiB)
    with Target("oracle", str(npages), "2", "anon", "mixed") as t:
        before = _vma_of(t.pid, t.addr)
        seen: list[tuple[int, int]] = []
        real = uffd_mod.Uffd.unregister

        def unregister(self, start: int, length: int) -> None:
            real(self, start, length)
            if start <= t.addr < start + length:
                seen.append(_vma_of(t.pid, t.addr))

        monkeypatch.setattr(uffd_mod.Uffd, "unregister", unregister)
        with Store.open(store_dir, create=True) as store:
            await capture_process(t.pid, store, "s", CaptureOptions())
            check_oracle(region_image(store.open_snapshot("s"), t.addr, npages), mixed=True)
        assert seen and seen[0] != before and seen[0][1] - seen[0][0] <= MiB
        assert _vma_of(t.pid, t.addr) == before
        assert_released(t.pid)
        assert t.proc.poll() is None


_KILLED_DURING_RELEASE = """
import os, signal, sys, trio
from snapfs.capture import CaptureOptions, capture_process
from snapfs.capture import uffd as uffd_mod
from snapfs.store import Store
uffd_mod.RELEASE_STEP = 1 << 20
real, calls = uffd_mod.Uffd.unregister, []
def unregister(self, start, length):
    calls.append(start)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, start, length)
uffd_mod.Uffd.unregister = unregister
with Store.open(sys.argv[2], create=True) as store:
    trio.run(capture_process, int(sys.argv[1]), store, "s", CaptureOptions())
"""


def test_snapfs_killed_during_the_release_leaves_the_target_whole(store_dir):
    """SIGKILL between two unregister steps: the kernel's close drops the rest, the target
    runs on released, its VMA whole again, and no snapshot is published."""
    import subprocess
    import sys

    npages = 4096
    with Target("oracle", str(npages), "2", "anon", "mixed") as t:
        before = _vma_of(t.pid, t.addr)
        r = subprocess.run([sys.executable, "-c", _KILLED_DURING_RELEASE, str(t.pid), str(store_dir)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == -9, r.stderr[-2000:]
        assert_released(t.pid)
        assert _vma_of(t.pid, t.addr) == before
        assert t.proc.poll() is None
        with Store.open(store_dir) as store:
            assert [i.name for i in store.list_snapshots()] == []
