"""Synthetic snapshots with known content for the filesystem tests (no tests in here).

Built through the real store writer: data pages, zero pages, holes, several regions, names
that need percent-encoding, a region above the largest file offset, and a VM snapshot.
"""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from snapfs.fs.mount import mounted_at
from snapfs.store import RegionSpec, Store
from tests.conftest import snapfs_cmd

PAGE = 4096
MARKER = b"SNAPFS-FS-TEST-MARKER-5d2e"
TOP_START = (1 << 63) - PAGE


@dataclass
class Region:
    """What a test expects of one region: where it is and its bytes."""

    name: str
    start: int
    data: bytes  # full contents, zeros for holes and zero pages
    data_pages: int
    kind: str = "anon"


def _pages(rng: np.random.Generator, n: int) -> bytearray:
    return bytearray(rng.integers(1, 256, n * PAGE, dtype=np.uint8).tobytes())


def write_snapshot(store: Store, name: str, regions: list[tuple[RegionSpec, bytearray, np.ndarray]],
                   meta: dict | None = None) -> None:
    """Write regions: ``(spec, contents, present)`` with ``present[i]`` False for holes."""
    w = store.begin_snapshot(name, meta or {"pid": 4242, "comm": "fake", "exe": "/bin/fake"})
    for spec, contents, present in regions:
        idx = w.add_region(spec)
        w.put_pages(idx, 0, bytes(contents), present)
    w.commit({})


def process_snapshot(store: Store, name: str = "app", seed: int = 1) -> list[Region]:
    """A process-like snapshot; returns the expected regions in region order."""
    rng = np.random.default_rng(seed)
    out: list[Region] = []
    specs = []

    # heap: 64 pages = data 0-9, zero 10-19, hole 20-29, data 30-63.
    heap = _pages(rng, 64)
    present = np.ones(64, bool)
    heap[10 * PAGE : 20 * PAGE] = bytes(10 * PAGE)
    present[20:30] = False
    heap[20 * PAGE : 30 * PAGE] = bytes(10 * PAGE)
    specs.append((RegionSpec("heap", 0x5555_5555_0000, 64 * PAGE, "rw-p", 0, None, "heap"), heap, present))
    out.append(Region("heap", 0x5555_5555_0000, bytes(heap), 44, "heap"))

    # A file-backed region whose name needs encoding, only page 3 captured.
    lib = bytearray(8 * PAGE)
    lib[3 * PAGE : 4 * PAGE] = _pages(rng, 1)
    lib[3 * PAGE + 100 : 3 * PAGE + 100 + len(MARKER)] = MARKER
    present = np.zeros(8, bool)
    present[3] = True
    libname = "lib/x%y.so-7f0000000000"
    specs.append((RegionSpec(libname, 0x7F00_0000_0000, 8 * PAGE, "r--p", 0x1000, "/usr/lib/x%y.so", "file"),
                  lib, present))
    out.append(Region(libname, 0x7F00_0000_0000, bytes(lib), 1, "file"))

    # Adjacent to the library: a read can straddle both.
    big = _pages(rng, 1024)
    specs.append((RegionSpec("anon-7f0000008000", 0x7F00_0000_8000, 1024 * PAGE, "rw-p", 0, None, "anon"),
                   big, np.ones(1024, bool)))
    out.append(Region("anon-7f0000008000", 0x7F00_0000_8000, bytes(big), 1024))

    stack = _pages(rng, 16)
    stack[5 * PAGE : 5 * PAGE + len(MARKER)] = MARKER
    specs.append((RegionSpec("stack", 0x7FFC_0000_0000, 16 * PAGE, "rw-p", 0, None, "stack"),
                   stack, np.ones(16, bool)))
    out.append(Region("stack", 0x7FFC_0000_0000, bytes(stack), 16, "stack"))

    # Ends at 2**63: beyond the largest file offset, so left out of `mem` (like [vsyscall]).
    top = _pages(rng, 1)
    specs.append((RegionSpec("top", TOP_START, PAGE, "r--p", 0, None, "vdso"), top, np.ones(1, bool)))
    out.append(Region("top", TOP_START, bytes(top), 1, "vdso"))
    write_snapshot(store, name, specs)
    return out


def vm_snapshot(store: Store, name: str = "vm1", seed: int = 2) -> list[Region]:
    """A VM-like snapshot: RAMBlocks all starting at 0, QEMU-style ids."""
    rng = np.random.default_rng(seed)
    ram = _pages(rng, 300)
    present = np.ones(300, bool)
    present[100:200] = False
    ram[100 * PAGE : 200 * PAGE] = bytes(100 * PAGE)
    rom = _pages(rng, 4)
    specs = [
        (RegionSpec("pc.ram", 0, 300 * PAGE, "rw-p", 0, None, "ramblock"), ram, present),
        (RegionSpec("/rom@etc/acpi/tables", 0, 4 * PAGE, "rw-p", 0, None, "ramblock"), rom, np.ones(4, bool)),
    ]
    write_snapshot(store, name, specs, {"kind": "vm"})
    return [Region("pc.ram", 0, bytes(ram), 200, "ramblock"),
            Region("/rom@etc/acpi/tables", 0, bytes(rom), 4, "ramblock")]


def run(cmd: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing its output (bounded in time)."""
    return subprocess.run(cmd, env=env, capture_output=True, timeout=120, **kw)


@contextlib.contextmanager
def mounted_store(mnt: Path, env: dict[str, str], log: Path) -> Iterator[Path]:
    """``snapfs mount`` (daemon mode) at ``mnt``; returns once usable; always unmounts."""
    res = run(snapfs_cmd() + ["mount", str(mnt), "--log-file", str(log)], env)
    assert res.returncode == 0, res.stderr.decode()
    try:
        assert mounted_at(str(mnt)) == "fuse.snapfs"
        yield mnt
    finally:
        if mounted_at(str(mnt)) is not None:
            if run(snapfs_cmd() + ["umount", str(mnt)], env).returncode != 0:
                run(["fusermount3", "-u", "-z", str(mnt)])
