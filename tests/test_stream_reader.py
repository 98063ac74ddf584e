"""The migration stream parser: accepted shapes and every bad input that must be refused."""

from __future__ import annotations

import io
import struct
import tracemalloc

import pytest

from snapfs.errors import StreamError
from snapfs.stream import format as F
from snapfs.stream.reader import EV_BLOCKS, EV_DEVICES, EV_END, EV_HEADER, EV_PAGE, EV_ZERO, read_stream
from snapfs.stream.writer import image_layout

PAGE = 4096
DATA1 = bytes((i * 7 + 3) & 0xFF for i in range(PAGE))
DATA2 = bytes((i * 13 + 1) & 0xFF for i in range(PAGE))


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def header(machine: str = "none") -> bytes:
    return F.HEADER + F.configuration(machine)


def start(blocks=((b"pc.ram", 2 * PAGE),), sid: int = 2, total: int | None = None) -> bytes:
    body = F.mem_size_list([(n, ln, b"") for n, ln in blocks])
    if total is not None:
        body = be64(total | F.RAM_MEM_SIZE) + body[8:]
    return F.section_start(sid, b"ram", 0, 4) + body + F.EOS_RECORD + F.footer(sid)


def part(*records: bytes, sid: int = 2) -> bytes:
    return F.section_part(sid) + b"".join(records) + F.EOS_RECORD + F.footer(sid)


def page(offset: int, data: bytes = DATA1, name: bytes | None = None) -> bytes:
    if name is None:
        return be64(offset | F.RAM_PAGE | F.RAM_CONTINUE) + data
    return be64(offset | F.RAM_PAGE) + F.counted(name) + data


def zero(offset: int, name: bytes | None = None, fill: int = 0) -> bytes:
    if name is None:
        return be64(offset | F.RAM_ZERO | F.RAM_CONTINUE) + bytes([fill])
    return be64(offset | F.RAM_ZERO) + F.counted(name) + bytes([fill])


END = b"\x00" + F.vmdescription({"page_size": 4096, "devices": []})


def good() -> bytes:
    return header() + start() + part(zero(0, b"pc.ram"), page(PAGE)) + END


def parse(data: bytes) -> list[tuple]:
    return list(read_stream(io.BytesIO(data)))


def error_of(data: bytes) -> str:
    with pytest.raises(StreamError) as exc:
        parse(data)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------- accepted
def test_minimal_stream_parses():
    ev = parse(good())
    assert ev[0][0] == EV_HEADER and ev[0][1].machine == "none"
    assert ev[1][0] == EV_BLOCKS and ev[1][2][0].name == "pc.ram" and ev[1][2][0].length == 2 * PAGE
    assert ev[2] == (EV_ZERO, 0, 0, None)
    assert ev[3] == (EV_PAGE, 0, 1, DATA1)
    assert ev[4][0] == EV_END and b"page_size" in ev[4][1]


def test_worked_example_of_the_reference_is_what_the_writer_produces():
    """What QEMU 7.2 itself writes for an 8 KiB pc.ram, page 0 zero, page 1 data (machine none)."""
    layout = image_layout([("pc.ram", bytes(PAGE) + DATA1)])
    data = layout.read(0, layout.size)
    assert data[:0x46].hex() == (
        "5145564d00000003070000000" "46e6f6e65010000000203" "72616d0000000000000004"
        "00000000000020040670632e72616d0000000000002000" "00000000000000107e00000002"
    )
    assert data[0x46:0x5B] == bytes.fromhex("0200000002") + be64(2) + b"\x06pc.ram" + b"\x00"
    assert data[0x5B:0x63] == be64(0x1028) and data[0x63:0x1063] == DATA1
    assert parse(data)[3] == (EV_PAGE, 0, 1, DATA1)


