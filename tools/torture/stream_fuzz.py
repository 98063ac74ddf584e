"""The stream-fuzz campaign: mutated migration streams only ever raise StreamError (a one-line
message), with bounded memory. ``tests/test_stream_fuzz.py`` runs the default draw and a
hypothesis search over the same seeds."""

from __future__ import annotations

import io
import random
import struct
import tracemalloc
from collections.abc import Iterator

from snapfs.errors import StreamError
from snapfs.stream import format as F
from snapfs.stream.reader import Limits, _Input, _Parser
from snapfs.stream.spool import spool_stream
from snapfs.stream.writer import image_layout
from tools.torture.core import Budget, Tally, register

PAGE = 4096
MEMORY_BOUND = 16 << 20
MUTATIONS = 6000
MUTATION_SEED = 20260226


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


# Valid streams to mutate: one ram-only as snapfs writes it, one shaped like QEMU's.
SEEDS = _seeds()
# Values that stress size fields when written over a 4- or 8-byte window.
NASTY = [0, 1, 0x7B, 0xFF, 0x1000, 0xFFFFFFFF, 0x7FFFFFFF, 1 << 40, 1 << 62, 0xFFFFFFFFFFFFFFFF]


def parse_bounded(data: bytes, chunk: int | None = None) -> str | None:
    """Parse (and spool) ``data`` under tracemalloc (the caller starts it); what went wrong
    (anything but a one-line StreamError, or a large allocation), None if nothing.

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
        if "\n" in str(exc):
            return f"a StreamError of several lines: {exc!r}"
    except Exception as exc:   # noqa: BLE001 - reported: must not happen
        return f"{type(exc).__name__}: {exc}"
    peak = tracemalloc.get_traced_memory()[1] - base
    if peak >= MEMORY_BOUND:
        return f"{peak} bytes allocated for a {len(data)}-byte stream"
    return None


def mutate(rng: random.Random, data: bytes, steps: int) -> bytes:
    """``data`` with ``steps`` random edits: bit flips, inserts, cuts, truncation, nasty
    size values, duplicated spans."""
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


def mutations(count: int = MUTATIONS, seed: int = MUTATION_SEED) -> Iterator[tuple[bytes, int | None]]:
    """``count`` mutated seeds, each with the chunk size to parse it with (every third one
    refilled in small chunks)."""
    rng = random.Random(seed)
    for i in range(count):
        chunk = None if i % 3 else rng.choice((100, 4096, 5000))
        yield mutate(rng, SEEDS[i % len(SEEDS)], rng.randrange(1, 4)), chunk


@register("stream-fuzz", "mutated migration streams parsed with bounded memory; "
          "only one-line StreamErrors allowed")
def run(budget: Budget, tally: Tally, log) -> None:
    """``positions`` mutations (default 6000), drawn with ``seed`` (1: the suite's draw)."""
    if not budget.wants("mutations"):
        return
    tally.case()
    tracemalloc.start()
    try:
        for n, (data, chunk) in enumerate(mutations(budget.positions or MUTATIONS,
                                                     MUTATION_SEED + budget.seed - 1)):
            if budget.exhausted():
                break
            tally.bad_input()
            if problem := parse_bounded(data, chunk):
                tally.wrong_read(f"mutated stream {n} (chunk {chunk}): {problem}")
    finally:
        tracemalloc.stop()
