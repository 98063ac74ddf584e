"""Everything x86_64-specific the capture needs: register layout, syscall numbers, the
``syscall`` instruction, and the kernel's syscall-restart rule.

An aarch64 port provides a module with the same names (``REGS_STRUCT``, ``REG_NAMES``,
``SYS``, ``SYSCALL_INSN``, ``set_syscall``, ``syscall_result``, ``emulate_restart``,
``pc``/``sp``, and what it takes from ``snapfs.elfcore.aarch64``) and :mod:`snapfs.capture.arch`
picks it by ``platform.machine()``.
"""

from __future__ import annotations

# The register layout and the register sets recorded at the freeze are shared with the core
# view (snapfs.elfcore.x86_64): one description of the registers for both.
from snapfs.elfcore.x86_64 import (  # noqa: F401
    FPREGS_SIZE,
    NAME,
    RECORDED_REGSETS,
    REG_NAMES,
    REGSET_BUFFER,
    fpregs_from_regsets,
)

REGS_STRUCT = "struct user_regs { unsigned long long " + ", ".join(REG_NAMES) + "; };"
REGS_SIZE = 8 * len(REG_NAMES)
XSTATE_MAX = 16384  # buffer for PTRACE_GETREGSET(NT_X86_XSTATE); AMX needs ~11 KiB

# Syscall numbers (asm/unistd_64.h) used for injection and by snapfs itself.
SYS = {
    "close": 3,
    "mmap": 9,
    "munmap": 11,
    "ioctl": 16,
    "socketpair": 53,
    "recvmsg": 47,
    "pause": 34,
    "fcntl": 72,
    "epoll_ctl": 233,
    "dup3": 292,
    "brk": 12,
    "mprotect": 10,
    "mremap": 25,
    "open": 2,
    "ptrace": 101,
    "restart_syscall": 219,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
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


def emulate_restart(regs) -> None:
    """Apply to saved registers what the kernel would do when resuming an interrupted syscall.

    A thread released from a syscall-exit stop (after an injection) skips the kernel's own
    restart logic, so without this ``read`` would return errno 512 and ``nanosleep`` 516.
    """
    if _signed(regs.orig_rax) < 0:
        return
    rax = _signed(regs.rax)
    if rax in (_ERESTARTSYS, _ERESTARTNOINTR, _ERESTARTNOHAND):
        regs.rax = regs.orig_rax
        regs.rip -= SYSCALL_INSN_LEN
    elif rax == _ERESTART_RESTARTBLOCK:
        regs.rax = SYS["restart_syscall"]
        regs.rip -= SYSCALL_INSN_LEN


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
