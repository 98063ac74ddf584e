"""Everything x86_64-specific the capture needs: register layout, syscall numbers, the
``syscall`` instruction, the kernel's syscall-restart rule, and what the safe injection
(:mod:`snapfs.capture.inject`) writes onto a thread's stack: its gadgets, the chain of
return addresses, and an ``rt_sigframe`` holding the thread's original state.

An aarch64 port provides a module with the same names (``REGS_STRUCT``, ``REG_NAMES``,
``SYS``, ``SYSCALL_INSN``, ``set_syscall``, ``syscall_result``, ``emulate_restart``,
``pc``/``sp``, ``GADGETS``, ``chain``, ``sigframe``, ``signal_xstate``, ``core_arch_state``...,
and what it takes from ``snapfs.elfcore.aarch64``) and :mod:`snapfs.capture.arch` picks it by
``platform.machine()``.
"""

from __future__ import annotations

import functools
import struct

# The register layout and the register sets recorded at the freeze are shared with the core
# view (snapfs.elfcore.x86_64): one description of the registers for both.
from snapfs.elfcore.x86_64 import (  # noqa: F401
    FPREGS_SIZE,
    NAME,
    RECORDED_REGSETS,
    REG_NAMES,
    REGSET_BUFFER,
    XSAVE_LAYOUT_KEY,
    fpregs_from_regsets,
)

REGS_STRUCT = "struct user_regs { unsigned long long " + ", ".join(REG_NAMES) + "; };"
REGS_SIZE = 8 * len(REG_NAMES)
XSTATE_MAX = 16384  # buffer for PTRACE_GETREGSET(NT_X86_XSTATE); AMX needs ~11 KiB

# Syscall numbers (asm/unistd_64.h) used for injection and by snapfs itself.
SYS = {
    "open": 2,
    "close": 3,
    "mmap": 9,
    "mprotect": 10,
    "munmap": 11,
    "brk": 12,
    "rt_sigreturn": 15,
    "ioctl": 16,
    "mremap": 25,
    "pause": 34,
    "getpid": 39,
    "recvmsg": 47,
    "socketpair": 53,
    "fcntl": 72,
    "ptrace": 101,
    "gettid": 186,
    "restart_syscall": 219,
    "timer_create": 222,
    "timer_settime": 223,
    "timer_delete": 226,
    "epoll_ctl": 233,
    "tgkill": 234,
    "dup3": 292,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "userfaultfd": 323,
    "pidfd_open": 434,
    "pidfd_getfd": 438,
    "process_madvise": 440,
}

# The `syscall` instruction; the [vdso] text contains it, so injection modifies no code.
SYSCALL_INSN = b"\x0f\x05"
SYSCALL_INSN_LEN = len(SYSCALL_INSN)

# Kernel-internal restart codes a stopped thread may hold in rax (include/linux/errno.h).
_ERESTARTSYS, _ERESTARTNOINTR, _ERESTARTNOHAND, _ERESTART_RESTARTBLOCK = -512, -513, -514, -516

_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


def _signed(v: int) -> int:
    return v - (1 << 64) if v & (1 << 63) else v


def set_syscall(regs, insn_addr: int, nr: int, args: tuple[int, ...]) -> None:
    """Point ``regs`` (a cffi ``struct user_regs *``) at a syscall instruction with arguments."""
    regs.rip = insn_addr
    regs.rax = nr
    regs.orig_rax = (1 << 64) - 1  # -1: the kernel must not apply its restart logic to this
    for name, value in zip(_ARG_REGS, args):
        setattr(regs, name, value & ((1 << 64) - 1))


def syscall_result(regs) -> int:
    """The signed return value of a syscall, read at syscall-exit."""
    return _signed(regs.rax)


def in_restart_block_call(regs) -> bool:
    """True if the stopped thread waits in a call the kernel restarts through its restart
    block (nanosleep, clock_nanosleep, poll/futex with a timeout...)."""
    return _signed(regs.orig_rax) >= 0 and _signed(regs.rax) == _ERESTART_RESTARTBLOCK


def emulate_restart(regs) -> None:
    """Apply to saved registers what the kernel would do when resuming an interrupted syscall.

    A thread released from a syscall-exit stop (after an injection) skips the kernel's own
    restart logic, so without this ``read`` would return errno 512 and ``nanosleep`` 516.
    """
    _restart(regs, SYS["restart_syscall"], SYSCALL_INSN_LEN)


def _restart(regs, restart_block_rax: int, restart_block_back: int) -> None:
    """The kernel's restart rule on ``regs``; a -ERESTART_RESTARTBLOCK call gets rax =
    ``restart_block_rax`` and rip moved back by ``restart_block_back``."""
    if _signed(regs.orig_rax) < 0:
        return
    rax = _signed(regs.rax)
    if rax in (_ERESTARTSYS, _ERESTARTNOINTR, _ERESTARTNOHAND):
        regs.rax = regs.orig_rax
        regs.rip -= SYSCALL_INSN_LEN
    elif rax == _ERESTART_RESTARTBLOCK:
        regs.rax = restart_block_rax & ((1 << 64) - 1)
        regs.rip -= restart_block_back


