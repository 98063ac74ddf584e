"""The ELF core format pieces (snapfs.elfcore): byte layouts of the notes, their order, the
recorded-state schema and its fallback for snapshots without it."""

from __future__ import annotations

import struct
from types import SimpleNamespace

from snapfs.elfcore import arch, elf, notes
from snapfs.elfcore import x86_64 as X
from snapfs.elfcore.state import BLOB, CoreState, Mapping, ProcessStatus, ThreadState, encode_blob


def parse_notes(data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, type, desc) of each note, checking the 4-byte padding."""
    out, pos = [], 0
    while pos < len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        pos += 12
        name = data[pos : pos + namesz]
        assert name.endswith(b"\0")
        pos += -(-namesz // 4) * 4
        out.append((name[:-1].decode(), ntype, data[pos : pos + descsz]))
        pos += -(-descsz // 4) * 4
    assert pos == len(data)
    return out


def thread(tid: int, siginfo: bytes | None = None) -> ThreadState:
    xstate = bytes(range(256)) * 3 + bytes(64)  # 832 bytes, like AVX-capable x86_64
    return ThreadState(tid, {name: i + 1 for i, name in enumerate(X.REG_NAMES)},
                       fpregs=X.fpregs_from_regsets({X.NT_X86_XSTATE: xstate}),
                       regsets={X.NT_X86_XSTATE: xstate}, siginfo=siginfo)


def state(threads: list[ThreadState], mappings=None) -> CoreState:
    return CoreState(arch="x86_64", pid=100, comm="a-rather-long-command-name", args=["/bin/x", "-v", "arg"],
                     exe="/bin/x", status=ProcessStatus("S", 1, 100, 90, -5, 0x400000, 1000, 1001),
                     auxv=struct.pack("<QQQQ", 6, 4096, 0, 0),
                     mappings=mappings if mappings is not None else [
                         Mapping(0x1000, 0x3000, "r-xp", 0x2000, 7, "/bin/x"),
                         Mapping(0x5000, 0x6000, "rw-p", 0, 0, "[heap]")],
                     threads=threads)


def test_notes_in_the_kernels_order():
    sig = struct.pack("<iii", 10, 0, -6).ljust(128, b"\0")
    st = state([thread(100), thread(101, sig), thread(102)])
    got = parse_notes(notes.build(st, arch("x86_64"), st.mappings))
    assert [(n, t) for n, t, _ in got] == [
        ("CORE", elf.NT_PRSTATUS), ("CORE", elf.NT_PRPSINFO), ("CORE", elf.NT_SIGINFO),
        ("CORE", elf.NT_AUXV), ("CORE", elf.NT_FILE), ("CORE", elf.NT_PRFPREG), ("LINUX", X.NT_X86_XSTATE),
        ("CORE", elf.NT_PRSTATUS), ("CORE", elf.NT_SIGINFO), ("CORE", elf.NT_PRFPREG), ("LINUX", X.NT_X86_XSTATE),
        ("CORE", elf.NT_PRSTATUS), ("CORE", elf.NT_PRFPREG), ("LINUX", X.NT_X86_XSTATE),
    ]
    # NT_PRSTATUS (336 bytes on x86_64): signal, ids, registers in user_regs_struct order.
    pr = [d for _, t, d in got if t == elf.NT_PRSTATUS]
    assert all(len(d) == 336 for d in pr)
    signo, code, errno_, cursig = struct.unpack_from("<iiih", pr[1])
    assert (signo, code, errno_, cursig) == (10, -6, 0, 10)
    assert struct.unpack_from("<h", pr[0], 12)[0] == 0  # no signal: gdb says no "terminated"
    pid, ppid, pgrp, sid = struct.unpack_from("<iiii", pr[2], 32)
    assert (pid, ppid, pgrp, sid) == (102, 1, 100, 90)
    regs = struct.unpack_from("<27Q", pr[0], 112)
    assert regs == tuple(range(1, 28)) and struct.unpack_from("<i", pr[0], 328)[0] == 1  # fpvalid
    # NT_PRPSINFO (136 bytes): state, names truncated as the kernel does, ids.
    ps = next(d for _, t, d in got if t == elf.NT_PRPSINFO)
    assert len(ps) == 136
    state_, sname, zomb, nice, flag, uid, gid, pid, ppid = struct.unpack_from("<BcBbxxxxQIIii", ps)
    assert (state_, sname, zomb, nice, flag, uid, gid, pid, ppid) == (1, b"S", 0, -5, 0x400000, 1000, 1001, 100, 1)
    assert ps[40:56] == b"a-rather-long-c\0" and ps[56:].rstrip(b"\0") == b"/bin/x -v arg"
    # NT_FILE: file-backed mappings only, offsets in pages, then the names.
    nf = next(d for _, t, d in got if t == elf.NT_FILE)
    assert struct.unpack_from("<QQQQQ", nf) == (1, 4096, 0x1000, 0x3000, 2) and nf[40:] == b"/bin/x\0"
    # NT_PRFPREG: the FXSAVE area as GETFPREGS gives it (zero past the XMM registers).
    fp = next(d for _, t, d in got if t == elf.NT_PRFPREG)
    assert len(fp) == 512 and fp[:416] == (bytes(range(256)) * 2)[:416] and fp[416:] == bytes(96)


def test_a_process_without_threads_still_has_its_process_notes():
    st = state([])
    kinds = [t for _, t, _ in parse_notes(notes.build(st, arch("x86_64"), st.mappings))]
    assert kinds == [elf.NT_PRPSINFO, elf.NT_SIGINFO, elf.NT_AUXV, elf.NT_FILE]


def test_state_round_trips_through_meta_and_blob():
    sig = bytes([10]) + bytes(127)
    threads = {100: thread(100), 101: thread(101, sig)}
    maps = [Mapping(0x1000, 0x3000, "r-xp", 0x2000, 7, "/bin/x (deleted)")]
    blob = encode_blob("x86_64", b"\x06\0", ProcessStatus(ppid=5), maps, threads)
    meta = {"threads": {str(t.tid): {"comm": f"t{t.tid}", "regs": t.regs, "fpregs": t.fpregs.hex()}
                        for t in reversed(threads.values())}}
    info = SimpleNamespace(pid=100, comm="x", cmdline=["/bin/x"], exe="/bin/x", meta=meta)
    got = CoreState.from_snapshot(info, blob)
    assert [t.tid for t in got.threads] == [100, 101]  # the main thread first
    assert got.threads[1].siginfo == sig and got.threads[1].comm == "t101"
    assert got.threads[0].regsets == threads[100].regsets and got.threads[0].fpregs == threads[100].fpregs
    assert got.mappings == maps and got.auxv == b"\x06\0" and got.status.ppid == 5
    assert BLOB == "core.state"


def test_older_snapshots_build_from_the_metadata_alone():
    t = thread(7)
    meta = {"threads": {"7": {"comm": "x", "regs": t.regs, "fpregs": t.fpregs.hex()}}}
    got = CoreState.from_snapshot(SimpleNamespace(pid=7, comm="x", cmdline=None, exe=None, meta=meta), None)
    assert got.arch == "x86_64" and got.auxv is None and got.mappings is None
    assert got.threads[0].regs == t.regs and got.threads[0].regsets == {}
    kinds = [k for _, k, _ in parse_notes(notes.build(got, arch("x86_64"), []))]
    assert kinds == [elf.NT_PRSTATUS, elf.NT_PRPSINFO, elf.NT_SIGINFO, elf.NT_PRFPREG]


def test_elf_header_with_more_program_headers_than_fit():
    """PN_XNUM: the real count goes into section header 0, as the kernel writes it."""
    h = elf.ehdr(X.ELF_MACHINE, 70000, shoff=0x123000)
    (ident, etype, machine, _v, _e, phoff, shoff, _f, ehsize, phentsize, phnum, shentsize, shnum,
     shstrndx) = struct.unpack("<16sHHIQQQIHHHHHH", h)
    assert ident[:4] == b"\x7fELF" and etype == elf.ET_CORE and machine == 62
    assert (phoff, shoff, phnum, shentsize, shnum) == (64, 0x123000, 0xFFFF, 64, 1)
    assert struct.unpack_from("<IIQQQQII", elf.extnum_shdr(70000))[7] == 70000
    assert struct.unpack("<16sHHIQQQIHHHHHH", elf.ehdr(62, 12))[10:13] == (12, 0, 0)


# XSAVE layouts as CPUID 0xD reports them with AVX-512 and no PKRU: AMD Zen 4 (no room for MPX)
# and Intel (MPX's 128 bytes before the opmask).
AMD_LAYOUT = [[2, 256, 576], [5, 64, 832], [6, 512, 896], [7, 1024, 1408]]
INTEL_LAYOUT = [[2, 256, 576], [3, 64, 960], [4, 64, 1024], [5, 64, 1088], [6, 512, 1152], [7, 1024, 1664]]
XCR0_AVX512 = 0xE7  # x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM


def xsave_area(layout: list[list[int]], xcr0: int) -> bytes:
    """An XSAVE area as ptrace gives it: legacy part, XCR0 at 464, XSTATE_BV, and each enabled
    component filled with its feature number in every byte."""
    size = max(off + size for f, size, off in layout if xcr0 >> f & 1)
    area = bytearray(bytes(range(256)) * 2)[:464] + struct.pack("<Q", xcr0) + bytes(40)
    area += struct.pack("<Q", xcr0 & ~1) + bytes(56)  # XSTATE_BV: x87 in its initial state
    area += bytes(size - len(area))
    for f, sz, off in layout:
        if xcr0 >> f & 1:
            area[off : off + sz] = bytes([f]) * sz
    return bytes(area)


def xsave_notes(layout, xcr0: int, area: bytes) -> list[tuple[str, int, bytes]]:
    t = ThreadState(1, {}, regsets={X.NT_X86_XSTATE: area})
    st = state([t, ThreadState(2, {}, regsets={X.NT_X86_XSTATE: area})])
    if layout is not None:
        st.arch_state = {X.XSAVE_LAYOUT_KEY: layout}
    return parse_notes(notes.build(st, arch("x86_64"), st.mappings))


def test_amd_xsave_area_is_written_in_intels_layout():
    """gdb 13 reads fixed Intel offsets and wants 2688 bytes for XCR0 0xe7 ("too small" on the
    2432-byte AMD area): every component moves to its Intel offset, the gap (MPX) is zero."""
    area = xsave_area(AMD_LAYOUT, XCR0_AVX512)
    assert len(area) == 2432
    got = xsave_notes(AMD_LAYOUT, XCR0_AVX512, area)
    xs = [d for _, t, d in got if t == X.NT_X86_XSTATE]
    assert len(xs) == 2 and xs[0] == xs[1]
    out = xs[0]
    assert len(out) == 2688  # gdb's X86_XSTATE_AVX512_SIZE
    assert out[:576] == area[:576]  # legacy area, XCR0 (the kernel's only sw_reserved word), header
    assert out[576:832] == bytes([2]) * 256  # AVX
    assert out[960:1088] == bytes(128)  # MPX: not enabled
    assert out[1088:1152] == bytes([5]) * 64  # k0-k7
    assert out[1152:1664] == bytes([6]) * 512  # upper halves of zmm0-15
    assert out[1664:2688] == bytes([7]) * 1024  # zmm16-31
    # Once per process, after every thread's notes: where the components now are.
    assert got[-1][:2] == ("LINUX", X.NT_X86_XSAVE_LAYOUT)
    layout = [struct.unpack_from("<4I", got[-1][2], i) for i in range(0, len(got[-1][2]), 16)]
    assert layout == [(2, 256, 576, 0), (5, 64, 1088, 0), (6, 512, 1152, 0), (7, 1024, 1664, 0)]
    assert sum(t == X.NT_X86_XSAVE_LAYOUT for _, t, _ in got) == 1


def test_amd_pkru_moves_after_avx512():
    layout = AMD_LAYOUT + [[9, 8, 2432]]
    xcr0 = XCR0_AVX512 | 1 << 9
    out = X.standard_xstate(xsave_area(layout, xcr0), X.xsave_layouts({X.XSAVE_LAYOUT_KEY: layout}, xcr0))
    assert len(out) == 2696 and out[2688:] == bytes([9]) * 8  # gdb's X86_XSTATE_PKRU_SIZE


def test_intel_xsave_area_is_written_as_recorded():
    area = xsave_area(INTEL_LAYOUT, XCR0_AVX512)
    assert len(area) == 2688
    got = xsave_notes(INTEL_LAYOUT, XCR0_AVX512, area)
    assert [d for _, t, d in got if t == X.NT_X86_XSTATE] == [area, area]
    desc = got[-1][2]
    assert [struct.unpack_from("<4I", desc, i)[:3] for i in range(0, len(desc), 16)] == [
        (2, 256, 576), (5, 64, 1088), (6, 512, 1152), (7, 1024, 1664)]  # MPX is not in XCR0


def test_unknown_xsave_feature_keeps_the_cpus_layout():
    """A feature with no known Intel offset: nothing is guessed; the layout note says where
    the CPU put everything."""
    layout = AMD_LAYOUT + [[19, 128, 2432]]
    xcr0 = XCR0_AVX512 | 1 << 19
    area = xsave_area(layout, xcr0)
    got = xsave_notes(layout, xcr0, area)
    assert [d for _, t, d in got if t == X.NT_X86_XSTATE] == [area, area]
    desc = got[-1][2]
    assert [struct.unpack_from("<4I", desc, i)[:3] for i in range(0, len(desc), 16)] == [
        tuple(c) for c in layout]


def test_without_a_recorded_layout_the_area_is_written_as_recorded():
    area = xsave_area(AMD_LAYOUT, XCR0_AVX512)
    got = xsave_notes(None, XCR0_AVX512, area)
    assert [d for _, t, d in got if t == X.NT_X86_XSTATE] == [area, area]
    assert all(t != X.NT_X86_XSAVE_LAYOUT for _, t, _ in got)


def test_recorded_layout_round_trips_through_the_blob():
    arch_state = {X.XSAVE_LAYOUT_KEY: AMD_LAYOUT}
    blob = encode_blob("x86_64", None, ProcessStatus(), [], {}, arch_state)
    info = SimpleNamespace(pid=1, comm="x", cmdline=None, exe=None, meta={})
    assert CoreState.from_snapshot(info, blob).arch_state == arch_state
    older = encode_blob("x86_64", None, ProcessStatus(), [], {})
    assert CoreState.from_snapshot(info, older).arch_state == {}
