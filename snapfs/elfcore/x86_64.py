"""Everything x86_64-specific about a core file, for the capture (what to record at the
freeze) and the ``core`` view (which notes to write).

An aarch64 port provides a module with the same names: ``NAME``, ``ELF_MACHINE``,
``REG_NAMES``, ``RECORDED_REGSETS``, ``REGSET_BUFFER``, ``FPREGS_SIZE``,
``fpregs_from_regsets``, ``thread_notes`` and ``process_notes``.

The XSAVE area: PTRACE_GETREGSET(NT_X86_XSTATE) gives it in the CPU's standard-format layout,
whose component offsets come from CPUID leaf 0xD and differ between vendors (AMD Zen 4 with
AVX-512: 2432 bytes, opmask at 832; Intel: opmask at 1088 after MPX). gdb up to 13 assumes
Intel's offsets, with a size derived from XCR0, and on an AMD area warns "Section
`.reg-xstate/N' in core file too small" and shows no k0-k7 nor zmm. The capture records the
CPU's layout (``arch_state["xsave_layout"]``); the view moves each component to Intel's
offset and adds NT_X86_XSAVE_LAYOUT describing the offsets written, as the kernel (6.12+)
adds one describing its own, so a reader of either kind gets the right registers.
"""

from __future__ import annotations

import struct
from typing import Any

from snapfs.elfcore.elf import NT_PRFPREG

NAME = "x86_64"
ELF_MACHINE = 62  # EM_X86_64

# struct user_regs_struct (<sys/user.h>), in order: what PTRACE_GETREGS returns and, on
# x86_64, also elf_gregset_t, the pr_reg of NT_PRSTATUS.
REG_NAMES: tuple[str, ...] = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
    "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
    "es", "fs", "gs",
)  # fmt: skip

FPREGS_SIZE = 512  # struct user_fpregs_struct: the FXSAVE area (NT_PRFPREG)
NT_X86_XSTATE = 0x202  # the XSAVE area in the kernel's "uabi" layout (x87, SSE, AVX, ... PKRU)
NT_X86_XSAVE_LAYOUT = 0x205  # per process: struct x86_xfeat_component {type, size, offset, flags}[]

# Register sets read with PTRACE_GETREGSET at the freeze, by note type, beyond the general
# registers. The XSAVE area holds the FXSAVE area too, so NT_PRFPREG needs no call of its own.
RECORDED_REGSETS: tuple[int, ...] = (NT_X86_XSTATE,)
# Big enough for every XSAVE feature the kernel exposes (AMX tile data makes it ~11 KiB);
# the kernel says how much it wrote.
REGSET_BUFFER = 32 << 10

# In the XSAVE area, the FXSAVE part the kernel fills for PTRACE_GETFPREGS ends after the XMM
# registers; GETFPREGS leaves the rest of its 512 bytes zero (for GETREGSET the kernel puts
# XCR0 there, which gdb reads to know which registers the XSAVE area holds).
_FX_USED = 416


def fpregs_from_regsets(regsets: dict[int, bytes]) -> bytes | None:
    """The 512-byte FXSAVE area as PTRACE_GETFPREGS returns it, from a recorded XSAVE area
    (None if there is none)."""
    xstate = regsets.get(NT_X86_XSTATE)
    if not xstate or len(xstate) < FPREGS_SIZE:
        return None
    return xstate[:_FX_USED] + bytes(FPREGS_SIZE - _FX_USED)


# ---------------------------------------------------------------- XSAVE layout
XSAVE_LAYOUT_KEY = "xsave_layout"  # arch_state: [[feature, size, offset], ...] from CPUID 0xD
# Where the standard-format XSAVE area has each feature on Intel CPUs, by feature number:
# (offset, size). gdb 13 reads these fixed offsets (gdb/i387-tdep.c; sizes in
# gdbsupport/x86-xstate.h); the Intel SDM vol. 1 ch. 13 gives them as CPUID 0xD reports them.
STANDARD_XSAVE: dict[int, tuple[int, int]] = {
    2: (576, 256),  # AVX: upper halves of ymm0-15
    3: (960, 64),  # MPX BNDREGS
    4: (1024, 64),  # MPX BNDCSR
    5: (1088, 64),  # AVX-512 opmask k0-k7
    6: (1152, 512),  # AVX-512 ZMM_Hi256: upper halves of zmm0-15
    7: (1664, 1024),  # AVX-512 Hi16_ZMM: zmm16-31
    9: (2688, 8),  # PKRU
    17: (2752, 64),  # AMX XTILECFG
    18: (2816, 8192),  # AMX XTILEDATA
}
XSAVE_HEADER_END = 576  # legacy FXSAVE area (0..511) and the XSAVE header (XSTATE_BV...)
_XCR0_AT = 464  # where the kernel's ptrace/core area keeps XCR0 (xstate_fx_sw_bytes[0])