def resume_as_recorded(regs) -> None:
    """Turn registers recorded at a snapshot's stop into registers a thread resumes from
    later, on whatever stop it is in then (restore of a snapshot).

    A thread stopped inside an interruptible syscall resumes by issuing that syscall again
    (its arguments are still in the registers). The kernel's own ``restart_syscall`` is not
    used even for ERESTART_RESTARTBLOCK (nanosleep, poll...): it continues from the
    thread's *current* restart block, which is not the snapshot's; issued again, the call
    sleeps its full timeout from the restore on (absolute timeouts are exact).
    ``orig_rax = -1`` keeps the kernel from applying its restart rule a second time.
    """
    if _signed(regs.orig_rax) >= 0 and _signed(regs.rax) in (
        _ERESTARTSYS, _ERESTARTNOINTR, _ERESTARTNOHAND, _ERESTART_RESTARTBLOCK
    ):
        regs.rax = regs.orig_rax
        regs.rip -= SYSCALL_INSN_LEN
    regs.orig_rax = (1 << 64) - 1


def park(regs, insn_addr: int) -> None:
    """Registers that make a thread wait in ``pause()`` (with every signal blocked, for ever;
    the stack pointer is kept): where a restore leaves threads while it rewrites memory."""
    regs.rip = insn_addr
    regs.rax = SYS["pause"]
    regs.orig_rax = (1 << 64) - 1


def pc(regs) -> int:
    """Program counter."""
    return regs.rip


def sp(regs) -> int:
    """Stack pointer."""
    return regs.rsp


RED_ZONE = 128  # bytes below rsp a leaf function may use (System V ABI)


# ---------------------------------------------------------------- safe injection
# Byte sequences the injection needs in the target's executable memory (any of its mappings:
# libc has several of each; this machine's [vdso] has no `syscall; ret`).
GADGETS = {
    "syscall_ret": b"\x0f\x05\xc3",  # syscall; ret
    "pop_rax": b"\x58\xc3",  # pop %rax; ret
    "pop_rdi": b"\x5f\xc3",  # pop %rdi; ret         (optional: close fds snapfs made)
    "xchg_eax_edi": b"\x97\xc3",  # xchg %eax,%edi; ret  (optional: close the fd just made)
}
REQUIRED_GADGETS = ("syscall_ret", "pop_rax")

RT_SIGFRAME_SIZE = 440  # pretcode (8) + struct ucontext (304) + struct siginfo (128)
_UC_FP_XSTATE, _UC_SIGCONTEXT_SS, _UC_STRICT_RESTORE_SS = 1, 2, 4
_FP_XSTATE_MAGIC1, _FP_XSTATE_MAGIC2 = 0x46505853, 0x46505845
_XFEATURE_TILEDATA = 1 << 18  # the only dynamically enabled feature (AMX), and the last
_TILEDATA_SIZE = 8192
_SS_INVALID = 3  # neither 0, SS_ONSTACK nor SS_DISABLE: rt_sigreturn leaves sigaltstack alone
_EINTR = -4
# struct sigcontext (asm/sigcontext.h), the general registers in order, then cs/gs/fs/ss.
_SIGCONTEXT_REGS = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi",
                    "rbp", "rbx", "rdx", "rax", "rcx", "rsp", "rip", "eflags")  # fmt: skip


def restart_for_sigreturn(regs) -> None:
    """The kernel's restart rule applied to registers that ``rt_sigreturn`` will restore.

    rt_sigreturn sets orig_rax to -1 (no restart later), so a syscall interrupted with
    -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND is re-executed from the frame (rax = its
    number, rip back on the instruction). It also resets the thread's restart block, so a
    -ERESTART_RESTARTBLOCK call (nanosleep, poll with a timeout, futex wait...) returns
    -EINTR — what it returns after any signal handler.
    """
    _restart(regs, _EINTR, 0)


