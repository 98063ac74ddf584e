"""Everything x86_64-specific about a core file, for the capture (what to record at the
freeze) and the ``core`` view (which notes to write).

An aarch64 port provides a module with the same names: ``NAME``, ``ELF_MACHINE``,
``REG_NAMES``, ``RECORDED_REGSETS``, ``REGSET_BUFFER``, ``FPREGS_SIZE``,
``fpregs_from_regsets`` and ``thread_notes``.
"""

from __future__ import annotations

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


def thread_notes(fpregs: bytes | None, regsets: dict[int, bytes]) -> list[tuple[str, int, bytes]]:
    """``(name, type, desc)`` of a thread's notes after its NT_PRSTATUS, in the kernel's order
    (its x86_64 regset view: FP, then XSTATE)."""
    out = []
    if fpregs:
        out.append(("CORE", NT_PRFPREG, fpregs))
    xstate = regsets.get(NT_X86_XSTATE)
    if xstate:
        out.append(("LINUX", NT_X86_XSTATE, xstate))
    return out
