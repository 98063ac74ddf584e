"""A tiny multiboot test guest for QEMU, assembled on demand with GNU as/ld.

``build()`` assembles ``tools/guest/guest.S`` into ``build/guest/guest.elf`` (rebuilding when
the source or linker script is newer) and returns its path; boot it with
``qemu-system-x86_64 -machine pc -m 32M -kernel guest.elf``. :func:`check_pattern` verifies a
guest memory image (see guest.S for the pattern it keeps writing).
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np

from tools.buildcache import cached_build

SOURCE_DIR = Path(__file__).resolve().parent
BUILD_DIR = SOURCE_DIR.parent.parent / "build" / "guest"

RECORD_GPA = 0x300000
MAGIC = b"SNAPGST1"
FILL_START = 0x1000000  # guest.S fills [FILL_START, record's fill end) with address ^ 0x5a5a5a5a


def build() -> Path:
    """Assemble and link the guest if needed; return the ELF's path."""
    src, script = SOURCE_DIR / "guest.S", SOURCE_DIR / "guest.ld"

    def assemble_to(tmp: Path) -> None:
        obj = tmp.with_suffix(".o")
        subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
        subprocess.run(["ld", "-m", "elf_i386", "--no-warn-rwx-segments", "-T", str(script),
                        "-o", str(tmp), str(obj)], check=True)
        obj.unlink()

    return cached_build(BUILD_DIR / "guest.elf", [src, script], assemble_to)


def read_counter(ram_file: Path) -> int:
    """The guest's counter read straight from its RAM file (0 if not there yet)."""
    try:
        with open(ram_file, "rb") as f:
            rec = os.pread(f.fileno(), 12, RECORD_GPA)
    except FileNotFoundError:
        return 0
    return struct.unpack_from("<I", rec, 8)[0] if len(rec) == 12 and rec[:8] == MAGIC[:8] else 0


def counter(image: bytes | memoryview) -> int:
    """The guest's iteration counter in a RAM image (0 before the guest started)."""
    return struct.unpack_from("<I", image, RECORD_GPA + 8)[0]


def check_pattern(image: bytes | memoryview) -> int:
    """Check that ``image`` (guest RAM from GPA 0) is one consistent instant; return its counter.

    Raises AssertionError describing the first inconsistency.
    """
    rec = bytes(image[RECORD_GPA : RECORD_GPA + 24])
    assert rec[:8] == MAGIC, f"no guest record at 0x{RECORD_GPA:x}: {rec[:8]!r}"
    count, npages, area, fill_end = struct.unpack("<IIII", rec[8:])
    pages = np.frombuffer(image, dtype="<u4", count=npages * 1024, offset=area).reshape(npages, 1024)
    values = pages[:, 0].astype(np.int64)
    # The page of iteration count+1 may be written while the counter still says count.
    nxt = (count + 1) % npages
    eff = count + 1 if values[nxt] == count + 1 else count
    idx = np.arange(npages, dtype=np.int64)
    expect = eff - ((eff - idx) % npages)
    expect[expect < 1] = 0
    bad = np.flatnonzero(values != expect)
    assert bad.size == 0, (
        f"guest pattern torn: counter {count}, page {bad[0]} holds {values[bad[0]]}, expected {expect[bad[0]]} "
        f"({bad.size} pages differ)"
    )
    comp = pages[:, 1]
    written = expect > 0
    assert np.array_equal(comp[written], ~pages[written, 0]), "guest pattern torn: complement words differ"
    assert not comp[~written].any(), "guest pattern: unwritten pages are not zero"
    assert fill_end <= len(image), f"guest fill end 0x{fill_end:x} beyond the image"
    if len(image) >= 2 * FILL_START:
        assert fill_end > FILL_START + (8 << 20), f"guest filled too little RAM (to 0x{fill_end:x})"
    if fill_end > FILL_START:
        got = np.frombuffer(image, dtype="<u4", count=(fill_end - FILL_START) // 4, offset=FILL_START)
        want = np.arange(FILL_START, fill_end, 4, dtype=np.uint32) ^ np.uint32(0x5A5A5A5A)
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, f"guest fill area differs at GPA 0x{FILL_START + 4 * bad[0]:x}"
    return count