Component = tuple[int, int, int]  # (feature, size, offset)
Layouts = tuple[list[Component], list[Component]]  # (recorded, written)


def _xcr0(xstate: bytes | None) -> int | None:
    if not xstate or len(xstate) < XSAVE_HEADER_END:
        return None
    return struct.unpack_from("<Q", xstate, _XCR0_AT)[0]


def xsave_layouts(arch_state: dict[str, Any], xcr0: int | None) -> Layouts | None:
    """``(recorded, written)``: the enabled components (XCR0 bits >= 2) where the CPU put them
    and where the core gets them, Intel's offsets; ``written`` is ``recorded`` if one of them
    has no known standard place (left where it is rather than guessed). None if no layout was
    recorded (an older snapshot) or no XCR0 is known."""
    layout = arch_state.get(XSAVE_LAYOUT_KEY)
    if layout is None or xcr0 is None:
        return None
    recorded = sorted((f, size, off) for f, size, off in layout if xcr0 >> f & 1)
    known = {f for f, _, _ in recorded}
    if any(xcr0 >> f & 1 and f not in known for f in range(2, 64)) or any(
            STANDARD_XSAVE.get(f, (0, -1))[1] != size for f, size, _ in recorded):
        return recorded, recorded
    return recorded, [(f, size, STANDARD_XSAVE[f][0]) for f, size, _ in recorded]


def standard_xstate(xstate: bytes, layouts: Layouts | None) -> bytes:
    """``xstate`` with every component moved from its recorded offset to the written one (see
    :func:`xsave_layouts`); the same bytes if none moves (Intel). Legacy area and header are
    kept; the size is the end of the last component, as gdb derives it from XCR0; gaps
    (MPX's place on AMD) are zero. Bytes 464.. keep XCR0: the kernel writes no sizes there
    (the signal frame's _fpx_sw_bytes sizes are not part of the ptrace or core layout)."""
    if layouts is None or layouts[0] == layouts[1] or len(xstate) < XSAVE_HEADER_END:
        return xstate
    recorded, written = layouts
    out = bytearray(max([XSAVE_HEADER_END] + [off + size for _, size, off in written]))
    out[:XSAVE_HEADER_END] = xstate[:XSAVE_HEADER_END]
    for (_, size, src), (_, _, dst) in zip(recorded, written):
        part = xstate[src : src + size]
        out[dst : dst + len(part)] = part
    return bytes(out)


def thread_notes(fpregs: bytes | None, regsets: dict[int, bytes],
                 arch_state: dict[str, Any] | None = None) -> list[tuple[str, int, bytes]]:
    """``(name, type, desc)`` of a thread's notes after its NT_PRSTATUS, in the kernel's order
    (its x86_64 regset view: FP, then XSTATE, in Intel's layout if ``arch_state`` has the
    CPU's)."""
    out = []
    if fpregs:
        out.append(("CORE", NT_PRFPREG, fpregs))
    xstate = regsets.get(NT_X86_XSTATE)
    if xstate:
        layouts = xsave_layouts(arch_state or {}, _xcr0(xstate))
        out.append(("LINUX", NT_X86_XSTATE, standard_xstate(xstate, layouts)))
    return out


def process_notes(arch_state: dict[str, Any],
                  regsets: list[dict[int, bytes]]) -> list[tuple[str, int, bytes]]:
    """The notes after every thread's (``elf_coredump_extra_notes_write``): NT_X86_XSAVE_LAYOUT,
    one ``{type, size, offset, flags=0}`` per enabled feature >= 2, at the offsets
    :func:`thread_notes` wrote (``regsets``: each thread's, for XCR0). Empty without a
    recorded layout (an older snapshot: its areas are written as recorded)."""
    xcr0 = next((x for x in (_xcr0(r.get(NT_X86_XSTATE)) for r in regsets) if x is not None), None)
    layouts = xsave_layouts(arch_state, xcr0)
    if layouts is None or not layouts[1]:
        return []
    desc = b"".join(struct.pack("<IIII", f, size, off, 0) for f, size, off in layouts[1])
    return [("LINUX", NT_X86_XSAVE_LAYOUT, desc)]