def signal_xstate(xstate: bytes) -> bytes:
    """A thread's XSAVE area (PTRACE_GETREGSET NT_X86_XSTATE) as a signal frame carries it:
    the software-reserved bytes describe it (FP_XSTATE_MAGIC1, sizes, features) and
    FP_XSTATE_MAGIC2 follows it, so rt_sigreturn restores every component (x87, SSE, AVX,
    AVX-512, PKRU...) instead of falling back to the legacy FXSAVE part and resetting the rest.

    Bytes 464.. of the ptrace layout hold XCR0 (the user features). The size must not exceed
    what the kernel allows the task: AMX tile data is enabled per process, so a thread whose
    tile data is in its initial state is described without it (it is the last component).
    """
    if len(xstate) < 576:
        raise ValueError("XSAVE area too short")
    xcr0, = struct.unpack_from("<Q", xstate, 464)
    header_bv, = struct.unpack_from("<Q", xstate, 512)
    size = len(xstate)
    if xcr0 & _XFEATURE_TILEDATA and not header_bv & _XFEATURE_TILEDATA and size > 2 * _TILEDATA_SIZE:
        size -= _TILEDATA_SIZE
        xcr0 &= ~_XFEATURE_TILEDATA
    sw = struct.pack("<IIQI28x", _FP_XSTATE_MAGIC1, size + 4, xcr0, size)
    return xstate[:464] + sw + xstate[512:size] + struct.pack("<I", _FP_XSTATE_MAGIC2)


def sigframe(pretcode: int, regs, sigmask: int, fpstate: int) -> bytes:
    """``struct rt_sigframe`` (x86_64) from its ``pretcode`` slot on: a ucontext that
    ``rt_sigreturn`` turns back into ``regs`` (restart rule already applied), the blocked
    mask ``sigmask`` and the XSAVE area at ``fpstate`` (64-byte aligned, see
    :func:`signal_xstate`). rt_sigreturn reads it at rsp - 8, i.e. right after the return
    into `syscall; ret` pops ``pretcode``."""
    mc = struct.pack("<18Q", *(getattr(regs, r) & ((1 << 64) - 1) for r in _SIGCONTEXT_REGS))
    mc += struct.pack("<4H", regs.cs, regs.gs, regs.fs, regs.ss)
    mc += struct.pack("<4QQ64x", 0, 0, 0, 0, fpstate)  # err, trapno, oldmask, cr2, fpstate
    assert len(mc) == 256
    uc = struct.pack("<QQQi4xQ", _UC_FP_XSTATE | _UC_SIGCONTEXT_SS | _UC_STRICT_RESTORE_SS,
                     0, 0, _SS_INVALID, 0)
    uc += mc + struct.pack("<Q", sigmask & ((1 << 64) - 1))
    frame = struct.pack("<Q", pretcode) + uc + bytes(128)  # siginfo: unused by rt_sigreturn
    assert len(frame) == RT_SIGFRAME_SIZE
    return frame


def chain(gadgets: dict[str, int], close_result: bool, close_fds: tuple[int, ...]) -> list[int]:
    """The return addresses (and values) a thread executes after an injected ``syscall``
    returns at the `syscall; ret` gadget, up to (not including) the frame's pretcode slot:
    optionally close the fd the syscall returned and fds snapfs opened in the target, then
    rax = 15 (rt_sigreturn), whose `syscall; ret` is the pretcode slot."""
    words: list[int] = []
    if close_result:
        words += [gadgets["xchg_eax_edi"], gadgets["pop_rax"], SYS["close"], gadgets["syscall_ret"]]
    for fd in close_fds:
        words += [gadgets["pop_rdi"], fd, gadgets["pop_rax"], SYS["close"], gadgets["syscall_ret"]]
    return words + [gadgets["pop_rax"], SYS["rt_sigreturn"]]


def set_stack(regs, addr: int) -> None:
    """Point the stack pointer of ``regs`` at ``addr``."""
    regs.rsp = addr


# ---------------------------------------------------------------- core state
_CPUID_XSAVE = 0xD


@functools.cache
def xsave_layout() -> tuple[tuple[int, int, int], ...]:
    """``(feature, size, offset)`` of every user XSAVE feature >= 2 (AVX on) this CPU supports,
    from CPUID leaf 0xD: where PTRACE_GETREGSET(NT_X86_XSTATE) puts each one (the standard,
    non-compacted format). Intel and AMD differ (Zen 4: opmask at 832, Intel: 1088). Empty
    without XSAVE. The core view keeps what the area's XCR0 enables."""
    from snapfs.capture import kernel as k  # not at import: the cffi build script imports this module

    out = k.ffi.new("uint32_t[4]")
    if k.lib.snapfs_cpuid(_CPUID_XSAVE, 0, out) < 0:
        return ()
    supported = out[0] | out[3] << 32  # EDX:EAX: the features XCR0 may enable
    layout = []
    for feature in range(2, 64):
        if supported >> feature & 1 and k.lib.snapfs_cpuid(_CPUID_XSAVE, feature, out) == 0:
            size, offset, flags = out[0], out[1], out[2]
            if size and not flags & 1:  # ECX bit 0: a supervisor (IA32_XSS) feature, not in ptrace's area
                layout.append((feature, size, offset))
    return tuple(layout)


def core_arch_state() -> dict:
    """What the ``core`` view needs about this CPU (:attr:`CoreState.arch_state`): its XSAVE
    layout, once per snapshot."""
    return {XSAVE_LAYOUT_KEY: [list(f) for f in xsave_layout()]}
