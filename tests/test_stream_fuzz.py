"""Fuzzing the parser: mutated streams only ever raise StreamError, with bounded memory."""

from __future__ import annotations

import io
import random
import struct
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs.errors import StreamError
from snapfs.stream import format as F
from snapfs.stream.reader import Limits, _Input, _Parser, read_stream
from snapfs.stream.spool import spool_stream
from snapfs.stream.writer import image_layout

PAGE = 4096
MEMORY_BOUND = 16 << 20


def _seeds() -> list[bytes]:
    img = bytes(PAGE) + bytes((i * 7 + 3) & 0xFF for i in range(PAGE)) + bytes(PAGE)
    lay = image_layout([("pc.ram", img), ("vma1", bytes(range(256)) * 16)])
    ram_only = lay.read(0, lay.size)
    caps = (b"\x05" + F.counted(b"configuration/capabilities") + struct.pack(">II", 1, 1)
            + F.counted(b"x-ignore-shared"))
    dev = (struct.pack(">BI", F.SEC_FULL, 3) + F.counted(b"timer") + struct.pack(">II", 0, 2)
           + b"\x11" * 9 + F.footer(3) + b"\x00" + F.vmdescription({"page_size": 4096, "devices": []}))
    qemu_like = (F.HEADER + F.configuration("pc-i440fx-7.2") + caps
                 + F.section_start(2, b"ram", 0, 4) + F.mem_size_list([(b"pc.ram", 2 * PAGE, bytes(8))])
                 + F.EOS_RECORD + F.footer(2)
                 + F.section_part(2) + struct.pack(">Q", F.RAM_ZERO) + b"\x06pc.ram\x00"
                 + struct.pack(">Q", PAGE | F.RAM_PAGE | F.RAM_CONTINUE) + img[PAGE : 2 * PAGE]
                 + F.EOS_RECORD + F.footer(2)
                 + b"\x08" + struct.pack(">HH", 11, 0) + dev)
    return [ram_only, qemu_like]


SEEDS = _seeds()
# Values that stress size fields when written over a 4- or 8-byte window.
NASTY = [0, 1, 0x7B, 0xFF, 0x1000, 0xFFFFFFFF, 0x7FFFFFFF, 1 << 40, 1 << 62, 0xFFFFFFFFFFFFFFFF]


def _parse_bounded(data: bytes, chunk: int | None = None) -> None:
    """Parse (and spool) ``data``; fail on anything but StreamError or on a large allocation.

    With ``chunk`` the parser refills its buffer every ``chunk`` bytes (records straddle).
    """
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        if chunk is None:
            spool_stream(io.BytesIO(data), limits=Limits(max_ram_bytes=1 << 30)).close()
        else:
            for _ in _Parser(_Input(io.BytesIO(data), chunk=chunk), Limits(max_ram_bytes=1 << 30)).events():
                pass
    except StreamError as exc:
        assert "\n" not in str(exc)
    peak = tracemalloc.get_traced_memory()[1] - base
    assert peak < MEMORY_BOUND, f"{peak} bytes allocated for a {len(data)}-byte stream"


def _mutate(rng: random.Random, data: bytes, steps: int) -> bytes:
    buf = bytearray(data)
    for _ in range(steps):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 2:
            del buf[pos : pos + rng.randrange(1, 64)]
        elif op == 3:
            del buf[pos:]
        elif op == 4:
            width = rng.choice((4, 8))
            value = rng.choice(NASTY) & ((1 << (8 * width)) - 1)
            buf[pos : pos + width] = value.to_bytes(width, "big")
        else:
            buf[pos:pos] = buf[rng.randrange(len(buf) + 1) :][: rng.randrange(1, 200)]
    return bytes(buf)


def test_thousands_of_random_mutations():
    rng = random.Random(20260226)
    tracemalloc.start()
    try:
        for i in range(6000):
            chunk = None if i % 3 else rng.choice((100, 4096, 5000))
            _parse_bounded(_mutate(rng, SEEDS[i % len(SEEDS)], rng.randrange(1, 4)), chunk)
    finally:
        tracemalloc.stop()


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_hypothesis_mutations(seed: bytes, data: st.DataObject):
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(seed)), st.binary(max_size=9),
                                         st.integers(0, 16)), max_size=4))
    buf = bytearray(seed)
    for pos, new, cut in edits:
        buf[pos : pos + cut] = new
    tracemalloc.start()
    try:
        _parse_bounded(bytes(buf))
    finally:
        tracemalloc.stop()


def test_seeds_are_valid():
    for seed in SEEDS:
        events = list(read_stream(io.BytesIO(seed)))
        assert events[-1][0] in ("end", "devices")