def test_qemu_shapes_config_subsections_commands_continue_across_sections_end_section():
    caps = b"\x05" + F.counted(b"configuration/capabilities") + struct.pack(">II", 1, 1) + F.counted(b"x-ignore-shared")
    bits = b"\x05" + F.counted(b"configuration/target-page-bits") + struct.pack(">II", 1, 12)
    blocks = F.mem_size_list([(b"pc.ram", 2 * PAGE, be64(0)), (b"shared", PAGE, be64(0x1000000))])
    stream = (
        header("pc-i440fx-7.2") + bits + caps
        + F.section_start(7, b"ram", 0, 4) + blocks + F.EOS_RECORD + F.footer(7)
        + part(page(0, DATA1, b"pc.ram"), sid=7)
        + part(zero(0), page(PAGE, DATA2), sid=7)  # CONTINUE carries pc.ram across sections
        + b"\x08" + struct.pack(">HH", 11, 0)  # MIG_CMD_SWITCHOVER_START
        + struct.pack(">BI", F.SEC_END, 7) + be64(F.RAM_MULTIFD_FLUSH) + page(0, DATA2) + F.EOS_RECORD + F.footer(7)
    )
    dev = struct.pack(">BI", F.SEC_FULL, 3) + F.counted(b"timer") + struct.pack(">II", 0, 2) + b"\x11" * 9 + F.footer(3)
    ev = parse(stream + dev + END)
    assert ev[0][1].capabilities == ("x-ignore-shared",) and ev[0][1].machine == "pc-i440fx-7.2"
    assert [b.extra for b in ev[1][2]] == [be64(0), be64(0x1000000)]
    pages = [e for e in ev if e[0] in (EV_PAGE, EV_ZERO)]
    assert pages == [(EV_PAGE, 0, 0, DATA1), (EV_ZERO, 0, 0, None), (EV_PAGE, 0, 1, DATA2), (EV_PAGE, 0, 0, DATA2)]
    assert ev[-1] == (EV_DEVICES, dev + END)


def test_stream_without_vmdescription_is_accepted():
    ev = parse(header() + start() + part(page(0, name=b"pc.ram")) + b"\x00")
    assert ev[-1] == (EV_END, None)


# ---------------------------------------------------------------------------------- bad input
def test_truncated_at_every_offset():
    data = good()
    eof_end = len(data) - len(END) + 1
    for n in range(len(data)):
        if n == eof_end:
            # Cut right after EOF = a stream without the (optional) VMDESCRIPTION: QEMU loads it.
            assert parse(data[:n])[-1] == (EV_END, None)
            continue
        msg = error_of(data[:n])
        assert "byte" in msg, msg


def test_truncated_device_state():
    dev = struct.pack(">BI", F.SEC_FULL, 3) + F.counted(b"timer") + struct.pack(">II", 0, 2) + b"\x11" * 9 + F.footer(3)
    full = header() + start() + part(page(0, name=b"pc.ram")) + dev + END
    parse(full)
    for cut in (1, 5, 20, len(END) - 2):  # len(END) - 1 leaves EOF alone: valid
        assert "does not end with EOF" in error_of(full[:-cut])


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: b"QEVN" + d[4:], "bad magic 0x5145564e at byte 0"),
        (lambda d: d[:4] + be64(2)[4:] + d[8:], "obsolete migration stream version 2 at byte 4"),
        (lambda d: d[:4] + be64(4)[4:] + d[8:], "unsupported migration stream version 4 at byte 4"),
        (lambda d: d + b"\x00", "trailing garbage at byte"),
        (lambda d: d + b"junk", "trailing garbage at byte"),
        (lambda d: d[: -len(END)] + b"\x00\x42", "trailing garbage at byte"),
    ],
    ids=["magic", "version2", "version4", "trailing-nul", "trailing-junk", "garbage-after-eof"],
)
def test_header_and_trailer_errors(mutate, expect):
    assert expect in error_of(mutate(good()))


def test_missing_footer():
    bad = header() + start()[:-5] + part(page(0, name=b"pc.ram")) + END
    assert "missing section footer for section 2 at byte" in error_of(bad)


def test_wrong_footer_id():
    bad = header() + start() + part(page(0, name=b"pc.ram"))[:-4] + struct.pack(">I", 9) + END
    assert "names section 9, expected 2" in error_of(bad)


def test_unknown_block():
    bad = header() + start() + part(page(0, name=b"vga.vram")) + END
    assert "unknown RAMBlock b'vga.vram' in ram record at byte" in error_of(bad)


def test_size_mismatch_between_total_and_block_list():
    bad = header() + start(total=3 * PAGE) + part(page(0, name=b"pc.ram")) + END
    assert "disagrees with the block lengths" in error_of(bad)
    bad = header() + start(total=PAGE) + END
    assert "disagrees with the block lengths" in error_of(bad)


def test_offset_out_of_range():
    bad = header() + start() + part(page(2 * PAGE, name=b"pc.ram")) + END
    msg = error_of(bad)
    assert "page offset 0x2000 out of range for RAMBlock 'pc.ram' (length 0x2000) at byte" in msg


def test_offset_unaligned():
    bad = header() + start() + part(be64(0x1004 | F.RAM_PAGE) + b"\x06pc.ram" + DATA1) + END
    assert "unsupported ram record flags 0x00c" in error_of(bad)
    bad = header() + start() + part(be64(0x100 | F.RAM_ZERO) + b"\x06pc.ram\x00") + END
    assert "not page-aligned" in error_of(bad)


def test_nonzero_zero_fill():
    bad = header() + start() + part(zero(0, b"pc.ram", fill=0x55)) + END
    assert "non-zero fill 0x55" in error_of(bad)


def test_continue_without_block_and_bad_sections():
    assert "none was named" in error_of(header() + start() + part(page(0)) + END)
    assert "section id 5 at byte" in error_of(header() + start() + part(page(0, name=b"pc.ram"), sid=5) + END)
    assert "'ram' section id 0" in error_of(header() + start(sid=0) + END)
    assert "unknown section type 0x09" in error_of(header() + b"\x09" + END)
    assert "listed twice" in error_of(header() + start(blocks=((b"a", PAGE), (b"a", PAGE))) + END)
    assert "second RAMBlock list" in error_of(
        header() + start() + part(be64(2 * PAGE | F.RAM_MEM_SIZE) + b"\x06pc.ram" + be64(2 * PAGE)) + END)
    assert "unsupported iterative device b'block'" in error_of(
        header() + F.section_start(3, b"block", 0, 1) + END)
    assert "bad length 0x1800" in error_of(header() + start(blocks=((b"a", PAGE + 0x800),), total=2 * PAGE) + END)
    assert "not valid JSON" in error_of(header() + start() + b"\x00\x06" + struct.pack(">I", 3) + b"{{{")


@pytest.mark.parametrize(
    "data, expect",
    [
        (header() + start(blocks=((b"huge", 1 << 60),)) + END, "claims 1152921504606846976 bytes of RAM"),
        (header() + start() + b"\x00\x06" + struct.pack(">I", 0xFFFFFFF0), "claims 4294967280 bytes"),
        (F.HEADER + b"\x07" + struct.pack(">I", 0xFFFFFFFF) + b"none", "machine name length 4294967295"),
        (header() + b"\x05" + F.counted(b"configuration/capabilities") + struct.pack(">II", 1, 1 << 30),
         "capability count 1073741824"),
    ],
    ids=["ram-total", "vmdesc", "machine-name", "capabilities"],
)
def test_huge_claims_fail_without_allocating(data, expect):
    tracemalloc.start()
    try:
        msg = error_of(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert expect in msg
    assert peak < 8 << 20, f"parser allocated {peak} bytes for a {len(data)}-byte stream"


def test_device_state_across_many_buffer_refills_and_its_limit():
    from snapfs.stream.reader import Limits, _Input, _Parser
    from snapfs.stream.spool import spool_stream

    dev = (struct.pack(">BI", F.SEC_FULL, 3) + F.counted(b"timer") + struct.pack(">II", 0, 2)
           + b"\x11" * 300_000 + F.footer(3) + END)
    data = header() + start() + part(page(0, name=b"pc.ram")) + dev
    spooled = spool_stream(io.BytesIO(data))
    assert spooled.devices == dev
    spooled.close()
    small = list(_Parser(_Input(io.BytesIO(data), chunk=4096), Limits()).events())
    assert small[-1] == (EV_DEVICES, dev)
    assert [e for e in small if e[0] == EV_PAGE] == [(EV_PAGE, 0, 0, DATA1)]
    with pytest.raises(StreamError, match="device state starting at byte 4218 exceeds 1000 bytes"):
        list(read_stream(io.BytesIO(data), Limits(max_device_state_bytes=1000)))
